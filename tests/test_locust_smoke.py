"""The Locust load test, briefly, against a real server: every user class, malformed requests included.

Checks that the locustfile works end to end (its exit code is its SLO verdict), not speed: the p95
bounds are lifted (``DLBOOK_LT_P95_SCALE=inf``), so the verdict is about failures, silent endpoints
and errors in the load test's own code. Latency is measured, with the default p95 bounds, by running
``loadtests/locustfile.py`` itself (``loadtests/README.md``).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_server import serve

REPO = Path(__file__).resolve().parents[1]
ENDPOINTS = ["/classify", "/classify_pixels", "/predict_price", "/generate_poem", "/generate_poem_stream"]


@pytest.fixture(scope="module")
def server(exported: dict[str, dict], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # DLBOOK_MAX_QUEUE_MS=0: no shedding by event-loop lateness, which follows the machine's load, not the code
    with serve("DlbookService", tmp_path_factory.mktemp("locust") / "server.log", DLBOOK_MAX_QUEUE_MS="0") as base:
        yield base


def test_locust_run_meets_its_slos_on_every_endpoint(server: str, tmp_path: Path) -> None:
    prefix = tmp_path / "smoke"
    env = {**os.environ, "DLBOOK_LT_MALFORMED_SHARE": "0.4", "DLBOOK_LT_P95_SCALE": "inf",
           "DLBOOK_LT_SERVICE": "all"}
    result = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(REPO / "loadtests" / "locustfile.py"), "--headless",
         "--users", "5", "--spawn-rate", "5", "--run-time", "20s", "--stop-timeout", "10", "--host", server,
         "--csv", str(prefix), "--html", str(tmp_path / "smoke.html"), "--only-summary"],
        cwd=REPO, env=env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "all SLOs met" in output

    with open(f"{prefix}_stats.csv", newline="") as fh:
        rows = {row["Name"]: row for row in csv.DictReader(fh)}
    for name in ENDPOINTS + [f"{e} (malformed)" for e in ENDPOINTS] + ["/generate_poem_stream first char"]:
        assert name in rows, f"no requests to {name}: {sorted(rows)}"
        assert int(rows[name]["Request Count"]) > 0 and int(rows[name]["Failure Count"]) == 0, rows[name]
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    with open(f"{prefix}_failures.csv", newline="") as fh:
        assert list(csv.DictReader(fh)) == []
    assert (tmp_path / "smoke.html").stat().st_size > 10_000


def test_without_any_data_root_the_users_load_the_committed_samples(tmp_path: Path) -> None:
    """A machine with no data sets (no $DLBOOK_DATA, data/raw or ../shared/data) still runs the load
    test on the real samples committed under data/samples. In a subprocess: importing Locust patches
    this process's sockets and threads (gevent; Locust does it unconditionally on import,
    https://github.com/locustio/locust/issues/2250). Run it in process if Locust ever makes the
    patching optional."""
    probe = (
        "import sys\n"
        "import training.paths as paths\n"
        "paths.SHARED_DATA_DIR = paths.RAW_DATA_DIR = paths.REPO_ROOT / 'absent'\n"
        "sys.path.insert(0, 'loadtests')\n"
        "import locustfile\n"
        "m = locustfile.material()\n"
        "print(len(m.pngs), len(m.houses), len(m.prompts), len(m.themes))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DLBOOK_DATA"}
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = [int(n) for n in done.stdout.split()[-4:]]
    assert all(n > 0 for n in counts), done.stdout
