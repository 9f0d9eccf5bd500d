"""Train one recipe on one data set, evaluate it on the official test split, save the run.

A run folder (``runs/<arch>-<preset>-<dataset>[-quick]``) holds ``model.pt`` (weights, config and
the preprocessing metadata export needs), ``metrics.json``, ``history.png`` and ``checkpoint.pt``.
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from models import build_model, config_to_dict, count_parameters
from training.datasets.house import load_house_train
from training.datasets.images import LABELS, load_image_split
from training.datasets.poems import load_corpus
from training.datasets.provenance import describe_training_data
from training.loop import fit
from training.paths import runs_dir
from training.plots import plot_history
from training.recipes import Recipe, get_recipe
from training.seeding import pick_device, seed_everything
from training.tasks.image import ImageTask, fit_normalisation, split_train_validation
from training.tasks.poem import PoemTask
from training.tasks.price import PriceTask

# The quick profile: a few minutes on 2 CPU cores for all four default models together.
QUICK = {
    "image": {"limit": 10_000, "epochs": 3},
    "price": {"epochs": 40},
    "poem": {"limit": 3_000, "epochs": 2},
}


@dataclass
class TrainOptions:
    architecture: str
    preset: str = "default"
    dataset: str | None = None
    profile: str = "full"  # full | quick
    seed: int = 0
    epochs: int | None = None
    limit: int | None = None  # cap on training samples (images, poems) or rows (houses)
    device: str = "auto"
    resume: bool = False
    progress: bool = True
    run_name: str | None = None
    augment: str | None = None  # images: another AUGMENTATIONS policy than the recipe's (an experiment's run)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def run_dir_for(recipe: Recipe, dataset: str, profile: str) -> Path:
    return runs_dir() / f"{recipe.name}-{dataset}{'-quick' if profile == 'quick' else ''}"


def _resolve(options: TrainOptions) -> tuple[Recipe, str, int | None]:
    recipe = get_recipe(options.architecture, options.preset)
    dataset = options.dataset or recipe.datasets[0]
    if dataset not in recipe.datasets:
        raise ValueError(f"{recipe.name} trains on {list(recipe.datasets)}, not {dataset!r}")
    limit, epochs = options.limit, options.epochs
    if options.profile == "quick":
        quick = {**QUICK[recipe.task], **recipe.quick}  # a recipe may set its own quick budget
        # ... and its own fields for it (poem_rnn default: a smaller model and schedule for 2 CPU cores)
        recipe = replace(recipe, **{k: v for k, v in recipe.quick.items() if k not in ("limit", "epochs")})
        limit = limit or quick.get("limit")
        epochs = min(epochs or recipe.epochs, quick["epochs"])
    elif options.profile != "full":
        raise ValueError("profile must be 'quick' or 'full'")
    if options.augment:
        if recipe.task != "image":
            raise ValueError("--augment is for image recipes")
        recipe = replace(recipe, augment=options.augment)
    if epochs:
        recipe = recipe.with_epochs(epochs)
    if limit and recipe.max_steps:
        recipe = replace(recipe, max_steps=None)  # a step budget means nothing on a subset
    return recipe, dataset, limit


def build_task(recipe: Recipe, dataset: str, limit: int | None, device: torch.device
               ) -> tuple[Any, Any, dict[str, Any]]:
    """The task, the model config with its data-dependent sizes, and the preprocessing metadata."""
    if recipe.task == "image":
        train, val = split_train_validation(load_image_split(dataset, "train"), limit)
        scaling = recipe.scaling or fit_normalisation(train.images)
        task = ImageTask(dataset, train, val, scaling, recipe.batch_size, device, recipe.augment,
                         recipe.label_smoothing)
        en, zh = LABELS[dataset]
        meta = {"input": "image", "scaling": scaling.to_dict(), "labels": en, "labels_zh": zh,
                "image_size": [28, 28], "foreground": "light-on-dark"}
        return task, replace(recipe.config, conditioning=recipe.conditioning.get(dataset, "none")), meta
    if recipe.task == "price":
        task = PriceTask(load_house_train(), recipe.batch_size, device, recipe.log_skewed,
                         recipe.drop_outliers, limit)
        config = replace(recipe.config, in_features=task.spec.n_features, output_bias=task.mean_log_price)
        meta = {"input": "records", "features": task.spec.to_dict(), "target": "log_price"}
        return task, config, meta
    poems = load_corpus(dataset)
    task = PoemTask(poems, recipe.batch_size, device, recipe.window, recipe.min_count, limit)
    config = replace(recipe.config, vocab_size=len(task.vocab))
    meta = {"input": "tokens", "vocab": task.vocab.to_dict(), "corpus": dataset,
            "form_marks": "，。"}
    return task, config, meta


def train(options: TrainOptions) -> dict[str, Any]:
    recipe, dataset, limit = _resolve(options)
    device = pick_device(options.device)
    generator = seed_everything(options.seed, device)
    run_dir = runs_dir() / options.run_name if options.run_name else run_dir_for(recipe, dataset, options.profile)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not options.resume:
        (run_dir / "checkpoint.pt").unlink(missing_ok=True)
    task, config, preprocessing = build_task(recipe, dataset, limit, device)
    torch.manual_seed(options.seed)  # model init does not depend on how much data loading drew
    model = build_model(recipe.architecture, config).to(device)
    print(f"training {recipe.name} on {dataset} ({options.profile} profile, {recipe.epochs} epochs max, "
          f"{count_parameters(model):,} parameters, device {device})")
    result = fit(model, task, recipe, run_dir, generator, resume=options.resume, progress=options.progress)
    calibration = None
    if recipe.task == "price":  # imputation of omitted fields and the price range, from the training part
        calibration = task.calibrate(recipe, config, max(result.best_epoch, 1), options.seed)
        preprocessing["features"] = task.spec.to_dict()
    began = time.perf_counter()
    test = task.evaluate(model)
    summary = {
        "run": run_dir.name,
        "architecture": recipe.architecture,
        "preset": recipe.preset,
        "task": recipe.task,
        "dataset": dataset,
        "profile": options.profile,
        "seed": options.seed,
        "limit": limit,
        "augment": recipe.augment,
        "data": describe_training_data(dataset),
        "test": test,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "steps": result.steps,
        "train_seconds": round(result.seconds, 2),
        "eval_seconds": round(time.perf_counter() - began, 2),
        "device": describe_device(device),
        "parameters": count_parameters(model),
        "source": recipe.source,
        "notes": recipe.notes,
        "torch": torch.__version__,
        "command": "python -m training " + shlex.join(sys.argv[1:]) if sys.argv[0].endswith("__main__.py")
        else None,
        "history": result.history,
    }
    if calibration is not None:
        summary["calibration"] = calibration
    torch.save(
        {"format": 1, "architecture": recipe.architecture, "config": config_to_dict(config),
         "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
         "preprocessing": preprocessing, "summary": summary},
        run_dir / "model.pt",
    )
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    plot_history(result.history, f"{recipe.name} on {dataset}", run_dir / "history.png")
    return summary
