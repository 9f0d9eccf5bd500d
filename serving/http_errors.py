"""4xx answers with a flat ``{"error": ...}`` body, and a request-size limit enforced before parsing.

BentoML 1.4 answers its own 4xx exceptions with a JSON *list* and has no request-size limit, so we
return our errors as responses and put a small ASGI middleware in front of the app.
"""

from __future__ import annotations

import json
import logging
import os
import uuid

from starlette.responses import JSONResponse

logger = logging.getLogger("dlbook.serving")


class ApiError(Exception):
    """A request we refuse: ``status`` 4xx and a message that says what to fix."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def error_response(message: str, status: int, endpoint: str) -> JSONResponse:
    from serving.metrics import ERRORS

    ERRORS.labels(endpoint, str(status)).inc()
    request_id = uuid.uuid4().hex[:12]
    logger.info("refused %s with %d [request %s]: %s", endpoint, status, request_id, message)
    return JSONResponse({"error": message, "status": status, "request_id": request_id}, status_code=status)


def max_body_bytes() -> int:
    return int(os.environ.get("DLBOOK_MAX_BODY_BYTES", str(12 * 1024 * 1024)))


class BodyLimitMiddleware:
    """Refuse bodies over ``max_body`` bytes with 413: by Content-Length at once, else while reading."""

    def __init__(self, app, max_body: int | None = None) -> None:
        self.app = app
        self.max_body = max_body or max_body_bytes()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await self._refuse(send)
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
                await self._refuse(send)
                return
            chunks.append(body)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        body = json.dumps({"error": f"request body exceeds {self.max_body} bytes; send fewer or smaller "
                                    "items per request (limit: DLBOOK_MAX_BODY_BYTES)", "status": 413}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
