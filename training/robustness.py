"""``python -m training robustness``: every served image model on corrupted and photographed test images.

Two sets, both made only from the official test splits:

- **MNIST-C** (``training/corruptions.py``): the 15 corruptions of Mu & Gilmer (2019), applied to MNIST
  and Fashion-MNIST and sent as 28×28 arrays to ``/classify_pixels``, as the data set's own images are;
- **photographed** (``training/photographs.py``): each test image printed on paper and photographed
  under one condition at a time (table and tilt, lighting and shadow, small in a large photo, pens,
  coloured ink, JPEG, transparency, EXIF orientation, off-centre, blur, noise, the playground's
  canvas, and all of them mixed), uploaded as files to ``/classify``: the served path end to end.

The clean row is the same test images sent as 28×28 arrays. Each model's figures are written to
``docs/records/robustness-<model>-<profile>.json``, and the section between
``<!-- generated: robustness -->`` and ``<!-- end generated -->`` of docs/RESULTS.md is rebuilt from
every such record.

With no ``--url`` the command starts ``bentoml serve serving.service:ImageService`` on a free local
port (the models of the BentoML store, as ``./dlbook up`` serves them) and stops it afterwards.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from loadtests.servers import stop_server
from training.corruptions import MNIST_C, corrupt
from training.datasets.images import load_image_split
from training.paths import REPO_ROOT
from training.photographs import CONDITIONS, conditions_for, render

RECORDS_DIR = REPO_ROOT / "docs" / "records"
RESULTS = REPO_ROOT / "docs" / "RESULTS.md"
SECTION = "robustness"
KIND = "robustness"
MAX_IMAGES = 64  # per request: the service's default DLBOOK_MAX_IMAGES
MAX_BYTES = 8 * 1024 * 1024  # per request, under the default 12 MiB body limit
# The bars of issue 19, shown beside the figures.
BARS = {
    ("mnist", "full"): {"photographed": 0.98, "mnist_c": 0.97},
    ("fashion-mnist", "full"): {"photographed": 0.88},
    ("mnist", "quick"): {"photographed": 0.95},
    ("fashion-mnist", "quick"): {"photographed": 0.78},
}


def test_indices(dataset: str, count: int, seed: int) -> np.ndarray:
    """Which test images the benchmark uses: a fixed random sample of the official test split."""
    total = len(load_image_split(dataset, "test").labels)
    return np.sort(np.random.default_rng(seed).permutation(total)[: min(count, total)])


# ----- talking to the service -----------------------------------------------------------------------


@dataclass(frozen=True)
class BenchmarkRow:
    """One row of the benchmark: the same test images as every other row, as 28×28 arrays (``pixels``, for
    the clean row and each MNIST-C corruption) or as photo files (``files``, one photographed condition)."""

    section: str  # "clean" | "mnist_c" | "photographed"
    name: str
    pixels: np.ndarray | None = None
    files: list[bytes] | None = None


def benchmark_rows(dataset: str, count: int, seed: int) -> tuple[np.ndarray, Iterator[BenchmarkRow]]:
    """The labels of the ``count`` test images drawn with ``seed``, and every row made from them, in the
    order of the tables (clean, the 15 corruptions, the photographed conditions), each made when reached.
    The served benchmark and ``robustness-run`` score exactly these."""
    test = load_image_split(dataset, "test")
    index = test_indices(dataset, count, seed)
    images = test.images[index]

    def rows() -> Iterator[BenchmarkRow]:
        yield BenchmarkRow("clean", "clean", pixels=images)
        for name in MNIST_C:
            yield BenchmarkRow("mnist_c", name, pixels=corrupt(images, name, seed))
        for condition in conditions_for(dataset):
            yield BenchmarkRow("photographed", condition,
                          files=[render(img, dataset, condition, seed, int(i)) for img, i in zip(images, index,
                                                                                               strict=True)])
    return test.labels[index], rows()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(log_path: Path, timeout_s: float = 180) -> Iterator[str]:
    """``bentoml serve serving.service:ImageService`` on a free 127.0.0.1 port until it is ready; stopped on exit."""
    port = _free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", "serving.service:ImageService", "--host", "127.0.0.1",
             "--port", str(port)], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "DLBOOK_LOG_LEVEL": "WARNING"}, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the image service did not start; see {log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                time.sleep(0.5)
            yield base
        finally:
            stop_server(proc, 30)


def image_models(client: httpx.Client, base: str) -> list[dict[str, Any]]:
    answer = client.post(f"{base}/models", json={})
    answer.raise_for_status()
    return [m for m in answer.json()["models"] if m.get("task") == "image"]


def classify_pixels(client: httpx.Client, base: str, model: str, images: np.ndarray) -> np.ndarray:
    """Predicted class of each ``uint8 [N, 28, 28]`` image, through ``/classify_pixels``."""
    found = []
    for start in range(0, len(images), MAX_IMAGES):
        batch = images[start: start + MAX_IMAGES]
        answer = client.post(f"{base}/classify_pixels",
                             json={"images": [img.tolist() for img in batch], "model": model, "top_k": 1})
        answer.raise_for_status()
        found += [p["class_index"] for p in answer.json()["predictions"]]
    return np.array(found)


_MIME = {b"\x89PNG": ("png", "image/png"), b"\xff\xd8\xff": ("jpg", "image/jpeg"), b"RIFF": ("webp", "image/webp")}


def _mime(blob: bytes) -> tuple[str, str]:
    return next((v for k, v in _MIME.items() if blob.startswith(k)), ("bin", "application/octet-stream"))


def classify_files(client: httpx.Client, base: str, model: str, files: Sequence[bytes]) -> np.ndarray:
    """Predicted class of each uploaded file, through ``/classify`` (multipart, as a browser sends it)."""
    found: list[int] = []
    start = 0
    while start < len(files):
        end, size = start, 0
        while end < len(files) and end - start < MAX_IMAGES and (end == start or size + len(files[end]) <= MAX_BYTES):
            size += len(files[end])
            end += 1
        parts = [("images", (f"{i}.{_mime(files[i])[0]}", files[i], _mime(files[i])[1])) for i in range(start, end)]
        answer = client.post(f"{base}/classify", files=parts, data={"model": model, "top_k": "1"})
        answer.raise_for_status()
        found += [p["class_index"] for p in answer.json()["predictions"]]
        start = end
    return np.array(found)


# ----- the benchmark --------------------------------------------------------------------------------


def run_benchmark(base: str, count: int = 200, seed: int = 0, models: Sequence[str] | None = None,
                  progress: bool = True) -> list[dict[str, Any]]:
    """One record per served image model (or those named): clean, MNIST-C and photographed accuracy."""
    records = []
    with httpx.Client(timeout=300) as client:
        served_models = image_models(client, base)
        if models:
            served_models = [m for m in served_models if m["name"] in models]
        by_dataset: dict[str, list[dict[str, Any]]] = {}
        for model in served_models:
            by_dataset.setdefault(model["dataset"], []).append(model)
        for dataset, group in by_dataset.items():
            labels, rows = benchmark_rows(dataset, count, seed)
            results: dict[str, dict[str, Any]] = {
                m["name"]: {"clean": 0.0, "mnist_c": {}, "photographed": {}, "seconds": {}} for m in group}
            began = time.perf_counter()
            for row in rows:
                for model in group:
                    started = time.perf_counter()
                    if row.files is None:
                        accuracy = _accuracy(classify_pixels(client, base, model["name"], row.pixels), labels)
                    else:
                        accuracy = _accuracy(classify_files(client, base, model["name"], row.files), labels)
                        results[model["name"]]["seconds"][row.name] = round(time.perf_counter() - started, 2)
                    if row.section == "clean":
                        results[model["name"]]["clean"] = accuracy
                    else:
                        results[model["name"]][row.section][row.name] = accuracy
                if progress and row.section != "clean":
                    label = "MNIST-C" if row.section == "mnist_c" else "photographed"
                    print(f"  {dataset} {label} {row.name}: " + ", ".join(
                        f"{m['name']} {results[m['name']][row.section][row.name]:.1%}" for m in group), flush=True)
            for model in group:
                result = results[model["name"]]
                photographed = list(result["photographed"].values())
                records.append({
                    "kind": KIND,
                    "model": model["name"],
                    "version": model["version"],
                    "dataset": dataset,
                    "architecture": model.get("architecture"),
                    "preset": model.get("preset"),
                    "profile": model.get("profile"),
                    "trained_on": model.get("trained_on"),
                    "test_accuracy": model.get("test_metrics", {}).get("accuracy"),
                    "images_per_condition": len(labels),
                    "seed": seed,
                    "clean": result["clean"],
                    "mnist_c": result["mnist_c"],
                    "mnist_c_mean": float(np.mean(list(result["mnist_c"].values()))),
                    "photographed": result["photographed"],
                    "photographed_mean": float(np.mean(photographed)),
                    "upload_seconds": result["seconds"],
                    "benchmark_seconds": round(time.perf_counter() - began, 1),
                    "date": dt.date.today().isoformat(),
                    "command": "python -m training robustness " + shlex.join(sys.argv[2:])
                    if sys.argv[:2] and sys.argv[0].endswith("__main__.py") else None,
                    "commit": _commit(),
                })
    return records


def _accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    return round(float((predicted == labels).mean()), 4)


def _commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10)
    except OSError:
        return None
    return done.stdout.strip() or None


# ----- records and the RESULTS.md section ------------------------------------------------------------


def record_path(record: dict[str, Any], records_dir: Path = RECORDS_DIR) -> Path:
    return records_dir / f"robustness-{record['model']}-{record.get('profile') or 'unknown'}.json"


def write_records(records: list[dict[str, Any]], records_dir: Path = RECORDS_DIR) -> list[Path]:
    records_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for record in records:
        path = record_path(record, records_dir)
        path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def load_records(records_dir: Path = RECORDS_DIR) -> list[dict[str, Any]]:
    found = []
    for path in sorted(records_dir.glob("robustness-*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(record, dict) and record.get("kind") == KIND:
            found.append({**record, "_file": path.name})
    return found


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _order(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(records, key=lambda r: (r["dataset"] != "mnist", r.get("profile") != "quick", r["model"]))


def _counts(records: list[dict[str, Any]]) -> str:
    counts = sorted({r["images_per_condition"] for r in records})
    if len(counts) == 1:
        return str(counts[0])
    return " or ".join(str(c) for c in counts) + " (see each model below)"


def _bar_note(record: dict[str, Any], key: str) -> str:
    bar = BARS.get((record["dataset"], record.get("profile") or ""), {}).get(key)
    value = record["photographed_mean"] if key == "photographed" else record["mnist_c_mean"]
    if bar is None:
        return ""
    return f" ({'meets' if value >= bar else 'below'} the {100 * bar:.0f}% bar)"


def section(records: list[dict[str, Any]]) -> str:
    """The generated robustness section of RESULTS.md."""
    lines = ["## Robustness: corrupted and photographed test images", ""]
    if not records:
        lines.append("No robustness records yet: run `python -m training robustness`.")
        return "\n".join(lines) + "\n"
    ordered = _order(records)
    commands = sorted({r["command"] for r in ordered if r.get("command")})
    lines += [
        "Accuracy of every served image model on images made only from the official test split "
        f"({_counts(ordered)} test images per condition, a fixed random sample, the same images in every row "
        "of a model's column). *Clean* is those images sent as 28×28 arrays to "
        "`/classify_pixels`. **MNIST-C**: the 15 corruptions of Mu & Gilmer (2019) as implemented in "
        "`training/corruptions.py`, sent the same way (applied to Fashion-MNIST too). **Photographed**: each "
        "image printed on paper and photographed under one condition (`training/photographs.py`), uploaded as "
        "a file to `/classify`, so the photo → frame step of `serving/image_to_tensor.py` runs as in service.",
        "",
        "Command: " + ", ".join(f"`{c}`" for c in commands) if commands else
        "Command: `python -m training robustness`",
        "",
    ]
    header = "| | " + " | ".join(f"{r['model']} ({r.get('profile')}, {r['dataset']})" for r in ordered) + " |"
    rule = "|---|" + "---|" * len(ordered)
    lines += ["### Photographed (uploads to `/classify`)", "", header, rule]
    lines.append("| clean (28×28 arrays) | " + " | ".join(_pct(r["clean"]) for r in ordered) + " |")
    for name, (what, _, _) in CONDITIONS.items():
        cells = [_pct(r["photographed"].get(name)) for r in ordered]
        if any(c != "–" for c in cells):
            lines.append(f"| {name}: {what} | " + " | ".join(cells) + " |")
    lines.append("| **all conditions (mean)** | " + " | ".join(
        f"**{_pct(r['photographed_mean'])}**{_bar_note(r, 'photographed')}" for r in ordered) + " |")
    lines += ["", "### MNIST-C corruptions (28×28 arrays to `/classify_pixels`)", "", header, rule]
    lines.append("| clean | " + " | ".join(_pct(r["clean"]) for r in ordered) + " |")
    for name in MNIST_C:
        lines.append(f"| {name} | " + " | ".join(_pct(r["mnist_c"].get(name)) for r in ordered) + " |")
    lines.append("| **mean of the 15** | " + " | ".join(
        f"**{_pct(r['mnist_c_mean'])}**{_bar_note(r, 'mnist_c')}" for r in ordered) + " |")
    lines += ["", "Models: " + "; ".join(
        f"{r['model']} {r['version']} ({r.get('architecture')} `{r.get('preset')}`, {r.get('profile')} profile, "
        f"test split {_pct(r.get('test_accuracy'))}, {r['images_per_condition']} images per condition, seed "
        f"{r['seed']}, record [{r['_file']}](records/{r['_file']}))"
        for r in ordered if "_file" in r) + "."]
    return "\n".join(lines) + "\n"


def write_section(results: Path = RESULTS, records_dir: Path = RECORDS_DIR) -> Path:
    """Rewrite (or append) the robustness section of RESULTS.md from the committed records."""
    from training.report import MARKER, _block, replace_sections

    body = section(load_records(records_dir))
    text = results.read_text(encoding="utf-8") if results.is_file() else "# Results\n"
    if any(m.group(1) == SECTION for m in MARKER.finditer(text)):
        text = replace_sections(text, {SECTION: body})
    else:
        text = text.rstrip("\n") + "\n\n" + _block(SECTION, body) + "\n"
    results.write_text(text, encoding="utf-8")
    return results


def main(url: str | None, count: int, seed: int, models: Sequence[str] | None, records_dir: Path,
         results: Path, write: bool = True) -> list[dict[str, Any]]:
    if url:
        records = run_benchmark(url.rstrip("/"), count, seed, models)
    else:
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"dlbook-robustness-{os.getpid()}.log"
        with served(log) as base:
            records = run_benchmark(base, count, seed, models)
    for record in records:
        print(f"{record['model']} ({record.get('profile')}): clean {_pct(record['clean'])}, "
              f"photographed {_pct(record['photographed_mean'])}, MNIST-C {_pct(record['mnist_c_mean'])}")
    if write:
        for path in write_records(records, records_dir):
            print(f"wrote {path}")
        print(f"wrote {write_section(results, records_dir)}")
    return records
