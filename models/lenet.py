"""LeNet for 28×28 images: the textbook's sigmoid/AvgPool net and a modern variant, one config.

``book`` (尚硅谷 8.4): Conv(1,6,5,pad 2)-Sigmoid-AvgPool(2)-Conv(6,16,5)-Sigmoid-AvgPool(2)-
400-120-Sigmoid-84-Sigmoid-10, Xavier uniform. Our default keeps the two-conv/three-FC shape but
uses wider channels, BatchNorm, ReLU, MaxPool and dropout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.conditioning import InputConditioning
from models.init import initialise

_ACT = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}
_POOL = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}


@dataclass(frozen=True)
class LeNetConfig:
    channels: tuple[int, int] = (32, 64)
    fc: tuple[int, int] = (256, 128)
    num_classes: int = 10
    activation: str = "relu"
    pool: str = "max"
    batch_norm: bool = True
    dropout: float = 0.3
    init: str = "default"
    # Per-image input conditioning, the model's first layer (models/conditioning.py): none, stretch, background.
    conditioning: str = "none"


class LeNet(nn.Module):
    def __init__(self, config: LeNetConfig) -> None:
        super().__init__()
        if config.activation not in _ACT or config.pool not in _POOL:
            raise ValueError(f"activation must be one of {sorted(_ACT)}, pool one of {sorted(_POOL)}")
        self.config = config
        act, pool = _ACT[config.activation], _POOL[config.pool]
        c1, c2 = config.channels

        def conv_block(cin: int, cout: int, padding: int) -> list[nn.Module]:
            block: list[nn.Module] = [nn.Conv2d(cin, cout, kernel_size=5, padding=padding)]
            if config.batch_norm:
                block.append(nn.BatchNorm2d(cout))
            return [*block, act(), pool(kernel_size=2, stride=2)]

        # 28×28 → conv(pad 2) 28 → pool 14 → conv 10 → pool 5: the flatten size is c2·5·5.
        # Outside ``features``: it has no weights, and the checkpoints' layer numbering stays as it was. None for
        # "none", so an unconditioned model (the books' presets) is exactly the network it always was.
        self.conditioning = InputConditioning(config.conditioning) if config.conditioning != "none" else None
        self.features = nn.Sequential(*conv_block(1, c1, 2), *conv_block(c1, c2, 0), nn.Flatten())
        f1, f2 = config.fc
        head: list[nn.Module] = [nn.Linear(c2 * 5 * 5, f1), act()]
        if config.dropout > 0:
            head.append(nn.Dropout(config.dropout))
        head += [nn.Linear(f1, f2), act()]
        if config.dropout > 0:
            head.append(nn.Dropout(config.dropout))
        head.append(nn.Linear(f2, config.num_classes))
        self.classifier = nn.Sequential(*head)
        initialise(self, config.init)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``image [B, 1, 28, 28]`` → logits ``[B, num_classes]``."""
        if self.conditioning is not None:
            image = self.conditioning(image)
        return self.classifier(self.features(image))
