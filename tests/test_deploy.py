"""predict across formats; promote / rollback to a local folder and over ssh."""
from __future__ import annotations

import argparse
import ctypes
import getpass
import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers_export import exported_run, fake_export, sha256
from tuner import deploy, export
from tuner.errors import UsageError


@pytest.fixture(scope="session")
def exported(tmp_path_factory, sample_dir, mobilenet_025_weights):
    return exported_run(tmp_path_factory.getbasetemp() / "personclf_export", sample_dir,
                        mobilenet_025_weights)


def tuner_main(argv) -> int:
    from tuner.cli import main

    return main(argv)


def cli(*argv) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    export.add_cli(sub)
    deploy.add_cli(sub)
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def test_add_cli_registers_the_subcommands():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    deploy.add_cli(sub)
    export.add_cli(sub)
    assert set(sub.choices) == {"predict", "promote", "rollback", "export"}
    args = parser.parse_args(["promote", "RUN", "--to", "h:/p", "--ssh-option=-p2222"])
    assert args.func is deploy.cmd_promote and args.keep == 3 and args.ssh_option == ["-p2222"]


# -- predict --------------------------------------------------------------------------------


def _photos(run: Path, result, min_margin: float = 0.3, count: int = 6) -> list[Path]:
    """Test-split photos on which the Keras model is decisive (int8 may flip near-ties)."""
    from tuner.pipeline import decode_many

    data_dir = Path(json.loads((run / "config.json").read_text())["data_dir"])
    split = pd.read_csv(run / "split.csv")
    paths = [data_dir / p for p in sorted(split[split["split"] == "test"]["path"])]
    probs = export.open_model(result.out_dir / "model.keras").predict(decode_many(paths, 96))
    top2 = np.sort(probs, axis=1)[:, -2:]
    decisive = [p for p, (second, first) in zip(paths, top2) if first - second >= min_margin]
    by_label: dict[str, list[Path]] = {}
    for p in decisive:
        by_label.setdefault(p.parent.name, []).append(p)
    mixed = [p for group in zip(*[iter(g) for g in by_label.values()]) for p in group]
    chosen = (mixed + [p for p in decisive if p not in mixed])[:count]
    assert len(chosen) == count and len({p.parent.name for p in chosen}) >= 2, \
        "too few decisive photos to compare"
    return chosen


def test_predict_gives_the_same_top1_in_every_format(exported, capsys):
    run, result = exported
    photos = _photos(run, result)
    tops = {}
    for name in ("keras", "savedmodel", "tflite", "int8"):
        model = result.out_dir / export.FORMATS[name].path
        assert cli("predict", model, *photos, "--json") == 0
        out = json.loads(capsys.readouterr().out)
        assert [r["image"] for r in out] == [str(p) for p in photos]
        assert {r["format"] for r in out} == {name}
        assert all(abs(sum(r["probabilities"].values()) - 1) < 0.02 for r in out)
        tops[name] = [r["top1"] for r in out]
    assert tops["keras"] == tops["savedmodel"] == tops["tflite"] == tops["int8"], tops


def test_predict_folder_default_format_and_unknown_threshold(exported, tmp_path, capsys):
    run, result = exported
    folder = tmp_path / "export"
    shutil.copytree(result.out_dir, folder)
    photos = tmp_path / "photos"
    shutil.copytree(_photos(run, result)[0].parent, photos)
    assert cli("predict", folder, photos) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(list(photos.iterdir()))
    assert cli("predict", folder, photos, "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert {r["format"] for r in out} == {"int8"}  # an export folder runs its int8 model
    assert cli("predict", run / "best", photos, "--json") == 0  # the run's own best/ too
    assert {r["format"] for r in json.loads(capsys.readouterr().out)} == {"keras"}
    # --format picks from an export folder; a file (or best/) that is another format is refused
    # rather than answering with the wrong model.
    for model in (folder / "model.keras", run / "best"):
        with pytest.raises(UsageError, match=r"--format int8: .*model\.keras is the keras model"):
            deploy.predict(model, [photos], "int8")
    shutil.copy(folder / "model_int8.tflite", folder / "camera.tflite")  # known by contents
    with pytest.raises(UsageError, match=r"--format tflite: .*camera\.tflite is the int8 model"):
        deploy.predict(folder / "camera.tflite", [photos], "tflite")
    assert cli("predict", folder / "model_int8.tflite", photos, "--format", "int8",
               "--json") == 0
    assert {r["format"] for r in json.loads(capsys.readouterr().out)} == {"int8"}
    # A threshold above every probability turns every answer into Unknown.
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["threshold"] = 1.01
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert cli("predict", folder, photos, "--format", "tflite") == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(": Unknown" in ln for ln in lines)
    guesses = [ln for ln in lines if "(best guess " in ln]
    assert guesses and all("< threshold 1.010" in ln for ln in guesses)


def test_predict_reports_unreadable_images(exported, tmp_path, capsys):
    _, result = exported
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    assert cli("predict", result.out_dir / "model_int8.tflite", bad, "--json") == 1
    out = json.loads(capsys.readouterr().out)
    assert out[0]["image"] == str(bad) and "error" in out[0]
    assert "after the scan" not in out[0]["error"]  # predict scanned nothing
    with pytest.raises(UsageError, match="no such image"):
        deploy.predict(result.out_dir, [tmp_path / "missing.jpg"])


def test_predict_answers_heic_and_warns_about_damaged_photos(exported, tmp_path, capsys):
    """A phone's HEIC photo is answered like any other; a JPEG whose last 40% is zeros (an
    interrupted copy) decodes and is answered as the device would, with the scan's reason as a
    warning, and the exit code stays 0."""
    from PIL import Image

    _, result = exported
    noise = np.random.default_rng(905).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    damaged = tmp_path / "cut_copy.jpg"
    Image.fromarray(noise).save(damaged, quality=75)
    good = damaged.read_bytes()
    keep = int(len(good) * 0.6)
    damaged.write_bytes(good[:keep] + bytes(len(good) - keep))
    heic = Path(__file__).parent / "data" / "heic" / "photo.heic"
    shutil.copy(heic, tmp_path / "phone.heic")
    assert cli("predict", result.out_dir / "model_int8.tflite", tmp_path, "--json") == 0
    out = {Path(r["image"]).name: r for r in json.loads(capsys.readouterr().out)}
    assert set(out) == {"cut_copy.jpg", "phone.heic"}
    assert out["phone.heic"]["label"] and "warning" not in out["phone.heic"]
    assert out["cut_copy.jpg"]["label"]
    assert out["cut_copy.jpg"]["warning"].startswith("damaged JPEG: part of the picture is garbled")
    assert cli("predict", result.out_dir / "model_int8.tflite", damaged) == 0
    assert "\n  warning: damaged JPEG: " in capsys.readouterr().out


def test_predict_and_evaluate_give_one_line_errors_for_broken_models(exported, tmp_path,
                                                                     sample_dir):
    _, result = exported
    broken = shutil.copytree(result.out_dir, tmp_path / "export")
    (broken / "model_int8.tflite").write_bytes(b"not a flatbuffer")
    photo = next((sample_dir / "Tony_Blair").iterdir())
    with pytest.raises(UsageError, match="model_int8.tflite: cannot load the model"):
        deploy.predict(broken, [photo])
    (broken / "manifest.json").write_text('{"files": {')
    with pytest.raises(UsageError, match="manifest.json: unreadable manifest"):
        deploy.predict(broken, [photo])
    # `evaluate` takes an export (or a device's release) as well as RUN/best.
    from tuner.best import evaluate_model

    evaluation = evaluate_model(result.out_dir, sample_dir)
    assert evaluation["accuracy"] > 0.2 and len(evaluation["confusion_matrix"]) == 5


def test_edgetpu_model_needs_the_runtime(exported, tmp_path):
    _, result = exported
    fake = tmp_path / "model_int8_edgetpu.tflite"
    shutil.copyfile(result.out_dir / "model_int8.tflite", fake)
    try:
        ctypes.CDLL(export.EDGETPU_RUNTIME)
        pytest.skip("an Edge TPU runtime is installed here")
    except OSError:
        pass
    with pytest.raises(UsageError, match="model_int8.tflite"):
        export.open_model(fake)


# -- promote and rollback to a local folder -------------------------------------------------


def _layout(dest: Path) -> tuple[str, list[str]]:
    current = os.readlink(dest / "current")
    return current, sorted(p.name for p in (dest / "releases").iterdir())


def test_promote_real_export_and_predict_from_current(exported, tmp_path, capsys):
    run, result = exported
    dest = tmp_path / "device"
    if not result.ok:  # this tiny model's int8 misses --min-agreement: promote says so
        with pytest.raises(deploy.PromotionRefused, match="parity"):
            cli("promote", run, "--to", dest)
        assert not dest.exists()
    assert cli("promote", run, "--to", dest, "--force") == 0
    out = capsys.readouterr().out
    assert "current -> releases/" in out and "new " in out
    current, releases = _layout(dest)
    assert current == f"releases/{releases[0]}" and len(releases) == 1
    manifest = json.loads((dest / "current" / "manifest.json").read_text())
    for rel, digest in manifest["files"].items():
        assert sha256(dest / "current" / rel) == digest
    photo = _photos(run, result, count=2)[0]
    assert cli("predict", dest / "current", photo, "--json") == 0
    assert json.loads(capsys.readouterr().out)[0]["format"] == "int8"
    # The same export again: nothing to copy.
    assert cli("promote", result.out_dir, "--to", dest, "--force") == 0
    assert "already current" in capsys.readouterr().out
    assert _layout(dest)[1] == releases


def test_failed_copy_leaves_current_untouched(tmp_path, monkeypatch):
    first = fake_export(tmp_path / "a", 0.80, "a")
    second = fake_export(tmp_path / "b", 0.90, "b")
    dest = tmp_path / "device"
    deploy.promote(first, str(dest))
    before = _layout(dest)
    copied = []
    real_copy = deploy.copy_file

    def flaky(src, dst):
        if len(copied) == 2:
            raise OSError("No space left on device")
        real_copy(src, dst)
        copied.append(dst)

    monkeypatch.setattr(deploy, "copy_file", flaky)
    # One line for the user (DeployError is a TunerError: the CLI prints it, no traceback).
    with pytest.raises(deploy.DeployError, match="No space left on device; current was not "
                                                 "changed"):
        deploy.promote(second, str(dest))
    assert len(copied) == 2
    assert _layout(dest) == before
    assert not [p for p in (dest / "releases").iterdir() if p.name.startswith(".")]


def test_a_corrupted_copy_is_caught_by_the_checksums(tmp_path, monkeypatch):
    first = fake_export(tmp_path / "a", 0.80, "a")
    second = fake_export(tmp_path / "b", 0.90, "b")
    dest = tmp_path / "device"
    deploy.promote(first, str(dest))
    before = _layout(dest)
    real_copy = deploy.copy_file

    def corrupting(src, dst):
        real_copy(src, dst)
        if dst.name == "model_int8.tflite":
            dst.write_bytes(b"bit rot")

    monkeypatch.setattr(deploy, "copy_file", corrupting)
    with pytest.raises(deploy.DeployError, match="differ after the copy"):
        deploy.promote(second, str(dest))
    assert _layout(dest) == before


def test_champion_gate_refuses_a_worse_model_unless_forced(tmp_path, capsys):
    good = fake_export(tmp_path / "good", 0.90, "good")
    worse = fake_export(tmp_path / "worse", 0.70, "worse")
    dest = tmp_path / "device"
    assert cli("promote", good, "--to", dest) == 0
    capsys.readouterr()
    with pytest.raises(deploy.PromotionRefused) as refused:
        cli("promote", worse, "--to", dest)
    assert "0.7000" in str(refused.value) and "0.9000" in str(refused.value)
    assert "--force" in str(refused.value)
    assert json.loads((dest / "current" / "manifest.json").read_text())["tag"] == "good"
    assert cli("promote", worse, "--to", dest, "--force") == 0
    out = capsys.readouterr().out
    assert "new 0.7000, current 0.9000" in out
    assert json.loads((dest / "current" / "manifest.json").read_text())["tag"] == "worse"


def test_champion_gate_refuses_other_people_and_says_which_test_photos_it_compared(
        tmp_path, capsys):
    """A model of other people is another task (and a renamed folder changes what the device
    answers): refused whatever its number, naming the change. Numbers are said to come from
    the same or different test photos when both manifests carry the test split's fingerprint."""
    photos = {"images": 40, "by": "content", "sha256": "1" * 64}
    truth = {f"{i:016x}": "AB"[i % 2] for i in range(40)}

    def predicted(wrong: set[int]) -> dict:
        return {k: [t, "Unknown" if i in wrong else t] for i, (k, t) in enumerate(truth.items())}

    dest = tmp_path / "device"
    assert cli("promote", fake_export(tmp_path / "v1", 0.80, "v1", test_set=photos,
                                      ci95=[0.7, 0.9], predictions=predicted(set(range(8)))),
               "--to", dest) == 0
    capsys.readouterr()
    for n, (classes, change) in enumerate([
            (("A", "B", "C", "Unknown"), "(new: C)"),
            (("A", "b", "Unknown"), "(new: b; no longer: B)")]):
        other = fake_export(tmp_path / f"other{n}", 0.95, f"other{n}", classes=classes)
        with pytest.raises(deploy.PromotionRefused) as refused:
            cli("promote", other, "--to", dest)
        assert "knows other people than the current release" in str(refused.value)
        assert change in str(refused.value) and "--force" in str(refused.value)
    assert json.loads((dest / "current" / "manifest.json").read_text())["tag"] == "v1"

    # Wrong on photos 2-11 where the current one is wrong on 0-7: each alone is right on two
    # (0, 1) and four (8-11) photos, a split McNemar's exact test gives p = 0.69.
    worse_same = fake_export(tmp_path / "same", 0.75, "same", test_set=photos,
                             ci95=[0.651, 0.849], predictions=predicted(set(range(2, 12))))
    with pytest.raises(deploy.PromotionRefused, match=r"against 0\.8000 of the current release "
                       r"\S+ on \S+ on the same 40 test photos \(95% intervals: new 0\.65-0\.85, "
                       r"current 0\.70-0\.90\); photo by photo, the new model alone is right on "
                       r"2, the current one alone on 4 \(McNemar exact p = 0\.69\); pass --force"):
        cli("promote", worse_same, "--to", dest)
    moved = {**photos, "sha256": "2" * 64, "images": 55}
    with pytest.raises(deploy.PromotionRefused, match=r" on different test photos; pass --force"):
        cli("promote", fake_export(tmp_path / "diff", 0.75, "diff", test_set=moved), "--to", dest)
    better = fake_export(tmp_path / "better", 0.85, "better", test_set=photos)
    assert cli("promote", better, "--to", dest) == 0
    assert "new 0.8500, current 0.8000 (" in (out := capsys.readouterr().out)
    assert "; same test photos)" in out
    assert cli("promote", fake_export(tmp_path / "c", 0.9, "c", classes=("A", "B", "C", "Unknown")),
               "--to", dest, "--force", "--json") == 0
    assert json.loads(capsys.readouterr().out)["test_photos"] is None  # the new one has none


def test_a_failed_export_is_not_promoted_unless_forced(tmp_path):
    folder = fake_export(tmp_path / "x", 0.9, "x")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["parity"] = {"passed": False, "failures": ["int8: agreement 0.5"]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(deploy.PromotionRefused, match="parity"):
        deploy.promote(folder, str(tmp_path / "device"))
    deploy.promote(folder, str(tmp_path / "device"), force=True)


def test_changed_export_files_are_refused_before_copying(tmp_path):
    folder = fake_export(tmp_path / "x", 0.9, "x")
    (folder / "model_int8.tflite").write_bytes(b"edited after export")
    with pytest.raises(UsageError, match="changed since the export"):
        deploy.promote(folder, str(tmp_path / "device"))
    assert not (tmp_path / "device").exists()


def test_rollback_and_pruning(tmp_path, capsys):
    dest = tmp_path / "device"
    tags = []
    for i in range(5):
        tags.append(f"m{i}")
        deploy.promote(fake_export(tmp_path / f"m{i}", 0.5 + i / 100, f"m{i}"), str(dest), keep=3)
    current, releases = _layout(dest)
    assert len(releases) == 3 and current == f"releases/{releases[-1]}"
    kept = [json.loads((dest / "releases" / r / "manifest.json").read_text())["tag"]
            for r in releases]
    assert kept == ["m2", "m3", "m4"]

    def tag() -> str:
        return json.loads((dest / "current" / "manifest.json").read_text())["tag"]

    assert cli("rollback", "--to", dest) == 0
    assert tag() == "m3" and releases[1] in capsys.readouterr().out
    deploy.rollback(str(dest))
    assert tag() == "m2"
    with pytest.raises(UsageError, match="oldest"):
        deploy.rollback(str(dest))
    # A new promotion after a rollback becomes the newest release; pruning keeps current.
    deploy.promote(fake_export(tmp_path / "m5", 0.6, "m5"), str(dest), keep=2)
    assert tag() == "m5" and len(_layout(dest)[1]) == 2
    with pytest.raises(UsageError, match="nothing promoted"):
        deploy.rollback(str(tmp_path / "empty"))


def test_destination_parsing(monkeypatch):
    assert isinstance(deploy.destination("/opt/x"), deploy.LocalDestination)
    assert isinstance(deploy.destination("./rel:dir"), deploy.LocalDestination)
    remote = deploy.destination("pi@coral.local:/opt/personclf/", ["-p", "2222"])
    assert isinstance(remote, deploy.SSHDestination)
    assert (remote.host, remote.root) == ("pi@coral.local", "/opt/personclf")
    assert remote.ssh_options[-2:] == ["-p", "2222"]
    # ~ is the login's home, where ssh and rsync both start (quoted, it would be a folder "~")
    assert deploy.destination("pi@coral:~/models").root == "models"
    assert deploy.destination("pi@coral:~").root == "."
    bad = {"coral:": "folder on the host", "pi@[::1]:/opt/x": "IPv6",
           "pi@::1:/opt/x": "IPv6", "-oProxyCommand=touch_x:/opt/x": "cannot start with '-'",
           "ssh://pi@coral:2222/opt/x": "--ssh-option=-p2222", "pi@coral:~bob/x": "absolute"}
    for dest, message in bad.items():
        with pytest.raises(UsageError, match=re.escape(message)):
            deploy.destination(dest)
    monkeypatch.setenv(deploy.SSH_OPTS_ENV, "-o 'unclosed")
    with pytest.raises(UsageError, match="PERSONCLF_SSH_OPTS: No closing quotation"):
        deploy.destination("pi@coral:/opt/x")


def _edit_manifest(folder: Path, **changes) -> Path:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(changes)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_a_manifest_cannot_name_files_outside_its_folder(tmp_path):
    dest = tmp_path / "device"
    deploy.promote(fake_export(tmp_path / "good", 0.8, "good"), str(dest))
    before = sorted((str(p), p.read_bytes()) for p in dest.rglob("*") if p.is_file())
    for name in ("../../x.txt", "../current/model_int8.tflite", str(tmp_path / "abs.txt"),
                 "a/../../x.txt", "line\nbreak.txt"):
        folder = fake_export(tmp_path / "deep" / "evil", 0.9, "evil")
        target = (folder / name) if not name.startswith("/") else Path(name)
        if "\n" not in name:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"EVIL")
        files = json.loads((folder / "manifest.json").read_text())["files"]
        _edit_manifest(folder, files={**files, name: sha256(target) if target.exists() else ""})
        with pytest.raises(UsageError, match="is not a file name inside the export folder"):
            deploy.promote(folder, str(dest))
        # nothing written: the copy would have landed in DEST, its releases/ or current
        assert sorted((str(p), p.read_bytes()) for p in dest.rglob("*") if p.is_file()) == before
        shutil.rmtree(tmp_path / "deep")
    with pytest.raises(UsageError, match="'files' is not a table"):
        deploy.promote(_edit_manifest(fake_export(tmp_path / "list", 0.9), files=["a"]),
                       str(dest))


def test_unreadable_or_incomplete_manifests_are_one_line_refusals(tmp_path):
    dest = tmp_path / "device"
    deploy.promote(fake_export(tmp_path / "a", 0.8, "a"), str(dest))
    # A new export without a finite test metric cannot pass the gate against one with it.
    for value in (float("nan"), None):
        metrics = {"test": {}} if value is None else {"test": {"balanced_accuracy": value}}
        folder = _edit_manifest(fake_export(tmp_path / f"m{value}", 0.9, "x"), metrics=metrics)
        with pytest.raises(deploy.PromotionRefused, match="n/a of .* is missing against 0.8000"):
            deploy.promote(folder, str(dest))
    # `parity: null` is no parity record, not a crash.
    deploy.promote(_edit_manifest(fake_export(tmp_path / "p", 0.85, "p"), parity=None),
                   str(dest))
    # A damaged manifest on the device stops the gate, and --force replaces the release.
    better = fake_export(tmp_path / "better", 0.95, "better")
    for damaged in ('{"files": {', '["not", "an", "object"]'):
        (dest / "current" / "manifest.json").write_text(damaged)
        with pytest.raises(deploy.PromotionRefused, match="(unreadable|unusable).*--force"):
            deploy.promote(better, str(dest))
    assert deploy.promote(better, str(dest), force=True).release.startswith("0003-")
    # A damaged source manifest is a one-line error too.
    (better / "manifest.json").write_text("[1, 2")
    with pytest.raises(UsageError, match="unreadable manifest"):
        deploy.promote(better, str(dest))
    # A hand-edited device manifest whose metrics (or classes) are not what the gate reads
    # is refused like an unreadable one, never a crash; --force replaces it.
    nxt = fake_export(tmp_path / "next", 0.5, "next")
    for edited, why in (({"metrics": [1, 2]}, "'metrics' is not a table"),
                        ({"classes": [1, 2, 3]}, "'classes' is not a list of names"),
                        ({"classes": 3}, "'classes' is not a list of names")):
        (dest / "current" / "manifest.json").write_text(
            json.dumps({"classes": ["A", "B", "Unknown"], **edited}))
        with pytest.raises(deploy.PromotionRefused, match=re.escape(f"unusable manifest.json "
                                                                    f"({why})")):
            deploy.promote(nxt, str(dest))
    result = deploy.promote(nxt, str(dest), force=True)
    assert result.current_metric is None and result.test_photos is None
    # Malformed or mismatched photo-by-photo records add nothing to a refusal, and never crash.
    good = {"metrics": {"test_predictions": {"a": ["A", "A"], "b": ["B", "A"]}}}
    for bad in ({"metrics": {"test_predictions": [1, 2]}}, {"metrics": None},
                {"metrics": {"test_predictions": {"a": ["A", "A"], "b": "B"}}},
                {"metrics": {"test_predictions": {"a": ["A", "A"], "c": ["B", "B"]}}},
                {"metrics": {"test_predictions": {"a": ["A", "A"], "b": ["A", "A"]}}}):
        assert deploy._paired_note(good, bad) == deploy._paired_note(bad, good) == ""
    assert "alone is right on 0, the current one alone on 0 (McNemar exact p = 1.00)" in \
        deploy._paired_note(good, good)


def test_a_changed_manifest_is_a_new_release(tmp_path):
    dest = tmp_path / "device"
    folder = fake_export(tmp_path / "a", 0.8, "a")
    deploy.promote(folder, str(dest))
    assert deploy.promote(folder, str(dest)).already_current
    _edit_manifest(folder, threshold=0.9)  # same model files, a new Unknown threshold
    result = deploy.promote(folder, str(dest))
    assert not result.already_current
    assert json.loads((dest / "current" / "manifest.json").read_text())["threshold"] == 0.9


def test_bad_device_folders_are_refused_before_copying(tmp_path):
    export_dir = fake_export(tmp_path / "a", 0.8, "a")
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        deploy.promote(export_dir, str(afile))
    by_hand = tmp_path / "device"
    (by_hand / "current").mkdir(parents=True)
    with pytest.raises(UsageError, match="current is not a link"):
        deploy.promote(export_dir, str(by_hand))
    assert not (by_hand / "releases").exists()


def test_rollback_never_returns_to_a_release_rolled_back_from(tmp_path, capsys):
    dest = tmp_path / "device"

    def tag() -> str:
        return json.loads((dest / "current" / "manifest.json").read_text())["tag"]

    for name, metric in (("a", 0.8), ("b", 0.9)):
        deploy.promote(fake_export(tmp_path / name, metric, name), str(dest), keep=2)
    deploy.rollback(str(dest))  # b was bad
    assert tag() == "a"
    # an interrupted promote's leftovers: an old one is removed by the next promote
    stale, fresh = (dest / "releases" / ".incoming-0007-x"), (dest / "releases" / ".incoming-0008-y")
    stale.mkdir()
    fresh.mkdir()
    os.utime(stale, (time.time() - 2 * 3600,) * 2)
    result = deploy.promote(fake_export(tmp_path / "c", 0.7, "c"), str(dest), keep=2, force=True)
    assert result.release.startswith("0009-")  # numbers are never reused
    assert any(n.startswith(".rolled-back-0002-") for n in result.pruned)
    assert ".incoming-0007-x" in result.pruned and fresh.is_dir()
    assert deploy.rollback(str(dest))[1].startswith("0001-")
    assert tag() == "a"  # not b, which was rolled back from


def test_a_rollback_interrupted_before_hiding_its_release_is_finished_by_the_next_promote(
        tmp_path, monkeypatch):
    dest = tmp_path / "device"
    for name, metric in (("a", 0.8), ("b", 0.9)):
        deploy.promote(fake_export(tmp_path / name, metric, name), str(dest), keep=3)

    def interrupted(self, old, new):
        raise KeyboardInterrupt  # killed between the switch and the rename

    with monkeypatch.context() as m:
        m.setattr(deploy.LocalDestination, "rename", interrupted)
        with pytest.raises(KeyboardInterrupt):
            deploy.rollback(str(dest))
    releases = sorted(p.name for p in (dest / "releases").iterdir())
    assert os.readlink(dest / "current") == f"releases/{releases[0]}"  # a runs
    assert releases[1].startswith("0002-")  # b, rolled back from, still visible
    result = deploy.promote(fake_export(tmp_path / "c", 0.7, "c"), str(dest), keep=3,
                            force=True)
    assert result.pruned == [f".rolled-back-{releases[1]}"]
    assert deploy.rollback(str(dest)) == (result.release, releases[0])  # to a, not b


def test_a_failed_rollback_leaves_current_where_it_was(tmp_path, monkeypatch):
    """The rejected release is renamed after the switch; when that rename fails, the switch is
    undone, so retrying never rolls back two releases."""
    dest = tmp_path / "device"
    for name, metric in (("a", 0.7), ("b", 0.8), ("c", 0.9)):
        deploy.promote(fake_export(tmp_path / name, metric, name), str(dest))
    c = os.readlink(dest / "current")

    def refused(self, old, new):
        raise PermissionError(1, "Operation not permitted", str(self.root / "releases" / old))

    with monkeypatch.context() as m:
        m.setattr(deploy.LocalDestination, "rename", refused)
        for _ in range(2):
            with pytest.raises(deploy.DeployError, match=r"could not mark 0003-.* as rolled "
                               r"back \(Operation not permitted .*\); current left at 0003-"):
                deploy.rollback(str(dest))
            assert os.readlink(dest / "current") == c
        # Nor can the switch back be made: the message says where current is and what to fix.
        m.setattr(deploy.LocalDestination, "switch",
                  lambda self, r, real=deploy.LocalDestination.switch: (
                      real(self, r) if r.startswith("0002-") else refused(self, r, r)))
        with pytest.raises(deploy.DeployError, match=r"current -> 0002-.*, but 0003-.* could "
                           r"not be marked .*fix that before rolling back again"):
            deploy.rollback(str(dest))


def test_an_old_release_half_removed_is_never_a_rollback_target(tmp_path, monkeypatch, capsys):
    """Pruning hides a release before removing its files. A removal that fails halfway (a
    file the device will not let go) leaves a hidden folder, said so, and not a gutted
    release that a rollback would switch the device to."""
    dest = tmp_path / "device"
    for name, metric in (("a", 0.7), ("b", 0.8)):
        deploy.promote(fake_export(tmp_path / name, metric, name), str(dest), keep=2)

    def partial(self, name):  # deletes one file, then fails as rmtree(ignore_errors) would
        (self.root / "releases" / name / "model_int8.tflite").unlink(missing_ok=True)

    with monkeypatch.context() as m:
        m.setattr(deploy.LocalDestination, "remove", partial)
        assert cli("promote", fake_export(tmp_path / "c", 0.9, "c"), "--to", dest,
                   "--keep", "2") == 0
    out = capsys.readouterr().out
    hidden = [n for n in os.listdir(dest / "releases") if n.startswith(".removing-0001-")]
    assert len(hidden) == 1 and "removed old releases" not in out
    assert f"could not remove (hidden; the next promote tries again): {hidden[0]}" in out
    assert deploy.rollback(str(dest))[1].startswith("0002-")
    with pytest.raises(UsageError, match="oldest release kept"):
        deploy.rollback(str(dest))
    # The next promote removes it.
    result = deploy.promote(fake_export(tmp_path / "d", 0.95, "d"), str(dest), keep=2,
                            force=True)
    assert hidden[0] in result.pruned and not result.not_removed
    assert not (dest / "releases" / hidden[0]).exists()


@pytest.mark.parametrize("damage,message", [
    ("file", r"it 1 file\(s\) missing or changed \(first: model_int8.tflite\)"),
    ("missing", r"it 1 file\(s\) missing or changed \(first: labels.txt\)"),
    ("manifest", "it has no manifest.json"),
    ("edited", "it has a manifest.json changed since it was promoted"),
])
def test_rollback_checks_its_target_before_switching(tmp_path, damage, message):
    dest = tmp_path / "device"
    for name, metric in (("a", 0.8), ("b", 0.9)):
        deploy.promote(fake_export(tmp_path / name, metric, name), str(dest))
    current = os.readlink(dest / "current")
    target = next((dest / "releases").glob("0001-*"))
    if damage == "file":
        (target / "model_int8.tflite").write_bytes(b"garbage")
    elif damage == "missing":
        (target / "labels.txt").unlink()
    elif damage == "manifest":
        (target / "manifest.json").unlink()
    else:  # files intact, but the manifest (its threshold, say) edited by hand
        manifest = json.loads((target / "manifest.json").read_text())
        (target / "manifest.json").write_text(json.dumps({**manifest, "threshold": 0.01}))
    with pytest.raises(deploy.DeployError, match=f"cannot roll back to {target.name}: {message}; "
                       f"current left at {current.split('/')[1]}"):
        deploy.rollback(str(dest))
    assert os.readlink(dest / "current") == current


def test_the_gate_refuses_when_it_has_nothing_to_compare_with(tmp_path):
    """A current release without its manifest, or a `current` link pointing outside
    releases/, would let any model through the gate: refused unless --force, and a forced
    promote hides none of the releases kept for rollback."""
    dest = tmp_path / "device"
    deploy.promote(fake_export(tmp_path / "good", 0.95, "good"), str(dest))
    bad = fake_export(tmp_path / "bad", 0.30, "bad")
    (dest / "current" / "manifest.json").unlink()
    with pytest.raises(deploy.PromotionRefused, match="the current release 0001-.* has no "
                       "manifest.json, so the champion gate cannot compare; pass --force"):
        deploy.promote(bad, str(dest))
    assert deploy.promote(bad, str(dest), force=True).release.startswith("0002-")
    manual = tmp_path / "manual"
    manual.mkdir()
    os.unlink(dest / "current")
    os.symlink(manual, dest / "current")
    better = fake_export(tmp_path / "better", 0.99, "better")
    with pytest.raises(deploy.PromotionRefused, match=r"current points to manual, which is not "
                       r"a release in releases/ .*pass --force"):
        deploy.promote(better, str(dest))
    result = deploy.promote(better, str(dest), force=True)
    assert result.release.startswith("0003-") and result.pruned == []
    assert deploy.rollback(str(dest))[1].startswith("0002-")


def test_promoting_the_current_export_again_repairs_damaged_files(tmp_path, capsys):
    dest = tmp_path / "device"
    folder = fake_export(tmp_path / "a", 0.8, "a")
    deploy.promote(folder, str(dest))
    assert deploy.promote(folder, str(dest)).already_current
    (dest / "current" / "model_int8.tflite").write_bytes(b"garbage")
    (dest / "current" / "model_float32.tflite").unlink()
    assert cli("promote", folder, "--to", dest) == 0
    out = capsys.readouterr().out
    assert "this export was current (0001-" in out and "copied again" in out
    assert "current -> releases/0002-" in out
    for rel in ("model_int8.tflite", "model_float32.tflite"):
        assert sha256(dest / "current" / rel) == sha256(folder / rel)


@pytest.mark.parametrize("edit,why", [
    ({"parity": "passed"}, "'parity' is not {passed: true or false, ...}"),
    ({"parity": {"passed": "false"}}, "'parity' is not {passed: true or false, ...}"),
    ({"formats": "int8"}, "'formats' is not a table of format: {file: name}"),
    ({"formats": {"int8": "model_int8.tflite"}}, "'formats' is not a table of format"),
    ({"formats": {"int8": {"file": 5}}}, "'formats' is not a table of format"),
    ({"threshold": "0.5x"}, "'threshold' is not a number"),
    ({"threshold": [0.5]}, "'threshold' is not a number"),
    ({"classes": [1, 2]}, "'classes' is not a list of names"),
    ({"unknown_label": 0}, "'unknown_label' is not a name"),
])
def test_hand_edited_manifests_are_one_line_errors_in_predict_and_promote(tmp_path, capsys,
                                                                         edit, why):
    folder = _edit_manifest(fake_export(tmp_path / "x", 0.9, "x"), **edit)
    photo = tmp_path / "p.jpg"
    photo.write_bytes(b"not read: the manifest is refused first")
    for argv in (("predict", folder, photo), ("promote", folder, "--to", tmp_path / "dev")):
        assert tuner_main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert f"manifest.json: not a usable personclf-tune manifest ({why}" in err


def test_deeply_nested_json_is_an_unreadable_manifest(tmp_path):
    folder = fake_export(tmp_path / "x", 0.9, "x")
    (folder / "manifest.json").write_text("[" * 100_000)
    with pytest.raises(UsageError, match=r"unreadable manifest \(RecursionError"):
        deploy.promote(folder, str(tmp_path / "dev"))


def test_a_destination_under_a_missing_folder_is_not_created(tmp_path):
    """An unmounted device's path would otherwise be made on this machine's own disk."""
    folder = fake_export(tmp_path / "x", 0.9, "x")
    with pytest.raises(UsageError, match=r"--to: .*/camera-box does not exist \(is the device "
                       r"mounted\?\); create .*/camera-box/personclf first"):
        deploy.promote(folder, str(tmp_path / "mnt" / "camera-box" / "personclf"))
    assert not (tmp_path / "mnt").exists()
    assert deploy.promote(folder, str(tmp_path / "personclf")).release.startswith("0001-")


# -- promote over ssh to a real sshd on 127.0.0.1 -------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sshd(tmp_path):
    """A private sshd on a free port, key login only; skipped where sshd or rsync is missing."""
    exe = Path("/usr/sbin/sshd")
    missing = [n for n in ("ssh", "ssh-keygen", "rsync") if shutil.which(n) is None]
    if not exe.exists() or missing:
        pytest.skip(f"needs openssh-server, openssh-client and rsync (missing: "
                    f"{', '.join(missing) or exe})")
    try:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    except OSError as exc:
        pytest.skip(f"sshd needs /run/sshd ({exc})")
    keys = tmp_path / "ssh"
    keys.mkdir()
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)],
                       check=True)
    shutil.copyfile(keys / "user_key.pub", keys / "authorized_keys")
    port = _free_port()
    config = keys / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {keys / 'host_key'}",
        f"AuthorizedKeysFile {keys / 'authorized_keys'}", f"PidFile {keys / 'sshd.pid'}",
        "StrictModes no", "UsePAM no", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
        "PermitRootLogin prohibit-password", "LogLevel ERROR", ""]))
    proc = subprocess.Popen([str(exe), "-D", "-e", "-f", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    options = ["-p", str(port), "-i", str(keys / "user_key"), "-o", "StrictHostKeyChecking=no",
               "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                pytest.skip(f"sshd did not start: {proc.stderr.read().decode()[-300:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.skip("sshd did not listen within 15 s")
                time.sleep(0.2)
        yield f"{getpass.getuser()}@127.0.0.1", options
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_promote_and_rollback_over_ssh(sshd, tmp_path, monkeypatch, capsys):
    host, options = sshd
    monkeypatch.setenv(deploy.SSH_OPTS_ENV, " ".join(options))
    dest_dir = tmp_path / "device dir"  # a space: remote paths are quoted properly
    dest = f"{host}:{dest_dir}"
    first = fake_export(tmp_path / "a", 0.80, "a")
    second = fake_export(tmp_path / "b", 0.85, "b")
    worse = fake_export(tmp_path / "c", 0.50, "c")

    result = deploy.promote(first, dest)
    assert result.current_metric is None and result.new_metric == 0.80
    deploy.promote(second, dest)
    current, releases = _layout(dest_dir)
    assert len(releases) == 2 and current == f"releases/{releases[1]}"
    manifest = json.loads((dest_dir / "current" / "manifest.json").read_text())
    assert manifest["tag"] == "b"
    for rel, digest in manifest["files"].items():
        assert sha256(dest_dir / "current" / rel) == digest
    assert not [p for p in (dest_dir / "releases").iterdir() if p.name.startswith(".")]

    with pytest.raises(deploy.PromotionRefused, match="0.5000.*0.8500"):
        deploy.promote(worse, dest)
    # rollback through the flag instead of the environment variable
    monkeypatch.delenv(deploy.SSH_OPTS_ENV)
    assert cli("rollback", "--to", dest, *[f"--ssh-option={o}" for o in options]) == 0
    assert json.loads((dest_dir / "current" / "manifest.json").read_text())["tag"] == "a"
    assert os.readlink(dest_dir / "current") == f"releases/{releases[0]}"


def test_predict_on_a_folder_leaves_out_hidden_files_as_the_scan_does(tmp_path):
    """A folder copied from a Mac carries `._photo.jpg` (resource forks, not pictures), and
    viewers keep `.thumbnails/`: predict used to answer an error for one and classify the
    other. A hidden file named on the command line is still read."""
    folder = tmp_path / "photos"
    (folder / ".thumbnails").mkdir(parents=True)
    (folder / "trip").mkdir()
    for rel in ("a.jpg", "trip/b.png", "._a.jpg", ".thumbnails/a.jpg", "notes.txt"):
        (folder / rel).write_bytes(b"x")
    assert deploy.image_paths([folder]) == [folder / "a.jpg", folder / "trip" / "b.png"]
    assert deploy.image_paths([folder / "._a.jpg"]) == [folder / "._a.jpg"]
