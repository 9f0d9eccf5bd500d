"""``python -m training report``: docs/RESULTS.md (and the README's headline table) from committed records.

Every figure comes from a small run summary committed under ``docs/records/<run>.json``:

- ``python -m training report --record RUN`` copies ``runs/RUN/metrics.json`` there (RUN may also be a
  training log such as ``docs/training-logs/mlp-leaky512.log``, for runs whose folder was not kept:
  its per-epoch lines and final summary line are parsed);
- ``python -m training report`` first records every finished full-profile run it finds under
  ``runs/`` (and, when both full poem runs are there, the poem cross-evaluation), then rewrites the
  generated sections of docs/RESULTS.md and README.md from ``docs/records/`` alone.

The reader takes any JSON object in ``docs/records/``: run summaries (they have ``architecture`` and
``test``) make the rows, ``kind: poem-cross-eval`` the poem table; anything else is left for whoever
wrote it. Only the text between ``<!-- generated: NAME -->`` and ``<!-- end generated -->`` of the
sections named here is rewritten; other sections (other reports' blocks, hand-written text) stay.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
from pathlib import Path
from typing import Any

from training.paths import REPO_ROOT, runs_dir
from training.recipes import RECIPES

RECORDS_DIR = REPO_ROOT / "docs" / "records"
RESULTS = REPO_ROOT / "docs" / "RESULTS.md"
README = REPO_ROOT / "README.md"
CROSS_EVAL = "poem-cross-eval.json"
RUN_FIELDS = ("run", "architecture", "preset", "task", "dataset", "profile", "test", "epochs_run", "best_epoch",
              "train_seconds", "device", "parameters", "history")
END = "<!-- end generated -->"
MARKER = re.compile(r"<!-- generated: ([\w.-]+) -->\n(.*?)" + re.escape(END), re.S)

HEADER = """# Results

Every figure on this page is computed by `python -m training report` from the run summaries committed
under [`docs/records/`](records/): one JSON per run, added from a finished run's `metrics.json` by
`python -m training report --record RUN` (or parsed from its training log). Image rows: accuracy on the
official 10,000-image test split. House rows: log-RMSE (the textbook's metric) and MAE on the fixed 20%
holdout (scikit-learn's split, seed 42). Poem rows: character perplexity on a fixed held-out 5% of
poems, next to an interpolated bigram fitted on the same training poems and scored on the same tokens.

Trainings marked H100 ran on a lent NVIDIA H100, up to 14 at once on the one GPU, so their times
are upper bounds; CPU rows ran on this project's 2-core machine.
"""


# ---- records ------------------------------------------------------------------------------------------------------


def git_head() -> str:
    out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def is_run_summary(record: Any) -> bool:
    """A training run's summary (a copy of its metrics.json), as opposed to another report's record."""
    return (isinstance(record, dict) and "kind" not in record
            and {"architecture", "test", "epochs_run"} <= set(record))


def run_problems(record: dict[str, Any]) -> list[str]:
    """What a run summary lacks (empty when it is sound)."""
    problems = [f"missing {k}" for k in RUN_FIELDS if k not in record]
    if not isinstance(record.get("test"), dict):
        problems.append("test is not an object")
    if not isinstance(record.get("history"), list):
        problems.append("history is not a list")
    return problems


def record_from_summary(summary: dict[str, Any], source: str) -> dict[str, Any]:
    """A committed copy of a run's metrics.json, with where and when it was copied."""
    return {**summary, "record": {"source": source, "copied": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
                                  "commit": git_head()}}


_HEADER_LINE = re.compile(r"training (?P<name>\S+) on (?P<dataset>\S+) \((?P<profile>\w+) profile, (?P<epochs>\d+) "
                          r"epochs max, (?P<parameters>[\d,]+) parameters, device (?P<device>\w+)\)")


def _result_metrics(task: str, text: str) -> dict[str, float]:
    if task == "image":
        return {"accuracy": round(float(re.search(r"test accuracy ([\d.]+)%", text).group(1)) / 100, 6)}
    if task == "price":
        found = re.search(r"log-RMSE ([\d.]+), MAE \$([\d,]+)", text)
        return {"log_rmse": float(found.group(1)), "mae_dollars": float(found.group(2).replace(",", ""))}
    found = re.search(r"perplexity ([\d.]+) \(bigram ([\d.]+), ratio ([\d.]+)\)", text)
    return {"perplexity": float(found.group(1)), "bigram_perplexity": float(found.group(2)),
            "ratio_to_bigram": float(found.group(3))}


def record_from_log(path: Path) -> dict[str, Any]:
    """A run summary parsed from a training log (the console output of ``python -m training train``).

    The log holds the header line, one ``epoch=N key=value …`` line per epoch and the final summary
    table; test metrics come with the precision the table prints them.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    head = next(m for m in map(_HEADER_LINE.match, lines) if m)
    architecture, _, preset = head["name"].partition("-")
    recipe = RECIPES[f"{architecture}-{preset}"]
    history = []
    for line in lines:
        if line.startswith("epoch="):
            row = {k: float(v) for k, v in (pair.split("=", 1) for pair in line.split())}
            row["epoch"] = int(row["epoch"])
            history.append(row)
    dashes = next(i for i, line in enumerate(lines) if line.startswith("---"))
    spans = [m.span() for m in re.finditer(r"-+", lines[dashes])]
    row_line = lines[dashes + 1]
    cells = [row_line[a:b if i + 1 < len(spans) else None].strip() for i, (a, b) in enumerate(spans)]
    run, result, epochs, seconds, device = cells
    epochs_run, best = map(int, re.match(r"(\d+) \(best (\d+)\)", epochs).groups())
    commit = subprocess.run(["git", "-C", str(REPO_ROOT), "log", "--diff-filter=A", "--format=%H", "--",
                             str(path.resolve().relative_to(REPO_ROOT))], capture_output=True, text=True).stdout
    return {
        "run": run, "architecture": architecture, "preset": preset, "task": recipe.task,
        "dataset": head["dataset"], "profile": head["profile"], "limit": None,
        "test": _result_metrics(recipe.task, result), "best_epoch": best, "epochs_run": epochs_run,
        "train_seconds": float(seconds.removesuffix(" s")), "device": device,
        "parameters": int(head["parameters"].replace(",", "")), "source": recipe.source, "history": history,
        "record": {"source": str(path.resolve().relative_to(REPO_ROOT)), "kind": "training log",
                   "log_committed_in": commit.strip().splitlines()[-1] if commit.strip() else "unknown",
                   "precision": "test metrics as the log's summary line prints them; train time in whole "
                                "seconds; no ONNX size (the run folder was not kept)"},
    }


def dumps(record: dict[str, Any]) -> str:
    """JSON with one line per history epoch: small, and a diff shows which epochs changed."""
    history = record.get("history")
    if not isinstance(history, list):
        return json.dumps(record, indent=1, ensure_ascii=False) + "\n"
    text = json.dumps({**record, "history": "@HISTORY@"}, indent=1, ensure_ascii=False)
    rows = ",\n".join("  " + json.dumps(row, ensure_ascii=False) for row in history)
    return text.replace('"@HISTORY@"', "[\n" + rows + "\n ]") + "\n"


def write_record(source: str, records_dir: Path = RECORDS_DIR) -> Path:
    """Record one run: ``source`` is a run folder name under runs/ or a training log file."""
    as_path = Path(source)
    if as_path.suffix == ".log" and as_path.is_file():
        record = record_from_log(as_path)
    else:
        metrics = runs_dir() / source / "metrics.json"
        if not metrics.is_file():
            raise SystemExit(f"no {metrics}: give a finished run's folder name or a training log")
        record = record_from_summary(json.loads(metrics.read_text(encoding="utf-8")), f"runs/{source}/metrics.json")
    records_dir.mkdir(parents=True, exist_ok=True)
    path = records_dir / f"{record['run']}.json"
    path.write_text(dumps(record), encoding="utf-8")
    return path


def load_records(records_dir: Path = RECORDS_DIR) -> list[dict[str, Any]]:
    """Every JSON object in ``records_dir`` (sorted by file name), with its file name under ``_file``."""
    found = []
    for path in sorted(records_dir.glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # tests/test_records.py reports it; the report does not stop on another's file
        if isinstance(record, dict):
            found.append({**record, "_file": path.name})
    return found


def full_runs(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The run summaries the results table shows: full profile, the whole data set, sound."""
    return [r for r in records if is_run_summary(r) and r.get("profile") == "full" and not r.get("limit")
            and not run_problems(r)]


def find(records: list[dict[str, Any]], architecture: str, preset: str, dataset: str) -> dict[str, Any] | None:
    hits = [r for r in full_runs(records) if (r["architecture"], r["preset"], r["dataset"]) ==
            (architecture, preset, dataset)]
    return hits[-1] if hits else None


# ---- the results table --------------------------------------------------------------------------------------------


def _metric(s: dict[str, Any]) -> str:
    t = s["test"]
    if s["task"] == "image":
        return f"{100 * t['accuracy']:.2f}%"
    if s["task"] == "price":
        return f"log-RMSE {t['log_rmse']:.4f}, MAE ${t['mae_dollars']:,.0f}"
    return f"ppl {t['perplexity']:.1f} (bigram {t['bigram_perplexity']:.1f}, ×{t['ratio_to_bigram']:.2f})"


def book_figure(s: dict[str, Any]) -> float | None:
    recipe = RECIPES.get(f"{s['architecture']}-{s['preset']}")
    return recipe.book_figures.get(s["dataset"]) if recipe else None


def _book(s: dict[str, Any]) -> str:
    figure = book_figure(s)
    if figure is None:
        return "–"
    return f"{figure}% ({100 * s['test']['accuracy'] - figure:+.2f})"


def _command(s: dict[str, Any]) -> str:
    return f"`python -m training train {s['architecture']} --preset {s['preset']} --dataset {s['dataset']}`"


def _device(s: dict[str, Any]) -> str:
    return "H100" if "H100" in s["device"] else s["device"]


def results_table(records: list[dict[str, Any]]) -> str:
    full = full_runs(records)
    order = {"image": 0, "price": 1, "poem": 2}
    full.sort(key=lambda s: (order.get(s["task"], 3), s["dataset"], s["architecture"], s["preset"] != "book",
                             s["preset"], s["_file"]))
    lines = ["| model | preset | data set | test metric | book's figure (Δ) | parameters | ONNX size | "
             "epochs (best) | train time | device | command | record |", "|" + "---|" * 12]
    for s in full:
        onnx = f"{s['onnx_bytes'] / 1e6:.2f} MB" if s.get("onnx_bytes") else "not recorded"
        lines.append(
            f"| {s['architecture']} | {s['preset']} | {s['dataset']} | {_metric(s)} | {_book(s)} | "
            f"{s['parameters']:,} | {onnx} | {s['epochs_run']} ({s['best_epoch']}) | {s['train_seconds']:.0f} s | "
            f"{_device(s)} | {_command(s)} | [{s['_file']}](records/{s['_file']}) |")
    if not full:
        lines.append("| no committed run summaries in docs/records/ | | | | | | | | | | | |")
    return "\n".join(lines)


def results_markdown(records: list[dict[str, Any]]) -> str:
    """The page as a fresh file would have it (title, introduction, every generated section)."""
    return (HEADER + "\n" + _block("results-table", results_table(records)) + "\n\n"
            + _block("poem-cross-eval", poem_section(records)) + "\n\n"
            + _block("results-notes", notes(records)) + "\n")


# ---- poem models on each other's held-out splits ------------------------------------------------------------------


def cross_eval_record(run_dirs: list[Path]) -> dict[str, Any]:
    """Every full poem run on both corpora's held-out splits (:mod:`training.poem_eval`), as a record."""
    from training.poem_eval import CORPORA, _split, cross_perplexity

    return {"kind": "poem-cross-eval", "rows": cross_perplexity(run_dirs),
            "heldout_poems": {name: len(_split(name)[1]) for name in CORPORA},
            "record": {"source": "training.poem_eval.cross_perplexity on " + ", ".join(
                f"runs/{p.name}" for p in run_dirs), "copied": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
                "commit": git_head()}}


def poem_section(records: list[dict[str, Any]]) -> str:
    cross = next((r for r in records if r.get("kind") == "poem-cross-eval"), None)
    if cross is None:
        return "No poem cross-evaluation recorded (docs/records/poem-cross-eval.json)."
    held = cross.get("heldout_poems", {})
    names = {"tang300": "唐诗三百首", "quantangshi": "regular 全唐诗"}
    counts = "; ".join(f"{names.get(k, k)}: {v:,} poems" for k, v in held.items())
    lines = ["## Poem models on the same held-out splits", "",
             f"Each poem model scored on the held-out 5% of *both* corpora ({counts}), next to a bigram fitted on "
             "that corpus's training poems. Characters a model never saw count as its `<unk>` (rate shown). "
             "\"Seen\" counts held-out poems that were in the model's own training poems (全唐诗 contains most of "
             f"唐诗三百首). Record: [{cross['_file']}](records/{cross['_file']}).", "",
             "| model | held-out split | perplexity | unknown-character rate | held-out poems seen in training |",
             "|---|---|---|---|---|"]
    for row in cross["rows"]:
        lines.append(f"| {row['model']} | {row['corpus']} | {row['perplexity']:.1f} | {100 * row['unk_rate']:.1f}% | "
                     f"{row['seen_in_training']} |")
    return "\n".join(lines)


# ---- notes: every figure from a record ----------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _ref(record: dict[str, Any]) -> str:
    return f"[`{record['_file']}`](records/{record['_file']})"


def notes(records: list[dict[str, Any]]) -> str:
    bullets = []
    close = []
    for s in full_runs(records):
        figure = book_figure(s)
        if figure is not None and abs(100 * s["test"]["accuracy"] - figure) <= 1.5:
            close.append(f"`{s['architecture']} {s['preset']}` on {s['dataset']} ({_pct(s['test']['accuracy'])} "
                         f"against {figure}%)")
    if close:
        bullets.append(f"- **Book figures within 1.5 points**: {', '.join(close)}.")
    leaky = find(records, "mlp", "leaky512", "mnist")
    if leaky and book_figure(leaky) is not None and len(leaky["history"]) >= 2:
        figure, acc = book_figure(leaky), leaky["test"]["accuracy"]
        first, last = leaky["history"][0], leaky["history"][-1]
        bullets.append(
            f"- **`mlp leaky512` {'beats' if 100 * acc > figure else 'trails'} its book figure by "
            f"{abs(100 * acc - figure):.1f} points.** The recipe (PyTorch 从入门到精通 5.2: 784-512 LeakyReLU-10, "
            f"Adam 1e-3, batch 256, {leaky['epochs_run']} epochs) gives {_pct(acc)} here. Its own history shows where "
            f"the book's {figure}% sits: after the *first* epoch the validation accuracy is "
            f"{100 * first['val_accuracy']:.1f}%, and it climbs to {100 * last['val_accuracy']:.1f}% by epoch "
            f"{last['epoch']} ({_ref(leaky)}). The book's NumPy implementation is not runnable here, so we cannot "
            "say which of its steps stops short; the figure matches one pass over the data.")
    lenet_book = find(records, "lenet", "book", "fashion-mnist")
    lenet = find(records, "lenet", "default", "fashion-mnist")
    if lenet_book:
        text = (f"- **`lenet book`**: sigmoid activations on raw 0–255 input with SGD 0.9 saturate the first layer; "
                f"it still reaches {_pct(lenet_book['test']['accuracy'])} in {lenet_book['epochs_run']} epochs (the "
                "book gives no figure).")
        if lenet:
            text += f" Our default LeNet reaches {_pct(lenet['test']['accuracy'])} ({_ref(lenet)})."
        bullets.append(text)
    book = find(records, "poem_rnn", "book", "tang300")
    ours = find(records, "poem_rnn", "default", "quantangshi")
    if book and len(book["history"]) >= 2 and "val_perplexity" in book["history"][0]:
        first, last = book["history"][0], book["history"][-1]
        poems = book["test"].get("train_poems")
        trained = f"{poems:,} poems" if poems else "the training part of 唐诗三百首"
        text = (f"- **`poem_rnn book`** trains on stride-1 24-character windows of {trained} for "
                f"{book['epochs_run']} epochs: its training perplexity falls to {last['train_perplexity']:.2f} while "
                f"its validation perplexity rises from epoch 1 ({first['val_perplexity']:,.0f}) to epoch "
                f"{last['epoch']} ({last['val_perplexity']:,.0f}) — it memorises 唐诗三百首, which the book never "
                f"noticed because nothing was held out ({_ref(book)}).")
        if ours:
            poems = ours["test"].get("train_poems")
            on = f"{poems:,} regular 全唐诗 poems" if poems else "the training part of the regular 全唐诗 poems"
            text += (f" Our default trains on {on} and reaches {ours['test']['ratio_to_bigram']:.2f}× the bigram's "
                     f"perplexity on held-out poems ({_ref(ours)}).")
        bullets.append(text)
    bullets.append(
        "- **Validation**: images use a fixed 10k slice of the training set (the deep-MLP recipe's 50k/10k split) "
        "for\n  every preset, so book presets train on 50k images, not 60k; test figures are on the official 10k "
        "test set.\n  Fashion-MNIST's images here are the npm copy put back in official label order (see "
        "../shared/data/README.md).")
    return "## Notes on the comparisons\n\n" + "\n".join(bullets)


# ---- the README's headline table ----------------------------------------------------------------------------------

# (model, data, ours, [(textbook run, how the README names it)], book's figure)
HEADLINE = (
    ("LeNet", "Fashion-MNIST", ("lenet", "default", "fashion-mnist"),
     [(("lenet", "book", "fashion-mnist"), "`lenet --preset book`: sigmoid, AvgPool, raw 0–255, SGD 0.9")]),
    ("digit MLP", "MNIST", ("mlp", "default", "mnist"),
     [(("mlp", "book", "mnist"), "`mlp --preset book`, 784-50-100-10 sigmoid"),
      (("mlp", "deep", "mnist"), "`mlp --preset deep`")]),
    ("softmax regression", "Fashion-MNIST", None, [(("mlp", "softmax", "fashion-mnist"), "`mlp --preset softmax`")]),
    ("house prices", "Kaggle train.csv, 20% holdout (seed 42)", ("price_mlp", "default", "house-prices"),
     [(("price_mlp", "book", "house-prices"), "`price_mlp --preset book`")]),
    ("Tang poems", "全唐诗 regular poems, 5% held out", ("poem_rnn", "default", "quantangshi"),
     [(("poem_rnn", "book", "tang300"), "`poem_rnn --preset book` on 唐诗三百首, which it memorises: see RESULTS")]),
)


def _short(s: dict[str, Any]) -> str:
    t = s["test"]
    if s["task"] == "image":
        return _pct(t["accuracy"])
    if s["task"] == "price":
        return f"log-RMSE {t['log_rmse']:.4f}, MAE ${t['mae_dollars']:,.0f}"
    return f"perplexity {t['perplexity']:.1f} vs bigram {t['bigram_perplexity']:.1f} (×{t['ratio_to_bigram']:.2f})"


def headline(records: list[dict[str, Any]]) -> str:
    lines = ["| model | data | ours (`default`) | textbook preset (`book` etc.) | book's own figure |",
             "|---|---|---|---|---|"]
    for model, data, ours_key, books in HEADLINE:
        ours = find(records, *ours_key) if ours_key else None
        ours_text = f"**{_short(ours)}**" if ours else ("–" if ours_key is None else "no committed record")
        parts, figures = [], []
        for key, label in books:
            run = find(records, *key)
            parts.append(f"{_short(run)} ({label})" if run else f"no committed record ({label})")
            figure = RECIPES[f"{key[0]}-{key[1]}"].book_figures.get(key[2])
            if figure is not None:
                figures.append(f"{figure}% (`{key[0]} {key[1]}`)")
        lines.append(f"| {model} | {data} | {ours_text} | {'; '.join(parts)} | {', '.join(figures) or 'none given'} |")
    return "\n".join(lines)


def training_times(records: list[dict[str, Any]]) -> str:
    lines = ["| model | data | device | epochs (best) | train time | test metric |", "|---|---|---|---|---|---|"]
    for _, _, key, _ in HEADLINE:
        run = find(records, *key) if key else None
        if run:
            lines.append(f"| `{run['architecture']} {run['preset']}` | {run['dataset']} | {run['device']} | "
                         f"{run['epochs_run']} ({run['best_epoch']}) | {run['train_seconds']:,.0f} s | {_short(run)} |")
    return "\n".join(lines)


# ---- writing ------------------------------------------------------------------------------------------------------


def _block(name: str, body: str) -> str:
    return f"<!-- generated: {name} -->\n{body.rstrip()}\n{END}"


def replace_sections(text: str, bodies: dict[str, str]) -> str:
    """``text`` with the blocks named in ``bodies`` rewritten; every other block and line kept."""
    return MARKER.sub(lambda m: _block(m.group(1), bodies[m.group(1)]) if m.group(1) in bodies else m.group(0), text)


def results_sections(records: list[dict[str, Any]]) -> dict[str, str]:
    return {"results-table": results_table(records), "poem-cross-eval": poem_section(records),
            "results-notes": notes(records)}


def readme_sections(records: list[dict[str, Any]]) -> dict[str, str]:
    return {"headline-results": headline(records), "training-times": training_times(records)}


def render_results(existing: str | None, records: list[dict[str, Any]]) -> str:
    """RESULTS.md's new text: blocks rewritten in place, or (no blocks yet) the full page plus any other
    report's generated blocks the old page carried."""
    bodies = results_sections(records)
    if existing and set(bodies) <= {m.group(1) for m in MARKER.finditer(existing)}:
        return replace_sections(existing, bodies)
    page = results_markdown(records)
    foreign = [m.group(0) for m in MARKER.finditer(existing or "") if m.group(1) not in bodies]
    return page + "".join(f"\n{block}\n" for block in foreign)


def render_readme(existing: str, records: list[dict[str, Any]]) -> str:
    return replace_sections(existing, readme_sections(records))


def record_finished_runs(records_dir: Path = RECORDS_DIR) -> list[Path]:
    """Record every finished full-profile run under runs/ (and the poem cross-evaluation, when both full
    poem runs are there); return the records written."""
    from training.summary import load_summaries

    written = []
    summaries = [s for s in load_summaries() if s.get("profile") == "full" and not s.get("limit")]
    for s in summaries:
        written.append(write_record(s["run"], records_dir))
    poem_runs = [runs_dir() / s["run"] for s in summaries if s.get("task") == "poem"]
    if {s["dataset"] for s in summaries if s.get("task") == "poem"} >= {"tang300", "quantangshi"}:
        path = records_dir / CROSS_EVAL
        path.write_text(json.dumps(cross_eval_record(poem_runs), indent=1, ensure_ascii=False) + "\n",
                        encoding="utf-8")
        written.append(path)
    return written


def write_report(path: Path = RESULTS, *, record_runs: bool = True, readme: Path | None = README) -> Path:
    if record_runs:
        for written in record_finished_runs():
            print(f"recorded {written.relative_to(REPO_ROOT) if written.is_relative_to(REPO_ROOT) else written}")
    records = load_records()
    if not full_runs(records):
        raise SystemExit("no run summaries in docs/records/: python -m training report --record RUN")
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = path.read_text(encoding="utf-8") if path.is_file() else None
    path.write_text(render_results(existing, records), encoding="utf-8")
    if readme is not None and readme.is_file():
        text = readme.read_text(encoding="utf-8")
        if MARKER.search(text):
            readme.write_text(render_readme(text, records), encoding="utf-8")
    return path
