"""The backbone registry: every backbone builds, preprocessing matches Keras, freezing, weights.

Everything runs with random weights at small sizes, except the tests that load the shared
MobileNet 0.25 file; those skip when ../shared (or $PERSONCLF_SHARED) is absent.
"""
from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import urllib.error
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from keras.src.utils import file_utils

from tuner import backbones
from tuner.errors import UsageError, WeightsError

SHARED = Path(os.environ.get("PERSONCLF_SHARED", Path(__file__).resolve().parents[2] / "shared"))
MOBILENET_025 = SHARED / "weights" / "mobilenet_2_5_224_tf_no_top.h5"
needs_shared = pytest.mark.skipif(
    not MOBILENET_025.is_file(), reason=f"{MOBILENET_025} not found (set PERSONCLF_SHARED)"
)


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def _classifier(spec: backbones.BackboneSpec, base: keras.Model, classes: int = 5) -> keras.Model:
    size = base.input_shape[1]
    inputs = keras.Input((size, size, 3))
    x = inputs
    for layer in backbones.preprocessing_layers(spec):
        x = layer(x)
    x = keras.layers.GlobalAveragePooling2D()(base(x, training=False))
    return keras.Model(inputs, keras.layers.Dense(classes, activation="softmax")(x))


@pytest.mark.parametrize("name", backbones.names())
def test_every_backbone_builds_with_a_head_and_has_block_freeze_points(name):
    spec = backbones.get(name)
    size = spec.sizes[0]
    base = backbones.build_base(spec, size, weights=None)
    layers = base.layers

    points = spec.freeze_points(base)
    assert len(points) >= 4
    assert points == sorted(set(points)) and 0 < points[0] and points[-1] < len(layers)
    for p in points:
        if spec.block_start and (start := re.match(spec.block_start, layers[p].name)):
            # The first layer of its block: no earlier layer names the same block.
            earlier = (re.match(spec.block_start, layer.name) for layer in layers[:p])
            assert all(m is None or m.group(1) != start.group(1) for m in earlier), layers[p].name
        else:
            assert spec.block_end and re.match(spec.block_end, layers[p - 1].name), layers[p].name

    model = _classifier(spec, base)
    assert model(_images(2, size), training=False).shape == (2, 5)  # eager: no tracing, faster


@pytest.mark.parametrize("name", backbones.names())
def test_preprocessing_layers_match_keras_preprocess_input(name):
    spec = backbones.get(name)
    x = _images(4, 16)
    expected = getattr(keras.applications, spec.module).preprocess_input(x.copy())
    layers = backbones.preprocessing_layers(spec)
    if spec.family == "builtin":
        assert layers == [] and np.array_equal(expected, x)
        return
    assert all(layer.name.startswith("preprocess_") for layer in layers)
    got = keras.Sequential(layers)(x)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(got), expected, atol=1e-3)


def test_get_is_case_insensitive():
    assert backbones.get("mobilenetv2") is backbones.REGISTRY["MobileNetV2"]
    assert backbones.get("RESNET50").name == "ResNet50"


def test_unknown_backbone_names_it_and_lists_the_choices():
    with pytest.raises(UsageError) as err:
        backbones.get("MobileNetV9")
    message = str(err.value)
    assert "MobileNetV9" in message and "\n" not in message
    assert all(name in message for name in backbones.names())


def test_bad_size_or_alpha_is_a_usage_error():
    mobilenet = backbones.get("MobileNet")
    with pytest.raises(UsageError, match="input size 100"):
        backbones.build_base(mobilenet, 100, weights=None, alpha=0.25)
    with pytest.raises(UsageError, match="alpha 0.3"):
        backbones.build_base(mobilenet, 96, weights=None, alpha=0.3)
    with pytest.raises(UsageError, match="no width multiplier"):
        backbones.build_base(backbones.get("VGG16"), 32, weights=None, alpha=1.0)


@pytest.mark.parametrize("name, alpha", [("MobileNet", 0.25), ("MobileNetV2", 0.35)])
def test_set_freeze_trains_exactly_the_layers_from_the_freeze_point_except_batchnorm(name, alpha):
    spec = backbones.get(name)
    base = backbones.build_base(spec, 96, weights=None, alpha=alpha)
    base.trainable = False  # as after stage 1
    points = spec.freeze_points(base)
    total = backbones.count_params(base)[1]
    previous_trainable = total + 1
    for k in range(len(points) + 1):
        first = backbones.set_freeze(base, spec, k)
        assert first == (points[k - 1] if k else 0)
        assert base.trainable
        for i, layer in enumerate(base.layers):
            is_bn = isinstance(layer, keras.layers.BatchNormalization)
            assert layer.trainable == (i >= first and not is_bn), (k, i, layer.name)
        trainable, same_total = backbones.count_params(base)
        assert same_total == total and 0 < trainable < previous_trainable
        previous_trainable = trainable
    for bad in (-1, len(points) + 1):
        with pytest.raises(UsageError, match=f"freeze_block {bad}"):
            backbones.set_freeze(base, spec, bad)


@pytest.mark.parametrize("name", ["ResNet50", "DenseNet121", "MobileNetV2"])  # caffe, torch, tf
def test_model_with_preprocessing_saves_and_loads_in_safe_mode(tmp_path, name):
    spec = backbones.get(name)
    inputs = keras.Input((32, 32, 3))
    x = inputs
    for layer in backbones.preprocessing_layers(spec):
        x = layer(x)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(x))
    model = keras.Model(inputs, keras.layers.Dense(5, activation="softmax")(x))
    path = tmp_path / "model.keras"
    model.save(path)

    loaded = keras.saving.load_model(path, safe_mode=True)
    images = _images(3, 32)
    np.testing.assert_array_equal(loaded.predict(images, verbose=0), model.predict(images, verbose=0))
    preprocess = [layer for layer in loaded.layers if layer.name.startswith("preprocess_")]
    assert preprocess and not any(layer.trainable_weights for layer in preprocess)


def test_weights_by_path_round_trip(tmp_path):
    spec = backbones.get("MobileNet")
    source = backbones.build_base(spec, 96, weights=None, alpha=0.25)
    path = tmp_path / "mobilenet_025.weights.h5"
    source.save_weights(path)
    loaded = backbones.build_base(spec, 96, weights=str(path), alpha=0.25)
    for a, b in zip(source.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    with pytest.raises(WeightsError, match=re.escape(str(path))):
        backbones.build_base(spec, 96, weights=str(path), alpha=0.5)


def test_missing_weights_file_is_a_weights_error(tmp_path):
    missing = tmp_path / "nope.h5"
    with pytest.raises(WeightsError, match=re.escape(str(missing))):
        backbones.build_base(backbones.get("MobileNet"), 96, weights=str(missing), alpha=0.25)


def test_imagenet_weights_offline_name_the_file_and_the_fix(tmp_path, monkeypatch):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    # Keras downloads with this function; replacing it keeps the test off the network.
    monkeypatch.setattr(file_utils, "urlretrieve", offline)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(WeightsError) as err:
        backbones.build_base(backbones.get("MobileNet"), 96, weights="imagenet", alpha=0.5)
    message = str(err.value)
    assert "\n" not in message
    for part in ("MobileNet alpha 0.5 at 96 px", "mobilenet_5_0_224_tf_no_top.h5", str(tmp_path / "models"),
                 "make_keras_home.sh", "--weights PATH"):
        assert part in message


@needs_shared
def test_shared_mobilenet_weights_load_by_path_and_from_keras_home(tmp_path, monkeypatch):
    spec = backbones.get("MobileNet")
    by_path = backbones.build_base(spec, 96, weights=str(MOBILENET_025), alpha=0.25)
    with h5py.File(MOBILENET_025, "r") as h5:
        expected = h5["conv_pw_13"]["conv_pw_13"]["kernel"][()]
    np.testing.assert_array_equal(by_path.get_layer("conv_pw_13").kernel.numpy(), expected)

    home = tmp_path / "keras_home"
    subprocess.run([str(SHARED / "weights" / "make_keras_home.sh"), str(home)], check=True)
    monkeypatch.setenv("KERAS_HOME", str(home))
    from_home = backbones.build_base(spec, 128, weights="imagenet", alpha=0.25)
    np.testing.assert_array_equal(from_home.get_layer("conv_pw_13").kernel.numpy(), expected)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="the package turns oneDNN's kernels on only on x86")
@pytest.mark.parametrize("setting, tf_first, expected", [
    (None, False, "1 True"),  # the package's default: oneDNN's kernels on every x86 CPU
    ("0", False, "0 False"),  # the user's choice wins
    (None, True, "None"),  # TensorFlow loaded first: too late to change, so left alone
])
def test_importing_the_package_turns_onednn_on_unless_the_user_chose(setting, tf_first, expected):
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = setting
    imports = "import tensorflow, tuner" if tf_first else "import tuner, tensorflow"
    code = (f"{imports}; import os; v = os.environ.get('TF_ENABLE_ONEDNN_OPTS')\n"
            "from tensorflow.python.util import _pywrap_util_port as p\n"
            "print(v if v is None else f'{v} {p.IsMklEnabled()}')")
    out = subprocess.run([sys.executable, "-c", code], env={**env, "TF_CPP_MIN_LOG_LEVEL": "3"},
                         capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == expected
