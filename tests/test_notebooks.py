"""colab/*.ipynb run top to bottom with nbclient, on tiny settings.

Each notebook has one code cell tagged "parameters" (papermill's convention) holding its knobs.
The test inserts a cell right after it (tagged "injected-parameters") that sets tiny values:
the synthetic text corpus of conftest, a 400-token vocabulary, cpu-xs, 32-token windows, a few
thousand unique tokens. The kernel is the venv's Python (a kernelspec written for the test), its
working directory is colab/ (as a Jupyter user's would be, so the notebook's import-from-the-
checkout branch runs), and $DVAR_CACHE is the session's temporary cache.
"""

import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

COLAB = Path(__file__).resolve().parent.parent / "colab"
NOTEBOOKS = ("quickstart", "scaling_laws", "ablations")
NUMBER = r"\d+\.\d+"


@pytest.fixture(scope="module")
def kernel_path(tmp_path_factory) -> str:
    """A JUPYTER_PATH whose kernelspec `python3` is this interpreter, whatever else a user
    has installed under ~/.local/share/jupyter."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test)", "language": "python"}))
    return str(root)


def _tiny(text_corpus_dir: Path, workdir: Path) -> dict:
    """The parameters every notebook shares, at test size."""
    return {"DATA_SOURCE": "text", "DATA_PATH": str(text_corpus_dir), "VOCAB_SIZE": 400,
            "WORKDIR": str(workdir), "PROGRESS": False}


def _run(name: str, params: dict, kernel_path: str, monkeypatch) -> nbformat.NotebookNode:
    """The notebook executed with `params` injected after its parameters cell."""
    nb = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: one cell tagged 'parameters', found {len(tagged)}"
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    injected = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(tagged[0] + 1, injected)
    monkeypatch.setenv("JUPYTER_PATH", kernel_path)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws PNGs
    client = NotebookClient(nb, kernel_name="python3", timeout=600,
                            resources={"metadata": {"path": str(COLAB)}})
    client.execute(env=dict(os.environ))
    return nb


def _cell(nb, tag: str):
    cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"one cell tagged {tag!r}"
    return cells[0]


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream"
                   and o.name == "stdout")


def _images(cell) -> list[str]:
    return [o.data["image/png"] for o in cell.outputs
            if o.output_type in ("display_data", "execute_result") and "image/png" in o.data]


def _no_errors(nb) -> None:
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors, errors


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_clean_and_opens_with_a_badge(name):
    """Committed clean (no outputs), a Colab badge pointing at itself, a runtime note, one
    parameters cell, and a kernelspec Colab and Jupyter both resolve."""
    nb = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
    first = nb.cells[0]
    assert first.cell_type == "markdown"
    assert "https://colab.research.google.com/assets/colab-badge.svg" in first.source
    assert re.search(rf"colab\.research\.google\.com/github/[^)]+/blob/main/colab/{name}\.ipynb",
                     first.source)
    assert "CPU" in first.source and "TPU" in first.source
    assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1
    assert nb.metadata.kernelspec.name == "python3"


@pytest.mark.slow
def test_quickstart(text_corpus_dir, tmp_path, kernel_path, monkeypatch):
    params = {**_tiny(text_corpus_dir, tmp_path), "MODEL_SIZE": "cpu-xs", "UNIQUE_TOKENS": 4_000,
              "EPOCHS": 2, "SEQ_LEN": 32, "BATCH_SIZE": 8, "VALIDATION_TOKENS": 1_000,
              "EVAL_NUM_MC": 2, "N_NEW": 12,
              "EXTRA_CONFIG": {"data.validation_fraction": 0.2, "train.peak_lr": 3e-3}}
    nb = _run("quickstart", params, kernel_path, monkeypatch)
    _no_errors(nb)
    out = _text(_cell(nb, "train"))
    for objective in ("ar", "diffusion"):
        match = re.search(rf"^{objective}: best validation loss ({NUMBER}) at epoch ({NUMBER})",
                          out, re.M)
        assert match, out
        summary = json.loads((tmp_path / objective / "summary.json").read_text())
        assert float(match[1]) == pytest.approx(summary["best_val_loss"], abs=1e-4)
    assert len(_images(_cell(nb, "curves"))) == 1
    samples = _text(_cell(nb, "samples"))
    assert samples.count("--- ar (step") == 2 and samples.count("--- diffusion (step") == 2


@pytest.mark.slow
def test_scaling_laws(text_corpus_dir, tmp_path, kernel_path, monkeypatch):
    """A grid of 8 runs per objective (the fewest the two-step fit takes: 5 isoFLOP runs on
    fresh data, 3 data-constrained), shaped so that runs share step counts and so compiled
    programs."""
    params = {**_tiny(text_corpus_dir, tmp_path), "SIZES": ["cpu-xs"],
              "UNIQUE_TOKENS": [1_000], "EPOCHS": [2, 4, 5],
              "FRESH_TOKENS": [1_000, 2_000, 3_000, 4_000, 5_000], "SEQ_LEN": 32, "BATCH_SIZE": 8,
              "VALIDATION_TOKENS": 512, "EVALS_PER_RUN": 2, "FIT_INIT_GRID": "coarse",
              "EXTRA_CONFIG": {"data.validation_fraction": 0.2, "eval.batch_size": 16,
                               "train.peak_lr": 3e-3}}
    nb = _run("scaling_laws", params, kernel_path, monkeypatch)
    _no_errors(nb)
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").open()]
    assert len(records) == 16
    assert "16 runs" in _text(_cell(nb, "records"))
    fit = _text(_cell(nb, "fit"))
    assert fit.startswith("Data-constrained scaling laws"), fit
    assert re.search(rf"^ar\s.*{NUMBER}", fit, re.M) and re.search(r"^diffusion\s", fit, re.M)
    # Pareto frontier at U = 1k, iso-FLOP curves, data value, C_crit.
    assert len(_images(_cell(nb, "plots"))) == 4
    answer = _text(_cell(nb, "plan"))
    assert "law set: prabhudesai2025" in answer
    assert re.search(r"^-> (ar|diffusion): ", answer, re.M), answer
    assert re.search(r"C_crit\(100M\) = \S+ FLOPs", answer), answer
    assert _text(_cell(nb, "plan-fitted")).strip()


@pytest.mark.slow
def test_ablations(text_corpus_dir, tmp_path, kernel_path, monkeypatch):
    params = {**_tiny(text_corpus_dir, tmp_path), "NUM_ORDERS": [1, 4],
              "INCLUDE_DIFFUSION": False, "MODEL_SIZE": "cpu-xs", "UNIQUE_TOKENS": 2_000,
              "EPOCHS": 3, "SEQ_LEN": 32, "BATCH_SIZE": 8, "VALIDATION_TOKENS": 1_000,
              "EVALS_PER_RUN": 3, "EXTRA_CONFIG": {"data.validation_fraction": 0.2,
                                                   "train.peak_lr": 3e-3}}
    nb = _run("ablations", params, kernel_path, monkeypatch)
    _no_errors(nb)
    out = _text(_cell(nb, "train"))
    for name in ("ar-N1", "ar-N4"):
        assert re.search(rf"^{name}: best validation loss {NUMBER}", out, re.M), out
        saved = json.loads((tmp_path / name / "config.json").read_text())
        assert saved["ar"]["num_orders"] == int(name[4:])
    curves = _cell(nb, "curves")
    assert len(_images(curves)) == 1
    assert re.search(rf"^ar-N4\s+{NUMBER}", _text(curves), re.M)
