"""Export a trained run to ONNX and TorchScript, check parity on real data, save to the model store.

``python -m training export <run|all>`` turns ``runs/<run>/model.pt`` into a BentoML model
(``bentoml models list``) holding ``model.onnx`` (dynamo exporter, dynamic batch axis, named
inputs/outputs, ``onnx.checker``-clean), ``model.ts`` (TorchScript, loadable without our classes),
``meta.json`` (everything preprocessing needs, input/output spec, training data and metrics,
versions, sha256 of every file) and ``MODEL_CARD.md``. Eager PyTorch, TorchScript and ONNX Runtime
must agree within ``TOLERANCE`` on real samples, or export fails and nothing is saved.

The poem model is exported as a single step ``(token[B], hidden[L,B,H]) → (logits[B,V], hidden)``
so a server can batch many sequences step by step; a prompt is prefilled with the same graph.
"""

from __future__ import annotations

import json
import logging
import platform
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models import build_model
from models.poem_rnn import PoemRNN
from preprocessing import FeatureSpec, PixelScaling, Vocabulary
from serving.artifacts import sha256_file
from training.paths import runs_dir

TOLERANCE = 1e-4  # max abs difference between eager, TorchScript and ONNX Runtime outputs
PARITY_SAMPLES = 256
POEM_STEPS = 50
OPSET = 20


class ExportError(RuntimeError):
    pass


class PoemStep(nn.Module):
    """The serving graph of a GRU/RNN poem model: one token per sequence, state in and out."""

    def __init__(self, model: PoemRNN) -> None:
        super().__init__()
        self.model = model

    def forward(self, token: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, next_hidden = self.model.step(token, hidden)
        return logits, next_hidden


class LSTMPoemStep(nn.Module):
    """The LSTM variant: its state is (hidden, cell)."""

    def __init__(self, model: PoemRNN) -> None:
        super().__init__()
        self.model = model

    def forward(self, token: torch.Tensor, hidden: torch.Tensor, cell: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, (h, c) = self.model.step(token, (hidden, cell))
        return logits, h, c


@dataclass
class ExportSpec:
    module: nn.Module
    inputs: dict[str, torch.Tensor]  # name → real example input (the parity batch)
    outputs: list[str]
    dynamic: dict[str, dict[int, str]]  # input name → {axis: symbolic name}
    steps: list[dict[str, torch.Tensor]] | None = None  # poems: the inputs of each carried step


def model_name_for(summary: dict[str, Any]) -> str:
    """Store names: ``fashion-lenet``, ``digits-mlp-deep``, ``house-price``, ``tang-poem-book``…"""
    suffix = "" if summary["preset"] == "default" else f"-{summary['preset']}"
    if summary["task"] == "image":
        prefix = "digits" if summary["dataset"] == "mnist" else "fashion"
        return f"{prefix}-{summary['architecture']}{suffix}"
    if summary["task"] == "price":
        return f"house-price{suffix}"
    return f"tang-poem{suffix}"


def load_run(run_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    path = run_dir / "model.pt"
    if not path.is_file():
        raise ExportError(f"{path} not found: train it first (python -m training train …)")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    model = build_model(saved["architecture"], saved["config"])
    model.load_state_dict(saved["state_dict"])
    return model.eval(), saved


def _image_spec(model: nn.Module, saved: dict[str, Any]) -> ExportSpec:
    from training.datasets.images import load_image_split

    test = load_image_split(saved["summary"]["dataset"], "test")
    scaling = PixelScaling.from_dict(saved["preprocessing"]["scaling"])
    x = torch.from_numpy(scaling.apply(test.images[:PARITY_SAMPLES])[:, None])
    return ExportSpec(model, {"image": x}, ["logits"], {"image": {0: "batch"}})


def _price_spec(model: nn.Module, saved: dict[str, Any]) -> ExportSpec:
    from training.datasets.house import holdout_split, load_house_train

    table = load_house_train()
    _, holdout = holdout_split(len(table.records))
    spec = FeatureSpec.from_dict(saved["preprocessing"]["features"])
    x = torch.from_numpy(spec.encode_records([table.records[i] for i in holdout[:PARITY_SAMPLES]]))
    return ExportSpec(model, {"features": x}, ["log_price"], {"features": {0: "batch"}})


def _poem_spec(model: PoemRNN, saved: dict[str, Any]) -> ExportSpec:
    from training.datasets.poems import heldout_split, load_corpus

    vocab = Vocabulary.from_dict(saved["preprocessing"]["vocab"])
    poems = load_corpus(saved["summary"]["dataset"])
    _, test_idx = heldout_split(len(poems))
    seqs = [vocab.encode(poems[i], bos=True) for i in test_idx]
    seqs = [s[:POEM_STEPS] for s in seqs if len(s) >= POEM_STEPS][:4]
    if not seqs:
        raise ExportError("no held-out poem is long enough for the parity check")
    tokens = torch.tensor(seqs)  # [B, 50]: 50 real steps, the state carried across them
    lstm = model.config.cell == "lstm"
    state = model.initial_state(len(seqs))
    if lstm:
        step = LSTMPoemStep(model)
        inputs = {"token": tokens[:, 0], "hidden": state[0], "cell": state[1]}
        outputs = ["logits", "next_hidden", "next_cell"]
        dynamic = {"token": {0: "batch"}, "hidden": {1: "batch"}, "cell": {1: "batch"}}
    else:
        step = PoemStep(model)
        inputs = {"token": tokens[:, 0], "hidden": state}
        outputs = ["logits", "next_hidden"]
        dynamic = {"token": {0: "batch"}, "hidden": {1: "batch"}}
    steps = [{"token": tokens[:, t]} for t in range(tokens.shape[1])]
    return ExportSpec(step.eval(), inputs, outputs, dynamic, steps)


def build_spec(model: nn.Module, saved: dict[str, Any]) -> ExportSpec:
    task = saved["summary"]["task"]
    if task == "image":
        return _image_spec(model, saved)
    if task == "price":
        return _price_spec(model, saved)
    return _poem_spec(model, saved)


def export_onnx(spec: ExportSpec, path: Path) -> None:
    names = list(spec.inputs)
    dims: dict[str, torch.export.Dim] = {}
    dynamic_shapes = {}
    for name in names:
        axes = spec.dynamic.get(name, {})
        dynamic_shapes[name] = {a: dims.setdefault(s, torch.export.Dim(s, min=1, max=65536)) for a, s in axes.items()}
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            spec.module, tuple(spec.inputs.values()), dynamo=True, input_names=names, output_names=spec.outputs,
            dynamic_shapes=dynamic_shapes, opset_version=OPSET, external_data=False, verbose=False,
        )
    program.save(str(path), external_data=False)
    import onnx

    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def export_torchscript(spec: ExportSpec, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(spec.module, tuple(spec.inputs.values()), check_trace=False)
        traced.save(str(path))


def _run_steps(run_one, spec: ExportSpec) -> list[np.ndarray]:
    """Outputs of every step (poems: state carried) or of the single batch call."""
    if spec.steps is None:
        return [np.asarray(o) for o in run_one(spec.inputs)]
    state = {k: v for k, v in spec.inputs.items() if k != "token"}
    collected = []
    for step in spec.steps:
        out = run_one({**step, **state})
        collected += [np.asarray(o) for o in out]
        state = dict(zip(list(state), out[1:], strict=True))
    return collected


def check_parity(spec: ExportSpec, onnx_path: Path, ts_path: Path) -> dict[str, float]:
    """Max abs difference of TorchScript and ONNX Runtime against eager, over every output."""
    import onnxruntime as ort

    def eager(inputs: dict[str, Any]) -> list[np.ndarray]:
        with torch.no_grad():
            out = spec.module(*[torch.as_tensor(np.asarray(v)) for v in inputs.values()])
        return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]

    scripted = torch.jit.load(str(ts_path))

    def torchscript(inputs: dict[str, Any]) -> list[np.ndarray]:
        with torch.no_grad():
            out = scripted(*[torch.as_tensor(np.asarray(v)) for v in inputs.values()])
        return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def onnxruntime(inputs: dict[str, Any]) -> list[np.ndarray]:
        return session.run(None, {k: np.asarray(v) for k, v in inputs.items()})

    reference = _run_steps(eager, spec)
    report = {}
    for name, runner in (("torchscript", torchscript), ("onnxruntime", onnxruntime)):
        outputs = _run_steps(runner, spec)
        report[name] = max(float(np.max(np.abs(a - b))) for a, b in zip(reference, outputs, strict=True))
    return report


def _io_spec(spec: ExportSpec, onnx_path: Path) -> dict[str, Any]:
    import onnx

    graph = onnx.load(str(onnx_path)).graph

    def describe(values) -> list[dict[str, Any]]:
        return [{"name": v.name,
                 "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]

    return {"inputs": describe(graph.input), "outputs": describe(graph.output)}


def _describe_io(values: list[dict[str, Any]]) -> str:
    return ", ".join(f"`{v['name']}` {v['dtype']} {v['shape']}" for v in values)


def model_card(name: str, meta: dict[str, Any]) -> str:
    s = meta["training"]
    lines = [
        f"# {name}", "",
        f"- Architecture: `{meta['architecture']}` preset `{s['preset']}` ({s.get('source', '')})",
        f"- Trained on: `{s['dataset']}` ({s['profile']} profile, seed {s['seed']}, {s['epochs_run']} epochs, "
        f"best epoch {s['best_epoch']}, {s['train_seconds']:.0f} s on {s['device']})",
        f"- Parameters: {s['parameters']:,}",
        f"- Test metrics: `{json.dumps({k: v for k, v in s['test'].items() if not isinstance(v, dict | list)})}`",
        f"- Inputs: {_describe_io(meta['io']['inputs'])}",
        f"- Outputs: {_describe_io(meta['io']['outputs'])}",
        f"- Parity (max abs vs eager): TorchScript {meta['parity']['torchscript']:.2e}, "
        f"ONNX Runtime {meta['parity']['onnxruntime']:.2e} (bound {TOLERANCE:g})",
        f"- Exported with torch {meta['versions']['torch']}, onnx {meta['versions']['onnx']}, "
        f"opset {OPSET}",
        *_int8_line(meta.get("quantization")), "",
        "## Notes", "", s.get("notes", "") or "–", "",
        "## Intended use", "",
        "A textbook model, reproduced for teaching and for serving demos; see docs/RESULTS.md for how it "
        "compares with the book and with our stronger defaults. Not for decisions about real people or houses.",
    ]
    return "\n".join(lines) + "\n"


def _int8_line(report: dict[str, Any] | None) -> list[str]:
    if report is None:
        return []
    verdict = "shipped as `model.int8.onnx`" if report["decision"]["keep"] else "not shipped"
    return [f"- Dynamic int8: {verdict} ({'; '.join(report['decision']['reasons'])})"]


def export_run(run_dir: Path, name: str | None = None, store: bool = True, int8: bool = False) -> dict[str, Any]:
    """Export one run; returns its metadata (with ``tag`` when saved to the store).

    ``int8``: also try a dynamic int8 ONNX model (``training.quantize``); it ships as ``model.int8.onnx``
    only when it is faster and as accurate, and its report goes into meta.json either way.
    """
    import onnx

    model, saved = load_run(run_dir)
    summary = saved["summary"]
    name = name or model_name_for(summary)
    spec = build_spec(model, saved)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        export_onnx(spec, work / "model.onnx")
        export_torchscript(spec, work / "model.ts")
        parity = check_parity(spec, work / "model.onnx", work / "model.ts")
        worst = max(parity.values())
        if not worst <= TOLERANCE:
            raise ExportError(f"{name}: parity check failed, max abs difference {worst:.3g} > {TOLERANCE:g} "
                              f"({parity}); nothing was saved")
        meta: dict[str, Any] = {
            "name": name,
            "task": summary["task"],
            "architecture": saved["architecture"],
            "config": saved["config"],
            "preprocessing": saved["preprocessing"],
            "io": _io_spec(spec, work / "model.onnx"),
            "training": {k: v for k, v in summary.items() if k != "history"},
            # Which trained weights these are: ``./dlbook up`` re-exports when the store's copy differs.
            "source": {"run": run_dir.name, "model_sha256": sha256_file(run_dir / "model.pt")},
            "parity": {**parity, "tolerance": TOLERANCE,
                       "samples": "50 carried steps of held-out poems" if spec.steps else
                       f"{len(next(iter(spec.inputs.values())))} real held-out samples"},
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "opset": OPSET,
                         "python": platform.python_version()},
        }
        if summary["task"] == "poem":  # 平水韵 groups of the vocabulary: serving's rhyme and tone masks
            from training.poem_sounds import build_sound_table

            meta["prosody"] = build_sound_table(saved["preprocessing"]["vocab"]["tokens"])
        files = ["model.onnx", "model.ts", "MODEL_CARD.md"]
        if int8:
            from training.quantize import quantize_for_export

            meta["quantization"] = quantize_for_export(work, meta)
            files += [meta["quantization"]["file"]] if meta["quantization"]["decision"]["keep"] else []
        (work / "MODEL_CARD.md").write_text(model_card(name, meta), encoding="utf-8")
        meta["files"] = {f: {"sha256": sha256_file(work / f), "bytes": (work / f).stat().st_size} for f in files}
        if store:
            meta["tag"] = save_to_store(name, work, meta)
        _record_onnx_size(run_dir, meta["files"]["model.onnx"]["bytes"])
    return meta


def save_to_store(name: str, folder: Path, meta: dict[str, Any]) -> str:
    import shutil

    import bentoml

    labels = {"task": meta["task"], "preset": meta["training"]["preset"], "dataset": meta["training"]["dataset"],
              "architecture": meta["architecture"]}
    metadata = {"test": {k: v for k, v in meta["training"]["test"].items() if isinstance(v, int | float)},
                "parity_max_abs": max(meta["parity"]["torchscript"], meta["parity"]["onnxruntime"])}
    with bentoml.models.create(name, labels=labels, metadata=metadata) as bento_model:
        for f in meta["files"]:
            shutil.copy(folder / f, bento_model.path_of(f))
        meta = {**meta, "tag": str(bento_model.tag)}
        Path(bento_model.path_of("meta.json")).write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    return str(bento_model.tag)


def _record_onnx_size(run_dir: Path, size: int) -> None:
    """Keep the ONNX size in metrics.json for the results report."""
    path = run_dir / "metrics.json"
    if path.is_file():
        metrics = json.loads(path.read_text())
        metrics["onnx_bytes"] = size
        path.write_text(json.dumps(metrics, indent=2, ensure_ascii=False))


def resolve_runs(names: list[str]) -> list[Path]:
    root = runs_dir()
    if names == ["all"]:
        found = sorted(p.parent for p in root.glob("*/model.pt"))
        return [p for p in found if not p.name.endswith("-quick")] or found
    paths = [root / n for n in names]
    for p in paths:
        if not (p / "model.pt").is_file():
            raise ExportError(f"no trained run {p.name!r} under {root} (see python -m training summary)")
    return paths
