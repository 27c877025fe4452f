"""launch/tpu_vm.sh: the gcloud commands it prints in dry-run mode, quoting, and bad input.

Nothing here needs gcloud or a network: every call is --dry-run, except two that run the script
for real against a stub `gcloud` on PATH. The remote commands printed for train and sweep are
also executed locally (in a temporary home with a stub `dvar`) to prove the quoting survives a
real shell, not only Python's shlex.
"""

import ast
import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "tpu_vm.sh"
NAME, ZONE = "dvar-test-1", "us-west4-a"
TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
SUBCOMMANDS = ("create", "setup", "train", "sweep", "logs", "fetch", "status", "delete")
OPTIONS = ("--name", "--zone", "--project", "--type", "--version", "--spot", "--preemptible",
           "--queued", "--qr-name", "--repo", "--ref", "--copy", "--python", "--dir", "--workdir",
           "--log", "--worker", "--workers", "--dest", "--commands", "--grid", "--dry-run",
           "--help")
QR = ["gcloud", "compute", "tpus", "queued-resources"]
# A config value with spaces and both kinds of quotes, to pass through three shells intact.
AWKWARD = "--config.data.path=/data/my corpus/it's \"quoted\" $HOME `x`"


@pytest.fixture(autouse=True)
def _no_real_gcloud(tmp_path_factory, monkeypatch):
    """Puts a `gcloud` that fails loudly first on PATH: no test can reach a real one."""
    guard = tmp_path_factory.mktemp("guard")
    (guard / "gcloud").write_text('#!/bin/sh\necho "a test ran gcloud: $*" >&2\nexit 99\n')
    (guard / "gcloud").chmod(0o755)
    monkeypatch.setenv("PATH", f"{guard}{os.pathsep}{os.environ['PATH']}")


def launch(*args, env=None, stdin="", path_prefix=None):
    """Runs `bash launch/tpu_vm.sh ARGS` with TPU_*/DRY_RUN cleared from the environment."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("TPU_") and k != "DRY_RUN"}
    if path_prefix is not None:
        e["PATH"] = f"{path_prefix}{os.pathsep}{e['PATH']}"
    e.update(env or {})
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=e,
                          input=stdin, cwd=ROOT, timeout=30)


def dry(*args, **kw):
    """The dry-run commands of a successful call, each split into its argv."""
    r = launch(args[0], "--dry-run", *args[1:], **kw)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), r.stdout
    return [shlex.split(line[2:]) for line in lines]


def remote_of(argv):
    """The --command of a `gcloud compute tpus tpu-vm ssh` argv, checked to target all workers."""
    assert argv[:7] == [*TPU, "ssh", NAME, f"--zone={ZONE}"], argv
    assert "--worker=all" in argv
    (cmd,) = [a for a in argv if a.startswith("--command=")]
    return cmd.removeprefix("--command=")


def setup_py_jax_spec(text):
    """'>=0.10.2,<0.11' from the "jax[cpu]>=0.10.2,<0.11" entry of setup.py's INSTALL_REQUIRES."""
    for node in ast.walk(ast.parse(text)):
        target = getattr(node, "targets", [None])[0]
        if isinstance(node, ast.Assign) and getattr(target, "id", "") == "INSTALL_REQUIRES":
            reqs = [ast.literal_eval(e) for e in node.value.elts]
            (jax,) = [r for r in reqs if re.match(r"jax(\[[a-z,]+\])?[<>=!~]", r)]
            return re.sub(r"^jax(\[[a-z,]+\])?", "", jax)
    raise AssertionError("no INSTALL_REQUIRES in setup.py")


def git(*args):
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)


needs_git = pytest.mark.skipif(git("rev-parse", "HEAD").returncode != 0,
                               reason="needs the project as a git checkout")


# ------------------------------------------------------------------------------------------------
# create / delete


@pytest.mark.parametrize(("acc", "version"), [
    ("v5litepod-8", "v2-alpha-tpuv5-lite"), ("v4-32", "tpu-ubuntu2204-base"),
    ("v5p-16", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e"), ("v3-8", "tpu-ubuntu2204-base"),
])
def test_create_picks_the_runtime_version_by_type(acc, version):
    assert dry("create", f"--name={NAME}", f"--zone={ZONE}", f"--type={acc}") == [
        [*TPU, "create", NAME, f"--zone={ZONE}", f"--accelerator-type={acc}",
         f"--version={version}"]]


def test_create_defaults_spot_project_and_environment():
    assert dry("create", "--name", NAME, "--zone", ZONE) == [
        [*TPU, "create", NAME, f"--zone={ZONE}", "--accelerator-type=v5litepod-8",
         "--version=v2-alpha-tpuv5-lite"]]
    env = {"TPU_NAME": NAME, "TPU_ZONE": ZONE, "TPU_PROJECT": "my-proj-123", "TPU_TYPE": "v4-8"}
    assert dry("create", "--spot", "--version=tpu-vm-v4-base", env=env) == [
        [*TPU, "create", NAME, f"--zone={ZONE}", "--project=my-proj-123",
         "--accelerator-type=v4-8", "--version=tpu-vm-v4-base", "--spot"]]
    assert dry("create", "--preemptible", env=env)[0][-1] == "--preemptible"


def test_delete_and_dry_run_from_the_environment():
    r = launch("delete", env={"TPU_NAME": NAME, "TPU_ZONE": ZONE, "DRY_RUN": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"+ gcloud compute tpus tpu-vm delete {NAME} --zone={ZONE} --quiet\n"


def test_create_queued_spot_for_a_multi_worker_slice():
    """--queued: a queued resource NAME-qr whose node is NAME; its flag is --runtime-version."""
    assert dry("create", f"--name={NAME}", f"--zone={ZONE}", "--type=v5p-16", "--queued",
               "--spot") == [
        [*QR, "create", f"{NAME}-qr", f"--node-id={NAME}", f"--zone={ZONE}",
         "--accelerator-type=v5p-16", "--runtime-version=v2-alpha-tpuv5", "--spot"]]
    assert dry("create", f"--name={NAME}", f"--zone={ZONE}", "--type=v4-32", "--queued",
               "--qr-name=my-qr", "--project=my-proj-123", "--version=tpu-vm-v4-base") == [
        [*QR, "create", "my-qr", f"--node-id={NAME}", f"--zone={ZONE}", "--project=my-proj-123",
         "--accelerator-type=v4-32", "--runtime-version=tpu-vm-v4-base"]]


def test_status_and_delete_plain_and_queued():
    nz = (f"--name={NAME}", f"--zone={ZONE}")
    assert dry("status", *nz) == [[*TPU, "describe", NAME, f"--zone={ZONE}"]]
    assert dry("status", *nz, "--queued") == [[*QR, "describe", f"{NAME}-qr", f"--zone={ZONE}"]]
    assert dry("delete", *nz, "--queued", "--qr-name=my-qr", "--project=my-proj-123") == [
        [*QR, "delete", "my-qr", f"--zone={ZONE}", "--project=my-proj-123", "--force", "--quiet"]]
    # TPU_QUEUED=1 once in the environment: create, status and delete all take the queued path.
    env = {"TPU_QUEUED": "1"}
    assert dry("delete", *nz, env=env) == [
        [*QR, "delete", f"{NAME}-qr", f"--zone={ZONE}", "--force", "--quiet"]]
    assert dry("create", *nz, env=env)[0][:5] == [*QR, "create"]


def test_without_dry_run_the_printed_command_is_the_one_run(tmp_path):
    """A stub gcloud records its argv: running for real executes exactly what --dry-run shows."""
    (tmp_path / "gcloud").write_text('#!/bin/sh\nprintf "%s\\0" "$@" > "$GCLOUD_ARGV"\n')
    (tmp_path / "gcloud").chmod(0o755)
    args = ("train", f"--name={NAME}", f"--zone={ZONE}", "--workdir=runs/x", "--log=l/t.log",
            "--", "--config.objective=diffusion", AWKWARD)
    env = {"GCLOUD_ARGV": str(tmp_path / "argv")}
    r = launch(*args, env=env, path_prefix=tmp_path)
    assert r.returncode == 0, r.stderr
    ran = (tmp_path / "argv").read_text().split("\0")[:-1]
    assert ["gcloud", *ran] == dry(*args)[0]
    assert r.stderr.startswith("+ gcloud compute tpus tpu-vm ssh")  # echoed, like set -x


# ------------------------------------------------------------------------------------------------
# setup


@needs_git
def test_setup_clones_the_ref_and_pins_jax_tpu_to_setup_py():
    (argv,) = dry("setup", f"--name={NAME}", f"--zone={ZONE}", "--ref=HEAD",
                  "--repo=https://github.com/example/dvar-jax.git")
    remote = remote_of(argv)
    words = shlex.split(remote)
    assert subprocess.run(["bash", "-n", "-c", remote]).returncode == 0  # valid shell
    assert "git clone --quiet https://github.com/example/dvar-jax.git dvar-jax" in remote
    assert "git -C dvar-jax fetch --quiet origin HEAD" in remote
    assert "checkout --quiet --detach FETCH_HEAD" in remote
    assert "python3.12 -m venv .venv" in remote
    i = words.index("install", words.index("--upgrade") + 1)
    pin = f"jax[tpu]{setup_py_jax_spec(git('show', 'HEAD:setup.py').stdout)}"
    assert words[i - 1:i + 5] == [".venv/bin/pip", "install", "--quiet", "-e", ".", pin]


def test_jax_tpu_pin_is_read_from_setup_py():
    """With a ref the local checkout does not know, the pin is the working tree's setup.py."""
    (argv,) = dry("setup", f"--name={NAME}", f"--zone={ZONE}", "--ref=no-such-local-ref",
                  "--repo=git@github.com:example/dvar-jax.git")
    spec = setup_py_jax_spec((ROOT / "setup.py").read_text())
    assert spec.startswith(">=")
    pins = [w for w in shlex.split(remote_of(argv)) if w.startswith("jax[tpu]")]
    assert pins == [f"jax[tpu]{spec}"]


@needs_git
def test_setup_copy_sends_git_archive_of_the_ref():
    sha = git("rev-parse", "HEAD").stdout.strip()
    cmds = dry("setup", f"--name={NAME}", f"--zone={ZONE}", "--copy", "--dir=work/dvar",
               "--project=my-proj-123", "--python=python3.13")
    assert len(cmds) == 4
    archive = cmds[0][5].removeprefix("--output=")
    assert re.fullmatch(rf".*/dvar-jax-{sha[:12]}-\d+\.tar\.gz", archive)
    assert cmds[0] == ["git", "-C", str(ROOT), "archive", "--format=tar.gz",
                       f"--output={archive}", sha]
    assert cmds[1] == [*TPU, "scp", archive, f"{NAME}:dvar-jax-src.tar.gz", f"--zone={ZONE}",
                       "--project=my-proj-123", "--worker=all"]
    assert cmds[2][:8] == [*TPU, "ssh", NAME, f"--zone={ZONE}", "--project=my-proj-123"]
    remote = cmds[2][-1].removeprefix("--command=")
    assert subprocess.run(["bash", "-n", "-c", remote]).returncode == 0
    assert "tar -xzf dvar-jax-src.tar.gz -C work/dvar" in remote
    assert "cd work/dvar" in remote and "python3.13 -m venv .venv" in remote
    assert "install --quiet -e ." in remote
    assert cmds[3] == ["rm", "-f", archive]
    assert not Path(archive).exists()  # a dry run writes nothing


# ------------------------------------------------------------------------------------------------
# train


def run_remote_locally(remote, home, dvar_stub_body, wait_for):
    """Runs a printed remote command with bash in HOME=home and a stub `dvar`; waits for it."""
    venv_bin = home / "dvar-jax" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "dvar").write_text("#!/bin/sh\n" + dvar_stub_body)
    (venv_bin / "dvar").chmod(0o755)
    r = subprocess.run(["bash", "-c", remote], capture_output=True, text=True, cwd=home,
                       env={**os.environ, "HOME": str(home)}, timeout=30)
    assert r.returncode == 0, r.stderr
    for _ in range(200):
        if wait_for():
            return r
        time.sleep(0.02)
    raise AssertionError(f"the background job did not finish: {r.stdout} {r.stderr}")


def test_train_runs_dvar_train_on_all_workers_under_nohup_and_quotes_args(tmp_path):
    passed = ["--config=dvar_jax/configs/base.py", "--config.objective=diffusion",
              "--config.train.batch_size=256", AWKWARD]
    (argv,) = dry("train", f"--name={NAME}", f"--zone={ZONE}", "--workdir",
                  "gs://my-bucket/runs/diff 1", "--", *passed)
    remote = remote_of(argv)
    words = shlex.split(remote)
    i = words.index("nohup")
    dvar = [".venv/bin/dvar", "train", "--workdir=gs://my-bucket/runs/diff 1", *passed]
    assert words[i + 1:i + 1 + len(dvar)] == dvar
    log = words[i + 1 + len(dvar) + 1]
    assert re.fullmatch(r"dvar-logs/train-\d{8}-\d{6}\.log", log)
    assert words[i + 1 + len(dvar):i + 1 + len(dvar) + 6] == [">", log, "2>&1", "<", "/dev/null",
                                                               "&"]
    assert remote.startswith("cd dvar-jax && ")
    assert "dvar train" in remote and "--config.objective=diffusion" in remote

    # The same command through a real shell: the stub sees exactly the arguments given.
    home = tmp_path / "home"
    got = home / "argv"
    r = run_remote_locally(remote, home, f'printf "%s\\0" "$@" > {got}.tmp && mv {got}.tmp {got}\n',
                           got.exists)
    assert got.read_text().split("\0")[:-1] == dvar[1:]
    assert (home / "dvar-jax" / log).exists()
    assert "dvar train started (pid" in r.stdout


def test_train_log_dir_and_local_workdir():
    (argv,) = dry("train", f"--name={NAME}", f"--zone={ZONE}", "--workdir=runs/ar",
                  "--dir=src/dvar", "--log=logs/ar.log")
    words = shlex.split(remote_of(argv))
    assert words[:2] == ["cd", "src/dvar"]
    i = words.index("nohup")
    assert words[i + 1:i + 7] == [".venv/bin/dvar", "train", "--workdir=runs/ar", ">",
                                  "logs/ar.log", "2>&1"]


# ------------------------------------------------------------------------------------------------
# sweep

SWEEP = ["dvar train --config.objective=ar --workdir=runs/s/0",
         "dvar train --config.objective=diffusion --config.data.path='/d/my corpus'"
         " --workdir=runs/s/1"]
SWEEP_INPUT = f"# emitted by dvar sweep run\n{SWEEP[0]}\n\n   \n{SWEEP[1]}\r\n"


def sweep_commands(remote):
    """The commands written to the worker's commands file by `printf '%s\\n' CMD...`."""
    words = shlex.split(remote)
    i = words.index("printf")
    assert words[i + 1] == "%s\\n"
    j = words.index(">", i)
    assert re.fullmatch(r"dvar-logs/sweep-\d{8}-\d{6}/commands", words[j + 1])
    return words[i + 2:j]


def test_sweep_reads_commands_from_a_file(tmp_path):
    f = tmp_path / "commands.txt"
    f.write_text(SWEEP_INPUT)
    (argv,) = dry("sweep", f"--name={NAME}", f"--zone={ZONE}", f"--commands={f}")
    remote = remote_of(argv)
    assert sweep_commands(remote) == SWEEP
    assert "nohup bash -c" in remote and "sweep of 2 runs started" in remote


def test_sweep_reads_commands_from_stdin_and_runs_them_one_after_another(tmp_path):
    (argv,) = dry("sweep", f"--name={NAME}", f"--zone={ZONE}", "--commands", "-",
                  stdin=SWEEP_INPUT)
    assert dry("sweep", f"--name={NAME}", f"--zone={ZONE}", stdin=SWEEP_INPUT)[0][:7] == argv[:7]
    remote = remote_of(argv)
    assert sweep_commands(remote) == SWEEP

    # Run the sweep through a real shell: each command runs in order with `dvar` from the venv.
    home = tmp_path / "home"
    calls = home / "calls"
    done = lambda: any("sweep done" in p.read_text() for p in home.glob("dvar-jax/*/*/sweep.log"))
    stub = f'{{ printf "%s\\0" "$@"; echo; }} >> {calls}; echo "ran $*"\n'
    run_remote_locally(remote, home, stub, done)
    runs = [c.split("\0") for c in calls.read_text().split("\0\n")[:-1]]
    assert runs == [["train", "--config.objective=ar", "--workdir=runs/s/0"],
                    ["train", "--config.objective=diffusion", "--config.data.path=/d/my corpus",
                     "--workdir=runs/s/1"]]
    (folder,) = home.glob("dvar-jax/dvar-logs/sweep-*")
    assert (folder / "commands").read_text().splitlines() == SWEEP
    assert (folder / "run-0002.log").read_text().startswith("ran train --config.objective=diff")
    assert "sweep done: 2 of 2 runs ok" in (folder / "sweep.log").read_text()


def test_sweep_goes_on_after_a_failed_run_and_reports_it(tmp_path):
    f = tmp_path / "commands.txt"
    f.write_text("exit 3\ndvar train --config.seed=1\n")
    remote = remote_of(dry("sweep", f"--name={NAME}", f"--zone={ZONE}", f"--commands={f}")[0])
    home = tmp_path / "home"
    logs = lambda: list(home.glob("dvar-jax/dvar-logs/sweep-*/sweep.log"))
    run_remote_locally(remote, home, 'echo "ran $*"\n',
                       lambda: any("sweep done" in p.read_text() for p in logs()))
    (log,) = logs()
    text = log.read_text()
    assert "run 1/2 failed with exit status 3" in text and "run 2/2 ok" in text
    assert "sweep done: 1 of 2 runs ok" in text
    assert (log.parent / "run-0002.log").read_text() == "ran train --config.seed=1\n"


def test_sweep_too_large_for_one_ssh_command_is_refused(tmp_path):
    f = tmp_path / "commands.txt"
    f.write_text("".join(f"dvar train --config.seed={i} --workdir=runs/{'x' * 80}/{i}\n"
                         for i in range(2000)))
    r = launch("sweep", "--dry-run", f"--name={NAME}", f"--zone={ZONE}", f"--commands={f}")
    assert r.returncode == 2 and "split the input" in r.stderr and r.stdout == ""


def test_sweep_grid_lists_the_runs_on_the_worker_and_runs_them(tmp_path):
    passed = ["--only=ar-*-U100M-*", AWKWARD]
    (argv,) = dry("sweep", f"--name={NAME}", f"--zone={ZONE}", "--grid=paper",
                  "--workdir=runs/paper", "--", *passed)
    remote = remote_of(argv)
    words = shlex.split(remote)
    i = next(k for k, w in enumerate(words) if words[k:k + 2] == [".venv/bin/dvar", "sweep"])
    emit = [".venv/bin/dvar", "sweep", "run", "--grid=paper", "--workdir=runs/paper",
            "--emit-commands", *passed]
    assert words[i:i + len(emit)] == emit
    assert words[i + len(emit)] == ">"
    assert re.fullmatch(r"dvar-logs/sweep-\d{8}-\d{6}/commands", words[i + len(emit) + 1])
    assert "nohup bash -c" in remote and "runs of grid paper started" in remote

    # Through a real shell: the worker's `dvar sweep run --emit-commands` lists two runs (one
    # name with a space, to prove the listed lines run as written), which then run in order.
    home = tmp_path / "home"
    calls, emitted = home / "calls", home / "emit-argv"
    stub = ('case "$*" in *--emit-commands*) printf "%s\\0" "$@" > ' + str(emitted) + '; '
            """printf '%s\\n' "dvar sweep run --only=a" "dvar sweep run --only='b c'"; exit 0;; """
            'esac\n'
            f'{{ printf "%s\\0" "$@"; echo; }} >> {calls}; echo "ran $*"\n')
    done = lambda: any("sweep done" in p.read_text() for p in home.glob("dvar-jax/*/*/sweep.log"))
    r = run_remote_locally(remote, home, stub, done)
    assert "sweep of 2 runs of grid paper started" in r.stdout
    assert emitted.read_text().split("\0")[:-1] == emit[1:]
    runs = [c.split("\0") for c in calls.read_text().split("\0\n")[:-1]]
    assert runs == [["sweep", "run", "--only=a"], ["sweep", "run", "--only=b c"]]
    (log,) = home.glob("dvar-jax/dvar-logs/sweep-*/sweep.log")
    assert "sweep done: 2 of 2 runs ok" in log.read_text()


# ------------------------------------------------------------------------------------------------
# logs


def ssh_argv(argv, worker):
    """The --command of a `gcloud compute tpus tpu-vm ssh --worker=WORKER` argv."""
    assert argv == [*TPU, "ssh", NAME, f"--zone={ZONE}", f"--worker={worker}", argv[-1]], argv
    return argv[-1].removeprefix("--command=")


def run_with_stub_tail(remote, home):
    """Runs a printed logs command in HOME=home with a `tail` that prints its arguments."""
    stubs = home / "stubs"
    stubs.mkdir(parents=True, exist_ok=True)
    (stubs / "tail").write_text('#!/bin/sh\nprintf "tail %s\\n" "$*"\n')
    (stubs / "tail").chmod(0o755)
    env = {**os.environ, "HOME": str(home), "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", remote], capture_output=True, text=True, cwd=home,
                          env=env, timeout=30)


def test_logs_follows_the_newest_train_log_of_worker_0(tmp_path):
    remote = ssh_argv(dry("logs", f"--name={NAME}", f"--zone={ZONE}")[0], 0)
    assert remote.startswith("cd dvar-jax && ")
    assert "ls -t dvar-logs/train-*.log" in remote and "tail -n +1 -F" in remote

    home = tmp_path / "home"
    logs = home / "dvar-jax" / "dvar-logs"
    logs.mkdir(parents=True)
    r = run_with_stub_tail(remote, home)  # no log yet: a clear error, not a tail of nothing
    assert r.returncode == 1 and "no ~/dvar-jax/dvar-logs/train-*.log" in r.stderr
    for i, stamp in enumerate(["20250101-000000", "20250301-000000", "20250201-000000"]):
        (logs / f"train-{stamp}.log").write_text("step 1\n")
        os.utime(logs / f"train-{stamp}.log", (1e9 + i, 1e9 + i))  # the last written is newest
    r = run_with_stub_tail(remote, home)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "tail -n +1 -F dvar-logs/train-20250201-000000.log\n"
    assert "following ~/dvar-jax/dvar-logs/train-20250201-000000.log" in r.stderr


def test_logs_of_all_workers_with_a_given_log_prefix_each_line_with_the_host(tmp_path):
    (argv,) = dry("logs", f"--name={NAME}", f"--zone={ZONE}", "--worker=all", "--dir=src/d",
                  "--log=logs/ar.log")
    remote = ssh_argv(argv, "all")
    assert remote.startswith("cd src/d && log=logs/ar.log && ")
    assert ssh_argv(dry("logs", f"--name={NAME}", f"--zone={ZONE}", "--worker", "3")[0], 3)

    home = tmp_path / "home"
    (home / "src" / "d").mkdir(parents=True)
    r = run_with_stub_tail(remote, home)
    assert r.returncode == 0, r.stderr
    host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    assert r.stdout == f"{host}: tail -n +1 -F logs/ar.log\n"


# ------------------------------------------------------------------------------------------------
# fetch


def test_fetch_from_each_worker_of_a_multi_worker_slice():
    """v5p-16 has 2 workers: one scp per worker, each into DEST/worker-K."""
    cmds = dry("fetch", f"--name={NAME}", f"--zone={ZONE}", "--workdir=runs/ar/",
               "--worker=all", "--workers", "2", "--dest=out dir")
    assert cmds == [
        ["mkdir", "-p", "out dir/worker-0", "out dir/worker-1"],
        [*TPU, "scp", "--recurse", f"{NAME}:dvar-jax/runs/ar", "out dir/worker-0",
         f"--zone={ZONE}", "--worker=0"],
        [*TPU, "scp", "--recurse", f"{NAME}:dvar-jax/runs/ar", "out dir/worker-1",
         f"--zone={ZONE}", "--worker=1"]]


def test_fetch_one_worker_defaults_and_absolute_workdir():
    assert dry("fetch", f"--name={NAME}", f"--zone={ZONE}", "--workdir=runs/ar") == [
        ["mkdir", "-p", f"tpu-results/{NAME}"],
        [*TPU, "scp", "--recurse", f"{NAME}:dvar-jax/runs/ar", f"tpu-results/{NAME}",
         f"--zone={ZONE}", "--worker=0"]]
    assert dry("fetch", f"--name={NAME}", f"--zone={ZONE}", "--workdir=/data/runs/ar",
               "--worker=1", "--dir=ignored", "--project=my-proj-123", "--dest=o")[1] == [
        *TPU, "scp", "--recurse", f"{NAME}:/data/runs/ar", "o", f"--zone={ZONE}",
        "--project=my-proj-123", "--worker=1"]


def test_fetch_gs_workdir_syncs_from_the_bucket():
    assert dry("fetch", f"--name={NAME}", f"--zone={ZONE}", "--workdir=gs://my-bucket/runs/d 1/",
               "--dest=results") == [
        ["mkdir", "-p", "results/d 1"],
        ["gcloud", "storage", "rsync", "--recursive", "gs://my-bucket/runs/d 1", "results/d 1"]]


def test_fetch_all_workers_asks_gcloud_for_the_count(tmp_path):
    """Without --workers a live run reads the worker count from tpu-vm describe."""
    calls = tmp_path / "calls"
    (tmp_path / "gcloud").write_text(
        '#!/bin/sh\n{ printf "%s\\0" "$@"; echo; } >> "$GCLOUD_CALLS"\n'
        'case " $* " in *" describe "*) echo "$WORKERS_REPLY";; esac\n')
    (tmp_path / "gcloud").chmod(0o755)
    dest = tmp_path / "out"
    args = ("fetch", f"--name={NAME}", f"--zone={ZONE}", "--workdir=runs/ar", "--worker=all",
            f"--dest={dest}")
    env = {"GCLOUD_CALLS": str(calls), "WORKERS_REPLY": "3"}
    r = launch(*args, env=env, path_prefix=tmp_path)
    assert r.returncode == 0, r.stderr
    ran = [["gcloud", *c.split("\0")] for c in calls.read_text().split("\0\n")[:-1]]
    assert ran[0] == [*TPU, "describe", NAME, f"--zone={ZONE}",
                      "--format=value(networkEndpoints.len())"]
    assert ran[1:] == dry(*args, "--workers=3")[1:]
    assert [c[-1] for c in ran[1:]] == ["--worker=0", "--worker=1", "--worker=2"]
    assert sorted(p.name for p in dest.iterdir()) == ["worker-0", "worker-1", "worker-2"]
    assert "+ gcloud compute tpus tpu-vm describe" in r.stderr

    r = launch(*args, env={**env, "WORKERS_REPLY": ""}, path_prefix=tmp_path)
    assert r.returncode == 1 and "pass --workers N" in r.stderr


# ------------------------------------------------------------------------------------------------
# the whole workflow on a multi-worker slice


@needs_git
def test_workflow_on_a_multi_worker_slice():
    """create (queued, spot) -> setup -> train -> logs -> fetch -> delete on a v4-32 (4 workers)."""
    env = {"TPU_NAME": NAME, "TPU_ZONE": ZONE, "TPU_TYPE": "v4-32", "TPU_QUEUED": "1"}
    create = dry("create", "--spot", env=env)
    assert create == [[*QR, "create", f"{NAME}-qr", f"--node-id={NAME}", f"--zone={ZONE}",
                       "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base",
                       "--spot"]]
    assert dry("status", env=env) == [[*QR, "describe", f"{NAME}-qr", f"--zone={ZONE}"]]
    (setup,) = dry("setup", "--repo=https://github.com/example/dvar-jax.git", env=env)
    assert "pip install --quiet -e ." in remote_of(setup)  # on every worker
    (train,) = dry("train", "--workdir=runs/w", "--", "--config.objective=ar", env=env)
    assert ".venv/bin/dvar train --workdir=runs/w --config.objective=ar" in remote_of(train)
    (logs,) = dry("logs", "--worker=all", env=env)
    assert "tail -n +1 -F" in ssh_argv(logs, "all")
    fetch = dry("fetch", "--workdir=runs/w", "--worker=all", "--workers=4", env=env)
    assert fetch[0] == ["mkdir", "-p", *(f"tpu-results/{NAME}/worker-{k}" for k in range(4))]
    assert [c[:7] for c in fetch[1:]] == [[*TPU, "scp", "--recurse", f"{NAME}:dvar-jax/runs/w"]] * 4
    assert [c[-1] for c in fetch[1:]] == [f"--worker={k}" for k in range(4)]
    assert dry("delete", env=env) == [
        [*QR, "delete", f"{NAME}-qr", f"--zone={ZONE}", "--force", "--quiet"]]


def test_multi_host_v5p_32_slice_trains_and_sweeps_in_a_gs_workdir(tmp_path):
    """A v5p-32 (4 workers, no shared disk): train and a grid sweep on every worker, both in
    gs:// run folders that all workers see; fetch syncs from the bucket, not per worker."""
    env = {"TPU_NAME": NAME, "TPU_ZONE": ZONE, "TPU_TYPE": "v5p-32", "TPU_QUEUED": "1"}
    (create,) = dry("create", "--spot", env=env)
    assert "--accelerator-type=v5p-32" in create
    (train,) = dry("train", "--workdir=gs://my-bucket/runs/v5p", "--",
                   "--config.objective=diffusion", env=env)
    assert (".venv/bin/dvar train --workdir=gs://my-bucket/runs/v5p --config.objective=diffusion"
            in remote_of(train))  # remote_of: on --worker=all
    (sweep,) = dry("sweep", "--grid=paper", "--workdir=gs://my-bucket/sweeps/paper", "--",
                   "--only=ar-*", env=env)
    remote = remote_of(sweep)
    emit = [".venv/bin/dvar", "sweep", "run", "--grid=paper",
            "--workdir=gs://my-bucket/sweeps/paper", "--emit-commands", "--only=ar-*"]
    words = shlex.split(remote)
    i = next(k for k, w in enumerate(words) if words[k:k + 2] == [".venv/bin/dvar", "sweep"])
    assert words[i:i + len(emit)] == emit

    # One worker's share, through a real shell: it lists the runs not done in the bucket and
    # runs each `dvar sweep run --only=NAME` with the same gs:// workdir (every worker runs the
    # same list at once: each run is one multi-host training).
    home = tmp_path / "home"
    calls = home / "calls"
    listed = "dvar sweep run --grid=paper --workdir=gs://my-bucket/sweeps/paper --only="
    stub = ('case "$*" in *--emit-commands*) '
            f"""printf '%s\\n' "{listed}ar-1" "{listed}ar-2"; exit 0;; esac\n"""
            f'echo "$*" >> {calls}\n')
    done = lambda: any("sweep done" in p.read_text() for p in home.glob("dvar-jax/*/*/sweep.log"))
    run_remote_locally(remote, home, stub, done)
    assert calls.read_text().splitlines() == [
        f"sweep run --grid=paper --workdir=gs://my-bucket/sweeps/paper --only=ar-{k}"
        for k in (1, 2)]
    assert dry("fetch", "--workdir=gs://my-bucket/sweeps/paper", env=env) == [
        ["mkdir", "-p", f"tpu-results/{NAME}/paper"],
        ["gcloud", "storage", "rsync", "--recursive", "gs://my-bucket/sweeps/paper",
         f"tpu-results/{NAME}/paper"]]


# ------------------------------------------------------------------------------------------------
# bad input: exit 2, naming the bad value, nothing printed on stdout

NZ = [f"--name={NAME}", f"--zone={ZONE}"]
BAD = [
    (["frobnicate"], "unknown subcommand 'frobnicate'"),
    ([], "usage:"),
    (["create", *NZ, "--bogus"], "unknown option '--bogus'"),
    (["create", *NZ, "--bogus=1"], "unknown option '--bogus'"),
    (["create", f"--zone={ZONE}"], "missing TPU name"),
    (["create", f"--name={NAME}"], "missing zone"),
    (["create", "--name=Bad_Name", f"--zone={ZONE}"], "invalid TPU name 'Bad_Name'"),
    (["create", f"--name={NAME}", "--zone=uscentral"], "invalid zone 'uscentral'"),
    (["create", *NZ, "--type=tpu-v4"], "invalid accelerator type 'tpu-v4'"),
    (["create", *NZ, "--type=v5litepod"], "invalid accelerator type 'v5litepod'"),
    (["create", *NZ, "--type=v9z-8"], "no default runtime version for accelerator type 'v9z-8'"),
    (["create", *NZ, "--version=bad version"], "invalid runtime version 'bad version'"),
    (["create", *NZ, "--spot", "--preemptible"], "--spot and --preemptible"),
    (["create", *NZ, "--project=X"], "invalid project 'X'"),
    (["create", *NZ, "--spot=yes"], "option --spot takes no value"),
    (["create", f"--name={NAME}", "--zone"], "option --zone needs a value"),
    (["create", "--zone", "--name", NAME], "option --zone needs a value, got the option '--name'"),
    (["setup", *NZ, "--spot"], "option --spot does not apply to 'setup'"),
    (["setup", *NZ, "--python=python2"], "invalid --python 'python2'"),
    (["setup", *NZ, "--dir=../x"], "invalid --dir '../x'"),
    (["setup", *NZ, "--ref=a b"], "invalid --ref 'a b'"),
    (["train", *NZ], "missing --workdir"),
    (["train", *NZ, "--workdir=s3://b/x"], "invalid --workdir 's3://b/x'"),
    (["train", *NZ, "--workdir=w", "--", "--workdir=v"], "'--workdir=v' after --"),
    (["train", *NZ, "--workdir=w", "--config.objective=ar"],
     "unknown option '--config.objective'"),
    (["train", *NZ, "--workdir=w", "extra"], "unexpected argument 'extra'"),
    (["train", *NZ, "--workdir=w", "--", "--dry-run"], "'--dry-run' after -- would go to dvar"),
    (["delete", *NZ, "--", "x"], "'delete' takes none"),
    (["sweep", *NZ, "--commands=/no/such/file"], "--commands '/no/such/file' is not a readable"),
    (["sweep", *NZ], "no commands on stdin"),
    (["sweep", *NZ, "--grid=small"], "missing --workdir for sweep --grid"),
    (["sweep", *NZ, "--grid=small", "--workdir=gs://B/x"], "invalid --workdir 'gs://B/x'"),
    (["sweep", *NZ, "--grid=small", "--workdir=runs/../x"],
     "invalid --workdir 'runs/../x' for sweep"),
    (["sweep", *NZ, "--grid=../g.py", "--workdir=w"], "invalid --grid '../g.py'"),
    (["sweep", *NZ, "--grid=small", "--workdir=w", "--commands=f"],
     "--grid and --commands exclude each other"),
    (["sweep", *NZ, "--grid=small", "--workdir=w", "--", "--workdir=v"], "'--workdir=v' after --"),
    (["sweep", *NZ, "--grid=small", "--workdir=w", "--", "--emit-commands"],
     "'--emit-commands' after --"),
    (["sweep", *NZ, "--grid=small", "--workdir=w", "--", "--dry-run"],
     "'--dry-run' after -- would go to dvar sweep run"),
    (["sweep", *NZ, "--workdir=w"], "--workdir 'w' for sweep needs --grid"),
    (["sweep", *NZ, "--", "--only=x"], "'--' passes arguments to dvar sweep run; it needs --grid"),
    (["logs", *NZ, "--grid=small"], "option --grid does not apply to 'logs'"),
    (["create", *NZ, "--queued", "--preemptible"], "--preemptible does not work with --queued"),
    (["create", f"--name={'a' * 62}", f"--zone={ZONE}", "--queued"],
     f"invalid queued resource name '{'a' * 62}-qr'"),
    (["status", *NZ, "--queued", "--qr-name=Bad"], "invalid queued resource name 'Bad'"),
    (["delete", *NZ, "--qr-name=my-qr"], "--qr-name 'my-qr' needs --queued"),
    (["setup", *NZ, "--queued"], "option --queued does not apply to 'setup'"),
    (["status", *NZ, "--", "x"], "'status' takes none"),
    (["logs", *NZ, "--worker=x"], "invalid --worker 'x'"),
    (["logs", *NZ, "--worker=-1"], "invalid --worker '-1'"),
    (["logs", *NZ, "--log=a b"], "invalid --log 'a b'"),
    (["train", *NZ, "--workdir=w", "--worker=0"], "option --worker does not apply to 'train'"),
    (["fetch", *NZ], "missing --workdir for fetch"),
    (["fetch", *NZ, "--workdir=w", "--worker=01"], "invalid --worker '01'"),
    (["fetch", *NZ, "--workdir=w", "--workers=0"], "invalid --workers '0'"),
    (["fetch", *NZ, "--workdir=w", "--workers=two"], "invalid --workers 'two'"),
    (["fetch", *NZ, "--workdir=w", "--worker=2", "--workers=2"],
     "--worker '2' is not below --workers '2'"),
    (["fetch", *NZ, "--workdir=w", "--worker=all"], "fetch --worker=all in a dry run needs"),
    (["fetch", *NZ, "--workdir=gs://b-1/x", "--worker=1"], "do not apply to the gs:// workdir"),
    (["fetch", *NZ, "--workdir=a b"], "invalid --workdir 'a b' for fetch"),
    (["fetch", *NZ, "--workdir=runs/../x"], "invalid --workdir 'runs/../x' for fetch"),
    (["fetch", *NZ, "--workdir=w", "--dest=host:dir"], "invalid --dest 'host:dir'"),
    (["fetch", *NZ, "--workdir=w", "--spot"], "option --spot does not apply to 'fetch'"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a) or "nothing" for a, _ in BAD])
def test_bad_input_exits_2_naming_the_bad_value(args, message):
    r = launch(args[0], "--dry-run", *args[1:]) if args else launch()
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr
    assert r.stdout == ""


def test_bad_dry_run_environment_value():
    r = launch("delete", *NZ, env={"DRY_RUN": "maybe"})
    assert r.returncode == 2 and "DRY_RUN='maybe'" in r.stderr
    r = launch("delete", *NZ, "--dry-run", env={"TPU_QUEUED": "maybe"})
    assert r.returncode == 2 and "TPU_QUEUED='maybe'" in r.stderr


# ------------------------------------------------------------------------------------------------
# help


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["train", "--help"]])
def test_help_lists_every_subcommand_and_option(args):
    r = launch(*args)
    assert r.returncode == 0 and r.stderr == ""
    for word in (*SUBCOMMANDS, *OPTIONS, "v5litepod-8", "dvar-jax", "python3.12"):
        assert re.search(rf"(^|\s){re.escape(word)}\b", r.stdout), word
    assert "default" in r.stdout and "TPU_NAME" in r.stdout and "DRY_RUN" in r.stdout
