"""Every trainable preset: the textbooks' recipes (``../shared/RECIPES.md`` beside a development
checkout; the books' figures beside ours in ``docs/RESULTS.md``) and our stronger defaults.

A recipe is data, not code: which architecture and config, which data, how pixels are scaled, the
optimiser phases, batch size and stopping rule. ``python -m training train ARCH --preset NAME``
runs one; ``python -m training presets`` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from models import LeNetConfig, MLPConfig, PoemRNNConfig, PriceMLPConfig
from preprocessing import PixelScaling


@dataclass(frozen=True)
class Phase:
    """A stretch of training with one optimiser (MMIDS 8.5 switches from SGD to Adam)."""

    epochs: int
    optimizer: str = "adam"  # sgd | adam | adamw
    lr: float = 1e-3
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | cosine (over the phase's steps)
    warmup: float = 0.0  # cosine only: linear warmup over this fraction of the phase's steps first


@dataclass(frozen=True)
class Recipe:
    architecture: str  # mlp | lenet | price_mlp | poem_rnn
    preset: str
    task: str  # image | price | poem
    datasets: tuple[str, ...]  # the first is the default
    config: Any
    phases: tuple[Phase, ...]
    batch_size: int
    source: str
    # None = fit Normalize(mean, std) on the training images; images only
    scaling: PixelScaling | None = None
    patience: int | None = None  # early stopping on the validation metric; None trains every epoch
    max_steps: int | None = None  # stop after this many optimiser steps (the 尚硅谷 TwoLayerNet recipe)
    augment: str = "none"  # none | shift | shift_flip | robust | robust_plain | robust_clutter | robust_light
    # images: data set → the model's input conditioning (models/conditioning.py); a data set not named: none
    conditioning: dict[str, str] = field(default_factory=dict)
    # The quick profile's budget where this recipe needs another than its task's (training/train.py QUICK):
    # "limit" and "epochs", and any other key replaces that field of the recipe for the quick profile
    quick: dict[str, Any] = field(default_factory=dict)
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    log_skewed: bool = False  # price: log1p skewed numeric columns
    drop_outliers: bool = False  # price: drop the two huge cheap houses from the training part
    window: int | None = None  # poem: train on windows of this many characters (the book's 24)
    min_count: int = 1  # poem: characters rarer than this become <unk>
    book_figures: dict[str, float] = field(default_factory=dict)  # data set → test accuracy (%)
    notes: str = ""

    @property
    def name(self) -> str:
        return f"{self.architecture}-{self.preset}"

    @property
    def epochs(self) -> int:
        return sum(p.epochs for p in self.phases)

    def with_epochs(self, epochs: int) -> Recipe:
        """Cap the total epochs, shortening phases in order (each keeps at least one epoch)."""
        if epochs >= self.epochs:
            return self
        phases, left = [], epochs
        for i, p in enumerate(self.phases):
            remaining_phases = len(self.phases) - i - 1
            n = max(1, min(p.epochs, left - remaining_phases))
            phases.append(replace(p, epochs=n))
            left -= n
        return replace(self, phases=tuple(phases))


MNIST_NORMALIZE = PixelScaling("normalize", 0.1307, 0.3081)
UNIT = PixelScaling("unit")
RAW = PixelScaling("raw")

RECIPES: dict[str, Recipe] = {}


def _add(recipe: Recipe) -> None:
    RECIPES[recipe.name] = recipe


# ---- image models ------------------------------------------------------------------------
_add(Recipe(
    "mlp", "softmax", "image", ("fashion-mnist", "mnist"),
    MLPConfig(hidden=(), dropout=(), init="normal_0.01"),
    (Phase(10, "sgd", 0.1),), 256, "d2l / backprop notes: softmax regression", scaling=UNIT,
    book_figures={"fashion-mnist": 82.57},
    notes="Linear(784,10), N(0,0.01) init, SGD 0.1, batch 256, 10 epochs, cross-entropy.",
))
_add(Recipe(
    "mlp", "book", "image", ("mnist", "fashion-mnist"),
    MLPConfig(hidden=(50, 100), dropout=(), activation="sigmoid"),
    (Phase(20, "sgd", 0.1),), 100, "尚硅谷 2.4 (net) + 3.5 TwoLayerNet (training recipe)", scaling=UNIT,
    max_steps=10_000,
    notes="784-50-100-10 sigmoid. The book ships pretrained weights, so the training recipe is the "
          "book's own TwoLayerNet one (3.5): SGD 0.1, batch 100, 10,000 iterations. Our choice.",
))
_add(Recipe(
    "mlp", "deep", "image", ("mnist",),
    MLPConfig(hidden=(520, 320, 240, 120), dropout=(0.2,)),
    (Phase(5, "sgd", 0.01, momentum=0.5),), 32, "PyTorch 从入门到精通 5.3", scaling=MNIST_NORMALIZE,
    patience=3, book_figures={"mnist": 98.06},
    notes="784-520-320-240-120-10 ReLU, dropout 0.2 after layer 1, Normalize(0.1307, 0.3081), "
          "SGD 0.01 momentum 0.5, batch 32, 5 epochs, early stopping patience 3.",
))
_add(Recipe(
    "mlp", "leaky512", "image", ("mnist",),
    MLPConfig(hidden=(512,), dropout=(), activation="leaky_relu"),
    (Phase(5, "adam", 1e-3),), 256, "PyTorch 从入门到精通 5.2 (NumPy MLP)", scaling=UNIT,
    book_figures={"mnist": 93.59},
    notes="784-512 LeakyReLU(0.1)-10, Adam 1e-3, batch 256, 5 epochs.",
))
_add(Recipe(
    "mlp", "fashion256", "image", ("fashion-mnist",),
    MLPConfig(hidden=(256,), dropout=(), init="normal_0.01"),
    (Phase(5, "sgd", 0.5),), 256, "backprop notes: Fashion MLP", scaling=UNIT,
    book_figures={"fashion-mnist": 84.6},
    notes="784-256-10 ReLU, N(0,0.01), SGD 0.5, batch 256, 5 epochs.",
))
_add(Recipe(
    "mlp", "mmids32", "image", ("fashion-mnist",),
    MLPConfig(hidden=(32,), dropout=(), activation="sigmoid"),
    (Phase(10, "sgd", 1e-3), Phase(10, "adam", 1e-3)), 32, "MMIDS 8.5", scaling=UNIT,
    book_figures={"fashion-mnist": 87.1},
    notes="784-32 sigmoid-10, batch 32, seed 42: SGD 1e-3 for 10 epochs (book: 64.0%), then Adam 10.",
))
_add(Recipe(
    "mlp", "default", "image", ("mnist", "fashion-mnist"),
    MLPConfig(hidden=(1024, 512), dropout=(0.3, 0.3), batch_norm=True),
    (Phase(30, "adamw", 1e-3, weight_decay=1e-4, schedule="cosine"),), 128, "ours",
    patience=8, augment="robust_light", label_smoothing=0.05,
    conditioning={"mnist": "background", "fashion-mnist": "stretch"},
    notes="784-1024-512-10 BN-ReLU-dropout, Normalize fitted on train, AdamW + cosine; augmented on the fly "
          "(rotation, scale, shear, shift, elastic, stroke thickness, blur, noise; flips for clothes); input "
          "conditioned in the graph (contrast stretch; digits: background removed).",
))
_add(Recipe(
    "lenet", "book", "image", ("fashion-mnist", "mnist"),
    LeNetConfig(channels=(6, 16), fc=(120, 84), activation="sigmoid", pool="avg", batch_norm=False,
                dropout=0.0, init="xavier_uniform"),
    (Phase(20, "sgd", 0.9),), 256, "尚硅谷 8.4", scaling=RAW,
    notes="The textbook LeNet exactly: sigmoid, AvgPool, padding 2, Xavier uniform, raw 0-255 input, "
          "SGD 0.9, batch 256, 20 epochs.",
))
_add(Recipe(
    "lenet", "default", "image", ("fashion-mnist", "mnist"),
    LeNetConfig(),
    (Phase(30, "adamw", 2e-3, weight_decay=5e-4, schedule="cosine"),), 128, "ours",
    patience=8, augment="robust", label_smoothing=0.05,
    quick={"limit": None, "epochs": 4, "augment": "robust_plain"},
    conditioning={"mnist": "background", "fashion-mnist": "stretch"},
    notes="LeNet shape with 32/64 channels, BatchNorm, ReLU, MaxPool, dropout 0.3; AdamW + cosine; "
          "augmented on the fly (rotation, scale, shear, shift, elastic, stroke thickness, blur, noise; for "
          "digits also pixel jitter and frosted glass, hollow strokes, a grey background, camera shake and marks "
          "over the digit: lines, scribbles, dots, an inverted band, splashes, salt and pepper; horizontal flips "
          "for clothes only); input conditioned in the graph (contrast stretch; digits: background removed). "
          "Quick profile: every training image, 4 epochs, digits without the shake, glass and marks.",
))

# ---- house prices ------------------------------------------------------------------------
_add(Recipe(
    "price_mlp", "book", "price", ("house-prices",),
    PriceMLPConfig(hidden=(128,), dropout=0.2),
    (Phase(200, "adam", 0.1),), 64, "尚硅谷 7.6",
    notes="Mean-impute + standardise, 'NaN' + one-hot (unseen ignored), Linear-BN-ReLU-Dropout-Linear, "
          "Xavier normal, Adam 0.1, batch 64, 200 epochs, log-RMSE (trained on log price).",
))
_add(Recipe(
    "price_mlp", "default", "price", ("house-prices",),
    PriceMLPConfig(hidden=(256,), dropout=0.3),
    (Phase(300, "adamw", 1e-3, weight_decay=1e-2, schedule="cosine"),), 64, "ours",
    patience=60, log_skewed=True, drop_outliers=True,
    notes="log1p of skewed numeric columns, outliers (GrLivArea > 4000, price < 300k) dropped from "
          "the training part, wider net, AdamW + cosine, early stopping on a validation slice.",
))

# ---- poems -------------------------------------------------------------------------------
_add(Recipe(
    "poem_rnn", "book", "poem", ("tang300",),
    PoemRNNConfig(embedding_dim=256, hidden_size=512, num_layers=2, cell="rnn", dropout=0.0),
    (Phase(20, "adam", 1e-3),), 32, "尚硅谷 9.4", window=24, grad_clip=1.0,
    notes="Embedding 256 → nn.RNN 512 × 2 → Linear, Adam 1e-3, batch 32, 20 epochs, 24-character "
          "windows of 唐诗三百首; fixed: batch_first, saved vocabulary, short poems kept, punctuation "
          "kept as tokens, <unk> never sampled, 5% held out.",
))
_add(Recipe(
    "poem_rnn", "default", "poem", ("quantangshi",),
    PoemRNNConfig(embedding_dim=256, hidden_size=512, num_layers=2, cell="gru", dropout=0.25),
    (Phase(20, "adamw", 2e-3, weight_decay=1e-2, schedule="cosine"),), 128, "ours",
    patience=3, grad_clip=1.0, min_count=2,
    quick={
        # What `./dlbook up` trains on a CPU: about 3 minutes on 2 cores (docs/TRAINING.md, "The quick
        # poem profile"). One pass costs the softmax over the vocabulary for every character, so the
        # model is small; a high peak learning rate is what makes its 314 steps count.
        "limit": 10_000, "epochs": 2,
        "config": PoemRNNConfig(embedding_dim=128, hidden_size=256, num_layers=1, cell="gru", dropout=0.0),
        "phases": (Phase(2, "adamw", 1e-2, weight_decay=1e-2, schedule="cosine", warmup=0.05),),
        "batch_size": 64,
        "notes": "Quick profile: GRU 1 × 256 (embedding 128, no dropout) on the first 10,000 training poems of "
                 "the regular 全唐诗, 2 epochs of batch 64, AdamW 1e-2 with 5% linear warmup then cosine.",
    },
    notes="GRU 2 × 512 on whole regular poems of the simplified 全唐诗 with <bos>/<eos>, AdamW + cosine.",
))


def get_recipe(architecture: str, preset: str) -> Recipe:
    key = f"{architecture}-{preset}"
    if key not in RECIPES:
        options = sorted(r.preset for r in RECIPES.values() if r.architecture == architecture)
        raise KeyError(f"no preset {preset!r} for {architecture!r}; available: {options}")
    return RECIPES[key]
