"""Activation caches: run the frozen part of the backbone once, train every trial on its output.

In stage 1 the backbone is frozen and in inference mode, so its pooled output for a given
image (and augmentation draw) never changes: a naive search pays a full backbone forward pass
per image per epoch per trial for numbers it has already computed. Here the pooled features
of the K augmented copies of every training image (`pipeline.warp_draws`; one copy when
augmentation is off) and of the validation images are computed once per (backbone, alpha,
input size, weights, augmentation, split) and kept in memory and under `RUN/cache/`; stage 1
then trains the trial's own head layers (shared with the full model) on them, batch for batch
the plan an uncached trial follows (`pipeline.EpochPlan`), so the cache changes only speed.

Stage 2 is the same idea one level down: below the freeze depth the backbone stays frozen
(BatchNormalization included), so the activations at the freeze point are cached too (same K
views, keyed also by the freeze point) and stage 2 trains only the suffix above it and the
head, sharing their layers with the full model, which ends up with the trained weights. The
activations are kept as float32 within a memory budget (float16 where only that fits); a
freeze point whose activations do not fit (large inputs, early freeze points, big datasets)
trains through the full model. Memory holds per setting only what every trial needs (the
anchor activations and the pooled features); a deeper freeze point derived from the anchor
lives in memory while its trial runs and on disk after, so memory stays flat over a search
that visits many freeze points.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras
import numpy as np

from .config import FitConfig, TrialParams
from .pipeline import load_or_build, predict_batch, save_atomically, views_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Features:
    """Cached activations: train views (K, N, ...) and validation (N, ...)."""

    train: np.ndarray
    val: np.ndarray
    # False when derived from float16 activations (a tight --cache-memory-mb): close to, but
    # not, what its key names, so it is never written to disk for another run to find.
    exact: bool = True

    @property
    def nbytes(self) -> int:
        return self.train.nbytes + self.val.nbytes


@dataclass(frozen=True)
class Cut:
    """A model split at its stage-2 freeze point; every part shares the model's layers."""

    prefix: keras.Model  # image -> activations at the freeze point (all frozen)
    suffix: keras.Model  # activations -> class probabilities (what stage 2 trains)
    pooled: keras.Model  # activations -> pooled backbone features (stage 1's input)
    base: keras.Model  # the backbone the cut is in
    index: int  # of its first trainable layer
    layer: str  # that layer's name

    def middle(self, earlier: str) -> keras.Model | None:
        """Activations where layer `earlier` (shallower) starts -> activations here; None if no
        clean path."""
        try:
            return keras.Model(_cut_tensor(self.base, earlier), _cut_tensor(self.base, self.layer))
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True)
class TrialInputs:
    """What a fast trial trains on: pooled features for stage 1 and, through `stage2()`, the
    suffix model and its cached activations for stage 2 where the freeze point allows.

    Stage 2's activations are made on demand: a trial pruned after stage 1 never needs them,
    and deriving them for a new freeze point costs more than that trial's whole stage 1.
    """

    pooled: Features
    _stage2: Callable[[], tuple[keras.Model, Features] | None] = lambda: None

    def stage2(self) -> tuple[keras.Model, Features] | None:
        """(suffix, activations at the freeze point), or None: train through the full model."""
        return self._stage2()


class FeatureCache:
    """Activations per backbone setting, in memory (newest first, within a budget) and on disk.

    Computing activations means a full forward pass over every view of every training image,
    the one expensive step, so it is done once per backbone setting: at the shallowest freeze
    point of the search space (`anchor_blocks`) where that fits the budget, else at the first
    one a trial asks for. A deeper freeze point is derived from those activations through the
    frozen layers between the two, and stage 1's pooled features through the frozen rest of
    the backbone.
    """

    def __init__(self, cache_dir: Path | None = None, memory_mb: float = 2048,
                 anchor_blocks: dict[str, int] | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.memory_bytes = memory_mb * 2**20
        # Per backbone, the shallowest freeze depth the search space allows: activations
        # computed there serve every deeper freeze depth the trials pick.
        self.anchor_blocks = dict(anchor_blocks or {})
        self._memory: dict[str, Features] = {}
        # setting -> (layer index, layer name, key) of the activations computed from images;
        # names only, so no trial's model outlives the trial.
        self._anchors: dict[str, tuple[int, str, str]] = {}
        self._anchor_tried: set[str] = set()
        self._too_big: set[str] = set()
        self.computed = 0  # sets computed from images (not derived or loaded); tests read it

    def setting(self, params: TrialParams, cfg: FitConfig, data) -> str:
        """Everything the frozen activations depend on, except where the backbone is cut."""
        return (f"{params.backbone}|{params.alpha}|{params.input_size}|{_weights_key(cfg.weights)}|"
                f"{round(params.augment, 4)}|{views_for(params, cfg)}|{cfg.seed}|"
                f"{_split_key(data)}")

    @staticmethod
    def key(setting: str, cut: str = "pool") -> str:
        return hashlib.sha256(f"{setting}|{cut}".encode()).hexdigest()[:16]

    def for_trial(self, model: keras.Model, params: TrialParams, data, cfg: FitConfig,
                  first: int | None = None) -> TrialInputs:
        """Stage-1 features, plus stage-2 activations when `first` (the first trainable
        backbone layer) gives a clean cut whose activations fit the memory budget."""
        setting = self.setting(params, cfg, data)
        cut = split_at(model, first) if first else None
        if cut is not None and setting not in self._anchor_tried:
            self._anchor_tried.add(setting)  # once: a refused anchor is not rebuilt every trial
            self._compute_anchor(model, cut, setting, params, data, cfg)
        pooled = self._get(self.key(setting),
                           lambda: self._pooled(model, cut, setting, params, data, cfg))
        if cut is None:
            return TrialInputs(pooled)

        def stage2() -> tuple[keras.Model, Features] | None:
            acts = self._activations(cut, setting, params, data, cfg)
            return None if acts is None else (cut.suffix, acts)

        return TrialInputs(pooled, stage2)

    def _pooled(self, model: keras.Model, cut: Cut | None, setting: str, params: TrialParams,
                data, cfg: FitConfig) -> Features:
        """Stage 1's features: through the frozen rest of the backbone from the setting's
        anchor activations (or this trial's cut), else from the images."""
        anchor = self._anchors.get(setting)
        if anchor is not None and anchor[2] in self._memory:
            source = split_at(model, anchor[0]) if cut is None or anchor[0] != cut.index else cut
            if source is not None:
                return _derive(source.pooled, self._memory[anchor[2]], np.float32)
        acts = self._activations(cut, setting, params, data, cfg) if cut else None
        if acts is not None:
            return _derive(cut.pooled, acts, np.float32)
        return self._from_images(feature_extractor(model), params, data, cfg, np.float32)

    def _activations(self, cut: Cut, setting: str, params: TrialParams, data,
                     cfg: FitConfig) -> Features | None:
        if self.key(setting, cut.layer) in self._too_big:
            return None
        rows = views_for(params, cfg) * int((data.split["split"] == "train").sum()) \
            + int((data.split["split"] == "val").sum())
        values = rows * math.prod(cut.prefix.output.shape[1:])
        # float32 when it fits: then stage 2 computes exactly what it does through the full
        # model (float16 rounding is tiny, but a high stage-2 learning rate amplifies it into
        # a different trial). float16 halves the memory where float32 does not fit.
        dtype = next((d for d in (np.float32, np.float16)
                      if values * np.dtype(d).itemsize <= self.memory_bytes), None)
        if dtype is None:
            log.info("stage-2 activations at %s would take %.0f MiB (budget %.0f): stage 2 runs "
                     "through the full model", cut.layer, values * 2 / 2**20,
                     self.memory_bytes / 2**20)
            self._too_big.add(self.key(setting, cut.layer))
            return None
        key = self.key(setting, f"{cut.layer}|{np.dtype(dtype).name}")
        anchor = self._anchors.get(setting)
        middle = None
        if anchor is not None and anchor[0] < cut.index and anchor[2] in self._memory:
            middle = cut.middle(anchor[1])
        if middle is not None:
            source = self._memory[anchor[2]]
            # Held only while this trial uses them (and kept on disk for the next trial at
            # this freeze point): memory stays flat however many freeze points a search visits.
            return self._get(key, lambda: _derive(middle, source, dtype), keep=False)
        feats = self._get(key, lambda: self._from_images(cut.prefix, params, data, cfg, dtype))
        if anchor is None or cut.index < anchor[0]:
            self._anchors[setting] = (cut.index, cut.layer, key)
        return feats

    def in_memory(self, setting: str, layer: str) -> Features | None:
        """The activations at `layer` held in memory for `setting` (float32 or float16)."""
        for dtype in ("float32", "float16"):
            feats = self._memory.get(self.key(setting, f"{layer}|{dtype}"))
            if feats is not None:
                return feats
        return None

    def _compute_anchor(self, model: keras.Model, cut: Cut, setting: str, params: TrialParams,
                        data, cfg: FitConfig) -> None:
        """Activations at the space's shallowest freeze point, when shallower than `cut`."""
        from . import backbones
        from .hypermodel import base_of

        block = self.anchor_blocks.get(params.backbone, 0)
        if not 0 < block < params.freeze_block:
            return
        spec = backbones.get(params.backbone)
        anchor = split_at(model, backbones.first_trainable(base_of(model), spec, block))
        if anchor is not None:
            self._activations(anchor, setting, params, data, cfg)

    def _from_images(self, extractor: keras.Model, params: TrialParams, data, cfg: FitConfig,
                     dtype) -> Features:
        self.computed += 1
        return extract(extractor, params, data, cfg, dtype)

    def _get(self, key: str, compute: Callable[[], Features], keep: bool = True) -> Features:
        """From memory, else disk, else `compute` (then saved); held in memory if `keep`."""
        if key in self._memory:
            self._memory[key] = self._memory.pop(key)  # newest last
            return self._memory[key]

        def build() -> Features:
            feats = compute()
            self._save(key, feats)
            return feats

        feats = load_or_build(self._path(key), lambda: self._load(key), build)
        if not keep:
            return feats
        self._memory[key] = feats
        while len(self._memory) > 1 and \
                sum(f.nbytes for f in self._memory.values()) > self.memory_bytes:
            self._memory.pop(next(iter(self._memory)))  # the least recently used
        return feats

    def _path(self, key: str) -> Path | None:
        return self.cache_dir / f"features-{key}.npz" if self.cache_dir else None

    def _load(self, key: str) -> Features | None:
        path = self._path(key)
        if path is None or not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                return Features(z["train"], z["val"])
        except Exception:  # noqa: BLE001 - cut, zeroed or garbled (EOFError, BadZipFile, ...)
            return None  # damaged: recompute

    def _save(self, key: str, feats: Features) -> None:
        path = self._path(key)
        if path is None or not feats.exact:
            return
        save_atomically(path, lambda tmp: np.savez(tmp, train=feats.train, val=feats.val),
                        ".tmp.npz")


def _derive(net: keras.Model, source: Features, dtype) -> Features:
    """Run frozen layers over cached activations (every view, and val)."""
    k, n = source.train.shape[:2]
    flat = source.train.reshape(k * n, *source.train.shape[2:])  # a view, not a copy
    train, val = (_run_batches(net, (a[i:i + 256] for i in range(0, len(a), 256)), len(a),
                               dtype, 256) for a in (flat, source.val))
    exact = source.exact and source.train.dtype != np.float16
    return Features(train.reshape(k, n, *train.shape[1:]), val, exact)


def _run_batches(net: keras.Model, batches, rows: int, dtype, batch_size: int) -> np.ndarray:
    """`net` over batches of at most `batch_size`, written straight into one array of `dtype`.

    One traced predict function serves every batch (no per-call setup; every batch padded to
    `batch_size`, so train and val share one trace), and no float32 copy of the whole input
    or output is ever made: at large inputs the cached activations are gigabytes, and a
    float32 copy would double them.
    """
    out = np.empty((rows, *net.output.shape[1:]), dtype)
    i = 0
    for x in batches:
        y = predict_batch(net, x, batch_size)
        out[i:i + len(y)] = y
        i += len(y)
    if i != rows:
        raise RuntimeError(f"expected {rows} rows of activations, got {i}")
    return out


def _split_key(data) -> str:
    """Which photos, with which content, in which split: a hand-edited split.csv that swaps a
    training and a validation photo must not find the old split's features."""
    from .pipeline import ImageCache

    return ImageCache.key(data.split.sort_values("path"), "split")


def _weights_key(weights: str | None) -> str:
    """A weights file by path, size and modification time: a file replaced at the same path
    must not find the old file's activations."""
    if weights in (None, "imagenet"):
        return str(weights)
    try:
        st = os.stat(weights)
    except OSError:
        return str(weights)
    return f"{weights}:{st.st_size}:{st.st_mtime_ns}"


def feature_extractor(model: keras.Model) -> keras.Model:
    """Image -> pooled backbone features: the full model cut before its first trainable head layer."""
    from .hypermodel import HEAD_PREFIX

    pool = model.get_layer(f"{HEAD_PREFIX}pool")
    return keras.Model(model.inputs, pool.output, name="features")


def extract(extractor: keras.Model, params: TrialParams, data, cfg: FitConfig,
            dtype=np.float32) -> Features:
    """Run a frozen extractor over every augmented copy of train and once over val."""
    from .pipeline import make_dataset, view_batches

    size, k = params.input_size, len(data.classes)
    train, val = data.arrays("train", size), data.arrays("val", size)
    views, n = views_for(params, cfg), len(train.y)
    out = _run_batches(extractor, view_batches(train, range(views), 64, params.augment,
                                               cfg.seed, views), views * n, dtype, 64)
    val_ds = make_dataset(val, k, 64).map(lambda x, y: x)
    return Features(out.reshape(views, n, *out.shape[1:]),
                    _run_batches(extractor, val_ds, len(val.y), dtype, 64))


def head_model(model: keras.Model, feature_dim: int) -> keras.Model:
    """The full model's head layers (shared weights) on a feature input."""
    inputs = keras.Input((feature_dim,), name="features")
    return keras.Model(inputs, _apply_head(model, inputs, with_pool=False), name="head")


def _apply_head(model: keras.Model, x, with_pool: bool):
    from .hypermodel import HEAD_PREFIX

    for layer in model.layers:
        if layer.name.startswith(HEAD_PREFIX) and (with_pool or layer.name != f"{HEAD_PREFIX}pool"):
            x = layer(x)
    return x


def _cut_tensor(base: keras.Model, layer: str):
    return base.get_layer(layer).input


def split_at(model: keras.Model, first: int) -> Cut | None:
    """Split `model` where its backbone's layer `first` (the first trainable one) starts.

    None where that is not a clean cut: the layer takes several tensors, a layer above it
    reads a tensor from below it (a skip connection across the cut), or a weight of a layer
    above it would be left out of the suffix.
    """
    from .hypermodel import HEAD_PREFIX, base_of

    base = base_of(model)
    if first <= 0:
        return None  # nothing frozen: nothing to cache
    cut = base.layers[first].input
    if not isinstance(cut, keras.KerasTensor):
        return None
    try:
        inner_suffix = keras.Model(cut, base.output)
        inner_prefix = keras.Model(base.input, cut, name="backbone_prefix")
    except (ValueError, KeyError, TypeError):
        return None
    suffix_weights = {id(w) for w in inner_suffix.weights}
    above = [w for layer in base.layers[first:] for w in layer.weights]
    if any(id(w) not in suffix_weights for w in above) or \
            any(layer.name == base.layers[0].name for layer in inner_suffix.layers):
        return None
    image = keras.Input(model.input.shape[1:], name="image")
    x = image
    for layer in model.layers[1:]:
        if layer is base:
            break
        x = layer(x)  # the in-graph preprocessing
    prefix = keras.Model(image, inner_prefix(x, training=False), name="prefix")
    activations = keras.Input(cut.shape[1:], name="activations")
    features = inner_suffix(activations, training=False)
    pooled = model.get_layer(f"{HEAD_PREFIX}pool")(features)
    probs = _apply_head(model, features, with_pool=True)
    return Cut(prefix, keras.Model(activations, probs, name="suffix"),
               keras.Model(activations, pooled, name="suffix_features"), base, first,
               base.layers[first].name)


def view_dataset(views: np.ndarray, labels: np.ndarray, num_classes: int,
                 class_weight: dict[int, float] | None, batch_size: int, seed: int, epochs: int):
    """(dataset, steps per epoch) over cached activations, batch for batch what
    `pipeline.train_stream` feeds the whole model: the same plan, the same copies."""
    import tensorflow as tf

    from .pipeline import EpochPlan, plan_dataset

    batch_size = min(batch_size, views.shape[1])
    plan = EpochPlan.make(views.shape[1], batch_size, seed, epochs, len(views))

    def gather(v, r):
        return views[v, r].astype(np.float32, copy=False)

    def fetch(v, r):
        # Gathered from the cached array itself: a tf.constant of it would copy all of it for
        # each trial (135 MB at MobileNetV2@160's block 12, the largest part of a trial's
        # peak memory); one Python call per batch costs nothing next to the step.
        x = tf.numpy_function(gather, [v, r], tf.float32, stateful=False)
        x.set_shape(v.shape.concatenate(views.shape[2:]))
        return x

    return plan_dataset(plan, batch_size, fetch, labels, num_classes, class_weight), plan.steps
