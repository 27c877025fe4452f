"""The lm-eval adapter (`--model dvar`): its three request types against the Scorer and against
log-probabilities computed here, then whole offline runs through lm-eval's Python API and its
command line on local JSON tasks. Needs the `eval` extra (lm-eval); skipped without it."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")

from lm_eval.api.instance import Instance

from dvar_jax.eval.downstream import encode_pairs
from dvar_jax.eval.lm_eval_adapter import DvarLM
from dvar_jax.eval.loading import load_run
from dvar_jax.eval.scoring import Scorer

OBJECTIVES = ("ar", "diffusion")
SEQ_LEN = 32  # the trained_runs fixture's window
PAIRS = [("Thy lord is", " gone"), ("Ba ro mi", " the"), ("", "Shaver on"),
         ("Wil st or an, ", "ke ith"), ("The qu el", " do pe gar wil")]
MC_DOCS = [
    {"question": "Who speaks first", "choices": ["the king", "a fool", "no one"], "gold": 0},
    {"question": "What is on the table", "choices": ["bread", "wine"], "gold": 1},
    {"question": "Where does it end", "choices": ["here", "there", "nowhere", "soon"],
     "gold": 2},
]
TEXT_DOCS = [{"text": "Baro mi ten, sha lu ver do.\nKe ith on gar pe wil st or an the qu el."},
             {"text": "The king."}]


@pytest.fixture(scope="module", autouse=True)
def _offline_hf(tmp_path_factory):
    """Hugging Face caches in a temporary folder, and no network, for every test here."""
    home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(home))
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield home


@pytest.fixture(scope="module")
def adapters(trained_runs) -> dict:
    """One adapter per objective, built from model_args as lm-eval delivers them (strings)."""
    return {objective: DvarLM(workdir=str(trained_runs[objective]), checkpoint="latest",
                              num_mc="8", seed="3", batch_size="4", device="cuda:0",
                              max_batch_size=None)
            for objective in OBJECTIVES}


def requests(request_type: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(request_type, {}, args, i) for i, args in enumerate(arguments)]


def log_softmax64(logits) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    top = logits.max(axis=-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    """Local tasks read from JSON lines by lm-eval's `json` dataset builder: `dvar_tiny_mc`
    (multiple choice), `dvar_tiny_text` (rolling log-likelihood), `dvar_tiny_gen` (generation,
    on the multiple-choice documents)."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    cache = root / "datasets_cache"  # also set here: HF_HOME is read when `datasets` is imported
    for name, docs in (("mc", MC_DOCS), ("text", TEXT_DOCS)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))

    def write_task(task: str, data: str, body: str) -> None:
        head = (f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                f"    validation: {root / data}.jsonl\n  cache_dir: {cache}\n"
                "validation_split: validation\n")
        (root / f"{task}.yaml").write_text(head + textwrap.dedent(body))

    write_task("dvar_tiny_mc", "mc", """\
        output_type: multiple_choice
        doc_to_text: "Question: {{question}}\\nAnswer:"
        doc_to_choice: "{{choices}}"
        doc_to_target: gold
        metric_list:
          - {metric: acc, aggregation: mean, higher_is_better: true}
          - {metric: acc_norm, aggregation: mean, higher_is_better: true}
        """)
    write_task("dvar_tiny_text", "text", """\
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{text}}"
        metric_list:
          - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
          - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}
        """)
    write_task("dvar_tiny_gen", "mc", """\
        output_type: generate_until
        doc_to_text: "Question: {{question}}\\nAnswer:"
        doc_to_target: "{{choices[gold]}}"
        generation_kwargs: {until: ["\\n"], max_gen_toks: 8, do_sample: false}
        metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]
        """)
    return root


# ---------------------------------------------------------------- request types


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_loglikelihood_equals_the_scorers(adapters, trained_runs, objective):
    adapter = adapters[objective]
    run = load_run(trained_runs[objective], "latest")
    scorer = Scorer(run.model, run.objective, run.mask_id, SEQ_LEN, eod_id=run.tokenizer.eod_id,
                    batch_size=4, num_mc=8, seed=3)
    expected = scorer.loglikelihood(encode_pairs(run.tokenizer, PAIRS))
    got = adapter.loglikelihood(requests("loglikelihood", PAIRS))
    assert got == expected
    assert all(isinstance(ll, float) and ll < 0 and isinstance(g, bool) for ll, g in got)


def test_loglikelihood_rolling_is_the_sum_of_token_logprobs(adapters):
    """AR: every token predicted once, from lm-eval's rolling windows (the first after the
    end-of-document id; later ones disjoint, the last with a full window of context)."""
    adapter = adapters["ar"]
    model, eod = adapter.run.model, adapter.tokenizer.eod_id
    short = "Thy lord is gone."
    long = " ".join(["Baro mi ten, sha lu ver do; ke ith on gar pe wil."] * 6)
    tokens = adapter.tokenizer.encode(long)
    n = len(tokens)
    assert 2 * SEQ_LEN < n < 4 * SEQ_LEN and n % SEQ_LEN, n  # full windows and a partial one

    # (inputs, targets, how many of the last predictions count), one per window.
    short_tokens = adapter.tokenizer.encode(short)
    assert len(short_tokens) < SEQ_LEN
    windows = [([eod, *short_tokens[:-1]], short_tokens, len(short_tokens))]
    # The long text: [eod] + t[0:L-1] -> t[0:L]; t[kL-1 : (k+1)L-1] -> t[kL : (k+1)L]; the
    # last, t[n-L-1 : n-1] -> t[n-L : n], counts only its final n - (n // L) L predictions.
    full = n // SEQ_LEN
    windows.append(([eod, *tokens[:SEQ_LEN - 1]], tokens[:SEQ_LEN], SEQ_LEN))
    windows += [(tokens[k * SEQ_LEN - 1:(k + 1) * SEQ_LEN - 1],
                 tokens[k * SEQ_LEN:(k + 1) * SEQ_LEN], SEQ_LEN) for k in range(1, full)]
    windows.append((tokens[n - SEQ_LEN - 1:n - 1], tokens[n - SEQ_LEN:], n - full * SEQ_LEN))
    # One model call; a causal model's predictions do not see the padding after them.
    inputs = np.full((len(windows), SEQ_LEN), eod, np.int32)
    for row, (x, _, _) in zip(inputs, windows, strict=True):
        row[:len(x)] = x
    logp = log_softmax64(model(jnp.asarray(inputs)))
    scores = [logp[w, np.arange(len(y)), y][len(y) - count:].sum()
              for w, (_, y, count) in enumerate(windows)]
    expected_short, expected_long = scores[0], sum(scores[1:])
    assert sum(count for _, _, count in windows[1:]) == n  # every token once

    got = adapter.loglikelihood_rolling(requests("loglikelihood_rolling",
                                                 [(short,), (long,), ("",)]))
    np.testing.assert_allclose(got, [expected_short, expected_long, 0.0], rtol=1e-5, atol=1e-3)


def test_loglikelihood_rolling_diffusion_is_the_scorers_window_sum(adapters):
    adapter = adapters["diffusion"]
    text = " ".join(["Baro mi ten, sha lu ver do; ke ith on gar pe wil."] * 3)
    tokens = adapter.tokenizer.encode(text)
    assert len(tokens) > SEQ_LEN, len(tokens)
    got, = adapter.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    windows = [([adapter.tokenizer.eod_id], tokens[:SEQ_LEN])]
    windows += [(tokens[k - 1:k], tokens[k:k + SEQ_LEN]) for k in range(SEQ_LEN, len(tokens),
                                                                        SEQ_LEN)]
    windows[-1] = (tokens[:len(tokens) - len(windows[-1][1])], windows[-1][1])  # full context
    expected = sum(ll for ll, _ in adapter.scorer.loglikelihood_with_stderr(windows))
    assert got == pytest.approx(expected, rel=1e-9)
    assert got < 0


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_generate_until_is_the_greedy_continuation(adapters, objective):
    adapter, tokenizer = adapters[objective], adapters[objective].tokenizer
    context = "Thy lord is gone, and"
    free, none = adapter.generate_until(requests(
        "generate_until", [(context, {"until": [], "max_gen_toks": 12}),
                           (context, {"until": ["\n"], "max_gen_toks": 0})]))
    ids = tokenizer.encode(context)
    greedy = adapter.scorer.greedy_continuation(ids, 12)
    if tokenizer.eod_id in greedy:
        greedy = greedy[:greedy.index(tokenizer.eod_id)]
    assert free == tokenizer.decode(ids + greedy)[len(tokenizer.decode(ids)):]
    assert none == ""


def test_generate_until_cuts_at_until_and_at_the_end_of_document(adapters, monkeypatch):
    """The tiny trained models only ever generate newlines, so a scripted greedy continuation
    stands in for the model here: the text and its cutting are the adapter's."""
    adapter, tokenizer = adapters["ar"], adapters["ar"].tokenizer
    context, script = "Thy lord", " the king; exit.\nAll."
    (context_ids, script_ids), = encode_pairs(tokenizer, [(context, script)])
    n_new = SEQ_LEN - 1 - len(context_ids)  # the room left by the context (< 64)
    assert len(script_ids) < n_new
    asked = []

    def scripted(prompts):
        asked.extend(n for _, n in prompts)
        return [[*script_ids, tokenizer.eod_id, *script_ids][:n] for _, n in prompts]

    monkeypatch.setattr(adapter.scorer, "greedy_continuations", scripted)
    cases = [({"until": []}, script),  # stops at the end-of-document id; leading space kept
             ({"until": ["\n"]}, " the king; exit."),
             ({"until": ["\n", ";"]}, " the king"),  # the earliest of the strings
             ({"until": "king"}, " the "),  # a single string
             ({"until": ["", "queen"]}, script),  # empty and absent strings cut nothing
             ({"until": [], "max_gen_toks": 1}, " the")]
    got = adapter.generate_until(requests("generate_until", [(context, kw) for kw, _ in cases]))
    assert got == [want for _, want in cases]
    assert asked == [n_new] * 5 + [1]


def test_generate_until_makes_room_in_a_full_window(adapters):
    """A context longer than the window is left-truncated so that generation still happens."""
    adapter = adapters["ar"]
    assert adapter._n_new(100, 64) == (SEQ_LEN - 1) // 2
    assert adapter._n_new(5, 64) == SEQ_LEN - 1 - 5
    assert adapter._n_new(5, 4) == 4
    assert adapters["diffusion"]._n_new(100, 64) == SEQ_LEN // 2  # no start token to keep
    long_context = " ".join(["Baro mi ten, sha lu ver do."] * 20)
    out, = adapter.generate_until(requests("generate_until", [(long_context, {"until": []})]))
    assert isinstance(out, str)


def test_bad_model_args_are_one_line_errors(trained_runs):
    workdir = str(trained_runs["ar"])
    for kwargs, needle in (({}, "workdir=DIR"), ({"workdir": workdir, "num_mc": "lots"},
                                                 "num_mc='lots' must be an integer >= 1"),
                           ({"workdir": workdir, "diffusion_method": "exact"},
                            "diffusion_method='exact' is not one of"),
                           ({"workdir": workdir, "batch_size": 0},
                            "batch_size=0 must be an integer >= 1"),
                           ({"workdir": workdir, "checkpoint": 999},
                            "--checkpoint='999': allowed best, latest")):
        with pytest.raises(ValueError, match=needle) as info:
            DvarLM(**kwargs)
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------- through lm-eval


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_simple_evaluate_offline_on_local_tasks(trained_runs, tasks_dir, objective):
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="dvar", model_args=f"workdir={trained_runs[objective]},num_mc=4",
        tasks=["dvar_tiny_mc", "dvar_tiny_text"], batch_size=8, log_samples=True,
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False))
    mc, text = results["results"]["dvar_tiny_mc"], results["results"]["dvar_tiny_text"]
    for metric in ("acc,none", "acc_norm,none"):
        assert 0.0 <= mc[metric] <= 1.0
    assert results["n-samples"]["dvar_tiny_mc"]["effective"] == len(MC_DOCS)
    assert len(results["samples"]["dvar_tiny_mc"]) == len(MC_DOCS)
    assert [len(s["resps"]) for s in results["samples"]["dvar_tiny_mc"]] == [
        len(d["choices"]) for d in MC_DOCS]
    assert results["n-samples"]["dvar_tiny_text"]["effective"] == len(TEXT_DOCS)
    assert np.isfinite(text["word_perplexity,none"]) and text["word_perplexity,none"] > 1
    assert results["config"]["dvar_objective"] == objective


@pytest.mark.slow
def test_documented_command_line_runs_offline(trained_runs, tasks_dir, tmp_path):
    """`python -m dvar_jax.eval.lm_eval_adapter --model dvar ...`, as the module documents."""
    command = [sys.executable, "-m", "dvar_jax.eval.lm_eval_adapter", "--model", "dvar",
               "--model_args", f"workdir={trained_runs['ar']},checkpoint=latest",
               "--tasks", "dvar_tiny_mc,dvar_tiny_gen", "--include_path", str(tasks_dir),
               "--limit", "2", "--batch_size", "4", "--output_path", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent.parent, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dvar_tiny_mc" in done.stdout and "dvar_tiny_gen" in done.stdout, done.stdout
    written, = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(written.read_text())
    assert results["n-samples"]["dvar_tiny_mc"]["effective"] == 2
    assert results["n-samples"]["dvar_tiny_gen"]["effective"] == 2
    assert 0.0 <= results["results"]["dvar_tiny_mc"]["acc,none"] <= 1.0
    assert 0.0 <= results["results"]["dvar_tiny_gen"]["exact_match,none"] <= 1.0
