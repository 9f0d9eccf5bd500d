"""Start and stop the servers the HTTP benchmarks compare, each as its own process group on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_PIDS: dict[str, int] = {}  # base URL → process group leader of the server behind it


def stop_server(proc: subprocess.Popen, grace_s: float = 30, stragglers: Iterable = ()) -> None:
    """Stop a server started with ``start_new_session=True``: SIGTERM to its process group, SIGKILL after
    ``grace_s``, then kill ``stragglers`` (``psutil.Process``es: BentoML's workers run in sessions of their
    own, out of the group signal's reach; seen with BentoML 1.4.39, and reported for BentoML's circus
    workers outliving a killed server at https://github.com/bentoml/OpenLLM/issues/354). The stragglers
    can go when ``bentoml serve``'s workers stay in its process group. The one way every harness here
    stops its servers."""
    import psutil

    with contextlib.suppress(ProcessLookupError):  # the server may have ended already
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    for straggler in stragglers:
        with contextlib.suppress(psutil.NoSuchProcess):
            straggler.kill()


def cpu_seconds(base: str) -> float:
    """User + system CPU seconds used so far by the server at ``base`` and all its children.

    CPU time per request is the steadiest figure on a shared machine: other jobs stretch wall-clock
    latency and throughput, but barely change how much CPU one request costs the server.
    """
    import psutil

    root = psutil.Process(_PIDS[base])
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as answer:
            if answer.status == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def running(cmd: list[str], ready_path: str, port: int, log: Path, env: dict[str, str] | None = None
            ) -> Iterator[str]:
    """Run ``cmd`` until ``ready_path`` answers 200; yield the base URL; stop the whole group on exit."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    _PIDS[base] = proc.pid
    children: list = []
    try:
        wait_ready(base + ready_path, proc, log)
        yield base
    finally:
        import psutil

        _PIDS.pop(base, None)
        with contextlib.suppress(psutil.NoSuchProcess):
            children = psutil.Process(proc.pid).children(recursive=True)
        stop_server(proc, 20, children)


def bentoml_service(service: str, log: Path, env: dict[str, str] | None = None):
    """Our service with ``bentoml serve`` (its defaults unless ``env`` says otherwise)."""
    port = free_port()
    cmd = [sys.executable, "-m", "bentoml", "serve", f"serving.service:{service}", "--host", "127.0.0.1",
           "--port", str(port)]
    return running(cmd, "/readyz", port, log, {"DLBOOK_DEVICE": "cpu", **(env or {})})


def bare_service(model: str, log: Path, threads: int = 0):
    """The bare Starlette + ORT baseline of :mod:`loadtests.bare_server`."""
    port = free_port()
    cmd = [sys.executable, str(REPO / "loadtests" / "bare_server.py"), "--model", model, "--port", str(port),
           "--threads", str(threads)]
    return running(cmd, "/livez", port, log)
