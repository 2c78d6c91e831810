"""Stage-1 feature cache: run the frozen backbone once, train every trial's head on its output.

In stage 1 the backbone is frozen and in inference mode, so its pooled output for a given
image (and augmentation draw) never changes: a naive search pays a full backbone forward pass
per image per epoch per trial for numbers it has already computed. Here the pooled features
of K augmented views of every training image (one view when augmentation is off) and of the
validation images are computed once per (backbone, alpha, input size, weights, augmentation,
split) and kept in memory and under `RUN/cache/`; stage 1 then trains the trial's own head
layers (shared with the full model) on them, one view per epoch, and stage 2 continues on the
full model with that head.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from .config import FitConfig, TrialParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Features:
    """Pooled backbone features: train views (K, N, D) and validation (N, D)."""

    train: np.ndarray
    val: np.ndarray


class FeatureCache:
    """Features per backbone setting, in memory (newest few) and optionally on disk."""

    def __init__(self, cache_dir: Path | None = None, views: int = 4, keep_in_memory: int = 4):
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.views = views
        self.keep_in_memory = keep_in_memory
        self._memory: dict[str, Features] = {}
        self.computed = 0  # feature sets computed (not loaded); tests and the benchmark read it

    def key(self, params: TrialParams, cfg: FitConfig, split_key: str) -> str:
        views = self.views_for(params)
        text = (f"{params.backbone}|{params.alpha}|{params.input_size}|{cfg.weights}|"
                f"{round(params.augment, 4)}|{views}|{cfg.seed}|{split_key}")
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def views_for(self, params: TrialParams) -> int:
        return self.views if params.augment > 0 else 1

    def get(self, model: keras.Model, params: TrialParams, data, cfg: FitConfig) -> Features:
        """Features for this trial's backbone setting, computing them with `model` if needed."""
        from .pipeline import ImageCache

        split_key = ImageCache.key(data.split.sort_values("path"))
        key = self.key(params, cfg, split_key)
        if key in self._memory:
            return self._memory[key]
        feats = self._load(key)
        if feats is None:
            feats = extract(model, params, data, cfg, self.views_for(params))
            self.computed += 1
            self._save(key, feats)
        self._memory[key] = feats
        while len(self._memory) > self.keep_in_memory:
            self._memory.pop(next(iter(self._memory)))
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
        except (OSError, ValueError, KeyError):
            return None  # damaged: recompute

    def _save(self, key: str, feats: Features) -> None:
        path = self._path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, train=feats.train, val=feats.val)
        os.replace(tmp, path)


def feature_extractor(model: keras.Model) -> keras.Model:
    """Image -> pooled backbone features: the full model cut before its first trainable head layer."""
    from .hypermodel import HEAD_PREFIX

    pool = model.get_layer(f"{HEAD_PREFIX}pool")
    return keras.Model(model.inputs, pool.output, name="features")


def extract(model: keras.Model, params: TrialParams, data, cfg: FitConfig,
            views: int) -> Features:
    """Run the frozen backbone over K augmented views of train and once over val."""
    from .pipeline import make_dataset

    extractor = feature_extractor(model)
    size, k = params.input_size, len(data.classes)
    train, val = data.arrays("train", size), data.arrays("val", size)
    batch = 64
    train_views = []
    for v in range(views):
        # Same order every view (no shuffle): row i is always image i.
        ds = make_dataset(train, k, batch, training=True, shuffle=False,
                          augment_strength=params.augment, seed=cfg.seed + 1000 * v)
        train_views.append(extractor.predict(ds.map(lambda x, y: x), verbose=0))
    val_ds = make_dataset(val, k, batch, training=False)
    val_feats = extractor.predict(val_ds.map(lambda x, y: x), verbose=0)
    return Features(np.stack(train_views).astype(np.float32), val_feats.astype(np.float32))


def head_model(model: keras.Model, feature_dim: int) -> keras.Model:
    """The full model's head layers (shared weights) on a feature input."""
    from .hypermodel import HEAD_PREFIX

    inputs = keras.Input((feature_dim,), name="features")
    x = inputs
    for layer in model.layers:
        if layer.name.startswith(HEAD_PREFIX) and layer.name != f"{HEAD_PREFIX}pool":
            x = layer(x)
    return keras.Model(inputs, x, name="head")


class ViewSequence(keras.utils.PyDataset):
    """Training batches from cached features: view `epoch % K`, reshuffled every epoch."""

    def __init__(self, views: np.ndarray, y_onehot: np.ndarray, weights: np.ndarray | None,
                 batch_size: int, seed: int):
        super().__init__()
        self.views, self.y, self.w = views, y_onehot, weights
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self.epoch = 0
        self.order = self.rng.permutation(views.shape[1])

    def __len__(self) -> int:
        return math.ceil(self.views.shape[1] / self.batch_size)

    def __getitem__(self, i: int):
        idx = self.order[i * self.batch_size:(i + 1) * self.batch_size]
        x = self.views[self.epoch % len(self.views), idx]
        if self.w is None:
            return x, self.y[idx]
        return x, self.y[idx], self.w[idx]

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self.order = self.rng.permutation(self.views.shape[1])
