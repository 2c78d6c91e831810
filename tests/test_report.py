"""Report stage: trial tables, result files, plots, thresholds, test-split metrics (no TF)."""
from __future__ import annotations

import math
import subprocess
import sys
import warnings
from dataclasses import fields

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
)

from tuner import report
from tuner.config import TrialParams
from tuner.errors import UsageError

PNG = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")


def _trial(number, state, backbone, bal, seconds, *, alpha=NAN, lr1=5e-4, lr2=5e-5, size=224,
           error=""):
    """One row as the search driver writes it; unfinished metrics are NaN."""
    done = state == "COMPLETE"
    return {
        "number": number, "state": state, "value": bal if done else NAN, "backbone": backbone,
        "input_size": size, "alpha": alpha, "dense_units": 128, "dropout": 0.2 + 0.01 * number,
        "l2": 1e-4, "label_smoothing": 0.1, "lr_stage1": lr1, "lr_stage2": lr2,
        "freeze_block": number % 3, "augment": 0.5, "batch_size": 32,
        "val_accuracy": bal + 0.02 if not math.isnan(bal) else NAN,
        "val_balanced_accuracy": bal,
        "val_macro_f1": bal - 0.03 if not math.isnan(bal) else NAN,
        "val_loss": 1.0 - bal if not math.isnan(bal) else NAN,
        "stage1_best": bal - 0.05 if done else NAN, "stage2_best": bal if done else NAN,
        "epochs_stage1": 5 if done else NAN, "epochs_stage2": 4 if done else NAN,
        "seconds": seconds,
        "params": {"MobileNetV2": 2_400_000, "EfficientNetB0": 4_200_000,
                   "ResNet50": 23_700_000}[backbone] if done else NAN,
        "error": error,
    }


@pytest.fixture
def trials() -> pd.DataFrame:
    rows = [
        _trial(0, "COMPLETE", "MobileNetV2", 0.80, 30.0, alpha=1.0),
        _trial(1, "COMPLETE", "MobileNetV2", 0.86, 34.0, alpha=0.75, lr1=1e-3),
        _trial(2, "COMPLETE", "EfficientNetB0", 0.91, 60.0, lr2=2e-5),
        _trial(3, "PRUNED", "EfficientNetB0", 0.55, 20.0),  # best intermediate value only
        _trial(4, "FAIL", "ResNet50", NAN, 5.0, error="ResourceExhaustedError: OOM"),
        _trial(5, "COMPLETE", "MobileNetV2", 0.84, 32.0, alpha=0.5),
        _trial(6, "COMPLETE", "EfficientNetB0", 0.88, 58.0, size=192),
        _trial(7, "COMPLETE", "ResNet50", 0.70, 100.0),
        _trial(8, "RUNNING", "ResNet50", NAN, NAN),
    ]
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # the driver's order is not kept


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG


# -- tables ---------------------------------------------------------------------------------


def test_param_columns_are_the_trial_params():
    assert set(report.PARAM_COLUMNS) == {f.name for f in fields(TrialParams)}


def test_leaderboard_orders_completed_trials_and_excludes_the_rest(trials):
    board = report.leaderboard(trials)
    assert board["number"].tolist() == [2, 6, 1, 5, 0, 7]
    assert board["rank"].tolist() == [1, 2, 3, 4, 5, 6]
    assert board.columns[:3].tolist() == ["rank", "number", "val_balanced_accuracy"]
    assert board["val_balanced_accuracy"].is_monotonic_decreasing
    assert report.leaderboard(trials, top=2)["number"].tolist() == [2, 6]
    # Another objective re-ranks; ties go to the earlier trial.
    tied = trials.copy()
    tied.loc[tied["number"] == 6, "val_accuracy"] = 0.93
    assert report.leaderboard(tied, "val_accuracy")["number"].tolist()[:2] == [2, 6]


def test_leaderboard_falls_back_to_value_and_handles_no_completed_trials(trials):
    no_metric = trials.drop(columns=["val_balanced_accuracy"])
    assert report.leaderboard(no_metric)["number"].tolist()[:2] == [2, 6]
    failed = trials[trials["state"] != "COMPLETE"]
    assert report.leaderboard(failed).empty


def test_backbone_table_best_per_backbone_and_state_counts(trials):
    table = report.backbone_table(trials)
    assert table["backbone"].tolist() == ["EfficientNetB0", "MobileNetV2", "ResNet50"]
    assert table["best_trial"].tolist() == [2, 1, 7]
    rows = table.set_index("backbone")
    assert rows.loc["EfficientNetB0", "val_balanced_accuracy"] == pytest.approx(0.91)
    assert rows.loc["MobileNetV2", "val_accuracy"] == pytest.approx(0.88)
    assert rows.loc["MobileNetV2", "val_macro_f1"] == pytest.approx(0.83)
    assert rows.loc["ResNet50", "params"] == 23_700_000
    counts = rows[["complete", "pruned", "failed", "trials"]]
    assert counts.loc["EfficientNetB0"].tolist() == [2, 1, 0, 3]
    assert counts.loc["MobileNetV2"].tolist() == [3, 0, 0, 3]
    assert counts.loc["ResNet50"].tolist() == [1, 0, 1, 3]  # the RUNNING trial counts as run
    # Mean over finished trials (complete, pruned, failed), not the running one.
    assert rows.loc["ResNet50", "mean_seconds"] == pytest.approx((5.0 + 100.0) / 2)
    assert rows.loc["EfficientNetB0", "mean_seconds"] == pytest.approx((60 + 20 + 58) / 3)


def test_backbone_without_a_completed_trial_is_listed_last(trials):
    extra = pd.DataFrame([_trial(9, "FAIL", "ResNet50", NAN, 1.0)]).assign(backbone="Xception")
    table = report.backbone_table(pd.concat([trials, extra], ignore_index=True))
    assert table["backbone"].iloc[-1] == "Xception"
    assert pd.isna(table["best_trial"].iloc[-1])
    assert "Xception" in report.markdown_table(table)


def test_markdown_table_formats_numbers(trials):
    text = report.markdown_table(report.leaderboard(trials))
    lines = text.splitlines()
    assert lines[0].replace(" ", "").startswith("|rank|number|") and set(lines[1]) <= set("|-: ")
    assert len(lines) == 2 + 6
    assert "0.9100" in text          # metrics with floatfmt
    assert "5.00e-05" in text        # learning rates stay readable
    assert "2400000" in text and "2400000.0" not in text  # counts print as ints
    assert "| nan" not in text.lower()


def test_summary_text(trials):
    text = report.summary_text(trials)
    assert "9 (6 complete, 1 pruned, 1 failed, 1 running)" in text
    assert "Best trial #2 (EfficientNetB0)" in text
    assert "EfficientNetB0" in text and "ResNet50" in text
    assert "OOM" in text  # failed trials say why
    assert report.summary_text(trials.iloc[0:0]) == "No trials recorded."
    assert "nothing to rank" in report.summary_text(trials[trials["state"] == "FAIL"])


# -- result files ---------------------------------------------------------------------------


def test_write_results_writes_every_file(trials, tmp_path):
    paths = report.write_results(trials, tmp_path / "run")
    assert set(paths) == {"trials", "leaderboard", "backbones", "history", "importances"}
    for path in paths.values():
        assert path.exists() and path.parent == tmp_path / "run"
    assert _is_png(paths["history"]) and _is_png(paths["importances"])
    assert "trial 2 (EfficientNetB0)" in paths["leaderboard"].read_text()
    assert "rough fallback" in paths["leaderboard"].read_text()
    backbones_md = paths["backbones"].read_text()
    cells = [[c.strip() for c in line.strip("|").split("|")]
             for line in backbones_md.splitlines() if line.startswith("|")]
    assert cells[0][:2] == ["backbone", "best_trial"]
    assert cells[2][:2] == ["EfficientNetB0", "2"]  # row 1 is the |---| rule
    back = pd.read_csv(paths["trials"])
    assert back["number"].tolist() == list(range(9))
    assert back.columns[:3].tolist() == ["number", "state", "value"]
    assert not list((tmp_path / "run").glob("*.tmp")) and not list((tmp_path / "run").glob(".*"))


def test_write_results_with_an_optuna_study(trials, tmp_path):
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(t):
        x = t.suggest_float("x", -3, 3)
        kind = t.suggest_categorical("kind", ["a", "b"])
        return -(x ** 2) + (0.1 if kind == "a" else 0.0)

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    study.optimize(objective, n_trials=6)
    importances, method = report.param_importances(trials, study=study)
    assert method.startswith("Optuna") and set(importances) == {"x", "kind"}
    assert sum(importances.values()) == pytest.approx(1.0)
    paths = report.write_results(trials, tmp_path, study=study)
    assert _is_png(paths["importances"])
    assert "Optuna" in paths["leaderboard"].read_text()


def test_importances_fall_back_or_skip_without_crashing(trials, tmp_path):
    class Broken:
        def get_trials(self, *a, **k):
            raise RuntimeError("storage gone")

    importances, method = report.param_importances(trials, study=Broken())
    assert importances and "storage gone" in method
    few = trials[trials["number"].isin([0, 1, 4])]
    paths = report.write_results(few, tmp_path)
    assert "importances" not in paths and not (tmp_path / "importances.png").exists()
    assert "skipped" in paths["leaderboard"].read_text()
    assert _is_png(paths["history"])


def test_write_results_with_no_trials(tmp_path):
    empty = pd.DataFrame(columns=report.TRIAL_COLUMNS)
    paths = report.write_results(empty, tmp_path)
    assert {"trials", "leaderboard", "backbones", "history"} <= set(paths)
    assert "nothing to rank" in paths["leaderboard"].read_text()


def test_report_does_not_import_tensorflow():
    code = ("import sys, tuner.report as r; import pandas as pd; r.summary_text(pd.DataFrame());"
            "sys.exit(int(any(m in sys.modules for m in ('tensorflow', 'keras'))))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# -- thresholds and test-split evaluation ---------------------------------------------------

CLASSES = ["alice", "bob", "Unknown"]


def _unknown_case():
    """Confident, correct people; strangers get a low-confidence wrong guess."""
    probs = np.array(
        [[0.92, 0.05, 0.03]] * 6 + [[0.06, 0.90, 0.04]] * 6   # alice, bob: right and sure
        + [[0.50, 0.30, 0.20]] * 4 + [[0.25, 0.45, 0.30]] * 3  # strangers: wrong, unsure
        + [[0.10, 0.10, 0.80]] * 2                             # strangers: right
    )
    y = np.array([0] * 6 + [1] * 6 + [2] * 9)
    return probs, y


def test_calibrated_threshold_rejects_unsure_predictions():
    probs, y = _unknown_case()
    t = report.calibrate_threshold(probs, y, CLASSES)
    assert 0.5 < t < 0.8
    before = balanced_accuracy_score(y, probs.argmax(axis=1))
    after = balanced_accuracy_score(y, report.apply_threshold(probs, CLASSES, t))
    assert after > before and after == pytest.approx(1.0)
    # Ties go to the lowest threshold: every threshold in (0.5, 0.8] is perfect here.
    assert t == pytest.approx((0.5 + 0.8) / 2)


def test_threshold_is_zero_without_unknown_class_or_when_rejection_does_not_help():
    probs, y = _unknown_case()
    assert report.calibrate_threshold(probs[:12, :2], y[:12], ["alice", "bob"]) == 0.0
    assert report.calibrate_threshold(probs[:12], y[:12], CLASSES) == 0.0
    with pytest.raises(UsageError, match="no 'Unknown' class"):
        report.apply_threshold(probs[:, :2], ["alice", "bob"], 0.5)
    with pytest.raises(UsageError, match="threshold metric"):
        report.calibrate_threshold(probs, y, CLASSES, metric="auc")


def test_apply_threshold():
    probs = np.array([[0.6, 0.3, 0.1], [0.4, 0.35, 0.25], [0.2, 0.2, 0.6]])
    assert report.apply_threshold(probs, CLASSES, 0.0).tolist() == [0, 0, 2]
    assert report.apply_threshold(probs, CLASSES, 0.5).tolist() == [0, 2, 2]


def _random_case(n=120, seed=0):
    rng = np.random.default_rng(seed)
    classes = ["alice", "bob", "carol", "dave", "Unknown"]  # dave never appears in y_true
    y = rng.choice([0, 1, 2, 4], size=n)
    logits = rng.normal(size=(n, len(classes)))
    logits[np.arange(n), y] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    views = rng.choice(["face", "no_face"], size=n, p=[0.7, 0.3])
    return y, probs, classes, views


def test_evaluate_predictions_matches_sklearn():
    y, probs, classes, views = _random_case()
    ev = report.evaluate_predictions(y, probs, classes, views=views)
    pred = probs.argmax(axis=1)
    assert (pred == 3).any()  # a predicted class absent from y_true must not break anything
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bal = balanced_accuracy_score(y, pred)
    present = np.unique(np.concatenate([y, pred]))
    assert ev["n"] == len(y) and ev["classes"] == classes and ev["threshold"] == 0.0
    assert ev["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert ev["balanced_accuracy"] == pytest.approx(bal)
    assert ev["macro_f1"] == pytest.approx(
        f1_score(y, pred, labels=present, average="macro", zero_division=0))
    expected = classification_report(y, pred, labels=range(5), target_names=classes,
                                      output_dict=True, zero_division=0)
    for c in classes:
        for k in ("precision", "recall", "f1-score", "support"):
            assert ev["per_class"][c][k] == pytest.approx(expected[c][k])
    assert ev["per_class"]["dave"]["support"] == 0
    assert ev["confusion_matrix"] == confusion_matrix(y, pred, labels=range(5)).tolist()
    assert "dave" in ev["report_text"]

    assert list(ev["per_view"]) == ["face", "no_face"]
    for view in ("face", "no_face"):
        m = views == view
        got = ev["per_view"][view]
        assert got["n"] == int(m.sum())
        assert got["accuracy"] == pytest.approx(accuracy_score(y[m], pred[m]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y[m], pred[m]))
    assert sum(v["n"] for v in ev["per_view"].values()) == len(y)


def test_evaluate_predictions_with_threshold_names_and_one_view():
    y, probs, classes, _ = _random_case(seed=1)
    names = np.array(classes)[y]
    ev = report.evaluate_predictions(names, probs, classes, views=["face"] * len(y),
                                     threshold=0.4)
    pred = report.apply_threshold(probs, classes, 0.4)
    assert ev["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert ev["rejected"] == int((pred != probs.argmax(axis=1)).sum()) > 0
    assert list(ev["per_view"]) == ["face"]
    assert report.evaluate_predictions(y, probs, classes)["per_view"] == {}
    text = report.format_evaluation(ev)
    assert "balanced accuracy" in text and "Per view" in text and "threshold 0.4000" in text
    with pytest.raises(UsageError):
        report.evaluate_predictions(y[:-1], probs, classes)
    with pytest.raises(UsageError):
        report.evaluate_predictions(y, probs[:, :3], classes)


def test_bootstrap_intervals_resample_within_classes_and_narrow_with_more_photos():
    y, probs, classes, _ = _random_case()
    pred = probs.argmax(axis=1)
    # Each resample's metrics are sklearn's (a predicted class absent from y included).
    rng = np.random.default_rng(5)
    idx = rng.integers(0, len(y), (20, len(y)))
    fast = report._confusion_metrics(y[idx], pred[idx], len(classes))
    for i in range(20):
        for name, fn in report._METRICS.items():
            assert fast[name][i] == pytest.approx(fn(y[idx[i]], pred[idx[i]]), abs=1e-12), name
    ev = report.evaluate_predictions(y, probs, classes)
    assert ev["ci95"] == report.bootstrap_intervals(y, pred, len(classes)), "seeded"
    for name, (low, high) in ev["ci95"].items():
        assert low < ev[name] < high, name
    # Within classes: one photo of a third person, always missed, weighs a third in every
    # resample (resampled across classes it would drop out of about a third of them, and
    # balanced accuracy would reach 1.0 there).
    one_missed = np.array([0] * 50 + [1] * 50 + [2])
    ci = report.bootstrap_intervals(one_missed, np.minimum(one_missed, 1) * (one_missed < 2), 3)
    assert ci["balanced_accuracy"] == pytest.approx([2 / 3, 2 / 3])
    assert ci["accuracy"] == pytest.approx([100 / 101, 100 / 101])
    # 64 times the photos at the same error rate: about an eighth of the width.
    many_y, many_pred = np.tile(y, 64), np.tile(pred, 64)
    wide = report.bootstrap_intervals(y, pred, len(classes))["balanced_accuracy"]
    narrow = report.bootstrap_intervals(many_y, many_pred, len(classes))["balanced_accuracy"]
    assert 5 < (wide[1] - wide[0]) / (narrow[1] - narrow[0]) < 11
    text = report.format_evaluation(ev)
    low, high = ev["ci95"]["balanced_accuracy"]
    assert "95% intervals (bootstrap over the photos): accuracy " in text
    assert f"balanced accuracy {low:.2f}-{high:.2f}" in text


@pytest.mark.parametrize("k", [3, 40])
def test_plot_confusion_matrix(tmp_path, k):
    classes = [f"person_{i:02d}" for i in range(k - 1)] + ["Unknown"]
    rng = np.random.default_rng(k)
    cm = rng.integers(0, 20, size=(k, k))
    cm[1] = 0  # a class absent from the split
    path = tmp_path / "cm.png"
    report.plot_confusion_matrix(cm, classes, path)
    assert _is_png(path)
    report.plot_confusion_matrix(cm, classes, tmp_path / "raw.png", normalize=False)
    assert _is_png(tmp_path / "raw.png")
    with pytest.raises(UsageError):
        report.plot_confusion_matrix(cm[:-1], classes, path)


def test_evaluate_says_when_only_strangers_are_in_the_folder():
    """A folder holding only Unknown/ (no new folders either) measures rejection alone: the
    note used to appear only when the strangers came in folders of their own."""
    from tuner.report import evaluate_predictions, format_evaluation

    classes = ["Alice", "Bob", "Unknown"]
    y = np.array([2, 2, 2, 2])
    probs = np.array([[0.1, 0.1, 0.8], [0.7, 0.2, 0.1], [0.2, 0.2, 0.6], [0.1, 0.1, 0.8]])
    ev = evaluate_predictions(y, probs, classes)
    ev.update(unknown_folders=[], unknown_folder_images=0, known_people_present=[])
    note = "none of the model's people is in this folder: these numbers say only how often " \
           "strangers are rejected"
    assert note in format_evaluation(ev, title="only_unknown")
    ev["known_people_present"] = ["Alice"]
    assert note not in format_evaluation(ev, title="with_alice")
    del ev["known_people_present"]  # a test split's report: no such key, no note
    assert note not in format_evaluation(ev, title="Test split")


def test_trials_csv_keeps_counts_whole_beside_failed_trials(trials, tmp_path):
    """A failed trial's blank epochs and parameter count made pandas write every count as a
    float (5.0 epochs, 2400000.0 parameters)."""
    from tuner.report import write_trials_csv

    path = tmp_path / "trials.csv"
    write_trials_csv(trials, path)
    rows = path.read_text().splitlines()
    header = rows[0].split(",")
    first = dict(zip(header, rows[1].split(",")))  # trial 0: complete
    assert (first["number"], first["epochs_stage1"], first["params"]) == ("0", "5", "2400000")
    failed = dict(zip(header, rows[5].split(",")))
    assert failed["number"] == "4" and failed["epochs_stage1"] == "" and failed["params"] == ""
    back = pd.read_csv(path)
    assert back["epochs_stage2"].dropna().tolist() == [4] * 6
