"""How 0-255 grey pixels become the floats a model was trained on.

The textbooks disagree: LeNet (尚硅谷 8.4) eats raw 0-255 values, most MLPs divide by 255, and the
deep MLP normalises with MNIST's mean and std. Each model records its choice here and serving
applies it from the model's metadata rather than from per-model code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

ScalingKind = Literal["raw", "unit", "normalize"]


@dataclass(frozen=True)
class PixelScaling:
    """``raw``: x; ``unit``: x / 255; ``normalize``: (x / 255 - mean) / std."""

    kind: ScalingKind = "unit"
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("raw", "unit", "normalize"):
            raise ValueError(f"unknown pixel scaling {self.kind!r}: use raw, unit or normalize")
        if self.kind == "normalize" and not self.std > 0:
            raise ValueError("normalize needs std > 0")

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """Scale uint8-range pixels (any shape, any numeric dtype, values 0..255) to float32."""
        x = np.asarray(pixels, dtype=np.float32)
        if self.kind == "raw":
            return x
        x = x / np.float32(255.0)
        if self.kind == "normalize":
            x = (x - np.float32(self.mean)) / np.float32(self.std)
        return x

    @property
    def background(self) -> float:
        """The scaled value of a black (0) pixel: what padding and shifts must fill with."""
        return float(self.apply(np.zeros(1, dtype=np.uint8))[0])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PixelScaling:
        return cls(kind=data["kind"], mean=float(data.get("mean", 0.0)), std=float(data.get("std", 1.0)))
