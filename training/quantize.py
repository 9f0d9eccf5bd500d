"""Int8 quantisation of an exported ONNX model, kept only when it is faster and as good.

The default scheme (``DEFAULT_SCHEME``) is ONNX Runtime's dynamic quantisation (``quantize_dynamic``)
with ``reduce_range``: weights stored once as int8 in [-64, 64] per output channel, activations
quantised to uint8 on the fly per call, no calibration data. What it touches here, and why:
- ``MatMul`` and ``Gemm``: the dynamo exporter writes ``nn.Linear`` as ``Gemm``, which ORT's
  integer-op quantiser skips, so a ``Gemm`` with constant weights is first rewritten as the
  equivalent ``MatMul`` + ``Add`` (``gemm_as_matmul``). Upstream: ``Gemm`` is not in
  ``onnxruntime.quantization.registry.IntegerOpsRegistry`` (onnxruntime 1.31.1; the request was
  closed as won't-fix, https://github.com/microsoft/onnxruntime/issues/2340). Delete the rewrite
  when that registry lists ``Gemm``.
- ``Gather``: the poem model's embedding table.
- ``Conv`` stays float: ORT's ``ConvInteger`` has no fast CPU kernel (``python -m training
  quantize-report`` times LeNet with int8 convolutions on every run and writes the figure into
  docs/QUANTIZATION.md; upstream: https://github.com/microsoft/onnxruntime/issues/12206, open).
  Quantise ``Conv`` when that report measures int8 convolutions faster than float. ``GRU`` stays
  float because ORT has no dynamic int8 GRU (only ``LSTM`` is in ``IntegerOpsRegistry``; the
  maintainers have no plan for GRU: https://github.com/microsoft/onnxruntime/issues/9796);
  quantise it when the registry lists ``GRU``.

Why 7-bit weights (issue 18). ORT multiplies uint8 activations by int8 weights. With VNNI
(``vpdpbusd``) or AMX the integer product is exact. On AVX2 (and AVX-512BW) without VNNI it runs on
``vpmaddubsw``, which adds two uint8·int8 products into int16 and saturates: 8-bit weights reach
2·255·127 = 64,770 > 32,767, so the same int8 graph gives other logits there (the suite's brief digit
MLP: max abs 0.59 instead of 0.010, 11 of 500 test images lost, under ``qemu-x86_64 -cpu EPYC-Milan``;
0.84 on the AMD EPYC of the issue). Weights in [-64, 64] keep every pair within 2·255·64 = 32,640, so
the product is exact on every x86 CPU and the graph gives the same numbers everywhere. The same
saturation and the same 7-bit workaround are documented for Intel CPUs without VNNI at
https://docs.openvino.ai/latest/pot_saturation_issue.html. The condition for going back to 8-bit
weights: no x86 CPU without VNNI or AMX may serve the graph (``tests/test_quantize.py`` fails when an
ORT release stops saturating on such a CPU). Measured on
every model against the alternatives (``SCHEMES``; records ``docs/bench/int8-schemes-*.json``, written
by ``python -m training.quantize_report schemes``, natively on a VNNI + AMX Xeon and emulated on an
AVX2-only EPYC):
- ``u8s8`` (8-bit, the setting before): the most faithful where the product is exact, but its error
  grows up to 60× where it saturates. Ruled out: the decision taken on one CPU would not hold on another.
- ``u8u8`` (uint8 weights): exact everywhere too (ORT widens to int16 first) and 8-bit faithful, but
  at batch 64 on the VNNI/AMX CPU usually the slowest dynamic scheme, often slower than float.
- static QDQ (``qdq-u8s8``, ``qdq-s8s8``, 256 training rows to calibrate): outputs 9-50× further from
  float (activation ranges fixed in advance), and their error also grows where u8×s8 saturates.
- ``u8s8-reduce-range``: exact everywhere, the same kernels and speed as ``u8s8``; the cost is one weight
  bit (max abs about 1.5-2× ``u8s8``'s), which kept every model's metric within ``Tolerance`` on the
  full data. ``training.quantize_report.pick_scheme`` states the rule, and a test checks that the
  committed records pick this default. Speed on an AVX2-only CPU was not measured (none reachable).

The int8 model is judged on the held-out data behind each model's float metric (official test split,
house holdout, held-out poems) and timed against the float model in alternated rounds on ORT's CPU
provider. ``decide`` keeps it only when it is faster at every timed batch size and its quality moved
less than ``Tolerance``; otherwise float stays the only model. The report records the CPU it decided
on (``serving.int8_guard.cpu_record``) and a check batch, which serving uses to re-verify the int8
graph on a CPU unlike that one (``serving.int8_guard.choose_graph``).
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
from serving.int8_guard import CHECK_ROWS, cpu_record, make_check
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


@dataclass(frozen=True)
class Scheme:
    """One way to quantise: dynamic (activations quantised per call) or static QDQ (activation ranges
    calibrated once on training data); the integer types; 7-bit weights (``reduce_range``) or 8."""

    name: str
    weight_type: str = "int8"  # "int8" or "uint8"
    reduce_range: bool = False
    static: bool = False
    activation_type: str = "uint8"  # static only: dynamic quantisation always makes uint8 activations
    summary: str = ""


SCHEMES = {s.name: s for s in (
    Scheme("u8s8", summary="dynamic, uint8 activations × int8 weights (8-bit): the setting before issue 18"),
    Scheme("u8s8-reduce-range", reduce_range=True,
           summary="dynamic, uint8 activations × 7-bit int8 weights (reduce_range)"),
    Scheme("u8u8", weight_type="uint8", summary="dynamic, uint8 activations × uint8 weights"),
    Scheme("qdq-u8s8", static=True, summary="static QDQ, uint8 activations × int8 weights, ranges calibrated "
                                            f"on {256} training rows"),
    Scheme("qdq-s8s8", static=True, activation_type="int8",
           summary=f"static QDQ, int8 activations × int8 weights (ORT's static default), {256} calibration rows"),
)}
DEFAULT_SCHEME = "u8s8-reduce-range"
CALIBRATION_ROWS = 256


def _calibration_feeds(meta: dict[str, Any], float_path: Path, rows: int = CALIBRATION_ROWS
                       ) -> list[dict[str, np.ndarray]]:
    """Feeds from the *training* data (never the held-out data the int8 graph is judged on), in
    batches of 32: images and house records as serving encodes them, poem steps mid-poem with the
    float graph's carried state."""
    from training.bench import POEM_PREFILL

    batch = 32
    if meta["task"] == "image":
        from training.datasets.images import load_image_split

        frames = load_image_split(meta["training"]["dataset"], "train").images
        picks = np.random.default_rng(0).choice(len(frames), size=min(rows, len(frames)), replace=False)
        return [image_inputs(meta, frames[np.sort(picks[i: i + batch])]) for i in range(0, len(picks), batch)]
    if meta["task"] == "price":
        from training.datasets.house import holdout_split, load_house_train

        table = load_house_train()
        train_idx, _ = holdout_split(len(table.records))
        picks = train_idx[:rows]
        return [house_inputs(meta, [table.records[i] for i in picks[j: j + batch]])
                for j in range(0, len(picks), batch)]
    from preprocessing import Vocabulary
    from training.datasets.poems import heldout_split, load_corpus

    vocab = Vocabulary.from_dict(meta["preprocessing"]["vocab"])
    poems = load_corpus(meta["training"]["dataset"])
    train_idx, _ = heldout_split(len(poems))
    seqs = [s for s in (vocab.encode(poems[i], bos=True) for i in train_idx[: 4 * rows]) if len(s) > POEM_PREFILL]
    seqs = seqs[:rows]
    step = OnnxModel(float_path, cpu_runtime(1)).run
    feeds = []
    for j in range(0, len(seqs), batch):
        tokens = np.array([s[: POEM_PREFILL + 1] for s in seqs[j: j + batch]], np.int64)
        state = zero_state(meta, len(tokens))
        for t in range(POEM_PREFILL + 1):  # every step's token and state: early and mid-poem ranges
            feeds.append({"token": np.ascontiguousarray(tokens[:, t]), **state})
            out = step(feeds[-1])
            state = dict(zip(state, out[1:], strict=True))
    return feeds


def quantize_file(source: Path, target: Path, scheme: str = DEFAULT_SCHEME, meta: dict[str, Any] | None = None,
                  ops: tuple[str, ...] = QUANTIZED_OPS) -> dict[str, Any]:
    """Write the int8 form of ``source`` to ``target`` by ``scheme`` (static schemes need ``meta`` to
    find the calibration data); what was quantised, and the sizes. ``ops`` other than the default
    only for trials (the report's int8 ``Conv`` timing)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    chosen = SCHEMES[scheme]
    qtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    model = onnx.load(str(source))
    gemms = gemm_as_matmul(model)
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        staged = Path(tmp) / "staged.onnx"
        onnx.save(model, str(staged))
        if chosen.static:
            if meta is None:
                raise ValueError(f"{scheme}: static quantisation needs the model's meta for its calibration data")
            feeds = _calibration_feeds(meta, source)

            class Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    self.pending = iter(feeds)

                def get_next(self) -> dict[str, np.ndarray] | None:
                    return next(self.pending, None)

            quantize_static(staged, target, Reader(), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(ops), per_channel=True,
                            reduce_range=chosen.reduce_range, activation_type=qtype[chosen.activation_type],
                            weight_type=qtype[chosen.weight_type])
        else:
            quantize_dynamic(staged, target, op_types_to_quantize=list(ops), per_channel=True,
                             reduce_range=chosen.reduce_range, weight_type=qtype[chosen.weight_type])
    return {"scheme": scheme, "method": chosen.summary,
            "ops": list(ops), "gemm_rewritten_as_matmul": gemms,
            "integer_matmuls": _integer_matmuls(onnx.load(str(target))),
            "bytes": {"float": source.stat().st_size, "int8": target.stat().st_size}}


def _integer_matmuls(model: Any) -> int:
    """MatMuls that run on integers: ``MatMulInteger`` (dynamic), or a ``MatMul`` whose constant
    weight comes through a ``DequantizeLinear`` (static QDQ, which ORT fuses into an integer kernel)."""
    nodes = model.graph.node
    dequantized = {n.output[0] for n in nodes if n.op_type == "DequantizeLinear"}
    return sum(1 for n in nodes if n.op_type == "MatMulInteger"
               or (n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in dequantized))


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


def check_batch(float_model: OnnxModel, int8_model: OnnxModel, meta: dict[str, Any]) -> dict[str, Any]:
    """``CHECK_ROWS`` real held-out inputs with the float outputs and the int8 error on this CPU, for
    serving to re-verify the int8 graph on a CPU unlike this one (``serving.int8_guard``)."""
    feeds = model_inputs(meta, CHECK_ROWS, float_model.run if meta["task"] == "poem" else None)
    return make_check(feeds, float_model.run(feeds), int8_model.run(feeds), float_model.output_names)


def quantization_report(onnx_path: Path, meta: dict[str, Any], target: Path, rounds: int = 5,
                        seconds: float = 0.3, tol: Tolerance = Tolerance(), threads: int | None = None,
                        scheme: str = DEFAULT_SCHEME) -> dict[str, Any]:
    """Quantise ``onnx_path`` into ``target``, score and time both, and decide; a JSON-able report
    with the CPU the decision was made on and the check batch serving re-verifies it with."""
    info = quantize_file(onnx_path, target, scheme, meta)
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
    cpu = cpu_record()
    return {
        **info, "onnxruntime": cpu["onnxruntime"], "threads": runtime.intra_op_threads, "rounds": rounds,
        "cpu": cpu,
        "max_abs_diff_first_output": max_abs,
        "speed": speed,
        "quality": {"metric": metric, "float": float_q, "int8": int8_q, "change": change, "change_unit": unit},
        "decision": {"keep": decision.keep, "reasons": decision.reasons, "tolerance": dataclasses.asdict(tol)},
        "check": check_batch(float_model, int8_model, meta),
    }


def quantize_for_export(folder: Path, meta: dict[str, Any], rounds: int = 5) -> dict[str, Any]:
    """Export's ``--int8``: leave ``model.int8.onnx`` in ``folder`` only if ``decide`` keeps it; the
    report (with the file's sha256, the CPU and the check batch) goes into meta.json either way."""
    target = folder / INT8_FILE
    report = quantization_report(folder / "model.onnx", meta, target, rounds=rounds)
    if report["decision"]["keep"]:
        report["file"] = INT8_FILE
        report["sha256"] = sha256_file(target)
    else:
        target.unlink()
        del report["check"]  # nothing to re-verify
    return report
