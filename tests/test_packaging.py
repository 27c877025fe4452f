"""The package as a user installs it: a wheel that holds `dvar_jax` and nothing else at top
level, installed (not editable) into a fresh environment, and run from another directory with
an example config given by its absolute path."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools leaves build/ and *.egg-info/ beside the setup.py it runs.
    source = tmp_path_factory.mktemp("source")
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "dvar_jax", source / "dvar_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--quiet", "-w", str(out), str(source)], check=True, cwd=out)
    wheels = list(out.glob("dvar_jax-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed; the dependencies (and only they)
    come from the test's own environment through a .pth file, as nothing may be downloaded."""
    env_dir = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # A plain path line: the test environment's own .pth files (its editable dvar_jax) are not
    # processed from there, so `import dvar_jax` can only find the installed wheel.
    (Path(site) / "_dvar_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                    "--no-deps", "--no-index", str(wheel)], check=True)
    return env_dir


def test_the_wheel_holds_dvar_jax_and_nothing_else_at_top_level(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    metadata = {t for t in top if t.endswith(".dist-info")}
    assert len(metadata) == 1 and top - metadata == {"dvar_jax"}, top
    # The packaged defaults travel with it; the examples in configs/ do not.
    assert {"dvar_jax/configs/base.py", "dvar_jax/configs/models.py",
            "dvar_jax/configs/demo.py"} <= set(names)
    assert not any(n.startswith("configs/") for n in names)


@pytest.mark.slow
def test_installed_wheel_runs_from_another_directory(installed, text_corpus_dir, tmp_path):
    bin_dir = installed / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DVAR_CONFIGS")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    where = subprocess.run([bin_dir / "python", "-c", "import dvar_jax; print(dvar_jax.__file__)"],
                           cwd=elsewhere, env=env, check=True, capture_output=True, text=True)
    assert where.stdout.strip().startswith(str(installed)), where.stdout

    help_run = subprocess.run([bin_dir / "dvar", "--help"], cwd=elsewhere, env=env,
                              capture_output=True, text=True)
    assert help_run.returncode == 0, help_run.stderr
    assert "train" in help_run.stdout and "sweep" in help_run.stdout

    workdir = tmp_path / "run"
    config = (ROOT / "configs" / "tiny.py").resolve()
    train_run = subprocess.run(
        [bin_dir / "dvar", "train", f"--config={config}", f"--config.data.path={text_corpus_dir}",
         "--config.data.epochs=1", f"--workdir={workdir}", "--noprogress"],
        cwd=elsewhere, env=env, capture_output=True, text=True)
    assert train_run.returncode == 0, train_run.stderr[-3000:]
    assert (workdir / "summary.json").is_file() and (workdir / "config.json").is_file()
