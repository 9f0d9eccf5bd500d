"""How late a real event loop's timers run while it is blocked and after, as the load shedder sees it.

The figures ``serving.admission.LoopLag`` reports on this machine for a saturated worker (rounds of
work that never yield) and for the same loop idle afterwards. Measured and printed, never asserted:
``tests/test_http_errors.py`` checks the same scenario on a virtual clock, where it cannot depend on
the machine's speed or load::

    .venv/bin/python loadtests/event_loop_lag.py                 # 10 rounds of 40 ms, then 0.3 s idle
    .venv/bin/python loadtests/event_loop_lag.py --uvloop --repeats 5

Compare the busy figure with the shedding budget ``DLBOOK_MAX_QUEUE_MS`` (default 100 ms) and the idle
one with zero: on a machine shared with other work the idle loop's timers run late too.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.admission import LoopLag, queue_budget_s  # noqa: E402


async def scenario(rounds: int, block_s: float, idle_s: float) -> tuple[float, float]:
    """(lag after ``rounds`` blocks of ``block_s`` that never yield, lag after ``idle_s`` idle), in seconds."""
    lag = LoopLag()
    lag.ensure_running()
    for _ in range(rounds):
        time.sleep(block_s)  # work that never yields to the loop
        await asyncio.sleep(0)
    busy = lag.lag_s
    await asyncio.sleep(idle_s)
    return busy, lag.lag_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="blocking rounds (default 10)")
    parser.add_argument("--block-ms", type=float, default=40.0, help="length of each blocking round (default 40)")
    parser.add_argument("--idle-s", type=float, default=0.3, help="idle time after the rounds (default 0.3)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of the scenario, each on a new loop")
    parser.add_argument("--uvloop", action="store_true", help="on uvloop, as the served workers run")
    args = parser.parse_args(argv)
    loop_factory = None
    if args.uvloop:
        import uvloop

        loop_factory = uvloop.new_event_loop
    period_ms = LoopLag().period_s * 1e3
    print(f"LoopLag sampling every {period_ms:g} ms; {args.rounds} rounds of {args.block_ms:g} ms blocking work, "
          f"then {args.idle_s:g} s idle; {'uvloop' if args.uvloop else 'asyncio'} loop; "
          f"shedding budget DLBOOK_MAX_QUEUE_MS = {queue_budget_s() * 1e3:g} ms")
    busy_ms, idle_ms = [], []
    for run in range(1, args.repeats + 1):
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            busy, idle = runner.run(scenario(args.rounds, args.block_ms / 1e3, args.idle_s))
        busy_ms.append(busy * 1e3)
        idle_ms.append(idle * 1e3)
        print(f"run {run}: busy lag {busy_ms[-1]:7.2f} ms   idle lag {idle_ms[-1]:7.3f} ms")
    print(f"median: busy lag {statistics.median(busy_ms):7.2f} ms   idle lag {statistics.median(idle_ms):7.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
