"""The whole search through the CLI: files of a run, report, evaluate, resume, kill, engines;
and the Optuna driver's bookkeeping of dead, orphaned and surplus trials (no training).

The slow tests train real (tiny) models: MobileNet alpha 0.25 at 96 px on 3 classes x 12 images,
one epoch per stage, with the shared ImageNet weights file. The expensive Optuna run is made
once per module and copied where a test changes it. Every output goes under pytest's tmp_path
(the tests also run from a temporary working directory, so a stray relative path cannot land in
the repository).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_SPACE, copy_people, tiny_search_dir
from tuner import cli
from tuner.data import split_fingerprint
from tuner.report import PARAM_COLUMNS

REPO = Path(__file__).resolve().parents[1]
PEOPLE = ("Colin_Powell", "Donald_Rumsfeld")
PER_CLASS = 12
STUDY = "personclf"
FILES = ("config.json", "scan.json", "split.csv", "study.journal", "cache", "trials.csv",
         "leaderboard.md", "backbones.md", "history.png", "importances.png")
BEST_FILES = ("model.keras", "manifest.json", "labels.txt", "test_report.json",
              "test_report.txt", "confusion_matrix.png")


@pytest.fixture(scope="module")
def work(tmp_path_factory, sample_dir, mobilenet_025_weights):
    """A temporary working directory with the small dataset and the tiny search space."""
    root = tmp_path_factory.mktemp("search")
    data, space = tiny_search_dir(root, sample_dir, PEOPLE, PER_CLASS)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
        yield SimpleNamespace(root=root, data=data, space=space,
                              weights=Path(mobilenet_025_weights))


def search_argv(work, out: Path, trials: int, *extra: str) -> list[str]:
    # The first argument is a flag: `search` is implied, as on the command line.
    return ["--data", str(work.data), "--trials", str(trials), "--space", str(work.space),
            "--max-epochs", "1", "--weights", str(work.weights), "--output", str(out), *extra]


def call(argv: list[str]) -> tuple[int, str, str]:
    """`cli.main(argv)` with its stdout and stderr captured (usable in module fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def load_study(run: Path):
    import optuna

    from tuner.storage import open_storage

    return optuna.load_study(study_name=STUDY,
                             storage=open_storage(f"journal:{run / 'study.journal'}"))


def best_row(trials: pd.DataFrame) -> pd.Series:
    complete = trials[trials["state"] == "COMPLETE"]
    return complete.sort_values(["value", "number"], ascending=[False, True]).iloc[0]


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("personclf-tune: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def optuna_run(work):
    """One Optuna search of 3 trials with the best retrained (made once, read by several tests)."""
    run = work.root / "RUN"
    argv = search_argv(work, run, 3)
    code, out, err = call(argv)
    assert code == 0, out + err
    return SimpleNamespace(root=run, argv=argv, stdout=out)


# -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_end_to_end(work, optuna_run, sample_dir, tmp_path, capsys):
    import keras

    run = optuna_run.root
    for name in FILES:
        assert (run / name).exists(), f"{name} missing from the run directory"
    for name in BEST_FILES:
        assert (run / "best" / name).is_file(), f"best/{name} missing"
    assert list((run / "cache").glob("*.npy")), "decoded images were not cached"
    assert "results in" in optuna_run.stdout and "Best trial" in optuna_run.stdout

    # trials.csv: one row per trial, every hyperparameter and bookkeeping column filled.
    trials = pd.read_csv(run / "trials.csv")
    assert trials["number"].tolist() == [0, 1, 2]
    assert set(trials["state"]) <= {"COMPLETE", "PRUNED"}
    assert (trials["state"] == "COMPLETE").any()
    for col in [*PARAM_COLUMNS, "stage1_best", "stage2_best", "epochs_stage1", "epochs_stage2",
                "seconds", "params", "value", "val_balanced_accuracy"]:
        assert col in trials.columns, col
        done = trials[trials["state"] == "COMPLETE"]
        assert done[col].notna().all(), f"{col} is empty for a completed trial"
    assert (trials["backbone"] == "MobileNet").all()
    assert (trials["input_size"] == 96).all() and (trials["alpha"] == 0.25).all()
    # Completed trials ran --max-epochs 1 per stage; a pruned one (stopped where stage 1 ends,
    # below both completed trials) records no epochs.
    done = trials[trials["state"] == "COMPLETE"]
    assert (done["epochs_stage1"] == 1).all() and (done["epochs_stage2"] == 1).all()
    assert (trials["seconds"] > 0).all() and (done["params"] > 100_000).all()
    assert trials["lr_stage1"].between(3e-3, 2e-2).all()
    assert trials[["dropout", "lr_stage1", "lr_stage2"]].drop_duplicates().shape[0] == 3

    # The tables name the best trial (highest objective, earliest on ties).
    best = best_row(trials)
    number = int(best["number"])
    leaderboard = (run / "leaderboard.md").read_text()
    assert f"Best: trial {number} (MobileNet)" in leaderboard
    backbones = (run / "backbones.md").read_text()
    row = next(line for line in backbones.splitlines() if line.startswith("| MobileNet"))
    assert [c.strip() for c in row.strip("|").split("|")][1] == str(number)

    # The manifest describes the retrained best trial.
    manifest = json.loads((run / "best" / "manifest.json").read_text())
    classes = sorted([*PEOPLE, "Unknown"])
    assert manifest["classes"] == classes
    assert (run / "best" / "labels.txt").read_text().split() == classes
    assert manifest["input"]["shape"] == [1, 96, 96, 3]
    assert 0.0 <= manifest["threshold"] <= 1.0
    assert set(manifest["metrics"]["test"]) == {"accuracy", "balanced_accuracy", "macro_f1"}
    assert set(manifest["metrics"]["val"]) >= {"accuracy", "balanced_accuracy", "macro_f1"}
    split_rows = pd.read_csv(run / "split.csv", dtype=str, na_filter=False)
    test_set = manifest["metrics"]["test_set"]  # which photos the champion gate compares on
    assert test_set == split_fingerprint(split_rows) and test_set["by"] == "content"
    test_report = json.loads((run / "best" / "test_report.json").read_text())
    assert test_set["images"] == (split_rows["split"] == "test").sum() == test_report["n"]
    assert manifest["metrics"]["test_ci95"] == test_report["ci95"]
    # Each test photo's prediction, keyed by content: the ones the test accuracy scored.
    rows = manifest["metrics"]["test_predictions"]
    tested = split_rows[split_rows["split"] == "test"]
    assert sorted(rows) == sorted(tested["sha256"].str[:16])
    assert [rows[h][0] for h in tested["sha256"].str[:16]] == tested["label"].tolist()
    assert np.mean([t == p for t, p in rows.values()]) == pytest.approx(
        manifest["metrics"]["test"]["accuracy"])
    for name, (low, high) in test_report["ci95"].items():
        assert low <= manifest["metrics"]["test"][name] <= high, name
    assert manifest["source"]["trial"] == number
    assert manifest["source"]["trial_value"] == pytest.approx(float(best["value"]))
    hyper = manifest["hyperparameters"]
    for name in PARAM_COLUMNS:
        expected = best[name]
        if isinstance(expected, str):
            assert hyper[name] == expected, name
        else:
            assert hyper[name] == pytest.approx(float(expected)), name
    assert set(manifest["versions"]) >= {"personclf_tune", "tensorflow", "keras", "onednn"}
    assert isinstance(manifest["versions"]["onednn"], bool)  # known in this TensorFlow
    # Stage 3, the head refit, ran where stage 2 won; the saved model scores on validation
    # what it recorded (the refit's head if it helped, stage 2's if not).
    training = manifest["training"]
    refit = training["head_refit"]
    assert (refit is None) == (training["best_stage"] == 1)
    if refit is not None:
        assert refit["after"] >= refit["before"]
        kept = refit["after"] if refit["kept"] else refit["before"]
        assert manifest["metrics"]["val"]["balanced_accuracy"] == pytest.approx(kept, abs=1e-9)
        assert "Head refit on the tuned backbone: val_balanced_accuracy " \
            f"{refit['before']:.4f}" in optuna_run.stdout
    report = json.loads((run / "best" / "test_report.json").read_text())
    assert report["accuracy"] == pytest.approx(manifest["metrics"]["test"]["accuracy"])

    # The model loads without arbitrary code and takes raw 0..255 RGB.
    model = keras.saving.load_model(run / "best" / "model.keras", safe_mode=True)
    probs = model.predict(np.full((2, 96, 96, 3), 128.0, np.float32), verbose=0)
    assert probs.shape == (2, 3) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)

    # The test split is held out: no test image (or near-duplicate group) in train or val.
    split = pd.read_csv(run / "split.csv")
    assert set(split["split"]) == {"train", "val", "test"}
    test = split[split["split"] == "test"]
    chosen = split[split["split"] != "test"]
    assert not set(test["path"]) & set(chosen["path"])
    assert not set(test["group"]) & set(chosen["group"])
    assert report["n"] == len(test)

    # `report RUN` regenerates the files from the study alone and prints the backbone table.
    before = pd.read_csv(run / "trials.csv")
    for name in ("leaderboard.md", "backbones.md", "history.png", "trials.csv"):
        (run / name).unlink()
    capsys.readouterr()
    assert cli.main(["report", str(run)]) == 0
    printed = capsys.readouterr().out
    for name in ("leaderboard.md", "backbones.md", "history.png", "trials.csv"):
        assert (run / name).is_file(), f"report did not rewrite {name}"
    assert "Backbones:" in printed and "MobileNet" in printed
    assert f"Best trial #{number} (MobileNet)" in printed
    assert f"Best: trial {number} (MobileNet)" in (run / "leaderboard.md").read_text()
    pd.testing.assert_frame_equal(pd.read_csv(run / "trials.csv"), before)

    # `evaluate` on a folder with a person the model never saw: they count as Unknown.
    stranger = "Tony_Blair"
    eval_dir = copy_people(sample_dir, tmp_path / "eval", (*PEOPLE, stranger), 4)
    copy_people(sample_dir, eval_dir, ("Unknown",), 3)
    (eval_dir / stranger / "notes.jpg").write_text("not a photo\n")
    # Two photos kept in an event folder: with --no-face-folder they stay face photos.
    (eval_dir / PEOPLE[0] / "2023").mkdir()
    for f in sorted((eval_dir / PEOPLE[0]).glob("*.jpg"))[:2]:
        f.rename(eval_dir / PEOPLE[0] / "2023" / f.name)
    out = tmp_path / "eval.json"
    assert cli.main(["evaluate", str(run / "best"), "--data", str(eval_dir),
                     "--no-face-folder", "no_face", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"{eval_dir}: {3 * 4 + 3} images")  # not "Test split"
    assert f"1 file(s) in {eval_dir} left out:\n  {stranger}/notes.jpg: not an image: text " \
           "file" in printed
    assert f"1 folder(s) of people the model does not know ({stranger}): their 4 photos" in printed
    assert "none of the model's people" not in printed  # they are there
    ev = json.loads(out.read_text())
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "per_class", "per_view"):
        assert key in ev, key
    assert 0.0 <= ev["accuracy"] <= 1.0
    assert ev["unknown_folders"] == [stranger]
    assert list(ev["per_class"]) == classes  # no class invented for the stranger
    assert ev["per_class"]["Unknown"]["support"] == 4 + 3
    assert ev["per_class"][PEOPLE[0]]["support"] == 4
    assert ev["n"] == 3 * 4 + 3
    assert ev["per_view"]["face"]["n"] == ev["n"]
    assert ev["threshold"] == pytest.approx(manifest["threshold"])


@pytest.mark.slow
def test_threshold_is_calibrated_on_val(optuna_run):
    """The manifest's Unknown threshold is what the val predictions of the saved model give."""
    import keras

    from tuner.data import read_split
    from tuner.pipeline import ImageCache, split_arrays
    from tuner.report import calibrate_threshold

    run = optuna_run.root
    manifest = json.loads((run / "best" / "manifest.json").read_text())
    config = json.loads((run / "config.json").read_text())
    classes = manifest["classes"]
    size = manifest["input"]["shape"][1]
    split = read_split(run / "split.csv", Path(config["data_dir"]))
    cache = ImageCache(Path(config["data_dir"]), run / "cache")
    model = keras.saving.load_model(run / "best" / "model.keras", safe_mode=True, compile=False)

    def probs(which):
        arrays = split_arrays(split, classes, cache, size, which)
        return model.predict(arrays.x.astype(np.float32), verbose=0), arrays.y

    probs_val, y_val = probs("val")
    threshold = manifest["threshold"]
    assert 0.0 <= threshold <= 1.0
    assert threshold == pytest.approx(calibrate_threshold(probs_val, y_val, classes), abs=1e-4)
    # And the val metrics in the manifest are those of the same predictions.
    from tuner.trial import score

    assert manifest["metrics"]["val"]["balanced_accuracy"] == pytest.approx(
        score(y_val, probs_val)["balanced_accuracy"])


@pytest.mark.slow
def test_resume_runs_only_the_missing_trials(work, optuna_run, tmp_path, capsys):
    from optuna.trial import TrialState

    run = tmp_path / "RUN"
    shutil.copytree(optuna_run.root, run)
    before = load_study(run).get_trials()
    assert [t.number for t in before] == [0, 1, 2]

    # A different setting on the same run directory is refused, naming the setting.
    capsys.readouterr()
    assert cli.main(search_argv(work, run, 4, "--seed", "7")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "different settings" in line and "seed" in line and "--output" in line
    other = tmp_path / "other.yaml"
    other.write_text(TINY_SPACE.replace("[0.0, 0.4]", "[0.0, 0.5]"))
    argv = search_argv(work, run, 4)
    argv[argv.index("--space") + 1] = str(other)
    assert cli.main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "space" in line and "seed" not in line
    assert len(load_study(run).trials) == 3, "a refused rerun must not touch the study"

    # The same command with more trials runs exactly the missing one.
    assert cli.main(search_argv(work, run, 4, "--no-retrain")) == 0
    after = load_study(run).get_trials()
    assert [t.number for t in after] == [0, 1, 2, 3]
    for old, new in zip(before, after[:3]):
        assert new.state == old.state and new.value == old.value
        assert new.params == old.params and new.datetime_start == old.datetime_start
        assert new.datetime_complete == old.datetime_complete
    assert after[3].state in (TrialState.COMPLETE, TrialState.PRUNED)
    # A resumed sampler must not replay the draws of the first process.
    assert all(after[3].params != t.params for t in before), "resume repeated a trial"
    trials = pd.read_csv(run / "trials.csv")
    assert trials["number"].tolist() == [0, 1, 2, 3]

    # Asking for as many trials as are finished runs nothing.
    assert cli.main(search_argv(work, run, 4, "--no-retrain")) == 0
    assert len(load_study(run).trials) == 4


@pytest.mark.slow
def test_sigkill_mid_trial_then_resume(work, tmp_path):
    """A worker killed mid-trial: the rerun fails that trial, retries its parameters, keeps the rest."""
    from optuna.trial import TrialState

    run = tmp_path / "RUN"
    trials = 2
    argv = [sys.executable, "-m", "tuner.cli",
            *search_argv(work, run, trials, "--no-retrain", "--max-epochs-stage2", "0")]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    log1 = tmp_path / "first.log"
    journal = run / "study.journal"

    def running_trial_1():
        """Trial 1 as soon as it runs with a worker id and parameters (None before)."""
        if not journal.exists():
            return None
        try:
            study = load_study(run)
        except KeyError:  # the study is not created yet
            return None
        ts = study.get_trials(deepcopy=False)
        if len(ts) < 2 or ts[0].state != TrialState.COMPLETE:
            return None
        t = ts[1]
        if (t.state == TrialState.RUNNING and "worker_pid" in t.system_attrs
                and "trial_params" in t.user_attrs):
            return t
        assert t.state == TrialState.RUNNING, f"trial 1 ended before the kill: {t.state}"
        return None

    with open(log1, "w") as fh:
        proc = subprocess.Popen(argv, cwd=work.root, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        victim = None
        while victim is None:
            assert proc.poll() is None, f"search exited early:\n{log1.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"trial 1 never ran:\n{log1.read_text()[-3000:]}"
            time.sleep(0.2)
            victim = running_trial_1()
        assert victim.system_attrs["worker_pid"] == proc.pid
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    first = load_study(run).get_trials()
    assert [t.state for t in first] == [TrialState.COMPLETE, TrialState.RUNNING]
    assert not (run / "best").exists()

    second = subprocess.run(argv, cwd=work.root, env=env, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    from tuner import quiet  # TensorFlow's routine notes never reach the user

    assert not [line for line in second.stderr.splitlines() if quiet.NOTES.search(line)
                or quiet.NO_GPU_NOTES.search(line)]

    after = load_study(run).get_trials()
    finished = [t for t in after if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == trials
    assert [t.number for t in after] == [0, 1, 2]
    # Trial 0 was kept as it was, not run again.
    assert after[0].state == TrialState.COMPLETE and after[0].value == first[0].value
    assert after[0].datetime_complete == first[0].datetime_complete
    # The killed trial is failed, with the reason, and its parameters were run again.
    killed = after[1]
    assert killed.state == TrialState.FAIL
    assert "died" in killed.system_attrs.get("fail_reason", "")
    retry = after[2]
    assert retry.user_attrs.get("retry_of") == killed.number
    assert retry.params == killed.params
    assert retry.user_attrs["trial_params"] == killed.user_attrs["trial_params"]
    assert retry.system_attrs["worker_pid"] != proc.pid

    table = pd.read_csv(run / "trials.csv")
    assert table["number"].tolist() == [0, 1, 2]
    assert table["state"].tolist()[:2] == ["COMPLETE", "FAIL"]
    assert "died" in str(table.loc[1, "error"])


@pytest.mark.slow
@pytest.mark.parametrize("engine,trials,retrain", [("random", 2, True), ("hyperband", 1, False)])
def test_kerastuner_engines(work, tmp_path, engine, trials, retrain, capsys):
    run = tmp_path / "RUN"
    # Stage 1 only (Hyperband's budget of 2 epochs all goes to it): the engines are under test.
    extra = ["--engine", engine, "--max-epochs-stage2", "0"] + ([] if retrain else ["--no-retrain"])
    code, out, err = call(search_argv(work, run, trials, *extra))
    assert code == 0, out + err
    assert (run / "kerastuner").is_dir()
    table = pd.read_csv(run / "trials.csv")
    # Hyperband with max_epochs 2 is one bracket of two trials: --trials 1 stops it at one.
    assert len(table) == trials
    assert sorted(table["number"]) == list(range(trials))
    assert set(table["state"]) == {"COMPLETE"}
    for number, value in zip(table["number"], table["value"]):  # one line per trial, as Optuna
        assert f"trial {number:>3} COMPLETE MobileNet a0.25@96 " \
               f"val_balanced_accuracy={value:.4f}" in out, out
    for col in [*PARAM_COLUMNS, "value", "stage1_best", "epochs_stage1", "seconds", "params"]:
        assert table[col].notna().all(), col
    assert pd.api.types.is_integer_dtype(table["epochs_stage1"])
    assert pd.api.types.is_integer_dtype(table["params"])
    assert table["epochs_stage2"].eq(0).all()
    if engine == "hyperband":  # its epoch budget replaces --max-epochs
        assert table["epochs_stage1"].eq(2).all()
    assert "MobileNet" in (run / "backbones.md").read_text()
    number = int(best_row(table)["number"])
    assert f"Best: trial {number} (MobileNet)" in (run / "leaderboard.md").read_text()
    if retrain:
        for name in BEST_FILES:
            assert (run / "best" / name).is_file(), name
        manifest = json.loads((run / "best" / "manifest.json").read_text())
        assert manifest["source"]["trial"] == number
        assert 0.0 <= manifest["threshold"] <= 1.0
    else:
        assert not (run / "best").exists()

    # `report` regenerates a KerasTuner run's tables too.
    (run / "backbones.md").unlink()
    (run / "trials.csv").unlink()
    capsys.readouterr()
    assert cli.main(["report", str(run)]) == 0
    assert "MobileNet" in capsys.readouterr().out
    assert "MobileNet" in (run / "backbones.md").read_text()
    pd.testing.assert_frame_equal(pd.read_csv(run / "trials.csv"), table)


def _failing_fit(monkeypatch, fails: set[int]) -> list[int]:
    """Make the trial calls numbered in `fails` (from 0) run out of memory; the rest train."""
    from tuner import trial as trial_module

    real, calls = trial_module.run_two_stages, []

    def fit(*args, **kwargs):
        calls.append(len(calls))
        if calls[-1] in fails:
            raise MemoryError("failed to allocate 3.2 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(trial_module, "run_two_stages", fit)
    return calls


@pytest.mark.slow
def test_trials_failing_in_a_row_stop_the_search(work, tmp_path, monkeypatch):
    """One failure is recorded and the search goes on; --max-failures in a row stop it with one
    line, and the finished trials stay for the rerun."""
    from optuna.trial import TrialState

    run = tmp_path / "RUN"
    calls = _failing_fit(monkeypatch, fails={0, 2, 3})
    argv = search_argv(work, run, 1, "--no-retrain", "--max-failures", "2",
                       "--max-epochs-stage2", "0")
    code, out, err = call(argv)
    assert code == 0, out + err  # trial 0 failed, trial 1 completed: one finished, as asked
    code, out, err = call(argv[:3] + ["2"] + argv[4:])  # --trials 2: two more fail in a row
    assert code == 1, out + err
    lines = err.strip().splitlines()
    assert lines[-1] == ("personclf-tune: failed: 2 trials in a row failed (the last: "
                         "MemoryError: failed to allocate 3.2 GiB); fix the cause and rerun the "
                         "same command: finished trials are kept (--max-failures sets the limit)")
    assert "Traceback" not in err
    assert len(calls) == 4
    states = [t.state for t in load_study(run).get_trials()]
    assert states == [TrialState.FAIL, TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL]


@pytest.mark.slow
def test_kerastuner_failures_in_a_row_stop_the_search(work, tmp_path, monkeypatch):
    calls = _failing_fit(monkeypatch, fails=set(range(10)))
    code, out, err = call(search_argv(work, tmp_path / "RUN", 5, "--engine", "random",
                                      "--no-retrain", "--max-failures", "2"))
    assert code == 1, out + err
    assert len(calls) == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("personclf-tune: failed: 2 trials in a row failed (the last: ")
    assert "MemoryError: failed to allocate 3.2 GiB" in last, err
    assert "Traceback" not in out + err  # KerasTuner's own printing is quieted
    for number in range(2):  # each failure in one line, as with Optuna
        assert re.search(rf"trial +{number} FAIL +MobileNet a0.25@96 FAIL  \(\d+s\)  "
                         "MemoryError: failed to allocate 3.2 GiB", out), out

# -----------------------------------------------------------------------------------------------
# Dead, orphaned and surplus trials: the driver's bookkeeping on a real storage, without training.


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _journal_study(path: Path):
    import optuna

    from tuner.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name=STUDY, direction="maximize",
                               storage=open_storage(f"journal:{path}"))


def _claim(study, trial, pid: int) -> None:
    import socket

    study._storage.set_trial_system_attr(trial._trial_id, "worker_host", socket.gethostname())
    study._storage.set_trial_system_attr(trial._trial_id, "worker_pid", pid)


def test_dead_worker_trial_is_failed_and_retried_at_most_max_retries(tmp_path):
    from optuna.trial import TrialState

    from tuner.storage import MAX_RETRIES, fail_dead_trials

    study = _journal_study(tmp_path / "study.journal")
    dead = study.ask()
    x = dead.suggest_float("x", 0.0, 1.0)
    _claim(study, dead, _dead_pid())
    alive = study.ask()
    alive.suggest_float("x", 0.0, 1.0)
    _claim(study, alive, os.getpid())

    assert fail_dead_trials(study) == [dead.number]
    frozen = study.get_trials()
    assert frozen[dead.number].state == TrialState.FAIL
    assert "died" in frozen[dead.number].system_attrs["fail_reason"]
    assert frozen[alive.number].state == TrialState.RUNNING
    assert fail_dead_trials(study) == []  # nothing twice

    retry = study.ask()  # the requeued parameters come first
    assert retry.user_attrs == {"retry_of": dead.number, "retries": 1}
    assert retry.suggest_float("x", 0.0, 1.0) == x
    # A trial that already used up its retries is failed but not queued again.
    study._storage.set_trial_system_attr(retry._trial_id, "retries", MAX_RETRIES)
    _claim(study, retry, _dead_pid())
    assert fail_dead_trials(study) == [retry.number]
    assert not study.get_trials(states=(TrialState.WAITING,))


def test_orphaned_running_trial_is_failed_after_a_while(tmp_path, monkeypatch):
    """A worker killed between ask() and naming itself must not hold its slot forever."""
    from optuna.trial import TrialState

    from tuner import storage

    study = _journal_study(tmp_path / "study.journal")
    orphan = study.ask()
    assert storage.fail_dead_trials(study) == []  # just started: its worker may be writing
    monkeypatch.setattr(storage, "ORPHAN_SECONDS", 0)
    assert storage.fail_dead_trials(study) == [orphan.number]
    frozen = study.get_trials()[orphan.number]
    assert frozen.state == TrialState.FAIL
    assert "no worker" in frozen.system_attrs["fail_reason"]


def test_a_resume_in_a_new_container_fails_its_predecessors_running_trial(tmp_path):
    """A run killed in one container and resumed in the next (another host name, same
    volume): the trial it left RUNNING names a worker no heartbeat covers, so the resumed
    search waited forever (measured before `_fail_orphans`). Under the run directory's lock,
    before any worker starts, no such trial can be running: it is failed and queued again."""
    from optuna.trial import TrialState

    from tuner.config import SearchConfig
    from tuner.search import _fail_orphans
    from tuner.storage import fail_dead_trials

    config = SearchConfig(data_dir=tmp_path / "data", run_dir=tmp_path / "run")
    config.run_dir.mkdir()
    study = _journal_study(config.run_dir / "study.journal")
    left = study.ask()
    x = left.suggest_float("x", 0.0, 1.0)
    for key, value in (("worker_host", "old-container"), ("worker_pid", 7),
                       ("worker_ns", "boot/pid:[4026531836]")):
        study._storage.set_trial_system_attr(left._trial_id, key, value)
    assert fail_dead_trials(study) == []  # another host: not ours to judge, without the lock
    _fail_orphans(config)
    frozen = study.get_trials()[left.number]
    assert frozen.state == TrialState.FAIL
    assert "left running by worker old-container:7, which is gone" in \
        frozen.system_attrs["fail_reason"]
    retry = study.ask()
    assert retry.user_attrs["retry_of"] == left.number and retry.suggest_float("x", 0, 1) == x


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_rdb_heartbeat_lets_a_dead_worker_trial_fail(tmp_path):
    """ask/tell does not beat by itself: without `_heartbeat` an RDB trial never goes stale."""
    pytest.importorskip("sqlalchemy")
    import optuna
    from optuna.trial import TrialState

    from tuner.storage import fail_dead_trials, heartbeat

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}",
                                         heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(study_name=STUDY, storage=storage, direction="maximize")
    beaten, silent = study.ask(), study.ask()
    with heartbeat(study._storage, beaten._trial_id):
        time.sleep(0.2)
    # Past the grace period (SQLite's clock has whole seconds): the worker "died" after its beat.
    time.sleep(3.5)
    fail_dead_trials(study)
    states = [t.state for t in study.get_trials()]
    assert states[beaten.number] == TrialState.FAIL
    assert states[silent.number] == TrialState.RUNNING  # no beat ever: only age can tell


def test_surplus_trial_steps_back(tmp_path, monkeypatch):
    """Two workers race for the last slot: the later one fails its trial as surplus and stops."""
    from optuna.trial import TrialState

    from tuner import search
    from tuner.config import SearchConfig
    from tuner.space import load_space

    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_SPACE)
    config = SearchConfig(data_dir=tmp_path / "data", run_dir=tmp_path / "RUN", trials=1,
                          space=space)
    config.run_dir.mkdir()
    study = search.open_study(config)
    other = study.ask()  # the other worker's trial, on the last slot
    _claim(study, other, os.getpid())
    real, calls = search.running_trials, []

    def racing(study):  # our check ran before the other worker's ask
        calls.append(1)
        return [] if len(calls) == 1 else real(study)

    monkeypatch.setattr(search, "running_trials", racing)
    run = search.Run(config, load_space(space), SimpleNamespace(classes=["a", "b"]))
    search.run_optuna(run)
    trials = load_study(config.run_dir).get_trials()
    assert [t.state for t in trials] == [TrialState.RUNNING, TrialState.FAIL]
    assert trials[1].system_attrs["fail_reason"] == "surplus"


def test_a_search_reports_the_files_it_leaves_out_and_writes_its_scan(sample_dir, tmp_path,
                                                                     caplog, monkeypatch):
    """A search scans as `data` does, so it says which files it leaves out and why (the first
    ten, the rest in RUN/scan.json) and notes folder names that look like a mistake. A worker of
    `--workers K` says nothing: its parent did, and once the parent has split the data the
    worker does not scan again. No training: only the run's preparation."""
    import tuner.search
    from tuner.config import SearchConfig
    from tuner.search import prepare

    data, space = tiny_search_dir(tmp_path, sample_dir, PEOPLE, PER_CLASS)
    first = sorted((data / PEOPLE[0]).iterdir())[0]
    (data / PEOPLE[0] / "cut.jpg").write_bytes(first.read_bytes()[:600])
    for i in range(11):
        (data / "Unknown" / f"notes_{i:02d}.jpg").write_text("not a photo\n")
    (data / "README.md").write_text("# my photos\n")  # belongs there: in scan.json, not logged
    (data / "stray.jpg").write_bytes(first.read_bytes())  # a photo outside any person's folder
    alike = data / PEOPLE[1].lower().replace("_", " ")  # the same person's other photos
    alike.mkdir()
    for photo in sorted((sample_dir / PEOPLE[1]).iterdir())[PER_CLASS:PER_CLASS + 3]:
        shutil.copy(photo, alike)
    run = tmp_path / "RUN"
    config = SearchConfig(data_dir=data, run_dir=run, trials=1, space=space)
    with caplog.at_level("WARNING", logger="tuner.search"):
        prepare(config, report=False)
    assert caplog.records == [] and not (run / "scan.json").exists()
    with caplog.at_level("WARNING", logger="tuner.search"):
        prepare(config)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"13 file(s) in {data} left out:" in text
    assert "  stray.jpg: not inside a class folder" in text and "README" not in text
    assert f"  {PEOPLE[0]}/cut.jpg: truncated JPEG" in text
    assert "  Unknown/notes_00.jpg: not an image: text file, though named .jpg" in text
    assert f"  ... and 3 more in {run / 'scan.json'}" in text
    assert f"note: folders '{PEOPLE[1]}', '{PEOPLE[1].lower().replace('_', ' ')}' differ only " \
           "in case, spaces or punctuation" in text
    scanned = json.loads((run / "scan.json").read_text())
    assert len(scanned["skipped"]) == 14 and scanned["similar_classes"]

    def no_scan(config):
        raise AssertionError("a worker scanned the dataset again")

    monkeypatch.setattr(tuner.search, "scan", no_scan)
    worker = prepare(config, report=False)
    saved = pd.read_csv(run / "split.csv")
    assert sorted(zip(worker.data.split["path"], worker.data.split["split"])) == \
        sorted(zip(saved["path"], saved["split"]))


def test_a_trial_failed_by_another_worker_is_dropped_not_fatal(tmp_path, monkeypatch):
    """Another worker failed our trial (we missed the grace period): its late result is dropped."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    from tuner import search
    from tuner.config import SearchConfig
    from tuner.space import load_space

    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_SPACE)
    config = SearchConfig(data_dir=tmp_path / "data", run_dir=tmp_path / "RUN", trials=1,
                          space=space)
    config.run_dir.mkdir()
    calls = []

    def failed_elsewhere(study, trial, *args):
        calls.append(trial.number)
        if len(calls) == 1:  # the other worker fails it, then our tell comes too late
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
            raise UpdateFinishedTrialError("trial already finished")
        study.tell(trial, 0.5)
        return {"number": trial.number, "state": "COMPLETE"}

    monkeypatch.setattr(search, "_run_optuna_trial", failed_elsewhere)
    run = search.Run(config, load_space(space), SimpleNamespace(classes=["a", "b"]))
    search.run_optuna(run)
    states = [t.state for t in load_study(config.run_dir).get_trials()]
    assert calls == [0, 1]
    assert states == [TrialState.FAIL, TrialState.COMPLETE]
