"""Profile the served worker under load: py-spy samples of its event loop while wrk sends requests.

    python loadtests/profile_served.py --connections 32 --duration 12
    python loadtests/profile_served.py --payload png --connections 1 --env DLBOOK_INLINE_ROWS=0

Starts ``ImageService`` (fashion-lenet, one ORT intra-op thread unless ``--env`` says otherwise) and the
bare Starlette + ORT endpoint of :mod:`loadtests.bare_server`, loads each with wrk, attaches py-spy
(``--nonblocking``: the sampled process is never paused) to the process doing the work, and prints, for
the event-loop thread and for the other threads (ORT's batches in a worker thread), the share of samples
each function was on the stack (inclusive) and at its top (self). Idle samples (the loop waiting on its
sockets) are not counted, so the shares are of the time the thread was busy.

A profile is for finding where to look, not a figure to publish: sampling shares move between runs,
and py-spy costs the sampled process a little. What a change is worth is measured by
``loadtests/request_cpu.py`` (CPU per request, in process) and ``loadtests/http_bench.py`` (over HTTP).
``--raw DIR`` keeps py-spy's raw stacks (one line per stack) for flame graphs.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests import records  # noqa: E402
from loadtests.http_bench import fashion_image, payloads  # noqa: E402
from loadtests.loadgen import run_wrk  # noqa: E402
from loadtests.servers import _PIDS, bare_service, bentoml_service, cpu_seconds  # noqa: E402


def py_spy() -> str:
    """py-spy from the virtualenv that runs this script (it is in constraints.txt), else from PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else "py-spy"


def busiest(base: str, request, connections: int) -> int:
    """The pid of the server's process that works hardest under load (BentoML's worker, not its arbiter)."""
    import psutil

    root = psutil.Process(_PIDS[base])
    procs = [root, *root.children(recursive=True)]
    before = {p.pid: sum(p.cpu_times()[:2]) for p in procs}
    run_wrk(base, request, connections=connections, duration_s=2)
    return max(procs, key=lambda p: sum(p.cpu_times()[:2]) - before[p.pid]).pid


def shares(raw: Path, top: int) -> dict[str, list[tuple[str, float, float]]]:
    """Per thread kind ("event loop", "other threads"): (function, inclusive share, self share), busiest first.

    py-spy's ``--threads`` puts the thread id first on every stack; the event loop is the thread whose
    stacks run uvicorn's server (coroutines sampled between awaits can show only their innermost frames,
    so the thread id, not the stack's root, says which thread a sample is from)."""
    stacks = []
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        thread, _, rest = stack.partition(";")
        stacks.append((thread, rest.split(";"), int(count)))
    loop_threads = {thread for thread, frames, _ in stacks if any("Server.run" in f for f in frames)}
    inclusive: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    own: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    for thread, frames, count in stacks:
        kind = "event loop" if thread in loop_threads else "other threads"
        totals[kind] += count
        own[kind][frames[-1]] += count
        for frame in set(frames):
            inclusive[kind][frame] += count
    return {kind: [(frame, n / totals[kind], own[kind][frame] / totals[kind])
                   for frame, n in inclusive[kind].most_common(top)] for kind in sorted(totals)}


def profile(label: str, server, request, args: argparse.Namespace, raw_dir: Path) -> None:
    with server as base:
        run_wrk(base, request, connections=args.connections, duration_s=3)  # warm-up
        pid = busiest(base, request, args.connections)
        raw = raw_dir / f"{label}-{args.payload}-c{args.connections}.txt"
        spy = subprocess.Popen([py_spy(), "record", "--pid", str(pid), "--duration", str(int(args.duration) + 2),
                                "--rate", "250", "--format", "raw", "--nonblocking", "--threads", "-o", str(raw)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
        cpu = cpu_seconds(base)
        result = run_wrk(base, request, connections=args.connections, duration_s=args.duration)
        cpu = cpu_seconds(base) - cpu
        spy.wait()
    print(f"\n## {label}: {result.rps:,.0f} req/s, p50 {result.p50:.2f} ms, p99 {result.p99:.2f} ms, "
          f"server CPU {1e3 * cpu / max(result.requests, 1):.3f} ms/request (py-spy attached)")
    for kind, rows in shares(raw, args.top).items():
        print(f"\n{kind}: inclusive / self share of busy samples")
        for frame, inclusive, own in rows:
            print(f"  {100 * inclusive:5.1f}% {100 * own:5.1f}%  {frame[:130]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--payload", choices=("json", "png"), default="json")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=12.0)
    parser.add_argument("--top", type=int, default=40, help="functions listed per thread kind")
    parser.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="settings for our service")
    parser.add_argument("--no-bare", action="store_true", help="profile our service only")
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw stacks in this folder")
    args = parser.parse_args(argv)
    request = payloads(fashion_image())[args.payload]
    env = {"DLBOOK_IMAGE_MODELS": "fashion-lenet", "DLBOOK_ORT_INTRA_THREADS": "1",
           **dict(kv.split("=", 1) for kv in args.env)}
    raw_dir = args.raw or Path(tempfile.mkdtemp(prefix="dlbook-profile-"))
    raw_dir.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="dlbook-profile-logs-"))
    with records.bench_lock():
        profile("served", bentoml_service("ImageService", logs / "served.log", env), request, args, raw_dir)
        if not args.no_bare:
            profile("bare", bare_service("fashion-lenet", logs / "bare.log", 1), request, args, raw_dir)
    print(f"\nraw stacks: {raw_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
