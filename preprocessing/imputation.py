"""Omitted house fields: filled in as the nearest training houses have them, and the price range.

**Omitted is unknown, not "none".** In Kaggle's data a missing value mostly means *none* (no
garage, no basement); a request that leaves a field out says nothing about it. So a field the
request omits is imputed, while one it sends as ``null`` or ``"NA"`` keeps the data set's meaning
and is encoded exactly as training read the CSV's NA.

**How** (fitted on the training rows only, stored with the model in its feature spec): the
training houses are the *donors*. For a record, the donors are ranked by a weighted distance over
the fields it gives, on their encoded values (a numeric field: the squared difference of the
standardised values; a categorical one: 1 when the categories differ). Each field's weight is how
much it tells about the price on the training rows (``|r|`` of the standardised value and log
price for a numeric field, the correlation ratio η for a categorical one), so a house described
by its quality, area and year is matched on those before its lot shape. The ``neighbours``
nearest donors each supply all the omitted fields at once (a real, consistent house: garage area
goes with garage cars, basement with living area and year), which makes ``neighbours`` complete
records; the price is the mean of the model's log prices over them. Donors exactly as near as the
``neighbours``-th (a record that gives little, say only its overall quality, ties with hundreds) all
count, up to ``MAX_COMPLETIONS`` spread evenly over them; donors are stored in order of price, so
that sample is stratified by price and an empty record gets the training houses' price quantiles.
Chosen on the validation slice of the training part over each column's median/mode, one nearest
house, 5, 20 or 40 neighbours and unweighted distances (``docs/RESULTS.md`` scores the main ones).

**The price range** (split conformal on cross-fitted errors; an 80% range by default). A whole
record's log price has the model's own error; a record with omitted fields adds what the omitted
fields leave open, which shows as the *spread* (standard deviation) of its completions' log prices.
The range is ``mean ± sqrt(h² + (c·spread)²)``: ``h`` is the conformal quantile of whole records'
absolute errors, and ``c`` that of the factor each partial record's spread needed for its range to
hold its price (:meth:`PriceRange.calibrate`). The errors come from models of the same recipe that
did not see the rows they price (``training/tasks/price.py``: 5-fold cross-fitting over the
training part, each fold priced whole, with its 5, 10 and 20 most relevant fields, and with a
random subset), never from the holdout that is reported. Coverage on the holdout, for whole and
partial records: ``docs/RESULTS.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from preprocessing.features import FeatureSpec

UNSEEN_CATEGORY = "\u0000unseen"  # encodes as all zeros, as any category the spec never saw
# Donors as near as the ``neighbours``-th all count (a record that gives little, say only its
# quality, ties with hundreds), up to this many, taken evenly over the tied ones.
MAX_COMPLETIONS = 40


@dataclass
class Completions:
    """Model input rows for a batch of records: one row per whole record, one per donor (see
    :meth:`Imputation.nearest`) for a record with omitted fields. ``owner[r]``: the record of row ``r``."""

    rows: np.ndarray  # float32 [R, F]
    owner: np.ndarray  # int64 [R]
    imputed: list[list[str]]  # per record, the fields it omitted (filled in from the donors)

    @property
    def n_records(self) -> int:
        return len(self.imputed)


@dataclass(frozen=True)
class PriceRange:
    """The calibrated price range, in log dollars: ``mean ± sqrt(full_half_width² + (spread_scale·spread)²)``.

    ``full_half_width`` is the conformal quantile of whole records' errors; ``spread_scale`` the
    conformal quantile, over partial records, of the factor their completions' spread needed for
    the range to hold their price (see :meth:`calibrate`).
    """

    coverage: float
    full_half_width: float
    spread_scale: float

    def half_width(self, spread: np.ndarray) -> np.ndarray:
        return np.sqrt(self.full_half_width**2 + (self.spread_scale * np.asarray(spread, dtype=np.float64)) ** 2)

    @classmethod
    def calibrate(cls, full_errors: np.ndarray, partial_errors: np.ndarray, partial_spreads: np.ndarray,
                  coverage: float = 0.8) -> PriceRange:
        """Two split-conformal quantiles from held-out log-price errors (``log price − mean``).

        First the half-width that holds ``coverage`` of whole records; then, for each partial
        record, the smallest spread factor whose range holds its price, and that factor's quantile.
        """
        full = conformal_quantile(np.abs(full_errors), coverage)
        spreads = np.asarray(partial_spreads, dtype=np.float64)
        errors = np.asarray(partial_errors, dtype=np.float64)[spreads > 0]  # a record with no spread is whole
        needed = np.sqrt(np.maximum(errors**2 - full**2, 0.0)) / spreads[spreads > 0]
        scale = conformal_quantile(needed, coverage) if len(needed) else 0.0
        return cls(coverage, round(full, 6), round(scale, 6))

    def to_dict(self) -> dict[str, float]:
        return {"coverage": self.coverage, "full_half_width": self.full_half_width,
                "spread_scale": self.spread_scale}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PriceRange:
        return cls(float(data["coverage"]), float(data["full_half_width"]), float(data["spread_scale"]))


def conformal_quantile(scores: np.ndarray, coverage: float) -> float:
    """The split-conformal quantile: the ⌈(n+1)·coverage⌉-th smallest score."""
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    rank = min(math.ceil((len(scores) + 1) * coverage), len(scores))
    return float(scores[rank - 1])


def _relevance(values: np.ndarray, log_prices: np.ndarray, categorical: bool) -> float:
    """How much one encoded field tells about log price: |r| (numeric) or η (categorical codes)."""
    y = log_prices - log_prices.mean()
    total = float(np.sum(y**2))
    if total == 0:
        return 0.0
    if categorical:
        codes = values.astype(np.int64) + 1  # -1 (unseen) becomes a group of its own
        sums = np.bincount(codes, weights=y)
        counts = np.bincount(codes)
        between = float(np.sum(sums[counts > 0] ** 2 / counts[counts > 0]))
        return math.sqrt(max(between, 0.0) / total)
    x = values - values.mean()
    denom = math.sqrt(float(np.sum(x**2)) * total)
    return 0.0 if denom == 0 else abs(float(np.sum(x * y)) / denom)


class Imputation:
    """Donor houses and field weights (fitted on training rows), applied to encoded records."""

    def __init__(self, spec: FeatureSpec, donors: Mapping[str, Sequence[Any]], weights: Mapping[str, float],
                 neighbours: int, price_range: PriceRange | None = None) -> None:
        self.donors = {name: list(values) for name, values in donors.items()}
        self.weights = dict(weights)
        self.neighbours = int(neighbours)
        self.price_range = price_range
        self.fields = [f.name for f in spec.numeric] + [f.name for f in spec.categorical]
        n_donors = len(next(iter(self.donors.values())))
        records = [{} for _ in range(n_donors)]
        for f in spec.numeric:
            for record, value in zip(records, self.donors[f.name], strict=True):
                record[f.name] = value
        for f in spec.categorical:
            for record, code in zip(records, self.donors[f.name], strict=True):
                record[f.name] = f.categories[code] if code >= 0 else UNSEEN_CATEGORY
        self.donor_x = spec.encode_records(records).astype(np.float64)  # [D, F]
        # Column → field, and each column's weight in the distance: w² for a numeric column; w²/2 for
        # each one-hot column, since two different categories differ in two columns.
        col_field, col_weight = [], []
        for k, f in enumerate(spec.numeric):
            col_field.append(k)
            col_weight.append(self.weights.get(f.name, 0.0) ** 2)
        for k, f in enumerate(spec.categorical, start=len(spec.numeric)):
            col_field += [k] * len(f.categories)
            col_weight += [self.weights.get(f.name, 0.0) ** 2 / 2] * len(f.categories)
        self.col_field = np.array(col_field, dtype=np.int64)
        self.col_weight = np.array(col_weight, dtype=np.float64)
        self.donor_sq = self.donor_x**2

    # ----- fitting -------------------------------------------------------------------------
    @classmethod
    def fit(cls, spec: FeatureSpec, records: Sequence[Mapping[str, Any]], log_prices: np.ndarray,
            neighbours: int = 10, weighted: bool = True) -> Imputation:
        """Donors are ``records`` (the rows the model is fitted on); weights from their log prices.

        The donors are kept in order of price, so that ties, taken evenly over that order, are a
        sample stratified by price (an empty record's 40 completions are the donors' price quantiles).
        """
        from preprocessing.features import MISSING_CATEGORY, MISSING_STRINGS

        log_prices = np.asarray(log_prices, dtype=np.float64)
        order = np.argsort(log_prices, kind="stable")
        records = [records[i] for i in order]
        log_prices = log_prices[order]
        donors: dict[str, list[Any]] = {}
        for f in spec.numeric:
            donors[f.name] = [r.get(f.name) for r in records]
        for f in spec.categorical:
            index = {c: i for i, c in enumerate(f.categories)}
            codes = []
            for r in records:
                v = r.get(f.name)
                # -1: a category the spec never saw (possible only when donors differ from the spec's rows)
                codes.append(index.get(MISSING_CATEGORY if v is None or v in MISSING_STRINGS else str(v), -1))
            donors[f.name] = codes
        weights: dict[str, float] = {}
        x = spec.encode_records(records).astype(np.float64)
        for k, f in enumerate(spec.numeric):
            weights[f.name] = _relevance(x[:, k], log_prices, False) if weighted else 1.0
        for f in spec.categorical:
            weights[f.name] = (_relevance(np.array(donors[f.name]), log_prices, True) if weighted
                               else 1.0)
        return cls(spec, donors, {k: round(v, 6) for k, v in weights.items()}, neighbours)

    # ----- applying ------------------------------------------------------------------------
    def nearest(self, x: np.ndarray, given: np.ndarray) -> list[np.ndarray]:
        """Per encoded record, the donors nearest it over its given fields: the ``neighbours`` nearest and
        any as near as the last of them, at most ``MAX_COMPLETIONS`` (evenly spread over the ties)."""
        c = np.where(given[:, self.col_field], self.col_weight, 0.0)  # [N, F]
        x = x.astype(np.float64)
        # Σ c·(x − d)², expanded into products with all donors at once; two products of F columns rather
        # than one of 2F: OpenBLAS runs the larger one on several threads, measured 10× slower on a busy machine
        dist = (c * x**2).sum(axis=1)[:, None] - 2 * (c * x) @ self.donor_x.T + c @ self.donor_sq.T
        m = min(self.neighbours, dist.shape[1])
        kth = np.partition(dist, m - 1, axis=1)[:, m - 1]
        # rounding in the expanded square leaves ~1e-12 of noise where the distances are equal
        tied = dist <= (kth + 1e-9 * (1.0 + np.abs(kth)))[:, None]
        picks = []
        for row in tied:
            donors = np.flatnonzero(row)
            if len(donors) > MAX_COMPLETIONS:
                donors = donors[np.linspace(0, len(donors) - 1, MAX_COMPLETIONS).round().astype(np.int64)]
            picks.append(donors)
        return picks

    def complete(self, x: np.ndarray, given: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Model rows and their owners for encoded records ``x [N, F]`` with field mask ``given [N, fields]``:
        a whole record's own row; for a record with omitted fields, one row per donor (:meth:`nearest`),
        its given fields as sent and the omitted ones as that donor has them."""
        partial = np.flatnonzero(~given.all(axis=1))
        whole = np.flatnonzero(given.all(axis=1))
        rows = [x[whole].astype(np.float32)]
        owner = [whole]
        if len(partial):
            picks = self.nearest(x[partial], given[partial])
            counts = np.array([len(p) for p in picks])
            record = np.repeat(partial, counts)  # [R]
            donor = np.concatenate(picks)
            keep = given[record][:, self.col_field]  # [R, F]
            rows.append(np.where(keep, x[record], self.donor_x[donor]).astype(np.float32))
            owner.append(record)
        return np.concatenate(rows), np.concatenate(owner)

    def combine(self, log_prices: np.ndarray, owner: np.ndarray, n_records: int
                ) -> tuple[np.ndarray, np.ndarray]:
        """Per record: the mean of its rows' log prices and their standard deviation (0 for a whole record)."""
        log_prices = np.asarray(log_prices, dtype=np.float64)
        counts = np.bincount(owner, minlength=n_records)
        mean = np.bincount(owner, weights=log_prices, minlength=n_records) / np.maximum(counts, 1)
        sq = np.bincount(owner, weights=log_prices**2, minlength=n_records) / np.maximum(counts, 1)
        spread = np.sqrt(np.maximum(sq - mean**2, 0.0))
        return mean, spread

    def price_range_of(self, mean: np.ndarray, spread: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Low and high log prices of the calibrated range (needs ``price_range``)."""
        if self.price_range is None:
            raise ValueError("this model has no calibrated price range")
        half = self.price_range.half_width(spread)
        return mean - half, mean + half

    # ----- storage -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "nearest training houses over the given fields (preprocessing/imputation.py)",
            "neighbours": self.neighbours,
            "weights": self.weights,
            # one line of text per column (numbers, NA, or category indices), so that meta.json stays
            # a third of a megabyte however it is indented
            "donors": {name: " ".join(_text(v) for v in values) for name, values in self.donors.items()},
            "price_range": self.price_range.to_dict() if self.price_range else None,
        }

    @classmethod
    def from_dict(cls, spec: FeatureSpec, data: Mapping[str, Any]) -> Imputation:
        price_range = PriceRange.from_dict(data["price_range"]) if data.get("price_range") else None
        categorical = {f.name for f in spec.categorical}
        donors = {name: [_number(v, name in categorical) for v in text.split(" ")]
                  for name, text in data["donors"].items()}
        return cls(spec, donors, data["weights"], data["neighbours"], price_range)


def _text(value: float | int | None) -> str:
    if value is None:
        return "NA"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _number(text: str, integer: bool) -> float | int | None:
    if text == "NA":
        return None
    return int(text) if integer else float(text)

