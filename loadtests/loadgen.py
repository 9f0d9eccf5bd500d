"""One load generator for every HTTP benchmark: wrk (Debian's ``wrk``), driven from Python.

wrk is a small C program, so on this 2-core machine it takes far less CPU from the server under test
than a Python load generator would, and every server (ours, the bare baseline, Triton, TorchServe)
is measured with the same tool and the same bytes. A request is a method, a path, headers and a body
written to a file; a Lua script sends it and, when wrk finishes, prints one JSON line with the
counts and latency percentiles, which :func:`run_wrk` parses.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

_LUA = r"""
local f = assert(io.open("{body}", "rb"))
wrk.method = "{method}"
wrk.path = "{path}"
wrk.body = f:read("*a")
f:close()
{headers}
local track = {track}
local threads = {{}}
statuses = {{}}

-- Each wrk thread runs its own Lua state: count per thread, add up in done().
setup = function(thread)
  table.insert(threads, thread)
end

if track then
  response = function(status, headers, body)
    local key = tostring(status)
    statuses[key] = (statuses[key] or 0) + 1
  end
end

done = function(summary, latency, requests)
  local p = {{}}
  for _, q in ipairs({{50, 90, 99, 99.9}}) do p[tostring(q)] = latency:percentile(q) / 1000.0 end
  local s = {{}}
  for _, thread in ipairs(threads) do
    for k, v in pairs(thread:get("statuses") or {{}}) do s[k] = (s[k] or 0) + v end
  end
  local e = summary.errors
  io.write("WRKJSON " .. string.format(
    '{{"requests": %d, "duration_s": %f, "connect": %d, "read": %d, "write": %d, "status": %d, ' ..
    '"timeout": %d, "p50": %f, "p90": %f, "p99": %f, "p999": %f, "mean": %f, "max": %f, "statuses": {{',
    summary.requests, summary.duration / 1e6, e.connect, e.read, e.write, e.status, e.timeout,
    p["50"], p["90"], p["99"], p["99.9"], latency.mean / 1000.0, latency.max / 1000.0))
  local first = true
  for k, v in pairs(s) do
    io.write((first and "" or ", ") .. string.format('"%s": %d', k, v))
    first = false
  end
  io.write("}}}}\n")
end
"""


@dataclass(frozen=True)
class HttpRequest:
    """The bytes every client sends: one request, repeated."""

    path: str
    body: bytes
    content_type: str
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class LoadResult:
    """What wrk saw; latencies in milliseconds."""

    label: str
    connections: int
    requests: int
    duration_s: float
    rps: float
    p50: float
    p90: float
    p99: float
    p999: float
    mean: float
    max: float
    errors: int  # socket errors (connect/read/write/timeout) plus non-2xx/3xx answers
    timeouts: int
    statuses: dict[str, int]
    server_cpu_ms: float = 0.0  # CPU the server spent per request, when the caller measured it

    def as_dict(self) -> dict:
        return asdict(self)


def multipart_body(field_name: str, filename: str, payload: bytes, mime: str) -> tuple[bytes, str]:
    """A one-file multipart/form-data body and its Content-Type (boundary included)."""
    boundary = f"dlbook{uuid.uuid4().hex}"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field_name}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {mime}\r\n\r\n").encode() + payload + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(base_url: str, request: HttpRequest, *, connections: int, duration_s: float, threads: int = 1,
            timeout_s: float = 10.0, track_status: bool = False, label: str = "") -> LoadResult:
    """Send ``request`` from ``connections`` keep-alive connections for ``duration_s``; parse wrk's summary.

    ``track_status`` counts answers per status code (a Lua callback per response, which costs wrk a
    little CPU: use it where the split matters, e.g. overload runs that expect 503s).
    """
    if not wrk_available():
        raise RuntimeError("wrk is not installed: `apt-get install wrk` (Debian) or see loadtests/README.md")
    with tempfile.TemporaryDirectory(prefix="dlbook-wrk-") as tmp:
        body_file = Path(tmp) / "body"
        body_file.write_bytes(request.body)
        headers = {"Content-Type": request.content_type, **request.headers}
        header_lines = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
        script = Path(tmp) / "request.lua"
        script.write_text(_LUA.format(body=body_file, method=request.method, path=request.path,
                                      headers=header_lines, track="true" if track_status else "false"))
        cmd = ["wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{duration_s:g}s",
               f"--timeout={timeout_s:g}s", "-s", str(script), base_url]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=duration_s + 60).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    raw = json.loads(line.removeprefix("WRKJSON "))
    errors = raw["connect"] + raw["read"] + raw["write"] + raw["timeout"] + raw["status"]
    return LoadResult(label=label, connections=connections, requests=raw["requests"], duration_s=raw["duration_s"],
                      rps=raw["requests"] / raw["duration_s"], p50=raw["p50"], p90=raw["p90"], p99=raw["p99"],
                      p999=raw["p999"], mean=raw["mean"], max=raw["max"], errors=errors, timeouts=raw["timeout"],
                      statuses=raw["statuses"])
