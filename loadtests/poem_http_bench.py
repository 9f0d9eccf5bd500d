"""Poem generation through HTTP, against the in-process ceiling measured in the same run.

    python loadtests/poem_http_bench.py --rounds 2 --streams 16

Per round, alternating which goes first:
- ceiling: the model's step graph plus our sampling code at batch ``streams`` in this process, no
  engine, no HTTP (what continuous batching could reach at best), batch after batch for ``--sustain``
  seconds;
- one stream: a single ``/generate_poem_stream`` request alone (characters/s, time to first character);
- ``streams`` concurrent streaming requests: aggregate characters/s, per-stream characters/s and
  time to first character (p50/p99);
- ``streams`` concurrent plain ``/generate_poem`` requests: aggregate characters/s;
- the same ``streams`` plain requests one after another (what serving them without batching gives);
- ``streams`` requests kept in flight for ``--sustain`` seconds, streaming and then plain: each client
  asks for its next poem when the last ends, so the figure is the steady state at that concurrency,
  without the ramp of one burst (arrivals spread over tens of ms, a batch part full meanwhile).
Every poem is 8 lines of 7 characters; characters are counted with their marks (64 per poem), as the
model generates them. ``--rhyme auto --tones strict`` asks every poem to rhyme and keep the 近体
pattern (the decoding masks of issue 22); the ceiling is then still the unconstrained one. The
server is PoemService with its defaults, on 127.0.0.1.

The load generator shares this machine's cores with the server, so it has to be light: by default
each simulated user is a keep-alive connection of :mod:`loadtests.lean_http` (0.06 of a core for 16 SSE
streams, where httpx took 0.25 and slowed the server's decoding step by a third). ``--client httpx``
measures with httpx, for comparison with earlier figures; ``--compare-httpx`` adds, per round, the
held-in-flight measurement with httpx as well (an A/B of the two clients on the same server). Either
way every stream is checked: its characters must spell the poem of its ``done`` event (lean) or
number 64 (httpx). Each invocation writes its record to ``docs/bench/`` (``--record-dir``; see
:mod:`loadtests.records`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests import records  # noqa: E402
from loadtests.lean_http import LeanConnection  # noqa: E402
from loadtests.poem_throughput import FORM, StepBench  # noqa: E402
from loadtests.servers import bentoml_service  # noqa: E402

REQUEST_TIMEOUT_S = 120.0


# --rhyme / --tones: sent with every request (empty: the fields are left out, as before issue 22)
SOUND: dict[str, str] = {}


def body(seed: int) -> dict:
    return {"chars_per_clause": FORM.chars_per_clause, "lines": FORM.lines, "seed": seed, **SOUND}


def _check_poem(poem: str | None, chars: int) -> None:
    if poem is None or len(poem) != FORM.slots or chars != FORM.slots:
        raise RuntimeError(f"stream ended without a whole poem ({chars} characters, poem {poem!r})")


class HttpxUser:
    """One simulated user on a shared httpx client (the benchmark's client before ``lean_http``)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def stream(self, seed: int) -> dict:
        """Stream one poem; characters/s from request to ``done`` and time to the first character."""
        began = time.perf_counter()
        first, chars, poem = None, 0, None
        async with self.client.stream("POST", "/generate_poem_stream", json=body(seed)) as answer:
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
        _check_poem(poem, chars)
        return {"chars": chars, "seconds": seconds, "ttfc": first, "rate": chars / seconds}

    async def plain(self, seed: int) -> int:
        answer = await self.client.post("/generate_poem", json=body(seed))
        answer.raise_for_status()
        poem = answer.json()["poems"][0]["poem"]
        _check_poem(poem, len(poem))
        return len(poem)


class LeanUser:
    """One simulated user on a keep-alive connection of its own (:mod:`loadtests.lean_http`)."""

    def __init__(self, base: str) -> None:
        self.connection = LeanConnection(base)

    async def stream(self, seed: int) -> dict:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):  # a stalled server fails the run, as httpx's timeout did
            answer = await self.connection.stream_poem("/generate_poem_stream", body(seed))
        _check_poem(answer.poem, answer.tokens)
        return {"chars": answer.tokens, "seconds": answer.seconds, "ttfc": answer.first_token_s,
                "rate": answer.tokens / answer.seconds}

    async def plain(self, seed: int) -> int:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            poem = (await self.connection.post_json("/generate_poem", body(seed)))["poems"][0]["poem"]
        _check_poem(poem, len(poem))
        return len(poem)


@contextlib.asynccontextmanager
async def users(kind: str, base: str, count: int) -> AsyncIterator[list]:
    """``count`` simulated users of the ``kind`` of client (``lean`` or ``httpx``)."""
    if kind == "httpx":
        limits = httpx.Limits(max_connections=count + 4)
        async with httpx.AsyncClient(base_url=base, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
            yield [HttpxUser(client) for _ in range(count)]
        return
    lean = [LeanUser(base) for _ in range(count)]
    try:
        yield lean
    finally:
        for user in lean:
            await user.connection.close()


async def measure(kind: str, base: str, streams: int, seed: int) -> dict[str, object]:
    async with users(kind, base, streams) as crowd:
        alone = await crowd[0].stream(seed)
        began = time.perf_counter()
        many = await asyncio.gather(*[u.stream(seed + 1 + i) for i, u in enumerate(crowd)])
        stream_rate = sum(m["chars"] for m in many) / (time.perf_counter() - began)
        began = time.perf_counter()
        plain = await asyncio.gather(*[u.plain(seed + 100 + i) for i, u in enumerate(crowd)])
        plain_rate = sum(plain) / (time.perf_counter() - began)
        began = time.perf_counter()
        total = 0
        for i in range(streams):
            total += await crowd[0].plain(seed + 200 + i)
        sequential_rate = total / (time.perf_counter() - began)
    rates = sorted(m["rate"] for m in many)
    ttfcs = sorted(m["ttfc"] for m in many)
    return {"one_stream_rate": alone["rate"], "one_stream_ttfc_ms": alone["ttfc"] * 1e3,
            "streaming_aggregate": stream_rate, "plain_aggregate": plain_rate, "sequential": sequential_rate,
            "per_stream_p50": statistics.median(rates), "per_stream_p01": rates[max(0, int(0.01 * len(rates)) - 1)],
            "ttfc_p50_ms": statistics.median(ttfcs) * 1e3, "ttfc_p99_ms": ttfcs[-1] * 1e3}


async def sustained(kind: str, base: str, streams: int, seconds: float, seed: int, streaming: bool) -> float:
    """Aggregate characters/s with ``streams`` requests always in flight for ``seconds``: each of
    ``streams`` clients asks for the next poem as soon as its last one ends (a closed loop, as a load
    generator holds a concurrency). A single burst of ``streams`` requests also times their arrival
    and their staggered ends, when the batch is part full; held open, the batch stays near full."""
    async with users(kind, base, streams) as crowd:
        began = time.perf_counter()
        end = began + seconds

        async def client_loop(index: int, user) -> int:
            chars, n = 0, 0
            while time.perf_counter() < end:
                poem_seed = seed + index * 10_000 + n
                chars += (await user.stream(poem_seed))["chars"] if streaming else await user.plain(poem_seed)
                n += 1
            return chars

        total = sum(await asyncio.gather(*[client_loop(i, u) for i, u in enumerate(crowd)]))
        return total / (time.perf_counter() - began)


async def measure_sustained(kind: str, base: str, streams: int, seconds: float, seed: int, also_httpx: bool = False
                            ) -> dict[str, float]:
    """Held in flight, SSE then plain; with ``also_httpx``, the same again with httpx as the client."""
    result = {"sustained_sse": await sustained(kind, base, streams, seconds, seed, True),
              "sustained_plain": await sustained(kind, base, streams, seconds, seed + 500_000, False)}
    if also_httpx:
        result |= {"sustained_sse_httpx": await sustained("httpx", base, streams, seconds, seed + 700_000, True),
                   "sustained_plain_httpx": await sustained("httpx", base, streams, seconds, seed + 900_000, False)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tang-poem")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="settings for our service")
    parser.add_argument("--sustain", type=float, default=10.0,
                        help="seconds to hold --streams requests in flight (SSE, then plain), per round")
    parser.add_argument("--client", choices=("lean", "httpx"), default="lean",
                        help="the load generator's HTTP client: lean (asyncio streams, loadtests/lean_http.py) "
                             "or httpx (what this benchmark used before; it takes 0.25 of a core for 16 streams)")
    parser.add_argument("--compare-httpx", action="store_true",
                        help="each round also holds the requests in flight with httpx as the client (A/B, same server)")
    parser.add_argument("--rhyme", default="off",
                        help="rhyme of every poem requested: off, auto or a 平水韵 group such as 阳 (the served "
                             "model needs its sound tables); the in-process ceiling stays unconstrained")
    parser.add_argument("--tones", choices=("off", "loose", "strict"), default="off",
                        help="tones of every poem requested (平仄): off, loose or strict")
    parser.add_argument("--json", type=Path)
    records.add_arguments(parser)
    args = parser.parse_args()
    SOUND.update({k: v for k, v in (("rhyme", args.rhyme), ("tones", args.tones)) if v != "off"})
    recording = records.begin("poem-http", args)

    bench = StepBench(args.model)
    bench.ceiling(args.streams, 1.0)  # warm-up
    log = Path(tempfile.mkdtemp(prefix="dlbook-poem-http-")) / "server.log"
    env = {"DLBOOK_POEM_MODELS": args.model, **dict(kv.split("=", 1) for kv in args.env)}
    rounds: list[dict] = []
    with bentoml_service("PoemService", log, env) as base:
        asyncio.run(measure(args.client, base, 2, 10_000))  # warm-up
        for r in range(args.rounds):
            if r % 2 == 0:
                ceiling = bench.ceiling(args.streams, args.sustain)
                served = asyncio.run(measure(args.client, base, args.streams, 1000 * (r + 1)))
                served |= asyncio.run(measure_sustained(args.client, base, args.streams, args.sustain,
                                                         1000 * (r + 1), args.compare_httpx))
            else:
                served = asyncio.run(measure_sustained(args.client, base, args.streams, args.sustain,
                                                        1000 * (r + 1), args.compare_httpx))
                served |= asyncio.run(measure(args.client, base, args.streams, 1000 * (r + 1)))
                ceiling = bench.ceiling(args.streams, args.sustain)
            rounds.append({"ceiling": ceiling, **served})
            print(json.dumps({k: round(v, 1) for k, v in rounds[-1].items()}), flush=True)

    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    print(f"\nmodel {args.model}, {args.streams} streams, {args.rounds} rounds (medians), {args.client} client; "
          f"rhyme {args.rhyme}, tones {args.tones}; characters include marks")
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
    rows = [("sustained_sse", "SSE"), ("sustained_plain", "plain")]
    if args.compare_httpx:
        rows += [("sustained_sse_httpx", "SSE (httpx client)"), ("sustained_plain_httpx", "plain (httpx client)")]
    for key, what in rows:
        print(f"| {args.streams} {what} requests kept in flight for {args.sustain:.0f} s, aggregate | "
              f"{med[key]:,.0f} (**{med[key] / med['ceiling']:.2f}×** ceiling, "
              f"**{med[key] / med['sequential']:.2f}×** sequential) |")
    if args.json:
        args.json.write_text(json.dumps({"rounds": rounds, "median": med}, indent=2))
    records.write(recording, {"median": med, "rounds": rounds, "models": records.model_versions([args.model])})


if __name__ == "__main__":
    main()
