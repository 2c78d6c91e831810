"""Typed, validated settings for every stage of the flow.

Frozen dataclasses validated on construction, so a bad value fails at the flag that set it and
not deep inside a trial. The CLI builds these from flags (and YAML); tests and notebooks build
them directly.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import UsageError

NO_FACE_POLICIES = ("member", "unknown", "skip")
# Declared pixels above which an image is a decompression bomb: a phone's 108-megapixel mode
# (12000x9000) passes; Pillow itself refuses over about 179 million.
MAX_PIXELS = 120_000_000
CLASS_WEIGHT_METHODS = ("balanced", "max_over_count", "none")


def refuse_inside_dataset(flag: str, path: Path, data_dir: Path,
                          why: str = "this tool never changes the dataset") -> None:
    """Nothing is written into the dataset folder: a report or run folder there would be read
    as a person by the next scan. One check for every output flag."""
    if Path(os.path.realpath(path)).is_relative_to(os.path.realpath(data_dir)):
        raise UsageError(f"{flag} {path}: inside the dataset folder {data_dir}; write it "
                         f"elsewhere ({why})")


def _check_seed(seed: int) -> None:
    """Seeds feed numpy's generators, which take only non-negative integers."""
    if not 0 <= seed < 2**31:
        raise UsageError(f"--seed {seed}: must be between 0 and {2**31 - 1}")


@dataclass(frozen=True)
class ScanConfig:
    """How a dataset folder is read: `DIR/<person>/*`, `DIR/<unknown_name>/*`, nested no-face folders."""

    data_dir: Path
    unknown_name: str = "Unknown"
    no_face_policy: str = "member"
    # Names of the nested folders that hold no-face photos (matched ignoring case, at any depth
    # in a person's folder). Empty: every nested folder does. Naming them lets a person's other
    # subfolders (one per event, per year) count as ordinary photos of that person.
    no_face_folders: tuple[str, ...] = ()
    # Perceptual-hash Hamming distance (of 64 bits) at or under which two images are near-duplicates.
    near_duplicate_distance: int = 4
    # Images whose declared pixel count exceeds this are refused as decompression bombs.
    max_pixels: int = MAX_PIXELS
    # A regular expression searched in each image's path (relative, with /): photos whose
    # match (its first group, if it has one) is the same lie in one split, like one stranger's
    # photos in Unknown/ or one camera event's frames. None: each photo (or near-duplicate
    # group) on its own.
    group_pattern: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "no_face_folders", tuple(self.no_face_folders))
        for name in self.no_face_folders:
            if not name.strip() or "/" in name or "\\" in name or name in (".", ".."):
                raise UsageError(f"--no-face-folder {name!r}: give a folder name, e.g. no_face, "
                                 "not a path")
        if self.no_face_policy not in NO_FACE_POLICIES:
            raise UsageError(
                f"--no-face-policy {self.no_face_policy!r}: choose one of {', '.join(NO_FACE_POLICIES)}"
            )
        if not 0 <= self.near_duplicate_distance <= 64:
            raise UsageError(f"--near-duplicate-distance {self.near_duplicate_distance}: "
                             "must be between 0 and 64 bits")
        if self.group_pattern == "":
            raise UsageError("--group-pattern '': give a pattern, e.g. "
                             "'^Unknown/(.+)_[0-9]+\\.jpg$'")
        if self.group_pattern is not None:
            try:
                re.compile(self.group_pattern)
            except re.error as exc:
                raise UsageError(f"--group-pattern {self.group_pattern!r}: not a regular "
                                 f"expression ({exc})") from None


@dataclass(frozen=True)
class SplitConfig:
    """Stratified, group-aware train/val/test fractions (the origin used 0.64/0.16/0.20)."""

    val_fraction: float = 0.16
    test_fraction: float = 0.20
    seed: int = 42

    def __post_init__(self) -> None:
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise UsageError(f"--{name.replace('_', '-')} {value}: must be above 0 and below 1")
        _check_seed(self.seed)
        if self.val_fraction + self.test_fraction >= 0.9:
            raise UsageError(
                f"--val-fraction {self.val_fraction} + --test-fraction {self.test_fraction} leave "
                "under 10% for training; lower them"
            )

    @property
    def train_fraction(self) -> float:
        return 1.0 - self.val_fraction - self.test_fraction


@dataclass(frozen=True)
class TrialParams:
    """The concrete hyperparameters of one trial, whatever engine chose them.

    This is the vocabulary of the search space: `tuner.space.define(hp, space)` returns one, and
    `tuner.hypermodel` consumes it. Defaults are the origin's hand-tuned MobileNetV2 run.
    """

    backbone: str = "MobileNetV2"
    alpha: float | None = None
    input_size: int = 224
    dense_units: int = 128
    dropout: float = 0.2
    l2: float = 1e-4
    label_smoothing: float = 0.1
    lr_stage1: float = 5e-4
    lr_stage2: float = 5e-5
    # Index into the backbone's freeze points: layers before that block stay frozen in stage 2.
    freeze_block: int = 0
    # 0 = no augmentation; 1 = the strongest (rotation, shift, zoom, shear, flip) the space allows.
    augment: float = 1.0
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.input_size < 32:
            raise UsageError(f"input_size {self.input_size}: must be at least 32 pixels")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"dropout {self.dropout}: must be in [0, 1)")
        if self.batch_size < 1 or self.dense_units < 0:
            raise UsageError("batch_size must be >= 1 and dense_units >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FitConfig:
    """Per-trial training budget and policy, shared by every trial of a search."""

    max_epochs_stage1: int = 10
    max_epochs_stage2: int = 10
    patience: int = 3
    class_weight: str = "balanced"
    seed: int = 42
    weights: str | None = "imagenet"  # "imagenet", None (random init) or a path to a weights file
    objective: str = "val_balanced_accuracy"
    # Augmented copies of each training image; epoch e trains on copy e % K. Fixed copies let
    # the activation caches hold exactly what an uncached trial trains on (the cache changes
    # speed, never the result). One copy when augmentation is off.
    augment_views: int = 4
    # Stage 2's learning rate rises linearly from 0 over this many epochs, then stays: the
    # first full-rate Adam steps on a just-unfrozen backbone can wreck its features.
    warmup_epochs_stage2: int = 1
    mixed_precision: bool = False
    jit_compile: bool = False
    verbose: int = 0

    def __post_init__(self) -> None:
        if self.class_weight not in CLASS_WEIGHT_METHODS:
            raise UsageError(
                f"--class-weight {self.class_weight!r}: choose one of {', '.join(CLASS_WEIGHT_METHODS)}"
            )
        if self.max_epochs_stage1 < 1:
            raise UsageError(f"--max-epochs {self.max_epochs_stage1}: must be at least 1")
        if self.max_epochs_stage2 < 0:
            raise UsageError(f"--max-epochs-stage2 {self.max_epochs_stage2}: must be 0 or more")
        if self.patience < 1:
            raise UsageError(f"--patience {self.patience}: must be at least 1")
        _check_seed(self.seed)
        if self.warmup_epochs_stage2 < 0:
            raise UsageError(f"--stage2-warmup-epochs {self.warmup_epochs_stage2}: must be >= 0")
        if self.augment_views < 1:
            raise UsageError(f"--augment-views {self.augment_views}: must be at least 1")


@dataclass(frozen=True)
class RunPaths:
    """Where a run directory keeps each artefact; the run directory is the unit of work."""

    root: Path
    split_csv: Path = field(init=False)
    cache_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        root = Path(self.root)
        object.__setattr__(self, "root", root)
        object.__setattr__(self, "split_csv", root / "split.csv")
        object.__setattr__(self, "cache_dir", root / "cache")


ENGINES = ("optuna", "random", "bayesian", "hyperband")


@dataclass(frozen=True)
class SearchConfig:
    """Everything one search needs; written to `RUN/config.json` and checked on resume."""

    data_dir: Path
    run_dir: Path
    trials: int = 40
    space: Path = Path("search_spaces/default.yaml")
    backbones: tuple[str, ...] = ()  # restrict the space to these (empty: all of the file's)
    engine: str = "optuna"
    storage: str | None = None  # Optuna storage URL; default: a journal file in the run dir
    study_name: str | None = None
    pruning: bool = True
    retrain_best: bool = True
    # After the retrain's stage 2, refit the head on the tuned backbone if validation improves.
    head_refit: bool = True
    workers: int = 1
    # Reuse work across trials: decoded images, stage-1 backbone features and stage-2
    # activations at the freeze point are computed once (see tuner.features), and trials are
    # pruned between the stages. False is the naive loop, kept for the speed benchmark.
    fast: bool = True
    cache_memory_mb: float = 2048  # in-memory budget for cached activations
    # Trials failing one after another (an exception, or a NaN objective) mean something
    # every trial shares is wrong (memory, a file, a bug): stop instead of failing forever.
    max_failures: int = 3
    scan: ScanConfig | None = None
    split: SplitConfig = field(default_factory=SplitConfig)
    fit: FitConfig = field(default_factory=FitConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "run_dir", Path(self.run_dir))
        refuse_inside_dataset("--output", self.run_dir, self.data_dir,
                              "the next scan would read it as a person")
        object.__setattr__(self, "space", Path(self.space))
        object.__setattr__(self, "backbones", tuple(self.backbones))
        if self.scan is None:
            object.__setattr__(self, "scan", ScanConfig(self.data_dir))
        if self.trials < 1:
            raise UsageError(f"--trials {self.trials}: must be at least 1")
        if self.engine not in ENGINES:
            raise UsageError(f"--engine {self.engine!r}: choose one of {', '.join(ENGINES)}")
        if self.workers < 1:
            raise UsageError(f"--workers {self.workers}: must be at least 1")
        if self.max_failures < 1:
            raise UsageError(f"--max-failures {self.max_failures}: must be at least 1")
        if not self.cache_memory_mb >= 0:  # NaN too
            raise UsageError(f"--cache-memory-mb {self.cache_memory_mb:g}: must be 0 or more")
        if self.storage and self.engine != "optuna":
            raise UsageError("--storage only applies to --engine optuna")
        if self.storage and not re.match(r"^(journal:.+|[A-Za-z][\w+.-]*://.*)$", self.storage):
            raise UsageError(f"--storage {self.storage}: give a database URL such as "
                             "postgresql://user:password@host/db, or journal:PATH")

    def identity(self) -> dict:
        """The settings a resumed run must share with the original (not the trial count).

        Paths are absolute, so the same run resumes from any working directory. The space is
        also recorded by content: a space file edited between two starts would mix two spaces
        in one leaderboard (or, with KerasTuner's oracles, be silently ignored).
        """
        d = asdict(self)
        d["data_dir"] = str(self.data_dir.resolve())
        d["space"] = str(self.space.resolve())
        d["space_content"] = space_digest(self.space)
        d["scan"]["data_dir"] = d["data_dir"]
        for key in ("trials", "workers", "retrain_best", "head_refit", "run_dir",
                    "cache_memory_mb", "max_failures"):
            d.pop(key)
        d["fit"].pop("verbose")
        return _jsonable(d)


def space_digest(path: Path) -> str | None:
    """The first 16 hex digits of the sha256 of a space file's parsed content (comments and
    layout do not count), or None where it cannot be read (loading the space says why)."""
    import hashlib
    import json

    import yaml

    try:
        content = yaml.safe_load(Path(path).read_text())
        text = json.dumps(content, sort_keys=True, default=str)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, TypeError, ValueError):
        return None
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
