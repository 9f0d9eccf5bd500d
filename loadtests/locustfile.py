"""Locust load test of the dlbook services: every endpoint, real test data, ~5% malformed requests, SLOs.

Bounded headless run against a local server, CSV + HTML reports, exit code 1 when an SLO is missed::

    mkdir -p runs/loadtest
    .venv/bin/locust -f loadtests/locustfile.py --headless -u 10 -r 2 -t 2m --host http://127.0.0.1:3000 \\
        --csv runs/loadtest/dlbook --html runs/loadtest/dlbook.html --only-summary

One user class per endpoint, so the report has one row per endpoint and each endpoint's load can be
chosen on the command line (``... ImageUser PriceUser``). Every user sends a malformed request with
probability ``DLBOOK_LT_MALFORMED_SHARE`` (default 0.05): truncated PNGs, text files posted as
images, unknown fields, NaN records, out-of-range poem parameters. Those are recorded under
``<endpoint> (malformed)`` and count as *successes* only when the server answers the documented 4xx
with a JSON ``{"error": ...}`` body; a 2xx, a 5xx or another 4xx is a failure.

Environment:
    DLBOOK_LT_SERVICE          all (DlbookService, default) | image | price | poem: the users that fit
                               a single-task service (ImageService, PriceService, PoemService)
    DLBOOK_LT_MALFORMED_SHARE  share of malformed requests per user (default 0.05)
    DLBOOK_LT_MAX_FAIL_RATIO   SLO on failures / requests over the whole run (default 0)
    DLBOOK_LT_P95_MS           per-row p95 bounds in ms overriding the defaults below,
                               e.g. "/classify=400,/generate_poem=3000" (the "default" key: other rows)
    DLBOOK_LT_P95_SCALE        multiplies every p95 bound (default 1; the CI smoke test loosens them)
    DLBOOK_LT_DIGITS_MODEL     model for MNIST digits (default digits-mlp; empty: the server's default)
    DLBOOK_LT_POEM_CHARS       prompts and acrostics use the N most frequent characters of 唐诗三百首
                               (default 100), which every Tang-poem vocabulary knows
    DLBOOK_DATA                data root (default: ../shared/data or data/raw, else data/samples)
    DLBOOK_API_KEY             sent as a bearer token when the server requires one
"""

from __future__ import annotations

import collections
import functools
import io
import json
import logging
import math
import os
import random
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the data readers live in the project; locust only adds loadtests/ to the path
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from locust import HttpUser, between, events  # noqa: E402
from locust.contrib.fasthttp import FastHttpUser  # noqa: E402
from locust.env import Environment  # noqa: E402
from locust.runners import WorkerRunner  # noqa: E402
from PIL import Image  # noqa: E402

from training.datasets.house import load_house_train, read_house_csv  # noqa: E402
from training.datasets.images import load_image_split  # noqa: E402
from training.datasets.poems import read_tang300  # noqa: E402
from training.datasets.sources import DataMissingError, find_dataset  # noqa: E402

logger = logging.getLogger("dlbook.loadtest")

SAMPLES = REPO / "data" / "samples"
IMAGES_PER_SET = 256  # real test images encoded once; enough variety, seconds to prepare

# p95 bounds (ms) for a 2-core CPU shared by server and Locust at ~10 users. Poem rows cover whole
# 8×7 poems (64 decoding steps); "first char" is the time to the first streamed character.
DEFAULT_P95_MS: dict[str, float] = {
    "/classify": 1000,
    "/classify_pixels": 800,
    "/predict_price": 800,
    "/generate_poem": 4000,
    "/generate_poem_stream": 4000,
    "/generate_poem_stream first char": 1500,
    "default": 1500,  # the "(malformed)" rows and anything else
}

FIRST_CHAR = "/generate_poem_stream first char"


# ---- settings ------------------------------------------------------------------------------------------------


def service_kind() -> str:
    kind = os.environ.get("DLBOOK_LT_SERVICE", "all").strip().lower() or "all"
    if kind not in ("all", "image", "price", "poem"):
        raise ValueError(f"DLBOOK_LT_SERVICE must be all, image, price or poem, got {kind!r}")
    return kind


def malformed_share() -> float:
    return float(os.environ.get("DLBOOK_LT_MALFORMED_SHARE", "0.05"))


def p95_bounds() -> dict[str, float]:
    """Defaults, then ``DLBOOK_LT_P95_MS`` overrides, all times ``DLBOOK_LT_P95_SCALE``."""
    bounds = dict(DEFAULT_P95_MS)
    for item in os.environ.get("DLBOOK_LT_P95_MS", "").split(","):
        if item.strip():
            name, _, value = item.rpartition("=")
            bounds[name.strip()] = float(value)
    scale = float(os.environ.get("DLBOOK_LT_P95_SCALE", "1"))
    return {name: ms * scale for name, ms in bounds.items()}


def auth_headers() -> dict[str, str]:
    key = os.environ.get("DLBOOK_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


# ---- real data, loaded and encoded once per process ------------------------------------------------------------


SAMPLE_FOLDERS = {"tang300": "poems"}  # data/samples/<folder> where it is not the data set's own name


def data_folder(name: str, needed: str) -> Path:
    """The configured data root's folder for ``name`` if it holds ``needed``, else the committed samples."""
    samples = SAMPLES / SAMPLE_FOLDERS.get(name, name)
    try:
        folder = find_dataset(name)
    except DataMissingError:
        return samples
    return folder if (folder / needed).is_file() else samples


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class Material:
    """Everything the users send, built from the real test splits before the first user starts."""

    pngs: list[tuple[str, bytes]]  # (dataset, PNG bytes) of real Fashion-MNIST and MNIST test images
    pixels: list[tuple[str, list]]  # (dataset, 28×28 list of 0..255 ints)
    houses: list[dict[str, Any]]  # Kaggle test.csv rows, Id included, None where the CSV says NA
    prompts: list[str]  # real poem openings made of common characters
    line_starts: list[str]  # common characters that open lines of real poems (acrostics)
    themes: list[str]  # real poem lines and plain-language themes
    malformed: dict[str, list[Case]]  # endpoint → requests that must get a 4xx


@functools.cache
def material() -> Material:
    began = time.perf_counter()
    pngs, pixels = [], []
    for dataset in ("fashion-mnist", "mnist"):
        images = load_image_split(dataset, "test", data_folder(dataset, "t10k-images-idx3-ubyte.gz")).images
        for array in images[:IMAGES_PER_SET]:
            pngs.append((dataset, png(array)))
            pixels.append((dataset, array.tolist()))
    house_folder = data_folder("house-prices", "test.csv")
    numeric = load_house_train(house_folder).numeric_columns
    table = read_house_csv(house_folder / "test.csv", numeric_columns=numeric)
    houses = [dict(record, Id=house_id) for record, house_id in zip(table.records, table.ids, strict=True)]
    prompts, line_starts, themes = poem_material()
    built = Material(pngs, pixels, houses, prompts, line_starts, themes, malformed_cases(pngs[0][1]))
    logger.info("load test material: %d images, %d houses, %d prompts, %d themes in %.1f s", len(pngs),
                len(houses), len(prompts), len(themes), time.perf_counter() - began)
    return built


PLAIN_THEMES = ["秋天的夜晚思念远方的故乡", "春天江边的花和月亮", "送别朋友远行", "山中的雪和松树", "边塞的风沙与明月"]


def poem_material() -> tuple[list[str], list[str], list[str]]:
    """Prompts, acrostic characters and themes from 唐诗三百首.

    Prompts and acrostics keep to the most frequent characters: a rarer one may be missing from a
    model's vocabulary, and the server rightly refuses it with 422, which would read as a failure.
    """
    poems = read_tang300(data_folder("tang300", "tang300.txt") / "tang300.txt")
    counts = collections.Counter(ch for poem in poems for ch in poem if ch not in "，。")
    common = {ch for ch, _ in counts.most_common(int(os.environ.get("DLBOOK_LT_POEM_CHARS", "100")))}
    clauses = [c for poem in poems for c in poem.replace("。", "，").split("，") if c]
    prompts = sorted({c[:n] for c in clauses for n in (1, 2) if set(c[:n]) <= common})
    line_starts = sorted({c[0] for c in clauses if c[0] in common})
    themes = PLAIN_THEMES + [c for c in clauses if len(c) == 7][:200]
    return prompts, line_starts, themes


# ---- malformed requests ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A request the server must refuse with ``status`` and a JSON ``{"error": ...}`` body."""

    label: str
    body: bytes
    content_type: str
    status: int


def multipart(parts: list[tuple[str, str | None, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body from (field, filename or None for a plain value, content) parts.

    Built by hand because FastHttpUser has no ``files=`` and malformed forms need full control anyway.
    """
    boundary = uuid.uuid4().hex
    chunks = []
    for field, filename, content in parts:
        disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename else "")
        kind = "Content-Type: application/octet-stream\r\n" if filename else ""
        chunks.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n{kind}\r\n".encode() + content + b"\r\n")
    return b"".join(chunks) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _form_case(label: str, parts: list[tuple[str, str | None, bytes]], status: int) -> Case:
    body, content_type = multipart(parts)
    return Case(label, body, content_type, status)


def _json_case(label: str, payload: Any, status: int) -> Case:
    # allow_nan: Python writes NaN/Infinity literals, which real clients send too.
    return Case(label, json.dumps(payload, ensure_ascii=False).encode(), "application/json", status)


def malformed_cases(sample_png: bytes) -> dict[str, list[Case]]:
    text = (REPO / "README.md").read_bytes()[:2000]
    zeros = np.zeros((28, 28), int).tolist()
    poem_cases = [
        # 400: outside a bound of the request model (serving/request_models.py); 422: only the model can judge
        ("top_p 1.5", {"top_p": 1.5}, 400), ("temperature -1", {"temperature": -1}, 400),
        ("6-character clauses", {"chars_per_clause": 6}, 400), ("5 lines", {"lines": 5}, 400),
        ("n 9", {"n": 9}, 400), ("n 0", {"n": 0}, 400), ("seed -1", {"seed": -1}, 400),
        ("acrostic longer than the poem", {"acrostic": "一二三四五"}, 400),
        ("oversized acrostic", {"acrostic": "山" * 65}, 400), ("oversized prompt", {"prompt": "春" * 65}, 400),
        ("prompt longer than the poem", {"prompt": "春" * 21}, 400), ("oversized theme", {"theme": "秋" * 2001}, 400),
        ("latin prompt", {"prompt": "abc"}, 400), ("repetition_penalty 5", {"repetition_penalty": 5}, 400),
        ("temperature as text", {"temperature": "hot"}, 400), ("unknown model", {"model": "nope"}, 404),
        ("prompt and acrostic disagree", {"prompt": "春风", "acrostic": "山水"}, 400),
    ]
    return {
        "/classify": [
            _form_case("truncated png", [("images", "a.png", sample_png[: len(sample_png) // 2])], 400),
            _form_case("text file as image", [("images", "notes.png", text)], 400),
            _form_case("empty file", [("images", "a.png", b"")], 400),
            _form_case("wrong field", [("image", "a.png", sample_png)], 400),
            _form_case("text instead of a file", [("images", None, b"http://127.0.0.1:1/x.png")], 400),
            _form_case("file in a value field", [("images", "a.png", sample_png), ("model", "m.png", sample_png)],
                       400),
            _form_case("top_k 11", [("images", "a.png", sample_png), ("top_k", None, b"11")], 400),
            _form_case("top_k as text", [("images", "a.png", sample_png), ("top_k", None, b"three")], 400),
            _form_case("unknown model", [("images", "a.png", sample_png), ("model", None, b"nope")], 404),
            _form_case("65 images", [("images", f"{i}.png", sample_png) for i in range(65)], 413),
        ],
        "/classify_pixels": [
            _json_case("28×27 array", {"images": [[[0] * 27] * 28]}, 400),
            _json_case("no images", {"images": []}, 400),
            _json_case("NaN pixels", {"images": [[[math.nan] * 28] * 28]}, 400),
            _json_case("pixel 300", {"images": [[[300] * 28] * 28]}, 400),
            _json_case("text pixels", {"images": [[["a"] * 28] * 28]}, 400),
            _json_case("wrong field", {"pictures": [zeros]}, 400),
            _json_case("top_k 11", {"images": [zeros], "top_k": 11}, 400),
        ],
        "/predict_price": [
            _json_case("NaN record", {"records": [{"LotArea": math.nan, "GrLivArea": 1500}]}, 422),
            _json_case("Infinity record", {"records": [{"GrLivArea": math.inf}]}, 422),
            _json_case("no records", {"records": []}, 400),
            _json_case("1001 records", {"records": [{}] * 1001}, 413),
            _json_case("record is a list", {"records": [[1, 2]]}, 422),
            _json_case("unknown column", {"records": [{"Colour": "red"}]}, 422),
            _json_case("negative area", {"records": [{"LotArea": -3}]}, 422),
            _json_case("number for a category", {"records": [{"MSZoning": 5}]}, 422),
            _json_case("text for a number", {"records": [{"LotArea": "big"}]}, 422),
            Case("broken JSON", b'{"records": [', "application/json", 400),
        ],
        "/generate_poem": [_json_case(label, body, status) for label, body, status in poem_cases],
        "/generate_poem_stream": [_json_case(label, body, status) for label, body, status in poem_cases],
    }


def refusal_problem(case: Case, status: int, text: str) -> str | None:
    """Why the answer to a malformed request is wrong, or None when it is the expected 4xx with a reason."""
    if status != case.status:
        return f"{case.label}: expected {case.status} with a JSON error, got {status}: {text[:200]}"
    try:
        body = json.loads(text)
    except ValueError:
        return f"{case.label}: {status} without a JSON body: {text[:200]}"
    if not isinstance(body, dict) or not isinstance(body.get("error"), str) or not body["error"]:
        return f"{case.label}: {status} body has no 'error' message: {text[:200]}"
    return None


# ---- checks of good answers --------------------------------------------------------------------------------------


def poem_problem(poem: str, params: dict[str, Any]) -> str | None:
    """Why a poem does not have the requested form, prompt and acrostic, or None."""
    chars, lines = params["chars_per_clause"], params["lines"]
    if len(poem) != lines * (chars + 1):
        return f"poem {poem!r} is not {lines} lines of {chars} characters"
    if not poem.startswith(params.get("prompt", "")):
        return f"poem {poem!r} does not start with the prompt {params['prompt']!r}"
    for line, ch in enumerate(params.get("acrostic", "")):
        if poem[line * (chars + 1)] != ch:
            return f"poem {poem!r} breaks the acrostic {params['acrostic']!r}"
    return None


def poem_params(rng: random.Random) -> dict[str, Any]:
    """Varied but valid poem parameters: both forms, prompt / acrostic / theme / free, seeds or none."""
    m = material()
    params: dict[str, Any] = {
        "chars_per_clause": rng.choice([5, 7]), "lines": rng.choice([4, 8]),
        "temperature": round(rng.uniform(0.6, 1.2), 2), "top_k": rng.choice([0, 20, 50]),
        "top_p": rng.choice([0.8, 0.9, 1.0]), "repetition_penalty": rng.choice([1.0, 1.1, 1.3]),
        "n": rng.choice([1, 1, 1, 2]),
    }
    if rng.random() < 0.7:
        params["seed"] = rng.randrange(2**31)
    mode = rng.choice(["free", "prompt", "acrostic", "theme"])
    if mode == "prompt":
        params["prompt"] = rng.choice(m.prompts)
    elif mode == "acrostic":
        params["acrostic"] = "".join(rng.sample(m.line_starts, rng.randint(2, params["lines"])))
    elif mode == "theme":
        params["theme"] = rng.choice(m.themes)
    return params


def json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


# ---- users ---------------------------------------------------------------------------------------------------------


class EndpointUser:
    """One endpoint per user class; each task is a good request or, with the malformed share, a bad one."""

    endpoint: str = ""
    kinds: tuple[str, ...] = ()  # DLBOOK_LT_SERVICE values whose service has this endpoint
    wait_time = between(0.2, 1.0)
    host = "http://127.0.0.1:3000"
    client: Any
    rng: random.Random

    def on_start(self) -> None:
        self.rng = random.Random()
        material()

    def send(self) -> None:
        """The one task (set as ``tasks`` below: Locust only collects ``@task`` methods of User classes)."""
        if self.rng.random() < malformed_share():
            self.malformed()
        else:
            self.good()

    def good(self) -> None:
        raise NotImplementedError

    def malformed(self) -> None:
        case = self.rng.choice(material().malformed[self.endpoint])
        with self.client.post(self.endpoint, data=case.body, name=f"{self.endpoint} (malformed)",
                              headers={"Content-Type": case.content_type, **auth_headers()},
                              catch_response=True) as response:
            problem = refusal_problem(case, response.status_code or 0, response.text or "")
            if problem:
                response.failure(problem)
            else:
                response.success()

    def post_json(self, payload: dict[str, Any], check: Callable[[Any], str | None]) -> None:
        """POST JSON; the request fails unless it is a 200 whose JSON ``check`` finds nothing wrong with."""
        with self.client.post(self.endpoint, json=payload, headers=auth_headers(), catch_response=True) as response:
            self.judge(response, check)

    @staticmethod
    def judge(response: Any, check: Callable[[Any], str | None]) -> None:
        if response.status_code != 200:
            response.failure(f"{response.status_code}: {(response.text or '')[:300]}")
            return
        body = json_or_none(response.text or "")
        problem = "answer is not JSON" if body is None else check(body)
        if problem:
            response.failure(problem)
        else:
            response.success()


EndpointUser.tasks = [EndpointUser.send]  # type: ignore[attr-defined]


def _predictions_check(count: int) -> Callable[[Any], str | None]:
    def check(body: Any) -> str | None:
        predictions = body.get("predictions", [])
        if len(predictions) != count:
            return f"{len(predictions)} predictions for {count} images"
        if not all(0.0 <= p.get("probability", -1) <= 1.0 and p.get("label") for p in predictions):
            return f"a prediction without label or probability: {predictions[:2]}"
        return None

    return check


def digits_model() -> str:
    return os.environ.get("DLBOOK_LT_DIGITS_MODEL", "digits-mlp")


class ImageUser(EndpointUser, FastHttpUser):
    """Uploads 1–4 real test images as PNG files, Fashion-MNIST and MNIST, various top_k."""

    endpoint = "/classify"
    kinds = ("all", "image")

    def good(self) -> None:
        dataset = self.rng.choice(["fashion-mnist", "mnist"])
        blobs = [b for d, b in material().pngs if d == dataset]
        chosen = self.rng.sample(blobs, self.rng.randint(1, 4))
        parts: list[tuple[str, str | None, bytes]] = [("images", f"{i}.png", b) for i, b in enumerate(chosen)]
        parts.append(("top_k", None, str(self.rng.randint(1, 5)).encode()))
        if dataset == "mnist" and digits_model():
            parts.append(("model", None, digits_model().encode()))
        if self.rng.random() < 0.1:
            parts.append(("return_frame", None, b"true"))
        body, content_type = multipart(parts)
        with self.client.post(self.endpoint, data=body, headers={"Content-Type": content_type, **auth_headers()},
                              catch_response=True) as response:
            self.judge(response, _predictions_check(len(chosen)))


class PixelsUser(EndpointUser, FastHttpUser):
    """Posts 1–8 real test images as 28×28 arrays, as 0–255 integers or as 0–1 floats."""

    endpoint = "/classify_pixels"
    kinds = ("all", "image")

    def good(self) -> None:
        dataset = self.rng.choice(["fashion-mnist", "mnist"])
        arrays = self.rng.sample([a for d, a in material().pixels if d == dataset], self.rng.randint(1, 8))
        if self.rng.random() < 0.3:
            arrays = [[[round(v / 255, 4) for v in row] for row in a] for a in arrays]
        payload: dict[str, Any] = {"images": arrays, "top_k": self.rng.randint(1, 3)}
        if dataset == "mnist" and digits_model():
            payload["model"] = digits_model()
        self.post_json(payload, _predictions_check(len(arrays)))


class PriceUser(EndpointUser, FastHttpUser):
    """Posts 1–20 consecutive rows of Kaggle's test.csv, missing values as null, as the CSV has them."""

    endpoint = "/predict_price"
    kinds = ("all", "price")

    def good(self) -> None:
        houses = material().houses
        count = self.rng.randint(1, 20)
        start = self.rng.randrange(len(houses) - count)
        records = houses[start: start + count]

        def check(body: Any) -> str | None:
            prices = body.get("prices", [])
            if len(prices) != count:
                return f"{len(prices)} prices for {count} records"
            if not all(isinstance(p, float | int) and math.isfinite(p) and p > 0 for p in prices):
                return f"a price that is not a positive number: {prices}"
            return None

        self.post_json({"records": records}, check)


class PoemUser(EndpointUser, FastHttpUser):
    """Asks for whole poems: both forms, prompts, acrostics, themes, seeds, sampling settings, n = 1–2."""

    endpoint = "/generate_poem"
    kinds = ("all", "poem")

    def good(self) -> None:
        params = poem_params(self.rng)

        def check(body: Any) -> str | None:
            poems = [p.get("poem", "") for p in body.get("poems", [])]
            if len(poems) != params["n"]:
                return f"{len(poems)} poems for n={params['n']}"
            return next((p for p in map(lambda poem: poem_problem(poem, params), poems) if p), None)

        self.post_json(params, check)


STREAMED = {"characters": 0, "streams": 0}


def sse_events(chunks: Iterator[bytes]) -> Iterator[tuple[str, Any]]:
    """(event, data) pairs from a Server-Sent Events byte stream, as soon as each event is complete."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        while b"\n\n" in buffer:
            raw, buffer = buffer.split(b"\n\n", 1)
            fields = dict(line.split(": ", 1) for line in raw.decode("utf-8").split("\n") if ": " in line)
            yield fields.get("event", "message"), json_or_none(fields.get("data", ""))


class PoemStreamUser(EndpointUser, HttpUser):
    """Reads /generate_poem_stream to its ``done`` event, counting characters and time to the first one.

    An ``HttpUser`` (requests), not a ``FastHttpUser``: geventhttpclient's public streaming reads
    wait for a full block of bytes, which would hold back the first ~20 characters and overstate
    time to first character; requests hands over each HTTP chunk (one event) as it arrives.
    Seen with Locust 2.47.0 and geventhttpclient 2.6.1; no upstream report found. A
    ``FastHttpUser`` is worth it again when its streamed response yields each chunk as it arrives
    (time to first character then matches this user's on the same server).
    The row's response time is the whole stream, its "size" the number of characters streamed.
    """

    endpoint = "/generate_poem_stream"
    kinds = ("all", "poem")

    def good(self) -> None:
        params = poem_params(self.rng)
        began = time.perf_counter()
        with self.client.post(self.endpoint, json=params, headers=auth_headers(), stream=True, timeout=120,
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:300]}")
                return
            problem = self.read_stream(response, params, began)
            response.request_meta["response_time"] = (time.perf_counter() - began) * 1000
            if problem:
                response.failure(problem)
            else:
                response.success()

    def read_stream(self, response: Any, params: dict[str, Any], began: float) -> str | None:
        chars: dict[int, list[str]] = collections.defaultdict(list)
        for kind, data in sse_events(response.iter_content(chunk_size=None)):
            if kind == "token":
                if not chars:
                    self.report_first_char(began)
                chars[data["index"]].append(data["char"])
            elif kind == "error":
                return f"error event after {sum(map(len, chars.values()))} characters: {data}"
            elif kind == "done":
                streamed = ["".join(chars[i]) for i in range(params["n"])]
                poems = [p["poem"] for p in data["poems"]]
                count = sum(map(len, streamed))
                response.request_meta["response_length"] = count
                STREAMED["characters"] += count
                STREAMED["streams"] += 1
                if streamed != poems:
                    return f"streamed {streamed} but done says {poems}"
                return next((p for p in map(lambda poem: poem_problem(poem, params), poems) if p), None)
        return "the stream ended without a done event"

    def report_first_char(self, began: float) -> None:
        self.environment.events.request.fire(
            request_type="SSE", name=FIRST_CHAR, response_time=(time.perf_counter() - began) * 1000,
            response_length=1, exception=None, context={}, response=None, url=self.endpoint)


USER_CLASSES: list[type[EndpointUser]] = [ImageUser, PixelsUser, PriceUser, PoemUser, PoemStreamUser]


def select_users(kind: str) -> None:
    """Weight 0 removes a user class: a single-task service only gets the users of its endpoints.

    (A function, not a module-level loop: Locust would collect the loop variable as one more user class.)
    """
    for user in USER_CLASSES:
        user.weight = 1 if kind in user.kinds else 0  # type: ignore[attr-defined]


select_users(service_kind())


# ---- SLOs ----------------------------------------------------------------------------------------------------------


@events.init.add_listener
def prepare(environment: Environment, **_: Any) -> None:
    """Build the material before users spawn, so the first requests are not slowed by it."""
    material()


def slo_violations(environment: Environment) -> list[str]:
    """Every missed SLO: failure ratio, p95 per row, silent endpoints and errors in the users' own code."""
    stats = environment.stats
    problems = []
    limit = float(os.environ.get("DLBOOK_LT_MAX_FAIL_RATIO", "0"))
    total = stats.total
    if total.num_requests == 0:
        return ["no requests were made"]
    if total.fail_ratio > limit:
        problems.append(f"failure ratio {total.fail_ratio:.4f} > {limit} ({total.num_failures} of "
                        f"{total.num_requests}; see the failures CSV)")
    bounds = p95_bounds()
    for (name, _method), entry in sorted(stats.entries.items()):
        if entry.num_requests == 0:
            continue
        bound = bounds.get(name, bounds["default"])
        p95 = entry.get_response_time_percentile(0.95)
        if p95 > bound:
            problems.append(f"{name}: p95 {p95:.0f} ms > {bound:.0f} ms")
    seen = {name for name, _ in stats.entries}
    for user in USER_CLASSES:
        if user.weight and user.endpoint not in seen:  # type: ignore[attr-defined]
            problems.append(f"{user.endpoint}: no requests at all")
    if environment.runner is not None and environment.runner.exceptions:
        problems.append(f"{len(environment.runner.exceptions)} exceptions in the load test code")
    return problems


@events.quitting.add_listener
def enforce_slos(environment: Environment, **_: Any) -> None:
    """Exit code 1 when an SLO is missed (overrides Locust's own code, which ignores latency)."""
    if isinstance(environment.runner, WorkerRunner):
        return
    if STREAMED["streams"]:
        logger.info("streamed %d characters in %d poem streams", STREAMED["characters"], STREAMED["streams"])
    problems = slo_violations(environment)
    for problem in problems:
        logger.error("SLO missed: %s", problem)
    if problems:
        environment.process_exit_code = 1
    else:
        logger.info("all SLOs met: failure ratio <= %s, p95 bounds %s",
                    os.environ.get("DLBOOK_LT_MAX_FAIL_RATIO", "0"), p95_bounds())
