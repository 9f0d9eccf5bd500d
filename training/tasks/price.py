"""House prices: FeatureSpec encoding, log-price regression, the textbook's 80/20 holdout.

The holdout (scikit-learn's split with seed 42, see ``holdout_split``) is touched only by
``evaluate``. Early stopping and per-epoch validation use a fixed 15% slice of the training part.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from preprocessing import FeatureSpec
from training.datasets.house import HouseTable, holdout_split
from training.metrics import log_rmse, mean_absolute_error

VALIDATION_FRACTION = 0.15


def is_outlier(record: dict, price: float) -> bool:
    """The two huge, cheap partial sales De Cock's documentation itself suggests removing."""
    area = record.get("GrLivArea")
    return area is not None and area > 4000 and price < 300_000


class PriceTask:
    monitor = "val_log_rmse"
    mode = "min"

    def __init__(self, table: HouseTable, batch_size: int, device: torch.device, log_skewed: bool,
                 drop_outliers: bool, limit: int | None = None) -> None:
        assert table.prices is not None, "training needs SalePrice"
        self.device, self.batch_size = device, batch_size
        train_idx, self.holdout_idx = holdout_split(len(table.records))
        if limit:
            train_idx = train_idx[:limit]
        n_val = int(np.ceil(VALIDATION_FRACTION * len(train_idx)))
        val_pick = np.random.RandomState(0).permutation(len(train_idx))
        val_idx, fit_idx = train_idx[val_pick[:n_val]], train_idx[val_pick[n_val:]]
        if drop_outliers:
            fit_idx = np.array([i for i in fit_idx if not is_outlier(table.records[i], table.prices[i])])
        self.table = table
        fit_records = [table.records[i] for i in fit_idx]
        self.spec = FeatureSpec.fit(fit_records, table.numeric_columns, table.categorical_columns,
                                    log_skewed=log_skewed)
        self.x, self.y = self._tensors(fit_idx)
        self.val_x, self.val_y = self._tensors(val_idx)
        self.mean_log_price = float(self.y.mean())

    def _tensors(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.spec.encode_records([self.table.records[i] for i in idx])
        y = np.log(self.table.prices[idx]).astype(np.float32)
        return torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)

    def num_batches(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def batches(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = torch.randperm(len(self.y), generator=generator).to(self.device)
        for start in range(0, len(perm), self.batch_size):
            idx = perm[start: start + self.batch_size]
            if len(idx) >= 2:  # BatchNorm cannot train on a batch of one
                yield self.x[idx], self.y[idx]

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, float]]:
        loss = F.mse_loss(model(inputs), targets)  # MSE on log price = log-RMSE squared
        return loss, {"sq_sum": loss.item() * len(targets), "count": len(targets)}

    def summarise(self, totals: dict[str, float]) -> dict[str, float]:
        return {"train_log_rmse": float(np.sqrt(totals.get("sq_sum", 0) / max(totals.get("count", 0), 1)))}

    def validate(self, model: nn.Module) -> dict[str, float]:
        return {"val_log_rmse": F.mse_loss(model(self.val_x), self.val_y).sqrt().item()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict:
        """log-RMSE (the textbook's metric) and MAE in dollars on the 20% holdout."""
        x, _ = self._tensors(self.holdout_idx)
        predicted = np.exp(model(x).double().cpu().numpy())
        actual = self.table.prices[self.holdout_idx]
        return {"log_rmse": log_rmse(predicted, actual), "mae_dollars": mean_absolute_error(predicted, actual),
                "n": int(len(actual))}
