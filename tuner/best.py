"""The best trial retrained, reported once on the untouched test split, and saved for deployment.

The test split is read here and nowhere else in a search: trials select on validation only.
The probability threshold under which a prediction becomes Unknown is calibrated on
validation too, then applied unchanged to the test split and to every later prediction.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
from pathlib import Path

import numpy as np

from . import __version__
from .config import ScanConfig, TrialParams
from .data import photo_ids, scan, split_fingerprint, write_json
from .errors import UsageError

MANIFEST_SCHEMA = 1
INT_FIELDS = {"input_size", "dense_units", "freeze_block", "batch_size"}
BEST_DIR = "best"


def predict_probs(model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Class probabilities for uint8 (N, H, W, 3) images (the model takes raw 0..255 floats)."""
    if len(images) == 0:
        return np.zeros((0, model.output_shape[-1]), dtype=np.float32)
    from .pipeline import image_batches

    return model.predict(image_batches(images, batch_size), verbose=0)


def params_from_row(row) -> TrialParams:
    """TrialParams from a trials.csv / trials-frame row; empty cells take the defaults."""
    values = {}
    for name in TrialParams.__dataclass_fields__:
        value = row.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        values[name] = (str(value) if name == "backbone"
                        else int(value) if name in INT_FIELDS else float(value))
    return TrialParams(**values)


def retrain_best(run, best_row) -> tuple[Path, dict]:
    """Retrain the best trial's configuration on train (early stopping on val), refit its head
    on the tuned backbone where that helps on val (`trial.refit_head`), then test it."""
    import keras

    from .hypermodel import build_model
    from .report import apply_threshold, calibrate_threshold, evaluate_predictions, \
        format_evaluation, plot_confusion_matrix
    from .trial import refit_head, release, run_two_stages, score

    cfg = run.config
    params = params_from_row(best_row)
    classes = run.classes
    release()
    keras.utils.set_random_seed(cfg.fit.seed)
    model = build_model(params, len(classes), cfg.fit.weights, seed=cfg.fit.seed)
    result = run_two_stages(model, params, run.data, cfg.fit)
    # Stage 3, here only: one more forward pass per candidate is worth it for the model that
    # ships, not for every trial of the search (which ranks on the two stages).
    refit = refit_head(model, params, run.data, cfg.fit) \
        if cfg.head_refit and result.best_stage == 2 else None

    val = run.data.arrays("val", params.input_size)
    probs_val = predict_probs(model, val.x)
    threshold = calibrate_threshold(probs_val, val.y, classes, unknown=cfg.scan.unknown_name)
    test = run.data.arrays("test", params.input_size)
    probs_test = predict_probs(model, test.x)
    evaluation = evaluate_predictions(test.y, probs_test, classes, views=test.views,
                                      threshold=threshold, unknown=cfg.scan.unknown_name)
    argmax_only = score(test.y, probs_test)

    out = run.root / BEST_DIR
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out / "model.keras")
    (out / "labels.txt").write_text("\n".join(classes) + "\n")
    plot_confusion_matrix(np.array(evaluation["confusion_matrix"]), classes,
                          out / "confusion_matrix.png")
    report = {k: v for k, v in evaluation.items() if k != "report_text"}
    write_json(report, out / "test_report.json")
    (out / "test_report.txt").write_text(format_evaluation(evaluation) + "\n")
    manifest = {
        "schema_version": MANIFEST_SCHEMA,
        "classes": classes,
        "unknown_label": cfg.scan.unknown_name,
        "input": {"shape": [1, params.input_size, params.input_size, 3], "dtype": "float32",
                  "range": "raw RGB 0..255 (preprocessing is inside the model)"},
        "threshold": threshold,
        "metrics": {
            "val": {k: v for k, v in score(val.y, probs_val).items()},
            "test": {k: evaluation[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")},
            "test_ci95": evaluation.get("ci95"),
            "test_without_threshold": argmax_only,
            "test_per_view": evaluation.get("per_view", {}),
            "test_set": split_fingerprint(run.data.split),
            "test_predictions": _test_predictions(
                run.data.split, test, apply_threshold(probs_test, classes, threshold,
                                                      cfg.scan.unknown_name), classes),
        },
        "hyperparameters": params.to_dict(),
        "training": {"epochs_stage1": result.epochs_stage1,
                     "epochs_stage2": result.epochs_stage2, "best_stage": result.best_stage,
                     "seconds": round(result.seconds, 1), "weights": cfg.fit.weights,
                     "seed": cfg.fit.seed, "head_refit": refit},
        "source": {"run": str(run.root), "trial": int(best_row["number"]),
                   "trial_value": float(best_row["value"])},
        "versions": runtime_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(manifest, out / "manifest.json")
    return out, evaluation


def _test_predictions(split_df, test, pred: np.ndarray, classes: list[str]) -> dict:
    """Each test photo's true and predicted class, keyed as the test set's fingerprint keys it
    (`data.photo_ids`): with it, the champion gate compares two releases photo by photo when
    they were tested on the same photos."""
    rows = split_df.set_index("path").loc[list(test.paths)].reset_index()
    _, ids = photo_ids(rows)
    return {i: [classes[t], classes[p]] for i, t, p in zip(ids, test.y, pred)}


def save_model(model, path: Path) -> None:
    """Save to a temporary name and rename, so a crash never leaves a half-written model."""
    tmp = path.with_name(path.stem + ".tmp.keras")
    model.save(tmp)
    os.replace(tmp, path)


def runtime_versions() -> dict:
    """What produced the model: versions, and whether oneDNN's kernels ran (they round
    differently from TensorFlow's own, so a rerun compares only like with like)."""
    import keras
    import tensorflow as tf

    try:  # TensorFlow's own flag; private, so unknown (None) if a release moves it
        from tensorflow.python.util import _pywrap_util_port
        onednn = bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        onednn = None
    return {"personclf_tune": __version__, "tensorflow": tf.__version__,
            "keras": keras.__version__, "onednn": onednn}


def load_manifest(model_path: Path) -> dict:
    """The manifest beside a saved model (`best/manifest.json`, an export or a release)."""
    path = Path(model_path)
    candidates = [path / "manifest.json", path.parent / "manifest.json"]
    for candidate in candidates:
        if candidate.is_file():
            return read_manifest_file(candidate)
    raise UsageError(f"{model_path}: no manifest.json beside the model; pass a run's best/ "
                     "folder or its model.keras")


def read_manifest_file(path: Path) -> dict:
    """A manifest.json as a dict, or a one-line error naming it (hand-edited, truncated)."""
    try:
        manifest = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UsageError(f"{path}: unreadable manifest ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); restore it or "
                         "export again") from None
    if problem := manifest_problem(manifest):
        raise UsageError(f"{path}: not a usable personclf-tune manifest ({problem}); restore "
                         "it or export again")
    return manifest


def manifest_problem(manifest) -> str | None:
    """What makes a parsed manifest unusable, or None. A manifest is a file anyone can edit,
    so every field that predict, evaluate and promote read is checked for its type here, once,
    instead of failing with a traceback where it is used."""
    if not isinstance(manifest, dict):
        return "not a JSON object"
    classes = manifest.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        return "'classes' is not a list of names"
    threshold = manifest.get("threshold", 0.0)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
            or not math.isfinite(threshold):
        return "'threshold' is not a number"
    if not isinstance(manifest.get("unknown_label", "Unknown"), str):
        return "'unknown_label' is not a name"
    formats = manifest.get("formats") or {}  # null: none, as in RUN/best
    if not isinstance(formats, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("file") or "", str)
            for e in formats.values()):
        return "'formats' is not a table of format: {file: name}"
    parity = manifest.get("parity") or {}  # null: no parity record
    if not isinstance(parity, dict) or not isinstance(parity.get("passed", True), bool):
        return "'parity' is not {passed: true or false, ...}"
    for key in ("files", "metrics"):
        if not isinstance(manifest.get(key) or {}, dict):
            return f"{key!r} is not a table"
    return None


def input_size(manifest: dict, where: Path | str = "manifest.json") -> int:
    """The model's square input size: `input.shape` (RUN/best) or `input.size` (an export)."""
    spec = manifest.get("input") or {}
    try:
        return int(spec["shape"][1]) if spec.get("shape") else int(spec["size"])
    except (KeyError, IndexError, TypeError, ValueError):
        raise UsageError(f"{where}: no input size in the manifest; restore it or export "
                         "again") from None


def load_keras_model(model_path: Path):
    """Load a .keras model with safe_mode (no arbitrary code from the file)."""
    import keras

    path = Path(model_path)
    if path.is_dir():
        path = path / "model.keras"
    if not path.is_file():
        raise UsageError(f"{model_path}: no such model file; pass RUN/best/model.keras")
    try:
        return keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"{path}: cannot load model ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def evaluate_model(model_path: Path, data_dir: Path, no_face_policy: str = "member",
                   no_face_folders: tuple[str, ...] = ()) -> dict:
    """Run a saved model on any folder with the dataset layout and report it.

    Folders of people the model does not know count as Unknown: the right answer for them is
    to reject (by the Unknown class or by the threshold).
    """
    from .pipeline import decode_many
    from .report import evaluate_predictions

    manifest = load_manifest(model_path)
    model = load_keras_model(model_path)
    classes = list(manifest["classes"])
    unknown = manifest.get("unknown_label", "Unknown")
    size = input_size(manifest, model_path)
    scanned = scan(ScanConfig(Path(data_dir), unknown_name=unknown, no_face_policy=no_face_policy,
                              no_face_folders=no_face_folders))
    if scanned.images.empty:
        raise UsageError(f"{data_dir}: no usable images to evaluate")
    frame = scanned.images.sort_values("path").reset_index(drop=True)
    eval_classes = classes if unknown in classes else classes + [unknown]
    index = {c: i for i, c in enumerate(eval_classes)}
    y = np.array([index.get(label, index[unknown]) for label in frame["label"]], dtype=np.int32)
    images = decode_many([Path(data_dir) / p for p in frame["path"]], size)
    probs = predict_probs(model, images)
    if len(eval_classes) > len(classes):
        probs = np.concatenate([probs, np.zeros((len(probs), 1), probs.dtype)], axis=1)
    evaluation = evaluate_predictions(y, probs, eval_classes, views=frame["view"].to_numpy(),
                                      threshold=float(manifest.get("threshold", 0.0)),
                                      unknown=unknown)
    strangers = sorted(set(frame["label"]) - set(classes))
    evaluation["unknown_folders"] = strangers
    evaluation["unknown_folder_images"] = int(frame["label"].isin(strangers).sum())
    evaluation["known_people_present"] = sorted(set(frame["label"]) & (set(classes) - {unknown}))
    evaluation["skipped"] = scanned.skipped
    return evaluation
