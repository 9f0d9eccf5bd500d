"""Shared by the runtime benchmark and the int8 report: real inputs and alternated timing.

Inputs are real held-out data (the official test split, the house holdout, held-out poems) prepared
by the same preprocessing objects serving rebuilds from ``meta.json`` (``PixelScaling``,
``FeatureSpec``, ``Vocabulary``), so a timing is of the call a request would make.

Timing alternates the contenders within every round (A B C, then B C A, …) instead of running all of
A before all of B: on a shared 2-core machine a neighbour's job that starts half-way then slows every
contender alike, and the spread across rounds shows how much the machine moved.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from preprocessing import FeatureSpec, PixelScaling, Vocabulary

DEFAULT_MODELS = ("digits-mlp", "fashion-lenet", "house-price", "tang-poem")
POEM_PREFILL = 8  # held-out poems are fed this many tokens (bos + first clause) before the timed step

StepFn = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


def resolve_threads(threads: int | None = None) -> int:
    """The intra-op thread count for every runtime: serving's ``DLBOOK_ORT_INTRA_THREADS`` when set
    (non-zero), else one per CPU, which is what ORT's and torch's own defaults pick on this machine."""
    if threads:
        return threads
    return int(os.environ.get("DLBOOK_ORT_INTRA_THREADS", "0")) or os.cpu_count() or 1


def cpu_name() -> str:
    """The CPU model, for the header of a benchmark table."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    for line in lines:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# ----- held-out data ------------------------------------------------------------------------------


@cache
def image_test(dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """The official test split: ``uint8 [N, 28, 28]`` frames and ``int64 [N]`` labels."""
    from training.datasets.images import load_image_split

    split = load_image_split(dataset, "test")
    return split.images, split.labels


@cache
def house_holdout() -> tuple[list[dict[str, Any]], np.ndarray]:
    """The textbook's 20% holdout of Kaggle's train.csv: records and their prices in dollars."""
    from training.datasets.house import holdout_split, load_house_train

    table = load_house_train()
    _, holdout = holdout_split(len(table.records))
    return [table.records[i] for i in holdout], table.prices[holdout]


@cache
def poem_heldout(corpus: str) -> tuple[str, ...]:
    """The fixed held-out 5% of a poem corpus, the split the training metric is computed on."""
    from training.datasets.poems import heldout_split, load_corpus

    poems = load_corpus(corpus)
    _, test_idx = heldout_split(len(poems))
    return tuple(poems[i] for i in test_idx)


def state_names(meta: dict[str, Any]) -> list[str]:
    """The recurrent state inputs of a poem step graph (``hidden``, plus ``cell`` for an LSTM)."""
    return [i["name"] for i in meta["io"]["inputs"] if i["name"] != "token"]


def _cycle(n_available: int, batch: int, offset: int = 0) -> np.ndarray:
    """Row indices for a batch, wrapping round when the split is smaller than the batch."""
    return (offset + np.arange(batch)) % n_available


def image_inputs(meta: dict[str, Any], frames: np.ndarray) -> dict[str, np.ndarray]:
    """Frames → the ``image`` feed, exactly as ``serving.image_classification.ImageModel`` builds it."""
    scaling = PixelScaling.from_dict(meta["preprocessing"]["scaling"])
    return {"image": np.ascontiguousarray(scaling.apply(frames)[:, None].astype(np.float32))}


def house_inputs(meta: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Records → the ``features`` feed, exactly as ``serving.house_pricing.HousePricer`` encodes them."""
    spec = FeatureSpec.from_dict(meta["preprocessing"]["features"])
    return {"features": np.ascontiguousarray(spec.encode_records(records), dtype=np.float32)}


def zero_state(meta: dict[str, Any], batch: int) -> dict[str, np.ndarray]:
    layers, hidden = meta["config"]["num_layers"], meta["config"]["hidden_size"]
    return {name: np.zeros((layers, batch, hidden), np.float32) for name in state_names(meta)}


def poem_inputs(meta: dict[str, Any], batch: int, step: StepFn | None, offset: int = 0) -> dict[str, np.ndarray]:
    """One decoding step of ``batch`` held-out poems, mid-poem: the token after ``POEM_PREFILL`` real
    tokens and the state ``step`` reached on them (zeros when no ``step`` is given)."""
    vocab = Vocabulary.from_dict(meta["preprocessing"]["vocab"])
    encoded = (vocab.encode(p, bos=True) for p in poem_heldout(meta["training"]["dataset"]))
    seqs = [s[: POEM_PREFILL + 1] for s in encoded if len(s) > POEM_PREFILL]
    tokens = np.array([seqs[i] for i in _cycle(len(seqs), batch, offset)], dtype=np.int64)
    state = zero_state(meta, batch)
    if step is not None:
        for t in range(POEM_PREFILL):
            out = step({"token": np.ascontiguousarray(tokens[:, t]), **state})
            state = dict(zip(state, out[1:], strict=True))
    return {"token": np.ascontiguousarray(tokens[:, POEM_PREFILL]),
            **{k: np.ascontiguousarray(v) for k, v in state.items()}}


def model_inputs(meta: dict[str, Any], batch: int, step: StepFn | None = None, offset: int = 0
                 ) -> dict[str, np.ndarray]:
    """Real feeds of ``batch`` rows for an exported model, named as its ONNX inputs."""
    task = meta["task"]
    if task == "image":
        frames, _ = image_test(meta["training"]["dataset"])
        return image_inputs(meta, frames[_cycle(len(frames), batch, offset)])
    if task == "price":
        records, _ = house_holdout()
        return house_inputs(meta, [records[i] for i in _cycle(len(records), batch, offset)])
    return poem_inputs(meta, batch, step, offset)


# ----- timing -------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Per-call latencies of one contender: each round's median, and every call pooled."""

    batch: int
    round_medians: list[float] = field(default_factory=list)  # seconds per call
    round_throughputs: list[float] = field(default_factory=list)  # samples per second
    samples: list[float] = field(default_factory=list)  # seconds, every timed call of every round

    @property
    def median(self) -> float:
        """The median across rounds of each round's median latency (seconds)."""
        return statistics.median(self.round_medians)

    @property
    def p99(self) -> float:
        """The 99th percentile of every timed call, all rounds pooled (seconds)."""
        return float(np.percentile(self.samples, 99))

    @property
    def throughput(self) -> float:
        """Median across rounds of samples per second (batch × calls / time spent in calls)."""
        return statistics.median(self.round_throughputs)

    @property
    def spread(self) -> float:
        """(slowest − fastest round median) / median: how much the machine moved during the run."""
        return (max(self.round_medians) - min(self.round_medians)) / self.median

    def to_dict(self) -> dict[str, Any]:
        return {"median_ms": 1e3 * self.median, "p99_ms": 1e3 * self.p99, "samples_per_s": self.throughput,
                "spread": self.spread, "round_median_ms": [1e3 * m for m in self.round_medians],
                "calls": len(self.samples)}


def _block(fn: Callable[[], object], seconds: float, min_calls: int) -> list[float]:
    """Call ``fn`` for ``seconds`` (at least ``min_calls`` times); the latency of each call."""
    latencies = []
    deadline = time.perf_counter() + seconds
    while len(latencies) < min_calls or time.perf_counter() < deadline:
        began = time.perf_counter()
        fn()
        latencies.append(time.perf_counter() - began)
    return latencies


def alternate(contenders: dict[str, Callable[[], object]], batch: int, rounds: int, seconds: float,
              warmup: int = 5, min_calls: int = 3) -> dict[str, Timing]:
    """Time every contender in every round, rotating who goes first; ``warmup`` untimed calls each."""
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    names = list(contenders)
    for name in names:
        for _ in range(warmup):
            contenders[name]()
    timings = {name: Timing(batch) for name in names}
    gc.collect()
    gc.disable()  # a collection triggered by one contender's garbage must not land in another's call
    try:
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                latencies = _block(contenders[name], seconds, min_calls)
                timing = timings[name]
                timing.round_medians.append(statistics.median(latencies))
                timing.round_throughputs.append(batch * len(latencies) / sum(latencies))
                timing.samples += latencies
    finally:
        gc.enable()
    return timings
