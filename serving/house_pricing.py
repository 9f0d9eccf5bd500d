"""House records → dollars, with the feature spec the model was trained with (from its metadata)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from preprocessing import FeatureSpec
from serving.model_store import ExportedModel


class HousePricer:
    def __init__(self, model: ExportedModel) -> None:
        self.model = model
        self.onnx = model.session
        self.spec = FeatureSpec.from_dict(model.meta["preprocessing"]["features"])
        self.onnx.warm_up({"features": np.zeros((1, self.spec.n_features), np.float32)})

    def encode(self, records: Sequence[Any]) -> np.ndarray:
        """Validated features ``[N, F]``; raises ``RecordError`` naming the record and field."""
        return self.spec.encode_records(records)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Dollars per row (NaN where the inputs were too extreme for a finite price)."""
        (log_price,) = self.onnx.run({"features": np.ascontiguousarray(features, dtype=np.float32)})
        with np.errstate(over="ignore", invalid="ignore"):
            prices = np.exp(log_price.astype(np.float64))
        return np.where(np.isfinite(prices), prices, np.nan)
