"""tuner.data: the scan survives every kind of bad input without touching it; splits and weights.

Every bad-input test builds a small valid dataset with Pillow in `tmp_path`, adds one bad file,
scans, and checks that the file is reported with a specific reason (or, for the odd but valid
formats, that it is usable and decodes to the right upright RGB pixels) while the good images
still count. Real-data tests use the shared datasets and check the counts their READMEs state.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import tuner.data as data
from conftest import copy_people
from tuner.cli import main
from tuner.config import ScanConfig, SplitConfig
from tuner.data import (
    SPLIT_COLUMNS,
    class_weights,
    format_scan_report,
    load_or_make_split,
    open_rgb,
    photo_ids,
    read_bytes,
    read_split,
    scan,
    split,
    split_fingerprint,
    split_table,
    write_split,
)
from tuner.errors import DatasetError, UsageError

# ---------------------------------------------------------------------------------------------
# Builders: every image is distinct (its own seed), so no accidental duplicates.


def photo(seed: int, size: tuple[int, int] = (48, 48)) -> Image.Image:
    """A distinct, smooth RGB picture: a random 6x6 colour grid scaled up bicubically.

    Two different seeds are >= 10 bits apart in perceptual hash (checked on 300 seeds), so
    they never count as near-duplicates; a resized, re-encoded copy stays within 4 bits.
    """
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize(size, Image.Resampling.BICUBIC)


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=kw.pop("quality", 95), **kw)
    return buf.getvalue()


def make_dataset(root: Path, classes=("alice", "bob"), per_class: int = 3, seed: int = 0) -> Path:
    for c, label in enumerate(classes):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            photo(seed * 10_000 + c * 100 + i).save(root / label / f"img_{i}.jpg", quality=95)
    return root


def do_scan(root: Path, **kw) -> data.ScanResult:
    return scan(ScanConfig(root, **kw))


def reason_of(result: data.ScanResult, rel: str) -> str:
    hits = [s["reason"] for s in result.skipped if s["path"] == rel]
    assert len(hits) == 1, f"{rel} reported {len(hits)} times in {result.skipped}"
    return hits[0]


def assert_good_intact(result: data.ScanResult, expected: dict[str, int] | None = None) -> None:
    """The valid images around the bad one are all still there."""
    expected = expected or {"alice": 3, "bob": 3}
    totals = {k: v["face"] + v["no_face"] for k, v in result.counts().items()}
    assert totals == expected


def assert_usable(result: data.ScanResult, root: Path, rel: str, width: int, height: int) -> np.ndarray:
    """`rel` is a usable image of that upright size and decodes to RGB uint8; returns its pixels."""
    rows = result.images[result.images["path"] == rel]
    assert len(rows) == 1, f"{rel} not usable: {result.skipped}"
    assert (int(rows.iloc[0]["width"]), int(rows.iloc[0]["height"])) == (width, height)
    img = open_rgb(read_bytes(root / rel))
    assert img.mode == "RGB"
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.shape == (height, width, 3)
    return arr


# Writers for each kind of bad or odd file; the per-kind tests and the all-at-once test share them.


def write_corrupt_jpeg(path: Path, seed: int = 900) -> None:
    """A JPEG whose frame header (SOF0) was damaged: zero height and width."""
    good = bytearray(jpeg_bytes(photo(seed)))
    sof = good.find(b"\xff\xc0")
    good[sof + 5:sof + 9] = b"\x00\x00\x00\x00"
    path.write_bytes(bytes(good))


def write_garbled_jpeg(path: Path, seed: int = 901) -> None:
    """A JPEG whose tables after the SOI marker were overwritten with noise."""
    good = bytearray(jpeg_bytes(photo(seed)))
    good[4:300] = np.random.default_rng(seed).integers(0, 256, 296, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(good))


def write_truncated_jpeg(path: Path, seed: int = 902, keep: float = 0.5) -> None:
    """A noisy JPEG (so most bytes are pixel data) cut to `keep` of its length."""
    noise = np.random.default_rng(seed).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    good = jpeg_bytes(Image.fromarray(noise))
    path.write_bytes(good[: int(len(good) * keep)])


def write_text_as_jpg(path: Path) -> None:
    path.write_text("<html><body>This is a web page saved as a .jpg</body></html>\n")


def write_png_alpha(path: Path, seed: int = 903) -> None:
    """RGBA, left half fully transparent."""
    rgba = np.dstack([np.asarray(photo(seed, (40, 30))), np.full((30, 40), 255, np.uint8)])
    rgba[:, :20, 3] = 0
    Image.fromarray(rgba, "RGBA").save(path)


GRADIENT16 = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (8, 1))


def write_png16(path: Path) -> None:
    """16-bit greyscale horizontal gradient 0..65535, 256 x 8."""
    Image.fromarray(GRADIENT16).save(path)
    assert Image.open(path).mode == "I;16"


def grey_pixels(seed: int = 904) -> np.ndarray:
    return np.asarray(photo(seed, (32, 24)).convert("L"))


def write_grey(path: Path, seed: int = 904) -> None:
    Image.fromarray(grey_pixels(seed), "L").save(path)


def write_cmyk_jpeg(path: Path, seed: int = 905) -> None:
    photo(seed, (40, 32)).convert("CMYK").save(path, "JPEG", quality=95)
    assert Image.open(path).mode == "CMYK"


def write_exif_rotated(path: Path, orientation: int) -> None:
    """60x30 as stored: left half red, right half blue, plus the EXIF orientation tag."""
    arr = np.zeros((30, 60, 3), np.uint8)
    arr[:, :30] = (255, 0, 0)
    arr[:, 30:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, "JPEG", quality=95, exif=exif.tobytes())


def write_palette_gif(path: Path, seed: int = 906) -> None:
    photo(seed, (36, 28)).convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(path)


def write_animated_gif(path: Path, seed: int = 907) -> None:
    first, second = photo(seed, (36, 28)), photo(seed + 1, (36, 28))
    first.save(path, save_all=True, append_images=[second], duration=100, loop=0)
    assert Image.open(path).n_frames == 2


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a huge size: a valid IHDR, a tiny IDAT, IEND (a few dozen bytes)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def make_unreadable(monkeypatch, path: Path) -> None:
    """Root reads through chmod 000, so as root the read itself is made to fail."""
    if os.geteuid() == 0:
        real = data.read_bytes

        def read_bytes_denied(p: Path) -> bytes:
            if Path(p) == path:
                raise PermissionError(errno.EACCES, "Permission denied", str(p))
            return real(p)

        monkeypatch.setattr(data, "read_bytes", read_bytes_denied)
    else:
        path.chmod(0)


# ---------------------------------------------------------------------------------------------
# One test per kind of bad input.


def test_corrupt_jpeg_is_skipped(tmp_path):
    root = make_dataset(tmp_path / "ds")
    write_corrupt_jpeg(root / "alice" / "corrupt.jpg")
    write_garbled_jpeg(root / "bob" / "garbled.jpg")
    result = do_scan(root)
    assert reason_of(result, "alice/corrupt.jpg").startswith("corrupt JPEG")
    assert reason_of(result, "bob/garbled.jpg").startswith("corrupt JPEG")
    assert_good_intact(result)


def test_truncated_jpeg_is_skipped(tmp_path):
    root = make_dataset(tmp_path / "ds")
    write_truncated_jpeg(root / "alice" / "truncated.jpg")
    write_truncated_jpeg(root / "bob" / "cut_in_header.jpg", keep=0.02)
    result = do_scan(root)
    assert reason_of(result, "alice/truncated.jpg").startswith("truncated JPEG: image file is truncated")
    assert reason_of(result, "bob/cut_in_header.jpg") == "truncated JPEG: file ends inside its header"
    assert_good_intact(result)


def test_truncated_webp_is_reported_as_truncated(tmp_path):
    """libwebp decodes the whole file when Pillow opens it, and its error never says why; the
    RIFF header's length does. A WebP of full length with a damaged body stays "corrupt"."""
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(903).integers(0, 256, (96, 96, 3), dtype=np.uint8)) \
        .save(good, "WEBP")
    data = good.getvalue()
    root = make_dataset(tmp_path / "ds")
    (root / "alice" / "cut.webp").write_bytes(data[:len(data) // 2])
    damaged = bytearray(data)
    damaged[20:40] = b"\xff" * 20  # the VP8 chunk's own header
    (root / "bob" / "damaged.webp").write_bytes(bytes(damaged))
    result = do_scan(root)
    assert reason_of(result, "alice/cut.webp") == \
        f"truncated WEBP: {len(data) // 2:,} of the {len(data):,} bytes its header declares"
    assert reason_of(result, "bob/damaged.webp").startswith("corrupt WEBP")
    assert_good_intact(result)


def test_blank_frames_and_zeroed_pixel_data_are_skipped(tmp_path):
    """A black camera frame, and a WebP whose image data was zeroed: both decode without an
    error, to one flat colour (the zeroed WebP to a grey with a standard deviation of 0.3)."""
    root = make_dataset(tmp_path / "ds")
    (root / "alice" / "black.jpg").write_bytes(jpeg_bytes(Image.new("RGB", (64, 48))))
    good = io.BytesIO()
    photo(911, (96, 96)).save(good, "WEBP")
    zeroed = bytearray(good.getvalue())
    body = zeroed.index(b"VP8 ") + 18  # past the chunk header and the frame's own header
    zeroed[body:] = bytes(len(zeroed) - body)
    (root / "bob" / "zeroed.webp").write_bytes(bytes(zeroed))
    dull = np.full((48, 48, 3), 90, np.uint8)
    dull[20:28, 20:28] = 110  # a flat photo with a little in it is still a photo
    Image.fromarray(dull).save(root / "bob" / "dull.png")
    result = do_scan(root)
    assert reason_of(result, "alice/black.jpg").startswith("blank JPEG: one flat colour")
    assert reason_of(result, "bob/zeroed.webp").startswith("blank WEBP: one flat colour")
    assert_good_intact(result, {"alice": 3, "bob": 4})


def zero_bytes(data: bytes, start: float, length: int | None = None) -> bytes:
    """`data` with `length` bytes (default: all the rest) from `start` (a fraction of its length)
    set to zero: the same length, as a copy interrupted into a preallocated file, or a disk that
    lost a block, leaves it."""
    at = int(len(data) * start)
    length = len(data) - at if length is None else length
    return data[:at] + bytes(length) + data[at + length:]


def test_jpeg_and_png_with_zeroed_data_are_skipped_though_pillow_decodes_them(tmp_path):
    """Pillow decodes all three without an error (the JPEGs garbled or grey from the zeroed
    bytes on, the PNG with black rows); the strict JPEG decoder and the PNG checksums report
    them. A PNG whose only damage is in a text chunk keeps its picture, and is kept."""
    root = make_dataset(tmp_path / "ds")
    noise = np.random.default_rng(905).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    good_jpeg = jpeg_bytes(Image.fromarray(noise), quality=75)
    buf = io.BytesIO()
    photo(906, (96, 96)).save(buf, "PNG")
    good_png = buf.getvalue()
    damaged = {"alice/block_zeroed.jpg": (zero_bytes(good_jpeg, 0.5, 512), good_jpeg),
               "alice/tail_zeroed.jpg": (zero_bytes(good_jpeg, 0.6), good_jpeg),
               "bob/tail_zeroed.png": (zero_bytes(good_png, 0.6), good_png)}
    for rel, (bad, good) in damaged.items():
        before, after = np.asarray(open_rgb(good)), np.asarray(open_rgb(bad))  # no error
        assert (before != after).any(axis=2).mean() > 0.1, rel  # yet much of the picture is lost
        (root / rel).write_bytes(bad)
    text = b"Comment\x00scanned at the office"
    chunk = struct.pack(">I", len(text)) + b"tEXt" + text + b"\x00\x00\x00\x00"  # wrong checksum
    end = good_png.index(b"IEND") - 4
    (root / "bob" / "bad_text.png").write_bytes(good_png[:end] + chunk + good_png[end:])
    result = do_scan(root)
    libjpeg = "damaged JPEG: part of the picture is garbled or missing (libjpeg: "
    # libjpeg-turbo 3 counts 459 bytes left over after the last block it could decode.
    assert reason_of(result, "alice/block_zeroed.jpg").startswith(libjpeg + "Corrupt JPEG data: ")
    assert reason_of(result, "alice/tail_zeroed.jpg") == libjpeg + "Premature end of JPEG file)"
    assert reason_of(result, "bob/tail_zeroed.png") == (
        "damaged PNG: the checksum of its IDAT chunk does not match "
        "(part of the picture is garbled or missing)")
    assert_good_intact(result, {"alice": 3, "bob": 4})


def test_no_photo_of_the_shared_datasets_counts_as_damaged(datasets):
    """The strict checks must not cost real photos: every JPEG and PNG of the three datasets
    (2,159 files) passes them."""
    photos = [p for p in sorted(datasets.rglob("*")) if p.suffix in (".jpg", ".png")]
    assert len(photos) == 2159
    assert [p for p in photos if data.hidden_damage(p.read_bytes())] == []


def test_truncated_header_raises_value_error_not_oserror():
    """Pillow raises a bare OSError ('Truncated File Read') when even the header is cut; the
    decoder must turn it into the same ValueError-with-reason as everything else."""
    good = jpeg_bytes(photo(1))
    with pytest.raises(ValueError, match="JPEG"):
        open_rgb(good[:200])


def test_zero_byte_file_is_skipped(tmp_path):
    root = make_dataset(tmp_path / "ds")
    (root / "alice" / "empty.jpg").write_bytes(b"")
    result = do_scan(root)
    assert reason_of(result, "alice/empty.jpg") == "empty file (0 bytes)"
    assert_good_intact(result)


def test_text_file_named_jpg_is_skipped(tmp_path):
    root = make_dataset(tmp_path / "ds")
    write_text_as_jpg(root / "alice" / "page.jpg")
    result = do_scan(root)
    reason = reason_of(result, "alice/page.jpg")
    assert reason.startswith("not an image: text file") and ".jpg" in reason
    assert_good_intact(result)


def test_png_with_alpha_is_usable_on_white(tmp_path):
    root = make_dataset(tmp_path / "ds")
    write_png_alpha(root / "alice" / "alpha.png")
    result = do_scan(root)
    arr = assert_usable(result, root, "alice/alpha.png", 40, 30)
    assert (arr[:, :20] == 255).all(), "transparent pixels are composited onto white"
    opaque = np.asarray(photo(903, (40, 30)))[:, 20:]
    assert np.array_equal(arr[:, 20:], opaque)
    assert_good_intact(result, {"alice": 4, "bob": 3})


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    root = make_dataset(tmp_path / "ds")
    write_png16(root / "alice" / "deep.png")
    result = do_scan(root)
    arr = assert_usable(result, root, "alice/deep.png", 256, 8)
    row = arr[0, :, 0].astype(int)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    assert row[0] == 0 and row[-1] == 255
    assert (np.diff(row) >= 0).all(), "a gradient stays monotonic"
    assert np.abs(row - np.linspace(0, 255, 256)).max() <= 1, "0..65535 maps linearly to 0..255"
    assert (arr == 255).mean() < 0.01, "not clipped to white"
    assert_good_intact(result, {"alice": 4, "bob": 3})


def test_16bit_in_mode_i_is_scaled_by_format():
    """Older Pillow opens 16-bit grey PNGs as mode "I": dark ones must not be read as 8-bit."""
    dark = Image.fromarray(np.full((4, 4), 200, np.int32), "I")
    assert np.asarray(data._to_rgb(dark, "PNG")).max() == 1  # 200 / 65535 * 255
    assert np.asarray(data._to_rgb(dark, "TIFF")).max() == 200  # 32-bit ints in 0..255: as is


def test_popcount_fallback_matches_bit_count():
    """numpy < 2 (allowed by pyproject) has no bitwise_count; the table fallback must agree."""
    x = np.random.default_rng(0).integers(0, 2**62, (40, 9), dtype=np.uint64) * np.uint64(3)
    expected = np.vectorize(lambda v: bin(int(v)).count("1"))(x)
    np.testing.assert_array_equal(data._popcount64_table(x), expected)
    np.testing.assert_array_equal(data._popcount64(x), expected)


def test_greyscale_is_usable_as_rgb(tmp_path):
    root = make_dataset(tmp_path / "ds")
    write_grey(root / "bob" / "grey.png")
    result = do_scan(root)
    arr = assert_usable(result, root, "bob/grey.png", 32, 24)
    for channel in range(3):
        assert np.array_equal(arr[..., channel], grey_pixels())
    assert_good_intact(result, {"alice": 3, "bob": 4})


def test_cmyk_jpeg_is_usable(tmp_path):
    root = make_dataset(tmp_path / "ds")
    write_cmyk_jpeg(root / "bob" / "print.jpg")
    result = do_scan(root)
    arr = assert_usable(result, root, "bob/print.jpg", 40, 32)
    expected = np.asarray(photo(905, (40, 32))).astype(int)
    assert np.abs(arr.astype(int) - expected).mean() < 12, "colours survive CMYK (not inverted)"
    row = result.images.set_index("path").loc["bob/print.jpg"]
    assert row["mode"] == "CMYK" and row["format"] == "JPEG"
    assert_good_intact(result, {"alice": 3, "bob": 4})


@pytest.mark.parametrize("orientation,top,bottom", [(6, (255, 0, 0), (0, 0, 255)),
                                                    (8, (0, 0, 255), (255, 0, 0))])
def test_exif_orientation_is_applied(tmp_path, orientation, top, bottom):
    root = make_dataset(tmp_path / "ds")
    write_exif_rotated(root / "alice" / "rotated.jpg", orientation)
    assert Image.open(root / "alice" / "rotated.jpg").size == (60, 30)  # as stored
    result = do_scan(root)
    arr = assert_usable(result, root, "alice/rotated.jpg", 30, 60)  # width/height swapped
    assert np.abs(arr[:25].reshape(-1, 3).mean(0) - top).max() < 20
    assert np.abs(arr[35:].reshape(-1, 3).mean(0) - bottom).max() < 20
    assert_good_intact(result, {"alice": 4, "bob": 3})


HEIC = Path(__file__).parent / "data" / "heic"  # written by pillow-heif 1.9 (libheif 1.23, x265)


def test_heic_photos_from_phones_are_usable_upright(tmp_path, monkeypatch):
    """photo.heic holds photo(907, (64, 48)); rotated.heic holds write_exif_rotated's 60x30 red |
    blue picture with EXIF orientation 6, which the encoder turned into HEIF's rotation box, as
    phones store a photo taken upright. Both decode to upright RGB; damaged copies are named."""
    root = make_dataset(tmp_path / "ds")
    for name in ("photo.heic", "rotated.heic"):
        shutil.copy(HEIC / name, root / "alice" / name)
    good = (HEIC / "photo.heic").read_bytes()
    (root / "bob" / "cut.HEIC").write_bytes(good[:1000])
    (root / "bob" / "header.heic").write_bytes(good[:40] + bytes(160) + good[200:])
    result = do_scan(root)
    arr = assert_usable(result, root, "alice/photo.heic", 64, 48)
    assert np.abs(arr.astype(int) - np.asarray(photo(907, (64, 48))).astype(int)).mean() < 12
    arr = assert_usable(result, root, "alice/rotated.heic", 30, 60)  # stored 60x30
    assert np.abs(arr[:25].reshape(-1, 3).mean(0) - (255, 0, 0)).max() < 20
    assert np.abs(arr[35:].reshape(-1, 3).mean(0) - (0, 0, 255)).max() < 20
    assert set(result.images.set_index("path").loc[["alice/photo.heic", "alice/rotated.heic"],
                                                   "format"]) == {"HEIF"}
    assert reason_of(result, "bob/cut.HEIC").startswith("truncated HEIF: ")
    assert "\n" not in reason_of(result, "bob/cut.HEIC")  # libheif ends its messages with one
    assert reason_of(result, "bob/header.heic") == "corrupt HEIF: header unreadable"
    assert_good_intact(result, {"alice": 5, "bob": 3})
    # Where pi-heif failed to import, Pillow cannot open the file, and the reason says why.
    monkeypatch.setattr(data, "HEIF_READER", False)
    assert data._unidentified_reason(good, OSError("cannot identify image file")) == \
        "HEIF photo: cannot be read without pi-heif (pip install pi-heif)"


def test_large_photos_decode_at_reduced_scale_but_keep_their_full_size(tmp_path):
    """A 2400x1800 JPEG is decoded by the scan at half its size (>= 512 px on each side) and
    for a 96 px model at an eighth, yet the scan records its full upright size, the pixels match
    a full decode and resize, and damage is still found. Under twice the size nothing changes."""
    from tuner.pipeline import load_image

    root = make_dataset(tmp_path / "ds")
    big = photo(908, (2400, 1800))
    exif = Image.Exif()
    exif[0x0112] = 6
    big.save(root / "alice" / "phone.jpg", quality=90, exif=exif.tobytes())
    full = jpeg_bytes(big, quality=90)
    (root / "bob" / "cut.jpg").write_bytes(full[:len(full) // 2])
    result = do_scan(root)
    row = result.images.set_index("path").loc["alice/phone.jpg"]
    assert (row["width"], row["height"]) == (1800, 2400)  # upright, full size
    assert reason_of(result, "bob/cut.jpg").startswith("truncated JPEG")
    assert_good_intact(result, {"alice": 4, "bob": 3})

    fast = load_image(root / "alice" / "phone.jpg", 96)
    slow = np.asarray(open_rgb((root / "alice" / "phone.jpg").read_bytes())
                      .resize((96, 96), Image.Resampling.BILINEAR))
    assert fast.shape == (96, 96, 3)
    assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 1  # same picture, upright
    small = jpeg_bytes(photo(909, (150, 150)))
    assert np.array_equal(np.asarray(open_rgb(small, at_least=96)), np.asarray(open_rgb(small)))


def test_palette_and_animated_gif_are_usable_first_frame(tmp_path):
    root = make_dataset(tmp_path / "ds")
    write_palette_gif(root / "alice" / "palette.gif")
    write_animated_gif(root / "bob" / "animated.gif")
    result = do_scan(root)
    arr = assert_usable(result, root, "alice/palette.gif", 36, 28)
    assert np.array_equal(arr, np.asarray(Image.open(root / "alice" / "palette.gif").convert("RGB")))
    anim = assert_usable(result, root, "bob/animated.gif", 36, 28)
    with Image.open(root / "bob" / "animated.gif") as gif:
        frame0 = np.asarray(gif.convert("RGB"))
        gif.seek(1)
        frame1 = np.asarray(gif.convert("RGB"))
    assert np.array_equal(anim, frame0)
    assert not np.array_equal(anim, frame1)
    assert np.abs(anim.astype(int) - np.asarray(photo(907, (36, 28)))).mean() < 12
    assert_good_intact(result, {"alice": 4, "bob": 4})


# tuner.data silences Pillow's warnings at import, but pytest restores the filters it had
# before collection, so here the 12000x12000 image's warning needs its own filter.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_skipped_without_decoding(tmp_path):
    root = make_dataset(tmp_path / "ds")
    (root / "alice" / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    (root / "bob" / "big.png").write_bytes(png_header_only(12_000, 12_000))
    limit_before = Image.MAX_IMAGE_PIXELS
    start = time.perf_counter()
    result = do_scan(root)
    assert time.perf_counter() - start < 5  # allocating 30 GB (or 300 MB) of pixels would not be
    assert reason_of(result, "alice/bomb.png").startswith("decompression bomb")
    big = reason_of(result, "bob/big.png")
    assert big.startswith("decompression bomb") and "12000x12000" in big
    assert_good_intact(result)
    assert Image.MAX_IMAGE_PIXELS == limit_before is not None, "Pillow's global guard is left on"
    start = time.perf_counter()
    with pytest.raises(ValueError, match="decompression bomb"):
        open_rgb(png_header_only(100_000, 100_000))
    assert time.perf_counter() - start < 1


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_108_megapixel_phone_photo_is_not_a_bomb(tmp_path):
    """A phone's 108 MP mode (12000x9000) was refused as a decompression bomb under the old
    64-megapixel limit; the scan and predict's decoder take it (at a reduced scale)."""
    root = make_dataset(tmp_path / "ds")
    big = Image.linear_gradient("L").resize((12_000, 9_000)).convert("RGB")
    big.save(root / "alice" / "phone.jpg", quality=80)
    del big
    result = do_scan(root)
    assert result.counts()["alice"]["face"] == 4
    row = result.images.set_index("path").loc["alice/phone.jpg"]
    assert (row["width"], row["height"]) == (12_000, 9_000)
    assert open_rgb((root / "alice" / "phone.jpg").read_bytes(), at_least=96).size[0] >= 96


def test_non_image_files_are_skipped(tmp_path):
    root = make_dataset(tmp_path / "ds")
    (root / "README.md").write_text("# my dataset\n")
    (root / "alice" / "README.md").write_text("photos of alice\n")
    (root / "alice" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
    (root / "bob" / "Thumbs.db").write_bytes(bytes.fromhex("d0cf11e0a1b11ae1") + bytes(504))
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "bob" / "notes.bin").write_bytes(bytes(range(256)) * 4)
    # A RAW file is TIFF inside, which Pillow opens: only its preview would be used.
    photo(910, (40, 30)).save(root / "bob" / "DSC_0001.NEF", "TIFF")
    # The first box of a QuickTime movie, as an iPhone writes IMG_0001.MOV beside IMG_0001.HEIC
    (root / "alice" / "IMG_0001.MOV").write_bytes(b"\x00\x00\x00\x14ftypqt  " + bytes(500))
    result = do_scan(root)
    assert reason_of(result, "README.md") == "not inside a class folder"
    assert reason_of(result, "alice/README.md").startswith("not an image: text file")
    assert reason_of(result, "alice/.DS_Store") == "system file ignored"
    assert reason_of(result, "bob/Thumbs.db") == "system file ignored"
    assert reason_of(result, ".DS_Store") == "system file ignored"
    assert reason_of(result, "bob/notes.bin") == "not an image: unrecognised format"
    assert reason_of(result, "bob/DSC_0001.NEF").startswith("camera RAW file: only its small")
    assert reason_of(result, "alice/IMG_0001.MOV") == \
        "not an image: a video (a phone keeps one beside each Live Photo)"
    assert_good_intact(result)


def test_hidden_files_and_folders_are_skipped(tmp_path):
    root = make_dataset(tmp_path / "ds")
    photo(950).save(root / "alice" / ".hidden.jpg")  # a valid image, but hidden
    (root / "bob" / ".thumbnails").mkdir()
    photo(951).save(root / "bob" / ".thumbnails" / "t.jpg")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    result = do_scan(root)
    assert reason_of(result, "alice/.hidden.jpg") == "hidden file ignored"
    assert reason_of(result, "bob/.thumbnails") == "hidden folder ignored"
    assert reason_of(result, ".git") == "hidden folder ignored"
    assert not any(s["path"].startswith((".git/", "bob/.thumbnails/")) for s in result.skipped)
    assert_good_intact(result)


def test_empty_class_folder_is_reported_and_ignored(tmp_path):
    root = make_dataset(tmp_path / "ds")
    (root / "carol").mkdir()
    result = do_scan(root)
    assert result.empty_classes == ["carol"]
    assert "no usable images" in reason_of(result, "carol")
    assert "carol" not in result.classes
    assert_good_intact(result)
    result.validate()


def test_class_with_one_image_fails_validation_naming_it(tmp_path):
    root = make_dataset(tmp_path / "ds")
    (root / "carol").mkdir()
    photo(960).save(root / "carol" / "only.jpg")
    result = do_scan(root)
    assert_good_intact(result, {"alice": 3, "bob": 3, "carol": 1})
    with pytest.raises(DatasetError, match=r"class 'carol' has 1 distinct usable image"):
        result.validate()


def test_single_class_dataset_fails_validation(tmp_path):
    root = make_dataset(tmp_path / "ds", classes=("alice",), per_class=5)
    result = do_scan(root)
    assert result.classes == ["alice"]
    with pytest.raises(DatasetError, match=r"only one class \('alice'\)"):
        result.validate()


SPECIAL_CLASS = "Zoë \"Z\" O'Brien"
SPECIAL_FILES = ["café 1.jpg", "it's \"quoted\".jpg", "日本 語.jpg"]


def write_special_names(root: Path, seed: int = 970) -> None:
    folder = root / SPECIAL_CLASS
    folder.mkdir()
    for i, name in enumerate(SPECIAL_FILES):
        photo(seed + i).save(folder / name)
    shutil.copyfile(folder / SPECIAL_FILES[0], folder / "café 1 (copy).jpg")
    write_text_as_jpg(folder / "bäd, \"one\".jpg")


def test_names_with_spaces_unicode_and_quotes(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds")
    write_special_names(root)
    out_json, out_split = tmp_path / "out" / "scan.json", tmp_path / "out" / "split.csv"
    assert main(["data", str(root), "--json", str(out_json), "--split", str(out_split)]) == 0
    summary = json.loads(out_json.read_text(encoding="utf-8"))
    assert summary["classes"][SPECIAL_CLASS] == {"face": 3, "no_face": 0}
    skipped = {s["path"]: s["reason"] for s in summary["skipped"]}
    assert f"{SPECIAL_CLASS}/bäd, \"one\".jpg" in skipped
    assert skipped[f"{SPECIAL_CLASS}/café 1 (copy).jpg"] == f"exact duplicate of {SPECIAL_CLASS}/café 1.jpg"
    (dup,) = summary["duplicates"]
    assert dup["paths"] == [f"{SPECIAL_CLASS}/café 1.jpg", f"{SPECIAL_CLASS}/café 1 (copy).jpg"]
    assert dup["kept"] == f"{SPECIAL_CLASS}/café 1.jpg"
    for p in list(skipped) + dup["paths"]:
        assert (root / p).exists(), p
    df = read_split(out_split, root)
    assert sorted(df.loc[df["label"] == SPECIAL_CLASS, "path"]) == sorted(
        f"{SPECIAL_CLASS}/{n}" for n in SPECIAL_FILES)
    assert all((root / p).is_file() for p in df["path"])


def test_symlink_loops_end_and_are_reported(tmp_path):
    root = make_dataset(tmp_path / "ds")
    (root / "alice" / "no_face").mkdir()
    photo(980).save(root / "alice" / "no_face" / "back.jpg")
    os.symlink("..", root / "alice" / "up")  # -> the dataset folder
    os.symlink("..", root / "alice" / "no_face" / "again")  # -> alice, which contains it
    os.symlink(".", root / "loop")  # a "class" that is the dataset folder itself
    os.symlink("self", root / "bob" / "self")  # a link to itself (ELOOP)
    os.symlink("../alice", root / "bob" / "alice_too")  # another class's folder
    os.symlink("nowhere", root / "bob" / "dangling")
    start = time.perf_counter()
    result = do_scan(root)
    assert time.perf_counter() - start < 10
    for rel in ("alice/up", "alice/no_face/again", "loop", "bob/self"):
        assert reason_of(result, rel).startswith("symlink loop"), rel
    assert "another class" in reason_of(result, "bob/alice_too")
    assert reason_of(result, "bob/dangling").startswith("broken symlink")
    assert result.counts() == {"alice": {"face": 3, "no_face": 1}, "bob": {"face": 3, "no_face": 0}}
    assert result.duplicates == []


def test_unreadable_file_is_skipped(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "ds")
    locked = root / "alice" / "locked.jpg"
    photo(990).save(locked)
    make_unreadable(monkeypatch, locked)
    try:
        result = do_scan(root)
    finally:
        locked.chmod(0o644)
    assert reason_of(result, "alice/locked.jpg").startswith("unreadable: Permission denied")
    assert_good_intact(result)


def test_dataset_without_images(tmp_path):
    root = tmp_path / "ds"
    (root / "alice").mkdir(parents=True)
    (root / "bob").mkdir()
    (root / "alice" / "notes.txt").write_text("nothing here")
    write_text_as_jpg(root / "bob" / "fake.jpg")
    result = do_scan(root)
    assert result.images.empty and sorted(result.empty_classes) == ["alice", "bob"]
    assert result.summary()["classes"] == {}
    with pytest.raises(DatasetError, match="no usable images"):
        result.validate()
    with pytest.raises(DatasetError, match="not a directory"):
        do_scan(tmp_path / "missing")


def test_exact_duplicate_within_class_keeps_one(tmp_path):
    root = make_dataset(tmp_path / "ds")
    # "img_0 copy.jpg" sorts before "img_0.jpg"; the shorter, original name is the one kept.
    shutil.copyfile(root / "alice" / "img_0.jpg", root / "alice" / "img_0 copy.jpg")
    result = do_scan(root)
    (dup,) = result.duplicates
    assert not dup["conflict"] and dup["labels"] == ["alice"]
    assert dup["paths"] == ["alice/img_0.jpg", "alice/img_0 copy.jpg"]
    assert dup["kept"] == "alice/img_0.jpg"
    assert reason_of(result, "alice/img_0 copy.jpg") == "exact duplicate of alice/img_0.jpg"
    assert "alice/img_0.jpg" in set(result.images["path"])
    assert_good_intact(result)


def test_same_content_in_two_classes_is_a_conflict_and_dropped(tmp_path):
    root = make_dataset(tmp_path / "ds", per_class=4)
    shutil.copyfile(root / "alice" / "img_1.jpg", root / "bob" / "stolen.jpg")
    result = do_scan(root)
    (dup,) = result.duplicates
    assert dup["conflict"] and dup["labels"] == ["alice", "bob"] and dup["kept"] is None
    for rel in ("alice/img_1.jpg", "bob/stolen.jpg"):
        assert reason_of(result, rel) == "label conflict: same content in classes alice, bob"
        assert rel not in set(result.images["path"])
    assert_good_intact(result, {"alice": 3, "bob": 4})


def test_near_duplicate_is_found_and_grouped(tmp_path):
    root = make_dataset(tmp_path / "ds", per_class=3)
    write_near_pair(root / "alice" / "big.jpg", root / "alice" / "near.jpg")
    result = do_scan(root)
    assert result.duplicates == []
    pairs = [sorted(d["paths"]) for d in result.near_duplicates]
    assert pairs == [["alice/big.jpg", "alice/near.jpg"]]
    assert result.near_duplicates[0]["distance"] <= result.config.near_duplicate_distance
    groups = result.images.set_index("path")["group"]
    assert groups["alice/big.jpg"] == groups["alice/near.jpg"]
    assert groups.nunique() == len(groups) - 1, "only the near pair shares a group"
    # The pair counts once: alice has 5 images but 4 distinct groups.
    assert result.images.groupby("label")["group"].nunique().to_dict() == {"alice": 4, "bob": 3}


def test_a_near_duplicate_in_another_class_is_kept_grouped_and_flagged(tmp_path):
    """The same photo saved under two people, re-encoded: unlike an exact copy it cannot be
    called one photo for certain (a fixed camera sees two people in the same scene), so both
    stay, in one group, and every report puts the pair first with its two classes."""
    root = make_dataset(tmp_path / "ds", per_class=3)
    write_near_pair(root / "alice" / "big.jpg", root / "alice" / "near.jpg")
    shutil.copy(root / "alice" / "near.jpg", tmp_path / "near.jpg")
    Image.open(tmp_path / "near.jpg").save(root / "bob" / "saved_again.png")
    result = do_scan(root)
    crossed = [d for d in result.near_duplicates if d["conflict"]]
    assert sorted(map(sorted, (d["paths"] for d in crossed))) == [
        ["alice/big.jpg", "bob/saved_again.png"], ["alice/near.jpg", "bob/saved_again.png"]]
    assert all(d["labels"] == ["alice", "bob"] for d in crossed)
    assert [d["conflict"] for d in result.near_duplicates].count(False) == 1
    groups = result.images.set_index("path")["group"]
    assert groups["bob/saved_again.png"] == groups["alice/big.jpg"] == groups["alice/near.jpg"]
    assert "bob/saved_again.png" in set(result.images["path"]), "kept, not dropped"
    report = format_scan_report(result).splitlines()
    assert "note: 3 photos are near-duplicates of a photo in another class (first: " \
           "alice/big.jpg ~ bob/saved_again.png)" in "\n".join(report)
    listed = report[report.index("Near-duplicates (kept, never split apart): 3 pairs") + 1:]
    assert [line.endswith("; classes alice, bob)") for line in listed] == [True, True, False]
    assert json.loads(json.dumps(result.summary()))["near_duplicates"] == result.near_duplicates
    assert do_scan(make_dataset(tmp_path / "ok")).near_duplicates == []


def write_near_pair(original: Path, copy: Path, seed: int = 1234) -> None:
    """A photo and a resized (96 -> 90 px), re-encoded (quality 70) copy of it."""
    photo(seed, (96, 96)).save(original, quality=95)
    img = Image.open(original).convert("RGB")
    img.resize((90, 90), Image.Resampling.BICUBIC).save(copy, quality=70)


def test_decoding_in_threads_leaves_warning_filters_alone():
    """The pipeline decodes in threads; per-call catch_warnings() raced and could leave every
    warning in the process silenced. Decoding must not touch the global filters at all."""
    palette = Image.new("P", (16, 16))
    palette.putpalette(list(range(256)) * 3)
    buf = io.BytesIO()
    palette.save(buf, "PNG", transparency=bytes([0] * 8))  # Pillow warns when converting this
    blobs = [buf.getvalue(), jpeg_bytes(photo(3)), buf.getvalue()] * 40
    before = list(warnings.filters)
    with ThreadPoolExecutor(8) as pool:
        images = list(pool.map(open_rgb, blobs))
    assert warnings.filters == before
    assert all(img.mode == "RGB" for img in images)


# ---------------------------------------------------------------------------------------------
# Every bad kind at once, through the CLI: exit 0, a complete JSON, and no input file touched.


def snapshot(root: Path) -> dict[str, tuple]:
    """(mode, mtime, sha256 or link target) of every entry under root, links not followed."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                content = "-> " + os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                try:
                    content = hashlib.sha256(path.read_bytes()).hexdigest()
                except PermissionError:
                    content = "unreadable"
            else:
                content = "dir"
            out[path.relative_to(root).as_posix()] = (st.st_mode, st.st_mtime_ns, st.st_size, content)
    return out


def seed_every_bad_kind(root: Path, monkeypatch) -> dict[str, str]:
    """A usable dataset plus one of every bad kind; returns {relative path: expected reason prefix}."""
    make_dataset(root, classes=("alice", "bob", "Unknown"), per_class=5)
    odd = root / "odd_formats"
    odd.mkdir()
    write_png_alpha(odd / "alpha.png")
    write_png16(odd / "deep16.png")
    write_grey(odd / "grey.png")
    write_cmyk_jpeg(odd / "cmyk.jpg")
    write_exif_rotated(odd / "exif6.jpg", 6)
    write_palette_gif(odd / "palette.gif")
    write_animated_gif(odd / "animated.gif")
    (root / "alice" / "no_face").mkdir()
    photo(2000).save(root / "alice" / "no_face" / "back.jpg")
    write_special_names(root)

    write_corrupt_jpeg(root / "alice" / "corrupt.jpg")
    write_truncated_jpeg(root / "alice" / "truncated.jpg")
    (root / "bob" / "empty.jpg").write_bytes(b"")
    write_text_as_jpg(root / "bob" / "page.jpg")
    (root / "bob" / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    (root / "README.md").write_text("# dataset\n")
    (root / "alice" / "README.md").write_text("about alice\n")
    (root / "alice" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(32))
    (root / "bob" / "Thumbs.db").write_bytes(bytes.fromhex("d0cf11e0a1b11ae1") + bytes(120))
    photo(2001).save(root / "bob" / ".hidden.jpg")
    (root / "empty_person").mkdir()
    os.symlink("..", root / "alice" / "up")
    os.symlink("..", root / "alice" / "no_face" / "again")
    os.symlink(".", root / "loop")
    locked = root / "Unknown" / "locked.jpg"
    photo(2002).save(locked)
    make_unreadable(monkeypatch, locked)
    shutil.copyfile(root / "bob" / "img_0.jpg", root / "bob" / "img_0 copy.jpg")
    shutil.copyfile(root / "alice" / "img_1.jpg", root / "Unknown" / "alice_by_mistake.jpg")
    write_near_pair(root / "Unknown" / "big.jpg", root / "Unknown" / "near.jpg")
    return {
        "alice/corrupt.jpg": "corrupt JPEG",
        "alice/truncated.jpg": "truncated JPEG",
        "bob/empty.jpg": "empty file",
        "bob/page.jpg": "not an image: text file",
        "bob/bomb.png": "decompression bomb",
        "README.md": "not inside a class folder",
        "alice/README.md": "not an image: text file",
        "alice/.DS_Store": "system file ignored",
        "bob/Thumbs.db": "system file ignored",
        "bob/.hidden.jpg": "hidden file ignored",
        "empty_person": "class folder has no usable images",
        "alice/up": "symlink loop",
        "alice/no_face/again": "symlink loop",
        "loop": "symlink loop",
        "Unknown/locked.jpg": "unreadable",
        "bob/img_0 copy.jpg": "exact duplicate of bob/img_0.jpg",
        "alice/img_1.jpg": "label conflict",
        "Unknown/alice_by_mistake.jpg": "label conflict",
        f"{SPECIAL_CLASS}/café 1 (copy).jpg": "exact duplicate",
        f"{SPECIAL_CLASS}/bäd, \"one\".jpg": "not an image: text file",
    }


def test_every_bad_kind_at_once_via_cli_touches_nothing(tmp_path, monkeypatch, capsys):
    root = tmp_path / "ds"
    expected = seed_every_bad_kind(root, monkeypatch)
    before = snapshot(root)
    out = tmp_path / "out" / "scan.json"
    try:
        code = main(["data", str(root), "--json", str(out)])
    finally:
        after = snapshot(root)
        (root / "Unknown" / "locked.jpg").chmod(0o644)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert after == before, "an input file was created, removed or modified"

    summary = json.loads(out.read_text(encoding="utf-8"))
    assert summary["classes"] == {
        "alice": {"face": 4, "no_face": 1},  # img_1 dropped: label conflict
        "bob": {"face": 5, "no_face": 0},
        "odd_formats": {"face": 7, "no_face": 0},
        "Unknown": {"face": 7, "no_face": 0},  # 5 + the near pair; the conflict copy dropped
        SPECIAL_CLASS: {"face": 3, "no_face": 0},
    }
    assert summary["empty_classes"] == ["empty_person"]
    skipped = {s["path"]: s["reason"] for s in summary["skipped"]}
    assert all(set(s) == {"path", "reason"} for s in summary["skipped"])
    for rel, prefix in expected.items():
        assert rel in skipped, f"{rel} not reported"
        assert skipped[rel].startswith(prefix), (rel, skipped[rel])
    for rel in skipped:
        assert not Path(rel).is_absolute() and os.path.lexists(root / rel), rel
    conflicts = [d for d in summary["duplicates"] if d["conflict"]]
    assert [sorted(d["paths"]) for d in conflicts] == [["Unknown/alice_by_mistake.jpg", "alice/img_1.jpg"]]
    assert len(summary["duplicates"]) == 3
    assert any(sorted(d["paths"]) == ["Unknown/big.jpg", "Unknown/near.jpg"]
               for d in summary["near_duplicates"])
    assert "Skipped files" in captured.out


# ---------------------------------------------------------------------------------------------
# The CLI when the dataset cannot be used: one line on stderr, non-zero, no traceback.


def test_cli_unusable_dataset_prints_one_line(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds")
    (root / "carol").mkdir()
    photo(3000).save(root / "carol" / "a.jpg")
    photo(3001).save(root / "carol" / "b.jpg")
    assert main(["data", str(root)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.endswith("\n"), err
    assert err.startswith("personclf-tune: error: class 'carol' has 2 distinct usable image(s)")
    assert "add photos to" in err and "Traceback" not in err

    assert main(["data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "not a directory" in err

    # `--data DIR`, as `search` spells it, names the same folder; none, or two, is refused.
    assert main(["data", "--data", str(tmp_path / "nope")]) == 2
    assert "nope: not a directory" in capsys.readouterr().err
    assert main(["data"]) == 2
    assert "give the dataset folder" in capsys.readouterr().err
    assert main(["data", str(root), "--data", str(tmp_path / "nope")]) == 2
    assert "two dataset folders" in capsys.readouterr().err


def test_cli_unusable_dataset_real_process_stderr(tmp_path):
    """Through a real interpreter, so Pillow's warnings (not captured by pytest here) would show."""
    root = make_dataset(tmp_path / "ds", classes=("alice",), per_class=3)
    palette = Image.new("P", (16, 16))
    palette.putpalette(list(range(256)) * 3)
    palette.save(root / "alice" / "palette.png", transparency=bytes([0] * 8))
    (root / "alice" / "big.png").write_bytes(png_header_only(12_000, 12_000))  # Pillow warns
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run([sys.executable, "-m", "tuner.cli", "data", str(root)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("personclf-tune: error: ") and "only one class ('alice')" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Real data: counts must match each dataset's README.


def readme_counts(readme: Path) -> dict[str, int]:
    """`| Name | 123 | ... |` rows of a README table: {name: images here}."""
    out = {}
    for name, count in re.findall(r"^\| (\w+) (?:\([^)]*\) )?\| (\d+) \|", readme.read_text(), re.M):
        out[name] = int(count)
    return out


@pytest.fixture(scope="session")
def lfw(datasets) -> data.ScanResult:
    return do_scan(datasets / "lfw_12people")


def test_lfw_counts_match_readme(lfw, datasets):
    expected = readme_counts(datasets / "lfw_12people" / "README.md")
    assert len(expected) == 13 and expected["Unknown"] == 200
    assert {k: v["face"] for k, v in lfw.counts().items()} == expected
    assert all(v["no_face"] == 0 for v in lfw.counts().values())
    assert len(lfw.images) == sum(expected.values()) == 1449
    assert lfw.skipped == [{"path": "README.md", "reason": "not inside a class folder"}]
    assert lfw.duplicates == []
    lfw.validate()
    assert "note:" not in format_scan_report(lfw), "one photo per stranger: nothing to suggest"


def cuhk_ids(readme: Path) -> list[str]:
    return sorted(set(re.findall(r"\bid\d{4}\b", readme.read_text().split("| class |")[1])))


@pytest.mark.parametrize("policy", ["member", "unknown", "skip"])
def test_cuhk03_counts_match_readme_per_policy(datasets, tmp_path, capsys, policy):
    folder = datasets / "cuhk03_30people"
    ids = cuhk_ids(folder / "README.md")
    assert len(ids) == 30
    out = tmp_path / "cuhk.json"
    assert main(["data", str(folder), "--no-face-policy", policy, "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    classes = summary["classes"]
    assert sorted(classes) == sorted(ids + ["Unknown"])
    person = {"member": {"face": 4, "no_face": 4}, "unknown": {"face": 4, "no_face": 0},
              "skip": {"face": 4, "no_face": 0}}[policy]
    assert all(classes[i] == person for i in ids)
    unknown = {"member": {"face": 150, "no_face": 0}, "unknown": {"face": 150, "no_face": 120},
               "skip": {"face": 150, "no_face": 0}}[policy]
    assert classes["Unknown"] == unknown
    assert summary["images"] == (270 if policy == "skip" else 390)
    assert summary["excluded_no_face"] == (120 if policy == "skip" else 0)
    assert summary["duplicates"] == [] and summary["no_face_policy"] == policy
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "note:" not in out


# ---------------------------------------------------------------------------------------------
# Split properties on lfw_12people.


FRACTIONS = {"train": 0.64, "val": 0.16, "test": 0.20}


@pytest.fixture(scope="session")
def lfw_split(lfw) -> pd.DataFrame:
    return split(lfw.images, SplitConfig(seed=42))


def test_split_is_stratified(lfw_split):
    table = split_table(lfw_split)
    assert list(table.columns) == ["train", "val", "test"]
    assert (table > 0).all().all(), "every class in every split"
    fractions = table.div(table.sum(axis=1), axis=0)
    for name, target in FRACTIONS.items():
        worst = (fractions[name] - target).abs().max()
        assert worst <= 0.035, f"{name}: a class is {worst:.3f} off {target}"
    assert lfw_split["split"].notna().all()


def test_split_is_deterministic_per_seed(lfw, lfw_split):
    again = split(lfw.images, SplitConfig(seed=42))
    pd.testing.assert_series_equal(again["split"], lfw_split["split"])
    other = split(lfw.images, SplitConfig(seed=7))
    assert (other["split"] != lfw_split["split"]).sum() > 50


def test_no_duplicate_group_straddles_splits(lfw, lfw_split):
    near = [d for d in lfw.near_duplicates if d["distance"] <= 4]
    assert 3 <= len(near) <= 10, "lfw has about five real near-duplicate pairs"
    for seed in (42, 7, 123):
        df = lfw_split if seed == 42 else split(lfw.images, SplitConfig(seed=seed))
        where = df.set_index("path")["split"]
        for pair in near:
            assert where[pair["paths"][0]] == where[pair["paths"][1]], (seed, pair)
        assert (df.groupby("group")["split"].nunique() == 1).all()


def test_split_csv_round_trip(lfw, lfw_split, tmp_path, datasets):
    path = tmp_path / "run" / "split.csv"
    write_split(lfw_split, path)
    assert not list(path.parent.glob("*.tmp"))
    back = read_split(path, datasets / "lfw_12people")
    expected = lfw_split[SPLIT_COLUMNS].sort_values("path").reset_index(drop=True)
    got = back[SPLIT_COLUMNS].sort_values("path").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)


def test_load_or_make_split_reuses_existing_file(lfw, lfw_split, tmp_path):
    path = tmp_path / "run" / "split.csv"
    first = load_or_make_split(lfw, SplitConfig(seed=42), path)
    assert path.is_file()
    assert first.set_index("path")["split"].sort_index().equals(
        lfw_split.set_index("path")["split"].sort_index())
    saved = pd.read_csv(path, keep_default_na=False)
    victim = saved.index[saved["split"] == "train"][0]
    saved.loc[victim, "split"] = "test"
    saved.to_csv(path, index=False)
    again = load_or_make_split(lfw, SplitConfig(seed=7), path)
    assert again.set_index("path").loc[saved.loc[victim, "path"], "split"] == "test"
    assert (again.set_index("path")["split"].sort_index()
            == saved.set_index("path")["split"].sort_index()).all()


def test_read_split_errors_when_a_file_is_gone(tmp_path):
    root = make_dataset(tmp_path / "ds", classes=("alice", "bob"), per_class=4)
    result = do_scan(root)
    path = tmp_path / "split.csv"
    write_split(split(result.images, SplitConfig()), path)
    read_split(path, root)
    (root / "bob" / "img_2.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 image\(s\).*gone.*bob/img_2\.jpg"):
        read_split(path, root)


def test_read_split_keeps_na_like_names_and_rejects_unknown_split(tmp_path):
    root = make_dataset(tmp_path / "ds", classes=("NA", "None"), per_class=4)
    result = do_scan(root)
    path = tmp_path / "split.csv"
    write_split(split(result.images, SplitConfig()), path)
    assert sorted(read_split(path, root)["label"].unique()) == ["NA", "None"]
    text = path.read_text()
    path.write_text(text.replace(",train,", ",training,", 1))
    with pytest.raises(UsageError, match="unknown split name"):
        read_split(path, root)


# ---------------------------------------------------------------------------------------------
# Class weights.


def test_balanced_weights_equal_sklearn(lfw):
    from sklearn.utils.class_weight import compute_class_weight

    labels = lfw.images["label"]
    classes = lfw.classes
    ours = class_weights(labels, classes, "balanced")
    theirs = compute_class_weight("balanced", classes=np.array(classes), y=labels.to_numpy())
    assert list(ours) == classes
    np.testing.assert_allclose([ours[c] for c in classes], theirs)
    assert lfw.summary()["class_weights"] == ours


def test_max_over_count_and_none_weights():
    labels = ["a"] * 10 + ["b"] * 5 + ["c"] * 2
    assert class_weights(labels, ["a", "b", "c"], "max_over_count") == {"a": 1.0, "b": 2.0, "c": 5.0}
    assert class_weights(labels, ["a", "b", "c"], "none") == {"a": 1.0, "b": 1.0, "c": 1.0}
    # A class without samples gets 1.0 rather than a division by zero.
    assert class_weights(labels, ["a", "b", "c", "d"], "max_over_count")["d"] == 1.0
    assert class_weights(labels, ["a", "b", "c", "d"], "balanced")["d"] == 1.0


# ---------------------------------------------------------------------------------------------
# A person who vanishes, names that break labels.txt, outputs that would touch the dataset.


def test_a_person_whose_photos_all_go_is_reported_not_silently_dropped(tmp_path):
    root = make_dataset(tmp_path / "ds", classes=("alice", "Unknown"), per_class=4)
    (root / "bob").mkdir()
    for i in range(3):  # bob's photos are copies of strangers'
        shutil.copy2(root / "Unknown" / f"img_{i}.jpg", root / "bob" / f"b{i}.jpg")
    result = do_scan(root)
    assert "bob" not in result.classes and "bob" in result.empty_classes
    assert reason_of(result, "bob") == ("every photo was dropped as a duplicate (see those "
                                        "lines): ignored")
    (root / "dan" / "no_face").mkdir(parents=True)
    for i in range(3):
        photo(5000 + i).save(root / "dan" / "no_face" / f"back{i}.jpg")
    result = do_scan(root, no_face_policy="unknown")
    assert "dan" in result.empty_classes and "dan" not in result.classes
    assert reason_of(result, "dan").startswith("only no-face photos, counted as Unknown")
    assert (result.images["folder"] == "dan").sum() == 3  # they are Unknown's now


def test_a_line_break_in_a_class_name_is_refused_by_name(tmp_path):
    root = make_dataset(tmp_path / "ds", classes=("alice", "bob"), per_class=3)
    odd = root / "mary\nann"
    odd.mkdir()
    for i in range(3):
        photo(6000 + i).save(odd / f"m{i}.jpg")
    result = do_scan(root)
    assert result.classes == ["alice", "bob"]
    assert reason_of(result, "mary\nann") == "name contains a line break: rename it"


def test_data_outputs_never_go_into_the_dataset_and_fail_in_one_line(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds", per_class=3)
    photo_path = root / "alice" / "img_0.jpg"
    before = photo_path.read_bytes()
    for argv, message in (
            (["--json", str(photo_path)], "inside the dataset folder"),
            (["--split", str(root / "split.csv")], "inside the dataset folder"),
            (["--json", str(tmp_path)], "is a folder; give a file name"),
            (["--seed", "-1", "--split", str(tmp_path / "s.csv")], "--seed -1: must be")):
        assert main(["data", str(root), *argv]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and message in err, err
    assert photo_path.read_bytes() == before and not (root / "split.csv").exists()
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert main(["data", str(root), "--json", str(blocker / "x.json")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "cannot write it" in err, err


def test_a_lower_case_unknown_folder_is_pointed_out(tmp_path):
    root = make_dataset(tmp_path / "ds", classes=("alice", "bob", "unknown"), per_class=3)
    report = format_scan_report(do_scan(root))
    assert "note: no Unknown/ folder" in report
    assert "note: unknown/ is trained as a person; rename it Unknown/ or pass --unknown-name " \
           "unknown" in report
    assert "is trained as a person" not in format_scan_report(do_scan(root, unknown_name="unknown"))


def test_folders_whose_names_differ_only_in_case_or_unicode_form_are_pointed_out(tmp_path):
    """"Alice" beside "alice", and "José" composed (as typed on Linux) beside "José"
    decomposed (as a Mac writes it): each pair trains as two people unless merged."""
    composed, decomposed = "Jos\u00e9", "Jose\u0301"
    root = make_dataset(tmp_path / "ds", classes=("alice", "Alice", composed, decomposed, "bob",
                                                  "Unknown"), per_class=3)
    if len(list(root.iterdir())) < 6:
        pytest.skip("this filesystem folds case or Unicode forms: those folders are one")
    result = do_scan(root)
    assert sorted(map(sorted, result.similar_classes())) == [
        sorted(["Alice", "alice"]), sorted([composed, decomposed])]
    assert len(result.classes) == 6  # nothing is merged behind the user's back
    report = format_scan_report(result)
    assert "note: folders 'Alice', 'alice' differ only in case, spaces or punctuation: if they " \
           "are one person, merge them" in report
    assert "note: folders 'Jose\\u0301', 'Jos\\xe9' are the same name in two Unicode forms" in report
    assert result.summary()["similar_classes"] == result.similar_classes()
    assert do_scan(make_dataset(tmp_path / "ok")).similar_classes() == []


def test_split_fingerprint_names_the_photos_and_labels_not_where_they_lie(tmp_path):
    root = make_dataset(tmp_path / "ds", per_class=6)
    df = split(do_scan(root).images, SplitConfig(seed=3))
    fp = split_fingerprint(df)
    assert fp["images"] == (df["split"] == "test").sum() > 0 and fp["by"] == "content"
    moved = df.assign(path="elsewhere/" + df["path"]).sample(frac=1.0, random_state=0)
    assert split_fingerprint(moved) == fp, "a moved or reordered dataset is the same test set"
    test_rows = df.index[df["split"] == "test"]
    relabelled = df.copy()
    relabelled.loc[test_rows[0], "label"] = "someone_else"
    assert split_fingerprint(relabelled)["sha256"] != fp["sha256"]
    swapped = df.copy()
    swapped.loc[test_rows[0], "split"] = "train"
    assert split_fingerprint(swapped)["images"] == fp["images"] - 1
    by_path = split_fingerprint(df.drop(columns="sha256"))
    assert by_path["by"] == "path" and by_path["sha256"] != fp["sha256"]
    # The same ids key each test photo's prediction in a manifest.
    by, ids = photo_ids(df)
    assert by == "content" and ids == [h[:16] for h in df["sha256"]] and len(set(ids)) == len(df)
    assert photo_ids(df.drop(columns="sha256")) == ("path", df["path"].tolist())
    assert split_fingerprint(df, "val") != fp


STRANGERS = ("John_Ashcroft", "Junichiro_Koizumi", "Serena_Williams", "Gerhard_Schroeder",
             "Tony_Blair")


def test_group_pattern_keeps_each_stranger_in_one_split(datasets, tmp_path, capsys):
    """Real LFW photos: three people, and an Unknown/ folder of five strangers with eight
    photos each. Split photo by photo, every stranger lands in two or three splits, so the
    test split measures recognising strangers already trained on as Unknown, not rejecting
    new ones; grouped by the name in the file, each stays in one split."""
    lfw = datasets / "lfw_12people"
    root = copy_people(lfw, tmp_path / "ds", ["Ariel_Sharon", "Hugo_Chavez", "Jean_Chretien"], 15)
    (root / "Unknown").mkdir()
    for person in STRANGERS:
        for f in sorted((lfw / person).iterdir())[:8]:
            shutil.copy2(f, root / "Unknown" / f.name)

    def splits_per_stranger(result) -> list[int]:
        df = split(result.images, SplitConfig())
        who = df["path"].str.extract(r"^Unknown/(.+)_\d+\.jpg$")[0]
        return df.assign(who=who).dropna().groupby("who")["split"].nunique().tolist()

    plain = do_scan(root)
    assert plain.pattern_groups is None and min(splits_per_stranger(plain)) >= 2
    # The scan sees the repeated names and suggests a pattern, which groups them the same way.
    suggested = re.search(r"note: 40 photos in Unknown/ share a name with another \(5 names, "
                          r"e\.g\. Unknown/Gerhard_Schroeder_0001\.jpg and Unknown/"
                          r"Gerhard_Schroeder_0002\.jpg\); if a name is one stranger, pass "
                          r"--group-pattern '(.+)' so that each", format_scan_report(plain))
    assert suggested is not None
    assert do_scan(root, group_pattern=suggested[1]).pattern_groups["groups"] == 5
    pattern = r"^Unknown/(.+)_[0-9]+\.jpg$"
    grouped = do_scan(root, group_pattern=pattern)
    assert splits_per_stranger(grouped) == [1] * 5
    assert grouped.pattern_groups == {"pattern": pattern, "matched": 40, "unmatched": 45,
                                      "groups": 5, "largest": {"key": "Gerhard_Schroeder",
                                                               "photos": 8}}
    known = grouped.images[grouped.images["label"] != "Unknown"]
    assert known["group"].nunique() == plain.images.query("label != 'Unknown'")["group"].nunique()
    assert grouped.images.groupby("label")["group"].nunique()["Unknown"] == 5
    assert json.loads(json.dumps(grouped.summary()))["pattern_groups"] == grouped.pattern_groups
    assert (f"--group-pattern '{pattern}': 40 photos in 5 groups that never straddle two splits "
            "(largest: 'Gerhard_Schroeder', 8 photos); 45 matched nothing and stand alone"
            ) in format_scan_report(grouped)
    # `data --split` writes the grouped split too.
    out = tmp_path / "split.csv"
    assert main(["data", str(root), "--group-pattern", pattern, "--split", str(out)]) == 0
    written = pd.read_csv(out)
    who = written["path"].str.extract(r"^Unknown/(.+)_\d+\.jpg$")[0]
    assert written.assign(who=who).dropna().groupby("who")["split"].nunique().max() == 1
    capsys.readouterr()
    # One camera's names (IMG_0001.jpg, ...) are not taken for one stranger.
    for i, f in enumerate(sorted((root / "Unknown").iterdir())):
        f.rename(f.with_name(f"IMG_{i:04d}.jpg"))
    assert "share a name" not in format_scan_report(do_scan(root))
    # A pattern that matches nothing says so, with a path to match against.
    missed = format_scan_report(do_scan(root, group_pattern=r"^unknown/"))
    assert "note: --group-pattern '^unknown/' matched no photo, so it groups nothing; it is " \
           "searched in paths like 'Ariel_Sharon/Ariel_Sharon_0001.jpg'" in missed
    # Too few groups for a class is the usual one-line refusal, naming the pattern.
    with pytest.raises(DatasetError, match=r"class 'Unknown' has 1 distinct usable image\(s\) "
                       r"\(40 photos, .* and photos with one --group-pattern key counted once\)"):
        do_scan(root, group_pattern=r"^Unknown/").validate()


def test_a_group_shared_by_two_classes_does_not_cost_a_class_its_test_split():
    # Carol has three groups, one of them shared with Bob (a near-duplicate across folders).
    # Dealt greedily, the shared group counts a third for Carol, and in 134 of these 300
    # seeds Carol was left out of a split (measured before the repair).
    groups = [{"Ann": 2}, {"Ann": 4}, {"Bob": 2, "Carol": 1}, {"Ann": 5, "Bob": 2}, {"Bob": 2},
              {"Bob": 3}, {"Bob": 2}, {"Bob": 5}, {"Carol": 4}, {"Carol": 3}]
    rows = [{"path": f"{label}/g{g}_{i}.jpg", "label": label, "group": g}
            for g, members in enumerate(groups) for label, n in members.items()
            for i in range(n)]
    images = pd.DataFrame(rows)
    for seed in range(300):
        out = split(images, SplitConfig(seed=seed))
        for label, sub in out.groupby("label"):
            assert set(sub["split"]) == {"train", "val", "test"}, (seed, label)
        # groups still never straddle two splits
        assert (out.groupby("group")["split"].nunique() == 1).all()


def test_too_few_distinct_images_says_when_near_duplicates_were_merged(tmp_path):
    root = make_dataset(tmp_path / "ds", classes=("alice", "bob"), per_class=4)
    with pytest.raises(DatasetError, match=r"class 'alice' has 1 distinct usable image\(s\) "
                                           r"\(4 photos, near-duplicates within "
                                           r"--near-duplicate-distance 64 counted once\)"):
        do_scan(root, near_duplicate_distance=64).validate()


def test_no_face_folder_names_which_nested_folders_hold_no_face_photos(datasets, tmp_path,
                                                                        capsys):
    """Real CUHK03 people: each keeps two face photos in a `2023/` event folder, two loose and
    four back views in `no_face/`. Read as before, every nested folder is the no-face view, so
    the event photos count as back views (and with `--no-face-policy unknown` as strangers);
    the scan says so. Naming `no_face` (in any case) keeps the event photos the person's face
    photos, at any depth, and everything under `no_face/` stays no-face."""
    cuhk = datasets / "cuhk03_30people"
    people = ["id0037", "id0133"]
    root = copy_people(cuhk, tmp_path / "ds", people, 4)  # the face photos, sorted first
    copy_people(cuhk, root, ["Unknown"], 6)
    for person in people:
        shutil.copytree(cuhk / person / "no_face", root / person / "no_face")
        faces = sorted(p for p in (root / person).iterdir() if p.is_file())
        assert len(faces) == 4
        (root / person / "2023" / "beach").mkdir(parents=True)
        faces[0].rename(root / person / "2023" / faces[0].name)
        faces[1].rename(root / person / "2023" / "beach" / faces[1].name)
    (root / people[0] / "no_face" / "older").mkdir()
    (root / people[0] / "no_face" / "0037_09.jpg").rename(root / people[0] / "no_face" / "older"
                                                          / "0037_09.jpg")

    every = do_scan(root)
    assert every.counts()[people[0]] == {"face": 2, "no_face": 6}
    assert ("note: folders inside people's folders have 2 names ('2023', 'no_face') and are all "
            "read as photos where the face is not visible; if only some are, name those with "
            "--no-face-folder NAME") in format_scan_report(every)
    assert "and labelled Unknown;" in format_scan_report(do_scan(root,
                                                                 no_face_policy="unknown"))

    named = do_scan(root, no_face_folders=("NO_FACE",))
    assert {p: named.counts()[p] for p in people} == {p: {"face": 4, "no_face": 4} for p in people}
    report = format_scan_report(named)
    assert "(no-face policy: member; no-face folders: NO_FACE)" in report and "note:" not in report
    views = {d["path"]: d["view"] for d in named.summary()["nested_folders"]}
    assert views == {f"{p}/{sub}": view for p in people
                     for sub, view in (("2023", "face"), ("2023/beach", "face"),
                                       ("no_face", "no_face"))} | {
        f"{people[0]}/no_face/older": "no_face"}
    moved = named.images.set_index("path")
    assert moved.loc[f"{people[0]}/2023/beach/0037_01.jpg", "view"] == "face"
    assert moved.loc[f"{people[0]}/no_face/older/0037_09.jpg", "view"] == "no_face"
    # With --no-face-policy unknown only the back views become strangers.
    strangers = do_scan(root, no_face_policy="unknown", no_face_folders=("no_face",))
    assert {p: strangers.counts()[p] for p in people} == {p: {"face": 4, "no_face": 0}
                                                          for p in people}
    assert strangers.counts()["Unknown"] == {"face": 6, "no_face": 8}

    # Through the CLI, with a name no folder has.
    out = tmp_path / "scan.json"
    assert main(["data", str(root), "--no-face-folder", "no_face", "--no-face-folder", "back",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "note: --no-face-folder 'back' matched no folder inside a person's folder" in printed
    summary = json.loads(out.read_text())
    assert summary["no_face_folders"] == ["no_face", "back"]
    assert summary["classes"][people[1]] == {"face": 4, "no_face": 4}


@pytest.mark.parametrize("name", ["a/b", "", "..", "  "])
def test_no_face_folder_must_be_a_name(tmp_path, capsys, name):
    make_dataset(tmp_path / "ds")
    assert main(["data", str(tmp_path / "ds"), "--no-face-folder", name]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--no-face-folder {name!r}: give a folder name" in err


def test_groups_shared_by_classes_are_dealt_again_until_every_class_has_every_split(tmp_path,
                                                                                    capsys):
    """Photos named by camera event, grouped with --group-pattern: each event holds one to
    three people. The first deal of seed 42 left Alice without a training photo (and said
    nothing, measured before the repair); the split now deals again in other seeded orders."""
    events = {"Alice": ["party1_01", "party3_06", "party3_07", "party4_09"],
              "Bob": ["party1_02", "party2_04", "party2_05", "party5_11"],
              "Carol": ["party0_00", "party2_03", "party3_08", "party4_10"]}
    root = tmp_path / "ev"
    for c, (person, names) in enumerate(events.items()):
        (root / person).mkdir(parents=True)
        for i, name in enumerate(names):
            photo(7000 + 10 * c + i).save(root / person / f"{name}.jpg", quality=95)
    pattern = r"/(party[0-9]+)_"
    result = do_scan(root, group_pattern=pattern)
    for seed in (42, 0, 1, 2, 3):
        table = split_table(split(result.images, SplitConfig(seed=seed)))
        assert (table > 0).all().all(), f"seed {seed}:\n{table}"
    out = tmp_path / "split.csv"
    assert main(["data", str(root), "--group-pattern", pattern, "--split", str(out)]) == 0
    assert (split_table(read_split(out, root)) > 0).all().all()


def test_a_split_no_deal_can_make_is_a_one_line_error():
    # Four classes of three groups each, in five groups no assignment covers (checked by
    # brute force over all 3^5 assignments).
    groups = {0: ["L2"], 1: ["L1", "L2", "L3"], 2: ["L0", "L1", "L3"], 3: ["L0", "L1", "L2"],
              4: ["L0", "L3"]}
    images = pd.DataFrame([{"path": f"{lab}/{g}.jpg", "label": lab, "group": g}
                           for g, labs in groups.items() for lab in labs])
    with pytest.raises(DatasetError, match=r"class 'L\d' gets no (train|val|test) photos in any "
                       r"of 50 deals: too many of its photos share a group with other classes"):
        split(images, SplitConfig())


@pytest.mark.parametrize("edit,problem", [
    (lambda d: d.iloc[:0], "no photos listed"),
    (lambda d: d.assign(path=["/etc/hostname", *d["path"][1:]]),
     "'/etc/hostname' is not a path inside the dataset folder"),
    (lambda d: d.assign(path=["../split.csv", *d["path"][1:]]),
     "'../split.csv' is not a path inside the dataset folder"),
    (lambda d: pd.concat([d, d.iloc[:1]]), "is listed twice"),
    (lambda d: d.assign(label=["", *d["label"][1:]]), "has no label"),
    (lambda d: d.assign(label=["Alcie", *d["label"][1:]]), "class 'Alcie' has no "),
    (lambda d: d.assign(split=d["split"].where((d["label"] != "bob") | (d["split"] != "test"),
                                               "train")), "class 'bob' has no test photos"),
    (lambda d: d.assign(group=0), "photos of one group (near-duplicates, or one "
                                  "--group-pattern key) are in two splits"),
])
def test_a_hand_edited_split_file_must_keep_the_splits_promises(tmp_path, edit, problem):
    root = make_dataset(tmp_path / "ds", classes=("alice", "bob", "Unknown"), per_class=5)
    out = tmp_path / "split.csv"
    write_split(split(do_scan(root).images, SplitConfig()), out)
    read_split(out, root)  # as written: fine
    edited = tmp_path / "edited.csv"
    edit(pd.read_csv(out, dtype=str, keep_default_na=False)).to_csv(edited, index=False)
    with pytest.raises(UsageError, match=re.escape(problem)):
        read_split(edited, root)


def test_a_saved_split_refuses_photos_changed_since(tmp_path):
    """Resuming on a saved split trains on split.csv's photos: one replaced by another
    picture, one that became unreadable, or one labelled otherwise in the folder would mix
    two datasets in one run (and the image caches are keyed by split.csv's hashes)."""
    root = make_dataset(tmp_path / "ds", classes=("alice", "bob", "Unknown"), per_class=5)
    saved = tmp_path / "run" / "split.csv"
    df = load_or_make_split(do_scan(root), SplitConfig(), saved)
    again = load_or_make_split(do_scan(root), SplitConfig(), saved)  # unchanged: resumes
    assert set(zip(again["path"], again["split"])) == set(zip(df["path"], df["split"]))
    (root / "alice" / "img_0.jpg").rename(tmp_path / "kept.jpg")
    photo(424242).save(root / "alice" / "img_0.jpg", quality=95)
    with pytest.raises(DatasetError, match=r"split.csv: 1 photo\(s\) changed since the split "
                       r"was written \(first: alice/img_0.jpg\); restore the photos"):
        load_or_make_split(do_scan(root), SplitConfig(), saved)
    os.replace(tmp_path / "kept.jpg", root / "alice" / "img_0.jpg")
    original = (root / "bob" / "img_1.jpg").read_bytes()
    (root / "bob" / "img_1.jpg").write_text("not a photo\n")
    with pytest.raises(DatasetError, match=r"1 photo\(s\) of the saved split can no longer be "
                       r"used \(first: bob/img_1.jpg: not an image"):
        load_or_make_split(do_scan(root), SplitConfig(), saved)
    (root / "bob" / "img_1.jpg").write_bytes(original)
    relabelled = pd.read_csv(saved, dtype=str, keep_default_na=False)
    moved = relabelled.query("label == 'alice' and split == 'train'")["path"].iloc[0]
    relabelled.loc[relabelled["path"] == moved, "label"] = "bob"
    relabelled.to_csv(saved, index=False)
    with pytest.raises(DatasetError, match=f"{moved} is labelled 'bob' there but 'alice' in the "
                       "dataset folder"):
        load_or_make_split(do_scan(root), SplitConfig(), saved)


def test_strangers_in_subfolders_of_unknown_are_face_photos_and_get_a_grouping_note(
        datasets, tmp_path):
    """`Unknown/<stranger>/` is a natural way to keep strangers apart: those photos are not
    no-face views, and the scan suggests keeping each subfolder in one split."""
    lfw = datasets / "lfw_12people"
    root = copy_people(lfw, tmp_path / "ds", ["Ariel_Sharon", "Hugo_Chavez"], 6)
    for person in STRANGERS[:3]:
        copy_people(lfw, root / "Unknown", [person], 4)
    result = do_scan(root)
    assert result.counts()["Unknown"] == {"face": 12, "no_face": 0}
    pattern = "^Unknown/([^/]+)/"
    assert (f"note: 12 photos in Unknown/ are in 3 subfolders of two or more (e.g. "
            f"Unknown/{sorted(STRANGERS[:3])[0]}/); if a subfolder is one stranger, pass "
            f"--group-pattern '{pattern}' so that each stranger's photos stay in one split"
            ) in format_scan_report(result)
    assert do_scan(root, group_pattern=pattern).pattern_groups["groups"] == 3
    # --no-face-folder applies in Unknown/ too: a folder of that name is no-face there.
    (root / "Unknown" / "no_face").mkdir()
    shutil.copy2(next((lfw / "Unknown").iterdir()), root / "Unknown" / "no_face" / "back.jpg")
    assert do_scan(root).counts()["Unknown"] == {"face": 13, "no_face": 0}
    assert do_scan(root, no_face_folders=("no_face",)).counts()["Unknown"] == {"face": 12,
                                                                               "no_face": 1}


def test_a_lowercase_unknown_folder_is_named_even_when_no_face_photos_make_an_unknown_class(
        tmp_path):
    root = make_dataset(tmp_path / "lc", classes=("alice", "bob", "unknown"), per_class=4)
    (root / "alice" / "no_face").mkdir()
    for i in range(3):
        photo(9100 + i).save(root / "alice" / "no_face" / f"back{i}.jpg", quality=95)
    result = do_scan(root, no_face_policy="unknown")
    assert "Unknown" in result.classes and "unknown" in result.classes
    report = format_scan_report(result)
    assert "note: unknown/ is trained as a person; rename it Unknown/ or pass --unknown-name " \
           "unknown" in report
    assert "no Unknown/ folder" not in report  # the no-face photos do teach Unknown
