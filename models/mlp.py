"""ImageMLP: every fully connected image classifier of the textbooks, from one config.

Softmax regression is an MLP with no hidden layer; the 尚硅谷 digit MLP is 784-50-100-10 with
sigmoids; the deep MLP of "PyTorch 从入门到精通" is 784-520-320-240-120-10 with one dropout; the
Fashion MLPs are 784-256-10 (ReLU) and 784-32-10 (sigmoid). Presets in ``training/recipes.py``.
Input is an image batch ``[B, 1, 28, 28]`` already scaled (see ``preprocessing.pixels``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.conditioning import InputConditioning
from models.init import initialise

ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "leaky_relu": lambda: nn.LeakyReLU(0.1)}


@dataclass(frozen=True)
class MLPConfig:
    in_features: int = 784
    hidden: tuple[int, ...] = (1024, 512)
    num_classes: int = 10
    activation: str = "relu"
    # Dropout probability after each hidden layer (a shorter tuple leaves the rest at 0).
    dropout: tuple[float, ...] = (0.3, 0.3)
    batch_norm: bool = False
    init: str = "default"
    # Per-image input conditioning, the model's first layer (models/conditioning.py): none, stretch, background.
    conditioning: str = "none"


class ImageMLP(nn.Module):
    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        if config.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {config.activation!r}: {sorted(ACTIVATIONS)}")
        self.config = config
        # Outside ``net``: it has no weights, and the checkpoints' layer numbering stays as it was. None for
        # "none", so an unconditioned model (the books' presets) is exactly the network it always was.
        self.conditioning = InputConditioning(config.conditioning) if config.conditioning != "none" else None
        layers: list[nn.Module] = [nn.Flatten()]
        width = config.in_features
        for i, size in enumerate(config.hidden):
            layers.append(nn.Linear(width, size))
            if config.batch_norm:
                layers.append(nn.BatchNorm1d(size))
            layers.append(ACTIVATIONS[config.activation]())
            p = config.dropout[i] if i < len(config.dropout) else 0.0
            if p > 0:
                layers.append(nn.Dropout(p))
            width = size
        layers.append(nn.Linear(width, config.num_classes))
        self.net = nn.Sequential(*layers)
        initialise(self, config.init)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``image [B, 1, 28, 28]`` (or ``[B, 784]``) → logits ``[B, num_classes]``."""
        if self.conditioning is not None:
            image = self.conditioning(image)
        return self.net(image)
