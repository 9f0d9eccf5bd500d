"""BentoML's service options (workers, traffic timeout, its access log, tracing, metrics) from our Settings.

The settings themselves, their defaults and reasons are in ``serving.settings``; this module only
translates them into the keyword arguments of ``@bentoml.service``.
"""

from __future__ import annotations

from typing import Any

from serving.routes import TRACED_PATHS
from serving.settings import Settings


def service_options(settings: Settings) -> dict[str, Any]:
    """``@bentoml.service(**service_options(settings))`` for a deployment's settings.

    ``workers``: each worker loads its own models and batches its own requests, so more workers buy
    throughput on more cores at the price of memory and smaller batches. BentoML's own access log
    is off unless ``DLBOOK_BENTOML_ACCESS_LOG=1``: ours (``dlbook.access``, one line per API request
    with its request id, see ``serving.guard``) replaces it. Without ``DLBOOK_TRACING=1`` the API
    paths skip OpenTelemetry: BentoML wraps every request in a span even with no exporter
    configured, a tenth of a small request's CPU in our profile. Without ``DLBOOK_BENTOML_METRICS=1``
    BentoML's metrics middleware is off: it updates several multiprocess counters and histograms
    per request, a third of a small request's CPU in our profile (docs/PERFORMANCE.md); ``/metrics``
    is then answered by our request guard with the ``dlbook_*`` metrics, which cover the same ground.
    Both are BentoML's ``tracing`` and ``metrics`` settings
    (https://docs.bentoml.com/en/latest/reference/bentoml/configurations.html); turn them back on by
    default when a profile shows BentoML's span and metrics middleware no longer cost that much.
    """
    return {
        "workers": settings.workers,
        "traffic": {"timeout": settings.request_timeout_s},
        "logging": {"access": {"enabled": settings.bentoml_access_log}},
        **({} if settings.tracing else {"tracing": {"excluded_urls": TRACED_PATHS}}),
        **({} if settings.bentoml_metrics else {"metrics": {"enabled": False}}),
    }
