"""Model input tensors → labelled answers with top-k, for any exported image model."""

from __future__ import annotations

from typing import Any

import numpy as np

from preprocessing import PixelScaling
from serving.model_store import ExportedModel


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


class ImageModel:
    """One exported image classifier with its scaling and labels (all from its metadata)."""

    def __init__(self, model: ExportedModel) -> None:
        pre = model.meta["preprocessing"]
        self.model = model
        self.onnx = model.session
        self.dataset: str = model.meta["training"]["dataset"]
        self.scaling = PixelScaling.from_dict(pre["scaling"])
        self.labels: list[str] = pre["labels"]
        self.labels_zh: list[str] = pre["labels_zh"]
        self.onnx.warm_up({"image": np.zeros((1, 1, 28, 28), np.float32)})

    def probabilities(self, frames: np.ndarray) -> np.ndarray:
        """``frames uint8 [N, 28, 28]`` (dataset-like, light on dark) → probabilities ``[N, classes]``."""
        x = self.scaling.apply(frames)[:, None].astype(np.float32)
        (logits,) = self.onnx.run({"image": np.ascontiguousarray(x)})
        return softmax(logits.astype(np.float64))

    def describe(self, probs: np.ndarray, top_k: int) -> dict[str, Any]:
        order = np.argsort(-probs, kind="stable")[:top_k]
        best = int(order[0])
        return {
            "label": self.labels[best],
            "label_zh": self.labels_zh[best],
            "class_index": best,
            "probability": float(probs[best]),
            "top_k": [{"label": self.labels[i], "label_zh": self.labels_zh[i], "class_index": int(i),
                       "probability": float(probs[i])} for i in order],
        }
