"""Start a real `mlflow models serve` on loopback and wait until it answers: for tests and benchmarks.

    with serving("models:/cifar10@champion") as url:
        urllib.request.urlopen(f"{url}/invocations", ...)

One uvicorn worker by default: with more, uvicorn's workers inherit a listening socket on which
asyncio never sets TCP_NODELAY, so every response waits ~40 ms for a delayed ACK (measured in
BENCHMARKS.md, "Serving").
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments.network import free_port


class ServerError(RuntimeError):
    """The server exited or never answered /ping; the message ends with its log."""


def _answers_ping(port: int) -> bool:
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        connection.request("GET", "/ping")
        return connection.getresponse().status == 200
    except OSError:
        return False


@contextlib.contextmanager
def serving(model_uri: str, workers: int = 1, timeout: float = 300, **env: str):
    """Serve `model_uri` on a free loopback port; yield its base URL; stop the server (and its workers)."""
    port = free_port()
    environment = {
        **os.environ,
        # This interpreter's bin first: `mlflow models serve` runs `uvicorn` from PATH.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_MODELS_WORKERS": str(workers),
        **env,
    }
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port)],
            env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            deadline = time.monotonic() + timeout
            while not _answers_ping(port):
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise ServerError(f"{model_uri} did not serve:\n{log.read().decode(errors='replace')[-3000:]}")
                time.sleep(0.5)
            yield f"http://127.0.0.1:{port}"
        finally:
            with contextlib.suppress(ProcessLookupError):  # already gone
                os.killpg(server.pid, signal.SIGTERM)
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
            server.wait()
