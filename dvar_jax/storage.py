"""Where run folders live: a local path, or gs://BUCKET/PREFIX on Google Cloud Storage.

`path(text)` is the one constructor: a `pathlib.Path` for a local folder, an `etils.epath.Path`
for gs:// (both with `/`, `.name`, `.parent`, `read_text`, `exists`, `iterdir`, ...), so every
caller of `dvar_jax.run_dir` handles both alike.

gs:// goes through gcsfs (fsspec), never through TensorFlow's tf.io.gfile: etils would pick
gfile whenever TensorFlow is installed (it is, for seqio), and gfile neither honours a local
emulator nor exposes GCS's generation preconditions. Importing `dvar_jax` sets
EPATH_USE_TF=false for that (a default: a value the user set wins). Orbax writes checkpoint
metadata through epath (so gcsfs too) and the arrays through TensorStore's own GCS driver.

GCS has no rename, no append and no flock. What needs them uses objects and generation
preconditions instead (`create_object`, `replace_object`, `read_object`): a write that says
"only if the object is still at generation G" (0: "only if there is none") fails with
`PreconditionFailedError` when another writer got there first, so read-modify-write loops and
leases are race-free. Credentials: gcsfs and TensorStore find them themselves (on a TPU VM its
service account). Tests point both at an emulator on 127.0.0.1 (STORAGE_EMULATOR_HOST,
TENSORSTORE_GCS_HTTP_URL; tests/gcs_emulator.py).
"""

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from etils import epath

GCS_PREFIX = "gs://"


class PreconditionFailedError(Exception):
    """A conditional GCS write or delete found the object at another generation."""


def is_gcs(where: str | os.PathLike) -> bool:
    """True for a gs:// location (an epath.Path of one included)."""
    return os.fspath(where).startswith(GCS_PREFIX)


def path(where: str | os.PathLike) -> Path | epath.Path:
    """The folder or file `where` names: an epath.Path for gs://, else a pathlib.Path (with ~
    expanded)."""
    if is_gcs(where):
        return epath.Path(os.fspath(where))
    return Path(where).expanduser()


def bucket_and_key(where: str | os.PathLike) -> tuple[str, str]:
    """("BUCKET", "KEY/INSIDE") of gs://BUCKET/KEY/INSIDE."""
    rest = os.fspath(where).removeprefix(GCS_PREFIX)
    bucket, _, key = rest.partition("/")
    return bucket, key


def filesystem():
    """The gcsfs filesystem etils uses (one per process, cached by fsspec)."""
    import fsspec

    return fsspec.filesystem("gcs")


def _no_listings_cache() -> None:
    """What FSSPEC_GCS_USE_LISTINGS_CACHE=false (set by importing dvar_jax) does, for a process
    that imported fsspec before dvar_jax: folder listings always come from GCS."""
    import fsspec.config

    fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


_no_listings_cache()


def _object_url(bucket: str, key: str) -> str:
    return f"{filesystem()._location}/storage/v1/b/{quote(bucket, safe='')}/o/{quote(key, safe='')}"


def read_object(where: str | os.PathLike) -> tuple[bytes, int] | None:
    """(content, generation) of a GCS object, or None when there is none. The content is of
    that generation exactly (read with ifGenerationMatch), so a caller's conditional write
    based on it cannot miss a write in between."""
    fs = filesystem()
    bucket, key = bucket_and_key(where)
    try:
        info = fs.call("GET", _object_url(bucket, key), json_out=True)
    except FileNotFoundError:
        return None
    generation = int(info["generation"])
    try:
        data = fs.call("GET", _object_url(bucket, key), alt="media",
                       ifGenerationMatch=str(generation))
    except FileNotFoundError:
        return None  # deleted in between
    except FileExistsError:  # rewritten in between: read again
        return read_object(where)
    _, content = data
    return bytes(content), generation


def _upload(where: str | os.PathLike, data: bytes, if_generation: int) -> int:
    """A multipart upload with ifGenerationMatch; the new generation. PreconditionFailedError when
    the object is not at `if_generation` (0: when it exists)."""
    fs = filesystem()
    bucket, key = bucket_and_key(where)
    boundary = "dvar-object-boundary"
    body = (f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
            f"{json.dumps({'name': key})}\r\n--{boundary}\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() \
        + data + f"\r\n--{boundary}--\r\n".encode()
    try:
        out = fs.call("POST", f"{fs._location}/upload/storage/v1/b/{quote(bucket, safe='')}/o",
                      uploadType="multipart", data=body, json_out=True,
                      headers={"Content-Type": f'multipart/related; boundary="{boundary}"'},
                      ifGenerationMatch=str(if_generation))
    except FileExistsError:  # gcsfs's reading of HTTP 412
        raise PreconditionFailedError(f"{where}: not at generation {if_generation}") from None
    # The listing cache would otherwise hide a new object from exists() in this process.
    fs.invalidate_cache(f"{bucket}/{key}")
    return int(out["generation"])


def create_object(where: str | os.PathLike, data: bytes) -> int:
    """Writes a new object; PreconditionFailedError if one exists. Its generation."""
    return _upload(where, data, 0)


def replace_object(where: str | os.PathLike, data: bytes, generation: int) -> int:
    """Overwrites the object if it is still at `generation`, else PreconditionFailedError. The new
    generation."""
    return _upload(where, data, generation)


def delete_object(where: str | os.PathLike, generation: int | None = None) -> bool:
    """Deletes the object (only at `generation`, when given); False if it was not there or had
    moved on (another writer's now)."""
    fs = filesystem()
    bucket, key = bucket_and_key(where)
    extra: dict[str, Any] = {} if generation is None else {"ifGenerationMatch": str(generation)}
    try:
        fs.call("DELETE", _object_url(bucket, key), **extra)
    except (FileNotFoundError, FileExistsError):
        return False
    finally:
        fs.invalidate_cache(f"{bucket}/{key}")
    return True


def is_object(where: str | os.PathLike) -> bool:
    """True when an object is stored under exactly this name. One metadata read: epath's
    `is_file()` is `exists() and not is_dir()`, two reads, and a folder whose only object
    vanishes between them (another host's write probe) looks like a file."""
    fs = filesystem()
    bucket, key = bucket_and_key(where)
    try:
        fs.call("GET", _object_url(bucket, key), json_out=True)
    except FileNotFoundError:
        return False
    return True


def check_bucket(where: str | os.PathLike) -> None:
    """ValueError naming the bucket of a gs:// location when it does not exist or cannot be
    seen with this process's credentials."""
    fs = filesystem()
    bucket, _ = bucket_and_key(where)
    try:
        fs.call("GET", f"{fs._location}/storage/v1/b/{quote(bucket, safe='')}", json_out=True)
    except FileNotFoundError:
        raise ValueError(f"{os.fspath(where)!r}: bucket gs://{bucket} does not exist; create it "
                         f"(gcloud storage buckets create gs://{bucket}) or give another "
                         "bucket") from None
    except OSError as e:  # gcsfs reports HTTP 403 as OSError("Forbidden: ...")
        raise ValueError(f"{os.fspath(where)!r}: no access to bucket gs://{bucket} with these "
                         f"credentials ({str(e).splitlines()[0]}); grant this account "
                         "roles/storage.objectUser on it, or give another bucket") from None
