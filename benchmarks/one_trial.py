"""Time one trial with the origin's hand-tuned hyperparameters (MobileNetV2, shared ImageNet weights).

Usage: python benchmarks/one_trial.py [DATA_DIR] [--size 160] [--epochs 10]
Prints the validation metrics of both stages and the wall time. Needs KERAS_HOME with the
MobileNetV2 weights, or --weights PATH.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tuner.config import FitConfig, ScanConfig, SplitConfig, TrialParams
from tuner.data import scan, split
from tuner.hypermodel import build_model
from tuner.pipeline import ImageCache
from tuner.trial import TrialData, run_two_stages


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="?", default="../shared/datasets/lfw_12people")
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--weights", default="imagenet")
    ap.add_argument("--freeze-block", type=int, default=9)  # origin: below layer 75 of 155
    args = ap.parse_args()

    scanned = scan(ScanConfig(Path(args.data)))
    split_df = split(scanned.images, SplitConfig())
    data = TrialData(split_df, scanned.classes, ImageCache(Path(args.data)))
    params = TrialParams(backbone="MobileNetV2", alpha=1.0, input_size=args.size,
                         freeze_block=args.freeze_block)  # the origin's other defaults
    cfg = FitConfig(max_epochs_stage1=args.epochs, max_epochs_stage2=args.epochs,
                    weights=args.weights)
    start = time.perf_counter()
    data.arrays("train", args.size), data.arrays("val", args.size)
    decode = time.perf_counter() - start
    model = build_model(params, len(data.classes), cfg.weights)
    result = run_two_stages(model, params, data, cfg)
    total = time.perf_counter() - start
    for h in result.history:
        print(f"stage {h['stage']} step {h['step']:>2}: val_acc {h['val_accuracy']:.4f} "
              f"val_bal_acc {h['val_balanced_accuracy']:.4f} val_loss {h['val_loss']:.4f}")
    print(json.dumps({"hyperparameters": params.to_dict(), "decode_seconds": round(decode, 1),
                      "trial_seconds": round(result.seconds, 1), "total_seconds": round(total, 1),
                      **{k: v for k, v in result.metrics().items()}}, indent=1))


if __name__ == "__main__":
    main()
