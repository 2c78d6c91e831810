"""The registry of `keras.applications` backbones: sizes, in-graph preprocessing, freeze points, weights.

Every model of this tool takes raw RGB pixels 0..255 (float32), whatever the backbone. What a
backbone expects beyond that lives inside the graph as standard Keras layers (`Rescaling`,
`Normalization`, a frozen 1x1 `Conv2D`), never `Lambda` or custom classes, so models load with
`keras.saving.load_model(..., safe_mode=True)` and every export format sees the same input.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import tempfile
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras.src.backend import config as _keras_config

from .errors import UsageError, WeightsError

log = logging.getLogger(__name__)

FAMILIES = ("tf", "caffe", "torch", "builtin")

# ImageNet means of keras.applications' "caffe" mode, in BGR order.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of the tool needs to know about one `keras.applications` backbone.

    Block boundaries come from layer names: `block_start` is a regex matched at the start of each
    layer name whose group 1 names the block, and a block starts at the first layer of each name;
    `block_end` (for Inception and NASNet, whose block layers are unnamed) matches the layer that
    closes a block, and the next layer starts one.
    """

    name: str
    constructor: str
    module: str
    family: str
    default_size: int
    sizes: tuple[int, ...]
    alphas: tuple[float, ...] = ()
    default_alpha: float | None = None
    edge_tpu: bool = False
    block_start: str = ""
    block_end: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"{self.name}: family {self.family!r} is not one of {FAMILIES}")
        if self.default_size not in self.sizes or bool(self.alphas) != (self.default_alpha in self.alphas):
            raise ValueError(f"{self.name}: default size or alpha is not among the allowed ones")
        if not (self.block_start or self.block_end):
            raise ValueError(f"{self.name}: needs block_start or block_end to find freeze points")

    def freeze_points(self, base: keras.Model) -> list[int]:
        """Ascending indices into `base.layers` where a block starts (index 0 never included).

        A boundary is dropped when the block before or after it has no weights that could train
        (BatchNormalization never trains here), so every point changes what stage 2 trains.
        """
        layers = base.layers
        candidates, seen = set(), set()
        for i, layer in enumerate(layers):
            match = self.block_start and re.match(self.block_start, layer.name)
            if match and match.group(1) not in seen:
                seen.add(match.group(1))
                candidates.add(i)
            if self.block_end and re.match(self.block_end, layer.name):
                candidates.add(i + 1)
        learns = [_learns(layer) for layer in layers]
        points: list[int] = []
        for p in sorted(candidates):
            if any(learns[points[-1] if points else 0 : p]) and any(learns[p:]):
                points.append(p)
        return points


def _learns(layer: keras.layers.Layer) -> bool:
    """Whether fine-tuning can change this layer (BatchNormalization is always kept frozen)."""
    return bool(layer.weights) and not isinstance(
        layer, (keras.layers.BatchNormalization, keras.layers.Normalization)
    )


def _sizes_from(min_size: int, default: int) -> tuple[int, ...]:
    """Multiples of 32 from `min_size` (Keras's lower bound) up to 320, plus the default size."""
    return tuple(sorted({s for s in range(32, 321, 32) if s >= min_size} | {default}))


# MobileNets have ImageNet weights at these sizes (v1 below 128 and v3 below 224 reuse the
# 224-px file: without the top, the convolution weights do not depend on the input size).
_MOBILE_SIZES = (96, 128, 160, 192, 224)

_SPECS = (
    BackboneSpec("VGG16", "VGG16", "vgg16", "caffe", 224, _sizes_from(32, 224),
                 block_start=r"(block\d)_"),
    BackboneSpec("ResNet50", "ResNet50", "resnet50", "caffe", 224, _sizes_from(32, 224),
                 edge_tpu=True, block_start=r"(conv\d_block\d+)_"),
    BackboneSpec("ResNet50V2", "ResNet50V2", "resnet_v2", "tf", 224, _sizes_from(32, 224),
                 block_start=r"(conv\d_block\d+)_"),
    BackboneSpec("InceptionV3", "InceptionV3", "inception_v3", "tf", 299, _sizes_from(75, 299),
                 edge_tpu=True, block_end=r"mixed\d+$"),
    BackboneSpec("InceptionResNetV2", "InceptionResNetV2", "inception_resnet_v2", "tf", 299,
                 _sizes_from(75, 299), block_end=r"(?:mixed_\w+|block(?:35|17|8)_\d+_ac)$"),
    BackboneSpec("Xception", "Xception", "xception", "tf", 299, _sizes_from(71, 299),
                 block_start=r"(block\d+)_"),
    BackboneSpec("MobileNet", "MobileNet", "mobilenet", "tf", 224, _MOBILE_SIZES,
                 alphas=(0.25, 0.5, 0.75, 1.0), default_alpha=1.0, edge_tpu=True,
                 block_start=r"conv_(?:pad|dw|pw)_(\d+)"),
    BackboneSpec("MobileNetV2", "MobileNetV2", "mobilenet_v2", "tf", 224, _MOBILE_SIZES,
                 alphas=(0.35, 0.5, 0.75, 1.0, 1.3, 1.4), default_alpha=1.0, edge_tpu=True,
                 block_start=r"(expanded_conv|block_\d+|Conv_1)(?:_|$)"),
    # Keras's MobileNetV3 uses hard-swish, which the Edge TPU compiler leaves on the CPU
    # (google-coral/edgetpu#353); Coral's own V3 models are other graphs.
    BackboneSpec("MobileNetV3Small", "MobileNetV3Small", "mobilenet_v3", "builtin", 224,
                 _MOBILE_SIZES, alphas=(0.75, 1.0), default_alpha=1.0,
                 block_start=r"(expanded_conv(?:_\d+)?|conv_1)(?:_|$)"),
    BackboneSpec("MobileNetV3Large", "MobileNetV3Large", "mobilenet_v3", "builtin", 224,
                 _MOBILE_SIZES, alphas=(0.75, 1.0), default_alpha=1.0,
                 block_start=r"(expanded_conv(?:_\d+)?|conv_1)(?:_|$)"),
    # Freeze points at stage boundaries (block1a, block2a, ..., top), not at each sub-block.
    BackboneSpec("EfficientNetB0", "EfficientNetB0", "efficientnet", "builtin", 224,
                 _sizes_from(32, 224), edge_tpu=True, block_start=r"(block\d|top)[a-z]?_"),
    # Keras builds NASNetMobile at other sizes, but its ImageNet weights are for 224 px.
    BackboneSpec("NASNetMobile", "NASNetMobile", "nasnet", "tf", 224, (224,),
                 block_end=r"(?:normal|reduction)_concat_"),
    # A dense block and the transition after it form one freeze block.
    BackboneSpec("DenseNet121", "DenseNet121", "densenet", "torch", 224, _sizes_from(32, 224),
                 block_start=r"(?:conv|pool)(\d)(?:_|$)"),
)

REGISTRY: dict[str, BackboneSpec] = {spec.name: spec for spec in _SPECS}
# len(spec.freeze_points(base)) per backbone. Counting needs a built model, so a search space
# checks its freeze_block ranges against this table when it loads; a slow test checks the
# table against built models.
FREEZE_POINT_COUNTS = {"VGG16": 4, "ResNet50": 16, "ResNet50V2": 16, "InceptionV3": 10,
                       "InceptionResNetV2": 42, "Xception": 13, "MobileNet": 13, "MobileNetV2": 18,
                       "MobileNetV3Small": 12, "MobileNetV3Large": 16, "EfficientNetB0": 8,
                       "NASNetMobile": 15, "DenseNet121": 4}
_BY_LOWER = {name.lower(): spec for name, spec in REGISTRY.items()}


def names() -> list[str]:
    """Registered backbone names, in registry order."""
    return list(REGISTRY)


def get(name: str) -> BackboneSpec:
    """The spec for `name`, case-insensitively ("mobilenetv2" works)."""
    try:
        return _BY_LOWER[name.lower()]
    except KeyError:
        raise UsageError(f"unknown backbone {name!r}: choose one of {', '.join(REGISTRY)}") from None


def preprocessing_layers(spec: BackboneSpec) -> list[keras.layers.Layer]:
    """Fresh standard layers that map raw RGB 0..255 to what `spec`'s backbone expects.

    Same numbers as `keras.applications.<module>.preprocess_input`. The layers compute in float32
    even under a mixed-precision policy, because subtracting ImageNet means in float16 loses
    precision. Names start with `preprocess_` so callers can find them.
    """
    if spec.family == "tf":
        return [keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess_scale", dtype="float32")]
    if spec.family == "torch":
        return [
            keras.layers.Rescaling(1 / 255, name="preprocess_scale", dtype="float32"),
            keras.layers.Normalization(
                mean=list(_TORCH_MEAN), variance=[s**2 for s in _TORCH_STD],
                name="preprocess_normalize", dtype="float32",
            ),
        ]
    if spec.family == "caffe":
        return [_caffe_layer()]
    return []  # "builtin": the backbone rescales its input itself.


def _caffe_layer() -> keras.layers.Conv2D:
    """RGB -> BGR and minus the ImageNet mean, as a frozen 1x1 convolution.

    No standard layer reorders channels; a 1x1 convolution whose kernel is the permutation does,
    saves its weights in the .keras file and converts to TFLite as one CONV_2D.
    """
    layer = keras.layers.Conv2D(3, 1, trainable=False, name="preprocess_caffe_bgr_mean", dtype="float32")
    layer.build((None, None, None, 3))
    kernel = np.zeros((1, 1, 3, 3), dtype="float32")
    for bgr, rgb in enumerate((2, 1, 0)):
        kernel[0, 0, rgb, bgr] = 1.0
    layer.set_weights([kernel, -np.asarray(_CAFFE_MEAN_BGR, dtype="float32")])
    return layer


def build_base(spec: BackboneSpec, input_size: int, weights: str | None, alpha: float | None = None) -> keras.Model:
    """The backbone without top or pooling, for square `input_size` RGB input.

    `weights`: None (random init), "imagenet" (Keras's cache in $KERAS_HOME/models, else a
    download) or the path of a weights file. `alpha` defaults to the spec's default width.
    """
    alpha = _check_alpha(spec, alpha)
    if input_size not in spec.sizes:
        raise UsageError(
            f"input size {input_size} for {spec.name}: choose one of {', '.join(map(str, spec.sizes))}"
        )
    what = _describe(spec, alpha, input_size)
    kwargs = {"include_top": False, "pooling": None, "input_shape": (input_size, input_size, 3)}
    if spec.alphas:
        kwargs["alpha"] = alpha

    if weights is None:
        return _construct(spec, weights=None, **kwargs)
    if weights == "imagenet":
        return _build_imagenet(spec, what, kwargs)

    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(f"--weights {weights}: no such file (expected weights for {what})")
    # A file that does not fit makes Keras warn once per layer before it raises: keep the one-line
    # error, and log the warnings of a load that worked.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            base = _construct(spec, weights=str(path), **kwargs)
        except (ValueError, OSError, KeyError) as exc:
            reason = " ".join(str(exc).split())[:300]
            raise WeightsError(f"--weights {path}: does not fit {what}: {reason}") from None
    for warning in caught:
        log.warning("loading %s: %s", path, warning.message)
    return base


class BaseReuse:
    """The backbones a search has built, handed back to its later trials of the same setting.

    Keras takes seconds to build a backbone (2 s for MobileNetV2 here, 10+ for the large ones):
    on cached activations that is a large share of a trial. A reused backbone gets the weights
    it was loaded with back, every layer frozen (as `build_base` returns it) and no trace of
    the previous trial's model (its call nodes are dropped, so the new model's graph and its
    saved config are the same as with a new backbone). Keeps the `size` newest settings.
    """

    def __init__(self, size: int = 3):
        self.size = size
        self._built: dict[tuple, tuple[keras.Model, list[np.ndarray]]] = {}

    def get(self, spec: BackboneSpec, input_size: int, weights: str | None,
            alpha: float | None = None) -> keras.Model:
        key = (spec.name, input_size, weights, alpha, keras.mixed_precision.global_policy().name)
        if key in self._built:
            base, loaded = self._built.pop(key)
            base.set_weights(loaded)
            base.trainable = False
            for nodes in ("_inbound_nodes", "_outbound_nodes"):  # the previous trial's model
                getattr(base, nodes, []).clear()
        else:
            base = build_base(spec, input_size, weights, alpha)
            base.trainable = False
            loaded = [w.copy() for w in base.get_weights()]
        self._built[key] = (base, loaded)  # newest last
        while len(self._built) > self.size:
            self._built.pop(next(iter(self._built)))
        return base


def _build_imagenet(spec: BackboneSpec, what: str, kwargs: dict) -> keras.Model:
    """Build with Keras's cached (or downloaded) ImageNet file; offline and uncached is a WeightsError."""
    try:
        with _keras_home_from_env():
            return _construct(spec, weights="imagenet", **kwargs)
    except Exception as exc:  # Keras raises a bare Exception when the download fails.
        origin = re.search(r"URL fetch failure on (\S+?): ", str(exc))
        if origin is None:
            if isinstance(exc, (OSError, ValueError)):  # h5py on a cut or garbled file
                reason = " ".join(str(exc).split())[:200]
                raise WeightsError(
                    f"{what}: its ImageNet weights file in {_keras_models_dir()} is damaged "
                    f"({reason}); delete it there so that Keras downloads it again, or pass "
                    "--weights PATH") from None
            raise
    fname = os.path.basename(urllib.parse.urlsplit(origin.group(1)).path)
    raise WeightsError(
        f"{what}: ImageNet weights file {fname} is not in {_keras_models_dir()} and cannot be "
        "downloaded; put it in $KERAS_HOME/models/ (see ../shared/weights/make_keras_home.sh) "
        "or pass --weights PATH"
    )


def _construct(spec: BackboneSpec, **kwargs) -> keras.Model:
    """Call the Keras constructor, silencing its warning about sizes we accept on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*will be loaded as the default", category=UserWarning)
        return getattr(keras.applications, spec.constructor)(**kwargs)


def _check_alpha(spec: BackboneSpec, alpha: float | None) -> float | None:
    if not spec.alphas:
        if alpha is not None:
            raise UsageError(f"alpha {alpha}: {spec.name} has no width multiplier; leave alpha unset")
        return None
    if alpha is None:
        return spec.default_alpha
    if alpha not in spec.alphas:
        raise UsageError(f"alpha {alpha} for {spec.name}: choose one of {', '.join(map(str, spec.alphas))}")
    return alpha


def _describe(spec: BackboneSpec, alpha: float | None, size: int) -> str:
    return f"{spec.name} alpha {alpha} at {size} px" if alpha is not None else f"{spec.name} at {size} px"


@contextlib.contextmanager
def _keras_home_from_env():
    """Honour the KERAS_HOME of now: Keras reads it once, when it is imported."""
    saved = _keras_config._KERAS_DIR
    _keras_config._KERAS_DIR = os.environ.get("KERAS_HOME", saved)
    try:
        yield
    finally:
        _keras_config._KERAS_DIR = saved


def _keras_models_dir() -> Path:
    """Where Keras's `get_file` caches weights; like Keras, fall back to /tmp/.keras when home is not writable."""
    home = os.path.expanduser(os.environ.get("KERAS_HOME", _keras_config.keras_home()))
    if not os.access(home, os.W_OK):
        home = os.path.join("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir(), ".keras")
    return Path(home) / "models"


def first_trainable(base: keras.Model, spec: BackboneSpec, freeze_block: int) -> int:
    """Index in `base.layers` of the first layer stage 2 trains at this freeze depth."""
    points = spec.freeze_points(base)
    if not 0 <= freeze_block <= len(points):
        raise UsageError(f"freeze_block {freeze_block} for {spec.name}: choose 0..{len(points)}")
    return points[freeze_block - 1] if freeze_block else 0


def set_freeze(base: keras.Model, spec: BackboneSpec, freeze_block: int) -> int:
    """Unfreeze `base` for stage 2, keeping its first `freeze_block` blocks frozen.

    The blocks are the stem (layers before the first freeze point) and the layers from each
    freeze point to the next. `freeze_block = 0` trains the whole backbone; `freeze_block = k`
    (1 <= k <= len(points)) freezes every layer before `points[k - 1]`, so `k = len(points)` trains
    only the last block. BatchNormalization layers stay frozen everywhere: on small datasets
    their statistics would drift. Returns the index of the first trainable layer.
    """
    first = first_trainable(base, spec, freeze_block)
    base.trainable = True
    for i, layer in enumerate(base.layers):
        layer.trainable = i >= first and not isinstance(layer, keras.layers.BatchNormalization)
    log.debug("%s: freeze_block %d, layers from %d (%s) train", spec.name, freeze_block, first,
              base.layers[first].name)
    return first


def count_params(model: keras.Model) -> tuple[int, int]:
    """(trainable, total) parameter counts, BatchNormalization statistics included in the total."""
    def size(weights) -> int:
        return sum(math.prod(w.shape) for w in weights)

    return size(model.trainable_weights), size(model.weights)
