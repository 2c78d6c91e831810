"""Scan a dataset folder, find bad files and duplicates, split it, and weigh its classes.

Layout: `DIR/<person>/*` holds photos where the face is visible; a folder nested inside a
person's folder (e.g. `DIR/<person>/no_face/`: any nested folder, or those named by
`--no-face-folder`) holds photos of that person where it is not;
`DIR/Unknown/*` holds strangers. Real folders are messy, so every file is opened and fully
decoded once here: whatever cannot be used is reported with a reason and left untouched. Input
files are only ever opened for reading.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import stat
import sys
import unicodedata
import warnings
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import simplejpeg
from PIL import Image, ImageFile, ImageOps, ImageStat

from .config import MAX_PIXELS, ScanConfig, SplitConfig
from .errors import DatasetError, UsageError
from .workers import usable_cpus

log = logging.getLogger(__name__)

# Never accept a truncated file silently: it is reported instead.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Phones save HEIC (every iPhone since 2017 by default): read it through libheif, which applies
# the stored rotation (pi-heif then sets the EXIF orientation to 1, so nothing rotates twice).
# Only the primary image is wanted, not thumbnails, depth maps or other auxiliary images.
# Pillow reads AVIF itself.
try:
    import pi_heif

    pi_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)
    HEIF_READER = True
except ImportError:  # a dependency, but a broken install must not stop every command
    HEIF_READER = False
# Pillow's own warnings (palette transparency, odd EXIF, large images) would bury the CLI's output;
# every real problem is reported as a skip reason instead. A module-scoped filter, installed once,
# because `warnings.catch_warnings()` per image is not thread-safe and the input pipeline decodes
# in threads (racing catch_warnings can leave *all* warnings silenced for the whole process).
warnings.filterwarnings("ignore", module=r"PIL\.")

SYSTEM_FILES = {".ds_store", "thumbs.db", "desktop.ini", "icon\r", ".directory"}
SPLITS = ("train", "val", "test")
FACE, NO_FACE = "face", "no_face"
# A class needs one group of images in each of train, val and test.
MIN_IMAGES_PER_CLASS = len(SPLITS)
# A photo is never this big; reading a stray video or disk image whole would exhaust memory.
MAX_FILE_BYTES = 512 * 1024 * 1024
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".heic",
                  ".heif", ".avif"}
NOT_IN_CLASS_FOLDER = "not inside a class folder"
# Camera RAW files are TIFF inside: Pillow would read only an embedded preview (a 160x120
# thumbnail in a NEF), never the photo. A camera shooting RAW+JPEG leaves the JPEG beside it.
RAW_SUFFIXES = {".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".orf",
                ".rw2", ".raf", ".pef", ".srw", ".x3f", ".3fr", ".iiq", ".raw"}
# Leading bytes of the formats people actually put in photo folders, to name what a file that
# Pillow cannot open was meant to be ("corrupt JPEG" rather than "not an image").
_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"),
          (b"GIF89a", "GIF"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP"))
# What a complete file ends with: a damaged file that still has it was not cut short.
_TRAILERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82", "GIF": b";"}
# A picture none of whose channels varies by this much (standard deviation, grey levels) shows
# nothing: a camera's blank frame, or damaged pixel data that decodes without an error to one
# flat colour (a WebP with its image data zeroed: 0.3). The flattest photo in the shared
# datasets has 16.
BLANK_STDDEV = 1.0
# The scan's pixels only feed the perceptual hash (32x32) and the blank test: a large JPEG is
# decoded at a reduced scale, never below this on either side.
SCAN_SIZE = 512
# What libjpeg says when the compressed picture data is damaged (jerror.h: JWRN_HIT_MARKER,
# JWRN_EXTRANEOUS_DATA, JWRN_HUFF_BAD_CODE, JWRN_MUST_RESYNC, JWRN_JPEG_EOF, ...). Its other
# warnings (an unknown JFIF version, a bad thumbnail) leave the picture whole.
_JPEG_DAMAGE = ("Corrupt JPEG data", "Premature end of JPEG file")


@dataclass
class ScanResult:
    """What a scan found. `images` has one row per usable image; the rest explains the others."""

    config: ScanConfig
    images: pd.DataFrame
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}
    duplicates: list[dict] = field(default_factory=list)  # exact copies: {"sha256", "paths", "labels", "conflict"}
    near_duplicates: list[dict] = field(default_factory=list)  # {"paths", "labels", "distance", "conflict"}
    empty_classes: list[str] = field(default_factory=list)
    excluded_no_face: int = 0  # images left out by --no-face-policy skip
    nested_folders: list[dict] = field(default_factory=list)  # {"path", "view"}, in class folders
    # --group-pattern: {"pattern", "matched", "unmatched", "groups", "largest": {"key", "photos"}}
    pattern_groups: dict | None = None

    @property
    def classes(self) -> list[str]:
        """Sorted labels, so that class indices are stable across runs and machines."""
        return sorted(self.images["label"].unique().tolist())

    def counts(self) -> dict[str, dict[str, int]]:
        """{label: {"face": n, "no_face": m}} after the no-face policy."""
        out: dict[str, dict[str, int]] = {}
        for label in self.classes:
            rows = self.images[self.images["label"] == label]
            out[label] = {view: int((rows["view"] == view).sum()) for view in (FACE, NO_FACE)}
        return out

    def fingerprint(self) -> str:
        """Hash of (path, content, label) of every usable image: keys caches and guards resumes."""
        h = hashlib.sha256()
        for row in self.images.sort_values("path").itertuples():
            h.update(f"{row.path}\0{row.sha256}\0{row.label}\n".encode())
        return h.hexdigest()[:16]

    def similar_classes(self) -> list[list[str]]:
        """Class folders whose names differ only in case, spaces, dashes, dots, underscores or
        Unicode form ("alice" and "Alice"; "José" typed on Linux and copied from a Mac, which
        writes names decomposed): most likely one person split into two classes."""
        groups: dict[str, list[str]] = {}
        for label in self.classes:
            key = re.sub(r"[\s_.\-]+", " ", unicodedata.normalize("NFKC", label).casefold()).strip()
            groups.setdefault(key, []).append(label)
        return [names for names in groups.values() if len(names) > 1]

    def summary(self) -> dict:
        """The machine-readable form (`personclf-tune data --json`)."""
        counts = self.counts()
        totals = [sum(v.values()) for v in counts.values()]
        return {
            "data_dir": str(self.config.data_dir),
            "no_face_policy": self.config.no_face_policy,
            "no_face_folders": list(self.config.no_face_folders),
            "unknown_name": self.config.unknown_name,
            "images": int(len(self.images)),
            "classes": counts,
            "imbalance_ratio": (max(totals) / min(totals)) if totals else None,
            "class_weights": class_weights(self.images["label"], self.classes) if totals else {},
            "skipped": self.skipped,
            "duplicates": self.duplicates,
            "near_duplicates": self.near_duplicates,
            "empty_classes": self.empty_classes,
            "similar_classes": self.similar_classes(),
            "excluded_no_face": self.excluded_no_face,
            "nested_folders": self.nested_folders,
            "pattern_groups": self.pattern_groups,
            "fingerprint": self.fingerprint(),
        }

    def validate(self) -> None:
        """Raise a one-line DatasetError when the dataset cannot be trained and tested on."""
        where = self.config.data_dir
        if self.images.empty:
            raise DatasetError(
                f"{where}: no usable images found; put photos in {where}/<person>/ folders "
                f"({len(self.skipped)} files were skipped, see the report)"
            )
        classes = self.classes
        if len(classes) < 2:
            raise DatasetError(
                f"{where}: only one class ({classes[0]!r}); add a folder per person and an "
                f"{self.config.unknown_name}/ folder of other people"
            )
        groups = self.images.groupby("label")["group"].nunique()
        photos = self.images.groupby("label").size()
        for label, n in groups.items():
            if n < MIN_IMAGES_PER_CLASS:
                keyed = (" and photos with one --group-pattern key"
                         if self.config.group_pattern is not None else "")
                near = (f" ({photos[label]} photos, near-duplicates within "
                        f"--near-duplicate-distance {self.config.near_duplicate_distance}"
                        f"{keyed} counted once)" if photos[label] > n else "")
                raise DatasetError(
                    f"class {label!r} has {n} distinct usable image(s){near}; each class needs "
                    f"at least {MIN_IMAGES_PER_CLASS} to split into train/val/test: add photos "
                    f"to {where / str(label)} or remove that folder"
                )


# ---------------------------------------------------------------------------------------------
# Decoding: one function used by the scan and by the input pipeline, so both see the same pixels.


def open_rgb(data: bytes, max_pixels: int = MAX_PIXELS, at_least: int | None = None) -> Image.Image:
    """Decode image bytes to an upright 8-bit RGB image.

    Applies the EXIF orientation, takes the first frame of animations, scales 16-bit images
    down instead of clipping them, and composites transparency onto white. Raises ValueError
    with a human reason when the bytes are not a usable image.

    `at_least`: the caller shrinks the picture to this size anyway, so a large JPEG may be
    decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling), never below it on either side.
    A 12-megapixel phone photo decodes several times faster; a picture under twice the size
    decodes exactly as without it.
    """
    return _decode(data, max_pixels, at_least)[0]


def _decode(data: bytes, max_pixels: int,
            at_least: int | None = None) -> tuple[Image.Image, str, str, tuple[int, int]]:
    """(upright RGB image, file format, original mode, upright full size); ValueError with a
    reason otherwise.

    The declared size is checked right after the header is parsed, before any pixel is
    allocated. Pillow's global MAX_IMAGE_PIXELS is left alone (it protects other code too);
    it still refuses, by itself, sizes over twice its limit, which are bombs here as well.
    """
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ValueError(f"decompression bomb: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - plugins raise OSError, SyntaxError, struct.error, ...
        raise ValueError(_unidentified_reason(data, exc)) from None
    width, height = img.size
    if width * height > max_pixels:
        raise ValueError(
            f"decompression bomb: declares {width}x{height} pixels (limit {max_pixels:,})"
        )
    fmt, mode = img.format or "image", img.mode
    if at_least:
        img.draft(None, (at_least, at_least))  # JPEG only; every other format ignores it
    try:
        img.seek(0)  # the first frame of an animation
        img.load()
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the pixels are unusable
        raise ValueError(f"{_damage(data, fmt, exc)} {fmt}: {_one_line(exc)}") from None
    stored = img.size
    try:
        ImageOps.exif_transpose(img, in_place=True)  # a copy cost half a 12 MP photo's decode
    except Exception as exc:  # noqa: BLE001 - damaged EXIF: show the pixels as stored, like viewers do
        log.debug("ignoring unreadable EXIF orientation: %s", exc)
    if img.size != stored:  # turned a quarter: so is the full size
        width, height = height, width
    try:
        return _to_rgb(img, fmt), fmt, mode, (width, height)
    except (ValueError, OSError) as exc:
        raise ValueError(f"unsupported colour mode {mode} in {fmt}: {exc}") from None


def _damage(data: bytes, fmt: str, exc: Exception) -> str:
    """"truncated" when the file stops early, else "corrupt".

    Pillow says "truncated" whenever it runs out of bytes, also when a damaged length field
    sends it past the end; a file that still ends with its format's trailer was not cut short.
    """
    declared = _riff_size(data)
    if declared is not None:  # WebP: its RIFF header gives the length; Pillow's error does not
        return "truncated" if len(data) < declared else "corrupt"
    trailer = _TRAILERS.get(fmt)
    if trailer and data.rstrip(b"\x00").endswith(trailer):
        return "corrupt"
    message = str(exc).lower()
    return "truncated" if "truncated" in message or "end of file" in message else "corrupt"


def _one_line(exc: Exception) -> str:
    """A decoder's message on one line (libheif's end with a line break)."""
    return " ".join(str(exc).split())


def _container_kind(data: bytes) -> str | None:
    """HEIF or AVIF from the brand of an ISO media file's `ftyp` box, else None."""
    if data[4:8] != b"ftyp":
        return None
    brand = data[8:12]
    if brand in (b"avif", b"avis"):
        return "AVIF"
    if brand in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"):
        return "HEIF"
    return None


def _riff_size(data: bytes) -> int | None:
    """The file length a RIFF (WebP) header declares, or None for other files."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    return int.from_bytes(data[4:8], "little") + 8


def _unidentified_reason(data: bytes, exc: Exception) -> str:
    """Why Pillow could not even parse the header: a damaged known format, text, or other."""
    kind = next((k for magic, k in _MAGIC if data.startswith(magic)), None)
    declared = _riff_size(data)
    if kind is None and declared is not None:
        kind = "WEBP"
    kind = kind or _container_kind(data)
    if kind == "HEIF" and not HEIF_READER:
        return "HEIF photo: cannot be read without pi-heif (pip install pi-heif)"
    if kind:
        if _damage(data, kind, exc) == "truncated":
            if declared is not None:  # libwebp reads the whole file when Pillow opens it
                return f"truncated {kind}: {len(data):,} of the {declared:,} bytes its header declares"
            return f"truncated {kind}: file ends inside its header"
        return f"corrupt {kind}: header unreadable"
    if data[4:8] == b"ftyp" or (data[:4] == b"RIFF" and data[8:12] == b"AVI "):
        return "not an image: a video (a phone keeps one beside each Live Photo)"
    head = data[:1024]
    printable = sum(32 <= c < 127 or c in (9, 10, 13) or c >= 128 for c in head)
    if head and b"\x00" not in head and printable / len(head) > 0.95:
        return "not an image: text file"
    return "not an image: unrecognised format"


def _to_rgb(img: Image.Image, fmt: str = "") -> Image.Image:
    """Any Pillow mode to 8-bit RGB: rescale (not clip) 16-bit, flatten alpha onto white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        # Pillow < 11 opens 16-bit grey PNGs as "I": those are 16-bit even when dark.
        sixteen = img.mode.startswith("I;16") or fmt == "PNG" or arr.max(initial=0) > 255
        top = 65535.0 if sixteen else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def read_bytes(path: Path) -> bytes:
    """Read a file without following it anywhere unexpected (kept separate as a test seam)."""
    with open(path, "rb") as fh:
        return fh.read()


def phash64(img: Image.Image) -> int:
    """64-bit perceptual hash (DCT of a 32x32 greyscale), robust to re-encoding and resizing."""
    import imagehash

    bits = imagehash.phash(img, hash_size=8).hash.flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


# ---------------------------------------------------------------------------------------------
# The scan.


def scan(config: ScanConfig) -> ScanResult:
    """Walk `config.data_dir`, decode every candidate file once, and describe what is usable."""
    root = config.data_dir
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory; give a folder with one subfolder of photos per person")
    root_real = os.path.realpath(root)
    rows: list[dict] = []
    skipped: list[dict] = []
    empty: list[str] = []
    excluded = 0
    class_reals: dict[str, str] = {}
    folders: dict[str, Path] = {}  # person folders with usable images, before duplicates
    nested: list[dict] = []  # folders inside class folders: {"path", "view"}

    def skip(path: Path, reason: str) -> None:
        skipped.append({"path": _rel(path, root), "reason": reason})

    # Walk every class folder first, so the decoding below knows its total and spans classes.
    classes: list[tuple[str, Path, list[tuple[Path, str, str]]]] = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        reason = _name_problem(entry)
        if reason:
            skip(entry, reason)
            continue
        if not entry.is_dir():
            skip(entry, _not_dir_reason(entry) or NOT_IN_CLASS_FOLDER)
            continue
        real = os.path.realpath(entry)
        if _inside(root_real, real):
            skip(entry, "symlink loop: points to the dataset folder or above it")
            continue
        if real in class_reals:
            skip(entry, f"same folder as class {class_reals[real]!r} (symlink): ignored")
            continue
        class_reals[real] = entry.name
        label = entry.name
        wanted = []
        for path, view in _walk_class(entry, root_real, skip, config.no_face_folders, nested,
                                      strangers=label == config.unknown_name):
            effective = label
            if view == NO_FACE and label != config.unknown_name:
                if config.no_face_policy == "skip":
                    excluded += 1
                    continue
                if config.no_face_policy == "unknown":
                    effective = config.unknown_name
            wanted.append((path, view, effective))
        classes.append((label, entry, wanted))

    inspected = iter(_inspect_all([path for _, _, wanted in classes for path, _, _ in wanted],
                                  root, config))
    for label, entry, wanted in classes:
        found = 0
        for path, view, effective in wanted:
            row, reason = next(inspected)
            if reason:
                skip(path, reason)
                continue
            row.update(label=effective, folder=label, view=view)
            rows.append(row)
            found += 1
        if found == 0:
            empty.append(label)
            skip(entry, "class folder has no usable images: ignored")
        elif label != config.unknown_name:
            folders[label] = entry

    images = pd.DataFrame(
        rows,
        columns=["path", "label", "folder", "view", "width", "height", "format", "mode",
                 "bytes", "sha256", "phash"],
    )
    nested = [{"path": _rel(d["path"], root), "view": d["view"]} for d in nested]
    result = ScanResult(config, images, skipped, empty_classes=empty, excluded_no_face=excluded,
                        nested_folders=nested)
    _find_duplicates(result)
    # A person can still vanish: every photo a duplicate of another folder's, or (with
    # --no-face-policy unknown) every photo a no-face view. Say so, as for an empty folder.
    left = set(result.images["label"])
    for label, entry in folders.items():
        if label in left:
            continue
        result.empty_classes.append(label)
        if (result.images["folder"] == label).any():
            skip(entry, "only no-face photos, counted as Unknown (--no-face-policy unknown): "
                        "not a class")
        else:
            skip(entry, "every photo was dropped as a duplicate (see those lines): ignored")
    return result


def _name_problem(path: Path) -> str | None:
    """Entries skipped by name alone: OS clutter, hidden entries, names that cannot be written
    to split.csv or JSON (undecodable bytes)."""
    name = path.name
    if name.lower() in SYSTEM_FILES:
        return "system file ignored"
    if name.startswith("."):
        return "hidden folder ignored" if path.is_dir() else "hidden file ignored"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8: rename it"
    if "\n" in name or "\r" in name:  # labels.txt has one class per line
        return "name contains a line break: rename it"
    return None


def _not_dir_reason(path: Path) -> str | None:
    """A reason for a symlink that leads nowhere (dangling or looping), else None."""
    if not path.is_symlink():
        return None
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop"
        return f"broken symlink: {exc.strerror or exc}"
    return None


def _inside(path: str, folder: str) -> bool:
    """True when real path `path` is `folder` or below it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _walk_class(folder: Path, root_real: str, skip, no_face_names: tuple[str, ...] = (),
                nested: list[dict] | None = None,
                strangers: bool = False) -> list[tuple[Path, str]]:
    """Files of one class folder with their view, appending each nested folder to `nested`.

    A nested folder is the no-face view when `no_face_names` holds its name (ignoring case),
    or, when it is empty, in a person's folder (not in the `strangers` folder, where a
    subfolder is more naturally one stranger's photos); everything below a no-face folder is
    no-face too, and other nested folders keep the view of the folder they are in. Follows
    symlinked folders, but never the same real folder twice, never one that contains
    the folder being walked (a loop) and never another class's folder (its photos would all
    become label conflicts and be dropped from both classes), so the walk always ends.
    """
    out: list[tuple[Path, str]] = []
    seen: set[str] = set()
    class_real = os.path.realpath(folder)

    def visit(directory: Path, real: str, view: str) -> None:
        seen.add(real)
        try:
            entries = sorted(directory.iterdir(), key=lambda p: p.name)
        except OSError as exc:
            skip(directory, f"unreadable folder: {exc.strerror or exc}")
            return
        for path in entries:
            reason = _name_problem(path)
            if reason:
                skip(path, reason)
            elif not path.is_dir():
                reason = _not_dir_reason(path)
                if reason:
                    skip(path, reason)
                else:
                    out.append((path, view))
            else:
                target = os.path.realpath(path)
                if _inside(real, target):
                    skip(path, "symlink loop: points to a folder that contains it")
                elif target in seen:
                    skip(path, "folder already scanned (reached twice through a symlink): ignored")
                elif _inside(target, root_real) and not _inside(target, class_real):
                    skip(path, "symlink to another class's folder: ignored")
                else:
                    named = (path.name.casefold() in names if names else not strangers)
                    inner = NO_FACE if view == NO_FACE or named else FACE
                    if nested is not None:
                        nested.append({"path": path, "view": inner})
                    visit(path, target, inner)

    names = {n.casefold() for n in no_face_names}
    visit(folder, class_real, FACE)
    return out


def decode_threads() -> int:
    """Threads for decoding photos (the scan, the input pipeline): Pillow, libjpeg and hashlib
    release the GIL, so one per usable core, at most 8."""
    return min(8, usable_cpus())


def _inspect_all(paths: list[Path], root: Path,
                 config: ScanConfig) -> list[tuple[dict | None, str | None]]:
    """`_inspect` of every path, in order, in threads, with a progress bar on a terminal.

    Decoding dominates (a 12-megapixel photo: about 0.3 s on one core), and threads decode in
    parallel (`decode_threads`).
    """
    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=decode_threads()) as pool, \
            tqdm(total=len(paths), desc="scan", unit="file", leave=False, dynamic_ncols=True,
                 disable=not sys.stderr.isatty()) as bar:
        out = []
        for result in pool.map(lambda path: _inspect(path, root, config), paths):
            out.append(result)
            bar.update(1)
        return out


def _inspect(path: Path, root: Path, config: ScanConfig) -> tuple[dict | None, str | None]:
    """Open one file read-only: (its row, None), or (None, why it is unusable). Thread-safe."""
    try:
        st = path.stat()
    except OSError as exc:
        return None, f"unreadable: {exc.strerror or exc}"
    if not stat.S_ISREG(st.st_mode):
        return None, "not a regular file"
    if st.st_size == 0:
        return None, "empty file (0 bytes)"
    if st.st_size > MAX_FILE_BYTES:
        return None, f"too large for a photo ({st.st_size / 2**20:,.0f} MiB): not read"
    if path.suffix.lower() in RAW_SUFFIXES:
        return None, ("camera RAW file: only its small embedded preview could be read; use the "
                      "JPEG the camera saved beside it, or export one")
    try:
        data = read_bytes(path)
    except OSError as exc:
        return None, f"unreadable: {exc.strerror or exc}"
    try:
        img, fmt, mode, (width, height) = _decode(data, config.max_pixels, SCAN_SIZE)
    except ValueError as exc:
        reason = str(exc)
        if reason.startswith("not an image") and _looks_like_image(path):
            reason += f", though named {path.suffix}"
        return None, reason
    except Exception as exc:  # noqa: BLE001 - a decoder bug must not end the scan
        return None, f"cannot decode: {type(exc).__name__}: {exc}"
    damage = hidden_damage(data)
    if damage:
        return None, damage
    if max(ImageStat.Stat(img).stddev) < BLANK_STDDEV:
        return None, (f"blank {fmt}: one flat colour, nothing to learn from (a blank frame, or "
                      "damaged pixel data)")
    return {
        "path": _rel(path, root),
        "width": width,
        "height": height,
        "format": fmt,
        "mode": mode,
        "bytes": st.st_size,
        "sha256": hashlib.sha256(data).hexdigest(),
        "phash": phash64(img),
    }, None


def hidden_damage(data: bytes) -> str | None:
    """Why a JPEG or PNG that Pillow decoded is still damaged, or None (other formats: None).

    Pillow fills in what damaged data lacks without a word: libjpeg's warnings go unreported, so
    a JPEG with a run of zeroed bytes decodes with a third of its picture garbled, and a PNG whose
    image data was zeroed loads with black rows. Such a photo would train as the person. Strict
    libjpeg-turbo (simplejpeg) and PNG's chunk checksums catch what the decode does not.
    """
    if data.startswith(b"\xff\xd8\xff"):
        return _jpeg_damage(data)
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png_damage(data)
    return None


def _jpeg_damage(data: bytes) -> str | None:
    try:
        header = simplejpeg.decode_jpeg_header(data)
        # Decoding at 1/8 scale still reads every compressed bit, where the damage shows.
        simplejpeg.decode_jpeg(data, colorspace="CMYK" if header[2] in ("CMYK", "YCCK") else "RGB",
                               min_factor=8, strict=True)
    except ValueError as exc:
        message = str(exc)
        if message.startswith(_JPEG_DAMAGE):
            return f"damaged JPEG: part of the picture is garbled or missing (libjpeg: {message})"
        log.debug("strict JPEG check: %s", message)  # unsupported by libjpeg-turbo, not damage
    except Exception as exc:  # noqa: BLE001 - the check must never cost a photo Pillow reads
        log.debug("strict JPEG check failed: %s", exc)
    return None


def _png_damage(data: bytes) -> str | None:
    """A critical chunk (IHDR, PLTE, IDAT) whose checksum fails, or no chunk where one should be.

    Damaged ancillary chunks (text, colour profile) are ignored, as libpng does; a file that ends
    without IEND after its image data decoded is left to the decode.
    """
    pos = 8  # past the signature
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        if not kind.isalpha():
            return f"damaged PNG: no valid chunk at byte {pos:,} (part of the picture is garbled or missing)"
        critical = kind[:1].isupper() and kind != b"IEND"  # a cut IEND leaves the picture whole
        end = pos + 12 + length
        if end > len(data):
            return (f"damaged PNG: its {kind.decode()} chunk runs past the end of the file"
                    if critical else None)
        if critical and zlib.crc32(data[pos + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            return (f"damaged PNG: the checksum of its {kind.decode()} chunk does not match "
                    "(part of the picture is garbled or missing)")
        if kind == b"IEND":
            return None
        pos = end
    return None


def _looks_like_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------
# Duplicates: exact copies are dropped (a label conflict drops every copy), near-duplicates are
# kept but grouped, so that no group straddles two splits. Of exact copies the shortest path is
# kept (then the first in order): "x.jpg" is more likely the original than "x (1).jpg" or
# "x copy.jpg", which sort before it.


def _find_duplicates(result: ScanResult) -> None:
    df = result.images
    drop: set[int] = set()
    for digest, rows in df.groupby("sha256", sort=True):
        if len(rows) < 2:
            continue
        labels = sorted(rows["label"].unique().tolist())
        conflict = len(labels) > 1
        paths = sorted(rows["path"].tolist(), key=lambda p: (len(p), p))
        result.duplicates.append(
            {"sha256": digest, "paths": paths, "labels": labels, "conflict": conflict,
             "kept": None if conflict else paths[0]}
        )
        for idx, path in zip(rows.index, rows["path"]):
            if conflict or path != paths[0]:
                drop.add(idx)
                reason = (f"label conflict: same content in classes {', '.join(labels)}"
                          if conflict else f"exact duplicate of {paths[0]}")
                result.skipped.append({"path": path, "reason": reason})
    df = df.drop(index=sorted(drop)).reset_index(drop=True)

    parent = list(range(len(df)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    hashes = df["phash"].to_numpy(dtype=np.uint64) if len(df) else np.zeros(0, np.uint64)
    limit = result.config.near_duplicate_distance
    for i, j, dist in _near_pairs(hashes, limit):
        parent[find(i)] = find(j)
        labels = sorted({df.at[i, "label"], df.at[j, "label"]})
        result.near_duplicates.append(
            {"paths": [df.at[i, "path"], df.at[j, "path"]], "labels": labels,
             "distance": int(dist), "conflict": len(labels) > 1}
        )
    if result.config.group_pattern is not None:
        keys = _pattern_keys(df["path"], result.config.group_pattern)
        first_with: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key is not None:
                parent[find(i)] = find(first_with.setdefault(key, i))
        result.pattern_groups = _pattern_summary(result.config.group_pattern, keys)
    roots = [find(i) for i in range(len(df))]
    # Group ids are the smallest member's index: stable for the same files.
    first: dict[int, int] = {}
    for i, r in enumerate(roots):
        first.setdefault(r, i)
    df["group"] = [first[r] for r in roots]
    result.images = df


def _pattern_keys(paths, pattern: str) -> list[str | None]:
    """Each path's --group-pattern key: the match's first group if the pattern has one (and
    it took part), else the whole match; None where the pattern is not found."""
    rx = re.compile(pattern)
    keys: list[str | None] = []
    for path in paths:
        m = rx.search(path)
        keys.append(None if m is None else
                    m.group(1) if rx.groups and m.group(1) is not None else m.group(0))
    return keys


def _pattern_summary(pattern: str, keys: list[str | None]) -> dict:
    counts = Counter(k for k in keys if k is not None)
    largest = counts.most_common(1)
    return {"pattern": pattern, "matched": sum(counts.values()),
            "unmatched": sum(k is None for k in keys), "groups": len(counts),
            "largest": {"key": largest[0][0], "photos": largest[0][1]} if largest else None}


_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount64(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (np.bitwise_count needs numpy 2; the project allows 1.26)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return _popcount64_table(x)


def _popcount64_table(x: np.ndarray) -> np.ndarray:
    return _POPCOUNT8[np.ascontiguousarray(x)[..., None].view(np.uint8)].sum(-1, dtype=np.uint8)


def _near_pairs(hashes: np.ndarray, limit: int, chunk: int = 256):
    """Yield (i, j, distance) with i < j for 64-bit hashes within `limit` bits.

    All pairs, compared a block of rows at a time: the XOR block is chunk x n x 8 bytes, so a
    small chunk keeps 100k images at about 200 MB.
    """
    n = len(hashes)
    for start in range(0, n, chunk):
        block = hashes[start:start + chunk]
        dist = _popcount64(block[:, None] ^ hashes[None, :])
        ii, jj = np.nonzero(dist <= limit)
        for a, j in zip(ii.tolist(), jj.tolist()):
            i = start + a
            if i < j:
                yield i, j, dist[a, j]


# ---------------------------------------------------------------------------------------------
# Split and class weights.


def split(images: pd.DataFrame, config: SplitConfig) -> pd.DataFrame:
    """Stratified, group-aware, seeded train/val/test assignment.

    scikit-learn has no splitter that is stratified and group-aware at arbitrary fractions
    (StratifiedGroupKFold only gives 1/k folds), so groups are dealt greedily: largest groups
    first (ties in seeded random order), each to the split whose per-class target it helps
    most. Every class with at least three groups gets at least one group in each split
    (`_give_every_split` repairs the few deals where a group shared by two classes prevents
    that). Where groups hold several classes (one camera event's --group-pattern key, or
    near-duplicates across classes) a deal can fail even so: it is dealt again in another
    seeded order, and a class that no deal can place in every split is a DatasetError.
    """
    if "group" not in images:
        raise UsageError("split() needs the 'group' column that scan() adds")
    # Each group's labels as plain lists: pandas calls per group cost a millisecond each.
    members: dict = {}
    for gid, label in zip(images["group"], images["label"]):
        members.setdefault(gid, []).append(label)
    per_label_groups = images.groupby("label")["group"].nunique()
    for attempt in range(SPLIT_ATTEMPTS):
        seed = config.seed if attempt == 0 else [config.seed, attempt]
        assignment = _deal(members, per_label_groups, config, np.random.default_rng(seed))
        _give_every_split(assignment, members, per_label_groups)
        if (gap := _split_gap(assignment, members, per_label_groups)) is None:
            break
    else:
        label, where = gap
        raise DatasetError(
            f"class {label!r} gets no {where} photos in any of {SPLIT_ATTEMPTS} deals: too "
            "many of its photos share a group with other classes (a --group-pattern key, or "
            "near-duplicates across folders); loosen the pattern or add photos of it alone")
    out = images.copy()
    out["split"] = out["group"].map(assignment)
    return out


SPLIT_ATTEMPTS = 50


def _deal(members: dict, per_label_groups: pd.Series, config: SplitConfig,
          rng: np.random.Generator) -> dict:
    """One greedy deal of the groups to the splits (see `split`)."""
    fractions = {"train": config.train_fraction, "val": config.val_fraction,
                 "test": config.test_fraction}
    labels = sorted(per_label_groups.index)
    target = {s: {} for s in SPLITS}
    for label in labels:
        n = int(per_label_groups[label])
        val = max(1.0, n * fractions["val"]) if n >= 3 else n * fractions["val"]
        test = max(1.0, n * fractions["test"]) if n >= 3 else n * fractions["test"]
        target["val"][label], target["test"][label] = val, test
        target["train"][label] = n - val - test
    have = {s: {label: 0.0 for label in labels} for s in SPLITS}
    groups = sorted(members.items())  # by group id, as groupby gives them
    order = rng.permutation(len(groups))
    groups = [groups[i] for i in order]
    groups.sort(key=lambda g: -len(g[1]))  # stable: ties keep the seeded order
    assignment: dict[int, str] = {}
    for gid, group_labels in groups:
        # A group counts once per label it contains, weighted by its share of that label.
        counts = Counter(group_labels).most_common()
        share = {lab: c / len(group_labels) for lab, c in counts}
        def need(s: str) -> float:
            return sum(w * (target[s][lab] - have[s][lab]) / max(target[s][lab], 1e-9)
                       for lab, w in share.items())
        best = max(SPLITS, key=lambda s: (need(s), s == "train"))
        assignment[gid] = best
        for lab, w in share.items():
            have[best][lab] += w
    return assignment


def _split_gap(assignment: dict, members: dict,
               per_label_groups: pd.Series) -> tuple[str, str] | None:
    """The first (class, split) where a class of three or more groups has no photo, or None."""
    present = {(lab, assignment[g]) for g, labs in members.items() for lab in labs}
    for label in sorted(per_label_groups.index):
        if per_label_groups[label] >= 3:
            for where in SPLITS:
                if (label, where) not in present:
                    return label, where
    return None


def _give_every_split(assignment: dict[int, str], members: dict[int, list[str]],
                      per_label_groups: pd.Series) -> None:
    """Repair the greedy deal where a group shared by two classes left a class (of three or
    more groups) out of a split: move one of its groups there from the split where it has the
    most, the smallest group of that class alone first, and never one whose move would empty
    that split for another class of three or more groups."""
    def groups_of(label: str, where: str) -> list[int]:
        return [g for g, labs in members.items() if label in labs and assignment[g] == where]

    for label in sorted(per_label_groups.index):
        if per_label_groups[label] < 3:
            continue
        for missing in SPLITS:
            if groups_of(label, missing):
                continue
            donor = max(SPLITS, key=lambda s: (len(groups_of(label, s)), s == "train"))
            movable = [g for g in groups_of(label, donor)
                       if all(per_label_groups[lab] < 3 or len(groups_of(lab, donor)) > 1
                              for lab in set(members[g]))]
            if movable:
                gid = min(movable, key=lambda g: (set(members[g]) != {label},
                                                  len(members[g]), g))
                assignment[gid] = missing


def class_weights(labels, classes: list[str], method: str = "balanced") -> dict[str, float]:
    """Per-class loss weights: scikit-learn's `balanced` (n / (k * count)) or the origin's max/count."""
    labels = np.asarray(list(labels))
    if method == "none":
        return {c: 1.0 for c in classes}
    if method == "max_over_count":
        counts = {c: int((labels == c).sum()) for c in classes}
        top = max(counts.values(), default=0)
        # A class with no sample never reaches the loss; 1.0 (as for "balanced") avoids n/0.
        return {c: top / counts[c] if counts[c] else 1.0 for c in classes}
    from sklearn.utils.class_weight import compute_class_weight

    present = [c for c in classes if (labels == c).any()]
    weights = compute_class_weight("balanced", classes=np.array(present), y=labels)
    out = {c: 1.0 for c in classes}
    out.update({c: float(w) for c, w in zip(present, weights)})
    return out


SPLIT_COLUMNS = ["path", "label", "view", "split", "group", "sha256", "width", "height"]


def write_split(df: pd.DataFrame, path: Path) -> None:
    """Write split.csv atomically (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    df[SPLIT_COLUMNS].sort_values(["split", "label", "path"]).to_csv(tmp, index=False)
    os.replace(tmp, path)


def read_split(path: Path, data_dir: Path) -> pd.DataFrame:
    """Read split.csv back; every listed file must still be there, and a hand-edited file must
    keep the split's promises (`_split_problem`)."""
    try:
        # No NA parsing: a person called "NA" or "None", or a file named "nan", stays a string.
        df = pd.read_csv(path, dtype={"path": str, "label": str, "view": str, "split": str,
                                      "sha256": str}, na_filter=False)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"{path}: unreadable split file ({exc}); delete it to re-split") from None
    missing = [c for c in SPLIT_COLUMNS if c not in df]
    if missing:
        raise UsageError(f"{path}: missing columns {', '.join(missing)}; delete it to re-split")
    unknown = sorted(set(df["split"]) - set(SPLITS))
    if unknown:
        raise UsageError(f"{path}: unknown split name(s) {', '.join(map(repr, unknown))}; use "
                         f"{', '.join(SPLITS)} or delete the file to re-split")
    if problem := _split_problem(df):
        raise UsageError(f"{path}: {problem}; fix it, or delete the file to re-split")
    gone = [p for p in df["path"] if not (data_dir / p).is_file()]
    if gone:
        raise DatasetError(
            f"{path}: {len(gone)} image(s) of the saved split are gone from {data_dir} (first: "
            f"{gone[0]}); restore them or start a new run directory"
        )
    return df


def _split_problem(df: pd.DataFrame) -> str | None:
    """What in a split table breaks what `split` promises, or None: every photo once, inside
    the dataset folder, with a label; no group in two splits (a near-duplicate in train and
    test); every class in every split."""
    if df.empty:
        return "no photos listed"
    outside = [p for p in df["path"] if not p or PurePosixPath(p).is_absolute()
               or ".." in PurePosixPath(p).parts]
    if outside:
        return f"{outside[0]!r} is not a path inside the dataset folder"
    twice = df["path"][df["path"].duplicated()]
    if len(twice):
        return f"{twice.iloc[0]} is listed twice"
    if (df["label"] == "").any():
        return f"{df['path'][df['label'] == ''].iloc[0]} has no label"
    straddling = df.groupby("group")["split"].nunique()
    if (straddling > 1).any():
        first = df[df["group"] == straddling[straddling > 1].index[0]]["path"].tolist()
        return (f"photos of one group (near-duplicates, or one --group-pattern key) are in two "
                f"splits: {', '.join(first[:2])}")
    present = set(zip(df["label"], df["split"]))
    for label in sorted(set(df["label"])):
        for where in SPLITS:
            if (label, where) not in present:
                return f"class {label!r} has no {where} photos"
    return None


def _stale_split_problem(df: pd.DataFrame, scan_result: ScanResult) -> str | None:
    """What changed in the dataset folder under a saved split, or None: a photo now unusable,
    replaced by other content, or labelled otherwise. Training on it would mix two datasets
    in one run (and the image caches, keyed by split.csv's hashes, would be stale)."""
    reasons = {s["path"]: s["reason"] for s in scan_result.skipped}
    unusable = [p for p in df["path"] if p in reasons]
    if unusable:
        return (f"{len(unusable)} photo(s) of the saved split can no longer be used (first: "
                f"{unusable[0]}: {reasons[unusable[0]]})")
    now = scan_result.images.set_index("path")
    known = df[df["path"].isin(now.index)]
    hashes, labels = now.loc[known["path"], "sha256"].to_numpy(), now.loc[known["path"], "label"]
    changed = known[(known["sha256"] != "") & (known["sha256"].to_numpy() != hashes)]
    if len(changed):
        return (f"{len(changed)} photo(s) changed since the split was written (first: "
                f"{changed['path'].iloc[0]})")
    relabelled = known[known["label"].to_numpy() != labels.to_numpy()]
    if len(relabelled):
        row = relabelled.iloc[0]
        return (f"{row['path']} is labelled {row['label']!r} there but "
                f"{now.loc[row['path'], 'label']!r} in the dataset folder")
    return None


def split_fingerprint(df: pd.DataFrame, which: str = "test") -> dict:
    """Which photos, with which labels, a split holds: two models' test numbers compare only
    on the same photos (the champion gate says whether they do). By content where split.csv
    has the hashes (a moved dataset folder keeps its fingerprint), else by path."""
    rows = df[df["split"] == which]
    by, ids = photo_ids(rows)
    lines = sorted(f"{i}\t{label}" for i, label in zip(ids, rows["label"]))
    return {"images": len(lines), "by": by,
            "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest()}


def photo_ids(rows: pd.DataFrame) -> tuple[str, list[str]]:
    """("content", the first 16 hex digits of each photo's sha256) where split.csv has the
    hashes (the scan drops exact copies, so they are unique), else ("path", the paths)."""
    if "sha256" in rows and rows["sha256"].astype(bool).all():
        return "content", [str(h)[:16] for h in rows["sha256"]]
    return "path", [str(p) for p in rows["path"]]


def load_or_make_split(scan_result: ScanResult, config: SplitConfig, path: Path) -> pd.DataFrame:
    """Reuse `path` (split.csv) when present, so a resumed run trains on the same split."""
    if path.exists():
        df = read_split(path, scan_result.config.data_dir)
        if problem := _stale_split_problem(df, scan_result):
            raise DatasetError(f"{path}: {problem}; restore the photos as they were, or start "
                               "a new run directory")
        new = set(scan_result.images["path"]) - set(df["path"])
        if new:
            log.warning("%d image(s) added since %s was written are not used by this run",
                        len(new), path)
        return df
    scan_result.validate()
    df = split(scan_result.images, config)
    write_split(df, path)
    return df


def split_table(df: pd.DataFrame) -> pd.DataFrame:
    """Images per class (rows) and split (columns)."""
    table = df.pivot_table(index="label", columns="split", values="path", aggfunc="count",
                           fill_value=0)
    return table.reindex(columns=[s for s in SPLITS if s in table.columns])


def scan_notes(result: ScanResult) -> list[str]:
    """The "note:" lines: what in the folder is probably a mistake (folder names, one photo
    in two classes) or would leak between splits (a stranger's photos). A search logs them too."""
    lines = []
    classes, unknown = result.classes, result.config.unknown_name
    if unknown not in classes:
        lines.append(f"note: no {unknown}/ folder: the model will not learn to say 'unknown' "
                     "except through its threshold")
    folders = set(result.images["folder"])
    if unknown not in folders:  # (no-face photos may still make an Unknown class)
        near = sorted(f for f in folders if f.lower() == unknown.lower())
        if near:
            lines.append(f"note: {near[0]}/ is trained as a person; rename it {unknown}/ or pass "
                         f"--unknown-name {near[0]}")
    keyed = result.pattern_groups
    if keyed is not None and not keyed["matched"]:
        example = result.images["path"].iloc[0] if len(result.images) else "Alice/IMG_1.jpg"
        lines.append(f"note: --group-pattern '{keyed['pattern']}' matched no photo, so it groups "
                     f"nothing; it is searched in paths like {example!r}")
    suggestion = _group_pattern_suggestion(result)
    if suggestion:
        lines.append(suggestion)
    lines += _no_face_folder_notes(result)
    crossed = [d for d in result.near_duplicates if d["conflict"]]
    if crossed:
        photos = len({p for d in crossed for p in d["paths"]})
        a, b = crossed[0]["paths"]
        lines.append(f"note: {photos} photos are near-duplicates of a photo in another class "
                     f"(first: {a} ~ {b}); one photo under two names teaches the model a wrong "
                     "one: check their labels (`personclf-tune data` lists these pairs first)")
    for names in result.similar_classes():
        same_text = len({unicodedata.normalize("NFC", n) for n in names}) == 1
        how = ("are the same name in two Unicode forms (macOS writes names decomposed)"
               if same_text else "differ only in case, spaces or punctuation")
        shown = ", ".join(ascii(n) if same_text else repr(n) for n in names)
        lines.append(f"note: folders {shown} {how}: if they are one person, merge them into one "
                     "folder, or each counts as a different person")
    return lines


def _no_face_folder_notes(result: ScanResult) -> list[str]:
    """Notes on how folders nested in people's folders were read: every one as the no-face view
    while they have two or more names (one may be `no_face/`, the others events or years), or
    a --no-face-folder name that no folder has."""
    config = result.config
    inner = [d["path"] for d in result.nested_folders
             if not d["path"].startswith(f"{config.unknown_name}/")]
    names = [p.rsplit("/", 1)[-1] for p in inner]
    if config.no_face_folders:
        found = {n.casefold() for n in names}
        missing = [n for n in config.no_face_folders if n.casefold() not in found]
        return [f"note: --no-face-folder {n!r} matched no folder inside a person's folder"
                for n in missing]
    first = sorted({p.split("/")[1] for p in inner})
    if len(first) < 2:
        return []
    effect = {"member": "", "unknown": " and labelled Unknown",
              "skip": " and left out"}[config.no_face_policy]
    shown = ", ".join(repr(n) for n in first[:5]) + (", ..." if len(first) > 5 else "")
    return [f"note: folders inside people's folders have {len(first)} names ({shown}) and are all "
            f"read as photos where the face is not visible{effect}; if only some are, name "
            "those with --no-face-folder NAME"]


def _group_pattern_suggestion(result: ScanResult) -> str | None:
    """A note when Unknown/ looks like several photos per stranger, and no --group-pattern is
    set: two or more subfolders (`Unknown/John_Doe/`), or file names repeated with different
    numbers (`Name_0001.jpg`, `Name_0002.jpg`), for two or more names.

    Not for one key holding most photos (`IMG_0001.jpg`, ... from one camera, or one
    `2023/` folder), nor for keys that never repeat (the shared datasets: one photo per
    stranger).
    """
    unknown = result.config.unknown_name
    if result.config.group_pattern is not None:
        return None
    paths = [p for p in result.images["path"] if p.startswith(f"{unknown}/")]
    by_folder = f"^{re.escape(unknown)}/([^/]+)/"
    by_name = f"^{re.escape(unknown)}/(?:.*/)?(.+?)[-_ .]*[0-9]+\\.[^./]+$"
    for pattern in (by_folder, by_name):
        keys = _pattern_keys(paths, pattern)
        repeated = {k: n for k, n in Counter(k for k in keys if k).items() if n > 1}
        photos = sum(repeated.values())
        if len(repeated) < 2 or photos < 0.2 * len(paths) or \
                max(repeated.values()) > 0.5 * len(paths):
            continue
        first = next(k for k in keys if k in repeated)
        if pattern == by_folder:
            what = (f"are in {len(repeated)} subfolders of two or more (e.g. {unknown}/{first}/); "
                    "if a subfolder is one stranger")
        else:
            a, b = [p for p, k in zip(paths, keys) if k == first][:2]
            what = (f"share a name with another ({len(repeated)} names, e.g. {a} and {b}); if a "
                    "name is one stranger")
        return (f"note: {photos} photos in {unknown}/ {what}, pass --group-pattern '{pattern}' "
                "so that each stranger's photos stay in one split")
    return None


def skipped_text(skipped: list[dict], data_dir: Path, full_list: str,
                 max_rows: int = 10) -> str | None:
    """Why files were left out (a scan's `skipped`), in a few lines, for a search or `evaluate`
    (`data` prints all; `full_list` says where the rest are). A README or licence beside the
    class folders is where it belongs: it is left out of these lines, not of `full_list`."""
    skipped = [s for s in skipped if not (s["reason"] == NOT_IN_CLASS_FOLDER and
                                          not _looks_like_image(Path(s["path"])))]
    if not skipped:
        return None
    lines = [f"{len(skipped)} file(s) in {data_dir} left out:"]
    lines += [f"  {s['path']}: {s['reason']}" for s in skipped[:max_rows]]
    if len(skipped) > max_rows:
        lines.append(f"  ... and {len(skipped) - max_rows} more in {full_list}")
    return "\n".join(lines)


def format_scan_report(result: ScanResult, max_rows: int = 200) -> str:
    """The human report of `personclf-tune data`: counts, imbalance, weights, problems."""
    from tabulate import tabulate

    summary = result.summary()
    counts = summary["classes"]
    weights = summary["class_weights"]
    table = [[label, c[FACE], c[NO_FACE], c[FACE] + c[NO_FACE], f"{weights.get(label, 0):.3f}"]
             for label, c in counts.items()]
    named = result.config.no_face_folders
    folders = f"; no-face folders: {', '.join(named)}" if named else ""
    lines = [f"Dataset {result.config.data_dir} (no-face policy: {result.config.no_face_policy}"
             f"{folders})",
             tabulate(table, headers=["class", "face", "no_face", "total", "class weight"],
                      tablefmt="github"),
             ""]
    total = int(len(result.images))
    ratio = summary["imbalance_ratio"]
    lines.append(f"{total} usable images in {len(counts)} classes; imbalance ratio "
                 f"{ratio:.1f} (largest/smallest)" if ratio else f"{total} usable images")
    if result.excluded_no_face:
        lines.append(f"{result.excluded_no_face} no-face images left out (--no-face-policy skip)")
    keyed = result.pattern_groups
    if keyed is not None and keyed["matched"]:
        largest = keyed["largest"]
        lines.append(f"--group-pattern '{keyed['pattern']}': {keyed['matched']} photos in "
                     f"{keyed['groups']} groups that never straddle two splits (largest: "
                     f"{largest['key']!r}, {largest['photos']} photos); {keyed['unmatched']} "
                     "matched nothing and stand alone")
    lines += scan_notes(result)
    if result.skipped:
        lines += ["", f"Skipped files ({len(result.skipped)}):",
                  tabulate([[s["path"], s["reason"]] for s in result.skipped[:max_rows]],
                           headers=["path", "reason"], tablefmt="github")]
        if len(result.skipped) > max_rows:
            lines.append(f"... and {len(result.skipped) - max_rows} more (see --json)")
    conflicts = [d for d in result.duplicates if d["conflict"]]
    if result.duplicates:
        lines.append(f"\nExact duplicates: {len(result.duplicates)} groups "
                     f"({len(conflicts)} label conflicts, every copy dropped)")
        for d in conflicts[:max_rows]:
            lines.append(f"  conflict {', '.join(d['labels'])}: {', '.join(d['paths'])}")
    if result.near_duplicates:
        lines.append(f"\nNear-duplicates (kept, never split apart): {len(result.near_duplicates)} pairs")
        # Pairs across two classes first: they are the ones to look at.
        for d in sorted(result.near_duplicates, key=lambda d: not d["conflict"])[:20]:
            crossed = f"; classes {', '.join(d['labels'])}" if d["conflict"] else ""
            lines.append(f"  {d['paths'][0]} ~ {d['paths'][1]} (distance {d['distance']}{crossed})")
        if len(result.near_duplicates) > 20:
            lines.append(f"  ... and {len(result.near_duplicates) - 20} more (see --json)")
    return "\n".join(lines)


def write_json(obj: dict, path: Path) -> None:
    """Write JSON atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
