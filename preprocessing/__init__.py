"""Preprocessing shared by training and serving, defined once and stored with each model.

Nothing here imports torch: serving uses these exact functions on numpy arrays, and training
uses them to build its tensors, so a served model sees inputs prepared by the same code it was
trained on. Each class round-trips through a plain dict that export writes into ``meta.json``.
"""

from preprocessing.features import FeatureSpec, RecordError
from preprocessing.pixels import PixelScaling
from preprocessing.vocab import Vocabulary

__all__ = ["FeatureSpec", "PixelScaling", "RecordError", "Vocabulary"]
