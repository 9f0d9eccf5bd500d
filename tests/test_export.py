"""Export round trips: train briefly on real data → ONNX + TorchScript → model store → a fresh
process that never imports our model classes (nor torch, for ONNX) gets the same outputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import training.export as export_module
from serving.artifacts import ArtifactError, verify_model_dir
from training.export import build_spec, export_run, load_run

# Runs in a fresh interpreter: loads the model from the store by tag, verifies it, and runs it with
# ONNX Runtime (no torch imported) and then TorchScript (torch, but never our `models` package).
FRESH_PROCESS = r"""
import json, sys
import numpy as np
import bentoml
from serving.artifacts import verify_model_dir
import onnxruntime as ort
tag, inputs_path, out_path = sys.argv[1:4]
model_dir = bentoml.models.get(tag).path
meta = verify_model_dir(model_dir)
inputs = dict(np.load(inputs_path))
steps = inputs.pop("steps", None)
session = ort.InferenceSession(f"{model_dir}/model.onnx", providers=["CPUExecutionProvider"])
assert "torch" not in sys.modules, "ONNX Runtime serving must not need torch"
def run_all(run):
    if steps is None:
        return run(inputs)
    state = {k: v for k, v in inputs.items() if k != "token"}
    outs = []
    for t in range(steps.shape[1]):
        out = run({"token": steps[:, t], **state})
        outs.append(out[0])
        state = dict(zip(state, out[1:]))
    return [np.stack(outs)] + list(out[1:])
onnx_out = run_all(lambda feed: session.run(None, feed))
import torch
scripted = torch.jit.load(f"{model_dir}/model.ts")
def ts(feed):
    with torch.no_grad():
        out = scripted(*[torch.from_numpy(np.asarray(v)) for v in feed.values()])
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]
ts_out = run_all(ts)
assert "models" not in sys.modules, "TorchScript must load without the model's Python class"
np.savez(out_path, **{f"onnx{i}": o for i, o in enumerate(onnx_out)}, **{f"ts{i}": o for i, o in enumerate(ts_out)})
print(json.dumps({"inputs": [i["name"] for i in meta["io"]["inputs"]]}))
"""


@pytest.mark.parametrize("arch", ["mlp", "lenet", "price_mlp", "poem_rnn"])
def test_round_trip_through_the_store_in_a_fresh_process(arch: str, trained_runs: dict[str, Path],
                                                         exported: dict[str, dict], tmp_path: Path) -> None:
    run_dir = trained_runs[arch]
    meta = exported[arch]
    assert meta["parity"]["onnxruntime"] <= 1e-4 and meta["parity"]["torchscript"] <= 1e-4
    model, saved = load_run(run_dir)
    spec = build_spec(model, saved)
    inputs = {k: v.numpy() for k, v in spec.inputs.items()}
    with torch.no_grad():
        if spec.steps is None:
            expected = [spec.module(*spec.inputs.values()).numpy()]
        else:
            tokens = torch.stack([s["token"] for s in spec.steps[:10]], dim=1)
            inputs["steps"] = tokens.numpy()
            state = [v for k, v in spec.inputs.items() if k != "token"]
            logits = []
            for t in range(tokens.shape[1]):
                out = spec.module(tokens[:, t], *state)
                logits.append(out[0])
                state = list(out[1:])
            expected = [torch.stack(logits).numpy(), *[s.numpy() for s in state]]
    np.savez(tmp_path / "inputs.npz", **inputs)
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, meta["tag"], str(tmp_path / "inputs.npz"), str(tmp_path / "out.npz")],
        capture_output=True, text=True, env=os.environ.copy(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["inputs"] == list(spec.inputs)
    outputs = np.load(tmp_path / "out.npz")
    for i, want in enumerate(expected):
        np.testing.assert_allclose(outputs[f"onnx{i}"], want, atol=1e-4, rtol=0)
        np.testing.assert_allclose(outputs[f"ts{i}"], want, atol=1e-4, rtol=0)


def test_meta_describes_what_serving_needs(trained_runs: dict[str, Path], exported: dict[str, dict]) -> None:
    import bentoml
    import onnx

    meta = exported["lenet"]
    stored = verify_model_dir(Path(bentoml.models.get(meta["tag"]).path))
    assert stored["name"] == "fashion-lenet" and stored["task"] == "image"
    assert stored["preprocessing"]["scaling"]["kind"] == "normalize"
    assert stored["preprocessing"]["labels_zh"][0] == "T恤"
    assert stored["io"]["inputs"] == [{"name": "image", "dtype": "float32", "shape": ["batch", 1, 28, 28]}]
    assert set(stored["files"]) == {"model.onnx", "model.ts", "MODEL_CARD.md"}
    assert stored["training"]["test"]["accuracy"] > 0.1 and stored["versions"]["torch"].startswith("2.")
    card = (Path(bentoml.models.get(meta["tag"]).path) / "MODEL_CARD.md").read_text()
    assert card.startswith("# fashion-lenet") and "Parity" in card
    # pinning: every export is a new version, and name:latest is the newest
    again = export_run(trained_runs["lenet"])
    assert again["tag"] != meta["tag"]
    assert str(bentoml.models.get("fashion-lenet:latest").tag) == again["tag"]
    # the older version stays addressable and whole: its own folder, every file matching its checksum,
    # the same metadata as before, and a graph ONNX can load
    older = Path(bentoml.models.get(meta["tag"]).path)
    assert older != Path(bentoml.models.get(again["tag"]).path)
    assert verify_model_dir(older) == stored
    graph = onnx.load(str(older / "model.onnx"))
    onnx.checker.check_model(graph)
    assert [i.name for i in graph.graph.input] == ["image"]
    bentoml.models.delete(again["tag"])  # leave the session's store as the other tests expect it


@pytest.fixture(scope="module")
def exported_price(exported: dict[str, dict]) -> Path:
    import bentoml

    return Path(bentoml.models.get(exported["price_mlp"]["tag"]).path)


@pytest.mark.parametrize("damage", ["flip-onnx-byte", "flip-ts-byte", "delete-onnx", "break-meta"])
def test_a_damaged_artifact_is_refused_naming_the_file(exported_price: Path, tmp_path: Path, damage: str) -> None:
    copy = tmp_path / "model"
    shutil.copytree(exported_price, copy)
    verify_model_dir(copy)  # intact: accepted
    target = {"flip-onnx-byte": "model.onnx", "flip-ts-byte": "model.ts", "delete-onnx": "model.onnx",
              "break-meta": "meta.json"}[damage]
    path = copy / target
    if damage.startswith("flip"):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "delete-onnx":
        path.unlink()
    else:
        path.write_text(path.read_text()[:-20])
    with pytest.raises(ArtifactError) as err:
        verify_model_dir(copy)
    assert target in str(err.value)


def test_export_fails_loudly_when_parity_breaks(trained_runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    import bentoml

    before = len(bentoml.models.list())
    monkeypatch.setattr(export_module, "TOLERANCE", 0.0)  # ORT differs from eager by ~1e-6: must refuse
    with pytest.raises(export_module.ExportError, match="parity check failed"):
        export_run(trained_runs["lenet"])
    assert len(bentoml.models.list()) == before
