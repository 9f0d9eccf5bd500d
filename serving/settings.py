"""Every serving setting in one typed place, read from the environment once per process.

``Settings.from_env()`` is the only code in ``serving/`` that reads ``DLBOOK_*`` variables: a worker
builds it once at start (``current()``), and passes it to what it starts (the request guard, the
model loader, ONNX Runtime, the batchers), so no request reads the environment and no setting has
two readers that could disagree. Each field names its variable, its default and why it exists; the
README's table of switches is generated from these fields (``python -m serving.settings --markdown``,
checked by ``tests/test_settings.py``).

A variable that looks like ours but is not a setting (a misspelt ``DLBOOK_MAX_IMAGES``, one ``S`` short)
would otherwise leave the default silently in force, so ``current()`` warns about each one once, naming
the closest known name. Names the rest of the project reads (training, tests, load tests, the
container check) are listed in ``ELSEWHERE`` so that they are not warned about.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from functools import cache
from types import MappingProxyType
from typing import Any

logger = logging.getLogger("dlbook.serving")

TASKS = ("image", "price", "poem")  # the model labels exports carry (meta.json "task")

# DLBOOK_* names read outside serving/, each by the code named here: known, so never warned about.
ELSEWHERE: dict[str, str] = {
    "DLBOOK_DATA": "training/datasets: where the data sets are",
    "DLBOOK_DATA_ONLY": "training/datasets: look only in DLBOOK_DATA",
    "DLBOOK_RUNS": "training: where runs are written",
    "DLBOOK_PROCESSED": "training: where processed data is cached",
    "DLBOOK_TEST_DATA": "tests/conftest.py: samples or full data",
    "DLBOOK_CONTAINER_TESTS": "tests/test_container.py: run the container tests",
    "DLBOOK_CHROMIUM": "tests/test_playground.py: the browser to drive",
    "DLBOOK_CHECK_SOURCE": "deploy/container/check.py: the source revision to record",
    "DLBOOK_TRITON_PYTHON": "loadtests/peers: the interpreter for Triton",
    "DLBOOK_LT_SERVICE": "loadtests/locustfile.py: which users to run",
    "DLBOOK_LT_P95_MS": "loadtests/locustfile.py: the p95 budget",
    "DLBOOK_LT_P95_SCALE": "loadtests/locustfile.py: scales the p95 budget",
    "DLBOOK_LT_MAX_FAIL_RATIO": "loadtests/locustfile.py: the failure budget",
    "DLBOOK_LT_MALFORMED_SHARE": "loadtests/locustfile.py: share of malformed requests",
    "DLBOOK_LT_POEM_CHARS": "loadtests/locustfile.py: poem prompt characters",
    "DLBOOK_LT_DIGITS_MODEL": "loadtests/locustfile.py: the digit model to ask for",
}

# ----- how a value is read ---------------------------------------------------------------------------


def _int(text: str) -> int:
    return int(text)


def _float(text: str) -> float:
    return float(text)


def _text(text: str) -> str:
    return text


def _upper(text: str) -> str:
    return text.upper()


def _on(text: str) -> bool:
    """A switch that is off unless set to 1."""
    return text == "1"


def _not_off(text: str) -> bool:
    """A switch that is on unless set to 0."""
    return text != "0"


def _workers(text: str) -> int | str:
    """A number of worker processes, or BentoML's ``cpu_count``."""
    text = text.strip()
    return int(text) if text.isdigit() else text


def _setting(env: str, default: Any, parse: Callable[[str], Any], why: str, shown: str | None = None) -> Any:
    """A field read from ``env`` with ``parse`` (unset or empty: ``default``); ``why`` and ``shown`` (the
    default as the README shows it, when its repr would not say it) document it."""
    return field(default=default, metadata={"env": env, "parse": parse, "why": why, "shown": shown})


def _pattern(env: str, kind: str, why: str) -> Any:
    """A field filled from every variable matching ``env`` (``<TASK>``/``<NAME>`` stand for a part);
    ``kind`` says what each variable holds."""
    return field(default_factory=lambda: MappingProxyType({}),
                 metadata={"env": env, "kind": kind, "why": why, "pattern": True})


# ----- the settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The serving settings of one process. Build it with ``from_env`` (or take ``current()``)."""

    # access
    api_key: str | None = _setting(
        "DLBOOK_API_KEY", None, _text, "when set, every endpoint but /livez, /readyz, /metrics, the API docs and "
        "the /ui/ page needs `Authorization: Bearer <key>`", shown="unset: no key")
    # which models
    task_models: Mapping[str, tuple[str, ...]] = _pattern(
        "DLBOOK_<TASK>_MODELS", "model names", "the models a service loads for a task (`image`, `price`, `poem`), "
        "comma-separated, e.g. `DLBOOK_IMAGE_MODELS=fashion-lenet,digits-mlp`; unset: every exported one of that task")
    default_models: Mapping[str, str] = _pattern(
        "DLBOOK_DEFAULT_<TASK>_MODEL", "model name", "the model a request gets when it names none; unset: "
        "`fashion-lenet`, `house-price`, `tang-poem` (else the first loaded)")
    model_pins: Mapping[str, str] = _pattern(
        "DLBOOK_MODEL_<NAME>", "name:version", "pins a model's version: the name upper-cased, dashes as "
        "underscores, e.g. `DLBOOK_MODEL_FASHION_LENET=fashion-lenet:<version>`; unset: `<name>:latest`")
    prefer_int8: bool = _setting(
        "DLBOOK_PREFER_INT8", False, _on, "1 serves `model.int8.onnx` where export shipped one and it is safe on "
        "this CPU (docs/QUANTIZATION.md)")
    # ONNX Runtime
    device: str = _setting("DLBOOK_DEVICE", "auto", _text, "`cpu` ignores a GPU even when CUDA is there")
    ort_intra_threads: int | None = _setting(
        "DLBOOK_ORT_INTRA_THREADS", None, _int, "ORT threads per session; unset: the process's CPU limit (its "
        "cgroup quota, e.g. a container's `--cpus` or a pod's `limits.cpu`); without a limit, or 0, ORT picks one "
        "per core of the host", shown="the CPU limit")
    ort_inter_threads: int = _setting("DLBOOK_ORT_INTER_THREADS", 0, _int, "ORT inter-op threads (0: ORT picks)")
    ort_spin: bool = _setting(
        "DLBOOK_ORT_SPIN", False, _on, "1 lets idle ORT threads spin-wait (ORT's own default; ours is off: they "
        "burn the cores the HTTP path needs, docs/PERFORMANCE.md)")
    ort_optimisation: str = _setting(
        "DLBOOK_ORT_OPTIMISATION", "all", _text, "ORT graph optimisation: `disable`, `basic`, `extended` or `all`")
    # request limits
    max_body_bytes: int = _setting(
        "DLBOOK_MAX_BODY_BYTES", 12 * 1024 * 1024, _int, "larger request bodies are refused with 413",
        shown="12 MiB")
    max_images: int = _setting("DLBOOK_MAX_IMAGES", 64, _int, "images per request")
    max_records: int = _setting("DLBOOK_MAX_RECORDS", 1000, _int, "house records per request")
    max_poems: int = _setting("DLBOOK_MAX_POEMS", 8, _int, "poems per request")
    generation_timeout_s: float = _setting(
        "DLBOOK_GENERATION_TIMEOUT_S", 30.0, _float, "a poem request still writing after this many seconds is "
        "answered 503")
    request_timeout_s: float = _setting(
        "DLBOOK_REQUEST_TIMEOUT_S", 60.0, _float, "seconds an API request may take (BentoML's and the direct "
        "routes' budget; 504 beyond)")
    # batching
    max_batch: int = _setting("DLBOOK_MAX_BATCH", 256, _int, "rows per ONNX Runtime call (images, houses)")
    max_poem_batch: int = _setting("DLBOOK_MAX_POEM_BATCH", 64, _int, "live poems per decoding step")
    inline_rows: int = _setting(
        "DLBOOK_INLINE_ROWS", 16, _int, "a lone image/house request of at most this many rows runs on the "
        "event loop (a thread hop costs more than a small batch); a batch of several requests runs in a thread")
    stream_flush_ms: float = _setting(
        "DLBOOK_STREAM_FLUSH_MS", 20.0, _float, "a poem stream writes its events at most this often, the first "
        "character at once; 0 writes every character on its own")
    # load and workers
    max_in_flight: int = _setting(
        "DLBOOK_MAX_IN_FLIGHT", 32, _int, "API requests one worker executes at once; the next ones wait for a "
        "slot (serving/admission.py; 0: no limit). One worker peaks by 32; more only queue inside it, where "
        "the admission order cannot reach (docs/PERFORMANCE.md, overload)")
    max_waiting: int = _setting(
        "DLBOOK_MAX_WAITING", 1024, _int, "API requests that may wait for a slot; one more is answered at once "
        "with 503 and `Retry-After: 1`, counted in `dlbook_shed_total` (0: refuse instead of waiting)")
    max_wait_ms: float = _setting(
        "DLBOOK_MAX_WAIT_MS", 1000.0, _float, "the longest a request waits for a slot; then 503 and "
        "`Retry-After: 1` (a closed-loop client that waits sends nothing meanwhile: refusing at once made "
        "goodput fall with load, docs/PERFORMANCE.md)")
    newest_first_after_ms: float = _setting(
        "DLBOOK_NEWEST_FIRST_AFTER_MS", 20.0, _float, "once the oldest waiting request has waited this long, "
        "freed slots go to the newest first (adaptive LIFO: under overload the accepted requests stay fast and "
        "the oldest run out their wait; 0: always arrival order)")
    max_queue_ms: float = _setting(
        "DLBOOK_MAX_QUEUE_MS", 100.0, _float, "API requests are also shed while the event loop runs this late "
        "(serving/admission.py; 0: never)")
    workers: int | str = _setting(
        "DLBOOK_WORKERS", 1, _workers, "worker processes per service, a number or `cpu_count`; each loads its own "
        "models and batches its own requests. 1: poems lose with more on 2 cores; `cpu_count` for a service "
        "of images or prices only (docs/PERFORMANCE.md, How many workers)")
    direct_routes: bool = _setting(
        "DLBOOK_DIRECT_ROUTES", True, _not_off, "0 sends every request through BentoML's request path instead of "
        "answering the API routes from our request guard (docs/PERFORMANCE.md)", shown="1")
    # logs, metrics, traces
    log_level: str = _setting(
        "DLBOOK_LOG_LEVEL", "INFO", _upper, "INFO: one line per API request (`POST /classify 200 1.4ms "
        "[request <id>]`) and every refusal with its reason; WARNING keeps failures only")
    bentoml_access_log: bool = _setting(
        "DLBOOK_BENTOML_ACCESS_LOG", False, _on, "1 adds BentoML's own access line (with trace ids) to ours")
    bentoml_metrics: bool = _setting(
        "DLBOOK_BENTOML_METRICS", False, _on, "1 keeps BentoML's own request metrics and /metrics route (off: a "
        "third of a small request's CPU; ours cover the same ground)")
    tracing: bool = _setting(
        "DLBOOK_TRACING", False, _on, "1 keeps BentoML's OpenTelemetry spans on the API routes (configure an "
        "exporter in BentoML's `tracing` settings; off: a tenth of a small request's CPU)")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings ``environ`` (default: this process's environment) gives; a value that does not
        parse raises ``ValueError`` naming its variable."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for spec in fields(cls):
            if spec.metadata.get("pattern"):
                continue
            text = environ.get(spec.metadata["env"], "").strip()
            if text:
                try:
                    values[spec.name] = spec.metadata["parse"](text)
                except ValueError as err:
                    raise ValueError(f"{spec.metadata['env']}={text!r} is not valid: {err}") from err
        task_models, default_models, pins = {}, {}, {}
        for name, value in environ.items():
            if (task := _task_of(name, "_MODELS")) and (names := [v.strip() for v in value.split(",") if v.strip()]):
                task_models[task] = tuple(names)
            elif (task := _task_of(name, "_MODEL", "DLBOOK_DEFAULT_")) and value.strip():
                default_models[task] = value.strip()
            elif name.startswith("DLBOOK_MODEL_") and len(name) > len("DLBOOK_MODEL_") and value.strip():
                pins[name.removeprefix("DLBOOK_MODEL_")] = value.strip()
        return cls(**values, task_models=MappingProxyType(task_models), default_models=MappingProxyType(default_models),
                   model_pins=MappingProxyType(pins))

    # ----- what the settings mean ------------------------------------------------------------------

    def models_for(self, task: str) -> list[str] | None:
        """The models ``DLBOOK_<TASK>_MODELS`` names for ``task``, or None: every exported one."""
        names = self.task_models.get(task)
        return list(names) if names else None

    def default_model(self, task: str, fallback: str) -> str:
        return self.default_models.get(task, fallback)

    def pinned_tag(self, name: str) -> str:
        """``name``'s pinned ``name:version`` (``DLBOOK_MODEL_<NAME>``), else ``name:latest``."""
        return self.model_pins.get(name.upper().replace("-", "_"), f"{name}:latest")

    @property
    def prefer_cuda(self) -> bool:
        return self.device != "cpu"

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1e3

    @property
    def newest_first_after_s(self) -> float:
        return self.newest_first_after_ms / 1e3

    @property
    def queue_budget_s(self) -> float:
        """``max_queue_ms`` in seconds: the loop lateness above which API requests are shed (0: never)."""
        return self.max_queue_ms / 1e3


def _task_of(name: str, suffix: str, prefix: str = "DLBOOK_") -> str | None:
    """The task in ``<prefix><TASK><suffix>`` when it is one of ``TASKS``."""
    if not (name.startswith(prefix) and name.endswith(suffix)):
        return None
    task = name[len(prefix):len(name) - len(suffix)].lower()
    return task if task in TASKS else None


def setting_fields() -> list[Field]:
    return list(fields(Settings))


def known_names() -> list[str]:
    """Every DLBOOK_* name this project reads, with each pattern written out for each task."""
    names = [f.metadata["env"] for f in fields(Settings) if not f.metadata.get("pattern")]
    names += [f"DLBOOK_{task.upper()}_MODELS" for task in TASKS]
    names += [f"DLBOOK_DEFAULT_{task.upper()}_MODEL" for task in TASKS]
    return names + list(ELSEWHERE)


def is_known(name: str) -> bool:
    """A setting, a name used elsewhere in the project, or an instance of a pattern."""
    return (name in known_names() or bool(_task_of(name, "_MODELS"))
            or bool(_task_of(name, "_MODEL", "DLBOOK_DEFAULT_"))
            or (name.startswith("DLBOOK_MODEL_") and len(name) > len("DLBOOK_MODEL_")))


def unknown_names(environ: Mapping[str, str]) -> dict[str, str | None]:
    """Each ``DLBOOK_*`` name in ``environ`` that nothing reads, with the closest known name (or None)."""
    known = known_names()
    found: dict[str, str | None] = {}
    for name in sorted(environ):
        if name.startswith("DLBOOK_") and not is_known(name):
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            found[name] = close[0] if close else None
    return found


def warn_unknown(environ: Mapping[str, str]) -> None:
    """One warning per unknown ``DLBOOK_*`` name: a typo must not silently leave a default in force."""
    for name, close in unknown_names(environ).items():
        hint = f"; did you mean {close}?" if close else ""
        logger.warning("%s is set but is not a setting: it has no effect%s (settings: serving/settings.py)",
                       name, hint)


@cache
def current() -> Settings:
    """This process's settings, read (and checked for unknown names) once, at the first call."""
    warn_unknown(os.environ)
    return Settings.from_env()


# ----- the README's table ----------------------------------------------------------------------------

README_START = "<!-- generated: settings -->"
README_END = "<!-- end generated -->"


def _shown_default(spec: Field) -> str:
    if spec.metadata.get("shown"):
        return spec.metadata["shown"]
    if spec.metadata.get("pattern"):
        return "unset"
    default = spec.default if spec.default is not MISSING else None
    if isinstance(default, bool):
        return "1" if default else "0"
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return "unset" if default is None else str(default)


_KINDS = {"bool": "0 or 1", "int | None": "int", "str | None": "text", "int | str": "int or `cpu_count`", "str": "text"}


def markdown_table() -> str:
    """The README's table of settings: variable, what it holds, default, what it does."""
    rows = ["| Variable | Value | Default | What it does |", "|---|---|---|---|"]
    for spec in fields(Settings):
        kind = spec.metadata.get("kind") or _KINDS.get(str(spec.type), str(spec.type))
        why = spec.metadata["why"].replace("|", "\\|")
        rows.append(f"| `{spec.metadata['env']}` | {kind} | {_shown_default(spec)} | {why} |")
    return "\n".join(rows)


def with_table(readme: str) -> str:
    """``readme`` with the text between the settings markers replaced by ``markdown_table()``."""
    pattern = re.compile(re.escape(README_START) + r".*?" + re.escape(README_END), re.DOTALL)
    if not pattern.search(readme):
        raise ValueError(f"the README has no {README_START} … {README_END} block")
    return pattern.sub(lambda _: f"{README_START}\n{markdown_table()}\n{README_END}", readme, count=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the README's table of settings")
    parser.add_argument("--write-readme", metavar="PATH", help="rewrite the table inside this README")
    args = parser.parse_args(argv)
    if args.write_readme:
        with open(args.write_readme, encoding="utf-8") as fh:
            text = fh.read()
        with open(args.write_readme, "w", encoding="utf-8") as fh:
            fh.write(with_table(text))
    elif args.markdown:
        print(markdown_table())
    else:
        for spec in fields(Settings):
            print(f"{spec.metadata['env']}={getattr(current(), spec.name)!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
