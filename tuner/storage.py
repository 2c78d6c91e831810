"""Optuna storage for many workers: opening it safely, heartbeats, dead workers, retries.

One storage interface serves every setup: a journal file in the run directory (local
workers) or an RDB URL (PostgreSQL, many machines). What a scheduler would otherwise do lives
here: tables created by whichever worker comes first, trials of dead workers failed (by
process id on this machine, by missing heartbeats elsewhere) and their parameters queued again.
"""
from __future__ import annotations

import contextlib
import datetime
import inspect
import logging
import os
import random
import socket
import threading
import time
import warnings

from .errors import UsageError

log = logging.getLogger(__name__)

MAX_RETRIES = 2
ORPHAN_SECONDS = 300  # a RUNNING trial this old with no worker recorded is failed
HEARTBEAT_INTERVAL = 10  # seconds between a running trial's heartbeats (RDB storages)
GRACE_PERIOD = 30  # a RUNNING trial this long without a heartbeat is failed and retried
OPEN_ATTEMPTS = 8  # tries to open a storage or study while other workers create it


def open_storage(url: str, heartbeat_interval: int | None = None,
                 grace_period: int | None = None):
    """A journal file (`journal:PATH`, safe for many local processes) or an RDB URL.

    RDB storages get heartbeats: a RUNNING trial whose worker has not beaten for `grace_period`
    seconds (default 30, or $PERSONCLF_GRACE_PERIOD; beats every 10 s, or
    $PERSONCLF_HEARTBEAT_INTERVAL) is failed by whichever worker looks next and its parameters
    are queued again, whatever machine it ran on. Journal files are local, where a dead worker
    is found by its process id at once (`fail_dead_trials`).

    Workers started together on a new database all create Optuna's tables; the losers of that
    race get "duplicate key" or "already exists" errors, so opening is retried a few times.
    """
    import optuna
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    if url.startswith("journal:"):
        path = url[len("journal:"):]
        return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
    kwargs = {
        "heartbeat_interval": heartbeat_interval or _env_seconds("PERSONCLF_HEARTBEAT_INTERVAL",
                                                                 HEARTBEAT_INTERVAL),
        "grace_period": grace_period or _env_seconds("PERSONCLF_GRACE_PERIOD", GRACE_PERIOD),
    }
    # Optuna 4.9 renamed the callback argument; older versions only know the first name.
    callback = ("heartbeat_stale_trial_callback"
                if "heartbeat_stale_trial_callback" in inspect.signature(RDBStorage).parameters
                else "failed_trial_callback")
    kwargs[callback] = _retry_stale_trial
    driver_url = _driver_url(url)
    try:
        for attempt in range(OPEN_ATTEMPTS):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return RDBStorage(driver_url, **kwargs)
            except (ImportError, ModuleNotFoundError) as exc:
                raise UsageError(f"--storage {url}: driver missing ({exc}); pip install "
                                 "'personclf-tune[postgres]'") from None
            except Exception as exc:  # noqa: BLE001 - sqlalchemy raises many kinds
                if attempt + 1 < OPEN_ATTEMPTS and _creation_race(exc):
                    log.info("--storage: another worker is creating the tables (%s); retrying",
                             type(exc).__name__)
                    time.sleep(random.uniform(0.1, 0.5 + attempt))
                    continue
                raise UsageError(f"--storage {url}: cannot open ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    raise AssertionError("unreachable")


def _env_seconds(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        seconds = int(value)
    except ValueError:
        seconds = 0
    if seconds < 1:
        raise UsageError(f"${name}={value!r}: must be a whole number of seconds >= 1")
    return seconds


def _driver_url(url: str) -> str:
    """`postgresql://` (or `postgres://`) with the PostgreSQL driver that is installed.

    SQLAlchemy 2.0 reads a bare `postgresql://` as psycopg2, 2.1 as psycopg 3: name the one
    present, so the same URL works with either (and in optuna-dashboard, spelled the same way).
    """
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        return url
    for module, dialect in (("psycopg2", "postgresql+psycopg2"), ("psycopg", "postgresql+psycopg")):
        if importlib.util.find_spec(module) is not None:
            return f"{dialect}://{rest}"
    return url


def _creation_race(exc: BaseException) -> bool:
    """An error that another process creating the same tables or study at once can cause."""
    seen = 0
    while exc is not None and seen < 5:
        text = f"{type(exc).__name__}: {exc}".lower()
        if any(s in text for s in ("integrityerror", "uniqueviolation", "duplicate",
                                   "already exists", "database is locked", "deadlock")):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _retry_stale_trial(study, trial) -> None:
    """Optuna's heartbeat callback: a trial failed for silence is queued again, like a dead pid."""
    log.warning("trial %d: no heartbeat within the grace period; marked failed", trial.number)
    requeue(study, trial.number, trial.params, int(trial.system_attrs.get("retries", 0)))


def _alive(host: str, pid: int, namespace: str | None = None, heartbeats: bool = False) -> bool:
    """Whether the worker `host`:`pid` may still be running its trial (True when unsure).

    Only a process on this machine, in this boot and process-id namespace, can be judged by its
    id (`namespace` is the worker's `process_namespace()`, where recorded). A worker on another
    machine, or in another container of this one, is judged by heartbeats. Same host name but
    another boot means this machine restarted since, unless heartbeats exist to decide: then it
    may be another machine of the same name.
    """
    from .workers import pid_alive, process_namespace

    if host != socket.gethostname():
        return True  # not ours to judge: heartbeats cover other machines
    if namespace:
        boot, _, pidns = namespace.partition("/")
        my_boot, _, my_pidns = process_namespace().partition("/")
        if boot and my_boot and boot != my_boot:
            return heartbeats
        if pidns and my_pidns and pidns != my_pidns:
            return True
    return pid_alive(pid)


def _stale_trial_ids(study) -> set[int]:
    """Trial ids whose heartbeat is older than the grace period (empty without heartbeats)."""
    storage = study._storage
    interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
    if not interval or not hasattr(storage, "_get_stale_trial_ids"):
        return set()
    try:
        return set(storage._get_stale_trial_ids(study._study_id))
    except Exception as exc:  # noqa: BLE001 - the next look will do
        log.warning("could not read heartbeats: %s", exc)
        return set()


def fail_dead_trials(study, all_dead: bool = False) -> list[int]:
    """Mark RUNNING trials whose worker is gone as FAIL, and requeue their parameters.

    `all_dead`: the caller knows no worker can be running (it holds the run directory's lock
    and its journal, before starting any): every RUNNING trial was left by a process that is
    gone, whatever machine or container it ran in. A resume in a new container (another host
    name) otherwise waited forever on its predecessor's trial, which no heartbeat covers.

    Heartbeats do this for RDB storages (each trial records them, see `heartbeat`); a journal
    file has none, but its workers are local, so a dead process id is proof enough and nobody
    has to wait out a grace period. A RUNNING trial with no worker recorded at all (its process
    died between asking for it and saying who it is) is failed once it is `ORPHAN_SECONDS` old:
    otherwise it would hold its slot forever and the run would end a trial short.
    """
    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    stale = _stale_trial_ids(study)
    heartbeats = bool(getattr(storage, "get_heartbeat_interval", lambda: None)())
    failed = []
    now = datetime.datetime.now()  # Optuna's datetime_start is naive local time too
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, pid = t.system_attrs.get("worker_host"), t.system_attrs.get("worker_pid")
        if t._trial_id in stale:
            grace = getattr(getattr(storage, "_backend", storage), "grace_period", None)
            reason = (f"no heartbeat for over {grace} s (worker {host}:{pid} died, hung or lost "
                      "the database)")
        elif host is None or pid is None:
            started = t.datetime_start
            if not all_dead and (started is None or
                                 (now - started).total_seconds() < ORPHAN_SECONDS):
                continue  # its worker is probably writing its name right now
            reason = "no worker recorded (it died as the trial started)"
        elif _alive(host, int(pid), t.system_attrs.get("worker_ns"), heartbeats):
            if not all_dead:
                continue
            reason = (f"left running by worker {host}:{pid}, which is gone (the run directory "
                      "was free)")
        else:
            reason = f"worker {host}:{pid} died"
        try:
            study._storage.set_trial_system_attr(t._trial_id, "fail_reason", reason)
            study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        except Exception:  # noqa: BLE001 - another worker finished or failed it first
            continue
        failed.append(t.number)
        log.warning("trial %d: %s; marked failed", t.number, reason)
        requeue(study, t.number, t.params, int(t.system_attrs.get("retries", 0)))
    with warnings.catch_warnings():
        # Optuna's own pass: trials that went stale since (its callback requeues them too).
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # no-op without heartbeats
    return failed


def requeue(study, number: int, params: dict, retries: int) -> None:
    """Queue a cut-off trial's parameters again (its slot is retried), up to MAX_RETRIES."""
    if retries < MAX_RETRIES and params:
        study.enqueue_trial(params, user_attrs={"retry_of": number, "retries": retries + 1})


@contextlib.contextmanager
def heartbeat(storage, trial_id: int):
    """Record the trial's heartbeat while it runs, on storages that have them (RDB).

    `study.optimize` does this itself; the ask-and-tell loop here must, or an RDB storage never
    sees a heartbeat and `fail_stale_trials` can never fail a trial whose worker died.
    """
    get_interval = getattr(storage, "get_heartbeat_interval", None)
    interval = get_interval() if get_interval is not None else None
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                storage.record_heartbeat(trial_id)
            except Exception as exc:  # noqa: BLE001 - a missed beat must not kill the trial
                log.warning("heartbeat of trial id %d failed: %s", trial_id, exc)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def finished_count(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def running_trials(study):
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
