"""HTTP, served vs bare: our BentoML service against a bare Starlette + ORT endpoint, same model, same bytes.

    python loadtests/http_bench.py --rounds 2 --duration 12 --threads 1

Each invocation writes its record to ``docs/bench/`` (``--record-dir``; see :mod:`loadtests.records`);
``python -m loadtests.report`` turns the records into the tables of docs/PERFORMANCE.md.

Both servers run side by side (an idle server costs nothing); each round measures every
(payload, concurrency) cell on the bare baseline and on our service back to back, alternating which
goes first, so drift on this shared machine hits both alike. Payloads: one real Fashion-MNIST test
image as a 28×28 PNG upload (multipart, ``/classify``) and as a JSON array (``/classify_pixels``).
The load generator is wrk (:mod:`loadtests.loadgen`). Reported: requests/s, p50 and p99 per cell
(medians over rounds) and the ratios the issue sets targets for: throughput at c=32 ≥ 0.8× bare with
0 errors, p99 ≤ 3× bare, p50 at c=1 ≤ 2× bare.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests import records  # noqa: E402
from loadtests.loadgen import HttpRequest, LoadResult, multipart_body, run_wrk  # noqa: E402
from loadtests.servers import bare_service, bentoml_service, cpu_seconds  # noqa: E402
from training.datasets.images import load_image_split  # noqa: E402


def fashion_image(index: int = 0) -> np.ndarray:
    return np.asarray(load_image_split("fashion-mnist", "test").images[index], np.uint8)


def payloads(image: np.ndarray) -> dict[str, HttpRequest]:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    body, ctype = multipart_body("images", "item.png", buf.getvalue(), "image/png")
    pixels = json.dumps({"images": [image.tolist()]}).encode()
    return {"png": HttpRequest("/classify", body, ctype),
            "json": HttpRequest("/classify_pixels", pixels, "application/json")}


def table(results: dict[tuple[str, str, int], list[LoadResult]]) -> tuple[str, dict]:
    def med(cells: list[LoadResult], key: str) -> float:
        return statistics.median(getattr(c, key) for c in cells)

    lines = ["| payload | c | bare req/s | served req/s | ratio | bare p50 / p99 ms | served p50 / p99 ms | "
             "p50 ratio | p99 ratio | errors (bare / served) | server CPU ms/request (bare / served) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for payload, conc in sorted({(p, c) for p, _, c in results}):
        bare, served = results[(payload, "bare", conc)], results[(payload, "served", conc)]
        row = {"bare_rps": med(bare, "rps"), "served_rps": med(served, "rps"),
               "bare_p50": med(bare, "p50"), "served_p50": med(served, "p50"),
               "bare_p99": med(bare, "p99"), "served_p99": med(served, "p99"),
               "bare_errors": sum(c.errors for c in bare), "served_errors": sum(c.errors for c in served),
               "bare_cpu_ms": med(bare, "server_cpu_ms"), "served_cpu_ms": med(served, "server_cpu_ms"),
               "rounds_served_rps": [round(c.rps) for c in served], "rounds_bare_rps": [round(c.rps) for c in bare]}
        row["rps_ratio"] = row["served_rps"] / row["bare_rps"]
        row["p50_ratio"] = row["served_p50"] / row["bare_p50"]
        row["p99_ratio"] = row["served_p99"] / row["bare_p99"]
        summary[f"{payload}-c{conc}"] = row
        lines.append(f"| {payload} | {conc} | {row['bare_rps']:,.0f} | {row['served_rps']:,.0f} | "
                     f"**{row['rps_ratio']:.2f}×** | {row['bare_p50']:.2f} / {row['bare_p99']:.2f} | "
                     f"{row['served_p50']:.2f} / {row['served_p99']:.2f} | {row['p50_ratio']:.2f}× | "
                     f"{row['p99_ratio']:.2f}× | {row['bare_errors']} / {row['served_errors']} | "
                     f"{row['bare_cpu_ms']:.3f} / {row['served_cpu_ms']:.3f} |")
    return "\n".join(lines), summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fashion-lenet")
    parser.add_argument("--service", default="ImageService")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per cell")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--payloads", nargs="+", default=["png", "json"])
    parser.add_argument("--json", type=Path, help="write all cells and the summary here")
    parser.add_argument("--threads", type=int, default=0,
                        help="ORT intra-op threads for both servers (0: ORT chooses, one per core)")
    parser.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE",
                        help="settings for our service, e.g. DLBOOK_WORKERS=2 DLBOOK_ORT_INTRA_THREADS=1")
    records.add_arguments(parser)
    args = parser.parse_args()
    recording = records.begin("http-bench", args)

    requests = payloads(fashion_image())
    logs = Path(tempfile.mkdtemp(prefix="dlbook-http-bench-"))
    env = {"DLBOOK_IMAGE_MODELS": args.model, "DLBOOK_ORT_INTRA_THREADS": str(args.threads),
           **dict(kv.split("=", 1) for kv in args.env)}
    results: dict[tuple[str, str, int], list[LoadResult]] = {}
    with bare_service(args.model, logs / "bare.log", args.threads) as bare, \
            bentoml_service(args.service, logs / "served.log", env) as served:
        servers = {"bare": bare, "served": served}
        for base in servers.values():  # warm-up: first requests allocate and compile
            for payload in args.payloads:
                run_wrk(base, requests[payload], connections=8, duration_s=3)
        for round_ in range(args.rounds):
            order = ["bare", "served"] if round_ % 2 == 0 else ["served", "bare"]
            for payload in args.payloads:
                for conc in args.concurrency:
                    for name in order:
                        cpu_before = cpu_seconds(servers[name])
                        result = run_wrk(servers[name], requests[payload], connections=conc,
                                         duration_s=args.duration, label=name)
                        result.server_cpu_ms = (cpu_seconds(servers[name]) - cpu_before) * 1e3 / max(result.requests, 1)
                        results.setdefault((payload, name, conc), []).append(result)
                        print(f"round {round_ + 1} {payload:4} c={conc:<3} {name:6} {result.rps:8.0f} req/s  "
                              f"p50 {result.p50:7.2f} ms  p99 {result.p99:7.2f} ms  errors {result.errors}  "
                              f"server CPU {result.server_cpu_ms:.3f} ms/request", flush=True)
    text, summary = table(results)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "cells": {
            f"{p}-{n}-c{c}": [r.as_dict() for r in v] for (p, n, c), v in results.items()}}, indent=2))
    records.write(recording, {"summary": summary, "models": records.model_versions([args.model])})


if __name__ == "__main__":
    main()
