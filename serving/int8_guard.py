"""Whether this CPU may serve a model's int8 graph: the CPU the int8 decision was made on, checked again.

ONNX Runtime's integer kernels differ by CPU. On AVX2 (and AVX-512BW) without VNNI, a uint8 × int8
dot product goes through ``vpmaddubsw``, which adds pairs of products into int16 and saturates: with
8-bit weights a pair can reach 2·255·127 = 64,770 > 32,767, and the logits move (issue 18: max abs
0.84 on the digit MLP on an AMD EPYC). With VNNI or AMX the same graph is exact. So an int8 graph
judged accurate on one CPU need not be accurate on another.

Export records, beside its int8 decision (``meta["quantization"]``), the CPU it was made on
(``cpu``: vendor, model, the flags that pick ORT's integer kernels, ORT's version, and whether a
saturating u8×s8 product came out exact here) and a small check batch (``check``: 8 real held-out
inputs, the float graph's outputs on them, the int8 error there and the bound). At load time
``choose_graph`` compares this CPU with the recorded one; when they differ in a way that can change
the integer results, it re-runs the int8 graph on the check batch and keeps int8 only when its error
to the float outputs stays within the bound. Otherwise float is served, with one log line saying why.
No torch here.
"""

from __future__ import annotations

import base64
import logging
import platform
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from serving.settings import Settings

logger = logging.getLogger("dlbook.serving")

INT8_FILE = "model.int8.onnx"
FLOAT_FILE = "model.onnx"
# The CPU flags ORT's MLAS dispatches its integer GEMM kernels on (as /proc/cpuinfo names them).
INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
CHECK_ROWS = 8
BOUND_FACTOR = 2.0  # a re-run may differ from the export-time int8 error by rounding, not by 2×


# ----- this CPU ------------------------------------------------------------------------------------


def _cpuinfo() -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor is enough
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _field(number: int, payload: bytes | int) -> bytes:
    """One protobuf field: a varint for an int, length-delimited bytes otherwise."""
    def varint(value: int) -> bytes:
        out = bytearray()
        while True:
            byte, value = value & 0x7F, value >> 7
            out.append(byte | (0x80 if value else 0))
            if not value:
                return bytes(out)

    if isinstance(payload, int):
        return varint(number << 3) + varint(payload)
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def _probe_model(rows: int, depth: int, cols: int, weights: np.ndarray) -> bytes:
    """``y = MatMulInteger(a: uint8 [rows, depth], b: int8 [depth, cols] constant)`` as ONNX bytes,
    written field by field (serving has ONNX Runtime but not the ``onnx`` package)."""
    uint8, int8, int32 = 2, 3, 6  # TensorProto.DataType

    def value_info(name: str, elem_type: int, shape: tuple[int, ...]) -> bytes:
        dims = b"".join(_field(1, _field(1, d)) for d in shape)
        return _field(1, name.encode()) + _field(2, _field(1, _field(1, elem_type) + _field(2, dims)))

    node = _field(1, b"a") + _field(1, b"b") + _field(2, b"y") + _field(4, b"MatMulInteger")
    tensor = (b"".join(_field(1, d) for d in weights.shape) + _field(2, int8) + _field(8, b"b")
              + _field(9, weights.astype(np.int8).tobytes()))
    graph = (_field(1, node) + _field(2, b"u8s8_probe") + _field(5, tensor)
             + _field(11, value_info("a", uint8, (rows, depth))) + _field(12, value_info("y", int32, (rows, cols))))
    return _field(1, 8) + _field(7, graph) + _field(8, _field(1, b"") + _field(2, 13))


@cache
def u8s8_exact() -> bool:
    """Whether ORT's uint8 × int8 integer product is exact here: one ``MatMulInteger`` whose every
    adjacent product pair (255·127·2) overflows int16. False where the kernel saturates (AVX2 or
    AVX-512BW without VNNI). This sees what ORT's kernels do, also under an emulator that hides flags."""
    import onnxruntime as ort

    rows, depth, cols = 4, 64, 16
    model = _probe_model(rows, depth, cols, np.full((depth, cols), 127, np.int8))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"a": np.full((rows, depth), 255, np.uint8)})
    return bool(np.all(got == 255 * 127 * depth))


def cpu_record() -> dict[str, Any]:
    """This CPU as the int8 decision depends on it; stored by export as ``quantization.cpu``."""
    import onnxruntime as ort

    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    return {"vendor": info.get("vendor_id", platform.machine()),
            "model_name": info.get("model name", platform.processor() or platform.machine()),
            "flags": {f: f in flags for f in INT8_FLAGS},
            "onnxruntime": ort.__version__,
            "u8s8_exact": u8s8_exact()}


def cpu_differences(recorded: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """What differs between the recorded CPU and this one in what can change int8 results: the
    kernel-picking flags, ORT's version, and whether the u8×s8 product is exact. The model name
    alone does not count (the same silicon is named differently under different hypervisors)."""
    if not recorded:
        return ["no CPU was recorded with the int8 decision"]
    diffs = []
    rec_flags = recorded.get("flags") or {}
    for flag in INT8_FLAGS:
        if bool(rec_flags.get(flag)) != bool(current["flags"].get(flag)):
            diffs.append(f"{flag}: {'yes' if rec_flags.get(flag) else 'no'} at export, "
                         f"{'yes' if current['flags'].get(flag) else 'no'} here")
    for key in ("onnxruntime", "u8s8_exact"):
        if recorded.get(key) != current.get(key):
            diffs.append(f"{key}: {recorded.get(key)} at export, {current.get(key)} here")
    return diffs


# ----- the check batch ----------------------------------------------------------------------------


def encode_arrays(arrays: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Named arrays → JSON (dtype, shape, base64 of the little-endian bytes)."""
    out = {}
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        out[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode()}
    return out


def decode_arrays(encoded: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
    return {name: np.frombuffer(base64.b64decode(e["data"]), dtype=np.dtype(e["dtype"])).reshape(e["shape"]).copy()
            for name, e in encoded.items()}


def max_abs_error(got: list[np.ndarray], expected: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(g.astype(np.float64) - e.astype(np.float64)))) for g, e in zip(got, expected,
                                                                                                 strict=True))


def make_check(feeds: dict[str, np.ndarray], float_outputs: list[np.ndarray], int8_outputs: list[np.ndarray],
               output_names: list[str]) -> dict[str, Any]:
    """The check batch export stores: inputs, float outputs, the int8 error on this CPU, the bound."""
    error = max_abs_error(int8_outputs, float_outputs)
    scale = max(float(np.max(np.abs(o))) for o in float_outputs)
    bound = BOUND_FACTOR * error + 1e-3 * scale + 1e-6
    return {"inputs": encode_arrays(feeds),
            "float_outputs": encode_arrays(dict(zip(output_names, float_outputs, strict=True))),
            "int8_max_abs": error, "bound": bound,
            "rule": f"int8 max abs error to the float outputs ≤ {BOUND_FACTOR:g} × the export-time error "
                    "+ 0.001 × the largest float output"}


def session_for_check(path: Path) -> Any:
    """A plain CPU session, optimised as serving's are (the int8 kernels are fused there)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def verify_check(int8_path: Path, check: dict[str, Any]) -> tuple[bool, float]:
    """Re-run the int8 graph on the stored check batch: (within the bound, its error)."""
    session = session_for_check(int8_path)
    feeds = decode_arrays(check["inputs"])
    expected = list(decode_arrays(check["float_outputs"]).values())
    error = max_abs_error(session.run(None, feeds), expected)
    return error <= check["bound"], error


# ----- the choice at load time ----------------------------------------------------------------------


def int8_requested(meta: dict[str, Any], prefer_int8: bool) -> bool:
    """``DLBOOK_PREFER_INT8=1`` and export shipped an int8 graph (so meta.json lists and verified it)."""
    return prefer_int8 and INT8_FILE in meta.get("files", {})


def choose_graph(folder: Path, meta: dict[str, Any], current: dict[str, Any] | None = None,
                 prefer_int8: bool | None = None) -> str:
    """``model.int8.onnx`` when it was asked for and is safe on this CPU, else ``model.onnx``.

    Asked for: ``prefer_int8`` (default: ``DLBOOK_PREFER_INT8`` as the environment has it now). Safe:
    the CPU matches the one the int8 decision was made on, or it differs and the int8 graph still
    meets its bound on the stored check batch. A refusal or a re-verification is logged once, with
    the reason."""
    if prefer_int8 is None:
        prefer_int8 = Settings.from_env().prefer_int8
    if not int8_requested(meta, prefer_int8):
        return FLOAT_FILE
    name = meta.get("name", folder.name)
    report = meta.get("quantization") or {}
    current = current or cpu_record()
    diffs = cpu_differences(report.get("cpu"), current)
    if not diffs:
        return INT8_FILE
    check = report.get("check")
    if not check:
        logger.warning("%s: int8 refused, serving float: this CPU differs from the one the int8 decision was made "
                       "on (%s) and the model has no check batch to re-verify it (re-export with --int8)",
                       name, "; ".join(diffs))
        return FLOAT_FILE
    try:
        ok, error = verify_check(folder / INT8_FILE, check)
    except Exception as err:  # ORT's errors are not one class
        logger.warning("%s: int8 refused, serving float: re-verifying it on this CPU failed (%s)", name, err)
        return FLOAT_FILE
    if not ok:
        logger.warning("%s: int8 refused, serving float: on this CPU (%s) its max abs error to the float outputs "
                       "on the check batch is %.4g, over the bound %.4g (%.4g at export)",
                       name, "; ".join(diffs), error, check["bound"], check["int8_max_abs"])
        return FLOAT_FILE
    logger.info("%s: int8 re-verified on this CPU (%s): max abs error %.4g ≤ bound %.4g", name, "; ".join(diffs),
                error, check["bound"])
    return INT8_FILE
