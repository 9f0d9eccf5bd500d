"""Prometheus metrics of our own, exported on BentoML's ``/metrics`` beside its request metrics."""

from __future__ import annotations

import os

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

INFERENCE_SECONDS = Histogram(
    "dlbook_inference_seconds", "Time of one ONNX Runtime call (a whole batch)", ["model", "provider"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2),
)
BATCH_SIZE = Histogram(
    "dlbook_batch_size", "Rows per ONNX Runtime call", ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
REQUESTS = Counter("dlbook_requests_total", "API requests by endpoint and model", ["endpoint", "model"])
REQUEST_SECONDS = Histogram(
    "dlbook_request_seconds", "Time from request to the end of the answer, by path and status", ["path", "status"],
    buckets=(0.001, 0.002, 0.004, 0.006, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1,
             2, 5, 10, 30),
)
SHED = Counter("dlbook_shed_total", "Requests refused with 503 because the worker was at capacity", ["path"])
ERRORS = Counter("dlbook_request_errors_total", "Refused or failed requests", ["endpoint", "status"])
POEM_CHARACTERS = Counter("dlbook_poem_characters_total", "Characters generated (marks included)", ["model"])
POEM_TOKENS_PER_SECOND = Gauge("dlbook_poem_tokens_per_second", "Tokens per second of the last decoding step",
                               ["model"])


def batch_observer(model: str, provider: str):
    """A callback for the batchers: one call per ORT run with its rows and seconds."""
    inference = INFERENCE_SECONDS.labels(model, provider)
    batch = BATCH_SIZE.labels(model)

    def observe(rows: int, seconds: float) -> None:
        inference.observe(seconds)
        batch.observe(rows)

    return observe


def poem_step_observer(model: str, provider: str):
    inference = INFERENCE_SECONDS.labels(model, provider)
    batch = BATCH_SIZE.labels(model)
    characters = POEM_CHARACTERS.labels(model)
    rate = POEM_TOKENS_PER_SECOND.labels(model)

    def observe(rows: int, seconds: float) -> None:
        inference.observe(seconds)
        batch.observe(rows)
        characters.inc(rows)
        if seconds > 0:
            rate.set(rows / seconds)

    return observe


def exposition() -> tuple[bytes, str]:
    """The text for ``/metrics``: every worker's metrics when BentoML runs several (multiprocess mode).

    Histogram samples are put in bucket, count, sum order per label set, as strict parsers expect
    (the multiprocess collector emits sum and count first,
    https://github.com/prometheus/client_python/issues/1147; the reordering can go once a
    ``prometheus_client`` release emits buckets first there).
    """
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    families = list(registry.collect())
    order = {"_bucket": 0, "_count": 1, "_sum": 2}
    for family in families:
        if family.type == "histogram":
            family.samples.sort(key=lambda s: (
                tuple(sorted((k, v) for k, v in s.labels.items() if k != "le")),
                order.get(s.name[len(family.name):], 3), float(s.labels.get("le", "inf"))))

    class _Fixed:
        def collect(self):
            return families

    fixed = CollectorRegistry()
    fixed.register(_Fixed())
    return generate_latest(fixed), CONTENT_TYPE_LATEST
