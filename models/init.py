"""Weight initialisations the textbooks name, applied to every Linear and Conv layer."""

from __future__ import annotations

from torch import nn

INITS = ("default", "normal_0.01", "xavier_uniform", "xavier_normal")


def initialise(model: nn.Module, scheme: str) -> None:
    """``default`` keeps PyTorch's; ``normal_0.01`` is d2l's N(0, 0.01²) with zero bias."""
    if scheme not in INITS:
        raise ValueError(f"unknown init {scheme!r}: use one of {INITS}")
    if scheme == "default":
        return
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            if scheme == "normal_0.01":
                nn.init.normal_(module.weight, std=0.01)
            elif scheme == "xavier_uniform":
                nn.init.xavier_uniform_(module.weight)
            else:
                nn.init.xavier_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
