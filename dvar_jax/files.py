"""Writing files so that a kill at any moment leaves the old file or the new one, never half.

The one helper for it: run folders (config.json, summary.json, metrics.jsonl when truncated on
resume), the demo report, the token and tokenizer caches all write through `write_atomically`.
"""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomically(path: Path, content: str | bytes | Callable[[BinaryIO], None]) -> None:
    """Writes `content` (text as UTF-8, bytes, or a function that writes to a binary file) to a
    temporary file beside `path`, then renames it into place (creating the folder).

    The rename is atomic on one filesystem, so a concurrent reader sees either the old file (or
    none) or the whole new one. If writing fails, the temporary file is removed and `path` is
    as it was.
    """
    path = Path(path)
    if isinstance(content, str):
        content = content.encode()
    write = content if callable(content) else (lambda f: f.write(content))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
