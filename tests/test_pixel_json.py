"""The fast decoder of the usual pixel body (``serving.pixel_json``): for the bodies it takes, the same
arguments as the route's pydantic model gives; everything else is left to that model, which says why."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pydantic
import pytest

from serving.image_to_tensor import array_to_frame
from serving.pixel_json import decoder_for
from training.datasets.images import load_image_split


class _PixelArgs(pydantic.BaseModel):
    """The shape of BentoML's input model for ``classify_pixels(images, model="", top_k=3)``."""

    images: list[Any]
    model: str = ""
    top_k: int = 3


def _pixels(count: int) -> list:
    return load_image_split("mnist", "test").images[:count].tolist()


@pytest.mark.parametrize("body", [
    {"images": _pixels(1)},
    {"images": _pixels(3), "top_k": 5, "model": "digits-lenet"},
    {"model": "", "images": _pixels(2), "top_k": 0},
])
def test_the_usual_body_gives_what_pydantic_gives(body: dict) -> None:
    raw = json.dumps(body).encode()
    fast = decoder_for(_PixelArgs)(raw)
    slow = _PixelArgs.model_validate_json(raw)
    assert fast is not None
    assert fast["model"] == slow.model and fast["top_k"] == slow.top_k
    assert len(fast["images"]) == len(slow.images)
    for array, lists in zip(fast["images"], slow.images, strict=True):
        assert array.dtype == np.int64 and array.shape == (28, 28)
        assert np.array_equal(array_to_frame(array), array_to_frame(lists))


@pytest.mark.parametrize("raw", [
    b'{"images": [[' ,  # cut short
    json.dumps({"images": []}).encode(),
    json.dumps({"top_k": 2}).encode(),  # no images
    json.dumps({"images": [[[0.5] * 28] * 28]}).encode(),  # floats: the 0..1 reading is pydantic's path
    json.dumps({"images": [[0] * 784]}).encode(),  # flat
    json.dumps({"images": [[[True] * 28] * 28]}).encode(),  # a boolean is not a pixel
    json.dumps({"images": [[[1] * 28] * 27]}).encode(),  # 27 rows
    json.dumps({"images": [[[1] * 28] * 27 + [[1] * 29]]}).encode(),  # ragged
    json.dumps({"images": [[[1] * 28] * 28], "top_k": "3"}).encode(),  # pydantic coerces, msgspec does not
    json.dumps({"images": [[[1] * 28] * 28], "colour": "red"}).encode(),  # unknown field: pydantic ignores it
    json.dumps({"images": [[[2**70] * 28] * 28]}).encode(),  # beyond int64
])
def test_anything_else_is_left_to_the_pydantic_model(raw: bytes) -> None:
    assert decoder_for(_PixelArgs)(raw) is None


def test_a_model_with_a_field_it_cannot_decode_exactly_gets_no_fast_path() -> None:
    class Bounded(pydantic.BaseModel):
        images: list[Any]
        top_k: int = pydantic.Field(3, ge=1)

    class Floating(pydantic.BaseModel):
        images: list[Any]
        scale: float = 1.0

    class NoImages(pydantic.BaseModel):
        top_k: int = 3

    assert decoder_for(Bounded) is None and decoder_for(Floating) is None and decoder_for(NoImages) is None


def test_a_key_given_twice_counts_once_as_in_pydantic() -> None:
    first, last = json.dumps([[1] * 28] * 28), json.dumps([[2] * 28] * 28)
    raw = f'{{"images": [{first}], "top_k": 1, "images": [{last}], "top_k": 4}}'.encode()
    fast, slow = decoder_for(_PixelArgs)(raw), _PixelArgs.model_validate_json(raw)
    assert fast is not None
    assert fast["top_k"] == slow.top_k == 4
    assert np.array_equal(fast["images"][0], np.array(slow.images[0]))
