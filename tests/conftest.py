"""Shared fixtures: where the shared datasets and weights are, and a private Keras cache.

`PERSONCLF_SHARED` points at the shared folder (default: `../shared` beside the checkout).
Tests that need it skip with a reason where it is absent (a user's clone); CI always has it.
Nothing is ever written into it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tuner  # noqa: F401  first, as in the CLI: its TensorFlow settings apply before TF loads

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PERSONCLF_SHARED", REPO.parent / "shared")).resolve()


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not found: set PERSONCLF_SHARED to the shared data folder")
    return path


# The search space of the tests that run real searches: MobileNet 0.25 at 96 px (the shared
# weights), learning rates high enough that one epoch moves the head away from uniform
# predictions, so the Unknown threshold and the metrics are not all trivially equal.
TINY_SPACE = """\
backbones:
  MobileNet: {input_size: [96], alpha: [0.25], freeze_block: [6, 12]}
hyperparameters:
  dense_units: {choice: [0, 64]}
  dropout: {float: [0.0, 0.4]}
  lr_stage1: {float: [3.0e-3, 2.0e-2], sampling: log}
  lr_stage2: {float: [1.0e-5, 1.0e-4], sampling: log}
  augment: {choice: [0.0, 0.5]}
  batch_size: 32
"""


@pytest.fixture(scope="session")
def shared() -> Path:
    return _need(SHARED)


@pytest.fixture(scope="session")
def datasets(shared: Path) -> Path:
    return _need(shared / "datasets")


@pytest.fixture(scope="session")
def weights_dir(shared: Path) -> Path:
    return _need(shared / "weights")


@pytest.fixture(scope="session")
def mobilenet_025_weights(weights_dir: Path) -> Path:
    """Genuine ImageNet MobileNet v1 alpha 0.25, no top: the fast backbone for real-data tests."""
    return _need(weights_dir / "mobilenet_2_5_224_tf_no_top.h5")


@pytest.fixture(scope="session")
def mobilenet_v2_weights(weights_dir: Path) -> Path:
    """Genuine ImageNet MobileNetV2 alpha 1.0, no top: the benchmark's and parity test's backbone."""
    return _need(weights_dir / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5")


@pytest.fixture(scope="session")
def keras_home(weights_dir: Path, tmp_path_factory) -> Path:
    """A writable KERAS_HOME in which `weights="imagenet"` finds the shared files offline."""
    home = tmp_path_factory.mktemp("keras_home")
    subprocess.run([str(weights_dir / "make_keras_home.sh"), str(home)], check=True)
    return home


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The small credited sample bundled in the repo (always present)."""
    return REPO / "sample" / "lfw_mini"


def copy_people(src: Path, dst: Path, people, n: int) -> Path:
    """The first `n` images (by name) of each folder in `people` copied into dst/<person>/."""
    for person in people:
        (dst / person).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / person).iterdir())[:n]:
            shutil.copy2(f, dst / person / f.name)
    return dst


def tiny_search_dir(root: Path, sample_dir: Path, people, per_class: int) -> tuple[Path, Path]:
    """A small dataset (the sample's first images of `people` and Unknown) and TINY_SPACE, under root."""
    data = copy_people(sample_dir, root / "data", (*people, "Unknown"), per_class)
    space = root / "tiny.yaml"
    space.write_text(TINY_SPACE)
    return data, space


def side_by_side(script: str, count: int, root: Path, timeout: float = 120) -> list[str]:
    """Run `script` (Python source) in `count` processes released at the same moment: each
    touches the file named by its argv[1] when ready (`WAIT_FOR_GO`), then waits for
    root/"go". Returns each process's stdout: workers of one run directory, racing."""
    root.mkdir(parents=True, exist_ok=True)
    ready = [root / f"ready-{i}" for i in range(count)]
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in ready]
    deadline = time.monotonic() + timeout
    while not all(r.exists() for r in ready):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            raise AssertionError("a process never got ready: "
                                 + " | ".join(p.communicate()[1][-2000:] for p in procs))
        time.sleep(0.02)
    (root / "go").touch()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-2000:]
        outs.append(out)
    return outs


# The top of a `side_by_side` script: wait for the start signal.
WAIT_FOR_GO = """\
import sys, time
from pathlib import Path
Path(sys.argv[1]).touch()
while not (Path(sys.argv[1]).parent / "go").exists():
    time.sleep(0.005)
"""
