"""House records → dollars and an 80% price range, with the feature spec the model was trained with.

The spec (from the model's metadata) validates and encodes the records and fills in the fields a
record omits from the nearest training houses (``preprocessing/imputation.py``): a record with
omitted fields becomes several complete rows, whose log prices give its price (their mean) and the
width of its range. A field sent as null or "NA" is the data set's NA, as in training.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from preprocessing import FeatureSpec
from preprocessing.imputation import Completions
from serving.model_store import ExportedModel

logger = logging.getLogger("dlbook.serving")


@dataclass
class HousePrices:
    prices: np.ndarray  # dollars [N], NaN where the inputs were too extreme for a finite price
    ranges: np.ndarray | None  # dollars [N, 2] (low, high), None for a model without a calibrated range
    coverage: float | None  # the share of prices the ranges were calibrated to hold
    imputed: list[list[str]]  # per record, the fields filled in


class HousePricer:
    def __init__(self, model: ExportedModel) -> None:
        self.model = model
        self.onnx = model.session
        self.spec = FeatureSpec.from_dict(model.meta["preprocessing"]["features"])
        self.imputation = self.spec.imputation
        if self.imputation is None:
            logger.warning("%s was exported before omitted house fields were imputed: an omitted field reads as "
                           "the data set's NA and answers carry no price range; train and export it again",
                           model.name)
        self.onnx.warm_up({"features": np.zeros((1, self.spec.n_features), np.float32)})

    def encode(self, records: Sequence[Any]) -> Completions:
        """Validated, completed model rows; raises ``RecordError`` naming the record and field."""
        return self.spec.complete_records(records)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Log price per row (the batcher's function: rows of several requests run together)."""
        (log_price,) = self.onnx.run({"features": np.ascontiguousarray(features, dtype=np.float32)})
        return log_price.astype(np.float64)

    def prices(self, completions: Completions, log_prices: np.ndarray) -> HousePrices:
        """Per record: the price (geometric mean over its completions) and its calibrated range."""
        n = completions.n_records
        with np.errstate(over="ignore", invalid="ignore"):
            if self.imputation is None:
                mean, spread = np.asarray(log_prices, dtype=np.float64), np.zeros(n)
            else:
                mean, spread = self.imputation.combine(log_prices, completions.owner, n)
            prices = _dollars(mean)
            ranges = coverage = None
            if self.imputation is not None and self.imputation.price_range is not None:
                low, high = self.imputation.price_range_of(mean, spread)
                ranges = np.stack([_dollars(low), _dollars(high)], axis=1)
                coverage = self.imputation.price_range.coverage
                prices = np.where(np.isfinite(ranges).all(axis=1), prices, np.nan)
        return HousePrices(prices, ranges, coverage, completions.imputed)


def _dollars(log_price: np.ndarray) -> np.ndarray:
    prices = np.exp(log_price)
    return np.where(np.isfinite(prices), prices, np.nan)
