"""The study's 9 zero-shot downstream tasks (PAPER.md §6), with lm-eval 0.4.13's prompts and
metrics (DATA.md §4; the same as upstream HEAD), scored by `dvar_jax.eval.scoring.Scorer`.

Every multiple-choice request is (context, " " + choice): lm-eval's `target_delimiter`. `acc` is
whether the argmax of the choices' summed log-likelihoods is the gold one (ties to the first);
`acc_norm` the same with each log-likelihood divided by len(choice) in characters, the choice
taken without the delimiter (arc_easy, hellaswag, piqa, sciq only). The evaluation split is the
test split where the task has one, else validation.

Per task (HF dataset; split; prompt; where lm-eval 0.3.0, the study's version, differs):

- `arc_easy` (allenai/ai2_arc ARC-Easy; test): "Question: {question}\\nAnswer:", choices
  choices.text, gold choices.label.index(answerKey). 0.3.0 first maps numeric keys "1".."5"
  to "A".."E" in both answerKey and labels: the same gold.
- `boolq` (aps/super_glue boolq; validation): "{passage}\\nQuestion: {question}?\\nAnswer:",
  choices ["no", "yes"], gold label (1 = yes).
- `copa` (aps/super_glue copa; validation): premise.strip()[:-1] + " because" (question
  "cause") or " therefore" ("effect"); choices " " + choice[0].lower() + choice[1:], so the
  continuation starts with two spaces (delimiter + the choice's own). 0.3.0 sends one space.
- `hellaswag` (Rowan/hellaswag; validation): pre(activity_label + ": " + ctx_a + " " +
  ctx_b.capitalize()), choices pre(ending), where pre strips, turns " [title]" into ". ",
  removes "[...]" and replaces double spaces by one; gold int(label).
- `piqa` (baber/piqa; validation): "Question: {goal}\\nAnswer:", choices [sol1, sol2].
- `race` (EleutherAI/race high, one document per article, `problems` the string repr of a list
  of {question, answer, options}; test): "Article: {article}\\n\\n", then per earlier problem
  "Question: {q}\\nAnswer: {answer text}\\n", or for a fill-in question ending "  _  ."
  q[:-5] + answer text + "\\n"; then the last question's text; choices its 4 options. 0.3.0
  writes q[-5:] (the blank itself) instead of q[:-5] for fill-in questions.
- `winogrande` (allenai/winogrande winogrande_xl; validation): partial scoring, one context
  per option, sentence[:i] + option (i the index of "_"), the same continuation
  " " + sentence[i + 1:].strip(); gold answer - 1.
- `sciq` (allenai/sciq; test): "{support.lstrip()}\\nQuestion: {question}\\nAnswer:", choices
  [distractor1, distractor2, distractor3, correct_answer], gold 3. 0.3.0 `.strip()`s the whole
  prompt, so an empty support leaves no leading "\\n".
- `lambada_standard` (cimec/lambada; test): context the text without its last space-separated
  word, continuation " " + that word; `acc` is `is_greedy` (AR: the argmax at every
  continuation token; diffusion: confidence-ordered greedy filling reproduces it exactly) and
  `perplexity` exp(-mean log-likelihood) (for diffusion `mc` an estimate of an upper bound).

Inputs. `source="jsonl"`: `<tasks_dir>/<task>.jsonl`, one document of the evaluation split
per line in the Hugging Face field layout above (e.g. `arc_easy.jsonl`, `lambada_standard.jsonl`;
RACE's `problems` a string repr or a list). `source="tfds"`: the TFDS builder of DATA.md §4
(`TFDS_SOURCES`), read from `data_dir=tasks_dir` only if already prepared there (nothing is
downloaded), its fields mapped onto the Hugging Face layout. SciQ has no builder. TFDS's
HellaSwag keeps only the joined `ctx`, so there ctx_b is empty and the part lm-eval capitalises
stays as it is; TFDS's example order is not the Hugging Face one (matters with `limit`).

Tokens. As lm-eval 0.4 (`_encode_pair`): trailing spaces of the context move to the
continuation, context + continuation is encoded whole, the context alone, and the continuation
is the whole's tokens after the context's token count. Encoding the continuation alone would be
wrong here: the SentencePiece model adds a dummy-prefix "▁" to every encoded text.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

TASKS = ("arc_easy", "boolq", "copa", "hellaswag", "piqa", "race", "winogrande", "sciq",
         "lambada_standard")
ACC_NORM_TASKS = frozenset({"arc_easy", "hellaswag", "piqa", "sciq"})
SOURCES = ("jsonl", "tfds")
TARGET_DELIMITER = " "
# (TFDS name/config, split) per task: the evaluation split lm-eval uses.
TFDS_SOURCES: dict[str, tuple[str, str] | None] = {
    "arc_easy": ("ai2_arc/ARC-Easy", "test"),
    "boolq": ("super_glue/boolq", "validation"),
    "copa": ("super_glue/copa", "validation"),
    "hellaswag": ("hellaswag", "validation"),
    "piqa": ("piqa", "validation"),
    "race": ("race/high", "test"),
    "winogrande": ("winogrande", "validation"),
    "sciq": None,
    "lambada_standard": ("lambada", "test"),
}
# Hugging Face fields each task reads (for error messages).
FIELDS = {
    "arc_easy": "question, choices{text, label}, answerKey",
    "boolq": "passage, question, label",
    "copa": "premise, choice1, choice2, question, label",
    "hellaswag": "activity_label, ctx_a, ctx_b, endings, label",
    "piqa": "goal, sol1, sol2, label",
    "race": "article, problems",
    "winogrande": "sentence, option1, option2, answer",
    "sciq": "support, question, distractor1, distractor2, distractor3, correct_answer",
    "lambada_standard": "text",
}


@dataclasses.dataclass(frozen=True)
class Example:
    """One document: per choice the (context, continuation) texts sent for scoring, the gold
    choice's index, and the choices without the delimiter (their lengths normalise acc_norm)."""

    pairs: tuple[tuple[str, str], ...]
    gold: int
    choices: tuple[str, ...]


def multiple_choice(context: str, choices: Sequence[str], gold: int) -> Example:
    """(context, delimiter + choice) per choice."""
    return Example(tuple((context, TARGET_DELIMITER + c) for c in choices), int(gold),
                   tuple(choices))


# ---------------------------------------------------------------- one function per task


def arc_easy(doc: dict) -> Example:
    choices = doc["choices"]
    return multiple_choice(f"Question: {doc['question']}\nAnswer:", choices["text"],
                           list(choices["label"]).index(doc["answerKey"]))


def boolq(doc: dict) -> Example:
    return multiple_choice(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:",
                           ["no", "yes"], doc["label"])


def _copa_choice(choice: str) -> str:
    return " " + choice[0].lower() + choice[1:]


def copa(doc: dict) -> Example:
    connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
    return multiple_choice(doc["premise"].strip()[:-1] + f" {connector}",
                           [_copa_choice(doc["choice1"]), _copa_choice(doc["choice2"])],
                           doc["label"])


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's `preprocess`: strip, " [title]" -> ". ", drop [...] tags, "  " -> " "."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def hellaswag(doc: dict) -> Example:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return multiple_choice(hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
                           [hellaswag_preprocess(e) for e in doc["endings"]], int(doc["label"]))


def piqa(doc: dict) -> Example:
    return multiple_choice(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]],
                           doc["label"])


_LETTER = {"A": 0, "B": 1, "C": 2, "D": 3}


def race(doc: dict) -> Example:
    problems = doc["problems"]
    problems = ast.literal_eval(problems) if isinstance(problems, str) else problems
    text = "Article: " + doc["article"] + "\n\n"
    for problem in problems[:-1]:
        answer = problem["options"][_LETTER[problem["answer"]]]
        if problem["question"][-6:] == "  _  .":
            text += problem["question"][:-5] + answer + "\n"
        else:
            text += "Question: " + problem["question"] + "\n" + "Answer: " + answer + "\n"
    last = problems[-1]
    text += last["question"]
    return multiple_choice(text, [last["options"][i] for i in range(4)], _LETTER[last["answer"]])


def winogrande(doc: dict) -> Example:
    sentence = doc["sentence"]
    i = sentence.index("_")
    contexts = [sentence[:i] + doc["option1"], sentence[:i] + doc["option2"]]
    continuation = TARGET_DELIMITER + sentence[i + 1:].strip()
    return Example(tuple((c, continuation) for c in contexts),
                   {"1": 0, "2": 1}[str(doc["answer"])], tuple(contexts))


def sciq(doc: dict) -> Example:
    return multiple_choice(
        f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:",
        [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]], 3)


def lambada_standard(doc: dict) -> Example:
    words = doc["text"].split(" ")
    target = " " + words[-1]
    return Example(((" ".join(words[:-1]), target),), 0, (target,))


DOC_TO_EXAMPLE: dict[str, Callable[[dict], Example]] = {
    "arc_easy": arc_easy, "boolq": boolq, "copa": copa, "hellaswag": hellaswag, "piqa": piqa,
    "race": race, "winogrande": winogrande, "sciq": sciq, "lambada_standard": lambada_standard,
}


# ---------------------------------------------------------------- sources


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {TASKS}")


def read_jsonl(task: str, tasks_dir: str | os.PathLike | None) -> list[dict]:
    """The documents of `<tasks_dir>/<task>.jsonl`, one JSON object a line (blank lines skipped)."""
    if tasks_dir is None:
        raise ValueError(f"task {task!r}: source='jsonl' needs a tasks_dir holding {task}.jsonl")
    path = Path(tasks_dir) / f"{task}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"task {task!r}: expected its documents at {str(path)!r} "
                                f"(JSON lines with fields {FIELDS[task]})")
    docs = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(doc, dict):
                raise ValueError(f"{path}:{lineno}: a JSON object is needed, got "
                                 f"{type(doc).__name__}")
            docs.append(doc)
    return docs


def _import_tfds():
    """tensorflow_datasets, imported late (it takes seconds and loads TensorFlow), quietly."""
    from dvar_jax import import_quietly

    return import_quietly("tensorflow_datasets")


def _py(x: Any) -> Any:
    """A TFDS numpy record as plain Python: bytes -> str, arrays and ragged values -> lists."""
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, dict):
        return {k: _py(v) for k, v in x.items()}
    if hasattr(x, "to_list"):  # ragged values of nested sequences
        return _py(x.to_list())
    if isinstance(x, np.ndarray):
        return _py(x.tolist()) if x.dtype == object or x.ndim else x.item()
    if isinstance(x, list | tuple):
        return [_py(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def _from_tfds(task: str, rec: dict) -> dict:
    """A TFDS record (plain Python) in the Hugging Face layout of `task`."""
    if task == "arc_easy":  # ClassLabel ints over names A..E
        letters = "ABCDE"
        return {"question": rec["question"],
                "choices": {"text": rec["choices"]["text"],
                            "label": [letters[i] for i in rec["choices"]["label"]]},
                "answerKey": letters[rec["answerKey"]]}
    if task == "hellaswag":  # TFDS keeps ctx = ctx_a + " " + ctx_b only
        return {"activity_label": rec["activity_label"], "ctx_a": rec["context"], "ctx_b": "",
                "endings": rec["endings"], "label": rec["label"]}
    if task == "race":
        problems = [{"question": q, "answer": a, "options": o}
                    for q, a, o in zip(rec["questions"], rec["answers"], rec["options"],
                                       strict=True)]
        return {"article": rec["article"], "problems": problems}
    if task == "winogrande":  # ClassLabel names "1", "2"
        return {"sentence": rec["sentence"], "option1": rec["option1"],
                "option2": rec["option2"], "answer": str(rec["label"] + 1)}
    if task == "lambada_standard":  # lines of the original file, newline kept
        return {"text": rec["passage"].rstrip("\n")}
    return rec  # boolq, copa, piqa: the same field names


def read_tfds(task: str, data_dir: str | os.PathLike | None, limit: int | None) -> list[dict]:
    """The task's evaluation split from a TFDS dataset already prepared in data_dir."""
    source = TFDS_SOURCES[task]
    if source is None:
        raise ValueError(f"task {task!r} has no TFDS builder; put {task}.jsonl (Hugging Face "
                         f"fields {FIELDS[task]}) in tasks_dir and use source='jsonl'")
    name, split = source
    data_dir = None if data_dir is None else str(data_dir)
    tfds = _import_tfds()
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"task {task!r}: TFDS dataset {name!r} is not prepared in data_dir={data_dir!r} and "
            f"is never downloaded here; prepare it where there is network, or put {task}.jsonl "
            f"(Hugging Face fields {FIELDS[task]}) in tasks_dir with source='jsonl'")
    docs = []
    for rec in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
        if limit is not None and len(docs) >= limit:
            break
        docs.append(_from_tfds(task, _py(rec)))
    return docs


def load_examples(task: str, tasks_dir: str | os.PathLike | None = None, *,
                  source: str = "jsonl", limit: int | None = None) -> list[Example]:
    """The task's first `limit` (all if None) documents as Examples."""
    check_task(task)
    if source not in SOURCES:
        raise ValueError(f"source={source!r} is not one of {SOURCES}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r} must be a positive integer or None")
    docs = read_jsonl(task, tasks_dir) if source == "jsonl" else read_tfds(task, tasks_dir, limit)
    docs = docs[:limit]
    examples = []
    for i, doc in enumerate(docs):
        try:
            examples.append(DOC_TO_EXAMPLE[task](doc))
        except (KeyError, IndexError, TypeError, ValueError, SyntaxError) as e:
            raise ValueError(f"task {task!r}, document {i}: not in the Hugging Face layout "
                             f"(fields {FIELDS[task]}): {e!r}") from None
    return examples


# ---------------------------------------------------------------- tokens and metrics


def encode_pairs(tokenizer: Any, pairs: Sequence[tuple[str, str]]
                 ) -> list[tuple[list[int], list[int]]]:
    """lm-eval 0.4's `_encode_pair` for each (context, continuation): see the module docstring.

    An empty context gives ([], continuation's tokens); the Scorer supplies a start token.
    """
    moved = []
    for context, continuation in pairs:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        moved.append((context, continuation))
    encode = getattr(tokenizer, "encode_batch", None) or (lambda ts: [tokenizer.encode(t)
                                                                      for t in ts])
    wholes = encode([c + x for c, x in moved])
    contexts = encode([c for c, _ in moved])
    out = []
    for (context, continuation), whole, ctx in zip(moved, wholes, contexts, strict=True):
        if not context:
            out.append(([], list(tokenizer.encode(continuation))))
        else:
            out.append((list(ctx), list(whole)[len(ctx):]))
    return out


def requests(examples: Sequence[Example], tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """Every example's (context ids, continuation ids) per choice, examples in order."""
    return encode_pairs(tokenizer, [pair for ex in examples for pair in ex.pairs])


def _mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
    """Mean and lm-eval's `mean_stderr` (sample std / sqrt(n); NaN below 2 values)."""
    n = len(values)
    stderr = float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return float(np.mean(values)), stderr


def multiple_choice_metrics(examples: Sequence[Example], logliks: Sequence[float],
                            with_acc_norm: bool) -> dict[str, float]:
    """acc (and acc_norm) with standard errors, from the flat per-choice log-likelihoods."""
    result: dict[str, float] = {}
    correct, correct_norm, at = [], [], 0
    for ex in examples:
        lls = np.asarray(logliks[at:at + len(ex.pairs)], np.float64)
        at += len(ex.pairs)
        correct.append(float(np.argmax(lls) == ex.gold))
        lengths = np.array([float(len(c)) for c in ex.choices])
        correct_norm.append(float(np.argmax(lls / lengths) == ex.gold))
    if at != len(logliks):
        raise ValueError(f"{len(logliks)} log-likelihoods for {at} choices")
    result["acc"], result["acc_stderr"] = _mean_and_stderr(np.array(correct))
    if with_acc_norm:
        result["acc_norm"], result["acc_norm_stderr"] = _mean_and_stderr(np.array(correct_norm))
    return result


def evaluate_task(scorer: Any, tokenizer: Any, task: str,
                  tasks_dir: str | os.PathLike | None, limit: int | None = None, *,
                  source: str = "jsonl") -> dict[str, Any]:
    """Zero-shot metrics of one task: {task, n, acc, acc_stderr, [acc_norm, acc_norm_stderr],
    loglik_stderr_mean} for multiple choice, {task, n, acc, acc_stderr, perplexity} for
    lambada_standard.

    scorer: a `Scorer`, or anything with its `loglikelihood` (lambada_standard) and
    `loglikelihood_with_stderr` (multiple choice). loglik_stderr_mean is the mean Monte Carlo
    standard error of one choice's log-likelihood (0 for exact scoring), to set against the
    differences between choices.
    """
    check_task(task)
    examples = load_examples(task, tasks_dir, source=source, limit=limit)
    if not examples:
        raise ValueError(f"task {task!r}: no documents to evaluate")
    reqs = requests(examples, tokenizer)
    result: dict[str, Any] = {"task": task, "n": len(examples)}
    if task == "lambada_standard":
        scored = scorer.loglikelihood(reqs)
        result["acc"], result["acc_stderr"] = _mean_and_stderr(
            np.array([float(greedy) for _, greedy in scored]))
        result["perplexity"] = float(np.exp(-np.mean([ll for ll, _ in scored])))
    else:
        scored = scorer.loglikelihood_with_stderr(reqs)
        result.update(multiple_choice_metrics(examples, [ll for ll, _ in scored],
                                              task in ACC_NORM_TASKS))
        result["loglik_stderr_mean"] = float(np.mean([se for _, se in scored]))
    return result
