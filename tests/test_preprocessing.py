"""The preprocessing that training and serving share: pixels, tabular features, vocabulary."""

from __future__ import annotations

import math

import numpy as np
import pytest

from preprocessing import FeatureSpec, PixelScaling, RecordError, Vocabulary
from training.datasets.house import load_house_train


def test_pixel_scalings_match_their_definitions() -> None:
    pixels = np.array([[0, 128, 255]], dtype=np.uint8)
    assert PixelScaling("raw").apply(pixels).tolist() == [[0.0, 128.0, 255.0]]
    np.testing.assert_allclose(PixelScaling("unit").apply(pixels), [[0.0, 128 / 255, 1.0]], rtol=1e-6)
    norm = PixelScaling("normalize", 0.1307, 0.3081)
    np.testing.assert_allclose(norm.apply(pixels), (pixels / 255 - 0.1307) / 0.3081, rtol=1e-5)
    assert norm.background == pytest.approx(-0.1307 / 0.3081, rel=1e-5)
    assert PixelScaling.from_dict(norm.to_dict()) == norm
    with pytest.raises(ValueError):
        PixelScaling("standardise")


def test_vocabulary_round_trip_and_specials() -> None:
    vocab = Vocabulary.build(["床前明月光，", "疑是地上霜。", "明月"], min_count=1)
    assert vocab.tokens[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert vocab.tokens[4] in ("明", "月")  # the most frequent characters come first
    ids = vocab.encode("明月光", bos=True, eos=True)
    assert ids[0] == vocab.bos_id and ids[-1] == vocab.eos_id
    assert vocab.decode(ids) == "明月光"
    assert vocab.encode("雪")[0] == vocab.unk_id
    assert vocab.unknown_chars("明雪月雨雪") == ["雪", "雨"]
    assert Vocabulary.from_dict(vocab.to_dict()).tokens == vocab.tokens
    rare = Vocabulary.build(["明月", "明"], min_count=2)
    assert "月" not in rare and "明" in rare


@pytest.fixture(scope="module")
def house_spec() -> tuple[FeatureSpec, list[dict]]:
    table = load_house_train()
    records = table.records[:1000]
    spec = FeatureSpec.fit(records, table.numeric_columns, table.categorical_columns, log_skewed=True)
    return spec, table.records


def test_feature_spec_encodes_like_the_textbook(house_spec: tuple[FeatureSpec, list[dict]]) -> None:
    spec, records = house_spec
    x = spec.encode_records(records[:1000])
    assert x.shape == (1000, spec.n_features) and x.dtype == np.float32
    n_num = len(spec.numeric)
    # standardised numeric block: mean 0 and population std 1 on the rows it was fitted on
    np.testing.assert_allclose(x[:, :n_num].mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(x[:, :n_num].std(axis=0), 1, atol=1e-3)
    # one-hot block: exactly one 1 per categorical column for fitted rows
    assert x[:, n_num:].sum(axis=1).tolist() == [len(spec.categorical)] * 1000
    assert any(f.log for f in spec.numeric) and not all(f.log for f in spec.numeric)


def test_feature_spec_missing_unseen_and_round_trip(house_spec: tuple[FeatureSpec, list[dict]]) -> None:
    spec, records = house_spec
    empty = spec.encode_records([{}])[0]
    n_num = len(spec.numeric)
    assert np.all(empty[:n_num] == 0)  # missing numeric → mean → 0 after standardising
    alley = next(f for f in spec.categorical if f.name == "Alley")
    assert "NaN" in alley.categories  # missing category is the textbook's "NaN" string
    unseen = spec.encode_records([{"Neighborhood": "Atlantis"}])[0]
    names = spec.feature_names()
    hood = [i for i, n in enumerate(names) if n.startswith("Neighborhood=")]
    assert unseen[hood].sum() == 0
    restored = FeatureSpec.from_dict(spec.to_dict())
    np.testing.assert_array_equal(restored.encode_records(records[1000:1100]), spec.encode_records(records[1000:1100]))
    # the CSV's own spellings of "missing" mean missing in a request too, as they did in training
    np.testing.assert_array_equal(spec.encode_records([{"Alley": "NA"}]), spec.encode_records([{}]))
    with_extras = dict(records[0], Id=1, SalePrice=100000)
    np.testing.assert_array_equal(spec.encode_records([with_extras]), spec.encode_records([records[0]]))


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"LotAreaa": 100}, "LotAreaa"),
        ({"LotArea": "8450"}, "LotArea"),
        ({"LotArea": True}, "LotArea"),
        ({"LotArea": math.nan}, "LotArea"),
        ({"LotArea": math.inf}, "LotArea"),
        ({"GrLivArea": -5}, "GrLivArea"),
        ({"Neighborhood": 3}, "Neighborhood"),
        ({"LotArea": 10**400}, "LotArea"),
        ({"LotArea": 1e300}, "LotArea"),
    ],
)
def test_feature_spec_refuses_bad_records(house_spec: tuple[FeatureSpec, list[dict]], record: dict, field: str) -> None:
    spec, _ = house_spec
    with pytest.raises(RecordError) as err:
        spec.encode_records([record])
    assert err.value.field == field and err.value.index == 0
    assert field in str(err.value)
