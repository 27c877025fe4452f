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
SUBCOMMANDS = ("create", "setup", "train", "sweep", "delete")
OPTIONS = ("--name", "--zone", "--project", "--type", "--version", "--spot", "--preemptible",
           "--repo", "--ref", "--copy", "--python", "--dir", "--workdir", "--log", "--commands",
           "--dry-run", "--help")
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
    assert "python3.11 -m venv .venv" in remote
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
               "--project=my-proj-123", "--python=python3.12")
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
    assert "cd work/dvar" in remote and "python3.12 -m venv .venv" in remote
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
    passed = ["--config=configs/base.py", "--config.objective=diffusion",
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


# ------------------------------------------------------------------------------------------------
# help


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["train", "--help"]])
def test_help_lists_every_subcommand_and_option(args):
    r = launch(*args)
    assert r.returncode == 0 and r.stderr == ""
    for word in (*SUBCOMMANDS, *OPTIONS, "v5litepod-8", "dvar-jax", "python3.11"):
        assert re.search(rf"(^|\s){re.escape(word)}\b", r.stdout), word
    assert "default" in r.stdout and "TPU_NAME" in r.stdout and "DRY_RUN" in r.stdout
