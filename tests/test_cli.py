"""CLI errors a user can fix: one line on stderr, exit status 2, no traceback, no run left behind.

`cli.main([...])` is called in-process (capsys sees exactly what a user would read; TensorFlow's
own C++ logging goes to the file descriptor, not to sys.stderr). Only the ImageNet case builds a
backbone, and it fails at once (no download is possible offline); nothing here trains.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tuner import cli

REPO = Path(__file__).resolve().parents[1]
SPACE = """\
backbones:
  MobileNet: {input_size: [96], alpha: [0.25], freeze_block: [6, 12]}
hyperparameters:
  dense_units: {choice: [0, 64]}
  batch_size: 32
"""


def finish_one_trial(run: Path) -> None:
    """A run directory whose journal holds a finished trial: its settings are then fixed."""
    import optuna

    from tuner.search import STUDY_JOURNAL
    from tuner.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="personclf", direction="maximize",
                                storage=open_storage(f"journal:{run / STUDY_JOURNAL}"))
    study.tell(study.ask(), 0.5)


def error_line(capsys) -> str:
    """The single line the CLI wrote to stderr (and nothing that looks like a traceback)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("personclf-tune: error: "), err
    return lines[0]


@pytest.fixture
def data(sample_dir, tmp_path) -> Path:
    """3 classes x 10 images: enough for a split, never trained on here."""
    dst = tmp_path / "data"
    for person in ("Colin_Powell", "Donald_Rumsfeld", "Unknown"):
        (dst / person).mkdir(parents=True)
        for f in sorted((sample_dir / person).iterdir())[:10]:
            shutil.copy2(f, dst / person / f.name)
    return dst


@pytest.fixture
def space(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(SPACE)
    return path


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Every test runs in an empty directory: nothing may be written into the repository."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def test_missing_default_dataset(in_tmp, capsys):
    assert cli.main(["--trials", "1"]) == 2
    line = error_line(capsys)
    assert "--data dataset: no such folder" in line
    assert list(in_tmp.iterdir()) == [], "a refused search must not create a run directory"


def test_verbose_flag_first_still_means_search(in_tmp, capsys):
    assert cli.main(["-v", "--trials", "1"]) == 2
    assert "--data dataset: no such folder" in error_line(capsys)


def test_missing_data_dir_named(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert cli.main(["search", "--data", str(missing)]) == 2
    assert f"--data {missing}: no such folder" in error_line(capsys)


def test_missing_space_file(data, tmp_path, capsys):
    run = tmp_path / "RUN"
    assert cli.main(["--data", str(data), "--space", str(tmp_path / "nope.yaml"),
                     "--output", str(run)]) == 2
    line = error_line(capsys)
    assert "--space" in line and "nope.yaml" in line
    assert not run.exists()


def test_invalid_space_file(data, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SPACE.replace("dense_units:", "dense_unitz:"))
    run = tmp_path / "RUN"
    assert cli.main(["--data", str(data), "--space", str(bad), "--output", str(run)]) == 2
    line = error_line(capsys)
    assert "bad.yaml:" in line and "dense_unitz" in line
    # The refused run leaves nothing behind: the corrected command is not "different", and
    # no empty run directory is left over.
    assert not run.exists()


def test_unknown_backbone(data, space, in_tmp, capsys):
    # Without --output the run gets a new results/run-NNN, so resuming needs its name.
    assert cli.main(["--data", str(data), "--space", str(space),
                     "--backbones", "MobileNet,Nope"]) == 2
    out, err = capsys.readouterr()
    assert "run directory: results/run-001  (rerun with --output results/run-001 to resume)" in out
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "--backbones Nope: unknown backbone 'Nope'" in err and "MobileNet" in err
    assert not (in_tmp / "results/run-001").exists()  # refused before anything was written


def test_backbone_not_in_space(data, space, tmp_path, capsys):
    run = tmp_path / "RUN"
    assert cli.main(["--data", str(data), "--space", str(space), "--backbones", "ResNet50",
                     "--output", str(run)]) == 2
    assert "'ResNet50' is not in this search space" in error_line(capsys)
    assert not run.exists()


@pytest.mark.parametrize("flag,value,message", [
    ("--near-duplicate-distance", "-3", "--near-duplicate-distance -3: must be between 0 and 64"),
    ("--test-fraction", "0", "--test-fraction 0.0: must be above 0 and below 1"),
    ("--workers", "0", "--workers 0: must be at least 1"),
    ("--group-pattern", "Unknown/(", "--group-pattern 'Unknown/(': not a regular expression"),
])
def test_out_of_range_flags_are_named(data, flag, value, message, in_tmp, capsys):
    assert cli.main(["--data", str(data), flag, value]) == 2
    assert message in error_line(capsys)
    assert list(in_tmp.iterdir()) == []


def test_missing_weights_file(data, space, tmp_path, capsys):
    run = tmp_path / "RUN"
    assert cli.main(["--data", str(data), "--space", str(space), "--weights",
                     str(tmp_path / "missing.h5"), "--output", str(run)]) == 2
    line = error_line(capsys)
    assert "--weights" in line and "missing.h5: no such file" in line
    assert not run.exists()


def test_imagenet_weights_unavailable_offline(data, tmp_path, monkeypatch, capsys):
    """No cached file and no network: the one-line WeightsError, not a download traceback."""
    home = tmp_path / "empty_keras_home"
    home.mkdir()
    monkeypatch.setenv("KERAS_HOME", str(home))
    space = tmp_path / "half.yaml"
    space.write_text(SPACE.replace("input_size: [96], alpha: [0.25]",
                                   "input_size: [128], alpha: [0.5]"))
    run = tmp_path / "RUN"
    assert cli.main(["--data", str(data), "--space", str(space), "--weights", "imagenet",
                     "--trials", "2", "--output", str(run)]) == 2
    line = error_line(capsys)
    assert "MobileNet alpha 0.5 at 128 px" in line
    assert "mobilenet_5_0_128_tf_no_top.h5" in line and str(home) in line
    assert "--weights PATH" in line
    # The search stopped at the first trial instead of failing every trial the same way.
    trials = (run / "trials.csv").read_text().splitlines()
    assert len(trials) == 2 and ",FAIL," in trials[1]


@pytest.mark.parametrize("flag, value, message", [
    ("--augment-views", "0", "--augment-views 0: must be at least 1"),
    ("--cache-memory-mb", "-1", "--cache-memory-mb -1: must be 0 or more"),
    ("--max-failures", "0", "--max-failures 0: must be at least 1"),
    ("--cache-memory-mb", "nan", "--cache-memory-mb nan: must be 0 or more"),
    ("--max-epochs-stage2", "-1", "--max-epochs-stage2 -1: must be 0 or more"),
    ("--seed", "-1", "--seed -1: must be between 0 and"),
    ("--storage", "notaurl", "--storage notaurl: give a database URL"),
])
def test_bad_search_flags(data, space, tmp_path, capsys, flag, value, message):
    run = tmp_path / "RUN"
    assert cli.main(["--data", str(data), "--space", str(space), flag, value,
                     "--output", str(run)]) == 2
    assert message in error_line(capsys)
    assert not run.exists()


def test_a_refused_start_leaves_no_settings_so_the_fixed_command_runs(data, space, tmp_path,
                                                                       sample_dir, capsys):
    """A dataset that cannot be split is refused before config.json exists: the corrected
    command (here another no-face policy) is not then refused as "different settings"."""
    (data / "Carol" / "no_face").mkdir(parents=True)
    for f in sorted((sample_dir / "Tony_Blair").iterdir())[:1]:  # one face photo
        shutil.copy2(f, data / "Carol" / f"face_{f.name}")
    for f in sorted((data / "Colin_Powell").iterdir())[:3]:
        (data / "Colin_Powell" / f.name).rename(data / "Carol" / "no_face" / f.name)
    run = tmp_path / "RUN"
    argv = ["--data", str(data), "--space", str(space), "--output", str(run), "--trials", "1"]
    assert cli.main([*argv, "--no-face-policy", "skip"]) == 2
    assert "class 'Carol' has 1 distinct usable image(s)" in error_line(capsys)
    assert not (run / "config.json").exists() and not (run / "split.csv").exists()
    from tuner.config import FitConfig, ScanConfig, SearchConfig
    from tuner.search import prepare

    config = SearchConfig(data_dir=data, run_dir=run, space=space,
                          scan=ScanConfig(data, no_face_policy="member"), fit=FitConfig())
    prepare(config)  # scans, splits and writes config.json: no "different settings"
    assert (run / "config.json").is_file() and (run / "split.csv").is_file()


def test_output_inside_the_dataset_is_refused(data, space, capsys):
    assert cli.main(["--data", str(data), "--space", str(space),
                     "--output", str(data / "results")]) == 2
    assert "inside the dataset folder" in error_line(capsys)
    assert not (data / "results").exists()


def test_bad_choice_is_argparse_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--engine", "grid"])
    assert exc.value.code == 2
    assert "invalid choice: 'grid'" in capsys.readouterr().err


def test_report_without_run(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "no config.json" in error_line(capsys)


def test_evaluate_without_manifest(data, tmp_path, capsys):
    out = tmp_path / "out.json"
    assert cli.main(["evaluate", str(tmp_path), "--data", str(data), "--json", str(out)]) == 2
    assert "no manifest.json" in error_line(capsys)
    assert not out.exists()


def test_python_dash_m_entry_point(tmp_path):
    """`python -m tuner.cli` is the same program: exit 2 and exactly one line on stderr."""
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "tuner.cli", "--data", str(tmp_path / "nope")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"personclf-tune: error: --data {tmp_path / 'nope'}: no such folder")
    assert not (tmp_path / "nope").exists() and not (tmp_path / "results").exists()
    version = subprocess.run([sys.executable, "-m", "tuner.cli", "--version"], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("personclf-tune ")


def test_tensorflows_notes_are_filtered_and_everything_else_passes(capfd, monkeypatch):
    import glob

    from tuner import quiet

    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    cuda = b"E0000 00:00:1.2 8350 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR\n"
    with quiet.notes_filtered():
        os.write(2, cuda)
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are "
                    b"written to STDERR\n")
        os.write(2, b"I0000 00:00:1.2 7974 cudart_stub.cc:31] Could not find cuda drivers on "
                    b"your machine, GPU will not be used.\n")
        os.write(2, b"F0000 something real went wrong\n")
        os.write(2, b"fully_quantize: 0, inference_type: 6, input_inference_type: UINT8\n")
    gpu = glob.glob("/dev/nvidia[0-9]*")  # only there is CUDA failing to start news
    assert capfd.readouterr().err == (cuda.decode() if gpu else "") + \
        "F0000 something real went wrong\n"
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")  # the user asked for everything
    with quiet.notes_filtered():
        os.write(2, cuda)
    assert capfd.readouterr().err == cuda.decode()


def test_the_cli_hides_tensorflows_loading_notes_unless_asked(tmp_path):
    """The CLI's `import tensorflow` prints nothing but real errors; TF_CPP_MIN_LOG_LEVEL=0
    shows TensorFlow's notes again."""
    from tuner import quiet

    code = "import sys; import tuner.cli; import tensorflow; print('imported', file=sys.stderr)"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])

    def notes(level: str | None) -> list[str]:
        run_env = env if level is None else {**env, "TF_CPP_MIN_LOG_LEVEL": level}
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=run_env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "imported" in proc.stderr, proc.stderr
        return [line for line in proc.stderr.splitlines() if quiet.NOTES.search(line)]

    loud = notes("0")
    if not loud:
        pytest.skip("this TensorFlow build prints no loading notes on this machine")
    assert notes(None) == []


def test_head_refit_is_on_unless_turned_off_and_not_part_of_a_runs_identity(data, space,
                                                                            tmp_path):
    argv = ["search", "--data", str(data), "--space", str(space), "--output", str(tmp_path / "r")]
    on = cli.search_config(cli.build_parser().parse_args(argv))
    off = cli.search_config(cli.build_parser().parse_args([*argv, "--no-head-refit"]))
    assert on.head_refit and not off.head_refit
    # It only changes the final retrain, so a run resumes with or without it.
    assert on.identity() == off.identity()


def test_stage2_warmup_flag_is_part_of_a_runs_identity_and_old_runs_resume(data, space,
                                                                            tmp_path, capsys):
    from tuner.search import _check_config
    from tuner.errors import UsageError

    run = tmp_path / "r"
    argv = ["search", "--data", str(data), "--space", str(space), "--output", str(run)]
    default = cli.search_config(cli.build_parser().parse_args(argv))
    off = cli.search_config(cli.build_parser().parse_args([*argv, "--stage2-warmup-epochs",
                                                           "0"]))
    assert default.fit.warmup_epochs_stage2 == 1 and off.fit.warmup_epochs_stage2 == 0
    # It changes what every trial trains, so a run resumes only with the same value.
    assert default.identity() != off.identity()
    assert cli.main([*argv, "--stage2-warmup-epochs", "-1"]) == 2
    line = capsys.readouterr().err.strip()
    assert len(line.splitlines()) == 1 and "--stage2-warmup-epochs -1" in line

    # A run directory written before the setting existed trained stage 2 at the full rate
    # from its first step: it resumes with --stage2-warmup-epochs 0 and is refused with the
    # new default, naming the setting.
    run.mkdir()
    finish_one_trial(run)
    old = off.identity()
    del old["fit"]["warmup_epochs_stage2"]
    (run / "config.json").write_text(json.dumps({**old, "version": 1}))
    _check_config(off, run / "config.json")
    with pytest.raises(UsageError, match=r"fit\.warmup_epochs_stage2"):
        _check_config(default, run / "config.json")
    # Likewise --group-pattern (such a directory split photo by photo) and --no-face-folder
    # (it read every nested folder as no-face): the old default resumes, a new value is refused.
    for key, flag, value in (("group_pattern", "--group-pattern", "^Unknown/(.+)_"),
                             ("no_face_folders", "--no-face-folder", "no_face")):
        del old["scan"][key]
        (run / "config.json").write_text(json.dumps({**old, "version": 1}))
        _check_config(off, run / "config.json")
        given = cli.search_config(cli.build_parser().parse_args(
            [*argv, "--stage2-warmup-epochs", "0", flag, value]))
        with pytest.raises(UsageError, match=re.escape(f"(scan.{key} ({flag}))")):
            _check_config(given, run / "config.json")


def test_reports_are_never_written_into_the_dataset_and_bad_run_configs_are_one_line(
        data, tmp_path, capsys):
    """`evaluate --json` and `report --output` check where they write, as `data` does, before
    any work: inside the dataset, a report would become a "person" at the next scan."""
    def refused(argv, message):
        assert cli.main([str(a) for a in argv]) == 2
        line = error_line(capsys)
        assert message in line, line

    refused(["evaluate", tmp_path / "no_model", "--data", data, "--json", data / "eval.json"],
            f"--json {data / 'eval.json'}: inside the dataset folder")
    refused(["evaluate", tmp_path / "no_model", "--data", data, "--json", tmp_path],
            f"--json {tmp_path}: is a folder; give a file name")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data_dir": str(data)}))
    refused(["report", run, "--output", data / "out"], "--output " + str(data / "out") +
            ": inside the dataset folder")
    assert not (data / "out").exists()
    (run / "config.json").write_text('{"data_dir": ')
    refused(["report", run], f"{run / 'config.json'}: unreadable (JSONDecodeError)")


def test_an_output_that_is_a_file_and_a_report_before_any_trial_are_one_line(data, space,
                                                                             tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for output, message in ((afile, f"--output {afile}: is a file; give a folder"),
                            (afile / "sub", f"--output {afile / 'sub'}: cannot create it")):
        assert cli.main(["--data", str(data), "--space", str(space), "--output",
                         str(output)]) == 2
        assert message in error_line(capsys)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data_dir": str(data)}))
    assert cli.main(["report", str(run), "--output", str(afile)]) == 2
    assert f"--output {afile}: is a file; give a folder" in error_line(capsys)
    # Interrupted before its first trial: nothing to report, and nothing written.
    assert cli.main(["report", str(run)]) == 2
    assert f"{run}: no trial has started yet; rerun the search to continue it" in \
        error_line(capsys)
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]


def test_a_space_file_edited_between_two_starts_is_refused(data, space, tmp_path):
    """The run records its space by content: the same path with other values would mix two
    spaces in one leaderboard. Comments and layout do not count."""
    from tuner.errors import UsageError
    from tuner.search import _check_config

    run = tmp_path / "r"
    argv = ["search", "--data", str(data), "--space", str(space), "--output", str(run)]
    first = cli.search_config(cli.build_parser().parse_args(argv))
    run.mkdir()
    finish_one_trial(run)
    _check_config(first, run / "config.json")
    space.write_text("# a comment\n" + space.read_text() + "\n\n")
    _check_config(cli.search_config(cli.build_parser().parse_args(argv)), run / "config.json")
    space.write_text(space.read_text().replace("[96]", "[128]"))
    assert "[128]" in space.read_text()
    with pytest.raises(UsageError, match=r"\(space_content \(the --space file was edited\)\)"):
        _check_config(cli.search_config(cli.build_parser().parse_args(argv)),
                      run / "config.json")
    # A run directory from before the content was recorded resumes on its path alone.
    saved = json.loads((run / "config.json").read_text())
    del saved["space_content"]
    (run / "config.json").write_text(json.dumps(saved))
    _check_config(cli.search_config(cli.build_parser().parse_args(argv)), run / "config.json")


def test_a_run_whose_first_start_finished_no_trial_takes_new_settings(data, space, tmp_path,
                                                                      caplog):
    """Offline without ImageNet weights, a first start stops at its first trial; the error
    says to pass --weights PATH, and that rerun on the same --output used to be refused as
    "different settings". With no trial finished there is nothing to lose: it starts again."""
    from tuner.errors import UsageError
    from tuner.search import STUDY_JOURNAL, _check_config

    run = tmp_path / "r"
    argv = ["search", "--data", str(data), "--space", str(space), "--output", str(run)]
    first = cli.search_config(cli.build_parser().parse_args(argv))
    run.mkdir()
    _check_config(first, run / "config.json")
    (run / "split.csv").write_text("left by the first start\n")
    other = cli.search_config(cli.build_parser().parse_args([*argv, "--weights", "none"]))
    _check_config(other, run / "config.json")
    assert "no trial had finished there; starting it again with the new settings " \
           "(fit.weights (--weights))" in caplog.text
    assert json.loads((run / "config.json").read_text())["fit"]["weights"] is None
    assert not (run / "split.csv").exists()
    # Once a trial has finished, the settings are the run's.
    finish_one_trial(run)
    assert (run / STUDY_JOURNAL).is_file()
    with pytest.raises(UsageError, match=r"different settings \(fit\.weights \(--weights\)\)"):
        _check_config(first, run / "config.json")


def test_a_weights_file_with_a_space_of_several_backbones_is_refused_at_the_start(
        data, tmp_path, capsys, mobilenet_025_weights):
    two = tmp_path / "two.yaml"
    two.write_text("backbones:\n  MobileNet: {input_size: [96], alpha: [0.25, 0.5]}\n")
    run = tmp_path / "r"
    assert cli.main(["--data", str(data), "--space", str(two), "--weights",
                     str(mobilenet_025_weights), "--output", str(run)]) == 2
    assert "a weights file fits one backbone at one width, but the space has 2 (MobileNet " \
           "alpha 0.25, MobileNet alpha 0.5); narrow it with --backbones" in error_line(capsys)
    assert not run.exists()


def test_a_run_directory_it_cannot_write_is_one_line(data, space, tmp_path, capsys):
    """A run made by root in Docker and resumed as oneself: its lock file cannot be opened
    (here the lock is a folder, which root cannot write either)."""
    run = tmp_path / "run"
    (run / ".lock").mkdir(parents=True)
    assert cli.main(["--data", str(data), "--space", str(space), "--output", str(run)]) == 2
    assert f"--output {run}: cannot write there" in error_line(capsys)
