"""Finding exported models in the BentoML model store, verified before any runtime sees them.

A service loads ``name:latest`` unless the environment pins a version: ``DLBOOK_MODEL_<NAME>`` with
the name upper-cased and dashes as underscores, e.g. ``DLBOOK_MODEL_FASHION_LENET=fashion-lenet:3x…``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bentoml

from serving.artifacts import ArtifactError, verify_model_dir
from serving.int8_guard import choose_graph
from serving.runtime import OnnxModel, RuntimeConfig
from serving.settings import Settings


class ModelNotFound(LookupError):
    pass


def pinned_tag(name: str, settings: Settings | None = None) -> str:
    """``name:latest``, or the version ``DLBOOK_MODEL_<NAME>`` pins (see ``Settings.pinned_tag``)."""
    return (settings or Settings.from_env()).pinned_tag(name)


def exported_names(task: str) -> list[str]:
    """Names (not versions) of every exported model of ``task`` in the store, sorted."""
    names = {m.tag.name for m in bentoml.models.list() if m.info.labels.get("task") == task}
    return sorted(names)


@dataclass
class ExportedModel:
    """A verified model folder; ``onnx`` is this process's session on ``graph``, ``None`` when the
    graph runs elsewhere (poems: a decoding process of their own), which then reports ``provider``."""

    name: str
    tag: str
    path: Path
    meta: dict[str, Any]
    graph: Path
    onnx: OnnxModel | None = None
    provider: str = ""

    @property
    def session(self) -> OnnxModel:
        """This process's session; only ``load_exported`` opens one."""
        if self.onnx is None:
            raise RuntimeError(f"{self.name} has no session in this process: load it with load_exported")
        return self.onnx

    def describe(self) -> dict[str, Any]:
        """What the models endpoint shows: no weights, no paths."""
        training = self.meta["training"]
        return {
            "name": self.name,
            "version": self.tag.split(":", 1)[1],
            "task": self.meta["task"],
            "architecture": self.meta["architecture"],
            "preset": training["preset"],
            "dataset": training["dataset"],
            "provider": self.provider,
            "inputs": self.meta["io"]["inputs"],
            "outputs": self.meta["io"]["outputs"],
            "test_metrics": {k: v for k, v in training["test"].items() if isinstance(v, int | float)},
            "parity_max_abs": max(self.meta["parity"]["torchscript"], self.meta["parity"]["onnxruntime"]),
            "profile": training.get("profile"),
            # What it learnt from: a cut such as data/samples (a fresh clone's model) says so here, and
            # the playground shows it; runs exported before this was recorded say nothing.
            "trained_on": training.get("data"),
        }


def onnx_file(meta: dict[str, Any], folder: Path, settings: Settings | None = None) -> str:
    """``model.int8.onnx`` when ``DLBOOK_PREFER_INT8=1``, export shipped one (so meta.json lists and
    verified it) and it is safe on this CPU, else ``model.onnx``. Export ships int8 only when it was
    faster and as accurate on the CPU it ran on; ``serving.int8_guard.choose_graph`` re-verifies it on
    the stored check batch when this CPU differs, and falls back to float (logged) when it fails."""
    return choose_graph(folder, meta, prefer_int8=(settings or Settings.from_env()).prefer_int8)


def locate_exported(name: str, settings: Settings | None = None) -> ExportedModel:
    """The pinned version of ``name``, its files checked against meta.json's checksums; no session.

    For a graph this process will not run itself: the poem model's decoding process opens its own,
    and a second session here would only hold the weights twice. ``settings``: the service's (the
    version pin, int8); scripts and tests leave it out and get the environment as it is now."""
    settings = settings or Settings.from_env()
    tag = settings.pinned_tag(name)
    try:
        model = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound as err:
        raise ModelNotFound(f"model {tag} is not in the BentoML store; export it with "
                            "`python -m training export <run>` (see `bentoml models list`)") from err
    except bentoml.exceptions.BentoMLException as err:
        raise ModelNotFound(f"model tag {tag!r} is malformed ({err}); use name or name:version") from err
    path = Path(model.path)
    meta = verify_model_dir(path)
    return ExportedModel(name, str(model.tag), path, meta, path / onnx_file(meta, path, settings))


def load_exported(name: str, runtime: RuntimeConfig | None = None, settings: Settings | None = None) -> ExportedModel:
    """``locate_exported`` plus an ONNX Runtime session on the graph, ready to run in this process
    (``runtime``: default, the one ``settings`` give)."""
    settings = settings or Settings.from_env()
    model = locate_exported(name, settings)
    try:
        model.onnx = OnnxModel(model.graph, runtime or RuntimeConfig.from_settings(settings))
    except Exception as err:  # ORT's errors are not one class
        raise ArtifactError(f"{model.graph}: ONNX Runtime cannot load it ({err})") from err
    model.provider = model.onnx.provider
    return model
