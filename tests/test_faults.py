"""A worker killed under load: BentoML's arbiter restarts it, and clients see a bounded, short outage.

``bentoml serve`` runs a circus arbiter that owns the listening socket and one worker process per
worker slot (``_bentoml_impl.worker.service``). When the worker dies, the arbiter starts a new one
on the same socket; connections that arrive meanwhile wait in the socket's backlog and are answered
by the new worker. So the only requests lost should be those in flight in the killed process.

Inside a container image it is different: ``bentoml containerize`` sets ``BENTOML_CONTAINERIZED``,
and BentoML 1.4 then creates its watchers with ``respawn=False`` (``bentoml.serving.create_watcher``:
``respawn=not running_inside_container()``), leaving restarts to the orchestrator. The last test
pins what the Kubernetes manifests rely on: the arbiter then exits non-zero, so the kubelet restarts
the container, instead of idling with a socket that no worker serves.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from live_server import LiveServer, serve_process

from training.datasets.house import load_house_train, read_house_csv
from training.datasets.sources import find_dataset

LOAD_THREADS = 4
# Requests the load completes before the kill and after the recovery: counted, not timed. A worker that never
# comes back is stopped by pytest-timeout (pyproject.toml), not by a deadline here; how long a restart takes
# is printed, never asserted.
SETTLED_REQUESTS = 20
REQUEST_TIMEOUT_S = 90.0  # longer than a restart: requests queued in the backlog must not time out


@pytest.fixture(scope="module")
def server(exported: dict[str, dict], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with serve_process("DlbookService", tmp_path_factory.mktemp("faults") / "server.log") as live:
        yield live


@pytest.fixture(scope="module")
def records() -> list[dict]:
    folder = find_dataset("house-prices")
    numeric = load_house_train(folder).numeric_columns
    if (folder / "test.csv").is_file():
        table = read_house_csv(folder / "test.csv", numeric_columns=numeric)
    else:
        table = load_house_train(folder)
    return table.records[:50]


@dataclass(frozen=True)
class Outcome:
    started: float
    ended: float
    ok: bool
    detail: str


class Load:
    """Threads posting /predict_price and /classify_pixels back to back until stopped, recording each outcome."""

    def __init__(self, base: str, records: list[dict]) -> None:
        self.base, self.records = base, records
        self.outcomes: list[Outcome] = []
        self.stop = threading.Event()
        self.lock = threading.Condition()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(LOAD_THREADS)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(REQUEST_TIMEOUT_S + 5)

    def run(self, index: int) -> None:
        pixels = [[(x * y + index) % 256 for x in range(28)] for y in range(28)]
        with httpx.Client(base_url=self.base, timeout=REQUEST_TIMEOUT_S) as client:
            i = 0
            while not self.stop.is_set():
                i += 1
                started = time.monotonic()
                try:
                    if i % 2:
                        record = self.records[(index * 7 + i) % len(self.records)]
                        response = client.post("/predict_price", json={"records": [record]})
                    else:
                        response = client.post("/classify_pixels", json={"images": [pixels]})
                    ok, detail = response.status_code == 200, f"{response.status_code} {response.text[:120]}"
                except httpx.HTTPError as err:
                    ok, detail = False, f"{type(err).__name__}: {err}"
                with self.lock:
                    self.outcomes.append(Outcome(started, time.monotonic(), ok, detail))
                    self.lock.notify_all()
                if not ok:
                    time.sleep(0.1)  # a client backs off a little after an error instead of spinning

    def wait_for(self, count: int, since: float) -> list[Outcome]:
        """Block until ``count`` requests started at ``since`` or later have ended; those requests."""
        with self.lock:
            self.lock.wait_for(lambda: sum(o.started >= since for o in self.outcomes) >= count)
            return [o for o in self.outcomes if o.started >= since]

    def between(self, start: float, end: float) -> list[Outcome]:
        with self.lock:
            return [o for o in self.outcomes if start <= o.started < end]

    def in_flight(self, start: float, end: float) -> list[Outcome]:
        """Requests that were running at some moment between ``start`` and ``end`` (ended after one, began
        before the other): those an outage over that span could touch, however long each took."""
        with self.lock:
            return [o for o in self.outcomes if o.ended >= start and o.started <= end]


def wait_ready(base: str) -> float:
    """Poll /readyz until it answers 200; the time it did. Requests wait in the backlog during a restart."""
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=REQUEST_TIMEOUT_S).status_code == 200:
                return time.monotonic()
        except httpx.HTTPError:
            pass
        time.sleep(0.1)  # a poll's pace, not a deadline


def test_killed_worker_is_restarted_and_few_requests_fail(server: LiveServer, records: list[dict]) -> None:
    (worker,) = server.workers()
    probe = {"records": records[:3]}
    before = httpx.post(f"{server.base}/predict_price", json=probe, timeout=30).json()["prices"]

    with Load(server.base, records) as load:
        warm = load.wait_for(SETTLED_REQUESTS, since=0)
        assert warm and all(o.ok for o in warm), [o.detail for o in warm if not o.ok][:3]

        killed_at = time.monotonic()
        worker.send_signal(signal.SIGKILL)
        ready_at = wait_ready(server.base)
        recovery_s = ready_at - killed_at
        load.wait_for(SETTLED_REQUESTS, since=ready_at)  # load goes on after recovery
        after_at = time.monotonic()
    outcomes = load.between(0, after_at)

    (restarted,) = server.workers()
    assert restarted.pid != worker.pid and not worker.is_running()
    failed = [o for o in outcomes if not o.ok]
    during = load.in_flight(killed_at, ready_at)
    after = [o for o in outcomes if o.started >= ready_at]
    print(f"\nworker {worker.pid} killed; {restarted.pid} ready after {recovery_s:.2f} s; "
          f"{len(failed)} of {len(during)} requests started during the outage failed "
          f"({len(outcomes)} requests in all): {sorted({o.detail[:60] for o in failed})}")

    # No bound on recovery_s here: how fast a worker comes back is the machine's speed (this test prints it);
    # pytest-timeout only stops a hang from blocking the suite.
    # Only requests in flight in the killed worker may fail (at most one per thread); the rest wait in
    # the listening socket's backlog for the new worker.
    assert len(failed) <= LOAD_THREADS, [o.detail for o in failed]
    assert all(o.ended >= killed_at and o.started <= ready_at for o in failed), "failures outside the outage"
    assert after and all(o.ok for o in after), [o.detail for o in after if not o.ok][:3]
    again = httpx.post(f"{server.base}/predict_price", json=probe, timeout=30).json()["prices"]
    assert again == before  # the new worker loaded the same model


def test_arbiter_keeps_a_worker_after_repeated_kills(server: LiveServer) -> None:
    """Two kills in a row (a crash loop's start): each time a new worker answers."""
    for _ in range(2):
        (worker,) = server.workers()
        worker.send_signal(signal.SIGKILL)
        wait_ready(server.base)
        (restarted,) = server.workers()
        assert restarted.pid != worker.pid
    assert httpx.get(f"{server.base}/livez", timeout=10).status_code == 200



def _poem_decoders(server: LiveServer) -> list:
    """The worker's poem decoding processes (``python -m serving.poem_decoder``)."""
    found = []
    for worker in server.workers():
        for child in worker.children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if "serving.poem_decoder" in " ".join(child.cmdline()):
                    found.append(child)
    return found


def test_a_killed_poem_decoder_is_replaced_and_the_worker_keeps_serving(server: LiveServer) -> None:
    """SIGKILL the worker's poem decoding process: the worker stays up (same pid), the next poem is
    written whole by a new decoding process, and poems keep their seeds' text."""
    body = {"chars_per_clause": 5, "lines": 4, "seed": 5}
    before = httpx.post(f"{server.base}/generate_poem", json=body, timeout=REQUEST_TIMEOUT_S)
    assert before.status_code == 200, before.text
    workers = {w.pid for w in server.workers()}
    decoders = _poem_decoders(server)  # one per poem model the worker serves
    assert decoders
    for decoder in decoders:
        decoder.send_signal(signal.SIGKILL)
        decoder.wait()
    after = httpx.post(f"{server.base}/generate_poem", json=body, timeout=REQUEST_TIMEOUT_S)
    assert after.status_code == 200, after.text
    assert after.json()["poems"] == before.json()["poems"]
    assert {w.pid for w in server.workers()} == workers
    replaced = {p.pid for p in _poem_decoders(server)}
    assert replaced and not replaced & {d.pid for d in decoders}


def test_in_a_container_a_killed_worker_ends_the_server(exported: dict[str, dict], tmp_path: Path) -> None:
    env = {"BENTOML_CONTAINERIZED": "true", "DLBOOK_PRICE_MODELS": "house-price"}
    with serve_process("PriceService", tmp_path / "server.log", **env) as live:
        (worker,) = live.workers()
        killed_at = time.monotonic()
        worker.send_signal(signal.SIGKILL)
        # An arbiter that outlived its only worker would leave a pod unserved until its liveness probe
        # fails; here pytest-timeout would stop the wait (pyproject.toml), with nothing timed in the test.
        code = live.proc.wait()
        print(f"\ncontainerized arbiter exited with {code} {time.monotonic() - killed_at:.1f} s after the kill")
    assert code != 0  # a crash, not a clean stop: restartPolicy OnFailure restarts it too
