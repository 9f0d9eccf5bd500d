"""Short real trainings: every preset learns, the defaults clearly beat chance, seeds reproduce,
resume continues exactly, early stopping keeps the best epoch's weights, the price calibration's
fold models train exactly as ``fit`` does, and a run leaves model.pt, metrics.json and a plot behind."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from models import build_model
from training.loop import fit, train_epochs
from training.recipes import RECIPES, Phase
from training.seeding import seed_everything
from training.train import TrainOptions, _resolve, build_task, train

SMALL = {"image": 1500, "price": None, "poem": 40}
LOSS_KEY = {"image": "val_loss", "price": "val_log_rmse", "poem": "val_perplexity"}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_preset_learns_on_a_real_subset(name: str) -> None:
    recipe = RECIPES[name]
    architecture, preset = recipe.architecture, recipe.preset
    options = TrainOptions(architecture, preset, epochs=1 if recipe.task != "price" else 5,
                           limit=SMALL[recipe.task], device="cpu", progress=False)
    recipe, dataset, limit = _resolve(options)
    device = torch.device("cpu")
    generator = seed_everything(0, device)
    task, config, _ = build_task(recipe, dataset, limit, device)
    model = build_model(recipe.architecture, config)
    model.eval()
    key = LOSS_KEY[recipe.task]
    with torch.no_grad():
        before = task.validate(model)[key]
    run_dir = Path(os.environ["DLBOOK_RUNS"]) / f"learn-{name}"
    run_dir.mkdir(parents=True, exist_ok=True)
    fit(model, task, recipe, run_dir, generator, progress=False)
    with torch.no_grad():
        after = task.validate(model)[key]
    assert after < before, f"{name}: validation {key} went from {before} to {after}"


def _quick(architecture: str, seed: int = 0, **kwargs) -> dict:
    defaults = {"image": 2000, "price": None, "poem": 300}
    task = {"mlp": "image", "lenet": "image", "price_mlp": "price", "poem_rnn": "poem"}[architecture]
    epochs = {"image": 2, "price": 40, "poem": 2}[task]
    options = TrainOptions(architecture, "default", epochs=epochs, limit=defaults[task], device="cpu",
                           progress=False, seed=seed, **kwargs)
    return train(options)


@pytest.mark.parametrize("architecture", ["mlp", "lenet", "price_mlp", "poem_rnn"])
def test_default_models_learn_and_reproduce(architecture: str) -> None:
    first = _quick(architecture, run_name=f"{architecture}-a")
    second = _quick(architecture, run_name=f"{architecture}-b")
    assert first["test"] == second["test"], "same seed, same data, same metrics on CPU"
    test = first["test"]
    if first["task"] == "image":
        assert test["accuracy"] > 0.5  # chance is 0.1
        assert len(test["per_class_accuracy"]) == 10 and len(test["confusion_matrix"]) == 10
        assert sum(map(sum, test["confusion_matrix"])) == test["n"]
    elif first["task"] == "price":
        assert test["log_rmse"] < 0.25  # predicting the mean log price scores about 0.4
        assert test["mae_dollars"] < 40_000
    else:
        assert test["perplexity"] < test["vocab_size"] / 4  # far from uniform guessing
        assert test["bigram_perplexity"] > 1


def test_a_run_leaves_model_metrics_and_plot(tmp_path: Path) -> None:
    summary = _quick("price_mlp", run_name="artifacts")
    run = Path(os.environ["DLBOOK_RUNS"]) / "artifacts"
    saved = torch.load(run / "model.pt", weights_only=False)
    assert saved["architecture"] == "price_mlp"
    assert saved["preprocessing"]["target"] == "log_price" and saved["preprocessing"]["features"]["numeric"]
    assert json.loads((run / "metrics.json").read_text())["test"] == summary["test"]
    assert (run / "history.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_continues_where_it_stopped() -> None:
    # the deep MLP has dropout (torch's global random stream) and a constant learning rate, so a run
    # capped at 2 epochs and resumed to 3 must equal a straight 3-epoch run, step for step
    base = {"limit": 1500, "device": "cpu", "progress": False}
    straight = train(TrainOptions("mlp", "deep", epochs=3, run_name="straight", **base))
    train(TrainOptions("mlp", "deep", epochs=2, run_name="resumed", **base))
    resumed = train(TrainOptions("mlp", "deep", epochs=3, run_name="resumed", resume=True, **base))
    assert len(resumed["history"]) == 3
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in resumed["history"]]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in straight["history"]]
    assert resumed["test"] == straight["test"]


def test_phases_switch_optimiser_and_epoch_caps_keep_every_phase() -> None:
    mmids = RECIPES["mlp-mmids32"]
    capped = mmids.with_epochs(4)
    assert [p.epochs for p in capped.phases] == [3, 1] and capped.epochs == 4
    assert [p.optimizer for p in capped.phases] == ["sgd", "adam"]
    assert replace(mmids).epochs == 20


class _ScriptedTask:
    """A tiny regression task whose validation scores are scripted, to watch early stopping decide."""

    monitor, mode = "score", "min"

    def __init__(self, scores: list[float]) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(16, 2, generator=gen), torch.randn(16, 1, generator=gen)
        self.scores: list[float] = scores
        self.weights_seen: list[dict[str, torch.Tensor]] = []

    def num_batches(self) -> int:
        return 2

    def batches(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = torch.randperm(16, generator=generator)
        yield self.x[perm[:8]], self.y[perm[:8]]
        yield self.x[perm[8:]], self.y[perm[8:]]

    def loss(self, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, float]]:
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        return loss, {"sq": loss.item()}

    def summarise(self, totals: dict[str, float]) -> dict[str, float]:
        return {"train": totals["sq"]}

    def validate(self, model: torch.nn.Module) -> dict[str, float]:
        self.weights_seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"score": self.scores[len(self.weights_seen) - 1]}


def test_early_stopping_stops_after_patience_and_keeps_the_best_epochs_weights(tmp_path: Path) -> None:
    recipe = replace(RECIPES["mlp-deep"], phases=(Phase(6, "sgd", 0.1),), patience=2, max_steps=None)
    task = _ScriptedTask([3.0, 1.0, 2.0, 2.5, 0.5, 0.1])  # epochs 3 and 4 are worse than epoch 2
    model = torch.nn.Linear(2, 1)
    result = fit(model, task, recipe, tmp_path, torch.Generator().manual_seed(0), progress=False)
    assert (result.stopped_early, result.best_epoch, result.best_score) == (True, 2, 1.0)
    assert len(result.history) == 4 and result.steps == 8
    best, last = task.weights_seen[1], task.weights_seen[3]
    assert not torch.equal(best["weight"], last["weight"])
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())


def test_fold_models_train_exactly_as_fit_trains(tmp_path: Path) -> None:
    # the price task's calibration trains its fold models with train_epochs: without validation,
    # early stopping or checkpoints, but with fit's phases and passes, so the weights are fit's to the bit
    recipe = RECIPES["price_mlp-book"].with_epochs(3)
    assert recipe.patience is None  # fit keeps the last epoch's weights, as train_epochs does
    task, config, _ = build_task(recipe, "house-prices", None, torch.device("cpu"))
    trained = []
    for train_with in ("fit", "train_epochs"):
        generator = seed_everything(0, torch.device("cpu"))
        model = build_model(recipe.architecture, config)
        if train_with == "fit":
            steps = fit(model, task, recipe, tmp_path, generator, progress=False).steps
        else:
            steps = train_epochs(model, task, recipe, generator, recipe.epochs)
        trained.append((steps, model.state_dict()))
    (fit_steps, fitted), (fold_steps, folded) = trained
    assert fit_steps == fold_steps > 0
    assert fitted.keys() == folded.keys()
    assert all(torch.equal(fitted[k], folded[k]) for k in fitted)


def test_another_augmentation_policy_trains_and_is_recorded(tmp_path: Path) -> None:
    """``--augment`` trains an experiment's policy; ``robustness-run`` then scores the run on the robustness sets."""
    from training.photographs import conditions_for
    from training.robustness_of_run import evaluate_run

    summary = train(TrainOptions("lenet", "default", dataset="mnist", epochs=1, limit=600, device="cpu",
                                 progress=False, run_name="clutter", augment="robust_clutter"))
    assert summary["augment"] == "robust_clutter"
    record = evaluate_run(Path(os.environ["DLBOOK_RUNS"]) / "clutter", count=8)
    assert record["augment"] == "robust_clutter" and record["images_per_condition"] == 8
    assert len(record["mnist_c"]) == 15 and set(record["photographed"]) == set(conditions_for("mnist"))
    scores = [record["clean"], *record["mnist_c"].values(), *record["photographed"].values()]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert record["mnist_c_mean"] == pytest.approx(sum(record["mnist_c"].values()) / 15)
    # its clean figure is the run's own model on the same test images, scaled as the run stored it
    from preprocessing import PixelScaling
    from training.datasets.images import load_image_split
    from training.export import load_run
    from training.robustness import test_indices

    model, saved = load_run(Path(os.environ["DLBOOK_RUNS"]) / "clutter")
    test, index = load_image_split("mnist", "test"), test_indices("mnist", 8, 0)
    frames = PixelScaling.from_dict(saved["preprocessing"]["scaling"]).apply(test.images[index])[:, None]
    with torch.no_grad():
        predicted = model.eval()(torch.from_numpy(frames)).argmax(1).numpy()
    assert record["clean"] == pytest.approx(float((predicted == test.labels[index]).mean()))
    with pytest.raises(ValueError, match="image recipes"):
        _resolve(TrainOptions("price_mlp", "default", augment="robust"))
