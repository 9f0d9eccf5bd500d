"""Each API request as one typed, checked object: the only place a request parameter is checked.

A route's handler takes its request model (``async def generate_poem(self, request: PoemRequest, /)``):
BentoML, and the request guard's direct path (``serving.direct_routes``), validate the JSON body
against it before the handler runs, so every later stage (the generator, the planner, the sampler,
the decoding process) trusts what it is given and checks nothing again. The bounds are ``Field``
constraints, so ``/docs.json`` shows each one; those that depend on another field (how long a
prompt may be depends on the form) are validators here too, and each limit is derived once from
what it limits: the longest prompt from the largest form, never typed out as a number twice.

What a refusal looks like: a body that breaks this model is a 400 whose message names each field and
what it must be (``invalid request: prompt: has 57 characters but a poem of 8 lines of 7 characters
holds 56 …``); a ``rhyme`` that names no 平水韵 group is refused here too, with the names it takes.
Only what depends on the model that writes the poem is checked later, by the planner
(``serving.poem_sampling.plan_poem``): whether that model knows each character (a 422, since
another model may know it), and rhyme or tone constraints the plan cannot meet.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from serving.poem_sampling import CJK, PoemForm, SamplingParams
from serving.prosody import LEVEL_GROUPS, TONE_MODES, ProsodySpec, check_rhyme
from serving.settings import current

CharsPerClause = Literal[5, 7]
Lines = Literal[4, 8]  # 绝句 and 律诗
Tones = Literal["off", "loose", "strict"]
assert get_args(Tones) == TONE_MODES  # noqa: S101 - the constraint module's modes, spelt out for the schema
FORMS = tuple(PoemForm(chars, lines) for chars in get_args(CharsPerClause) for lines in get_args(Lines))

# A prompt may be pasted with its punctuation: at most the longest poem written out, marks included (64).
MAX_PROMPT_CHARS = max(form.slots for form in FORMS)
# An acrostic is a character per line, each of which may be followed by a mark or a space (16).
MAX_ACROSTIC_CHARS = 2 * max(form.lines for form in FORMS)
# The theme's keywords are found by jieba on the event loop, before the first step: measured here,
# 0.9 ms for 200 characters, 10 ms for 2,000 (every stream on the worker waits that long).
MAX_THEME_CHARS = 200
MAX_SEED = 2**62 - 1  # poem i of a request uses seed + i, which stays a 64-bit integer
# Marks a user may type in a prompt or acrostic; the form puts ，。 where they belong, so they are dropped.
PROMPT_MARKS = re.compile(r"[\s，。,.;；:：、！？!?“”\"'‘’《》()（）]")


def clean_text(text: str) -> str:
    """``text`` without the marks and spaces a user may type between its characters."""
    return PROMPT_MARKS.sub("", text)


def _only_chinese(text: str) -> None:
    bad = "".join(dict.fromkeys(ch for ch in text if not CJK.fullmatch(ch)))
    if bad:
        raise PydanticCustomError(
            "chinese_only", "may hold only Chinese characters (punctuation and spaces are dropped), got {bad}: "
            "remove them", {"bad": bad})


class PoemRequest(BaseModel):
    """``/generate_poem`` and ``/generate_poem_stream``: ``n`` poems of one form, started or shaped by
    a prompt, an acrostic or a theme, sampled with the given parameters.

    The form comes first: the prompt's and the acrostic's limits are derived from it."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    chars_per_clause: Annotated[CharsPerClause, Field(description="Characters per line: 5 or 7.")] = 5
    lines: Annotated[Lines, Field(description="Lines: 4 (绝句) or 8 (律诗).")] = 4
    prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS, description=(
        f"The poem's first characters. Punctuation and spaces are dropped (the form places ，。), so at most "
        f"{MAX_PROMPT_CHARS} characters as sent, and no more Chinese characters than the form holds "
        "(chars_per_clause × lines: 20, 28, 40 or 56)."))] = ""
    acrostic: Annotated[str, Field(max_length=MAX_ACROSTIC_CHARS, description=(
        "The first character of each line (藏头诗), at most one per line; punctuation and spaces are dropped."))] = ""
    theme: Annotated[str, Field(max_length=MAX_THEME_CHARS, description=(
        f"Free Chinese text (at most {MAX_THEME_CHARS} characters) whose keywords start lines; used when "
        "neither prompt nor acrostic is given."))] = ""
    temperature: Annotated[float, Field(ge=0.0, le=5.0, description=(
        "Sampling temperature, 0 to 5. 0 = greedy (argmax): every free character is the model's most likely "
        "one (after the repetition penalty), so the poem is the same for every seed; higher values are more "
        "varied."))] = 0.8
    top_k: Annotated[int, Field(ge=0, description=(
        "Sample among the k most likely characters; 0 turns the cut off (so does any k at or above the "
        "vocabulary's size)."))] = 0
    # json_schema_extra: /docs.json is OpenAPI 3.0, where an exclusive bound is ``minimum`` with a boolean
    # ``exclusiveMinimum`` (pydantic writes JSON Schema 2020-12's number, which schemathesis refuses)
    top_p: Annotated[float, Field(gt=0.0, le=1.0, json_schema_extra={"minimum": 0.0, "exclusiveMinimum": True},
                                  description=("Nucleus sampling: the smallest set of characters holding this share "
                                               "of the probability, above 0; 1 = off."))] = 0.9
    repetition_penalty: Annotated[float, Field(ge=1.0, le=3.0, description=(
        "Makes each character already in the poem less likely (1 = off)."))] = 1.1
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = Field(default=None, description=(
        "The same seed and parameters give the same poems (poem i uses seed + i); unset: a random one."))
    n: Annotated[int, Field(ge=1, le=current().max_poems, description=(
        "Poems to write, at most DLBOOK_MAX_POEMS (the deployment's setting, shown here)."))] = 1
    model: Annotated[str, Field(description="The poem model; empty: the service's default.")] = ""
    rhyme: Annotated[str, Field(max_length=16, description=(
        "The even lines end in one 平水韵 rhyme group (the first line may join it): off; auto (the model's "
        "first rhyme chooses the group); or a group named by its last character, its number and character or "
        "its full name (东, 一东, 上平声一东; 下平声七阳). With tones on the group must be level (平): "
        + " ".join(name[-1] for name in LEVEL_GROUPS) + ". Needs a model exported with its sound tables."))] = "off"
    tones: Annotated[Tones, Field(description=(
        "平仄: off; loose (even lines end level, odd lines from the third end oblique); strict (loose plus "
        "the 近体 patterns: 二四六分明, 粘 and 对 between lines, no 三平尾)."))] = "off"

    @field_validator("prompt")
    @classmethod
    def _prompt_fits_the_form(cls, prompt: str, info: ValidationInfo) -> str:
        prompt = clean_text(prompt)
        _only_chinese(prompt)
        form = _form_of(info)
        if form is not None and len(prompt) > form.characters:
            raise PydanticCustomError(
                "prompt_too_long", "has {count} Chinese characters but a poem of {lines} lines of {chars} "
                "characters holds {holds}: shorten it, or ask for a longer form (chars_per_clause, lines)",
                {"count": len(prompt), "lines": form.lines, "chars": form.chars_per_clause, "holds": form.characters})
        return prompt

    @field_validator("acrostic")
    @classmethod
    def _acrostic_fits_the_form_and_prompt(cls, acrostic: str, info: ValidationInfo) -> str:
        acrostic = clean_text(acrostic)
        _only_chinese(acrostic)
        form = _form_of(info)
        if form is None:
            return acrostic
        if len(acrostic) > form.lines:
            raise PydanticCustomError(
                "acrostic_too_long", "has {count} characters but the poem has {lines} lines: give at most one "
                "per line, or ask for 8 lines", {"count": len(acrostic), "lines": form.lines})
        prompt = info.data.get("prompt", "")
        width = form.chars_per_clause
        for line, ch in enumerate(acrostic):
            given = prompt[line * width: line * width + 1]
            if given and given != ch:
                raise PydanticCustomError(
                    "acrostic_disagrees", "line {line} starts with {given} in the prompt but {ch} in the acrostic: "
                    "make them agree, or drop one", {"line": line + 1, "given": given, "ch": ch})
        return acrostic

    @field_validator("rhyme")
    @classmethod
    def _rhyme_is_a_group(cls, rhyme: str) -> str:
        try:
            return check_rhyme(rhyme)
        except ValueError as err:
            raise PydanticCustomError("rhyme_group", "{why}", {"why": str(err).removeprefix("rhyme ")}) from err

    @field_validator("tones")
    @classmethod
    def _tones_take_a_level_rhyme(cls, tones: str, info: ValidationInfo) -> str:
        rhyme = info.data.get("rhyme", "off")
        if tones != "off" and rhyme not in ("off", "auto") and rhyme not in LEVEL_GROUPS:
            raise PydanticCustomError(
                "rhyme_oblique", "{tones} puts level (平) characters at the rhymes but {rhyme} is an oblique (仄) "
                "group: ask for a level group ({level}), rhyme auto, or tones off",
                {"tones": tones, "rhyme": rhyme, "level": " ".join(n[-1] for n in LEVEL_GROUPS)})
        return tones

    @property
    def form(self) -> PoemForm:
        return PoemForm(self.chars_per_clause, self.lines)

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.repetition_penalty)

    @property
    def prosody(self) -> ProsodySpec:
        return ProsodySpec(self.rhyme, self.tones)


def _form_of(info: ValidationInfo) -> PoemForm | None:
    """The form the fields before this one asked for; None when one of them was refused already."""
    if "chars_per_clause" not in info.data or "lines" not in info.data:
        return None
    return PoemForm(info.data["chars_per_clause"], info.data["lines"])
