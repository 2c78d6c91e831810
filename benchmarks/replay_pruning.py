"""Replay pruning rules on a search that ran without pruning, to see what each would stop.

A search without pruning (the benchmark's naive or `cache_only` mode, which the benchmark
keeps in `results/bench/runs/`, or `personclf-tune --no-pruning`) holds every trial's
validation metric at every step. This first prints how well each step ranks the trials
(Spearman of each trial's best so far against its final value: what a rule judging there
has to go on), then replays the trials in order against each rule and prints which trials
it would stop, at which step, where they finished without pruning, and whether the best
trial survives. The replay is exact only up to the first trial a rule stops: a real
search's sampler then sees other results and suggests other trials.

    python benchmarks/replay_pruning.py RUN [--stage1-epochs 5] [--stage2-epochs 5]
        [--stage2-warmup-epochs 1]

Rules: `search` (the search's own pruner for those settings, `PruningRule.for_fit`);
`second_epoch` (the search's rule as it was before stage 2's third epoch became the first it
judges: from the second); `below_worst` (the search's rule before stage 2 had a warmup:
between the stages it stopped every trial whose stage-1 best was below every completed
trial's); `percentile` (the rule before that, Optuna's PercentilePruner(75,
n_startup_trials=4, n_warmup_steps=1): below the bottom quartile of earlier completed trials
at the same step, from step 1); `stage2` (the search's stage-2 rule alone, nothing stopped
between the stages).
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

STARTUP, WARMUP = 4, 1  # the replaced PercentilePruner's


# Changes to the search's rule; "percentile" is not one (`stops`).
RULES = {"search": {}, "second_epoch": {"stage2_skip_epochs": 1},
         "below_worst": {"boundary_fraction": 1.0, "stage2_skip_epochs": 1},
         "stage2": {"boundary_fraction": 0.0}}


def stops(rule: str, history: dict[int, float], done: list[dict[int, float]], step: int,
          search_rule) -> bool:
    """Whether `rule` stops a trial with `history` (step -> value) at `step`, given the
    search's own rule (a `PruningRule`)."""
    if rule in RULES:
        return dataclasses.replace(search_rule, **RULES[rule]).stops(history, done, step)
    if len(done) < STARTUP or step < WARMUP:
        return False
    at = [d[step] for d in done if step in d]
    best = max(v for s, v in history.items() if s <= step)
    return bool(at) and best < np.percentile(at, 25)


def rank_agreement(trials, values) -> list[tuple[int, int, float]]:
    """(step, trials, Spearman rho) of each trial's best value so far at that step against its
    final value: how well a rule judging at that step can tell the trials apart."""
    from scipy.stats import spearmanr

    rows = []
    for step in sorted({s for t in trials for s in t.intermediate_values}):
        pairs = [(max(v for s, v in t.intermediate_values.items() if s <= step), final)
                 for t, final in zip(trials, values)
                 if any(s <= step for s in t.intermediate_values)]
        so_far, final = zip(*pairs)
        rows.append((step, len(pairs), float(spearmanr(so_far, final)[0])))
    return rows


def main() -> None:
    import optuna

    from tuner.config import FitConfig
    from tuner.pruning import PruningRule
    from tuner.storage import open_storage

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="run directory of a search without pruning")
    ap.add_argument("--stage1-epochs", type=int, default=5, help="--max-epochs of stage 1")
    ap.add_argument("--stage2-epochs", type=int, default=5, help="stage 2's epochs")
    ap.add_argument("--stage2-warmup-epochs", type=int, default=FitConfig.warmup_epochs_stage2)
    ap.add_argument("--study-name", default="personclf")
    args = ap.parse_args()
    search_rule = PruningRule.for_fit(FitConfig(
        max_epochs_stage1=args.stage1_epochs, max_epochs_stage2=args.stage2_epochs,
        warmup_epochs_stage2=args.stage2_warmup_epochs))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=args.study_name,
                              storage=open_storage(f"journal:{args.run / 'study.journal'}"))
    trials = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    values = [t.value for t in trials]
    best = int(np.argmax(values))
    print(f"{len(trials)} complete trials; best: trial {trials[best].number} {values[best]:.4f}")
    print("rank agreement of each step's best so far with the final value (Spearman):")
    for step, n, rho in rank_agreement(trials, values):
        stage = 1 if step < args.stage1_epochs else 2
        print(f"  step {step} (stage {stage}): {rho:+.2f} over {n} trials")
    place = {t.number: 1 + sum(v > value for v in values) for t, value in zip(trials, values)}
    for rule in ("search", "second_epoch", "below_worst", "percentile", "stage2"):
        done, stopped = [], []
        for t in trials:
            history = dict(t.intermediate_values)
            step = next((s for s in sorted(history)
                         if stops(rule, history, done, s, search_rule)), None)
            if step is None:
                done.append(history)
            else:
                stopped.append((t.number, step))
        kept = [v for t, v in zip(trials, values) if t.number not in dict(stopped)]
        places = [place[number] for number, _ in stopped]
        print(f"{rule:12s} stops (trial, step) {stopped}; best kept: "
              f"{trials[best].number not in dict(stopped)}; best found {max(kept):.4f}; "
              f"their places without pruning {places} of {len(trials)}")


if __name__ == "__main__":
    main()
