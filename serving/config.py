"""Service settings from the environment, with the defaults documented in the README."""

from __future__ import annotations

import os
from dataclasses import dataclass


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)))


def _names(name: str) -> list[str] | None:
    value = os.environ.get(name, "").strip()
    return [v.strip() for v in value.split(",") if v.strip()] or None


@dataclass(frozen=True)
class ServingLimits:
    max_images: int = 64  # images per request
    max_records: int = 1000  # house records per request
    max_poems: int = 8  # poems per request
    generation_timeout_s: float = 30.0
    max_batch: int = 256  # rows per ONNX Runtime call (images, houses)
    max_poem_batch: int = 64  # live sequences per decoding step

    @classmethod
    def from_env(cls) -> ServingLimits:
        return cls(
            max_images=_int("DLBOOK_MAX_IMAGES", cls.max_images),
            max_records=_int("DLBOOK_MAX_RECORDS", cls.max_records),
            max_poems=_int("DLBOOK_MAX_POEMS", cls.max_poems),
            generation_timeout_s=float(os.environ.get("DLBOOK_GENERATION_TIMEOUT_S", cls.generation_timeout_s)),
            max_batch=_int("DLBOOK_MAX_BATCH", cls.max_batch),
            max_poem_batch=_int("DLBOOK_MAX_POEM_BATCH", cls.max_poem_batch),
        )


def models_for(task: str) -> list[str] | None:
    """``DLBOOK_IMAGE_MODELS=fashion-lenet,digits-mlp`` restricts what a service loads (default: all)."""
    return _names(f"DLBOOK_{task.upper()}_MODELS")


def default_model(task: str, fallback: str) -> str:
    return os.environ.get(f"DLBOOK_DEFAULT_{task.upper()}_MODEL", fallback)
