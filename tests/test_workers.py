"""Many workers on one study: GPUs per local worker, liveness, who finalizes, and real runs.

Fast tests cover the pieces (GPU assignment, the flags a local worker gets, process liveness,
the finalizer rule, heartbeats, concurrent creation of a study on a fresh PostgreSQL database).
The slow ones run real searches with tiny models (MobileNet alpha 0.25 at 96 px, 2 people +
Unknown x 12 images, one epoch per stage, the shared ImageNet weights file):

- three worker processes on one PostgreSQL study, one killed with SIGKILL mid-trial;
- `--workers 2` on a journal file, one child killed with SIGKILL mid-trial.

Which path fails the killed trial: all workers here run on this machine, so the survivors find
the dead process id (`fail_dead_trials`, immediately) before the 30 s heartbeat grace period
runs out. The heartbeat path (a worker on another machine) is tested on its own, on the same
PostgreSQL server, with a 2 s grace period.

PostgreSQL comes from `tests/pg.py` (a throwaway server on 127.0.0.1); those tests skip with
the reason where its binaries or psycopg2 are missing.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from conftest import tiny_search_dir
from pg import postgres_server  # noqa: F401 - the session fixture
from tuner import cli, search, workers
from tuner import storage as tstorage

REPO = Path(__file__).resolve().parents[1]
PEOPLE = ("Colin_Powell", "Donald_Rumsfeld")
PER_CLASS = 12
TRIALS = 4
STARTERS = 4  # processes creating one study at once
TINY_SPACE_NO_TF = """\
backbones:
  MobileNet: {input_size: [96], alpha: [0.25]}
hyperparameters:
  dropout: {float: [0.0, 0.4]}
"""


# -----------------------------------------------------------------------------------------------
# GPUs and the command line of local workers


def test_visible_gpus_from_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,2, 3")
    assert workers.visible_gpus() == ["0", "2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1a2b,GPU-3c4d")  # UUIDs are kept as given
    assert workers.visible_gpus() == ["GPU-1a2b", "GPU-3c4d"]
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert workers.visible_gpus() == []


def test_visible_gpus_from_nvidia_smi(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(workers.shutil, "which", lambda name: None)
    assert workers.visible_gpus() == []  # no driver: CPU workers
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-a)'\n"
                   "echo 'GPU 1: NVIDIA H100 (UUID: GPU-b)'\n")
    smi.chmod(0o755)
    monkeypatch.setattr(workers.shutil, "which", lambda name: str(smi))
    assert workers.visible_gpus() == ["0", "1"]


def test_worker_env_assigns_gpus_round_robin(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    gpus = workers.visible_gpus()
    envs = [workers.worker_env(i, gpus) for i in range(5)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["1", "3", "1", "3", "1"]
    assert [e["PERSONCLF_WORKER"] for e in envs] == ["0", "1", "2", "3", "4"]
    # Every child names this process as the one that finalizes for it.
    assert {e[workers.GROUP_ENV] for e in envs} == {workers.worker_id()}
    # No GPUs: the environment's CUDA_VISIBLE_DEVICES (if any) is left alone.
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    env = workers.worker_env(1, [])
    assert "CUDA_VISIBLE_DEVICES" not in env and env["PERSONCLF_WORKER"] == "1"


def test_cpu_workers_split_the_cores_between_them(monkeypatch):
    for var in workers.THREAD_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(workers, "usable_cpus", lambda: 8)
    envs = [workers.worker_env(i, [], count=3) for i in range(3)]
    assert [(e["TF_NUM_INTRAOP_THREADS"], e["TF_NUM_INTEROP_THREADS"]) for e in envs] == \
        [("2", "2")] * 3
    assert workers.cpu_threads_each(4, cpus=2) == 1  # more workers than cores: one each
    # A single worker, or workers with a GPU each: TensorFlow sizes its pools itself.
    assert not set(workers.THREAD_ENV) & set(workers.worker_env(0, [], count=1))
    assert not set(workers.THREAD_ENV) & set(workers.worker_env(0, ["0"], count=2))
    # What the user set wins.
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "3")
    env = workers.worker_env(0, [], count=2)
    assert (env["TF_NUM_INTRAOP_THREADS"], env["TF_NUM_INTEROP_THREADS"]) == ("3", "4")


def test_more_cpu_workers_than_cores_are_warned_about(monkeypatch, caplog):
    for var in workers.THREAD_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(workers, "visible_gpus", lambda: [])
    monkeypatch.setattr(workers, "usable_cpus", lambda: 2)
    caplog.set_level("INFO", logger="tuner.workers")
    # Workers that exit at once (an unknown flag): only what the parent says is of interest.
    codes = workers.run_local_workers(["--no-such-flag"], 3)
    assert codes == [2, 2, 2]
    assert "3 workers share 2 CPUs: 1 thread(s) each" in caplog.text
    assert "--workers 3 on 2 CPUs and no GPU" in caplog.text
    caplog.clear()
    workers.run_local_workers(["--no-such-flag"], 2)
    assert "2 workers share 2 CPUs" in caplog.text and "no GPU" not in caplog.text


def test_worker_argv_drops_workers_and_pins_the_run_dir():
    argv = ["--data", "d", "--workers", "3", "--trials", "8", "--output", "old",
            "--workers=2", "--output=x", "--storage", "postgresql://h/db"]
    assert cli._worker_argv(argv, Path("results/run-007")) == [
        "--data", "d", "--trials", "8", "--storage", "postgresql://h/db",
        "--output", "results/run-007"]


def test_worker_seed_offsets_differ(monkeypatch, tmp_path):
    from tuner.config import SearchConfig

    local = SearchConfig(data_dir=tmp_path / "data", run_dir=tmp_path / "r")
    shared = SearchConfig(data_dir=tmp_path / "data", run_dir=tmp_path / "r",
                          storage="postgresql://h/db")
    monkeypatch.delenv("PERSONCLF_WORKER", raising=False)
    assert search.worker_seed_offset(local) == 0  # one process, plain reproducible seed
    offsets = set()
    for i in range(3):
        monkeypatch.setenv("PERSONCLF_WORKER", str(i))
        offsets |= {search.worker_seed_offset(local), search.worker_seed_offset(shared)}
    assert len(offsets) == 6 and 0 not in offsets


def test_workers_need_optuna(tmp_path, capsys):
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_SPACE_NO_TF)
    (tmp_path / "data").mkdir()
    code = cli.main(["--data", str(tmp_path / "data"), "--space", str(space), "--output",
                     str(tmp_path / "run"), "--workers", "2", "--engine", "random"])
    assert code == 2
    assert "--workers 2 needs --engine optuna" in capsys.readouterr().err


def test_postgres_urls_name_the_installed_driver():
    import importlib.util

    assert tstorage._driver_url("sqlite:///x.db") == "sqlite:///x.db"
    assert tstorage._driver_url("postgresql+psycopg://h/db") == "postgresql+psycopg://h/db"
    if importlib.util.find_spec("psycopg2") is not None:
        assert tstorage._driver_url("postgresql://u:p@h:5/db") == "postgresql+psycopg2://u:p@h:5/db"
        assert tstorage._driver_url("postgres://h/db") == "postgresql+psycopg2://h/db"


# -----------------------------------------------------------------------------------------------
# Liveness


def test_pid_alive_counts_zombies_as_dead():
    assert workers.pid_alive(os.getpid())
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while workers.pid_alive(proc.pid):  # exited but not reaped: a zombie, still signalable
        assert time.monotonic() < deadline, "a zombie child still looks alive"
        time.sleep(0.05)
    os.kill(proc.pid, 0)  # it is a zombie: the signal still reaches it
    proc.wait()
    assert not workers.pid_alive(proc.pid)


def test_alive_judges_only_processes_it_can_see():
    me = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ns = workers.process_namespace()
    boot, _, pidns = ns.partition("/")
    assert tstorage._alive("another-machine", dead.pid)  # heartbeats judge other machines
    assert not tstorage._alive(me, dead.pid)
    assert not tstorage._alive(me, dead.pid, ns)
    assert tstorage._alive(me, os.getpid(), ns)
    if pidns:  # another container of this host: its process ids mean nothing here
        assert tstorage._alive(me, dead.pid, f"{boot}/pid:[1]")
    if boot:  # this machine rebooted since: dead, unless heartbeats can tell (same-name host?)
        assert not tstorage._alive(me, os.getpid(), f"other-boot/{pidns}")
        assert tstorage._alive(me, os.getpid(), f"other-boot/{pidns}", heartbeats=True)


# -----------------------------------------------------------------------------------------------
# Who finalizes


def _journal_study(path: Path, name: str = "s"):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name=name, direction="maximize",
                               storage=tstorage.open_storage(f"journal:{path}"))


def _system_attrs(study) -> dict:
    return study._storage.get_study_system_attrs(study._study_id)


def _finish_trial(study, group: str | None, value: float) -> None:
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    if group is not None:
        study._storage.set_trial_system_attr(trial._trial_id, workers.GROUP_ATTR, group)
    study.tell(trial, value)


def test_only_the_worker_that_finished_the_study_finalizes(tmp_path):
    study = _journal_study(tmp_path / "study.journal")
    _finish_trial(study, "A", 0.5)
    assert not any(workers.claim_finalizer(study, 3, group=g) for g in "ABC")  # 1 of 3
    _finish_trial(study, "B", 0.9)
    _finish_trial(study, "C", 0.1)  # the third to finish: C's worker finishes the study
    claims = {g: workers.claim_finalizer(study, 3, group=g) for g in "ABC"}
    assert claims == {"A": False, "B": False, "C": True}
    assert _system_attrs(study)["finalizer_3"] == "C"
    # Recorded once: C restarted (or asking again) finalizes no more.
    assert not workers.claim_finalizer(study, 3, group="C")
    # A rerun with more trials finalizes again, by whoever finishes that one.
    _finish_trial(study, "A", 0.2)
    assert [workers.claim_finalizer(study, 4, group=g) for g in "BCA"] == [False, False, True]


def test_finalizer_without_worker_names_falls_back_to_a_claim(tmp_path):
    """Trials from an older version name no worker: write, wait, read back; one wins."""
    study = _journal_study(tmp_path / "study.journal")
    _finish_trial(study, None, 0.5)
    first = workers.claim_finalizer(study, 1, settle_seconds=0.0, group="A")
    assert first and _system_attrs(study)["finalizer_1"].startswith("A:")
    assert not workers.claim_finalizer(study, 1, settle_seconds=0.0, group="B")


# -----------------------------------------------------------------------------------------------
# PostgreSQL: concurrent creation, heartbeats


CREATE_STUDY = r"""
import os, sys, time
from tuner.config import SearchConfig
from tuner.search import open_study
from tuner.space import load_space

url, barrier, space = sys.argv[1], sys.argv[2], sys.argv[3]
config = SearchConfig(data_dir="data", run_dir=".", storage=url, study_name="race", space=space)
space = load_space(space)
open(f"{barrier}.{os.getpid()}", "w").close()  # imported: ready
while not os.path.exists(barrier):  # all go at once
    time.sleep(0.002)
study = open_study(config, space)
print("opened", study.study_name, flush=True)
"""


def test_workers_creating_one_study_on_a_fresh_database_do_not_race(postgres_server, tmp_path):
    """Optuna's table creation races between processes: every worker must still start.

    Several processes open the same new study on an empty database at the same instant: all of
    them get it, there is one study, and its baseline trial is queued once (by its creator).
    """
    import optuna
    from optuna.trial import TrialState

    url = postgres_server.fresh_db("race")
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_SPACE_NO_TF)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    barrier = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CREATE_STUDY, url, str(barrier), str(space)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env, cwd=tmp_path) for _ in range(STARTERS)]
    deadline = time.monotonic() + 240
    while len(list(tmp_path.glob("go.*"))) < STARTERS:  # every interpreter has imported
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        assert time.monotonic() < deadline, "the starters never got ready"
        time.sleep(0.05)
    barrier.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "opened race" in out, err[-3000:]
    storage = tstorage.open_storage(url)
    assert optuna.get_all_study_names(storage) == ["race"]
    study = optuna.load_study(study_name="race", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.WAITING]  # one baseline only
    assert study.metric_names == ["val_balanced_accuracy"]


def test_bad_storage_url_fails_fast_with_one_message(postgres_server):
    from tuner.errors import UsageError

    start = time.monotonic()
    with pytest.raises(UsageError, match="cannot open"):
        tstorage.open_storage(f"postgresql://postgres@127.0.0.1:{postgres_server.port}/no_such_db")
    assert time.monotonic() - start < 10, "a wrong URL is not a race: no retries"


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_heartbeat_fails_and_retries_a_silent_worker_on_another_machine(postgres_server,
                                                                          monkeypatch):
    """The path for workers on other machines: no process id to check, only heartbeats."""
    import optuna
    from optuna.trial import TrialState

    url = postgres_server.fresh_db("hb")
    monkeypatch.setenv("PERSONCLF_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("PERSONCLF_GRACE_PERIOD", "2")
    storage = tstorage.open_storage(url)
    assert (storage.heartbeat_interval, storage.grace_period) == (1, 2)
    monkeypatch.delenv("PERSONCLF_GRACE_PERIOD")
    assert tstorage.open_storage(url).grace_period == tstorage.GRACE_PERIOD == 30

    study = optuna.create_study(study_name="hb", storage=storage, direction="maximize")
    silent = study.ask()
    x = silent.suggest_float("x", 0.0, 1.0)
    for key, value in (("worker_host", "another-machine"), ("worker_pid", 1),
                       ("worker_ns", "boot/pid:[1]")):
        study._storage.set_trial_system_attr(silent._trial_id, key, value)
    beating = study.ask()
    beating.suggest_float("x", 0.0, 1.0)
    study._storage.set_trial_system_attr(beating._trial_id, "worker_host", "another-machine")
    study._storage.set_trial_system_attr(beating._trial_id, "worker_pid", 2)

    with tstorage.heartbeat(study._storage, silent._trial_id):
        time.sleep(0.1)  # it beat once, then its machine went away
    assert tstorage.fail_dead_trials(study) == []  # within the grace period
    with tstorage.heartbeat(study._storage, beating._trial_id):
        time.sleep(3.5)  # the other worker keeps beating past the grace period
        assert tstorage.fail_dead_trials(study) == [silent.number]
        assert tstorage.fail_dead_trials(study) == []  # nothing twice
    trials = study.get_trials()
    assert trials[silent.number].state == TrialState.FAIL
    assert "no heartbeat" in trials[silent.number].system_attrs["fail_reason"]
    assert trials[beating.number].state == TrialState.RUNNING
    retry = study.ask()  # the silent trial's parameters come first
    assert retry.user_attrs == {"retry_of": silent.number, "retries": 1}
    assert retry.suggest_float("x", 0.0, 1.0) == x


# -----------------------------------------------------------------------------------------------
# Real runs


@pytest.fixture(scope="module")
def work(tmp_path_factory, sample_dir, mobilenet_025_weights):
    root = tmp_path_factory.mktemp("workers")
    data, space = tiny_search_dir(root, sample_dir, PEOPLE, PER_CLASS)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for name in ("PERSONCLF_WORKER", workers.GROUP_ENV, "PERSONCLF_GRACE_PERIOD",
                 "PERSONCLF_HEARTBEAT_INTERVAL"):
        env.pop(name, None)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        yield SimpleNamespace(root=root, data=data, space=space, env=env,
                              weights=Path(mobilenet_025_weights))


def search_cmd(work, out: Path, trials: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tuner.cli", "--data", str(work.data), "--trials", str(trials),
            "--space", str(work.space), "--max-epochs", "1", "--weights", str(work.weights),
            "--no-pruning", "--no-export", "--output", str(out), *extra]


def call(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def _tail(paths) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in paths if p.exists())


def wait_for_running_trial(load, procs: dict[int, subprocess.Popen], logs, timeout=300):
    """The first trial RUNNING in one of `procs` (by pid) with its training under way."""
    from optuna.trial import TrialState

    deadline = time.monotonic() + timeout
    while True:
        for pid, p in procs.items():
            assert p.poll() is None, f"worker {pid} exited early:\n{_tail(logs)}"
        assert time.monotonic() < deadline, f"no trial ever ran:\n{_tail(logs)}"
        try:
            study = load()
        except KeyError:  # not created yet
            study = None
        if study is not None:
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                pid = t.system_attrs.get("worker_pid")
                if pid in procs and "trial_params" in t.user_attrs:
                    return t
        time.sleep(0.3)


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def check_killed_and_retried(trials, victim, killed_pid: int, n: int):
    """Exactly n finished (all COMPLETE: no pruning); the killed trial failed, its parameters rerun."""
    from optuna.trial import TrialState

    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) and numbers == sorted(numbers)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == n, [(t.number, t.state.name) for t in trials]
    assert not [t for t in trials if t.state in (TrialState.PRUNED, TrialState.RUNNING,
                                                  TrialState.WAITING)]
    killed = trials[victim.number]
    assert killed.state == TrialState.FAIL
    assert f":{killed_pid} died" in killed.system_attrs["fail_reason"]
    retries = [t for t in trials if t.user_attrs.get("retry_of") == killed.number]
    assert len(retries) == 1, "the killed trial was retried once"
    retry = retries[0]
    assert retry.number > killed.number and retry.state == TrialState.COMPLETE
    assert retry.params == killed.params
    assert retry.user_attrs["trial_params"] == killed.user_attrs["trial_params"]
    assert retry.system_attrs["worker_pid"] != killed_pid
    # Any other failure is a surplus trial that stepped back (two workers, one last slot).
    for t in trials:
        if t.state == TrialState.FAIL and t.number != killed.number:
            assert t.system_attrs.get("fail_reason") == "surplus", t.system_attrs
    return retry


@pytest.mark.slow
def test_three_workers_on_postgres_survive_a_kill(work, postgres_server):
    """Three machines' worth of workers (own run directories) on one PostgreSQL study.

    One is killed with SIGKILL mid-trial; the others fail its trial (dead process id: same host)
    and rerun its parameters, and together they finish exactly TRIALS trials. The killed worker,
    restarted with the same command, rejoins. The worker that finished the study retrains the
    best trial, once; `report --storage` lists every trial.
    """
    import optuna

    url = postgres_server.fresh_db("workers")
    command = [search_cmd(work, work.root / f"pg-{i}", TRIALS, "--storage", url,
                          "--study-name", "s") for i in range(3)]
    workers_ = []  # (process, run directory, log), the restarted one last

    def start(i: int, log: Path) -> subprocess.Popen:
        with open(log, "w") as fh:
            proc = subprocess.Popen(command[i], cwd=work.root, env=work.env, stdout=fh,
                                    stderr=subprocess.STDOUT)
        workers_.append((proc, work.root / f"pg-{i}", log))
        return proc

    for i in range(3):
        start(i, work.root / f"pg-{i}.log")
    logs = [w[2] for w in workers_]
    try:
        storage = tstorage.open_storage(url)
        victim = wait_for_running_trial(lambda: optuna.load_study(study_name="s", storage=storage),
                                        {w[0].pid: w[0] for w in workers_}, logs)
        v = next(i for i, w in enumerate(workers_) if w[0].pid == victim.system_attrs["worker_pid"])
        victim_proc = workers_[v][0]
        kill(victim_proc)
        start(v, work.root / f"pg-{v}-restarted.log")  # the same command again: it rejoins
        for proc, _, _ in workers_:
            proc.wait(timeout=420)
    finally:
        for proc, _, _ in workers_:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    survivors = [w for w in workers_ if w[0] is not victim_proc]
    for proc, _, log in survivors:
        assert proc.returncode == 0, _tail([log])

    study = optuna.load_study(study_name="s", storage=tstorage.open_storage(url))
    trials = study.get_trials()
    check_killed_and_retried(trials, victim, victim_proc.pid, TRIALS)

    # The best trial was retrained once, by the worker that finished the study.
    runs = [work.root / f"pg-{i}" for i in range(3)]
    assert [run for run in runs if (run / "best").exists()] == [
        w[1] for w in survivors if "Best trial retrained" in w[2].read_text()], \
        "best/ must come from the one worker that printed its retrain"
    finalizers = [w for w in survivors if "Best trial retrained" in w[2].read_text()]
    assert len(finalizers) == 1, [w[2].name for w in finalizers]
    proc, run, log = finalizers[0]
    assert _system_attrs(study)[f"finalizer_{TRIALS}"].split(":")[:2] == [
        socket.gethostname(), str(proc.pid)]
    # ... and that worker is the one that ran the trial that finished the study.
    last = max((t for t in trials if t.state.is_finished() and t.value is not None),
               key=lambda t: (t.datetime_complete, t.number))
    assert last.system_attrs["worker_pid"] == proc.pid
    manifest = json.loads((run / "best" / "manifest.json").read_text())
    best = max((t for t in trials if t.value is not None), key=lambda t: (t.value, -t.number))
    assert manifest["source"]["trial"] == best.number
    for other in survivors:
        if other is not finalizers[0]:
            assert "another worker retrains" in other[2].read_text()
    # Every surviving worker wrote the study's tables into its own run directory.
    for _, run, _ in survivors:
        table = pd.read_csv(run / "trials.csv")
        assert table["number"].tolist() == [t.number for t in trials]

    # `report` from the storage URL alone (any machine), into results/<study> by default.
    reporter = work.root / "elsewhere"
    reporter.mkdir()
    os.chdir(reporter)
    try:
        code, out, err = call(["report", "--storage", url, "--study-name", "s"])
    finally:
        os.chdir(work.root)
    assert code == 0, out + err
    table = pd.read_csv(reporter / "results" / "s" / "trials.csv")
    assert table["number"].tolist() == [t.number for t in trials]
    assert table["state"].tolist() == [t.state.name for t in trials]
    assert "Backbones:" in out and "MobileNet" in out
    assert sorted(p.name for p in reporter.iterdir()) == ["results"], "report littered the cwd"
    code, out, err = call(["report", "--storage", url, "--study-name", "nope",
                           "--output", str(reporter / "x")])
    assert code == 2 and "no study 'nope'" in err and "studies there: s" in err


@pytest.mark.slow
def test_local_workers_on_a_journal_survive_a_kill(work):
    """`--workers 2`, no --storage: the journal in the run directory; one child is killed.

    The surviving child reruns the killed trial's parameters; the parent waits for both,
    then retrains and reports the best trial, once.
    """
    from optuna.trial import TrialState

    run = work.root / "local"
    log = work.root / "local.log"
    journal = run / "study.journal"

    def load():
        import optuna

        if not journal.exists():
            raise KeyError("no journal yet")
        return optuna.load_study(study_name="personclf",
                                 storage=tstorage.open_storage(f"journal:{journal}"))

    children: list[int] = []
    with open(log, "w") as fh:
        parent = subprocess.Popen(search_cmd(work, run, TRIALS, "--workers", "2"), cwd=work.root,
                                  env=work.env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        # The children's pids, from their start-up lines ("worker PID on RUN").
        deadline = time.monotonic() + 120
        while len(children) < 2:
            assert parent.poll() is None, _tail([log])
            assert time.monotonic() < deadline, _tail([log])
            time.sleep(0.2)
            children = [int(pid) for pid in re.findall(r"^worker (\d+) on ", log.read_text(), re.M)]
        child_procs = {pid: SimpleNamespace(poll=lambda pid=pid: None if workers.pid_alive(pid)
                                            else 1) for pid in children}
        victim = wait_for_running_trial(load, child_procs, [log])
        victim_pid = victim.system_attrs["worker_pid"]
        assert victim_pid in children and victim_pid != parent.pid
        os.kill(victim_pid, signal.SIGKILL)
        parent.wait(timeout=420)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    text = log.read_text()
    assert parent.returncode == 0, text[-4000:]
    assert "exited with -9" in text  # the parent saw its child die

    trials = load().get_trials()
    check_killed_and_retried(trials, victim, victim_pid, TRIALS)
    assert {t.system_attrs["worker_pid"] for t in trials
            if t.state == TrialState.COMPLETE} <= set(children)
    # Retrained once, by the parent (workers never retrain): one best/, one test report.
    assert text.count("Best trial retrained") == 1
    assert (run / "best" / "manifest.json").is_file()
    table = pd.read_csv(run / "trials.csv")
    assert table["number"].tolist() == [t.number for t in trials]
    assert "died" in str(table.loc[table["number"] == victim.number, "error"].iloc[0])


PARENT = """
import sys, time
from tuner import workers
sys.executable = sys.argv[1]  # a stand-in worker: records its pid, then sleeps
workers.POLL_SECONDS = 0.05
open(sys.argv[2] + ".ready", "w").close()
workers.run_local_workers([], 2)
"""


def _stand_in_workers(tmp_path: Path, kill_with: int) -> list[int]:
    """Start run_local_workers in a process whose two "workers" are shell scripts that sleep,
    send the parent `kill_with` once both run, and return the workers' pids."""
    pids = tmp_path / "pids"
    fake = tmp_path / "fake_python"
    fake.write_text(f"#!/bin/sh\necho $$ >> {pids}\nexec sleep 120\n")
    fake.chmod(0o755)
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(fake), str(tmp_path / "p")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (pids.exists() and len(pids.read_text().split()) == 2):
        assert time.monotonic() < deadline and parent.poll() is None, parent.communicate()
        time.sleep(0.05)
    parent.send_signal(kill_with)
    parent.wait(timeout=30)
    return [int(p) for p in pids.read_text().split()]


@pytest.mark.parametrize("kill_with", [signal.SIGTERM, signal.SIGKILL])
def test_workers_stop_with_their_parent(tmp_path, kill_with):
    """SIGTERM (docker stop, systemd, timeout) reaches the workers as Ctrl-C; SIGKILL of the
    parent reaches them as SIGTERM from the kernel. Before, both left the workers running the
    study unattended, beside the next start's own."""
    children = _stand_in_workers(tmp_path, kill_with)
    deadline = time.monotonic() + 10
    while any(workers.pid_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(workers.pid_alive(pid) for pid in children)
