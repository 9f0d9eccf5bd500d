"""``python -m training house-eval``: house prices from partial records, measured on the holdout.

A request rarely carries all 79 Kaggle fields. This scores the served path (the model's stored
feature spec: omitted fields imputed from the nearest training houses, the price the mean over the
completions, the calibrated 80% range; ``preprocessing/imputation.py``) on the fixed 20% holdout
of the price task, when only the k most important fields are given (k = 5, 10, 20, all).

The ranking is chosen on training data only: greedy forward selection on the training part's
validation slice (at each step the field whose addition most lowers that slice's log-RMSE, the
others imputed). The imputation variants (the data set's NA, as the service read an omitted field
before; each column's median/mode; the nearest houses without weights; one nearest house) are
scored beside it, on the validation slice where the choice was made and on the holdout.

Writes the figures to ``docs/records/house-eval.json`` (``kind: house-eval``) and the block of
``docs/RESULTS.md`` between ``<!-- generated: house-eval -->`` and its end marker, rendered from
that record alone (``python -m training report`` leaves the block as it is; tests check that it is
what the record gives).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from preprocessing import FeatureSpec
from preprocessing.imputation import Imputation
from training.datasets.house import load_house_train
from training.paths import REPO_ROOT, runs_dir

RECORD_PATH = REPO_ROOT / "docs" / "records" / "house-eval.json"
RESULTS_PATH = REPO_ROOT / "docs" / "RESULTS.md"
RUN_NAME = "price_mlp-default-house-prices"
KS = (5, 10, 20)
RANKED = 20
# The block's markers, as training/report.py writes its own: `python -m training report` keeps this block.
START, END = "<!-- generated: house-eval -->", "<!-- end generated -->"

# Kaggle train.csv Id 1, described by seven facts; it sold for $208,500.
ID1_FACTS = {"MSSubClass": 60, "MSZoning": "RL", "LotArea": 8450, "OverallQual": 7, "YearBuilt": 2003,
             "GrLivArea": 1710, "GarageCars": 2}
ID1_SOLD = 208_500.0


def _bars(record: dict[str, Any]) -> list[dict[str, Any]]:
    rows = {r["fields"]: r for r in record["holdout"]}
    ten, whole = rows["10"], rows["all"]
    partial_cov = [rows[str(k)]["range_coverage"] for k in KS]
    return [
        {"bar": "10 fields: log-RMSE ≤ 0.20", "value": f"{ten['log_rmse']:.4f}", "ok": ten["log_rmse"] <= 0.20},
        {"bar": "10 fields: median predicted/actual within ±5%", "value": f"{ten['median_ratio']:.3f}",
         "ok": abs(ten["median_ratio"] - 1) <= 0.05},
        {"bar": "all fields: log-RMSE ≤ 0.14", "value": f"{whole['log_rmse']:.4f}", "ok": whole["log_rmse"] <= 0.14},
        {"bar": "Id 1 from its seven facts: $180k–240k", "value": f"${record['id1']['price']:,.0f}",
         "ok": 180_000 <= record["id1"]["price"] <= 240_000},
        {"bar": "80% range holds 75–85% of whole records", "value": f"{100 * whole['range_coverage']:.1f}%",
         "ok": 0.75 <= whole["range_coverage"] <= 0.85},
        {"bar": "80% range holds 75–85% of partial records (5, 10, 20 fields)",
         "value": ", ".join(f"{100 * c:.1f}%" for c in partial_cov),
         "ok": all(0.75 <= c <= 0.85 for c in partial_cov)},
    ]


class _Scorer:
    """Log prices of encoded records with a field mask, by the served imputation or a variant."""

    def __init__(self, model: torch.nn.Module, spec: FeatureSpec) -> None:
        self.model, self.spec = model, spec
        self.imputation = spec.imputation
        self.na_row = spec.encode_records([{}])[0]  # every field the data set's NA
        donors = self.imputation.donor_x
        n_num = len(spec.numeric)
        centre = np.zeros(donors.shape[1], dtype=np.float32)
        centre[:n_num] = np.median(donors[:, :n_num], axis=0)
        start = n_num
        for f in spec.categorical:
            centre[start + int(np.argmax(donors[:, start: start + len(f.categories)].sum(axis=0)))] = 1.0
            start += len(f.categories)
        self.centre = centre

    @torch.no_grad()
    def predict(self, rows: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))).double().numpy()

    def served(self, x: np.ndarray, given: np.ndarray, imputation: Imputation | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        imputation = imputation or self.imputation
        rows, owner = imputation.complete(x, given)
        return imputation.combine(self.predict(rows), owner, len(x))

    def filled(self, x: np.ndarray, given: np.ndarray, fill: np.ndarray) -> np.ndarray:
        keep = given[:, self.imputation.col_field]
        return self.predict(np.where(keep, x, fill[None, :]))


def _mask(n: int, names: list[str], fields: list[str]) -> np.ndarray:
    given = np.zeros((n, len(names)), dtype=bool)
    for name in fields:
        given[:, names.index(name)] = True
    return given


def _log_rmse(mean: np.ndarray, y: np.ndarray) -> float:
    return float(np.sqrt(np.mean((mean - y) ** 2)))


def forward_ranking(scorer: _Scorer, x: np.ndarray, y: np.ndarray, names: list[str], steps: int = RANKED
                    ) -> list[dict[str, Any]]:
    """Greedy forward selection of fields on (x, y) (the validation slice of the training part)."""
    chosen: list[str] = []
    ranking = []
    for _ in range(steps):
        best = None
        for name in names:
            if name in chosen:
                continue
            mean, _ = scorer.served(x, _mask(len(x), names, [*chosen, name]))
            score = _log_rmse(mean, y)
            if best is None or score < best[1]:
                best = (name, score)
        chosen.append(best[0])
        ranking.append({"field": best[0], "validation_log_rmse": round(best[1], 4)})
    return ranking


def _scores(mean: np.ndarray, spread: np.ndarray | None, y: np.ndarray, imputation: Imputation | None
            ) -> dict[str, float]:
    out = {"log_rmse": round(_log_rmse(mean, y), 4), "median_ratio": round(float(np.median(np.exp(mean - y))), 4)}
    if spread is not None and imputation is not None and imputation.price_range is not None:
        low, high = imputation.price_range_of(mean, spread)
        out["range_coverage"] = round(float(np.mean((y >= low) & (y <= high))), 4)
        out["median_range_width"] = round(float(np.median(np.exp(high - mean) - np.exp(low - mean))), 4)
    return out


def evaluate(run_dir: Path, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """The record for the run in ``run_dir`` (a trained price model with its imputation and range)."""
    from training.export import load_run
    from training.recipes import get_recipe
    from training.tasks.price import PriceTask

    model, saved = load_run(run_dir)
    summary = saved["summary"]
    spec = FeatureSpec.from_dict(saved["preprocessing"]["features"])
    if spec.imputation is None or spec.imputation.price_range is None:
        raise SystemExit(f"{run_dir.name} was trained before imputation and price ranges: train it again")
    recipe = get_recipe(summary["architecture"], summary["preset"])
    table = load_house_train()
    task = PriceTask(table, recipe.batch_size, torch.device("cpu"), recipe.log_skewed, recipe.drop_outliers,
                     summary.get("limit"))
    names = spec.fields
    scorer = _Scorer(model, spec)
    log_prices = np.log(table.prices)

    def part(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return spec.encode_records([table.records[i] for i in idx]), log_prices[idx]

    val_x, val_y = part(task.val_idx)
    hold_x, hold_y = part(task.holdout_idx)
    began = time.perf_counter()
    progress(f"ranking fields by forward selection on the validation slice ({len(val_y)} houses)…")
    ranking = forward_ranking(scorer, val_x, val_y, names)
    ranked = [r["field"] for r in ranking]

    progress("scoring the holdout…")
    holdout = []
    for k in (*KS, len(names)):
        fields = names if k == len(names) else ranked[:k]
        mean, spread = scorer.served(hold_x, _mask(len(hold_y), names, fields))
        label = "all" if k == len(names) else str(k)
        holdout.append({"fields": label, "given": k, **_scores(mean, spread, hold_y, spec.imputation)})
    rng = np.random.RandomState(0)
    given = rng.random_sample((len(hold_y), len(names))) < rng.random_sample((len(hold_y), 1))
    mean, spread = scorer.served(hold_x, given)
    holdout.append({"fields": "random", "given": round(float(given.sum(axis=1).mean()), 1),
                    **_scores(mean, spread, hold_y, spec.imputation)})

    progress("scoring the imputation variants…")
    fit_records = [table.records[i] for i in task.fit_idx]
    unweighted = Imputation.fit(spec, fit_records, log_prices[task.fit_idx], weighted=False)
    single = Imputation.fit(spec, fit_records, log_prices[task.fit_idx], neighbours=1)
    variants = []
    for label, score in [
        ("the data set's NA (how the service read an omitted field before)",
         lambda x, g: scorer.filled(x, g, scorer.na_row)),
        ("each column's training median / mode", lambda x, g: scorer.filled(x, g, scorer.centre)),
        ("the nearest house (1 donor)", lambda x, g: scorer.served(x, g, single)[0]),
        (f"the {unweighted.neighbours} nearest houses, fields unweighted",
         lambda x, g: scorer.served(x, g, unweighted)[0]),
        (f"the {spec.imputation.neighbours} nearest houses, fields weighted by relevance (served)",
         lambda x, g: scorer.served(x, g)[0]),
    ]:
        row: dict[str, Any] = {"imputation": label}
        for split, (x, y) in (("validation", (val_x, val_y)), ("holdout", (hold_x, hold_y))):
            for k in KS:
                row[f"{split}_{k}"] = round(_log_rmse(score(x, _mask(len(y), names, ranked[:k])), y), 4)
        variants.append(row)

    completions = spec.complete_records([ID1_FACTS])
    mean, spread = spec.imputation.combine(scorer.predict(completions.rows), completions.owner, 1)
    low, high = spec.imputation.price_range_of(mean, spread)
    facts_x = spec.encode_records([ID1_FACTS])
    as_na = scorer.filled(facts_x, spec.given_fields([ID1_FACTS]), scorer.na_row)
    id1 = {"facts": ID1_FACTS, "sold": ID1_SOLD, "price": round(float(np.exp(mean[0])), 2),
           "price_omitted_as_na": round(float(np.exp(as_na[0])), 2),
           "range": [round(float(np.exp(low[0])), 2), round(float(np.exp(high[0])), 2)],
           "imputed": len(completions.imputed[0])}
    record = {
        "kind": "house-eval",
        "command": "python -m training house-eval",
        "run": run_dir.name,
        "trained_with": (f"python -m training train {summary['architecture']} --preset {summary['preset']}"
                         + (f" --seed {summary['seed']}" if summary.get("seed") else "")),
        "device": summary["device"],
        "holdout_log_rmse_at_training": round(summary["test"]["log_rmse"], 4),
        "houses": {"training_part": int(len(task.train_idx)), "validation_slice": int(len(task.val_idx)),
                   "donors": int(len(task.fit_idx)), "holdout": int(len(task.holdout_idx))},
        "imputation": {"neighbours": spec.imputation.neighbours, "max_completions": _max_completions()},
        "price_range": spec.imputation.price_range.to_dict(),
        "calibration": summary.get("calibration"),
        "ranking": ranking,
        "holdout": holdout,
        "variants": variants,
        "id1": id1,
        "seconds": round(time.perf_counter() - began, 1),
    }
    record["bars"] = _bars(record)
    return record


def _max_completions() -> int:
    from preprocessing.imputation import MAX_COMPLETIONS

    return MAX_COMPLETIONS


# ----- the RESULTS.md section ------------------------------------------------------------------
def markdown_section(record: dict[str, Any]) -> str:
    rng = record["price_range"]
    lines = [
        START,
        "## House prices from partial records",
        "",
        f"Written by `{record['command']}` from [`docs/records/house-eval.json`](records/house-eval.json) "
        f"(run `{record['run']}`, trained by `{record['trained_with']}` on {record['device']}). The holdout is "
        f"the same {record['houses']['holdout']} houses as above. A field the request omits is *unknown*: it is "
        f"filled in as the {record['imputation']['neighbours']} training houses nearest on the given fields have "
        "it (weighted by how much each field tells about price; donors: the "
        f"{record['houses']['donors']} houses the model was fitted on), and the price is the mean log price over "
        "those completions; a field sent as null or \"NA\" keeps the data set's meaning (\"none\"). "
        f"The {100 * rng['coverage']:.0f}% range is `mean ± sqrt({rng['full_half_width']:.3f}² + "
        f"({rng['spread_scale']:.2f}·spread)²)` in log dollars, *spread* being the completions' standard "
        "deviation, calibrated by split conformal on cross-fitted errors of the training part "
        "(`preprocessing/imputation.py`, `training/tasks/price.py`).",
        "",
        "The k fields are the first k of the ranking below, chosen on the training part's validation slice "
        "(forward selection); *random* gives each holdout house a random subset of fields (a stress test: it "
        "often leaves out the important ones).",
        "",
        "| fields given | log-RMSE | median predicted/actual | 80% range holds the price | median range width |",
        "|---|---|---|---|---|",
    ]
    for row in record["holdout"]:
        given = f"{row['fields']} ({row['given']} on average)" if row["fields"] == "random" else row["fields"]
        lines.append(f"| {given} | {row['log_rmse']:.4f} | {row['median_ratio']:.3f} | "
                     f"{100 * row['range_coverage']:.1f}% | ±{100 * row['median_range_width'] / 2:.0f}% |")
    id1 = record["id1"]
    facts = ", ".join(f"{k} {v}" for k, v in id1["facts"].items())
    lines += [
        "",
        f"Kaggle train.csv Id 1 from seven facts ({facts}): **${id1['price']:,.0f}**, range "
        f"${id1['range'][0]:,.0f}–${id1['range'][1]:,.0f} ({id1['imputed']} fields imputed); it sold for "
        f"${id1['sold']:,.0f}. Read the way the service read omitted fields before (the data set's NA: no "
        f"basement, no garage type…), the same model says ${id1['price_omitted_as_na']:,.0f}.",
        "",
        "Fields by importance (forward selection on the validation slice; its log-RMSE once the field is added; "
        f"on {record['houses']['validation_slice']} houses the order past the first few fields is noisy, but it is "
        "the training part's own choice):",
        "",
        ", ".join(f"{i + 1}. {r['field']} ({r['validation_log_rmse']:.3f})" for i, r in enumerate(record["ranking"])),
        "",
        "Imputation variants, log-RMSE with the top 5 / 10 / 20 fields given (the served one was chosen on the "
        "validation slice):",
        "",
        "| omitted fields filled with | validation 5 | 10 | 20 | holdout 5 | 10 | 20 |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in record["variants"]:
        lines.append(f"| {v['imputation']} | " + " | ".join(
            f"{v[f'{split}_{k}']:.4f}" for split in ("validation", "holdout") for k in KS) + " |")
    lines += ["", "Bars (issue 20):", ""]
    lines += [f"- {'✓' if b['ok'] else '✗'} {b['bar']}: {b['value']}" for b in record["bars"]]
    lines += ["", END]
    return "\n".join(lines) + "\n"


def current_block(results: Path = RESULTS_PATH) -> str | None:
    """The block as RESULTS.md has it now (markers included), or None."""
    text = results.read_text(encoding="utf-8") if results.is_file() else ""
    if START not in text:
        return None
    return START + text.split(START, 1)[1].split(END, 1)[0] + END + "\n"


def write_section(results: Path, section: str) -> None:
    """Put ``section`` in place of the block in ``results`` (appended the first time)."""
    text = results.read_text(encoding="utf-8") if results.is_file() else "# Results\n"
    if START in text and END in text:
        before, rest = text.split(START, 1)
        after = rest.split(END, 1)[1]
        text = before + section.rstrip("\n") + after
    else:
        text = text.rstrip("\n") + "\n\n" + section
    results.write_text(text, encoding="utf-8")


def main(run: str | None = None, retrain: bool = False, record_path: Path = RECORD_PATH,
         results_path: Path = RESULTS_PATH) -> int:
    run_dir = runs_dir() / (run or RUN_NAME)
    if retrain or not (run_dir / "model.pt").is_file():
        if run:
            raise SystemExit(f"{run_dir} has no model.pt: train it first")
        from training.train import TrainOptions, train

        print(f"training {RUN_NAME} (full profile, seed 0) first…")
        train(TrainOptions("price_mlp", progress=False))
    torch.set_num_threads(1)  # a small model on small batches: one thread is the fastest here
    record = evaluate(run_dir)
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    write_section(results_path, markdown_section(record))
    print(f"wrote {record_path} and the house section of {results_path}")
    for bar in record["bars"]:
        print(f"  {'ok ' if bar['ok'] else 'MISS'} {bar['bar']}: {bar['value']}")
    return 0 if all(b["ok"] for b in record["bars"]) else 1
