"""The data path at scale: `dvar prepare`'s memory and speed, and the store reader's.

For generated corpora of several sizes (C4-like gzipped JSON lines of made-up words), it
measures and prints one table:

- `prepare`'s peak resident memory (the whole process tree, sampled every 20 ms), which must
  not grow with the corpus;
- tokens/s per worker, for SentencePiece and for byte-level BPE (HF tokenizers);
- the reader's peak RSS while cutting batches from the whole store (flat in its size), and the
  windows/s it delivers, against what a 140M model on a v5p-8 consumes;
- `prepare` time extrapolated to 100M and 40B tokens on a 64-core host.

    python benchmarks/data_scale.py                       # 10M, 50M, 200M tokens (~30 min)
    python benchmarks/data_scale.py --tokens 2e6,5e6      # a quick look
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

# What a 140M model on a v5p-8 eats, the assumption the windows/s are compared with: 6·N·D
# FLOPs a token at N = 140M, 4 chips of 459 TFLOP/s (bf16) at 50% MFU, windows of 2048.
V5P_CHIP_FLOPS = 459e12
V5P8_CHIPS = 4
ASSUMED_MFU = 0.5
MODEL_PARAMS = 140e6
SEQ_LEN = 2048
CONSUMED_WINDOWS_PER_S = V5P8_CHIPS * V5P_CHIP_FLOPS * ASSUMED_MFU / (6 * MODEL_PARAMS) / SEQ_LEN
BIG_HOST_CORES = 64
# Both tokenizers' size: the made-up words (20 syllables) cannot fill a larger unigram model.
VOCAB = 1024


def write_corpus(folder: Path, words: int, seed: int = 0) -> Path:
    """`words` made-up words in documents of about 400 words, as c4-train.NNNNN-of-01024.json.gz
    files of about 2M words each (C4's own layout)."""
    rng = np.random.default_rng(seed)
    syllables = np.array(["ba", "ro", "mi", "ten", "sha", "lu", "ver", "do", "ke", "ith", "on",
                          "gar", "pe", "wil", "st", "or", "an", "the", "qu", "el"])
    lexicon = np.array(["".join(rng.choice(syllables, rng.integers(1, 4)))
                        for _ in range(20_000)])
    # Zipf-like word frequencies, so the tokenizers see a natural-looking distribution.
    weights = 1.0 / np.arange(1, len(lexicon) + 1) ** 1.1
    weights /= weights.sum()
    folder.mkdir(parents=True, exist_ok=True)
    per_file, written, index = 2_000_000, 0, 0
    while written < words:
        n = min(per_file, words - written)
        chosen = lexicon[rng.choice(len(lexicon), n, p=weights)]
        lengths = rng.integers(100, 700, size=n // 100 + 2)
        cuts = np.cumsum(lengths)
        cuts = cuts[cuts < n]
        with gzip.open(folder / f"c4-train.{index:05d}-of-01024.json.gz", "wt",
                       compresslevel=1) as f:
            for doc in np.split(chosen, cuts):
                f.write(json.dumps({"text": " ".join(doc.tolist()) + "."}) + "\n")
        written += n
        index += 1
    return folder


def peak_tree_rss(command: list[str]) -> tuple[float, int]:
    """(seconds, peak bytes of the summed RSS of the process and its children)."""
    started = time.monotonic()
    proc = psutil.Popen(command, stdout=subprocess.DEVNULL)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                procs = [proc, *proc.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = proc.wait()
    stop.set()
    sampler.join()
    if code:
        raise SystemExit(f"{command} failed with exit {code}")
    return time.monotonic() - started, peak


def train_tokenizers(corpus: Path, out: Path) -> dict[str, Path]:
    """A SentencePiece unigram model and a byte-level BPE (GPT-2 files) of VOCAB ids each."""
    from tokenizers import ByteLevelBPETokenizer

    from dvar_jax.data.corpus import SourceSpec, iter_documents
    from dvar_jax.data.tokenizer import train_sentencepiece

    sample = list(itertools.islice(iter_documents(SourceSpec("text", "all", path=str(corpus))),
                                   2_000))
    out.mkdir(parents=True, exist_ok=True)
    (out / "spm.model").write_bytes(train_sentencepiece(sample, VOCAB, "unigram"))
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator([d.text for d in sample], vocab_size=VOCAB,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    (out / "bpe").mkdir(exist_ok=True)
    bpe.save_model(str(out / "bpe"))
    return {"sentencepiece": out / "spm.model", "bpe": out / "bpe"}


def prepare_command(corpus: Path, tokenizer: Path, out: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "dvar_jax.cli", "prepare", "--source=text",
            f"--path={corpus}", f"--tokenizer={tokenizer}", f"--out={out}",
            f"--workers={workers}"]


_READER = """
import resource, sys, time, numpy as np
from dvar_jax.data.pipeline import TrainBatches
from dvar_jax.data.store import TokenStore
store = TokenStore(sys.argv[1])
batches = TrainBatches(store, seq_len={seq}, unique_tokens=store.num_tokens, epochs=1,
                       batch_size={batch}, seed=0)
steps = np.random.default_rng(0).choice(batches.num_steps, {steps})
start = time.perf_counter()
for step in steps:
    batches.batch(int(step))
seconds = time.perf_counter() - start
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
anon = int(status.get("RssAnon", "0 kB").split()[0]) * 1024
print(len(steps) * {batch} / seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      anon)
"""


def read_store(store: Path, steps: int = 40, batch: int = 256) -> tuple[float, int, int]:
    """(windows/s, peak RSS bytes, anonymous RSS bytes at the end) cutting `steps` random
    batches of `batch` x 2049 (the rest of the RSS is the shards' pages the kernel mapped)."""
    script = _READER.format(seq=SEQ_LEN, batch=batch, steps=steps)
    out = subprocess.run([sys.executable, "-c", script, str(store)], check=True,
                         capture_output=True, text=True).stdout.split()
    return float(out[0]), int(out[1]), int(out[2])


def encode_rate(tokenizer_path: Path, corpus: Path, chars: int = 8_000_000) -> float:
    """Tokens/s of one worker (one thread) encoding about `chars` characters of the corpus."""
    from dvar_jax.data.corpus import SourceSpec, iter_documents
    from dvar_jax.data.prepare import encode_shard
    from dvar_jax.data.tokenizer import open_tokenizer

    tokenizer = open_tokenizer(str(tokenizer_path))
    texts, size = [], 0
    for doc in iter_documents(SourceSpec("text", "all", path=str(corpus))):
        texts.append(doc.text)
        size += len(doc.text)
        if size >= chars:
            break
    start = time.perf_counter()
    tokens, _ = encode_shard(tokenizer, texts, np.dtype(np.uint16), num_threads=1)
    return len(tokens) / (time.perf_counter() - start)


def read_rate(corpus: Path, tokens: int) -> float:
    """Tokens/s at which the preparing process reads, cuts and hashes the source (what feeds
    the workers; the ceiling of any number of them)."""
    import pickle

    from dvar_jax.data.corpus import SourceSpec, iter_documents
    from dvar_jax.data.prepare import DEFAULT_SHARD_CHARS, _shards, _text_hash

    start = time.perf_counter()
    for docs in _shards(iter_documents(SourceSpec("text", "all", path=str(corpus))),
                        DEFAULT_SHARD_CHARS):
        _text_hash(docs)
        pickle.dumps([d.text for d in docs])
    return tokens / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="10e6,50e6,200e6",
                        help="approximate corpus sizes in tokens, comma-separated")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", default="", help="scratch folder (default: a temporary one)")
    parser.add_argument("--json", default="", help="also write the rows here")
    args = parser.parse_args(argv)
    sizes = [int(float(t)) for t in args.tokens.split(",")]
    scratch = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="dvar-data-scale-"))
    rows = []
    tokenizers = None
    for size in sizes:
        # About 1.1 tokens per made-up word (and its space) with either tokenizer.
        corpus = write_corpus(scratch / f"corpus-{size}", int(size / 1.1))
        tokenizers = tokenizers or train_tokenizers(corpus, scratch / "tokenizers")
        for kind, tokenizer in tokenizers.items():
            if kind == "bpe" and size != sizes[0]:
                continue  # BPE's rate is measured once; memory is measured with SentencePiece
            store = scratch / f"store-{size}-{kind}"
            seconds, peak = peak_tree_rss(prepare_command(corpus, tokenizer, store, args.workers))
            manifest = json.loads((store / "manifest.json").read_text())
            windows_per_s, reader_rss, reader_anon = read_store(store)
            rows.append({"tokens": manifest["tokens"], "tokenizer": kind, "workers": args.workers,
                         "prepare_s": seconds, "prepare_peak_rss": peak,
                         "tokens_per_s_per_worker": encode_rate(tokenizer, corpus),
                         "source_read_tokens_per_s": read_rate(corpus, manifest["tokens"]),
                         "reader_peak_rss": reader_rss, "reader_anon_rss": reader_anon,
                         "windows_per_s": windows_per_s})
            print(json.dumps(rows[-1]), flush=True)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def print_table(rows: list[dict]) -> None:
    smallest = min(r["prepare_peak_rss"] for r in rows if r["tokenizer"] == "sentencepiece")
    print(f"\nprepare and read, {rows[0]['workers']} workers; windows of {SEQ_LEN + 1} tokens; "
          f"a 140M model on a v5p-8 consumes {CONSUMED_WINDOWS_PER_S:,.0f} windows/s "
          f"(6ND, {V5P8_CHIPS} x {V5P_CHIP_FLOPS / 1e12:.0f} TFLOP/s at {ASSUMED_MFU:.0%} MFU)\n")
    print("| tokens | tokenizer | prepare s | prepare peak RSS | × smallest | tokens/s/worker |"
          " reader peak RSS (anon) | windows/s | × v5p-8 need |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens'] / 1e6:,.1f}M | {r['tokenizer']} | {r['prepare_s']:,.1f} | "
              f"{r['prepare_peak_rss'] / 2**20:,.0f} MiB | "
              f"{r['prepare_peak_rss'] / smallest:.2f} | {r['tokens_per_s_per_worker']:,.0f} | "
              f"{r['reader_peak_rss'] / 2**20:,.0f} MiB ({r['reader_anon_rss'] / 2**20:,.0f}) | "
              f"{r['windows_per_s']:,.0f} | "
              f"{r['windows_per_s'] / CONSUMED_WINDOWS_PER_S:,.1f} |")
    print(f"\nextrapolated prepare time on a {BIG_HOST_CORES}-core host: {BIG_HOST_CORES} "
          "workers at the measured one-thread rate, capped by the rate at which the one "
          "reading process reads, hashes and hands out the source:")
    for kind in ("sentencepiece", "bpe"):
        r = [row for row in rows if row["tokenizer"] == kind][-1]
        workers = r["tokens_per_s_per_worker"] * BIG_HOST_CORES
        rate = min(workers, r["source_read_tokens_per_s"])
        bound = "workers" if workers <= r["source_read_tokens_per_s"] else "the reading process"
        print(f"  {kind}: 100M tokens {1e8 / rate / 60:,.1f} min, 40B tokens "
              f"{4e10 / rate / 3600:,.1f} h ({rate / 1e6:,.2f}M tokens/s, bound by {bound}; "
              f"workers {workers / 1e6:,.2f}M, reader {r['source_read_tokens_per_s'] / 1e6:,.2f}M)")


if __name__ == "__main__":
    main()
