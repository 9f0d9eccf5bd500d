"""Overload: throughput and latency against concurrency, up to far beyond what one worker can serve.

    python loadtests/overload.py --duration 20 --json /tmp/overload.json

For each concurrency (1, 8, 32, 128, 256 by default) wrk sends one real Fashion-MNIST image as JSON
to ``/classify_pixels`` for ``--duration`` seconds. A worker holding ``DLBOOK_MAX_IN_FLIGHT``
requests answers the rest at once with 503 and ``Retry-After`` (counted in ``dlbook_shed_total``),
so what the service accepts keeps a bounded latency instead of every request waiting longer and
longer until clients time out. Reported per level: answered and shed per second, wrk's latency
over all answers, and the server's own p99 for accepted (200) requests from the
``dlbook_request_seconds`` histogram (a bucket bound). The run fails (exit 1) on any answer other
than 200 or 503, any socket error or timeout, or a 503 without ``Retry-After``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import urllib.request
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests.http_bench import fashion_image, payloads  # noqa: E402
from loadtests.loadgen import run_wrk  # noqa: E402
from loadtests.servers import bentoml_service  # noqa: E402

PATH = "/classify_pixels"


def scrape(base: str) -> dict[str, object]:
    """The accepted-latency histogram buckets (cumulative counts by upper bound) and the shed count."""
    with urllib.request.urlopen(base + "/metrics", timeout=10) as answer:
        text = answer.read().decode()
    buckets: dict[float, float] = {}
    shed = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if (sample.name == "dlbook_request_seconds_bucket" and labels.get("path") == PATH
                    and labels.get("status") == "200"):
                bound = float(labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
            elif sample.name == "dlbook_shed_total" and labels.get("path") == PATH:
                shed += sample.value
    return {"buckets": buckets, "shed": shed}


def quantile_bound(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """The smallest bucket bound (seconds) under which a fraction ``q`` of the new observations fall."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0
    if total <= 0:
        return None
    return next(b for b, c in zip(bounds, counts, strict=True) if c >= q * total)


async def burst_has_retry_after(base: str, body: bytes, requests: int = 400) -> tuple[int, int]:
    """Fire ``requests`` at once; return (503s seen, 503s carrying Retry-After)."""
    limits = httpx.Limits(max_connections=requests)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        answers = await asyncio.gather(*[client.post(PATH, content=body, headers={"Content-Type": "application/json"})
                                         for _ in range(requests)], return_exceptions=True)
    shed = [a for a in answers if isinstance(a, httpx.Response) and a.status_code == 503]
    return len(shed), sum("retry-after" in a.headers for a in shed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32, 128, 256])
    parser.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="settings for our service")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    request = payloads(fashion_image())["json"]
    env = {"DLBOOK_IMAGE_MODELS": "fashion-lenet", **dict(kv.split("=", 1) for kv in args.env)}
    log = Path(tempfile.mkdtemp(prefix="dlbook-overload-")) / "server.log"
    rows, failures = [], []
    with bentoml_service("ImageService", log, env) as base:
        run_wrk(base, request, connections=8, duration_s=3)  # warm-up
        for level in args.levels:
            before = scrape(base)
            result = run_wrk(base, request, connections=level, duration_s=args.duration, threads=2,
                             timeout_s=10, track_status=True)
            after = scrape(base)
            ok, shed = result.statuses.get("200", 0), result.statuses.get("503", 0)
            others = {k: v for k, v in result.statuses.items() if k not in ("200", "503")}
            socket_errors = result.errors - result.statuses.get("503", 0) - sum(others.values())
            p99 = quantile_bound(before["buckets"], after["buckets"], 0.99)
            row = {"concurrency": level, "ok_per_s": ok / result.duration_s, "shed_per_s": shed / result.duration_s,
                   "shed_metric": after["shed"] - before["shed"], "other_statuses": others,
                   "socket_errors": socket_errors, "timeouts": result.timeouts, "p50_ms": result.p50,
                   "p99_ms": result.p99, "max_ms": result.max, "accepted_p99_ms_bound": p99 and p99 * 1e3}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if others or socket_errors or result.timeouts:
                failures.append(f"c={level}: statuses {others}, socket errors {socket_errors}, "
                                f"timeouts {result.timeouts}")
        seen, with_header = asyncio.run(burst_has_retry_after(base, request.body))
        if seen != with_header:
            failures.append(f"{seen - with_header} of {seen} 503s had no Retry-After")

    lines = ["| concurrency | answered 200/s | shed 503/s | other answers | socket errors / timeouts | "
             "p50 / p99 / max ms (all answers) | accepted p99 (server) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        bound = f"≤ {r['accepted_p99_ms_bound']:.0f} ms" if r["accepted_p99_ms_bound"] else "-"
        lines.append(f"| {r['concurrency']} | {r['ok_per_s']:,.0f} | {r['shed_per_s']:,.0f} | "
                     f"{sum(r['other_statuses'].values())} | {r['socket_errors']} / {r['timeouts']} | "
                     f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f} / {r['max_ms']:.0f} | {bound} |")
    print("\n".join(lines))
    print(f"burst of 400 at once: {seen} shed, {with_header} with Retry-After")
    if args.json:
        args.json.write_text(json.dumps({"levels": rows, "burst": {"shed": seen, "retry_after": with_header},
                                         "failures": failures}, indent=2))
    if failures:
        print("FAILED:", "; ".join(failures))
        sys.exit(1)


if __name__ == "__main__":
    main()
