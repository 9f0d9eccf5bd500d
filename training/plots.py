"""A PNG per run: loss and the task's metric per epoch, train next to validation."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_history(history: list[dict[str, float]], title: str, path: Path) -> None:
    epochs = [row["epoch"] for row in history]
    keys = sorted({k for row in history for k in row} - {"epoch", "lr", "seconds"})
    # pair train_X with val_X so the same quantity shares an axis
    quantities = sorted({k.split("_", 1)[1] for k in keys if "_" in k})
    fig, axes = plt.subplots(1, len(quantities), figsize=(5 * len(quantities), 3.6), squeeze=False)
    for ax, quantity in zip(axes[0], quantities, strict=True):
        for split in ("train", "val"):
            key = f"{split}_{quantity}"
            if key in keys:
                ax.plot(epochs, [row[key] for row in history], marker="o", ms=3,
                        label="train" if split == "train" else "validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(quantity.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
