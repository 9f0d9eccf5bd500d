"""Evaluation metrics, in numpy so they mean the same wherever a prediction came from."""

from __future__ import annotations

import math

import numpy as np


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """``[true, predicted]`` counts."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def classification_report(labels: np.ndarray, predictions: np.ndarray, class_names: list[str]) -> dict:
    matrix = confusion_matrix(labels, predictions, len(class_names))
    per_class = matrix.diagonal() / np.maximum(matrix.sum(axis=1), 1)
    return {
        "accuracy": float((labels == predictions).mean()),
        "per_class_accuracy": {name: float(a) for name, a in zip(class_names, per_class, strict=True)},
        "confusion_matrix": matrix.tolist(),
        "n": int(len(labels)),
    }


def log_rmse(predicted_price: np.ndarray, price: np.ndarray) -> float:
    """The textbook's metric: RMSE between log(max(prediction, 1)) and log(price)."""
    return float(np.sqrt(np.mean((np.log(np.maximum(predicted_price, 1.0)) - np.log(price)) ** 2)))


def mean_absolute_error(predicted: np.ndarray, actual: np.ndarray) -> float:
    return float(np.mean(np.abs(predicted - actual)))


def perplexity(total_nll: float, n_tokens: int) -> float:
    """exp of the mean negative log-likelihood (natural log) per predicted token."""
    return math.exp(total_nll / max(n_tokens, 1))
