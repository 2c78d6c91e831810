"""Input pipeline: decode every image once, cache it at each input size, feed tf.data.

Decoding (Pillow: EXIF orientation, 16-bit, CMYK, alpha; see `data.open_rgb`) is the slow,
trial-independent part, so a search decodes each image once per input size and every later
trial reuses the uint8 array, from memory or from an `.npy` file under the run directory keyed
by the split's fingerprint. Augmentation runs on the fly in the tf.data map (one composed affine
warp per image, fixed by the seed), so the model itself stays free of training-only layers and
exports cleanly.
Model inputs are raw RGB 0..255; backbone preprocessing is inside the model.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np
import pandas as pd
from filelock import FileLock, Timeout
from PIL import Image

from .data import decode_threads, open_rgb, read_bytes
from .errors import DatasetError

log = logging.getLogger(__name__)
T = TypeVar("T")

# The origin's ImageDataGenerator settings, reached at augment strength 1.0.
ORIGIN_AUGMENT = {"rotation_degrees": 40.0, "shift": 0.2, "zoom": 0.2, "shear": 0.2}


def load_image(path: Path | str, size: int, scanned: bool = True) -> np.ndarray:
    """One image as uint8 (size, size, 3): the same decode and resize for training and predict.

    `scanned`: the image passed a dataset scan, so a failure means it changed since.
    """
    try:
        img = open_rgb(read_bytes(Path(path)), at_least=size)
    except (OSError, ValueError) as exc:
        if not scanned:
            raise DatasetError(f"{path}: cannot be decoded ({exc})") from None
        raise DatasetError(f"{path}: cannot be decoded any more ({exc}); it changed after the "
                           "scan: restore it, or run `personclf-tune data` and a new run") from None
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def decode_many(paths: list[Path], size: int) -> np.ndarray:
    """Decode and resize many images in parallel threads (Pillow releases the GIL)."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    if not paths:
        return out
    with ThreadPoolExecutor(max_workers=decode_threads()) as pool:
        for i, arr in enumerate(pool.map(lambda p: load_image(p, size), paths)):
            out[i] = arr
    return out


_held = threading.local()


@contextmanager
def building(path: Path | None) -> Iterator[bool]:
    """Hold the build lock of cache file `path` (True), or do nothing (False) where there is no
    file or this thread already holds one.

    Workers sharing a run directory that need the same cache then build it once: the others
    wait and load it (`load_or_build` looks for the file again on entry). That saves the
    duplicate's CPU time and memory, and wall time where two builds would share a device (two
    workers on one GPU, more threads than cores); on a CPU with a core each, waiting takes as
    long as building (benchmarks/README.md, run T). A thread holds at most one lock at a time
    (what it builds inside one is built unlocked), so no two workers can wait on each other;
    an OS lock, so a killed worker's lock is released.
    """
    if path is None or getattr(_held, "path", None) is not None:
        yield False
        return
    locks = path.parent / "locks"  # lock files stay (deleting one races its next user)
    lock = FileLock(locks / f"{path.name}.lock")
    try:
        locks.mkdir(parents=True, exist_ok=True)  # a read-only or full disk: no lock, below
        try:
            lock.acquire(timeout=0)
        except Timeout:
            # A worker that sits idle says why (at 224 px a build can take minutes).
            log.info("waiting for another worker to build %s", path.name)
            lock.acquire()
    except (NotImplementedError, OSError) as exc:  # a file system without locks
        log.debug("no build lock for %s (%s): building without one", path.name, exc)
        yield False
        return
    _held.path = path
    try:
        yield True
    finally:
        _held.path = None
        lock.release()


def load_or_build(path: Path | None, load: Callable[[], T | None], build: Callable[[], T]) -> T:
    """`load()` (None: not there), else `build()`, which saves to `path`: under `path`'s build
    lock, looking again once it is held, so workers sharing a run directory build it once."""
    found = load()
    if found is not None:
        return found
    with building(path) as locked:
        found = load() if locked else None  # built while we waited
        return found if found is not None else build()


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
    def key(frame: pd.DataFrame, *columns: str) -> str:
        """Hash of each row's path and content, in the frame's order, and of `columns` too."""
        h = hashlib.sha256()
        for row in zip(frame["path"], frame["sha256"], *(frame[c] for c in columns)):
            h.update(("\0".join(map(str, row)) + "\n").encode())
        return h.hexdigest()[:16]

    def images(self, frame: pd.DataFrame, size: int) -> np.ndarray:
        """uint8 (N, size, size, 3) for the rows of `frame` (needs `path` and `sha256` columns)."""
        key = (self.key(frame), size)
        if key in self._memory:
            return self._memory[key]
        disk = self.cache_dir / f"images-{key[0]}-{size}.npy" if self.cache_dir else None
        shape = (len(frame), size, size, 3)

        def decode() -> np.ndarray:
            arr = decode_many([self.data_dir / p for p in frame["path"]], size)
            self.decoded += len(arr)
            _save_images(disk, arr)
            return arr

        arr = load_or_build(disk, lambda: _load_images(disk, shape), decode)
        self._remember(key, arr)
        return arr

    def _remember(self, key: tuple[str, int], arr: np.ndarray) -> None:
        budget = self.max_memory_mb * 1024 * 1024
        while self._memory and sum(a.nbytes for a in self._memory.values()) + arr.nbytes > budget:
            self._memory.pop(next(iter(self._memory)))  # oldest first
        if arr.nbytes <= budget:
            self._memory[key] = arr


def _load_images(disk: Path | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached images at `disk`, or None: absent, or damaged (then simply rebuilt)."""
    if disk is None or not disk.exists():
        return None
    try:
        arr = np.load(disk, allow_pickle=False)
    except Exception:  # noqa: BLE001 - cut, zeroed or garbled: rebuilt
        return None
    return arr if arr.shape == shape and arr.dtype == np.uint8 else None


def _save_images(disk: Path | None, arr: np.ndarray) -> None:
    if disk is not None:
        save_atomically(disk, lambda tmp: np.save(tmp, arr, allow_pickle=False), ".tmp.npy")


def save_atomically(path: Path, write: Callable[[Path], None], suffix: str) -> None:
    """Write a cache file under a private temporary name, then rename it (readers never see
    half a file). The caches are an optimisation: a full or read-only disk costs a warning,
    and the search goes on with what it holds in memory, leaving no half-written file."""
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.{threading.get_ident():x}{suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        log.warning("cache %s not written (%s); going on without it", path,
                    exc.strerror or exc)


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


def views_for(params, cfg) -> int:
    """Augmented copies of each training image (TrialParams, FitConfig): one without augmentation."""
    return cfg.augment_views if params.augment > 0 else 1


def warp_draws(n: int, views: int, seed: int) -> np.ndarray:
    """Uniform(-1, 1) draws (views, n, 6) that fix every augmented copy of every image.

    For a given training set, copy v of image i is a pure function of (seed, v, i), not of
    batching, thread order or whether a cache computed it, so a cached trial trains on exactly
    the pixels an uncached one does.
    """
    rng = np.random.default_rng([seed, 0x5EED])
    return rng.uniform(-1.0, 1.0, size=(views, n, 6)).astype(np.float32)


def augmentation(strength: float):
    """`augment(images, draws) -> images`: one affine warp per image; None at strength 0.

    Strength 1.0 is the origin's ImageDataGenerator (rotation 40 degrees, shift and zoom 0.2,
    shear 0.2, horizontal flip, nearest fill); the search scales all of them together. Like
    ImageDataGenerator, flip, rotation, shift, zoom and shear are composed into one matrix and
    each image is resampled once: a chain of five Keras random layers resamples five times and
    cost six times as much per batch here. `draws` holds each image's six numbers from
    `warp_draws`.
    """
    if strength <= 0:
        return None
    import math

    import tensorflow as tf

    a = ORIGIN_AUGMENT
    max_angle = math.radians(a["rotation_degrees"]) * strength
    shift, zoom, shear = a["shift"] * strength, a["zoom"] * strength, a["shear"] * strength

    def augment(images, u):
        shape = tf.shape(images)
        h, w = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
        flip = tf.where(u[:, 0] < 0.0, -1.0, 1.0)
        cos, sin = tf.cos(u[:, 1] * max_angle), tf.sin(u[:, 1] * max_angle)
        scale = 1.0 + u[:, 4] * zoom  # > 1 samples a larger area: zooms out
        k = u[:, 5] * shear
        # Output pixel -> input pixel: p_in = R(angle) Shear(k) Zoom(scale) Flip (p_out - c) + c + t
        m00, m01 = cos * scale * flip, (cos * k - sin) * scale
        m10, m11 = sin * scale * flip, (sin * k + cos) * scale
        cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
        tx, ty = u[:, 2] * shift * w, u[:, 3] * shift * h
        zeros = tf.zeros_like(cos)
        transforms = tf.stack([m00, m01, cx - m00 * cx - m01 * cy + tx,
                               m10, m11, cy - m10 * cx - m11 * cy + ty, zeros, zeros], axis=1)
        # Bilinear samples and nearest fill stay within the input's 0..255.
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=images, transforms=transforms, output_shape=shape[1:3], fill_value=0.0,
            interpolation="BILINEAR", fill_mode="NEAREST")

    return augment


def without_autotune_model(ds):
    """`ds` without tf.data's autotuning model (its parallel map and prefetch keep their
    static defaults); `PERSONCLF_TFDATA_AUTOTUNE=1` keeps the model.

    Why: with the model on, deleting an iterator (the end of every fit, early-stopped or not,
    and of every feature pass) could wait for the model's background thread: here such a
    wait lasted up to 6 s and ended about 20.5 s after the iterator was made: 17 s of a
    194-s cached search under cProfile, 0.3 s without the model. These streams only gather
    arrays already in memory, so there is little for the model to tune.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = os.environ.get("PERSONCLF_TFDATA_AUTOTUNE") == "1"
    return ds.with_options(options)


def _mapped(ds, fn):
    """`fn` over `ds` in parallel, in order, prefetched: how every stream here ends."""
    import tensorflow as tf

    return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True) \
        .prefetch(tf.data.AUTOTUNE).apply(without_autotune_model)


def make_dataset(arrays: SplitArrays, num_classes: int, batch_size: int):
    """Evaluation batches in file order: (float32 pixels 0..255, one-hot labels)."""
    import tensorflow as tf

    y = np.eye(num_classes, dtype=np.float32)[arrays.y]
    ds = tf.data.Dataset.from_tensor_slices((arrays.x, y)).batch(batch_size)
    return _mapped(ds, lambda x, y_: (tf.cast(x, tf.float32), y_))


def image_batches(images: np.ndarray, batch_size: int):
    """uint8 images as float32 batches in order, for `predict`: no float32 copy of them all,
    and no stream Keras builds from an array (that one keeps the autotuning model: a
    1,500-image predict at 96 px took 6.7-10.9 s through it, over 10 s in 4 of 6 tries,
    against 6.3-7.8 s through this)."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(images).batch(batch_size)
    return _mapped(ds, lambda x: tf.cast(x, tf.float32))


@dataclass(frozen=True)
class EpochPlan:
    """Every training step's rows: epoch e takes copy `e % K` of each image in a fresh seeded
    order, in full batches (which few images an epoch leaves out changes every epoch; a
    smaller last batch would make TensorFlow trace the train step twice)."""

    view: np.ndarray  # augmented copy per row
    rows: np.ndarray  # image index per row
    steps: int  # per epoch

    @classmethod
    def make(cls, n: int, batch_size: int, seed: int, epochs: int, views: int) -> "EpochPlan":
        steps = max(1, n // batch_size)
        per_epoch = min(n, steps * batch_size)
        rng = np.random.default_rng(seed)
        rows = np.concatenate([rng.permutation(n)[:per_epoch] for _ in range(epochs)])
        return cls(np.repeat(np.arange(epochs) % views, per_epoch), rows, steps)


def plan_dataset(plan: EpochPlan, batch_size: int, fetch, labels: np.ndarray, num_classes: int,
                 class_weight: dict[int, float] | None = None):
    """The plan's batches as one tf.data stream over all epochs: (x, one-hot[, weight]).

    `fetch(view, rows) -> x` gathers a batch from one in-memory copy (images, or cached
    activations through one Python call per batch); `fit` needs `steps_per_epoch=plan.steps`
    to carry on through this one long stream instead of restarting it every epoch. One-hot
    labels let the loss apply label smoothing; class weights become per-sample weights.
    """
    import tensorflow as tf

    y_all = tf.constant(np.eye(num_classes, dtype=np.float32)[labels])
    w_all = None if not class_weight else tf.constant(
        np.array([class_weight[int(c)] for c in labels], dtype=np.float32))

    def batch(v, r):
        x = fetch(v, r)
        return (x, tf.gather(y_all, r)) if w_all is None else \
            (x, tf.gather(y_all, r), tf.gather(w_all, r))

    ds = tf.data.Dataset.from_tensor_slices((plan.view, plan.rows))
    ds = ds.batch(batch_size, drop_remainder=True)
    return _mapped(ds, batch)


def predict_batch(net, x, rows: int) -> np.ndarray:
    """`net.predict_on_batch(x)` with `x` padded to `rows` rows, the padding cut off again.

    Keras traces its predict function for each new batch shape: a short last batch (235
    validation photos in batches of 64) would cost a second trace, which for a backbone takes
    longer than predicting all the full batches. Inference is row by row (no batch
    statistics), so padding changes nothing for the real rows.
    """
    import keras

    x = np.asarray(x, np.float32)
    n = len(x)
    if n < rows:
        x = np.concatenate([x, np.zeros((rows - n, *x.shape[1:]), np.float32)])
    return keras.ops.convert_to_numpy(net.predict_on_batch(x))[:n]


def image_fetch(images: np.ndarray, augment_strength: float, seed: int, views: int):
    """`fetch(view, rows)` for `plan_dataset` over uint8 images: float pixels, warped as copy
    `view` of each row (unchanged when augmentation is off)."""
    import tensorflow as tf

    x_all = tf.constant(images)
    aug = augmentation(augment_strength)
    u_all = tf.constant(warp_draws(len(images), views, seed)) if aug is not None else None

    def fetch(v, r):
        x = tf.cast(tf.gather(x_all, r), tf.float32)
        if aug is None:
            return x
        return aug(x, tf.gather_nd(u_all, tf.stack([v, r], axis=1)))

    return fetch


def train_stream(arrays: SplitArrays, num_classes: int, batch_size: int, *, seed: int,
                 epochs: int, views: int, augment_strength: float = 0.0,
                 class_weight: dict[int, float] | None = None):
    """(dataset, steps per epoch) of one stage's training batches through the whole model."""
    batch_size = min(batch_size, len(arrays.y))
    plan = EpochPlan.make(len(arrays.y), batch_size, seed, epochs, views)
    fetch = image_fetch(arrays.x, augment_strength, seed, views)
    return plan_dataset(plan, batch_size, fetch, arrays.y, num_classes, class_weight), plan.steps


def view_batches(arrays: SplitArrays, copies, batch_size: int, augment_strength: float,
                 seed: int, views: int):
    """Each of `copies` of every image, copy by copy, in file order (what the caches store)."""
    import tensorflow as tf

    fetch = image_fetch(arrays.x, augment_strength, seed, views)
    copies, n = np.asarray(list(copies), dtype=np.int64), len(arrays.y)
    view, rows = np.repeat(copies, n), np.tile(np.arange(n, dtype=np.int64), len(copies))
    ds = tf.data.Dataset.from_tensor_slices((view, rows)).batch(batch_size)
    return _mapped(ds, fetch)
