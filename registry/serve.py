"""Start a real `mlflow models serve` on loopback and wait until it answers: for tests and benchmarks.

    with serving("models:/cifar10@champion") as url:
        urllib.request.urlopen(f"{url}/invocations", ...)

`--env-manager local` (this interpreter's packages) by default; `env_manager=None` leaves MLflow's
default, virtualenv: it builds the model's environment (pyenv's Python, `python -m venv`, pip
install of the model's requirements.txt) under MLFLOW_ENV_ROOT (~/.mlflow/envs) on the first start
and reuses it after (measured in BENCHMARKS.md, "Serving with MLflow's default environment manager").

One uvicorn worker by default: with more, uvicorn's workers inherit a listening socket on which
asyncio never sets TCP_NODELAY, so every response waits ~40 ms for a delayed ACK (measured in
BENCHMARKS.md, "Serving").
"""

from __future__ import annotations

import contextlib
import http.client
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments.network import free_port


class ServerError(RuntimeError):
    """The server exited or never answered /ping; the message ends with its log."""


def virtualenv_missing(python_version: str | None = None) -> str | None:
    """Why MLflow's virtualenv environment manager cannot build a model's environment here, or None.

    It takes the model's Python (python_env.yaml: the logging interpreter's version, by default this
    one's) from pyenv, which would download and compile a version it lacks.
    """
    version = python_version or platform.python_version()
    pyenv = shutil.which("pyenv")
    if pyenv is None:
        return "no pyenv on PATH: MLflow's default env manager (virtualenv) takes the model's Python from pyenv"
    try:
        root = subprocess.run([pyenv, "root"], capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`pyenv root` failed: {exc}"
    if not (Path(root) / "versions" / version / "bin" / "python").exists():
        return f"pyenv has no Python {version} (`pyenv install {version}` would download and build it)"
    return None


def server_environment(port: int) -> Path | None:
    """The Python environment (the folder holding bin/python) of the uvicorn serving `port`, from /proc.

    With the virtualenv env manager it must be the model's built environment: where that lacks uvicorn,
    `exec uvicorn` would quietly find the caller's on PATH instead.
    """
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = [arg.decode(errors="replace") for arg in (proc / "cmdline").read_bytes().split(b"\0") if arg]
        except OSError:  # gone, or not ours to read
            continue
        ports = [value for flag, value in zip(args, args[1:]) if flag == "--port"]
        if len(args) > 1 and Path(args[1]).name == "uvicorn" and ports == [str(port)]:  # python .../bin/uvicorn
            return Path(args[0]).parent.parent
    return None


def answers(port: int, path: str) -> bool:
    """True once GET `path` on the loopback `port` answers 200."""
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        connection.request("GET", path)
        return connection.getresponse().status == 200
    except OSError:
        return False


@contextlib.contextmanager
def serving(model_uri: str, workers: int = 1, timeout: float = 300, env_manager: str | None = "local", **env: str):
    """Serve `model_uri` on a free loopback port; yield its base URL; stop the server (and its workers).

    `env_manager` None: no `--env-manager`, the plain command (the first start builds an environment).
    """
    port = free_port()
    environment = {
        **os.environ,
        # This interpreter's bin first: `mlflow models serve` runs `uvicorn` from PATH.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_MODELS_WORKERS": str(workers),
        **env,
    }
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
               *(["--env-manager", env_manager] if env_manager else []), "-h", "127.0.0.1", "-p", str(port)]
    with supervised(command, environment, lambda: answers(port, "/ping"), timeout, model_uri):
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def supervised(command: list[str], env: dict, ready, timeout: float, what: str):
    """Run a server `command` in its own process group until `ready()`; stop the group on leaving.

    ServerError, ending with the server's log, if it exits or is not ready within `timeout` seconds.
    """
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while not ready():
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise ServerError(f"{what} did not serve:\n{log.read().decode(errors='replace')[-3000:]}")
                time.sleep(0.5)
            yield
        finally:
            with contextlib.suppress(ProcessLookupError):  # already gone
                os.killpg(server.pid, signal.SIGTERM)
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
            server.wait()
