"""One seed for Python, NumPy and torch, so the same seed gives the same metrics on CPU."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int, device: torch.device) -> torch.Generator:
    """Seed every generator and return the torch generator that shuffles batches."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        # cuBLAS determinism on CUDA >= 10.2, as PyTorch's reproducibility notes asked
        # (https://pytorch.org/docs/stable/generated/torch.use_deterministic_algorithms). PyTorch has since
        # dropped that requirement from its docs and checks (https://github.com/pytorch/pytorch/pull/161749):
        # delete this line once two CUDA trainings of one seed give the same metrics without it.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    return device
