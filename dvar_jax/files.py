"""Writing files so that a kill at any moment leaves the old file or the new one, never half.

The one helper for it: run folders (config.json, summary.json, metrics.jsonl when truncated on
resume), the demo report, the token and tokenizer caches all write through `write_atomically`.
On gs:// one upload is already all-or-nothing (an object appears whole or not at all).
"""

import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomically(path: "str | os.PathLike",
                     content: str | bytes | Callable[[BinaryIO], None]) -> None:
    """Writes `content` (text as UTF-8, bytes, or a function that writes to a binary file) to a
    temporary file beside `path`, then renames it into place (creating the folder).

    The rename is atomic on one filesystem, so a concurrent reader sees either the old file (or
    none) or the whole new one. If writing fails, the temporary file is removed and `path` is
    as it was. A gs:// path is written with one upload, which GCS makes atomic the same way.
    """
    if isinstance(content, str):
        content = content.encode()
    write = content if callable(content) else (lambda f: f.write(content))
    if os.fspath(path).startswith("gs://"):
        from dvar_jax.storage import path as storage_path

        buffer = io.BytesIO()
        write(buffer)
        storage_path(path).write_bytes(buffer.getvalue())
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
