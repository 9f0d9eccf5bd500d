"""``python -m training report``: docs/RESULTS.md from the finished runs, next to the books' figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.recipes import RECIPES
from training.summary import load_summaries

HEADER = """# Results

Written by `python -m training report` from `runs/*/metrics.json`; every row is a run that finished
with the command shown. Image rows: accuracy on the official 10,000-image test split. House rows:
log-RMSE (the textbook's metric) and MAE on the fixed 20% holdout (scikit-learn's split, seed 42).
Poem rows: character perplexity on a fixed held-out 5% of poems, next to an interpolated bigram
fitted on the same training poems and scored on the same tokens.

Trainings marked H100 ran on a lent NVIDIA H100, up to 14 at once on the one GPU, so their times
are upper bounds; CPU rows ran on this project's 2-core machine.
"""


def _metric(s: dict[str, Any]) -> str:
    t = s["test"]
    if s["task"] == "image":
        return f"{100 * t['accuracy']:.2f}%"
    if s["task"] == "price":
        return f"log-RMSE {t['log_rmse']:.4f}, MAE ${t['mae_dollars']:,.0f}"
    return f"ppl {t['perplexity']:.1f} (bigram {t['bigram_perplexity']:.1f}, ×{t['ratio_to_bigram']:.2f})"


def _book(s: dict[str, Any]) -> str:
    recipe = RECIPES.get(f"{s['architecture']}-{s['preset']}")
    figure = recipe.book_figures.get(s["dataset"]) if recipe else None
    if figure is None:
        return "–"
    delta = 100 * s["test"]["accuracy"] - figure
    return f"{figure}% ({delta:+.2f})"


def _command(s: dict[str, Any]) -> str:
    cmd = f"python -m training train {s['architecture']} --preset {s['preset']} --dataset {s['dataset']}"
    return f"`{cmd}`"


def results_markdown(summaries: list[dict[str, Any]]) -> str:
    full = [s for s in summaries if s["profile"] == "full" and not s.get("limit")]
    order = {"image": 0, "price": 1, "poem": 2}
    full.sort(key=lambda s: (order[s["task"]], s["dataset"], s["architecture"], s["preset"] != "book", s["preset"]))
    lines = [HEADER, "| model | preset | data set | test metric | book's figure (Δ) | parameters | ONNX size | "
             "epochs (best) | train time | device | command |", "|" + "---|" * 11]
    for s in full:
        device = "H100" if "H100" in s["device"] else s["device"]
        onnx = f"{s['onnx_bytes'] / 1e6:.2f} MB" if s.get("onnx_bytes") else "export pending"
        lines.append(
            f"| {s['architecture']} | {s['preset']} | {s['dataset']} | {_metric(s)} | {_book(s)} | "
            f"{s['parameters']:,} | {onnx} | {s['epochs_run']} ({s['best_epoch']}) | {s['train_seconds']:.0f} s | "
            f"{device} | {_command(s)} |"
        )
    return "\n".join(lines) + "\n"


def write_report(path: Path) -> Path:
    summaries = load_summaries()
    if not summaries:
        raise SystemExit("no finished runs under runs/: train something first")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(results_markdown(summaries), encoding="utf-8")
    return path
