"""Architectures: shapes, the textbook LeNet exactly, configs that rebuild the same model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import build_model, config_from_dict, config_to_dict, count_parameters
from models.poem_rnn import PoemRNN, PoemRNNConfig
from training.recipes import RECIPES

FILLED = {"price_mlp": {"in_features": 300}, "poem_rnn": {"vocab_size": 500}}


def _config(recipe):
    from dataclasses import replace

    return replace(recipe.config, **FILLED.get(recipe.architecture, {}))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_preset_builds_and_its_config_rebuilds_the_same_model(name: str) -> None:
    recipe = RECIPES[name]
    config = _config(recipe)
    torch.manual_seed(0)
    model = build_model(recipe.architecture, config).eval()
    stored = config_to_dict(config)
    torch.manual_seed(0)
    rebuilt = build_model(recipe.architecture, config_from_dict(recipe.architecture, stored)).eval()
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), rebuilt.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)
    if recipe.task == "image":
        out = model(torch.rand(3, 1, 28, 28))
        assert out.shape == (3, 10)
    elif recipe.task == "price":
        assert model(torch.randn(4, 300)).shape == (4,)
    else:
        logits, _ = model(torch.randint(0, 500, (2, 7)))
        assert logits.shape == (2, 7, 500)


def test_book_lenet_is_the_textbook_network() -> None:
    model = build_model("lenet", RECIPES["lenet-book"].config)
    kinds = [type(m).__name__ for m in model.modules() if not isinstance(m, nn.Sequential | type(model))]
    assert kinds == ["Conv2d", "Sigmoid", "AvgPool2d", "Conv2d", "Sigmoid", "AvgPool2d", "Flatten",
                     "Linear", "Sigmoid", "Linear", "Sigmoid", "Linear"]
    conv1 = model.features[0]
    assert (conv1.in_channels, conv1.out_channels, conv1.kernel_size, conv1.padding) == (1, 6, (5, 5), (2, 2))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(400, 120), (120, 84), (84, 10)]
    assert count_parameters(model) == 61_706


def test_book_digit_mlp_and_deep_mlp_shapes() -> None:
    book = build_model("mlp", RECIPES["mlp-book"].config)
    assert [(m.in_features, m.out_features) for m in book.modules() if isinstance(m, nn.Linear)] == [
        (784, 50), (50, 100), (100, 10)]
    assert sum(isinstance(m, nn.Sigmoid) for m in book.modules()) == 2
    deep = build_model("mlp", RECIPES["mlp-deep"].config)
    assert [m.out_features for m in deep.modules() if isinstance(m, nn.Linear)] == [520, 320, 240, 120, 10]
    assert sum(isinstance(m, nn.Dropout) for m in deep.modules()) == 1


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
def test_poem_rnn_is_batch_first_and_step_matches_forward(cell: str) -> None:
    torch.manual_seed(0)
    model = PoemRNN(PoemRNNConfig(vocab_size=50, embedding_dim=16, hidden_size=32, cell=cell)).eval()
    assert model.rnn.batch_first
    tokens = torch.randint(4, 50, (3, 9))
    full, _ = model(tokens)
    state = model.initial_state(3)
    for t in range(9):
        logits, state = model.step(tokens[:, t], state)
        torch.testing.assert_close(logits, full[:, t], rtol=1e-5, atol=1e-5)
    # sequences in a batch do not mix: one poem alone gives the same logits as inside the batch
    alone, _ = model(tokens[1:2])
    torch.testing.assert_close(alone[0], full[1], rtol=1e-5, atol=1e-5)


def test_unknown_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        config_from_dict("mlp", {"hidden": [10], "colour": "red"})
    with pytest.raises(ValueError):
        build_model("transformer", {})
