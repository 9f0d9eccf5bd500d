"""The HTTP services against a real server on 127.0.0.1, with models trained briefly on real data."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from live_server import serve
from PIL import Image
from test_image_to_tensor import png_bomb

from preprocessing import PixelScaling
from serving.artifacts import sha256_file, verify_model_dir
from training.datasets.house import load_house_train, read_house_csv
from training.datasets.images import load_image_split
from training.datasets.sources import find_dataset
from training.export import load_run

REPO = Path(__file__).resolve().parents[1]
# Servers under test shed no request for event-loop lateness (DLBOOK_MAX_QUEUE_MS=0): that follows the
# machine's load, not the code, and would turn an expected answer into a 503 on a busy machine.
STEADY = {"DLBOOK_MAX_QUEUE_MS": "0"}


@pytest.fixture(scope="module")
def server(exported: dict[str, dict], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve("DlbookService", tmp_path_factory.mktemp("server") / "server.log", **STEADY) as base:
        yield base


def _encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None, **save) -> bytes:
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def _classify(base: str, blobs: list[bytes], **data) -> list[dict]:
    files = [("images", (f"{i}.img", b, "application/octet-stream")) for i, b in enumerate(blobs)]
    response = httpx.post(f"{base}/classify", files=files, data={k: str(v) for k, v in data.items()}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def _classify_pixels(base: str, arrays: np.ndarray, **body) -> list[dict]:
    response = httpx.post(f"{base}/classify_pixels", json={"images": arrays.tolist(), **body}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def test_models_endpoint_lists_what_is_served(server: str) -> None:
    body = httpx.post(f"{server}/models", json={}, timeout=10).json()
    names = {m["name"] for m in body["models"]}
    assert {"fashion-lenet", "fashion-lenet-book", "digits-mlp", "house-price", "tang-poem"} <= names
    lenet = next(m for m in body["models"] if m["name"] == "fashion-lenet")
    assert lenet["provider"] == "CPUExecutionProvider" and lenet["inputs"][0]["shape"] == ["batch", 1, 28, 28]
    poem = next(m for m in body["models"] if m["name"] == "tang-poem")
    assert poem["provider"] == "CPUExecutionProvider"  # as its decoding process reported it
    assert "accuracy" in lenet["test_metrics"] and body["problems"] == []


def test_image_files_classify_like_the_raw_arrays(server: str) -> None:
    images = load_image_split("fashion-mnist", "test").images[:40]
    raw = _classify_pixels(server, images)
    expected = [p["class_index"] for p in raw]
    exact = {
        "png": [_encode(a) for a in images],
        "inverted png": [_encode(255 - a) for a in images],
        "rgba png": [_encode(np.dstack([a, a, a, np.full_like(a, 255)]), mode="RGBA") for a in images],
        "bmp": [_encode(a, "BMP") for a in images],
    }
    for variant, blobs in exact.items():
        got = _classify(server, blobs)
        assert [p["class_index"] for p in got] == expected, variant
        np.testing.assert_allclose([p["probability"] for p in got], [p["probability"] for p in raw], atol=1e-6)
    # photos: 280×280 RGB JPEGs, and the same rotated on disk with an EXIF tag that turns them back
    big = [np.asarray(Image.fromarray(a).resize((280, 280), Image.BICUBIC)) for a in images]
    jpeg = [_encode(b, "JPEG", mode="RGB", quality=92) for b in big]
    rotated = []
    for b in big:
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90° clockwise to display": stored rotated the other way
        rotated.append(_encode(np.rot90(b, 1).copy(), "JPEG", mode="RGB", quality=92, exif=exif.tobytes()))
    for variant, blobs in {"280px jpeg": jpeg, "exif-rotated jpeg": rotated}.items():
        got = [p["class_index"] for p in _classify(server, blobs)]
        agreement = np.mean(np.array(got) == np.array(expected))
        assert agreement >= 0.8, f"{variant}: {agreement:.0%} agree with the raw arrays"


def test_top_k_labels_in_two_languages_and_frame(server: str) -> None:
    image = load_image_split("fashion-mnist", "test").images[0]
    (answer,) = _classify(server, [_encode(image)], top_k=5, return_frame="true")
    assert len(answer["top_k"]) == 5 and answer["top_k"][0]["label"] == answer["label"]
    assert sum(t["probability"] for t in answer["top_k"]) <= 1.0 + 1e-6
    assert answer["label_zh"] in ["T恤", "裤子", "套衫", "连衣裙", "外套", "凉鞋", "衬衫", "运动鞋", "包", "短靴"]
    assert np.array_equal(np.array(answer["frame"], dtype=np.uint8), image)


def test_batched_and_unbatched_answers_are_identical(server: str) -> None:
    images = load_image_split("mnist", "test").images[:12]
    together = _classify_pixels(server, images, model="digits-mlp")

    async def one_by_one() -> list[dict]:
        async with httpx.AsyncClient(timeout=60) as client:
            responses = await asyncio.gather(*[
                client.post(f"{server}/classify_pixels", json={"images": [a.tolist()], "model": "digits-mlp"})
                for a in images])
        return [r.json()["predictions"][0] for r in responses]

    apart = asyncio.run(one_by_one())
    for a, b in zip(together, apart, strict=True):
        assert a["class_index"] == b["class_index"]
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-6)


@pytest.mark.parametrize("key", ["lenet", "lenet-book"])
def test_pixel_scaling_comes_from_metadata(server: str, trained_runs: dict[str, Path], exported: dict[str, dict],
                                           key: str) -> None:
    """A raw-0–255 model and a Normalize model: the same PNG gets the eager model's probabilities."""
    name = exported[key]["name"]
    model, saved = load_run(trained_runs[key])
    scaling = PixelScaling.from_dict(saved["preprocessing"]["scaling"])
    assert scaling.kind == ("raw" if key == "lenet-book" else "normalize")
    images = load_image_split("fashion-mnist", "test").images[:8]
    with torch.no_grad():
        eager = torch.softmax(model(torch.from_numpy(scaling.apply(images)[:, None])), dim=1).numpy()
    served = _classify(server, [_encode(a) for a in images], model=name, top_k=10)
    for probs, answer in zip(eager, served, strict=True):
        by_index = {t["class_index"]: t["probability"] for t in answer["top_k"]}
        np.testing.assert_allclose([by_index[i] for i in range(10)], probs, atol=1e-5)


def test_house_prices_for_kaggle_test_rows(server: str) -> None:
    folder = find_dataset("house-prices")
    test_csv = folder / "test.csv"
    if not test_csv.is_file():
        pytest.skip("Kaggle test.csv is not in this data folder")
    table = read_house_csv(test_csv, numeric_columns=load_house_train().numeric_columns)
    records = [dict(r, Id=i) for r, i in zip(table.records[:300], table.ids, strict=False)]
    response = httpx.post(f"{server}/predict_price", json={"records": records}, timeout=60)
    assert response.status_code == 200, response.text
    prices = np.array(response.json()["prices"])
    assert len(prices) == 300 and np.all(np.isfinite(prices)) and np.all(prices > 10_000)
    single = httpx.post(f"{server}/predict_price", json={"records": records[:1]}, timeout=60).json()["prices"]
    assert single[0] == pytest.approx(prices[0], rel=1e-6)  # batched and alone agree
    sparse = httpx.post(f"{server}/predict_price", json={"records": [{"GrLivArea": 2000}]}, timeout=60)
    assert sparse.status_code == 200 and sparse.json()["prices"][0] > 0


FORM_MARKS = "，。"


def _check_form(poem: str, chars: int, lines: int) -> None:
    assert len(poem) == lines * (chars + 1), poem
    for line in range(lines):
        clause = poem[line * (chars + 1): (line + 1) * (chars + 1)]
        assert all(re.match(r"[\u3400-\u4dbf\u4e00-\u9fff]", ch) for ch in clause[:-1]), poem
        assert clause[-1] == ("，" if line % 2 == 0 else "。"), poem


@pytest.mark.parametrize("chars", [5, 7])
@pytest.mark.parametrize("lines", [4, 8])
@pytest.mark.parametrize("mode", ["free", "prompt", "acrostic", "theme"])
def test_poems_have_exactly_the_requested_form(server: str, chars: int, lines: int, mode: str) -> None:
    body = {"chars_per_clause": chars, "lines": lines, "seed": 7, "n": 2, "top_k": 50}
    body |= {"prompt": {"prompt": "春风", "acrostic": "", "theme": ""},
             "acrostic": {"acrostic": "山水"}, "theme": {"theme": "秋天的夜晚思念远方的故乡"}}.get(mode, {})
    response = httpx.post(f"{server}/generate_poem", json=body, timeout=60)
    assert response.status_code == 200, response.text
    poems = [p["poem"] for p in response.json()["poems"]]
    assert len(poems) == 2
    for poem in poems:
        _check_form(poem, chars, lines)
        if mode == "prompt":
            assert poem.startswith("春风")
        if mode == "acrostic":
            assert poem[0] == "山" and poem[chars + 1] == "水"


def test_same_seed_same_poem_and_stream_matches(server: str) -> None:
    body = {"chars_per_clause": 7, "lines": 4, "seed": 123, "temperature": 1.0}
    first = httpx.post(f"{server}/generate_poem", json=body, timeout=60).json()["poems"][0]["poem"]
    second = httpx.post(f"{server}/generate_poem", json=body, timeout=60).json()["poems"][0]["poem"]
    assert first == second
    other = httpx.post(f"{server}/generate_poem", json=body | {"seed": 124}, timeout=60).json()["poems"][0]["poem"]
    assert other != first
    chars, done = [], None
    with httpx.stream("POST", f"{server}/generate_poem_stream", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for event in response.read().decode().split("\n\n"):
            if not event.strip():
                continue
            kind = event.split("\n")[0].removeprefix("event: ")
            data = json.loads(event.split("\n")[1].removeprefix("data: "))
            if kind == "token":
                chars.append(data["char"])
            elif kind == "done":
                done = data
    assert "".join(chars) == first and done["poems"][0]["poem"] == first


def test_the_benchmarks_lean_client_reads_the_same_poems_and_refusals(server: str) -> None:
    """``loadtests/lean_http.py`` (the poem benchmark's client) against the real server: the poem it
    reads streamed and plain is the one httpx gets, and a refusal surfaces as an error, not a poem."""
    from loadtests.lean_http import HttpError, LeanConnection

    body = {"chars_per_clause": 5, "lines": 8, "seed": 77}
    expected = httpx.post(f"{server}/generate_poem", json=body, timeout=60).json()["poems"][0]["poem"]

    async def run() -> tuple[str, int, str]:
        connection = LeanConnection(server)
        try:
            streamed = await connection.stream_poem("/generate_poem_stream", body)
            plain = await connection.post_json("/generate_poem", body)  # same keep-alive connection
            with pytest.raises(HttpError, match="HTTP 4"):
                await connection.post_json("/generate_poem", body | {"lines": 5})
            return streamed.poem, streamed.tokens, plain["poems"][0]["poem"]
        finally:
            await connection.close()

    streamed, tokens, plain = asyncio.run(run())
    assert streamed == plain == expected and tokens == len(expected) == 48


def test_metrics_report_our_models(server: str) -> None:
    _classify_pixels(server, load_image_split("mnist", "test").images[:2], model="digits-mlp")
    text = httpx.get(f"{server}/metrics", timeout=10).text
    assert 'dlbook_inference_seconds_count{model="digits-mlp",provider="CPUExecutionProvider"}' in text
    assert "dlbook_batch_size_bucket" in text and "dlbook_requests_total" in text
    assert re.search(r'dlbook_request_seconds_count\{path="/classify_pixels",status="200"\} [1-9]', text), text
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}  # the whole page parses
    samples = [s.name for s in families["dlbook_request_seconds"].samples]
    assert samples.index("dlbook_request_seconds_bucket") < samples.index("dlbook_request_seconds_count")


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        ("/classify_pixels", {"images": [[[0] * 27] * 28]}, 400, "28"),
        ("/classify_pixels", {"images": []}, 400, "no image"),
        ("/classify_pixels", {"images": [np.zeros((28, 28)).tolist()], "top_k": 11}, 400, "top_k"),
        ("/predict_price", {"records": []}, 400, "empty"),
        ("/predict_price", {"records": [{}] * 1001}, 413, "limit is 1000"),
        ("/predict_price", {"records": [[1, 2]]}, 422, "expected an object"),
        ("/predict_price", {"records": [{"Colour": "red"}]}, 422, "Colour"),
        ("/predict_price", {"records": [{"LotArea": -3}]}, 422, "LotArea"),
        ("/generate_poem", {"top_p": 1.5}, 400, "top_p"),
        ("/generate_poem", {"acrostic": "一二三四五"}, 400, "acrostic"),
        ("/generate_poem", {"n": 10000}, 400, "n: Input should be less than or equal to"),
        ("/generate_poem", {"model": "nope"}, 404, "nope"),
        ("/generate_poem", {"seed": -1}, 400, "seed"),
        ("/generate_poem", {"temperature": -0.5}, 400, "temperature"),
        ("/generate_poem", {"prompt": "床前明月光" * 13}, 400, "prompt"),
        ("/generate_poem_stream", {"chars_per_clause": 6}, 400, "chars_per_clause"),
    ],
)
def test_bad_requests_get_4xx_with_a_reason(server: str, path: str, body: dict, status: int, fragment: str) -> None:
    response = httpx.post(f"{server}{path}", json=body, timeout=30)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]
    assert httpx.get(f"{server}/livez", timeout=5).status_code == 200


@pytest.mark.parametrize(
    ("case", "status", "fragment"),
    [
        ("wrong field name", 400, "unknown form field"),
        ("text instead of a file", 400, "must be an uploaded file"),
        ("zero bytes", 400, "empty"),
        ("text file named .png", 400, "not an image"),
        ("truncated png", 400, "truncated"),
        ("decompression bomb", 413, "pixels"),
        ("65 images", 413, "limit is 64"),
        ("13 MB upload", 413, "exceeds"),
        ("file in a value field", 400, "takes a value"),
        ("disguised text part", 400, "must be an uploaded file"),
    ],
)
def test_hostile_uploads_get_4xx_and_the_worker_stays_up(server: str, case: str, status: int, fragment: str) -> None:
    png = _encode(load_image_split("mnist", "test").images[0])
    files: list = []
    data: dict = {}
    if case == "wrong field name":
        files = [("image", ("a.png", png, "image/png"))]
    elif case == "text instead of a file":
        data = {"images": "http://127.0.0.1:1/not-fetched.png"}
        files = [("model", (None, b"fashion-lenet"))]
    elif case == "zero bytes":
        files = [("images", ("a.png", b"", "image/png"))]
    elif case == "text file named .png":
        files = [("images", ("a.png", (REPO / "README.md").read_bytes()[:2000], "image/png"))]
    elif case == "truncated png":
        files = [("images", ("a.png", png[: len(png) // 2], "image/png"))]
    elif case == "decompression bomb":
        files = [("images", ("bomb.png", png_bomb(30_000, 30_000), "image/png"))]
    elif case == "file in a value field":
        files = [("images", ("a.png", png, "image/png")), ("model", ("m.png", png, "image/png"))]
    elif case == "disguised text part":
        raw = (b'--B\r\nContent-Disposition: form-data; name="images"; xfilename="a"\r\n\r\n'
               b"http://example.com/a.png\r\n--B--\r\n")
        response = httpx.post(f"{server}/classify", content=raw, timeout=30,
                              headers={"content-type": "multipart/form-data; boundary=B"})
        assert response.status_code == status and fragment in response.json()["error"]
        return
    elif case == "65 images":
        files = [("images", (f"{i}.png", png, "image/png")) for i in range(65)]
    else:
        files = [("images", ("big.png", png + os.urandom(13 * 1024 * 1024), "image/png"))]
    response = httpx.post(f"{server}/classify", files=files, data=data, timeout=60)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"], response.text
    assert "Traceback" not in response.text and "/work" not in response.text
    assert httpx.get(f"{server}/livez", timeout=5).status_code == 200
    ok = httpx.post(f"{server}/classify", files=[("images", ("a.png", png, "image/png"))], timeout=30)
    assert ok.status_code == 200, ok.text
    (prediction,) = ok.json()["predictions"]  # the same worker still classifies a good upload
    assert 0 <= prediction["class_index"] < 10 and 0 < prediction["probability"] <= 1, prediction


def test_api_key_guards_everything_but_health_metrics_and_docs(exported: dict[str, dict],
                                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    log = tmp_path_factory.mktemp("keyed") / "server.log"
    with serve("PriceService", log, DLBOOK_API_KEY="s3cret-key", DLBOOK_PRICE_MODELS="house-price", **STEADY) as base:
        body = {"records": [{"GrLivArea": 1500}]}
        missing = httpx.post(f"{base}/predict_price", json=body, timeout=10)
        assert missing.status_code == 401 and "Bearer" in missing.json()["error"]
        assert missing.headers["www-authenticate"].startswith("Bearer")
        wrong = httpx.post(f"{base}/predict_price", json=body, headers={"Authorization": "Bearer s3cret-kez"},
                           timeout=10)
        assert wrong.status_code == 401
        right = httpx.post(f"{base}/predict_price", json=body, headers={"Authorization": "Bearer s3cret-key"},
                           timeout=10)
        assert right.status_code == 200 and right.json()["prices"][0] > 0
        assert httpx.post(f"{base}/models", json={}, timeout=10).status_code == 401  # not only the predictions
        opened = {path: httpx.get(f"{base}{path}", timeout=10) for path in ("/livez", "/readyz", "/metrics",
                                                                            "/docs.json")}
        assert all(r.status_code == 200 for r in opened.values()), {p: r.status_code for p, r in opened.items()}
        assert 'dlbook_request_seconds_count{path="/predict_price",status="401"}' in opened["/metrics"].text
        assert "/predict_price" in opened["/docs.json"].json()["paths"]


def test_openapi_fuzzing_finds_no_server_error(server: str) -> None:
    """schemathesis over every operation of /docs.json: no 5xx, every response valid against the schema."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "run", f"{server}/docs.json", "--max-examples", "25",
         "--checks", "not_a_server_error,response_schema_conformance", "--request-timeout", "30",
         "--seed", "20261123", "--no-color"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert "passed" in result.stdout


def test_malformed_bodies_are_explained(server: str) -> None:
    no_boundary = httpx.post(f"{server}/generate_poem", content=b'{"n": 1}',
                             headers={"content-type": "multipart/form-data"}, timeout=10)
    assert no_boundary.status_code == 400 and "boundary" in no_boundary.json()["error"]
    wrong_type = httpx.post(f"{server}/predict_price", json={"records": [], "model": {}}, timeout=10)
    assert wrong_type.status_code == 400
    assert wrong_type.json()["error"] == "invalid request: model: Input should be a valid string"
    broken = httpx.post(f"{server}/predict_price", content=b'{"records": [', timeout=10,
                        headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "Invalid JSON" in broken.json()["error"]
    nested = httpx.post(f"{server}/predict_price", content=b'{"records": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                        timeout=30, headers={"content-type": "application/json"})
    assert nested.status_code == 400
    assert httpx.get(f"{server}/livez", timeout=5).status_code == 200


def test_a_poem_graph_onnx_runtime_cannot_load_keeps_the_service_unready_and_says_why(
        exported: dict[str, dict], tmp_path: Path) -> None:
    """Checksums that match a graph ONNX Runtime cannot load (as one exported for a newer runtime would
    be): the worker opens no session on poem graphs, so the decoding process is what finds out."""
    import shutil

    name, version = exported["poem_rnn"]["tag"].split(":")
    folder = tmp_path / "bentoml" / "models" / name / version
    shutil.copytree(Path(os.environ["BENTOML_HOME"]) / "models" / name / version, folder)
    graph = folder / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:50_000])
    meta = json.loads((folder / "meta.json").read_text())
    meta["files"]["model.onnx"] = {**meta["files"]["model.onnx"], "sha256": sha256_file(graph),
                                   "bytes": graph.stat().st_size}
    (folder / "meta.json").write_text(json.dumps(meta))
    pin = {f"DLBOOK_MODEL_{name.upper().replace('-', '_')}": f"{name}:{version}"}
    with serve("PoemService", tmp_path / "server.log", ready_path="/livez",
               BENTOML_HOME=str(tmp_path / "bentoml"), **pin, **STEADY) as base:
        assert httpx.get(f"{base}/readyz", timeout=10).status_code == 503
        body = httpx.post(f"{base}/models", json={}, timeout=10).json()
        assert body["models"] == [], body  # nothing it cannot serve is listed
        reason = f"{name}: cannot start (RuntimeError: ONNX Runtime cannot run "
        assert any(p.startswith(reason) for p in body["problems"]), body["problems"]
        refused = httpx.post(f"{base}/generate_poem", json={"seed": 1}, timeout=10)
        assert refused.status_code == 503 and "ONNX Runtime cannot run" in refused.json()["error"]
        assert httpx.get(f"{base}/livez", timeout=5).status_code == 200


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage", ["corrupted", "missing"])
def test_a_damaged_model_keeps_the_service_unready_and_says_which_file(
        exported: dict[str, dict], tmp_path: Path, damage: str) -> None:
    import shutil

    store = Path(os.environ["BENTOML_HOME"]) / "models" / "house-price"
    version = exported["price_mlp"]["tag"].split(":")[1]
    before = _digests(store / version)
    home = tmp_path / "bentoml"
    shutil.copytree(store, home / "models" / "house-price")
    onnx_file = home / "models" / "house-price" / version / "model.onnx"
    if damage == "corrupted":
        data = bytearray(onnx_file.read_bytes())
        data[100] ^= 0xFF
        onnx_file.write_bytes(bytes(data))
    else:
        onnx_file.unlink()
    pin = {"DLBOOK_MODEL_HOUSE_PRICE": f"house-price:{version}"}
    with serve("PriceService", tmp_path / "server.log", ready_path="/livez", BENTOML_HOME=str(home), **pin,
               **STEADY) as base:
        ready = httpx.get(f"{base}/readyz", timeout=10)
        assert ready.status_code == 503
        problems = httpx.post(f"{base}/models", json={}, timeout=10).json()["problems"]
        assert any("model.onnx" in p for p in problems), problems
        refused = httpx.post(f"{base}/predict_price", json={"records": [{"GrLivArea": 1000}]}, timeout=10)
        assert refused.status_code == 503 and "model.onnx" in refused.json()["error"]
    # the session's own store was not touched: its copy still passes its checksums, byte for byte as before
    verify_model_dir(store / version)
    assert _digests(store / version) == before


def test_multipart_parameters_in_any_order_are_accepted(server: str) -> None:
    """``filename`` before ``name``, value fields after the upload: the answer is the one a form built by
    httpx gets, with the model and top_k the fields chose."""
    png = _encode(load_image_split("mnist", "test").images[0])
    raw = (b'--B\r\nContent-Disposition: form-data; filename="a.png"; name="images"\r\n'
           b"Content-Type: image/png\r\n\r\n" + png + b"\r\n"
           b'--B\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n4\r\n'
           b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\ndigits-mlp\r\n--B--\r\n')
    response = httpx.post(f"{server}/classify", content=raw, timeout=30,
                          headers={"content-type": "multipart/form-data; boundary=B"})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "digits-mlp"
    (got,) = response.json()["predictions"]
    (expected,) = _classify(server, [png], model="digits-mlp", top_k=4)
    assert len(got["top_k"]) == 4
    assert [t["class_index"] for t in got["top_k"]] == [t["class_index"] for t in expected["top_k"]]
    np.testing.assert_allclose([t["probability"] for t in got["top_k"]],
                               [t["probability"] for t in expected["top_k"]], atol=1e-6)


def test_overload_is_shed_fast_with_retry_after_and_requests_carry_ids(
        exported: dict[str, dict], tmp_path: Path) -> None:
    """With no waiting allowed (DLBOOK_MAX_WAITING=0), beyond DLBOOK_MAX_IN_FLIGHT a worker answers 503 +
    Retry-After at once (counted), never a timeout; every API answer carries a request id, the caller's own
    when it sends one, also in the log line."""
    train_csv = find_dataset("house-prices") / "train.csv"
    table = read_house_csv(train_csv, numeric_columns=load_house_train().numeric_columns)
    records = [{k: v for k, v in r.items() if k != "SalePrice"} for r in table.records[:1000]]
    body = json.dumps({"records": records})
    log = tmp_path / "server.log"
    with serve("PriceService", log, DLBOOK_MAX_IN_FLIGHT="2", DLBOOK_MAX_WAITING="0", DLBOOK_PRICE_MODELS="house-price",
               **STEADY) as base:

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=base, timeout=60, limits=httpx.Limits(max_connections=64)) as c:
                return await asyncio.gather(*[c.post("/predict_price", content=body,
                                                     headers={"content-type": "application/json"})
                                              for _ in range(48)])

        answers = asyncio.run(burst())
        statuses = {a.status_code for a in answers}
        shed = [a for a in answers if a.status_code == 503]
        assert statuses <= {200, 503} and shed and len(shed) < len(answers), statuses
        assert all(a.headers.get("retry-after") == "1" for a in shed)
        assert all("DLBOOK_MAX_IN_FLIGHT" in a.json()["error"] for a in shed)
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
        counted = re.search(r'dlbook_shed_total\{path="/predict_price"\} (\d+)', metrics)
        assert counted and int(counted.group(1)) == len(shed)
        ok = httpx.post(f"{base}/predict_price", json={"records": [{"GrLivArea": 1200}]}, timeout=10,
                        headers={"X-Request-ID": "client-trace-42"})
        assert ok.status_code == 200 and ok.headers["x-request-id"] == "client-trace-42"
        fresh = httpx.post(f"{base}/predict_price", json={"records": []}, timeout=10)
        assert fresh.status_code == 400 and fresh.json()["request_id"] == fresh.headers["x-request-id"]
    text = log.read_text()
    assert re.search(r"POST /predict_price 200 [\d.]+ms \[request client-trace-42\]", text), text[-2000:]
    assert f"[request {fresh.headers['x-request-id']}]" in text


def test_requests_beyond_the_limit_wait_for_a_slot_instead_of_being_refused(
        exported: dict[str, dict], tmp_path: Path) -> None:
    """A request beyond DLBOOK_MAX_IN_FLIGHT waits for a slot (serving.admission.Slots): a burst of 48
    against 2 slots is answered whole, with the same prices as one by one; a wait of 1 ms
    (DLBOOK_MAX_WAIT_MS) turns the overflow into 503s that name the settings to change."""
    train_csv = find_dataset("house-prices") / "train.csv"
    table = read_house_csv(train_csv, numeric_columns=load_house_train().numeric_columns)
    records = [{k: v for k, v in r.items() if k != "SalePrice"} for r in table.records[:1000]]
    body = json.dumps({"records": records})

    async def burst(base: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=httpx.Limits(max_connections=64)) as c:
            return await asyncio.gather(*[c.post("/predict_price", content=body,
                                                 headers={"content-type": "application/json"}) for _ in range(48)])

    # 1,000 records take tens of ms here, so 46 queued requests may wait past the default second: allow more.
    with serve("PriceService", tmp_path / "wait.log", DLBOOK_MAX_IN_FLIGHT="2", DLBOOK_MAX_WAIT_MS="60000",
               DLBOOK_PRICE_MODELS="house-price", **STEADY) as base:
        answers = asyncio.run(burst(base))
        assert {a.status_code for a in answers} == {200}
        alone = httpx.post(f"{base}/predict_price", content=body, timeout=60,
                           headers={"content-type": "application/json"}).json()
        assert all(a.json()["prices"] == alone["prices"] for a in answers)
    with serve("PriceService", tmp_path / "short.log", DLBOOK_MAX_IN_FLIGHT="1", DLBOOK_MAX_WAIT_MS="1",
               DLBOOK_PRICE_MODELS="house-price", **STEADY) as base:
        answers = asyncio.run(burst(base))
        shed = [a for a in answers if a.status_code == 503]
        assert {a.status_code for a in answers} <= {200, 503} and shed, {a.status_code for a in answers}
        assert all(a.headers.get("retry-after") == "1" and "DLBOOK_MAX_WAIT_MS" in a.json()["error"] for a in shed)
