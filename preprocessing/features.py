"""The tabular feature spec of the house-price model: fitted on training rows, stored, replayed.

Numeric columns: optional ``log1p`` (ours, for skewed areas), missing → the training mean, then
standardised (mean and population std of the imputed training column, as scikit-learn's
SimpleImputer + StandardScaler do in the textbook). Categorical columns: missing → the string
``"NaN"`` (the textbook's fill value), then one-hot over the training categories; a category never
seen in training encodes as all zeros (``handle_unknown="ignore"``). Serving validates requests
against the same spec, so a record that training would have read differently is refused.

"Missing" above is the data set's NA (in Kaggle's data mostly *none*: no garage, no alley): a value
the CSV leaves empty or spells ``NA``, and a request's explicit null or ``"NA"``. A field a request
*omits* is unknown instead, and ``complete_records`` imputes it from the nearest training houses
(``preprocessing/imputation.py``; the imputation is part of the spec stored with the model).
``encode_records`` is the plain encoding underneath, which reads an omitted field as NA.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from preprocessing.imputation import Completions, Imputation

MISSING_CATEGORY = "NaN"
# How the Kaggle CSV (and pandas, for the textbook) spells a missing value: read as missing everywhere.
MISSING_STRINGS = frozenset({"", "NA", "?", "nan", "NaN"})
FLOAT32_MAX = 3.4e38


class RecordError(ValueError):
    """A record that cannot be encoded; ``field`` names the culprit for a 4xx answer."""

    def __init__(self, index: int, field: str, message: str) -> None:
        super().__init__(f"record {index}, field {field!r}: {message}")
        self.index = index
        self.field = field
        self.message = message


@dataclass(frozen=True)
class NumericFeature:
    name: str
    mean: float
    std: float
    log: bool = False
    non_negative: bool = True


@dataclass(frozen=True)
class CategoricalFeature:
    name: str
    categories: tuple[str, ...]


def _skewness(values: np.ndarray) -> float:
    centred = values - values.mean()
    var = float(np.mean(centred**2))
    return 0.0 if var == 0 else float(np.mean(centred**3) / var**1.5)


@dataclass
class FeatureSpec:
    numeric: list[NumericFeature]
    categorical: list[CategoricalFeature]
    # Columns a Kaggle record may carry that are not features: accepted and ignored.
    ignored: tuple[str, ...] = ("Id", "SalePrice")
    # How omitted fields are filled in (fitted with the model: training/tasks/price.py); None in a
    # spec fitted alone, where an omitted field encodes as the data set's NA.
    imputation: Imputation | None = field(default=None, repr=False, compare=False)
    _columns: dict[str, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._columns = {f.name: "numeric" for f in self.numeric}
        self._columns.update({f.name: "categorical" for f in self.categorical})

    # ----- fitting -------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        records: Sequence[Mapping[str, Any]],
        numeric_columns: Sequence[str],
        categorical_columns: Sequence[str],
        log_skewed: bool = False,
        skew_threshold: float = 0.75,
    ) -> FeatureSpec:
        """Fit every statistic on ``records`` (the training part only)."""
        numeric: list[NumericFeature] = []
        for name in numeric_columns:
            present = np.array([r[name] for r in records if r.get(name) is not None], dtype=np.float64)
            if present.size == 0:
                raise ValueError(f"numeric column {name!r} has no values in the training rows")
            non_negative = bool(present.min() >= 0)
            use_log = log_skewed and non_negative and abs(_skewness(present)) > skew_threshold
            if use_log:
                present = np.log1p(present)
            mean = float(present.mean())
            n_missing = len(records) - present.size
            imputed = np.concatenate([present, np.full(n_missing, mean)])
            std = float(imputed.std()) or 1.0
            numeric.append(NumericFeature(name, mean, std, use_log, non_negative))
        categorical = []
        for name in categorical_columns:
            seen = {MISSING_CATEGORY if r.get(name) is None or r[name] in MISSING_STRINGS else str(r[name])
                    for r in records}
            categorical.append(CategoricalFeature(name, tuple(sorted(seen))))
        return cls(numeric, categorical)

    # ----- encoding ------------------------------------------------------------------------
    @property
    def n_features(self) -> int:
        return len(self.numeric) + sum(len(f.categories) for f in self.categorical)

    @property
    def columns(self) -> list[str]:
        return list(self._columns)

    def feature_names(self) -> list[str]:
        names = [f.name for f in self.numeric]
        for f in self.categorical:
            names += [f"{f.name}={c}" for c in f.categories]
        return names

    def validate(self, index: int, record: Any) -> None:
        """Raise :class:`RecordError` for anything training would not have read the same way."""
        if not isinstance(record, Mapping):
            raise RecordError(index, "<record>", f"expected an object of column: value, got {type(record).__name__}")
        for name, value in record.items():
            kind = self._columns.get(name)
            if kind is None:
                if name in self.ignored:
                    continue
                raise RecordError(index, str(name), "unknown column; use the Kaggle House Prices column names")
            if value is None:
                continue
            if kind == "numeric":
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise RecordError(index, name, f"expected a number or null, got {type(value).__name__}")
                try:
                    finite = math.isfinite(value) and abs(value) < FLOAT32_MAX
                except OverflowError:  # an integer too large for a float
                    finite = False
                if not finite:
                    raise RecordError(index, name, "must be a finite number of sensible size "
                                                   "(NaN, Infinity and values beyond 3.4e38 are not allowed)")
            elif not isinstance(value, str):
                raise RecordError(index, name, f"expected a string or null, got {type(value).__name__}")
        for feature in self.numeric:
            value = record.get(feature.name)
            if value is not None and feature.non_negative and value < 0:
                raise RecordError(index, feature.name, "must not be negative")

    def encode_records(self, records: Iterable[Mapping[str, Any]]) -> np.ndarray:
        """Validate and encode records into a float32 matrix ``[N, n_features]``."""
        rows = list(records)
        out = np.zeros((len(rows), self.n_features), dtype=np.float32)
        for i, record in enumerate(rows):
            self.validate(i, record)
            for j, f in enumerate(self.numeric):
                value = record.get(f.name)
                if value is None:
                    continue  # the mean, which standardises to 0
                v = math.log1p(value) if f.log else float(value)
                out[i, j] = (v - f.mean) / f.std
            col = len(self.numeric)
            for f in self.categorical:
                value = record.get(f.name)
                key = MISSING_CATEGORY if value is None or value in MISSING_STRINGS else value
                # An unseen category stays all zeros, as the textbook's handle_unknown="ignore".
                if key in f.categories:
                    out[i, col + f.categories.index(key)] = 1.0
                col += len(f.categories)
        return out

    # ----- requests: omitted fields imputed ------------------------------------------------
    @property
    def fields(self) -> list[str]:
        """Feature fields in encoding order (numeric, then categorical)."""
        return [f.name for f in self.numeric] + [f.name for f in self.categorical]

    def given_fields(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """``[N, fields]``: True where a record carries the field, even as null (the data set's NA)."""
        names = self.fields
        return np.array([[name in record for name in names] for record in records], dtype=bool).reshape(
            len(records), len(names))

    def complete_records(self, records: Sequence[Mapping[str, Any]]) -> Completions:
        """Validate and encode request records, imputing the fields each one omits.

        A field sent as null or ``"NA"`` is the data set's NA (as in training); an omitted one is
        filled in from the nearest training houses (:mod:`preprocessing.imputation`). Without an
        imputation (a spec fitted alone) an omitted field is the data set's NA and none is listed.
        """
        rows = list(records)
        x = self.encode_records(rows)
        if self.imputation is None:
            return Completions(x, np.arange(len(rows)), [[] for _ in rows])
        given = self.given_fields(rows)
        names = self.fields
        imputed = [[names[j] for j in np.flatnonzero(~mask)] for mask in given]
        features, owner = self.imputation.complete(x, given)
        return Completions(features, owner, imputed)

    # ----- storage -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = {
            "numeric": [asdict(f) for f in self.numeric],
            "categorical": [{"name": f.name, "categories": list(f.categories)} for f in self.categorical],
            "ignored": list(self.ignored),
        }
        if self.imputation is not None:
            data["imputation"] = self.imputation.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureSpec:
        spec = cls(
            [NumericFeature(**f) for f in data["numeric"]],
            [CategoricalFeature(f["name"], tuple(f["categories"])) for f in data["categorical"]],
            tuple(data.get("ignored", ("Id", "SalePrice"))),
        )
        if data.get("imputation"):
            spec.imputation = Imputation.from_dict(spec, data["imputation"])
        return spec
