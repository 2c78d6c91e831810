"""Benchmark: the same search twice, naive and fast, in one invocation.

naive: no caches (every trial decodes its images), both stages train through the whole
model every epoch, no pruning. fast: decoded-image cache, stage-1 features and stage-2
activations at the freeze point cached (tuner.features), pruning (including between the
stages). With --cache-only-too, a third run, cache_only: the caches without pruning, so
the same trials complete in both and the caches' own speed and accuracy show apart from
pruning's. Same seed, space, data and trial count. Each mode runs in its
own process so peak memory is measured per mode.

    python benchmarks/search_speed.py [--data DIR] [--trials 8] [--max-epochs 5] [--cache-only-too]

Writes results/bench/search_speed.md and results/bench/search_speed.json:
{"naive": {"seconds", "best_val_balanced_accuracy", "rss_mb": [...], "trials_per_hour"},
 "fast": {...}, "ratio"}, and keeps each mode's run directory without its caches in
results/bench/runs/MODE (`replay_pruning.py results/bench/runs/naive` replays pruning rules
on the naive study). Needs MobileNetV2 ImageNet weights (KERAS_HOME or --weights).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROCESS_START = time.time()
HERE = Path(__file__).resolve().parent
MODES = ("naive", "fast", "cache_only")
REPO = HERE.parent


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    kb = lambda k: float(fields.get(k, "0 kB").split()[0]) / 1024  # noqa: E731
    return kb("VmRSS"), kb("VmHWM")


SIMD_FLAGS = {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile"}


def machine() -> dict:
    """Which CPU ran the benchmark, as far as the ratio depends on it: its model, the cores this
    process may use, and the vector extensions that decide TensorFlow's kernels (oneDNN turns
    itself on only with AVX-512 VNNI or BF16, AVX-VNNI or AMX)."""
    from tuner.workers import usable_cpus

    info = {"cpu": platform.processor() or platform.machine(), "cpus": usable_cpus()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    if model:
        info["cpu"] = model.group(1).strip()
    if flags:
        info["simd"] = sorted(set(flags.group(1).split()) & SIMD_FLAGS)
    return info


def _describe(info: dict) -> str:
    simd = f" ({' '.join(info['simd'])})" if info.get("simd") else ""
    return f"{info['cpu']}, {info['cpus']} CPUs{simd}"


def run_mode(args) -> dict:
    """One search in this process; returns its measurements."""
    from tuner.quiet import QuietTensorFlowImport

    QuietTensorFlowImport.install()  # TensorFlow's start-up notes, filtered as the CLI does
    # ... and, as the CLI does, its notes that a long search traces many train and predict
    # functions: each trial builds a new model, so each trial traces its own.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    from tuner.best import runtime_versions
    from tuner.config import FitConfig, SearchConfig, SplitConfig
    from tuner.search import run_search

    fast = args.mode in ("fast", "cache_only")
    config = SearchConfig(
        data_dir=Path(args.data), run_dir=Path(args.run_dir), trials=args.trials,
        space=Path(args.space), pruning=args.mode == "fast", retrain_best=False, fast=fast,
        split=SplitConfig(seed=args.seed),
        fit=FitConfig(max_epochs_stage1=args.max_epochs, max_epochs_stage2=args.max_epochs,
                      patience=args.patience, seed=args.seed, weights=args.weights))
    rss, peaks, states, rows = [], [], [], []

    def on_trial(row: dict) -> None:
        current, peak = rss_mb()
        rss.append(round(current, 1))
        peaks.append(round(peak, 1))
        states.append(row["state"])
        rows.append({**{k: v for k, v in row.items() if isinstance(v, (int, float, str))},
                     # the best epoch's validation metrics (loss included): the modes compare
                     # trial for trial on more than the objective
                     **{k: v for k, v in row.get("metrics", {}).items() if k.startswith("val_")}})
        print(f"[{args.mode}] trial {row['number']} {row['state']} "
              f"{row.get('value', float('nan')):.4f} {row['seconds']:.0f}s rss {current:.0f} MiB",
              flush=True)

    # The clock starts after TensorFlow and Keras are imported (5-8 s here): both modes
    # pay it once per process, and it is not search work. The child's whole wall time,
    # imports included, is recorded too ("process_seconds").
    import tuner.trial  # noqa: F401

    start, cpu_start = time.perf_counter(), time.process_time()
    outcome = run_search(config, on_trial=on_trial)
    seconds = time.perf_counter() - start
    # CPU seconds of this process: less sensitive than wall time to other load on a shared
    # machine, which moves wall times here by 10-25% between identical runs.
    cpu_seconds = time.process_time() - cpu_start
    done = outcome.trials[outcome.trials["state"] == "COMPLETE"]
    return {"seconds": round(seconds, 1),
            "process_seconds": round(time.time() - PROCESS_START, 1),
            "cpu_seconds": round(cpu_seconds, 1),
            "trials": len(states), "states": states,
            "trials_per_hour": round(len(states) / seconds * 3600, 1),
            "best_val_balanced_accuracy": float(done["val_balanced_accuracy"].max()),
            "rss_mb": rss, "peak_rss_mb": peaks, "trial_rows": rows,
            # Every training setting the trials ran with, defaults included (the warmup, the
            # augmented copies): what a later reader needs to compare runs of different code.
            "fit": dataclasses.asdict(config.fit),
            # ... and what ran them: oneDNN's kernels round differently from TensorFlow's own,
            # so trial values compare only between runs with the same kernels.
            "versions": runtime_versions()}


def keep_run(run_dir: Path, dest: Path) -> None:
    """Keep a mode's run directory, less its caches (hundreds of MB): its study holds every
    trial's metric at every epoch, which `replay_pruning.py` replays rules on."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("cache"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared/datasets/lfw_12people"))
    ap.add_argument("--space", default=str(HERE / "bench_space.yaml"))
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--max-epochs", type=int, default=5)
    ap.add_argument("--patience", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--weights", default="imagenet")
    ap.add_argument("--out", default=str(REPO / "results/bench"))
    ap.add_argument("--cache-only-too", action="store_true",
                    help="also run the caches without pruning (a third search)")
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.mode:  # a child process: one mode
        Path(args.result).write_text(json.dumps(run_mode(args)))
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        modes = MODES if args.cache_only_too else MODES[:2]
        for mode in modes:
            result_file = Path(tmp) / f"{mode}.json"
            cmd = [sys.executable, __file__, "--mode", mode, "--run-dir", str(Path(tmp) / mode),
                   "--result", str(result_file), "--data", args.data, "--space", args.space,
                   "--trials", str(args.trials), "--max-epochs", str(args.max_epochs),
                   "--patience", str(args.patience), "--seed", str(args.seed),
                   "--weights", args.weights]
            subprocess.run(cmd, check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
            results[mode] = json.loads(result_file.read_text())
            keep_run(Path(tmp) / mode, out / "runs" / mode)
    naive, fast = results["naive"], results["fast"]
    results["ratio"] = round(fast["trials_per_hour"] / naive["trials_per_hour"], 2)
    # The same ratio with each process's imports and start-up counted (same trial count).
    results["ratio_with_imports"] = round(naive["process_seconds"] / fast["process_seconds"], 2)
    results["cpu_ratio"] = round(naive["cpu_seconds"] / fast["cpu_seconds"], 2)
    results["accuracy_gap_points"] = round(
        100 * (naive["best_val_balanced_accuracy"] - fast["best_val_balanced_accuracy"]), 2)
    growth = {m: round(results[m]["peak_rss_mb"][-1] / results[m]["peak_rss_mb"][1] - 1, 3)
              for m in modes if len(results[m]["peak_rss_mb"]) > 1}
    results["peak_rss_growth_after_2nd_trial"] = growth
    if "cache_only" in results:
        only = results["cache_only"]
        results["cache_only_ratio"] = round(only["trials_per_hour"] / naive["trials_per_hour"], 2)
        results["cache_only_gap_points"] = round(
            100 * (naive["best_val_balanced_accuracy"] - only["best_val_balanced_accuracy"]), 2)
    results["config"] = {k: getattr(args, k) for k in
                         ("data", "space", "trials", "max_epochs", "patience", "seed", "weights")}
    results["config"]["fit"] = fast["fit"]
    results["config"]["versions"] = fast["versions"]
    results["config"]["machine"] = machine()
    from tabulate import tabulate

    rows = [[m, r["seconds"], r["trials_per_hour"], f"{r['best_val_balanced_accuracy']:.4f}",
             r["peak_rss_mb"][1] if len(r["peak_rss_mb"]) > 1 else "-", r["peak_rss_mb"][-1],
             " ".join(s[0] for s in r["states"])]
            for m, r in ((m, results[m]) for m in modes)]
    if "cache_only" in results:
        text_extra = (f"caches alone, no pruning: {results['cache_only_ratio']}x, gap "
                      f"{results['cache_only_gap_points']} points\n")
    else:
        text_extra = ""
    table = tabulate(rows, headers=["mode", "wall s", "trials/h", "best val bal. acc",
                                    "peak RSS MiB after trial 2", "after last", "states"],
                     tablefmt="github")
    text = (f"{table}\n\nspeed ratio (fast/naive trials per hour): {results['ratio']}x "
            f"({results['ratio_with_imports']}x counting each process's imports; "
            f"{results['cpu_ratio']}x in CPU seconds); "
            f"accuracy gap: {results['accuracy_gap_points']} points; peak RSS growth after "
            f"trial 2: {growth}; oneDNN kernels "
            f"{'on' if fast['versions']['onednn'] else 'off'}\n{text_extra}"
            f"machine: {_describe(results['config']['machine'])}\n")
    print(text)
    (out / "search_speed.md").write_text(text)
    (out / "search_speed.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
