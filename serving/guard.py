"""The request guard: the ASGI middleware in front of every service, reading each request top-down.

1. ``/metrics`` is answered here (BentoML's own metrics are off by default, ``serving.config``);
   health, docs and the playground pass through unguarded.
2. Every other request gets an id (the caller's ``X-Request-ID`` when sane), which appears in its
   log line, its error body and its ``X-Request-ID`` header, and is timed and logged when answered.
3. Authentication (401 without the API key, when one is set), then admission (``serving.admission``):
   503 with ``Retry-After`` while the event loop runs later than ``DLBOOK_MAX_QUEUE_MS``; otherwise the
   request takes one of ``DLBOOK_MAX_IN_FLIGHT`` slots, or waits for one in arrival order (503 when
   ``DLBOOK_MAX_WAITING`` already wait or it waited ``DLBOOK_MAX_WAIT_MS``), before its body is read.
4. The body limit (413), then multipart forms parsed once and checked against the route (400).
5. A route the worker answers directly (``serving.direct_routes``) is answered here; anything else is
   replayed to BentoML, whose 400 validation bodies are flattened into our shape.

Why a guard at all: BentoML 1.4 has no request-size limit (its 0.x ``max_request_size``,
https://github.com/bentoml/BentoML/issues/1087, did not survive the 1.x server), answers a file under
an unknown multipart field with 500, and treats a *text* value in a file field as a URL to download
(``MultipartSerde.ensure_file``, https://github.com/bentoml/BentoML/blob/v1.4.39/src/_bentoml_impl/serde.py,
added by https://github.com/bentoml/BentoML/pull/4411). The 413 and the form checks can go when
BentoML has a body limit and refuses those parts with 400 itself; shedding stays (a fast refusal the
client can retry elsewhere beats a slow answer that times out, and it keeps the latency of accepted
requests bounded).
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid

from serving import direct_routes
from serving.admission import LoopLag, Slots
from serving.errors import REQUEST_ID, ApiError, error_answer, error_response, flatten_validation_errors, refusal
from serving.metrics import REQUEST_SECONDS, SHED, exposition
from serving.multipart_form import FormError, FormPart, is_multipart, parse_form
from serving.routes import FORM_FIELDS, route_label
from serving.settings import Settings, current

access_logger = logging.getLogger("dlbook.access")

_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

OPEN_PATHS = ("/livez", "/readyz", "/healthz", "/metrics", "/static_content/", "/ui/")
OPEN_PAGES = ("/", "/docs.json", "/schema.json", "/ui")


def request_id_for(headers: dict[bytes, bytes]) -> str:
    """The caller's ``X-Request-ID`` when it is a sane token (so traces join up), else a fresh one."""
    supplied = headers.get(b"x-request-id", b"").decode("latin-1")
    return supplied if _CLIENT_ID.fullmatch(supplied) else uuid.uuid4().hex[:16]


def is_open(path: str) -> bool:
    """Health, metrics, the API docs and the playground page stay reachable without a key (probes and
    scrapers have none; the page asks for the key itself and sends it with its API calls)."""
    return path in OPEN_PAGES or path.startswith(OPEN_PATHS)


def authorised(headers: dict[bytes, bytes], key: str) -> bool:
    supplied = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, token = supplied.partition(" ")
    # compare_digest takes the same time whatever the first wrong character: no timing oracle.
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def form_problem(path: str, parts: list[FormPart]) -> str | None:
    """Why a parsed form does not fit the endpoint, or None when it does.

    Every endpoint: files only in the fields that take files (BentoML answers a file elsewhere with
    500). Multipart routes (``FORM_FIELDS``, from the route table) also refuse unknown fields and text
    where a file belongs (BentoML would fetch it as a URL).
    """
    allowed, files = FORM_FIELDS.get(path, (None, frozenset()))
    for part in parts:
        if allowed is not None and part.name not in allowed:
            return f"unknown form field {part.name!r}; this endpoint takes {', '.join(sorted(allowed))}"
        if part.is_file and part.name not in files:
            return f"form field {part.name!r} takes a value, not an uploaded file"
        if part.name in files and not part.is_file:
            return f"form field {part.name!r} must be an uploaded file (curl -F {part.name}=@photo.png), not text"
    return None


class RequestGuardMiddleware:
    """Checks every request before BentoML parses it, answers the direct routes, and logs each request
    with its id when it is answered (the steps in this module's docstring). Health, metrics and docs
    are never shed or logged. ``settings``: the worker's (default: ``serving.settings.current()``);
    ``max_body`` and ``in_flight_limit`` override theirs."""

    def __init__(self, app, max_body: int | None = None, in_flight_limit: int | None = None,
                 settings: Settings | None = None) -> None:
        settings = settings or current()
        self.app = app
        self.max_body = max_body or settings.max_body_bytes
        self.in_flight_limit = settings.max_in_flight if in_flight_limit is None else in_flight_limit
        self.slots = Slots(self.in_flight_limit, settings.max_waiting, settings.max_wait_s)
        self.queue_budget = settings.queue_budget_s
        self.loop_lag = LoopLag()
        self.key = settings.api_key
        self.timeout_s = settings.request_timeout_s
        self.serve_metrics = not settings.bentoml_metrics  # then BentoML has no /metrics route: we answer it

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

        try:
            await self._guarded(scope, receive, send_with_id, headers)
        finally:
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
        if self.queue_budget:
            self.loop_lag.ensure_running()
            if self.loop_lag.lag_s > self.queue_budget:
                SHED.labels(route_label(path)).inc()
                await self._refuse(send, 503, f"the server is at capacity (requests wait over "
                                   f"{self.queue_budget * 1e3:.0f} ms, DLBOOK_MAX_QUEUE_MS); retry after a second",
                                   path)
                return
        if not await self.slots.enter():
            SHED.labels(route_label(path)).inc()
            await self._refuse(send, 503, f"the server is at capacity ({self.in_flight_limit} requests in progress "
                               f"per worker, DLBOOK_MAX_IN_FLIGHT, and {self.slots.max_waiting} may wait for at most "
                               f"{self.slots.max_wait_s * 1e3:.0f} ms, DLBOOK_MAX_WAITING / DLBOOK_MAX_WAIT_MS); "
                               "retry after a second", path)
            return
        try:
            await self._admitted(scope, receive, send, headers, path)
        finally:
            self.slots.leave()

    async def _admitted(self, scope, receive, send, headers: dict[bytes, bytes], path: str) -> None:
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
        send = flatten_validation_errors(send, route_label(path))

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _answer_directly(self, route: direct_routes.DirectRoute, scope, receive, body: bytes,
                               form: list[FormPart] | None, send, path: str) -> None:
        """A hot route answered here (see :mod:`serving.direct_routes`), with the statuses BentoML gives:
        a refusal counted under the handler's name, as on BentoML's path; a timeout 504, a fault of
        ours 500 (logged in full; the worker stays up), under the route's label."""
        try:
            response = await direct_routes.respond(route, body, form, self.timeout_s)
        except ApiError as err:
            response = error_answer(err, route.endpoint or route_label(path))
        except Exception as err:  # noqa: BLE001 - TimeoutError: 504; anything else: 500, the worker stays up
            response = error_answer(err, route_label(path))
        if isinstance(response, str):
            response = error_response(response, 400, route_label(path))
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
