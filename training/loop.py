"""The one training loop every model uses: phases, validation each epoch, early stopping, resume.

A task (``training/tasks``) knows its data and its loss; this loop knows nothing of images, houses
or poems. Each epoch ends with a validation pass and a checkpoint holding model, optimiser,
scheduler, history and the shuffling generator, so ``--resume`` continues exactly where it stopped.

``fit`` is the order of the phases; ``_Training`` holds the run's state and one method per phase
(``resume``, ``enter_phase``, ``train_epoch``, ``validate``, ``judge``, ``checkpoint``, ``finish``).
``train_epochs`` is the same training without validation or checkpoints, for the price task's
cross-fitted fold models.
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
    """What the loop needs of a task: batches, a loss, a validation score and which way is better."""

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
    """What a run reports (``metrics.json``); pickled into the checkpoint so a resumed run continues it."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float | None = None
    steps: int = 0
    seconds: float = 0.0
    stopped_early: bool = False


def make_optimizer(phase: Phase, params: Any) -> torch.optim.Optimizer:
    """The phase's optimiser by name: recipes are data, so they name it rather than build it."""
    if phase.optimizer == "sgd":
        return torch.optim.SGD(params, lr=phase.lr, momentum=phase.momentum, weight_decay=phase.weight_decay)
    if phase.optimizer == "adam":
        return torch.optim.Adam(params, lr=phase.lr, weight_decay=phase.weight_decay)
    if phase.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=phase.lr, weight_decay=phase.weight_decay)
    raise ValueError(f"unknown optimizer {phase.optimizer!r}")


def make_scheduler(phase: Phase, optimizer: torch.optim.Optimizer, total_steps: int
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """The phase's learning-rate factor per optimiser step, over the phase's own ``total_steps``.

    A closed-form factor of the step (``LambdaLR``): a checkpoint stores only the step count, and
    resume rebuilds the function from the recipe.
    """
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
    """Whether ``score`` improves on ``best``: accuracy goes up (``max``), a loss goes down (``min``)."""
    return best is None or (score > best if mode == "max" else score < best)


def _save_atomic(obj: Any, path: Path) -> None:
    """Write to a temporary file, then rename over ``path``: a reader never sees half a file."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


class _Training:
    """One training run's state across epochs, and one method per phase of the loop.

    Why a class: resume, the optimiser of the current phase, early stopping and the checkpoint all
    read and write the same handful of values (the step count, the best weights, the epochs without
    improvement, the optimiser and scheduler). Kept on one object, each phase is a short method
    that can be read and tested alone, and ``fit`` reads as the order of the phases. The phases
    draw from the random streams in the same order as before the split, so a seed gives the same
    weights and metrics (``tests/test_training.py`` checks seeds and resume).
    """

    def __init__(self, model: nn.Module, task: Task, recipe: Recipe, generator: torch.Generator) -> None:
        self.model, self.task, self.recipe, self.generator = model, task, recipe, generator
        self.result = FitResult()
        self.start_epoch = 0
        self.bad_epochs = 0
        self.best_state = copy.deepcopy(model.state_dict())
        self.phase_index = -1
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        # a resumed run's optimiser and scheduler, applied when its phase's optimiser is rebuilt
        self._saved_optimizer: dict[str, Any] | None = None
        self._saved_scheduler: dict[str, Any] | None = None
        self.n_batches = task.num_batches()

    def resume(self, checkpoint_path: Path) -> None:
        """Continue a run from its last checkpoint, every random stream included.

        Why all of them: the shuffling generator decides the next epoch's batches and torch's
        global stream the next dropout masks; restoring only the weights would give another run
        than the one that was stopped. The optimiser and scheduler are kept aside for
        ``enter_phase``, which rebuilds them for the epoch's phase.
        """
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(ckpt["model"])
        self.best_state = ckpt["best_state"]
        self.generator.set_state(ckpt["generator"])
        # dropout draws from torch's global generator: continue its stream, not the seed's start
        torch.set_rng_state(ckpt["torch_rng"])
        if ckpt.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        self.start_epoch, self.bad_epochs = ckpt["epoch"], ckpt["bad_epochs"]
        self.result = ckpt["result"]
        self._saved_optimizer, self._saved_scheduler = ckpt["optimizer"], ckpt["scheduler"]
        self.phase_index = ckpt["phase_index"]

    def out_of_budget(self) -> bool:
        """Whether early stopping fired or the recipe's step budget (``max_steps``) is spent."""
        spent = bool(self.recipe.max_steps) and self.result.steps >= self.recipe.max_steps
        return self.result.stopped_early or spent

    def enter_phase(self, epoch: int) -> None:
        """A fresh optimiser and schedule when ``epoch`` starts a phase (MMIDS 8.5: SGD, then Adam).

        Why fresh: a phase is a new optimiser with its own learning rate and schedule over the
        phase's steps, not a change of settings on the old one. A resumed run restores the saved
        optimiser and scheduler only when it stopped inside the same phase.
        """
        wanted = _phase_at(self.recipe, epoch)
        if self.optimizer is not None and wanted == self.phase_index:
            return
        phase = self.recipe.phases[wanted]
        self.optimizer = make_optimizer(phase, self.model.parameters())
        self.scheduler = make_scheduler(phase, self.optimizer, phase.epochs * self.n_batches)
        if wanted == self.phase_index and self._saved_optimizer is not None:
            self.optimizer.load_state_dict(self._saved_optimizer)
            self.scheduler.load_state_dict(self._saved_scheduler)
        self._saved_optimizer = self._saved_scheduler = None
        self.phase_index = wanted

    def train_epoch(self, epoch: int, progress: bool) -> dict[str, float]:
        """One pass over the task's batches; returns the task's summed per-batch statistics.

        Why the step budget is checked per batch: the 尚硅谷 TwoLayerNet recipe counts optimiser
        steps (10,000), not epochs, so the run may end inside an epoch.
        """
        assert self.optimizer is not None and self.scheduler is not None, "enter_phase first"
        model, recipe = self.model, self.recipe
        model.train()
        totals: dict[str, float] = {}
        bar = tqdm(self.task.batches(self.generator), total=self.n_batches, disable=not progress, leave=False,
                   desc=f"epoch {epoch + 1}/{recipe.epochs}", unit="batch")
        for inputs, targets in bar:
            loss, stats = self.task.loss(model, inputs, targets)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.result.steps += 1
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
            if self.result.steps % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if recipe.max_steps and self.result.steps >= recipe.max_steps:
                break
        return totals

    def validate(self, epoch: int, totals: dict[str, float], began: float) -> dict[str, Any]:
        """The epoch's history row: training summary, validation metrics, learning rate, time.

        Why every epoch: early stopping, the plot and ``metrics.json`` all read this row, and the
        validation set is the only data the loop may judge by (the test split is for ``evaluate``).
        """
        assert self.optimizer is not None
        self.model.eval()
        with torch.no_grad():
            row = {"epoch": epoch + 1, **self.task.summarise(totals), **self.task.validate(self.model)}
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        row["seconds"] = time.perf_counter() - began
        self.result.history.append(row)
        return row

    def judge(self, epoch: int, row: dict[str, Any]) -> None:
        """Early stopping: keep the best weights so far; stop after ``patience`` epochs without better.

        Why a copy of the weights and not the epoch number alone: the loop trains on, so the best
        epoch's weights are gone by the time the run ends.
        """
        score = row[self.task.monitor]
        if _better(score, self.result.best_score, self.task.mode):
            self.result.best_score, self.result.best_epoch, self.bad_epochs = score, epoch + 1, 0
            self.best_state = copy.deepcopy(self.model.state_dict())
        else:
            self.bad_epochs += 1
            if self.recipe.patience is not None and self.bad_epochs >= self.recipe.patience:
                self.result.stopped_early = True

    def checkpoint(self, epoch: int, path: Path) -> None:
        """Save everything ``resume`` needs after each epoch, atomically.

        Why atomically (write, then rename): a run killed while saving must leave the previous
        checkpoint whole, not a truncated file that ``--resume`` cannot read.
        """
        assert self.optimizer is not None and self.scheduler is not None
        _save_atomic(
            {"model": self.model.state_dict(), "best_state": self.best_state,
             "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
             "epoch": epoch + 1, "bad_epochs": self.bad_epochs, "result": self.result,
             "phase_index": self.phase_index,
             "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
            path,
        )

    def finish(self) -> FitResult:
        """Leave the weights the recipe asks for in the model.

        Early stopping keeps the best-validation weights; a recipe without it (the textbooks')
        ends with its last epoch's weights, as the books do, and reports that epoch as its best.
        """
        if self.recipe.patience is not None:
            self.model.load_state_dict(self.best_state)
        else:
            self.result.best_epoch = len(self.result.history)
            self.result.best_score = self.result.history[-1][self.task.monitor] if self.result.history else None
        self.model.eval()
        return self.result


def _show(row: dict[str, Any]) -> None:
    """One line per epoch above the progress bar (tqdm.write, so the bar is not torn)."""
    shown = {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items() if k != "lr"}
    tqdm.write(" ".join(f"{k}={v}" for k, v in shown.items()))


def fit(
    model: nn.Module,
    task: Task,
    recipe: Recipe,
    run_dir: Path,
    generator: torch.Generator,
    resume: bool = False,
    progress: bool = True,
) -> FitResult:
    """Train ``model`` by ``recipe`` on ``task``; leaves the best-validation weights in ``model``.

    Each epoch: its phase's optimiser, a training pass, validation, early stopping, a checkpoint
    (``--resume`` continues from the last one).
    """
    checkpoint_path = run_dir / "checkpoint.pt"
    run = _Training(model, task, recipe, generator)
    if resume and checkpoint_path.is_file():
        run.resume(checkpoint_path)
        print(f"resuming {run_dir.name} after epoch {run.start_epoch}")
    began = time.perf_counter() - run.result.seconds
    for epoch in range(run.start_epoch, recipe.epochs):
        if run.out_of_budget():
            break
        run.enter_phase(epoch)
        totals = run.train_epoch(epoch, progress)
        row = run.validate(epoch, totals, began)
        run.judge(epoch, row)
        run.result.seconds = time.perf_counter() - began
        _show(row)
        run.checkpoint(epoch, checkpoint_path)
    return run.finish()


def train_epochs(model: nn.Module, task: Task, recipe: Recipe, generator: torch.Generator, epochs: int) -> int:
    """Train ``model`` for ``epochs`` epochs of ``recipe``'s phases, with nothing else; returns the steps.

    Why beside ``fit``: the price task's calibration trains one model per cross-fitting fold for as
    many epochs as the final model chose (``training/tasks/price.py``). Those models have no
    validation data of their own to stop on or report, and nothing to resume, so they take the
    same phases and training passes as ``fit`` without its validation, early stopping and
    checkpoints. The schedule keeps the recipe's phase lengths (``epochs`` is not a
    ``Recipe.with_epochs`` cap), as the final model's schedule did when it stopped early.
    """
    run = _Training(model, task, recipe, generator)
    for epoch in range(epochs):
        if run.out_of_budget():
            break
        run.enter_phase(epoch)
        run.train_epoch(epoch, progress=False)
    model.eval()
    return run.result.steps
