"""Start the peer servers (Triton via PyTriton, TorchServe) with :func:`loadtests.servers.running`.

Each runs from its own virtualenv (:mod:`loadtests.peers.venvs`) as its own process group bound to
127.0.0.1, so leaving the ``with`` block (normally or by an exception) kills the whole group:
tritonserver and its Python-backend stub, or TorchServe's JVM and its Python worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from loadtests.peers.venvs import PeerEnv, clean_env
from loadtests.servers import _PIDS, free_port, running

PEERS = Path(__file__).resolve().parent


def _free_ports(count: int) -> int:
    """A first port whose next ``count - 1`` neighbours are free too (Triton and TorchServe take 3)."""
    for _ in range(50):
        first = free_port()
        if first + count < 65536 and all(_port_free(first + i) for i in range(1, count)):
            return first
    raise RuntimeError(f"no {count} consecutive free ports on 127.0.0.1")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def triton_service(env: PeerEnv, model_dir: Path, name: str, workspace: Path, log: Path, *, threads: int,
                   max_batch: int, max_queue_delay_us: int, instances: int = 1) -> AbstractContextManager[str]:
    """Triton (PyTriton) serving ``model_dir``'s ONNX graph as ``name``; yields the base URL.

    ``workspace`` (must not exist yet) takes PyTriton's copy of tritonserver, its model store and
    sockets, so a killed run leaves them in the benchmark's temporary folder, not in ~/.cache.
    """
    port = _free_ports(3)
    cmd = [str(env.python), str(PEERS / "triton_server.py"), "--model-dir", str(model_dir), "--name", name,
           "--port", str(port), "--threads", str(threads), "--max-batch", str(max_batch),
           "--max-queue-delay-us", str(max_queue_delay_us), "--workspace", str(workspace),
           "--instances", str(instances)]
    return running(cmd, f"/v2/models/{name}/ready", port, log, _peer_env(env))


def archive_torchserve_model(env: PeerEnv, model_dir: Path, name: str, workdir: Path, threads: int) -> Path:
    """Pack model.ts, meta.json and the handler into ``<workdir>/model-store/<name>.mar``; return the store."""
    store = workdir / "model-store"
    store.mkdir(parents=True, exist_ok=True)
    peer_json = workdir / "peer.json"
    peer_json.write_text(json.dumps({"threads": threads}))
    meta = workdir / "meta.json"
    shutil.copy(model_dir / "meta.json", meta)
    subprocess.run([str(env.bin("torch-model-archiver")), "--model-name", name, "--version", "1.0",
                    "--serialized-file", str(model_dir / "model.ts"),
                    "--handler", str(PEERS / "torchserve_handler.py"),
                    "--extra-files", f"{meta},{peer_json}", "--export-path", str(store), "--force"],
                   check=True, capture_output=True, text=True, env=_peer_env(env))
    return store


def torchserve_service(env: PeerEnv, model_dir: Path, name: str, workdir: Path, log: Path, *, threads: int,
                       batch_size: int, max_batch_delay_ms: int, workers: int = 1) -> AbstractContextManager[str]:
    """TorchServe with ``workers`` workers for ``name`` (TorchScript, our handler); yields the base URL.

    Everything TorchServe writes (logs, metrics, its pid file, the JVM's temp files) goes under
    ``workdir``, which is also its working directory: nothing lands in the repository.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    store = archive_torchserve_model(env, model_dir, name, workdir, threads)
    port = _free_ports(3)
    models = {name: {"1.0": {"defaultVersion": True, "marName": f"{name}.mar", "minWorkers": workers,
                             "maxWorkers": workers, "batchSize": batch_size, "maxBatchDelay": max_batch_delay_ms,
                             "responseTimeout": 120}}}
    config = workdir / "config.properties"
    config.write_text("\n".join([
        f"inference_address=http://127.0.0.1:{port}",
        f"management_address=http://127.0.0.1:{port + 1}",
        f"metrics_address=http://127.0.0.1:{port + 2}",
        f"model_store={store}",
        f"load_models={name}.mar",
        f"models={json.dumps(models)}",
        f"default_workers_per_model={workers}",
        "disable_token_authorization=true",
        "install_py_dep_per_model=false",
        # TorchServe otherwise runs a Python metrics collector every minute, CPU the other servers'
        # cells would pay for; no other server here collects host metrics either.
        "disable_system_metrics=true",
        "",
    ]))
    tmp = workdir / "tmp"
    tmp.mkdir(exist_ok=True)
    cmd = ["env", "-C", str(workdir), str(env.bin("torchserve")), "--start", "--foreground", "--ncs",
           "--disable-token-auth", "--model-store", str(store), "--ts-config", str(config)]
    extra = {"LOG_LOCATION": str(workdir / "logs"), "METRICS_LOCATION": str(workdir / "logs"), "TEMP": str(tmp),
             "TMPDIR": str(tmp)}
    return _torchserve_running(cmd, name, port, log, {**_peer_env(env), **extra})


@contextlib.contextmanager
def _torchserve_running(cmd: list[str], name: str, port: int, log: Path, env: dict[str, str]) -> Iterator[str]:
    """``running`` until /ping answers, then until the management API lists a READY worker for ``name``.

    /ping turns healthy before the worker has loaded the model; the first requests would then wait
    for the worker (or fail), which is not what the benchmark means to measure.
    """
    with running(cmd, "/ping", port, log, env) as base:
        url = f"http://127.0.0.1:{port + 1}/models/{name}"
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(url, timeout=2) as answer:
                workers = json.loads(answer.read())[0].get("workers", [])
                if any(w.get("status") == "READY" for w in workers):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"TorchServe has no READY worker for {name} after 180 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base


def _peer_env(env: PeerEnv) -> dict[str, str]:
    """A clean environment with the peer's venv first on PATH (TorchServe finds java and its CLI there)."""
    base = clean_env()
    base["PATH"] = f"{env.path / 'bin'}:{base.get('PATH', '')}"
    base["VIRTUAL_ENV"] = str(env.path)
    return base


@contextlib.contextmanager
def whole_group(server: AbstractContextManager[str], grace_s: float = 10.0) -> Iterator[str]:
    """``server``, and after it stops, every process left in its group is killed too.

    :func:`loadtests.servers.running` waits only for the group leader; TorchServe's JVM and
    Triton's tritonserver are its children and can outlive it by seconds (or hang). This waits
    ``grace_s`` for them to go, then SIGKILLs the group, so no server survives the benchmark.
    """
    pgid = None
    try:
        with server as base:
            pgid = _PIDS.get(base)
            yield base
    finally:
        if pgid is not None:
            _reap_group(pgid, grace_s)


def _group_alive(pgid: int) -> bool:
    import psutil

    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
    return False


def _reap_group(pgid: int, grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            return
        time.sleep(0.2)
