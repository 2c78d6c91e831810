"""One trial: stage 1 trains the head on the frozen backbone, stage 2 fine-tunes above the freeze depth.

Validation metrics are computed once per epoch by `ValidationMetrics` (loss, accuracy,
balanced accuracy, macro F1) and reported as one sequence of steps across both stages, so a
search driver can prune on them. Early stopping watches the objective in each stage and the
trial keeps the best weights of either stage.
"""
from __future__ import annotations

import gc
import math
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

import keras
import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from . import backbones
from .config import FitConfig, TrialParams
from .data import class_weights
from .hypermodel import base_of, head_layers
from .pipeline import (ImageCache, SplitArrays, make_dataset, predict_batch, split_arrays,
                       train_stream, views_for, without_autotune_model)

log = logging.getLogger(__name__)

OBJECTIVES = ("val_balanced_accuracy", "val_accuracy", "val_macro_f1")


class Reporter(Protocol):
    """Receives each epoch's validation metrics; may raise (e.g. optuna.TrialPruned) to stop."""

    def report(self, step: int, metrics: dict[str, float]) -> None: ...


@dataclass
class TrialData:
    """What every trial shares and no hyperparameter changes: split, classes, decoded images."""

    split: pd.DataFrame
    classes: list[str]
    cache: ImageCache
    class_weight_method: str = "balanced"
    # Stage-1 feature cache (tuner.features.FeatureCache); None trains stage 1 through the
    # backbone, the naive way.
    features: object | None = None

    def arrays(self, which: str, size: int) -> SplitArrays:
        return split_arrays(self.split, self.classes, self.cache, size, which)

    def class_weight(self) -> dict[int, float] | None:
        train = self.split[self.split["split"] == "train"]["label"]
        weights = class_weights(train, self.classes, self.class_weight_method)
        return {i: weights[c] for i, c in enumerate(self.classes)}


def score(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro F1 of class probabilities against indices."""
    pred = probs.argmax(axis=1)
    labels = np.unique(np.concatenate([y_true, pred]))
    return {
        "accuracy": float(accuracy_score(y_true, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, pred)),
        "macro_f1": float(f1_score(y_true, pred, labels=labels, average="macro", zero_division=0)),
    }


class ValidationMetrics(keras.callbacks.Callback):
    """Adds val_loss/val_accuracy/val_balanced_accuracy/val_macro_f1 to each epoch's logs.

    One prediction pass over the validation set per epoch (Keras's own validation is not
    used), so early stopping, the search objective and pruning all see the same numbers.
    """

    def __init__(self, val_ds, y_val: np.ndarray, num_classes: int,
                 on_step: Callable[[int, dict[str, float]], None] | None = None,
                 eager: bool = False):
        super().__init__()
        self.val_ds = val_ds
        self.y_val = y_val
        self.num_classes = num_classes
        self.on_step = on_step
        # Eager calls skip tracing a predict function, which costs more than all the epochs'
        # passes when the model is only the head on cached features (a few ops).
        self.eager = eager

    def _predict(self) -> np.ndarray:
        if self.eager:
            return np.concatenate([keras.ops.convert_to_numpy(self.model(x, training=False))
                                   for x, _ in self.val_ds])
        # One traced function (one batch shape), reused every epoch, without `predict`'s
        # per-call set-up.
        batches = [x for x, _ in self.val_ds]
        return np.concatenate([predict_batch(self.model, x, len(batches[0])) for x in batches])

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        probs = self._predict()
        onehot = np.eye(self.num_classes, dtype=np.float32)[self.y_val]
        loss = float(keras.losses.categorical_crossentropy(onehot, probs).numpy().mean())
        logs["val_loss"] = loss
        logs.update({f"val_{k}": v for k, v in score(self.y_val, probs).items()})
        if self.on_step is not None:
            self.on_step(epoch, dict(logs))


class _Relay(keras.callbacks.Callback):
    """Passes epoch logs to callbacks that live outside this fit (e.g. KerasTuner's)."""

    def __init__(self, callbacks):
        super().__init__()
        self.callbacks = list(callbacks or [])

    def set_model(self, model):
        super().set_model(model)
        for cb in self.callbacks:
            cb.set_model(model)

    def on_epoch_end(self, epoch, logs=None):
        for cb in self.callbacks:
            cb.on_epoch_end(epoch, logs)


@dataclass
class TrialResult:
    """Everything the search records about one trial."""

    params: TrialParams
    objective: str
    history: list[dict] = field(default_factory=list)  # one dict per step, both stages
    stage1_best: float = float("nan")
    stage2_best: float = float("nan")
    epochs_stage1: int = 0
    epochs_stage2: int = 0
    best_stage: int = 1
    seconds: float = 0.0
    trainable_params: int = 0
    total_params: int = 0

    @property
    def best(self) -> dict[str, float]:
        """The validation metrics of the best step (the weights the trial kept)."""
        steps = [h for h in self.history if self.objective in h]
        return max(steps, key=lambda h: h[self.objective]) if steps else {}

    def metrics(self) -> dict[str, float]:
        best = self.best
        out = {k: float(v) for k, v in best.items() if k.startswith("val_")}
        out.update(stage1_best=self.stage1_best, stage2_best=self.stage2_best,
                   epochs_stage1=self.epochs_stage1, epochs_stage2=self.epochs_stage2,
                   seconds=self.seconds, params=self.total_params)
        return out


def compile_model(model: keras.Model, learning_rate: float, params: TrialParams,
                  cfg: FitConfig, train_ds=None, warmup_steps: int = 0) -> None:
    """Compile for one stage; with `train_ds`, also create the optimizer's and metrics' state.

    Keras (TensorFlow backend, no distribution strategy) otherwise creates that state inside
    the first trace of the train step, and because the trace created variables TensorFlow
    traces the whole step a second time: building it first halves the tracing, which is a
    large share of a trial on cached activations.
    """
    if warmup_steps > 0:  # linear from 0, then constant (alpha=1: the cosine part is flat)
        learning_rate = keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps=1, alpha=1.0, warmup_target=learning_rate, warmup_steps=warmup_steps)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=params.label_smoothing),
        metrics=["accuracy"],
        jit_compile=cfg.jit_compile,
    )
    build = getattr(model, "_symbolic_build", None)  # Keras 3's own pre-fit build
    if train_ds is not None and build is not None:
        build(data_batch=train_ds.element_spec)


def run_two_stages(model: keras.Model, params: TrialParams, data: TrialData, cfg: FitConfig,
                   reporter: Reporter | None = None, extra_callbacks=None) -> TrialResult:
    """Fit stage 1 (head only) then stage 2 (above the freeze depth); keep the best weights."""
    start = time.perf_counter()
    keras.utils.set_random_seed(cfg.seed)
    size, k = params.input_size, len(data.classes)
    train, val = data.arrays("train", size), data.arrays("val", size)
    class_weight = data.class_weight()
    val_ds = make_dataset(val, k, max(params.batch_size, 64))
    result = TrialResult(params=params, objective=cfg.objective)

    def on_step(epoch: int, logs: dict[str, float]) -> None:
        # Stage 2 starts at a fixed offset, so step k means the same epoch in every trial and
        # a pruner compares like with like even when stage 1 stopped early.
        step = epoch if stage == 1 else cfg.max_epochs_stage1 + epoch
        entry = {"step": step, "stage": stage, **{k_: float(v) for k_, v in logs.items()}}
        result.history.append(entry)
        if reporter is not None:
            reporter.report(step, entry)

    def fit_stage(learning_rate: float, epochs: int, warmup_epochs: int = 0) -> int:
        train_ds, steps = train_stream(train, k, params.batch_size, seed=cfg.seed,
                                       epochs=epochs, views=views_for(params, cfg),
                                       augment_strength=params.augment,
                                       class_weight=class_weight)
        compile_model(model, learning_rate, params, cfg, train_ds, warmup_epochs * steps)
        early = keras.callbacks.EarlyStopping(monitor=cfg.objective, mode="max",
                                              patience=cfg.patience, restore_best_weights=True)
        callbacks = [ValidationMetrics(val_ds, val.y, k, on_step), early,
                     _Relay(extra_callbacks)]
        history = model.fit(train_ds, epochs=epochs, steps_per_epoch=steps, callbacks=callbacks,
                            verbose=cfg.verbose, shuffle=False)  # the plan fixes the order
        return len(history.history.get("loss", []))

    base = base_of(model)
    base.trainable = False
    spec = backbones.get(params.backbone)
    stage = 1
    inputs = None
    if data.features is not None:
        from .features import head_model

        first = backbones.first_trainable(base, spec, params.freeze_block) \
            if cfg.max_epochs_stage2 > 0 else None
        inputs = data.features.for_trial(model, params, data, cfg, first)
        keras.utils.set_random_seed(cfg.seed)  # as if nothing was computed: resumes repeat
        feats = inputs.pooled
        result.epochs_stage1 = _fit_cached(head_model(model, feats.train.shape[-1]), feats,
                                           params.lr_stage1, cfg.max_epochs_stage1, params, cfg,
                                           train, val, class_weight, on_step, extra_callbacks)
    else:
        result.epochs_stage1 = fit_stage(params.lr_stage1, cfg.max_epochs_stage1)
    result.stage1_best = _best(result.history, cfg.objective, stage=1)
    last_step = result.history[-1]["step"] if result.history else -1
    if reporter is not None and cfg.max_epochs_stage2 > 0 \
            and last_step < cfg.max_epochs_stage1 - 1 and math.isfinite(result.stage1_best):
        # Pruning between the stages: a stage 1 that stopped early is reported at the last
        # stage-1 step too, so the pruner weighs every trial's stage-1 result at one step
        # before a hopeless trial pays for stage 2.
        reporter.report(cfg.max_epochs_stage1 - 1,
                        {cfg.objective: result.stage1_best, "stage": 1, "between_stages": 1.0})

    if cfg.max_epochs_stage2 > 0:
        stage1_weights = model.get_weights()
        stage = 2
        backbones.set_freeze(base, spec, params.freeze_block)
        cached = inputs.stage2() if inputs is not None else None
        if cached is not None:
            # Stage 2 on cached activations at the freeze point: the suffix model shares the
            # full model's layers above it, so `model` ends up with the trained weights.
            suffix, activations = cached
            result.epochs_stage2 = _fit_cached(suffix, activations, params.lr_stage2,
                                               cfg.max_epochs_stage2, params, cfg, train, val,
                                               class_weight, on_step, extra_callbacks,
                                               cfg.warmup_epochs_stage2)
        else:
            result.epochs_stage2 = fit_stage(params.lr_stage2, cfg.max_epochs_stage2,
                                             cfg.warmup_epochs_stage2)
        result.stage2_best = _best(result.history, cfg.objective, stage=2)
        if not result.stage2_best > result.stage1_best:
            model.set_weights(stage1_weights)  # stage 2 never beat stage 1: keep stage 1
        else:
            result.best_stage = 2
    result.trainable_params = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    result.total_params = int(model.count_params())
    result.seconds = time.perf_counter() - start
    return result


def refit_head(model: keras.Model, params: TrialParams, data: TrialData,
               cfg: FitConfig) -> dict:
    """Stage 3 of the final retrain: refit the head on the fine-tuned backbone's features.

    Why: stage 1 fits the head to the ImageNet backbone; stage 2 then moves the backbone at a
    learning rate too low to move the head much, so the head ends fitted to features that are
    no longer there. Refitting it on the tuned backbone's pooled features (at the head's own
    learning rate, early stopping on validation) costs a forward pass per candidate. The
    candidates, each started from the current head: features of the trial's augmented copies
    (when it augments) and of the plain photos (what the head sees in use). The better one replaces the head only if it beats the current
    model on the validation objective; the test split is never read. Returns what happened,
    for the manifest.
    """
    from .best import predict_probs
    from .features import extract, feature_extractor, head_model

    start = time.perf_counter()
    metric = cfg.objective.removeprefix("val_")
    size = params.input_size
    train, val = data.arrays("train", size), data.arrays("val", size)
    class_weight = data.class_weight()
    before = score(val.y, predict_probs(model, val.x))[metric]
    heads = head_layers(model)
    initial = [layer.get_weights() for layer in heads]
    extractor = feature_extractor(model)
    candidates = {"augmented": params} if params.augment > 0 else {}
    candidates["plain"] = replace(params, augment=0.0)
    best_name, best_value, best_weights, epochs = None, before, None, 0
    for name, candidate in candidates.items():
        feats = extract(extractor, candidate, data, cfg)
        for layer, weights in zip(heads, initial):
            layer.set_weights(weights)
        keras.utils.set_random_seed(cfg.seed)
        values: list[float] = []
        ran = _fit_cached(head_model(model, feats.train.shape[-1]), feats, params.lr_stage1,
                          cfg.max_epochs_stage1, candidate, cfg, train, val, class_weight,
                          lambda epoch, logs: values.append(logs[cfg.objective]), None)
        if values and max(values) > best_value:  # early stopping restored its best epoch
            best_name, best_value, epochs = name, max(values), ran
            best_weights = [layer.get_weights() for layer in heads]
    for layer, weights in zip(heads, best_weights or initial):
        layer.set_weights(weights)
    return {"objective": cfg.objective, "before": before, "after": best_value,
            "kept": best_name is not None, "features": best_name, "epochs": epochs,
            "candidates": list(candidates), "seconds": round(time.perf_counter() - start, 1)}


def _fit_cached(net: keras.Model, feats, learning_rate: float, epochs: int, params: TrialParams,
                cfg: FitConfig, train: SplitArrays, val: SplitArrays, class_weight, on_step,
                extra_callbacks, warmup_epochs: int = 0) -> int:
    """Fit `net` (layers shared with the full model) on cached activations: the same batches
    of the same augmented copies as `fit_stage`, validated on the cached validation
    activations."""
    import tensorflow as tf

    from .features import view_dataset

    k = int(net.output.shape[-1])
    train_ds, steps = view_dataset(feats.train, train.y, k, class_weight, params.batch_size,
                                   cfg.seed, epochs)
    compile_model(net, learning_rate, params, cfg, train_ds, warmup_epochs * steps)
    val_ds = tf.data.Dataset.from_tensor_slices(
        (feats.val.astype(np.float32), np.eye(k, dtype=np.float32)[val.y])).batch(256) \
        .apply(without_autotune_model)
    early = keras.callbacks.EarlyStopping(monitor=cfg.objective, mode="max",
                                          patience=cfg.patience, restore_best_weights=True)
    # Eager validation for the head alone; a backbone suffix is worth tracing (at
    # MobileNetV2's block 12, one eager pass costs what tracing and three passes do).
    head_only = not any(isinstance(layer, keras.Model) for layer in net.layers)
    callbacks = [ValidationMetrics(val_ds, val.y, k, on_step, eager=head_only), early,
                 _Relay(extra_callbacks)]
    history = net.fit(train_ds, epochs=epochs, steps_per_epoch=steps, callbacks=callbacks,
                      verbose=cfg.verbose, shuffle=False)  # the plan fixes the order
    return len(history.history.get("loss", []))


def _best(history: list[dict], objective: str, stage: int) -> float:
    values = [h[objective] for h in history if h["stage"] == stage and objective in h]
    return max(values) if values else float("nan")


def freeze_imports() -> None:
    """Exempt everything alive now (TensorFlow's, Keras's and Optuna's ~400k import-time
    objects) from garbage collection for good.

    They live as long as the process, yet every full collection walks them again: each
    `release()` and each of Python's own full collections while a trial traces its graphs
    (0.25-0.4 s apiece here, under 0.1 s after). Only the first call in a process freezes,
    so a second search in the same process exempts none of the first one's objects
    (`gc.freeze`).
    """
    global _FROZEN
    if not _FROZEN:
        _FROZEN = True
        gc.collect()
        gc.freeze()


_FROZEN = False


def release() -> None:
    """Free a finished trial's graph and memory so a long search stays flat.

    `clear_session` alone is not enough: every trace of a Keras train step registers a
    `tf.custom_gradient` (the default strategy's gradient all-reduce in Keras's TF optimizer)
    in TensorFlow's global gradient registry, and that entry's closure holds the traced graph,
    so each trial's whole train-step graph stayed alive for good (tensorflow#97697). The
    entries are only read while a graph that contains them is being differentiated, which
    Keras does inside the trace, so a finished trial never needs them again.
    """
    keras.backend.clear_session(free_memory=False)
    _drop_custom_gradients()
    gc.collect()


def _drop_custom_gradients() -> None:
    try:
        from tensorflow.python.framework import ops

        registry = ops._gradient_registry._registry
    except (ImportError, AttributeError):  # another TensorFlow layout: nothing to drop
        return
    for name in [n for n in registry if n.startswith("CustomGradient-")]:
        registry.pop(name, None)
