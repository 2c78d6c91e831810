"""Command line: parse flags, build a config, call the Python API, print.

Nothing here computes anything; every command is a call a notebook could make. `main(argv)`
returns the exit code so tests call it directly. Errors the user can fix (`UsageError`) print
one line and exit 2; no traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

from . import __version__, quiet
from .errors import TunerError, UsageError

COMMANDS = ("search", "data", "report", "evaluate", "export", "predict", "promote", "rollback")


def _add_no_face_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-face-policy", choices=("member", "unknown", "skip"), default="member",
                   help="label of images in folders nested inside a person's folder "
                        "(face not visible): the person (member), Unknown, or left out (skip)")
    p.add_argument("--no-face-folder", action="append", default=[], dest="no_face_folders",
                   metavar="NAME",
                   help="only nested folders of this name (repeatable, any case) hold no-face "
                        "photos; other nested folders are ordinary photos of the person "
                        "(default: every nested folder)")


def _add_scan_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--unknown-name", default="Unknown",
                   help="folder of strangers (default: Unknown)")
    _add_no_face_flags(p)
    p.add_argument("--near-duplicate-distance", type=int, default=4, metavar="BITS",
                   help="perceptual-hash distance (0-64) at which two images count as near-duplicates")
    p.add_argument("--group-pattern", metavar="REGEX",
                   help="photos whose paths give the same match (its first group, if any) stay "
                        "in one split: one stranger's photos, one camera event's frames "
                        "(e.g. '^Unknown/(.+)_[0-9]+\\.jpg$')")


def _add_split_flags(p: argparse.ArgumentParser, seed: bool) -> None:
    p.add_argument("--val-fraction", type=float, default=0.16, metavar="F",
                   help="share of the photos for validation, where trials are compared "
                        "(default 0.16)")
    p.add_argument("--test-fraction", type=float, default=0.20, metavar="F",
                   help="share of the photos held out for the final report (default 0.20)")
    if seed:
        p.add_argument("--seed", type=int, default=42, help="seed of the split (default 42)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="personclf-tune",
        description="Turn a folder of photos of people into a person classifier by transfer "
                    "learning and hyperparameter search.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("data", help="scan a dataset folder and report classes, bad files, duplicates")
    p.add_argument("data_dir", type=Path, nargs="?", help="DIR/<person>/*.jpg, DIR/Unknown/*.jpg")
    # `--data DIR` as well, as `search` and `evaluate` spell it
    p.add_argument("--data", type=Path, dest="data_flag", metavar="DIR", help=argparse.SUPPRESS)
    _add_scan_flags(p)
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the summary as JSON")
    p.add_argument("--split", type=Path, metavar="FILE",
                   help="also write a train/val/test split.csv to FILE")
    _add_split_flags(p, seed=True)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("search", help="run a hyperparameter search (the default command)")
    p.add_argument("--data", type=Path, default=Path("dataset"), metavar="DIR",
                   help="dataset folder (default: ./dataset)")
    p.add_argument("--trials", type=int, default=40, help="trials to finish (default 40)")
    p.add_argument("--space", default="default", metavar="FILE",
                   help="search-space YAML, or the name of one in search_spaces/ "
                        "(default, edge, cpu-quick, quickstart)")
    p.add_argument("--backbones", default="", metavar="A,B",
                   help="restrict the space to these backbones")
    p.add_argument("--engine", choices=("optuna", "random", "bayesian", "hyperband"),
                   default="optuna",
                   help="optuna: TPE with pruning, resumable, many workers (default); the "
                        "others are KerasTuner's oracles")
    p.add_argument("--output", type=Path, metavar="RUN",
                   help="run directory (default: a new results/run-NNN); rerun to resume")
    p.add_argument("--storage", metavar="URL",
                   help="Optuna storage (e.g. postgresql://...); default: a journal file in RUN")
    p.add_argument("--study-name", metavar="NAME",
                   help="the study's name in --storage (default personclf)")
    p.add_argument("--objective", default="val_balanced_accuracy",
                   choices=("val_balanced_accuracy", "val_accuracy", "val_macro_f1"),
                   help="what trials are ranked by, on validation (default "
                        "val_balanced_accuracy: every person counts alike)")
    p.add_argument("--no-pruning", action="store_true", help="never stop a trial early")
    p.add_argument("--no-retrain", action="store_true",
                   help="skip retraining and testing the best trial (and its export)")
    p.add_argument("--no-head-refit", action="store_true",
                   help="keep the retrained best's head as stage 2 left it (default: refit it "
                        "on the tuned backbone when that raises the validation objective)")
    p.add_argument("--no-export", action="store_true",
                   help="skip exporting the best model (run `personclf-tune export RUN` later)")
    p.add_argument("--workers", type=int, default=1, metavar="K",
                   help="run K worker processes on this machine against one study "
                        "(one GPU each, round-robin, when GPUs are visible)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-cache", action="store_true",
                   help="train every trial through the whole model, decoding its images "
                        "(the naive loop; for comparisons)")
    p.add_argument("--max-failures", type=int, default=3, metavar="N",
                   help="stop after N trials in a row fail (default 3); finished trials are "
                        "kept, rerun the same command to continue")
    p.add_argument("--cache-memory-mb", type=float, default=2048, metavar="MB",
                   help="memory for cached activations; a freeze depth that needs more trains "
                        "stage 2 through the whole model")
    _add_training_flags(p)
    _add_scan_flags(p)
    _add_split_flags(p, seed=False)  # --seed is a training flag there
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("report", help="regenerate and print the tables and plots of a run")
    p.add_argument("run_dir", type=Path, nargs="?", default=None, metavar="RUN")
    p.add_argument("--storage", metavar="URL",
                   help="read the study from this storage (from any machine; no RUN needed)")
    p.add_argument("--study-name", metavar="NAME",
                   help="the study's name in --storage (default personclf)")
    p.add_argument("--output", type=Path, metavar="DIR",
                   help="where to write the tables and plots (default: RUN, or "
                        "results/<study name> with --storage alone)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("evaluate", help="run a saved model on a folder dataset and report it")
    p.add_argument("model", type=Path, help="RUN/best or RUN/best/model.keras")
    p.add_argument("--data", type=Path, required=True, metavar="DIR")
    _add_no_face_flags(p)
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON")
    p.set_defaults(func=cmd_evaluate)

    from . import deploy, export

    export.add_cli(sub)   # export RUN
    deploy.add_cli(sub)   # predict, promote, rollback
    return parser


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    from .config import FitConfig

    p.add_argument("--weights", default="imagenet", metavar="imagenet|none|PATH",
                   help="backbone weights: Keras's ImageNet download/cache (KERAS_HOME), "
                        "random init, or a local weights file")
    p.add_argument("--max-epochs", type=int, default=10, metavar="N",
                   help="epoch limit of each stage (default 10); early stopping ends sooner")
    p.add_argument("--max-epochs-stage2", type=int, metavar="N",
                   help="epoch limit of stage 2 (default: --max-epochs; 0 skips it)")
    p.add_argument("--patience", type=int, default=3, metavar="N",
                   help="stop a stage after N epochs without a better validation score "
                        "(default 3)")
    p.add_argument("--stage2-warmup-epochs", type=int, default=FitConfig.warmup_epochs_stage2,
                   metavar="N", dest="warmup_epochs_stage2",
                   help="stage 2's learning rate rises linearly from 0 over N epochs "
                        f"(default {FitConfig.warmup_epochs_stage2}; 0: full rate from the start)")
    p.add_argument("--class-weight", choices=("balanced", "max_over_count", "none"),
                   default="balanced",
                   help="loss weight of each person's photos: scikit-learn's balanced "
                        "(default), the origin's max/count, or none")
    p.add_argument("--seed", type=int, default=42,
                   help="seed of the split, the sampler and training (default 42)")
    p.add_argument("--augment-views", "--cache-views", type=int, default=4, metavar="K",
                   dest="augment_views",
                   help="augmented copies of each training image, cycled over the epochs "
                        "(default 4); the caches hold exactly these")
    p.add_argument("--mixed-precision", action="store_true", help="float16 compute (GPU)")
    p.add_argument("--jit-compile", action="store_true", help="XLA-compile training steps (GPU)")


def resolve_space(value: str) -> Path:
    """A path, or a name looked up in ./search_spaces and in the installed checkout's."""
    path = Path(value)
    if path.is_file():
        return path
    name = value if value.endswith((".yaml", ".yml")) else f"{value}.yaml"
    for folder in (Path("search_spaces"), Path(__file__).resolve().parents[1] / "search_spaces"):
        if (folder / name).is_file():
            return folder / name
    raise UsageError(f"--space {value}: no such file (and no search_spaces/{name})")


def resolve_weights(value: str) -> str | None:
    if value.lower() == "none":
        return None
    if value.lower() == "imagenet":
        return "imagenet"
    if not Path(value).is_file():
        raise UsageError(f"--weights {value}: no such file; use imagenet, none or a weights file")
    return str(Path(value).resolve())


def search_config(args: argparse.Namespace):
    """Flags -> SearchConfig (the same object a notebook would build)."""
    from .config import FitConfig, ScanConfig, SearchConfig, SplitConfig
    from .search import next_run_dir

    if not args.data.is_dir():
        raise UsageError(f"--data {args.data}: no such folder; put photos in "
                         f"{args.data}/<person>/ and {args.data}/Unknown/, or pass --data DIR")
    stage2 = args.max_epochs if args.max_epochs_stage2 is None else args.max_epochs_stage2
    fit = FitConfig(max_epochs_stage1=args.max_epochs, max_epochs_stage2=stage2,
                    patience=args.patience, class_weight=args.class_weight, seed=args.seed,
                    weights=resolve_weights(args.weights), objective=args.objective,
                    augment_views=args.augment_views,
                    warmup_epochs_stage2=args.warmup_epochs_stage2,
                    mixed_precision=args.mixed_precision,
                    jit_compile=args.jit_compile)
    scan_cfg = ScanConfig(args.data, unknown_name=args.unknown_name,
                          no_face_policy=args.no_face_policy,
                          no_face_folders=tuple(args.no_face_folders),
                          near_duplicate_distance=args.near_duplicate_distance,
                          group_pattern=args.group_pattern)
    return SearchConfig(
        data_dir=args.data, run_dir=args.output or next_run_dir(), trials=args.trials,
        space=resolve_space(args.space),
        backbones=tuple(b.strip() for b in args.backbones.split(",") if b.strip()),
        engine=args.engine, storage=args.storage, study_name=args.study_name,
        pruning=not args.no_pruning, retrain_best=not args.no_retrain,
        head_refit=not args.no_head_refit,
        workers=args.workers, fast=not args.no_cache,
        cache_memory_mb=args.cache_memory_mb, max_failures=args.max_failures, scan=scan_cfg,
        split=SplitConfig(args.val_fraction, args.test_fraction, args.seed), fit=fit)


def cmd_search(args: argparse.Namespace) -> int:
    from .report import summary_text
    from .search import run_search, run_with_local_workers

    config = search_config(args)
    if args.worker:
        print(f"worker {os.getpid()} on {config.run_dir}", flush=True)
    else:
        # Without --output every start takes a new results/run-NNN: resuming needs the name.
        resume = "the same command" if args.output else f"with --output {config.run_dir}"
        print(f"run directory: {config.run_dir}  (rerun {resume} to resume)")
    bar = _trial_bar(config.trials)

    def on_trial(row: dict) -> None:
        p = row["params"]
        alpha = f" a{p.alpha:g}" if p.alpha else ""
        value = f"{config.fit.objective}={row['value']:.4f}" if "value" in row else row["state"]
        bar.write(f"trial {row['number']:>3} {row['state']:<8} {p.backbone}{alpha}@{p.input_size} "
                  f"{value}  ({row['seconds']:.0f}s)" + (f"  {row['error']}" if row.get("error") else ""))
        bar.update(1 if row["state"] in ("COMPLETE", "PRUNED") else 0)

    try:
        if config.workers > 1 and not args.worker:
            outcome = run_with_local_workers(config, _worker_argv(args.argv, config.run_dir))
        else:
            outcome = run_search(config, on_trial=on_trial, worker=args.worker)
    finally:
        bar.close()
    if args.worker:
        return 0
    print()
    print(summary_text(outcome.trials, config.fit.objective))
    if outcome.evaluation is not None:
        from .report import format_evaluation, head_refit_text

        print(f"\nBest trial retrained, test split ({outcome.best_dir}):")
        refit = json.loads((outcome.best_dir / "manifest.json").read_text())["training"] \
            .get("head_refit")
        if refit:
            print(head_refit_text(refit))
        print(format_evaluation(outcome.evaluation))
        if not args.no_export:
            from .export import export_run

            result = export_run(config.run_dir)
            print(f"\nExported to {result.out_dir}:")
            print(result.table())
            for line in result.failures:
                print(f"warning: {line}")
    print(f"\nresults in {config.run_dir}")
    return 0


def _worker_argv(argv: list[str], run_dir: Path) -> list[str]:
    """The search flags for a local worker: the same, minus --workers, with an explicit --output."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--workers" or arg == "--output":
            skip = True
            continue
        if arg.startswith(("--workers=", "--output=")):
            continue
        out.append(arg)
    return out + ["--output", str(run_dir)]


def _trial_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="trials", unit="trial", dynamic_ncols=True,
                disable=not sys.stderr.isatty())


def cmd_report(args: argparse.Namespace) -> int:
    from .report import summary_text, write_results
    from .search import load_state

    if args.run_dir is None and args.storage is None:
        raise UsageError("report: give a run directory or --storage URL --study-name NAME")
    if args.output is not None:
        from .search import saved_data_dir

        data_dir = saved_data_dir(args.run_dir) if args.run_dir is not None else None
        _check_output("--output", args.output, data_dir, folder=True)
    engine, objective, study, trials = load_state(args.run_dir, args.storage, args.study_name)
    out_dir = args.output or args.run_dir
    if out_dir is None:  # --storage alone: never litter the working directory
        name = study.study_name if study is not None else "personclf"
        out_dir = Path("results") / re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    files = write_results(trials, out_dir, objective, study=study)
    print(summary_text(trials, objective))
    best = (args.run_dir or out_dir) / "best" / "test_report.txt"
    if best.is_file():
        print("\nBest trial retrained, test split:\n" + best.read_text())
    print("\nwrote " + ", ".join(str(p) for p in files.values()))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .best import evaluate_model
    from .data import skipped_text, write_json
    from .report import format_evaluation

    _check_output("--json", args.json, args.data)
    evaluation = evaluate_model(args.model, args.data, args.no_face_policy,
                                tuple(args.no_face_folders))
    print(format_evaluation(evaluation, title=str(args.data)))
    full_list = str(args.json) if args.json else f"`personclf-tune data {args.data}`"
    left_out = skipped_text(evaluation["skipped"], args.data, full_list)
    if left_out:
        print("\n" + left_out)
    if args.json:
        _write_output("--json", args.json, lambda: write_json(
            {k: v for k, v in evaluation.items() if k != "report_text"}, args.json))
        print(f"\nwrote {args.json}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .config import ScanConfig, SplitConfig
    from .data import format_scan_report, scan, split, split_table, write_json, write_split

    if args.data_dir and args.data_flag and args.data_dir != args.data_flag:
        raise UsageError(f"data: two dataset folders ({args.data_dir} and --data "
                         f"{args.data_flag}); give one")
    data_dir = args.data_dir or args.data_flag
    if data_dir is None:
        raise UsageError("data: give the dataset folder: personclf-tune data DIR")
    config = ScanConfig(data_dir, unknown_name=args.unknown_name,
                        no_face_policy=args.no_face_policy,
                        no_face_folders=tuple(args.no_face_folders),
                        near_duplicate_distance=args.near_duplicate_distance,
                        group_pattern=args.group_pattern)
    split_config = SplitConfig(args.val_fraction, args.test_fraction, args.seed)
    for flag, out in (("--json", args.json), ("--split", args.split)):
        _check_output(flag, out, config.data_dir)
    result = scan(config)
    print(format_scan_report(result))
    if args.json:
        _write_output("--json", args.json, lambda: write_json(result.summary(), args.json))
        print(f"\nwrote {args.json}")
    result.validate()
    if args.split:
        from tabulate import tabulate

        df = split(result.images, split_config)
        _write_output("--split", args.split, lambda: write_split(df, args.split))
        print(f"\nSplit (seed {args.seed}) written to {args.split}:")
        print(tabulate(split_table(df), headers="keys", tablefmt="github"))
    return 0


def _check_output(flag: str, path: Path | None, data_dir: Path | None,
                  folder: bool = False) -> None:
    """A report file (or `folder`) goes beside the dataset, never into it: no input file is
    ever touched (and the next scan would find the report)."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir() and not folder:
        raise UsageError(f"{flag} {path}: is a folder; give a file name")
    if folder and path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: is a file; give a folder")
    if data_dir is not None:
        from .config import refuse_inside_dataset

        refuse_inside_dataset(flag, path, data_dir)


def _write_output(flag: str, path: Path, write) -> None:
    try:
        write()
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot write it ({exc.strerror or exc})") from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `personclf-tune --trials 40` means `personclf-tune search --trials 40`, like the origin;
    # so does `personclf-tune -v --trials 40` (global -v/--verbose flags come first).
    first = 0
    while first < len(argv) and re.fullmatch(r"-v+|--verbose", argv[first]):
        first += 1
    if first == len(argv) or (argv[first] not in COMMANDS
                              and argv[first] not in ("-h", "--help", "--version")):
        argv.insert(first, "search")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv[argv.index(args.command) + 1:] if args.command in argv else []
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # TensorFlow's retracing notes are about its internals, not the user's run.
        logging.getLogger("tensorflow").setLevel(logging.ERROR)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"personclf-tune: error: {exc}", file=sys.stderr)
        return 2
    except TunerError as exc:
        print(f"personclf-tune: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("personclf-tune: interrupted; finished work is saved, rerun the same command "
              "to resume", file=sys.stderr)
        return 130


def _quiet_tensorflow() -> None:
    """TensorFlow's C++ start-up chatter hides our output; users can still raise it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    quiet.QuietTensorFlowImport.install()  # the notes it prints before its logging starts


_quiet_tensorflow()

if __name__ == "__main__":
    sys.exit(main())
