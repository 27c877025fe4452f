"""A trained run as an lm-evaluation-harness model (lm-eval >= 0.4.13, the `eval` extra).

    python -m dvar_jax.eval.lm_eval_adapter --model dvar --model_args workdir=runs/diff \\
        --tasks arc_easy,piqa --batch_size 16 [--include_path DIR] [--limit N] [...]

runs lm-eval's own command line (every option of `lm_eval`/`lm-eval run`) with the model
`dvar` registered first. The wrapper is needed because lm-eval 0.4.13 finds a model only in its
registry, which holds its built-in models plus whatever was imported before the lookup: it
loads no plugins (no entry points are read). From Python, `import dvar_jax.eval.lm_eval_adapter`
then `lm_eval.simple_evaluate(model="dvar", model_args="workdir=DIR", ...)`.

model_args (comma- or space-separated `key=value`; the values are converted here, since they
may arrive as strings):

- `workdir` (required): the run's folder.
- `checkpoint`: `best` (default; lowest validation loss), `latest` or a step number.
- `num_mc` (default 32): Monte Carlo draws per diffusion request (`mc` only).
- `diffusion_method`: `mc` (default; the study's estimate of the ELBO, a lower bound on the
  log-likelihood) or `chain_rule` (exact for left-to-right order, one model call per token).
- `seed` (default 0): the diffusion mask draws' seed.
- `max_gen_toks` (default 64): `generate_until`'s budget when a task gives none.

The harness's own `--batch_size` (default 1 on its command line; `auto` means 16 here) sets the
number of rows per compiled model call; `--device` and `--max_batch_size` are ignored (JAX
places the model on its default device). Results never depend on the batch size.

Requests, scored by `dvar_jax.eval.scoring.Scorer` in the order lm-eval sends them:

- `loglikelihood` (context, continuation) -> (log p, is_greedy): tokenised as lm-eval 0.4's
  `_encode_pair` (`downstream.encode_pairs`). AR exact; diffusion by `diffusion_method`.
  Diffusion randomness: the request's index within one call keys its draws, so a run is
  reproducible for the same seed, tasks and limit.
- `loglikelihood_rolling` (text,) -> total log p of the text: lm-eval's rolling windows
  (`get_rolling_token_windows` + `make_disjoint_window`, prefix the end-of-document id,
  max_seq_len the training window, context_len 1), so every token is predicted exactly once
  with as much context as fits; the window scores are summed (diffusion: estimates of bounds).
- `generate_until` (context, gen_kwargs) -> text: greedy (AR argmax; diffusion
  confidence-ordered, one token per step, `Scorer.greedy_continuations`) for
  min(max_gen_toks, window - context) tokens, but at least min(max_gen_toks, window // 2): a
  longer context is left-truncated to make that room. The text stops at the end-of-document id
  and is cut before the first of the `until` strings. Sampling settings (`do_sample`,
  `temperature`) are ignored with a warning: only greedy generation is offered.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# lm-eval registers its built-in models only when its registry is empty at the first lookup
# (`get_model`); importing its model table first keeps them available next to `dvar`.
import lm_eval.models  # noqa: F401
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from dvar_jax.eval.downstream import encode_pairs
from dvar_jax.eval.loading import load_run
from dvar_jax.eval.scoring import Scorer, check_diffusion_method

log = logging.getLogger(__name__)

MODEL_NAME = "dvar"
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 64
# Arguments the harness passes to every model's constructor that mean nothing here.
_IGNORED_KWARGS = ("device", "max_batch_size")


def _as_int(name: str, value: Any, least: int) -> int:
    """`value` (an int or its text, as model_args deliver it) as an int >= least."""
    try:
        number = int(value) if not isinstance(value, bool | float) else None
    except (TypeError, ValueError):
        number = None
    if number is None or number < least:
        raise ValueError(f"{name}={value!r} must be an integer >= {least}")
    return number


def _batch_size(value: Any) -> int:
    """The harness's batch size: an int, its text, or `auto`/`auto:N` (no probing here)."""
    if value is None or (isinstance(value, str) and value.strip().startswith("auto")):
        return DEFAULT_BATCH_SIZE
    return _as_int("batch_size", value, 1)


def _register(cls: type[LM]) -> type[LM]:
    """`register_model("dvar")`, except in the copy of this file run by `python -m`: its
    `__main__` imports the module under its own name, which registers the class; a second
    class under the same name would be refused by the registry."""
    return cls if __name__ == "__main__" else register_model(MODEL_NAME)(cls)


@_register
class DvarLM(LM):
    """lm-eval's view of one AR or masked-diffusion run (see the module docstring)."""

    def __init__(self, workdir: str | Path | None = None, checkpoint: str | int = "best",
                 num_mc: int | str = 32, diffusion_method: str = "mc",
                 batch_size: int | str | None = None, seed: int | str = 0,
                 max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS, **kwargs: Any):
        super().__init__()
        if workdir is None or str(workdir) == "":
            raise ValueError("model_args needs workdir=DIR, the folder of a trained run")
        unknown = sorted(set(kwargs) - set(_IGNORED_KWARGS))
        if unknown:
            # Not an error: a newer harness may pass more to every model's constructor.
            log.warning("dvar: ignoring model arguments %s; known: workdir, checkpoint, num_mc, "
                        "diffusion_method, batch_size, seed, max_gen_toks", unknown)
        # Every argument is checked before the (slow) loading.
        check_diffusion_method(str(diffusion_method))
        settings = dict(batch_size=_batch_size(batch_size), num_mc=_as_int("num_mc", num_mc, 1),
                        diffusion_method=str(diffusion_method), seed=_as_int("seed", seed, 0))
        self.max_gen_toks = _as_int("max_gen_toks", max_gen_toks, 0)
        # lm-eval's parser turns `checkpoint=1000` into an int; load_run wants the text.
        self.run = load_run(str(workdir), str(checkpoint))
        self.tokenizer = self.run.tokenizer
        self.objective = self.run.objective
        self.seq_len = int(self.run.cfg.data.seq_len)
        self.scorer = Scorer(self.run.model, self.objective, self.run.mask_id, self.seq_len,
                             eod_id=self.tokenizer.eod_id, **settings)
        self._warned_sampling = False
        log.info("dvar: %s run %s at step %d (seq_len %d)", self.objective.name, workdir,
                 self.run.step, self.seq_len)

    def get_model_info(self) -> dict[str, Any]:
        """Recorded in the harness's results["config"]: what was evaluated, and how."""
        return {"dvar_workdir": str(self.run.workdir), "dvar_step": self.run.step,
                "dvar_objective": self.objective.name, "dvar_seq_len": self.seq_len,
                "dvar_num_mc": self.scorer.num_mc,
                "dvar_diffusion_method": self.scorer.diffusion_method,
                "dvar_seed": self.scorer.seed}

    # ------------------------------------------------------------ requests

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is_greedy) per request (`req.args` = the pair)."""
        pairs = [tuple(req.args[:2]) for req in requests]
        results = self.scorer.loglikelihood(encode_pairs(self.tokenizer, pairs))
        for pair, result in zip(pairs, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests: Sequence[Any]) -> list[float]:
        """Total log-likelihood of each text (`req.args` = (text,)) over rolling windows."""
        windows, owner = [], []
        for i, req in enumerate(requests):
            tokens = self.tokenizer.encode(req.args[0])
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    tokens, prefix_token=self.tokenizer.eod_id, max_seq_len=self.seq_len,
                    context_len=1)):
                windows.append((context, continuation))
                owner.append(i)
        # No greedy check is needed here (for diffusion it would cost a fill per window).
        scored = self.scorer.loglikelihood_with_stderr(windows)
        totals = [0.0] * len(requests)
        for i, (loglik, _) in zip(owner, scored, strict=True):
            totals[i] += loglik
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Greedy continuation of each context (`req.args` = (context, gen_kwargs)), cut before
        the first `until` string."""
        prompts, stops = [], []
        for req in requests:
            context, gen_kwargs = req.args[0], dict(req.args[1] or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            budget = _as_int("max_gen_toks", gen_kwargs.pop("max_gen_toks", self.max_gen_toks),
                             0)
            self._warn_if_sampling(gen_kwargs)
            ids = self.tokenizer.encode(context)
            prompts.append((ids, self._n_new(len(ids), budget)))
            stops.append([s for s in until if s])
        generated = self.scorer.greedy_continuations(prompts)
        outputs = []
        for req, (ids, n), new, until in zip(requests, prompts, generated, stops, strict=True):
            text = self._decode_continuation(ids[max(0, len(ids) - self._context_room(n)):], new)
            cut = min((text.find(s) for s in until if s in text), default=len(text))
            outputs.append(text[:cut])
            self.cache_hook.add_partial("generate_until", req.args, text[:cut])
        return outputs

    # ------------------------------------------------------------ helpers

    def _n_new(self, n_context: int, budget: int) -> int:
        """How many tokens to generate after a context of n_context tokens."""
        room = self.scorer.room
        return min(budget, max(room - n_context, room // 2))

    def _context_room(self, n_new: int) -> int:
        """Context tokens kept (from the end) with n_new to generate, as the Scorer keeps."""
        return self.scorer.room - n_new

    def _decode_continuation(self, context: list[int], new: list[int]) -> str:
        """The text of `new` as it reads after `context`, up to the end-of-document id.

        Decoding `new` alone would drop a leading space (SentencePiece strips the first piece's
        word-boundary mark), so the text is read off the decoded whole after the context.
        """
        eod = self.tokenizer.eod_id
        new = new[:new.index(eod)] if eod in new else new
        if not context:
            return self.tokenizer.decode(new)
        head = self.tokenizer.decode(context)
        whole = self.tokenizer.decode(context + new)
        return whole[len(head):] if whole.startswith(head) else self.tokenizer.decode(new)

    def _warn_if_sampling(self, gen_kwargs: dict) -> None:
        sampling = bool(gen_kwargs.get("do_sample")) or float(gen_kwargs.get("temperature")
                                                              or 0.0) > 0
        if sampling and not self._warned_sampling:
            log.warning("dvar: generate_until is greedy only; ignoring %s", gen_kwargs)
            self._warned_sampling = True


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line (`lm_eval ...`) with the `dvar` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    # Import this file under its module name (registering `dvar` there) and run from it.
    from dvar_jax.eval.lm_eval_adapter import main as _main

    _main()
