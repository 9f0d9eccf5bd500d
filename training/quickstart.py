"""``./dlbook up``: get the data, train each default model that has no run yet, export it, serve.

Serving is ``bentoml serve serving.service:DlbookService`` (all three APIs in one process) on
127.0.0.1:3000 unless told otherwise; the OpenAPI page is its root URL.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from training.datasets.sources import DataMissingError
from training.export import export_run, load_run, model_name_for
from training.fetch import fetch
from training.recipes import get_recipe
from training.summary import format_table, load_summaries
from training.train import TrainOptions, run_dir_for, train

# (architecture, preset, data set): the models the services will serve by default.
DEFAULT_MODELS = [
    ("lenet", "default", "fashion-mnist"),
    ("mlp", "default", "mnist"),
    ("price_mlp", "default", "house-prices"),
    ("poem_rnn", "default", "quantangshi"),
]


def _trained_run(architecture: str, preset: str, dataset: str) -> Path | None:
    """The full-profile run if there is one, else the quick one, else None."""
    recipe = get_recipe(architecture, preset)
    for profile in ("full", "quick"):
        run = run_dir_for(recipe, dataset, profile)
        if (run / "model.pt").is_file():
            return run
    return None


def _in_store(name: str) -> bool:
    import bentoml

    try:
        bentoml.models.get(f"{name}:latest")
    except bentoml.exceptions.NotFound:
        return False
    return True


def quickstart(profile: str = "quick", serve: bool = True, host: str = "127.0.0.1", port: int = 3000) -> int:
    for dataset in sorted({d for _, _, d in DEFAULT_MODELS}):
        try:
            print(fetch(dataset))
        except DataMissingError as err:
            print(f"error: {err}")
            return 2
    for architecture, preset, dataset in DEFAULT_MODELS:
        run = _trained_run(architecture, preset, dataset)
        if run is None:
            train(TrainOptions(architecture, preset, dataset, profile=profile))
            run = _trained_run(architecture, preset, dataset)
        else:
            print(f"{architecture}-{preset} on {dataset}: trained model present in {run}")
        assert run is not None
        _, saved = load_run(run)
        name = model_name_for(saved["summary"])
        if _in_store(name):
            print(f"{name}: already in the model store")
        else:
            meta = export_run(run)
            worst = max(meta["parity"]["torchscript"], meta["parity"]["onnxruntime"])
            print(f"{name}: exported as {meta['tag']} (parity max abs {worst:.1e})")
    print()
    print(format_table(load_summaries()))
    if not serve:
        return 0
    print(f"\nserving on http://{host}:{port}  (API docs at /, Ctrl+C stops)")
    command = [sys.executable, "-m", "bentoml", "serve", "serving.service:DlbookService",
               "--host", host, "--port", str(port)]
    os.execvp(command[0], command)
    return 0  # not reached
