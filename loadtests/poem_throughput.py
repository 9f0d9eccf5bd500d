"""Poem generation throughput, in process: the engine against its own ceiling, A/B alternated.

    python loadtests/poem_throughput.py [--model tang-poem] [--rounds 3] [--streams 16]

Three measurements per round, alternated so drift on a shared machine hits all of them alike:
- ceiling: the exported step graph plus our sampling code at batch ``streams``, a plain loop, no
  engine, no asyncio: the most continuous batching could reach here;
- batched: ``streams`` concurrent poems through ``PoemEngine`` (continuous batching, in its decoding
  process, as the service runs it);
- one by one: the same poems through the engine, sequentially.
Each poem is 8 lines of 7 characters (64 tokens with marks). Figures are characters per second.
Each invocation writes its record to ``docs/bench/`` (``--record-dir``; see :mod:`loadtests.records`).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests import records  # noqa: E402
from preprocessing import Vocabulary  # noqa: E402
from serving.model_store import locate_exported  # noqa: E402
from serving.poem_engine import PoemEngine  # noqa: E402
from serving.poem_sampling import PoemForm, PoemSampler, SamplingParams, advance_all, plan_poem  # noqa: E402
from serving.runtime import OnnxModel  # noqa: E402

FORM = PoemForm(7, 8)


class StepBench:
    """The exported step graph of a poem model with our sampling code, driven by a plain loop."""

    def __init__(self, model: str) -> None:
        exported = locate_exported(model)  # the version and graph serving would pick (pins, DLBOOK_PREFER_INT8)
        meta = exported.meta
        self.vocab = Vocabulary.from_dict(meta["preprocessing"]["vocab"])
        self.layers, self.hidden = meta["config"]["num_layers"], meta["config"]["hidden_size"]
        self.graph = exported.graph
        self.onnx = OnnxModel(exported.graph)
        self.plan = plan_poem(FORM, self.vocab)

    def samplers(self, streams: int, offset: int) -> list[PoemSampler]:
        return [PoemSampler(self.plan, self.vocab, SamplingParams(), seed=offset + i) for i in range(streams)]

    def ceiling(self, streams: int, seconds: float = 3.0) -> float:
        """Characters/s (marks included) of batches of ``streams`` poems decoded together, one batch
        after another for at least ``seconds``: no engine, no asyncio, no HTTP.

        One batch of 16 poems lasts ~0.2 s, too short on a shared machine (single batches of the same
        code ranged 5,267–7,538 characters/s); the served figures it is compared with last seconds too.
        """
        chars, batches = 0, 0
        began = time.perf_counter()
        while batches == 0 or time.perf_counter() - began < seconds:
            batch = self.samplers(streams, batches * streams)
            state = np.zeros((self.layers, len(batch), self.hidden), np.float32)
            while not batch[0].done:
                tokens = np.array([s.next_input for s in batch], np.int64)
                logits, state = self.onnx.run({"token": tokens, "hidden": state})
                advance_all(batch, logits)
            chars += FORM.slots * len(batch)
            batches += 1
        return chars / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tang-poem")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=16)
    records.add_arguments(parser)
    args = parser.parse_args()
    recording = records.begin("poem-throughput", args)

    bench = StepBench(args.model)
    onnx = bench.onnx

    def samplers(offset: int) -> list[PoemSampler]:
        return bench.samplers(args.streams, offset)

    def ceiling() -> float:
        return bench.ceiling(args.streams)

    engine = PoemEngine(bench.graph, bench.vocab, bench.layers, bench.hidden)  # a decoding process, as served
    engine.start()

    async def batched() -> float:
        began = time.perf_counter()
        poems = await asyncio.gather(*[engine.generate(s) for s in samplers(100)])
        return sum(map(len, poems)) / (time.perf_counter() - began)

    async def one_by_one() -> float:
        began = time.perf_counter()
        total = 0
        for s in samplers(200):
            total += len(await engine.generate(s))
        return total / (time.perf_counter() - began)

    async def run() -> dict[str, list[float]]:
        await batched()  # warm-up
        results: dict[str, list[float]] = {"ceiling": [], "batched": [], "one_by_one": []}
        for _ in range(args.rounds):
            results["ceiling"].append(ceiling())
            results["batched"].append(await batched())
            results["one_by_one"].append(await one_by_one())
        return results

    try:
        results = asyncio.run(run())
    finally:
        engine.stop()
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"model {args.model}, {args.streams} streams, {args.rounds} rounds, provider {onnx.provider}")
    for key, values in results.items():
        print(f"  {key:11} median {med[key]:8.0f} chars/s   rounds: {', '.join(f'{v:.0f}' for v in values)}")
    print(f"  batched / ceiling    = {med['batched'] / med['ceiling']:.2f}  (target ≥ 0.7)")
    print(f"  batched / one_by_one = {med['batched'] / med['one_by_one']:.2f}  (target ≥ 3)")
    records.write(recording, {"median": med, "rounds": results, "provider": onnx.provider,
                              "models": records.model_versions([args.model])})


if __name__ == "__main__":
    main()
