"""The API's one route table: every route's path, the handler that answers it, the models it needs,
whether the request guard answers it directly, and what it takes.

Everything that lists routes is derived from ``ROUTES``: the ``@api`` decorator puts each service
method on its path (so BentoML's OpenAPI schema at ``/docs.json`` shows exactly these), the request
guard labels metrics and checks multipart forms by it (``API_PATHS``, ``form_fields``), the direct
path is built from the routes marked ``fast`` (``serving.direct_routes``), and BentoML's tracing
exclusions come from it (``TRACED_PATHS``, ``serving.config``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import bentoml

from serving.errors import answers_refusals

JSON_TYPES = (b"application/json", b"")  # a JSON route also takes a body sent without a content type
MULTIPART_TYPES = (b"multipart/form-data",)


@dataclass(frozen=True)
class Route:
    """One API route.

    ``handler`` is the service method on ``path``; ``task`` the kind of model it needs (``None``:
    none). ``fast``: once the worker has loaded its models the request guard answers it itself,
    calling ``fast_handler`` (default: ``handler`` undecorated); a multipart route's
    ``upload_field`` names the form field whose files reach that method as bytes, and
    ``form_fields`` every field its form may hold. ``pixel_json``: the usual form of its JSON body
    (28×28 whole numbers) is decoded by ``serving.pixel_json`` before the pydantic model sees it.
    """

    path: str
    handler: str
    task: str | None
    fast: bool
    upload_field: str | None = None
    form_fields: frozenset[str] = frozenset()
    fast_handler: str | None = None
    pixel_json: bool = False

    @property
    def endpoint(self) -> str:
        """The name handlers count requests and refusals under (``classify``)."""
        return self.path.lstrip("/")

    @property
    def content_types(self) -> tuple[bytes, ...]:
        """The media types the direct path takes; any other goes to BentoML."""
        return MULTIPART_TYPES if self.upload_field else JSON_TYPES

    def takes(self, content_type: bytes) -> bool:
        return content_type.split(b";", 1)[0].strip().lower() in self.content_types


ROUTES: tuple[Route, ...] = (
    Route("/classify", "classify", "image", fast=True, upload_field="images",
          form_fields=frozenset({"images", "model", "top_k", "return_frame"}), fast_handler="classify_uploads"),
    Route("/classify_pixels", "classify_pixels", "image", fast=True, pixel_json=True),
    Route("/predict_price", "predict_price", "price", fast=True),
    Route("/generate_poem", "generate_poem", "poem", fast=True),
    Route("/generate_poem_stream", "generate_poem_stream", "poem", fast=True),
    Route("/models", "models", None, fast=False),
)

BY_PATH: dict[str, Route] = {route.path: route for route in ROUTES}
BY_HANDLER: dict[str, Route] = {route.handler: route for route in ROUTES}
API_PATHS = frozenset(BY_PATH)
# Per multipart route: the fields its form may hold, and those that must be uploaded files.
FORM_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    route.path: (route.form_fields, frozenset({route.upload_field})) for route in ROUTES if route.upload_field}
# Skipped by BentoML's OpenTelemetry spans unless DLBOOK_TRACING=1 (matched as substrings).
TRACED_PATHS = [route.path for route in ROUTES]


def route_label(path: str) -> str:
    """A metric label for ``path``: the route itself, or ``other`` (scanners must not grow our metrics)."""
    return path if path in API_PATHS else "other"


def api(func: Callable[..., Any]) -> Any:
    """``@bentoml.api`` on the path ``ROUTES`` gives this method, with its ``ApiError`` answered as JSON
    (``serving.errors.answers_refusals``; an async handler only, ``/models`` refuses nothing)."""
    route = BY_HANDLER[func.__name__]
    return bentoml.api(route=route.path)(answers_refusals(func) if inspect.iscoroutinefunction(func) else func)
