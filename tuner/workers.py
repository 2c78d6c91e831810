"""Many workers on one study: local worker processes, who is alive, and who finishes the run.

Optuna's storage is the scheduler: every worker asks the same study for its next trial, so
workers on one machine (`--workers K`, sharing a journal file) and on many machines (sharing a
PostgreSQL URL) need no coordinator. This module starts local workers with one GPU each
(round-robin over the visible GPUs; without GPUs, an equal share of the cores each), names
each worker process so that others can tell whether it is still alive, and decides which
single process retrains, reports and exports the best trial when the study is done.
"""
from __future__ import annotations

import datetime
import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

log = logging.getLogger(__name__)

FINALIZER_ATTR = "finalizer"
GROUP_ATTR = "worker_group"  # trial system attr: the process that finalizes for this trial's worker
GROUP_ENV = "PERSONCLF_WORKER_GROUP"  # set by a `--workers K` parent for its children
POLL_SECONDS = 0.5
# TensorFlow's thread pools: within one op (oneDNN's and Eigen's kernels) and between ops.
THREAD_ENV = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")

_worker_id: tuple[int, str] | None = None


def worker_id() -> str:
    """This process, uniquely among all machines and restarts: host:pid:random."""
    global _worker_id
    if _worker_id is None or _worker_id[0] != os.getpid():
        _worker_id = (os.getpid(), f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")
    return _worker_id[1]


def worker_group() -> str:
    """Who finalizes the trials this process runs: its `--workers K` parent, else itself."""
    return os.environ.get(GROUP_ENV) or worker_id()


def process_namespace() -> str:
    """"BOOT_ID/PIDNS" of this process: process ids compare only within one boot and namespace.

    Containers on one host (host networking gives them the host's name) each have their own
    process-id namespace; a rebooted machine has a new boot id. Empty parts where /proc lacks them.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()
    except OSError:
        boot = ""
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return f"{boot}/{pidns}"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` (on this machine, in this namespace) is still running.

    A zombie (exited, not yet reaped by its parent) counts as dead: signal 0 still reaches it.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def visible_gpus() -> list[str]:
    """GPU ids to hand out: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists, else none."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which a container or taskset narrows)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_threads_each(count: int, cpus: int | None = None) -> int:
    """TensorFlow threads for each of `count` CPU-only workers: an equal share of the cores.

    Left alone, every worker's thread pools size themselves to all the cores, and K workers
    oversubscribe them K times over. One trial scales poorly across threads anyway (stage 2 on
    two threads is 1.26x one), so K trials side by side on a share each finish more per hour
    (the README's Scaling out section has the measurements)."""
    return max(1, (cpus or usable_cpus()) // count)


def worker_env(index: int, gpus: list[str], group: str | None = None,
               count: int = 1) -> dict[str, str]:
    """Environment of local worker `index` of `count`: its own GPU when there are any (else its
    share of the CPU's cores), its number, its parent. Thread counts the user set are kept."""
    env = dict(os.environ)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
    elif count > 1:
        threads = str(cpu_threads_each(count))
        for var in THREAD_ENV:
            env.setdefault(var, threads)
    env["PERSONCLF_WORKER"] = str(index)
    env[GROUP_ENV] = group or worker_id()
    return env


def run_local_workers(worker_argv: list[str], count: int) -> list[int]:
    """Start `count` worker processes (`python -m tuner.cli search ... --worker`) and wait.

    Returns their exit codes (negative: killed by that signal). Ctrl-C stops them all, and so
    does SIGTERM (`docker stop`, systemd, `timeout`), which is passed on as Ctrl-C; a worker
    whose parent is killed outright gets SIGTERM from the kernel (Linux), so no worker goes on
    unattended beside the next run. A worker that dies leaves its trial to the others: they
    find it by its dead process id, fail it and run its parameters again. Children are reaped
    as soon as they exit, or a dead worker would linger as a zombie that still looks alive to
    the others.
    """
    gpus = visible_gpus()
    if not gpus and count > 1:
        cpus = usable_cpus()
        log.info("%d workers share %d CPUs: %s thread(s) each", count, cpus,
                 os.environ.get(THREAD_ENV[0]) or cpu_threads_each(count, cpus))
        if count > cpus:
            log.warning("--workers %d on %d CPUs and no GPU: workers beyond one per core only "
                        "take turns on the cores, each with its own memory", count, cpus)
    procs = []
    previous = _term_as_interrupt()
    try:
        for i in range(count):
            cmd = [sys.executable, "-m", "tuner.cli", "search", *worker_argv, "--worker"]
            procs.append(subprocess.Popen(cmd, env=worker_env(i, gpus, count=count),
                                          preexec_fn=functools.partial(_die_with_parent,
                                                                       os.getpid())))
            time.sleep(0.2)  # stagger the first storage writes a little
        while any(p.poll() is None for p in procs):
            time.sleep(POLL_SECONDS)
        codes = [p.returncode for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    for i, code in enumerate(codes):
        if code:
            log.warning("local worker %d (pid %d) exited with %s", i, procs[i].pid, code)
    return codes


def _term_as_interrupt():
    """Make SIGTERM raise KeyboardInterrupt here (main thread only); returns the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


def _die_with_parent(parent: int) -> None:
    """In a child, before it runs: ask Linux for SIGTERM when the parent dies (prctl
    PR_SET_PDEATHSIG), and exit if it already has; elsewhere nothing."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)


def claim_finalizer(study, trials: int, settle_seconds: float = 1.0,
                    group: str | None = None) -> bool:
    """True for exactly one of the processes sharing the study, once `trials` are finished.

    The study is finished by one trial: the `trials`-th to finish (by completion time, then
    number). The process that ran it (for `--workers K` children: their parent, see
    `worker_group`) finalizes. Finished trials never change, so every worker reads the same
    answer without a lock or a message. The winner records itself in the study
    (`finalizer_<trials>`), and a recorded finalizer is never replaced: a worker restarted after
    the end does nothing (a later rerun with more trials finalizes again).

    Where that trial names no worker (a study from an older version, or more trials finished
    than asked for) every candidate writes a token, waits `settle_seconds` for the others'
    writes to land and reads back: the last write wins for everyone alike.
    """
    from optuna.trial import TrialState

    name = f"{FINALIZER_ATTR}_{trials}"
    storage, study_id = study._storage, study._study_id
    if name in storage.get_study_system_attrs(study_id):
        return False
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    if len(done) < trials:
        return False  # not finished: whoever finishes it finalizes
    me = group or worker_group()
    if len(done) == trials:
        done = sorted(done, key=lambda t: (t.datetime_complete or datetime.datetime.max, t.number))
        owner = done[-1].system_attrs.get(GROUP_ATTR)
        if owner is not None:
            if owner != me:
                return False
            storage.set_study_system_attr(study_id, name, me)
            return True
    token = f"{me}:{uuid.uuid4().hex[:8]}"
    storage.set_study_system_attr(study_id, name, token)
    time.sleep(settle_seconds)
    return storage.get_study_system_attrs(study_id).get(name) == token
