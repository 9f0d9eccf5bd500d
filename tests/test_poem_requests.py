"""One validation per poem request (issue 21, item 2): every bound at its edge, as users see it over
HTTP, and the same bounds in the OpenAPI schema. ``serving.request_models.PoemRequest`` is the only
check; the generator, planner and sampler trust what it lets through."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from live_server import serve
from pydantic import ValidationError

from preprocessing import Vocabulary
from serving.poem_sampling import CJK
from serving.request_models import FORMS, MAX_ACROSTIC_CHARS, MAX_PROMPT_CHARS, MAX_THEME_CHARS, PoemRequest
from serving.settings import current

ROUTES = ("/generate_poem", "/generate_poem_stream")


def test_the_bounds_are_derived_from_the_forms() -> None:
    assert sorted((f.chars_per_clause, f.lines) for f in FORMS) == [(5, 4), (5, 8), (7, 4), (7, 8)]
    assert MAX_PROMPT_CHARS == 64 == max(f.slots for f in FORMS)  # a whole 7×8 poem written out with its marks
    assert max(f.characters for f in FORMS) == 56 and MAX_ACROSTIC_CHARS == 16


def test_the_validated_request_holds_the_prompt_without_marks_and_cannot_change() -> None:
    request = PoemRequest(prompt="床前 明月光，疑是", acrostic="床, 疑", chars_per_clause=5, lines=4)
    assert request.prompt == "床前明月光疑是" and request.acrostic == "床疑"
    with pytest.raises(ValidationError):
        request.temperature = 3.0  # type: ignore[misc]


@pytest.fixture(scope="module")
def poem_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[str]]]:
    """A PoemService with a brief poem model of its own, and characters that model knows."""
    from training.export import export_run
    from training.paths import runs_dir
    from training.train import TrainOptions, train

    summary = train(TrainOptions("poem_rnn", limit=200, epochs=1, device="cpu", progress=False,
                                 run_name="brief-requests-poem"))
    meta = export_run(runs_dir() / summary["run"], name="tang-poem-requests")
    vocab = Vocabulary.from_dict(meta["preprocessing"]["vocab"])
    known = [t for t in vocab.tokens if len(t) == 1 and CJK.fullmatch(t)]
    log = tmp_path_factory.mktemp("requests-server") / "server.log"
    with serve("PoemService", log, DLBOOK_POEM_MODELS="tang-poem-requests", DLBOOK_MAX_QUEUE_MS="0") as base:
        yield base, known


def _post(base: str, body: dict, route: str = "/generate_poem") -> httpx.Response:
    if route == "/generate_poem_stream":
        with httpx.stream("POST", f"{base}{route}", json=body, timeout=60) as response:
            response.read()
            return response
    return httpx.post(f"{base}{route}", json=body, timeout=60)


def _refused(response: httpx.Response, status: int, *needles: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "status", "request_id"} and body["status"] == status
    for needle in needles:
        assert needle in body["error"], body["error"]


def _poem(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    if response.headers["content-type"].startswith("text/event-stream"):
        done = [e for e in response.text.split("\n\n") if e.startswith("event: done")]
        return json.loads(done[0].split("\n")[1].removeprefix("data: "))["poems"][0]["poem"]
    return response.json()["poems"][0]["poem"]


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f"{f.chars_per_clause}x{f.lines}")
def test_prompt_length_at_every_edge_of_every_form(poem_server, form) -> None:
    """As many Chinese characters as the form holds is accepted, one more is refused naming the limit;
    56/57/64 Chinese characters against each form; 64 characters sent (a whole 7×8 poem with its
    marks) fit only 7×8; 65 sent are refused for every form, on both routes."""
    base, known = poem_server
    shape = {"chars_per_clause": form.chars_per_clause, "lines": form.lines, "seed": 1}

    def chinese(count: int) -> str:
        return "".join(known[i % len(known)] for i in range(count))

    exact = chinese(form.characters)
    poem = _poem(_post(base, {**shape, "prompt": exact}))
    assert poem.replace("，", "").replace("。", "") == exact  # the prompt fills the whole poem
    for count in (form.characters + 1, 56, 57, 64):
        response = _post(base, {**shape, "prompt": chinese(count)})
        if count <= form.characters:
            _poem(response)
        else:
            _refused(response, 400, "prompt:", f"has {count} Chinese characters",
                     f"holds {form.characters}", "shorten it")
    written_out = "".join(chinese(7) + ("，" if line % 2 == 0 else "。") for line in range(8))
    assert len(written_out) == 64
    if form.characters == 56:
        assert _poem(_post(base, {**shape, "prompt": written_out})) == written_out
    else:
        _refused(_post(base, {**shape, "prompt": written_out}), 400, "has 56 Chinese characters")
    for route in ROUTES:
        _refused(_post(base, {**shape, "prompt": chinese(65)}, route), 400, "prompt:", "at most 64 characters")
        _refused(_post(base, {**shape, "prompt": chinese(form.characters + 1)}, route), 400,
                 f"holds {form.characters}")


def test_theme_up_to_its_limit_and_not_a_character_more(poem_server) -> None:
    base, known = poem_server
    theme = "".join(known[i % 40] for i in range(MAX_THEME_CHARS))
    _poem(_post(base, {"theme": theme, "seed": 2}))
    for route in ROUTES:
        _refused(_post(base, {"theme": theme + known[0]}, route), 400, "theme:", f"at most {MAX_THEME_CHARS}")


@pytest.mark.parametrize("lines", [4, 8])
def test_acrostic_one_character_per_line_at_most(poem_server, lines: int) -> None:
    base, known = poem_server
    heads = known[:lines]
    poem = _poem(_post(base, {"acrostic": "，".join(heads), "lines": lines, "seed": 3}))  # marks between are fine
    assert [poem[i * 6] for i in range(lines)] == heads
    _refused(_post(base, {"acrostic": "".join(known[: lines + 1]), "lines": lines}), 400,
             f"has {lines + 1} characters but the poem has {lines} lines")
    _refused(_post(base, {"acrostic": "".join(known[:17])}), 400, f"at most {MAX_ACROSTIC_CHARS} characters")
    _refused(_post(base, {"prompt": known[0], "acrostic": known[1]}), 400,
             f"line 1 starts with {known[0]} in the prompt but {known[1]}")
    _refused(_post(base, {"acrostic": "ab"}), 400, "acrostic:", "only Chinese characters", "got ab")


@pytest.mark.parametrize(("field", "accepted", "refused"), [
    ("temperature", [0, 0.01, 5], [-0.01, 5.01]),
    ("top_k", [0, 1, 1_000_000], [-1]),
    ("top_p", [0.01, 1], [0, 1.01]),
    ("repetition_penalty", [1, 3], [0.99, 3.01]),
    ("seed", [0, 2**62 - 1], [-1, 2**62]),
    ("n", [1, current().max_poems], [0, current().max_poems + 1]),
    ("chars_per_clause", [5, 7], [6, 4]),
    ("lines", [4, 8], [5, 6]),
])
def test_number_bounds_are_inclusive_where_documented(poem_server, field: str, accepted: list, refused: list) -> None:
    base, _ = poem_server
    for value in accepted:
        response = _post(base, {field: value, "seed": 4} if field != "seed" else {field: value})
        assert response.status_code == 200, (field, value, response.text)
    for value in refused:
        for route in ROUTES:
            _refused(_post(base, {field: value}, route), 400, f"{field}:")


def test_temperature_zero_is_greedy_over_http(poem_server) -> None:
    base, _ = poem_server
    poems = {_poem(_post(base, {"temperature": 0, "seed": seed})) for seed in (1, 2, 3)}
    assert len(poems) == 1


def test_what_only_the_model_can_judge_is_a_422_and_a_typo_is_refused(poem_server) -> None:
    base, known = poem_server
    unknown = next(ch for ch in (chr(c) for c in range(0x4E00, 0x9FA6)) if ch not in set(known))
    _refused(_post(base, {"prompt": unknown}), 422, "never saw", unknown)
    _refused(_post(base, {"temprature": 0.5}), 400, "temprature:", "Extra inputs are not permitted")
    _refused(_post(base, {"temperature": "hot"}), 400, "temperature:")


def test_the_openapi_schema_shows_every_bound(poem_server) -> None:
    base, _ = poem_server
    spec = httpx.get(f"{base}/docs.json", timeout=30).json()
    body = spec["paths"]["/generate_poem"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    if "$ref" in body:
        body = spec["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    fields = body["properties"]
    assert fields["prompt"]["maxLength"] == MAX_PROMPT_CHARS and fields["acrostic"]["maxLength"] == MAX_ACROSTIC_CHARS
    assert fields["theme"]["maxLength"] == MAX_THEME_CHARS
    assert fields["chars_per_clause"]["enum"] == [5, 7] and fields["lines"]["enum"] == [4, 8]
    assert (fields["temperature"]["minimum"], fields["temperature"]["maximum"]) == (0, 5)
    assert "0 = greedy (argmax)" in fields["temperature"]["description"]
    assert fields["top_k"]["minimum"] == 0
    top_p = fields["top_p"]  # OpenAPI 3.0's exclusive minimum: a boolean beside ``minimum``
    assert (top_p["minimum"], top_p["exclusiveMinimum"], top_p["maximum"]) == (0, True, 1)
    assert (fields["repetition_penalty"]["minimum"], fields["repetition_penalty"]["maximum"]) == (1, 3)
    assert (fields["n"]["minimum"], fields["n"]["maximum"]) == (1, current().max_poems)
    seed = fields["seed"].get("anyOf", [fields["seed"]])[0]  # BentoML flattens the optional integer
    assert (seed["minimum"], seed["maximum"]) == (0, 2**62 - 1)
