"""personclf-tune: transfer learning and hyperparameter search for person classifiers."""

import os as _os
import platform as _platform
import sys as _sys

__version__ = "0.1.0"

# oneDNN's CPU kernels on x86. TensorFlow turns them on by itself only on CPUs with AVX-512
# VNNI or BF16, AVX-VNNI or AMX; elsewhere (an AVX2 AMD EPYC here) its Eigen kernels compute the
# backward pass of MobileNetV2's 1x1 convolutions about 4x slower than their forward pass, and
# training the layers above the freeze point, most of a cached trial, takes 1.3x as long.
# TensorFlow reads the variable when it loads, so it is set here, before any module of the
# package imports it. A value the user set wins (TF_ENABLE_ONEDNN_OPTS=0 turns them off), and
# nothing changes when TensorFlow was imported first.
if "tensorflow" not in _sys.modules and _platform.machine().lower() in ("x86_64", "amd64"):
    _os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
