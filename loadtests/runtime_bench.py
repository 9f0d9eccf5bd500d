"""In-process runtimes: eager PyTorch vs TorchScript vs ONNX Runtime, per model and batch size.

    python loadtests/runtime_bench.py [--rounds 3] [--models digits-mlp,…] [--batches 1,8,64,256]
        [--poem-batches 1,4,16,64] [--threads N] [--markdown PATH] [--json PATH] [--quick]

Every default exported model is loaded from the BentoML store (``$BENTOML_HOME``) and verified as
serving verifies it. Contenders per model:
- ``eager``: the model class rebuilt from ``meta.json`` with the TorchScript file's weights (the
  exported weights, whatever happened to ``runs/`` since);
- ``torchscript``: ``model.ts`` as exported;
- ``ort-cpu``: ``model.onnx`` through ``serving.runtime.OnnxModel`` on the CPU provider;
- ``ort-cuda``: the same on the CUDA provider, only when NVML finds a GPU (skipped otherwise); its
  latency includes the host↔device copies, since serving feeds numpy arrays.
The poem model is timed as its serving graph, one decoding step ``(token[B], hidden) → (logits,
hidden)``, fed mid-poem: held-out poems after 8 real tokens, with the state reached on them.

Inputs are real held-out rows prepared by the preprocessing serving applies (``training.bench``).
Before timing, every contender's output is checked against ``ort-cpu`` on the same feed.

Timing: warm-up calls, then ``--rounds`` rounds in which the contenders take turns (rotating who goes
first), each running calls for ``--seconds``. Per cell: the median across rounds of each round's
median latency per call; the p99 of every call of every round; throughput (batch × calls ÷ time in
calls, per round, median across rounds: unlike the median latency it includes stalls); the speed-up
against eager (eager / this median latency within each round, median across rounds: a slow spell of
the machine hits both sides of a pair); and the spread of the round medians ((slowest − fastest) /
median). Torch and ORT get the same intra-op thread count (``--threads``, default serving's
``DLBOOK_ORT_INTRA_THREADS`` or one per CPU). Each invocation but ``--quick`` writes its record to
``docs/bench/`` (``--record-dir``, which a quick run honours too; see :mod:`loadtests.records`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests import records  # noqa: E402
from models import build_model  # noqa: E402
from serving.model_store import ExportedModel, load_exported  # noqa: E402
from serving.runtime import OnnxModel, RuntimeConfig, gpu_present  # noqa: E402
from training.bench import DEFAULT_MODELS, alternate, cpu_name, model_inputs, resolve_threads  # noqa: E402
from training.export import LSTMPoemStep, PoemStep  # noqa: E402

FEED_FORWARD_BATCHES = (1, 8, 64, 256)
POEM_BATCHES = (1, 4, 16, 64)
QUICK_BATCHES = {"feed_forward": [1, 64], "poem": [1, 16]}  # --quick without --batches / --poem-batches
AGREEMENT = 1e-3  # max abs difference of any contender's first output against ort-cpu


@dataclasses.dataclass(frozen=True)
class Settings:
    rounds: int = 3
    seconds: float = 0.4  # per contender per round
    warmup: int = 10
    min_calls: int = 5
    threads: int = 1

    @classmethod
    def quick(cls, threads: int) -> Settings:
        return cls(rounds=2, seconds=0.002, warmup=2, min_calls=2, threads=threads)


Call = Callable[[], object]


def eager_module(exported: ExportedModel, scripted: torch.jit.ScriptModule) -> torch.nn.Module:
    """The Python model class with the exported weights, wrapped as the exported graph is."""
    meta = exported.meta
    model = build_model(meta["architecture"], meta["config"]).eval()
    if meta["task"] == "poem":
        model = (LSTMPoemStep if meta["config"].get("cell") == "lstm" else PoemStep)(model).eval()
    model.load_state_dict(scripted.state_dict(), strict=True)
    return model


def torch_call(module: torch.nn.Module, feeds: dict[str, np.ndarray]) -> tuple[Call, Callable[[], np.ndarray]]:
    """A timed call (tensors prepared once, zero-copy) and a function giving its first output."""
    args = [torch.from_numpy(v) for v in feeds.values()]

    def call() -> object:
        with torch.inference_mode():
            return module(*args)

    def first() -> np.ndarray:
        out = call()
        return (out[0] if isinstance(out, tuple) else out).numpy()

    return call, first


def ort_call(onnx: OnnxModel, feeds: dict[str, np.ndarray]) -> tuple[Call, Callable[[], np.ndarray]]:
    return (lambda: onnx.run(feeds)), (lambda: onnx.run(feeds)[0])


@dataclasses.dataclass
class Contenders:
    """Everything loaded once per model; ``calls(feeds)`` builds the timed calls for one batch."""

    exported: ExportedModel
    eager: torch.nn.Module
    scripted: torch.jit.ScriptModule
    cuda: OnnxModel | None

    def calls(self, feeds: dict[str, np.ndarray]) -> dict[str, tuple[Call, Callable[[], np.ndarray]]]:
        calls = {"eager": torch_call(self.eager, feeds), "torchscript": torch_call(self.scripted, feeds),
                 "ort-cpu": ort_call(self.exported.session, feeds)}
        if self.cuda is not None:
            calls["ort-cuda"] = ort_call(self.cuda, feeds)
        return calls


def load_contenders(name: str, runtime: RuntimeConfig) -> Contenders:
    exported = load_exported(name, dataclasses.replace(runtime, prefer_cuda=False))
    scripted = torch.jit.load(str(exported.path / "model.ts")).eval()
    cuda = None
    if gpu_present():
        candidate = OnnxModel(exported.graph, dataclasses.replace(runtime, prefer_cuda=True))
        cuda = candidate if candidate.provider == "CUDAExecutionProvider" else None
    return Contenders(exported, eager_module(exported, scripted), scripted, cuda)


def check_agreement(name: str, batch: int, calls: dict[str, tuple[Call, Callable[[], np.ndarray]]]) -> None:
    reference = calls["ort-cpu"][1]()
    for runtime, (_, first) in calls.items():
        worst = float(np.max(np.abs(first() - reference)))
        if not worst <= AGREEMENT:
            raise SystemExit(f"{name} batch {batch}: {runtime} differs from ort-cpu by {worst:.3g} > {AGREEMENT:g}")


def bench_model(name: str, batches: dict[str, list[int]], settings: Settings, runtime: RuntimeConfig
                ) -> list[dict[str, Any]]:
    """Every batch size of one model (``batches`` by task: the poem step graph has its own sizes)."""
    contenders = load_contenders(name, runtime)
    meta = contenders.exported.meta
    poem = meta["task"] == "poem"
    step = contenders.exported.session.run if poem else None
    rows = []
    for batch in batches["poem" if poem else "feed_forward"]:
        feeds = model_inputs(meta, batch, step)
        calls = contenders.calls(feeds)
        check_agreement(name, batch, calls)
        timings = alternate({k: c for k, (c, _) in calls.items()}, batch, settings.rounds, settings.seconds,
                            settings.warmup, settings.min_calls)
        eager = timings["eager"].round_medians
        for runtime_name, timing in timings.items():
            # paired within each round (the contenders ran back to back), then the median over rounds
            vs_eager = statistics.median(e / t for e, t in zip(eager, timing.round_medians, strict=True))
            rows.append({"model": name, "task": meta["task"], "onnx_file": contenders.exported.graph.name,
                         "batch": batch, "runtime": runtime_name, **timing.to_dict(), "vs_eager": vs_eager})
        print(f"  {name} batch {batch}: " + ", ".join(
            f"{k} {1e3 * t.median:.3f} ms" for k, t in timings.items()), file=sys.stderr, flush=True)
    return rows


def environment(settings: Settings, runtime: RuntimeConfig, cuda_note: str) -> dict[str, Any]:
    import onnxruntime as ort

    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "cpu": cpu_name(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "onnxruntime": ort.__version__,
        "threads": {"torch_intra_op": torch.get_num_threads(), "ort_intra_op": runtime.intra_op_threads,
                    "ort_inter_op": runtime.inter_op_threads, "ort_optimisation": runtime.optimisation},
        "rounds": settings.rounds, "seconds_per_block": settings.seconds, "warmup_calls": settings.warmup,
        "ort_cuda": cuda_note,
    }


def markdown(env: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    threads = env["threads"]
    lines = [
        f"{env['date']}, {env['cpu']} ({env['cpus']} CPUs), torch {env['torch']}, onnxruntime {env['onnxruntime']}; "
        f"intra-op threads: torch {threads['torch_intra_op']}, ORT {threads['ort_intra_op']} "
        f"(ORT graph optimisation `{threads['ort_optimisation']}`); {env['rounds']} alternated rounds of "
        f"{env['seconds_per_block']:g} s per contender after {env['warmup_calls']} warm-up calls; "
        f"ORT CUDA: {env['ort_cuda']}.",
        "",
        "| model | batch | runtime | median ms/call | p99 ms/call | samples/s | speed-up vs eager | spread |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['runtime']} | {r['median_ms']:.3f} | {r['p99_ms']:.3f} | "
                     f"{r['samples_per_s']:,.0f} | {r['vs_eager']:.2f}× | {100 * r['spread']:.0f}% |")
    return "\n".join(lines) + "\n"


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected comma-separated positive integers")
    return values


def _csv(values: tuple[int, ...]) -> str:
    return ",".join(map(str, values))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model store names")
    parser.add_argument("--batches", type=_ints,
                        help=f"batch sizes of the feed-forward models (default {_csv(FEED_FORWARD_BATCHES)})")
    parser.add_argument("--poem-batches", type=_ints,
                        help=f"batch sizes (live sequences) of the poem step graph (default {_csv(POEM_BATCHES)})")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds (at least 2)")
    parser.add_argument("--seconds", type=float, default=Settings.seconds,
                        help="timed seconds per contender per round")
    parser.add_argument("--threads", type=int, help="intra-op threads for torch and ORT alike")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of seconds: 2 rounds of a few calls, batches 1 and 64 (poem: 1 and 16) "
                             "unless given")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--json", type=Path, help="write every figure (and each round's median) here")
    records.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick and args.record_dir == records.RECORD_DIR:
        args.no_record = True  # a smoke run is no measurement: never into docs/bench
    recording = records.begin("runtime", args, argv=[sys.argv[0] if argv is None else __file__,
                                                     *(sys.argv[1:] if argv is None else argv)])
    if args.rounds < 2:
        raise SystemExit("--rounds must be at least 2: one round cannot show how much the machine moved")
    threads = resolve_threads(args.threads)
    torch.set_num_threads(threads)
    runtime = dataclasses.replace(RuntimeConfig.from_env(), intra_op_threads=threads)
    settings = (Settings.quick(threads) if args.quick else
                Settings(rounds=args.rounds, seconds=args.seconds, threads=threads))
    defaults = QUICK_BATCHES if args.quick else {"feed_forward": list(FEED_FORWARD_BATCHES),
                                                 "poem": list(POEM_BATCHES)}
    batches = {"feed_forward": args.batches or defaults["feed_forward"], "poem": args.poem_batches or defaults["poem"]}
    rows: list[dict[str, Any]] = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        rows += bench_model(name, batches, settings, runtime)
    if not gpu_present():
        cuda_note = "skipped (NVML finds no GPU)"
    elif any(r["runtime"] == "ort-cuda" for r in rows):
        cuda_note = "timed (latency includes host-device copies)"
    else:
        cuda_note = "skipped (ORT could not create a CUDA session)"
    env = environment(settings, runtime, cuda_note)
    table = markdown(env, rows)
    print(table)
    if args.markdown:
        args.markdown.write_text(table, encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "cells": rows}, indent=2), encoding="utf-8")
    records.write(recording, {"environment": env, "cells": rows,
                              "models": records.model_versions(sorted({r["model"] for r in rows}))})
    bad = [r for r in rows if not all(math.isfinite(r[k]) and r[k] > 0 for k in ("median_ms", "p99_ms"))]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
