"""Dynamic int8 quantisation of an exported ONNX model, kept only when it is faster and as good.

``quantize_dynamic`` (ONNX Runtime) stores weights as int8 once and quantises activations on the fly
per call, so it needs no calibration data. What it touches here, and why:
- ``MatMul`` and ``Gemm``: the dynamo exporter writes ``nn.Linear`` as ``Gemm``, which ORT's
  integer-op quantiser skips, so a ``Gemm`` with constant weights is first rewritten as the
  equivalent ``MatMul`` + ``Add`` (``gemm_as_matmul``); weights are quantised per output channel.
- ``Gather``: the poem model's embedding table.
- ``Conv`` stays float: ORT's ``ConvInteger`` has no fast CPU kernel (with int8 convolutions LeNet
  went from 3.7 to 36 ms at batch 64 and 0.13 to 0.73 ms at batch 1 on the project's 2-core CPU),
  and ``GRU`` stays float because ORT has no dynamic int8 GRU.

The int8 model is judged on the held-out data behind each model's float metric (official test split,
house holdout, held-out poems) and timed against the float model in alternated rounds on ORT's CPU
provider. ``decide`` keeps it only when it is faster at every timed batch size and its quality moved
less than ``Tolerance``; otherwise float stays the only model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import statistics
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serving.artifacts import sha256_file
from serving.runtime import OnnxModel, RuntimeConfig
from training.bench import (
    alternate,
    house_holdout,
    house_inputs,
    image_inputs,
    image_test,
    model_inputs,
    poem_heldout,
    resolve_threads,
    state_names,
    zero_state,
)
from training.metrics import log_rmse, mean_absolute_error, perplexity

INT8_FILE = "model.int8.onnx"
QUANTIZED_OPS = ("MatMul", "Gather")
SPEED_BATCHES = {"image": (1, 64), "price": (1, 64), "poem": (1, 16)}
EVAL_CHUNK = 1000  # rows per ORT call when scoring images and houses
POEM_EVAL_BATCH = 256  # poems decoded together when scoring perplexity


# ----- the int8 graph ------------------------------------------------------------------------------


def gemm_as_matmul(model: Any) -> int:
    """Rewrite each ``Gemm(x, W, b)`` with constant ``W`` (no transA, alpha = beta = 1) as
    ``MatMul(x, Wᵀ) + b`` in place, so the integer-op quantiser sees it; returns how many."""
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    nodes, rewritten = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = (attrs.get("transA", 0) == 0 and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0)
        if node.op_type != "Gemm" or node.input[1] not in weights or not plain:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(weights[node.input[1]])
        w_name = f"{node.input[1]}_as_matmul"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T if attrs.get("transB") else w),
                                                         w_name))
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [product], name=f"{node.name}_matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_add"))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return rewritten


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """quantize_dynamic logs advice (pre-processing, shape inference) through the root logger."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def quantize_file(source: Path, target: Path) -> dict[str, Any]:
    """Write the dynamic int8 form of ``source`` to ``target``; what was quantised, and the sizes."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(source))
    gemms = gemm_as_matmul(model)
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        staged = Path(tmp) / "staged.onnx"
        onnx.save(model, str(staged))
        quantize_dynamic(staged, target, op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True,
                         weight_type=QuantType.QInt8)
    ops = [n.op_type for n in onnx.load(str(target)).graph.node]
    return {"method": "onnxruntime.quantization.quantize_dynamic, int8 weights per channel, "
                      "int8 activations quantised per call",
            "ops": list(QUANTIZED_OPS), "gemm_rewritten_as_matmul": gemms,
            "integer_matmuls": ops.count("MatMulInteger"),
            "bytes": {"float": source.stat().st_size, "int8": target.stat().st_size}}


# ----- quality on the held-out data behind each float metric ----------------------------------------


def _image_quality(model: OnnxModel, meta: dict[str, Any]) -> dict[str, float]:
    frames, labels = image_test(meta["training"]["dataset"])
    predictions = np.concatenate([model.run(image_inputs(meta, frames[i: i + EVAL_CHUNK]))[0].argmax(1)
                                  for i in range(0, len(frames), EVAL_CHUNK)])
    return {"accuracy": float((predictions == labels).mean()), "n": int(len(labels))}


def _price_quality(model: OnnxModel, meta: dict[str, Any]) -> dict[str, float]:
    records, prices = house_holdout()
    (log_price,) = model.run(house_inputs(meta, records))
    predicted = np.exp(log_price.astype(np.float64))
    return {"log_rmse": log_rmse(predicted, prices), "mae_dollars": mean_absolute_error(predicted, prices),
            "n": int(len(prices))}


def poem_nll(model: OnnxModel, meta: dict[str, Any]) -> tuple[float, int]:
    """Total NLL and token count of the held-out poems (``<bos>`` … ``<eos>``), decoded with the step
    graph, state carried, exactly the tokens ``training.tasks.poem.sequence_nll`` scores."""
    from preprocessing import Vocabulary

    vocab = Vocabulary.from_dict(meta["preprocessing"]["vocab"])
    seqs = sorted((vocab.encode(p, bos=True, eos=True) for p in poem_heldout(meta["training"]["dataset"])),
                  key=len, reverse=True)
    total, count = 0.0, 0
    for start in range(0, len(seqs), POEM_EVAL_BATCH):
        chunk = seqs[start: start + POEM_EVAL_BATCH]  # longest first: live rows are always a prefix
        lengths = np.array([len(s) for s in chunk])
        tokens = np.zeros((len(chunk), lengths[0]), np.int64)
        for i, s in enumerate(chunk):
            tokens[i, : len(s)] = s
        state = zero_state(meta, len(chunk))
        for t in range(lengths[0] - 1):
            live = int((lengths > t + 1).sum())
            feeds = {"token": np.ascontiguousarray(tokens[:live, t]),
                     **{k: np.ascontiguousarray(v[:, :live]) for k, v in state.items()}}
            logits, *next_state = model.run(feeds)
            logits = logits.astype(np.float64)
            peak = logits.max(axis=1)
            log_z = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=1))
            total += float((log_z - logits[np.arange(live), tokens[:live, t + 1]]).sum())
            count += live
            state = dict(zip(state_names(meta), next_state, strict=True))
    return total, count


def _poem_quality(model: OnnxModel, meta: dict[str, Any]) -> dict[str, float]:
    nll, count = poem_nll(model, meta)
    return {"perplexity": perplexity(nll, count), "tokens": count}


def quality(model: OnnxModel, meta: dict[str, Any]) -> dict[str, float]:
    """The model's float metric recomputed through ONNX Runtime (accuracy, log-RMSE, perplexity)."""
    return {"image": _image_quality, "price": _price_quality, "poem": _poem_quality}[meta["task"]](model, meta)


# ----- the decision --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """How much worse int8 may be, and how much faster it must be, to be kept."""

    accuracy_points: float = 0.2  # test accuracy may fall by less than this many percentage points
    log_rmse_relative: float = 0.01  # holdout log-RMSE may rise by less than 1%
    perplexity_relative: float = 0.01  # held-out perplexity may rise by less than 1%
    min_speedup: float = 1.05  # float/int8 median latency at every timed batch: 5% clears the noise


METRIC = {"image": "accuracy", "price": "log_rmse", "poem": "perplexity"}


def quality_change(task: str, float_value: float, int8_value: float, tol: Tolerance) -> tuple[float, float, str]:
    """``(change, allowed, unit)``: accuracy in points (negative = worse), the others relative
    (positive = worse); the change must stay strictly on the good side of ``allowed``."""
    if task == "image":
        return 100 * (int8_value - float_value), -tol.accuracy_points, "points"
    allowed = tol.log_rmse_relative if task == "price" else tol.perplexity_relative
    return int8_value / float_value - 1, allowed, "relative"


@dataclass(frozen=True)
class Decision:
    keep: bool
    reasons: list[str]


def decide(task: str, float_value: float, int8_value: float, speedups: dict[int, float],
           tol: Tolerance = Tolerance()) -> Decision:
    """Keep int8 only when it is at least ``min_speedup`` faster at every batch and its metric moved
    less than the tolerance; every failed condition is named."""
    reasons = []
    slow = {b: s for b, s in speedups.items() if not s >= tol.min_speedup}
    if not speedups:
        reasons.append("no speed measurement")
    for batch, speedup in sorted(slow.items()):
        reasons.append(f"batch {batch}: {speedup:.2f}× the float speed (needs ≥ {tol.min_speedup:.2f}×)")
    change, allowed, unit = quality_change(task, float_value, int8_value, tol)
    metric = METRIC[task]
    if unit == "points" and not change > allowed:
        reasons.append(f"{metric} {change:+.2f} points (allowed > {allowed:+.2f})")
    if unit == "relative" and not change < allowed:
        reasons.append(f"{metric} {100 * change:+.2f}% (allowed < {100 * allowed:+.0f}%)")
    return Decision(not reasons, reasons or ["faster at every timed batch, quality within tolerance"])


# ----- the report ----------------------------------------------------------------------------------


def cpu_runtime(threads: int | None = None) -> RuntimeConfig:
    """Serving's ORT settings on the CPU provider, with the benchmark's explicit thread count."""
    return dataclasses.replace(RuntimeConfig.from_env(), prefer_cuda=False, intra_op_threads=resolve_threads(threads))


def measure_speed(float_model: OnnxModel, int8_model: OnnxModel, meta: dict[str, Any], rounds: int,
                  seconds: float) -> dict[str, dict[str, float]]:
    """Float vs int8 at the task's batch sizes, alternated rounds, on real held-out inputs; the
    speed-up is the median over rounds of float/int8 median latency within the round."""
    step = float_model.run if meta["task"] == "poem" else None
    speed = {}
    for batch in SPEED_BATCHES[meta["task"]]:
        feeds = model_inputs(meta, batch, step)
        timings = alternate({"float": lambda f=feeds: float_model.run(f), "int8": lambda f=feeds: int8_model.run(f)},
                            batch, rounds, seconds)
        f, q = timings["float"], timings["int8"]
        # Paired per round (the two ran back to back), then the median: a slow spell of the machine
        # hits both sides of a pair, so it moves the ratio less than it moves either latency.
        paired = statistics.median(a / b for a, b in zip(f.round_medians, q.round_medians, strict=True))
        speed[str(batch)] = {"float_ms": 1e3 * f.median, "int8_ms": 1e3 * q.median, "speedup": paired,
                             "float_spread": f.spread, "int8_spread": q.spread,
                             "float_round_ms": [1e3 * m for m in f.round_medians],
                             "int8_round_ms": [1e3 * m for m in q.round_medians]}
    return speed


def quantization_report(onnx_path: Path, meta: dict[str, Any], target: Path, rounds: int = 5,
                        seconds: float = 0.3, tol: Tolerance = Tolerance(), threads: int | None = None
                        ) -> dict[str, Any]:
    """Quantise ``onnx_path`` into ``target``, score and time both, and decide; a JSON-able report."""
    import onnxruntime as ort

    info = quantize_file(onnx_path, target)
    runtime = cpu_runtime(threads)
    float_model, int8_model = OnnxModel(onnx_path, runtime), OnnxModel(target, runtime)
    probe = model_inputs(meta, 64, float_model.run if meta["task"] == "poem" else None)
    max_abs = float(np.max(np.abs(float_model.run(probe)[0] - int8_model.run(probe)[0])))
    speed = measure_speed(float_model, int8_model, meta, rounds, seconds)
    float_q, int8_q = quality(float_model, meta), quality(int8_model, meta)
    metric = METRIC[meta["task"]]
    change, _, unit = quality_change(meta["task"], float_q[metric], int8_q[metric], tol)
    decision = decide(meta["task"], float_q[metric], int8_q[metric],
                      {int(b): s["speedup"] for b, s in speed.items()}, tol)
    return {
        **info, "onnxruntime": ort.__version__, "threads": runtime.intra_op_threads, "rounds": rounds,
        "max_abs_diff_first_output": max_abs,
        "speed": speed,
        "quality": {"metric": metric, "float": float_q, "int8": int8_q, "change": change, "change_unit": unit},
        "decision": {"keep": decision.keep, "reasons": decision.reasons, "tolerance": dataclasses.asdict(tol)},
    }


def quantize_for_export(folder: Path, meta: dict[str, Any], rounds: int = 5) -> dict[str, Any]:
    """Export's ``--int8``: leave ``model.int8.onnx`` in ``folder`` only if ``decide`` keeps it; the
    report (with the file's sha256 when kept) goes into meta.json either way."""
    target = folder / INT8_FILE
    report = quantization_report(folder / "model.onnx", meta, target, rounds=rounds)
    if report["decision"]["keep"]:
        report["file"] = INT8_FILE
        report["sha256"] = sha256_file(target)
    else:
        target.unlink()
    return report
