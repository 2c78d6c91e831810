"""Keep TensorFlow's and LiteRT's routine native notes out of the user's stderr.

They print from C++ straight to file descriptor 2, some before TensorFlow's logging has
started, so TF_CPP_MIN_LOG_LEVEL does not reach them: 9 lines on a run here that trains
and exports (loading notes, the converter's settings, the XNNPACK delegate). Around the calls
that print them, stderr goes to a temporary file and every other line is passed on, so a real
error still shows. TF_CPP_MIN_LOG_LEVEL=0 shows them all again.
"""
from __future__ import annotations

import contextlib
import glob
import os
import re
import sys
import tempfile

NOTES = re.compile(
    r"All log messages before absl::InitializeLog|oneDNN custom operations are on|"
    r"Could not find cuda drivers|This TensorFlow binary is optimized to use|"
    r"rebuild TensorFlow with the appropriate compiler flags|"
    r"Unable to register cu(DNN|FFT|BLAS) factory|TF-TRT Warning|"
    r"computation placer already registered|"
    r"fully_quantize: \d+, inference_type: |Created TensorFlow Lite XNNPACK delegate for CPU")
# CUDA's start-up failure is routine only where there is no NVIDIA device to start: where there
# is one, it is why the GPU goes unused, and it shows.
NO_GPU_NOTES = re.compile(r"failed call to cuInit")


def wanted() -> bool:
    """Whether to filter: unless the user asked for TensorFlow's every log line."""
    return os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") != "0"


def _is_note(line: str) -> bool:
    return bool(NOTES.search(line)) or \
        (bool(NO_GPU_NOTES.search(line)) and not glob.glob("/dev/nvidia[0-9]*"))


@contextlib.contextmanager
def notes_filtered():
    """Meanwhile, file descriptor 2 goes to a temporary file; then every line of it but the
    notes is written to stderr."""
    if not wanted():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().decode(errors="replace").splitlines(True)
                    if not _is_note(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


class QuietTensorFlowImport:
    """A one-shot import hook: TensorFlow's import, and its first look for devices (where
    CUDA starts), run inside `notes_filtered`."""

    @classmethod
    def install(cls) -> None:
        if wanted() and "tensorflow" not in sys.modules \
                and not any(isinstance(f, cls) for f in sys.meta_path):
            sys.meta_path.insert(0, cls())

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None \
                and hasattr(spec.loader, "exec_module"):
            run = spec.loader.exec_module

            def exec_module(module):
                with notes_filtered():
                    run(module)
                    try:
                        module.config.list_physical_devices()
                    except Exception:  # noqa: BLE001 - only to print its notes now; never fatal
                        pass

            spec.loader.exec_module = exec_module
        return spec
