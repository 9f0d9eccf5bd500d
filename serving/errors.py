"""Every refusal and failure answered in one shape: ``{"error", "status", "request_id"}``.

A handler refuses a request by raising :class:`ApiError` (status and a message that says what to fix);
:func:`error_answer` is the one place that turns an exception into the JSON answer, counted in
``dlbook_request_errors_total`` and logged with the request id. The request guard calls it on the
direct path, ``answers_refusals`` (applied by ``serving.routes.api``) on BentoML's.

BentoML 1.4 answers its own 4xx exceptions with a JSON *list*, a failed validation with pydantic's
error list, and logs a client's malformed body as a server error with a traceback (``log_exception``
in ``api_endpoint_wrapper``,
https://github.com/bentoml/BentoML/blob/v1.4.39/src/_bentoml_impl/server/app.py);
:func:`flatten_validation_errors` and :class:`ClientErrorLogFilter` bring those into the same shape
and keep them out of the error log. Delete them when BentoML answers 4xx with one JSON object that
names the field and logs client errors below ERROR (check ``api_endpoint_wrapper`` after an upgrade;
``tests/test_direct_routes.py`` and ``tests/test_http_errors.py`` show whether the answers still match).
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.responses import JSONResponse

from serving.metrics import ERRORS

logger = logging.getLogger("dlbook.serving")

# The id of the request being handled (set by the request guard), for refusals raised deep inside a handler.
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("dlbook_request_id", default="")

REQUEST_TIMEOUT = ("the request took longer than DLBOOK_REQUEST_TIMEOUT_S; send fewer items per request or retry "
                   "when the server is less busy")
INTERNAL = "internal error while answering; it is logged with this request id"


class ApiError(Exception):
    """A request we refuse: ``status`` 4xx (or 503) and a message that says what to fix."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def refusal(message: str, status: int, endpoint: str) -> dict[str, Any]:
    """The one shape of every refusal: counted, logged with a request id, and returned as a body."""
    ERRORS.labels(endpoint, str(status)).inc()
    request_id = REQUEST_ID.get() or uuid.uuid4().hex[:16]
    logger.info("refused %s with %d [request %s]: %s", endpoint, status, request_id, message)
    return {"error": message, "status": status, "request_id": request_id}


def error_response(message: str, status: int, endpoint: str) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(refusal(message, status, endpoint), status_code=status, headers=headers)


def error_answer(error: Exception, endpoint: str) -> JSONResponse:
    """The answer to ``error`` raised while answering ``endpoint``: an ``ApiError`` its own status and
    message, a ``TimeoutError`` (the request's budget ran out) 504, anything else 500, logged in full."""
    if isinstance(error, ApiError):
        return error_response(error.message, error.status, endpoint)
    if isinstance(error, TimeoutError):
        return error_response(REQUEST_TIMEOUT, 504, endpoint)
    logger.error("%s failed [request %s]", endpoint, REQUEST_ID.get(), exc_info=error)
    return error_response(INTERNAL, 500, endpoint)


def answers_refusals(func: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """``func`` (an async handler) with its ``ApiError`` answered as JSON, for BentoML's request path.

    The direct path calls the undecorated handler (``__wrapped__``) and answers errors itself, so this
    wrapper's extra coroutine is only on the path that is slow anyway. The refusal is counted under
    the handler's name (``classify``, ``predict_price``…)."""
    endpoint = func.__name__

    @functools.wraps(func)
    async def answered(*args: Any, **kwargs: Any) -> Any:
        try:
            return await func(*args, **kwargs)
        except ApiError as err:
            return error_answer(err, endpoint)

    return answered


def validation_sentence(problems: list) -> str | None:
    """Pydantic's error list (``ValidationError.errors()``, or the ``detail`` of BentoML's 400) as one
    sentence naming each field: ``invalid request: top_k: Input should be a valid integer``."""
    parts = []
    for item in problems[:10]:
        if isinstance(item, dict):
            where = ".".join(str(part) for part in item.get("loc", ())) or "body"
            parts.append(f"{where}: {item.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts) if parts else None


def describe_validation_error(payload: dict) -> str | None:
    """BentoML's pydantic 400 (``{"error", "detail": [...]}``) as one sentence naming each field."""
    detail = payload.get("detail")
    return validation_sentence(detail) if isinstance(detail, list) else None


def flatten_validation_errors(send: Callable[[dict], Awaitable[None]], endpoint: str) -> Callable:
    """``send`` with BentoML's 400 validation bodies rewritten into our ``{"error", "status", "request_id"}``."""
    held: dict = {}

    async def wrapped(message: dict) -> None:
        if message["type"] == "http.response.start" and message["status"] == 400:
            held["start"], held["body"] = message, b""
            return
        if "start" not in held:
            await send(message)
            return
        held["body"] += message.get("body", b"")
        if message.get("more_body", False):
            return
        body = held["body"]
        try:
            sentence = describe_validation_error(json.loads(body))
        except (ValueError, AttributeError):
            sentence = None
        if sentence:
            body = json.dumps(refusal(sentence, 400, endpoint)).encode()
        headers = [(k, v) for k, v in held["start"].get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**held["start"], "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return wrapped


class ClientErrorLogFilter(logging.Filter):
    """Drops BentoML's ERROR-with-traceback log of a request that failed *input* validation.

    BentoML logs a client's malformed body (bad JSON, a string where a number belongs) as a server
    error with a full traceback, so alerts on ERROR lines would fire on client mistakes. The client
    gets a 400 and our own log has the refusal, with its reason and request id, at INFO. Failures of
    our code (5xx) are still logged in full.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is None:
            return True
        from bentoml.exceptions import BentoMLException
        from pydantic import ValidationError

        if isinstance(error, ValidationError):
            return False
        status = getattr(getattr(error, "error_code", None), "value", 500)
        return not (isinstance(error, BentoMLException) and 400 <= status < 500)


def quiet_client_errors() -> None:
    """Install :class:`ClientErrorLogFilter` on the logger BentoML reports request failures with (once)."""
    bentoml_logger = logging.getLogger("bentoml._internal.server.http_app")
    if not any(isinstance(f, ClientErrorLogFilter) for f in bentoml_logger.filters):
        bentoml_logger.addFilter(ClientErrorLogFilter())
