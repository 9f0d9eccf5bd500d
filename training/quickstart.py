"""``./dlbook up``: get the data, train each default model that has no run yet, serve the best run of each.

Serving is ``bentoml serve serving.service:DlbookService`` (all three APIs in one process) on
127.0.0.1:3000 unless told otherwise; the OpenAPI page is its root URL.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from serving.artifacts import sha256_file
from training.datasets.sources import DataMissingError
from training.export import export_run, load_run, model_name_for
from training.fetch import fetch
from training.recipes import get_recipe
from training.summary import format_table, load_summaries
from training.train import TrainOptions, run_dir_for, train

# (architecture, preset, data set): the models the services will serve by default.
DEFAULT_MODELS = [
    ("lenet", "default", "fashion-mnist"),
    # A CNN for digits: in the quick profile the default MLP scores 94.7% on MNIST's test split (bar 98.3%),
    # the LeNet 98.7%, and 97.5% on photographed digits (docs/RESULTS.md, robustness).
    ("lenet", "default", "mnist"),
    ("price_mlp", "default", "house-prices"),
    ("poem_rnn", "default", "quantangshi"),
]


def run_rank(summary: dict[str, Any]) -> tuple[bool, bool]:
    """Better runs sort higher: trained on the complete data set first, then the full profile over quick.

    Runs that predate the data record (no ``data`` key) count as complete, as they were trained
    before a fresh clone could train on the samples at all.
    """
    return (summary.get("data", {}).get("complete", True), summary.get("profile") == "full")


def best_run(architecture: str, preset: str, dataset: str) -> Path | None:
    """The best finished run of this model on disk (see :func:`run_rank`), or None."""
    recipe = get_recipe(architecture, preset)
    finished = []
    for profile in ("full", "quick"):
        run = run_dir_for(recipe, dataset, profile)
        if (run / "model.pt").is_file() and (run / "metrics.json").is_file():
            finished.append((run_rank(json.loads((run / "metrics.json").read_text())), profile == "full", run))
    return max(finished, key=lambda item: item[:2])[2] if finished else None


def stored_meta(name: str) -> dict[str, Any] | None:
    """meta.json of the newest version of ``name`` in the BentoML store, or None."""
    import bentoml

    try:
        model = bentoml.models.get(f"{name}:latest")
    except bentoml.exceptions.NotFound:
        return None
    path = Path(model.path_of("meta.json"))
    return json.loads(path.read_text()) if path.is_file() else None


def needs_export(run: Path, stored: dict[str, Any] | None, summary: dict[str, Any]) -> tuple[bool, str]:
    """Whether the store should get ``run``'s weights, and why (printed for the user).

    The store is kept when it already holds exactly these weights (same ``model.pt`` checksum), or a
    model from a better run than any on disk (someone deleted ``runs/``); anything else is replaced, so
    a finished full run takes over from the quick one that ``./dlbook up`` served before it.
    """
    if stored is None:
        return True, "not in the model store yet"
    if stored.get("source", {}).get("model_sha256") == sha256_file(run / "model.pt"):
        return False, f"the store already serves this run ({stored.get('tag', '?')})"
    if run_rank(stored.get("training", {})) > run_rank(summary):
        return False, (f"the store holds a better model ({stored.get('tag', '?')}, "
                       f"{stored['training'].get('profile')} profile) than any run on disk")
    return True, f"the store holds another model ({stored.get('tag', '?')}); this run replaces it"


def quickstart(profile: str = "quick", serve: bool = True, host: str = "127.0.0.1", port: int = 3000) -> int:
    for dataset in sorted({d for _, _, d in DEFAULT_MODELS}):
        try:
            print(fetch(dataset))
        except DataMissingError as err:
            print(f"error: {err}")
            return 2
    for architecture, preset, dataset in DEFAULT_MODELS:
        run = best_run(architecture, preset, dataset)
        if run is None:
            train(TrainOptions(architecture, preset, dataset, profile=profile))
            run = best_run(architecture, preset, dataset)
        else:
            print(f"{architecture}-{preset} on {dataset}: trained model present in {run}")
        assert run is not None
        _, saved = load_run(run)
        summary = saved["summary"]
        name = model_name_for(summary)
        export, why = needs_export(run, stored_meta(name), summary)
        if not export:
            print(f"{name}: {why}")
            continue
        meta = export_run(run)
        worst = max(meta["parity"]["torchscript"], meta["parity"]["onnxruntime"])
        print(f"{name}: exported as {meta['tag']} from {run.name} ({why}; parity max abs {worst:.1e})")
    print()
    print(format_table(load_summaries()))
    if not serve:
        return 0
    print(f"\nserving on http://{host}:{port}  (API docs at /, Ctrl+C stops)")
    command = [sys.executable, "-m", "bentoml", "serve", "serving.service:DlbookService",
               "--host", host, "--port", str(port)]
    os.execvp(command[0], command)
    return 0  # not reached
