"""Soak test (issue 7): ten minutes of mixed Locust load, then a verdict on failures and memory growth.

    flock /tmp/dlbook-bench.lock env BENTOML_HOME=/tmp/bhome .venv/bin/python loadtests/soak.py

Starts ``bentoml serve serving.service:DlbookService`` on a free 127.0.0.1 port (or uses ``--url``),
runs ``loadtests/locustfile.py`` headless against it (every endpoint, 5% malformed requests that must
get their 4xx), and samples the resident memory of the server's process tree (the arbiter and its
``_bentoml_impl.worker.service`` workers) every few seconds. Criteria, all required:

- requests were served, and none failed unexpectedly (a malformed request answered with its 4xx is
  a success; see the locustfile);
- the workers were never restarted (a restart would reset memory and hide a crash);
- tree RSS at the end is within ``--rss-tolerance`` (10%) of the RSS after ``--warmup`` seconds:
  caches and allocator pools fill during warm-up, a leak keeps growing after it.

Writes ``soak.json``, ``soak.md``, Locust's CSVs and HTML report to ``--out`` (scratch, git-ignored),
and the invocation's small record (the summary and the RSS samples) to ``docs/bench/`` (``--record-dir``;
see :mod:`loadtests.records`), from which ``python -m loadtests.report`` writes docs/RELIABILITY.md's
table; exits 1 when a criterion fails. Locust's own p95 verdict is reported but not enforced here: latency is the load
tests' business, this run is about staying up and flat.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests import records  # noqa: E402
from loadtests.servers import stop_server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORKER_MARK = "_bentoml_impl.worker.service"


# ---- the server ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ready(url: str) -> bool:
    with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/readyz", timeout=5) as answer:
        return answer.status == 200
    return False


@contextlib.contextmanager
def started_server(service: str, log: Path) -> Iterator[tuple[str, int]]:
    """``bentoml serve`` in its own session until /readyz answers; yields (URL, arbiter pid); stops it after."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", f"serving.service:{service}", "--host", "127.0.0.1",
             "--port", str(port)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
            env={"BENTOML_DO_NOT_TRACK": "True", **os.environ}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while not ready(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{service} did not become ready:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url, proc.pid
    finally:
        workers = server_tree(proc.pid)
        stop_server(proc, 30, workers)  # workers run in sessions of their own; none may outlive the soak


def arbiter_for(url: str) -> int:
    """The pid of the ``bentoml serve`` arbiter listening on ``url``'s port (for ``--url`` runs)."""
    port = urlparse(url).port or 80
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            proc = psutil.Process(conn.pid)
            while proc.parent() is not None and "bentoml" in " ".join(proc.parent().cmdline()):
                proc = proc.parent()
            return proc.pid
    raise SystemExit(f"no process of this user listens on port {port}; pass --pid")


def server_tree(arbiter: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(arbiter)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


# ---- memory sampling -------------------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float  # seconds since the load started
    rss_mb: float  # the whole tree
    workers: dict[int, float]  # worker pid → RSS MB


@dataclass
class Sampler:
    """Samples the tree's RSS every ``interval`` seconds in a thread until stopped."""

    arbiter: int
    interval: float
    samples: list[Sample] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def take(self, began: float) -> None:
        total, workers = 0.0, {}
        for proc in server_tree(self.arbiter):
            try:
                rss = proc.memory_info().rss / 2**20
                is_worker = WORKER_MARK in " ".join(proc.cmdline())
            except psutil.NoSuchProcess:
                continue
            total += rss
            if is_worker:
                workers[proc.pid] = round(rss, 1)
        self.samples.append(Sample(round(time.monotonic() - began, 1), round(total, 1), workers))

    def run(self, began: float) -> None:
        while not self.stop.wait(self.interval):
            self.take(began)


# ---- the load --------------------------------------------------------------------------------------------------


def run_locust(url: str, args: argparse.Namespace, out: Path) -> int:
    env = {**os.environ, "DLBOOK_LT_MALFORMED_SHARE": str(args.malformed), "DLBOOK_LT_SERVICE": "all"}
    cmd = [sys.executable, "-m", "locust", "-f", str(REPO / "loadtests" / "locustfile.py"), "--headless",
           "--users", str(args.users), "--spawn-rate", str(args.spawn_rate), "--run-time", f"{args.seconds}s",
           "--stop-timeout", "30", "--host", url, "--csv", str(out / "soak"), "--html", str(out / "soak.html"),
           "--only-summary"]
    with open(out / "locust.log", "w") as log:
        return subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode


def locust_rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "soak_stats.csv", newline="") as fh:
        return {row["Name"]: row for row in csv.DictReader(fh)}


# ---- verdict ---------------------------------------------------------------------------------------------------


def rss_at(samples: list[Sample], t: float) -> Sample:
    """The first sample at or after ``t`` seconds (the last one if the run was shorter)."""
    return next((s for s in samples if s.t >= t), samples[-1])


def summarise(args: argparse.Namespace, samples: list[Sample], rows: dict[str, dict[str, str]],
              locust_code: int, command: str) -> dict:
    total = rows["Aggregated"]
    requests, failures = int(total["Request Count"]), int(total["Failure Count"])
    under_load = [s for s in samples if s.t <= args.seconds]
    warm, end = rss_at(under_load, args.warmup), under_load[-1]
    growth = (end.rss_mb - warm.rss_mb) / warm.rss_mb
    worker_sets = {tuple(sorted(s.workers)) for s in samples if s.workers}
    criteria = {
        "requests served": requests > 0,
        "no unexpected failures": failures == 0,
        "workers never restarted": len(worker_sets) == 1,
        f"RSS flat within {args.rss_tolerance:.0%} after warm-up": abs(growth) <= args.rss_tolerance,
    }
    endpoints = {name: {"requests": int(r["Request Count"]), "failures": int(r["Failure Count"]),
                        "p50_ms": float(r["50%"]), "p95_ms": float(r["95%"]), "rps": round(float(r["Requests/s"]), 2)}
                 for name, r in rows.items() if name != "Aggregated"}
    malformed = sum(e["requests"] for name, e in endpoints.items() if name.endswith("(malformed)"))
    return {
        "command": command,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "record_dir", "no_record")},
        "requests": requests, "failures": failures, "malformed_requests": malformed,
        "malformed_share": round(malformed / max(requests, 1), 4),
        "rps": round(float(total["Requests/s"]), 2),
        "rss_mb": {"after_warmup": warm.rss_mb, "after_warmup_at_s": warm.t, "end": end.rss_mb, "end_at_s": end.t,
                   "max": max(s.rss_mb for s in under_load), "growth": round(growth, 4)},
        "worker_pids": sorted({pid for s in samples for pid in s.workers}),
        "locust_slo_exit_code": locust_code,
        "criteria": criteria, "passed": all(criteria.values()),
        "endpoints": endpoints,
        "samples": [asdict(s) for s in samples],
    }


def markdown(summary: dict) -> str:
    rss = summary["rss_mb"]
    lines = [
        f"# Soak: {'PASSED' if summary['passed'] else 'FAILED'}", "",
        f"Command: `{summary['command']}`", "",
        f"- requests: {summary['requests']} ({summary['rps']} req/s), unexpected failures: {summary['failures']}, "
        f"malformed (answered 4xx as expected): {summary['malformed_requests']} ({summary['malformed_share']:.1%})",
        f"- server tree RSS: {rss['after_warmup']} MB at {rss['after_warmup_at_s']} s (after warm-up), "
        f"{rss['end']} MB at {rss['end_at_s']} s (end), max {rss['max']} MB, growth {rss['growth']:+.1%}",
        f"- worker pids: {summary['worker_pids']}; Locust p95 SLO exit code: {summary['locust_slo_exit_code']}",
        "", "| criterion | met |", "|---|---|",
        *[f"| {name} | {'yes' if met else '**no**'} |" for name, met in summary["criteria"].items()],
        "", "| endpoint | requests | failures | p50 ms | p95 ms | req/s |", "|---|---:|---:|---:|---:|---:|",
        *[f"| {name} | {e['requests']} | {e['failures']} | {e['p50_ms']:.0f} | {e['p95_ms']:.0f} | {e['rps']} |"
          for name, e in summary["endpoints"].items()],
    ]
    return "\n".join(lines) + "\n"


def record_result(summary: dict) -> dict:
    """The record keeps the summary, with the RSS samples as [seconds, tree MB, workers] rows."""
    kept = {k: v for k, v in summary.items() if k not in ("samples", "command", "settings")}
    kept["samples"] = [[s["t"], s["rss_mb"], len(s["workers"])] for s in summary["samples"]]
    return kept


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="soak a running server instead of starting one")
    parser.add_argument("--pid", type=int, help="its arbiter pid (found from the port when omitted)")
    parser.add_argument("--service", default="DlbookService")
    parser.add_argument("--seconds", type=int, default=600)
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--spawn-rate", type=float, default=2)
    parser.add_argument("--malformed", type=float, default=0.05, help="share of malformed requests")
    parser.add_argument("--warmup", type=float, default=60, help="seconds before the reference RSS sample")
    parser.add_argument("--interval", type=float, default=5, help="seconds between RSS samples")
    parser.add_argument("--rss-tolerance", type=float, default=0.10)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "soak" / time.strftime("%Y%m%d-%H%M%S"),
                        help="Locust's CSVs and HTML, the server log, soak.json and soak.md (scratch)")
    records.add_arguments(parser)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    recording = records.begin("soak", args)
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    with contextlib.ExitStack() as stack:
        if args.url:
            url, arbiter = args.url.rstrip("/"), args.pid or arbiter_for(args.url)
        else:
            url, arbiter = stack.enter_context(started_server(args.service, args.out / "server.log"))
        sampler = Sampler(arbiter, args.interval)
        began = time.monotonic()
        sampler.take(began)
        thread = threading.Thread(target=sampler.run, args=(began,), daemon=True)
        thread.start()
        locust_code = run_locust(url, args, args.out)
        sampler.stop.set()
        thread.join()
        sampler.take(began)
    summary = summarise(args, sampler.samples, locust_rows(args.out), locust_code, command)
    (args.out / "soak.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    (args.out / "soak.md").write_text(markdown(summary))
    print(markdown(summary))
    print(f"reports in {args.out}")
    records.write(recording, record_result(summary))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
