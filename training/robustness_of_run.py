"""``python -m training robustness-run RUN …``: a training run (not yet exported or served) on the robustness sets.

For deciding between training experiments before any of them is exported: the same test images, the
same MNIST-C corruptions and the same photographed renderings as ``python -m training robustness``,
but classified in this process by the run's PyTorch model. A photo takes the upload path's own steps
(``serving.image_to_tensor.decode_image`` and ``to_dataset_frame``), so the two commands differ only in
the engine (PyTorch here, ONNX Runtime behind ``/classify``): on the full-profile digit LeNet both
gave 98.7% photographed.

Each run's figures go to ``docs/records/experiments/robustness-run-<run>.json``, and the table between
``<!-- generated: robustness-experiments -->`` and ``<!-- end generated -->`` of docs/RESULTS.md is rebuilt
from every such record; the served benchmark's records and section are not touched.
"""

from __future__ import annotations

import datetime as dt
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from preprocessing import PixelScaling
from serving.image_to_tensor import decode_image, to_dataset_frame
from training.export import load_run
from training.paths import REPO_ROOT, runs_dir
from training.robustness import benchmark_rows

EXPERIMENTS_DIR = REPO_ROOT / "docs" / "records" / "experiments"
RESULTS = REPO_ROOT / "docs" / "RESULTS.md"
SECTION = "robustness-experiments"
# Where the digit policies differ most (the marks in training: lines over the digit, salt and pepper, hard outlines).
SHOWN = ("zigzag", "dotted_line", "impulse_noise", "canny_edges")


def evaluate_run(run: Path, count: int = 200, seed: int = 0) -> dict[str, Any]:
    model, saved = load_run(run)
    model.eval()
    summary = saved["summary"]
    dataset = summary["dataset"]
    scaling = PixelScaling.from_dict(saved["preprocessing"]["scaling"])
    labels, rows = benchmark_rows(dataset, count, seed)

    def accuracy(frames: np.ndarray) -> float:
        with torch.no_grad():
            logits = model(torch.from_numpy(scaling.apply(frames)[:, None]))
        return float((logits.argmax(1).numpy() == labels).mean())

    scores: dict[str, dict[str, float]] = {"clean": {}, "mnist_c": {}, "photographed": {}}
    for row in rows:
        # A photo takes the upload path's own steps; arrays are the frames as they are.
        frames = row.pixels if row.files is None else np.stack(
            [to_dataset_frame(decode_image(blob), dataset) for blob in row.files])
        scores[row.section][row.name] = accuracy(frames)
    mnist_c, photographed = scores["mnist_c"], scores["photographed"]
    return {
        "kind": "robustness-run",
        "run": run.name,
        "dataset": dataset,
        "augment": summary.get("augment"),
        "training_command": summary.get("command"),
        "train_seconds": summary.get("train_seconds"),
        "parameters": summary.get("parameters"),
        "test_accuracy": summary["test"]["accuracy"],
        "images_per_condition": len(labels),
        "seed": seed,
        "clean": scores["clean"]["clean"],
        "mnist_c": mnist_c,
        "mnist_c_mean": float(np.mean(list(mnist_c.values()))),
        "photographed": photographed,
        "photographed_mean": float(np.mean(list(photographed.values()))),
        "date": dt.date.today().isoformat(),
        "command": "python -m training " + shlex.join(sys.argv[1:]) if sys.argv[0].endswith("__main__.py") else None,
    }


def load_experiments(directory: Path = EXPERIMENTS_DIR) -> list[dict[str, Any]]:
    records = [json.loads(p.read_text()) | {"_file": p.name} for p in sorted(directory.glob("robustness-run-*.json"))]
    return sorted(records, key=lambda r: (r["dataset"], r["mnist_c_mean"]))


def table(records: list[dict[str, Any]]) -> str:
    """The generated table: one row per scored run, its training command and record linked."""
    head = ["run (policy)", "test split", "photographed", "MNIST-C mean", *SHOWN, "trained in"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        seconds = f"{r['train_seconds']:,.0f} s" if r.get("train_seconds") else "–"
        lines.append(
            f"| [{r['run']}](records/experiments/{r['_file']}) (`{r.get('augment') or 'robust'}`) "
            f"| {r['test_accuracy']:.2%} | {r['photographed_mean']:.1%} | {r['mnist_c_mean']:.1%} | "
            + " | ".join(f"{r['mnist_c'][k]:.1%}" for k in SHOWN) + f" | {seconds} |")
    commands = [f"`{r['training_command']}`" for r in records if r.get("training_command")]
    if commands:
        lines += ["", "Trained with " + "; ".join(commands) + "."]
    return "\n".join(lines) + "\n"


def write_table(results: Path = RESULTS, directory: Path = EXPERIMENTS_DIR) -> bool:
    """Rebuild the experiments table in RESULTS.md where its block is; False when the block is not there."""
    from training.report import MARKER, replace_sections

    text = results.read_text(encoding="utf-8")
    if not any(m.group(1) == SECTION for m in MARKER.finditer(text)):
        return False
    results.write_text(replace_sections(text, {SECTION: table(load_experiments(directory))}), encoding="utf-8")
    return True


def main(runs: list[str], count: int, seed: int, write: bool = True) -> list[dict[str, Any]]:
    records = []
    for name in runs:
        path = Path(name) if Path(name).is_dir() else runs_dir() / name
        record = evaluate_run(path, count, seed)
        records.append(record)
        print(f"{record['run']}: test split {record['test_accuracy']:.2%}, photographed "
              f"{record['photographed_mean']:.1%}, MNIST-C {record['mnist_c_mean']:.1%} ("
              + ", ".join(f"{k} {v:.1%}" for k, v in record["mnist_c"].items()) + ")")
        if write:
            EXPERIMENTS_DIR.mkdir(parents=True, exist_ok=True)
            out = EXPERIMENTS_DIR / f"robustness-run-{record['run']}.json"
            out.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
            print(f"wrote {out}")
    if write and write_table():
        print(f"wrote {RESULTS}")
    return records
