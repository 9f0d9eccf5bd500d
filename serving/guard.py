"""The request guard: the ASGI app in front of every service (``stand_in_front``), reading each request top-down.

1. ``/metrics`` is answered here (BentoML's own metrics are off by default, ``serving.config``);
   health, docs and the playground pass through unguarded.
2. Every other request gets an id (the caller's ``X-Request-ID`` when sane), which appears in its
   log line, its error body and its ``X-Request-ID`` header, and is timed and logged when answered.
3. Authentication (401 without the API key, when one is set), then admission (``serving.admission``):
   503 with ``Retry-After`` while the event loop runs later than ``DLBOOK_MAX_QUEUE_MS``; otherwise the
   request takes one of ``DLBOOK_MAX_IN_FLIGHT`` slots, or waits for one in arrival order (503 when
   ``DLBOOK_MAX_WAITING`` already wait or it waited ``DLBOOK_MAX_WAIT_MS``), before its body is read.
   Those 503s are logged as a summary a second (``ShedLog``), not a line each.
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

import asyncio
import hmac
import itertools
import json
import logging
import re
import secrets
import time
from collections import Counter
from typing import Any

from serving import direct_routes
from serving.admission import LoopLag, Slots
from serving.errors import REQUEST_ID, ApiError, error_answer, error_response, flatten_validation_errors, refusal
from serving.metrics import ERRORS, REQUEST_SECONDS, SHED, exposition
from serving.multipart_form import FormError, FormPart, is_multipart, parse_form
from serving.routes import FORM_FIELDS, route_label
from serving.settings import Settings, current

access_logger = logging.getLogger("dlbook.access")
logger = logging.getLogger("dlbook.serving")

_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

OPEN_PATHS = ("/livez", "/readyz", "/healthz", "/metrics", "/static_content/", "/ui/")
OPEN_PAGES = ("/", "/docs.json", "/schema.json", "/ui")


_ID_PREFIX = secrets.token_hex(4)  # this worker's: ids from different workers and restarts do not collide
_ID_COUNTER = itertools.count()


def request_id_for(headers: dict[bytes, bytes]) -> str:
    """The caller's ``X-Request-ID`` when it is a sane token (so traces join up), else a fresh one:
    16 hex digits, this worker's random prefix and a counter (unique without a call to the OS's
    random source per request, which ``uuid4`` makes)."""
    supplied = headers.get(b"x-request-id")
    if supplied:
        text = supplied.decode("latin-1")
        if _CLIENT_ID.fullmatch(text):
            return text
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFF:08x}"


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


class ShedLog:
    """The log of requests shed at capacity: the first one at once, then one line a second with the count.

    Why not a line each: at 256 connections the worker shed 2,600 requests a second, and a log line
    is a tenth of a refusal's CPU (``loadtests/request_cpu.py``); a line a second says the same to
    an operator, and ``dlbook_shed_total`` keeps the exact count. The line names the paths and the
    id of the last request shed, which the client also got in its 503 body.
    """

    def __init__(self, period_s: float = 1.0) -> None:
        self.period_s = period_s
        self.counts: Counter[str] = Counter()
        self.last_id = ""
        self.flush_due = False

    def note(self, path: str, request_id: str) -> None:
        self.counts[route_label(path)] += 1
        self.last_id = request_id
        if not self.flush_due:
            self.flush_due = True
            self.flush()  # the first after a quiet period at once: an operator sees shedding begin
            asyncio.get_running_loop().call_later(self.period_s, self._flush_later)

    def _flush_later(self) -> None:
        if self.counts:  # still shedding: this period's summary, and keep summing
            self.flush()
            asyncio.get_running_loop().call_later(self.period_s, self._flush_later)
        else:  # a quiet period: the next request shed is logged at once again
            self.flush_due = False

    def flush(self) -> None:
        if not self.counts:
            return
        total = sum(self.counts.values())
        paths = ", ".join(f"{path} {count}" for path, count in self.counts.most_common())
        logger.warning("shed %d request%s at capacity with 503 (%s) [last request %s]; "
                       "see dlbook_shed_total, DLBOOK_MAX_IN_FLIGHT and DLBOOK_MAX_WAITING", total,
                       "" if total == 1 else "s", paths, self.last_id)
        self.counts.clear()


def stand_in_front(service: Any, settings: Settings | None = None) -> None:
    """Put the request guard in front of ``service``'s whole ASGI app, not inside BentoML's middleware.

    Why: as an ASGI middleware (``add_asgi_middleware``) the guard sits inside Starlette's error
    middleware, OpenTelemetry's (which decodes the headers to match its excluded URLs even when it
    makes no span) and BentoML's timeout middleware, and every request, refusals included, paid for
    the three of them before the guard could answer it: 0.033 ms of CPU per request at 32 concurrent
    requests in process, 0.077 ms at one (``loadtests/request_cpu.py``; docs/PERFORMANCE.md, "Where a
    request's CPU goes"). In front, the guard answers its direct routes, refusals and ``/metrics``
    without them, and replays everything else to the app BentoML built, with all of them.

    How: BentoML 1.4's worker builds its ASGI app with ``Service.to_asgi()`` and hands it to uvicorn,
    with no hook to wrap it (``main`` of BentoML's worker module,
    https://github.com/bentoml/BentoML/blob/v1.4.39/src/_bentoml_impl/worker/service.py); the service
    object becomes an instance of a subclass whose ``to_asgi`` wraps the app (``Service`` is a slotted
    attrs class, so its methods cannot be replaced on the instance). ``DLBOOK_TRACING=1`` keeps the
    guard inside OpenTelemetry's middleware, so the direct routes get their spans. Remove this when
    BentoML offers an outermost-middleware hook; ``tests/test_upstream_conditions.py`` checks that the
    guard is the app uvicorn receives.
    """
    settings = settings or current()
    if settings.tracing:
        service.add_asgi_middleware(RequestGuardMiddleware)
        return
    base = type(service)

    class GuardedService(base):  # type: ignore[misc, valid-type]
        __slots__ = ()

        def to_asgi(self, is_main: bool = True) -> RequestGuardMiddleware:
            return RequestGuardMiddleware(base.to_asgi(self, is_main))

    service.__class__ = GuardedService


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
        self.slots = Slots(self.in_flight_limit, settings.max_waiting, settings.max_wait_s,
                           settings.newest_first_after_s)
        self.queue_budget = settings.queue_budget_s
        self.loop_lag = LoopLag()
        self.key = settings.api_key
        self.timeout_s = settings.request_timeout_s
        self.serve_metrics = not settings.bentoml_metrics  # then BentoML has no /metrics route: we answer it
        self._timers: dict[tuple[str, int], Any] = {}
        self.shed_log = ShedLog()
        self._late_message = (f"the server is at capacity (requests wait over {self.queue_budget * 1e3:.0f} ms, "
                              "DLBOOK_MAX_QUEUE_MS); retry after the Retry-After seconds")
        self._full_message = (f"the server is at capacity ({self.in_flight_limit} requests in progress per worker, "
                              f"DLBOOK_MAX_IN_FLIGHT, and {self.slots.max_waiting} may wait for at most "
                              f"{self.slots.max_wait_s * 1e3:.0f} ms, DLBOOK_MAX_WAITING / DLBOOK_MAX_WAIT_MS); "
                              "retry after the Retry-After seconds")

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

        path = scope.get("path", "")
        shed = False
        try:
            shed = await self._guarded(scope, receive, send_with_id, headers, path)
        finally:
            REQUEST_ID.reset(token)
            seconds = time.perf_counter() - began
            status = answer.get("status", 0)
            self._request_seconds(path, status).observe(seconds)
            if shed:  # one summary line a second for these, not a line each (ShedLog)
                self.shed_log.note(path, request_id)
            else:
                access_logger.info("%s %s %s %.1fms [request %s]", scope.get("method"), path, status or "-",
                                   seconds * 1e3, request_id)

    def _request_seconds(self, path: str, status: int):
        """The histogram child for (route, status), looked up once (``labels()`` costs a lock and a tuple)."""
        key = (path, status)
        child = self._timers.get(key)
        if child is None:
            child = REQUEST_SECONDS.labels(route_label(path), str(status or "-"))
            if len(self._timers) < 512:  # bounded: unknown paths share the "other" label anyway
                self._timers[key] = child
        return child

    async def _guarded(self, scope, receive, send, headers: dict[bytes, bytes], path: str) -> bool:
        """Authenticate, admit and answer the request; True when it was shed (503 at capacity)."""
        if self.key and not is_open(path) and not authorised(headers, self.key):
            await self._refuse(send, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'", path)
            return False
        if self.queue_budget:
            self.loop_lag.ensure_running()
            if self.loop_lag.lag_s > self.queue_budget:
                await self._shed(send, path, self._late_message)
                return True
        if not await self.slots.enter():
            await self._shed(send, path, self._full_message)
            return True
        try:
            await self._admitted(scope, receive, send, headers, path)
        finally:
            self.slots.leave()
        return False

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

    async def _shed(self, send, path: str, message: str) -> None:
        """503 at capacity, as cheaply as an answer can be: counted (``dlbook_shed_total``,
        ``dlbook_request_errors_total``, ``dlbook_request_seconds``) and logged in the shed summary, not
        line by line; the body still carries the request id, so a client can quote it."""
        label = route_label(path)
        SHED.labels(label).inc()
        ERRORS.labels(label, "503").inc()
        body = json.dumps({"error": message, "status": 503, "request_id": REQUEST_ID.get()}).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"retry-after", b"1")]})
        await send({"type": "http.response.body", "body": body})

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
