"""A small synthetic corpus: play-like documents over made-up words, deterministic by seed.

For tests, benchmarks and offline smoke runs that need text of the embedded corpus's shape
(speaker lines, indented verse, blank lines, punctuation) without fetching anything.
"""

import random
from pathlib import Path

_SYLLABLES = ("ba", "ro", "mi", "ten", "sha", "lu", "ver", "do", "ke", "ith", "on", "gar", "pe",
              "wil", "st", "or", "an", "the", "qu", "el")


def synthetic_documents(n_docs: int = 40, lines_per_doc: int = 40, seed: int = 0) -> list[str]:
    """`n_docs` documents of `lines_per_doc` lines each (about 2 KB at 40 lines) over a
    400-word vocabulary drawn from `seed`."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3)))
             for _ in range(400)]
    docs = []
    for _ in range(n_docs):
        lines = []
        for _ in range(lines_per_doc):
            kind = rng.random()
            if kind < 0.1:
                lines.append("")
            elif kind < 0.2:
                lines.append(rng.choice(words).upper() + ".")
            else:
                indent = "  " if kind < 0.3 else ""
                text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 10)))
                lines.append(indent + text.capitalize() + rng.choice((",", ".", ";", "!", "?")))
        docs.append("\n".join(lines) + "\n")
    return docs


def write_synthetic_corpus(folder: Path, n_docs: int = 40, lines_per_doc: int = 40,
                           seed: int = 0) -> Path:
    """`synthetic_documents` as folder/docNN.txt (a `data.source=text` corpus); returns folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(synthetic_documents(n_docs, lines_per_doc, seed)):
        (folder / f"doc{i:02d}.txt").write_text(text)
    return folder
