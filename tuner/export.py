"""Export a run's best model to every deployment format, check each against Keras, write a manifest.

- One table of formats (`FORMATS`) drives everything: what `--formats` accepts, what is built,
  what parity runs, and what the manifest lists. A new format is one row and one function.
- Preprocessing is inside the model, so every format takes raw RGB 0..255, and the int8 model
  takes camera pixels directly (uint8 input, scale 1, zero point 0: checked, not assumed).
- int8 calibration uses a class-stratified sample of TRAINING images plus synthetic all-black,
  all-white and ramp frames, so the quantised input range is the real 0..255. (The origin
  calibrated on its Unknown folder only; a set that never reaches 255 saturates bright pixels.)
- Parity: every format this machine can run is evaluated on the test split against the Keras
  model. Below `min_agreement` the export is still kept, for inspection, but reported as failed.
- Edge TPU: compiled when `edgetpu_compiler` is installed; always checked offline against
  Coral's list of supported operations, so a CPU fallback shows up before any device does.
- Everything is written into a staging folder that replaces `RUN/export` only when complete.
"""
from __future__ import annotations

import ctypes
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from . import quiet
from .config import refuse_inside_dataset
from .errors import TunerError, UsageError

log = logging.getLogger(__name__)

EXPORT_DIR = "export"
MANIFEST = "manifest.json"
LABELS = "labels.txt"
SCHEMA_VERSION = 1
DEFAULT_MIN_AGREEMENT = 0.97
DEFAULT_CALIBRATION_IMAGES = 200
# How int8 weights are rounded: "adaptive" (tuner.quantize: each weight's direction chosen to
# minimise its layer's output error on the calibration images) or "nearest" (the converter's).
WEIGHT_ROUNDINGS = ("adaptive", "nearest")
LATENCY_IMAGES = 20  # single-image runs timed per format (after one warm-up run)
EDGETPU_COMPILER = "edgetpu_compiler"
EDGETPU_LOG = "edgetpu_compiler.log"
EDGETPU_RUNTIME = "libedgetpu.so.1"
SYNTHETIC_FRAMES = ("black", "white", "ramp")


class ExportError(TunerError):
    """One format could not be built; the others still are, and the export reports failure."""


# ---------------------------------------------------------------------------------------------
# The table of formats.


@dataclass(frozen=True)
class Format:
    """One deployment format: where it goes, what it needs, and the function that builds it."""

    name: str
    path: str  # file or folder name inside the export folder
    tool: str  # the package or executable that builds it
    build: Callable[["_Job", Path], dict]
    requires: tuple[str, ...] = ()  # formats built first (the Edge TPU compiles the int8 file)
    runs_on_cpu: bool = True  # whether parity can run it here
    help: str = ""


def _export_keras(job: "_Job", path: Path) -> dict:
    """The retrained Keras file itself: the reference every other format is compared with."""
    shutil.copyfile(job.run_dir / "best" / "model.keras", path)
    return {"input": _io_spec([1, job.size, job.size, 3], "float32")}


def _export_savedmodel(job: "_Job", path: Path) -> dict:
    """A TensorFlow SavedModel (Keras `model.export`) for TF Serving and TF-only hosts; any batch."""
    job.model.export(str(path), format="tf_saved_model", verbose=False)
    return {"input": _io_spec([None, job.size, job.size, 3], "float32"),
            "signature": "serving_default"}


def _export_tflite_float(job: "_Job", path: Path) -> dict:
    """Float32 TFLite for CPUs (phones, Raspberry Pi): Keras's numbers, no calibration needed."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(job.static_saved_model()))
    with quiet.notes_filtered():
        _write_bytes(path, converter.convert())
    return tflite_info(path)


def _export_tflite_int8(job: "_Job", path: Path) -> dict:
    """Full-integer TFLite: int8 builtin ops only, uint8 pixels in and uint8 probabilities out.

    This is what the Edge TPU compiler accepts, and what a microcontroller-class CPU runs fastest.
    """
    saved_model, rounding = job.int8_saved_model()
    _write_bytes(path, convert_int8(saved_model, job.calibration().images))
    info = tflite_info(path)
    scale, zero_point = info["input"]["scale"], info["input"]["zero_point"]
    if not (abs(scale - 1.0) < 1e-3 and zero_point == 0):
        # Camera pixels would no longer map 1:1 onto the calibrated range.
        raise ExportError(f"int8 input quantisation is scale {scale:g}, zero point {zero_point}; "
                          "expected 1 and 0 (calibration did not span 0..255)")
    return {**info, "weight_rounding": rounding}


def convert_int8(saved_model: Path, images: np.ndarray) -> bytes:
    """A SavedModel as full-integer TFLite (int8 builtin ops, uint8 in and out), calibrated on
    `images` (pixels, one at a time as the batch-1 model takes them)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([image[None].astype(np.float32)]
                                                for image in images)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.uint8
    with quiet.notes_filtered():  # it prints its settings ("fully_quantize: 0, ...")
        return converter.convert()


def _export_edgetpu(job: "_Job", path: Path) -> dict:
    """Edge TPU: compile the int8 model when the compiler is installed; always check it offline."""
    int8 = job.out / FORMATS["int8"].path
    info: dict = {"compatibility": check_edgetpu_compatibility(int8)}
    exe = shutil.which(EDGETPU_COMPILER)
    if exe is None:
        info["note"] = (f"{EDGETPU_COMPILER} is not installed: {path.name} not compiled; "
                        "ran the offline Edge TPU compatibility check instead")
        check = info["compatibility"]
        info["status"] = ("not compiled; offline check passed" if check["compatible"] else
                          f"not compiled; offline check: {check['ops_on_cpu_estimate']} "
                          "operations would run on the CPU")
        return info
    info["compiler"] = compile_edgetpu(int8, job.out, exe)
    produced = job.out / f"{int8.stem}_edgetpu.tflite"
    if produced != path and produced.exists():
        os.replace(produced, path)
    return info


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("keras", "model.keras", "keras", _export_keras,
           help="Keras 3 file (loads with safe_mode)"),
    Format("savedmodel", "saved_model", "tensorflow", _export_savedmodel,
           help="TensorFlow SavedModel, any batch size"),
    Format("tflite", "model_float32.tflite", "tensorflow.lite", _export_tflite_float,
           help="float32 TFLite, batch 1"),
    Format("int8", "model_int8.tflite", "tensorflow.lite", _export_tflite_int8,
           help="full-integer TFLite, uint8 in/out, int8 builtin ops only"),
    Format("edgetpu", "model_int8_edgetpu.tflite", EDGETPU_COMPILER, _export_edgetpu,
           requires=("int8",), runs_on_cpu=False,
           help="int8 compiled for the Coral Edge TPU (offline check when no compiler)"),
)}
FORMAT_NAMES = tuple(FORMATS)


def resolve_formats(names) -> list[str]:
    """Requested names plus what they need, in table order."""
    names = list(names or FORMAT_NAMES)
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise UsageError(f"--formats {', '.join(unknown)}: choose from {', '.join(FORMAT_NAMES)}")
    wanted = set(names)
    for name in names:
        wanted.update(FORMATS[name].requires)
    return [n for n in FORMAT_NAMES if n in wanted]


# ---------------------------------------------------------------------------------------------
# Calibration.


@dataclass
class Calibration:
    """Images the int8 converter calibrates on (uint8), and what the manifest says about them."""

    images: np.ndarray
    info: dict


def calibration_sample(split_df: pd.DataFrame, classes: list[str], n: int,
                       seed: int = 0) -> pd.DataFrame:
    """A class-stratified sample of the TRAINING split: up to ceil(n / classes) per class."""
    train = split_df[split_df["split"] == "train"].sort_values("path")
    per_class = max(1, math.ceil(n / max(len(classes), 1)))
    parts = [rows.sample(min(len(rows), per_class), random_state=seed)
             for _, rows in train.groupby("label", sort=True)]
    if not parts:
        return train.iloc[:0]
    return pd.concat(parts).sort_values(["label", "path"]).reset_index(drop=True)


def synthetic_frames(size: int) -> np.ndarray:
    """All-black, all-white and a 0..255 ramp: the extremes a camera produces and photos may not."""
    ramp = np.broadcast_to(np.linspace(0, 255, size).round().astype(np.uint8)[None, :, None],
                           (size, size, 3))
    return np.stack([np.zeros((size, size, 3), np.uint8),
                     np.full((size, size, 3), 255, np.uint8), ramp])


def build_calibration(split_df: pd.DataFrame, data_dir: Path, classes: list[str], size: int,
                      n: int = DEFAULT_CALIBRATION_IMAGES, seed: int = 0) -> Calibration:
    """Decode the stratified sample, check each image, and add the synthetic extremes."""
    from .pipeline import decode_many

    rows = calibration_sample(split_df, classes, n, seed)
    if rows.empty:
        raise UsageError("int8 calibration needs training images and split.csv has none")
    real = decode_many([Path(data_dir) / p for p in rows["path"]], size)
    if real.dtype != np.uint8 or real.shape[1:] != (size, size, 3):
        raise ExportError(f"calibration images decoded as {real.dtype} {real.shape[1:]}, "
                          f"expected uint8 ({size}, {size}, 3)")
    flat = real.reshape(len(real), -1)
    per_max, per_min = flat.max(axis=1), flat.min(axis=1)
    images = np.concatenate([real, synthetic_frames(size)])
    info = {
        "split": "train",
        "images": int(len(real)),
        "per_class": {str(k): int(v) for k, v in rows["label"].value_counts().sort_index().items()},
        "missing_classes": sorted(set(classes) - set(rows["label"])),
        "synthetic": list(SYNTHETIC_FRAMES),
        "min": int(images.min()),
        "max": int(images.max()),
        "real_min": int(per_min.min()),
        "real_max": int(per_max.max()),
        "real_reaching_255": int((per_max == 255).sum()),
        "real_reaching_0": int((per_min == 0).sum()),
        "seed": seed,
    }
    if info["min"] != 0 or info["max"] != 255:
        raise ExportError(f"calibration covers {info['min']}..{info['max']}, not 0..255")
    return Calibration(images, info)


# ---------------------------------------------------------------------------------------------
# Running any exported format (parity here, `predict` in deploy.py).


class Runner:
    """Class probabilities from uint8 (N, S, S, 3) images, whatever the format."""

    format = ""
    input_size = 0

    def predict(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def latency_ms(self, images: np.ndarray) -> float:
        """Median wall time of single-image runs (after one warm-up run)."""
        if not len(images):
            return float("nan")
        self.predict(images[:1])
        times = []
        for image in images:
            start = time.perf_counter()
            self.predict(image[None])
            times.append((time.perf_counter() - start) * 1000)
        return float(np.median(times))


class KerasRunner(Runner):
    format = "keras"

    def __init__(self, path: Path | None = None, model=None):
        from .best import load_keras_model

        self.model = model if model is not None else load_keras_model(path)
        self.input_size = int(self.model.input_shape[1])
        self._single = None

    def predict(self, images: np.ndarray) -> np.ndarray:
        if len(images) == 1:  # model.predict's per-call set-up dominates a single image
            return self._predict_one(images)
        from .best import predict_probs

        return predict_probs(self.model, images)

    def _predict_one(self, images: np.ndarray) -> np.ndarray:
        """One image through a graph traced once (an eager call costs ~100x the maths)."""
        import tensorflow as tf

        if self._single is None:
            spec = tf.TensorSpec((1, self.input_size, self.input_size, 3), tf.float32)
            self._single = tf.function(lambda x: self.model(x, training=False),
                                       input_signature=[spec])
        return self._single(tf.constant(images.astype(np.float32))).numpy()


class SavedModelRunner(Runner):
    format = "savedmodel"

    def __init__(self, path: Path):
        import tensorflow as tf

        self._tf = tf
        loaded = tf.saved_model.load(str(path))
        self._loaded = loaded  # keep the object (and its variables) alive
        self.fn = loaded.signatures["serving_default"]
        spec = list(self.fn.structured_input_signature[1].values())[0]
        self.input_size = int(spec.shape[1])

    def predict(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        outs = []
        for i in range(0, len(images), batch_size):
            result = self.fn(self._tf.constant(images[i:i + batch_size].astype(np.float32)))
            outs.append(next(iter(result.values())).numpy())
        return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


class TFLiteRunner(Runner):
    """Any .tflite file; an Edge TPU-compiled one needs libedgetpu and a connected Edge TPU."""

    def __init__(self, path: Path, num_threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter, load_delegate

        path = Path(path)
        delegates = []
        edgetpu = path.name.endswith("_edgetpu.tflite")
        if edgetpu:
            try:
                ctypes.CDLL(EDGETPU_RUNTIME)  # load_delegate's own failure path is noisy
                delegates = [load_delegate(EDGETPU_RUNTIME)]
            except (ValueError, OSError, RuntimeError) as exc:
                raise UsageError(f"{path}: an Edge TPU model needs the Edge TPU runtime "
                                 f"(libedgetpu) and a connected Edge TPU ({exc}); run the "
                                 "int8 model (model_int8.tflite) on the CPU instead") from None
        with quiet.notes_filtered():  # "Created TensorFlow Lite XNNPACK delegate for CPU."
            self.interpreter = Interpreter(model_path=str(path), num_threads=num_threads,
                                           experimental_delegates=delegates or None)
            self.interpreter.allocate_tensors()
        self.inp = self.interpreter.get_input_details()[0]
        self.out = self.interpreter.get_output_details()[0]
        quantized = self.inp["dtype"] in (np.uint8, np.int8)
        self.format = "edgetpu" if edgetpu else "int8" if quantized else "tflite"
        self.input_size = int(self.inp["shape"][1])

    def predict(self, images: np.ndarray) -> np.ndarray:
        probs = []
        for image in images:
            self.interpreter.set_tensor(self.inp["index"], self._quantize(image[None]))
            self.interpreter.invoke()
            probs.append(self._dequantize(self.interpreter.get_tensor(self.out["index"])[0]))
        return np.stack(probs) if probs else np.zeros((0, int(self.out["shape"][-1])), np.float32)

    def _quantize(self, x: np.ndarray) -> np.ndarray:
        dtype = self.inp["dtype"]
        scale, zero_point = self.inp["quantization"]
        if dtype == np.float32:
            return x.astype(np.float32)
        if dtype == np.uint8 and abs(scale - 1.0) < 1e-6 and zero_point == 0:
            return x.astype(np.uint8)  # camera pixels as they are
        info = np.iinfo(dtype)
        q = np.round(x.astype(np.float32) / scale + zero_point)
        return np.clip(q, info.min, info.max).astype(dtype)

    def _dequantize(self, y: np.ndarray) -> np.ndarray:
        scale, zero_point = self.out["quantization"]
        if self.out["dtype"] == np.float32 or not scale:
            return y.astype(np.float32)
        return ((y.astype(np.float32) - zero_point) * scale).astype(np.float32)


def open_model(path: Path, num_threads: int | None = None) -> Runner:
    """A runner for a .keras file, a SavedModel folder or a .tflite file."""
    path = Path(path)
    if path.is_dir() and (path / "saved_model.pb").is_file():
        return SavedModelRunner(path)
    if path.suffix == ".keras" and path.is_file():
        return KerasRunner(path)
    if path.suffix == ".tflite" and path.is_file():
        return TFLiteRunner(path, num_threads=num_threads)
    raise UsageError(f"{path}: not a model file; give a .keras or .tflite file or a SavedModel "
                     "folder (e.g. RUN/export/model_int8.tflite)")


# ---------------------------------------------------------------------------------------------
# TFLite inspection and the Edge TPU.

# Coral, "TensorFlow models on the Edge TPU", supported operations (TFLite builtin names).
# Ops outside this set run on the CPU, and with them every op after them in the graph.
# Checked (2026-11-28) against the copies of that table reachable offline: Add..ResizeBilinear
# as Axis reproduces it for the ARTPEC-7's Edge TPU, the rest against Coral's 2019 table and
# release notes (EXPAND_DIMS, PACK, QUANTIZE, SUM, TRANSPOSE_CONV need runtime 13; TRANSPOSE
# compiler 16). RSQRT and SQUARED_DIFFERENCE could not be confirmed there.
EDGETPU_OPS = {
    "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "EXPAND_DIMS",
    "FULLY_CONNECTED", "L2_NORMALIZATION", "LOGISTIC", "LSTM", "UNIDIRECTIONAL_SEQUENCE_LSTM",
    "MAXIMUM", "MAX_POOL_2D", "MEAN", "MINIMUM", "MUL", "PACK", "PAD", "PRELU", "QUANTIZE",
    "REDUCE_MAX", "REDUCE_MIN", "RELU", "RELU6", "RELU_N1_TO_1", "RESHAPE", "RESIZE_BILINEAR",
    "RESIZE_NEAREST_NEIGHBOR", "RSQRT", "SLICE", "SOFTMAX", "SPACE_TO_DEPTH", "SPLIT", "SQUEEZE",
    "STRIDED_SLICE", "SUB", "SUM", "SQUARED_DIFFERENCE", "TANH", "TRANSPOSE", "TRANSPOSE_CONV",
}
# Supported only by newer compilers: older ones leave them on the CPU.
EDGETPU_NEWER_OPS = {
    "REDUCE_MAX": "older Edge TPU compilers (the origin's NASNetLarge export) leave it on the CPU",
    "REDUCE_MIN": "older Edge TPU compilers leave it on the CPU",
}
_INT8_TYPES = (np.int8, np.uint8)


def _interpreter(path: Path):
    """An interpreter without the default XNNPACK delegate, so the op list is the file's."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(
        model_path=str(path),
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    return interpreter


def tflite_info(path: Path) -> dict:
    """Input and output shape, dtype and quantisation, and op counts, of a .tflite file."""
    interpreter = _interpreter(path)

    def spec(detail: dict) -> dict:
        scale, zero_point = detail["quantization"]
        return {**_io_spec([int(v) for v in detail["shape_signature"]],
                           np.dtype(detail["dtype"]).name),
                "scale": float(scale), "zero_point": int(zero_point)}

    ops = Counter(op["op_name"] for op in interpreter._get_ops_details())
    return {"input": spec(interpreter.get_input_details()[0]),
            "output": spec(interpreter.get_output_details()[0]),
            "ops": dict(sorted(ops.items()))}


def check_edgetpu_compatibility(path: Path) -> dict:
    """What the Edge TPU compiler would leave on the CPU, judged from the file alone.

    Coral's requirements: only supported operations; 8-bit tensors (int32 only for constant
    biases and shapes); sizes constant at compile time; tensors 1-, 2- or 3-dimensional, or,
    with more dimensions, only the 3 innermost larger than 1. The compiler maps ops in graph order
    up to the first one it cannot, so that op and every op after it count as CPU ops.
    """
    interpreter = _interpreter(path)
    ops = interpreter._get_ops_details()
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    graph_inputs = {d["index"] for d in interpreter.get_input_details()}
    produced = {int(i) for op in ops for i in op["outputs"]}
    activations = produced | graph_inputs
    problems: list[dict] = []
    notes: list[dict] = []

    def problem(op: dict, reason: str) -> None:
        problems.append({"index": int(op["index"]), "op": op["op_name"], "reason": reason})

    for op in ops:
        name = op["op_name"]
        if name not in EDGETPU_OPS:
            problem(op, "operation not supported by the Edge TPU")
        elif name in EDGETPU_NEWER_OPS:
            notes.append({"index": int(op["index"]), "op": name,
                          "note": EDGETPU_NEWER_OPS[name]})
        for i in [int(i) for i in op["inputs"]] + [int(i) for i in op["outputs"]]:
            if i < 0 or i not in tensors:
                continue
            t = tensors[i]
            dtype = np.dtype(t["dtype"])
            shape = [int(v) for v in t["shape_signature"]]
            is_activation = i in activations
            if dtype not in _INT8_TYPES and (is_activation or dtype != np.int32):
                problem(op, f"tensor {t['name']!r} is {dtype.name}, not 8-bit")
            if is_activation and any(v < 0 for v in shape):
                problem(op, f"tensor {t['name']!r} has a dynamic shape {shape}")
            if is_activation and len(shape) > 3 and any(v > 1 for v in shape[:-3]):
                problem(op, f"tensor {t['name']!r} of shape {shape}: over 3 dimensions with an "
                            "outer dimension larger than 1")
        if name == "MEAN":
            axes = _constant(interpreter, tensors, op["inputs"][1])
            rank = len(tensors[int(op["inputs"][0])]["shape"])
            if axes is not None and rank == 4 and not set(np.ravel(axes) % 4) <= {1, 2}:
                problem(op, f"MEAN over axes {np.ravel(axes).tolist()}: only x and y are supported")
        if name == "SOFTMAX":
            size = int(np.prod(tensors[int(op["inputs"][0])]["shape"]))
            if size > 16000:
                problem(op, f"SOFTMAX over {size} elements: at most 16,000 are supported")
    first = min((p["index"] for p in problems), default=None)
    cpu_ops = 0 if first is None else sum(1 for op in ops if op["index"] >= first)
    return {
        "compatible": not problems,
        "ops": dict(sorted(Counter(op["op_name"] for op in ops).items())),
        "total_operations": len(ops),
        "ops_on_edgetpu_estimate": len(ops) - cpu_ops,
        "ops_on_cpu_estimate": cpu_ops,
        "first_cpu_op": None if first is None else f"{ops[first]['op_name']} (#{first})",
        "problems": problems,
        "notes": notes,
        "checked_against": "Coral 'TensorFlow models on the Edge TPU': supported operations "
                           "and model requirements",
    }


def _constant(interpreter, tensors: dict, index) -> np.ndarray | None:
    try:
        return np.asarray(interpreter.get_tensor(int(index)))
    except (ValueError, KeyError):
        return None


def compile_edgetpu(tflite: Path, out_dir: Path, exe: str | None = None,
                    timeout: int = 600) -> dict:
    """Run edgetpu_compiler (an argument list, no shell), keep its log, parse it."""
    exe = exe or shutil.which(EDGETPU_COMPILER)
    if exe is None:
        raise UsageError(f"{EDGETPU_COMPILER} not found on PATH")
    cmd = [exe, "--show_operations", "--out_dir", str(out_dir), str(tflite)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise ExportError(f"{EDGETPU_COMPILER} did not finish within {timeout} s") from None
    text = proc.stdout + (("\n" + proc.stderr) if proc.stderr else "")
    (Path(out_dir) / EDGETPU_LOG).write_text(text)
    parsed = parse_compiler_log(text)
    parsed["returncode"] = proc.returncode
    parsed["log"] = EDGETPU_LOG
    if proc.returncode != 0 or not parsed.get("compiled"):
        last = next((ln for ln in reversed(text.splitlines()) if ln.strip()), "no output")
        raise ExportError(f"{EDGETPU_COMPILER} failed (exit {proc.returncode}): {last}; "
                          f"see {EDGETPU_LOG}")
    return parsed


_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024 ** 2, "GiB": 1024 ** 3,
          "KB": 1000, "MB": 1000 ** 2, "GB": 1000 ** 3}
_MEMORY_FIELDS = {
    "on_chip_used_bytes": "On-chip memory used for caching model parameters",
    "on_chip_remaining_bytes": "On-chip memory remaining for caching model parameters",
    "on_chip_available_bytes": "On-chip memory available for caching model parameters",
    "off_chip_used_bytes": "Off-chip memory used for streaming uncached model parameters",
}
_COUNT_FIELDS = {
    "subgraphs": "Number of Edge TPU subgraphs",
    "total_operations": "Total number of operations",
    "ops_on_edgetpu": "Number of operations that will run on Edge TPU",
    "ops_on_cpu": "Number of operations that will run on CPU",
}
_OPERATOR_ROW = re.compile(r"^([A-Z][A-Z0-9_]*)\s+(\d+)\s+(\S.*?)\s*$")


def parse_compiler_log(text: str) -> dict:
    """The numbers of an edgetpu_compiler run (its stdout, or its `*_edgetpu.log`).

    Compilers 2.x print the operator table only; 14+ add the memory and operation counts,
    and the on-Edge-TPU / on-CPU counts only when some ops are left on the CPU.
    """
    out: dict = {"compiled": bool(re.search(r"compiled successfully", text, re.I))}
    if m := re.search(r"Edge TPU Compiler version (\S+)", text):
        out["compiler_version"] = m.group(1)
    for key, label in (("input_model", r"Input(?: model)?"), ("output_model", r"Output(?: model)?")):
        if m := re.search(rf"^{label}:\s*(.+?)\s*$", text, re.M):
            out[key] = m.group(1)
    for key, label in _MEMORY_FIELDS.items():
        if m := re.search(rf"{re.escape(label)}:\s*([\d.]+)\s*([KMG]?i?B)", text):
            out[key] = int(round(float(m.group(1)) * _UNITS.get(m.group(2), 1)))
    for key, label in _COUNT_FIELDS.items():
        if m := re.search(rf"{re.escape(label)}:\s*(\d+)", text):
            out[key] = int(m.group(1))
    operators = []
    in_table = False
    for line in text.splitlines():
        if re.match(r"^Operator\s+Count\s+Status", line):
            in_table = True
            continue
        if in_table and (m := _OPERATOR_ROW.match(line)):
            status = m.group(3)
            operators.append({"op": m.group(1), "count": int(m.group(2)), "status": status,
                              "on_edgetpu": status.startswith("Mapped to Edge TPU")})
    out["operators"] = operators
    if operators:
        on_tpu = sum(o["count"] for o in operators if o["on_edgetpu"])
        on_cpu = sum(o["count"] for o in operators if not o["on_edgetpu"])
        all_listed = not re.search(r"All other operators were mapped", text)
        out.setdefault("ops_on_cpu", on_cpu)
        if all_listed:
            out.setdefault("ops_on_edgetpu", on_tpu)
    if "total_operations" in out:
        out.setdefault("ops_on_cpu", 0)
        out.setdefault("ops_on_edgetpu", out["total_operations"] - out["ops_on_cpu"])
    out["cpu_operators"] = sorted({o["op"] for o in operators if not o["on_edgetpu"]})
    return out


# ---------------------------------------------------------------------------------------------
# The export of one run.


@dataclass
class _Job:
    """What every format function may use; expensive parts are made on first use."""

    run_dir: Path
    out: Path
    model: object
    size: int
    split: pd.DataFrame
    data_dir: Path
    classes: list[str]
    calibration_images: int
    weight_rounding: str = WEIGHT_ROUNDINGS[0]
    _static: Path | None = None
    _calibration: Calibration | None = None
    _int8_model: tuple[Path, dict] | None = None

    def static_saved_model(self) -> Path:
        """A batch-1 SavedModel: the TFLite converters' input (the Edge TPU needs static shapes)."""
        if self._static is None:
            self._static = self._export_static(self.model, self.out / ".static_saved_model")
        return self._static

    def int8_saved_model(self) -> tuple[Path, dict]:
        """The static SavedModel the int8 converter starts from, and how its weights were
        rounded: with "adaptive", a copy of the model whose kernels already sit on the int8 grid
        (tuner.quantize); the other formats keep the trained weights."""
        if self._int8_model is None:
            if self.weight_rounding == "nearest":
                self._int8_model = self.static_saved_model(), {"method": "nearest"}
            else:
                from .best import load_keras_model
                from .quantize import round_weights

                model = load_keras_model(self.run_dir / "best" / "model.keras")
                calibration = self.calibration()
                try:
                    info = round_weights(model, calibration.images[:calibration.info["images"]])
                except Exception as exc:  # noqa: BLE001 - an optimisation must not cost the file
                    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    log.warning("adaptive int8 weight rounding failed (%s); rounding to nearest",
                                reason)
                    self._int8_model = self.static_saved_model(), {"method": "nearest",
                                                                   "adaptive_failed": reason}
                    return self._int8_model
                self._int8_model = (self._export_static(model, self.out / ".int8_saved_model"),
                                    info)
        return self._int8_model

    def _export_static(self, model, path: Path) -> Path:
        import tensorflow as tf

        spec = tf.TensorSpec((1, self.size, self.size, 3), tf.float32, name="image")
        model.export(str(path), format="tf_saved_model", input_signature=[spec], verbose=False)
        return path

    def calibration(self) -> Calibration:
        if self._calibration is None:
            self._calibration = build_calibration(self.split, self.data_dir, self.classes,
                                                  self.size, self.calibration_images)
        return self._calibration

    def cleanup(self) -> None:
        for path in (self._static, self._int8_model and self._int8_model[0]):
            if path:
                shutil.rmtree(path, ignore_errors=True)


@dataclass
class ExportResult:
    """Where the export went, its manifest, and why it failed (empty when it did not)."""

    out_dir: Path
    manifest: dict
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def table(self) -> str:
        return format_table(self.manifest)


def export_run(run_dir: Path, formats=None, *, min_agreement: float = DEFAULT_MIN_AGREEMENT,
               calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
               weight_rounding: str = WEIGHT_ROUNDINGS[0],
               data_dir: Path | None = None, out_dir: Path | None = None,
               num_threads: int | None = 1) -> ExportResult:
    """Export RUN/best to `formats` (default: all) in RUN/export, check parity, write the manifest.

    Returns an `ExportResult`; `result.ok` is False when a format failed to build or a format's
    top-1 agreement with Keras on the test split is below `min_agreement` (the files stay in
    place for inspection). Raises `UsageError` when the run cannot be exported at all.
    """
    from .best import input_size, load_keras_model, load_manifest
    from .data import read_split

    run_dir = Path(run_dir)
    names = resolve_formats(formats)
    if not 0.0 <= min_agreement <= 1.0:  # a fraction: 97 (meant as %) would fail every format
        raise UsageError(f"--min-agreement {min_agreement:g}: a fraction of the test photos, "
                         "between 0 and 1 (e.g. 0.97)")
    if calibration_images < 1:
        raise UsageError(f"--calibration-images {calibration_images}: must be at least 1")
    if weight_rounding not in WEIGHT_ROUNDINGS:
        raise UsageError(f"--weight-rounding {weight_rounding}: choose one of "
                         f"{', '.join(WEIGHT_ROUNDINGS)}")
    best_dir = run_dir / "best"
    best = load_manifest(best_dir)
    model = load_keras_model(best_dir / "model.keras")
    data_dir = Path(data_dir) if data_dir else _data_dir(run_dir)
    split_path = run_dir / "split.csv"
    if not split_path.is_file():
        raise UsageError(f"{run_dir}: no split.csv; export needs the run directory of a search")
    split_df = read_split(split_path, data_dir)
    classes = list(best["classes"])
    size = input_size(best, best_dir / MANIFEST)

    final = Path(out_dir) if out_dir else run_dir / EXPORT_DIR
    _check_export_target(final, run_dir, data_dir, chosen=out_dir is not None)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    job = _Job(run_dir, staging, model, size, split_df, data_dir, classes, calibration_images,
               weight_rounding)
    try:
        entries, failures = _build_formats(job, names)
        job.cleanup()
        parity, parity_failures = _parity(job, entries, best, min_agreement, num_threads)
        failures += parity_failures
        (staging / LABELS).write_text("\n".join(classes) + "\n")
        manifest = _manifest(job, best, entries, parity, failures, min_agreement)
        _write_manifest(staging, manifest)
        _swap_into_place(staging, final)
    finally:
        job.cleanup()
        shutil.rmtree(staging, ignore_errors=True)
    for line in failures:
        log.warning("export: %s", line)
    return ExportResult(final, manifest, failures)


def _build_formats(job: _Job, names: list[str]) -> tuple[dict[str, dict], list[str]]:
    entries: dict[str, dict] = {}
    failures: list[str] = []
    for name in names:
        fmt = FORMATS[name]
        path = job.out / fmt.path
        entry: dict = {"file": fmt.path, "tool": fmt.tool, "description": fmt.help}
        missing = [r for r in fmt.requires if entries.get(r, {}).get("status") != "ok"]
        if missing:
            entry["status"] = f"skipped: needs {', '.join(missing)}"
            failures.append(f"{name}: {entry['status']}")
            entries[name] = entry
            continue
        start = time.perf_counter()
        try:
            entry.update(fmt.build(job, path))
            entry.setdefault("status", "ok")
        except (ExportError, UsageError) as exc:
            entry["status"] = f"failed: {exc}"
            failures.append(f"{name}: {exc}")
        except Exception as exc:  # noqa: BLE001 - a converter's crash fails this format only
            entry["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            failures.append(f"{name}: {entry['status'][8:]}")
            log.debug("export %s failed", name, exc_info=True)
        entry["seconds"] = round(time.perf_counter() - start, 1)
        if path.exists() and not entry["status"].startswith("failed"):
            entry["size_bytes"] = _size(path)
        else:
            entry["file"] = None
        entries[name] = entry
    return entries, failures


def _parity(job: _Job, entries: dict[str, dict], best: dict, min_agreement: float,
            num_threads: int | None) -> tuple[dict, list[str]]:
    """Each runnable format against the Keras model on the test split."""
    from .pipeline import decode_many
    from .report import evaluate_predictions

    rows = job.split[job.split["split"] == "test"].sort_values("path").reset_index(drop=True)
    index = {c: i for i, c in enumerate(job.classes)}
    rows = rows[rows["label"].isin(index)]
    failures: list[str] = []
    parity = {"split": "test", "n": int(len(rows)), "min_agreement": min_agreement}
    if rows.empty:
        failures.append("parity: the test split has no images of the model's classes")
        return parity, failures
    x = decode_many([job.data_dir / p for p in rows["path"]], job.size)
    y = np.array([index[label] for label in rows["label"]], dtype=np.int32)
    reference = KerasRunner(model=job.model).predict(x)
    ref_top1 = reference.argmax(axis=1)
    threshold = float(best.get("threshold", 0.0))
    unknown = best.get("unknown_label", "Unknown")
    ref_accuracy = float(evaluate_predictions(y, reference, job.classes, threshold=threshold,
                                              unknown=unknown)["accuracy"])
    for name, entry in entries.items():
        fmt = FORMATS[name]
        if entry.get("status") != "ok" or not entry.get("file") or not fmt.runs_on_cpu:
            continue
        runner = open_model(job.out / fmt.path, num_threads=num_threads)
        probs = runner.predict(x)
        ev = evaluate_predictions(y, probs, job.classes, threshold=threshold, unknown=unknown)
        top1 = probs.argmax(axis=1)
        same = top1 == ref_top1
        agreement = float(same.mean())
        interval = agreement_interval(int(same.sum()), len(same))
        entry["metrics"] = {
            "accuracy": float(ev["accuracy"]),
            "balanced_accuracy": float(ev["balanced_accuracy"]),
            "top1_accuracy": float((top1 == y).mean()),
            "agreement": agreement,
            "agreement_ci95": interval,
            "max_probability_difference": float(np.abs(probs - reference).max()),
            # per photo, the largest change of any class's probability; averaged
            "mean_probability_difference": float(np.abs(probs - reference).max(axis=1).mean()),
            "latency_ms": round(runner.latency_ms(x[:LATENCY_IMAGES]), 3),
        }
        # The disagreements, for inspection: often near-ties in the Keras model, which
        # `keras_margin` shows (Keras's probability of its class minus that of this format's).
        differ = np.flatnonzero(~same)
        margins = reference[differ, ref_top1[differ]] - reference[differ, top1[differ]]
        entry["metrics"]["disagreements"] = int(len(differ))
        if len(differ):
            entry["metrics"].update(disagreement_keras_margin_median=float(np.median(margins)),
                                    disagreement_keras_margin_max=float(margins.max()))
        entry["disagreements"] = [
            {"path": rows["path"].iloc[i], "keras": job.classes[ref_top1[i]],
             "keras_probability": float(reference[i, ref_top1[i]]),
             name: job.classes[top1[i]], f"{name}_probability": float(probs[i, top1[i]]),
             "keras_margin": float(margin)}
            for i, margin in zip(differ[:20], margins[:20])]
        if agreement < min_agreement:
            # The accuracies side by side: what a user weighs before passing --min-agreement.
            failures.append(f"{name}: top-1 agreement with Keras {agreement:.4f} is below "
                            f"--min-agreement {min_agreement:g} (95% interval {interval[0]:.3f}"
                            f"-{interval[1]:.3f} on {len(same)} photos; accuracy "
                            f"{entry['metrics']['accuracy']:.4f} against Keras's "
                            f"{ref_accuracy:.4f}; files kept for inspection)")
    parity["passed"] = not failures
    return parity, failures


def agreement_interval(agreeing: int, n: int) -> list[float]:
    """95% Wilson interval of a top-1 agreement measured on `n` photos. On a few hundred test
    photos it is several points wide (lfw: 283 of 294 gives 0.934-0.979), which a reader of a
    0.97 gate needs to know: its verdict can rest on two or three photos."""
    from scipy.stats import binomtest

    ci = binomtest(agreeing, n).proportion_ci(confidence_level=0.95, method="wilson")
    return [round(float(ci.low), 4), round(float(ci.high), 4)]


def _manifest(job: _Job, best: dict, entries: dict, parity: dict, failures: list[str],
              min_agreement: float) -> dict:
    best_sha = sha256_file(job.run_dir / "best" / MANIFEST)
    parity = {**parity, "passed": not failures, "failures": list(failures)}
    calibration = job._calibration.info if job._calibration is not None else None
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "personclf-tune export",
        "classes": list(job.classes),
        "unknown_label": best.get("unknown_label", "Unknown"),
        "threshold": float(best.get("threshold", 0.0)),
        "input": {"size": job.size, "range": "raw RGB 0..255 (preprocessing is inside the model)"},
        "formats": entries,
        "calibration": calibration,
        "parity": parity,
        "metrics": best.get("metrics", {}),
        "hyperparameters": best.get("hyperparameters", {}),
        "source": {"run": str(job.run_dir.resolve()),
                   "trial": best.get("source", {}).get("trial"),
                   "best_manifest_sha256": best_sha},
        "versions": _versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _write_manifest(folder: Path, manifest: dict) -> None:
    """Hash every file (the manifest lists them all) and write the manifest last."""
    from .data import write_json

    manifest["files"] = {rel: sha256_file(folder / rel) for rel in _files(folder)}
    write_json(manifest, folder / MANIFEST)


def _check_export_target(final: Path, run_dir: Path, data_dir: Path, chosen: bool) -> None:
    """The export replaces `final` whole, so a `chosen` one (--output) must be new, empty or an
    earlier export: never the run (or a folder holding it), the dataset, or a folder of the
    user's own files. RUN/export, the default, is the run's own."""
    real = Path(os.path.realpath(final))
    if Path(os.path.realpath(run_dir)).is_relative_to(real):
        raise UsageError(f"--output {final}: would replace the run directory {run_dir}; give a "
                         "new folder")
    refuse_inside_dataset("--output", final, data_dir)
    if final.exists() and not final.is_dir():
        raise UsageError(f"--output {final}: is a file; give a folder")
    if chosen and final.is_dir() and any(final.iterdir()):
        try:
            kind = json.loads((final / MANIFEST).read_text()).get("kind")
        except (OSError, ValueError, AttributeError, RecursionError):
            kind = None
        if kind != "personclf-tune export":
            raise UsageError(f"--output {final}: a folder that holds other files, not an earlier "
                             "export; an export replaces its folder whole, so give a new or "
                             "empty one")


def _swap_into_place(staging: Path, final: Path) -> None:
    """Replace `final` by the complete staging folder (renames only, same file system)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _data_dir(run_dir: Path) -> Path:
    from .search import saved_data_dir

    data_dir = saved_data_dir(run_dir)
    if data_dir is None:
        raise UsageError(f"{run_dir}: no config.json naming the dataset; pass --data DIR (the "
                         "dataset folder)")
    if not data_dir.is_dir():
        raise UsageError(f"{data_dir} (the run's dataset folder) is gone; pass --data DIR")
    return data_dir


def _files(folder: Path) -> list[str]:
    """Relative paths of every file under `folder` except the manifest, sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (models can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _io_spec(shape, dtype: str) -> dict:
    return {"shape": [None if v is None or v < 0 else int(v) for v in shape], "dtype": dtype}


def _versions() -> dict:
    from importlib import metadata

    from .best import runtime_versions

    versions = runtime_versions()
    try:
        versions["ai_edge_litert"] = metadata.version("ai-edge-litert")
    except metadata.PackageNotFoundError:
        pass
    exe = shutil.which(EDGETPU_COMPILER)
    if exe:
        try:
            out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
            versions[EDGETPU_COMPILER] = (out.stdout or out.stderr).strip().splitlines()[-1]
        except (OSError, subprocess.SubprocessError, IndexError):
            versions[EDGETPU_COMPILER] = "unknown"
    return versions


# ---------------------------------------------------------------------------------------------
# Printing and the command line.


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_table(manifest: dict) -> str:
    """format | file | size | accuracy | agreement | latency ms | status."""
    from tabulate import tabulate

    rows = []
    parity = manifest.get("parity", {})
    floor = parity.get("min_agreement")
    for name, e in manifest["formats"].items():
        m = e.get("metrics", {})
        status = e.get("status", "")
        if floor is not None and m.get("agreement") is not None and m["agreement"] < floor:
            status = f"agreement below {floor:g}"  # built, but failed parity
        rows.append([name, e.get("file") or "-", human_size(e.get("size_bytes")),
                     _num(m.get("accuracy")), _num(m.get("agreement")),
                     _num(m.get("latency_ms"), ".2f"), status])
    lines = [tabulate(rows, headers=["format", "file", "size", "accuracy", "agreement",
                                     "CPU ms/image", "status"], tablefmt="github"),
             f"test split: {parity.get('n', 0)} images; accuracy includes the Unknown "
             f"threshold {manifest.get('threshold', 0):.3f}; agreement = top-1 equal to Keras"]
    for name, e in manifest["formats"].items():
        m = e.get("metrics", {})
        if m.get("disagreement_keras_margin_max") is not None:
            low, high = m["agreement_ci95"]
            lines.append(f"{name}: {m['disagreements']} of {parity.get('n', 0)} photos "
                         f"disagree with Keras (agreement 95% interval {low:.3f}-{high:.3f}); "
                         "there Keras's own probabilities of the two "
                         f"classes differ by {m['disagreement_keras_margin_median']:.3f} "
                         f"(median), {m['disagreement_keras_margin_max']:.3f} at most")
    rounding = manifest["formats"].get("int8", {}).get("weight_rounding") or {}
    if rounding.get("method") == "adaptive":
        lines.append(f"int8 weights: adaptive rounding, {rounding['flipped_from_nearest']} of "
                     f"{rounding['weights']} weights in {rounding['layers']} layers rounded "
                     f"away from nearest ({rounding['seconds']:.0f} s)")
    elif "adaptive_failed" in rounding:
        lines.append(f"int8 weights: rounded to nearest; adaptive rounding failed "
                     f"({rounding['adaptive_failed']})")
    edgetpu = manifest["formats"].get("edgetpu")
    if edgetpu:
        lines.append(_edgetpu_line(edgetpu))
    return "\n".join(lines)


def _edgetpu_line(entry: dict) -> str:
    if "compiler" in entry:
        c = entry["compiler"]
        return (f"Edge TPU: {c.get('ops_on_edgetpu', '?')} operations on the Edge TPU, "
                f"{c.get('ops_on_cpu', '?')} on the CPU; parameters on chip "
                f"{human_size(c.get('on_chip_used_bytes'))}, off chip "
                f"{human_size(c.get('off_chip_used_bytes'))}")
    check = entry.get("compatibility") or {}
    head = entry.get("note", "Edge TPU")
    if not check:
        return head
    if check.get("compatible"):
        return f"{head}. Offline check: all {check['total_operations']} operations are Edge TPU-compatible"
    reasons = "; ".join(f"{p['op']} #{p['index']}: {p['reason']}" for p in check["problems"][:5])
    return (f"{head}. Offline check: would fall back to the CPU from {check['first_cpu_op']} "
            f"({check['ops_on_cpu_estimate']} of {check['total_operations']} operations): {reasons}")


def _num(value, fmt: str = ".4f") -> str:
    return "-" if value is None else format(value, fmt)


def add_cli(subparsers) -> None:
    """Register `export` on the tool's subcommand parser."""
    p = subparsers.add_parser(
        "export", help="export a run's best model to deployment formats and check parity")
    p.add_argument("run_dir", type=Path, metavar="RUN")
    p.add_argument("--formats", nargs="+", choices=FORMAT_NAMES, default=list(FORMAT_NAMES),
                   metavar="FORMAT",
                   help="formats to build (default: all): " + "; ".join(
                       f"{f.name} = {f.help}" for f in FORMATS.values()))
    p.add_argument("--min-agreement", type=float, default=DEFAULT_MIN_AGREEMENT, metavar="F",
                   help="fail (exit 1, files kept) when a format's top-1 agreement with Keras "
                        f"on the test split is below F (default {DEFAULT_MIN_AGREEMENT})")
    p.add_argument("--calibration-images", type=int, default=DEFAULT_CALIBRATION_IMAGES,
                   metavar="N", help="training images (class-stratified) for int8 calibration")
    p.add_argument("--weight-rounding", choices=WEIGHT_ROUNDINGS, default=WEIGHT_ROUNDINGS[0],
                   help="int8 weights: 'adaptive' rounds each weight the way that minimises its "
                        "layer's output error on the calibration images (default); 'nearest' "
                        "is the converter's plain rounding")
    p.add_argument("--data", type=Path, metavar="DIR",
                   help="the dataset folder, if it moved since the search (default: from "
                        "RUN/config.json)")
    p.add_argument("--output", type=Path, metavar="DIR", help="default: RUN/export")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    result = export_run(args.run_dir, args.formats, min_agreement=args.min_agreement,
                        calibration_images=args.calibration_images,
                        weight_rounding=args.weight_rounding, data_dir=args.data,
                        out_dir=args.output)
    if getattr(args, "json", False):
        print(json.dumps(result.manifest, indent=2))
    else:
        print(result.table())
        for line in result.failures:
            print(f"FAILED {line}")
        print(f"\nwrote {result.out_dir}")
    return 0 if result.ok else 1
