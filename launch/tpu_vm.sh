#!/usr/bin/env bash
# Drive Cloud TPU VMs for dvar-jax: create (directly or as a queued resource), setup, train, sweep,
# logs, fetch, status, delete.
# Usage: launch/tpu_vm.sh SUBCOMMAND [options] [-- dvar train args]   (-h for every option)
# Every gcloud call goes through run(); --dry-run (or DRY_RUN=1) prints them, "+ " first, and
# runs nothing.
set -euo pipefail
if (( BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 3) )); then
  echo "launch/tpu_vm.sh: needs bash >= 4.3, this is $BASH_VERSION (macOS: brew install bash)" >&2
  exit 1
fi

PROG=launch/tpu_vm.sh
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$SCRIPT_DIR")

SUBCOMMANDS="create setup train sweep logs fetch status delete"
DEFAULT_TYPE=v5litepod-8
DEFAULT_DIR=dvar-jax
DEFAULT_PYTHON=python3.12
DEFAULT_WORKER=0
REMOTE_ARCHIVE=dvar-jax-src.tar.gz
MAX_REMOTE_COMMAND_BYTES=100000  # one argv string may not exceed 128 KiB on Linux

usage() {
  cat <<EOF
usage: $PROG SUBCOMMAND [options] [-- dvar train args | -- dvar sweep run args]

Drives Cloud TPU VMs with 'gcloud compute tpus tpu-vm'. Run with --dry-run first: it prints
every command, one per line, prefixed with '+ ', and runs nothing.

subcommands:
  create   create the TPU VM (gcloud compute tpus tpu-vm create), or with --queued request it
           as a queued resource (gcloud compute tpus queued-resources create), which waits
           for capacity (the way to get Spot slices)
  setup    on every worker: fetch the repo at --ref (git clone of --repo, or a copy of the
           local checkout) into --dir, make --dir/.venv with --python, and
           pip install -e . plus jax[tpu] pinned to the jax range in setup.py
  train    on every worker at once (multi-host: jax.distributed initialises from the TPU
           environment): nohup dvar train --workdir=WORKDIR ARGS..., where ARGS are the
           arguments after '--'; output goes to a log file on each worker, so an ssh drop
           does not stop the run
  sweep    on every worker: run a list of commands one after another, in the background
           under nohup. With --grid: the runs of that grid not done yet in --workdir, as
           listed on the worker by 'dvar sweep run --grid=G --workdir=W --emit-commands ARGS'
           (ARGS after '--', e.g. --only=... or --config.data.path=...). Otherwise: the
           commands read from --commands FILE or stdin (one per line, e.g. from 'dvar sweep
           run ... --emit-commands'; blank lines and '#' comments skipped)
  logs     follow a train log on --worker (tail -n +1 -F over tpu-vm ssh): --log, or else the
           newest dvar-logs/train-*.log on that worker
  fetch    copy the run folder --workdir back: gs://... with gcloud storage rsync; a path on
           the workers with tpu-vm scp --recurse from --worker (--worker=all: each worker
           into DEST/worker-K)
  status   show the TPU VM (tpu-vm describe), or with --queued its queued resource
           (queued-resources describe: WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, ...)
  delete   delete the TPU VM (gcloud compute tpus tpu-vm delete --quiet), or with --queued
           the queued resource and its TPU VM (queued-resources delete --force --quiet)

options (an option may also be written --opt=value):
  --name NAME        TPU VM name; all subcommands (env TPU_NAME; required)
  --zone ZONE        zone, e.g. us-central1-a; all subcommands (env TPU_ZONE; required)
  --project PROJECT  GCP project; all subcommands (env TPU_PROJECT; default: gcloud's
                     configured project)
  --type TYPE        create: accelerator type vN[suffix]-COUNT, e.g. v4-8, v5litepod-16,
                     v5p-8, v6e-8 (env TPU_TYPE; default: $DEFAULT_TYPE)
  --version VERSION  create: TPU runtime version (env TPU_VERSION; default by type:
                     v2/v3/v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
                     v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e; other types need --version)
  --spot             create: Spot VM (default: off)
  --preemptible      create: preemptible VM (default: off; not with --spot or --queued)
  --queued           create/status/delete: go through a queued resource named --qr-name
                     whose node is --name (env TPU_QUEUED=1; default: off)
  --qr-name QR       create/status/delete with --queued: queued resource id
                     (default: NAME-qr)
  --repo URL         setup: git URL to clone on the workers (env TPU_REPO; default: the
                     local checkout's 'origin' remote; with no remote, as --copy)
  --ref REF          setup: branch, tag or commit to check out (env TPU_REF; default: the
                     local HEAD commit, which must be pushed unless --copy)
  --copy             setup: copy 'git archive REF' of the local checkout to the workers
                     with tpu-vm scp instead of cloning (default: off)
  --python PYTHON    setup: interpreter for the venv, installed from the deadsnakes PPA
                     when missing (default: $DEFAULT_PYTHON; setup.py needs >= 3.12)
  --dir DIR          setup/train/sweep/logs/fetch: checkout folder on each worker, relative
                     to the home folder (default: $DEFAULT_DIR)
  --workdir DIR      train/fetch: run folder, gs://BUCKET/PATH or a path on each worker
                     (relative to --dir unless it starts with /); required. sweep --grid:
                     the folder of the grid's run folders and results.jsonl, the same
                     kinds. A multi-worker slice needs gs://: its workers share no disk,
                     and every worker must see the one run folder (process 0 writes the
                     run's files, every worker its checkpoint shards)
  --grid GRID        sweep: a grid of dvar sweep run (small, paper, or a .py file in the
                     checkout); the worker lists its runs not done yet (default: none, use
                     --commands)
  --log FILE         train: log file on each worker, relative to --dir
                     (default: dvar-logs/train-UTCTIMESTAMP.log); logs: the log to follow
                     (default: the newest dvar-logs/train-*.log on the worker)
  --worker W         logs/fetch: worker index 0, 1, ... or 'all' (default: $DEFAULT_WORKER)
  --workers N        fetch --worker=all: number of workers of the slice (default: asked
                     from gcloud tpu-vm describe; a dry run needs it given)
  --dest DIR         fetch: local folder the run folder is copied into, as DIR/RUN
                     (DIR/worker-K/RUN with --worker=all), RUN being the last part of
                     --workdir (default: tpu-results/NAME)
  --commands FILE    sweep without --grid: file with one command per line; '-' is stdin
                     (default: stdin)
  --dry-run          print the commands, run nothing (env DRY_RUN=1; default: off)
  -h, --help         this help

Bad input (unknown subcommand or option, missing name/zone, malformed value) exits with
status 2.

examples:
  $PROG create --name=dvar-1 --zone=us-west4-a --type=v5litepod-8 --spot --dry-run
  $PROG create --name=dvar-1 --zone=us-west4-a --type=v5litepod-16 --queued --spot
  $PROG status --name=dvar-1 --zone=us-west4-a --queued
  $PROG setup  --name=dvar-1 --zone=us-west4-a
  $PROG train  --name=dvar-1 --zone=us-west4-a --workdir=gs://my-bucket/runs/diff -- \\
      --config=dvar_jax/configs/base.py --config.objective=diffusion
  $PROG logs   --name=dvar-1 --zone=us-west4-a --worker=all
  $PROG fetch  --name=dvar-1 --zone=us-west4-a --workdir=gs://my-bucket/runs/diff
  $PROG sweep  --name=dvar-1 --zone=us-west4-a --grid=paper --workdir=gs://my-bucket/paper -- \\
      --only='ar-*-U100M-*' --config.data.train_store=gs://b/stores/c4-train --config.data.validation_store=gs://b/stores/c4-val
  dvar sweep run --grid=grid.py --workdir=runs/g --emit-commands | \\
      $PROG sweep --name=dvar-1 --zone=us-west4-a
  $PROG delete --name=dvar-1 --zone=us-west4-a
  $PROG delete --name=dvar-1 --zone=us-west4-a --queued   # if made with create --queued
EOF
}

die_usage() {  # bad input: message on stderr, exit status 2
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  printf "Run '%s --help' for every subcommand and option.\n" "$PROG" >&2
  exit 2
}

die() {  # a failure that is not bad input
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 1
}

# POSIX single-quote quoting: the same safety as printf %q (any byte, spaces, quotes and
# newlines included survive one round of shell parsing), but readable, and parsed alike by
# sh, bash and Python's shlex. Words made only of safe characters stay bare, and in
# --opt=value only the value is quoted.
quote_to() {  # quote_to VAR STRING: VAR=STRING quoted (no subshell, so fast for long lists)
  local -n _out=$1
  local s=$2 prefix=""
  if [[ $s =~ ^(--[A-Za-z0-9][A-Za-z0-9_.-]*=)(.+)$ ]]; then
    prefix=${BASH_REMATCH[1]}
    s=${BASH_REMATCH[2]}
  fi
  if [[ -n $s && $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    _out=$prefix$s
  else
    _out="$prefix'${s//\'/\'\\\'\'}'"
  fi
}

quote() {  # quote STRING -> STRING quoted
  local q
  quote_to q "$1"
  printf '%s' "$q"
}

quote_words() {  # quote_words ARG... -> the args quoted and joined by spaces
  local out=() a q
  for a in "$@"; do
    quote_to q "$a"
    out+=("$q")
  done
  printf '%s' "${out[*]}"
}

run() {  # run CMD ARG...: print it (dry run) or echo it to stderr and run it
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ %s\n' "$(quote_words "$@")"
  else
    printf '+ %s\n' "$(quote_words "$@")" >&2
    "$@"
  fi
}

# ---------------------------------------------------------------------------------------------
# arguments

[[ $# -gt 0 ]] || { usage >&2; exit 2; }
case $1 in
  -h | --help) usage; exit 0 ;;
  create | setup | train | sweep | logs | fetch | status | delete) SUBCOMMAND=$1; shift ;;
  *) die_usage "unknown subcommand '$1' (allowed: ${SUBCOMMANDS// /, })" ;;
esac

NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
PROJECT=${TPU_PROJECT:-}
TYPE=${TPU_TYPE:-$DEFAULT_TYPE}
VERSION=${TPU_VERSION:-}
REPO=${TPU_REPO:-}
REF=${TPU_REF:-}
case ${DRY_RUN:-0} in
  1 | true | yes) DRY_RUN=1 ;;
  0 | false | no | "") DRY_RUN=0 ;;
  *) die_usage "DRY_RUN='$DRY_RUN' (allowed: 1, true, yes, 0, false, no)" ;;
esac
case ${TPU_QUEUED:-0} in
  1 | true | yes) QUEUED=1 ;;
  0 | false | no | "") QUEUED=0 ;;
  *) die_usage "TPU_QUEUED='$TPU_QUEUED' (allowed: 1, true, yes, 0, false, no)" ;;
esac
QR_NAME=""
WORKER=$DEFAULT_WORKER
WORKER_GIVEN=0
WORKERS=""
DEST=""
SPOT=0
PREEMPTIBLE=0
COPY=0
PYTHON=$DEFAULT_PYTHON
DIR=$DEFAULT_DIR
WORKDIR=""
LOG=""
COMMANDS_FILE=-
GRID=""
PASSTHROUGH=()

# Which subcommands take each option (the shared ones take all).
declare -A OPTION_FOR=(
  [--type]="create" [--version]="create" [--spot]="create" [--preemptible]="create"
  [--queued]="create status delete" [--qr-name]="create status delete"
  [--repo]="setup" [--ref]="setup" [--copy]="setup" [--python]="setup"
  [--dir]="setup train sweep logs fetch" [--workdir]="train sweep fetch"
  [--log]="train logs" [--commands]="sweep" [--grid]="sweep" [--worker]="logs fetch"
  [--workers]="fetch" [--dest]="fetch"
)

while [[ $# -gt 0 ]]; do
  arg=$1
  shift
  if [[ $arg == -- ]]; then
    [[ $SUBCOMMAND == train || $SUBCOMMAND == sweep ]] \
      || die_usage "'--' passes arguments to dvar train (or dvar sweep run with sweep --grid);" \
           "'$SUBCOMMAND' takes none"
    PASSTHROUGH=("$@")
    break
  fi
  opt=${arg%%=*}
  has_value=0
  if [[ $arg == *=* ]]; then
    has_value=1
    value=${arg#*=}
  fi
  case $opt in
    -h | --help) usage; exit 0 ;;
    --dry-run | --spot | --preemptible | --copy | --queued)
      [[ $has_value == 0 ]] || die_usage "option $opt takes no value (got '$arg')" ;;
    --name | --zone | --project | --type | --version | --repo | --ref | --python | --dir \
      | --workdir | --log | --commands | --grid | --qr-name | --worker | --workers | --dest)
      if [[ $has_value == 0 ]]; then
        [[ $# -gt 0 ]] || die_usage "option $opt needs a value"
        [[ $1 == - || $1 != -* ]] || die_usage "option $opt needs a value, got the option '$1'"
        value=$1
        shift
      fi ;;
    -*) die_usage "unknown option '$opt' for '$SUBCOMMAND' (see --help for the options)" ;;
    *) die_usage "unexpected argument '$arg' for '$SUBCOMMAND'$(
         [[ $SUBCOMMAND == train ]] && printf '; put dvar train arguments after --')" ;;
  esac
  if [[ -n ${OPTION_FOR[$opt]:-} && " ${OPTION_FOR[$opt]} " != *" $SUBCOMMAND "* ]]; then
    die_usage "option $opt does not apply to '$SUBCOMMAND' (it is for: ${OPTION_FOR[$opt]})"
  fi
  case $opt in
    --dry-run) DRY_RUN=1 ;;
    --spot) SPOT=1 ;;
    --preemptible) PREEMPTIBLE=1 ;;
    --copy) COPY=1 ;;
    --queued) QUEUED=1 ;;
    --qr-name) QR_NAME=$value ;;
    --worker) WORKER=$value; WORKER_GIVEN=1 ;;
    --workers) WORKERS=$value ;;
    --dest) DEST=$value ;;
    --name) NAME=$value ;;
    --zone) ZONE=$value ;;
    --project) PROJECT=$value ;;
    --type) TYPE=$value ;;
    --version) VERSION=$value ;;
    --repo) REPO=$value ;;
    --ref) REF=$value ;;
    --python) PYTHON=$value ;;
    --dir) DIR=$value ;;
    --workdir) WORKDIR=$value ;;
    --log) LOG=$value ;;
    --commands) COMMANDS_FILE=$value ;;
    --grid) GRID=$value ;;
  esac
done

# ---------------------------------------------------------------------------------------------
# validation (exit 2, naming the bad value and what is allowed)

[[ -n $NAME ]] || die_usage "missing TPU name: pass --name=NAME or set TPU_NAME"
[[ $NAME =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] \
  || die_usage "invalid TPU name '$NAME' (allowed: lowercase letters, digits and '-'," \
       "starting with a letter, not ending with '-', at most 63 characters)"
[[ -n $ZONE ]] || die_usage "missing zone: pass --zone=ZONE or set TPU_ZONE"
[[ $ZONE =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] \
  || die_usage "invalid zone '$ZONE' (allowed: REGION-ZONE like us-central1-a, europe-west4-b)"
[[ -z $PROJECT || $PROJECT =~ ^[a-z][-a-z0-9.:]{4,61}[a-z0-9]$ ]] \
  || die_usage "invalid project '$PROJECT' (allowed: a GCP project id like my-project-123)"

if [[ $SUBCOMMAND == create ]]; then
  [[ $TYPE =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] \
    || die_usage "invalid accelerator type '$TYPE' (allowed: vN[suffix]-COUNT, e.g. v4-8," \
         "v5litepod-8, v5p-16, v6e-8)"
  if [[ -z $VERSION ]]; then
    case ${TYPE%-*} in
      v2 | v3 | v4) VERSION=tpu-ubuntu2204-base ;;
      v5litepod) VERSION=v2-alpha-tpuv5-lite ;;
      v5p) VERSION=v2-alpha-tpuv5 ;;
      v6e) VERSION=v2-alpha-tpuv6e ;;
      *) die_usage "no default runtime version for accelerator type '$TYPE'" \
           "(defaults exist for v2, v3, v4, v5litepod, v5p, v6e); pass --version" ;;
    esac
  fi
  [[ $VERSION =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] \
    || die_usage "invalid runtime version '$VERSION' (allowed: letters, digits, '.', '_'," \
         "'-', e.g. tpu-ubuntu2204-base, v2-alpha-tpuv5-lite)"
  [[ $SPOT == 0 || $PREEMPTIBLE == 0 ]] \
    || die_usage "--spot and --preemptible exclude each other; pick one"
  # gcloud compute tpus queued-resources create has --spot (and --reserved, --guaranteed) but no
  # --preemptible.
  [[ $QUEUED == 0 || $PREEMPTIBLE == 0 ]] \
    || die_usage "--preemptible does not work with --queued (queued resources have no" \
         "preemptible option); use --queued --spot for interruptible capacity"
fi

if [[ $SUBCOMMAND == create || $SUBCOMMAND == status || $SUBCOMMAND == delete ]]; then
  if [[ $QUEUED == 1 ]]; then
    QR_NAME=${QR_NAME:-$NAME-qr}
    [[ $QR_NAME =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] \
      || die_usage "invalid queued resource name '$QR_NAME' (allowed: lowercase letters, digits" \
           "and '-', starting with a letter, not ending with '-', at most 63 characters);" \
           "pass --qr-name"
  else
    [[ -z $QR_NAME ]] || die_usage "--qr-name '$QR_NAME' needs --queued"
  fi
fi

if [[ " setup train sweep logs fetch " == *" $SUBCOMMAND "* ]]; then
  [[ $DIR =~ ^[A-Za-z0-9_.][A-Za-z0-9_./-]*$ && ! $DIR =~ (^|/)\.\.?(/|$) ]] \
    || die_usage "invalid --dir '$DIR' (allowed: a relative path of letters, digits, '_'," \
         "'.', '-', '/', with no '.' or '..' parts)"
fi

if [[ $SUBCOMMAND == setup ]]; then
  [[ $PYTHON =~ ^python3\.[0-9]+$ ]] \
    || die_usage "invalid --python '$PYTHON' (allowed: python3.N, e.g. python3.12)"
  [[ -z $REF || $REF =~ ^[A-Za-z0-9_][A-Za-z0-9_./-]*$ ]] \
    || die_usage "invalid --ref '$REF' (allowed: a branch, tag or commit name)"
  [[ -z $REPO || $REPO =~ ^[^[:space:]\'\"\\]+$ ]] \
    || die_usage "invalid --repo '$REPO' (allowed: a git URL without spaces or quotes)"
  [[ $COPY == 0 || -z $REPO ]] || die_usage "--copy and --repo '$REPO' exclude each other"
fi

if [[ $SUBCOMMAND == train || $SUBCOMMAND == fetch || ( $SUBCOMMAND == sweep && -n $GRID ) ]]
then
  [[ -n $WORKDIR ]] || die_usage "missing --workdir for $SUBCOMMAND${GRID:+ --grid} (allowed:" \
                         "gs://BUCKET/PATH or a path on each worker)"
  if [[ $WORKDIR == *://* ]]; then
    [[ $WORKDIR =~ ^gs://[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9](/.*)?$ ]] \
      || die_usage "invalid --workdir '$WORKDIR' (allowed: gs://BUCKET/PATH or a local path)"
  fi
  [[ $WORKDIR != *$'\n'* ]] || die_usage "invalid --workdir: it contains a newline"
fi

if [[ $SUBCOMMAND == train ]]; then
  for a in ${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"}; do
    [[ $a != --workdir && $a != --workdir=* ]] \
      || die_usage "'$a' after --: give the run folder as --workdir before --"
    [[ $a != --dry-run ]] || die_usage "'$a' after -- would go to dvar train; put it before --"
  done
fi

if [[ $SUBCOMMAND == sweep ]]; then
  if [[ -n $GRID ]]; then
    [[ $GRID =~ ^[A-Za-z0-9_][A-Za-z0-9_./-]*$ && ! $GRID =~ (^|/)\.\.?(/|$) ]] \
      || die_usage "invalid --grid '$GRID' (allowed: a grid name like small or paper, or a" \
           ".py path in the checkout of letters, digits, '_', '.', '-', '/')"
    [[ $COMMANDS_FILE == - ]] \
      || die_usage "--grid and --commands exclude each other: the worker lists the grid's" \
           "commands itself"
    [[ $WORKDIR == gs://* ]] \
      || [[ $WORKDIR =~ ^/?[A-Za-z0-9_.][A-Za-z0-9_./-]*$ && ! $WORKDIR =~ (^|/)\.\.?(/|$) ]] \
      || die_usage "invalid --workdir '$WORKDIR' for sweep (allowed: gs://BUCKET/PATH, or a" \
           "path on the workers of letters, digits, '_', '.', '-', '/', with no '.' or '..'" \
           "parts)"
    for a in ${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"}; do
      case $a in
        --workdir | --workdir=* | --grid | --grid=* | --emit[-_]commands*)
          die_usage "'$a' after --: $PROG sweep sets it; give --grid and --workdir before --" ;;
        --dry-run) die_usage "'$a' after -- would go to dvar sweep run; put it before --" ;;
      esac
    done
  else
    [[ -z $WORKDIR ]] || die_usage "--workdir '$WORKDIR' for sweep needs --grid (with" \
                           "--commands, each command names its own workdir)"
    [[ ${#PASSTHROUGH[@]} == 0 ]] || die_usage "'--' passes arguments to dvar sweep run;" \
                                     "it needs --grid"
  fi
fi

if [[ $SUBCOMMAND == train || $SUBCOMMAND == logs ]]; then
  [[ -z $LOG || $LOG =~ ^[A-Za-z0-9_./-]+$ ]] \
    || die_usage "invalid --log '$LOG' (allowed: letters, digits, '_', '.', '-', '/')"
fi

if [[ $SUBCOMMAND == logs || $SUBCOMMAND == fetch ]]; then
  [[ $WORKER =~ ^(all|0|[1-9][0-9]{0,3})$ ]] \
    || die_usage "invalid --worker '$WORKER' (allowed: a worker index 0, 1, 2, ... or 'all')"
fi

if [[ $SUBCOMMAND == fetch ]]; then
  [[ -z $WORKERS || $WORKERS =~ ^[1-9][0-9]{0,3}$ ]] \
    || die_usage "invalid --workers '$WORKERS' (allowed: the number of workers, 1 or more)"
  [[ -z $WORKERS || $WORKER == all || $WORKER -lt $WORKERS ]] \
    || die_usage "--worker '$WORKER' is not below --workers '$WORKERS' (workers count from 0)"
  DEST=${DEST:-tpu-results/$NAME}
  [[ $DEST != -* && $DEST != *:* && $DEST != *$'\n'* ]] \
    || die_usage "invalid --dest '$DEST' (allowed: a local folder not starting with '-', without" \
         "':' or newlines)"
  if [[ $WORKDIR == gs://* ]]; then
    [[ $WORKER_GIVEN == 0 && -z $WORKERS ]] \
      || die_usage "--worker/--workers do not apply to the gs:// workdir '$WORKDIR': it is" \
           "copied once from the bucket"
  else
    [[ $WORKDIR =~ ^/?[A-Za-z0-9_.][A-Za-z0-9_./-]*$ && ! $WORKDIR =~ (^|/)\.\.?(/|$) ]] \
      || die_usage "invalid --workdir '$WORKDIR' for fetch (allowed: gs://BUCKET/PATH, or a" \
           "path on the workers of letters, digits, '_', '.', '-', '/', with no '.' or '..'" \
           "parts)"
    [[ $WORKER != all || -n $WORKERS || $DRY_RUN == 0 ]] \
      || die_usage "fetch --worker=all in a dry run needs --workers N: the live run asks" \
           "gcloud for the count ('gcloud compute tpus tpu-vm describe $NAME --zone=$ZONE" \
           "--format=value(networkEndpoints.len())'), which a dry run does not call"
  fi
fi

# ---------------------------------------------------------------------------------------------
# helpers

GCLOUD_TPU=(gcloud compute tpus tpu-vm)
GCLOUD_QR=(gcloud compute tpus queued-resources)
SCOPE=(--zone="$ZONE")
[[ -z $PROJECT ]] || SCOPE+=(--project="$PROJECT")

ssh_all() {  # ssh_all REMOTE_COMMAND: run it on every worker of the TPU VM
  local remote=$1
  if (( ${#remote} > MAX_REMOTE_COMMAND_BYTES )); then
    die_usage "the remote command is ${#remote} bytes, more than one ssh command takes" \
      "($MAX_REMOTE_COMMAND_BYTES); split the input into several calls"
  fi
  run "${GCLOUD_TPU[@]}" ssh "$NAME" "${SCOPE[@]}" --worker=all --command="$remote"
}

timestamp() { date -u +%Y%m%d-%H%M%S; }

# The jax requirement of setup.py at REF, e.g. ">=0.12.0.1,<0.13" from "jax[cpu]>=0.12.0.1,<0.13".
jax_spec() {
  local ref=$1 text line
  text=$(git -C "$REPO_ROOT" show "$ref:setup.py" 2>/dev/null || cat "$REPO_ROOT/setup.py")
  line=$(grep -oE '"jax(\[[a-z,]+\])?[<>=!~][^"]*"' <<<"$text" | head -n 1 || true)
  [[ -n $line ]] || die "no jax requirement found in setup.py"
  line=${line//\"/}
  line=${line#jax}
  [[ $line != \[* ]] || line=${line#*\]}
  printf '%s' "$line"
}

# ---------------------------------------------------------------------------------------------
# subcommands

cmd_create() {
  local extra=()
  [[ $SPOT == 0 ]] || extra+=(--spot)
  [[ $PREEMPTIBLE == 0 ]] || extra+=(--preemptible)
  if [[ $QUEUED == 1 ]]; then
    # The request waits in the queue (WAITING_FOR_RESOURCES) until capacity frees up, then
    # creates the TPU VM NAME; see 'status --queued'. The runtime flag is --runtime-version here.
    run "${GCLOUD_QR[@]}" create "$QR_NAME" --node-id="$NAME" "${SCOPE[@]}" \
      --accelerator-type="$TYPE" --runtime-version="$VERSION" ${extra[@]+"${extra[@]}"}
  else
    run "${GCLOUD_TPU[@]}" create "$NAME" "${SCOPE[@]}" --accelerator-type="$TYPE" \
      --version="$VERSION" ${extra[@]+"${extra[@]}"}
  fi
}

cmd_status() {
  if [[ $QUEUED == 1 ]]; then
    run "${GCLOUD_QR[@]}" describe "$QR_NAME" "${SCOPE[@]}"
  else
    run "${GCLOUD_TPU[@]}" describe "$NAME" "${SCOPE[@]}"
  fi
}

cmd_setup() {
  git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1 \
    || die "$REPO_ROOT is not a git checkout; setup needs one to find the ref (and --copy)"
  if [[ $COPY == 0 && -z $REPO ]]; then
    REPO=$(git -C "$REPO_ROOT" remote get-url origin 2>/dev/null || true)
    if [[ -z $REPO ]]; then
      COPY=1
      printf '%s: note: no git remote "origin" and no --repo; copying the local checkout\n' \
        "$PROG" >&2
    fi
  fi
  if [[ -z $REF ]]; then
    REF=$(git -C "$REPO_ROOT" rev-parse HEAD) || die "cannot read HEAD of $REPO_ROOT"
    if [[ -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
      printf '%s: note: uncommitted changes are not sent; the workers get %s\n' \
        "$PROG" "$REF" >&2
    fi
  fi
  local spec
  spec=$(jax_spec "$REF")

  local d fetch install
  d=$(quote "$DIR")
  if [[ $COPY == 1 ]]; then
    local sha
    sha=$(git -C "$REPO_ROOT" rev-parse --verify --quiet "$REF^{commit}") \
      || die_usage "--ref '$REF' is not a commit of the local checkout $REPO_ROOT"
    ARCHIVE="${TMPDIR:-/tmp}/dvar-jax-${sha:0:12}-$$.tar.gz"
    [[ $DRY_RUN == 1 ]] || trap 'rm -f "$ARCHIVE"' EXIT
    run git -C "$REPO_ROOT" archive --format=tar.gz --output="$ARCHIVE" "$sha"
    run "${GCLOUD_TPU[@]}" scp "$ARCHIVE" "$NAME:$REMOTE_ARCHIVE" "${SCOPE[@]}" --worker=all
    fetch="mkdir -p $d && tar -xzf $REMOTE_ARCHIVE -C $d && rm -f $REMOTE_ARCHIVE"
  else
    fetch="{ [ -d $d/.git ] || git clone --quiet $(quote "$REPO") $d; }"
    fetch+=" && git -C $d fetch --quiet origin $(quote "$REF")"
    fetch+=" && git -C $d checkout --quiet --detach FETCH_HEAD"
  fi
  local py
  py=$(quote "$PYTHON")
  install="if ! command -v $py >/dev/null; then"
  install+=" sudo apt-get -o DPkg::Lock::Timeout=600 update -qq"
  install+=" && sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600"
  install+=" install -y -qq software-properties-common"
  install+=" && sudo add-apt-repository -y ppa:deadsnakes/ppa"
  install+=" && sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600"
  install+=" install -y -qq $py $py-venv; fi"
  install+=" && cd $d && { [ -x .venv/bin/python ] || $py -m venv .venv; }"
  install+=" && .venv/bin/pip install --quiet --upgrade pip"
  install+=" && .venv/bin/pip install --quiet -e . $(quote "jax[tpu]$spec")"
  install+=" && .venv/bin/dvar --help >/dev/null"
  install+=" && echo \"\$(hostname): dvar-jax installed in ~/$DIR/.venv\""
  ssh_all "set -e; $fetch && $install"
  if [[ $COPY == 1 ]]; then
    run rm -f "$ARCHIVE"
  fi
}

cmd_train() {
  local log=${LOG:-dvar-logs/train-$(timestamp).log} d dvar_cmd
  d=$(quote "$DIR")
  dvar_cmd=$(quote_words .venv/bin/dvar train --workdir="$WORKDIR" \
    ${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"})
  local remote="cd $d"
  remote+=" && { [ -x .venv/bin/dvar ] || { echo \"\$(hostname): no ~/$DIR/.venv/bin/dvar;"
  remote+=" run '$PROG setup' first\" >&2; exit 1; }; }"
  remote+=" && mkdir -p $(quote "$(dirname "$log")")"
  remote+=" && { nohup $dvar_cmd > $(quote "$log") 2>&1 < /dev/null & }"
  remote+=" && echo \"\$(hostname): dvar train started (pid \$!), log ~/$DIR/$log\""
  ssh_all "$remote"
}

# The sweep runner, run on each worker in --dir as: bash -c RUNNER sweep FOLDER. FOLDER/commands
# holds one command per line; run i logs to FOLDER/run-000i.log. Kept on one line (the parts are
# joined by spaces) so a dry run prints one line per command.
# shellcheck disable=SC2016  # expanded on the worker, not here
SWEEP_RUNNER_PARTS=(
  'export PATH="$PWD/.venv/bin:$PATH"; f=$1/commands; n=$(grep -c "" "$f"); i=0; failed=0;'
  'while IFS= read -r cmd; do'
  'i=$((i + 1)); log=$(printf "%s/run-%04d.log" "$1" "$i");'
  'echo "[$(date -u +%FT%TZ)] run $i/$n: $cmd (log $log)";'
  'if bash -c "$cmd" > "$log" 2>&1 < /dev/null; then echo "[$(date -u +%FT%TZ)] run $i/$n ok";'
  'else rc=$?; failed=$((failed + 1));'
  'echo "[$(date -u +%FT%TZ)] run $i/$n failed with exit status $rc"; fi;'
  'done < "$f";'
  'echo "[$(date -u +%FT%TZ)] sweep done: $((n - failed)) of $n runs ok"; [ "$failed" = 0 ]'
)
SWEEP_RUNNER="${SWEEP_RUNNER_PARTS[*]}"

# With --grid: the worker lists the grid's runs not done yet in its own --workdir (the only
# place that knows which are done) into FOLDER/commands, then runs them like any list.
cmd_sweep_grid() {
  local folder d remote emit
  folder=dvar-logs/sweep-$(timestamp)
  d=$(quote "$DIR")
  emit=$(quote_words .venv/bin/dvar sweep run --grid="$GRID" --workdir="$WORKDIR" \
    --emit-commands ${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"})
  remote="cd $d"
  remote+=" && { [ -x .venv/bin/dvar ] || { echo \"\$(hostname): no ~/$DIR/.venv/bin/dvar;"
  remote+=" run '$PROG setup' first\" >&2; exit 1; }; }"
  remote+=" && mkdir -p $folder && $emit > $folder/commands"
  remote+=" && { nohup bash -c $(quote "$SWEEP_RUNNER") sweep $folder"
  remote+=" > $folder/sweep.log 2>&1 < /dev/null & }"
  remote+=" && echo \"\$(hostname): sweep of \$(grep -c '' $folder/commands) runs of grid"
  remote+=" $GRID started (pid \$!), log ~/$DIR/$folder/sweep.log\""
  ssh_all "$remote"
}

cmd_sweep() {
  if [[ -n $GRID ]]; then
    cmd_sweep_grid
    return
  fi
  local input line commands=()
  if [[ $COMMANDS_FILE == - ]]; then
    [[ ! -t 0 ]] \
      || die_usage "no commands: pass --commands FILE or pipe them on stdin (stdin is a terminal)"
    input=$(cat)
  else
    [[ -f $COMMANDS_FILE && -r $COMMANDS_FILE ]] \
      || die_usage "--commands '$COMMANDS_FILE' is not a readable file"
    input=$(<"$COMMANDS_FILE")
  fi
  while IFS= read -r line || [[ -n $line ]]; do
    line=${line%$'\r'}
    [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
    commands+=("$line")
  done <<<"$input"
  local from="--commands '$COMMANDS_FILE'"
  [[ $COMMANDS_FILE != - ]] || from=stdin
  [[ ${#commands[@]} -gt 0 ]] \
    || die_usage "no commands on $from (it has only blank lines or '#' comments)"

  local folder d remote
  folder=dvar-logs/sweep-$(timestamp)
  d=$(quote "$DIR")
  remote="cd $d && mkdir -p $folder"
  remote+=" && printf '%s\\n' $(quote_words "${commands[@]}") > $folder/commands"
  remote+=" && { nohup bash -c $(quote "$SWEEP_RUNNER") sweep $folder"
  remote+=" > $folder/sweep.log 2>&1 < /dev/null & }"
  remote+=" && echo \"\$(hostname): sweep of ${#commands[@]} runs started (pid \$!),"
  remote+=" log ~/$DIR/$folder/sweep.log\""
  ssh_all "$remote"
}

# Follows a log with tail -F (it waits for a file that is not there yet, and follows it across
# rotation); -n +1 shows it from the start. With --worker=all, gcloud runs it on every worker at
# once and each line gets the worker's host name first (sed -u: unbuffered, so lines come live).
cmd_logs() {
  local d remote
  d=$(quote "$DIR")
  remote="cd $d"
  if [[ -n $LOG ]]; then
    remote+=" && log=$(quote "$LOG")"
  else
    remote+=" && log=\$(ls -t dvar-logs/train-*.log 2>/dev/null | head -n 1)"
    remote+=" && { [ -n \"\$log\" ] || { echo \"\$(hostname): no ~/$DIR/dvar-logs/train-*.log;"
    remote+=" start a run with '$PROG train' or pass --log\" >&2; exit 1; }; }"
  fi
  remote+=" && echo \"\$(hostname): following ~/$DIR/\$log\" >&2"
  if [[ $WORKER == all ]]; then
    remote+=" && tail -n +1 -F \"\$log\" | sed -u \"s/^/\$(hostname): /\""
  else
    remote+=" && exec tail -n +1 -F \"\$log\""
  fi
  run "${GCLOUD_TPU[@]}" ssh "$NAME" "${SCOPE[@]}" --worker="$WORKER" --command="$remote"
}

# The number of workers (hosts) of the TPU VM: one network endpoint each.
worker_count() {
  local describe=("${GCLOUD_TPU[@]}" describe "$NAME" "${SCOPE[@]}"
                  --format='value(networkEndpoints.len())') n
  printf '+ %s\n' "$(quote_words "${describe[@]}")" >&2
  n=$("${describe[@]}") || die "cannot look up the workers of '$NAME'; pass --workers N"
  n=${n%%$'\n'*}
  [[ $n =~ ^[1-9][0-9]*$ ]] \
    || die "gcloud reported '$n' workers for '$NAME' (expected a number); pass --workers N"
  printf '%s' "$n"
}

# Copies the run folder back into DEST/RUN (RUN: the last part of --workdir). gs:// workdirs:
# 'gcloud storage rsync', the tool gcloud itself recommends over gsutil (same install and login
# as the rest of this script, parallel without -m, and re-running copies only what changed).
# Paths on the workers: 'tpu-vm scp --recurse' into an existing DEST, so the copy always lands
# in DEST/RUN (scp -r into a missing folder would instead create it as the copy).
cmd_fetch() {
  local src=$WORKDIR run_name
  while [[ $src == ?*/ ]]; do src=${src%/}; done
  run_name=${src##*/}
  if [[ $WORKDIR == gs://* ]]; then
    run mkdir -p "$DEST/$run_name"
    run gcloud storage rsync --recursive "$src" "$DEST/$run_name"
    return
  fi
  [[ $src == /* ]] || src=$DIR/$src
  if [[ $WORKER != all ]]; then
    run mkdir -p "$DEST"
    run "${GCLOUD_TPU[@]}" scp --recurse "$NAME:$src" "$DEST" "${SCOPE[@]}" --worker="$WORKER"
    return
  fi
  local n=$WORKERS k dests=()
  if [[ -z $n ]]; then
    n=$(worker_count) || exit 1
  fi
  for ((k = 0; k < n; k++)); do dests+=("$DEST/worker-$k"); done
  run mkdir -p "${dests[@]}"
  for ((k = 0; k < n; k++)); do
    run "${GCLOUD_TPU[@]}" scp --recurse "$NAME:$src" "${dests[k]}" "${SCOPE[@]}" --worker="$k"
  done
}

cmd_delete() {
  if [[ $QUEUED == 1 ]]; then
    # --force also deletes the TPU VM the queued resource made; --quiet: no prompt.
    run "${GCLOUD_QR[@]}" delete "$QR_NAME" "${SCOPE[@]}" --force --quiet
  else
    run "${GCLOUD_TPU[@]}" delete "$NAME" "${SCOPE[@]}" --quiet
  fi
}

"cmd_$SUBCOMMAND"
