"""Downstream tasks: lm-eval 0.4.13 prompts per task (hand-written expected strings), acc and
acc_norm, token splitting, the JSONL and (faked) TFDS sources, and every task end to end on a
tiny random model."""

import json
import math
import re
import types

import numpy as np
import pytest
from flax import nnx

from dvar_jax.data.pipeline import open_run_data
from dvar_jax.eval import downstream
from dvar_jax.eval.downstream import (
    TASKS,
    Example,
    encode_pairs,
    evaluate_task,
    load_examples,
    requests,
)
from dvar_jax.eval.scoring import Scorer
from dvar_jax.model.transformer import Transformer, TransformerConfig, padded_vocab_size
from dvar_jax.objectives import get_objective

RACE_PROBLEMS = [
    {"question": "What color is the kite?", "answer": "A",
     "options": ["red", "blue", "green", "black"]},
    {"question": "Tom flies the kite on  _  .", "answer": "C",
     "options": ["Monday", "Friday", "Sunday", "Tuesday"]},
    {"question": "Who has a kite?", "answer": "D", "options": ["Ann", "Bob", "Sue", "Tom"]},
]

# Made-up documents in each task's Hugging Face layout (DATA.md §4).
DOCS = {
    "arc_easy": [
        {"id": "a1", "question": "Which gas do plants take in?",
         "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"],
                     "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
        {"id": "a2", "question": "What melts ice?",
         "choices": {"text": ["heat", "cold", "dark"], "label": ["1", "2", "3"]},
         "answerKey": "1"},
    ],
    "boolq": [
        {"question": "is the sky blue", "passage": "The sky looks blue on clear days.",
         "idx": 0, "label": 1},
        {"question": "can fish fly", "passage": "Most fish swim.", "idx": 1, "label": 0},
    ],
    "copa": [
        {"premise": "The man dropped the glass.", "choice1": "It shattered.",
         "choice2": "It sang.", "question": "effect", "idx": 0, "label": 0},
        {"premise": "My hands were cold. ", "choice1": "I wore gloves.",
         "choice2": "I lit a Fire.", "question": "cause", "idx": 1, "label": 1},
    ],
    "hellaswag": [
        {"activity_label": "Baking cookies", "ctx_a": "A woman mixes flour in a bowl.",
         "ctx_b": "then the Chef smiles",
         "endings": ["pours the dough onto a tray.", " adds  sugar [step] and stirs. ",
                     "eats the bowl.", "runs away."], "label": "0"},
        {"activity_label": "Home and Garden",
         "ctx_a": "[header] How to water a plant [title] Fill a can.", "ctx_b": "",
         "endings": ["[step] Pour slowly.", "Throw it.", "Sing loudly.", "Sleep."],
         "label": "0"},
    ],
    "piqa": [
        {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0},
        {"goal": "Dry wet socks", "sol1": "Put them in the freezer.",
         "sol2": "Hang them in the sun.", "label": 1},
    ],
    "race": [
        {"example_id": "r1", "article": "Tom has a red kite. He flies it every Sunday.",
         "problems": str(RACE_PROBLEMS)},
        {"example_id": "r2", "article": "Ann reads books.",
         "problems": str([{"question": "What does Ann read?", "answer": "B",
                           "options": ["maps", "books", "notes", "signs"]}])},
    ],
    "winogrande": [
        {"sentence": "The trophy did not fit in the case because _ was too big.",
         "option1": "the trophy", "option2": "the case", "answer": "1"},
        {"sentence": "Sam gave Kim a gift because _ was kind.", "option1": "Sam",
         "option2": "Kim", "answer": "2"},
    ],
    "sciq": [
        {"question": "What do plants make?", "distractor1": "rocks", "distractor2": "metal",
         "distractor3": "water", "correct_answer": "sugar",
         "support": "  Plants use light to make sugar."},
        {"question": "What is ice?", "distractor1": "gas", "distractor2": "plasma",
         "distractor3": "light", "correct_answer": "solid water", "support": ""},
    ],
    "lambada_standard": [
        {"text": "she opened the door and saw her old friend"},
        {"text": "the cat sat on the warm mat"},
        {"text": "he wrote a long letter to his mother"},
    ],
}


def mc(context, choices, gold):
    return Example(tuple((context, " " + c) for c in choices), gold, tuple(choices))


# The first (and where it shows something, second) document of each task as lm-eval 0.4.13
# builds it, written out by hand.
EXPECTED = {
    "arc_easy": [
        mc("Question: Which gas do plants take in?\nAnswer:",
           ["oxygen", "carbon dioxide", "helium", "neon"], 1),
        mc("Question: What melts ice?\nAnswer:", ["heat", "cold", "dark"], 0),
    ],
    "boolq": [
        mc("The sky looks blue on clear days.\nQuestion: is the sky blue?\nAnswer:",
           ["no", "yes"], 1),
        mc("Most fish swim.\nQuestion: can fish fly?\nAnswer:", ["no", "yes"], 0),
    ],
    "copa": [  # the connector replaces the period; two spaces before the lowercased choice
        Example((("The man dropped the glass therefore", "  it shattered."),
                 ("The man dropped the glass therefore", "  it sang.")), 0,
                (" it shattered.", " it sang.")),
        Example((("My hands were cold because", "  i wore gloves."),
                 ("My hands were cold because", "  i lit a Fire.")), 1,
                (" i wore gloves.", " i lit a Fire.")),
    ],
    "hellaswag": [  # ctx_b capitalised (the rest lowercased); [step] tags gone, "  " -> " "
        mc("Baking cookies: A woman mixes flour in a bowl. Then the chef smiles",
           ["pours the dough onto a tray.", "adds sugar and stirs.", "eats the bowl.",
            "runs away."], 0),
        mc("Home and Garden: How to water a plant. Fill a can.",
           [" Pour slowly.", "Throw it.", "Sing loudly.", "Sleep."], 0),
    ],
    "piqa": [
        mc("Question: Open a jar\nAnswer:", ["Twist the lid.", "Eat the lid."], 0),
        mc("Question: Dry wet socks\nAnswer:", ["Put them in the freezer.",
                                                "Hang them in the sun."], 1),
    ],
    "race": [  # earlier problems answered; the fill-in one as its text up to the blank
        mc("Article: Tom has a red kite. He flies it every Sunday.\n\n"
           "Question: What color is the kite?\nAnswer: red\n"
           "Tom flies the kite on Sunday\n"
           "Who has a kite?", ["Ann", "Bob", "Sue", "Tom"], 3),
        mc("Article: Ann reads books.\n\nWhat does Ann read?",
           ["maps", "books", "notes", "signs"], 1),
    ],
    "winogrande": [  # partial scoring: one context per option, one shared continuation
        Example((("The trophy did not fit in the case because the trophy", " was too big."),
                 ("The trophy did not fit in the case because the case", " was too big.")), 0,
                ("The trophy did not fit in the case because the trophy",
                 "The trophy did not fit in the case because the case")),
        Example((("Sam gave Kim a gift because Sam", " was kind."),
                 ("Sam gave Kim a gift because Kim", " was kind.")), 1,
                ("Sam gave Kim a gift because Sam", "Sam gave Kim a gift because Kim")),
    ],
    "sciq": [  # support.lstrip(); an empty support still leaves its "\n"
        mc("Plants use light to make sugar.\nQuestion: What do plants make?\nAnswer:",
           ["rocks", "metal", "water", "sugar"], 3),
        mc("\nQuestion: What is ice?\nAnswer:", ["gas", "plasma", "light", "solid water"], 3),
    ],
    "lambada_standard": [
        Example((("she opened the door and saw her old", " friend"),), 0, (" friend",)),
        Example((("the cat sat on the warm", " mat"),), 0, (" mat",)),
        Example((("he wrote a long letter to his", " mother"),), 0, (" mother",)),
    ],
}


def write_tasks(folder, docs=DOCS):
    for task, task_docs in docs.items():
        with open(folder / f"{task}.jsonl", "w") as f:
            for doc in task_docs:
                f.write(json.dumps(doc) + "\n")
    return folder


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def tokenizer(text_data_cfg):
    return open_run_data(text_data_cfg).tokenizer


# ---------------------------------------------------------------- prompts


@pytest.mark.parametrize("task", TASKS)
def test_prompts_match_lm_eval_0_4(tasks_dir, task):
    examples = load_examples(task, tasks_dir)
    assert len(examples) == len(DOCS[task])
    assert examples[:len(EXPECTED[task])] == EXPECTED[task]
    assert load_examples(task, tasks_dir, limit=1) == examples[:1]


def test_bad_task_source_and_files(tasks_dir, tmp_path):
    with pytest.raises(ValueError, match=r"task 'mmlu' is not one of \('arc_easy', 'boolq'"):
        load_examples("mmlu", tasks_dir)
    with pytest.raises(ValueError, match="source='hf'"):
        load_examples("piqa", tasks_dir, source="hf")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "piqa.jsonl"))):
        load_examples("piqa", tmp_path)
    with pytest.raises(ValueError, match="tasks_dir"):
        load_examples("piqa")
    (tmp_path / "boolq.jsonl").write_text('{"question": "q", "label": 1}\n')
    with pytest.raises(ValueError, match=r"document 0.*passage, question, label"):
        load_examples("boolq", tmp_path)
    (tmp_path / "copa.jsonl").write_text('{"premise": "x."}\n{oops\n')
    with pytest.raises(ValueError, match=r"copa.jsonl:2: not valid JSON"):
        load_examples("copa", tmp_path)
    with pytest.raises(ValueError, match="limit=0"):
        load_examples("piqa", tasks_dir, limit=0)
    with pytest.raises(ValueError, match=r"task 'sciq' has no TFDS builder.*sciq.jsonl"):
        load_examples("sciq", tasks_dir, source="tfds")


# ---------------------------------------------------------------- tokens


def test_pairs_are_encoded_whole_and_split_at_the_contexts_token_count(tokenizer):
    (ctx, cont), (ctx2, cont2), (ctx3, cont3) = encode_pairs(
        tokenizer, [("Answer:", " yes"), ("Answer: ", "yes"), ("", " yes")])
    assert ctx == tokenizer.encode("Answer:")
    assert ctx + cont == tokenizer.encode("Answer: yes")
    # The SentencePiece dummy prefix: encoding the continuation alone would add a "▁".
    assert cont != tokenizer.encode(" yes") and len(cont) == len(tokenizer.encode(" yes")) - 1
    assert (ctx2, cont2) == (ctx, cont)  # trailing context spaces move to the continuation
    assert (ctx3, cont3) == ([], tokenizer.encode(" yes"))
    examples = [EXPECTED["piqa"][0], EXPECTED["lambada_standard"][0]]
    assert requests(examples, tokenizer) == encode_pairs(
        tokenizer, [p for ex in examples for p in ex.pairs])
    assert len(requests(examples, tokenizer)) == 3


# ---------------------------------------------------------------- metrics


class StubScorer:
    """Returns the given log-likelihoods in order, checking how many requests came."""

    def __init__(self, logliks, greedy=None):
        self.logliks, self.greedy = logliks, greedy

    def loglikelihood_with_stderr(self, reqs):
        assert len(reqs) == len(self.logliks)
        return [(ll, 0.1) for ll in self.logliks]

    def loglikelihood(self, reqs):
        assert len(reqs) == len(self.logliks)
        return list(zip(self.logliks, self.greedy, strict=True))


def test_acc_and_acc_norm_by_hand(tasks_dir, tokenizer):
    # arc_easy doc 0 (gold 1): raw argmax is choice 0; per character, -6/14 beats -5/6.
    # doc 1 (gold 0): choice 0 either way. acc = 1/2, acc_norm = 2/2.
    stub = StubScorer([-5.0, -6.0, -20.0, -20.0, -1.0, -2.0, -3.0])
    result = evaluate_task(stub, tokenizer, "arc_easy", tasks_dir)
    assert result == {"task": "arc_easy", "n": 2, "acc": 0.5,
                      "acc_stderr": pytest.approx(0.5), "acc_norm": 1.0, "acc_norm_stderr": 0.0,
                      "loglik_stderr_mean": pytest.approx(0.1)}
    # boolq has no acc_norm.
    result = evaluate_task(StubScorer([-1.0, -2.0, -1.0, -2.0]), tokenizer, "boolq", tasks_dir)
    assert (result["acc"], "acc_norm" in result) == (0.5, False)
    # Ties go to the first choice, as np.argmax.
    assert evaluate_task(StubScorer([-1.0, -1.0] * 2), tokenizer, "piqa", tasks_dir)["acc"] == 0.5
    # LAMBADA: acc = is_greedy, perplexity = exp(-mean log-likelihood).
    result = evaluate_task(StubScorer([-2.0, -4.0, -3.0], [True, False, False]), tokenizer,
                           "lambada_standard", tasks_dir)
    assert result["acc"] == pytest.approx(1 / 3)
    assert result["perplexity"] == pytest.approx(math.exp(3.0))
    assert result["n"] == 3 and "acc_norm" not in result


# ---------------------------------------------------------------- TFDS (faked: no download)


def tfds_records():
    """The fixture documents as TFDS gives them: bytes, numpy ints and arrays, ClassLabels."""
    b = str.encode

    def arr(xs):
        return np.array([b(x) for x in xs], dtype=object)

    arc = DOCS["arc_easy"][0]
    hs = DOCS["hellaswag"][1]  # ctx_b is empty, so TFDS's joined ctx loses nothing
    wino = DOCS["winogrande"][0]
    return {
        ("ai2_arc/ARC-Easy", "test"): [{
            "id": b(arc["id"]), "question": b(arc["question"]),
            "choices": {"text": arr(arc["choices"]["text"]), "label": np.arange(4)},
            "answerKey": np.int64(1)}],
        ("super_glue/boolq", "validation"): [
            {k: b(v) if isinstance(v, str) else np.int64(v) for k, v in DOCS["boolq"][0].items()}],
        ("super_glue/copa", "validation"): [
            {k: b(v) if isinstance(v, str) else np.int32(v) for k, v in DOCS["copa"][1].items()}],
        ("hellaswag", "validation"): [{
            "context": b(hs["ctx_a"] + " " + hs["ctx_b"]), "endings": arr(hs["endings"]),
            "activity_label": b(hs["activity_label"]), "label": np.int32(0),
            "split_type": b("indomain"), "source_id": b("x")}],
        ("piqa", "validation"): [{"id": b("p"), "goal": b("Open a jar"),
                                  "sol1": b("Twist the lid."), "sol2": b("Eat the lid."),
                                  "label": np.int64(0)}],
        ("race/high", "test"): [{
            "article": b(DOCS["race"][0]["article"]),
            "questions": arr([p["question"] for p in RACE_PROBLEMS]),
            "answers": arr([p["answer"] for p in RACE_PROBLEMS]),
            "options": types.SimpleNamespace(to_list=lambda: [[b(o) for o in p["options"]]
                                                              for p in RACE_PROBLEMS]),
            "example_id": b("r1")}],
        ("winogrande", "validation"): [{
            "sentence": b(wino["sentence"]), "option1": b(wino["option1"]),
            "option2": b(wino["option2"]), "label": np.int64(0)}],
        ("lambada", "test"): [{"passage": b(d["text"] + "\n")} for d in DOCS["lambada_standard"]],
    }


class FakeBuilder:
    def __init__(self, records, prepared):
        self.records, self.prepared = records, prepared

    def is_prepared(self):
        return self.prepared

    def as_dataset(self, split, shuffle_files):
        assert not shuffle_files
        return self.records[split]


def fake_tfds(prepared=True):
    by_name = {}
    for (name, split), recs in tfds_records().items():
        by_name.setdefault(name, {})[split] = recs
    return types.SimpleNamespace(
        builder=lambda name, data_dir=None: FakeBuilder(by_name[name], prepared),
        as_numpy=lambda ds: iter(ds))


def test_tfds_records_map_onto_the_hugging_face_layout(monkeypatch, tmp_path):
    monkeypatch.setattr(downstream, "_import_tfds", fake_tfds)
    expected = {"arc_easy": EXPECTED["arc_easy"][:1], "boolq": EXPECTED["boolq"][:1],
                "copa": EXPECTED["copa"][1:2], "hellaswag": EXPECTED["hellaswag"][1:2],
                "piqa": EXPECTED["piqa"][:1], "race": EXPECTED["race"][:1],
                "winogrande": EXPECTED["winogrande"][:1],
                "lambada_standard": EXPECTED["lambada_standard"]}
    for task, want in expected.items():
        assert load_examples(task, tmp_path, source="tfds") == want, task
    assert load_examples("lambada_standard", tmp_path, source="tfds", limit=2) == want[:2]
    monkeypatch.setattr(downstream, "_import_tfds", lambda: fake_tfds(prepared=False))
    with pytest.raises(FileNotFoundError, match=r"task 'piqa': TFDS dataset 'piqa' is not "
                                                r"prepared.*piqa.jsonl"):
        load_examples("piqa", tmp_path, source="tfds")


def test_real_tfds_builder_that_is_not_prepared_is_an_error(monkeypatch, tmp_path):
    import tempfile

    # tfds.builder leaves an empty tmp*tfds folder behind (DATA.md §3): keep it in tmp_path.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"task 'winogrande'.*never downloaded"):
        load_examples("winogrande", tmp_path / "tfds", source="tfds")


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def scorers(tokenizer):
    vocab = padded_vocab_size(tokenizer.vocab_size)
    out = {}
    for name in ("ar", "diffusion"):
        objective = get_objective(name)
        cfg = TransformerConfig(vocab_size=vocab, d_model=32, n_layers=1, n_heads=2,
                                head_dim=16, causal=objective.causal)
        out[name] = Scorer(Transformer(cfg, rngs=nnx.Rngs(0)), objective,
                           tokenizer.vocab_size, 64, eod_id=tokenizer.eod_id,
                           batch_size=8, num_mc=2)
    return out


@pytest.mark.parametrize("objective", ["ar", "diffusion"])
def test_every_task_end_to_end_on_a_tiny_model(scorers, tokenizer, tasks_dir, objective):
    for task in TASKS:
        result = evaluate_task(scorers[objective], tokenizer, task, tasks_dir)
        assert result["task"] == task and result["n"] == len(DOCS[task])
        assert 0.0 <= result["acc"] <= 1.0
        if task in downstream.ACC_NORM_TASKS:
            assert 0.0 <= result["acc_norm"] <= 1.0
        if task == "lambada_standard":
            assert result["perplexity"] > 1.0
        else:
            assert (result["loglik_stderr_mean"] > 0) == (objective == "diffusion")
