"""The one training loop every model uses: phases, validation each epoch, early stopping, resume.

A task (``training/tasks``) knows its data and its loss; this loop knows nothing of images, houses
or poems. Each epoch ends with a validation pass and a checkpoint holding model, optimiser,
scheduler, history and the shuffling generator, so ``--resume`` continues exactly where it stopped.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from training.recipes import Phase, Recipe


class Task(Protocol):
    monitor: str  # key of validate()'s result that early stopping watches
    mode: str  # "max" or "min"

    def num_batches(self) -> int: ...

    def batches(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, float]]: ...

    def summarise(self, totals: dict[str, float]) -> dict[str, float]: ...

    def validate(self, model: nn.Module) -> dict[str, float]: ...


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float | None = None
    steps: int = 0
    seconds: float = 0.0
    stopped_early: bool = False


def make_optimizer(phase: Phase, params: Any) -> torch.optim.Optimizer:
    if phase.optimizer == "sgd":
        return torch.optim.SGD(params, lr=phase.lr, momentum=phase.momentum, weight_decay=phase.weight_decay)
    if phase.optimizer == "adam":
        return torch.optim.Adam(params, lr=phase.lr, weight_decay=phase.weight_decay)
    if phase.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=phase.lr, weight_decay=phase.weight_decay)
    raise ValueError(f"unknown optimizer {phase.optimizer!r}")


def make_scheduler(phase: Phase, optimizer: torch.optim.Optimizer, total_steps: int
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    if phase.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if phase.schedule == "cosine" and phase.warmup:
        # linear warmup over the phase's first ``warmup`` fraction of steps, then cosine to zero
        warmup = max(1, round(phase.warmup * total_steps))
        decay = max(1, total_steps - warmup)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: (step + 1) / warmup if step < warmup
            else 0.5 * (1 + math.cos(math.pi * min(step - warmup, decay) / decay))
        )
    if phase.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
        )
    raise ValueError(f"unknown schedule {phase.schedule!r}")


def _phase_at(recipe: Recipe, epoch: int) -> int:
    """Index of the phase that trains 0-based ``epoch``."""
    start = 0
    for i, phase in enumerate(recipe.phases):
        if epoch < start + phase.epochs:
            return i
        start += phase.epochs
    return len(recipe.phases) - 1


def _better(score: float, best: float | None, mode: str) -> bool:
    return best is None or (score > best if mode == "max" else score < best)


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def fit(
    model: nn.Module,
    task: Task,
    recipe: Recipe,
    run_dir: Path,
    generator: torch.Generator,
    resume: bool = False,
    progress: bool = True,
) -> FitResult:
    """Train ``model`` by ``recipe`` on ``task``; leaves the best-validation weights in ``model``."""
    checkpoint_path = run_dir / "checkpoint.pt"
    result = FitResult()
    start_epoch, phase_index, bad_epochs = 0, -1, 0
    best_state = copy.deepcopy(model.state_dict())
    optimizer_state = scheduler_state = None
    if resume and checkpoint_path.is_file():
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        best_state = ckpt["best_state"]
        generator.set_state(ckpt["generator"])
        # dropout draws from torch's global generator: continue its stream, not the seed's start
        torch.set_rng_state(ckpt["torch_rng"])
        if ckpt.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        start_epoch, bad_epochs = ckpt["epoch"], ckpt["bad_epochs"]
        result = ckpt["result"]
        optimizer_state, scheduler_state = ckpt["optimizer"], ckpt["scheduler"]
        phase_index = ckpt["phase_index"]
        print(f"resuming {run_dir.name} after epoch {start_epoch}")
    optimizer = scheduler = None
    n_batches = task.num_batches()
    began = time.perf_counter() - result.seconds
    for epoch in range(start_epoch, recipe.epochs):
        if result.stopped_early or (recipe.max_steps and result.steps >= recipe.max_steps):
            break
        wanted = _phase_at(recipe, epoch)
        if optimizer is None or wanted != phase_index:
            phase = recipe.phases[wanted]
            optimizer = make_optimizer(phase, model.parameters())
            scheduler = make_scheduler(phase, optimizer, phase.epochs * n_batches)
            if wanted == phase_index and optimizer_state is not None:
                optimizer.load_state_dict(optimizer_state)
                scheduler.load_state_dict(scheduler_state)
            optimizer_state = scheduler_state = None
            phase_index = wanted
        model.train()
        totals: dict[str, float] = {}
        bar = tqdm(task.batches(generator), total=n_batches, disable=not progress, leave=False,
                   desc=f"epoch {epoch + 1}/{recipe.epochs}", unit="batch")
        for inputs, targets in bar:
            loss, stats = task.loss(model, inputs, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            optimizer.step()
            scheduler.step()
            result.steps += 1
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
            if result.steps % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if recipe.max_steps and result.steps >= recipe.max_steps:
                break
        model.eval()
        with torch.no_grad():
            row = {"epoch": epoch + 1, **task.summarise(totals), **task.validate(model)}
        row["lr"] = optimizer.param_groups[0]["lr"]
        row["seconds"] = time.perf_counter() - began
        result.history.append(row)
        score = row[task.monitor]
        if _better(score, result.best_score, task.mode):
            result.best_score, result.best_epoch, bad_epochs = score, epoch + 1, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad_epochs += 1
            if recipe.patience is not None and bad_epochs >= recipe.patience:
                result.stopped_early = True
        result.seconds = time.perf_counter() - began
        shown = {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items() if k != "lr"}
        tqdm.write(" ".join(f"{k}={v}" for k, v in shown.items()))
        _save_atomic(
            {"model": model.state_dict(), "best_state": best_state, "generator": generator.get_state(),
             "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
             "epoch": epoch + 1, "bad_epochs": bad_epochs, "result": result, "phase_index": phase_index,
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
            checkpoint_path,
        )
    if recipe.patience is not None:
        # Early stopping keeps the best-validation weights; a recipe without it (the textbooks')
        # ends with its last epoch's weights, as the books do.
        model.load_state_dict(best_state)
    else:
        result.best_epoch = len(result.history)
        result.best_score = result.history[-1][task.monitor] if result.history else None
    model.eval()
    return result
