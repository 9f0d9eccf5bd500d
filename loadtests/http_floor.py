"""Where a served one-image request's CPU goes, against the floors of this machine.

    python loadtests/http_floor.py [--rounds 2] [--duration 10] [--workers 1 2] [--record-dir DIR]

Throughput on a CPU-bound machine is cores ÷ CPU per request, so this prices one request of the peer
benchmark (``POST /classify_pixels`` with one real Fashion-MNIST test image as a 28×28 JSON array,
fashion-lenet, one ORT intra-op thread per worker) piece by piece:

* **HTTP floor**: ``noop_app`` below on the same uvicorn (uvloop, httptools) reads the whole body and
  answers a constant top-3 JSON. No server built on uvicorn can cost less per request; its CPU per
  request and its requests/s are the floor of the HTTP layer here.
* **Parsing**: our route's own validation of that body, in process (the pydantic model BentoML built
  from the method's signature, then ``array_to_frame`` on the pixels), CPU time per request.
* **ONNX Runtime**: the model alone, in process, CPU time per image at batch 1 and at the mean batch
  our service formed during the run (read from its ``dlbook_batch_size`` metric).
* **ours**: ``ImageService`` with the same request, CPU per request of its whole process tree.

Servers are measured with wrk at c=32 for ``--duration`` seconds, A/B alternated for ``--rounds``
rounds, once per ``--workers`` count (the no-op app gets the same count). What ours costs beyond the
sum of the floors is the price of BentoML's worker, our request guard (size limits, shedding, request
ids, timeouts), metrics and the access log, and batching.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests import records  # noqa: E402
from loadtests.loadgen import HttpRequest, run_wrk  # noqa: E402
from loadtests.servers import bentoml_service, cpu_seconds, free_port, running  # noqa: E402

_ANSWER = json.dumps({"model": "fashion-lenet", "version": "noop", "predictions": [
    {"class_index": 9, "label": "Ankle boot", "probability": 0.98,
     "top_k": [{"label": "Ankle boot", "probability": 0.98}, {"label": "Sneaker", "probability": 0.01},
               {"label": "Sandal", "probability": 0.01}]}]}).encode()


async def noop_app(scope: dict, receive, send) -> None:
    """The least an HTTP answer can cost on uvicorn: read the body, send a fixed answer."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(_ANSWER)).encode())]})
    await send({"type": "http.response.body", "body": _ANSWER})


def noop_service(workers: int, log: Path):
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "loadtests.http_floor:noop_app", "--host", "127.0.0.1", "--port",
           str(port), "--workers", str(workers), "--loop", "uvloop", "--http", "httptools", "--no-access-log",
           "--log-level", "warning"]
    return running(cmd, "/livez", port, log)


def the_request() -> tuple[HttpRequest, np.ndarray]:
    from training.datasets.images import load_image_split

    image = np.asarray(load_image_split("fashion-mnist", "test").images[0], np.uint8)
    body = json.dumps({"images": [image.tolist()]}).encode()
    return HttpRequest("/classify_pixels", body, "application/json"), image


def cpu_per_call(call, seconds: float = 2.0) -> float:
    """Median over 5 runs of process CPU milliseconds per ``call()``."""
    samples = []
    for _ in range(5):
        calls, began, wall = 0, time.process_time(), time.perf_counter()
        while time.perf_counter() - wall < seconds / 5:
            call()
            calls += 1
        samples.append(1000 * (time.process_time() - began) / calls)
    return statistics.median(samples)


def parsing_ms(request: HttpRequest) -> float:
    """Our route's validation of the body, as the direct route runs it."""
    from serving.image_to_tensor import array_to_frame
    from serving.service import ImageAPIs

    spec = ImageAPIs.classify_pixels.input_spec

    def parse() -> None:
        validated = spec.model_validate_json(request.body)
        [array_to_frame(p) for p in validated.images]

    return cpu_per_call(parse)


def onnx_ms_per_image(image: np.ndarray, batch: int) -> float:
    from preprocessing import PixelScaling
    from serving.model_store import load_exported
    from serving.runtime import RuntimeConfig

    model = load_exported("fashion-lenet", RuntimeConfig(intra_op_threads=1, prefer_cuda=False))
    scaling = PixelScaling.from_dict(model.meta["preprocessing"]["scaling"])
    x = np.ascontiguousarray(scaling.apply(np.repeat(image[None], batch, 0))[:, None].astype(np.float32))
    return cpu_per_call(lambda: model.session.run({"image": x})) / batch


def mean_batch(base: str) -> float:
    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    total = re.search(r'dlbook_batch_size_sum\{model="fashion-lenet"\} ([0-9.e+]+)', text)
    count = re.search(r'dlbook_batch_size_count\{model="fashion-lenet"\} ([0-9.e+]+)', text)
    return float(total.group(1)) / float(count.group(1)) if total and count and float(count.group(1)) else 1.0


def measure(base: str, request: HttpRequest, duration: float) -> dict:
    run_wrk(base, request, connections=32, duration_s=2)  # warm up
    before = cpu_seconds(base)
    result = run_wrk(base, request, connections=32, duration_s=duration)
    cpu = cpu_seconds(base) - before
    return {"rps": result.rps, "p50_ms": result.p50, "p99_ms": result.p99, "errors": result.errors,
            "cpu_ms_per_request": 1000 * cpu / max(result.requests, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per cell")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", type=Path)
    records.add_arguments(parser)
    args = parser.parse_args()
    recording = records.begin("http-floor", args)

    request, image = the_request()
    parse = parsing_ms(request)
    logs = Path(tempfile.mkdtemp(prefix="dlbook-http-floor-"))
    cells: dict[str, list[dict]] = {}
    batches: dict[int, list[float]] = {}
    with records.bench_lock():
        recording.lock_held = True
        for workers in args.workers:
            env = {"DLBOOK_IMAGE_MODELS": "fashion-lenet", "DLBOOK_ORT_INTRA_THREADS": "1",
                   "DLBOOK_WORKERS": str(workers)}
            with noop_service(workers, logs / f"noop{workers}.log") as noop, \
                    bentoml_service("ImageService", logs / f"ours{workers}.log", env) as ours:
                for r in range(args.rounds):
                    order = [("noop", noop), ("ours", ours)]
                    for name, base in order if r % 2 == 0 else order[::-1]:
                        cells.setdefault(f"{name} w{workers}", []).append(measure(base, request, args.duration))
                batches[workers] = [mean_batch(ours)]
    onnx = {b: onnx_ms_per_image(image, b) for b in sorted({1, *[round(v[0]) or 1 for v in batches.values()]})}

    def med(name: str, key: str) -> float:
        return statistics.median(c[key] for c in cells[name])

    print(f"parsing (pydantic + array_to_frame), in process: {parse:.3f} ms CPU per request")
    for b, ms in onnx.items():
        print(f"ONNX Runtime fashion-lenet, 1 thread, batch {b}: {ms:.3f} ms CPU per image")
    print("\n| server | workers | req/s | p50 / p99 ms | errors | CPU ms per request |\n|---|---|---|---|---|---|")
    for name in cells:
        print(f"| {name.split()[0]} | {name.split()[1][1:]} | {med(name, 'rps'):,.0f} | {med(name, 'p50_ms'):.2f} / "
              f"{med(name, 'p99_ms'):.2f} | {sum(c['errors'] for c in cells[name])} | "
              f"{med(name, 'cpu_ms_per_request'):.3f} |")
    summary = {}
    for workers in args.workers:
        batch = round(batches[workers][0]) or 1
        floor = med(f"noop w{workers}", "cpu_ms_per_request") + parse + onnx[batch]
        ours = med(f"ours w{workers}", "cpu_ms_per_request")
        summary[workers] = {"mean_batch": batches[workers][0], "floor_ms": floor, "ours_ms": ours,
                            "rest_ms": ours - floor}
        print(f"\nw{workers}: HTTP floor + parsing + ORT at its mean batch {batches[workers][0]:.1f} = {floor:.3f} ms "
              f"CPU per request; ours {ours:.3f} ms; the rest (BentoML's worker, guard, metrics, log, batching) "
              f"{ours - floor:.3f} ms. Two cores can serve at most {2000 / floor:,.0f} req/s of the floors alone.")
    if args.json:
        args.json.write_text(json.dumps({"cells": cells, "parsing_ms": parse, "onnx_ms_per_image": onnx,
                                         "summary": summary}, indent=1))
    records.write(recording, {"summary": summary, "parsing_ms": parse, "onnx_ms_per_image": onnx,
                              "cells": {name: {key: statistics.median(c[key] for c in cs) for key in cs[0]}
                                        for name, cs in cells.items()},
                              "rounds": cells, "models": records.model_versions(["fashion-lenet"])})


if __name__ == "__main__":
    main()
