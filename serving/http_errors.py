"""4xx answers with a flat ``{"error": ...}`` body, and a guard that checks requests before parsing.

BentoML 1.4 answers its own 4xx exceptions with a JSON *list*, has no request-size limit, answers a
file under an unknown multipart field with 500, and treats a *text* value in a file field as a URL
to download. So we return our errors as responses, and a small ASGI middleware in front of the app
refuses oversized bodies (413) and multipart parts that are not what the endpoint takes (400),
sheds load beyond what a worker can answer in time (503 with Retry-After), and gives every request
an id that appears in its log line, its error body and its ``X-Request-ID`` header.
"""

from __future__ import annotations

import contextvars
import hmac
import json
import logging
import os
import re
import time
import uuid

from starlette.responses import JSONResponse

from serving import direct_routes
from serving.admission import LoopLag, queue_budget_s
from serving.config import bentoml_metrics
from serving.metrics import ERRORS, REQUEST_SECONDS, SHED, exposition
from serving.multipart_form import FormError, FormPart, is_multipart, parse_form

logger = logging.getLogger("dlbook.serving")
access_logger = logging.getLogger("dlbook.access")

# The id of the request being handled, for refusals raised deep inside an endpoint.
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("dlbook_request_id", default="")
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


API_PATHS = frozenset({"/classify", "/classify_pixels", "/predict_price", "/generate_poem", "/generate_poem_stream",
                       "/models"})


def route_label(path: str) -> str:
    """A metric label for ``path``: the route itself, or ``other`` (scanners must not grow our metrics)."""
    return path if path in API_PATHS else "other"


def request_id_for(headers: dict[bytes, bytes]) -> str:
    """The caller's ``X-Request-ID`` when it is a sane token (so traces join up), else a fresh one."""
    supplied = headers.get(b"x-request-id", b"").decode("latin-1")
    return supplied if _CLIENT_ID.fullmatch(supplied) else uuid.uuid4().hex[:16]


class ApiError(Exception):
    """A request we refuse: ``status`` 4xx and a message that says what to fix."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def refusal(message: str, status: int, endpoint: str) -> dict:
    """The one shape of every refusal: counted, logged with a request id, and returned as a body."""
    ERRORS.labels(endpoint, str(status)).inc()
    request_id = REQUEST_ID.get() or uuid.uuid4().hex[:16]
    logger.info("refused %s with %d [request %s]: %s", endpoint, status, request_id, message)
    return {"error": message, "status": status, "request_id": request_id}


def error_response(message: str, status: int, endpoint: str) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(refusal(message, status, endpoint), status_code=status, headers=headers)


OPEN_PATHS = ("/livez", "/readyz", "/healthz", "/metrics", "/static_content/", "/ui/")
OPEN_PAGES = ("/", "/docs.json", "/schema.json", "/ui")


def is_open(path: str) -> bool:
    """Health, metrics, the API docs and the playground page stay reachable without a key (probes and
    scrapers have none; the page asks for the key itself and sends it with its API calls)."""
    return path in OPEN_PAGES or path.startswith(OPEN_PATHS)


def api_key() -> str | None:
    """``DLBOOK_API_KEY`` turns on bearer-token checks for everything but health and metrics."""
    return os.environ.get("DLBOOK_API_KEY") or None


def authorised(headers: dict[bytes, bytes], key: str) -> bool:
    supplied = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, token = supplied.partition(" ")
    # compare_digest takes the same time whatever the first wrong character: no timing oracle.
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def max_body_bytes() -> int:
    return int(os.environ.get("DLBOOK_MAX_BODY_BYTES", str(12 * 1024 * 1024)))


def max_in_flight() -> int:
    """``DLBOOK_MAX_IN_FLIGHT``: API requests one worker holds at once before it sheds (0: never)."""
    return int(os.environ.get("DLBOOK_MAX_IN_FLIGHT", "64"))


# Multipart endpoints: the fields each accepts, and which of them must be uploaded files.
MULTIPART_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "/classify": (frozenset({"images", "model", "top_k", "return_frame"}), frozenset({"images"})),
}


def form_problem(path: str, parts: list[FormPart]) -> str | None:
    """Why a parsed form does not fit the endpoint, or None when it does.

    Every endpoint: files only in the fields that take files (BentoML answers a file elsewhere with
    500). Endpoints in ``MULTIPART_FIELDS`` also refuse unknown fields and text where a file belongs
    (BentoML would fetch it as a URL).
    """
    allowed, files = MULTIPART_FIELDS.get(path, (None, frozenset()))
    for part in parts:
        if allowed is not None and part.name not in allowed:
            return f"unknown form field {part.name!r}; this endpoint takes {', '.join(sorted(allowed))}"
        if part.is_file and part.name not in files:
            return f"form field {part.name!r} takes a value, not an uploaded file"
        if part.name in files and not part.is_file:
            return f"form field {part.name!r} must be an uploaded file (curl -F {part.name}=@photo.png), not text"
    return None


def describe_validation_error(payload: dict) -> str | None:
    """BentoML's pydantic 400 (``{"error", "detail": [...]}``) as one sentence naming each field."""
    detail = payload.get("detail")
    return direct_routes.validation_sentence(detail) if isinstance(detail, list) else None


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


def _flatten_validation_errors(send, path: str):
    """Rewrite BentoML's 400 validation bodies into our ``{"error", "status", "request_id"}`` shape."""
    held: dict = {}

    async def wrapped(message) -> None:
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
            body = json.dumps(refusal(sentence, 400, route_label(path))).encode()
        headers = [(k, v) for k, v in held["start"].get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**held["start"], "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return wrapped


class RequestGuardMiddleware:
    """Checks every request before BentoML parses it, and logs it with its id when it is answered.

    401 without the API key (when one is set); 503 with ``Retry-After`` when the worker already holds
    ``max_in_flight`` API requests or its event loop runs later than ``DLBOOK_MAX_QUEUE_MS`` (see
    :mod:`serving.admission`): a fast refusal the client can retry elsewhere beats a slow answer that
    times out, and it keeps the latency of accepted requests bounded; 413 for a body over
    ``max_body`` bytes (by Content-Length at once, else while reading); 400 for multipart parts the
    endpoint does not take. Health, metrics and docs are never shed or logged.
    """

    def __init__(self, app, max_body: int | None = None, in_flight_limit: int | None = None) -> None:
        self.app = app
        self.max_body = max_body or max_body_bytes()
        self.in_flight_limit = max_in_flight() if in_flight_limit is None else in_flight_limit
        self.in_flight = 0
        self.queue_budget = queue_budget_s()
        self.loop_lag = LoopLag()
        self.key = api_key()
        self.serve_metrics = not bentoml_metrics()  # then BentoML has no /metrics route: we answer it

    async def __call__(self, scope, receive, send) -> None:
        if self.serve_metrics and scope["type"] == "http" and scope.get("path") == "/metrics":
            body, content_type = exposition()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", content_type.encode()),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        if scope["type"] != "http" or is_open(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = request_id_for(headers)
        token = REQUEST_ID.set(request_id)
        began = time.perf_counter()
        answer: dict[str, int] = {}
        id_header = (b"x-request-id", request_id.encode())

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), id_header]}
            await send(message)

        self.in_flight += 1
        try:
            await self._guarded(scope, receive, send_with_id, headers)
        finally:
            self.in_flight -= 1
            REQUEST_ID.reset(token)
            seconds = time.perf_counter() - began
            status = str(answer.get("status", "-"))
            REQUEST_SECONDS.labels(route_label(scope.get("path", "")), status).observe(seconds)
            access_logger.info("%s %s %s %.1fms [request %s]", scope.get("method"), scope.get("path"), status,
                               seconds * 1e3, request_id)

    async def _guarded(self, scope, receive, send, headers: dict[bytes, bytes]) -> None:
        path = scope.get("path", "")
        if self.key and not is_open(path) and not authorised(headers, self.key):
            await self._refuse(send, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'", path)
            return
        if self.in_flight_limit and self.in_flight > self.in_flight_limit:
            SHED.labels(route_label(path)).inc()
            await self._refuse(send, 503, f"the server is at capacity ({self.in_flight_limit} requests in progress "
                               "per worker, DLBOOK_MAX_IN_FLIGHT); retry after a second", path)
            return
        if self.queue_budget:
            self.loop_lag.ensure_running()
            if self.loop_lag.lag_s > self.queue_budget:
                SHED.labels(route_label(path)).inc()
                await self._refuse(send, 503, f"the server is at capacity (requests wait over "
                                   f"{self.queue_budget * 1e3:.0f} ms, DLBOOK_MAX_QUEUE_MS); retry after a second",
                                   path)
                return
        if scope.get("method") in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await self._refuse(send, 413, self._too_large(), path)
            return
        # Chunked or unknown length: buffer up to the limit, then replay to the app.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body:
                await self._refuse(send, 413, self._too_large(), path)
                return
            chunks.append(body)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        content_type = headers.get(b"content-type", b"")
        form = None
        if is_multipart(content_type):
            try:
                form = parse_form(content_type, body)
            except FormError as err:
                await self._refuse(send, 400, str(err), path)
                return
            problem = form_problem(path, form)
            if problem:
                await self._refuse(send, 400, problem, path)
                return
        route = direct_routes.route_for(scope.get("method", ""), path, content_type)
        if route is not None:
            await self._answer_directly(route, scope, receive, body, form, send, path)
            return
        replayed = False
        send = _flatten_validation_errors(send, path)

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _answer_directly(self, route: direct_routes.DirectRoute, scope, receive, body: bytes,
                               form: list[FormPart] | None, send, path: str) -> None:
        """A hot route answered here (see :mod:`serving.direct_routes`), with the statuses BentoML gives."""
        endpoint = route_label(path)
        try:
            response = await direct_routes.respond(route, body, form)
        except TimeoutError:
            response = error_response("the request took longer than DLBOOK_REQUEST_TIMEOUT_S; send fewer items "
                                      "per request or retry when the server is less busy", 504, endpoint)
        except Exception:  # noqa: BLE001 - a fault of ours: logged in full, answered 500, worker stays up
            logger.exception("%s failed [request %s]", path, REQUEST_ID.get())
            response = error_response("internal error while answering; it is logged with this request id",
                                      500, endpoint)
        if isinstance(response, str):
            response = error_response(response, 400, endpoint)
        await response(scope, receive, send)  # the body is read: receive now only reports a disconnect

    def _too_large(self) -> str:
        return (f"request body exceeds {self.max_body} bytes; send fewer or smaller items per request "
                "(limit: DLBOOK_MAX_BODY_BYTES)")

    async def _refuse(self, send, status: int, message: str, path: str) -> None:
        body = json.dumps(refusal(message, status, route_label(path))).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="dlbook"'))
        if status == 503:
            headers.append((b"retry-after", b"1"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
