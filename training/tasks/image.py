"""Image classification on MNIST / Fashion-MNIST: data in memory, shuffled by our generator.

The images are scaled once with the model's ``PixelScaling`` (the same code serving runs), kept as
one tensor on the training device, and batched by index: no DataLoader workers, so a fixed seed
gives the same batches on any machine.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from preprocessing import PixelScaling
from training.datasets.images import LABELS, ImageSplit, load_image_split
from training.metrics import classification_report

VALIDATION_SIZE = 10_000  # the 50k/10k train/validation split of the deep-MLP recipe


def split_train_validation(train: ImageSplit, limit: int | None = None) -> tuple[ImageSplit, ImageSplit]:
    """A fixed split (seed 0, whatever the training seed) so every run validates on the same images."""
    perm = np.random.RandomState(0).permutation(len(train))
    val_idx, train_idx = perm[:VALIDATION_SIZE], perm[VALIDATION_SIZE:]
    if limit:
        train_idx, val_idx = train_idx[:limit], val_idx[: max(limit // 5, 500)]
    return (ImageSplit(train.images[train_idx], train.labels[train_idx]),
            ImageSplit(train.images[val_idx], train.labels[val_idx]))


def fit_normalisation(images: np.ndarray) -> PixelScaling:
    unit = images.astype(np.float64) / 255.0
    return PixelScaling("normalize", round(float(unit.mean()), 4), round(float(unit.std()), 4))


def _to_tensor(split: ImageSplit, scaling: PixelScaling, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(scaling.apply(split.images)[:, None]).to(device)


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int, fill: float) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y, filling with the background."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=fill)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]
    return padded[torch.arange(b, device=x.device)[:, None, None], 0, rows, cols].unsqueeze(1)


class ImageTask:
    monitor = "val_accuracy"
    mode = "max"

    def __init__(self, dataset: str, train: ImageSplit, validation: ImageSplit, scaling: PixelScaling,
                 batch_size: int, device: torch.device, augment: str = "none",
                 label_smoothing: float = 0.0) -> None:
        self.dataset, self.scaling, self.device = dataset, scaling, device
        self.batch_size, self.augment, self.label_smoothing = batch_size, augment, label_smoothing
        self.x = _to_tensor(train, scaling, device)
        self.y = torch.from_numpy(train.labels).to(device)
        self.val_x = _to_tensor(validation, scaling, device)
        self.val_y = torch.from_numpy(validation.labels).to(device)
        self.class_names, self.class_names_zh = LABELS[dataset]

    def num_batches(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def batches(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = torch.randperm(len(self.y), generator=generator).to(self.device)
        for start in range(0, len(perm), self.batch_size):
            idx = perm[start: start + self.batch_size]
            if len(idx) < 2:  # BatchNorm cannot train on a batch of one
                continue
            x = self.x[idx]
            if self.augment != "none":
                x = random_shift(x, generator, 2, self.scaling.background)
                if self.augment == "shift_flip":
                    flip = (torch.rand(len(idx), generator=generator) < 0.5).to(self.device)
                    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            yield x, self.y[idx]

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(inputs)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        n = len(targets)
        correct = (logits.argmax(1) == targets).sum().item()
        return loss, {"loss_sum": loss.item() * n, "correct": correct, "count": n}

    def summarise(self, totals: dict[str, float]) -> dict[str, float]:
        n = max(totals.get("count", 0), 1)
        return {"train_loss": totals.get("loss_sum", 0) / n, "train_accuracy": totals.get("correct", 0) / n}

    @torch.no_grad()
    def _logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([model(x[i: i + 4096]) for i in range(0, len(x), 4096)])

    def validate(self, model: nn.Module) -> dict[str, float]:
        logits = self._logits(model, self.val_x)
        return {"val_loss": F.cross_entropy(logits, self.val_y).item(),
                "val_accuracy": (logits.argmax(1) == self.val_y).float().mean().item()}

    def evaluate(self, model: nn.Module) -> dict:
        """Accuracy, per-class accuracy and confusion matrix on the official test split."""
        test = load_image_split(self.dataset, "test")
        logits = self._logits(model, _to_tensor(test, self.scaling, self.device))
        report = classification_report(test.labels, logits.argmax(1).cpu().numpy(), self.class_names)
        report["test_loss"] = F.cross_entropy(logits, torch.from_numpy(test.labels).to(self.device)).item()
        return report
