"""TorchServe peer: a custom handler serving the exported fashion-lenet TorchScript (``model.ts``).

Packed by :mod:`loadtests.peers.torchserve_peer` into a ``.mar`` with the model's own ``meta.json``
(so the scaling is read from the same file our service reads) and ``peer.json`` (torch threads).
TorchServe's frontend batches up to ``batchSize`` requests or ``maxBatchDelay`` ms and hands them
to :meth:`LeNetHandler.handle` as one list; the answer is one JSON object per request.

Request: ``POST /predictions/fashion-lenet`` with ``{"image": [[...28 values...], ...28 rows...]}``
(0–255 pixels, light on dark); answer: ``{"probabilities": [10 floats]}``.

This file runs inside TorchServe's worker, in the TorchServe virtualenv: it imports nothing from
the project. TorchServe loads the one class defined here and calls ``initialize`` then ``handle``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch


class LeNetHandler:
    """Scale like meta.json says, run TorchScript on the whole batch, return softmax probabilities."""

    def __init__(self) -> None:
        self.model: torch.jit.ScriptModule | None = None
        self.scaling: dict[str, Any] = {}
        self.row_shape: tuple[int, ...] = (1, 28, 28)

    def initialize(self, context: Any) -> None:
        model_dir = Path(context.system_properties["model_dir"])
        meta = json.loads((model_dir / "meta.json").read_text())
        settings = json.loads((model_dir / "peer.json").read_text())
        torch.set_num_threads(int(settings["threads"]))
        self.scaling = meta["preprocessing"]["scaling"]
        self.row_shape = tuple(meta["io"]["inputs"][0]["shape"][1:])
        self.model = torch.jit.load(str(model_dir / "model.ts"), map_location="cpu").eval()
        # TorchScript's profiling executor specialises the graph on the first calls: do them now,
        # at the batch sizes the load will bring, so no measured request pays for it.
        for size in (1, 2, 8, 32, 1, 32):
            self._probabilities(np.zeros((size, 28, 28), np.float32))

    def _scale(self, raw: np.ndarray) -> np.ndarray:
        """meta.json's ``preprocessing.scaling``: raw x, unit x/255, normalize (x/255 - mean)/std, in float32."""
        x = np.asarray(raw, dtype=np.float32)
        if self.scaling["kind"] == "raw":
            return x
        x = x / np.float32(255.0)
        if self.scaling["kind"] == "normalize":
            x = (x - np.float32(self.scaling["mean"])) / np.float32(self.scaling["std"])
        return x

    def _probabilities(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(self._scale(images).reshape(len(images), *self.row_shape)))
        with torch.inference_mode():
            logits = self.model(x)
        return torch.softmax(logits, dim=1).numpy()

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[dict[str, Any]]:
        """One batch from TorchServe: each row holds one request's JSON (decoded already for application/json)."""
        images = []
        for row in data:
            body = row.get("body", row.get("data"))
            if isinstance(body, (bytes, bytearray)):
                body = json.loads(body)
            images.append(np.asarray(body["image"], np.float32).reshape(28, 28))
        probs = self._probabilities(np.stack(images))
        return [{"probabilities": p.tolist()} for p in probs]
