"""The KerasTuner HyperModel: backbone + new head, fitted in two stages.

One HyperModel serves every engine. KerasTuner's tuners call `build(hp)` and `fit(hp, model,
...)` themselves; the Optuna driver calls the same methods with `space.OptunaHP`, an adapter
that gives an Optuna trial KerasTuner's `hp` interface. The model takes raw RGB 0..255:
backbone preprocessing is inside the graph, so every export format gets the same input.
"""
from __future__ import annotations

from dataclasses import replace

import keras
import keras_tuner as kt

from . import backbones
from .config import FitConfig, TrialParams
from .space import SearchSpace, define

HEAD_PREFIX = "head_"


def build_model(params: TrialParams, num_classes: int, weights: str | None = "imagenet",
                seed: int | None = None,
                reuse: backbones.BaseReuse | None = None) -> keras.Model:
    """Preprocessing -> frozen backbone (always called in inference mode) -> pooled head.

    The head is the origin's: global average pooling, Dense(units, relu, L2), Dropout, and a
    softmax Dense with L2 (dense_units=0 drops the hidden layer).

    The backbone is called with `training=False`, so its BatchNormalization layers keep their
    ImageNet statistics in both stages: the origin let them update in stage 2, which hurts on
    small datasets. The softmax layer stays float32 under mixed precision.

    `reuse` hands back a backbone an earlier trial built (see `backbones.BaseReuse`). With
    `seed`, the head's initial weights depend on the seed alone, not on whether the backbone
    was built (which draws random numbers) or reused, so a trial repeats in a new process.
    """
    spec = backbones.get(params.backbone)
    size = params.input_size
    inputs = keras.Input((size, size, 3), name="image")
    x = inputs
    for layer in backbones.preprocessing_layers(spec):
        x = layer(x)
    if reuse is not None:
        base = reuse.get(spec, size, weights, params.alpha)
    else:
        base = backbones.build_base(spec, size, weights, params.alpha)
    base.trainable = False
    x = base(x, training=False)
    if seed is not None:
        keras.utils.set_random_seed(seed)
    x = keras.layers.GlobalAveragePooling2D(name=f"{HEAD_PREFIX}pool")(x)
    regularizer = keras.regularizers.L2(params.l2) if params.l2 > 0 else None
    if params.dense_units:
        x = keras.layers.Dense(params.dense_units, activation="relu",
                               kernel_regularizer=regularizer, name=f"{HEAD_PREFIX}dense")(x)
    x = keras.layers.Dropout(params.dropout, seed=seed, name=f"{HEAD_PREFIX}dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32",
                                 kernel_regularizer=regularizer, name=f"{HEAD_PREFIX}probs")(x)
    return keras.Model(inputs, outputs, name=f"personclf_{spec.name.lower()}")


def base_of(model: keras.Model) -> keras.Model:
    """The backbone sub-model inside a model made by `build_model`."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            return layer
    raise ValueError(f"model {model.name} has no backbone sub-model")


def head_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The new layers after the backbone (the part stage 1 trains)."""
    return [layer for layer in model.layers if layer.name.startswith(HEAD_PREFIX)]


class PersonHyperModel(kt.HyperModel):
    """Backbone + head from a declarative search space; `fit` runs the two-stage fine-tune."""

    def __init__(self, space: SearchSpace, classes: list[str], fit_config: FitConfig,
                 name: str = "personclf", tunable: bool = True):
        super().__init__(name=name, tunable=tunable)
        self.space = space
        self.classes = list(classes)
        self.fit_config = fit_config
        self.bases = backbones.BaseReuse()

    def params(self, hp) -> TrialParams:
        """The trial's concrete hyperparameters (registers them with `hp` on first call)."""
        return define(hp, self.space)

    def build(self, hp) -> keras.Model:
        from .trial import release

        release()  # the previous trial's graph, whichever engine ran it
        params = self.params(hp)
        cfg = self.fit_config
        keras.utils.set_random_seed(cfg.seed)
        if cfg.mixed_precision:
            keras.mixed_precision.set_global_policy("mixed_float16")
        return build_model(params, len(self.classes), cfg.weights, seed=cfg.seed,
                           reuse=self.bases)

    def fit(self, hp, model, data=None, reporter=None, callbacks=None, epochs=None, **kwargs):
        """Run both stages; returns the metrics dict whose objective KerasTuner and Optuna read.

        `data` is a `trial.TrialData` (passed through `Tuner.search(data=...)` by KerasTuner);
        `reporter` gets every epoch's validation metrics as one sequence of steps and may
        raise to prune. KerasTuner's own callbacks are given each epoch's logs. `epochs` is
        Hyperband's budget: it is shared between the stages in the configured proportion.
        """
        from .trial import run_two_stages

        if data is None:
            raise TypeError("PersonHyperModel.fit needs data=TrialData(...)")
        cfg = self.fit_config
        if epochs is not None:
            total = cfg.max_epochs_stage1 + cfg.max_epochs_stage2
            first = max(1, round(epochs * cfg.max_epochs_stage1 / total))
            cfg = replace(cfg, max_epochs_stage1=first, max_epochs_stage2=max(0, epochs - first))
        result = run_two_stages(model, self.params(hp), data, cfg,
                                reporter=reporter, extra_callbacks=callbacks)
        return result.metrics()
