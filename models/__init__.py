"""The architectures, one file each, built from config dataclasses. No data, no I/O."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from torch import nn

from models.lenet import LeNet, LeNetConfig
from models.mlp import ImageMLP, MLPConfig
from models.poem_rnn import PoemRNN, PoemRNNConfig
from models.price_mlp import PriceMLP, PriceMLPConfig

# architecture name → (module class, config class); checkpoints store the name and the config dict.
ARCHITECTURES: dict[str, tuple[type[nn.Module], type]] = {
    "mlp": (ImageMLP, MLPConfig),
    "lenet": (LeNet, LeNetConfig),
    "price_mlp": (PriceMLP, PriceMLPConfig),
    "poem_rnn": (PoemRNN, PoemRNNConfig),
}


def config_from_dict(architecture: str, data: dict[str, Any]) -> Any:
    """Rebuild a config dataclass from its JSON form (lists back to tuples)."""
    config_cls = ARCHITECTURES[architecture][1]
    names = {f.name for f in fields(config_cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {architecture} config fields: {sorted(unknown)}")
    return config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def build_model(architecture: str, config: Any) -> nn.Module:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}: use one of {sorted(ARCHITECTURES)}")
    model_cls, config_cls = ARCHITECTURES[architecture]
    if isinstance(config, dict):
        config = config_from_dict(architecture, config)
    if not isinstance(config, config_cls):
        raise TypeError(f"{architecture} needs a {config_cls.__name__}")
    return model_cls(config)


def config_to_dict(config: Any) -> dict[str, Any]:
    return asdict(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "ARCHITECTURES",
    "ImageMLP",
    "LeNet",
    "LeNetConfig",
    "MLPConfig",
    "PoemRNN",
    "PoemRNNConfig",
    "PriceMLP",
    "PriceMLPConfig",
    "build_model",
    "config_from_dict",
    "config_to_dict",
    "count_parameters",
]
