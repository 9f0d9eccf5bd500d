"""Overload: throughput and latency against concurrency, up to far beyond what one worker can serve.

    python loadtests/overload.py --duration 12 --env DLBOOK_ORT_INTRA_THREADS=1

For each concurrency (1, 8, 32, 128, 256 by default) wrk sends one real Fashion-MNIST image as JSON
to ``/classify_pixels`` for ``--duration`` seconds. A worker runs ``DLBOOK_MAX_IN_FLIGHT`` requests at
once and queues the next in arrival order (``serving.admission``); it answers 503 with ``Retry-After``
(counted in ``dlbook_shed_total``) only when its event loop runs later than ``DLBOOK_MAX_QUEUE_MS``, its
queue is full, or a request waited ``DLBOOK_MAX_WAIT_MS``. wrk cannot split latency by status, so beside
it a polite probe client sends one request at a time (every 20 ms, and after a 503 it waits what
``Retry-After`` says) and times accepted (200) answers on its own. Reported per level: answered and shed
per second, wrk's latency over all answers, the probe's p50/p99 of accepted answers and its share of
requests accepted, and the CPU the server and wrk used (cores busy: wrk shares the machine's cores, so
its share is what the server could not have), with the server CPU per answer, and the accepted
requests' p50/p99 from the server's histogram; then one refusal's CPU, measured on a second server
that refuses nearly everything (:func:`measured_refusal_cost`). The run fails (exit 1)
on any answer other than 200 or 503, any socket error or timeout, or a 503 without ``Retry-After``. Each
invocation writes its record to ``docs/bench/`` (``--record-dir``; see :mod:`loadtests.records`), a failed one too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests import records  # noqa: E402
from loadtests.http_bench import fashion_image, payloads  # noqa: E402
from loadtests.loadgen import run_wrk  # noqa: E402
from loadtests.servers import bentoml_service, cpu_seconds  # noqa: E402

PATH = "/classify_pixels"


def scrape(base: str) -> dict[str, Any]:
    """The server's count of shed requests on the benchmarked route, and its histogram of the time to
    answer the accepted ones (``dlbook_request_seconds``, status 200: upper bound → cumulative count)."""
    with urllib.request.urlopen(base + "/metrics", timeout=10) as answer:
        text = answer.read().decode()
    shed, buckets = 0.0, {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "dlbook_shed_total" and sample.labels.get("path") == PATH:
                shed += sample.value
            elif (sample.name == "dlbook_request_seconds_bucket" and sample.labels.get("path") == PATH
                  and sample.labels.get("status") == "200"):
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return {"shed": shed, "accepted_buckets": buckets}


def histogram_quantile_ms(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """The ``q`` quantile of what was observed between two scrapes of a cumulative histogram, in ms,
    interpolated within its bucket as Prometheus's ``histogram_quantile`` does (None: nothing observed)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank, lower, below = q * counts[-1], 0.0, 0.0
    for bound, cumulative in zip(bounds, counts, strict=True):
        if cumulative >= rank:
            if bound == float("inf"):
                return 1e3 * lower
            share = (rank - below) / max(cumulative - below, 1e-12)
            return 1e3 * (lower + (bound - lower) * share)
        lower, below = bound, cumulative
    return 1e3 * lower


class Probe(threading.Thread):
    """A polite client beside the load: one request at a time, every 20 ms, and after a 503 it waits what
    ``Retry-After`` says before the next. Its accepted latencies stand for any client's under the load,
    and its share of accepted requests says whether a well-behaved client gets through."""

    def __init__(self, base: str, body: bytes, period_s: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.base, self.body, self.period_s = base, body, period_s
        self.stop = threading.Event()
        self.accepted: list[float] = []
        self.shed = self.other = 0
        self.missing_retry_after = 0

    def run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=30) as client:
            while not self.stop.is_set():
                began = time.perf_counter()
                try:
                    answer = client.post(PATH, content=self.body, headers={"Content-Type": "application/json"})
                except httpx.HTTPError:
                    self.other += 1
                    continue
                seconds = time.perf_counter() - began
                if answer.status_code == 200:
                    self.accepted.append(seconds)
                elif answer.status_code == 503:
                    self.shed += 1
                    retry_after = answer.headers.get("retry-after")
                    self.missing_retry_after += retry_after is None
                    if retry_after and retry_after.isdigit():
                        self.stop.wait(float(retry_after))
                        continue
                else:
                    self.other += 1
                self.stop.wait(max(0.0, self.period_s - seconds))

    def percentile_ms(self, q: float) -> float | None:
        if not self.accepted:
            return None
        ordered = sorted(self.accepted)
        return 1e3 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def burst_has_retry_after(base: str, body: bytes, requests: int = 400) -> tuple[int, int]:
    """Fire ``requests`` at once; return (503s seen, 503s carrying Retry-After)."""
    limits = httpx.Limits(max_connections=requests)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        answers = await asyncio.gather(*[client.post(PATH, content=body, headers={"Content-Type": "application/json"})
                                         for _ in range(requests)], return_exceptions=True)
    shed = [a for a in answers if isinstance(a, httpx.Response) and a.status_code == 503]
    return len(shed), sum("retry-after" in a.headers for a in shed)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measured_refusal_cost(request: Any, env: dict[str, str], served_ms: float, duration_s: float) -> dict[str, float]:
    """The server CPU of one refusal, measured: a second server that lets one request execute and none
    wait (``DLBOOK_MAX_IN_FLIGHT=1 DLBOOK_MAX_WAITING=0``) under 32 connections refuses nearly all of
    them; its CPU beyond its few served requests (at ``served_ms`` each, the main server's figure at
    c=32), per refusal, is what a refusal costs, HTTP parsing and the socket writes included."""
    log = Path(tempfile.mkdtemp(prefix="dlbook-refusals-")) / "server.log"
    refusing = {**env, "DLBOOK_MAX_IN_FLIGHT": "1", "DLBOOK_MAX_WAITING": "0", "DLBOOK_MAX_QUEUE_MS": "0"}
    with bentoml_service("ImageService", log, refusing) as base:
        run_wrk(base, request, connections=8, duration_s=2, track_status=True)  # warm-up
        cpu = cpu_seconds(base)
        result = run_wrk(base, request, connections=32, duration_s=duration_s, threads=2, timeout_s=10,
                         track_status=True)
        cpu = cpu_seconds(base) - cpu
    ok, shed = result.statuses.get("200", 0), result.statuses.get("503", 0)
    refusal_ms = 1e3 * max(0.0, cpu - ok * served_ms / 1e3) / max(shed, 1)
    return {"served_ms": served_ms, "refusal_ms": refusal_ms, "ratio": refusal_ms / served_ms,
            "refused_per_s": shed / result.duration_s, "served_per_s": ok / result.duration_s,
            "server_cpu_s_per_s": cpu / result.duration_s, "method": "measured"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32, 128, 256])
    parser.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="settings for our service")
    parser.add_argument("--json", type=Path)
    records.add_arguments(parser)
    args = parser.parse_args()
    recording = records.begin("overload", args)

    request = payloads(fashion_image())["json"]
    env = {"DLBOOK_IMAGE_MODELS": "fashion-lenet", **dict(kv.split("=", 1) for kv in args.env)}
    log = Path(tempfile.mkdtemp(prefix="dlbook-overload-")) / "server.log"
    rows, failures = [], []
    with bentoml_service("ImageService", log, env) as base:
        run_wrk(base, request, connections=8, duration_s=3)  # warm-up
        for level in args.levels:
            before = scrape(base)
            server_cpu, wrk_cpu = cpu_seconds(base), _children_cpu_s()
            probe = Probe(base, request.body)
            probe.start()
            result = run_wrk(base, request, connections=level, duration_s=args.duration, threads=2,
                             timeout_s=10, track_status=True)
            wrk_cpu = _children_cpu_s() - wrk_cpu  # wrk is a waited-for child: its CPU lands here
            server_cpu = cpu_seconds(base) - server_cpu  # the probe's few requests included
            probe.stop.set()
            probe.join()
            after = scrape(base)
            ok, shed = result.statuses.get("200", 0), result.statuses.get("503", 0)
            others = {k: v for k, v in result.statuses.items() if k not in ("200", "503")}
            socket_errors = result.errors - result.statuses.get("503", 0) - sum(others.values())
            row = {"concurrency": level, "ok_per_s": ok / result.duration_s, "shed_per_s": shed / result.duration_s,
                   "shed_metric": after["shed"] - before["shed"], "other_statuses": others,
                   "socket_errors": socket_errors, "timeouts": result.timeouts, "p50_ms": result.p50,
                   "p99_ms": result.p99, "max_ms": result.max, "probe_accepted": len(probe.accepted),
                   "probe_shed": probe.shed, "probe_p50_ms": probe.percentile_ms(0.5),
                   "probe_p99_ms": probe.percentile_ms(0.99),
                   "accepted_p50_ms": histogram_quantile_ms(before["accepted_buckets"], after["accepted_buckets"], 0.5),
                   "accepted_p99_ms": histogram_quantile_ms(before["accepted_buckets"], after["accepted_buckets"],
                                                            0.99),
                   "server_cpu_s_per_s": server_cpu / result.duration_s, "wrk_cpu_s_per_s": wrk_cpu / result.duration_s,
                   "server_cpu_ms_per_answer": 1e3 * server_cpu / max(ok + shed, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if others or socket_errors or result.timeouts or probe.other or probe.missing_retry_after:
                failures.append(f"c={level}: statuses {others}, socket errors {socket_errors}, "
                                f"timeouts {result.timeouts}, probe failures {probe.other}, probe 503s "
                                f"without Retry-After {probe.missing_retry_after}")
        seen, with_header = asyncio.run(burst_has_retry_after(base, request.body))
        if seen != with_header:
            failures.append(f"{seen - with_header} of {seen} 503s had no Retry-After")

    served_rows = [r for r in rows if r["concurrency"] == 32] or rows[-1:]
    refusal = measured_refusal_cost(request, env, served_rows[0]["server_cpu_ms_per_answer"], args.duration)
    lines = ["| concurrency | answered 200/s | shed 503/s (metric) | other answers | socket errors / timeouts | "
             "p50 / p99 / max ms (all answers, wrk) | accepted p50 / p99 ms (server) | "
             "probe: accepted p50 / p99 ms (shed) | "
             "server / wrk CPU (cores) | server CPU ms per answer |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        probe_text = (f"{r['probe_p50_ms']:.1f} / {r['probe_p99_ms']:.1f} ({r['probe_shed']} of "
                      f"{r['probe_shed'] + r['probe_accepted']})" if r["probe_p50_ms"] else f"- ({r['probe_shed']})")
        lines.append(f"| {r['concurrency']} | {r['ok_per_s']:,.0f} | {r['shed_per_s']:,.0f} ({r['shed_metric']:.0f}) | "
                     f"{sum(r['other_statuses'].values())} | {r['socket_errors']} / {r['timeouts']} | "
                     f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f} / {r['max_ms']:.0f} | "
                     f"{r['accepted_p50_ms'] or 0:.1f} / {r['accepted_p99_ms'] or 0:.1f} | {probe_text} | "
                     f"{r['server_cpu_s_per_s']:.2f} / {r['wrk_cpu_s_per_s']:.2f} | "
                     f"{r['server_cpu_ms_per_answer']:.3f} |")
    print("\n".join(lines))
    if refusal:
        print(f"CPU of one refusal, measured: {refusal['refusal_ms']:.3f} ms against {refusal['served_ms']:.3f} ms "
              f"for one served request ({refusal['ratio']:.2f}×; {refusal['refused_per_s']:,.0f} refusals/s)")
    print(f"burst of 400 at once: {seen} shed, {with_header} with Retry-After")
    if args.json:
        args.json.write_text(json.dumps({"levels": rows, "burst": {"shed": seen, "retry_after": with_header},
                                         "failures": failures}, indent=2))
    records.write(recording, {"levels": rows, "burst": {"shed": seen, "retry_after": with_header},
                              "refusal_cost": refusal, "failures": failures, "passed": not failures,
                              "models": records.model_versions(["fashion-lenet"])})
    if failures:
        print("FAILED:", "; ".join(failures))
        sys.exit(1)


if __name__ == "__main__":
    main()
