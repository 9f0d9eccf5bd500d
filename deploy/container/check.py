"""Build the serving image and check it for real (deploy/container/check.sh; tests/test_container.py).

    .venv/bin/python deploy/container/check.py [--models a,b] [--image REF] [--fresh] [--record FILE.json]

What it does, each step recorded with what it saw:
1. builds the CPU image (deploy/container/image.py; ``--fresh``: from nothing, for the first-build time);
2. serves the same models outside any container (``bentoml serve serving.service:DlbookService`` from this
   checkout, pinned to the versions in the image) on 127.0.0.1;
3. starts the image the way a platform runs it: read-only root filesystem with a tmpfs on /tmp only, every
   capability dropped, no privilege escalation, ``--cpus 1``, published on 127.0.0.1 only; cold start = from
   ``podman run`` to the first 200 from /readyz;
4. checks the user (not root), the read-only root, the HEALTHCHECK (``podman healthcheck run``), the ONNX
   Runtime build and its intra-op threads (the CPU quota, not the host's cores), then one request to every
   API (an upload, a JSON image, a house, a plain poem, an SSE poem) compared with the server outside, and
   one log line on stdout per request;
5. opens poem streams, sends SIGTERM to the container's init process once every stream has its first
   characters, and checks that each stream still ends with its ``done`` event and the same poems as outside,
   that new connections are refused, and that the container exits 0 within the grace period.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import io
import json
import math
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import image as image_build  # noqa: E402  (deploy/container/image.py)

REPO = image_build.REPO
sys.path.insert(0, str(REPO))
from loadtests.servers import stop_server  # noqa: E402

SAMPLES = REPO / "data" / "samples"
CPUS = 1  # the container's CPU limit in the check: ORT must use this many intra-op threads
GRACE_S = 25  # the image's --timeout-graceful-shutdown (deploy/container/Dockerfile.j2)
TASKS = {"fashion-lenet": "image", "digits-lenet": "image", "digits-mlp": "image", "house-price": "price",
         "tang-poem": "poem"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _idx_images(path: Path, count: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    n, rows, cols = (int.from_bytes(data[i:i + 4], "big") for i in (4, 8, 12))
    return np.frombuffer(data, np.uint8, offset=16).reshape(n, rows, cols)[:count]


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


class Check:
    """The record: every check with its verdict and what was seen."""

    def __init__(self) -> None:
        self.checks: list[dict[str, Any]] = []

    def add(self, name: str, ok: bool, **seen: Any) -> bool:
        self.checks.append({"name": name, "ok": bool(ok), **seen})
        print(f"check: {'ok  ' if ok else 'FAIL'} {name}: {json.dumps(seen, ensure_ascii=False)[:300]}",
              file=sys.stderr, flush=True)
        return bool(ok)


def _podman(*args: str, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
    tool = image_build.container_tool()
    return subprocess.run([tool, *args], capture_output=True, text=True, check=check, timeout=timeout,
                          env=image_build.tool_env(tool))


def _wait_ready(base: str, deadline_s: float, alive=lambda: True) -> float | None:
    """Seconds until ``/readyz`` answers 200, or None."""
    start = time.monotonic()
    while time.monotonic() - start < deadline_s and alive():
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - start
        time.sleep(0.1)
    return None


@contextlib.contextmanager
def reference_server(models: dict[str, str], log_path: Path):
    """The same models served outside any container, from this checkout."""
    port = _free_port()
    env = {**os.environ, "DLBOOK_DEVICE": "cpu", "BENTOML_DO_NOT_TRACK": "True"}
    for task in ("image", "price", "poem"):
        env[f"DLBOOK_{task.upper()}_MODELS"] = ",".join(n for n in models if TASKS.get(n) == task)
    for name, tag in models.items():
        env[f"DLBOOK_MODEL_{name.upper().replace('-', '_')}"] = tag
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "serving.service:DlbookService",
                                 "--host", "127.0.0.1", "--port", str(port)], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            if _wait_ready(base, 180, lambda: proc.poll() is None) is None:
                raise RuntimeError(f"the reference server did not start: {log_path.read_text()[-2000:]}")
            yield base
        finally:
            stop_server(proc, 30)


def _requests(digit_model: str = "digits-lenet") -> dict[str, dict[str, Any]]:
    """One request per API, real inputs from the committed samples."""
    fashion = _idx_images(SAMPLES / "fashion-mnist" / "t10k-images-idx3-ubyte.gz", 2)
    digits = _idx_images(SAMPLES / "mnist" / "t10k-images-idx3-ubyte.gz", 2)
    houses = [{"GrLivArea": 1500, "OverallQual": 7, "YearBuilt": 2003, "LotArea": 8450, "TotalBsmtSF": 856},
              {"GrLivArea": 2400, "OverallQual": 9, "YearBuilt": 2008, "GarageCars": 3}]
    poem = {"acrostic": "春夏秋冬", "chars_per_clause": 7, "seed": 1}
    return {
        "upload /classify": {"path": "/classify", "files": [("images", ("shirt.png", _png(fashion[0]), "image/png")),
                                                           ("images", ("boot.png", _png(fashion[1]), "image/png"))],
                             "data": {"model": "fashion-lenet", "top_k": "3"}},
        "JSON image /classify_pixels": {"path": "/classify_pixels",
                                        "json": {"images": [d.tolist() for d in digits], "model": digit_model}},
        "house /predict_price": {"path": "/predict_price", "json": {"records": houses, "model": "house-price"}},
        "plain poem /generate_poem": {"path": "/generate_poem", "json": poem},
        "SSE poem /generate_poem_stream": {"path": "/generate_poem_stream", "json": {"theme": "秋夜思乡", "seed": 3}},
    }


def _sse(text: str) -> list[tuple[str, Any]]:
    events = []
    for block in text.split("\n\n"):
        kind = re.search(r"^event: (.+)$", block, re.M)
        data = re.search(r"^data: (.+)$", block, re.M)
        if kind and data:
            events.append((kind.group(1), json.loads(data.group(1))))
    return events


def _ask(base: str, spec: dict[str, Any], request_id: str) -> tuple[int, Any]:
    r = httpx.post(f"{base}{spec['path']}", headers={"X-Request-ID": request_id}, timeout=60,
                   **{k: v for k, v in spec.items() if k in ("files", "data", "json")})
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        return r.status_code, _sse(r.text)
    return r.status_code, r.json()


def _same(name: str, inside: Any, outside: Any) -> tuple[bool, dict[str, Any]]:
    """Labels, poems and versions exactly; probabilities within 1e-5 and prices within 1e-4 relative
    (ONNX Runtime's CPU build in the image, onnxruntime-gpu's CPU provider outside, other thread counts)."""
    if name.startswith("SSE"):
        poems_in = next((d["poems"] for k, d in inside if k == "done"), None)
        poems_out = next((d["poems"] for k, d in outside if k == "done"), None)
        streamed = "".join(d["char"] for k, d in inside if k == "token")
        ok = poems_in is not None and poems_in == poems_out and streamed == poems_in[0]["poem"]
        return ok, {"poem": poems_in[0]["poem"] if poems_in else None, "token_events": len(streamed)}
    if "poems" in inside:
        return inside["poems"] == outside["poems"], {"poem": inside["poems"][0]["poem"]}
    if "prices" in inside:
        close = np.allclose(inside["prices"], outside["prices"], rtol=1e-4)
        return close and inside["version"] == outside["version"], {"prices": inside["prices"],
                                                                   "outside": outside["prices"]}
    worst, labels = 0.0, []
    for a, b in zip(inside["predictions"], outside["predictions"], strict=True):
        labels.append(a["label"])
        if a["label"] != b["label"] or [t["label"] for t in a["top_k"]] != [t["label"] for t in b["top_k"]]:
            return False, {"labels": labels, "outside": b}
        worst = max(worst, *(abs(x["probability"] - y["probability"]) for x, y in zip(a["top_k"], b["top_k"],
                                                                                       strict=True)))
    return worst <= 1e-5 and inside["version"] == outside["version"], {"labels": labels,
                                                                       "max_probability_difference": worst}


async def _streams_through_sigterm(base: str, pid: int, params: list[dict]) -> dict[str, Any]:
    """Open the streams, SIGTERM the container once each has its first characters, read them to the end."""
    first = [asyncio.Event() for _ in params]
    bodies = ["" for _ in params]
    ended_at: list[float | None] = [None for _ in params]

    async def read(i: int, client: httpx.AsyncClient) -> None:
        async with client.stream("POST", f"{base}/generate_poem_stream", json=params[i],
                                 headers={"X-Request-ID": f"check-drain-{i}"}) as r:
            async for chunk in r.aiter_text():
                bodies[i] += chunk
                if "event: token" in bodies[i]:
                    first[i].set()
        ended_at[i] = time.monotonic()
        first[i].set()

    async with httpx.AsyncClient(timeout=60) as client:
        tasks = [asyncio.create_task(read(i, client)) for i in range(len(params))]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in first)), 60)
        sent = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        await asyncio.sleep(0.05)
        try:  # the listener is closed at once: a new connection is refused
            async with httpx.AsyncClient(timeout=3) as fresh:
                late = (await fresh.get(f"{base}/livez")).status_code
        except httpx.HTTPError as err:
            late = type(err).__name__
        results = await asyncio.gather(*tasks, return_exceptions=True)
    return {"sent": sent, "bodies": bodies, "ended_at": ended_at, "late_connection": late,
            "errors": [repr(r) for r in results if isinstance(r, BaseException)]}


def _source() -> str:
    """Which code the image holds: the checkout's commit and whether it had local changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "serving", "preprocessing", "bentofile.yaml",
                                "requirements-serving.txt", "deploy"], cwd=REPO, capture_output=True,
                               text=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("DLBOOK_CHECK_SOURCE", "not a git checkout")
    return f"{head}" + (f" with local changes to {len(dirty)} file(s)" if dirty else "")


def run_check(models: list[str] | None = None, work: Path | None = None, image_ref: str | None = None,
              fresh: bool = False) -> dict[str, Any]:
    work = Path(work or tempfile.mkdtemp(prefix="dlbook-container-check-"))
    work.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "kernel": platform.release(),
                 "podman": _podman("--version").stdout.strip(), "runc": subprocess.run(
                     ["runc", "--version"], capture_output=True, text=True).stdout.splitlines()[:1]},
        "command": "deploy/container/check.sh",
        "source": _source(),
    }
    check = Check()
    record["checks"] = check.checks
    if image_ref is None:
        build = image_build.build("cpu", "auto", models, fresh=fresh)
        record["build"] = build
        image_ref = build["image"]
        pinned = build["models"]
    else:
        bento_yaml = _podman("run", "--rm", "--entrypoint", "cat", image_ref, "/home/bentoml/bento/bento.yaml").stdout
        pinned = [m["tag"] for m in yaml.safe_load(bento_yaml)["models"]]
        record["build"] = {"image": image_ref, "models": pinned}
    record["image"] = image_ref
    models_pinned = {t.split(":")[0]: t for t in pinned if t}
    size = image_build.image_size(image_build.container_tool(), image_ref)
    record["size_mb"] = round(size / 1e6)
    record["size_breakdown_mb"] = _size_breakdown(image_ref)

    name = f"dlbook-check-{os.getpid()}"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with reference_server(models_pinned, work / "reference.log") as outside:
        started = time.monotonic()
        run = _podman("run", "-d", "--name", name, "--log-driver", "k8s-file", "-p", f"127.0.0.1:{port}:3000",
                      "--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp:rw,mode=1777,size=256m",
                      "--cap-drop", "ALL", "--security-opt", "no-new-privileges", f"--cpus={CPUS}",
                      "--memory", "2g", "--health-interval", "disable", image_ref)
        try:
            if not check.add("container starts", run.returncode == 0,
                             **({} if run.returncode == 0 else {"stderr": run.stderr[-500:]})):
                return record
            cold = _wait_ready(base, 300)
            record["cold_start_s"] = round(time.monotonic() - started, 1) if cold is not None else None
            if not check.add("ready (/readyz 200) after cold start", cold is not None,
                             seconds=record["cold_start_s"]):
                record["container_log"] = _podman("logs", name).stdout[-3000:]
                return record
            _checks_inside(check, name, image_ref)
            _checks_apis(check, base, outside, name, models_pinned)
            _check_sigterm(check, base, outside, name, record)
        finally:
            record["container_log_tail"] = _podman("logs", "--tail", "15", name).stdout.splitlines()
            _podman("rm", "-f", "-t", "0", name)
    record["ok"] = all(c["ok"] for c in check.checks)
    return record


def _size_breakdown(image_ref: str) -> dict[str, Any]:
    """Where the image's megabytes are: the Python packages (largest first), the models, our code (MB)."""
    script = ("cd /app/.venv/lib/python3*/site-packages && du -sk * | sort -rn | head -n 12; "
              "echo $(du -sk /app/.venv | cut -f1) total; echo $(du -skL $BENTO_PATH/models | cut -f1) models; "
              "echo $(du -sk $BENTO_PATH/src | cut -f1) src; echo $(($(cat $BENTO_PATH/models/*/*/model.ts | wc -c) "
              "/ 1024)) torchscript")
    rows = [line.split(None, 1) for line in _podman("run", "--rm", "--entrypoint", "sh", image_ref, "-c",
                                                    script).stdout.splitlines()]
    mb = {name: round(int(kb) / 1024, 1) for kb, name in (r for r in rows if len(r) == 2 and r[0].isdigit())}
    totals = {k: mb.pop(k, None) for k in ("total", "models", "src", "torchscript")}
    return {"python_packages": totals["total"], "largest_packages": mb, "models": totals["models"],
            "of_which_torchscript_copies": totals["torchscript"], "our_code": totals["src"]}


def _checks_inside(check: Check, name: str, image_ref: str) -> None:
    uid = _podman("exec", name, "id", "-u").stdout.strip()
    user = _podman("image", "inspect", image_ref, "--format", "{{.Config.User}}").stdout.strip()
    check.add("runs as a non-root user", uid not in ("", "0"), uid=uid, image_user=user)
    write = _podman("exec", name, "sh", "-c", "touch /home/bentoml/bento/x; touch /tmp/x && echo tmp-ok")
    check.add("root filesystem read-only, /tmp writable",
              "Read-only file system" in write.stderr and "tmp-ok" in write.stdout, stderr=write.stderr.strip())
    health = _podman("image", "inspect", image_ref, "--format", "{{json .HealthCheck}}").stdout.strip()
    run = _podman("healthcheck", "run", name)
    check.add("HEALTHCHECK on /readyz passes", run.returncode == 0 and "/readyz" in health,
              healthcheck=json.loads(health or "null"), podman_healthcheck_run=run.returncode)
    probe = _podman("exec", "-w", "/home/bentoml/bento/src", name, "python", "-c",
                    "import json, os, importlib.metadata as md; import onnxruntime as ort; "
                    "from serving.runtime import RuntimeConfig, container_cpu_limit; "
                    "names = {d.metadata['Name'].lower() for d in md.distributions()}; "
                    "print(json.dumps({'os_cpu_count': os.cpu_count(), 'cpu_limit': container_cpu_limit(), "
                    "'intra_op_threads': RuntimeConfig.from_env().intra_op_threads, 'ort': ort.__version__, "
                    "'providers': ort.get_available_providers(), 'onnxruntime_gpu': 'onnxruntime-gpu' in names, "
                    "'torch': 'torch' in names}))")
    seen = json.loads(probe.stdout) if probe.returncode == 0 else {"error": probe.stderr[-500:]}
    check.add(f"ONNX Runtime threads follow the CPU limit (--cpus={CPUS}), not the host's cores",
              seen.get("cpu_limit") == math.ceil(CPUS) and seen.get("intra_op_threads") == math.ceil(CPUS), **seen)
    check.add("ONNX Runtime's CPU build, no torch", not seen.get("onnxruntime_gpu", True) and not seen.get("torch")
              and "CUDAExecutionProvider" not in seen.get("providers", []), providers=seen.get("providers"))


def _checks_apis(check: Check, base: str, outside: str, name: str, models: dict[str, str]) -> None:
    inside_models = httpx.post(f"{base}/models", timeout=30).json()
    served = {m["name"]: f"{m['name']}:{m['version']}" for m in inside_models["models"]}
    check.add("/models: the pinned models, on the CPU provider", served == models and not inside_models["problems"]
              and all(m["provider"] == "CPUExecutionProvider" for m in inside_models["models"]), served=served)
    ids = []
    # the default digit model is digits-lenet (./dlbook up); brief test runs export digits-mlp
    digit_model = next((n for n in models if n.startswith("digits-")), "digits-lenet")
    for api, spec in _requests(digit_model).items():
        request_id = "check-" + re.sub(r"[^a-z]+", "-", api.split(" /")[1].lower()).strip("-")
        ids.append((request_id, spec["path"]))
        status_in, inside = _ask(base, spec, request_id)
        status_out, outside_answer = _ask(outside, spec, request_id + "-outside")
        same, seen = _same(api, inside, outside_answer) if status_in == status_out == 200 else (False, {
            "inside": status_in, "outside": status_out})
        check.add(f"{api}: same answer inside and outside the container", same, **seen)
    time.sleep(0.5)
    log_path = _podman("inspect", name, "--format", "{{.HostConfig.LogConfig.Path}}").stdout.strip()
    lines = Path(log_path).read_text(errors="replace").splitlines() if log_path else []
    per_request = {}
    for request_id, path in ids:
        mine = [line for line in lines if f"[request {request_id}]" in line]
        per_request[request_id] = mine[0].split(" F ", 1)[-1] if len(mine) == 1 else mine
        if len(mine) != 1 or " stdout " not in mine[0] or f"POST {path} 200" not in mine[0]:
            per_request[request_id] = {"lines": mine}
    check.add("one log line per request, on stdout", all(isinstance(v, str) for v in per_request.values()),
              lines=per_request)


def _check_sigterm(check: Check, base: str, outside: str, name: str, record: dict[str, Any]) -> None:
    params = [{"seed": 11 + i, "n": 8, "lines": 8, "chars_per_clause": 7} for i in range(4)]
    expected = [httpx.post(f"{outside}/generate_poem", json=p, timeout=60).json()["poems"] for p in params]
    pid = int(_podman("inspect", name, "--format", "{{.State.Pid}}").stdout.strip())
    seen = asyncio.run(_streams_through_sigterm(base, pid, params))
    waited = _podman("wait", name, timeout=GRACE_S + 30)
    exited_s = time.monotonic() - seen["sent"]
    streams = []
    for body, ended, want in zip(seen["bodies"], seen["ended_at"], expected, strict=True):
        events = _sse(body)
        done = [d for k, d in events if k == "done"]
        streams.append({"chars_streamed": sum(1 for k, _ in events if k == "token"),
                        "ended_ms_after_sigterm": round((ended - seen["sent"]) * 1e3, 1) if ended else None,
                        "ends_with": events[-1][0] if events else None,
                        "same_poems_as_outside": bool(done) and done[0]["poems"] == want})
    in_flight = [s for s in streams if (s["ended_ms_after_sigterm"] or -1) > 0]
    record["sigterm"] = {"streams": streams, "late_connection": seen["late_connection"],
                         "exit_code": waited.stdout.strip(), "exited_s_after_sigterm": round(exited_s, 1),
                         "client_errors": seen["errors"]}
    check.add("SIGTERM during poem streams: every stream ends with `done` and the same poems as outside",
              not seen["errors"] and in_flight and all(s["ends_with"] == "done" and s["same_poems_as_outside"]
                                                       for s in streams),
              streams=streams)
    check.add("SIGTERM: new connections refused, container exits 0 within the grace period",
              seen["late_connection"] != 200 and waited.stdout.strip() == "0" and exited_s < GRACE_S + 5,
              late_connection=seen["late_connection"], exit_code=waited.stdout.strip(),
              exited_s_after_sigterm=round(exited_s, 1))


def markdown(record: dict[str, Any]) -> str:
    build = record.get("build", {})
    lines = [f"# Container check ({record['when']})", "",
             f"`{record['command']}` on this project's machine: {record['host']['cpus']} CPUs, kernel "
             f"{record['host']['kernel']}, {record['host']['podman']} with runc. Verdict: "
             f"**{'all checks passed' if record.get('ok') else 'FAILED'}**.", "",
             f"- source: {record.get('source')}",
             f"- image `{record['image']}`: {record.get('size_mb')} MB (base `{build.get('base_image')}`, "
             f"{round((build.get('base_size_bytes') or 0) / 1e6)} MB); where the rest is, in MB: "
             f"{json.dumps(record.get('size_breakdown_mb'))}",
             f"- models: {', '.join(build.get('models', []))}",
             f"- build: {json.dumps(build.get('seconds'))} (fresh: {build.get('fresh')})",
             f"- cold start (podman run → /readyz 200, --cpus={CPUS}): {record.get('cold_start_s')} s", "",
             "| check | ok | seen |", "|---|---|---|"]
    for c in record["checks"]:
        seen = {k: v for k, v in c.items() if k not in ("name", "ok")}
        text = json.dumps(seen, ensure_ascii=False).replace("|", "\\|")
        lines.append(f"| {c['name']} | {'yes' if c['ok'] else '**no**'} | {text[:600]} |")
    if record.get("sigterm"):
        lines += ["", f"SIGTERM: {json.dumps(record['sigterm'])}"]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated model names (default: bentofile.yaml's)")
    parser.add_argument("--image", help="check this image instead of building one")
    parser.add_argument("--fresh", action="store_true", help="build from nothing (first-build time)")
    parser.add_argument("--record", type=Path, help="write the record here (JSON, and Markdown beside it)")
    args = parser.parse_args(argv)
    record = run_check(args.models.split(",") if args.models else None, image_ref=args.image, fresh=args.fresh)
    if args.record:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        args.record.with_suffix(".md").write_text(markdown(record))
    print(json.dumps({k: record.get(k) for k in ("image", "size_mb", "cold_start_s", "ok")}))
    return 0 if record.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
