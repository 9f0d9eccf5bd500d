"""``python -m loadtests.report``: the performance tables of the docs, written from the committed records.

    python -m loadtests.report          # rewrite the generated sections of PERFORMANCE.md, RELIABILITY.md, README.md
    python -m loadtests.report --check  # exit 1 if any generated section differs from what the records give

Every benchmark invocation leaves one record in ``docs/bench/`` (:mod:`loadtests.records`). For each
table this picks a *series*: the records of one benchmark with the same command (output options
aside) at the same commit. A series of at least three invocations wins over a shorter one, and the
newest series wins among equals. Every figure is the median over the series' invocations with its
min–max (each invocation's own figure is already its median over its rounds); a table whose series
has fewer than three invocations says so and publishes no median. Only the text between
``<!-- generated: NAME -->`` and ``<!-- end generated -->`` is written; everything else in the docs
is left as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RECORD_DIR = REPO / "docs" / "bench"
MIN_INVOCATIONS = 3
END = "<!-- end generated -->"
MARKER = re.compile(r"<!-- generated: ([\w.-]+) -->\n(.*?)" + re.escape(END), re.S)

Record = dict[str, Any]


# ---- records and series ------------------------------------------------------------------------------------------


def load_records(folder: Path = RECORD_DIR) -> list[Record]:
    """Every record in ``folder``, oldest first, each with its file name under ``_file``."""
    found = []
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        record["_file"] = path.name
        found.append(record)
    return sorted(found, key=lambda r: (r.get("started", ""), r["_file"]))


def env_of(config: dict[str, Any]) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in config.get("env") or [] if "=" in kv)


def workers(config: dict[str, Any]) -> int:
    value = env_of(config).get("DLBOOK_WORKERS", "1")
    return int(value) if value.isdigit() else 0


@dataclass(frozen=True)
class Series:
    """Invocations of one command at one commit."""

    records: tuple[Record, ...]

    @property
    def n(self) -> int:
        return len(self.records)

    @property
    def complete(self) -> bool:
        return self.n >= MIN_INVOCATIONS

    @property
    def command(self) -> str:
        return self.records[0]["series"]

    @property
    def commit(self) -> str:
        return self.records[0]["commit"][:7]

    def values(self, get: Callable[[Record], float | None]) -> list[float]:
        """``get`` of every invocation (those where it is missing left out)."""
        out = []
        for record in self.records:
            try:
                value = get(record["result"])
            except (KeyError, TypeError, ZeroDivisionError, IndexError):
                value = None
            if value is not None:
                out.append(float(value))
        return out


def pick(records: list[Record], benchmark: str, wanted: Callable[[dict[str, Any]], bool],
         previous: bool = False, at_commit: str | None = None) -> Series | None:
    """The series a table shows: the newest with ≥ 3 invocations, else the newest there is (or None).
    ``previous``: the complete series before that one (a table of "before" beside "after"), or None.
    ``at_commit``: the series recorded at that commit (a fixed "before" that later series do not push out)."""
    groups: dict[tuple[str, str], list[Record]] = {}
    for record in records:
        if record.get("benchmark") != benchmark:
            continue
        try:
            if not wanted(record.get("config", {})):
                continue
        except (KeyError, TypeError, ValueError):
            continue
        if at_commit and not record["commit"].startswith(at_commit):
            continue
        groups.setdefault((record["series"], record["commit"]), []).append(record)
    if not groups:
        return None
    series = [Series(tuple(g)) for g in groups.values()]
    newest_first = sorted(series, key=lambda s: max(r["started"] for r in s.records), reverse=True)
    complete = [s for s in newest_first if s.complete]
    if previous:
        return complete[1] if len(complete) > 1 else None
    return (complete or newest_first)[0]


# ---- formatting --------------------------------------------------------------------------------------------------


def _fmt(value: float, kind: str) -> str:
    if kind == "x":
        return f"{value:.2f}×"
    if kind == "ms":
        return f"{value:.2f}"
    if kind == "ms0":
        return f"{value:,.0f}"
    if kind == "ms3":
        return f"{value:.3f}"
    if kind == "pct":
        return f"{100 * value:+.1f}%"
    if kind == "int":
        return f"{value:,.0f}"
    if kind == "share":
        return f"{100 * value:.0f}%"
    return f"{value:,.1f}"


def spread(values: list[float], kind: str = "x") -> str:
    """``median (min–max)`` of the invocations' values; ``–`` when there are none."""
    if not values:
        return "–"
    med = _fmt(statistics.median(values), kind)
    if len(values) == 1:
        return med
    lo, hi = _fmt(min(values), kind), _fmt(max(values), kind)
    return f"{med} ({lo}–{hi})" if kind != "x" else f"{med} ({lo[:-1]}–{hi})"


def median(values: list[float], kind: str) -> str:
    return _fmt(statistics.median(values), kind) if values else "–"


def _when(series: Series) -> str:
    first, last = series.records[0]["started"], series.records[-1]["finished"]
    day = first[:10]
    end = last[11:16] if last[:10] == day else f"{last[:10]} {last[11:16]}"
    return f"{day} {first[11:16]}–{end} UTC"


MEASURED_CODE = ("serving/", "preprocessing/", "models/", "loadtests/", "bentofile.yaml", "constraints.txt")


def _dirty(series: Series) -> list[str]:
    """Files of the measured code (serving, preprocessing, models, the benchmarks) that differed from the commit."""
    return sorted({f for r in series.records for f in r.get("dirty", []) if f.startswith(MEASURED_CODE)})


def _range(values: list[float]) -> str:
    lo, hi = f"{min(values):.2f}", f"{max(values):.2f}"
    return lo if lo == hi else f"{lo}–{hi}"


def provenance(series: Series) -> str:
    """Which invocations the table comes from, how, where and on what."""
    machine = series.records[0]["machine"]
    loads = [r["machine"]["load_before"][0] for r in series.records if r["machine"].get("load_before")]
    loads_after = [r["machine"]["load_after"][0] for r in series.records if r["machine"].get("load_after")]
    models = sorted({f"{v}" for r in series.records for v in (r["result"].get("models") or {}).values()}
                    | ({r["result"]["model_version"] for r in series.records if r["result"].get("model_version")}))
    text = (f"{series.n} invocations of `{series.command}` at commit `{series.commit}`, {_when(series)}, "
            f"on {machine['cpu_model']} ({machine['cores']} cores); 1-minute load average before "
            f"{_range(loads)}, after {_range(loads_after)}")
    if models:
        text += f"; models {', '.join(f'`{m}`' for m in models)}"
    dirty = _dirty(series)
    if dirty:
        shown = ", ".join(f"`{f}`" for f in dirty[:6]) + (f" and {len(dirty) - 6} more" if len(dirty) > 6 else "")
        text += f"; measured code with uncommitted changes to {shown}"
    files = ", ".join(f"`{r['_file']}`" for r in series.records)
    return f"{text}. Records: {files}."


def not_enough(series: Series | None, command: str, what: str) -> str:
    """The text a table gets instead of figures when its series is too short."""
    if series is None:
        return (f"**No record yet** for {what}: run `{command}` {MIN_INVOCATIONS} times "
                f"(separate invocations; see loadtests/README.md), then `python -m loadtests.report`.")
    files = ", ".join(f"`{r['_file']}`" for r in series.records)
    return (f"**No median published** for {what}: {series.n} invocation(s) of `{series.command}` recorded at "
            f"commit `{series.commit}` ({files}); a median needs at least {MIN_INVOCATIONS} separate invocations.")


def table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ---- the tables' series -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One configuration of a benchmark that a table reports, and the command that records it."""

    benchmark: str
    what: str
    command: str
    wanted: Callable[[dict[str, Any]], bool]
    previous: bool = False  # the complete series before the newest one
    at_commit: str | None = None  # the series at this commit


# The last commit before the front-door redesign (issue "One front door"): its series stay in the docs as
# the "before" of that redesign, however many series come after.
BEFORE_REDESIGN = "d0f88eb"

HTTP_W1 = Variant("http-bench", "HTTP served vs bare, one worker",
                  "python loadtests/http_bench.py --rounds 2 --duration 12 --threads 1",
                  lambda c: c["threads"] == 1 and workers(c) == 1
                  and c.get("service", "ImageService") == "ImageService")
HTTP_W2 = Variant("http-bench", "HTTP served vs bare, two workers",
                  "python loadtests/http_bench.py --rounds 2 --duration 12 --threads 1 --env DLBOOK_WORKERS=2",
                  lambda c: c["threads"] == 1 and workers(c) == 2)


# The peers' bars (issue "Requests per CPU"): ours / peer requests per second, at least. The same as
# ``loadtests/peers/bench_peers.py``'s TARGETS (tests/test_loadtests.py checks), applied to every record.
PEER_TARGETS = {"triton-c1": 3.0, "triton-c32": 1.2, "torchserve-c32": 1.5, "bare-c32": 0.85}


def _peers(n_workers: int, batch: int = 32, peers: tuple[str, ...] = ("torchserve", "triton"), instances: int = 1):
    return lambda c: (c["threads"] == 1 and workers(c) == n_workers and c["torchserve_batch_size"] == batch
                      and tuple(sorted(c["peers"])) == peers and c.get("peer_instances", 1) == instances)


PEERS_W1 = Variant("peers", "the peers, ours with one worker",
                   "python loadtests/peers/bench_peers.py --rounds 2 --duration 12 --threads 1", _peers(1))
PEERS_W2 = Variant("peers", "the peers, ours with two workers",
                   "python loadtests/peers/bench_peers.py --rounds 2 --duration 12 --threads 1 --env DLBOOK_WORKERS=2",
                   _peers(2))
PEERS_TS1 = Variant("peers", "TorchServe without its batcher, ours with two workers",
                    "python loadtests/peers/bench_peers.py --rounds 2 --duration 12 --threads 1 --peers torchserve "
                    "--torchserve-batch-size 1 --env DLBOOK_WORKERS=2", _peers(2, 1, ("torchserve",)))
PEERS_DEFAULTS = Variant("peers", "every server at its own default instance count on this 2-core machine",
                         "python loadtests/peers/bench_peers.py --rounds 2 --duration 12 --threads 1 "
                         "--peer-instances 2 --torchserve-batch-size 1", _peers(1, 1, instances=2))
PEERS_DEFAULTS_W2 = Variant("peers", "every server at its own default instance count, ours with two workers",
                            "python loadtests/peers/bench_peers.py --rounds 2 --duration 12 --threads 1 "
                            "--peer-instances 2 --torchserve-batch-size 1 --env DLBOOK_WORKERS=2",
                            _peers(2, 1, instances=2))
def _poems(n_workers: int, rhyme: str = "off", tones: str = "off"):
    return lambda c: (c["streams"] == 16 and c.get("client", "lean") == "lean" and workers(c) == n_workers
                      and c.get("rhyme", "off") == rhyme and c.get("tones", "off") == tones)


POEMS = Variant("poem-http", "poems over HTTP, 16 streams",
                "python loadtests/poem_http_bench.py --rounds 2 --streams 16", _poems(1))
POEMS_W2 = Variant("poem-http", "poems over HTTP, 16 streams, two workers",
                   "python loadtests/poem_http_bench.py --rounds 2 --streams 16 --env DLBOOK_WORKERS=2", _poems(2))
POEMS_SOUND = Variant("poem-http", "poems over HTTP, 16 streams, every poem rhyming with strict tones",
                      "python loadtests/poem_http_bench.py --rounds 2 --streams 16 --rhyme auto --tones strict",
                      _poems(1, "auto", "strict"))
POEM_ENGINE = Variant("poem-throughput", "the poem engine in process, 16 poems",
                      "python loadtests/poem_throughput.py --rounds 3 --streams 16", lambda c: c["streams"] == 16)
OVERLOAD = Variant("overload", "overload",
                   "python loadtests/overload.py --duration 12 --env DLBOOK_ORT_INTRA_THREADS=1",
                   lambda c: workers(c) == 1 and "DLBOOK_MAX_IN_FLIGHT" not in env_of(c))
OVERLOAD_32 = Variant("overload", "overload, 32 requests in flight",
                      "python loadtests/overload.py --duration 12 --env DLBOOK_ORT_INTRA_THREADS=1 "
                      "DLBOOK_MAX_IN_FLIGHT=32",
                      lambda c: workers(c) == 1 and env_of(c).get("DLBOOK_MAX_IN_FLIGHT") == "32")
FLOOR = Variant("http-floor", "the CPU floors", "python loadtests/http_floor.py --rounds 2 --duration 10",
                lambda c: True)
RUNTIME = Variant("runtime", "in-process runtimes", "python loadtests/runtime_bench.py --rounds 3",
                  lambda c: not c.get("quick"))
REQUEST_CPU = Variant("request-cpu", "where a request's CPU goes", "python loadtests/request_cpu.py --rounds 3",
                      lambda c: True)
SOAK = Variant("soak", "the soak", "python loadtests/soak.py --users 30", lambda c: c.get("url") is None)


class Picked:
    """Each variant's series, picked once from the records."""

    def __init__(self, records: list[Record]) -> None:
        self.records = records
        self._cache: dict[tuple[str, str, str, bool, str | None], Series | None] = {}

    def __call__(self, variant: Variant) -> Series | None:
        key = (variant.benchmark, variant.command, variant.what, variant.previous, variant.at_commit)
        if key not in self._cache:
            self._cache[key] = pick(self.records, variant.benchmark, variant.wanted, variant.previous,
                                    variant.at_commit)
        return self._cache[key]

    def complete(self, variant: Variant) -> Series | None:
        series = self(variant)
        return series if series is not None and series.complete else None


def _gate(picked: Picked, variant: Variant) -> tuple[Series | None, str | None]:
    series = picked(variant)
    if variant.previous and series is None:
        return None, f"No earlier complete series of `{variant.command}`: the table above is the only one."
    if series is None or not series.complete:
        return None, not_enough(series, variant.command, variant.what)
    return series, None


# ---- sections ----------------------------------------------------------------------------------------------------


def _met(values: list[float], target: float, above: bool = True) -> str:
    if not values:
        return "–"
    ok = [v >= target if above else v <= target for v in values]
    med = statistics.median(values)
    verdict = "yes" if (med >= target if above else med <= target) else "**no**"
    return f"{verdict} (median; {sum(ok)} of {len(ok)} invocations)"


def section_targets(picked: Picked) -> str:
    rows: list[list[str]] = []
    notes: list[str] = []

    def missing(variant: Variant, *targets: str) -> None:
        series = picked(variant)
        count = "none recorded" if series is None else f"{series.n} of {MIN_INVOCATIONS} invocations recorded"
        for target in targets:
            rows.append([target, f"no median: {count} (`{variant.command}`)", "–"])

    http = picked.complete(HTTP_W1)
    if http:
        for payload, name in (("json", "JSON"), ("png", "PNG upload")):
            ratio = http.values(lambda r, p=payload: r["summary"][f"{p}-c32"]["rps_ratio"])
            errors = sum(http.values(lambda r, p=payload: r["summary"][f"{p}-c32"]["served_errors"]))
            rows.append([f"HTTP, c=32, {name}: served ≥ 0.8× bare throughput, 0 errors",
                         f"{spread(ratio)}; {errors:.0f} errors", _met(ratio, 0.8) if errors == 0 else "**no**"])
        p99 = http.values(lambda r: max(cell["p99_ratio"] for cell in r["summary"].values()))
        rows.append(["HTTP, p99 ≤ 3× bare (worst cell)", spread(p99), _met(p99, 3.0, above=False)])
        for payload, name in (("json", "JSON"), ("png", "PNG upload")):
            p50 = http.values(lambda r, p=payload: r["summary"][f"{p}-c1"]["p50_ratio"])
            rows.append([f"HTTP, c=1, {name}: p50 ≤ 2× bare", spread(p50), _met(p50, 2.0, above=False)])
    else:
        missing(HTTP_W1, "HTTP, c=32: served ≥ 0.8× bare throughput, 0 errors", "HTTP, p99 ≤ 3× bare",
                "HTTP, c=1: p50 ≤ 2× bare")

    poems = picked.complete(POEMS)
    if poems:
        held = poems.values(lambda r: r["median"]["sustained_sse"] / r["median"]["ceiling"])
        burst = poems.values(lambda r: r["median"]["streaming_aggregate"] / r["median"]["ceiling"])
        seq = poems.values(lambda r: r["median"]["sustained_sse"] / r["median"]["sequential"])
        rate = poems.values(lambda r: r["median"]["sustained_sse"])
        rows += [["poems, 16 SSE streams ≥ 0.7× the in-process ceiling (held in flight)", spread(held),
                  _met(held, 0.7)],
                 ["— the same, one burst of 16", spread(burst), _met(burst, 0.7)],
                 ["poems, ≥ 3× the same 16 requests one after another", spread(seq), _met(seq, 3.0)],
                 ["poems, ≥ 4,000 characters/s (16 SSE streams held in flight)", spread(rate, "int"),
                  _met(rate, 4000)]]
    else:
        missing(POEMS, "poems, 16 streams ≥ 0.7× the in-process ceiling", "poems, ≥ 3× sequential",
                "poems, ≥ 4,000 characters/s")

    sound = picked.complete(POEMS_SOUND)
    if sound:
        held = sound.values(lambda r: r["median"]["sustained_sse"] / r["median"]["ceiling"])
        rows.append(["poems rhyming with strict tones, 16 SSE streams ≥ 0.7× the (unconstrained) in-process ceiling",
                     spread(held), _met(held, 0.7)])
    else:
        missing(POEMS_SOUND, "poems rhyming with strict tones, 16 SSE streams ≥ 0.7× the in-process ceiling")

    over = picked.complete(OVERLOAD)
    if over:
        passed = over.values(lambda r: 1.0 if r["passed"] else 0.0)
        rows.append(["overload: only 200 or 503 + Retry-After, no socket errors or timeouts",
                     f"{sum(passed):.0f} of {len(passed)} invocations clean", "yes" if all(passed) else "**no**"])

        def level(r: Record, lv: int) -> dict[str, Any]:
            return next(x for x in r["levels"] if x["concurrency"] == lv)

        for lv in (128, 256):
            good = over.values(lambda r, lv=lv: level(r, lv)["ok_per_s"] / level(r, 32)["ok_per_s"])
            rows.append([f"overload: answered 200/s at c={lv} ≥ 0.8× c=32's", spread(good), _met(good, 0.8)])
            if all(level(r, lv).get("accepted_p99_ms") for r in (rec["result"] for rec in over.records)):
                tail = over.values(lambda r, lv=lv: level(r, lv)["accepted_p99_ms"] / level(r, 32)["accepted_p99_ms"])
                rows.append([f"overload: accepted p99 at c={lv} ≤ 3× c=32's (server histogram)", spread(tail),
                             _met(tail, 3.0, above=False)])
            polite = over.values(lambda r, lv=lv: level(r, lv)["probe_accepted"] / max(
                level(r, lv)["probe_accepted"] + level(r, lv)["probe_shed"], 1))
            rows.append([f"overload: a polite client's requests accepted at c={lv} (most)", spread(polite, "share"),
                         _met(polite, 0.5)])
        costs = [r["result"]["refusal_cost"] for r in over.records
                 if (r["result"].get("refusal_cost") or {}).get("method") == "measured"]
        if len(costs) == over.n:
            ratio = [c["ratio"] for c in costs]
            rows.append(["overload: one refusal's server CPU, a small fraction of a served request's",
                         f"{spread(ratio)} ({median([c['refusal_ms'] for c in costs], 'ms3')} ms vs "
                         f"{median([c['served_ms'] for c in costs], 'ms3')} ms)", _met(ratio, 0.25, above=False)])
    else:
        missing(OVERLOAD, "overload: only 200 or fast 503 + Retry-After, no timeouts")

    for variant, label in ((PEERS_W1, "one worker"), (PEERS_W2, "two workers")):
        peers = picked.complete(variant)
        if not peers:
            missing(variant, f"peers ({label}): ≥ 3× Triton at c=1, ≥ 1.2× at c=32, ≥ 1.5× TorchServe at c=32, "
                             "≥ 0.85× bare at c=32")
            continue
        names = {"triton": "Triton", "torchserve": "TorchServe (with its batcher)", "bare": "the bare endpoint"}
        for key, target in PEER_TARGETS.items():
            peer, conc = key.rsplit("-c", 1)
            ratio = peers.values(lambda r, k=key: r["summary"]["ratios"][k]["rps"])
            rows.append([f"peers ({label}): ≥ {target:g}× {names[peer]} at c={conc}", spread(ratio),
                         _met(ratio, target)])
        p99 = peers.values(lambda r: r["summary"]["cells"]["ours-c32"]["p99"]
                           / r["summary"]["cells"]["bare-c32"]["p99"])
        rows.append([f"peers ({label}): p99 at c=32 ≤ 2× bare", spread(p99), _met(p99, 2.0, above=False)])
    ts1 = picked.complete(PEERS_TS1)
    if ts1:
        ratio = ts1.values(lambda r: r["summary"]["ratios"]["torchserve-c32"]["rps"])
        rows.append(["peers (two workers): ≥ 1.5× TorchServe *without* its batcher at c=32", spread(ratio),
                     _met(ratio, 1.5)])
    notes.append("Each figure: the median over separate invocations (min–max); each invocation's own figure is "
                 "its median over its rounds. The tables below say which records they come from.")
    return table(["target (the issues' bars)", "measured", "met"], rows) + "\n\n" + "\n".join(notes)


def section_http(picked: Picked, variant: Variant) -> str:
    series, text = _gate(picked, variant)
    if series is None:
        return text or ""
    first = series.records[0]["result"]["summary"]
    cells = sorted(first, key=lambda k: (k.split("-c")[0], int(k.split("-c")[1])))
    rows = []
    for key in cells:
        payload, conc = key.split("-c")

        def get(name: str, k: str = key) -> Callable[[Record], float]:
            return lambda r: r["summary"][k][name]

        def pair(field: str, kind: str, get=get) -> str:
            return (f"{median(series.values(get(f'served_{field}')), kind)} / "
                    f"{median(series.values(get(f'bare_{field}')), kind)}")

        errors = (sum(series.values(get("served_errors"))), sum(series.values(get("bare_errors"))))
        rows.append([payload.upper(), conc, f"**{spread(series.values(get('rps_ratio')))}**",
                     spread(series.values(get("p50_ratio"))), spread(series.values(get("p99_ratio"))),
                     pair("rps", "int"), pair("p50", "ms"), pair("p99", "ms"), f"{errors[0]:.0f} / {errors[1]:.0f}",
                     pair("cpu_ms", "ms3")])
    header = ["payload", "c", "throughput served / bare", "p50 ratio", "p99 ratio", "req/s served / bare",
              "p50 ms served / bare", "p99 ms served / bare", "errors served / bare (all invocations)",
              "server CPU ms/request served / bare"]
    return table(header, rows) + "\n\n" + provenance(series)


def section_peers(picked: Picked, variant: Variant) -> str:
    series, text = _gate(picked, variant)
    if series is None:
        return text or ""
    first = series.records[0]["result"]["summary"]
    order = {"ours": 0, "bare": 1, "triton": 2, "torchserve": 3}
    cells = sorted(first["cells"], key=lambda k: (int(k.rsplit("-c", 1)[1]), order.get(k.rsplit("-c", 1)[0], 9)))
    rows = []
    for key in cells:
        name, conc = key.rsplit("-c", 1)

        def get(field: str, k: str = key) -> Callable[[Record], float]:
            return lambda r: r["summary"]["cells"][k][field]

        rows.append([conc, f"**{name}**" if name == "ours" else name, spread(series.values(get("rps")), "int"),
                     median(series.values(get("p50")), "ms"), median(series.values(get("p99")), "ms"),
                     f"{sum(series.values(get('errors'))):.0f}", median(series.values(get("cpu_ms")), "ms3")])
    out = table(["c", "server", "req/s", "p50 ms", "p99 ms", "errors (all invocations)", "server CPU ms/request"],
                rows)
    ratio_rows = []
    for key in sorted(first["ratios"], key=lambda k: (order.get(k.rsplit("-c", 1)[0], 9), int(k.rsplit("-c", 1)[1]))):
        peer, conc = key.rsplit("-c", 1)

        def get_ratio(field: str, k: str = key) -> Callable[[Record], float]:
            return lambda r: r["summary"]["ratios"][k][field]

        target = PEER_TARGETS.get(key)  # today's bars, whatever the record's script said then
        rps = series.values(get_ratio("rps"))
        ratio_rows.append([peer, conc, f"**{spread(rps)}**", spread(series.values(get_ratio("p50"))),
                           spread(series.values(get_ratio("cpu"))), "–" if target is None else f"≥ {target:g}×",
                           "–" if target is None else _met(rps, target)])
    out += "\n\n" + table(["ours vs", "c", "req/s ratio (ours / peer)", "p50 ratio (peer / ours)",
                           "server CPU ratio (peer / ours)", "target", "met"], ratio_rows)
    return out + "\n\n" + provenance(series)


def section_peer_versions(picked: Picked) -> str:
    series = picked.complete(PEERS_W1) or picked.complete(PEERS_W2)
    if series is None:
        return not_enough(picked(PEERS_W1), PEERS_W1.command, "the peers' versions and setup cost")
    result = series.records[-1]["result"]
    rows = []
    for name, found in result["versions"].items():
        setup = result["setup"].get(name, {})
        build = series.values(lambda r, n=name: r["setup"][n].get("venv_build_s"))
        start = series.values(lambda r, n=name: r["setup"][n].get("server_start_s"))
        rows.append([name, ", ".join(f"{k} {v}" for k, v in found.items()),
                     f"{setup['venv_mib']} MiB" if setup.get("venv_mib") else "(project `.venv`)",
                     spread(build, "f") + " s" if build else "–", spread(start, "f") + " s" if start else "–"])
    return (table(["server", "versions", "virtualenv", "virtualenv build (when built in that run)",
                   "server start"], rows)
            + f"\n\nFrom the record `{series.records[-1]['_file']}` (build and start: all {series.n} records).")


def section_poems(picked: Picked, variant: Variant = POEMS) -> str:
    series, text = _gate(picked, variant)
    if series is None:
        return text or ""
    rows = []

    def med(key: str) -> Callable[[Record], float]:
        return lambda r: r["median"][key]

    def ratio(key: str, base: str) -> list[float]:
        return series.values(lambda r: r["median"][key] / r["median"][base])

    streams = series.records[0]["config"]["streams"]
    sustain = series.records[0]["config"]["sustain"]
    rows.append(["ceiling: step graph + our sampling at the same batch, in process, "
                 f"{sustain:g} s", spread(series.values(med("ceiling")), "int"), "1", "–"])
    rows.append(["1 stream alone over HTTP (SSE)", spread(series.values(med("one_stream_rate")), "int"),
                 spread(ratio("one_stream_rate", "ceiling")),
                 f"first character after {median(series.values(med('one_stream_ttfc_ms')), 'ms0')} ms"])
    for key, label in (("sustained_sse", f"{streams} SSE streams held in flight for {sustain:g} s, aggregate"),
                       ("sustained_plain", f"{streams} plain requests held in flight for {sustain:g} s, aggregate"),
                       ("streaming_aggregate", f"one burst of {streams} SSE streams, aggregate"),
                       ("plain_aggregate", f"one burst of {streams} plain requests, aggregate")):
        rows.append([label, spread(series.values(med(key)), "int"), f"**{spread(ratio(key, 'ceiling'))}**",
                     spread(ratio(key, "sequential"))])
    rows.append([f"the same {streams} plain requests one after another", spread(series.values(med("sequential")),
                                                                                   "int"), "–", "1"])
    out = table(["measurement", "characters/s", "vs ceiling", "vs one after another"], rows)
    out += (f"\n\nBurst, per stream: first character p50 {median(series.values(med('ttfc_p50_ms')), 'ms0')} ms, "
            f"slowest {median(series.values(med('ttfc_p99_ms')), 'ms0')} ms (medians over invocations).")
    return out + "\n\n" + provenance(series)


def section_poem_engine(picked: Picked) -> str:
    series, text = _gate(picked, POEM_ENGINE)
    if series is None:
        return text or ""

    def med(key: str) -> list[float]:
        return series.values(lambda r: r["median"][key])

    rows = [["ceiling (step graph + sampling, plain loop)", spread(med("ceiling"), "int"), "1"],
            ["16 poems through `PoemEngine` together", spread(med("batched"), "int"),
             f"**{spread(series.values(lambda r: r['median']['batched'] / r['median']['ceiling']))}**"],
            ["the same poems one after another", spread(med("one_by_one"), "int"),
             spread(series.values(lambda r: r["median"]["one_by_one"] / r["median"]["ceiling"]))]]
    batched_vs_seq = spread(series.values(lambda r: r["median"]["batched"] / r["median"]["one_by_one"]))
    return (table(["measurement", "characters/s", "vs ceiling"], rows)
            + f"\n\nTogether vs one after another: {batched_vs_seq}.\n\n" + provenance(series))


def section_overload(picked: Picked, variant: Variant = OVERLOAD) -> str:
    series, text = _gate(picked, variant)
    if series is None:
        return text or ""
    levels = [lv["concurrency"] for lv in series.records[0]["result"]["levels"]]
    rows = []
    for level in levels:
        def get(key: str, lv: int = level) -> Callable[[Record], float]:
            return lambda r: next(x for x in r["levels"] if x["concurrency"] == lv)[key]

        others = sum(series.values(lambda r, lv=level: sum(
            next(x for x in r["levels"] if x["concurrency"] == lv)["other_statuses"].values())))
        def goodput(r: Record, lv: int = level) -> float:
            at = {x["concurrency"]: x["ok_per_s"] for x in r["levels"]}
            return at[lv] / at[32] if at.get(32) else float("nan")

        def polite(r: Record, lv: int = level) -> float:
            x = next(x for x in r["levels"] if x["concurrency"] == lv)
            return x["probe_accepted"] / max(x["probe_accepted"] + x["probe_shed"], 1)

        if all(next(x for x in rec["result"]["levels"] if x["concurrency"] == level).get("accepted_p99_ms")
               for rec in series.records):
            accepted = (f"{median(series.values(get('accepted_p50_ms')), 'f')} / "
                        f"{spread(series.values(get('accepted_p99_ms')), 'f')}")
        else:
            accepted = "–"
        cpu = (f"{median(series.values(get('server_cpu_s_per_s')), 'f')} / "
               f"{median(series.values(get('wrk_cpu_s_per_s')), 'f')}"
               if all("server_cpu_s_per_s" in x for rec in series.records for x in rec["result"]["levels"]) else "–")
        rows.append([str(level), spread(series.values(get("ok_per_s")), "int"),
                     spread(series.values(goodput), "x") if 32 in levels else "–",
                     spread(series.values(get("shed_per_s")), "int"), f"{others:.0f}",
                     f"{sum(series.values(get('socket_errors'))):.0f} / {sum(series.values(get('timeouts'))):.0f}",
                     f"{median(series.values(get('p50_ms')), 'f')} / {spread(series.values(get('p99_ms')), 'f')}",
                     f"{max(series.values(get('max_ms')), default=0):,.0f}", accepted,
                     f"{median(series.values(get('probe_p50_ms')), 'f')} / "
                     f"{median(series.values(get('probe_p99_ms')), 'f')}",
                     spread(series.values(polite), "share"), cpu])
    passed = sum(1 for r in series.records if r["result"].get("passed"))
    bursts = ", ".join(f"{r['result']['burst']['shed']} shed ({r['result']['burst']['retry_after']} with "
                       "Retry-After)" for r in series.records)
    out = table(["concurrency", "answered 200/s", "200/s vs c=32", "shed 503/s", "other answers (all invocations)",
                 "socket errors / timeouts (all invocations)", "p50 / p99 ms (all answers, wrk)",
                 "slowest answer ms (all invocations)", "accepted p50 / p99 ms (server histogram)",
                 "probe: accepted p50 / p99 ms",
                 "probe: share of its requests accepted", "server / wrk CPU, cores"], rows)
    costs = [r["result"]["refusal_cost"] for r in series.records if r["result"].get("refusal_cost")]
    if costs and all(c.get("method") == "measured" for c in costs):
        out += ("\n\nServer CPU of one refusal, measured per invocation on a second server that lets one request "
                "execute and none wait (`DLBOOK_MAX_IN_FLIGHT=1 DLBOOK_MAX_WAITING=0`, 32 connections: its CPU "
                "beyond its few served requests, per refusal), against one served request at c=32: "
                + "; ".join(f"{c['refusal_ms']:.3f} ms vs {c['served_ms']:.3f} ms ({c['ratio']:.2f}×, "
                            f"{c['refused_per_s']:,.0f} refusals/s)" for c in costs) + ".")
    elif costs:
        out += ("\n\nServer CPU of one refusal, estimated per invocation (what the server spent beyond its served "
                "requests at the levels that refused, per refusal): "
                + "; ".join(f"{c['refusal_ms']:.3f} ms vs {c['served_ms']:.3f} ms served ({c['ratio']:.2f}×)"
                            for c in costs) + ".")
    out += (f"\n\n{passed} of {series.n} invocations clean (every answer a 200 or a 503 with `Retry-After`, no "
            f"socket error or timeout). A burst of 400 at once: "
            f"{bursts}.")
    return out + "\n\n" + provenance(series)


def section_request_cpu(picked: Picked) -> str:
    series, text = _gate(picked, REQUEST_CPU)
    if series is None:
        return text or ""
    first = series.records[0]["result"]
    rows = []
    for name in first["apps"]:
        rows.append([name] + [spread(series.values(lambda r, n=name, c=c: r["apps"][n][c]), "ms3")
                              for c in ("c1", "c32")])
    out = table(["app (in process, no sockets)", "ms CPU/request, c=1", "ms CPU/request, c=32"], rows)
    steps = [[name, spread(series.values(lambda r, n=name: r["steps"][n]), "f")] for name in first["steps"]]
    out += "\n\n" + table(["step, timed alone", "µs CPU per call"], steps)
    return out + "\n\n" + provenance(series)


def section_floor(picked: Picked) -> str:
    series, text = _gate(picked, FLOOR)
    if series is None:
        return text or ""
    counts = sorted(series.records[0]["result"]["summary"], key=int)
    rows = []
    for label, get in (
            ("HTTP floor: no-op app on the same uvicorn", lambda r, w: r["cells"][f"noop w{w}"]["cpu_ms_per_request"]),
            ("parsing: our route's validation, in process", lambda r, w: r["parsing_ms"]),
            ("ONNX Runtime per image at the mean batch ours formed",
             lambda r, w: r["onnx_ms_per_image"][str(round(r["summary"][w]["mean_batch"]) or 1)]),
            ("sum of the floors", lambda r, w: r["summary"][w]["floor_ms"]),
            ("**ours**, whole process tree", lambda r, w: r["summary"][w]["ours_ms"]),
            ("the rest: BentoML's worker, our guard, metrics, the access log, batching",
             lambda r, w: r["summary"][w]["rest_ms"])):
        rows.append([label, *[spread(series.values(lambda r, w=w, g=get: g(r, w)), "ms3") for w in counts]])
    rows.append(["mean batch ours formed", *[spread(series.values(lambda r, w=w: r["summary"][w]["mean_batch"]), "f")
                                             for w in counts]])
    rows.append(["req/s at c=32: no-op app / ours", *[
        f"{median(series.values(lambda r, w=w: r['cells'][f'noop w{w}']['rps']), 'int')} / "
        f"{median(series.values(lambda r, w=w: r['cells'][f'ours w{w}']['rps']), 'int')}" for w in counts]])
    header = ["CPU ms per request (wrk, c=32)", *[f"{w} worker{'s' if w != '1' else ''}" for w in counts]]
    return table(header, rows) + "\n\n" + provenance(series)


def section_runtime(picked: Picked) -> str:
    series, text = _gate(picked, RUNTIME)
    if series is None:
        return text or ""
    keys = [(c["model"], c["batch"], c["runtime"]) for c in series.records[0]["result"]["cells"]]
    rows = []
    for model, batch, runtime in keys:
        def get(field: str, m: str = model, b: int = batch, rt: str = runtime) -> Callable[[Record], float]:
            return lambda r: next(c for c in r["cells"] if (c["model"], c["batch"], c["runtime"]) == (m, b, rt))[field]

        rows.append([model, str(batch), runtime, median(series.values(get("median_ms")), "ms3"),
                     spread(series.values(get("vs_eager"))),
                     median([100 * v for v in series.values(get("spread"))], "int") + "%"])
    env = series.records[0]["result"]["environment"]
    threads = env["threads"]
    head = (f"torch {env['torch']}, onnxruntime {env['onnxruntime']}; intra-op threads: torch "
            f"{threads['torch_intra_op']}, ORT {threads['ort_intra_op']} (graph optimisation "
            f"`{threads['ort_optimisation']}`); {env['rounds']} alternated rounds of {env['seconds_per_block']:g} s "
            f"per contender in each invocation; ORT CUDA: {env['ort_cuda']}.")
    return (head + "\n\n" + table(["model", "batch", "runtime", "median ms/call", "speed-up vs eager",
                                   "spread of round medians (median)"], rows) + "\n\n" + provenance(series))


def section_soak(picked: Picked) -> str:
    series, text = _gate(picked, SOAK)
    if series is None:
        return text or ""

    def vals(get: Callable[[Record], float]) -> list[float]:
        return series.values(get)

    passed = sum(1 for r in series.records if r["result"]["passed"])
    config = series.records[0]["config"]
    restarts = sum(1 for r in series.records if not r["result"]["criteria"].get("workers never restarted", False))
    rows = [["requests served", f"{spread(vals(lambda r: r['requests']), 'int')} requests, "
             f"{spread(vals(lambda r: r['rps']), 'f')} req/s"],
            ["unexpected failures (all invocations)", f"{sum(vals(lambda r: r['failures'])):.0f}"],
            ["malformed requests answered with their expected 4xx",
             f"{spread(vals(lambda r: r['malformed_requests']), 'int')} "
             f"({spread([100 * v for v in vals(lambda r: r['malformed_share'])], 'f')}% of requests)"],
            ["invocations with a worker restart", f"{restarts}"],
            [f"tree RSS growth after {config['warmup']:g} s of warm-up "
             f"(tolerance ±{100 * config['rss_tolerance']:.0f}%)",
             spread(vals(lambda r: r["rss_mb"]["growth"]), "pct")],
            ["tree RSS after warm-up → end, MB", f"{median(vals(lambda r: r['rss_mb']['after_warmup']), 'f')} → "
             f"{median(vals(lambda r: r['rss_mb']['end']), 'f')} (medians)"],
            ["verdict", f"**{passed} of {series.n} passed**"]]
    out = (f"{config['users']} Locust users, {config['seconds']} s, {100 * config['malformed']:.0f}% malformed, "
           f"`{config['service']}`.\n\n" + table(["criterion", "figure: median (min–max) over invocations"], rows))
    names = list(series.records[0]["result"]["endpoints"])
    ep_rows = []
    for name in names:
        def get(key: str, n: str = name) -> Callable[[Record], float]:
            return lambda r: r["endpoints"][n][key]

        ep_rows.append([name, median(vals(get("requests")), "int"), f"{sum(vals(get('failures'))):.0f}",
                        median(vals(get("p50_ms")), "int"), spread(vals(get("p95_ms")), "int")])
    out += "\n\n" + table(["endpoint", "requests (median)", "failures (all)", "p50 ms (median)", "p95 ms"], ep_rows)
    return out + "\n\n" + provenance(series)


def readme_block(picked: Picked) -> str:
    """The README's figures: a few lines from the same series as the tables."""
    lines = []
    http = picked.complete(HTTP_W1)
    if http:
        json32 = http.values(lambda r: r["summary"]["json-c32"]["rps_ratio"])
        png32 = http.values(lambda r: r["summary"]["png-c32"]["rps_ratio"])
        json1 = http.values(lambda r: r["summary"]["json-c1"]["p50_ratio"])
        lines.append(f"- **HTTP, served vs a bare Starlette + ORT endpoint** (one worker, c=32): JSON "
                     f"{spread(json32)}, PNG uploads {spread(png32)} the bare throughput; a lone JSON request's "
                     f"p50 {spread(json1)} bare ({http.n} invocations).")
    else:
        lines.append("- **HTTP, served vs bare**: no median yet (fewer than 3 recorded invocations).")
    poems = picked.complete(POEMS)
    if poems:
        held = poems.values(lambda r: r["median"]["sustained_sse"] / r["median"]["ceiling"])
        rate = poems.values(lambda r: r["median"]["sustained_sse"])
        seq = poems.values(lambda r: r["median"]["sustained_sse"] / r["median"]["sequential"])
        lines.append(f"- **Poems**: 16 SSE streams held in flight, {spread(rate, 'int')} characters/s, "
                     f"{spread(held)} the in-process ceiling and {spread(seq)} serving them one after another "
                     f"({poems.n} invocations).")
    else:
        lines.append("- **Poems**: no median yet (fewer than 3 recorded invocations).")
    parts = []
    for variant, label in ((PEERS_W1, "one worker"), (PEERS_W2, "two workers")):
        peers = picked.complete(variant)
        if peers:
            tri = peers.values(lambda r: r["summary"]["ratios"]["triton-c32"]["rps"])
            ts = peers.values(lambda r: r["summary"]["ratios"]["torchserve-c32"]["rps"])
            tri1 = peers.values(lambda r: r["summary"]["ratios"]["triton-c1"]["rps"])
            parts.append(f"with {label}, {spread(tri)} Triton's and {spread(ts)} batched TorchServe's throughput at "
                         f"c=32, {spread(tri1)} Triton's at c=1 ({peers.n} invocations)")
    lines.append("- **Peers** (same LeNet, same load): " + ("; ".join(parts) + "." if parts else
                                                            "no median yet (fewer than 3 recorded invocations)."))
    over = picked.complete(OVERLOAD)
    if over:
        clean = sum(1 for r in over.records if r["result"].get("passed"))
        top = over.values(lambda r: max(lv["max_ms"] for lv in r["levels"]))
        most = max(lv["concurrency"] for lv in over.records[0]["result"]["levels"])

        def at(r: Record, level: int, key: str) -> float:
            return next(lv for lv in r["levels"] if lv["concurrency"] == level)[key]

        goodput = over.values(lambda r: at(r, most, "ok_per_s") / at(r, 32, "ok_per_s"))
        polite = over.values(lambda r: at(r, most, "probe_accepted")
                             / max(at(r, most, "probe_accepted") + at(r, most, "probe_shed"), 1))
        extra = ""
        if all(next(x for x in rec["result"]["levels"] if x["concurrency"] == lv).get("accepted_p99_ms")
               for rec in over.records for lv in (32, most)):
            tail = over.values(lambda r: at(r, most, "accepted_p99_ms") / at(r, 32, "accepted_p99_ms"))
            extra += f"; the accepted requests' p99 {spread(tail)} theirs at 32 (server histogram)"
        costs = [r["result"].get("refusal_cost") or {} for r in over.records]
        if all(c.get("method") == "measured" for c in costs):
            extra += (f"; one refusal cost {spread([c['ratio'] for c in costs])} the CPU of a served request "
                      f"({median([c['refusal_ms'] for c in costs], 'ms3')} ms)")
        lines.append(f"- **Overload** (up to {most} connections): {clean} of {over.n} invocations answered only 200 "
                     f"or a 503 with `Retry-After`, no timeouts; at {most} connections the worker still answered "
                     f"{spread(goodput)} its throughput at 32{extra}; a polite client (one request at a time, "
                     f"honouring `Retry-After`) got {spread(polite, 'share')} of its requests through; slowest "
                     f"answer of any status {spread(top, 'ms0')} ms ({over.n} invocations).")
    else:
        lines.append("- **Overload**: no median yet (fewer than 3 recorded invocations).")
    soak = picked.complete(SOAK)
    if soak:
        passed = sum(1 for r in soak.records if r["result"]["passed"])
        growth = soak.values(lambda r: r["rss_mb"]["growth"])
        cfg = soak.records[0]["config"]
        lines.append(f"- **Soak** ({cfg['seconds']} s, {cfg['users']} users, {100 * cfg['malformed']:.0f}% malformed): "
                     f"{passed} of {soak.n} "
                     f"passed; memory growth after warm-up {spread(growth, 'pct')}.")
    else:
        lines.append("- **Soak**: no median yet (fewer than 3 recorded invocations).")
    return "\n".join(lines)


# ---- the docs ----------------------------------------------------------------------------------------------------


def sections(records: list[Record]) -> dict[str, dict[str, str]]:
    """Doc path (relative to the repository) → section name → generated text."""
    picked = Picked(records)
    return {
        "docs/PERFORMANCE.md": {
            "targets": section_targets(picked),
            "http-bench": section_http(picked, HTTP_W1),
            "http-bench-previous": section_http(picked, dataclasses.replace(HTTP_W1, previous=True)),
            "poem-http-previous": section_poems(picked, dataclasses.replace(POEMS, previous=True)),
            "http-bench-before-redesign": section_http(picked, dataclasses.replace(HTTP_W1, at_commit=BEFORE_REDESIGN)),
            "poem-http-before-redesign": section_poems(picked, dataclasses.replace(POEMS, at_commit=BEFORE_REDESIGN)),
            "poem-http-sound": section_poems(picked, POEMS_SOUND),
            "overload-previous": section_overload(picked, dataclasses.replace(OVERLOAD, previous=True)),
            "http-bench-w2": section_http(picked, HTTP_W2),
            "overload": section_overload(picked),
            "overload-in-flight-32": section_overload(picked, OVERLOAD_32),
            "poem-http": section_poems(picked),
            "poem-throughput": section_poem_engine(picked),
            "runtime": section_runtime(picked),
            "peers-w1": section_peers(picked, PEERS_W1),
            "peers-w1-previous": section_peers(picked, dataclasses.replace(PEERS_W1, previous=True)),
            "request-cpu": section_request_cpu(picked),
            "peers-w2": section_peers(picked, PEERS_W2),
            "peers-torchserve-b1": section_peers(picked, PEERS_TS1),
            "peers-defaults": section_peers(picked, PEERS_DEFAULTS),
            "peers-defaults-w2": section_peers(picked, PEERS_DEFAULTS_W2),
            "poem-http-w2": section_poems(picked, POEMS_W2),
            "peer-versions": section_peer_versions(picked),
            "http-floor": section_floor(picked),
        },
        "docs/RELIABILITY.md": {"soak": section_soak(picked)},
        "README.md": {"readme-performance": readme_block(picked)},
    }


def replace_sections(text: str, bodies: dict[str, str], where: str = "document") -> str:
    """``text`` with the body of each ``<!-- generated: NAME -->`` block in ``bodies`` replaced.

    Blocks of other names are left alone; a name in ``bodies`` without its block in ``text`` is an error
    (a removed marker would otherwise silently stop a table being written).
    """
    present = {m.group(1) for m in MARKER.finditer(text)}
    missing = sorted(set(bodies) - present)
    if missing:
        raise ValueError(f"{where} has no <!-- generated: NAME --> … {END} block for {', '.join(missing)}")

    def swap(match: re.Match) -> str:
        name = match.group(1)
        if name not in bodies:
            return match.group(0)
        return f"<!-- generated: {name} -->\n{bodies[name].rstrip()}\n{END}"

    return MARKER.sub(swap, text)


def generated(text: str) -> dict[str, str]:
    """Section name → its current body, as it stands in ``text``."""
    return {m.group(1): m.group(2) for m in MARKER.finditer(text)}


def render(repo: Path = REPO, record_dir: Path | None = None) -> dict[Path, str]:
    """Every doc this report writes → its text with the generated sections from the records."""
    records = load_records(record_dir or repo / "docs" / "bench")
    out = {}
    for rel, bodies in sections(records).items():
        path = repo / rel
        out[path] = replace_sections(path.read_text(encoding="utf-8"), bodies, rel)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a doc is out of date")
    parser.add_argument("--records", type=Path, default=RECORD_DIR, help="the records' folder (docs/bench)")
    args = parser.parse_args(argv)
    stale = []
    for path, text in render(REPO, args.records).items():
        if path.read_text(encoding="utf-8") != text:
            stale.append(path)
            if not args.check:
                path.write_text(text, encoding="utf-8")
    verb = "out of date" if args.check else "rewrote"
    for path in stale:
        print(f"{verb}: {path.relative_to(REPO)}")
    if not stale:
        print("generated sections are up to date with docs/bench/")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
