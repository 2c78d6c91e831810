"""Search drivers: Optuna (default) or KerasTuner's oracles over the same HyperModel.

A run directory is the unit of work: it holds the resolved config, the split, the study
storage (a journal file unless `--storage` names a database), the decoded-image cache, the
trials table and the best model. Rerunning the same command on the same directory continues
until N trials are finished; a trial cut off by a crash or kill is marked failed and its slot
(its parameters, for Optuna) is run again.
"""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from .config import SearchConfig, TrialParams
from .data import load_or_make_split, scan, write_json
from .errors import TunerError, UsageError
from .pipeline import ImageCache
from .space import SearchSpace, load_space

log = logging.getLogger(__name__)

FINISHED = ("COMPLETE", "PRUNED")
STUDY_JOURNAL = "study.journal"
MAX_RETRIES = 2


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


def prepare(config: SearchConfig) -> Run:
    """Create or reopen the run directory; scan, split (reusing split.csv) and load the space."""
    from .trial import TrialData

    root = config.run_dir
    root.mkdir(parents=True, exist_ok=True)
    _check_config(config, root / "config.json")
    space = load_space(config.space, list(config.backbones) or None)
    scanned = scan(config.scan)
    split_df = load_or_make_split(scanned, config.split, root / "split.csv")
    classes = sorted(split_df["label"].unique().tolist())
    cache = ImageCache(config.data_dir, root / "cache")
    data = TrialData(split_df, classes, cache, config.fit.class_weight)
    return Run(config, space, data)


def _check_config(config: SearchConfig, path: Path) -> None:
    """A rerun on the same directory must use the same settings (more trials is fine)."""
    current = config.identity()
    if path.exists():
        saved = json.loads(path.read_text())
        changed = sorted(k for k in set(saved) | set(current)
                         if k != "version" and saved.get(k) != current.get(k))
        if changed:
            raise UsageError(
                f"{config.run_dir} was started with different settings ({', '.join(changed)}); "
                "rerun with the same flags to resume, or pass a new --output"
            )
        return
    write_json({**current, "version": 1}, path)


# ---------------------------------------------------------------------------------------------
# Optuna


def storage_url(config: SearchConfig) -> str:
    return config.storage or f"journal:{config.run_dir / STUDY_JOURNAL}"


def open_storage(url: str):
    """A journal file (`journal:PATH`, safe for many local processes) or an RDB URL.

    RDB storages get heartbeats, so a trial whose worker died is failed and retried by any
    other worker; journal files are local, where dead workers are found by process id.
    """
    import optuna
    from optuna.storages import JournalStorage, RDBStorage, RetryFailedTrialCallback
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    if url.startswith("journal:"):
        path = url[len("journal:"):]
        return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
    try:
        return RDBStorage(url, heartbeat_interval=10, grace_period=30,
                          failed_trial_callback=RetryFailedTrialCallback(max_retry=MAX_RETRIES))
    except (ImportError, ModuleNotFoundError) as exc:
        raise UsageError(f"--storage {url}: driver missing ({exc}); pip install "
                         "'personclf-tune[postgres]'") from None
    except Exception as exc:  # noqa: BLE001 - sqlalchemy raises many kinds
        raise UsageError(f"--storage {url}: cannot open ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0]})") from None
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)


def open_study(config: SearchConfig, space: SearchSpace | None = None):
    """Create or load the study; several workers starting at once must not race."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(storage_url(config))
    name = config.study_name or "personclf"
    with warnings.catch_warnings():
        # multivariate+group TPE models the conditional (per-backbone) space jointly.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=config.fit.seed, multivariate=True,
                                             group=True, constant_liar=True)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1)
              if config.pruning else optuna.pruners.NopPruner())
    for attempt in range(5):
        try:
            study = optuna.create_study(study_name=name, storage=storage, sampler=sampler,
                                        pruner=pruner, direction="maximize",
                                        load_if_exists=True)
            break
        except Exception as exc:  # noqa: BLE001 - a concurrent creator won: load theirs
            if attempt == 4:
                raise TunerError(f"cannot create or load study {name!r}: {exc}") from None
            time.sleep(0.5 + attempt)
    if space is not None and not study.trials:
        from .space import default_values

        # The first trial is the origin's hand-tuned configuration: a baseline to beat.
        study.enqueue_trial(default_values(space), skip_if_exists=True)
    return study


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


def _alive(host: str, pid: int) -> bool:
    if host != socket.gethostname():
        return True  # not ours to judge: heartbeats cover other machines
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_dead_trials(study) -> list[int]:
    """Mark RUNNING trials whose worker process on this host is gone as FAIL, and requeue them.

    Heartbeats do this for RDB storages; a journal file has none, but its workers are local,
    so a dead process id is proof enough and nobody has to wait out a grace period.
    """
    import optuna
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # no-op without heartbeats
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, pid = t.system_attrs.get("worker_host"), t.system_attrs.get("worker_pid")
        if host is None or pid is None or _alive(host, int(pid)):
            continue
        study._storage.set_trial_system_attr(t._trial_id, "fail_reason",
                                             f"worker {host}:{pid} died")
        try:
            study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        except Exception:  # noqa: BLE001 - another worker finished it first
            continue
        failed.append(t.number)
        retries = int(t.system_attrs.get("retries", 0))
        if retries < MAX_RETRIES:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number,
                                                      "retries": retries + 1})
    return failed


def _finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _running(study):
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def run_optuna(run: Run, on_trial: Callable[[dict], None] | None = None) -> object:
    """Run trials until `config.trials` are finished in the study (all workers together)."""
    import optuna
    from optuna.trial import TrialState

    from .hypermodel import PersonHyperModel
    from .space import OptunaHP
    from .trial import release, run_two_stages

    cfg = run.config
    study = open_study(cfg, run.space)
    hypermodel = PersonHyperModel(run.space, run.classes, cfg.fit)
    while True:
        fail_dead_trials(study)
        if _finished(study) + len(_running(study)) >= cfg.trials:
            break
        trial = study.ask()
        # Another worker may have taken the last slot between our check and our ask: the
        # highest-numbered surplus trial steps back, so exactly N trials finish.
        running = sorted(t.number for t in _running(study))
        if _finished(study) + running.index(trial.number) >= cfg.trials:
            study.tell(trial, state=TrialState.FAIL)
            study._storage.set_trial_system_attr(trial._trial_id, "fail_reason", "surplus")
            break
        study._storage.set_trial_system_attr(trial._trial_id, "worker_host", socket.gethostname())
        study._storage.set_trial_system_attr(trial._trial_id, "worker_pid", os.getpid())
        retries = trial.user_attrs.get("retries")
        if retries is not None:
            study._storage.set_trial_system_attr(trial._trial_id, "retries", retries)
        row = _run_optuna_trial(study, trial, hypermodel, run, OptunaHP, run_two_stages)
        release()
        if on_trial is not None:
            on_trial(row)
    return study


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
        study.tell(trial, state=TrialState.FAIL)
        raise
    except Exception as exc:  # noqa: BLE001 - one failed trial must not end the search
        log.warning("trial %d failed: %s: %s", trial.number, type(exc).__name__, exc)
        trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:500])
        study.tell(trial, state=TrialState.FAIL)
        return {"number": trial.number, "state": "FAIL", "params": params,
                "error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - start}
    metrics = result.metrics()
    trial.set_user_attr("metrics", metrics)
    trial.set_user_attr("history", result.history)
    value = metrics.get(cfg.fit.objective, float("nan"))
    if not math.isfinite(value):
        study.tell(trial, state=TrialState.FAIL)
        return {"number": trial.number, "state": "FAIL", "params": params,
                "error": "objective is not finite", "seconds": result.seconds}
    study.tell(trial, value)
    return {"number": trial.number, "state": "COMPLETE", "params": params, "value": value,
            "metrics": metrics, "seconds": result.seconds}


def optuna_trials_frame(study) -> pd.DataFrame:
    """One row per trial (the trials.csv schema)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        params = t.user_attrs.get("trial_params") or _params_from_optuna(t.params)
        metrics = t.user_attrs.get("metrics", {})
        rows.append(_row(t.number, t.state.name, t.value, params, metrics,
                         t.user_attrs.get("error") or t.system_attrs.get("fail_reason", ""),
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
    row["seconds"] = seconds if seconds is not None else float("nan")
    row["error"] = error or ""
    return row


# ---------------------------------------------------------------------------------------------
# KerasTuner


def run_kerastuner(run: Run) -> object:
    """RandomSearch, BayesianOptimization or Hyperband over the same HyperModel.

    KerasTuner keeps its own state under `RUN/kerastuner/` and reloads it on a rerun, so the
    same command resumes there too.
    """
    import keras_tuner as kt

    from .hypermodel import PersonHyperModel

    cfg = run.config
    hypermodel = PersonHyperModel(run.space, run.classes, cfg.fit)
    objective = kt.Objective(cfg.fit.objective, direction="max")
    common = dict(hypermodel=hypermodel, objective=objective, seed=cfg.fit.seed,
                  directory=str(run.root), project_name="kerastuner", overwrite=False)
    if cfg.engine == "random":
        tuner = kt.RandomSearch(max_trials=cfg.trials, **common)
    elif cfg.engine == "bayesian":
        tuner = kt.BayesianOptimization(max_trials=cfg.trials, **common)
    else:
        epochs = cfg.fit.max_epochs_stage1 + cfg.fit.max_epochs_stage2
        tuner = kt.Hyperband(max_epochs=max(epochs, 2), factor=3, **common)
    tuner.search(data=run.data)
    return tuner


def kerastuner_trials_frame(tuner) -> pd.DataFrame:
    from .space import define

    rows = []
    for trial_id, t in sorted(tuner.oracle.trials.items()):
        params = define(t.hyperparameters.copy(), tuner.hypermodel.space).to_dict() \
            if t.hyperparameters.values else {}
        metrics = {name: t.metrics.get_best_value(name)
                   for name in t.metrics.metrics} if t.metrics else {}
        value = t.score if t.score is not None else float("nan")
        state = {"COMPLETED": "COMPLETE", "INVALID": "FAIL", "FAILED": "FAIL",
                 "STOPPED": "PRUNED"}.get(str(t.status), str(t.status))
        rows.append(_row(int(trial_id) if str(trial_id).isdigit() else len(rows), state, value,
                         params, metrics, seconds=metrics.get("seconds")))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# The whole search


class RunLock:
    """One driver per run directory at a time (workers of one study use their own storage)."""

    def __init__(self, root: Path):
        self.path = root / ".lock"
        self.fh = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "w")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{self.path.parent} is in use by another personclf-tune process; "
                             "wait for it or use another --output") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


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
               lock: bool = True) -> SearchOutcome:
    """Prepare the run directory, run the trials, write the results, retrain and report the best.

    `lock=False` is for extra workers of one study that share a run directory.
    """
    from contextlib import nullcontext

    with RunLock(config.run_dir) if lock else nullcontext():
        run = prepare(config)
        try:
            if config.engine == "optuna":
                state = run_optuna(run, on_trial)
            else:
                state = run_kerastuner(run)
        except BaseException:
            _write_partial(run)  # finished trials stay visible even when the search stops
            raise
        return finish(run, state, retrain=config.retrain_best)


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


def load_state(run_dir: Path, storage: str | None = None, study_name: str | None = None):
    """Reopen a run's config and engine state for `personclf-tune report`."""
    path = Path(run_dir) / "config.json"
    if not path.exists() and storage is None:
        raise UsageError(f"{run_dir}: no config.json here; give the run directory of a search "
                         "or --storage URL --study-name NAME")
    saved = json.loads(path.read_text()) if path.exists() else {}
    engine = saved.get("engine", "optuna")
    objective = saved.get("fit", {}).get("objective", "val_balanced_accuracy")
    if engine == "optuna":
        import optuna

        url = storage or saved.get("storage") or f"journal:{Path(run_dir) / STUDY_JOURNAL}"
        name = study_name or saved.get("study_name") or "personclf"
        try:
            study = optuna.load_study(study_name=name, storage=open_storage(url))
        except KeyError:
            raise UsageError(f"no study {name!r} in {url}; check --study-name") from None
        return engine, objective, study, optuna_trials_frame(study)
    raise UsageError(f"{run_dir}: `report` regenerates Optuna runs; this run used the "
                     f"{engine} engine, whose results are in {run_dir}/trials.csv")
