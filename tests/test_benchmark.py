"""The speed benchmark script runs end to end and writes what the issue asks for.

A tiny configuration (two people of the sample, MobileNet 0.25 at 96 px, two trials of 2 + 2
epochs): the numbers say nothing about speed here, only that both modes ran the same search.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, tiny_search_dir

pytestmark = pytest.mark.slow


def test_search_speed_benchmark_runs_both_modes_and_writes_its_table(
        tmp_path, sample_dir, mobilenet_025_weights):
    data, space = tiny_search_dir(tmp_path, sample_dir, ["Colin_Powell", "Tony_Blair"], 12)
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "search_speed.py"), "--data", str(data),
         "--space", str(space), "--trials", "2", "--max-epochs", "2", "--patience", "2",
         "--weights", str(mobilenet_025_weights), "--out", str(out)],
        capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "search_speed.json").read_text())
    naive, fast = results["naive"], results["fast"]
    for mode in (naive, fast):
        assert mode["seconds"] > 0 and mode["trials"] == 2 and len(mode["rss_mb"]) == 2
        assert mode["trials_per_hour"] == pytest.approx(2 / mode["seconds"] * 3600, rel=0.01)
        assert 0 < mode["best_val_balanced_accuracy"] <= 1
    assert results["ratio"] == round(fast["trials_per_hour"] / naive["trials_per_hour"], 2)
    assert results["accuracy_gap_points"] == round(
        100 * (naive["best_val_balanced_accuracy"] - fast["best_val_balanced_accuracy"]), 2)
    # Two trials are too few for the pruner (it waits for completed trials), so both modes run
    # the same two trials to the end, and the caches, which compute in float32 what the full
    # model does, change no result.
    assert naive["states"] == fast["states"] == ["COMPLETE", "COMPLETE"]
    for a, b in zip(naive["trial_rows"], fast["trial_rows"]):
        assert a["value"] == pytest.approx(b["value"], abs=1e-3)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3)
    # The training settings are recorded in full, defaults included.
    fit = results["config"]["fit"]
    assert fit["max_epochs_stage1"] == fit["max_epochs_stage2"] == 2
    assert fit["warmup_epochs_stage2"] == 1 and fit["weights"] == str(mobilenet_025_weights)
    # The kernels that ran are recorded, and they are this process's: the children import
    # the package before TensorFlow, as conftest does here, with the same environment.
    from tuner.best import runtime_versions

    onednn = runtime_versions()["onednn"]
    assert isinstance(onednn, bool)
    assert naive["versions"]["onednn"] is fast["versions"]["onednn"] is onednn
    # And the machine, since ratios and values differ between CPUs: the cores this process
    # may use, and the model /proc/cpuinfo names.
    machine = results["config"]["machine"]
    assert machine["cpus"] == len(os.sched_getaffinity(0)) and machine["cpu"]
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as fh:
            assert machine["cpu"] in fh.read()
    table = (out / "search_speed.md").read_text()
    assert "| naive " in table and "| fast " in table and f"{results['ratio']}x" in table
    assert f"machine: {machine['cpu']}, {machine['cpus']} CPUs" in table
    # Each mode's run directory is kept without its caches, and the pruning replay reads the
    # naive study from it: both trials, every step, and how each step ranks them.
    runs = out / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["fast", "naive"]
    assert (runs / "naive" / "study.journal").is_file()
    assert not (runs / "fast" / "cache").exists()
    replay = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "replay_pruning.py"), str(runs / "naive"),
         "--stage1-epochs", "2", "--stage2-epochs", "2"],
        capture_output=True, text=True, timeout=300)
    assert replay.returncode == 0, replay.stderr[-2000:]
    assert "2 complete trials" in replay.stdout
    assert "step 3 (stage 2): +1.00 over 2 trials" in replay.stdout  # the last step is final
    assert "search       stops (trial, step) []" in replay.stdout  # too few trials to judge
