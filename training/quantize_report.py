"""``python -m training quantize-report``: int8 vs float for each stored model → docs/QUANTIZATION.md.

Reads each model from the BentoML store (verified, never modified), quantises a copy in a temporary
folder and writes one table: size, speed-up at two batch sizes, the float metric recomputed through
ONNX Runtime beside the int8 one, and the decision ``training.quantize.decide`` takes.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from training.bench import cpu_name
from training.quantize import INT8_FILE, QUANTIZED_OPS, SPEED_BATCHES, Tolerance, quantization_report


def stored_model(name: str) -> tuple[str, Path, dict[str, Any]]:
    """``name``, ``name:version`` or an exported model folder → (tag, folder, verified meta); a name
    resolves as serving resolves it (``DLBOOK_MODEL_<NAME>`` pins included)."""
    import bentoml

    from serving.artifacts import verify_model_dir
    from serving.model_store import pinned_tag

    if Path(name).is_dir():
        meta = verify_model_dir(Path(name))
        return meta.get("tag", name), Path(name), meta
    model = bentoml.models.get(name if ":" in name else pinned_tag(name))
    path = Path(model.path)
    return str(model.tag), path, verify_model_dir(path)


def conv_trial(path: Path, meta: dict[str, Any], rounds: int) -> dict[str, Any] | None:
    """Why ``Conv`` stays float, measured: the same scheme with ``Conv`` quantised too (ORT's
    ``ConvInteger``), timed against the float graph; ``None`` for a graph without convolutions."""
    import onnx

    from serving.runtime import OnnxModel
    from training.quantize import QUANTIZED_OPS, cpu_runtime, measure_speed, quantize_file

    if not any(n.op_type == "Conv" for n in onnx.load(str(path / "model.onnx")).graph.node):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "conv.int8.onnx"
        info = quantize_file(path / "model.onnx", target, meta=meta, ops=(*QUANTIZED_OPS, "Conv"))
        runtime = cpu_runtime()
        speed = measure_speed(OnnxModel(path / "model.onnx", runtime), OnnxModel(target, runtime), meta, rounds, 0.3)
        convs = sum(1 for n in onnx.load(str(target)).graph.node if n.op_type == "ConvInteger")
    return {"ops": info["ops"], "integer_convs": convs, "speed": speed}


def report_models(names: list[str], rounds: int) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        tag, path, meta = stored_model(name)
        with tempfile.TemporaryDirectory() as tmp:
            report = quantization_report(path / "model.onnx", meta, Path(tmp) / INT8_FILE, rounds=rounds)
        report.pop("check")  # serving's re-verification data: not part of the report
        row = {"model": meta.get("name", name), "tag": tag, "task": meta["task"],
               "profile": meta["training"].get("profile"), "report": report}
        trial = conv_trial(path, meta, rounds)
        if trial:
            row["conv_trial"] = trial
        rows.append(row)
        print(f"  {name}: {'keep' if report['decision']['keep'] else 'float'} "
              f"({'; '.join(report['decision']['reasons'])})", file=sys.stderr, flush=True)
    return rows


def _quality(report: dict[str, Any]) -> str:
    q = report["quality"]
    metric, f, i = q["metric"], q["float"][q["metric"]], q["int8"][q["metric"]]
    if metric == "accuracy":
        return f"accuracy {100 * f:.2f}% → {100 * i:.2f}% ({q['change']:+.2f} points)"
    if metric == "log_rmse":
        return (f"log-RMSE {f:.4f} → {i:.4f} ({100 * q['change']:+.2f}%); MAE ${q['float']['mae_dollars']:,.0f} → "
                f"${q['int8']['mae_dollars']:,.0f}")
    return f"perplexity {f:.2f} → {i:.2f} ({100 * q['change']:+.2f}%)"


def _speed(report: dict[str, Any], batch: str) -> str:
    s = report["speed"][batch]
    return (f"{s['float_ms']:.3f} → {s['int8_ms']:.3f} ms (**{s['speedup']:.2f}×**; spread "
            f"{100 * s['float_spread']:.0f}% / {100 * s['int8_spread']:.0f}%)")


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | int8 MatMuls | ONNX size | small batch: float → int8 | large batch: float → int8 | "
             "quality on held-out data (float → int8) | decision |",
             "|---|---:|---|---|---|---|---|"]
    for row in rows:
        r = row["report"]
        small, large = (str(b) for b in SPEED_BATCHES[row["task"]])
        decision = "**int8**" if r["decision"]["keep"] else "float"
        profile = f" ({row['profile']} profile)" if row.get("profile") else ""
        lines.append(
            f"| {row['model']}{profile} | {r['integer_matmuls']} | "
            f"{r['bytes']['float'] / 1e6:.2f} → {r['bytes']['int8'] / 1e6:.2f} MB | "
            f"b{small}: {_speed(r, small)} | b{large}: {_speed(r, large)} | {_quality(r)} | "
            f"{decision}: {'; '.join(r['decision']['reasons'])} |")
    return "\n".join(lines) + "\n"


def _record_link(env: dict[str, Any]) -> str:
    record = env.get("record")
    return f", every figure in [`{record}`]({record.removeprefix('docs/')})" if record else ""


def _missing(rows: list[dict[str, Any]]) -> str:
    """The project's default models this run did not report, named under the table."""
    from training.bench import DEFAULT_MODELS

    missing = [m for m in DEFAULT_MODELS if m not in {row["model"] for row in rows}]
    return f"\nNot in this run: {', '.join(missing)}.\n" if missing else ""


def _paragraph(*parts: str) -> str:
    """One markdown paragraph from source-sized pieces (no hard wraps in the written file)."""
    return " ".join(parts)


REPO = Path(__file__).resolve().parents[1]
SCHEME_BENCHMARK = "int8-schemes"
REPORT_BENCHMARK = "int8-report"
MIN_AGREEMENT = 0.99  # below this top-1 agreement with float, the summary names the model (information only)
CPU_SPREAD = 1.5  # how much larger a scheme's max abs may be where u8×s8 saturates than where it is exact
SCHEME_RECORDS = f"docs/bench/{SCHEME_BENCHMARK}-*.json"
FLAG_NAMES = {"avx2": "AVX2", "avx512f": "AVX-512F", "avx512bw": "AVX-512BW", "avx512_vnni": "AVX-512 VNNI",
              "avx_vnni": "AVX-VNNI", "amx_int8": "AMX-INT8"}


def describe_cpu(cpu: dict[str, Any]) -> str:
    """``GenuineIntel Intel(R) Xeon(R) …; AVX2 yes, …; u8×s8 product exact: yes``."""
    flags = ", ".join(f"{label} {'yes' if cpu['flags'].get(flag) else 'no'}" for flag, label in FLAG_NAMES.items())
    return (f"{cpu['vendor']} {cpu['model_name']}; /proc/cpuinfo flags: {flags}; ORT's u8×s8 product exact: "
            f"{'yes' if cpu['u8s8_exact'] else 'no (saturates)'}")


def _conv_sentence(rows: list[dict[str, Any]]) -> str:
    trials = [(row["model"], row["conv_trial"]) for row in rows if row.get("conv_trial")]
    if not trials:
        return "ORT's `ConvInteger` was not timed in this run: no model with convolutions was reported"
    parts = []
    for model, trial in trials:
        timings = [f"{s['int8_ms']:.3f} ms instead of {s['float_ms']:.3f} ms at batch {b}"
                   for b, s in trial["speed"].items()]
        parts.append(f"with its {trial['integer_convs']} convolutions int8 too, {model} took {' and '.join(timings)}")
    return "timed in this run: " + "; ".join(parts)


def _change(row: dict[str, Any]) -> str:
    metric, f, i = row["metric"], row["float"][row["metric"]], row["int8"][row["metric"]]
    if metric == "accuracy":
        return f"accuracy {100 * f:.2f}% → {100 * i:.2f}% ({100 * (i - f):+.2f} points)"
    if metric == "log_rmse":
        return f"log-RMSE {f:.4f} → {i:.4f} ({100 * (i / f - 1):+.2f}%)"
    return f"perplexity {f:.2f} → {i:.2f} ({100 * (i / f - 1):+.2f}%)"


def scheme_table(record: dict[str, Any]) -> str:
    """One committed scheme comparison (docs/bench/int8-schemes-*.json) as a markdown table."""
    timed = bool(record["config"].get("rounds"))
    head = "| model | scheme | max abs, first output | top-1 agreement | quality (float → int8) |"
    rule = "|---|---|---:|---:|---|"
    if timed:
        head += " speed-up, small batch | speed-up, large batch |"
        rule += "---:|---:|"
    lines = [head, rule]
    for row in record["result"]["rows"]:
        agree = f"{100 * row['top1_agreement']:.2f}%" if "top1_agreement" in row else "–"
        line = f"| {row['model']} | `{row['scheme']}` | {row['max_abs']:.4f} | {agree} | {_change(row)} |"
        if timed:
            line += "".join(f" b{b}: {s['speedup']:.2f}× |" for b, s in row["speed"].items())
        lines.append(line)
    return "\n".join(lines) + "\n"


def scheme_records(pattern: str = SCHEME_RECORDS) -> list[tuple[str, dict[str, Any]]]:
    return [(str(p.relative_to(REPO)), json.loads(p.read_text(encoding="utf-8"))) for p in sorted(REPO.glob(pattern))]


def scheme_stats(records: list[tuple[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per scheme, over every committed record: the worst max abs where ORT's u8×s8 product is exact
    and where it saturates, the same model's max abs on both kinds of CPU, the rows whose metric left
    the tolerance, and the timed speed-ups."""
    from training.quantize import SCHEMES, Tolerance, quality_change

    tol = Tolerance()

    def empty() -> dict[str, Any]:
        return {"worst": {}, "paired": {}, "past": [], "disagree": [], "small": [], "large": []}

    stats: dict[str, dict[str, Any]] = {s: empty() for s in SCHEMES}
    for _, record in records:
        exact = bool(record["result"]["cpu"]["u8s8_exact"])
        for row in record["result"]["rows"]:
            s = stats.setdefault(row["scheme"], empty())
            if row["max_abs"] > s["worst"].get(exact, (-1.0, ""))[0]:
                s["worst"][exact] = (row["max_abs"], row["model"])
            s["paired"].setdefault(row["tag"], {"model": row["model"]})[exact] = row["max_abs"]
            metric = row["metric"]
            change, allowed, unit = quality_change(row["task"], row["float"][metric], row["int8"][metric], tol)
            if (unit == "points" and not change > allowed) or (unit == "relative" and not change < allowed):
                s["past"].append(f"{row['model']} ({'exact' if exact else 'saturating'}: {_change(row)})")
            if row.get("top1_agreement", 1.0) < MIN_AGREEMENT:
                s["disagree"].append(f"{row['model']} ({'exact' if exact else 'saturating'}: "
                                     f"{100 * row['top1_agreement']:.2f}%)")
            speeds = list(row.get("speed", {}).values())
            if speeds:
                s["small"].append(speeds[0]["speedup"])
                s["large"].append(speeds[-1]["speedup"])
    for s in stats.values():
        timed = s["small"] + s["large"]
        s["median"] = statistics.median(timed) if timed else None  # robust to one noisy round
        pairs = [p for p in s["paired"].values() if True in p and False in p]
        s["both_cpus"] = bool(pairs)
        # The same graph, the same inputs: where the product saturates its error must not grow past
        # CPU_SPREAD × the exact product's (+ 1e-3 for rounding).
        s["cpu_dependent"] = [f"{p['model']} {p[True]:.4f} → {p[False]:.4f}" for p in pairs
                              if p[False] > CPU_SPREAD * p[True] + 1e-3]
    return stats


def pick_scheme(records: list[tuple[str, dict[str, Any]]]) -> str | None:
    """The rule the default follows: among the schemes measured on the same models on both kinds of
    CPU (u8×s8 product exact, and saturating) whose max abs error grows by at most ``CPU_SPREAD`` where
    the product saturates (the same graph behaves alike on every CPU), the highest median speed-up over
    every timed (model, batch) pair (a median: one round disturbed by the shared machine moves it
    little); ``None`` when no scheme qualifies. Each model's quality is judged afterwards, at export, by
    ``training.quantize.decide`` on its own metric; the summary shows agreement and metric beside."""
    stats = scheme_stats(records)
    fit = {name: s["median"] for name, s in stats.items() if s["both_cpus"] and not s["cpu_dependent"] and s["median"]}
    return max(fit, key=fit.__getitem__) if fit else None


def scheme_summary(records: list[tuple[str, dict[str, Any]]]) -> str:
    from training.quantize import DEFAULT_SCHEME

    lines = ["| scheme | max abs, u8×s8 exact (worst model) | max abs, u8×s8 saturating (worst model) | "
             f"same model, exact → saturating (where it grew) | top-1 agreement < {100 * MIN_AGREEMENT:.0f}% | "
             "metric past the tolerance | speed-up, small batch | speed-up, large batch | median speed-up |",
             "|---|---|---|---|---|---|---|---|---:|"]
    for name, s in scheme_stats(records).items():
        cells = [f"{s['worst'][e][0]:.4f} ({s['worst'][e][1]})" if e in s["worst"] else "not measured"
                 for e in (True, False)]
        grew = "; ".join(s["cpu_dependent"]) or ("no" if s["both_cpus"] else "not measured on both")
        spans = [f"{min(v):.2f}–{max(v):.2f}×" if v else "not measured" for v in (s["small"], s["large"])]
        mean = f"{s['median']:.2f}×" if s["median"] else "–"
        lines.append(f"| `{name}` | {cells[0]} | {cells[1]} | {grew} | {'; '.join(s['disagree']) or 'none'} | "
                     f"{'; '.join(s['past']) or 'none'} | {spans[0]} | {spans[1]} | {mean} |")
    picked = pick_scheme(records)
    verdict = (f"These records pick `{picked}`, the default." if picked == DEFAULT_SCHEME else
               f"These records pick `{picked}`, not the default `{DEFAULT_SCHEME}`: revisit the default."
               if picked else "No scheme qualifies in these records.")
    return "\n".join(lines) + "\n\n" + verdict + "\n"


def _data_root(record: dict[str, Any]) -> str:
    """Where the held-out data came from, as the record's ``DLBOOK_DATA`` says (relative to the repo)."""
    root = record.get("environment", {}).get("DLBOOK_DATA")
    if not root:
        return "the default data root"
    path = Path(root)
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else (
        Path("..") / path.relative_to(REPO.parent) if path.is_relative_to(REPO.parent) else path)
    return f"`{shown}`" + (" (the committed samples)" if shown == Path("data/samples") else "")


def _coverage(records: list[tuple[str, dict[str, Any]]]) -> str:
    """Which models each kind of CPU covered, from the records."""
    seen: dict[bool, set[str]] = {True: set(), False: set()}
    for _, record in records:
        seen[bool(record["result"]["cpu"]["u8s8_exact"])].update(row["model"] for row in record["result"]["rows"])
    missing = sorted(seen[True] - seen[False])
    return (f"\nMeasured where u8×s8 is exact: {', '.join(sorted(seen[True])) or 'none'}; where it saturates: "
            f"{', '.join(sorted(seen[False])) or 'none'}"
            + (f" (not measured there: {', '.join(missing)})" if missing else "") + ".\n")


def scheme_section(records: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Why the default scheme: the committed comparisons, each with its CPU and command (read from
    the records, never typed in here)."""
    from training.quantize import DEFAULT_SCHEME, SCHEMES

    out = ["## Which scheme, and why (issue 18)", _paragraph(
        "ONNX Runtime multiplies uint8 activations by int8 weights. With VNNI (`vpdpbusd`) or AMX the",
        "integer product is exact; on AVX2 (or AVX-512BW) without VNNI it goes through `vpmaddubsw`, which",
        "adds two uint8·int8 products into int16 and saturates: with 8-bit weights a pair reaches",
        "2·255·127 = 64,770 > 32,767, and the logits move (issue 18: the suite's int8 check failed on an AMD",
        "EPYC). So a scheme judged on one CPU need not hold on another. Measured below on the models each",
        "record names, on real held-out data (max abs and top-1 agreement over the whole test split for",
        "images, the house holdout, 256 mid-poem steps; the quality is each model's own metric):",
        ", ".join(f"`{name}` ({s.summary})" for name, s in SCHEMES.items()) + "."),
        _paragraph(
            f"**Default: `{DEFAULT_SCHEME}`** ({SCHEMES[DEFAULT_SCHEME].summary}). Its weights fit in",
            "[-64, 64], so no pair of products can pass 2·255·64 = 32,640: the integer product is exact on every",
            "x86 CPU, with or without VNNI, at the cost of one weight bit, and it runs the same kernels as the",
            "8-bit scheme. The rule it was picked by (`pick_scheme`): among the schemes measured on the same",
            "models on both kinds of CPU (u8×s8 product exact, and saturating) whose max abs error grew by",
            f"at most {CPU_SPREAD}× where the product saturates (the graph behaves alike on every CPU), the",
            "highest median speed-up over every timed (model, batch) pair; each model's quality is then judged",
            "at export by `decide` on its own metric. Agreement with float and the metric are shown beside",
            "(on the 500 test images of the committed samples one image is 0.2 points, so a brief model's",
            "metric moves by a single image). The summary is",
            "computed from the records that follow it. Speed on a CPU without VNNI was not measured: no such machine",
            "was reachable, and timings under an emulator mean nothing; an AVX2-only CPU runs the u8×s8",
            "schemes on `vpmaddubsw` (the same kernel for 7- and 8-bit weights) and u8u8 on a widening kernel."),
        scheme_summary(records) + _coverage(records)]
    if not records:
        out.append("No scheme comparison is committed under `docs/bench/`.")
    for path, record in records:
        config, result, machine = record["config"], record["result"], record["machine"]
        emulated = config.get("emulated")
        where = (f"emulated by `qemu-x86_64 -cpu {emulated}` (integer results are the emulated CPU's; the flags "
                 "are the host's /proc/cpuinfo; no timing)" if emulated else "native")
        timing = (f"{config['rounds']} alternated rounds, ORT CPU provider with ORT's default threads"
                  if config.get("rounds") else "quality only")
        out.append(_paragraph(
            f"**[`{path}`]({path.removeprefix('docs/')})**, {where}: {describe_cpu(result['cpu'])};",
            f"{machine['cores']} cores, load average {machine['load_before'][0]:.1f} before,",
            f"onnxruntime {result['onnxruntime']}, {record['started']}, commit {record['commit'][:7]}",
            f"(dirty: {len(record['dirty'])} files), {timing}. Data: {_data_root(record)}; models (BentoML tags):",
            ", ".join(dict.fromkeys(f"`{row['tag']}`" for row in result["rows"])) + ". Command:",
            f"`{'qemu-x86_64 -cpu ' + emulated + ' ' if emulated else ''}{record['command']}`."))
        out.append(scheme_table(record))
    return out


def markdown(rows: list[dict[str, Any]], env: dict[str, Any],
             records: list[tuple[str, dict[str, Any]]] | None = None) -> str:
    from training.quantize import DEFAULT_SCHEME, SCHEMES

    tol = Tolerance()
    ops = ", ".join(f"`{o}`" for o in QUANTIZED_OPS)
    paragraphs = [
        "# Int8 quantisation",
        _paragraph(
            f"Written by `{env['command']}`{_record_link(env)} ({env['date']}; {describe_cpu(env['cpu'])};",
            f"{env['cpus']} CPUs;",
            f"onnxruntime {env['onnxruntime']}, ORT CPU provider with {env['threads']} intra-op threads,",
            f"{env['rounds']} alternated float/int8 rounds per batch size). Latencies are the median across",
            "rounds of each round's median per call; spread = (slowest − fastest round) / median; the speed-up",
            "is float/int8 within each round, median across rounds. Timings come from a shared 2-core machine:",
            "read them as ratios, and for this CPU only: another CPU runs other integer kernels."),
        _paragraph(
            f"**What int8 is here.** `{DEFAULT_SCHEME}`: {SCHEMES[DEFAULT_SCHEME].summary}: ORT's",
            f"`quantize_dynamic`, weights per output channel, no calibration data. Ops: {ops}, with each",
            "`Gemm` (how the exporter writes `nn.Linear`) rewritten as `MatMul` + `Add` first, since ORT's",
            "integer-op quantiser skips `Gemm`. `Conv` stays float (ORT's `ConvInteger` has no fast CPU kernel;",
            f"{_conv_sentence(rows)}), and so does `GRU` (ORT has no dynamic int8 GRU), so only the poem",
            "model's output layer and embedding are int8."),
        _paragraph(
            "**Quality** is each model's own float metric on the same held-out data, computed through ONNX",
            "Runtime for both graphs: accuracy on the official 10,000-image test split, log-RMSE (and MAE) on",
            "the fixed 20% house holdout, character perplexity on the held-out 5% of poems (decoded step by",
            "step with the serving graph, the state carried)."),
        _paragraph(
            "**Decision rule** (`training.quantize.decide`): int8 is kept only when its speed-up over float is",
            f"at least {tol.min_speedup:.2f}× at *every* timed batch size and its quality moved less than the",
            f"tolerance: accuracy down by less than {tol.accuracy_points} points, log-RMSE up by less than",
            f"{100 * tol.log_rmse_relative:.0f}%, perplexity up by less than {100 * tol.perplexity_relative:.0f}%.",
            "Otherwise float stays the only model."),
        _paragraph(
            "**Using it.** `python -m training export <run> --int8` runs the same measurement at export time;",
            "when the rule passes, the model folder also carries `model.int8.onnx`, listed with its sha256 in",
            "`meta.json` (verified on load like every other file) beside the full report under",
            "`quantization`, which also records the CPU the decision was made on (`cpu`: vendor, model, the",
            "flags that pick ORT's integer kernels, ORT's version, and whether ORT's u8×s8 product is exact",
            "there, probed with one saturating `MatMulInteger`) and a check batch (`check`: 8 real held-out",
            "inputs with the float graph's outputs and the int8 error on them). Serving keeps loading",
            "`model.onnx` unless `DLBOOK_PREFER_INT8=1` is set and the model ships an int8 file; then",
            "`serving.int8_guard.choose_graph` compares this CPU with the recorded one and, when they differ",
            "in any of those, re-runs the int8 graph on the check batch and keeps it only when its error to",
            "the float outputs stays within twice the export-time error (+ 0.1% of the output scale);",
            "otherwise, or when the model records no CPU or check batch, it serves float and logs one line",
            "saying why. It re-checks accuracy, not speed: a CPU unlike the recorded one may run int8 slower."),
        table(rows) + _missing(rows),
        *scheme_section(scheme_records() if records is None else records),
    ]
    return "\n\n".join(p.rstrip("\n") for p in paragraphs) + "\n"


def environment(rounds: int, threads: int) -> dict[str, Any]:
    import onnxruntime as ort

    from serving.int8_guard import cpu_record

    return {"command": " ".join(["python -m training", *(shlex.quote(a) for a in sys.argv[1:])]),
            "date": time.strftime("%Y-%m-%d"), "cpu": cpu_record(), "cpu_name": cpu_name(), "cpus": os.cpu_count(),
            "onnxruntime": ort.__version__, "threads": threads, "rounds": rounds}


def write_quantization_report(names: list[str], output: Path, rounds: int = 5, json_path: Path | None = None) -> Path:
    """Measure ``names`` and write ``output`` (docs/QUANTIZATION.md); ``json_path``: also every figure as
    a benchmark record (``loadtests.records``), into that file, or under its canonical name
    (``int8-report-<start>-<commit>.json``) when it is a folder such as ``docs/bench/``."""
    from loadtests import records

    recording = records.begin(REPORT_BENCHMARK, argv=sys.argv, config={"models": names, "rounds": rounds})
    rows = report_models(names, rounds)
    threads = rows[0]["report"]["threads"] if rows else 0
    env = environment(rounds, threads)
    path = None
    if json_path:
        record = records.build(recording, {"environment": env, "models": rows})
        path = json_path / records.file_name(record) if json_path.is_dir() else json_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        if path.resolve().is_relative_to(REPO):
            env["record"] = str(path.resolve().relative_to(REPO))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(markdown(rows, env), encoding="utf-8")
    return output


# ----- comparing quantisation schemes (issue 18) --------------------------------------------------


def _held_out_outputs(model: Any, meta: dict[str, Any], poem_feeds: dict[str, Any] | None = None) -> dict[str, Any]:
    """One graph on the held-out data: the first output on every row (images, houses) or on 256
    mid-poem steps, and the model's own metric (accuracy, log-RMSE, perplexity)."""
    import numpy as np

    from training.bench import house_holdout, house_inputs, image_inputs, image_test, model_inputs
    from training.metrics import log_rmse, mean_absolute_error
    from training.quantize import quality

    task = meta["task"]
    if task == "image":
        frames, labels = image_test(meta["training"]["dataset"])
        logits = np.concatenate([model.run(image_inputs(meta, frames[i: i + 1000]))[0]
                                 for i in range(0, len(frames), 1000)])
        return {"first": logits, "quality": {"accuracy": float((logits.argmax(1) == labels).mean()),
                                             "n": int(len(labels))}}
    if task == "price":
        records, prices = house_holdout()
        (log_price,) = model.run(house_inputs(meta, records))
        predicted = np.exp(log_price.astype(np.float64))
        return {"first": log_price, "quality": {"log_rmse": log_rmse(predicted, prices),
                                                "mae_dollars": mean_absolute_error(predicted, prices),
                                                "n": int(len(prices))}}
    feeds = poem_feeds if poem_feeds is not None else model_inputs(meta, 256, model.run)
    return {"first": model.run(feeds)[0], "quality": quality(model, meta), "feeds": feeds}


def _compare_outputs(reference: dict[str, Any], int8_model: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """Int8 against the float graph's held-out outputs (``reference``): the largest absolute difference
    of the first output (logits, log-price), how often the top-1 class agrees (images, poems), and
    both graphs' own metric."""
    import numpy as np

    from training.quantize import METRIC

    got = _held_out_outputs(int8_model, meta, reference.get("feeds"))
    f, q = reference["first"], got["first"]
    out: dict[str, Any] = {"max_abs": float(np.max(np.abs(f - q))), "rows": int(len(f)),
                           "on": {"image": "every image of the test split", "price": "the house holdout (log-price)",
                                  "poem": "256 held-out poems, the step after their first clause (float state "
                                          "feeds both)"}[meta["task"]]}
    if meta["task"] != "price":
        out["top1_agreement"] = float((f.argmax(1) == q.argmax(1)).mean())
    out.update(metric=METRIC[meta["task"]], float=reference["quality"], int8=got["quality"])
    return out


def compare_schemes(names: list[str], schemes: list[str], rounds: int = 5, timing: bool = True
                    ) -> list[dict[str, Any]]:
    """Every scheme on every model: outputs and metric against float, and (``timing``) float vs int8
    latency at the task's batch sizes; the float graph is the same for all schemes."""
    from serving.runtime import OnnxModel
    from training.quantize import (
        METRIC,
        Tolerance,
        cpu_runtime,
        decide,
        measure_speed,
        quality_change,
        quantize_file,
    )

    rows = []
    for name in names:
        tag, path, meta = stored_model(name)
        runtime = cpu_runtime()
        float_model = OnnxModel(path / "model.onnx", runtime)
        reference = _held_out_outputs(float_model, meta)
        for scheme in schemes:
            with tempfile.TemporaryDirectory() as tmp:
                target = Path(tmp) / INT8_FILE
                began = time.perf_counter()
                info = quantize_file(path / "model.onnx", target, scheme, meta)
                int8_model = OnnxModel(target, runtime)
                row = {"model": meta.get("name", name), "tag": tag, "task": meta["task"], **info,
                       "quantize_seconds": time.perf_counter() - began,
                       **_compare_outputs(reference, int8_model, meta)}
                metric = METRIC[meta["task"]]
                change, _, unit = quality_change(meta["task"], row["float"][metric], row["int8"][metric], Tolerance())
                row["change"], row["change_unit"] = change, unit
                if timing:
                    row["speed"] = measure_speed(float_model, int8_model, meta, rounds, 0.3)
                    decision = decide(meta["task"], row["float"][metric], row["int8"][metric],
                                      {int(b): s["speedup"] for b, s in row["speed"].items()})
                    row["decision"] = {"keep": decision.keep, "reasons": decision.reasons}
            rows.append(row)
            speedups = [round(s["speedup"], 2) for s in row.get("speed", {}).values()]
            print(f"  {name} {scheme}: max abs {row['max_abs']:.4g}, {metric} {row['float'][metric]:.4f} → "
                  f"{row['int8'][metric]:.4f}, speed-ups {speedups}", file=sys.stderr, flush=True)
    return rows


def write_scheme_record(names: list[str], schemes: list[str], record_dir: Path | None, rounds: int = 5,
                        timing: bool = True, emulated: str | None = None) -> dict[str, Any]:
    """``python -m training.quantize_report schemes``: the comparison as a benchmark record
    (``loadtests.records``: command, commit, machine, load; ``docs/bench/int8-schemes-*.json``)."""
    import onnxruntime as ort

    from loadtests import records
    from serving.int8_guard import cpu_record

    recording = records.begin(SCHEME_BENCHMARK, argv=sys.argv, config={
        "models": names, "schemes": schemes, "rounds": rounds if timing else 0, "timing": timing,
        # Under qemu-user, /proc/cpuinfo (so cpu.flags) is the host's; cpu.u8s8_exact and every
        # integer result are the emulated CPU's; the command ran as `qemu-x86_64 -cpu <emulated> …`.
        "emulated": emulated})
    rows = compare_schemes(names, schemes, rounds, timing)
    result = {"cpu": cpu_record(), "onnxruntime": ort.__version__, "rows": rows}
    if record_dir is not None:
        recording.record_dir = record_dir
        records.write(recording, result)
    return records.build(recording, result)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from training.bench import DEFAULT_MODELS
    from training.quantize import SCHEMES

    parser = argparse.ArgumentParser(prog="python -m training.quantize_report")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("schemes", help="every int8 scheme against float on each model → docs/bench/ record")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS))
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-timing", action="store_true", help="quality only (e.g. under an emulator)")
    p.add_argument("--emulated", help="the emulated CPU, when run under qemu-x86_64 -cpu NAME")
    p.add_argument("--record-dir", type=Path, default=REPO / "docs" / "bench",
                   help="where the record goes (default docs/bench, committed; a scratch folder for trials)")
    args = parser.parse_args(argv)
    write_scheme_record([n for n in args.models.split(",") if n], [s for s in args.schemes.split(",") if s],
                        args.record_dir, args.rounds, not args.no_timing, args.emulated)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
