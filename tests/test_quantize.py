"""Dynamic int8 quantisation on the session's brief exported models: the file, its outputs, the
metrics it is judged by, the keep/reject rule, and how export and serving carry the int8 file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import training.quantize as quantize_module
from serving.artifacts import ArtifactError, verify_model_dir
from serving.runtime import OnnxModel
from training.bench import model_inputs
from training.quantize import (
    INT8_FILE,
    Decision,
    Tolerance,
    cpu_runtime,
    decide,
    gemm_as_matmul,
    quality,
    quantize_file,
)

KEYS = ["mlp", "lenet", "price_mlp", "poem_rnn"]


def _folder(meta: dict) -> Path:
    import bentoml

    return Path(bentoml.models.get(meta["tag"]).path)


@pytest.fixture(scope="module")
def int8_models(exported: dict[str, dict], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """key → (int8 path, quantisation info), quantised from copies; the store is never written."""
    out = tmp_path_factory.mktemp("int8")
    return {key: (out / f"{key}.onnx", quantize_file(_folder(exported[key]) / "model.onnx", out / f"{key}.onnx"))
            for key in KEYS}


@pytest.mark.parametrize("key", KEYS)
def test_int8_file_loads_and_stays_close_to_float(key: str, exported: dict[str, dict],
                                                   int8_models: dict[str, tuple[Path, dict]]) -> None:
    meta = exported[key]
    path, info = int8_models[key]
    assert path.is_file() and info["bytes"]["int8"] < info["bytes"]["float"]
    assert info["integer_matmuls"] >= 1  # every model has at least one int8 MatMul (Linear layers / head)
    runtime = cpu_runtime(1)
    float_model, int8_model = OnnxModel(_folder(meta) / "model.onnx", runtime), OnnxModel(path, runtime)
    assert int8_model.input_names == float_model.input_names
    assert int8_model.output_names == float_model.output_names
    feeds = model_inputs(meta, 32, float_model.run if meta["task"] == "poem" else None)
    expected, got = float_model.run(feeds), int8_model.run(feeds)
    for e, g in zip(expected, got, strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype
        # int8 weights and activations: a loose bound, a tenth of the output's range
        assert np.max(np.abs(g - e)) <= 0.1 * (np.max(np.abs(e)) + 1e-3) + 0.05
    if meta["task"] == "image":  # nearly every prediction survives
        assert (expected[0].argmax(1) == got[0].argmax(1)).mean() >= 0.9


@pytest.mark.parametrize("key", KEYS)
def test_float_onnx_reproduces_the_recorded_test_metric(key: str, exported: dict[str, dict]) -> None:
    """The quality figures int8 is judged against are the project's own metrics, recomputed via ORT."""
    meta = exported[key]
    recorded = meta["training"]["test"]
    got = quality(OnnxModel(_folder(meta) / "model.onnx", cpu_runtime(1)), meta)
    if meta["task"] == "image":
        assert got["n"] == recorded["n"] and abs(got["accuracy"] - recorded["accuracy"]) <= 2 / recorded["n"]
    elif meta["task"] == "price":
        assert got["n"] == recorded["n"]
        assert got["log_rmse"] == pytest.approx(recorded["log_rmse"], rel=1e-4)
        assert got["mae_dollars"] == pytest.approx(recorded["mae_dollars"], rel=1e-4)
    else:
        assert got["tokens"] == recorded["heldout_tokens"]
        assert got["perplexity"] == pytest.approx(recorded["perplexity"], rel=1e-4)


def test_gemm_is_rewritten_as_an_equivalent_matmul() -> None:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1),
         helper.make_node("Gemm", ["y", "v"], ["z"], name="scaled", alpha=2.0)],  # alpha ≠ 1: left alone
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 2])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"),
         numpy_helper.from_array(rng.normal(size=(3, 2)).astype(np.float32), "v")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    x = rng.normal(size=(4, 5)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert gemm_as_matmul(model) == 1
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Add", "Gemm"]
    assert "w" not in {i.name for i in model.graph.initializer}  # the transposed copy replaced it
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(after[0], before[0], rtol=1e-5, atol=1e-5)


FAST = {1: 1.8, 64: 1.3}


@pytest.mark.parametrize(("task", "float_value", "int8_value", "speedups", "keep"), [
    ("image", 0.9922, 0.9922, FAST, True),
    ("image", 0.9922, 0.9905, FAST, True),  # −0.17 points: inside the 0.2-point tolerance
    ("image", 0.9922, 0.9902, FAST, False),  # −0.20 points: not *less* than the tolerance
    ("image", 0.9922, 0.9950, FAST, True),  # better is fine
    ("image", 0.9922, 0.9922, {1: 1.8, 64: 1.02}, False),  # not faster where it counts
    ("image", 0.9922, 0.9922, {1: 0.9, 64: 3.0}, False),  # slower at batch 1
    ("image", 0.9922, 0.9922, {}, False),  # never timed
    ("price", 0.1301, 0.1312, FAST, True),  # +0.85%
    ("price", 0.1301, 0.1315, FAST, False),  # +1.08%
    ("price", 0.1301, 0.1290, FAST, True),
    ("poem", 93.5, 94.3, {1: 1.5, 16: 1.2}, True),  # +0.86%
    ("poem", 93.5, 94.5, {1: 1.5, 16: 1.2}, False),  # +1.07%
])
def test_decision_rule(task: str, float_value: float, int8_value: float, speedups: dict[int, float],
                       keep: bool) -> None:
    decision = decide(task, float_value, int8_value, speedups)
    assert decision.keep is keep, decision.reasons
    assert decision.reasons  # a kept model says why too


def test_decision_names_every_failed_condition() -> None:
    decision = decide("poem", 93.5, 99.0, {1: 0.8, 16: 1.01})
    assert not decision.keep and len(decision.reasons) == 3
    assert "batch 1" in decision.reasons[0] and "batch 16" in decision.reasons[1]
    assert "perplexity" in decision.reasons[2]
    strict = decide("image", 0.99, 0.99, {1: 1.2}, Tolerance(min_speedup=1.5))
    assert not strict.keep


def _export_with_int8(monkeypatch: pytest.MonkeyPatch, keep: bool, name: str) -> Path:
    """``python -m training export brief-price_mlp --int8`` with the decision forced; the store folder."""
    import bentoml

    from training.cli import main

    monkeypatch.setattr(quantize_module, "decide",
                        lambda *args, **kwargs: Decision(keep, ["forced by the test"]))
    assert main(["export", "brief-price_mlp", "--name", name, "--int8"]) == 0
    return Path(bentoml.models.get(f"{name}:latest").path)


def test_export_int8_ships_a_verified_file_and_serving_opts_in(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                               exported: dict[str, dict]) -> None:
    import bentoml

    from serving.model_store import load_exported, onnx_file

    name = "house-price-int8-test"
    try:
        folder = _export_with_int8(monkeypatch, True, name)
        meta = verify_model_dir(folder)  # re-hashes every listed file, the int8 one included
        assert INT8_FILE in meta["files"] and (folder / INT8_FILE).is_file()
        report = meta["quantization"]
        assert report["file"] == INT8_FILE and report["sha256"] == meta["files"][INT8_FILE]["sha256"]
        assert set(report["speed"]) == {"1", "64"} and report["quality"]["metric"] == "log_rmse"
        assert "Dynamic int8: shipped" in (folder / "MODEL_CARD.md").read_text()

        monkeypatch.delenv("DLBOOK_PREFER_INT8", raising=False)
        assert onnx_file(meta) == "model.onnx"  # float stays the default
        monkeypatch.setenv("DLBOOK_PREFER_INT8", "1")
        assert onnx_file(meta) == INT8_FILE
        served = load_exported(name, cpu_runtime(1))
        feeds = model_inputs(meta, 8)
        direct = OnnxModel(folder / INT8_FILE, cpu_runtime(1)).run(feeds)[0]
        np.testing.assert_array_equal(served.session.run(feeds)[0], direct)

        copy = tmp_path / "copy"
        shutil.copytree(folder, copy)
        with open(copy / INT8_FILE, "r+b") as fh:  # flip one byte of the int8 graph
            fh.seek(100)
            byte = fh.read(1)
            fh.seek(100)
            fh.write(bytes([byte[0] ^ 0xFF]))
        with pytest.raises(ArtifactError, match=INT8_FILE):
            verify_model_dir(copy)
    finally:
        for model in bentoml.models.list(name):
            bentoml.models.delete(model.tag)


def test_export_int8_rejected_ships_float_only(monkeypatch: pytest.MonkeyPatch, exported: dict[str, dict]) -> None:
    import bentoml

    from serving.model_store import onnx_file

    name = "house-price-int8-rejected-test"
    try:
        folder = _export_with_int8(monkeypatch, False, name)
        meta = json.loads((folder / "meta.json").read_text())
        assert INT8_FILE not in meta["files"] and not (folder / INT8_FILE).exists()
        decision = meta["quantization"]["decision"]
        assert decision["keep"] is False and decision["reasons"] == ["forced by the test"]
        assert "file" not in meta["quantization"] and "sha256" not in meta["quantization"]
        monkeypatch.setenv("DLBOOK_PREFER_INT8", "1")
        assert onnx_file(meta) == "model.onnx"  # nothing to prefer
    finally:
        for model in bentoml.models.list(name):
            bentoml.models.delete(model.tag)


def test_quantize_report_writes_the_table(exported: dict[str, dict], tmp_path: Path) -> None:
    from training.quantize_report import write_quantization_report

    doc, raw = tmp_path / "QUANTIZATION.md", tmp_path / "q.json"
    write_quantization_report(["house-price"], doc, rounds=2, json_path=raw)
    text = doc.read_text()
    assert text.startswith("# Int8 quantisation") and "| house-price | 2 |" in text
    assert "b1:" in text and "b64:" in text and "log-RMSE" in text
    report = json.loads(raw.read_text())["models"][0]["report"]
    assert report["decision"]["keep"] in (True, False) and report["bytes"]["int8"] > 0
