"""Peers: our service against Triton (PyTriton) and TorchServe, same model, same image, same load, same run.

    python loadtests/peers/bench_peers.py --rounds 2 --duration 12 --threads 1 [--env DLBOOK_WORKERS=2]

What runs, side by side on 127.0.0.1 (an idle server costs next to nothing):

* ``ours``: ``bentoml serve serving.service:ImageService`` with only fashion-lenet, ``/classify_pixels``
  taking ``{"images": [28×28 list]}`` (its defaults, plus the thread setting below);
* ``bare``: the Starlette + ORT baseline (:mod:`loadtests.bare_server`), same ``/classify_pixels`` body;
* ``triton``: Triton Inference Server 2.x via PyTriton, the same ONNX graph under ORT in a batched
  Python callable, dynamic batcher on; KServe-v2 JSON ``POST /v2/models/fashion-lenet/infer`` with the
  same image as a ``[1, 28, 28]`` UINT8 tensor;
* ``torchserve``: TorchServe 0.12 with a custom handler running the same network as TorchScript,
  server-side batching on; ``POST /predictions/fashion-lenet`` with ``{"image": 28×28 list}``.

Every server gets the same compute: one model instance / worker process, and ``--threads`` intra-op
threads (ORT ``intra_op_num_threads`` for ours, bare and Triton; ``torch.set_num_threads`` for
TorchServe), default 2 = this machine's cores, which is also what ORT picks by itself here.

Before measuring, each server classifies the same real Fashion-MNIST test images and must agree with
ours (same argmax, probabilities within 1e-4), else the run stops: a benchmark of a wrong answer is
worthless. Then each round measures every (concurrency, server) cell with wrk for ``--duration``
seconds, alternating the server order between rounds so drift on this shared machine hits all alike.
Reported per cell (medians over rounds): requests/s, p50, p99, errors, server CPU ms per request; and
the ratios the issue sets targets for: ours ≥ 3× Triton at c=1 and ≥ 1.2× at c=32, ≥ 1.5× TorchServe
(with its batcher) and ≥ 0.85× the bare endpoint at c=32. The servers start and stop inside an exclusive
lock on ``/tmp/dlbook-bench.lock`` (the lock
``flock(1)`` takes), so this never overlaps another benchmark; it waits for the lock if needed.

The peers' virtualenvs are built on first use under ``loadtests/peers/.venvs/`` (a few minutes, about
1.4 GB; see :mod:`loadtests.peers.venvs`) and reused after. Each invocation writes its record to
``docs/bench/`` (``--record-dir``; see :mod:`loadtests.records`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from loadtests import records  # noqa: E402
from loadtests.loadgen import HttpRequest, LoadResult, run_wrk  # noqa: E402
from loadtests.peers import venvs  # noqa: E402
from loadtests.peers.peer_servers import torchserve_service, triton_service, whole_group  # noqa: E402
from loadtests.servers import bare_service, bentoml_service, cpu_seconds  # noqa: E402

LOCK = records.LOCK
TOLERANCE = 1e-4  # the export's own ORT/TorchScript parity tolerance (meta.json "parity")
SERVERS = ("ours", "bare", "triton", "torchserve")
TARGETS = (  # (peer, concurrency, ours/peer req/s at least): the bars, one worker, one intra-op thread
    ("triton", 1, 3.0), ("triton", 32, 1.2), ("torchserve", 32, 1.5), ("bare", 32, 0.85))


def test_images(count: int) -> np.ndarray:
    """Real Fashion-MNIST test images, uint8 [count, 28, 28]; the first is the one the load sends."""
    from training.datasets.images import load_image_split

    return np.asarray(load_image_split("fashion-mnist", "test").images[:count], np.uint8)


def requests_for(image: np.ndarray, model: str) -> dict[str, HttpRequest]:
    """One image, in the JSON each server takes; the payloads carry the same 784 integers."""
    rows = image.tolist()
    ours = HttpRequest("/classify_pixels", json.dumps({"images": [rows]}).encode(), "application/json")
    triton = {"inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "UINT8", "data": [rows]}]}
    return {"ours": ours, "bare": ours,
            "triton": HttpRequest(f"/v2/models/{model}/infer", json.dumps(triton).encode(), "application/json"),
            "torchserve": HttpRequest(f"/predictions/{model}", json.dumps({"image": rows}).encode(),
                                      "application/json")}


def _post(base: str, request: HttpRequest, body: bytes | None = None) -> dict:
    req = urllib.request.Request(base + request.path, body if body is not None else request.body,
                                 {"Content-Type": request.content_type})
    with urllib.request.urlopen(req, timeout=30) as answer:
        return json.loads(answer.read())


def probabilities(name: str, base: str, image: np.ndarray, model: str) -> dict[int, float]:
    """Class → probability as the server answers for ``image`` (all 10, or the top 3 the bare server gives)."""
    rows = image.tolist()
    if name == "ours":
        body = json.dumps({"images": [rows], "top_k": 10}).encode()
        top = _post(base, requests_for(image, model)["ours"], body)["predictions"][0]["top_k"]
        return {t["class_index"]: t["probability"] for t in top}
    if name == "bare":
        top = _post(base, requests_for(image, model)["bare"])["predictions"][0]["top"]
        return {t["class"]: t["p"] for t in top}
    if name == "triton":
        data = _post(base, requests_for(image, model)["triton"])["outputs"][0]["data"]
        return dict(enumerate(data))
    data = _post(base, requests_for(image, model)["torchserve"])["probabilities"]
    return dict(enumerate(data))


def verify(servers: dict[str, str], images: np.ndarray, model: str) -> dict[str, float]:
    """Every server's answer for every image against ours; raise at the first disagreement.

    Returns the largest probability difference seen per server (reported with the results).
    """
    worst = {name: 0.0 for name in servers if name != "ours"}
    for i, image in enumerate(images):
        reference = probabilities("ours", servers["ours"], image, model)
        best = max(reference, key=reference.get)
        for name, base in servers.items():
            if name == "ours":
                continue
            answer = probabilities(name, base, image, model)
            diff = max(abs(answer[c] - reference[c]) for c in answer)
            worst[name] = max(worst[name], diff)
            if max(answer, key=answer.get) != best or diff > TOLERANCE:
                raise RuntimeError(f"{name} disagrees with ours on test image {i}: ours {reference}, {name} {answer}")
    return worst


def _med(cells: list[LoadResult], key: str) -> float:
    return statistics.median(getattr(c, key) for c in cells)


def summarise(results: dict[tuple[str, int], list[LoadResult]]) -> tuple[str, dict]:
    """The markdown tables (cells, then ratios against targets) and the same figures as a dict."""
    cells: dict[str, dict] = {}
    lines = ["| c | server | req/s | p50 ms | p99 ms | errors | server CPU ms/request | req/s per round |",
             "|---|---|---|---|---|---|---|---|"]
    for conc in sorted({c for _, c in results}):
        for name in SERVERS:
            runs = results.get((name, conc))
            if not runs:
                continue
            row = {"rps": _med(runs, "rps"), "p50": _med(runs, "p50"), "p99": _med(runs, "p99"),
                   "errors": sum(r.errors for r in runs), "cpu_ms": _med(runs, "server_cpu_ms"),
                   "rounds_rps": [round(r.rps) for r in runs]}
            cells[f"{name}-c{conc}"] = row
            label = f"**{name}**" if name == "ours" else name
            lines.append(f"| {conc} | {label} | {row['rps']:,.0f} | {row['p50']:.2f} | {row['p99']:.2f} | "
                         f"{row['errors']} | {row['cpu_ms']:.3f} | {' / '.join(f'{r:,}' for r in row['rounds_rps'])} |")
    ratios: dict[str, dict] = {}
    lines += ["", "| ours vs | c | req/s ratio (ours / peer) | p50 ratio (peer / ours) | "
              "CPU ratio (peer / ours) | target | met |", "|---|---|---|---|---|---|---|"]
    targets = {(peer, conc): target for peer, conc, target in TARGETS}
    for peer in ("triton", "torchserve", "bare"):
        for conc in sorted({c for _, c in results}):
            ours, other = cells.get(f"ours-c{conc}"), cells.get(f"{peer}-c{conc}")
            if not ours or not other:
                continue
            target = targets.get((peer, conc))
            ratio = {"rps": ours["rps"] / other["rps"], "p50": other["p50"] / ours["p50"],
                     "cpu": other["cpu_ms"] / ours["cpu_ms"] if ours["cpu_ms"] else float("nan"),
                     "target": target}
            ratio["met"] = None if target is None else bool(ratio["rps"] >= target and ours["errors"] == 0)
            ratios[f"{peer}-c{conc}"] = ratio
            met = "–" if target is None else ("yes" if ratio["met"] else "**no**")
            lines.append(f"| {peer} | {conc} | **{ratio['rps']:.2f}×** | {ratio['p50']:.2f}× | {ratio['cpu']:.2f}× | "
                         f"{'–' if target is None else f'≥ {target:g}×'} | {met} |")
    return "\n".join(lines), {"cells": cells, "ratios": ratios}


def versions(servers: dict[str, str], envs: dict[str, venvs.PeerEnv]) -> dict[str, dict]:
    """What exactly ran: ours from this interpreter, the peers from their venvs and servers."""
    import bentoml
    import onnxruntime

    repo = Path(__file__).resolve().parents[2]
    git = ["git", "-C", str(repo)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "--", "serving"],
                                capture_output=True, text=True).stdout.strip())
    found: dict[str, dict] = {"ours": {"bentoml": bentoml.__version__, "onnxruntime": onnxruntime.__version__,
                                       "python": platform.python_version(),
                                       # ours runs from the working tree: say which code that was
                                       "commit": commit + (" + uncommitted serving/ changes" if dirty else "")}}
    if "triton" in envs:
        with urllib.request.urlopen(servers["triton"] + "/v2", timeout=10) as answer:
            server = json.loads(answer.read())
        found["triton"] = {"tritonserver": server.get("version"), **envs["triton"].versions,
                           "python": envs["triton"].python_version}
    if "torchserve" in envs:
        java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()
        found["torchserve"] = {**envs["torchserve"].versions, "python": envs["torchserve"].python_version,
                               "java": java[0] if java else "?"}
    return found


def record_result(summary: dict, found: dict, setup: dict, worst: dict[str, float], payload_bytes: dict[str, int],
                  model_version: str) -> dict:
    """What a peers record keeps: the summary (cells with per-round req/s, ratios), what ran, setup cost."""
    return {"summary": summary, "versions": found, "setup": setup, "verify_max_abs_diff": worst,
            "payload_bytes": payload_bytes, "model_version": model_version}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fashion-lenet")
    parser.add_argument("--service", default="ImageService")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per cell")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--peers", nargs="+", default=["triton", "torchserve"], choices=["triton", "torchserve"])
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for every server's model runtime")
    parser.add_argument("--triton-max-batch", type=int, default=64)
    parser.add_argument("--triton-queue-delay-us", type=int, default=100)
    parser.add_argument("--peer-instances", type=int, default=1,
                        help="model instances of each peer: Triton model instances (PyTriton callables), TorchServe "
                             "workers (TorchServe's own default is one per CPU; PyTriton's one per callable given)")
    parser.add_argument("--torchserve-batch-size", type=int, default=32)
    parser.add_argument("--torchserve-batch-delay-ms", type=int, default=2)
    parser.add_argument("--verify-images", type=int, default=16, help="test images every server must agree on")
    parser.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="more settings for our service")
    parser.add_argument("--json", type=Path, help="write settings, versions, setup cost, every cell and the summary")
    records.add_arguments(parser)
    args = parser.parse_args()
    recording = records.begin("peers", args)
    # `kill` (SIGTERM) unwinds the with-blocks like Ctrl-C does, so every server group is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    import bentoml

    model_dir = Path(bentoml.models.get(f"{args.model}:latest").path)
    images = test_images(max(args.verify_images, 1))
    requests = requests_for(images[0], args.model)
    envs = {name: venvs.ensure(name) for name in args.peers}  # before the lock: builds take minutes
    work = Path(tempfile.mkdtemp(prefix="dlbook-peers-"))
    print(f"logs and peer work files: {work}", flush=True)
    ours_env = {"DLBOOK_IMAGE_MODELS": args.model, "DLBOOK_ORT_INTRA_THREADS": str(args.threads),
                **dict(kv.split("=", 1) for kv in args.env)}
    startup: dict[str, float] = {}
    results: dict[tuple[str, int], list[LoadResult]] = {}

    with records.bench_lock(), contextlib.ExitStack() as stack:
        recording.lock_held = True
        def start(name: str, server) -> str:
            began = time.monotonic()
            base = stack.enter_context(whole_group(server))
            startup[name] = round(time.monotonic() - began, 1)
            print(f"{name:10} ready at {base} after {startup[name]:.0f} s", flush=True)
            return base

        servers = {"ours": start("ours", bentoml_service(args.service, work / "ours.log", ours_env)),
                   "bare": start("bare", bare_service(args.model, work / "bare.log", args.threads))}
        if "triton" in envs:
            servers["triton"] = start("triton", triton_service(
                envs["triton"], model_dir, args.model, work / "triton-workspace", work / "triton.log",
                threads=args.threads, max_batch=args.triton_max_batch,
                max_queue_delay_us=args.triton_queue_delay_us, instances=args.peer_instances))
        if "torchserve" in envs:
            servers["torchserve"] = start("torchserve", torchserve_service(
                envs["torchserve"], model_dir, args.model, work / "torchserve", work / "torchserve.log",
                threads=args.threads, batch_size=args.torchserve_batch_size,
                max_batch_delay_ms=args.torchserve_batch_delay_ms, workers=args.peer_instances))

        worst = verify(servers, images, args.model)
        print("answers agree with ours on", len(images), "test images; largest probability difference:",
              {k: f"{v:.1e}" for k, v in worst.items()}, flush=True)
        found = versions(servers, envs)
        for base_name, base in servers.items():  # warm-up: first requests allocate, compile, fill pools
            run_wrk(base, requests[base_name], connections=8, duration_s=3)
        names = [n for n in SERVERS if n in servers]
        for round_ in range(args.rounds):
            order = names if round_ % 2 == 0 else names[::-1]
            for conc in args.concurrency:
                for name in order:
                    cpu_before = cpu_seconds(servers[name])
                    result = run_wrk(servers[name], requests[name], connections=conc, duration_s=args.duration,
                                     label=name)
                    result.server_cpu_ms = (cpu_seconds(servers[name]) - cpu_before) * 1e3 / max(result.requests, 1)
                    results.setdefault((name, conc), []).append(result)
                    print(f"round {round_ + 1} c={conc:<3} {name:10} {result.rps:8.0f} req/s  "
                          f"p50 {result.p50:7.2f} ms  p99 {result.p99:7.2f} ms  errors {result.errors}  "
                          f"server CPU {result.server_cpu_ms:.3f} ms/request", flush=True)

    text, summary = summarise(results)
    setup = {name: {"venv_build_s": env.build_seconds, "venv_mib": round(env.size_bytes / 2**20),
                    "server_start_s": startup.get(name)} for name, env in envs.items()}
    setup.update({name: {"server_start_s": startup[name]} for name in ("ours", "bare") if name in startup})
    print()
    print(text)
    print()
    print("versions:", json.dumps(found))
    print("setup:", json.dumps(setup))
    records.write(recording, record_result(summary, found, setup, worst, {n: len(requests[n].body) for n in servers},
                                           f"{args.model}:{model_dir.name}"))
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "record_dir", "no_record")}
        args.json.write_text(json.dumps({
            "settings": settings, "versions": found, "setup": setup, "verify_max_abs_diff": worst,
            "payload_bytes": {name: len(requests[name].body) for name in servers},
            "summary": summary,
            "runs": {f"{n}-c{c}": [r.as_dict() for r in v] for (n, c), v in results.items()}}, indent=2))


if __name__ == "__main__":
    main()
