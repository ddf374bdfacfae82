"""A persistent pool of worker processes whose every task has a hard time bound.

Why not `multiprocessing.Pool` or `concurrent.futures`: neither can stop one task that hangs
(a sympy call on `9^{9^{9^9}}` never returns), and math-verify's own SIGALRM timeout works only
in a main thread. Here each worker gets one task at a time and the pool waits on the pipes until
the earliest deadline; a task past its bound is stopped by killing its worker (SIGKILL), which
is replaced, and the task reports "timeout". Results come back in input order and do not depend
on which worker ran what.

The bound is on the CPU time the task used (read from /proc), so a machine busy with other work
does not turn a slow but finite answer into a timeout: scores do not depend on load. A task is
also killed after `WALL_CAP_FACTOR` times the bound of wall-clock time whatever its CPU time, and
where /proc is missing the bound is plain wall-clock time.

Two layers:
- `WorkerPool` forks its workers from the process it lives in, so that process must be a clean,
  single-threaded one: forking the trainer (JAX threads) is unsafe, and `spawn`/`forkserver`
  would re-import the trainer's `__main__` in every worker.
- `VerifierPool` (what the trainer uses) starts such a clean host process
  (`python -m jaxcov.rewards._pool_host`), which imports and warms up math-verify once and keeps
  a `WorkerPool`; a replacement worker is then a `fork` away (milliseconds).
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import importlib
import math
import multiprocessing
import os
import socket
import subprocess
import sys
import time
import weakref
from multiprocessing.connection import Connection, wait
from typing import Any, Optional, Sequence

_READY = "ready"


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """Outcome of one task: status is "ok", "timeout" or "error" (value is None unless "ok")."""

    status: str
    value: Any = None


def limit_process(memory_mb: int) -> None:
    """Caps the worker's address space and makes it die with its parent (Linux, best effort)."""
    try:
        import resource
        if memory_mb > 0:
            limit = memory_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass
    try:
        import ctypes
        import signal
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: no orphaned sympy loops
    except (OSError, AttributeError):
        pass


def resolve_function(path: str):
    """The function named by `package.module:function`."""
    module_name, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def _worker_main(conn, function_path: str, memory_mb: int) -> None:
    limit_process(memory_mb)
    function = resolve_function(function_path)
    warm_up = getattr(importlib.import_module(function_path.partition(":")[0]), "warm_up", None)
    if warm_up is not None:
        warm_up()
    conn.send(_READY)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        index, args = message
        try:
            reply = (index, "ok", function(*args))
        except BaseException as e:  # noqa: BLE001  MemoryError, RecursionError, ... all count
            # Only the type: str() of a sympy exception can itself take forever.
            reply = (index, "error", type(e).__name__)
        conn.send(reply)


@dataclasses.dataclass
class _Worker:
    process: Any
    conn: Any
    started: float
    ready: bool = False
    task: Optional[int] = None
    deadline: float = 0.0     # when to look at the task next
    task_wall_start: float = 0.0
    task_cpu_start: Optional[float] = None


# The bound is on the CPU time a task uses, so a busy machine does not turn slow but finite
# answers into timeouts (scores stay reproducible under load); a task that does not use its CPU
# (blocked, starved) is still killed after this many times the bound of wall-clock time.
WALL_CAP_FACTOR = 10.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> Optional[float]:
    """User + system CPU seconds of a process from /proc (Linux); None where unavailable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime
    except (OSError, IndexError, ValueError):
        return None


class _TaskQueue:
    """Task indices split into one contiguous run per worker, with work stealing.

    Neighbouring tasks tend to share work (the samples of one prompt share its ground truth,
    which each worker parses once and caches), so each worker takes its own run in order; a
    worker that runs out steals the back half of the longest remaining run.
    """

    def __init__(self, num_tasks: int, num_workers: int):
        bounds = [num_tasks * k // num_workers for k in range(num_workers + 1)]
        self._runs = [collections.deque(range(bounds[k], bounds[k + 1]))
                      for k in range(num_workers)]

    def __bool__(self) -> bool:
        return any(self._runs)

    def pop(self, worker: int) -> Optional[int]:
        """The next task for worker slot `worker`, or None when no task is left."""
        own = self._runs[worker]
        if not own:
            longest = max(self._runs, key=len)
            stolen = [longest.pop() for _ in range((len(longest) + 1) // 2)]
            own.extend(reversed(stolen))
        return own.popleft() if own else None


class WorkerPool:
    """Runs `function(*args)` for many argument tuples in parallel, each under a time bound.

    Args:
      function_path: `module:function` the workers import (its module may define `warm_up()`).
      num_workers: number of worker processes kept alive between calls.
      memory_mb: address-space cap per worker (0: none), so a huge number cannot exhaust memory.
      startup_timeout_s: how long a worker may take to start before the pool gives up.
      start_method: multiprocessing start method; "fork" only from a clean single-threaded process.
    """

    def __init__(self, function_path: str, num_workers: int, memory_mb: int = 2048,
                 startup_timeout_s: float = 120.0, start_method: str = "fork"):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.function_path = function_path
        self.num_workers = num_workers
        self.memory_mb = memory_mb
        self.startup_timeout_s = startup_timeout_s
        self.restarts = 0
        self._context = multiprocessing.get_context(start_method)
        self._workers = [self._start_worker() for _ in range(num_workers)]
        _live_pools.add(self)

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main, args=(child_conn, self.function_path, self.memory_mb),
            daemon=True, name="jaxcov-verifier")
        process.start()
        child_conn.close()
        return _Worker(process, parent_conn, started=time.monotonic())

    def _replace(self, worker: _Worker) -> None:
        _stop(worker)
        self._workers[self._workers.index(worker)] = self._start_worker()
        self.restarts += 1

    def wait_ready(self) -> None:
        """Blocks until every worker has started (`run` also waits for the ones it needs)."""
        while not all(w.ready for w in self._workers):
            self._wait_and_collect([])
            self._expire([], 0.0)

    def run(self, tasks: Sequence[tuple], timeout_s: float) -> list[TaskResult]:
        """Runs every task; result i belongs to task i. A task past the bound gets "timeout"."""
        results: list[Optional[TaskResult]] = [None] * len(tasks)
        queue = _TaskQueue(len(tasks), len(self._workers))
        while queue or any(w.task is not None for w in self._workers):
            self._dispatch(queue, tasks, timeout_s)
            self._wait_and_collect(results)
            self._expire(results, timeout_s)
        return results  # type: ignore[return-value]

    def _dispatch(self, queue: _TaskQueue, tasks, timeout_s: float) -> None:
        for slot, worker in enumerate(self._workers):
            if worker.ready and worker.task is None and queue:
                index = queue.pop(slot)
                worker.task_cpu_start = process_cpu_seconds(worker.process.pid)
                worker.task_wall_start = time.monotonic()
                worker.conn.send((index, tuple(tasks[index])))
                worker.task = index
                worker.deadline = worker.task_wall_start + timeout_s

    def _wait_and_collect(self, results) -> None:
        now = time.monotonic()
        deadlines = [w.deadline for w in self._workers if w.task is not None]
        deadlines += [w.started + self.startup_timeout_s for w in self._workers if not w.ready]
        timeout = max(0.0, min(deadlines) - now) if deadlines else 0.0
        by_conn = {w.conn: w for w in self._workers if w.task is not None or not w.ready}
        for conn in wait(list(by_conn), timeout=timeout):
            self._receive(by_conn[conn], results)

    def _receive(self, worker: _Worker, results) -> None:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):  # the worker died (segfault, OOM kill, ...)
            if not worker.ready:
                raise RuntimeError(f"reward worker for {self.function_path} died while starting "
                                   f"(exit code {worker.process.exitcode})") from None
            if worker.task is not None:
                results[worker.task] = TaskResult("error")
            self._replace(worker)
            return
        if message == _READY:
            worker.ready = True
            return
        index, status, value = message
        results[index] = TaskResult(status, value if status == "ok" else None)
        worker.task = None

    def _expire(self, results, timeout_s: float) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.task is not None and now >= worker.deadline:
                cpu_left = self._cpu_left(worker, timeout_s, now)
                if cpu_left > 0:
                    worker.deadline = now + max(cpu_left, 0.01)  # starved, not slow: wait on
                    continue
                results[worker.task] = TaskResult("timeout")
                self._replace(worker)
            elif not worker.ready and now >= worker.started + self.startup_timeout_s:
                raise RuntimeError(f"reward worker did not start within {self.startup_timeout_s} s")

    @staticmethod
    def _cpu_left(worker: _Worker, timeout_s: float, now: float) -> float:
        """CPU seconds the running task may still use; <= 0 means kill it now."""
        if now - worker.task_wall_start >= WALL_CAP_FACTOR * timeout_s:
            return 0.0
        cpu_now = process_cpu_seconds(worker.process.pid)
        if cpu_now is None or worker.task_cpu_start is None:
            return 0.0  # no CPU accounting here: the bound is wall-clock time
        return timeout_s - (cpu_now - worker.task_cpu_start)

    def close(self) -> None:
        """Stops every worker; the pool cannot be used afterwards."""
        for worker in self._workers:
            _stop(worker, graceful=True)
        self._workers = []
        _live_pools.discard(self)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _stop(worker: _Worker, graceful: bool = False) -> None:
    if graceful and worker.ready and worker.task is None:
        try:
            worker.conn.send(None)
            worker.process.join(timeout=1.0)
        except (OSError, ValueError):
            pass
    if worker.process.is_alive():
        worker.process.kill()
    worker.process.join(timeout=5.0)
    worker.conn.close()


class VerifierPool:
    """What the trainer holds: a clean host process running a `WorkerPool`, used batch by batch.

    Args:
      function_path: `module:function` each task calls (its module may define `warm_up()`).
      num_workers: worker processes; they stay alive across batches.
      memory_mb: address-space cap per worker (0: none).
      startup_timeout_s: how long the host may take to import, warm up and fork its workers.
    """

    def __init__(self, function_path: str, num_workers: int, memory_mb: int = 2048,
                 startup_timeout_s: float = 120.0):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.function_path = function_path
        self.num_workers = num_workers
        self.memory_mb = memory_mb
        self.startup_timeout_s = startup_timeout_s
        self.restarts = 0  # workers replaced after a timeout or crash, over the pool's life
        self._restarts_of_dead_hosts = 0
        self._host: Optional[subprocess.Popen] = None
        self._conn: Optional[Connection] = None
        self._start_host()
        _live_pools.add(self)

    def _start_host(self) -> None:
        parent_socket, child_socket = socket.socketpair()
        command = [sys.executable, "-m", "jaxcov.rewards._pool_host", str(child_socket.fileno()),
                   self.function_path, str(self.num_workers), str(self.memory_mb)]
        self._host = subprocess.Popen(command, pass_fds=[child_socket.fileno()],
                                      stdin=subprocess.DEVNULL, env=_host_environment())
        child_socket.close()
        self._conn = Connection(parent_socket.detach())
        if not self._conn.poll(self.startup_timeout_s):
            self._kill_host()
            raise RuntimeError(f"reward verifier pool did not start in {self.startup_timeout_s} s")
        try:
            self._conn.recv()  # ("ready", pid)
        except EOFError:
            code = self._host.wait()
            raise RuntimeError(f"reward verifier pool failed to start (exit code {code}); "
                               "see its error output above") from None

    def run(self, tasks: Sequence[tuple], timeout_s: float) -> list[TaskResult]:
        """Runs `function(*task)` for every task; result i belongs to task i."""
        if not tasks:
            return []
        if self._conn is None:
            raise RuntimeError("the verifier pool is closed")
        if self._host.poll() is not None:  # died between batches: start a new one first
            self._restart_host()
        try:
            self._conn.send(("run", [tuple(t) for t in tasks], float(timeout_s)))
            # The host bounds every task itself; this outer bound only guards against a host bug.
            rounds = math.ceil(len(tasks) / self.num_workers)
            if self._conn.poll(2 * rounds * timeout_s + 60.0):
                _, results, restarts = self._conn.recv()
                self.restarts = self._restarts_of_dead_hosts + restarts
                return results
        except (EOFError, OSError):
            pass
        self._restart_host()  # dead or stuck: every answer of this batch is an error
        return [TaskResult("error") for _ in tasks]

    def cpu_seconds(self) -> Optional[float]:
        """CPU seconds used so far by the host and its live workers (Linux; None elsewhere)."""
        pid = self._host.pid if self._host is not None else None
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                pids = [pid] + [int(child) for child in f.read().split()]
        except (OSError, ValueError):
            return None
        seconds = [process_cpu_seconds(p) for p in pids]
        return None if None in seconds else sum(seconds)

    def _restart_host(self) -> None:
        self._kill_host()
        self.restarts += self.num_workers
        self._restarts_of_dead_hosts = self.restarts
        self._start_host()

    def _kill_host(self) -> None:
        if self._host is not None and self._host.poll() is None:
            self._host.kill()
        if self._host is not None:
            self._host.wait()
        if self._conn is not None:
            self._conn.close()
        self._host, self._conn = None, None

    def close(self) -> None:
        """Stops the host and its workers."""
        if self._conn is not None:
            try:
                self._conn.send(None)
                self._host.wait(timeout=5.0)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._kill_host()
        _live_pools.discard(self)

    def __enter__(self) -> "VerifierPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _host_environment() -> dict:
    """The trainer's environment, with jaxcov importable even when it is not installed."""
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def default_num_workers() -> int:
    """One worker per core, at most 8: the trainer waits for its rewards, so the cores are free."""
    return max(1, min(8, os.cpu_count() or 1))


_live_pools: "weakref.WeakSet" = weakref.WeakSet()


@atexit.register
def _close_live_pools() -> None:
    for pool in list(_live_pools):
        pool.close()
