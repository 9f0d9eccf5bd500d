"""One validation per poem request (issue 21, item 2): every bound at its edge, as users see it over
HTTP, and the same bounds in the OpenAPI schema. ``serving.request_models.PoemRequest`` is the only
check; the generator, planner and sampler trust what it lets through."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from live_server import serve
from pydantic import ValidationError

from preprocessing import Vocabulary
from serving.poem_sampling import CJK
from serving.prosody import LEVEL_GROUPS, SoundTable, analyse, poem_report
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
def poem_meta() -> dict:
    """A brief poem model of this module's own, exported to the store as a user's would be."""
    from training.export import export_run
    from training.paths import runs_dir
    from training.train import TrainOptions, train

    summary = train(TrainOptions("poem_rnn", limit=200, epochs=1, device="cpu", progress=False,
                                 run_name="brief-requests-poem"))
    return export_run(runs_dir() / summary["run"], name="tang-poem-requests")


@pytest.fixture(scope="module")
def poem_server(poem_meta: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[str]]]:
    """A PoemService serving that model, and characters the model knows."""
    meta = poem_meta
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


def _openapi_fields(base: str) -> dict:
    """The properties of /generate_poem's request body in the served OpenAPI schema."""
    spec = httpx.get(f"{base}/docs.json", timeout=30).json()
    body = spec["paths"]["/generate_poem"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    if "$ref" in body:
        body = spec["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    return body["properties"]


def test_the_openapi_schema_shows_every_bound(poem_server) -> None:
    base, _ = poem_server
    fields = _openapi_fields(base)
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


# ----- rhyme (平水韵) and tones (平仄), issue 22 ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def sounds(poem_meta: dict) -> SoundTable:
    """The served model's sound table, from the meta its export wrote (what the server builds too)."""
    assert poem_meta.get("prosody"), "the export must store the 平水韵 tables with a poem model"
    return SoundTable(poem_meta["prosody"], poem_meta["preprocessing"]["vocab"]["tokens"])


def _answer(response: httpx.Response) -> list[dict]:
    """The poems of a plain answer, or of a stream's ``done`` event (whose token events must spell them)."""
    assert response.status_code == 200, response.text
    if not response.headers["content-type"].startswith("text/event-stream"):
        return response.json()["poems"]
    events = [e for e in response.text.split("\n\n") if e]
    done = [json.loads(e.split("\n")[1].removeprefix("data: ")) for e in events if e.startswith("event: done")]
    tokens = [json.loads(e.split("\n")[1].removeprefix("data: ")) for e in events if e.startswith("event: token")]
    poems = done[0]["poems"]
    for index, poem in enumerate(poems):
        assert "".join(t["char"] for t in tokens if t["index"] == index) == poem["poem"]
    return poems


def _keeps_the_sound(sounds: SoundTable, poem: dict, tones: str) -> None:
    """The poem rhymes in one level group, never repeating a rhyme, and (strict) every line follows one
    近体 pattern; the answer's report is what prosody's checker says of the text."""
    text = poem["poem"]
    found = analyse(sounds, text)
    lines = [line for line in text.replace("。", "，").split("，") if line]
    ends = [line[-1] for line in lines[1::2]]
    assert found["rhymes"] and found["decidable"], (text, found)
    assert len(set(ends)) == len(ends), text
    assert poem["prosody"] == poem_report(sounds, text)
    assert poem["prosody"]["rhyme_group"] == found["rhyme_group"] and len(poem["prosody"]["tones"]) == len(lines)
    if tones != "off":
        assert sounds.level[sounds.find_group(found["rhyme_group"])], (text, found)
        assert found["level_endings"] == found["even_lines"], text
        assert all(sounds.class_of(line[-1]) & 2 for line in lines[2::2]), text  # odd lines from the third: 仄
    if tones == "strict":
        assert all(found["pattern_lines"]), (text, found)


def _fitting(sounds: SoundTable, known: list[str], tone: int, count: int) -> list[str]:
    """``count`` characters the model knows with only the reading ``tone`` (1 level, 2 oblique)."""
    return [ch for ch in known if sounds.class_of(ch) == tone][:count]


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f"{f.chars_per_clause}x{f.lines}")
@pytest.mark.parametrize("start", ["none", "prompt", "acrostic", "theme"])
def test_rhyme_auto_and_strict_tones_hold_in_every_form_with_every_start(poem_server, sounds, form, start) -> None:
    """rhyme=auto, tones=strict: every poem returned rhymes and every line follows the pattern, plain
    and streamed, whatever starts it; the prompt, the acrostic and the form stay as asked."""
    base, known = poem_server
    body: dict = {"chars_per_clause": form.chars_per_clause, "lines": form.lines, "rhyme": "auto",
                  "tones": "strict", "n": 3, "seed": 11}
    oblique = _fitting(sounds, known, 2, form.lines)
    if start == "prompt":  # a first character anything may follow, then an oblique one (fits a key tone)
        body["prompt"] = known[0] + oblique[0]
    elif start == "acrostic":  # oblique line heads: 一三五不论, so they never block a pattern
        body["acrostic"] = "".join(oblique)
    elif start == "theme":
        body["theme"] = "春风吹过江南的山水，明月照着故乡的柳树和小桥"
    for route in ROUTES:
        poems = _answer(_post(base, body, route))
        assert len(poems) == 3
        for poem in poems:
            _keeps_the_sound(sounds, poem, "strict")
            text = poem["poem"]
            assert len(text) == form.slots
            if start == "prompt":
                assert text.startswith(body["prompt"])
            if start == "acrostic":
                assert [text[i * (form.chars_per_clause + 1)] for i in range(form.lines)] == oblique


@pytest.mark.parametrize(("rhyme", "tones"), [("阳", "loose"), ("下平声一先", "strict"), ("auto", "off"),
                                              ("东", "off")])
def test_a_named_group_and_loose_tones(poem_server, sounds, rhyme: str, tones: str) -> None:
    base, _ = poem_server
    poems = _answer(_post(base, {"rhyme": rhyme, "tones": tones, "n": 2, "seed": 5, "lines": 8}))
    for poem in poems:
        _keeps_the_sound(sounds, poem, tones)
        if rhyme != "auto":
            ends = [line[-1] for line in poem["poem"].replace("。", "，").split("，")[1::2] if line]
            group = sounds.find_group(rhyme)
            assert all(group in sounds.groups_of_char(ch) for ch in ends), poem


def test_impossible_rhyme_and_tones_are_refused_with_the_reason(poem_server, sounds) -> None:
    """What no model could meet is a 400 from the request model; what this plan cannot meet, a 422
    from the planner, before the first step (never an error mid-stream)."""
    base, known = poem_server
    for route in ROUTES:
        _refused(_post(base, {"rhyme": "xyz"}, route), 400, "rhyme:", "off, auto or a 平水韵 group", "level groups")
        _refused(_post(base, {"rhyme": "董", "tones": "strict"}, route), 400, "上声一董 is an oblique", "tones off")
        _refused(_post(base, {"tones": "sometimes"}, route), 400, "tones:")
    # 二四六分明: a prompt whose second and fourth characters are both only level fits no pattern
    level = _fitting(sounds, known, 1, 4)
    _refused(_post(base, {"prompt": "".join(level), "tones": "strict"}), 422, "fit no 近体 pattern",
             "use tones loose or off")
    assert _answer(_post(base, {"prompt": "".join(level), "tones": "loose", "seed": 1}))  # loose lets it be
    # a prompt that fixes the second line's end outside the asked group
    dong = sounds.find_group("东")
    outside = next(ch for ch in level if dong not in sounds.groups_of_char(ch))
    prompt = "".join(known[i] for i in range(9)) + outside
    for route in ROUTES:
        _refused(_post(base, {"prompt": prompt, "rhyme": "东"}, route), 422, "must rhyme with the other even lines",
                 outside)


def test_rhyme_and_tones_off_write_exactly_the_unconstrained_poems(poem_server, poem_meta) -> None:
    """Off (said or left out) is the path without constraints: the same poem as the model's own steps
    give with the sampler alone, in this process, for the same seed."""
    from serving.model_store import locate_exported
    from serving.poem_sampling import PoemSampler, SamplingParams, advance_all, plan_poem
    from serving.runtime import OnnxModel

    base, known = poem_server
    vocab = Vocabulary.from_dict(poem_meta["preprocessing"]["vocab"])
    session = OnnxModel(locate_exported("tang-poem-requests").graph)
    config = poem_meta["config"]
    for body in ({"seed": 21}, {"seed": 22, "chars_per_clause": 7, "lines": 8, "acrostic": "".join(known[:8])}):
        request = PoemRequest(**body)
        sampler = PoemSampler(plan_poem(request.form, vocab, "", request.acrostic), vocab, request.sampling,
                              body["seed"])
        hidden = np.zeros((config["num_layers"], 1, config["hidden_size"]), np.float32)
        while not sampler.done:
            logits, hidden = session.run({"token": np.array([sampler.next_input], np.int64), "hidden": hidden})
            advance_all([sampler], logits)
        expected = sampler.text
        assert request.sampling == SamplingParams(0.8, 0, 0.9, 1.1)
        for extra in ({}, {"rhyme": "off", "tones": "off"}):
            for route in ROUTES:
                assert _poem(_post(base, body | extra, route)) == expected


def test_the_openapi_schema_shows_rhyme_and_tones(poem_server) -> None:
    base, _ = poem_server
    fields = _openapi_fields(base)
    assert fields["tones"]["enum"] == ["off", "loose", "strict"] and fields["tones"]["default"] == "off"
    assert fields["rhyme"]["default"] == "off" and "一东" in fields["rhyme"]["description"]
    assert all(name[-1] in fields["rhyme"]["description"] for name in LEVEL_GROUPS)


def test_a_model_without_sound_tables_refuses_rhyme_and_tones_but_writes_without(poem_meta) -> None:
    """A model exported before the tables were stored: asking for rhyme or tones says so (a 422 through
    the service); off plans as before. The generator is built without its decoding process here."""
    from serving.poem_generation import PoemGenerator
    from serving.poem_sampling import PoemRequestError

    generator = PoemGenerator.__new__(PoemGenerator)
    generator.model = type("Model", (), {"name": "old-poem"})()  # type: ignore[assignment]
    generator.vocab = Vocabulary.from_dict(poem_meta["preprocessing"]["vocab"])
    generator.sounds = None
    for ask in ({"rhyme": "auto"}, {"tones": "loose"}):
        with pytest.raises(PoemRequestError, match="old-poem was exported without its 平水韵 tables"):
            generator.samplers(PoemRequest(**ask))
    (sampler,) = generator.samplers(PoemRequest(seed=1))
    assert sampler.constraint is None and sampler.constraint_spec is None
