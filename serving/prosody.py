"""Rhyme (平水韵) and tones (平仄) as decoding constraints: one boolean mask per poem and slot.

Torch-free and offline: the tables come from the model's meta.json (``prosody``, written at export by
``training/poem_sounds.py``), one entry per 平水韵 group with the vocabulary's characters in it.

A character's *class* is the set of readings the table gives it: level (平), oblique (仄), both (a
多音字 such as 看 or 思, or a simplified character that merges traditional ones of either tone) or
none (not in the table: 5% of the quick model's vocabulary, 1.3% of the corpus's characters). A
character fits a slot when one of its readings does, as poets used them; an unknown character never
stands where a tone or rhyme is required.

``rhyme`` (``off`` | ``auto`` | a group name such as ``东``, ``一东`` or ``下平声七阳``): the even lines
end in one group, never the same character twice. The group is kept as a *set* of candidates,
narrowed by each rhyme character (a 多音字 keeps all its groups until another rhyme decides), so with
``auto`` the model's first rhyme chooses it. The first line may join: with tones on, its last
character is either oblique or a rhyme. With tones on the rhyme is level (近体 rhymes in 平); off, any
group.

``tones``: ``off``; ``loose``: even lines end level, odd lines from the third end oblique (the first
line's end is free, as 首句入韵 is common); ``strict``: the 近体 patterns as well. Each line has a
key tone K (its 2nd character in five, its 4th in seven): positions 2 and 4 (and 6) alternate from it
(二四六分明), the second line of a couplet has the opposite K (对) and the first line of the next
couplet the same K as the line before (粘), so every line's K follows from the first's; no three level
characters end a line (三平尾: only 仄仄仄平平 and its seven-character form can, so their third-last
character must be oblique). Positions 1, 3 (and 5 of seven) are otherwise free (一三五不论).

Lookahead, so that no line is ever left without a legal character: the first line's K and end tone
are a set of (K, end) combinations kept open until characters decide them; characters the plan fixes
(prompt, acrostic, theme words) are checked against every combination before the first step, and
a plan that fits none is refused with the reason; a rhyme character is only allowed when one of its
candidate groups still has enough unused characters for the rhyme slots left.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.poem_sampling import COMMA, FULL_STOP, PoemForm, PoemRequestError, plan_poem

LEVEL, OBLIQUE = 1, 2  # bit flags of a character's readings; 3 = both, 0 = not in the table
TONE_MODES = ("off", "loose", "strict")
TONE_MARK = {0: "？", LEVEL: "平", OBLIQUE: "仄", LEVEL | OBLIQUE: "中"}


# The 106 groups of 平水韵 in their order (simplified, as OpenCC t2s writes them): what a request may name
# before any model is loaded (``check_rhyme``); a model's table carries the same names
# (tests/test_prosody.py holds them equal).
_SECTIONS = (
    ("上平声", "一东 二冬 三江 四支 五微 六鱼 七虞 八齐 九佳 十灰 十一真 十二文 十三元 十四寒 十五删"),
    ("下平声", "一先 二萧 三肴 四豪 五歌 六麻 七阳 八庚 九青 十蒸 十一尤 十二侵 十三覃 十四盐 十五咸"),
    ("上声", "一董 二肿 三讲 四纸 五尾 六语 七麌 八荠 九蟹 十贿 十一轸 十二吻 十三阮 十四旱 十五潸 十六铣 十七筿 "
             "十八巧 十九皓 二十哿 二十一马 二十二养 二十三梗 二十四迥 二十五有 二十六寝 二十七感 二十八琰 二十九豏"),
    ("去声", "一送 二宋 三绛 四寘 五未 六御 七遇 八霁 九泰 十卦 十一队 十二震 十三问 十四愿 十五翰 十六谏 "
             "十七霰 十八啸 十九效 二十号 二十一个 二十二祃 二十三漾 二十四敬 二十五径 二十六宥 二十七沁 二十八勘 "
             "二十九艳 三十陷"),
    ("入声", "一屋 二沃 三觉 四质 五物 六月 七曷 八黠 九屑 十药 十一陌 十二锡 十三职 十四缉 十五合 十六叶 十七洽"),
)
GROUP_NAMES = tuple(section + name for section, names in _SECTIONS for name in names.split())
LEVEL_GROUPS = GROUP_NAMES[:30]


def _matches(wanted: str, name: str) -> bool:
    """东, 一东 and 上平声一东 all name 上平声一东 (the last character alone is unique among the 106)."""
    return wanted == name or (len(wanted) >= 1 and name.endswith(wanted) and (len(wanted) > 1 or wanted == name[-1]))


def check_rhyme(value: str) -> str:
    """A request's ``rhyme``, normalised: ``off``, ``auto`` or one of ``GROUP_NAMES``; ValueError otherwise."""
    wanted = (value or "off").strip()
    if wanted in ("off", "auto"):
        return wanted
    found = [name for name in GROUP_NAMES if _matches(wanted, name)]
    if len(found) != 1:
        raise ValueError(f"rhyme must be off, auto or a 平水韵 group such as 东, 一东 or 下平声七阳 (level groups: "
                         f"{' '.join(n[-1] for n in LEVEL_GROUPS)}); got {value!r}")
    return found[0]


class ProsodyError(PoemRequestError):
    """A rhyme or tone request that cannot be met with this plan; the message says why."""


def _opposite(tone: int) -> int:
    return LEVEL if tone == OBLIQUE else OBLIQUE


class SoundTable:
    """The 平水韵 groups over one vocabulary, as arrays: ``classes[V]`` (reading flags) and
    ``member[G, V]`` (character in group)."""

    def __init__(self, prosody: dict[str, Any], tokens: Sequence[str]) -> None:
        index = {t: i for i, t in enumerate(tokens)}
        groups = prosody["groups"]
        self.tokens = list(tokens)
        self.names = [g["name"] for g in groups]
        self.traditional = [g.get("traditional", g["name"]) for g in groups]
        self.level = np.array([g["tone"] == "ping" for g in groups])
        self.member = np.zeros((len(groups), len(tokens)), dtype=bool)
        for g, group in enumerate(groups):
            ids = [index[ch] for ch in group["chars"] if ch in index]
            self.member[g, ids] = True
        self.classes = np.zeros(len(tokens), dtype=np.uint8)
        self.classes |= np.where(self.member[self.level].any(axis=0), LEVEL, 0).astype(np.uint8)
        self.classes |= np.where(self.member[~self.level].any(axis=0), OBLIQUE, 0).astype(np.uint8)
        self.sizes = self.member.sum(axis=1)
        self._tone_masks = {tone: (self.classes & tone) != 0 for tone in (LEVEL, OBLIQUE)}
        self._union_masks: dict[frozenset[int], np.ndarray] = {}
        # A tone-only slot's mask, by (line width, tones mode, line, position, open combinations): asked
        # for on every sampled slot of every constrained poem, and the same for every poem of a shape.
        self.slot_masks: dict[tuple, np.ndarray | None] = {}
        self._index = index

    @classmethod
    def from_meta(cls, meta: dict[str, Any], tokens: Sequence[str]) -> SoundTable | None:
        """The table stored with a model, or None for a model exported before it was."""
        return cls(meta["prosody"], tokens) if meta.get("prosody") else None

    def tone_mask(self, tone: int) -> np.ndarray:
        return self._tone_masks[tone]

    def tones_mask(self, tones: frozenset[int]) -> np.ndarray:
        """Characters with any of ``tones``' readings: one shared, read-only array per set (a mask is
        asked for on every sampled slot of every constrained poem, so building it anew each time cost
        about a tenth of a 16-poem decoding step, measured with loadtests/poem_http_bench.py)."""
        cached = self._union_masks.get(tones)
        if cached is None:
            cached = np.logical_or.reduce([self._tone_masks[t] for t in sorted(tones)])
            cached.flags.writeable = False
            self._union_masks[tones] = cached
        return cached

    def groups_of(self, token: int) -> frozenset[int]:
        return frozenset(np.flatnonzero(self.member[:, token]).tolist())

    def class_of(self, char: str) -> int:
        i = self._index.get(char)
        return 0 if i is None else int(self.classes[i])

    def groups_of_char(self, char: str) -> frozenset[int]:
        i = self._index.get(char)
        return frozenset() if i is None else self.groups_of(i)

    def find_group(self, name: str) -> int:
        """A group by any of its names: 东, 一东, 上平声一东 or the traditional 上平聲一東."""
        wanted = name.strip()
        for g, (simple, trad) in enumerate(zip(self.names, self.traditional, strict=True)):
            if _matches(wanted, simple) or _matches(wanted, trad):
                return g
        raise ProsodyError(f"rhyme must be off, auto or a 平水韵 group such as 东, 一东 or 下平声七阳; "
                           f"got {name!r}")

    def pattern(self, line: str) -> str:
        """The line's readings, one mark a character: 平, 仄, 中 (either) or ？ (not in the table)."""
        return "".join(TONE_MARK[self.class_of(ch)] for ch in line)


@dataclass(frozen=True)
class ProsodySpec:
    rhyme: str = "off"  # off | auto | a group name
    tones: str = "off"  # off | loose | strict

    def __post_init__(self) -> None:
        if self.tones not in TONE_MODES:
            raise ProsodyError(f"tones must be one of {', '.join(TONE_MODES)}, got {self.tones!r}")
        if not self.rhyme:
            object.__setattr__(self, "rhyme", "off")

    @property
    def active(self) -> bool:
        return self.rhyme != "off" or self.tones != "off"


def _line_key(line: int, k0: int) -> int:
    """The key tone of ``line`` given the first line's: 对 within a couplet, 粘 across (K, ¬K, ¬K, K, …)."""
    return k0 if line % 4 in (0, 3) else _opposite(k0)


@dataclass
class PoemProsody:
    """The constraint state of one poem: call :meth:`mask` before a sampled slot, :meth:`accept` after
    every slot (forced ones too)."""

    table: SoundTable
    form: PoemForm
    plan: list[int | None]
    spec: ProsodySpec
    combos: set[tuple[int, int]] = field(init=False)  # feasible (first line's K, first line's end tone)
    groups: frozenset[int] = field(init=False)  # candidate rhyme groups
    used: set[int] = field(default_factory=set, init=False)  # rhyme characters already written

    def __post_init__(self) -> None:
        n = self.form.chars_per_clause
        self.width = n + 1
        self.rhyming = self.spec.rhyme != "off"
        self.strict = self.spec.tones == "strict"
        self.toned = self.spec.tones != "off"
        allowed = np.ones(len(self.table.names), dtype=bool)
        if self.toned:
            allowed &= self.table.level
        if self.spec.rhyme not in ("off", "auto"):
            g = self.table.find_group(self.spec.rhyme)
            if not allowed[g]:
                raise ProsodyError(f"{self.table.names[g]} is an oblique group; with tones {self.spec.tones} "
                                   "the even lines end level: ask for a level (平) group or tones off")
            allowed[:] = False
            allowed[g] = True
        self.forced_rhymes = {s: t for s, t in enumerate(self.plan)
                              if self.rhyming and t is not None and self._is_rhyme_slot(s)}
        slots = self.form.lines // 2 + 1  # the even lines' ends, and the first line's when it joins
        for slot, token in self.forced_rhymes.items():
            groups = self.table.groups_of(token)
            if not groups & set(np.flatnonzero(allowed).tolist()):
                raise ProsodyError(f"{self._where(slot, token)} must rhyme with the other even lines"
                                   + (" in a level group" if self.toned else "") + ", and it "
                                   + ("is in no 平水韵 group" if not groups else
                                      f"is in {'、'.join(self.table.names[g] for g in sorted(groups))}"))
            allowed &= np.isin(np.arange(len(allowed)), list(groups))
        allowed &= self.table.sizes >= slots  # a group needs a character for every rhyme slot
        if self.rhyming and not allowed.any():
            raise ProsodyError("no 平水韵 group fits the fixed rhyme characters and has enough characters the model "
                               f"knows for {slots - 1} rhymes")
        self.groups = frozenset(np.flatnonzero(allowed).tolist())
        self.combos = {(k, e) for k in (LEVEL, OBLIQUE) for e in (LEVEL, OBLIQUE)}
        reasons = []
        for combo in sorted(self.combos):
            reason = next((why for s, t in enumerate(self.plan) if t is not None and self._line_pos(s) is not None
                           and (why := self._misfit(s, t, combo))), None)
            if reason:
                self.combos.discard(combo)
                reasons.append(reason)
        if not self.combos:
            raise ProsodyError(f"the fixed characters fit no {'近体 pattern' if self.strict else 'tone rule'}: "
                               + "; ".join(dict.fromkeys(reasons)) + "; use tones loose or off, or change them")
        # Forced characters are spoken for: none of them is sampled again at another rhyme slot.
        self.reserved = set(self.forced_rhymes.values())
        self.free_rhyme_slots = [s for s in range(len(self.plan)) if self._is_rhyme_slot(s) and self.plan[s] is None]

    # ---- where a slot stands ------------------------------------------------------------------------------------

    def _line_pos(self, slot: int) -> tuple[int, int] | None:
        line, pos = divmod(slot, self.width)
        return None if pos == self.width - 1 else (line, pos)

    def _is_rhyme_slot(self, slot: int) -> bool:
        lp = self._line_pos(slot)
        return lp is not None and lp[1] == self.width - 2 and lp[0] % 2 == 1

    def _where(self, slot: int, token: int) -> str:
        line, pos = divmod(slot, self.width)
        return f"{self.table.tokens[token]} (line {line + 1}, character {pos + 1})"

    def _need(self, line: int, pos: int, combo: tuple[int, int]) -> int | None:
        """The reading the slot needs under ``combo``: LEVEL, OBLIQUE or None (free)."""
        n = self.width - 1
        k0, e0 = combo
        end = e0 if line == 0 else (LEVEL if line % 2 else OBLIQUE)
        if pos == n - 1:
            return end if self.toned else None
        if not self.strict:
            return None
        key = _line_key(line, k0)
        o = n - 5
        if pos == o + 1:
            return key
        if pos == o + 3 or (n == 7 and pos == 1):
            return _opposite(key)
        if pos == n - 3 and _opposite(key) == LEVEL and end == LEVEL:
            return OBLIQUE  # 三平尾
        return None

    def _joins(self, line: int, pos: int, combo: tuple[int, int]) -> bool:
        """Whether the slot must be a rhyme under ``combo``: even lines' ends, and the first line's end
        when it is level and tones are on (it may join the rhyme, then it must)."""
        if not self.rhyming or pos != self.width - 2:
            return False
        return line % 2 == 1 or (line == 0 and self.toned and combo[1] == LEVEL)

    def _misfit(self, slot: int, token: int, combo: tuple[int, int]) -> str | None:
        line, pos = self._line_pos(slot)  # type: ignore[misc]
        need = self._need(line, pos, combo)
        cls = int(self.table.classes[token])
        if need is not None and not cls & need:
            has = TONE_MARK[cls] if cls else "not in the 平水韵 table"
            return f"{self._where(slot, token)} is {has} where the pattern needs {TONE_MARK[need]}"
        if self._joins(line, pos, combo) and not self.table.groups_of(token) & self.groups:
            return f"{self._where(slot, token)} does not rhyme"
        return None

    # ---- masks ----------------------------------------------------------------------------------------------------

    def _rhyme_mask(self, slot: int) -> np.ndarray:
        """Characters in a candidate group that still has a character for every rhyme slot left."""
        later_free = sum(1 for s in self.free_rhyme_slots if s > slot)
        spoken = self.used | self.reserved
        spoken_ids = np.fromiter(spoken, dtype=np.int64, count=len(spoken))
        viable = [g for g in sorted(self.groups)
                  if self.table.sizes[g] - int(self.table.member[g, spoken_ids].sum()) >= 1 + later_free]
        if not viable:  # cannot happen (see __post_init__ and the masks before); never leave a row empty
            return self.table.member[sorted(self.groups)].any(axis=0)
        mask = self.table.member[viable].any(axis=0)
        mask[spoken_ids] = False
        return mask

    def mask(self, slot: int) -> np.ndarray | None:
        """Allowed vocabulary ids at ``slot`` (bool ``[V]``), or None when this constraint allows every
        character there. Never all False (see the module's lookahead)."""
        lp = self._line_pos(slot)
        if lp is None:
            return None
        line, pos = lp
        if not (self.rhyming and pos == self.width - 2):  # no combination can make this slot a rhyme
            key = (self.width, self.spec.tones, line, pos, frozenset(self.combos))
            shared = self.table.slot_masks
            if key not in shared:  # the same for every poem of this shape: worked out once per table
                needs = {self._need(line, pos, combo) for combo in self.combos}
                shared[key] = None if None in needs else self.table.tones_mask(frozenset(needs))  # type: ignore[arg-type]
            return shared[key]
        out: np.ndarray | None = None
        rhyme: np.ndarray | None = None
        for combo in self.combos:
            need = self._need(line, pos, combo)
            part = None if need is None else self.table.tone_mask(need)
            if self._joins(line, pos, combo):
                rhyme = self._rhyme_mask(slot) if rhyme is None else rhyme
                part = rhyme if part is None else part & rhyme
            if part is None:
                return None  # one open combination leaves the slot free
            out = part.copy() if out is None else out | part
        return out

    def accept(self, slot: int, token: int) -> None:
        """Narrow the state by the character written at ``slot``."""
        lp = self._line_pos(slot)
        if lp is None:
            return
        line, pos = lp
        if len(self.combos) == 1 and not (self.rhyming and pos == self.width - 2):
            return  # nothing to narrow: one pattern is left, and the character came through its mask
        fits = {c for c in self.combos if self._misfit(slot, token, c) is None}
        if fits:  # a forced character was checked at the start; a sampled one came through the mask
            self.combos = fits
        joins = [self._joins(line, pos, c) for c in self.combos]
        if any(joins):
            self.used.add(token)  # never twice, even when it may have been read as no rhyme
        if joins and all(joins):  # a 多音字 that may or may not rhyme on the first line decides nothing
            narrowed = self.groups & self.table.groups_of(token)
            if narrowed:
                self.groups = frozenset(narrowed)
        if self.plan[slot] == token:
            self.reserved.discard(token)


_ROW_BIASES: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def row_biases(masks: Sequence[np.ndarray | None], allowed_ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """``[B, V]`` float32: per row 0 where the slot may take the character (allowed by the vocabulary and
    by the row's mask, None: by the vocabulary alone) and -inf elsewhere, for ``sample_rows`` to add
    to the logits in its first pass. A mask's bias row is kept while the mask lives: tone masks are
    shared read-only arrays asked for on every step, so most rows cost one lookup and the stack.
    Measured in process with 16 constrained poems (``loadtests/poem_throughput.py``'s step loop): the
    separate ``where`` over the logits this replaces cost a fifth of the prosody's time per step."""
    out = np.empty((len(masks), vocab_size), dtype=np.float32)
    for r, mask in enumerate(masks):
        key = (id(mask), id(allowed_ids))
        hit = _ROW_BIASES.get(key)
        if hit is None or hit[0] is not mask or hit[1] is not allowed_ids:
            keep = np.zeros(vocab_size, dtype=bool)
            keep[allowed_ids] = True
            if mask is not None:
                keep &= mask
            bias = np.where(keep, np.float32(0.0), np.float32(-np.inf)).astype(np.float32)
            if mask is None or not mask.flags.writeable:  # shared, read-only masks only: a fresh one dies
                if len(_ROW_BIASES) >= 256:
                    _ROW_BIASES.clear()
                _ROW_BIASES[key] = (mask, allowed_ids, bias)  # type: ignore[assignment]
            out[r] = bias
        else:
            out[r] = hit[2]
    return out


def constrain(logits: np.ndarray, masks: Sequence[np.ndarray | None]) -> np.ndarray:
    """``logits [B, V]`` with -inf wherever a row's mask forbids (rows with None untouched): one
    ``where`` over the constrained rows together. Returns ``logits`` itself when no row has a mask."""
    rows = [i for i, m in enumerate(masks) if m is not None]
    if not rows:
        return logits
    if len(rows) == len(masks):  # every row constrained (the usual batch): one pass, no gather or scatter
        return np.where(np.stack(masks), logits, np.float32(-np.inf))  # type: ignore[arg-type]
    out = np.array(logits, dtype=np.float32, copy=True)
    stacked = np.stack([masks[i] for i in rows])  # type: ignore[misc]
    out[rows] = np.where(stacked, out[rows], np.float32(-np.inf))
    return out


# ---- what a written poem does --------------------------------------------------------------------------------------

_CLAUSES = re.compile(f"[{COMMA}{FULL_STOP}]")


def clauses(poem: str) -> list[str]:
    return [c for c in _CLAUSES.split(poem) if c]


def analyse(table: SoundTable, poem: str) -> dict[str, Any]:
    """Rhyme group, tone marks and pattern compliance of a regular poem (4 or 8 lines of 5 or 7).

    ``rhyme_group``: the group all even lines' last characters share (a level one when there is a
    choice), or None; ``decidable``: every one of those characters is in the table; ``level_endings``:
    how many of them can be read level; ``pattern_lines``: per line, whether it follows the strict 近体
    pattern under the first line's key tone that fits most lines.
    """
    lines = clauses(poem)
    n = len(lines[0]) if lines else 0
    ends = [line[-1] for line in lines[1::2]]
    groups = [table.groups_of_char(ch) for ch in ends]
    common = frozenset.intersection(*groups) if groups else frozenset()
    level_common = sorted(g for g in common if table.level[g])
    group = (level_common or sorted(common) or [None])[0]
    first_joins = bool(group is not None and len(lines) > 1 and group in table.groups_of_char(lines[0][-1]))
    best: list[bool] = []
    if n in (5, 7) and all(len(line) == n for line in lines):
        form = PoemForm(n, len(lines)) if len(lines) in (4, 8) else None
        if form is not None:
            for k0 in (LEVEL, OBLIQUE):
                ok = [_line_fits(table, line, i, k0) for i, line in enumerate(lines)]
                if sum(ok) > sum(best):
                    best = ok
            best = best or [False] * len(lines)
    return {
        "rhyme_group": None if group is None else table.names[group],
        "rhymes": group is not None,
        "first_line_joins": first_joins,
        "decidable": bool(groups) and all(groups),
        "level_endings": sum(bool(table.class_of(ch) & LEVEL) for ch in ends),
        "even_lines": len(ends),
        "tones": [table.pattern(line) for line in lines],
        "pattern_lines": best,
    }


def _line_fits(table: SoundTable, line: str, index: int, k0: int) -> bool:
    """Whether ``line`` (the ``index``-th) follows the strict pattern when the first line's key is ``k0``."""
    n = len(line)
    classes = [table.class_of(ch) for ch in line]
    ends = (LEVEL, OBLIQUE) if index == 0 else ((LEVEL,) if index % 2 else (OBLIQUE,))
    key = _line_key(index, k0)
    for end in ends:
        needs = {n - 1: end, n - 4: key, n - 2: _opposite(key)}
        if n == 7:
            needs[1] = _opposite(key)
        if _opposite(key) == LEVEL and end == LEVEL:
            needs[n - 3] = OBLIQUE
        if all(classes[p] & tone for p, tone in needs.items()):
            return True
    return False


def plan_with_prosody(table: SoundTable, form: PoemForm, vocab: Any, spec: ProsodySpec, prompt: str = "",
                      acrostic: str = "", line_starts: dict[int, str] | None = None
                      ) -> tuple[list[int | None], Callable[[], PoemProsody | None]]:
    """``plan_poem``'s plan, and a maker of each poem's constraint state (None when ``spec`` is off).

    The prompt and the acrostic are the user's: a conflict with the rules is refused with the reason.
    Theme keywords are the service's choice, so a keyword the rules cannot take is dropped (the later
    lines' first), keeping the others, rather than refusing the request.
    """
    starts = dict(line_starts or {})
    while True:
        plan = plan_poem(form, vocab, prompt, acrostic, starts)
        if not spec.active:
            return plan, lambda: None
        try:
            PoemProsody(table, form, plan, spec)
        except ProsodyError:
            if not starts:
                raise
            del starts[max(starts)]
            continue
        return plan, lambda fixed=plan: PoemProsody(table, form, fixed, spec)


def poem_report(table: SoundTable, poem: str) -> dict[str, Any]:
    """What the answer says of one poem: the rhyme group and each line's tone marks."""
    a = analyse(table, poem)
    return {"rhyme_group": a["rhyme_group"], "tones": a["tones"], "pattern": a["pattern_lines"]}
