"""The API routes (images, house prices, poems) answered by the request guard itself, past
BentoML's per-request machinery.

Why: BentoML 1.4 runs every request through Starlette routing, its request context, a generic
input path that rebuilds the arguments from the body, and for uploads Starlette's form parser,
which writes each file to a temporary file on disk. Profiled under load (docs/PERFORMANCE.md),
that was most of what separated our service from a bare Starlette + ONNX Runtime endpoint: on a
one-image request the model is the small part. Delete this module (``DLBOOK_DIRECT_ROUTES=0`` shows
the difference) when BentoML's own request path is as fast in ``loadtests/http_bench.py``: the
per-request costs are in ``api_endpoint`` of
https://github.com/bentoml/BentoML/blob/v1.4.39/src/_bentoml_impl/server/app.py.

What does not change: the routes, their schema in ``/docs.json``, the status codes and bodies.
The arguments are validated by the very pydantic model BentoML built from the method's signature
(``APIMethod.input_spec``), so the signature stays the one definition of what a route takes, and
the answer comes from the same service code. The request guard in front still authenticates,
sheds, limits sizes, times, counts and logs every request. Anything else (other routes, other
content types, a worker that has not finished loading) goes to BentoML as before, and
``DLBOOK_DIRECT_ROUTES=0`` sends everything there. Which routes are direct, and what content types
they take, is the route table's to say (``serving.routes``); this module holds the installed
handlers and turns a body into their arguments.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.responses import Response

from serving import pixel_json
from serving.errors import validation_sentence
from serving.multipart_form import FormPart
from serving.pixel_json import PixelDecoder
from serving.routes import JSON_TYPES, MULTIPART_TYPES, Route

logger = logging.getLogger("dlbook.serving")

Answer = Callable[..., Awaitable[Response]]


@dataclass(frozen=True)
class DirectRoute:
    """One route: BentoML's input model for it, and the service method that answers it.

    ``upload_field`` names the form field that carries files on a multipart route (its value
    reaches ``answer`` as a list of bytes); a route without one takes JSON bodies. ``endpoint``: the
    name the handler's refusals are counted under (``Route.endpoint``). ``fast_decode``: a decoder for
    the usual form of a JSON body (``serving.pixel_json``) tried before ``spec``; it answers ``None``
    for anything else, which ``spec`` then validates.
    """

    spec: type[BaseModel]
    answer: Answer
    upload_field: str | None = None
    endpoint: str = ""
    fast_decode: PixelDecoder | None = None

    @classmethod
    def for_route(cls, route: Route, spec: type[BaseModel], answer: Answer) -> DirectRoute:
        fast_decode = pixel_json.decoder_for(spec) if route.pixel_json else None
        return cls(spec, answer, route.upload_field, route.endpoint, fast_decode)

    def takes(self, content_type: bytes) -> bool:
        media = content_type.split(b";", 1)[0].strip().lower()
        return media in (MULTIPART_TYPES if self.upload_field else JSON_TYPES)


_ROUTES: dict[str, DirectRoute] = {}


def install(routes: dict[str, DirectRoute]) -> None:
    """Called by a service once its models are loaded (unless ``DLBOOK_DIRECT_ROUTES=0``): from then
    on these paths are answered directly."""
    _ROUTES.update(routes)


def uninstall() -> None:
    _ROUTES.clear()


def route_for(method: str, path: str, content_type: bytes) -> DirectRoute | None:
    route = _ROUTES.get(path) if method == "POST" else None
    return route if route is not None and route.takes(content_type) else None


class DirectRequestError(Exception):
    """A body the route cannot take; ``message`` says what to fix."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# The key under which ``arguments`` hands over a whole request model: the handler takes it positionally.
REQUEST = "__request__"


def arguments(route: DirectRoute, body: bytes, form: list[FormPart] | None) -> dict[str, Any]:
    """The validated keyword arguments for ``route.answer`` from a JSON body or a parsed form; for a
    handler that takes its request model itself (``handler(self, request: PoemRequest, /)``, BentoML's
    root input, see ``serving.request_models``), that model under ``REQUEST``."""
    try:
        if route.upload_field is None:
            if route.fast_decode is not None and (fast := route.fast_decode(body)) is not None:
                return fast
            validated = route.spec.model_validate_json(body)
            if getattr(route.spec, "__root_input__", False):
                return {REQUEST: validated}
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


async def respond(route: DirectRoute, body: bytes, form: list[FormPart] | None, timeout_s: float) -> Response | str:
    """The route's answer, or the sentence explaining why the body was refused (a 400).

    Raises ``TimeoutError`` past ``timeout_s`` (``DLBOOK_REQUEST_TIMEOUT_S``, the budget BentoML
    enforces on the routes it answers), and whatever the handler raises (``ApiError`` for a
    refusal); the request guard turns those into the answer (``serving.errors.error_answer``).
    """
    try:
        kwargs = arguments(route, body, form)
    except DirectRequestError as err:
        return err.message
    async with asyncio.timeout(timeout_s):
        if REQUEST in kwargs:
            return await route.answer(kwargs[REQUEST])
        return await route.answer(**kwargs)
