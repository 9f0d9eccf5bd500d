"""The final summary table: one row per run, the metric that matters for its task first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from training.paths import runs_dir


def headline(summary: dict[str, Any]) -> str:
    test = summary["test"]
    if summary["task"] == "image":
        return f"test accuracy {100 * test['accuracy']:.2f}%"
    if summary["task"] == "price":
        return f"holdout log-RMSE {test['log_rmse']:.4f}, MAE ${test['mae_dollars']:,.0f}"
    return (f"held-out perplexity {test['perplexity']:.1f} (bigram {test['bigram_perplexity']:.1f}, "
            f"ratio {test['ratio_to_bigram']:.2f})")


def format_table(summaries: list[dict[str, Any]]) -> str:
    rows = [("run", "result", "epochs", "time", "device")]
    for s in summaries:
        rows.append((s["run"], headline(s), f"{s['epochs_run']} (best {s['best_epoch']})",
                     f"{s['train_seconds']:.0f} s", s["device"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def load_summaries(root: Path | None = None) -> list[dict[str, Any]]:
    root = root or runs_dir()
    return [json.loads(p.read_text()) for p in sorted(root.glob("*/metrics.json"))]
