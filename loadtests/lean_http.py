"""A lean HTTP/1.1 client for the poem benchmarks: keep-alive connections on asyncio streams.

Why not httpx: on this 2-core machine the load generator shares the CPU with the server it measures.
httpx's client spent 0.3 of a core reading 16 SSE streams (its per-chunk machinery and ``aiter_lines``,
a Python call per line, three lines per character), CPU the in-process ceiling never has to share.
This client reads each chunk with two stream calls and parses a poem's events once, when it has
ended, so the figure is more the server's and less the client's. It still checks every answer: the
streamed characters must spell the poem of the ``done`` event. Measured with httpx 0.28.1; not a bug
upstream, just the cost of its general machinery. Go back to httpx when ``poem_http_bench.py
--compare-httpx`` shows its client costing about what this one does.

Only what the benchmarks need: POST with a JSON body, one request at a time per connection; answers
with ``Content-Length``, ``Transfer-Encoding: chunked`` or a body that ends with the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
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
    """One keep-alive connection to ``base`` (``http://host:port``); opened on first use, and opened
    afresh after the server closed it or after any request that failed midway (whose unread bytes
    would otherwise be taken for the next answer)."""

    def __init__(self, base: str) -> None:
        parts = urlsplit(base)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _exchange(self, path: str, payload: dict, on_chunk: Callable[[bytes], None]) -> int:
        """Send one POST and hand each piece of the answer's body to ``on_chunk``; the status."""
        try:
            reader = await self._send(path, payload)
            status, headers = await self._head(reader)
            keep = headers.get("connection", "").lower() != "close"
            if status in (204, 304) or 100 <= status < 200:
                pass
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                await self._read_chunked(reader, on_chunk)
            elif "content-length" in headers:
                on_chunk(await reader.readexactly(int(headers["content-length"])))
            else:  # the body ends when the server closes the connection
                on_chunk(await reader.read())
                keep = False
        except BaseException:
            await self.close()
            raise
        if not keep:
            await self.close()
        return status

    async def _send(self, path: str, payload: dict) -> asyncio.StreamReader:
        if self._writer is None or self._reader is None or self._reader.at_eof():
            await self.close()
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        body = json.dumps(payload).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self._writer.write(head + body)
        await self._writer.drain()
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
    async def _read_chunked(reader: asyncio.StreamReader, on_chunk: Callable[[bytes], None]) -> None:
        """Chunked transfer coding: each chunk as it arrives; extensions and trailers are skipped."""
        while True:
            line = await reader.readline()
            if not line.endswith(b"\r\n"):
                raise HttpError(f"connection ended inside a chunked body (read {line!r})")
            size = int(line.split(b";", 1)[0], 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b""):  # trailers, then the blank line
                    pass
                return
            data = await reader.readexactly(size + 2)
            if data[-2:] != b"\r\n":
                raise HttpError("a chunk did not end with CRLF")
            on_chunk(data[:-2])

    async def post_json(self, path: str, payload: dict) -> dict:
        """POST ``payload``; the decoded JSON answer (``HttpError`` unless 2xx)."""
        parts: list[bytes] = []
        status = await self._exchange(path, payload, parts.append)
        body = b"".join(parts)
        if not 200 <= status < 300:
            raise HttpError(f"{path}: HTTP {status}: {body[:300]!r}")
        return json.loads(body)

    async def stream_poem(self, path: str, payload: dict) -> StreamedPoem:
        """POST to a poem stream and read it to its end; the streamed characters must spell the poem."""
        began = time.perf_counter()
        parts: list[bytes] = []
        first: float | None = None

        def take(chunk: bytes) -> None:
            nonlocal first
            if first is None and b"event: token" in chunk:
                first = time.perf_counter() - began
            parts.append(chunk)

        status = await self._exchange(path, payload, take)
        seconds = time.perf_counter() - began
        text = b"".join(parts).decode()
        if not 200 <= status < 300:
            raise HttpError(f"{path}: HTTP {status}: {text[:300]!r}")
        return _read_events(text, seconds, first)

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


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
