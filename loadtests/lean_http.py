"""A lean HTTP/1.1 client for the poem benchmarks: keep-alive connections on asyncio streams.

Why not httpx: on this 2-core machine the load generator shares the CPU with the server it measures.
httpx's client spent 0.3 of a core reading 16 SSE streams (its per-chunk machinery and ``aiter_lines``,
a Python call per line, three lines per character), CPU the in-process ceiling never has to share.
This client reads each chunk with two stream calls and parses a poem's events once, when it has
ended, so the figure is more the server's and less the client's. It still checks every answer: the
streamed characters must spell the poem of the ``done`` event.

Only what the benchmarks send and receive: POST with a JSON body, answers with ``Content-Length`` or
``Transfer-Encoding: chunked``, one request at a time per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from urllib.parse import urlsplit


class HttpError(RuntimeError):
    """A non-2xx answer, or an answer this client cannot read."""


@dataclass
class StreamedPoem:
    """One ``/generate_poem_stream`` answer: the poem, how many token events spelled it, and when."""

    poem: str
    tokens: int
    seconds: float
    first_token_s: float | None


class LeanConnection:
    """One keep-alive connection to ``base`` (``http://host:port``); opened on first use."""

    def __init__(self, base: str) -> None:
        parts = urlsplit(base)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _send(self, path: str, payload: dict) -> asyncio.StreamReader:
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        body = json.dumps(payload).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self._writer.write(head + body)
        assert self._reader is not None
        return self._reader

    @staticmethod
    async def _head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
        raw = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = raw.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers = {}
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        return status, headers

    @staticmethod
    async def _chunks(reader: asyncio.StreamReader, headers: dict[str, str]):
        """The body as it arrives: each HTTP chunk, or the whole body when it has a length."""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await reader.readline()).split(b";", 1)[0], 16)
                data = await reader.readexactly(size + 2)  # the chunk and its CRLF
                if size == 0:
                    return
                yield data[:-2]
        else:
            yield await reader.readexactly(int(headers.get("content-length", "0")))

    async def post_json(self, path: str, payload: dict) -> dict:
        """POST ``payload``; the decoded JSON answer (``HttpError`` unless 2xx)."""
        reader = await self._send(path, payload)
        status, headers = await self._head(reader)
        body = b"".join([chunk async for chunk in self._chunks(reader, headers)])
        if not 200 <= status < 300:
            raise HttpError(f"{path}: HTTP {status}: {body[:300]!r}")
        return json.loads(body)

    async def stream_poem(self, path: str, payload: dict) -> StreamedPoem:
        """POST to a poem stream and read it to its end; the streamed characters must spell the poem."""
        began = time.perf_counter()
        reader = await self._send(path, payload)
        status, headers = await self._head(reader)
        parts: list[bytes] = []
        first = None
        async for chunk in self._chunks(reader, headers):
            if first is None and b"event: token" in chunk:
                first = time.perf_counter() - began
            parts.append(chunk)
        seconds = time.perf_counter() - began
        text = b"".join(parts).decode()
        if not 200 <= status < 300:
            raise HttpError(f"{path}: HTTP {status}: {text[:300]!r}")
        return _read_events(text, seconds, first)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()


def _read_events(text: str, seconds: float, first: float | None) -> StreamedPoem:
    """Parse one poem's SSE answer (one poem per request) after it has ended."""
    chars: list[str] = []
    poem = None
    for block in text.split("\n\n"):
        if not block:
            continue
        kind, _, data = block.partition("\n")
        if kind == "event: token":
            chars.append(json.loads(data[6:])["char"])
        elif kind == "event: done":
            poem = json.loads(data[6:])["poems"][0]["poem"]
        elif kind == "event: error":
            raise HttpError(f"stream error: {data}")
    if poem is None:
        raise HttpError(f"stream ended without a done event after {len(chars)} characters")
    if "".join(chars) != poem:
        raise HttpError(f"streamed characters {''.join(chars)!r} do not spell the poem {poem!r}")
    return StreamedPoem(poem, len(chars), seconds, first)
