"""Poem generation through HTTP, against the in-process ceiling measured in the same run.

    python loadtests/poem_http_bench.py --rounds 2 --streams 16 --json /tmp/poem_http.json

Per round, alternating which goes first:
- ceiling: the model's step graph plus our sampling code at batch ``streams`` in this process, no
  engine, no HTTP (what continuous batching could reach at best);
- one stream: a single ``/generate_poem_stream`` request alone (characters/s, time to first character);
- ``streams`` concurrent streaming requests: aggregate characters/s, per-stream characters/s and
  time to first character (p50/p99);
- ``streams`` concurrent plain ``/generate_poem`` requests: aggregate characters/s;
- the same ``streams`` plain requests one after another (what serving them without batching gives);
- ``streams`` requests kept in flight for ``--sustain`` seconds, streaming and then plain: each client
  asks for its next poem when the last ends, so the figure is the steady state at that concurrency,
  without the ramp of one burst (arrivals spread over tens of ms, a batch part full meanwhile).
Every poem is 8 lines of 7 characters; characters are counted with their marks (64 per poem), as the
model generates them. The server is PoemService with its defaults, on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests.poem_throughput import FORM, StepBench  # noqa: E402
from loadtests.servers import bentoml_service  # noqa: E402


def body(seed: int) -> dict:
    return {"chars_per_clause": FORM.chars_per_clause, "lines": FORM.lines, "seed": seed}


async def one_stream(client: httpx.AsyncClient, seed: int) -> dict:
    """Stream one poem; characters/s from request to ``done`` and time to the first character."""
    began = time.perf_counter()
    first, chars, poem = None, 0, None
    async with client.stream("POST", "/generate_poem_stream", json=body(seed)) as answer:
        answer.raise_for_status()
        event = None
        async for line in answer.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "token":
                chars += 1
                if first is None:
                    first = time.perf_counter() - began
            elif line.startswith("data: ") and event == "done":
                poem = json.loads(line[6:])["poems"][0]["poem"]
            elif line.startswith("data: ") and event == "error":
                raise RuntimeError(line)
    seconds = time.perf_counter() - began
    if poem is None or len(poem) != FORM.slots or chars != FORM.slots:
        raise RuntimeError(f"stream ended without a whole poem ({chars} characters, poem {poem!r})")
    return {"chars": chars, "seconds": seconds, "ttfc": first, "rate": chars / seconds}


async def one_plain(client: httpx.AsyncClient, seed: int) -> int:
    answer = await client.post("/generate_poem", json=body(seed))
    answer.raise_for_status()
    poem = answer.json()["poems"][0]["poem"]
    if len(poem) != FORM.slots:
        raise RuntimeError(f"poem of the wrong form: {poem!r}")
    return len(poem)


async def measure(base: str, streams: int, seed: int) -> dict[str, object]:
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        alone = await one_stream(client, seed)
        began = time.perf_counter()
        many = await asyncio.gather(*[one_stream(client, seed + 1 + i) for i in range(streams)])
        stream_rate = sum(m["chars"] for m in many) / (time.perf_counter() - began)
        began = time.perf_counter()
        plain = await asyncio.gather(*[one_plain(client, seed + 100 + i) for i in range(streams)])
        plain_rate = sum(plain) / (time.perf_counter() - began)
        began = time.perf_counter()
        total = 0
        for i in range(streams):
            total += await one_plain(client, seed + 200 + i)
        sequential_rate = total / (time.perf_counter() - began)
    rates = sorted(m["rate"] for m in many)
    ttfcs = sorted(m["ttfc"] for m in many)
    return {"one_stream_rate": alone["rate"], "one_stream_ttfc_ms": alone["ttfc"] * 1e3,
            "streaming_aggregate": stream_rate, "plain_aggregate": plain_rate, "sequential": sequential_rate,
            "per_stream_p50": statistics.median(rates), "per_stream_p01": rates[max(0, int(0.01 * len(rates)) - 1)],
            "ttfc_p50_ms": statistics.median(ttfcs) * 1e3, "ttfc_p99_ms": ttfcs[-1] * 1e3}


async def sustained(base: str, streams: int, seconds: float, seed: int, streaming: bool) -> float:
    """Aggregate characters/s with ``streams`` requests always in flight for ``seconds``: each of
    ``streams`` clients asks for the next poem as soon as its last one ends (a closed loop, as a load
    generator holds a concurrency). A single burst of ``streams`` requests also times their arrival
    and their staggered ends, when the batch is part full; held open, the batch stays near full."""
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        began = time.perf_counter()
        end = began + seconds

        async def client_loop(index: int) -> int:
            chars, n = 0, 0
            while time.perf_counter() < end:
                poem_seed = seed + index * 10_000 + n
                chars += (await one_stream(client, poem_seed))["chars"] if streaming else await one_plain(
                    client, poem_seed)
                n += 1
            return chars

        total = sum(await asyncio.gather(*[client_loop(i) for i in range(streams)]))
        return total / (time.perf_counter() - began)


async def measure_sustained(base: str, streams: int, seconds: float, seed: int) -> dict[str, float]:
    return {"sustained_sse": await sustained(base, streams, seconds, seed, True),
            "sustained_plain": await sustained(base, streams, seconds, seed + 500_000, False)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tang-poem")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="settings for our service")
    parser.add_argument("--sustain", type=float, default=10.0,
                        help="seconds to hold --streams requests in flight (SSE, then plain), per round")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    bench = StepBench(args.model)
    bench.ceiling(args.streams)  # warm-up
    log = Path(tempfile.mkdtemp(prefix="dlbook-poem-http-")) / "server.log"
    env = {"DLBOOK_POEM_MODELS": args.model, **dict(kv.split("=", 1) for kv in args.env)}
    rounds: list[dict] = []
    with bentoml_service("PoemService", log, env) as base:
        asyncio.run(measure(base, 2, 10_000))  # warm-up
        for r in range(args.rounds):
            if r % 2 == 0:
                ceiling = bench.ceiling(args.streams)
                served = asyncio.run(measure(base, args.streams, 1000 * (r + 1)))
                served |= asyncio.run(measure_sustained(base, args.streams, args.sustain, 1000 * (r + 1)))
            else:
                served = asyncio.run(measure_sustained(base, args.streams, args.sustain, 1000 * (r + 1)))
                served |= asyncio.run(measure(base, args.streams, 1000 * (r + 1)))
                ceiling = bench.ceiling(args.streams)
            rounds.append({"ceiling": ceiling, **served})
            print(json.dumps({k: round(v, 1) for k, v in rounds[-1].items()}), flush=True)

    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    print(f"\nmodel {args.model}, {args.streams} streams, {args.rounds} rounds (medians); characters include marks")
    print("| measurement | characters/s |\n|---|---|")
    print(f"| ceiling: step graph + our sampling at batch {args.streams}, in process | {med['ceiling']:,.0f} |")
    print(f"| 1 stream alone over HTTP (SSE) | {med['one_stream_rate']:,.0f} "
          f"(first character after {med['one_stream_ttfc_ms']:.0f} ms) |")
    print(f"| {args.streams} concurrent streams (SSE), aggregate | {med['streaming_aggregate']:,.0f} "
          f"(**{med['streaming_aggregate'] / med['ceiling']:.2f}×** ceiling, "
          f"**{med['streaming_aggregate'] / med['sequential']:.2f}×** sequential) |")
    print(f"| — per stream p50 / slowest | {med['per_stream_p50']:,.0f} / {med['per_stream_p01']:,.0f}; first "
          f"character p50 {med['ttfc_p50_ms']:.0f} ms, slowest {med['ttfc_p99_ms']:.0f} ms |")
    print(f"| {args.streams} concurrent plain requests, aggregate | {med['plain_aggregate']:,.0f} "
          f"(**{med['plain_aggregate'] / med['ceiling']:.2f}×** ceiling) |")
    print(f"| the same {args.streams} plain requests one after another | {med['sequential']:,.0f} |")
    for key, what in (("sustained_sse", "SSE"), ("sustained_plain", "plain")):
        print(f"| {args.streams} {what} requests kept in flight for {args.sustain:.0f} s, aggregate | "
              f"{med[key]:,.0f} (**{med[key] / med['ceiling']:.2f}×** ceiling, "
              f"**{med[key] / med['sequential']:.2f}×** sequential) |")
    if args.json:
        args.json.write_text(json.dumps({"rounds": rounds, "median": med}, indent=2))


if __name__ == "__main__":
    main()
