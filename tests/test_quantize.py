"""Adaptive int8 weight rounding: the grid, the objective, the bias, what the converter keeps."""
from __future__ import annotations

import numpy as np
import pytest

from tuner import quantize


def nearest(w: np.ndarray) -> np.ndarray:
    step = np.abs(w).max(axis=0) / quantize.QMAX
    return np.round(w / step) * step


def objective(e: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """e^T G e per output channel."""
    if gram.ndim == 2:
        return np.einsum("io,ij,jo->o", e, gram, e)
    return np.einsum("io,oij,jo->o", e, gram, e)


@pytest.mark.parametrize("shared", [True, False])
def test_round_channelwise_stays_on_the_grid_and_beats_nearest(shared):
    rng = np.random.default_rng(0)
    n_in, n_out = 27, 16
    w = rng.normal(size=(n_in, n_out)) * rng.uniform(0.1, 3, size=n_out)
    # Correlated, positive inputs (post-ReLU activations): where nearest rounding is weakest.
    x = np.abs(rng.normal(size=(500, n_in)) + rng.normal(size=(500, 1)))
    gram = x.T @ x if shared else np.stack([x.T @ (x * rng.uniform(0.5, 2, n_in))
                                            for _ in range(n_out)])
    gram = gram if shared else (gram + gram.transpose(0, 2, 1)) / 2
    rounded, flipped = quantize.round_channelwise(w, gram)

    step = np.abs(w).max(axis=0) / quantize.QMAX
    k = rounded / step
    assert np.allclose(k, np.round(k), atol=1e-9)  # on each channel's grid
    assert np.abs(np.round(k)).max() <= quantize.QMAX
    # The largest weight keeps +-127, so a converter deriving the step from max|w| agrees.
    assert np.allclose(np.abs(rounded).max(axis=0), np.abs(w).max(axis=0))
    assert np.all(np.abs(rounded - w) < step + 1e-12)  # each weight rounded up or down
    adaptive, plain = objective(rounded - w, gram), objective(nearest(w) - w, gram)
    assert np.all(adaptive <= plain + 1e-9)
    assert adaptive.sum() < 0.7 * plain.sum()  # a real gain, not a tie
    assert flipped == int((~np.isclose(rounded, nearest(w))).sum()) > 0


def tiny_model(seed: int = 0):
    """Conv -> BN -> ReLU6 -> depthwise -> BN -> ReLU6 -> 1x1 conv -> BN, in a nested backbone,
    then pooling and a dense head: the shapes of every backbone this tool builds."""
    import keras

    keras.utils.set_random_seed(seed)
    inner_in = keras.Input((24, 24, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(inner_in)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.Conv2D(16, 1, use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    backbone = keras.Model(inner_in, keras.layers.ReLU(6.0)(x), name="backbone")
    image = keras.Input((24, 24, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(image)
    x = keras.layers.GlobalAveragePooling2D()(backbone(x))
    model = keras.Model(image, keras.layers.Dense(5, activation="softmax")(x))
    rng = np.random.default_rng(seed)
    for layer in backbone.layers:  # BatchNormalization as training leaves it, not identity
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 2, c))
            layer.beta.assign(rng.normal(0, 0.5, c))
            layer.moving_mean.assign(rng.normal(0, 0.5, c))
            layer.moving_variance.assign(rng.uniform(0.05, 3, c))
    return model


def test_converter_keeps_the_rounded_weights_and_bias_correction_cancels_the_mean_error(
        tmp_path, capfd, monkeypatch):
    import keras
    import tensorflow as tf

    from tuner import quiet
    from tuner.export import convert_int8, open_model

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(48, 24, 24, 3)).astype(np.uint8)
    held_out = rng.integers(0, 256, size=(32, 24, 24, 3)).astype(np.uint8)
    model = tiny_model()
    original = tiny_model()
    plain = tiny_model()
    info = quantize.round_weights(model, images)
    assert info["layers"] == 4 and info["flipped_from_nearest"] > 0 and info["passes"] == 1

    # Every kernel, BatchNormalization folded in, sits on the int8 grid the converter uses.
    path = tmp_path / "model"
    model.export(str(path), format="tf_saved_model", verbose=False,
                 input_signature=[tf.TensorSpec((1, 24, 24, 3), tf.float32)])
    tflite = tmp_path / "model.tflite"
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    capfd.readouterr()
    tflite.write_bytes(convert_int8(path, images))
    runner = open_model(tflite)
    # The converter's and interpreter's routine notes stay off stderr (the CLI's level)...
    assert not [line for line in capfd.readouterr().err.splitlines() if quiet.NOTES.search(line)]
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")  # ... and reach it when asked for
    convert_int8(path, images[:4])
    assert [line for line in capfd.readouterr().err.splitlines()
            if line.startswith("fully_quantize: ")]
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    details = runner.interpreter.get_tensor_details()
    kernels = [d for d in details if d["quantization_parameters"]["scales"].size > 1
               and len(d["shape"]) in (2, 4) and d["dtype"] == np.int8]
    assert len(kernels) == 4
    for d in kernels:
        scales = d["quantization_parameters"]["scales"]
        q = runner.interpreter.get_tensor(d["index"]).astype(np.int64)
        assert np.abs(q).max() == quantize.QMAX
        per_channel = np.moveaxis(q, d["quantization_parameters"]["quantized_dimension"], -1)
        assert np.all(np.abs(per_channel.reshape(-1, len(scales))).max(axis=0) == quantize.QMAX)
    backbone = model.get_layer("backbone")
    conv, bn = backbone.layers[1], backbone.layers[2]
    fold = keras.ops.convert_to_numpy(bn.gamma) / np.sqrt(
        keras.ops.convert_to_numpy(bn.moving_variance) + bn.epsilon)
    folded = keras.ops.convert_to_numpy(conv.kernel) * fold  # (kh, kw, in, out)
    conv_q = next(d for d in kernels if d["shape"][0] == 8 and len(d["shape"]) == 4
                  and d["shape"][-1] == 3)  # TFLite stores (out, kh, kw, in)
    dequantised = runner.interpreter.get_tensor(conv_q["index"]) * \
        conv_q["quantization_parameters"]["scales"][:, None, None, None]
    assert np.abs(np.transpose(dequantised, (1, 2, 3, 0)) - folded).max() < \
        1e-5 * np.abs(folded).max()

    # On images it never saw, the rounded float model's pooled features are closer to the
    # original's than with nearest rounding, and so is their mean (the bias absorbed it).
    x = held_out.astype(np.float32)

    def feats(m):
        return keras.Model(m.input, m.layers[-2].output).predict(x, verbose=0)

    nearest_model = _nearest_rounded(plain)
    err_adaptive = feats(model) - feats(original)
    err_nearest = feats(nearest_model) - feats(original)
    assert np.abs(err_adaptive).mean() < np.abs(err_nearest).mean()
    assert np.abs(err_adaptive.mean(axis=0)).mean() < np.abs(err_nearest.mean(axis=0)).mean()


def _nearest_rounded(model):
    """`model` with every kernel rounded to nearest on the converter's grid (BN folded)."""
    for _, targets, _ in quantize._levels(model):
        for t in targets:
            t.assign_folded(nearest(t.folded()))
    return model
