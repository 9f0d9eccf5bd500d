"""``python -m training poem-eval``: rhyme, tones, perplexity, diversity and copying of generated poems.

Every poem model (each one in the BentoML store, and any run folder named with ``--runs``; with
neither, every ``runs/poem_rnn-*`` folder) writes a fixed set of poems: for each form (5 or 7
characters, 4 or 8 lines), each opening character of ``PROMPTS`` and each of ``SEEDS``, with the
served sampling defaults (temperature 0.8, top-p 0.9, repetition penalty 1.1), once per condition
of ``CONDITIONS`` (no constraint, rhyme, rhyme with loose or strict tones, and strict with an
acrostic). Decoding is the service's: the batch steps together, the constraint masks
(``serving/prosody.py``) are per-row arrays applied to the step's logits, and ``advance_all`` samples.

Beside them, the corpus's own figures on its regular 4- and 8-line poems. Measured:
- rhyme rate: poems whose even lines end in one 平水韵 group, of those whose ends are all in the table;
- level endings: even lines' last characters that can be read level;
- strict pattern: lines that follow the 近体 pattern (``serving.prosody.analyse``);
- perplexity of the *sampled* characters under the model's own unconstrained distribution at
  temperature 1 (what the constraint costs; the corpus row scores held-out poems' characters);
- distinct-1/2: distinct characters / characters, distinct in-line bigrams / bigrams;
- copy rate: generated lines, and in-line 4-grams, found verbatim in the training split of the
  model's corpus (every poem not held out: a superset of what a ``--limit`` run saw, so an upper bound).

Writes ``docs/records/poem-sound-eval.json`` and the ``poem-sound-eval`` block of docs/RESULTS.md,
rendered from that record.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from preprocessing import Vocabulary
from serving.poem_sampling import COMMA, FULL_STOP, PoemForm, PoemSampler, SamplingParams, advance_all, plan_poem
from serving.prosody import PoemProsody, ProsodySpec, SoundTable, analyse, clauses, constrain
from training.paths import REPO_ROOT, runs_dir

RECORD_PATH = REPO_ROOT / "docs" / "records" / "poem-sound-eval.json"
RESULTS_PATH = REPO_ROOT / "docs" / "RESULTS.md"
BLOCK = "poem-sound-eval"
FORMS = ((5, 4), (7, 4), (5, 8), (7, 8))
PROMPTS = ("春", "秋", "月", "山", "江", "风", "夜", "花")
SEEDS = (0, 1, 2, 3)
ACROSTICS = {4: ("风花雪月", "春夏秋冬", "江山如画", "明月清风"), 8: ("春夏秋冬东南西北", "一二三四五六七八")}
CONDITIONS: dict[str, tuple[str, str, bool]] = {  # name → (rhyme, tones, acrostic instead of prompt)
    "none": ("off", "off", False),
    "rhyme": ("auto", "off", False),
    "rhyme + loose tones": ("auto", "loose", False),
    "rhyme + strict tones": ("auto", "strict", False),
    "rhyme + strict tones, acrostic": ("auto", "strict", True),
}
PARAMS = SamplingParams()  # the service's defaults
Stepper = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class PoemModel:
    label: str
    vocab: Vocabulary
    table: SoundTable
    dataset: str
    step: Stepper  # (tokens [B], hidden [L, B, H]) → (logits [B, V], hidden)
    state_shape: tuple[int, int]  # (layers, hidden size)
    profile: str
    table_from: str


def _table(meta_prosody: dict[str, Any] | None, tokens: list[str]) -> tuple[SoundTable, str]:
    if meta_prosody:
        return SoundTable(meta_prosody, tokens), "meta.json"
    from training.poem_sounds import build_sound_table

    return SoundTable(build_sound_table(tokens), tokens), "built now (exported before meta carried it)"


def store_models(names: list[str] | None) -> list[PoemModel]:
    """Served poem models from the BentoML store, run by ONNX Runtime like the decoding process."""
    from serving.model_store import exported_names, locate_exported
    from serving.runtime import OnnxModel

    out = []
    for name in names if names is not None else exported_names("poem"):
        model = locate_exported(name)
        config = model.meta["config"]
        if config.get("cell") == "lstm":
            continue
        session = OnnxModel(model.graph)
        tokens = list(model.meta["preprocessing"]["vocab"]["tokens"])
        table, origin = _table(model.meta.get("prosody"), tokens)

        def step(tokens_: np.ndarray, hidden: np.ndarray,
                 session: OnnxModel = session) -> tuple[np.ndarray, np.ndarray]:
            logits, nxt = session.run({"token": tokens_.astype(np.int64), "hidden": hidden.astype(np.float32)})
            return logits, nxt

        training = model.meta["training"]
        out.append(PoemModel(f"{model.tag} ({training['preset']}, {training.get('profile', 'full')} profile)",
                             Vocabulary(tokens), table, training["dataset"], step,
                             (config["num_layers"], config["hidden_size"]), training.get("profile", "full"), origin))
    return out


def run_models(run_names: list[str]) -> list[PoemModel]:
    """Trained runs not (yet) in the store, stepped by torch on the CPU."""
    import torch

    from training.export import load_run

    out = []
    for name in run_names:
        run = runs_dir() / name if not Path(name).is_dir() else Path(name)
        model, saved = load_run(run)
        if saved["config"].get("cell") == "lstm":
            continue
        tokens = list(saved["preprocessing"]["vocab"]["tokens"])
        table, origin = _table(None, tokens)

        def step(tokens_: np.ndarray, hidden: np.ndarray, model: Any = model) -> tuple[np.ndarray, np.ndarray]:
            with torch.no_grad():
                logits, nxt = model.step(torch.from_numpy(tokens_.astype(np.int64)), torch.from_numpy(hidden))
            return logits.numpy(), nxt.numpy()

        summary = saved["summary"]
        out.append(PoemModel(f"run {run.name}", Vocabulary(tokens), table, summary["dataset"], step,
                             (saved["config"]["num_layers"], saved["config"]["hidden_size"]),
                             summary.get("profile", "full"), origin))
    return out


# ---- generation -------------------------------------------------------------------------------------------------


@dataclass
class Generated:
    poem: str
    nll: float  # of the sampled characters, under the unconstrained model at temperature 1
    sampled: int


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def generate(model: PoemModel, form: PoemForm, plans: list[list[int | None]], seeds: list[int],
             spec: ProsodySpec) -> list[Generated]:
    """The poems of one form, batched as the decoding process batches them."""
    samplers = [PoemSampler(plan, model.vocab, PARAMS, seed) for plan, seed in zip(plans, seeds, strict=True)]
    states = [PoemProsody(model.table, form, plan, spec) if spec.active else None for plan in plans]
    hidden = np.zeros((model.state_shape[0], len(samplers), model.state_shape[1]), np.float32)
    nll = np.zeros(len(samplers))
    sampled = np.zeros(len(samplers), dtype=int)
    for slot in range(form.slots):
        tokens = np.array([s.next_input for s in samplers])
        logits, hidden = model.step(tokens, hidden)
        free = [s.forced is None for s in samplers]
        masks = [st.mask(slot) if st is not None and f else None for st, f in zip(states, free, strict=True)]
        advance_all(samplers, constrain(logits, masks))
        logp = _log_softmax(logits)
        for i, s in enumerate(samplers):
            if states[i] is not None:
                states[i].accept(slot, s.tokens[-1])
            if free[i] and form.mark_at(slot) is None:
                nll[i] -= logp[i, s.tokens[-1]]
                sampled[i] += 1
    return [Generated(s.text, float(nll[i]), int(sampled[i])) for i, s in enumerate(samplers)]


def heldout_nll(model: PoemModel, poems: list[str]) -> tuple[float, int]:
    """NLL and count of the characters (not the marks) of real poems of one form, carried from <bos>."""
    seqs = np.array([model.vocab.encode(p, bos=True, eos=False) for p in poems])
    hidden = np.zeros((model.state_shape[0], len(poems), model.state_shape[1]), np.float32)
    total, count = 0.0, 0
    marks = {model.vocab.id_of(COMMA), model.vocab.id_of(FULL_STOP)}
    for t in range(seqs.shape[1] - 1):
        logits, hidden = model.step(seqs[:, t], hidden)
        logp = _log_softmax(logits)
        target = seqs[:, t + 1]
        keep = np.array([tok not in marks and tok != model.vocab.unk_id for tok in target])
        total -= float(logp[np.arange(len(poems)), target][keep].sum())
        count += int(keep.sum())
    return total, count


# ---- measures ----------------------------------------------------------------------------------------------------


def _ngram_codes(lines: list[str], n: int) -> np.ndarray:
    """Every in-line n-gram (n ≤ 4) as one uint64: CJK code points fit in 16 bits each (ext. A up to U+9FFF)."""
    codes = []
    for line in lines:
        points = [ord(ch) & 0xFFFF for ch in line]
        for i in range(len(points) - n + 1):
            code = 0
            for p in points[i:i + n]:
                code = (code << 16) | p
            codes.append(code)
    return np.array(codes, dtype=np.uint64)


@dataclass
class TrainingText:
    lines: set[str]
    fourgrams: np.ndarray  # sorted unique codes

    @classmethod
    def of(cls, poems: list[str]) -> TrainingText:
        lines = [c for p in poems for c in clauses(p)]
        return cls(set(lines), np.unique(_ngram_codes(lines, 4)))


def measure(table: SoundTable, poems: list[str], training: TrainingText | None,
            nll: float | None, count: int | None) -> dict[str, Any]:
    analyses = [analyse(table, p) for p in poems]
    decidable = [a for a in analyses if a["decidable"]]
    lines = [c for p in poems for c in clauses(p)]
    chars = [ch for line in lines for ch in line]
    bigrams = [line[i:i + 2] for line in lines for i in range(len(line) - 1)]
    pattern = [ok for a in analyses for ok in a["pattern_lines"]]
    row: dict[str, Any] = {
        "poems": len(poems),
        "decidable": len(decidable),
        "rhyme_rate": sum(a["rhymes"] for a in decidable) / max(1, len(decidable)),
        "first_line_joins": sum(a["first_line_joins"] for a in decidable) / max(1, len(decidable)),
        "level_ending_rate": sum(a["level_endings"] for a in analyses) / max(1, sum(a["even_lines"] for a in analyses)),
        "strict_line_rate": sum(pattern) / max(1, len(pattern)),
        "strict_poem_rate": sum(bool(a["pattern_lines"]) and all(a["pattern_lines"]) for a in analyses)
        / max(1, len(analyses)),
        # even lines' last characters with a level and an oblique reading: they fit either way, so a high
        # share means the rules were met on characters whose reading the poem does not decide
        "polyphone_ending_rate": sum(table.class_of(c[-1]) == 3 for p in poems for c in clauses(p)[1::2])
        / max(1, sum(a["even_lines"] for a in analyses)),
        "distinct_1": len(set(chars)) / max(1, len(chars)),
        "distinct_2": len(set(bigrams)) / max(1, len(bigrams)),
        "perplexity": float(np.exp(nll / count)) if nll is not None and count else None,
    }
    if training is not None:
        grams = _ngram_codes(lines, 4)
        row["copied_lines"] = sum(line in training.lines for line in lines) / max(1, len(lines))
        row["copied_4grams"] = float(np.isin(grams, training.fourgrams).mean()) if len(grams) else 0.0
    return row


# ---- the evaluation ------------------------------------------------------------------------------------------------


def _plans(model: PoemModel, form: PoemForm, acrostic: bool) -> tuple[list[list[int | None]], list[int]]:
    plans, seeds = [], []
    for i, prompt in enumerate(PROMPTS):
        for seed in SEEDS:
            if acrostic:
                options = ACROSTICS[form.lines]
                plans.append(plan_poem(form, model.vocab, acrostic=options[(i + seed) % len(options)]))
            else:
                plans.append(plan_poem(form, model.vocab, prompt=prompt))
            seeds.append(1000 * i + seed)
    return plans, seeds


def _regular(poems: list[str], form: tuple[int, int]) -> list[str]:
    n, lines = form
    return [p for p in poems if len(cs := clauses(p)) == lines and all(len(c) == n for c in cs)]


def evaluate_model(model: PoemModel) -> dict[str, Any]:
    from training.datasets.poems import heldout_split, load_corpus

    corpus = load_corpus(model.dataset)
    train_idx, test_idx = heldout_split(len(corpus))
    train = [corpus[i] for i in train_idx]
    heldout = [corpus[i] for i in test_idx]
    training = TrainingText.of(train)
    rows: dict[str, Any] = {}
    samples: dict[str, list[str]] = {}
    for name, (rhyme, tones, acrostic) in CONDITIONS.items():
        began = time.perf_counter()
        spec = ProsodySpec(rhyme, tones)
        poems: list[str] = []
        nll, count = 0.0, 0
        for n, lines in FORMS:
            form = PoemForm(n, lines)
            plans, seeds = _plans(model, form, acrostic)
            out = generate(model, form, plans, seeds, spec)
            poems += [g.poem for g in out]
            nll += sum(g.nll for g in out)
            count += sum(g.sampled for g in out)
        rows[name] = {**measure(model.table, poems, training, nll, count),
                      "rhyme": rhyme, "tones": tones, "acrostic": acrostic,
                      "seconds": round(time.perf_counter() - began, 2)}
        samples[name] = poems[:2] + poems[-2:]
    # The corpus: every regular 4/8-line poem for the sound figures; for perplexity, diversity and copying,
    # as many held-out poems of each form as were generated, scored and compared like the generated ones.
    per_form = len(PROMPTS) * len(SEEDS)
    rng = np.random.default_rng(0)
    pick: list[str] = []
    nll, count = 0.0, 0
    for form in FORMS:
        candidates = _regular(heldout, form)
        chosen = [candidates[i] for i in sorted(rng.choice(len(candidates), min(per_form, len(candidates)),
                                                           replace=False))]
        known = [p for p in chosen if not model.vocab.unknown_chars(p)] or chosen
        f_nll, f_count = heldout_nll(model, known)
        nll, count = nll + f_nll, count + f_count
        pick += chosen
    regular = [p for form in FORMS for p in _regular(corpus, form)]
    sound = measure(model.table, regular, None, None, None)
    sample_row = measure(model.table, pick, training, nll, count)
    corpus_row = {**sound, **{k: sample_row[k] for k in ("perplexity", "distinct_1", "distinct_2",
                                                         "copied_lines", "copied_4grams")},
                  "sample_poems": len(pick)}
    return {"model": model.label, "profile": model.profile, "dataset": model.dataset, "table": model.table_from,
            "coverage": _coverage(model), "conditions": rows, "corpus": corpus_row, "samples": samples}


def _coverage(model: PoemModel) -> dict[str, Any]:
    chars = [i for i, t in enumerate(model.vocab.tokens) if len(t) == 1 and "\u3400" <= t <= "\u9fff"]
    classes = model.table.classes[chars]
    return {"vocabulary_characters": len(chars), "covered": int((classes > 0).sum()),
            "both": int((classes == 3).sum())}


def bars(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in results:
        for name, row in r["conditions"].items():
            if row["rhyme"] != "off":
                out.append({"bar": f"{r['model']}, {name}: every poem rhymes", "ok": row["rhyme_rate"] == 1.0,
                            "value": f"{100 * row['rhyme_rate']:.1f}% of {row['decidable']}"})
            if row["tones"] == "strict":
                out.append({"bar": f"{r['model']}, {name}: ≥ 98% of lines follow the strict pattern",
                            "ok": row["strict_line_rate"] >= 0.98, "value": f"{100 * row['strict_line_rate']:.1f}%"})
            out.append({"bar": f"{r['model']}, {name}: ≤ 2% of lines copied whole",
                        "ok": row["copied_lines"] <= 0.02, "value": f"{100 * row['copied_lines']:.2f}%"})
    return out


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def markdown_section(record: dict[str, Any]) -> str:
    lines = [
        "## Poems that rhyme and keep their tones",
        "",
        f"Written by `{record['command']}` from [`docs/records/poem-sound-eval.json`](records/poem-sound-eval.json) "
        f"on {record['machine']}. Each condition: {record['poems_per_condition']} poems per model "
        f"({len(FORMS)} forms × {len(PROMPTS)} opening characters × {len(SEEDS)} seeds; the acrostic condition "
        "gives each line's first character instead), sampled with the service's defaults (temperature 0.8, "
        "top-p 0.9, repetition penalty 1.1) through the service's batched step, the rhyme and tone masks "
        "(`serving/prosody.py`) applied per row. The sound tables: "
        f"{record['table_source']}.",
        "",
        "Rhyme: the even lines end in one 平水韵 group (of the poems whose ends are all in the table). Level "
        "endings: even lines' last characters that can be read 平. Strict: lines following the 近体 pattern "
        "(二四六分明, 粘/对, no 三平尾). 多音字 endings: even lines' last characters with both a level and an "
        "oblique reading, which fit either rule. Perplexity: of the sampled characters under the model's own "
        "unconstrained distribution at temperature 1 (the corpus row: held-out poems' characters). Copied: "
        "generated lines and 4-grams found verbatim in the training split of the corpus.",
        "",
    ]
    for r in record["results"]:
        cov = r["coverage"]
        lines += [
            f"### {r['model']}",
            "",
            f"Trained on {r['dataset']}; {cov['covered']:,} of its {cov['vocabulary_characters']:,} characters are in "
            f"the 平水韵 table ({cov['both']:,} with a level and an oblique reading); table from {r['table']}.",
            "",
            "| poems | rhyme | level endings | 多音字 endings | strict lines | strict poems | perplexity | distinct-1 "
            "| distinct-2 | lines copied | 4-grams copied |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        rows = [(f"generated, {name}", row) for name, row in r["conditions"].items()]
        rows.append((f"corpus ({r['corpus']['poems']:,} regular poems; {r['corpus']['sample_poems']} held-out for "
                     "perplexity, distinct, copied)", r["corpus"]))
        for name, row in rows:
            lines.append(f"| {name} | {_pct(row['rhyme_rate'])} | {_pct(row['level_ending_rate'])} | "
                         f"{_pct(row['polyphone_ending_rate'])} | "
                         f"{_pct(row['strict_line_rate'])} | {_pct(row['strict_poem_rate'])} | "
                         f"{row['perplexity']:.1f} | {row['distinct_1']:.3f} | {row['distinct_2']:.3f} | "
                         f"{_pct(row.get('copied_lines'))} | {_pct(row.get('copied_4grams'))} |")
        lines.append("")
    lines += ["Bars (issue 22):", ""]
    lines += [f"- {'✓' if b['ok'] else '✗'} {b['bar']}: {b['value']}" for b in record["bars"]]
    if record.get("note"):
        lines += ["", record["note"]]
    return "\n".join(lines)


def write_section(results: Path, section: str) -> None:
    """Replace (or append) the ``poem-sound-eval`` generated block; ``training.report`` keeps it as is."""
    from training.report import END, replace_sections

    text = results.read_text(encoding="utf-8") if results.is_file() else "# Results\n"
    start = f"<!-- generated: {BLOCK} -->"
    if start in text:
        text = replace_sections(text, {BLOCK: section})
    else:
        text = text.rstrip("\n") + f"\n\n{start}\n{section.rstrip()}\n{END}\n"
    results.write_text(text, encoding="utf-8")


def main(models: list[str] | None, runs: list[str] | None, record_path: Path = RECORD_PATH,
         results_path: Path = RESULTS_PATH, note: str = "", write: bool = True) -> int:
    loaded = store_models(models) if models or not runs else []
    if runs:
        loaded += run_models(runs)
    if not loaded:
        found = sorted(p.name for p in runs_dir().glob("poem_rnn-*") if (p / "model.pt").is_file())
        loaded = run_models(found)
    if not loaded:
        print("error: no poem model in the store or under runs/ (python -m training train poem_rnn --profile quick)")
        return 2
    results = []
    for model in loaded:
        print(f"evaluating {model.label} …", flush=True)
        results.append(evaluate_model(model))
    from importlib import metadata

    from training.poem_sounds import PACKAGE, traditional_groups

    record = {
        "kind": "poem-sound-eval",
        "command": "python -m training poem-eval" + (f" --runs {' '.join(runs)}" if runs else "")
                   + (f" --models {' '.join(models)}" if models else ""),
        "machine": f"{platform.machine()} CPU, Python {platform.python_version()}",
        "table_source": f"{PACKAGE} {metadata.version(PACKAGE)} ({len(traditional_groups())} groups), through OpenCC "
                        "t2s (training/poem_sounds.py)",
        "poems_per_condition": len(FORMS) * len(PROMPTS) * len(SEEDS),
        "results": results,
        "bars": bars(results),
        "note": note,
    }
    for r in results:
        for name, row in r["conditions"].items():
            print(f"  {name:32} rhyme {_pct(row['rhyme_rate']):>6}  level {_pct(row['level_ending_rate']):>6}  "
                  f"strict {_pct(row['strict_line_rate']):>6}  ppl {row['perplexity']:7.1f}  "
                  f"d1 {row['distinct_1']:.3f} d2 {row['distinct_2']:.3f}  copied {_pct(row['copied_lines'])} "
                  f"/ {_pct(row['copied_4grams'])}  ({row['seconds']} s)")
        c = r["corpus"]
        print(f"  {'corpus':32} rhyme {_pct(c['rhyme_rate']):>6}  level {_pct(c['level_ending_rate']):>6}  "
              f"strict {_pct(c['strict_line_rate']):>6}  ppl {c['perplexity']:7.1f}")
    for b in record["bars"]:
        print(f"{'✓' if b['ok'] else '✗'} {b['bar']}: {b['value']}")
    if write:
        record_path.parent.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        write_section(results_path, markdown_section(record))
        print(f"wrote {record_path} and the {BLOCK} block of {results_path}")
    return 0 if all(b["ok"] for b in record["bars"]) else 1
