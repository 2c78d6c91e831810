"""Input pipeline: decode every image once, cache it at each input size, feed tf.data.

Decoding (Pillow: EXIF orientation, 16-bit, CMYK, alpha; see `data.open_rgb`) is the slow,
trial-independent part, so a search decodes each image once per input size and every later
trial reuses the uint8 array, from memory or from an `.npy` file under the run directory keyed
by the split's fingerprint. Augmentation runs on the fly as Keras preprocessing layers in the
tf.data map, so the model itself stays free of training-only layers and exports cleanly.
Model inputs are raw RGB 0..255; backbone preprocessing is inside the model.
"""
from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .data import open_rgb, read_bytes
from .errors import DatasetError

log = logging.getLogger(__name__)

# The origin's ImageDataGenerator settings, reached at augment strength 1.0.
ORIGIN_AUGMENT = {"rotation_degrees": 40.0, "shift": 0.2, "zoom": 0.2, "shear": 0.2}


def load_image(path: Path | str, size: int) -> np.ndarray:
    """One image as uint8 (size, size, 3): the same decode and resize for training and predict."""
    try:
        img = open_rgb(read_bytes(Path(path)))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot be decoded any more ({exc}); it changed after the "
                           "scan: restore it, or run `personclf-tune data` and a new run") from None
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def decode_many(paths: list[Path], size: int, workers: int | None = None) -> np.ndarray:
    """Decode and resize many images in parallel threads (Pillow releases the GIL)."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    if not paths:
        return out
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, arr in enumerate(pool.map(lambda p: load_image(p, size), paths)):
            out[i] = arr
    return out


class ImageCache:
    """Decoded uint8 images per (split fingerprint, input size), in memory and optionally on disk.

    Shared by every trial of a search: a trial at a size seen before decodes nothing.
    """

    def __init__(self, data_dir: Path, cache_dir: Path | None = None, max_memory_mb: int = 4096,
                 enabled: bool = True):
        self.data_dir = Path(data_dir)
        self.cache_dir = Path(cache_dir) if cache_dir and enabled else None
        # enabled=False decodes on every call: the naive baseline of the speed benchmark.
        self.max_memory_mb = max_memory_mb if enabled else 0
        self._memory: dict[tuple[str, int], np.ndarray] = {}
        self.decoded = 0  # images decoded so far (tests and the benchmark read it)

    @staticmethod
    def key(frame: pd.DataFrame) -> str:
        h = hashlib.sha256()
        for path, digest in zip(frame["path"], frame["sha256"]):
            h.update(f"{path}\0{digest}\n".encode())
        return h.hexdigest()[:16]

    def images(self, frame: pd.DataFrame, size: int) -> np.ndarray:
        """uint8 (N, size, size, 3) for the rows of `frame` (needs `path` and `sha256` columns)."""
        key = (self.key(frame), size)
        if key in self._memory:
            return self._memory[key]
        arr = None
        disk = self.cache_dir / f"images-{key[0]}-{size}.npy" if self.cache_dir else None
        if disk is not None and disk.exists():
            try:
                arr = np.load(disk, allow_pickle=False)
                if arr.shape != (len(frame), size, size, 3) or arr.dtype != np.uint8:
                    arr = None
            except (OSError, ValueError):
                arr = None  # a damaged cache file is simply rebuilt
        if arr is None:
            arr = decode_many([self.data_dir / p for p in frame["path"]], size)
            self.decoded += len(arr)
            if disk is not None:
                disk.parent.mkdir(parents=True, exist_ok=True)
                # A private temporary name: workers sharing a run directory may race here.
                tmp = disk.with_name(f"{disk.stem}.{os.getpid()}.{id(arr):x}.tmp.npy")
                np.save(tmp, arr, allow_pickle=False)
                os.replace(tmp, disk)
        self._remember(key, arr)
        return arr

    def _remember(self, key: tuple[str, int], arr: np.ndarray) -> None:
        budget = self.max_memory_mb * 1024 * 1024
        while self._memory and sum(a.nbytes for a in self._memory.values()) + arr.nbytes > budget:
            self._memory.pop(next(iter(self._memory)))  # oldest first
        if arr.nbytes <= budget:
            self._memory[key] = arr


@dataclass(frozen=True)
class SplitArrays:
    """One split at one input size, ready for Keras: uint8 images, class indices, views."""

    x: np.ndarray
    y: np.ndarray
    views: np.ndarray
    paths: np.ndarray


def split_arrays(split_df: pd.DataFrame, classes: list[str], cache: ImageCache, size: int,
                 which: str) -> SplitArrays:
    """The rows of split `which` (train/val/test), decoded through the cache."""
    rows = split_df[split_df["split"] == which].sort_values("path").reset_index(drop=True)
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[label] for label in rows["label"]], dtype=np.int32)
    return SplitArrays(cache.images(rows, size), y, rows["view"].to_numpy(),
                       rows["path"].to_numpy())


def augmentation(strength: float, seed: int | None = None):
    """Keras preprocessing layers for on-the-fly augmentation; None when strength is 0.

    Strength 1.0 is the origin's ImageDataGenerator (rotation 40 degrees, shift, zoom and shear
    0.2, horizontal flip); the search scales all of them together.
    """
    if strength <= 0:
        return None
    import keras

    a = ORIGIN_AUGMENT
    # Each layer its own seed, so flips, rotations and shifts are not drawn in lockstep.
    seeds = [None] * 5 if seed is None else [seed + i for i in range(5)]
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seeds[0]),
            keras.layers.RandomRotation(a["rotation_degrees"] * strength / 360.0,
                                        fill_mode="nearest", seed=seeds[1]),
            keras.layers.RandomTranslation(a["shift"] * strength, a["shift"] * strength,
                                           fill_mode="nearest", seed=seeds[2]),
            keras.layers.RandomZoom(a["zoom"] * strength, fill_mode="nearest", seed=seeds[3]),
            keras.layers.RandomShear(x_factor=a["shear"] * strength, y_factor=0.0,
                                     fill_mode="nearest", seed=seeds[4]),
        ],
        name="augmentation",
    )


def make_dataset(arrays: SplitArrays, num_classes: int, batch_size: int, *, training: bool,
                 class_weight: dict[int, float] | None = None, augment_strength: float = 0.0,
                 seed: int = 0, shuffle: bool | None = None):
    """A tf.data pipeline of (float32 pixels 0..255, one-hot labels[, sample weights]).

    One-hot labels let the loss apply label smoothing; class weights become per-sample weights
    so they work the same in every Keras version and with any loss.
    """
    import tensorflow as tf

    x = arrays.x
    y = np.eye(num_classes, dtype=np.float32)[arrays.y]
    tensors: tuple = (x, y)
    if training and class_weight:
        w = np.array([class_weight[int(c)] for c in arrays.y], dtype=np.float32)
        tensors = (x, y, w)
    ds = tf.data.Dataset.from_tensor_slices(tensors)
    if training if shuffle is None else shuffle:
        ds = ds.shuffle(max(len(x), 1), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)

    def to_float(*t):
        return (tf.cast(t[0], tf.float32),) + tuple(t[1:])

    ds = ds.map(to_float, num_parallel_calls=tf.data.AUTOTUNE)
    aug = augmentation(augment_strength, seed) if training else None
    if aug is not None:
        def augment(*t):
            return (tf.clip_by_value(aug(t[0], training=True), 0.0, 255.0),) + tuple(t[1:])

        # Serial on purpose: Keras's random layers draw from a stateful seed generator, and
        # parallel calls would take the draws in thread order, so one seed would not repeat a
        # trial. A batch is one vectorised op per layer; prefetch still overlaps it.
        ds = ds.map(augment)
    return ds.prefetch(tf.data.AUTOTUNE)
