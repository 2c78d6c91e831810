"""Search drivers: Optuna (default) or KerasTuner's oracles over the same HyperModel.

A run directory is the unit of work: it holds the resolved config, the split, the study
storage (a journal file unless `--storage` names a database), the decoded-image cache, the
trials table and the best model. Rerunning the same command on the same directory continues
until N trials are finished; a trial cut off by a crash or kill is marked failed and its slot
(its parameters, for Optuna) is run again.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import random
import re
import socket
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from .config import SearchConfig, TrialParams
from .data import (load_or_make_split, read_split, scan, scan_notes, skipped_text,
                   write_json)
from .errors import TunerError, UsageError
from .pipeline import ImageCache
from .pruning import PruningRule, optuna_pruner
from .space import SearchSpace, define, load_space
from .storage import (OPEN_ATTEMPTS, fail_dead_trials, finished_count, heartbeat,
                      open_storage, requeue, running_trials)

log = logging.getLogger(__name__)

FINISHED = ("COMPLETE", "PRUNED")
STUDY_JOURNAL = "study.journal"
WAIT_SECONDS = 2.0  # poll interval while other workers hold the last trials


@dataclass
class Run:
    """A prepared run directory: config, split, classes, shared trial data, space."""

    config: SearchConfig
    space: SearchSpace
    data: "TrialData"  # noqa: F821 - imported lazily (TensorFlow)

    @property
    def root(self) -> Path:
        return self.config.run_dir

    @property
    def classes(self) -> list[str]:
        return self.data.classes


def next_run_dir(results: Path = Path("results"), prefix: str = "run") -> Path:
    """results/run-001, run-002, ...: the first number not taken."""
    taken = [int(m.group(1)) for p in results.glob(f"{prefix}-*")
             if (m := re.fullmatch(rf"{prefix}-(\d+)", p.name))]
    return results / f"{prefix}-{max(taken, default=0) + 1:03d}"


def prepare(config: SearchConfig, report: bool = True) -> Run:
    """Create or reopen the run directory; scan, split (reusing split.csv) and load the space.

    `report`: write the scan to RUN/scan.json and log the files left out and the notes on
    folder names (the search's only word on them). Workers leave that to their parent, and
    skip the scan once it has written split.csv: a folder of phone photos takes minutes.
    """
    from .trial import TrialData

    root = config.run_dir
    root.mkdir(parents=True, exist_ok=True)
    split_path = root / "split.csv"
    # Validate the space and the dataset before config.json is written: a refused start must
    # leave no config behind, or the corrected command would be refused as "different settings".
    space = load_space(config.space, list(config.backbones) or None)
    _check_weights_file(config.fit.weights, space)
    if not report and split_path.exists():
        _check_config(config, root / "config.json")
        split_df = read_split(split_path, config.data_dir)
    else:
        scanned = scan(config.scan)
        if not split_path.exists():
            scanned.validate()  # likewise a dataset that cannot be split
        _check_config(config, root / "config.json")
        if report:
            write_json(scanned.summary(), root / "scan.json")
            left_out = skipped_text(scanned.skipped, config.data_dir, str(root / "scan.json"))
            for line in [left_out] + scan_notes(scanned):
                if line:
                    log.warning("%s", line)
        split_df = load_or_make_split(scanned, config.split, split_path)
    classes = sorted(split_df["label"].unique().tolist())
    cache = ImageCache(config.data_dir, root / "cache", enabled=config.fast)
    features = None
    if config.fast:
        from .features import FeatureCache

        anchors = {name: b.freeze_block[0] for name, b in space.backbones.items()}
        features = FeatureCache(root / "cache", memory_mb=config.cache_memory_mb,
                                anchor_blocks=anchors)
    data = TrialData(split_df, classes, cache, config.fit.class_weight, features)
    return Run(config, space, data)


# Settings added after a run's config.json format was fixed: a run directory written before one
# existed ran with the value given here, so it still resumes with that value.
LEGACY_SETTINGS = {"fit": {"warmup_epochs_stage2": 0},
                   "scan": {"group_pattern": None, "no_face_folders": []}}


def _check_weights_file(weights: str | None, space: SearchSpace) -> None:
    """A weights file holds one backbone at one width: with a space of several, the first trial
    of another would stop the search halfway (after trials had trained)."""
    if weights in (None, "imagenet"):
        return
    kinds = [f"{b.name}" + (f" alpha {a:g}" if a is not None else "")
             for b in space.backbones.values() for a in (b.alpha or (None,))]
    if len(kinds) > 1:
        raise UsageError(f"--weights {weights}: a weights file fits one backbone at one width, "
                         f"but the space has {len(kinds)} ({', '.join(kinds)}); narrow it with "
                         "--backbones or a space with one alpha, or use --weights imagenet")


def _nothing_finished(config: SearchConfig) -> bool:
    """No trial of the run's own journal has finished (a start that stopped at its first
    trial, offline without weights, say): its settings may still change."""
    import optuna
    from optuna.trial import TrialState

    journal = config.run_dir / STUDY_JOURNAL
    if config.engine != "optuna" or config.storage:
        return False
    if not journal.is_file():
        return True
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=config.study_name or "personclf",
                                  storage=open_storage(f"journal:{journal}"))
    except KeyError:
        return True
    return not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


# The flag behind each setting a refused resume names, where the names differ.
FLAGS = {"fast": "--no-cache", "pruning": "--no-pruning", "space": "--space",
         "space_content": "the --space file was edited", "backbones": "--backbones",
         "fit.max_epochs_stage1": "--max-epochs", "fit.max_epochs_stage2": "--max-epochs-stage2",
         "fit.seed": "--seed", "split.seed": "--seed", "fit.weights": "--weights",
         "fit.augment_views": "--augment-views", "fit.warmup_epochs_stage2":
         "--stage2-warmup-epochs", "fit.patience": "--patience",
         "fit.class_weight": "--class-weight", "fit.objective": "--objective",
         "split.val_fraction": "--val-fraction", "split.test_fraction": "--test-fraction",
         "scan.no_face_policy": "--no-face-policy", "scan.no_face_folders": "--no-face-folder",
         "scan.group_pattern": "--group-pattern", "scan.unknown_name": "--unknown-name",
         "scan.near_duplicate_distance": "--near-duplicate-distance", "data_dir": "--data"}


def _check_config(config: SearchConfig, path: Path) -> None:
    """A rerun on the same directory must use the same settings (more trials is fine)."""
    current = config.identity()
    if path.exists():
        saved = _read_config(path)
        saved.pop("version", None)
        # Written before the space's content was recorded: only its path can be compared.
        saved.setdefault("space_content", current["space_content"])
        for section, defaults in LEGACY_SETTINGS.items():
            if isinstance(saved.get(section), dict):
                saved[section] = {**defaults, **saved[section]}
        changed = [f"{name} ({FLAGS[name]})" if name in FLAGS else name
                   for name in _changed(saved, current)]
        if changed and _nothing_finished(config):
            # Nothing to lose: start the run again with these settings (its split and study go).
            log.warning("%s: no trial had finished there; starting it again with the new "
                        "settings (%s)", config.run_dir, ", ".join(changed))
            for name in ("split.csv", STUDY_JOURNAL, "scan.json"):
                (config.run_dir / name).unlink(missing_ok=True)
            write_json({**current, "version": 1}, path)
            return
        if changed:
            raise UsageError(
                f"{config.run_dir} was started with different settings ({', '.join(changed)}); "
                "rerun with the same flags to resume, or pass a new --output"
            )
        return
    write_json({**current, "version": 1}, path)


def _changed(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ ("fit.seed", "space"), sorted."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


# ---------------------------------------------------------------------------------------------
# Optuna


def storage_url(config: SearchConfig) -> str:
    return config.storage or f"journal:{config.run_dir / STUDY_JOURNAL}"


def open_study(config: SearchConfig, space: SearchSpace | None = None):
    """Create or load the study; several workers starting at once must not race.

    Exactly one process creates the study (the storage refuses a second study of that name;
    the others load it), and only that one queues the baseline trial, so workers started
    together never queue it twice. The objective is recorded in the study (its metric name),
    so `report --storage` knows it on any machine, and so does optuna-dashboard.
    """
    import optuna
    from optuna.exceptions import DuplicatedStudyError
    from optuna.study import StudyDirection

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage_url(config)
    storage = open_storage(url)
    name = config.study_name or "personclf"
    sampler = _sampler(config.fit.seed)
    # Stage 1 can rank trials poorly, so the pruner judges it only where stage 2 is at stake and
    # stops a trial in stage 2 only from the second epoch after its warmup (tuner.pruning says
    # why).
    pruner = optuna_pruner(PruningRule.for_fit(config.fit)) if config.pruning \
        else optuna.pruners.NopPruner()
    created = False
    for attempt in range(OPEN_ATTEMPTS):
        try:
            try:
                study = optuna.create_study(study_name=name, storage=storage, sampler=sampler,
                                            pruner=pruner, direction="maximize")
                created = True
            except DuplicatedStudyError:  # another worker (or an earlier run) created it
                study = optuna.load_study(study_name=name, storage=storage, sampler=sampler,
                                          pruner=pruner)
            break
        except Exception as exc:  # noqa: BLE001 - a storage hiccup while others write
            if attempt + 1 == OPEN_ATTEMPTS:
                raise TunerError(f"cannot create or load study {name!r} in {url}: "
                                 f"{type(exc).__name__}: {exc}") from None
            time.sleep(random.uniform(0.2, 0.5 + attempt))
    if study.directions != [StudyDirection.MAXIMIZE]:
        raise UsageError(f"--study-name {name}: that study in {url} was not made by "
                         "personclf-tune (its direction is not maximize); use another name")
    if created:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([config.fit.objective])
    existing = len(study.get_trials(deepcopy=False))
    offset = worker_seed_offset(config)
    if offset:
        study.sampler = _sampler(config.fit.seed + existing + offset)
    elif existing:
        # A sampler seeded as in the first process would replay that process's draws (the
        # random start-up trials above all): a resumed run, or a second worker, would repeat
        # trials already run. Seed from the study's progress instead: still reproducible.
        study.sampler = _sampler(config.fit.seed + existing)
    if space is not None and created:
        from .space import default_values

        # The first trial is the origin's hand-tuned configuration: a baseline to beat.
        study.enqueue_trial(default_values(space), skip_if_exists=True)
    return study


def worker_seed_offset(config: SearchConfig) -> int:
    """Workers that start together on one study must not draw the same start-up trials.

    Local workers (`--workers K`) are numbered; with a shared `--storage`, other machines run
    workers with the same numbers, so host and process tell them apart. A single worker on its
    own journal keeps the plain, reproducible seed.
    """
    index = os.environ.get("PERSONCLF_WORKER")
    if config.storage:
        key = f"{socket.gethostname()}:{os.getpid()}:{index}"
        return 1 + zlib.crc32(key.encode()) % 1_000_000
    if index is not None:
        return 1000 * (int(index) + 1)
    return 0


def _sampler(seed: int):
    import optuna

    with warnings.catch_warnings():
        # multivariate+group TPE models the conditional (per-backbone) space jointly.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                          constant_liar=True)


class OptunaReporter:
    """Feeds each epoch's objective to the trial and prunes when the pruner says so."""

    def __init__(self, trial, objective: str, pruning: bool):
        self.trial = trial
        self.objective = objective
        self.pruning = pruning

    def report(self, step: int, metrics: dict[str, float]) -> None:
        import optuna

        value = metrics.get(self.objective)
        if value is None or not math.isfinite(value):
            return
        self.trial.report(value, step)
        if self.pruning and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} ({self.objective}={value:.4f})")


def run_optuna(run: Run, on_trial: Callable[[dict], None] | None = None,
               wait_for_others: bool = False) -> object:
    """Run trials until `config.trials` are finished in the study (all workers together).

    Several workers share the study through its storage. One that finds the other workers
    holding the last slots waits: if one of them dies, its trial is failed (dead process id
    or no heartbeat) and requeued, and someone must run it. A trial that turns out surplus
    (another worker took the last slot at the same moment) is failed as "surplus"; then the
    worker stops, or with `wait_for_others` (what `run_search` asks for) waits like the others
    until the study is finished.
    """
    import optuna
    from optuna.trial import TrialState

    from .hypermodel import PersonHyperModel
    from .space import OptunaHP
    from .trial import run_two_stages
    from .workers import GROUP_ATTR, process_namespace, worker_group

    cfg = run.config
    study = open_study(cfg, run.space)
    hypermodel = PersonHyperModel(run.space, run.classes, cfg.fit)
    storage = study._storage
    failures: list[str] = []  # this worker's failed trials since its last finished one
    while True:
        fail_dead_trials(study)
        finished, running = finished_count(study), len(running_trials(study))
        if finished >= cfg.trials:
            break
        if finished + running >= cfg.trials:
            time.sleep(WAIT_SECONDS)
            continue
        with warnings.catch_warnings():
            # We record heartbeats ourselves (`_heartbeat`), study.optimize is not needed.
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
            trial = study.ask()
        # Beat from the start: a worker that dies from here on is found by its silence too.
        with heartbeat(storage, trial._trial_id):
            # Another worker may have taken the last slot between our check and our ask: the
            # highest-numbered surplus trial steps back, so exactly N trials finish.
            running = sorted(t.number for t in running_trials(study))
            if finished_count(study) + running.index(trial.number) >= cfg.trials:
                # The reason first: a finished trial can no longer be changed.
                storage.set_trial_system_attr(trial._trial_id, "fail_reason", "surplus")
                study.tell(trial, state=TrialState.FAIL)
                if wait_for_others:
                    continue
                break
            storage.set_trial_system_attr(trial._trial_id, "worker_host", socket.gethostname())
            storage.set_trial_system_attr(trial._trial_id, "worker_pid", os.getpid())
            storage.set_trial_system_attr(trial._trial_id, "worker_ns", process_namespace())
            storage.set_trial_system_attr(trial._trial_id, GROUP_ATTR, worker_group())
            retries = trial.user_attrs.get("retries")
            if retries is not None:
                storage.set_trial_system_attr(trial._trial_id, "retries", retries)
            try:
                row = _run_optuna_trial(study, trial, hypermodel, run, OptunaHP, run_two_stages)
            except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
                if not storage.get_trial(trial._trial_id).state.is_finished():
                    raise
                # Another worker failed it while it ran (no heartbeat for the grace period:
                # a stalled machine or a lost database connection); its retry runs elsewhere.
                log.warning("trial %d was failed by another worker while it ran; dropping "
                            "its result", trial.number)
                row = None
        # No release() here: PersonHyperModel.build frees the previous trial's graph first.
        if on_trial is not None and row is not None:
            on_trial(row)
        if row is not None:
            failures = failures + [row.get("error", "")] if row["state"] == "FAIL" else []
            if len(failures) >= cfg.max_failures:
                raise TunerError(_failures_message(len(failures), failures[-1]))
    return study


def _failures_message(count: int, last_error: str) -> str:
    return (f"{count} trials in a row failed (the last: {last_error or 'no reason given'}); "
            "fix the cause and rerun the same command: finished trials are kept "
            "(--max-failures sets the limit)")


def _run_optuna_trial(study, trial, hypermodel, run: Run, hp_cls, fit) -> dict:
    import optuna
    from optuna.trial import TrialState

    cfg = run.config
    start = time.perf_counter()
    hp = hp_cls(trial)
    params = hypermodel.params(hp)
    trial.set_user_attr("trial_params", params.to_dict())
    reporter = OptunaReporter(trial, cfg.fit.objective, cfg.pruning)
    try:
        model = hypermodel.build(hp)
        result = fit(model, params, run.data, cfg.fit, reporter=reporter)
    except optuna.TrialPruned as exc:
        trial.set_user_attr("seconds", time.perf_counter() - start)
        trial.set_user_attr("note", str(exc))
        study.tell(trial, state=TrialState.PRUNED)
        return {"number": trial.number, "state": "PRUNED", "params": params,
                "seconds": time.perf_counter() - start}
    except UsageError:
        study.tell(trial, state=TrialState.FAIL)
        raise  # every trial would fail the same way: stop with the message
    except KeyboardInterrupt:
        _interrupted(study, trial)
        raise
    except Exception as exc:  # noqa: BLE001 - one failed trial must not end the search
        if _is_interrupt(exc):
            _interrupted(study, trial)
            raise KeyboardInterrupt from None
        return _failed(study, trial, params, exc, start)
    metrics = result.metrics()
    trial.set_user_attr("metrics", metrics)
    trial.set_user_attr("history", result.history)
    value = metrics.get(cfg.fit.objective, float("nan"))
    if not math.isfinite(value):
        trial.set_user_attr("error", "objective is not finite")  # what `report` shows
        study.tell(trial, state=TrialState.FAIL)
        return {"number": trial.number, "state": "FAIL", "params": params,
                "error": "objective is not finite", "seconds": result.seconds}
    study.tell(trial, value)
    return {"number": trial.number, "state": "COMPLETE", "params": params, "value": value,
            "metrics": metrics, "seconds": result.seconds}


def _is_interrupt(exc: BaseException) -> bool:
    """Ctrl-C inside TensorFlow's C++ code comes back wrapped in a RuntimeError."""
    return "KeyboardInterrupt" in str(exc).split("\n", 1)[0]


def _interrupted(study, trial) -> None:
    """Ctrl-C: the cut-off trial is failed and its parameters queued for the resumed run."""
    from optuna.trial import TrialState

    study._storage.set_trial_system_attr(trial._trial_id, "fail_reason", "interrupted")
    study.tell(trial, state=TrialState.FAIL)
    requeue(study, trial.number, trial.params, int(trial.user_attrs.get("retries", 0)))


def _failed(study, trial, params, exc: Exception, start: float) -> dict:
    """Record a failed trial (one failure must not end the search) and say why in one line."""
    from optuna.trial import TrialState

    reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    log.warning("trial %d failed: %s", trial.number, reason)
    trial.set_user_attr("error", reason[:500])
    study.tell(trial, state=TrialState.FAIL)
    return {"number": trial.number, "state": "FAIL", "params": params, "error": reason,
            "seconds": time.perf_counter() - start}


def optuna_trials_frame(study) -> pd.DataFrame:
    """One row per trial (the trials.csv schema)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        params = t.user_attrs.get("trial_params") or _params_from_optuna(t.params)
        metrics = t.user_attrs.get("metrics", {})
        rows.append(_row(t.number, t.state.name, t.value, params, metrics,
                         t.user_attrs.get("error") or t.system_attrs.get("fail_reason")
                         or t.user_attrs.get("note", ""),  # why it failed, or was pruned
                         seconds=metrics.get("seconds", t.user_attrs.get("seconds"))))
    return pd.DataFrame(rows)


def _params_from_optuna(values: dict) -> dict:
    """Recover flat TrialParams fields from Optuna's names ("MobileNetV2/input_size" -> input_size)."""
    out = {}
    for key, value in values.items():
        out[key.split("/", 1)[1] if "/" in key else key] = value
    return out


def _row(number, state, value, params: dict, metrics: dict, error: str = "",
         seconds=None) -> dict:
    row = {"number": number, "state": state,
           "value": float(value) if value is not None else float("nan")}
    for name in TrialParams.__dataclass_fields__:
        row[name] = params.get(name)
    for name in ("val_accuracy", "val_balanced_accuracy", "val_macro_f1", "val_loss",
                 "stage1_best", "stage2_best", "epochs_stage1", "epochs_stage2", "params"):
        row[name] = metrics.get(name, float("nan"))
    for name in ("epochs_stage1", "epochs_stage2", "params"):
        # Counts stay integers (KerasTuner records every metric as a float).
        value = row[name]
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            row[name] = int(value)
    row["seconds"] = seconds if seconds is not None else float("nan")
    row["error"] = error or ""
    return row


# ---------------------------------------------------------------------------------------------
# KerasTuner


def run_kerastuner(run: Run, on_trial: Callable[[dict], None] | None = None) -> object:
    """RandomSearch, BayesianOptimization or Hyperband over the same HyperModel.

    KerasTuner keeps its own state under `RUN/kerastuner/` and reloads it on a rerun, so the
    same command resumes there too. `on_trial` gets each finished trial's row, as with Optuna.
    """
    import keras_tuner as kt

    from .hypermodel import PersonHyperModel

    cfg = run.config
    hypermodel = PersonHyperModel(run.space, run.classes, cfg.fit)
    objective = kt.Objective(cfg.fit.objective, direction="max")
    common = dict(hypermodel=hypermodel, objective=objective, seed=cfg.fit.seed,
                  directory=str(run.root), project_name="kerastuner", overwrite=False)
    if cfg.engine == "random":
        tuner_cls, budget = kt.RandomSearch, dict(max_trials=cfg.trials)
    elif cfg.engine == "bayesian":
        tuner_cls, budget = kt.BayesianOptimization, dict(max_trials=cfg.trials)
    else:
        epochs = cfg.fit.max_epochs_stage1 + cfg.fit.max_epochs_stage2
        tuner_cls, budget = kt.Hyperband, dict(max_epochs=max(epochs, 2), factor=3)
    tuner = _reporting(tuner_cls, on_trial, run.space)(
        **budget, **common, max_consecutive_failed_trials=cfg.max_failures)
    if cfg.engine == "hyperband":
        # Its brackets set its own trial count; --trials caps it, as for the others (the base
        # oracle stops at max_trials, which Hyperband's constructor does not take).
        tuner.oracle.max_trials = cfg.trials
    with warnings.catch_warnings():
        # A metric that is NaN by design (stage2_best when stage 2 is off) makes KerasTuner's
        # best-value lookup warn on every trial.
        warnings.filterwarnings("ignore", message="All-NaN", category=RuntimeWarning)
        try:
            with _quiet_kerastuner_failures():
                tuner.search(data=run.data)
        except RuntimeError as exc:
            if "consecutive failures" not in str(exc):
                raise
            # KerasTuner's message: the limit, then the last trial's traceback.
            raise TunerError(_failures_message(cfg.max_failures, _last_line(str(exc)))) \
                from None
    return tuner


def _last_line(traceback_text: str) -> str:
    """The exception line that ends a traceback ("MemoryError: ..."), or ""."""
    lines = [line.strip() for line in traceback_text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@contextlib.contextmanager
def _quiet_kerastuner_failures():
    """KerasTuner prints every failed trial's traceback; our trial line says why in one line
    (the traceback stays in the trial's record under RUN/kerastuner/)."""
    try:
        from keras_tuner.src import config as kt_config
    except ImportError:  # another KerasTuner layout: leave its printing alone
        yield
        return
    saved, kt_config.DEBUG = kt_config.DEBUG, log.isEnabledFor(logging.DEBUG)
    try:
        yield
    finally:
        kt_config.DEBUG = saved


def _reporting(tuner_cls, on_trial: Callable[[dict], None] | None, space: SearchSpace):
    """`tuner_cls` calling `on_trial` with each trial's row once KerasTuner has recorded it."""
    if on_trial is None:
        return tuner_cls

    class Reporting(tuner_cls):
        def on_trial_begin(self, trial):
            self._trial_start = time.perf_counter()  # a failed trial records no seconds
            super().on_trial_begin(trial)

        def on_trial_end(self, trial):
            try:
                # The oracle sets the trial's status and score here; after too many failures
                # in a row it raises, and the last trial is reported all the same.
                super().on_trial_end(trial)
            finally:
                row = _kerastuner_frame({trial.trial_id: trial}, space).iloc[0].to_dict()
                seconds = row["seconds"] if pd.notna(row["seconds"]) else \
                    time.perf_counter() - self._trial_start
                out = {"number": row["number"], "state": row["state"],
                       "params": define(trial.hyperparameters.copy(), space),
                       "seconds": seconds, "error": row["error"]}
                if row["state"] == "COMPLETE":
                    out["value"] = row["value"]
                on_trial(out)

    return Reporting


def kerastuner_trials_frame(tuner) -> pd.DataFrame:
    return _kerastuner_frame(tuner.oracle.trials, tuner.hypermodel.space)


def _kerastuner_frame(trials: dict, space: SearchSpace) -> pd.DataFrame:
    """One row per KerasTuner trial (the trials.csv schema), from the oracle's trials by id."""
    rows = []
    for trial_id, t in sorted(trials.items()):
        params = define(t.hyperparameters.copy(), space).to_dict() \
            if t.hyperparameters.values else {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="All-NaN", category=RuntimeWarning)
            metrics = {name: t.metrics.get_best_value(name)
                       for name in t.metrics.metrics} if t.metrics else {}
        value = t.score if t.score is not None else float("nan")
        state = {"COMPLETED": "COMPLETE", "INVALID": "FAIL", "FAILED": "FAIL",
                 "STOPPED": "PRUNED"}.get(str(t.status), str(t.status))
        error = _last_line(t.message or "") if state == "FAIL" else ""
        rows.append(_row(int(trial_id) if str(trial_id).isdigit() else len(rows), state, value,
                         params, metrics, error, seconds=metrics.get("seconds")))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# The whole search


def _fail_orphans(config: SearchConfig) -> None:
    """Fail (and requeue) every trial left RUNNING in the run's own journal: under the run
    directory's lock, before any worker starts, none of them can still be running."""
    if config.engine == "optuna" and config.storage is None and \
            (config.run_dir / STUDY_JOURNAL).is_file():
        fail_dead_trials(open_study(config), all_dead=True)


class RunLock:
    """One driver per run directory at a time (workers of one study use their own storage)."""

    def __init__(self, root: Path):
        self.path = root / ".lock"
        self.fh = None
        self.created = False

    def __enter__(self):
        folder = self.path.parent
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"--output {folder}: is a file; give a folder")
        self.created = not folder.exists()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--output {folder}: cannot create it ({exc.strerror or exc})") \
                from None
        try:
            self.fh = open(self.path, "w")
        except OSError as exc:  # a run made by another user (root in Docker), a read-only disk
            raise UsageError(f"--output {folder}: cannot write there ({exc.strerror or exc}); "
                             "check its owner and permissions, or pass another --output") \
                from None
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.close()
            raise UsageError(f"{self.path.parent} is in use by another personclf-tune process; "
                             "wait for it or use another --output") from None
        return self

    def __exit__(self, exc_type, *exc):
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()
        if exc_type is not None and self.created:
            # A start refused before anything was written (a typo in a flag, a space file that
            # does not parse) leaves no empty run directory behind to clutter results/.
            try:
                if [p.name for p in self.path.parent.iterdir()] == [self.path.name]:
                    self.path.unlink()
                    self.path.parent.rmdir()
            except OSError:
                pass


def trials_frame(run: Run, engine_state) -> pd.DataFrame:
    if run.config.engine == "optuna":
        return optuna_trials_frame(engine_state)
    return kerastuner_trials_frame(engine_state)


@dataclass
class SearchOutcome:
    """What a finished search produced (paths are inside the run directory)."""

    run: Run
    trials: pd.DataFrame
    files: dict[str, Path]
    best_dir: Path | None = None
    evaluation: dict | None = None


def run_search(config: SearchConfig, on_trial: Callable[[dict], None] | None = None,
               worker: bool = False) -> SearchOutcome:
    """Prepare the run directory, run the trials, write the results, retrain and report the best.

    `worker=True` is a process started by `--workers K`: it runs trials and leaves the results
    to its parent. With a shared `--storage`, each machine runs this; every worker stays until
    the study is finished (to take over the trial of one that dies), writes the tables, and
    only the one whose trial finished the study retrains and reports the best
    (`workers.claim_finalizer`).
    """
    import keras_tuner  # noqa: F401 - imported before the freeze, with everything trials use
    import optuna  # noqa: F401

    from .trial import freeze_imports

    freeze_imports()
    with contextlib.nullcontext() if worker else RunLock(config.run_dir):
        run = prepare(config, report=not worker)
        if not worker:
            _fail_orphans(config)
        try:
            if config.engine == "optuna":
                state = run_optuna(run, on_trial, wait_for_others=True)
            else:
                state = run_kerastuner(run, on_trial)
        except BaseException:
            _write_partial(run)  # finished trials stay visible even when the search stops
            raise
        if worker:
            return SearchOutcome(run, trials_frame(run, state), {})
        retrain = config.retrain_best
        if config.engine == "optuna" and finished_count(state) < config.trials:
            retrain = False  # not finished: the worker that finishes it retrains
        elif retrain and config.storage and config.engine == "optuna":
            from .workers import claim_finalizer

            retrain = claim_finalizer(state, config.trials)
            if not retrain:
                log.warning("another worker retrains and reports the best trial of this study")
        return finish(run, state, retrain=retrain)


def run_with_local_workers(config: SearchConfig, worker_argv: list[str]) -> SearchOutcome:
    """`--workers K`: K processes share the run's journal (or --storage); this one finishes.

    The run directory is prepared here first, so the workers find config.json and split.csv
    in place and never race to write them; the retrain and report run once, here (with a
    shared --storage: here or on the machine whose worker finished the study).
    """
    from .workers import run_local_workers

    if config.engine != "optuna":
        raise UsageError(f"--workers {config.workers} needs --engine optuna (KerasTuner's "
                         f"{config.engine} oracle runs in one process)")
    with RunLock(config.run_dir):
        run = prepare(config)  # reused after the workers: split.csv and config are settled
        _fail_orphans(config)
        codes = run_local_workers(worker_argv, config.workers)
        study = open_study(config)
        fail_dead_trials(study)
        if finished_count(study) < config.trials:
            _write_partial(run)
            raise TunerError(
                f"workers stopped with {finished_count(study)} of {config.trials} trials finished "
                f"(exit codes {codes}); rerun the same command to continue")
        retrain = config.retrain_best
        if retrain and config.storage:
            from .workers import claim_finalizer, worker_id

            # Other machines share the study: one finalizer for all (our children's trials
            # name this process as theirs).
            retrain = claim_finalizer(study, config.trials, group=worker_id())
            if not retrain:
                log.warning("another machine retrains and reports the best trial of this study")
        return finish(run, study, retrain=retrain)


def _write_partial(run: Run) -> None:
    if run.config.engine != "optuna":
        return
    try:
        from .report import write_results

        study = open_study(run.config)
        write_results(optuna_trials_frame(study), run.root, run.config.fit.objective, study=study)
    except Exception as exc:  # noqa: BLE001 - never hide the original error
        log.warning("could not write partial results: %s", exc)


def finish(run: Run, state, retrain: bool = True) -> SearchOutcome:
    """Write trials.csv, leaderboard.md, backbones.md and plots; retrain and report the best."""
    from .report import write_results

    trials = trials_frame(run, state)
    study = state if run.config.engine == "optuna" else None
    files = write_results(trials, run.root, run.config.fit.objective, study=study)
    outcome = SearchOutcome(run, trials, files)
    complete = trials[trials["state"] == "COMPLETE"]
    if retrain and not complete.empty:
        from .best import retrain_best

        best = complete.sort_values(["value", "number"], ascending=[False, True]).iloc[0]
        outcome.best_dir, outcome.evaluation = retrain_best(run, best)
    return outcome


def _read_config(path: Path) -> dict:
    """A run's config.json, or a one-line error naming it (truncated, hand-edited)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UsageError(f"{path}: unreadable ({type(exc).__name__}); restore it, or rerun the "
                         "search with the same flags to rewrite it") from None
    if not isinstance(saved, dict):
        raise UsageError(f"{path}: not a run's config (not a JSON object); restore it")
    return saved


def saved_data_dir(run_dir: Path) -> Path | None:
    """The dataset folder a run was started on (its config.json), or None."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return None
    value = _read_config(path).get("data_dir")
    return Path(value) if isinstance(value, str) else None


def load_state(run_dir: Path | None, storage: str | None = None,
               study_name: str | None = None):
    """Reopen a run's config and engine state for `personclf-tune report`.

    With `storage` (and `study_name`) alone, no run directory is needed: any machine that can
    reach the database reports the study; the objective is the study's metric name.
    """
    path = Path(run_dir) / "config.json" if run_dir is not None else None
    if (path is None or not path.exists()) and storage is None:
        raise UsageError(f"{run_dir}: no config.json here; give the run directory of a search "
                         "or --storage URL --study-name NAME")
    saved = _read_config(path) if path is not None and path.exists() else {}
    engine = saved.get("engine", "optuna")
    objective = saved.get("fit", {}).get("objective")
    if engine == "optuna":
        import optuna

        journal = Path(run_dir) / STUDY_JOURNAL if run_dir is not None else None
        if not (storage or saved.get("storage")) and \
                (not journal.is_file() or journal.stat().st_size == 0):
            raise UsageError(f"{run_dir}: no trial has started yet; rerun the search to "
                             "continue it")
        url = storage or saved.get("storage") or f"journal:{journal}"
        name = study_name or saved.get("study_name") or "personclf"
        opened = open_storage(url)
        try:
            study = optuna.load_study(study_name=name, storage=opened)
        except KeyError:
            names = optuna.get_all_study_names(opened)
            there = f"; studies there: {', '.join(names)}" if names else "; it holds no study"
            raise UsageError(f"no study {name!r} in {url}{there}; check --study-name") from None
        objective = objective or (study.metric_names or [None])[0] or "val_balanced_accuracy"
        return engine, objective, study, optuna_trials_frame(study)
    return (engine, objective or "val_balanced_accuracy", None,
            _kerastuner_trials_from_dir(Path(run_dir), saved))


def _kerastuner_trials_from_dir(run_dir: Path, saved: dict) -> pd.DataFrame:
    """A KerasTuner run's trials, from the oracle's trial files (else the last trials.csv)."""
    files = sorted((run_dir / "kerastuner").glob("trial_*/trial.json"))
    csv = run_dir / "trials.csv"
    try:
        if not files:
            raise UsageError(f"{run_dir}: no KerasTuner trials in {run_dir / 'kerastuner'}")
        from keras_tuner.engine.trial import Trial

        space = load_space(saved["space"], list(saved.get("backbones") or []) or None)
        trials = {}
        for path in files:
            trial = Trial.load(str(path))
            trials[trial.trial_id] = trial
        return _kerastuner_frame(trials, space)
    except UsageError as exc:
        if not csv.is_file():
            raise
        log.warning("rebuilding from %s instead of the KerasTuner state: %s", csv, exc)
        return pd.read_csv(csv)
