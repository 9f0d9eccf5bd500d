"""A real ``bentoml serve`` on a free 127.0.0.1 port, shared by every test that talks HTTP."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from loadtests.servers import stop_server

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class LiveServer:
    """A running ``bentoml serve``: its base URL and the arbiter process (leader of its process group)."""

    base: str
    proc: subprocess.Popen

    def workers(self) -> list[psutil.Process]:
        """The BentoML 1.4 worker processes: children of the arbiter running ``_bentoml_impl.worker.service``.

        They are not in the arbiter's process group (circus starts each in a session of its own), so
        they are found through the process tree, not with ``killpg`` (the same workers outliving a
        killed server: https://github.com/bentoml/OpenLLM/issues/354). ``loadtests/servers.py`` says
        when this can go.
        """
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        found = []
        for child in children:
            try:
                if "_bentoml_impl.worker.service" in " ".join(child.cmdline()):
                    found.append(child)
            except psutil.NoSuchProcess:
                continue
        return found


@contextlib.contextmanager
def serve(service: str, log_path: Path, ready_path: str = "/readyz", **env: str) -> Iterator[str]:
    """Run ``bentoml serve`` on a free 127.0.0.1 port until ``ready_path`` answers 200; stop it on exit."""
    with serve_process(service, log_path, ready_path, **env) as server:
        yield server.base


@contextlib.contextmanager
def serve_process(service: str, log_path: Path, ready_path: str = "/readyz", **env: str) -> Iterator[LiveServer]:
    """:func:`serve`, yielding the process too, for tests that signal or inspect the server's processes."""
    port = _free_port()
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", f"serving.service:{service}", "--host", "127.0.0.1",
             "--port", str(port)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            # DLBOOK_MAX_QUEUE_MS=0 unless a test asks otherwise: shedding by event-loop lateness follows
            # the machine's load (a busy CI box turned expected 422s into 503s), not the code under test.
            env={**os.environ, "DLBOOK_DEVICE": "cpu", "DLBOOK_MAX_QUEUE_MS": "0", **env}, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        server = LiveServer(base, proc)
        try:
            # Polled until ready or the server ends: no deadline (how fast it starts is the machine's speed);
            # pytest-timeout (pyproject.toml) stops a server that never answers.
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"{service} ended before it was ready: {log.read()[-3000:]}")
                try:
                    if httpx.get(f"{base}{ready_path}", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            yield server
        finally:
            workers = server.workers()
            stop_server(proc, 20)  # a test may have ended the server already
            # Workers live in sessions of their own: one the arbiter could not stop must not outlive the test.
            for worker in workers + server.workers():
                with contextlib.suppress(psutil.NoSuchProcess):
                    worker.kill()
