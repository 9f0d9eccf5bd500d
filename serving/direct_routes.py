"""The API routes (images, house prices, poems) answered by the request guard itself, past
BentoML's per-request machinery.

Why: BentoML 1.4 runs every request through Starlette routing, its request context, a generic
input path that rebuilds the arguments from the body, and for uploads Starlette's form parser,
which writes each file to a temporary file on disk. Profiled under load (docs/PERFORMANCE.md),
that was most of what separated our service from a bare Starlette + ONNX Runtime endpoint: on a
one-image request the model is the small part.

What does not change: the routes, their schema in ``/docs.json``, the status codes and bodies.
The arguments are validated by the very pydantic model BentoML built from the method's signature
(``APIMethod.input_spec``), so the signature stays the one definition of what a route takes, and
the answer comes from the same service code. The request guard in front still authenticates,
sheds, limits sizes, times, counts and logs every request. Anything else (other routes, other
content types, a worker that has not finished loading) goes to BentoML as before, and
``DLBOOK_DIRECT_ROUTES=0`` sends everything there.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.responses import Response

from serving.multipart_form import FormPart

logger = logging.getLogger("dlbook.serving")

Answer = Callable[..., Awaitable[Response]]


@dataclass(frozen=True)
class DirectRoute:
    """One route: BentoML's input model for it, and the service method that answers it.

    ``upload_field`` names the form field that carries files on a multipart route (its value
    reaches ``answer`` as a list of bytes); a route without one takes JSON bodies.
    """

    spec: type[BaseModel]
    answer: Answer
    upload_field: str | None = None

    def takes(self, content_type: bytes) -> bool:
        media = content_type.split(b";", 1)[0].strip().lower()
        if self.upload_field:
            return media == b"multipart/form-data"
        return media in (b"application/json", b"")


_ROUTES: dict[str, DirectRoute] = {}


def enabled() -> bool:
    """``DLBOOK_DIRECT_ROUTES=0`` turns the direct path off (for comparison, or to rule it out)."""
    return os.environ.get("DLBOOK_DIRECT_ROUTES", "1") != "0"


def install(routes: dict[str, DirectRoute]) -> None:
    """Called by a service once its models are loaded: from then on these paths are answered directly."""
    if enabled():
        _ROUTES.update(routes)


def uninstall() -> None:
    _ROUTES.clear()


def route_for(method: str, path: str, content_type: bytes) -> DirectRoute | None:
    route = _ROUTES.get(path) if method == "POST" else None
    return route if route is not None and route.takes(content_type) else None


def request_timeout_s() -> float:
    """The same budget BentoML enforces on the routes it answers (``DLBOOK_REQUEST_TIMEOUT_S``)."""
    return float(os.environ.get("DLBOOK_REQUEST_TIMEOUT_S", "60"))


def validation_sentence(problems: list) -> str | None:
    """Pydantic's error list (``ValidationError.errors()``, or the ``detail`` of BentoML's 400) as one
    sentence naming each field: ``invalid request: top_k: Input should be a valid integer``."""
    parts = []
    for item in problems[:10]:
        if isinstance(item, dict):
            where = ".".join(str(part) for part in item.get("loc", ())) or "body"
            parts.append(f"{where}: {item.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts) if parts else None


class DirectRequestError(Exception):
    """A body the route cannot take; ``message`` says what to fix."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def arguments(route: DirectRoute, body: bytes, form: list[FormPart] | None) -> dict[str, Any]:
    """The validated keyword arguments for ``route.answer`` from a JSON body or a parsed form."""
    try:
        if route.upload_field is None:
            validated = route.spec.model_validate_json(body)
            return {name: getattr(validated, name) for name in type(validated).model_fields}
        uploads = [part.data for part in form or () if part.name == route.upload_field]
        values: dict[str, str] = {}
        for part in form or ():
            if part.name == route.upload_field:
                continue
            if part.name in values:
                raise DirectRequestError(f"form field {part.name!r} is given more than once; send it once")
            values[part.name] = part.data.decode("utf-8", "replace")
        validated = route.spec.model_validate({**values, route.upload_field: []})
        fields = {name: getattr(validated, name) for name in type(validated).model_fields}
        return {**fields, route.upload_field: uploads}
    except ValidationError as err:
        sentence = validation_sentence(err.errors(include_url=False, include_input=False))
        raise DirectRequestError(sentence or f"invalid request: {err}") from err


async def respond(route: DirectRoute, body: bytes, form: list[FormPart] | None) -> Response | str:
    """The route's answer, or the sentence explaining why the body was refused (a 400).

    Raises ``TimeoutError`` past ``DLBOOK_REQUEST_TIMEOUT_S``; any other failure propagates to the
    caller, which answers 500.
    """
    try:
        kwargs = arguments(route, body, form)
    except DirectRequestError as err:
        return err.message
    async with asyncio.timeout(request_timeout_s()):
        return await route.answer(**kwargs)
