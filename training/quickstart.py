"""``./dlbook up``: get the data, train each default model that has no run yet, then serve.

Export (ONNX + TorchScript into the BentoML store) and the HTTP services are later milestones; until
they land this stops after training and says so rather than pretending to serve.
"""

from __future__ import annotations

from training.datasets.sources import DataMissingError
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


def _has_model(architecture: str, preset: str, dataset: str) -> bool:
    recipe = get_recipe(architecture, preset)
    return any((run_dir_for(recipe, dataset, p) / "model.pt").is_file() for p in ("full", "quick"))


def quickstart(profile: str = "quick") -> int:
    for dataset in sorted({d for _, _, d in DEFAULT_MODELS}):
        try:
            print(fetch(dataset))
        except DataMissingError as err:
            print(f"error: {err}")
            return 2
    for architecture, preset, dataset in DEFAULT_MODELS:
        if _has_model(architecture, preset, dataset):
            print(f"{architecture}-{preset} on {dataset}: trained model present, skipping")
            continue
        train(TrainOptions(architecture, preset, dataset, profile=profile))
    print()
    print(format_table(load_summaries()))
    print("\nExport and serving are not built yet (issues #3 and #4); the trained runs are under runs/.")
    return 0
