"""Where a request's CPU goes: the served path and the bare one in process, and each step on its own.

    python loadtests/request_cpu.py --rounds 3

No sockets and no load generator: the ASGI apps are called directly on one event loop with a
ready request body, and the figure is CPU time (``time.process_time``, this process and its
threads) per request, so it hardly moves with what else runs on the machine. What it leaves out
(uvicorn's HTTP parsing and socket writes, the same for every server here) is what
``loadtests/http_bench.py`` adds back. Measured, on one real Fashion-MNIST test image sent as JSON
to ``/classify_pixels`` (fashion-lenet, one ORT intra-op thread):

- **apps**, one request at a time (c=1) and 32 at once (c=32): our app as uvicorn receives it (the
  request guard in front of BentoML's app, ``serving.guard.stand_in_front``); the same with the guard
  as an ordinary middleware inside BentoML's (its place before); the bare Starlette + ORT endpoint
  of ``loadtests/bare_server.py``; and a request the guard sheds with 503 at capacity;
- **steps**, each timed alone with the same inputs, in the order a request meets them: request id,
  admission, body decoding (``serving.pixel_json`` for the usual body; pydantic, the route's own
  model, for any other), the pixel check of each one's result, the ORT call (one
  row, and per row of a 32-row batch), softmax + top-k answer, response encoding, the access log
  line (formatted by the real formatter, written to /dev/null), the metric updates.

Each invocation writes its record to ``docs/bench/`` (``--record-dir``); ``python -m loadtests.report``
turns the records into the table "Where a request's CPU goes" of docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests import records  # noqa: E402

MODEL = "fashion-lenet"
App = Callable[[dict, Callable, Callable], Awaitable[None]]


def _scope(path: str, body: bytes) -> dict[str, Any]:
    headers = [(b"host", b"127.0.0.1:3000"), (b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 3000)}


async def _one(app: App, scope: dict[str, Any], body: bytes, status: int) -> None:
    started: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            started.append(message["status"])

    await app(dict(scope), receive, send)
    if started != [status]:
        raise RuntimeError(f"expected {status}, got {started}")


async def cpu_per_request(app: App, scope: dict[str, Any], body: bytes, concurrency: int, n: int,
                          status: int = 200) -> float:
    """Milliseconds of this process's CPU per request, ``concurrency`` requests in flight at a time."""
    for _ in range(max(1, 200 // concurrency)):  # warm: first calls allocate and fill caches
        await asyncio.gather(*(_one(app, scope, body, status) for _ in range(concurrency)))
    began = time.process_time()
    for _ in range(n // concurrency):
        await asyncio.gather(*(_one(app, scope, body, status) for _ in range(concurrency)))
    return (time.process_time() - began) / (n // concurrency * concurrency) * 1e3


def per_call_us(fn: Callable[[], Any], n: int) -> float:
    """Microseconds of CPU per call of ``fn``: the best of three loops of ``n`` (the least disturbed)."""
    for _ in range(min(n, 200)):
        fn()
    best = float("inf")
    for _ in range(3):
        began = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - began) / n * 1e6)
    return best


async def lifespan(app: App) -> None:
    """Run the app's start-up (BentoML loads the models and installs the direct routes there)."""
    inbox: asyncio.Queue = asyncio.Queue()
    outbox: asyncio.Queue = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    asyncio.get_running_loop().create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get,
                                                outbox.put))
    message = await outbox.get()
    if message["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"start-up failed: {message}")


def guard_of(app: Any) -> Any:
    from serving.guard import RequestGuardMiddleware

    return app if isinstance(app, RequestGuardMiddleware) else None


async def measure(n: int) -> dict[str, Any]:
    import bentoml
    import numpy as np

    from loadtests.bare_server import build_app
    from loadtests.http_bench import fashion_image
    from serving import direct_routes
    from serving.guard import RequestGuardMiddleware, request_id_for
    from serving.image_to_tensor import array_to_frame
    from serving.metrics import REQUEST_SECONDS, REQUESTS, batch_observer
    from serving.routes import route_label
    from serving.service import ImageService, answer

    image = fashion_image()
    body = json.dumps({"images": [image.tolist()]}).encode()
    scope = _scope("/classify_pixels", body)

    served = ImageService.to_asgi(is_main=True)  # what uvicorn gets: the guard in front of BentoML's app
    await lifespan(served)
    ImageService.middlewares.append((RequestGuardMiddleware, {}))  # the guard's place before: inside the stack
    inside = type(ImageService).__mro__[1].to_asgi(ImageService, is_main=True)
    ImageService.middlewares.pop()
    await lifespan(inside)
    bare = build_app(Path(bentoml.models.get(f"{MODEL}:latest").path), intra_threads=1)

    full = guard_of(served)
    shedding = RequestGuardMiddleware(full.app, in_flight_limit=1)
    shedding.slots.max_waiting = 0
    shedding.slots.executing = 1  # every slot taken, nobody may wait: each request is shed

    apps: dict[str, dict[str, float]] = {}
    for name, app, status in (("served", served, 200), ("guard inside BentoML's middleware", inside, 200),
                              ("bare", bare, 200), ("shed (503 at capacity)", shedding, 503)):
        apps[name] = {f"c{c}": await cpu_per_request(app, scope, body, c, n, status) for c in (1, 32)}

    # The steps, each alone.
    route = direct_routes._ROUTES["/classify_pixels"]
    spec = route.spec
    image_model = route.answer.args[0].image_models[MODEL]  # the handler: a partial over the service instance
    pixels = image.tolist()
    decoded = route.fast_decode(body)["images"][0]
    frame = array_to_frame(pixels)
    frames32 = np.stack([frame] * 32)
    probs = image_model.probabilities(frame[None])
    payload = {"model": MODEL, "version": "v", "predictions": [image_model.describe(probs[0], 3)]}
    headers = dict(scope["headers"])
    slots = full.slots
    access = logging.getLogger("dlbook.access")
    null = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the process
    null.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s"))
    saved = access.handlers, access.propagate, access.level
    access.handlers, access.propagate, access.level = [null], False, logging.INFO
    timer = REQUEST_SECONDS.labels(route_label("/classify_pixels"), "200")
    counter = REQUESTS.labels("classify_pixels", MODEL)
    observe = batch_observer(MODEL, "CPUExecutionProvider")

    async def admission() -> None:
        await slots.enter()
        slots.leave()

    def admit() -> None:
        coroutine = admission()
        with contextlib.suppress(StopIteration):
            coroutine.send(None)

    def metrics() -> None:
        timer.observe(0.001)
        counter.inc()
        observe(1, 0.0002)

    def encode() -> bytes:
        return answer(payload).body

    steps = {
        "request id": per_call_us(lambda: request_id_for(headers), n * 10),
        "admission (a free slot)": per_call_us(admit, n * 10),
        "body decoding (serving.pixel_json, the usual body)": per_call_us(lambda: route.fast_decode(body), n),
        "pixel check of its array (array_to_frame)": per_call_us(lambda: array_to_frame(decoded), n),
        "body validation (pydantic, the route's model; any other body)": per_call_us(
            lambda: spec.model_validate_json(body), n),
        "pixel check of pydantic's lists (array_to_frame)": per_call_us(lambda: array_to_frame(pixels), n),
        "ORT call, 1 row (scaling included)": per_call_us(lambda: image_model.probabilities(frame[None]), n),
        "ORT call, per row of 32": per_call_us(lambda: image_model.probabilities(frames32), n // 10) / 32,
        "top-k answer": per_call_us(lambda: image_model.describe(probs[0], 3), n),
        "response encoding (JSON)": per_call_us(encode, n),
        "access log line": per_call_us(lambda: access.info("%s %s %s %.1fms [request %s]", "POST",
                                                            "/classify_pixels", 200, 0.7, "0123456789abcdef"), n),
        "metric updates": per_call_us(metrics, n),
    }
    access.handlers, access.propagate, access.level = saved
    return {"apps": apps, "steps": steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="measure each figure this many times; report the median")
    parser.add_argument("--requests", type=int, default=3200, help="requests per app figure (and calls per step)")
    records.add_arguments(parser)
    args = parser.parse_args(argv)
    recording = records.begin("request-cpu", args, argv=[sys.argv[0] if argv is None else __file__,
                                                         *(sys.argv[1:] if argv is None else argv)])
    os.environ.setdefault("DLBOOK_IMAGE_MODELS", MODEL)
    os.environ.setdefault("DLBOOK_ORT_INTRA_THREADS", "1")
    os.environ.setdefault("DLBOOK_DEVICE", "cpu")
    logging.getLogger("dlbook").addHandler(logging.NullHandler())
    logging.getLogger("dlbook").propagate = False
    with records.bench_lock():
        rounds = [asyncio.run(measure(args.requests)) for _ in range(args.rounds)]
    apps = {name: {c: statistics.median(r["apps"][name][c] for r in rounds) for c in rounds[0]["apps"][name]}
            for name in rounds[0]["apps"]}
    steps = {name: statistics.median(r["steps"][name] for r in rounds) for name in rounds[0]["steps"]}
    print("| app | c=1 ms CPU/request | c=32 |")
    for name, cells in apps.items():
        print(f"| {name} | {cells['c1']:.3f} | {cells['c32']:.3f} |")
    print("| step | µs CPU/call |")
    for name, us in steps.items():
        print(f"| {name} | {us:.1f} |")
    records.write(recording, {"apps": apps, "steps": steps, "rounds": rounds,
                              "models": records.model_versions([MODEL])})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
