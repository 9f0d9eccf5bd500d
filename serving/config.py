"""Service settings from the environment, with the defaults documented in the README."""

from __future__ import annotations

import os
from dataclasses import dataclass


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)))


def _names(name: str) -> list[str] | None:
    value = os.environ.get(name, "").strip()
    return [v.strip() for v in value.split(",") if v.strip()] or None


@dataclass(frozen=True)
class ServingLimits:
    max_images: int = 64  # images per request
    max_records: int = 1000  # house records per request
    max_poems: int = 8  # poems per request
    generation_timeout_s: float = 30.0
    max_batch: int = 256  # rows per ONNX Runtime call (images, houses)
    max_poem_batch: int = 64  # live sequences per decoding step
    inline_rows: int = 16  # image/house batches this small run on the event loop (see serving.batching)
    stream_flush_ms: float = 20.0  # a poem stream writes what it has at most this often (first character at once)

    @classmethod
    def from_env(cls) -> ServingLimits:
        return cls(
            max_images=_int("DLBOOK_MAX_IMAGES", cls.max_images),
            max_records=_int("DLBOOK_MAX_RECORDS", cls.max_records),
            max_poems=_int("DLBOOK_MAX_POEMS", cls.max_poems),
            generation_timeout_s=float(os.environ.get("DLBOOK_GENERATION_TIMEOUT_S", cls.generation_timeout_s)),
            max_batch=_int("DLBOOK_MAX_BATCH", cls.max_batch),
            max_poem_batch=_int("DLBOOK_MAX_POEM_BATCH", cls.max_poem_batch),
            inline_rows=_int("DLBOOK_INLINE_ROWS", cls.inline_rows),
            stream_flush_ms=float(os.environ.get("DLBOOK_STREAM_FLUSH_MS", cls.stream_flush_ms)),
        )


def models_for(task: str) -> list[str] | None:
    """``DLBOOK_IMAGE_MODELS=fashion-lenet,digits-mlp`` restricts what a service loads (default: all)."""
    return _names(f"DLBOOK_{task.upper()}_MODELS")


def default_model(task: str, fallback: str) -> str:
    return os.environ.get(f"DLBOOK_DEFAULT_{task.upper()}_MODEL", fallback)


def log_level() -> str:
    """``DLBOOK_LOG_LEVEL`` for our loggers (default INFO: one access line per API request, refusals
    with their reasons); WARNING keeps only failures. BentoML's root logger stays at WARNING."""
    return os.environ.get("DLBOOK_LOG_LEVEL", "INFO").upper()


# Without DLBOOK_TRACING=1 these paths skip OpenTelemetry: BentoML wraps every request in a span
# even with no exporter configured, a tenth of a small request's CPU in our profile.
TRACED_PATHS = ["/classify", "/predict_price", "/generate_poem", "/models"]  # matched as substrings


def bentoml_metrics() -> bool:
    """``DLBOOK_BENTOML_METRICS=1`` keeps BentoML's own request metrics and ``/metrics`` route.

    Off by default: its middleware updates several multiprocess counters and histograms per request,
    a third of a small request's CPU in our profile (docs/PERFORMANCE.md). ``/metrics`` is then
    served by our request guard with the ``dlbook_*`` metrics, which cover the same ground
    (``dlbook_request_seconds`` by route and status, requests, errors, shed load, batches).
    """
    return os.environ.get("DLBOOK_BENTOML_METRICS", "0") == "1"


def service_options() -> dict:
    """BentoML service settings that operators tune per deployment, from the environment.

    ``DLBOOK_WORKERS``: worker processes per service (a number or ``cpu_count``; default 1). Each
    worker loads its own models and batches its own requests, so more workers buy throughput on
    more cores at the price of memory and smaller batches. BentoML's own access log is off unless
    ``DLBOOK_BENTOML_ACCESS_LOG=1`` (it adds trace ids): ours (``dlbook.access``, one line per API
    request with its request id, see ``serving.http_errors``) replaces it. ``DLBOOK_TRACING=1``
    keeps BentoML's OpenTelemetry spans on the API paths (configure an exporter with BentoML's
    ``tracing`` settings); without it they are skipped.
    """
    workers = os.environ.get("DLBOOK_WORKERS", "1").strip()
    return {
        "workers": int(workers) if workers.isdigit() else workers,
        "traffic": {"timeout": float(os.environ.get("DLBOOK_REQUEST_TIMEOUT_S", "60"))},
        "logging": {"access": {"enabled": os.environ.get("DLBOOK_BENTOML_ACCESS_LOG", "0") == "1"}},
        **({} if os.environ.get("DLBOOK_TRACING", "0") == "1" else {"tracing": {"excluded_urls": TRACED_PATHS}}),
        **({} if bentoml_metrics() else {"metrics": {"enabled": False}}),
    }
