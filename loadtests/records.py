"""One small JSON record per benchmark invocation, committed under ``docs/bench/``.

Every published performance figure is computed by :mod:`loadtests.report` from these records, so a
reader can see the run behind each number. A record holds what was measured (the benchmark's
summary, not every raw sample) and the facts needed to judge it: the exact command line, the git
commit (and which tracked files differed from it), the CPU model, core count and load average before
and after, and when it ran. File name: ``<benchmark>-<UTC date and time>-<short commit>.json``.

Each benchmark script calls :func:`begin` first thing (load average before anything starts) and
:func:`write` at the end; ``--record-dir`` (default ``docs/bench``) says where, ``--no-record`` skips it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RECORD_DIR = REPO / "docs" / "bench"
LOCK = Path("/tmp/dlbook-bench.lock")
SCHEMA = 1
# Options that only say where output goes: left out of the command that identifies a series.
OUTPUT_OPTIONS = ("--record-dir", "--json", "--markdown", "--out")
REQUIRED = ("schema", "benchmark", "started", "finished", "wall_s", "commit", "dirty", "command", "argv",
            "series", "config", "machine", "result")
REQUIRED_MACHINE = ("cpu_model", "cores", "load_before", "load_after", "python", "platform")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--record-dir", type=Path, default=RECORD_DIR,
                        help="write this invocation's record here (default: docs/bench, committed; "
                             "use a scratch folder for trial runs)")
    parser.add_argument("--no-record", action="store_true", help="write no record")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def git_state(repo: Path = REPO) -> tuple[str, list[str]]:
    """(full commit, tracked files that differ from it); ("unknown", []) outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True).stdout

    commit = git("rev-parse", "HEAD").strip() or "unknown"
    dirty = sorted(line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line)
    return commit, dirty


def held_by_ancestor(path: Path = LOCK) -> bool:
    """Whether a flock on ``path`` is held by this process or one of its ancestors (e.g. ``flock(1)``).

    /proc/locks names the holder's pid; the ancestors are read from /proc/<pid>/stat.
    """
    try:
        st = path.stat()
        locks = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return False
    ancestors, pid = set(), os.getpid()
    while pid > 1 and pid not in ancestors:
        ancestors.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    for line in locks:
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK" or not fields[4].isdigit():
            continue
        inode = fields[5].rsplit(":", 1)[-1]
        if inode.isdigit() and int(inode) == st.st_ino and int(fields[4]) in ancestors:
            return True
    return False


@contextlib.contextmanager
def bench_lock(path: Path = LOCK) -> Iterator[None]:
    """Exclusive flock on /tmp/dlbook-bench.lock, as ``flock /tmp/dlbook-bench.lock CMD`` takes it.

    Already held by an ancestor (the run was wrapped in ``flock``): nothing to take, since taking it
    again through a new open file would wait forever on our own parent.
    """
    if held_by_ancestor(path):
        print(f"{path} is already held by a parent process (flock); going on under it", flush=True)
        yield
        return
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for {path} (another benchmark is running) ...", flush=True)
            began = time.monotonic()
            fcntl.flock(handle, fcntl.LOCK_EX)
            print(f"  got it after {time.monotonic() - began:.0f} s", flush=True)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def script_as_typed(script: str) -> str:
    """``script`` relative to the repository root when it lies inside it.

    ``python -m training`` puts the absolute path of ``training/__main__.py`` in ``sys.argv[0]``; kept
    as it is, the same command run from another checkout (CI clones to its own folder) would look like
    another series.
    """
    resolved = Path(script).resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else script


def command_line(argv: list[str]) -> str:
    """The command as typed from the repository root: ``python loadtests/<script>.py --flag …``."""
    return shlex.join(["python", script_as_typed(argv[0]), *argv[1:]])


def series_command(argv: list[str]) -> str:
    """The command without its output options: invocations with the same series command are repeats."""
    kept, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in OUTPUT_OPTIONS or name == "--no-record":
            skip = "=" not in arg and name != "--no-record"
            continue
        kept.append(arg)
    return command_line([argv[0], *kept])


def plain(value: Any) -> Any:
    """``value`` with paths as strings, tuples as lists and NaN/inf as null, so it is plain JSON."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class Recording:
    """One invocation, from :func:`begin` to :func:`write`."""

    benchmark: str
    argv: list[str]
    config: dict[str, Any]
    record_dir: Path | None
    started: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    began: float = field(default_factory=time.monotonic)
    load_before: list[float] = field(default_factory=load_average)
    lock_held: bool = field(default_factory=held_by_ancestor)


def begin(benchmark: str, args: argparse.Namespace | None = None, *, argv: list[str] | None = None,
          config: dict[str, Any] | None = None) -> Recording:
    """Start a record: call first, so the load average is the machine's before the benchmark's servers."""
    if config is None:
        config = {k: v for k, v in vars(args or argparse.Namespace()).items()
                  if k not in ("record_dir", "no_record", "json", "markdown", "out")}
    record_dir = None if args is not None and getattr(args, "no_record", False) else getattr(
        args, "record_dir", RECORD_DIR)
    argv = list(argv if argv is not None else sys.argv)
    if argv:
        argv[0] = script_as_typed(argv[0])
    return Recording(benchmark, argv, plain(config), record_dir)


def build(recording: Recording, result: dict[str, Any], *, finished: dt.datetime | None = None,
          load_after: list[float] | None = None, lock_held: bool | None = None) -> dict[str, Any]:
    """The record as a dict (what :func:`write` saves)."""
    commit, dirty = git_state()
    finished = finished or dt.datetime.now(dt.UTC)
    return {
        "schema": SCHEMA,
        "benchmark": recording.benchmark,
        "started": recording.started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "finished": finished.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "wall_s": round(time.monotonic() - recording.began, 1),
        "commit": commit,
        "dirty": dirty,
        "command": command_line(recording.argv),
        "argv": recording.argv,
        "series": series_command(recording.argv),
        "config": recording.config,
        "machine": {"cpu_model": cpu_model(), "cores": os.cpu_count(), "load_before": recording.load_before,
                    "load_after": load_after if load_after is not None else load_average(),
                    "python": platform.python_version(), "platform": platform.platform(),
                    "bench_lock_held": recording.lock_held if lock_held is None else lock_held},
        "environment": {k: v for k, v in sorted(os.environ.items())
                        if k.startswith("DLBOOK_") and k != "DLBOOK_API_KEY"},
        "result": plain(result),
    }


def file_name(record: dict[str, Any]) -> str:
    stamp = record["started"].replace("-", "").replace(":", "")
    return f"{record['benchmark']}-{stamp}-{record['commit'][:7]}.json"


def write(recording: Recording, result: dict[str, Any]) -> Path | None:
    """Write the record into the recording's folder; return its path (None with ``--no-record``)."""
    if recording.record_dir is None:
        return None
    record = build(recording, result)
    recording.record_dir.mkdir(parents=True, exist_ok=True)
    path = recording.record_dir / file_name(record)
    path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    shown = path.resolve().relative_to(REPO) if path.resolve().is_relative_to(REPO) else path
    print(f"record: {shown}", flush=True)
    return path


def model_versions(names: list[str]) -> dict[str, str]:
    """``name → name:version`` of the models the benchmark's servers load (the store's latest)."""
    import bentoml

    found = {}
    for name in names:
        try:
            found[name] = str(bentoml.models.get(f"{name}:latest").tag)
        except Exception as err:  # noqa: BLE001 - a record says what it could not find
            found[name] = f"unknown ({type(err).__name__})"
    return found


def validate(record: Any) -> list[str]:
    """What is missing or malformed in a record (empty when it is sound)."""
    if not isinstance(record, dict):
        return ["not a JSON object"]
    problems = [f"missing {key}" for key in REQUIRED if key not in record]
    machine = record.get("machine")
    if isinstance(machine, dict):
        problems += [f"missing machine.{key}" for key in REQUIRED_MACHINE if key not in machine]
        if not isinstance(machine.get("cores"), int) or machine.get("cores", 0) < 1:
            problems.append("machine.cores is not a positive integer")
    elif "machine" in record:
        problems.append("machine is not an object")
    if "result" in record and not isinstance(record["result"], dict):
        problems.append("result is not an object")
    if "commit" in record and not (isinstance(record["commit"], str) and record["commit"]):
        problems.append("commit is empty")
    if "command" in record and not str(record["command"]).startswith("python "):
        problems.append("command does not start with python")
    return problems
