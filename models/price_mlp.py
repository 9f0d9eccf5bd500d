"""PriceMLP: the textbook's house-price net, Linear-BatchNorm-ReLU-Dropout-Linear (尚硅谷 7.6).

It predicts log(price): minimising MSE on log(price) is the textbook's log-RMSE objective without
its trap (clamping raw predictions at 1 kills the gradient when a start is bad).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.init import initialise


@dataclass(frozen=True)
class PriceMLPConfig:
    in_features: int = 0  # set from the fitted FeatureSpec
    hidden: tuple[int, ...] = (128,)
    batch_norm: bool = True
    dropout: float = 0.2
    init: str = "xavier_normal"
    # Added to the output so a fresh net starts near the typical log price, not at 0.
    output_bias: float = 0.0


class PriceMLP(nn.Module):
    def __init__(self, config: PriceMLPConfig) -> None:
        super().__init__()
        if config.in_features <= 0:
            raise ValueError("PriceMLPConfig.in_features must be the number of encoded features")
        self.config = config
        layers: list[nn.Module] = []
        width = config.in_features
        for size in config.hidden:
            layers.append(nn.Linear(width, size))
            if config.batch_norm:
                layers.append(nn.BatchNorm1d(size))
            layers.append(nn.ReLU())
            if config.dropout > 0:
                layers.append(nn.Dropout(config.dropout))
            width = size
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        initialise(self, config.init)
        with torch.no_grad():
            self.net[-1].bias.fill_(config.output_bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``features [B, F]`` (encoded by ``FeatureSpec``) → ``log_price [B]``."""
        return self.net(features).squeeze(-1)
