"""Every published figure comes from a committed record.

- every benchmark record (``docs/bench/*.json``) and run record (``docs/records/*.json``) parses and has
  the fields the reports need;
- the generated sections of the docs are exactly what ``python -m loadtests.report`` and
  ``python -m training report`` give from the committed records (a hand-edited table, or a record added
  without regenerating, fails here);
- no doc cites the git-ignored ``runs/`` as the source of a figure;
- and the machinery itself: a record written by a benchmark's own code, the median with min–max over
  three or more invocations, no median below three, which series a table takes, other sections kept.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
from pathlib import Path

import pytest

from loadtests import records
from loadtests import report as bench_report
from loadtests.loadgen import LoadResult
from training import report as training_report

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "docs" / "bench"
RUN_RECORDS = REPO / "docs" / "records"
DOCS = [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]


# ---- the committed records and docs --------------------------------------------------------------------------


def test_every_benchmark_record_is_sound() -> None:
    for path in sorted(BENCH.glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        assert records.validate(record) == [], path.name
        assert path.name == records.file_name(record), "a record's file name says its benchmark, start and commit"
        # A checkout's absolute path would make the same command another series in another clone.
        assert not Path(record["argv"][0]).is_absolute(), f"{path.name}: argv[0] must be repository-relative"
        assert record["series"] == records.series_command(record["argv"]), path.name


def test_every_run_record_parses_and_run_summaries_are_complete() -> None:
    found = sorted(RUN_RECORDS.glob("*.json"))
    assert found, "docs/records/ holds the run summaries RESULTS.md is written from"
    summaries = 0
    for path in found:
        record = json.loads(path.read_text(encoding="utf-8"))
        assert isinstance(record, dict), path.name
        if training_report.is_run_summary(record):
            summaries += 1
            assert training_report.run_problems(record) == [], path.name
        if record.get("kind") == "poem-cross-eval":
            assert record["rows"] and all({"model", "corpus", "perplexity"} <= set(r) for r in record["rows"])
    assert summaries >= 1


def test_performance_docs_are_what_the_benchmark_records_give() -> None:
    for path, text in bench_report.render(REPO).items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.relative_to(REPO)} differs from its records: run `python -m loadtests.report`")


def test_results_and_readme_are_what_the_run_records_give() -> None:
    found = training_report.load_records()
    results = training_report.RESULTS.read_text(encoding="utf-8")
    assert training_report.render_results(results, found) == results, "run `python -m training report`"
    readme = training_report.README.read_text(encoding="utf-8")
    assert training_report.render_readme(readme, found) == readme, "run `python -m training report`"


def test_no_doc_cites_runs_as_the_source_of_a_figure() -> None:
    cited = re.compile(r"\bruns/[\w<>*.\-/]*\.(json|md|csv|html)\b")
    for path in DOCS:
        hits = [m.group(0) for m in cited.finditer(path.read_text(encoding="utf-8"))]
        assert not hits, f"{path.relative_to(REPO)} cites git-ignored result files: {hits}"


def test_the_results_notes_take_their_figures_from_the_records() -> None:
    found = training_report.load_records()
    notes = training_report.notes(found)
    leaky = training_report.find(found, "mlp", "leaky512", "mnist")
    assert f"{100 * leaky['history'][0]['val_accuracy']:.1f}%" in notes
    assert f"{100 * leaky['history'][-1]['val_accuracy']:.1f}%" in notes
    book = training_report.find(found, "poem_rnn", "book", "tang300")
    assert f"({book['history'][0]['val_perplexity']:,.0f})" in notes
    assert f"({book['history'][-1]['val_perplexity']:,.0f})" in notes


def test_a_training_log_gives_the_committed_record() -> None:
    log = REPO / "docs" / "training-logs" / "mlp-leaky512.log"
    parsed = training_report.record_from_log(log)
    committed = json.loads((RUN_RECORDS / "mlp-leaky512-mnist.json").read_text(encoding="utf-8"))
    assert {k: v for k, v in parsed.items() if k != "record"} == {k: v for k, v in committed.items() if k != "record"}
    assert parsed["test"]["accuracy"] == pytest.approx(0.9716)
    assert [row["epoch"] for row in parsed["history"]] == [1, 2, 3, 4, 5]


# ---- the machinery, on records made here ---------------------------------------------------------------------


def _cell(label: str, rps: float, p50: float, p99: float, cpu: float = 0.5) -> LoadResult:
    return LoadResult(label=label, connections=1, requests=int(rps * 10), duration_s=10.0, rps=rps, p50=p50, p90=p99,
                      p99=p99, p999=p99, mean=p50, max=p99, errors=0, timeouts=0, statuses={}, server_cpu_ms=cpu)


def _recording(tmp_path: Path, benchmark: str, argv: list[str], config: dict) -> records.Recording:
    args = argparse.Namespace(**config, record_dir=tmp_path, no_record=False, json=None)
    return records.begin(benchmark, args, argv=argv)


def _write(recording: records.Recording, result: dict, started: str) -> Path:
    path = records.write(recording, result)
    record = json.loads(path.read_text(encoding="utf-8"))
    record["started"] = record["finished"] = started
    path.unlink()
    fresh = path.with_name(records.file_name(record))
    fresh.write_text(json.dumps(record), encoding="utf-8")
    return fresh


HTTP_ARGV = ["loadtests/http_bench.py", "--rounds", "2", "--duration", "12", "--threads", "1",
             "--record-dir", "/tmp/x", "--json", "/tmp/y.json"]
HTTP_CONFIG = {"model": "fashion-lenet", "service": "ImageService", "rounds": 2, "duration": 12.0,
               "concurrency": [1, 32], "payloads": ["png", "json"], "threads": 1, "env": []}


def _http_result(ratio: float) -> dict:
    from loadtests.http_bench import table

    results = {}
    for payload in ("json", "png"):
        for conc in (1, 32):
            results[(payload, "bare", conc)] = [_cell("bare", 1000.0, 1.0, 2.0)]
            results[(payload, "served", conc)] = [_cell("served", 1000.0 * ratio, 1.5, 3.0)]
    return {"summary": table(results)[1], "models": {"fashion-lenet": "fashion-lenet:test"}}


def test_a_benchmark_record_has_the_machine_facts_and_the_command(tmp_path: Path) -> None:
    recording = _recording(tmp_path, "http-bench", HTTP_ARGV, HTTP_CONFIG)
    path = records.write(recording, _http_result(0.9))
    record = json.loads(path.read_text(encoding="utf-8"))
    assert records.validate(record) == []
    assert re.fullmatch(r"http-bench-\d{8}T\d{6}Z-[0-9a-f]{7}\.json|http-bench-\d{8}T\d{6}Z-unknown\.json",
                        path.name)
    assert record["command"].startswith("python loadtests/http_bench.py --rounds 2")
    assert record["series"] == "python loadtests/http_bench.py --rounds 2 --duration 12 --threads 1"
    machine = record["machine"]
    assert machine["cores"] >= 1 and machine["cpu_model"] and len(machine["load_before"]) == 3
    assert "record_dir" not in record["config"] and record["config"]["threads"] == 1


def test_no_median_below_three_invocations_then_median_with_min_max(tmp_path: Path) -> None:
    recording = _recording(tmp_path, "http-bench", HTTP_ARGV, HTTP_CONFIG)
    _write(recording, _http_result(0.8), "2026-11-28T10:00:00Z")
    _write(recording, _http_result(1.0), "2026-11-28T10:05:00Z")
    two = bench_report.sections(bench_report.load_records(tmp_path))
    assert two["docs/PERFORMANCE.md"]["http-bench"].startswith("**No median published**")
    assert "0.80×" not in two["docs/PERFORMANCE.md"]["http-bench"]
    assert "no median" in two["docs/PERFORMANCE.md"]["targets"]
    _write(recording, _http_result(0.9), "2026-11-28T10:10:00Z")
    three = bench_report.sections(bench_report.load_records(tmp_path))
    http = three["docs/PERFORMANCE.md"]["http-bench"]
    assert "**0.90× (0.80–1.00×)**" in http
    assert "3 invocations of `python loadtests/http_bench.py --rounds 2 --duration 12 --threads 1`" in http
    assert "yes (median; 3 of 3 invocations)" in three["docs/PERFORMANCE.md"]["targets"]
    assert "JSON 0.90× (0.80–1.00×)" in three["README.md"]["readme-performance"]


def test_a_complete_series_wins_over_a_newer_short_one(tmp_path: Path) -> None:
    recording = _recording(tmp_path, "http-bench", HTTP_ARGV, HTTP_CONFIG)
    for minute, ratio in ((0, 0.8), (5, 0.9), (10, 1.0)):
        _write(recording, _http_result(ratio), f"2026-11-28T10:{minute:02d}:00Z")
    short = _recording(tmp_path, "http-bench", ["loadtests/http_bench.py", "--rounds", "1", "--threads", "1"],
                       {**HTTP_CONFIG, "rounds": 1})
    _write(short, _http_result(2.0), "2026-11-28T11:00:00Z")
    series = bench_report.pick(bench_report.load_records(tmp_path), "http-bench", bench_report.HTTP_W1.wanted)
    assert series.n == 3 and series.command.endswith("--rounds 2 --duration 12 --threads 1")
    for minute in (5, 10, 15):  # a newer complete series takes over
        _write(short, _http_result(2.0), f"2026-11-28T11:{minute:02d}:00Z")
    series = bench_report.pick(bench_report.load_records(tmp_path), "http-bench", bench_report.HTTP_W1.wanted)
    assert series.n == 4 and "--rounds 1" in series.command


def test_the_peers_record_path_feeds_the_peers_tables(tmp_path: Path) -> None:
    """bench_peers needs the peers' virtualenvs; its record path is checked on its own summary code."""
    from loadtests.peers.bench_peers import record_result, summarise

    argv = ["loadtests/peers/bench_peers.py", "--rounds", "2", "--duration", "12", "--threads", "1"]
    config = {"model": "fashion-lenet", "service": "ImageService", "rounds": 2, "duration": 12.0,
              "concurrency": [1, 32], "peers": ["triton", "torchserve"], "threads": 1, "triton_max_batch": 64,
              "triton_queue_delay_us": 100, "torchserve_batch_size": 32, "torchserve_batch_delay_ms": 2,
              "verify_images": 16, "env": []}
    recording = _recording(tmp_path, "peers", argv, config)
    for i, ours in enumerate((1700.0, 1800.0, 1900.0)):
        results = {}
        for conc in (1, 32):
            for name, rps in (("ours", ours if conc == 32 else 1000.0), ("bare", 1800.0), ("triton", 1500.0),
                              ("torchserve", 1400.0)):
                results[(name, conc)] = [_cell(name, rps if conc == 32 else rps / 3, 1.0, 2.0)]
        _, summary = summarise(results)
        versions = {"ours": {"bentoml": "1.4"}, "triton": {"tritonserver": "2.51.0"},
                    "torchserve": {"torchserve": "0.12"}}
        setup = {"triton": {"venv_build_s": None, "venv_mib": 417, "server_start_s": 3.5},
                 "torchserve": {"venv_build_s": None, "venv_mib": 977, "server_start_s": 3.2},
                 "ours": {"server_start_s": 2.1}}
        _write(recording, record_result(summary, versions, setup, {"bare": 1e-7}, {"ours": 3200}, "fashion-lenet:v"),
               f"2026-11-28T12:0{i}:00Z")
    for path in tmp_path.glob("peers-*.json"):
        assert records.validate(json.loads(path.read_text())) == []
    docs = bench_report.sections(bench_report.load_records(tmp_path))["docs/PERFORMANCE.md"]
    assert "| triton | 32 | **1.20× (1.13–1.27×)** |" in docs["peers-w1"]
    assert "≥ 1.2× Triton at c=32 | 1.20× (1.13–1.27×) | yes (median; 2 of 3 invocations)" in docs["targets"]
    assert "417 MiB" in docs["peer-versions"]
    assert docs["peers-w2"].startswith("**No record yet**")


def test_replacing_sections_keeps_other_blocks_and_refuses_a_missing_marker() -> None:
    text = ("intro\n<!-- generated: a -->\nold a\n<!-- end generated -->\nmiddle\n"
            "<!-- generated: houses -->\ntheirs\n<!-- end generated -->\nend\n")
    new = bench_report.replace_sections(text, {"a": "new a"})
    assert new == text.replace("old a", "new a")
    with pytest.raises(ValueError, match="b"):
        bench_report.replace_sections(text, {"a": "x", "b": "y"})


def test_results_keeps_sections_it_does_not_write() -> None:
    found = training_report.load_records()
    page = training_report.render_results(None, found)
    theirs = "## Houses\n\n<!-- house-eval:start -->\nfigures\n<!-- house-eval:end -->\n"
    block = "<!-- generated: houses -->\nhouse table\n<!-- end generated -->"
    notes = "<!-- generated: results-notes -->"
    edited = page.replace(notes, f"{theirs}\n{block}\n\n{notes}")
    stale = edited.replace("93.48%", "99.99%", 1)
    assert training_report.render_results(stale, found) == edited
    old_layout = "# Results\n\nold table\n\n" + block + "\n"  # a page from before the markers
    assert block in training_report.render_results(old_layout, found)


def test_other_kinds_of_record_are_left_alone(tmp_path: Path) -> None:
    for path in RUN_RECORDS.glob("*.json"):
        (tmp_path / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "house-eval.json").write_text(json.dumps({"command": "python -m training house-eval", "bars": []}))
    quick = copy.deepcopy(json.loads((RUN_RECORDS / "mlp-leaky512-mnist.json").read_text(encoding="utf-8")))
    quick.update(run="poem_rnn-quick", profile="quick")
    (tmp_path / "poem_rnn-quick.json").write_text(json.dumps(quick), encoding="utf-8")
    found = training_report.load_records(tmp_path)
    assert training_report.results_table(found) == training_report.results_table(training_report.load_records())
