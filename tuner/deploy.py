"""Predict with any exported format; promote an export to a device; roll a device back.

Device layout (a local folder, or `[user@]host:/path` over ssh and rsync):

    DEST/releases/<id>/   one folder per promoted export (files + manifest.json)
    DEST/current -> releases/<id>

A release is copied under a temporary name, its files are checked against the sha256 sums of
its manifest, and only then renamed into `releases/` and `current` switched to it with one
atomic rename of a symlink. So a failed or interrupted copy never changes what `current` runs.
Files are flushed to disk before `current` moves, so a power cut cannot leave it pointing at
half-written files. Older releases are kept for `rollback` (`--keep N`); a release rolled back
from is renamed `.rolled-back-<id>` (never a rollback target again, removed by the next
promote, which also hides one an interrupted rollback left visible). An old release is
renamed `.removing-<id>` before its files go, so a removal that fails halfway never leaves a
gutted release to roll back to; a rollback checks its target's files before switching. The
champion gate refuses a model whose test balanced accuracy is worse than the current one's,
that has none while the current one has, or that knows other people, unless forced; it also
refuses (unless forced) when it has nothing to compare with: `current` pointing outside
`releases/`, or a current release without a usable manifest. Every file name a manifest
lists must be a plain relative path inside its folder.

Every external command is an argument list (never `shell=True`); commands that run on the
remote host are quoted with `shlex` because ssh hands them to the remote shell.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from .errors import DatasetError, TunerError, UsageError
from .export import sha256_file

RELEASES = "releases"
CURRENT = "current"
INCOMING = ".incoming-"
ROLLED_BACK = ".rolled-back-"
REMOVING = ".removing-"  # an old release being removed: hidden first, so never half a target
STALE_INCOMING_S = 3600  # an interrupted promote's leftovers, removed by a later promote
DEFAULT_KEEP = 3
GATE_METRIC = "balanced_accuracy"
SSH_OPTS_ENV = "PERSONCLF_SSH_OPTS"
# The formats `predict` picks from an export folder, best for a small CPU first.
PREDICT_PREFERENCE = ("int8", "tflite", "keras", "savedmodel")


class DeployError(TunerError):
    """A copy, a checksum or a remote command failed; `current` was left as it was."""


class PromotionRefused(UsageError):
    """The champion gate (or a failed export) stopped a promotion; `--force` overrides."""


# ---------------------------------------------------------------------------------------------
# predict


def predict(model: Path, inputs, fmt: str | None = None) -> list[dict]:
    """Label, probability and Unknown verdict for each image (files or folders of images).

    `model` is a model file (.keras, .tflite), a SavedModel folder, or a folder with a
    manifest (RUN/export, RUN/best, a device's `current`), from which `fmt` (default: the
    first of int8, tflite, keras, savedmodel present) is taken. Images are decoded exactly as
    in training (`pipeline.load_image`). An image that cannot be read gets an `error` entry;
    one that decodes but is damaged (`data.hidden_damage`) gets its answer and a `warning`.
    """
    from .data import hidden_damage, read_bytes
    from .export import open_model
    from .pipeline import load_image

    path, manifest = resolve_model(Path(model), fmt)
    images = image_paths(inputs)
    try:
        runner = open_model(path)
    except (ValueError, RuntimeError, OSError) as exc:
        raise UsageError(f"{path}: cannot load the model ({str(exc).splitlines()[0]}); "
                         "export it again") from None
    if fmt and runner.format != fmt:
        # The runner knows its format from the model itself (a renamed file included):
        # answering with another model than the one asked for would mislabel every answer.
        raise UsageError(f"--format {fmt}: {path} is the {runner.format} model; pass its export "
                         "folder (RUN/export) to choose a format, or leave --format out")
    classes = list(manifest["classes"])
    threshold = float(manifest.get("threshold", 0.0))
    unknown = manifest.get("unknown_label", "Unknown")
    size = runner.input_size
    results = []
    for image in images:
        try:
            pixels = load_image(image, size, scanned=False)
        except (DatasetError, OSError) as exc:
            # The reason alone: the image is named beside it (in the line and in --json).
            reason = str(exc).removeprefix(f"{image}: ")
            results.append({"image": str(image), "error": reason})
            continue
        probs = runner.predict(pixels[None])[0]
        if len(probs) != len(classes):
            raise UsageError(f"{path}: {len(probs)} outputs but the manifest lists "
                             f"{len(classes)} classes; use the manifest of this model's run")
        top = int(np.argmax(probs))
        rejected = threshold > 0 and probs[top] < threshold and classes[top] != unknown
        results.append({
            "image": str(image),
            "label": unknown if rejected else classes[top],
            "probability": float(probs[top]),
            "top1": classes[top],
            "unknown": rejected or classes[top] == unknown,
            "threshold": threshold,
            "format": runner.format,
            "probabilities": {c: float(p) for c, p in zip(classes, probs)},
        })
        # Answered as the device would, but a search's scan would have skipped this photo.
        if damage := hidden_damage(read_bytes(image)):
            results[-1]["warning"] = damage
    return results


def resolve_model(path: Path, fmt: str | None = None) -> tuple[Path, dict]:
    """The model file to run and the manifest that names its classes and threshold."""
    from .best import read_manifest_file
    from .export import FORMATS, MANIFEST

    if not path.exists():
        raise UsageError(f"{path}: no such model file or folder")
    if path.is_dir() and (path / MANIFEST).is_file():
        manifest = read_manifest_file(path / MANIFEST)
        formats = manifest.get("formats")
        if not formats:  # RUN/best: the Keras model only
            return path / "model.keras", manifest
        names = [fmt] if fmt else [n for n in PREDICT_PREFERENCE if n in formats]
        for name in names:
            entry = formats.get(name) or {}
            if entry.get("file") and (path / entry["file"]).exists():
                return path / entry["file"], manifest
        have = [n for n, e in formats.items() if e.get("file")]
        raise UsageError(f"{path}: no {fmt or 'runnable'} model here (has: "
                         f"{', '.join(have) or 'none'}); choose --format from those")
    if fmt and fmt in FORMATS and path.is_dir() and (path / FORMATS[fmt].path).exists():
        path = path / FORMATS[fmt].path
    for folder in (path.parent, path.parent.parent):
        if (folder / MANIFEST).is_file():
            return path, read_manifest_file(folder / MANIFEST)
    raise UsageError(f"{path}: no manifest.json beside the model; keep the model in its "
                     "export folder (RUN/export) or a release folder")


def image_paths(inputs) -> list[Path]:
    """Files as given; folders walked recursively for images, sorted, leaving out hidden
    files and folders as the scan does (a Mac's `._photo.jpg`, a viewer's `.thumbnails/`)."""
    from .data import IMAGE_SUFFIXES

    out: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            out += sorted(p for p in item.rglob("*")
                          if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                          and not any(part.startswith(".")
                                      for part in p.relative_to(item).parts))
        elif item.exists():
            out.append(item)
        else:
            raise UsageError(f"{item}: no such image or folder")
    if not out:
        raise UsageError("no images found in " + ", ".join(str(i) for i in inputs))
    return out


# ---------------------------------------------------------------------------------------------
# Destinations: a local folder or an ssh host, behind one small interface.


def copy_file(src: Path, dst: Path) -> None:
    """Copy one file and flush it to disk (a seam: tests make it fail halfway through a
    release)."""
    shutil.copy2(src, dst)
    with open(dst, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in `folder` durable (a no-op where folders cannot be
    opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Destination:
    """What both kinds of DEST share, built on their own `entries()`."""

    def entries(self) -> list[str]:
        raise NotImplementedError

    def releases(self) -> list[str]:
        """The releases (hidden entries left out), oldest first."""
        return sorted((n for n in self.entries() if not n.startswith(".")), key=_order)


class LocalDestination(_Destination):
    """DEST is a folder on this machine (a mounted device, or the device itself)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def __str__(self) -> str:
        return str(self.root)

    def problem(self) -> str | None:
        """Why this is not a usable device folder, or None."""
        if self.root.exists() and not self.root.is_dir():
            return f"{self.root} is a file, not a folder; choose a folder"
        if not self.root.exists() and not self.root.parent.is_dir():
            # Created silently, an unmounted device's path would fill this machine's disk.
            return (f"{self.root.parent} does not exist (is the device mounted?); create "
                    f"{self.root} first if it is the right place")
        link = self.root / CURRENT
        if link.exists() and not link.is_symlink():
            return (f"{link} is not a link (made by hand?); move it away, then promote again")
        return None

    def current(self) -> str | None:
        link = self.root / CURRENT
        return Path(os.readlink(link)).name if link.is_symlink() else None

    def entries(self) -> list[str]:
        """Every folder in releases/, the hidden ones (.incoming-, .rolled-back-) included."""
        folder = self.root / RELEASES
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def stale(self, prefix: str, seconds: float) -> list[str]:
        """Hidden entries starting with `prefix` untouched for longer than `seconds`."""
        now = time.time()
        return [n for n in self.entries() if n.startswith(prefix)
                and now - (self.root / RELEASES / n).stat().st_mtime > seconds]

    def read_manifest(self, release: str) -> str | None:
        path = self.root / RELEASES / release / "manifest.json"
        return path.read_text() if path.is_file() else None

    def upload(self, src: Path, files: list[str], name: str) -> None:
        staging = self.root / RELEASES / name
        for rel in files:
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            copy_file(src / rel, staging / rel)
        for folder in {(staging / rel).parent for rel in files}:
            _fsync_dir(folder)

    def checksums(self, name: str, files: list[str]) -> dict[str, str]:
        folder = self.root / RELEASES / name
        return {rel: sha256_file(folder / rel) for rel in files if (folder / rel).is_file()}

    def rename(self, old: str, new: str) -> None:
        os.rename(self.root / RELEASES / old, self.root / RELEASES / new)
        _fsync_dir(self.root / RELEASES)

    def switch(self, release: str) -> None:
        tmp = self.root / f".{CURRENT}.tmp-{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(f"{RELEASES}/{release}", tmp)
        try:
            os.replace(tmp, self.root / CURRENT)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.root)

    def remove(self, name: str) -> None:
        shutil.rmtree(self.root / RELEASES / name, ignore_errors=True)


class SSHDestination(_Destination):
    """DEST is `[user@]host:/path`, reached with ssh (commands) and rsync (files)."""

    def __init__(self, host: str, root: str, ssh_options=()):
        self.host = host
        self.root = root.rstrip("/") or "/"
        self.ssh_options = list(ssh_options)
        self._control: str | None = None

    def __str__(self) -> str:
        return f"{self.host}:{self.root}"

    def __enter__(self):
        """Share one ssh connection between the dozen commands of a promotion."""
        self._control = tempfile.mkdtemp(prefix="personclf-ssh-")
        return self

    def __exit__(self, *exc) -> None:
        if self._control is None:
            return
        subprocess.run([*self._ssh_cmd(), "-O", "exit", self.host], capture_output=True,
                       timeout=30, check=False)
        shutil.rmtree(self._control, ignore_errors=True)
        self._control = None

    def _ssh_cmd(self) -> list[str]:
        shared = (["-o", "ControlMaster=auto", "-o", f"ControlPath={self._control}/%C",
                   "-o", "ControlPersist=60"] if self._control else [])
        return ["ssh", "-o", "BatchMode=yes", *shared, *self.ssh_options]

    def run(self, *argv: str, check: bool = True, input: str | None = None) -> str:
        """Run `argv` on the host; it reaches the remote shell quoted, word for word."""
        cmd = [*self._ssh_cmd(), self.host, "--", shlex.join(argv)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DeployError(f"ssh {self.host}: {exc}") from None
        if check and proc.returncode != 0:
            raise DeployError(f"ssh {self.host} {argv[0]} failed (exit {proc.returncode}): "
                              f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")
        return proc.stdout

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def problem(self) -> str | None:
        out = self.run("sh", "-c", 'if [ -e "$1" ] && [ ! -d "$1" ]; then echo file; '
                       'elif [ -e "$2" ] && [ ! -L "$2" ]; then echo notlink; fi', "sh",
                       self.root, self._path(CURRENT)).strip()
        if out == "file":
            return f"{self} is a file, not a folder; choose a folder"
        if out == "notlink":
            return f"{self}/{CURRENT} is not a link (made by hand?); move it away, then promote again"
        return None

    def current(self) -> str | None:
        out = self.run("readlink", "--", self._path(CURRENT), check=False).strip()
        return out.rsplit("/", 1)[-1] if out else None

    def entries(self) -> list[str]:
        out = self.run("sh", "-c", 'test -d "$1" && ls -1A -- "$1" || true', "sh",
                       self._path(RELEASES))
        return sorted(n for n in out.splitlines() if n)

    def stale(self, prefix: str, seconds: float) -> list[str]:
        out = self.run("sh", "-c", 'cd -- "$1" 2>/dev/null || exit 0; now=$(date +%s); '
                       'for f in "$2"*; do [ -d "$f" ] || continue; '
                       't=$(stat -c %Y -- "$f") || continue; '
                       '[ $((now - t)) -gt "$3" ] && printf "%s\\n" "$f"; done; true', "sh",
                       self._path(RELEASES), prefix, str(int(seconds)), check=False)
        return [n for n in out.splitlines() if n.startswith(prefix)]

    def read_manifest(self, release: str) -> str | None:
        out = self.run("sh", "-c", 'test -f "$1" && cat -- "$1" || true', "sh",
                       self._path(RELEASES, release, "manifest.json"))
        return out if out.strip() else None

    def upload(self, src: Path, files: list[str], name: str) -> None:
        target = self._path(RELEASES, name)
        self.run("mkdir", "-p", "--", target)
        if shutil.which("rsync") is None:
            raise DeployError("rsync is not installed here; install it (and on the device)")
        cmd = ["rsync", "-a", "--files-from=-", "-e", shlex.join(self._ssh_cmd()),
               f"{src}/", f"{self.host}:{target}/"]
        try:
            proc = subprocess.run(cmd, input="\n".join(files) + "\n", capture_output=True,
                                  text=True, timeout=3600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DeployError(f"rsync to {self.host}: {exc}") from None
        if proc.returncode != 0:
            raise DeployError(f"rsync to {self.host} failed (exit {proc.returncode}): "
                              f"{proc.stderr.strip()[-300:]}")
        self.run("sync")  # on the device's disk before `current` can point at them

    def checksums(self, name: str, files: list[str]) -> dict[str, str]:
        out = self.run("sh", "-c", 'cd "$1" && shift && sha256sum -- "$@"', "sh",
                       self._path(RELEASES, name), *files, check=False)
        sums = {}
        for line in out.splitlines():
            if m := re.match(r"^([0-9a-f]{64})\s+\*?(.+)$", line):
                sums[m.group(2)] = m.group(1)
        return sums

    def rename(self, old: str, new: str) -> None:
        self.run("mv", "-T", "--", self._path(RELEASES, old), self._path(RELEASES, new))

    def switch(self, release: str) -> None:
        tmp = self._path(f".{CURRENT}.tmp")
        self.run("sh", "-c", 'ln -sfn -- "$1" "$2" && mv -Tf -- "$2" "$3" && sync', "sh",
                 f"{RELEASES}/{release}", tmp, self._path(CURRENT))

    def remove(self, name: str) -> None:
        self.run("rm", "-rf", "--", self._path(RELEASES, name), check=False)


_REMOTE = re.compile(r"^(?P<host>(?:[^@/:\s\[\]]+@)?[^@/:\s\[\]]+):(?P<path>.*)$")


def destination(dest: str, ssh_options=()) -> LocalDestination | SSHDestination:
    """`[user@]host:/path` (a colon before any slash, as rsync reads it) or a local folder."""
    text = str(dest)
    if Path(text).exists():
        return LocalDestination(Path(text))
    if re.match(r"^[a-z+]+://", text):
        raise UsageError(f"--to {dest}: write [user@]host:/path (a port goes in "
                         "--ssh-option=-p2222 or ~/.ssh/config)")
    m = _REMOTE.match(text)
    if m is None:
        if "@" in text.split("/", 1)[0]:  # user@ and then no plain host: an IPv6 address?
            raise UsageError(f"--to {dest}: cannot read it as [user@]host:/path; for an IPv6 "
                             "address, name the host in ~/.ssh/config and use that name")
        return LocalDestination(Path(text))
    host, path = m.group("host"), m.group("path")
    if host.split("@")[-1].startswith("-"):
        raise UsageError(f"--to {dest}: a host name cannot start with '-'")
    if not path:
        raise UsageError(f"--to {dest}: give the folder on the host, e.g. {host}:/opt/personclf")
    if path == "~" or path.startswith("~/"):
        path = path[2:] or "."  # ssh and rsync both start in the home folder
    elif path.startswith("~"):
        raise UsageError(f"--to {dest}: give the folder as an absolute path or one relative "
                         "to the login's home folder")
    try:
        options = shlex.split(os.environ.get(SSH_OPTS_ENV, "")) + list(ssh_options)
    except ValueError as exc:
        raise UsageError(f"${SSH_OPTS_ENV}: {exc}; fix its quoting") from None
    return SSHDestination(host, path, options)


# ---------------------------------------------------------------------------------------------
# promote, rollback


@dataclass
class PromoteResult:
    destination: str
    release: str | None
    previous: str | None
    new_metric: float | None
    current_metric: float | None
    pruned: list[str] = field(default_factory=list)
    already_current: bool = False
    # Whether both test numbers come from the "same" or "different" test photos (None: unknown).
    test_photos: str | None = None
    # The same export was current, but its files on the device were missing or changed.
    repaired: bool = False
    # Old releases that could not be removed (hidden, retried by the next promote).
    not_removed: list[str] = field(default_factory=list)


def promote(source: Path, dest: str, *, keep: int = DEFAULT_KEEP, force: bool = False,
            ssh_options=()) -> PromoteResult:
    """Copy an export (RUN or RUN/export) to DEST as a new release and make it `current`."""
    if keep < 1:
        raise UsageError(f"--keep {keep}: keep at least the current release")
    folder, manifest = _export_folder(Path(source))
    expected = _verify_local(folder, manifest)
    with destination(dest, ssh_options) as d:
        try:
            return _promote(d, folder, manifest, expected, keep, force)
        except OSError as exc:  # a local DEST before the switch: full disk, no permission
            raise DeployError(f"promote to {d}: {_os_reason(exc)}; {CURRENT} was not "
                              "changed") from None


def _promote(d, folder: Path, manifest: dict, expected: dict, keep: int,
             force: bool) -> PromoteResult:
    if problem := d.problem():
        raise UsageError(f"--to: {problem}")
    current = d.current()
    ours = current is not None and current in d.entries()
    if current is not None and not ours and not force:
        raise PromotionRefused(f"{d}: {CURRENT} points to {current}, which is not a release in "
                               f"{RELEASES}/ (made or deleted by hand?), so the champion gate "
                               "has nothing to compare; pass --force to replace it")
    current_manifest, problem = _release_manifest(d, current) if ours else (None, None)
    if problem and not force:
        raise PromotionRefused(f"{d}: the current release {current} {problem}, so the champion "
                               "gate cannot compare; pass --force to replace it")
    new_metric, cur_metric = _metric(manifest), _metric(current_manifest)
    result = PromoteResult(str(d), None, current, new_metric, cur_metric,
                           test_photos=_test_photos(manifest, current_manifest))
    files = sorted(expected)
    if current_manifest == manifest:
        if not _damaged(d, current, expected):
            result.release, result.already_current = current, True
            return result
        result.repaired = True  # copied again below, as a new release
    parity = manifest.get("parity") or {}
    if not parity.get("passed", True) and not force:
        raise PromotionRefused(f"{folder}: the export failed its parity check "
                               f"({'; '.join(map(str, parity.get('failures') or []))}); "
                               "fix it, or pass --force")
    if current_manifest is not None and not force:
        _champion_gate(f"{folder}", manifest, f"the current release {current} on {d}",
                       current_manifest, result)
    release = _release_id(expected["manifest.json"], d.entries())
    staging = f"{INCOMING}{release}"
    try:
        d.upload(folder, files, staging)
        got = d.checksums(staging, files)
        bad = [rel for rel in files if got.get(rel) != expected[rel]]
        if bad:
            raise DeployError(f"{len(bad)} file(s) differ after the copy to {d} (first: "
                              f"{bad[0]}); current left at {current}")
        d.rename(staging, release)
    except BaseException:
        d.remove(staging)
        raise
    if ours:
        _hide_abandoned(d, current, release)
    try:
        d.switch(release)
    except OSError as exc:
        raise DeployError(f"could not switch {CURRENT} on {d} ({_os_reason(exc)}); it still "
                          f"points to {current}; the copy is {RELEASES}/{release}") from None
    result.release = release
    try:
        result.pruned, result.not_removed = prune(d, keep)
    except (OSError, DeployError) as exc:
        reason = _os_reason(exc) if isinstance(exc, OSError) else str(exc)
        raise DeployError(f"{d}: {CURRENT} -> {RELEASES}/{release}, but removing old releases "
                          f"failed ({reason}); the next promote tries again") from None
    return result


def _release_manifest(d, release: str) -> tuple[dict | None, str | None]:
    """(manifest, None) of a release on DEST, or (None, what is wrong with it)."""
    from .best import manifest_problem

    text = d.read_manifest(release)
    if text is None:
        return None, "has no manifest.json"
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError):
        return None, "has an unreadable manifest.json"
    if problem := manifest_problem(manifest):
        return None, f"has an unusable manifest.json ({problem})"
    return manifest, None


def _damaged(d, release: str, expected: dict[str, str]) -> str | None:
    """What is missing or changed in a release on DEST against `expected` sums, or None."""
    got = d.checksums(release, sorted(expected))
    bad = [rel for rel in sorted(expected) if got.get(rel) != expected[rel]]
    return f"{len(bad)} file(s) missing or changed (first: {bad[0]})" if bad else None


def rollback(dest: str, ssh_options=()) -> tuple[str, str]:
    """Point `current` at the release that was current before it; returns (from, to)."""
    with destination(dest, ssh_options) as d:
        try:
            return _rollback(d)
        except OSError as exc:
            raise DeployError(f"rollback on {d}: {_os_reason(exc)}") from None


def _rollback(d) -> tuple[str, str]:
    """The previous release by sequence among those not rolled back from: after A, B, a
    rollback to A and then C, a rollback from C returns to A, not to the rejected B."""
    current = d.current()
    releases = d.releases()
    if current is None:
        raise UsageError(f"{d}: nothing promoted there yet (no {CURRENT} link)")
    if current not in releases:
        raise DeployError(f"{d}: {CURRENT} points to {current}, which is not in {RELEASES}/; "
                          "promote a release to repair it")
    older = [r for r in releases if _order(r) < _order(current)]
    if not older:
        raise UsageError(f"{d}: {current} is the oldest release kept; nothing to roll back to")
    target = older[-1]
    manifest, problem = _release_manifest(d, target)
    if manifest is not None:
        files = manifest.get("files", {})
        if not all(_plain_relative(rel) and isinstance(sha, str) for rel, sha in files.items()):
            problem = "has an unusable manifest.json (a file name outside its folder)"
        else:
            problem = _damaged(d, target, files)
            if problem is None and not _sha_prefix_ok(d, target):
                problem = "has a manifest.json changed since it was promoted"
    if problem:
        raise DeployError(f"{d}: cannot roll back to {target}: it {problem}; {CURRENT} left at "
                          f"{current} (promote the export you want instead)")
    d.switch(target)
    # Renamed after the switch, so `current` never points at a hidden name; an interruption
    # between the two leaves the rejected release visible, until the next promote hides it.
    try:
        d.rename(current, f"{ROLLED_BACK}{current}")
    except (OSError, DeployError) as exc:
        reason = _os_reason(exc) if isinstance(exc, OSError) else str(exc)
        try:  # a retry must not roll back a second release: undo the switch
            d.switch(current)
        except (OSError, DeployError):
            raise DeployError(f"{d}: {CURRENT} -> {target}, but {current} could not be marked "
                              f"as rolled back ({reason}); fix that before rolling back again, "
                              "or a second rollback goes one release further") from None
        raise DeployError(f"rollback on {d}: could not mark {current} as rolled back "
                          f"({reason}); {CURRENT} left at {current}") from None
    return current, target


def _sha_prefix_ok(d, release: str) -> bool:
    """A release's name ends in the first 8 hex digits of its manifest's sha256 (`_release_id`)."""
    prefix = release.rsplit("-", 1)[-1]
    if not re.fullmatch(r"[0-9a-f]{8}", prefix):
        return True  # not a name this tool made: nothing to check against
    return d.checksums(release, ["manifest.json"]).get("manifest.json", "").startswith(prefix)


def _hide_abandoned(d, current: str, new: str) -> None:
    """Hide the releases numbered between `current` and `new`: none of them is current, so
    each was left by an interrupted rollback (switched away from, not yet renamed) or a
    promote whose switch failed. Once `new` is current they would look like its
    predecessors, and a rollback from `new` must never return to them."""
    low, high = _order(current)[0], _order(new)[0]
    for name in d.releases():
        if low < _order(name)[0] < high:
            d.rename(name, f"{ROLLED_BACK}{name}")


def prune(d, keep: int) -> tuple[list[str], list[str]]:
    """Remove all but the newest `keep` releases (never the current one), the releases rolled
    back from, and what interrupted promotes left behind (untouched for an hour); returns
    (removed, still there). A release is hidden (renamed `.removing-<id>`) before its files
    go: a removal that fails halfway then leaves no gutted release for a rollback to pick."""
    current = d.current()
    releases = d.releases()
    old = [r for r in releases[:-keep] if r != current] if len(releases) > keep else []
    for name in old:
        d.rename(name, f"{REMOVING}{name}")
    doomed = [n for n in d.entries() if n.startswith((ROLLED_BACK, REMOVING))]
    doomed += d.stale(INCOMING, STALE_INCOMING_S)
    for name in doomed:
        d.remove(name)
    left = set(d.entries())
    shown = {f"{REMOVING}{n}": n for n in old}  # as the user knew them
    return ([shown.get(n, n) for n in doomed if n not in left],
            [n for n in doomed if n in left])


def _export_folder(source: Path) -> tuple[Path, dict]:
    """The export folder (RUN/export or the folder itself) and its manifest."""
    from .best import read_manifest_file
    from .export import EXPORT_DIR

    for folder in (source, source / EXPORT_DIR):
        if (folder / "manifest.json").is_file():
            manifest = read_manifest_file(folder / "manifest.json")
            if "files" in manifest:
                return folder, manifest
    raise UsageError(f"{source}: no export here; run `personclf-tune export {source}` first")


def _verify_local(folder: Path, manifest: dict) -> dict[str, str]:
    """The sha256 of every file to copy (manifest included), checked before anything moves.

    Each name must be a plain relative path inside the folder: a manifest is a file anyone
    can edit, and `../x` would write outside the release (into `current`, say)."""
    files = manifest["files"]
    if not isinstance(files, dict):
        raise UsageError(f"{folder}/manifest.json: 'files' is not a table of name: sha256; "
                         "export again")
    for rel, digest in files.items():
        if not _plain_relative(rel) or not isinstance(digest, str):
            raise UsageError(f"{folder}/manifest.json: {rel!r} is not a file name inside the "
                             "export folder; export again")
        if not (folder / rel).is_file() or sha256_file(folder / rel) != digest:
            raise UsageError(f"{folder / rel}: missing or changed since the export; re-export")
    expected = dict(files)
    expected["manifest.json"] = sha256_file(folder / "manifest.json")
    return expected


def _plain_relative(rel) -> bool:
    """A relative POSIX path that stays inside its folder and fits rsync's file list."""
    if not isinstance(rel, str) or not rel or any(c in rel for c in "\\\n\r\0"):
        return False
    parts = rel.split("/")
    return not PurePosixPath(rel).is_absolute() and all(p not in ("", ".", "..") for p in parts)


def _champion_gate(new_name: str, new: dict, cur_name: str, cur: dict,
                   compared: PromoteResult) -> None:
    """Refuse a model the current release beats on test, or one that knows other people.

    Other people make a different task: balanced accuracy over other classes does not
    compare, and a renamed folder (`alice` -> `Alice`) would change what the device
    answers. The message says whether the two numbers come from the same test photos (a
    re-export, a retrain on the same split) or from different ones (a retrain on changed
    data), and gives their intervals where both manifests have them.
    """
    new_classes, cur_classes = list(new.get("classes") or []), list(cur.get("classes") or [])
    added = [c for c in new_classes if c not in cur_classes]
    left = [c for c in cur_classes if c not in new_classes]
    if cur_classes and (added or left):
        change = "; ".join(f"{what}: {', '.join(names)}" for what, names in
                           (("new", added), ("no longer", left)) if names)
        raise PromotionRefused(f"champion gate: {new_name} knows other people than {cur_name} "
                               f"({change}), so their test numbers do not compare; pass "
                               "--force to promote it")
    new_metric, cur_metric = compared.new_metric, compared.current_metric
    if cur_metric is not None and (new_metric is None or new_metric < cur_metric):
        n = _test_set(new).get("images")
        where = {"same": f" on the same {n} test photos" if n else " on the same test photos",
                 "different": " on different test photos"}.get(compared.test_photos or "", "")
        raise PromotionRefused(
            f"champion gate: test {GATE_METRIC} {_fmt(new_metric)} of {new_name} is "
            f"{'missing' if new_metric is None else 'worse'} against {_fmt(cur_metric)} of "
            f"{cur_name}{where}{_intervals(new, cur)}"
            f"{_paired_note(new, cur) if compared.test_photos == 'same' else ''}; pass --force "
            "to promote it anyway")


def _intervals(new: dict, cur: dict) -> str:
    """" (95% intervals: new a-b, current c-d)" where both manifests have them: how far apart
    two point estimates are is what a user weighs before --force."""
    found = []
    for manifest in (new, cur):
        try:
            low, high = (float(v) for v in _section(manifest, "test_ci95")[GATE_METRIC])
        except (TypeError, KeyError, ValueError):
            return ""
        found.append(f"{low:.2f}-{high:.2f}")
    return f" (95% intervals: new {found[0]}, current {found[1]})"


def _paired_note(new: dict, cur: dict) -> str:
    """Where both releases were tested on the same photos and recorded each prediction: how
    many photos each alone gets right, and McNemar's exact test of that split. A point or two
    of balanced accuracy is often a handful of photos either way, which p says."""
    from scipy.stats import binomtest

    a, b = _predictions(new), _predictions(cur)
    if not a or a.keys() != b.keys() or any(a[k][0] != b[k][0] for k in a):
        return ""
    new_only = sum(a[k][1] == a[k][0] != b[k][1] for k in a)
    cur_only = sum(b[k][1] == b[k][0] != a[k][1] for k in a)
    p = binomtest(new_only, new_only + cur_only).pvalue if new_only + cur_only else 1.0
    return (f"; photo by photo, the new model alone is right on {new_only}, the current one "
            f"alone on {cur_only} (McNemar exact p = {p:.2f})")


def _predictions(manifest: dict) -> dict:
    """{photo: [true, predicted]} from `metrics.test_predictions`, or {} if malformed."""
    rows = _section(manifest, "test_predictions")
    ok = all(isinstance(v, list) and len(v) == 2 for v in rows.values())
    return rows if ok else {}


def _test_set(manifest: dict | None) -> dict:
    return _section(manifest, "test_set")


def _section(manifest: dict | None, name: str) -> dict:
    """`manifest["metrics"][name]` if both are mappings, else {}: a device's manifest is a file
    anyone can edit, and the gate must refuse or pass with one line, never crash."""
    metrics = manifest.get("metrics") if isinstance(manifest, dict) else None
    section = metrics.get(name) if isinstance(metrics, dict) else None
    return section if isinstance(section, dict) else {}


def _test_photos(new: dict, cur: dict | None) -> str | None:
    """"same" or "different" test photos behind the two releases' numbers; None if unknown
    (a manifest from before fingerprints, or fingerprints of different kinds)."""
    a, b = _test_set(new), _test_set(cur)
    if not a.get("sha256") or not b.get("sha256") or a.get("by") != b.get("by"):
        return None
    return "same" if a["sha256"] == b["sha256"] else "different"


def _metric(manifest: dict | None) -> float | None:
    """The gate's metric, or None when missing or not a finite number."""
    try:
        value = float(_section(manifest, "test")[GATE_METRIC])
    except (TypeError, KeyError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _os_reason(exc: OSError) -> str:
    return f"{exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")


def _release_id(manifest_sha: str, taken: list[str]) -> str:
    """`<seq>-<UTC time>-<manifest sha>`: the sequence number orders releases even if clocks
    don't; `taken` includes hidden entries, so a number rolled back from is not reused."""
    seq = max((_order(name)[0] for name in taken), default=0) + 1
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{seq:04d}-{stamp}-{manifest_sha[:8]}"


def _order(name: str) -> tuple[int, str]:
    bare = name
    for prefix in (ROLLED_BACK, INCOMING, REMOVING):
        bare = bare.removeprefix(prefix)
    head = bare.split("-", 1)[0]
    return (int(head) if head.isdigit() else 0, name)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# ---------------------------------------------------------------------------------------------
# Command line.


def add_cli(subparsers) -> None:
    """Register `predict`, `promote` and `rollback` on the tool's subcommand parser."""
    from .export import FORMAT_NAMES

    p = subparsers.add_parser("predict", help="classify images with any exported model")
    p.add_argument("model", type=Path, metavar="MODEL",
                   help="a .keras/.tflite file, a SavedModel folder, or RUN/export")
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE|DIR")
    p.add_argument("--format", choices=FORMAT_NAMES, dest="model_format",
                   help="which model of an export folder (default: int8, else tflite, keras)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_predict)

    ssh_help = (f"extra ssh option (repeatable), e.g. --ssh-option=-p2222; also read from "
                f"${SSH_OPTS_ENV}")
    p = subparsers.add_parser("promote", help="copy a run's export to a device as the current release")
    p.add_argument("run_dir", type=Path, metavar="RUN", help="RUN or RUN/export")
    p.add_argument("--to", required=True, metavar="DEST", help="a folder or [user@]host:/path")
    p.add_argument("--keep", type=int, default=DEFAULT_KEEP, metavar="N",
                   help=f"releases kept for rollback (default {DEFAULT_KEEP})")
    p.add_argument("--force", action="store_true",
                   help="promote even when worse than the current release (champion gate)")
    p.add_argument("--ssh-option", action="append", default=[], metavar="OPT", help=ssh_help)
    p.add_argument("--json", action="store_true", help="print the result as JSON for scripts")
    p.set_defaults(func=cmd_promote)

    p = subparsers.add_parser("rollback", help="switch a device back to its previous release")
    p.add_argument("--to", required=True, metavar="DEST", help="a folder or [user@]host:/path")
    p.add_argument("--ssh-option", action="append", default=[], metavar="OPT", help=ssh_help)
    p.add_argument("--json", action="store_true", help="print the result as JSON for scripts")
    p.set_defaults(func=cmd_rollback)


def cmd_predict(args) -> int:
    results = predict(args.model, args.images, args.model_format)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if "error" in r:
                print(f"{r['image']}: ERROR {r['error']}")
            elif r["label"] != r["top1"]:
                print(f"{r['image']}: {r['label']} (best guess {r['top1']} "
                      f"{r['probability']:.3f} < threshold {r['threshold']:.3f})")
            else:
                print(f"{r['image']}: {r['label']} {r['probability']:.3f}")
            if "warning" in r:
                print(f"  warning: {r['warning']}")
    return 1 if any("error" in r for r in results) else 0


def cmd_promote(args) -> int:
    result = promote(args.run_dir, args.to, keep=args.keep, force=args.force,
                     ssh_options=args.ssh_option)
    if args.json:
        print(json.dumps(result.__dict__, indent=2))
        return 0
    photos = f"; {result.test_photos} test photos" if result.test_photos else ""
    print(f"test {GATE_METRIC}: new {_fmt(result.new_metric)}, current "
          f"{_fmt(result.current_metric)} ({result.previous or 'none'}{photos})")
    if result.already_current:
        print(f"{result.destination}: this export is already current ({result.release})")
    else:
        if result.repaired:
            print(f"{result.destination}: this export was current ({result.previous}), but "
                  "files there were missing or changed: copied again")
        print(f"{result.destination}: current -> {RELEASES}/{result.release}")
    if result.pruned:
        print("removed old releases: " + ", ".join(result.pruned))
    if result.not_removed:
        print("could not remove (hidden; the next promote tries again): "
              + ", ".join(result.not_removed))
    return 0


def cmd_rollback(args) -> int:
    old, new = rollback(args.to, ssh_options=args.ssh_option)
    if args.json:
        print(json.dumps({"from": old, "to": new}))
    else:
        print(f"{args.to}: current {old} -> {new}")
    return 0
