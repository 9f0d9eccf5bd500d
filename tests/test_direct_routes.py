"""The direct path for hot routes: the form parser, the guard answering without BentoML, and the
same answers (status and body) as BentoML's own request path gives, over real HTTP."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pydantic
import pytest
from live_server import serve
from PIL import Image
from starlette.responses import JSONResponse

from serving import direct_routes
from serving.direct_routes import DirectRoute
from serving.guard import RequestGuardMiddleware
from serving.multipart_form import FormError, parse_form
from training.datasets.house import read_house_csv
from training.datasets.images import load_image_split
from training.datasets.sources import find_dataset

FORM = b"multipart/form-data; boundary=XyZ"


def test_form_parts_come_back_byte_exact_whatever_they_contain() -> None:
    payload = b"\x89PNG\r\n\x1a\n--XY\r\n\r\n\x00--X"  # CRLFs, blank lines and a near-boundary inside
    body = (b"preamble to ignore\r\n--XyZ\r\n"
            b'Content-Disposition: form-data; name="images"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
            + payload + b"\r\n--XyZ\r\n"
            b'Content-Disposition: form-data; name="top_k"\r\n\r\n5\r\n--XyZ--\r\nepilogue')
    parts = parse_form(FORM, body)
    assert [(p.name, p.filename, p.data) for p in parts] == [("images", "a.png", payload), ("top_k", None, b"5")]
    assert parse_form(b'multipart/form-data; boundary="XyZ"', body) == parts


@pytest.mark.parametrize(
    ("content_type", "body", "fragment"),
    [
        (b"multipart/form-data", b"--XyZ--\r\n", "boundary"),
        (FORM, b'--XyZ\r\nContent-Disposition: form-data; name="a"\r\n\r\nno end', "cut short"),
        (FORM, b"--XyZ\r\nContent-Type: text/plain\r\n\r\nx\r\n--XyZ--", "Content-Disposition name"),
        (FORM, b'--XyZ\r\nContent-Disposition: form-data; name="a"\r\n--XyZ--', "blank line"),
    ],
)
def test_malformed_forms_say_what_is_wrong(content_type: bytes, body: bytes, fragment: str) -> None:
    with pytest.raises(FormError, match=fragment):
        parse_form(content_type, body)


class _Args(pydantic.BaseModel):
    images: list[Any]
    top_k: int = 3


async def _echo(images: list, top_k: int = 3) -> JSONResponse:
    return JSONResponse({"images": [i if isinstance(i, int) else len(i) for i in images], "top_k": top_k})


async def _call(guard: RequestGuardMiddleware, path: str, content_type: bytes, body: bytes) -> tuple[int, dict]:
    sent: list[dict] = []
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": [(b"content-type", content_type)]}
    await guard(scope, receive, send)
    assert delivered
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def test_the_guard_answers_installed_routes_itself_and_passes_the_rest_on() -> None:
    reached: list[str] = []

    async def bentoml_app(scope, receive, send) -> None:
        reached.append(scope["path"])
        await JSONResponse({"from": "bentoml"})(scope, receive, send)

    direct_routes.install({"/echo": DirectRoute(_Args, _echo),
                           "/classify": DirectRoute(_Args, _echo, upload_field="images")})
    try:
        guard = RequestGuardMiddleware(bentoml_app, in_flight_limit=0)
        run = asyncio.run
        assert run(_call(guard, "/echo", b"application/json", b'{"images": [1, 2], "top_k": "4"}')) == (
            200, {"images": [1, 2], "top_k": 4})
        status, body = run(_call(guard, "/echo", b"application/json", b'{"top_k": "many"}'))
        assert status == 400
        assert body["error"] == ("invalid request: images: Field required; "
                                 "top_k: Input should be a valid integer, unable to parse string as an integer")
        status, body = run(_call(guard, "/echo", b"application/json", b'{"images": ['))
        assert status == 400 and "Invalid JSON" in body["error"]
        form = (b'--XyZ\r\nContent-Disposition: form-data; name="images"; filename="a"\r\n\r\nabc\r\n'
                b'--XyZ\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n2\r\n--XyZ--\r\n')
        assert run(_call(guard, "/classify", FORM, form)) == (200, {"images": [3], "top_k": 2})
        twice = form.replace(b"--XyZ--", b'--XyZ\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n3\r\n--XyZ--')
        status, body = run(_call(guard, "/classify", FORM, twice))
        assert status == 400 and "more than once" in body["error"]
        assert reached == []
        # Another content type, or a route nobody installed, is BentoML's to answer.
        assert run(_call(guard, "/echo", b"text/plain", b"[]")) == (200, {"from": "bentoml"})
        assert run(_call(guard, "/elsewhere", b"application/json", b"{}")) == (200, {"from": "bentoml"})
        assert reached == ["/echo", "/elsewhere"]
    finally:
        direct_routes.uninstall()


@pytest.fixture(scope="module")
def servers(exported: dict[str, dict], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """The same service twice: hot routes answered directly, and everything through BentoML."""
    logs = tmp_path_factory.mktemp("direct")
    env = {"DLBOOK_POEM_MODELS": "tang-poem"}
    with serve("DlbookService", logs / "direct.log", **env) as direct, \
            serve("DlbookService", logs / "bentoml.log", DLBOOK_DIRECT_ROUTES="0", **env) as through_bentoml:
        yield direct, through_bentoml


def _png(index: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(load_image_split("fashion-mnist", "test").images[index]).save(buffer, "PNG")
    return buffer.getvalue()


def _requests() -> list[tuple[str, dict]]:
    pixels = load_image_split("fashion-mnist", "test").images[:3].tolist()
    records = read_house_csv(find_dataset("house-prices") / "train.csv").records[:3]
    png = ("images", ("a.png", _png(0), "image/png"))
    return [
        ("/classify_pixels", {"json": {"images": pixels, "top_k": 5}}),
        ("/classify_pixels", {"json": {"images": pixels, "top_k": "x"}}),
        ("/classify_pixels", {"json": {"images": pixels[:1], "model": "nope"}}),
        ("/classify_pixels", {"json": {"top_k": 2}}),
        # the fast decoder's usual form with a value out of range, and bodies it leaves to pydantic
        ("/classify_pixels", {"json": {"images": [[[300] * 28] * 28]}}),
        ("/classify_pixels", {"json": {"images": [[[True] * 28] * 28]}}),
        ("/classify_pixels", {"json": {"images": pixels[:1], "colour": "red"}}),
        ("/classify_pixels", {"json": {"images": [[[v / 255 for v in row] for row in pixels[0]]]}}),
        ("/classify_pixels", {"content": b'{"images": [[', "headers": {"content-type": "application/json"}}),
        ("/classify", {"files": [png, ("images", ("b.png", _png(1), "image/png"))],
                       "data": {"top_k": "4", "return_frame": "true"}}),
        ("/classify", {"files": [png], "data": {"top_k": "ten"}}),
        ("/classify", {"files": [("images", ("a.png", b"not an image at all", "image/png"))]}),
        ("/predict_price", {"json": {"records": records}}),
        ("/predict_price", {"json": {"records": [{"LotArea": -3}]}}),
        ("/predict_price", {"json": {"records": [], "model": {}}}),
        ("/predict_price", {"json": {"records": "all of them"}}),
        ("/generate_poem", {"json": {"seed": 7, "n": 2, "acrostic": "春风", "lines": 4}}),
        ("/generate_poem", {"json": {"top_p": 1.5}}),
        ("/generate_poem", {"json": {"n": "two"}}),
        ("/generate_poem_stream", {"json": {"seed": 3, "chars_per_clause": 7}}),
        ("/generate_poem_stream", {"json": {"seed": 3, "n": 3, "prompt": "白日"}}),
        ("/generate_poem_stream", {"json": {"lines": 6}}),
    ]


def _stream_contents(text: str) -> dict:
    """What a poem stream says: each poem's characters in order, and the other events in order.
    How the token events of several poems interleave depends on timing, and is not part of the contract."""
    tokens: dict[int, str] = {}
    others = []
    for block in filter(None, text.split("\n\n")):
        kind, data = (line.split(": ", 1)[1] for line in block.split("\n"))
        if kind == "token":
            token = json.loads(data)
            tokens[token["index"]] = tokens.get(token["index"], "") + token["char"]
        else:
            others.append((kind, data))
    return {"tokens": tokens, "events": others}


def _answer(base: str, path: str, request: dict) -> tuple[int, dict]:
    response = httpx.post(f"{base}{path}", timeout=60, **request)
    assert response.headers["x-request-id"]
    if response.headers["content-type"].startswith("text/event-stream"):
        return response.status_code, _stream_contents(response.text)
    body = response.json()
    body.pop("request_id", None)
    return response.status_code, body


def test_direct_answers_equal_bentomls_for_successes_and_refusals(servers: tuple[str, str]) -> None:
    direct, through_bentoml = servers
    for path, request in _requests():
        got, expected = _answer(direct, path, request), _answer(through_bentoml, path, request)
        if got[0] == 200:
            assert got[1].keys() == expected[1].keys(), path
            for key, value in got[1].items():
                if key == "predictions":
                    for a, b in zip(value, expected[1][key], strict=True):
                        assert a["label"] == b["label"] and a.get("frame") == b.get("frame")
                        assert np.allclose([t["probability"] for t in a["top_k"]],
                                           [t["probability"] for t in b["top_k"]], atol=1e-6)
                else:
                    assert value == expected[1][key], (path, key)
        else:
            assert got == expected, (path, request.get("json") or request.get("data"))
