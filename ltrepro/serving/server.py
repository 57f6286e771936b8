"""Start and stop ``mlflow models serve`` for a registered model, as a user would run it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ltrepro.errors import LtreproError


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def is_up(url: str, probe: str = "ping") -> bool:
    """Whether the server at ``url`` answers 200 on ``probe`` (``ping`` for a scoring server,
    ``health`` for a tracking server)."""
    try:
        with urllib.request.urlopen(f"{url}/{probe}", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def running_server(what: str, command: list[str], port: int, log: Path, probe: str, startup_s: float,
                   env: dict[str, str] | None = None) -> Iterator[str]:  # fmt: skip
    """Start ``command`` (``what``, a server on 127.0.0.1:``port``) in a process group of its own,
    output to ``log``; yield its URL once ``probe`` answers, and stop the whole group on exit."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while not is_up(url, probe):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text()[-2000:]
                raise LtreproError(f"{what} did not start (see {log}):\n{tail}")
            time.sleep(0.5)
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@contextmanager
def mlflow_server(
    model_uri: str, tracking_uri: str, log: Path, workers: int = 1, startup_s: float = 180, env: dict[str, str] | None = None
) -> Iterator[str]:
    """``mlflow models serve -m MODEL_URI --env-manager local -h 127.0.0.1 -w WORKERS`` on a free
    port, with ``env`` added to this process's environment; yields its URL and stops the whole
    process group on exit. The scoring server's uvicorn is found on this interpreter's bin
    directory, as in an activated virtual environment."""
    port = free_port()
    env = {**os.environ, **(env or {}), "MLFLOW_TRACKING_URI": tracking_uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port), "-w", str(workers)]  # fmt: skip
    with running_server(f"mlflow models serve {model_uri}", command, port, log, "ping", startup_s, env) as url:
        yield url
