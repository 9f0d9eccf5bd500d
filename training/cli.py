"""Command line: ``python -m training COMMAND``: fetch, train, presets, summary, report, house-eval, export,
quantize-report, robustness, robustness-run, poem-eval, up."""

from __future__ import annotations

import argparse
import sys

from training.datasets.sources import DATASETS, DataMissingError


def _cmd_train(args: argparse.Namespace) -> int:
    from training.summary import format_table
    from training.train import TrainOptions, train

    summary = train(TrainOptions(
        architecture=args.architecture, preset=args.preset, dataset=args.dataset, profile=args.profile,
        seed=args.seed, epochs=args.epochs, limit=args.limit, device=args.device, resume=args.resume,
        progress=not args.no_progress, run_name=args.run_name, augment=args.augment,
    ))
    print()
    print(format_table([summary]))
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from training.recipes import RECIPES

    for recipe in RECIPES.values():
        book = ", ".join(f"{d} {v}%" for d, v in recipe.book_figures.items()) or "-"
        print(f"{recipe.architecture:10} {recipe.preset:11} {'/'.join(recipe.datasets):22} "
              f"book: {book:22} {recipe.source}")
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from training.summary import format_table, load_summaries

    summaries = load_summaries()
    if not summaries:
        print("no runs yet: python -m training train lenet --profile quick")
        return 1
    print(format_table(summaries))
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    from training.fetch import fetch

    names = args.names or list(DATASETS)
    ok = True
    for name in names:
        try:
            print(fetch(name, source=args.source, force=args.force))
        except DataMissingError as err:
            print(f"error: {err}", file=sys.stderr)
            ok = False
    return 0 if ok else 1


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from training.report import write_record, write_report

    for source in args.record or []:
        print(f"recorded {write_record(source)}")
    print(f"wrote {write_report(Path(args.output), record_runs=not args.no_record_runs)}")
    return 0


def _cmd_house_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from training.house_eval import main as house_eval

    return house_eval(args.run, args.retrain, Path(args.record), Path(args.results))


def _cmd_export(args: argparse.Namespace) -> int:
    from training.export import ExportError, export_run, resolve_runs

    try:
        runs = resolve_runs(args.runs)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not runs:
        print("error: no trained runs to export (python -m training train …)", file=sys.stderr)
        return 2
    failed = 0
    for run in runs:
        try:
            meta = export_run(run, name=args.name if len(runs) == 1 else None, store=not args.no_store,
                              int8=args.int8)
        except ExportError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
            continue
        parity = meta["parity"]
        print(f"{run.name} → {meta.get('tag', meta['name'])}  onnx {meta['files']['model.onnx']['bytes'] / 1e6:.2f} MB"
              f"  parity: torchscript {parity['torchscript']:.1e}, onnxruntime {parity['onnxruntime']:.1e}")
        if "quantization" in meta:
            decision = meta["quantization"]["decision"]
            print(f"  int8: {'kept' if decision['keep'] else 'not kept'} ({'; '.join(decision['reasons'])})")
    return 1 if failed else 0


def _cmd_quantize_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from training.quantize_report import write_quantization_report

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    path = write_quantization_report(names, Path(args.output), rounds=args.rounds,
                                     json_path=Path(args.json) if args.json else None)
    print(f"wrote {path}")
    return 0


def _cmd_robustness_run(args: argparse.Namespace) -> int:
    from training.robustness_of_run import main

    return 0 if main(args.runs, args.count, args.seed, write=not args.no_write) else 1


def _cmd_robustness(args: argparse.Namespace) -> int:
    from pathlib import Path

    from training.robustness import main

    models = [n.strip() for n in args.models.split(",") if n.strip()] if args.models else None
    records = main(args.url, args.count, args.seed, models, Path(args.records), Path(args.output),
                   write=not args.no_write)
    return 0 if records else 1


def _cmd_poem_eval(args: argparse.Namespace) -> int:
    from training.poem_sound_eval import main

    return main(args.models, args.runs, note=args.note, write=not args.no_write)


def _cmd_up(args: argparse.Namespace) -> int:
    from training.quickstart import quickstart

    return quickstart(profile=args.profile, serve=not args.no_serve, host=args.host, port=args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one preset and evaluate it on the official test split")
    p.add_argument("architecture", choices=["mlp", "lenet", "price_mlp", "poem_rnn"])
    p.add_argument("--preset", default="default", help="see `python -m training presets`")
    p.add_argument("--dataset", help="mnist, fashion-mnist, house-prices, tang300 or quantangshi")
    p.add_argument("--profile", choices=["quick", "full"], default="full")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, help="cap the number of epochs")
    p.add_argument("--limit", type=int, help="train on at most this many samples")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--resume", action="store_true", help="continue from the run's checkpoint.pt")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--run-name", help="folder name under runs/ (default: <arch>-<preset>-<dataset>)")
    p.add_argument("--augment", help="images: train with this augmentation policy instead of the preset's "
                                     "(training/tasks/image.py AUGMENTATIONS, e.g. robust_clutter)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("presets", help="list every preset, its data and the book's figure")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser("summary", help="the summary table of every finished run")
    p.set_defaults(func=_cmd_summary)

    p = sub.add_parser("fetch", help="download the data sets (checksummed) or import them from a folder")
    p.add_argument("names", nargs="*", choices=[[], *DATASETS], metavar="NAME",
                   help=f"data sets (default: all): {', '.join(DATASETS)}")
    p.add_argument("--from", dest="source", help="import from this folder instead of downloading")
    p.add_argument("--force", action="store_true", help="fetch again even if the data is present")
    p.set_defaults(func=_cmd_fetch)

    p = sub.add_parser("report", help="record finished runs in docs/records/, then write docs/RESULTS.md from them")
    p.add_argument("--output", default="docs/RESULTS.md")
    p.add_argument("--record", nargs="+", metavar="RUN",
                   help="record these first: run folder names under runs/, or training logs (docs/training-logs/*.log)")
    p.add_argument("--no-record-runs", action="store_true",
                   help="do not record the finished full-profile runs under runs/ (report from docs/records/ as is)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("house-eval", help="house prices from partial records (5, 10, 20, all fields) and the "
                                          "price range's coverage on the holdout → docs/RESULTS.md")
    p.add_argument("--run", help="run folder under runs/ (default: price_mlp-default-house-prices, trained "
                                 "first when missing)")
    p.add_argument("--retrain", action="store_true", help="train the default run again first")
    p.add_argument("--record", default="docs/records/house-eval.json")
    p.add_argument("--results", default="docs/RESULTS.md")
    p.set_defaults(func=_cmd_house_eval)

    p = sub.add_parser("export", help="ONNX + TorchScript with parity checks, into the BentoML model store")
    p.add_argument("runs", nargs="+", help="run folder names under runs/, or 'all'")
    p.add_argument("--name", help="model store name (one run only; default e.g. fashion-lenet)")
    p.add_argument("--no-store", action="store_true", help="check export and parity without saving")
    p.add_argument("--int8", action="store_true",
                   help="also ship a dynamic int8 model.int8.onnx when it is faster and as accurate "
                        "(docs/QUANTIZATION.md)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("quantize-report",
                       help="int8 vs float speed and quality per stored model → docs/QUANTIZATION.md")
    p.add_argument("--models", default="digits-mlp,fashion-lenet,house-price,tang-poem",
                   help="comma-separated model store names (name or name:version) or exported model folders")
    p.add_argument("--rounds", type=int, default=5, help="alternated float/int8 timing rounds")
    p.add_argument("--output", default="docs/QUANTIZATION.md")
    p.add_argument("--json", help="also write every figure here")
    p.set_defaults(func=_cmd_quantize_report)

    p = sub.add_parser("robustness", help="served image models on MNIST-C and photographed test images "
                                          "→ docs/records/robustness-*.json and docs/RESULTS.md")
    p.add_argument("--url", help="a running service (default: start ImageService on a free local port)")
    p.add_argument("--models", help="comma-separated model names (default: every served image model)")
    p.add_argument("--count", type=int, default=200, help="test images per condition")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--records", default="docs/records")
    p.add_argument("--output", default="docs/RESULTS.md")
    p.add_argument("--no-write", action="store_true", help="print the figures only")
    p.set_defaults(func=_cmd_robustness)

    p = sub.add_parser("robustness-run", help="training runs (PyTorch, in process) on the same robustness sets "
                                              "→ docs/records/experiments/robustness-run-*.json")
    p.add_argument("runs", nargs="+", help="run folders, or names under runs/")
    p.add_argument("--count", type=int, default=200, help="test images per condition")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="print the figures only")
    p.set_defaults(func=_cmd_robustness_run)

    p = sub.add_parser("poem-eval", help="rhyme, tones, perplexity, diversity and copying of generated poems, "
                                         "with and without constraints → docs/records/poem-sound-eval.json")
    p.add_argument("--models", nargs="+", help="model store names (default: every poem model in the store)")
    p.add_argument("--runs", nargs="+", help="run folders under runs/ as well (default when the store has none: "
                                             "every runs/poem_rnn-*)")
    p.add_argument("--note", default="", help="a line for the RESULTS.md section (e.g. which hardware trained it)")
    p.add_argument("--no-write", action="store_true", help="print the figures only")
    p.set_defaults(func=_cmd_poem_eval)

    p = sub.add_parser("up", help="get data, train what is missing, then serve (the README's first command)")
    p.add_argument("--profile", choices=["quick", "full"], default="quick")
    p.add_argument("--no-serve", action="store_true", help="stop after training and export")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 to expose it)")
    p.add_argument("--port", type=int, default=3000)
    p.set_defaults(func=_cmd_up)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DataMissingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
