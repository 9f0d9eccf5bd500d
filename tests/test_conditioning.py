"""The default image models' first layer (``models/conditioning.py``): a clean data set frame passes
unchanged, and a brighter or fogged one comes out as the clean one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.conditioning import InputConditioning
from preprocessing import PixelScaling
from training.corruptions import brightness, fog
from training.datasets.images import load_image_split

MNIST = PixelScaling("normalize", 0.1307, 0.3081)


def _scaled(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(MNIST.apply(images)[:, None])


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return load_image_split("mnist", "test").images[:64]


@pytest.mark.parametrize("kind", ["stretch", "background"])
def test_a_clean_frame_reaches_the_network_as_its_ink(digits: np.ndarray, kind: str) -> None:
    out = InputConditioning(kind)(_scaled(digits)).numpy()[:, 0]
    ink = digits.astype(np.float32) / digits.max(axis=(1, 2), keepdims=True)
    # Whatever the scaling, the output is the frame's ink in 0..1; the top-hat takes nothing from a stroke.
    assert np.abs(out - ink).mean() < 0.01
    assert out.min() == 0.0 and np.allclose(out.max(axis=(1, 2)), 1.0)


def test_the_scaling_does_not_matter(digits: np.ndarray) -> None:
    raw = torch.from_numpy(digits.astype(np.float32)[:, None])
    for kind in ("stretch", "background"):
        layer = InputConditioning(kind)
        assert torch.allclose(layer(raw), layer(_scaled(digits)), atol=1e-5)


def test_a_brighter_frame_comes_out_as_the_clean_one(digits: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    bright = np.stack([brightness(d, rng) for d in digits])
    for kind in ("stretch", "background"):
        layer = InputConditioning(kind)
        clean, out = layer(_scaled(digits)), layer(_scaled(bright))
        assert (out - clean).abs().mean() < 0.05, kind
    none = InputConditioning("none")
    assert torch.equal(none(_scaled(bright)), _scaled(bright))


def test_fog_is_taken_off_by_the_background_only(digits: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    fogged = np.stack([fog(d, rng) for d in digits])
    clean = InputConditioning("background")(_scaled(digits))
    background = (InputConditioning("background")(_scaled(fogged)) - clean).abs().mean()
    stretch = (InputConditioning("stretch")(_scaled(fogged)) - clean).abs().mean()
    assert background < 0.05 < stretch


def test_a_blank_frame_stays_blank_and_bad_kinds_are_refused() -> None:
    blank = torch.zeros(2, 1, 28, 28)
    for kind in ("stretch", "background"):
        assert torch.equal(InputConditioning(kind)(blank), blank)
    with pytest.raises(ValueError, match="unknown input conditioning"):
        InputConditioning("sharpen")
    with pytest.raises(ValueError, match="odd size"):
        InputConditioning("background", size=8)
