"""Start an SGLang server for a run and stop it, whatever happens in between.

Shared by ``mosaickv accuracy --launch`` and ``examples/agent_workload.py``: the server
runs in its own process group (scheduler and detokenizer included), ``/health`` decides
when it is up, and a server that dies or never comes up raises :class:`ServerError` with
the last lines of its log.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

RESERVED_FLAGS = ("--model-path", "--port")  # the launcher sets these itself
# Servers under test are local or on the cluster: a proxy from the environment would only
# stand between them and the client (or refuse loopback addresses).
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerError(RuntimeError):
    """A launched server that exited or never became healthy (the message has its log tail)."""


def launch_flags(flags: str) -> list[str]:
    """``sglang.launch_server`` flags from one string, refusing those the launcher owns."""
    try:
        words = shlex.split(flags)
    except ValueError as err:
        raise ValueError(f"launch flags {flags!r} cannot be split as a shell would ({err})") from None
    for word in words:
        if word.split("=", 1)[0] in RESERVED_FLAGS:
            raise ValueError(f"launch flags {flags!r} set {word.split('=', 1)[0]}: the launcher sets {' and '.join(RESERVED_FLAGS)} itself")
    return words


def server_command(model_path: str | Path, port: int, flags: str = "", python: str = sys.executable) -> list[str]:
    """``python -m sglang.launch_server --model-path M --port P <flags>``."""
    return [python, "-m", "sglang.launch_server", "--model-path", str(model_path), "--port", str(port), *launch_flags(flags)]


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def healthy(root: str) -> bool:
    """Whether the server at ``root`` answers ``/health`` now."""
    try:
        with NO_PROXY.open(root + "/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stop(process: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after ``grace`` seconds, and
    wait until the group is gone (its workers hold the GPU memory the next server needs)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            break
        process.poll()  # reap the leader, or the group never empties
        time.sleep(0.2)
    process.wait()


@contextmanager
def launched(command: list[str], port: int, log_path: Path, startup_timeout: float = 900.0) -> Iterator[str]:
    """Run ``command`` (a server listening on ``port``) in its own process group, yield its URL
    once ``/health`` answers, and stop the whole group on exit.

    Output goes to ``log_path``; a server that exits or is not healthy in time raises
    :class:`ServerError` with the log's last lines.
    """
    root = f"http://127.0.0.1:{port}"
    if _port_in_use(port):  # another server there would answer our health checks and requests
        raise ServerError(f"port {port} is already in use: stop what listens there or choose another --port")
    log_path = Path(log_path)
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + startup_timeout
            while not healthy(root):
                if process.poll() is not None:
                    raise ServerError(f"{shlex.join(command)} exited with status {process.returncode} before {root}/health answered; last lines of {log_path}:\n{_tail(log_path)}")
                if time.monotonic() > deadline:
                    raise ServerError(f"{shlex.join(command)} was not healthy at {root}/health after {startup_timeout:g} s (--startup-timeout); last lines of {log_path}:\n{_tail(log_path)}")
                time.sleep(1)
            yield root
        finally:
            _stop(process)
