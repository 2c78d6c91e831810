"""Results of a search and of the retrained best model, as files, tables and plots.

Everything here is a pure function of a trials DataFrame (one row per trial, written by the
search driver) or of predictions, so the report can be rebuilt from `RUN/trials.csv` alone and
tested without TensorFlow. Tables are tabulate ("github" in .md files); plots use matplotlib's
Agg canvas through `Figure` objects (no pyplot, so no global backend state and nothing left
open). Every file is written under a temporary name and renamed into place.

Metrics come from scikit-learn, computed the same way as the per-epoch validation metrics in
`tuner.trial.score`, so a test number and a validation number mean the same thing.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
)
from tabulate import tabulate

from .errors import UsageError

log = logging.getLogger(__name__)

#: The hyperparameter columns of the trials table (the fields of `TrialParams`).
PARAM_COLUMNS: list[str] = [
    "backbone", "input_size", "alpha", "dense_units", "dropout", "l2", "label_smoothing",
    "lr_stage1", "lr_stage2", "freeze_block", "augment", "batch_size",
]
#: Validation metrics recorded per trial (the best step of the trial).
METRIC_COLUMNS: list[str] = ["val_accuracy", "val_balanced_accuracy", "val_macro_f1", "val_loss"]
#: Bookkeeping columns of the trials table, after the parameters and metrics.
RUN_COLUMNS: list[str] = ["stage1_best", "stage2_best", "epochs_stage1", "epochs_stage2",
                          "seconds", "params", "error"]
TRIAL_COLUMNS: list[str] = ["number", "state", "value", *PARAM_COLUMNS, *METRIC_COLUMNS,
                            *RUN_COLUMNS]

COMPLETE, PRUNED, FAIL = "COMPLETE", "PRUNED", "FAIL"
FINISHED = (COMPLETE, PRUNED, FAIL)
STATES = (COMPLETE, PRUNED, FAIL, "RUNNING", "WAITING")
DEFAULT_OBJECTIVE = "val_balanced_accuracy"
MIN_TRIALS_FOR_IMPORTANCE = 3  # the rank-correlation fallback needs at least this many


# -- trials table ---------------------------------------------------------------------------


def write_trials_csv(df: pd.DataFrame, path) -> None:
    """Write the trials table (known columns first, sorted by trial number) atomically."""
    df = _ordered(df)
    if "number" in df.columns:
        df = df.sort_values("number", kind="stable")
    for name in ("number", "epochs_stage1", "epochs_stage2", "params"):
        # Counts stay whole numbers when a failed trial leaves blanks in their column.
        if name in df.columns:
            values = pd.to_numeric(df[name], errors="coerce")
            if values.notna().any() and (values.dropna() % 1 == 0).all():
                df = df.assign(**{name: values.astype("Int64")})
    _atomic(Path(path), lambda tmp: df.to_csv(tmp, index=False))


def leaderboard(df: pd.DataFrame, objective: str = DEFAULT_OBJECTIVE, top: int | None = 10
                ) -> pd.DataFrame:
    """Completed trials with a finite objective, best first (ties: earlier trial first).

    Pruned and failed trials never rank: their numbers are partial or missing.
    """
    done = _complete(df, objective)
    done = done.assign(_score=_objective(done, objective))
    done = done.sort_values(["_score", "number"], ascending=[_ascending(objective), True],
                            kind="stable")
    if top is not None:
        done = done.head(top)
    metrics = [objective] + [m for m in METRIC_COLUMNS if m != objective]
    wanted = ["number", *metrics, *PARAM_COLUMNS,
              "epochs_stage1", "epochs_stage2", "params", "seconds"]
    out = done.assign(**{objective: done["_score"]})
    out = out[[c for c in wanted if c in out.columns]].reset_index(drop=True)
    out.insert(0, "rank", range(1, len(out) + 1))
    return out


def backbone_table(df: pd.DataFrame, objective: str = DEFAULT_OBJECTIVE) -> pd.DataFrame:
    """The best completed trial of each backbone side by side, best backbone first.

    Backbones whose trials never completed are kept (at the bottom, metrics empty): that they
    always failed or were pruned is itself worth seeing. `mean_seconds` averages every finished
    trial (complete, pruned or failed) because that is what a trial of that backbone costs.
    """
    metrics = list(dict.fromkeys([objective, "val_accuracy", "val_balanced_accuracy",
                                  "val_macro_f1"]))
    columns = ["backbone", "best_trial", *metrics, "params", "mean_seconds",
               "complete", "pruned", "failed", "trials"]
    if df.empty or "backbone" not in df.columns:
        return pd.DataFrame(columns=columns)
    best = leaderboard(df, objective, top=None).drop_duplicates("backbone", keep="first")
    best = best.set_index("backbone")
    rows = []
    for name, group in df.groupby("backbone", sort=True):
        state = group["state"].astype(str)
        seconds = pd.Series(np.nan, index=group.index)
        if "seconds" in group.columns:
            seconds = pd.to_numeric(group["seconds"], errors="coerce")
        seconds = seconds[state.isin(FINISHED)]
        row = {"backbone": name, "best_trial": None}
        if name in best.index:
            b = best.loc[name]
            row["best_trial"] = int(b["number"])
            row.update({col: b.get(col, np.nan) for col in [*metrics, "params"]})
        row.update(
            mean_seconds=float(seconds.mean()) if seconds.notna().any() else np.nan,
            complete=int((state == COMPLETE).sum()), pruned=int((state == PRUNED).sum()),
            failed=int((state == FAIL).sum()), trials=int(len(group)),
        )
        rows.append(row)
    out = pd.DataFrame(rows).reindex(columns=columns)
    out["_has"] = out["best_trial"].notna()
    out = out.sort_values(["_has", objective, "backbone"],
                          ascending=[False, _ascending(objective), True],
                          na_position="last", kind="stable")
    out = out.drop(columns="_has").reset_index(drop=True)
    out["best_trial"] = out["best_trial"].astype("Int64")
    return out


def markdown_table(frame: pd.DataFrame, floatfmt: str = ".4f") -> str:
    """A github-flavoured Markdown table of `frame`.

    `floatfmt` is for metrics; whole-number columns (counts, sizes) print without decimals,
    and columns of small values (learning rates, L2) in scientific notation, so that 5e-05
    does not print as 0.0001. Missing values print as "-".
    """
    return _table(frame, "github", floatfmt)


def state_counts(df: pd.DataFrame) -> dict[str, int]:
    """Number of trials in each state, known states in a fixed order, unknown ones after."""
    if df.empty or "state" not in df.columns:
        return {}
    counts = df["state"].astype(str).value_counts()
    order = [s for s in STATES if s in counts.index] + sorted(set(counts.index) - set(STATES))
    return {s: int(counts[s]) for s in order}


def summary_text(df: pd.DataFrame, objective: str = DEFAULT_OBJECTIVE, top: int = 5) -> str:
    """What the CLI prints at the end of a search: counts, backbones, the top trials."""
    if df.empty:
        return "No trials recorded."
    counts = state_counts(df)
    parts = _counts_text(counts)
    lines = [f"Trials: {len(df)} ({parts}); objective {objective}"]
    board = leaderboard(df, objective, top=top)
    if board.empty:
        lines.append("No trial completed: nothing to rank.")
    else:
        best = board.iloc[0]
        lines.append(f"Best trial #{int(best['number'])} ({best['backbone']}): "
                     f"{objective} {best[objective]:.4f}")
        lines += ["", "Backbones:", _table(backbone_table(df, objective), "simple", ".4f"),
                  "", f"Top {len(board)}:", _table(_compact(board, objective), "simple", ".4f")]
    lines += _failure_lines(df)
    return "\n".join(lines)


def head_refit_text(refit: dict) -> str:
    """One line on the retrain's stage 3 (`trial.refit_head`), from the manifest's record."""
    line = f"Head refit on the tuned backbone: {refit['objective']} {refit['before']:.4f}"
    if refit["kept"]:
        return (f"{line} -> {refit['after']:.4f} (kept: {refit['features']} features, "
                f"{refit['epochs']} epochs, {refit['seconds']:.0f} s)")
    return f"{line}; no refit beat it, stage 2's head kept ({refit['seconds']:.0f} s)"


# -- result files ---------------------------------------------------------------------------


def write_results(df: pd.DataFrame, run_dir, objective: str = DEFAULT_OBJECTIVE,
                  study=None) -> dict[str, Path]:
    """Write trials.csv, leaderboard.md, backbones.md, history.png and importances.png.

    Returns the paths written, by name ("trials", "leaderboard", "backbones", "history",
    "importances"). Importances come from Optuna when `study` allows it, else from a rough
    rank-correlation fallback, else they are skipped; leaderboard.md says which. A plot that
    cannot be drawn is logged and left out: the report never fails on a plot.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    paths["trials"] = run_dir / "trials.csv"
    write_trials_csv(df, paths["trials"])

    importances, method = param_importances(df, objective, study)
    board = leaderboard(df, objective, top=None)
    counts = _counts_text(state_counts(df)) or "none"
    lines = [f"# Leaderboard ({objective}, best first)", "", f"Trials: {len(df)} ({counts}).", ""]
    if board.empty:
        lines.append("No trial completed: nothing to rank.")
    else:
        best = board.iloc[0]
        lines += [f"Best: trial {int(best['number'])} ({best['backbone']}), "
                  f"{objective} {best[objective]:.4f}.", "", markdown_table(board)]
    lines += ["", f"Parameter importances: {method}."]
    if importances:
        lines += ["", markdown_table(pd.DataFrame(
            {"parameter": list(importances), "importance": list(importances.values())}))]
    paths["leaderboard"] = run_dir / "leaderboard.md"
    _write_text(paths["leaderboard"], "\n".join(lines) + "\n")

    table = backbone_table(df, objective)
    text = [f"# Backbones ({objective}, best completed trial of each)", ""]
    text.append(markdown_table(table) if not table.empty else "No trials recorded.")
    paths["backbones"] = run_dir / "backbones.md"
    _write_text(paths["backbones"], "\n".join(text) + "\n")

    plots = {"history": lambda p: plot_history(df, p, objective)}
    if importances:
        plots["importances"] = lambda p: plot_importances(importances, p, method)
    for name, draw in plots.items():
        path = run_dir / f"{name}.png"
        try:
            draw(path)
        except Exception as exc:  # a plot is never worth losing the report over
            log.warning("could not draw %s: %s: %s", path.name, type(exc).__name__, exc)
        else:
            paths[name] = path
    return paths


def param_importances(df: pd.DataFrame, objective: str = DEFAULT_OBJECTIVE, study=None
                      ) -> tuple[dict[str, float], str]:
    """Parameter importances (summing to 1, largest first) and how they were obtained.

    Optuna's evaluator (fANOVA) when a study with at least two completed trials is given and
    it succeeds; otherwise a rough fallback from the trials table: |Spearman correlation| for
    numeric parameters, the correlation ratio for categorical ones. Returns ({}, reason) when
    neither applies.
    """
    reason = "no Optuna study given"
    if study is not None:
        try:
            import optuna

            complete = study.get_trials(deepcopy=False,
                                        states=(optuna.trial.TrialState.COMPLETE,))
            if len(complete) < 2:
                reason = f"Optuna needs >= 2 completed trials, the study has {len(complete)}"
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    got = optuna.importance.get_param_importances(study)
                if got:
                    return _normalised(got), "Optuna get_param_importances (fANOVA)"
                reason = "Optuna found no parameter shared by every completed trial"
        except Exception as exc:
            reason = f"Optuna importances failed ({type(exc).__name__}: {exc})"
    fallback = _correlation_importances(df, objective)
    if fallback:
        return fallback, (f"rough fallback, |rank correlation| / correlation ratio with the "
                          f"objective ({reason})")
    log.info("parameter importances skipped: %s and too few completed trials", reason)
    return {}, (f"skipped ({reason}; the fallback needs >= {MIN_TRIALS_FOR_IMPORTANCE} "
                "completed trials with a varying parameter)")


def plot_history(df: pd.DataFrame, path, objective: str = DEFAULT_OBJECTIVE) -> None:
    """Objective per trial number, the best-so-far line, pruned and failed trials marked.

    Pruned trials sit at their best intermediate value when the table has one; failed trials
    (and pruned ones without a value) sit on the bottom edge, so every finished trial shows.
    """
    fig = _figure((8, 4.5))
    ax = fig.add_subplot()
    score = _objective(df, objective) if not df.empty else pd.Series(dtype=float)
    state = df["state"].astype(str) if "state" in df.columns else pd.Series(dtype=str)
    number = pd.to_numeric(df["number"], errors="coerce") if "number" in df.columns \
        else pd.Series(dtype=float)
    finite = score[np.isfinite(score)]
    lo = float(finite.min()) if len(finite) else 0.0
    hi = float(finite.max()) if len(finite) else 1.0
    pad = max(0.05 * (hi - lo), 0.01)
    floor = lo - pad

    done = (state == COMPLETE) & np.isfinite(score)
    if done.any():
        order = number[done].sort_values().index
        x, y = number[order].to_numpy(), score[order].to_numpy()
        best = np.minimum.accumulate(y) if _ascending(objective) else np.maximum.accumulate(y)
        ax.plot(x, y, "o", color="tab:blue", label="complete")
        ax.step(x, best, where="post", color="tab:green", label="best so far")
        i = int(np.argmin(y) if _ascending(objective) else np.argmax(y))
        ax.annotate(f"#{int(x[i])}: {y[i]:.4f}", (x[i], y[i]), textcoords="offset points",
                    xytext=(4, 6), fontsize=8)
    pruned = state == PRUNED
    if pruned.any():
        ax.plot(number[pruned], score[pruned].where(np.isfinite(score[pruned]), floor), "v",
                color="tab:orange", alpha=0.8, label="pruned")
    failed = state == FAIL
    if failed.any():
        ax.plot(number[failed], np.full(int(failed.sum()), floor), "x", color="tab:red",
                label="failed")
    if not len(df):
        ax.text(0.5, 0.5, "no trials", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.set_ylim(floor - pad, hi + pad)
        ax.legend(loc="best", fontsize=8)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trial numbers, not 0.5
    ax.set_xlabel("trial number")
    ax.set_ylabel(objective)
    ax.set_title(f"{objective} per trial")
    ax.grid(alpha=0.3)
    _save(fig, Path(path))


def plot_importances(importances: dict[str, float], path, method: str = "") -> None:
    """Horizontal bars, most important parameter on top."""
    names = list(importances)[::-1]
    values = [importances[n] for n in names]
    fig = _figure((7, 1.2 + 0.4 * max(len(names), 1)))
    ax = fig.add_subplot()
    ax.barh(names, values, color="tab:blue")
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.3f}", va="center", fontsize=8)
    ax.set_xlim(0, max(values + [0.0]) * 1.15 or 1.0)
    ax.set_xlabel("importance (sums to 1)")
    short = method.split(" (")[0].split(",")[0]
    ax.set_title("Parameter importances" + (f"\n({short})" if short else ""), fontsize=10)
    _save(fig, Path(path))


# -- test-split evaluation ------------------------------------------------------------------


def calibrate_threshold(probs_val, y_val, classes, unknown: str = "Unknown",
                        metric: str = "balanced_accuracy") -> float:
    """The max-probability threshold below which a prediction becomes `unknown`.

    Chosen on the validation split (never the test split) to maximise `metric`; among equally
    good thresholds the lowest wins, so rejection is only used where it pays. Candidates are 0
    and the midpoints between consecutive distinct max-probabilities (a midpoint generalises
    better than a value sitting exactly on a validation sample). Returns 0.0 when there is no
    `unknown` class to reject into.
    """
    classes = list(classes)
    if unknown not in classes:
        return 0.0
    if metric not in _METRICS:
        raise UsageError(f"threshold metric {metric!r}: choose one of {', '.join(_METRICS)}")
    probs, y = _check(probs_val, y_val, classes)
    if not len(y):
        return 0.0
    fn = _METRICS[metric]
    top = np.unique(probs.max(axis=1))
    if len(top) > 256:  # keep the search linear-ish on big validation sets
        top = np.unique(np.quantile(top, np.linspace(0, 1, 256)))
    candidates = np.concatenate([[0.0], (top[:-1] + top[1:]) / 2])
    best_t, best_v = 0.0, -math.inf
    for t in candidates:
        v = fn(y, apply_threshold(probs, classes, float(t), unknown))
        if v > best_v + 1e-12:
            best_t, best_v = float(t), v
    return best_t


def apply_threshold(probs, classes, threshold: float, unknown: str = "Unknown") -> np.ndarray:
    """Argmax class indices, with predictions under `threshold` confidence turned into `unknown`."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise UsageError(f"probabilities of shape {probs.shape} do not match "
                         f"{len(classes)} classes")
    pred = probs.argmax(axis=1)
    if threshold and threshold > 0:
        if unknown not in classes:
            raise UsageError(f"threshold {threshold}: there is no {unknown!r} class to reject "
                             "into; use a threshold of 0")
        pred = np.where(probs.max(axis=1) < threshold, list(classes).index(unknown), pred)
    return pred


def evaluate_predictions(y_true, probs, classes, views=None, threshold: float = 0.0,
                         unknown: str = "Unknown") -> dict:
    """Headline metrics, per-class report, per-view metrics and confusion matrix.

    `y_true` holds class indices (or class names); `views` optionally holds each sample's view
    ("face" / "no_face"). Macro F1 averages the classes present in labels or predictions, as the
    validation metric does; the per-class report and the confusion matrix list every class,
    with zero support where a class is absent from the test split.
    """
    classes = list(classes)
    probs, y = _check(probs, y_true, classes)
    pred = apply_threshold(probs, classes, threshold, unknown)
    labels = list(range(len(classes)))
    ev = {"classes": classes, "threshold": float(threshold), "n": int(len(y)),
          **_headline(y, pred),
          "rejected": int((pred != probs.argmax(axis=1)).sum()) if len(y) else 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = classification_report(y, pred, labels=labels, target_names=classes,
                                       output_dict=True, zero_division=0)
        ev["report_text"] = classification_report(y, pred, labels=labels, target_names=classes,
                                                  digits=4, zero_division=0)
    ev["per_class"] = {c: {k: (int(v) if k == "support" else float(v))
                           for k, v in report[c].items()} for c in classes}
    ev["confusion_matrix"] = confusion_matrix(y, pred, labels=labels).tolist()
    if len(y):
        ev["ci95"] = bootstrap_intervals(y, pred, len(classes))
    ev["per_view"] = {}
    if views is not None:
        views = np.asarray(views).astype(str)
        if len(views) != len(y):
            raise UsageError(f"{len(views)} views for {len(y)} samples")
        present = set(views.tolist())
        order = [v for v in ("face", "no_face") if v in present] + sorted(present - {"face",
                                                                                     "no_face"})
        for view in order:
            m = views == view
            ev["per_view"][view] = {**_headline(y[m], pred[m]), "n": int(m.sum())}
    return ev


def bootstrap_intervals(y, pred, num_classes: int, resamples: int = 1000, seed: int = 0,
                        level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of accuracy, balanced accuracy and macro F1.

    Why: a test split of a few hundred photos moves balanced accuracy by a point or more per
    photo of a small class, so a number alone overstates what is known. Photos are resampled
    within each true class (each keeps its support, which balanced accuracy weighs by), and
    the metrics come from each resample's confusion counts, as `_METRICS` computes them.
    """
    y, pred = np.asarray(y, np.int64), np.asarray(pred, np.int64)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(y == k) for k in range(num_classes)]
    values = {name: [] for name in _METRICS}
    for start in range(0, resamples, 100):
        b = min(100, resamples - start)
        idx = np.concatenate([m[rng.integers(0, len(m), (b, len(m)))] for m in members if len(m)],
                             axis=1)
        for name, v in _confusion_metrics(y[idx], pred[idx], num_classes).items():
            values[name].append(v)
    tail = (1.0 - level) / 2 * 100
    return {name: [float(q) for q in np.percentile(np.concatenate(v), [tail, 100 - tail])]
            for name, v in values.items()}


def _confusion_metrics(y: np.ndarray, pred: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy and macro F1 of each row of (B, N) label arrays."""
    rows = np.arange(len(y))[:, None] * k * k
    cm = np.bincount((rows + y * k + pred).ravel(), minlength=len(y) * k * k).reshape(-1, k, k)
    diag = np.diagonal(cm, axis1=1, axis2=2).astype(np.float64)
    support, predicted = cm.sum(axis=2), cm.sum(axis=1)
    present = support > 0
    recall = np.divide(diag, support, out=np.zeros_like(diag), where=present)
    both = support + predicted
    f1 = np.divide(2 * diag, both, out=np.zeros_like(diag), where=both > 0)
    return {"accuracy": diag.sum(axis=1) / y.shape[1],
            "balanced_accuracy": recall.sum(axis=1) / present.sum(axis=1),
            "macro_f1": f1.sum(axis=1) / (both > 0).sum(axis=1)}


def plot_confusion_matrix(cm, classes, path, normalize: bool = True) -> None:
    """A confusion-matrix heat map that stays readable with many classes.

    Rows are true classes; normalised rows show recall (a class absent from the split keeps a
    row of zeros). The figure grows with the class count, x labels are rotated, and cell
    numbers are only written while they still fit.
    """
    cm = np.asarray(cm, dtype=np.float64)
    k = len(classes)
    if cm.shape != (k, k):
        raise UsageError(f"confusion matrix of shape {cm.shape} does not match {k} classes")
    if normalize:
        rows = cm.sum(axis=1, keepdims=True)
        cm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    side = min(max(6.0, 0.42 * k + 2.5), 40.0)
    font = 10.0 if k <= 12 else 8.0 if k <= 40 else 6.0  # cells are ~0.42 in at any k
    fig = _figure((side, side * 0.92))
    ax = fig.add_subplot()
    image = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(classes, rotation=90 if k > 8 else 45, ha="right" if k <= 8 else "center",
                       fontsize=font)
    ax.set_yticklabels(classes, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix" + (" (row-normalised)" if normalize else ""))
    if k <= 30:
        cut = (cm.max() or 1) / 2
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    text = f"{cm[i, j]:.2f}" if normalize else f"{int(cm[i, j])}"
                    ax.text(j, i, text, ha="center", va="center", fontsize=font * 0.8,
                            color="white" if cm[i, j] > cut else "black")
    _save(fig, Path(path))


def format_evaluation(ev: dict, title: str = "Test split") -> str:
    """Human-readable evaluation: headline metrics, classification report, per-view table."""
    lines = [f"{title}: {ev['n']} images, {len(ev['classes'])} classes",
             f"accuracy {ev['accuracy']:.4f}   balanced accuracy {ev['balanced_accuracy']:.4f}"
             f"   macro F1 {ev['macro_f1']:.4f}"]
    if ci := ev.get("ci95"):
        lines.append("95% intervals (bootstrap over the photos): " + "   ".join(
            f"{name} {ci[key][0]:.2f}-{ci[key][1]:.2f}" for key, name in
            (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"),
             ("macro_f1", "macro F1"))))
    if strangers := ev.get("unknown_folders"):
        # `evaluate` on another folder: say what the numbers measure before anyone reads them.
        shown = ", ".join(strangers[:5]) + (", ..." if len(strangers) > 5 else "")
        lines.append(f"{len(strangers)} folder(s) of people the model does not know ({shown}): "
                     f"their {ev.get('unknown_folder_images', '?')} photos count as Unknown")
    if "known_people_present" in ev and not ev["known_people_present"]:
        # Strangers alone (in new folders, or only in Unknown/).
        lines.append("none of the model's people is in this folder: these numbers say only "
                     "how often strangers are rejected")
    if ev.get("threshold"):
        lines.append(f"Unknown threshold {ev['threshold']:.4f} "
                     f"({ev.get('rejected', 0)} predictions turned into Unknown)")
    lines += ["", ev["report_text"].rstrip()]
    if ev.get("per_view"):
        rows = [[view, m["n"], m["accuracy"], m["balanced_accuracy"], m["macro_f1"]]
                for view, m in ev["per_view"].items()]
        lines += ["", "Per view:", tabulate(rows, headers=["view", "n", "accuracy",
                                                           "balanced accuracy", "macro F1"],
                                            floatfmt=".4f")]
    return "\n".join(lines)


# -- helpers --------------------------------------------------------------------------------


def _quiet(fn: Callable) -> Callable:
    """sklearn warns when a class is predicted but absent from y_true; that case is expected."""
    def wrapped(y, pred):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(fn(y, pred))
    return wrapped


def _macro_f1(y, pred) -> float:
    labels = np.unique(np.concatenate([y, pred]))  # as tuner.trial.score does
    return f1_score(y, pred, labels=labels, average="macro", zero_division=0)


_METRICS: dict[str, Callable] = {
    "accuracy": _quiet(accuracy_score),
    "balanced_accuracy": _quiet(balanced_accuracy_score),
    "macro_f1": _quiet(_macro_f1),
}


def _headline(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    if not len(y):
        return {name: float("nan") for name in _METRICS}
    return {name: fn(y, pred) for name, fn in _METRICS.items()}


def _check(probs, y, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities as (N, K) floats and labels as N indices, or a UsageError saying why not."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise UsageError(f"probabilities of shape {probs.shape} do not match "
                         f"{len(classes)} classes")
    y = np.asarray(y)
    if y.dtype.kind in "USO":
        index = {c: i for i, c in enumerate(classes)}
        unknown_names = sorted(set(y.tolist()) - set(index))
        if unknown_names:
            raise UsageError(f"labels not among the classes: {unknown_names[:5]}")
        y = np.array([index[v] for v in y.tolist()], dtype=np.int64)
    y = y.astype(np.int64).reshape(-1)
    if len(y) != len(probs):
        raise UsageError(f"{len(y)} labels for {len(probs)} rows of probabilities")
    if len(y) and (y.min() < 0 or y.max() >= len(classes)):
        raise UsageError(f"label indices must be in 0..{len(classes) - 1}")
    return probs, y


def _ascending(objective: str) -> bool:
    """Losses are minimised; every other objective (accuracy, F1) is maximised."""
    return objective.endswith("loss")


def _objective(df: pd.DataFrame, objective: str) -> pd.Series:
    """The objective per trial: its own column where recorded, else the study's `value`."""
    score = pd.Series(np.nan, index=df.index, dtype=float)
    if objective in df.columns:
        score = pd.to_numeric(df[objective], errors="coerce").astype(float)
    if "value" in df.columns:
        score = score.fillna(pd.to_numeric(df["value"], errors="coerce").astype(float))
    return score


def _complete(df: pd.DataFrame, objective: str) -> pd.DataFrame:
    if df.empty or "state" not in df.columns:
        return df.iloc[0:0]
    return df[(df["state"].astype(str) == COMPLETE) & np.isfinite(_objective(df, objective))]


def _ordered(df: pd.DataFrame) -> pd.DataFrame:
    known = [c for c in TRIAL_COLUMNS if c in df.columns]
    return df[known + [c for c in df.columns if c not in known]]


def _counts_text(counts: dict[str, int]) -> str:
    words = {COMPLETE: "complete", PRUNED: "pruned", FAIL: "failed"}
    return ", ".join(f"{n} {words.get(s, s.lower())}" for s, n in counts.items())


def _compact(board: pd.DataFrame, objective: str) -> pd.DataFrame:
    """The leaderboard columns that fit a terminal."""
    keep = ["rank", "number", objective, "val_accuracy", "val_macro_f1", "backbone", "alpha",
            "input_size", "dense_units", "lr_stage1", "lr_stage2", "freeze_block", "seconds"]
    cols = list(dict.fromkeys(c for c in keep if c in board.columns))
    out = board[cols]
    if "alpha" in out.columns and out["alpha"].isna().all():
        out = out.drop(columns="alpha")
    return out


def _failure_lines(df: pd.DataFrame, limit: int = 3) -> list[str]:
    if "error" not in df.columns or "state" not in df.columns:
        return []
    failed = df[(df["state"].astype(str) == FAIL)]
    if failed.empty:
        return []
    lines = ["", f"Failed trials ({len(failed)}):"]
    for _, row in failed.head(limit).iterrows():
        error = row.get("error")
        error = str(error).strip() if isinstance(error, str) and error.strip() else "no message"
        lines.append(f"  #{int(row['number'])} ({row.get('backbone', '?')}): {error[:160]}")
    if len(failed) > limit:
        lines.append(f"  ... {len(failed) - limit} more in trials.csv")
    return lines


def _table(frame: pd.DataFrame, tablefmt: str, floatfmt: str) -> str:
    """tabulate with per-column number formats and "-" for missing values."""
    if frame.empty:
        return tabulate([], headers=list(frame.columns), tablefmt=tablefmt)
    formats, columns = [], {}
    for name in frame.columns:
        col = frame[name]
        numeric = pd.to_numeric(col, errors="coerce") if col.dtype.kind in "biufO" else None
        if numeric is not None and col.dtype.kind == "O" \
                and numeric.notna().sum() < col.notna().sum():
            numeric = None  # text column
        if numeric is None or col.dtype.kind == "b":
            formats.append("")
            columns[name] = [None if _missing(v) else v for v in col]
            continue
        values = numeric.dropna().to_numpy(dtype=float)
        if len(values) and np.all(values == np.round(values)):
            formats.append("")  # whole numbers: print as ints
            columns[name] = [None if _missing(v) else int(v) for v in numeric]
            continue
        if name in _SECONDS:
            formats.append(".1f")
            columns[name] = [None if _missing(v) else float(v) for v in numeric]
            continue
        small = len(values) and np.all(np.abs(values[values != 0]) < 1e-2) \
            and (values != 0).any()
        formats.append(".2e" if small else floatfmt)
        columns[name] = [None if _missing(v) else float(v) for v in numeric]
    rows = list(zip(*columns.values()))
    return tabulate(rows, headers=list(frame.columns), tablefmt=tablefmt,
                    floatfmt=formats, missingval="-")


_SECONDS = ("seconds", "mean_seconds")  # durations: a tenth of a second is plenty


def _missing(value) -> bool:
    try:
        return value is None or bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _normalised(values: dict) -> dict[str, float]:
    values = {str(k): max(float(v), 0.0) for k, v in values.items() if np.isfinite(float(v))}
    total = sum(values.values())
    if total <= 0:
        return {}
    return dict(sorted(((k, v / total) for k, v in values.items()), key=lambda kv: -kv[1]))


def _correlation_importances(df: pd.DataFrame, objective: str) -> dict[str, float]:
    """|Spearman rho| for numeric parameters, correlation ratio (eta) for categorical ones.

    Crude and marginal (no interactions), but it needs only the trials table.
    """
    done = _complete(df, objective)
    if len(done) < MIN_TRIALS_FOR_IMPORTANCE:
        return {}
    score = _objective(done, objective)
    out = {}
    for name in PARAM_COLUMNS:
        if name not in done.columns:
            continue
        col = done[name]
        m = col.notna()
        if m.sum() < MIN_TRIALS_FOR_IMPORTANCE or col[m].nunique() < 2:
            continue
        numeric = pd.to_numeric(col[m], errors="coerce")
        y = score[m]
        if numeric.notna().all():
            rho = numeric.rank().corr(y.rank())
            value = abs(rho) if np.isfinite(rho) else 0.0
        else:
            groups = y.groupby(col[m].astype(str))
            total = ((y - y.mean()) ** 2).sum()
            between = (groups.size() * (groups.mean() - y.mean()) ** 2).sum()
            value = math.sqrt(between / total) if total > 0 else 0.0
        out[name] = value
    return _normalised(out)


def _figure(size):
    """A matplotlib Figure on the Agg canvas; no pyplot, so nothing global and nothing to close."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def _write_text(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Write through `write(tmp)` then rename, so a crash never leaves a half file in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
