"""The in-process runtime benchmark, run in its quick mode on the session's brief exported models.

Only the shape of the result is checked (every requested cell present, every figure positive and
finite): speed is measured and reported, never asserted. A quick run writes its record only where
``--record-dir`` says (never into docs/bench), and that record is sound.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests import records
from training.bench import DEFAULT_MODELS, alternate

REPO = Path(__file__).resolve().parents[1]
RUNTIMES = {"eager", "torchscript", "ort-cpu"}
FIGURES = ("median_ms", "p99_ms", "samples_per_s", "vs_eager", "spread")


def test_quick_mode_fills_every_cell_with_positive_figures(exported: dict[str, dict], tmp_path: Path) -> None:
    names = {meta["name"] for meta in exported.values()}
    assert set(DEFAULT_MODELS) <= names, names
    out, table, record_dir = tmp_path / "bench.json", tmp_path / "bench.md", tmp_path / "records"
    committed = sorted((REPO / "docs" / "bench").glob("*.json"))
    proc = subprocess.run(
        [sys.executable, str(REPO / "loadtests" / "runtime_bench.py"), "--quick", "--batches", "1,8",
         "--poem-batches", "1,4", "--json", str(out), "--markdown", str(table), "--record-dir", str(record_dir)],
        cwd=REPO, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted((REPO / "docs" / "bench").glob("*.json")) == committed
    [record_file] = record_dir.glob("runtime-*.json")
    record = json.loads(record_file.read_text())
    assert records.validate(record) == [] and record["config"]["quick"] is True
    assert len(record["result"]["cells"]) == len(json.loads(out.read_text())["cells"])
    result = json.loads(out.read_text())
    cells = result["cells"]
    runtimes = RUNTIMES | ({"ort-cuda"} if any(c["runtime"] == "ort-cuda" for c in cells) else set())
    expected = {(m, b, r) for m in DEFAULT_MODELS for b in ((1, 4) if m == "tang-poem" else (1, 8)) for r in runtimes}
    assert {(c["model"], c["batch"], c["runtime"]) for c in cells} == expected
    for cell in cells:
        for key in FIGURES[:4]:
            assert math.isfinite(cell[key]) and cell[key] > 0, (cell["model"], cell["batch"], cell["runtime"], key)
        assert math.isfinite(cell["spread"]) and cell["spread"] >= 0
        assert len(cell["round_median_ms"]) == 2  # quick mode still alternates two rounds
    assert result["environment"]["threads"]["torch_intra_op"] == result["environment"]["threads"]["ort_intra_op"]
    rows = [line for line in table.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(expected)
    assert rows[0] in proc.stdout  # the table is printed as well


def test_alternate_rotates_the_order_every_round() -> None:
    calls: list[str] = []
    contenders = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    timings = alternate(contenders, batch=4, rounds=3, seconds=0.0, warmup=1, min_calls=1)
    assert calls == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b"]  # warm-up, then rotations
    assert all(len(t.round_medians) == 3 and len(t.samples) == 3 for t in timings.values())
    assert all(t.throughput > 0 and t.p99 >= t.median > 0 for t in timings.values())


def test_the_accepted_latency_quantile_is_read_from_the_histograms_difference() -> None:
    from loadtests.overload import histogram_quantile_ms

    inf = float("inf")
    before = {0.01: 10.0, 0.02: 10.0, 0.05: 10.0, inf: 10.0}  # ten requests observed before the level
    after = {0.01: 60.0, 0.02: 150.0, 0.05: 160.0, inf: 160.0}  # then 50 under 10 ms, 90 in 10-20, 10 in 20-50
    assert histogram_quantile_ms(before, after, 0.5) == pytest.approx(10 + 10 * (75 - 50) / 90)
    assert histogram_quantile_ms(before, after, 0.99) == pytest.approx(20 + 30 * (148.5 - 140) / 10)
    assert histogram_quantile_ms(after, after, 0.99) is None  # nothing observed in between


def test_the_report_and_the_peer_benchmark_hold_the_same_bars() -> None:
    from loadtests.peers.bench_peers import TARGETS
    from loadtests.report import PEER_TARGETS

    assert {f"{peer}-c{conc}": target for peer, conc, target in TARGETS} == PEER_TARGETS
