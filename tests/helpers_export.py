"""A real, small run directory for the export and deploy tests, made once per test session.

`trained_run` builds what a search leaves behind (split.csv, config.json, best/ written by
`best.retrain_best`) from the bundled sample with the shared MobileNet 0.25 weights at 96 px,
training the head for a few epochs: a genuine model in well under a minute on two cores.
`exported_run` exports it once to every format. Tests must treat both as read-only (copy first).
`trained_run` takes another dataset, weights and hyperparameters under another `key`.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

_CACHE: dict[str, Path] = {}

PARAMS = dict(backbone="MobileNet", alpha=0.25, input_size=96, dense_units=0, dropout=0.1,
              augment=0.0, lr_stage1=1e-2, batch_size=16, label_smoothing=0.0)
EPOCHS = 15


def trained_run(root: Path, data_dir: Path, weights: Path, params: dict | None = None,
                epochs: int = EPOCHS, key: str = "run", seed: int = 42) -> Path:
    """RUN with split.csv, config.json and best/{model.keras, manifest.json, labels.txt}, trained
    on `data_dir` (the bundled sample unless a test passes another dataset)."""
    if key in _CACHE:
        return _CACHE[key]
    import keras

    from tuner.best import retrain_best
    from tuner.config import FitConfig, ScanConfig, SearchConfig, SplitConfig
    from tuner.data import scan, split, write_json, write_split
    from tuner.pipeline import ImageCache
    from tuner.search import Run
    from tuner.trial import TrialData

    run_dir = Path(root) / key
    config = SearchConfig(
        data_dir=data_dir, run_dir=run_dir, trials=1, scan=ScanConfig(data_dir),
        split=SplitConfig(seed=seed),
        fit=FitConfig(max_epochs_stage1=epochs, max_epochs_stage2=0, patience=epochs,
                      weights=str(weights), seed=seed))
    run_dir.mkdir(parents=True)
    write_json({**config.identity(), "version": 1}, run_dir / "config.json")
    frame = split(scan(config.scan).images, config.split)
    write_split(frame, run_dir / "split.csv")
    classes = sorted(frame["label"].unique().tolist())
    data = TrialData(frame, classes, ImageCache(data_dir), "balanced")
    keras.utils.set_random_seed(seed)
    retrain_best(Run(config, None, data), {**(params or PARAMS), "number": 0, "value": 0.0})
    _CACHE[key] = run_dir
    return run_dir


def exported_run(root: Path, sample_dir: Path, weights: Path):
    """The trained run exported to every format once; returns (run_dir, ExportResult)."""
    if "export" in _CACHE:
        return _CACHE["run"], _CACHE["export"]
    from tuner.export import export_run

    run_dir = trained_run(root, sample_dir, weights)
    _CACHE["export"] = export_run(run_dir)
    return run_dir, _CACHE["export"]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fake_export(folder: Path, balanced_accuracy: float, tag: str = "",
                classes=("A", "B", "Unknown"), test_set: dict | None = None,
                ci95: list[float] | None = None, predictions: dict | None = None) -> Path:
    """An export folder with small files and a valid manifest (no TensorFlow): for deploy tests."""
    folder = Path(folder)
    (folder / "saved_model").mkdir(parents=True, exist_ok=True)
    contents = {"model_int8.tflite": b"int8 " + tag.encode() * 100,
                "model_float32.tflite": b"float " + tag.encode() * 100,
                "saved_model/saved_model.pb": b"pb " + tag.encode(),
                "labels.txt": "".join(f"{c}\n" for c in classes).encode()}
    for rel, data in contents.items():
        (folder / rel).write_bytes(data)
    manifest = {"schema_version": 1, "kind": "personclf-tune export", "tag": tag,
                "classes": list(classes), "threshold": 0.5,
                "metrics": {"test": {"balanced_accuracy": balanced_accuracy},
                            **({"test_set": test_set} if test_set else {}),
                            **({"test_ci95": {"balanced_accuracy": ci95}} if ci95 else {}),
                            **({"test_predictions": predictions} if predictions else {})},
                "parity": {"passed": True},
                "files": {rel: sha256(folder / rel) for rel in sorted(contents)}}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    os.utime(folder)
    return folder
