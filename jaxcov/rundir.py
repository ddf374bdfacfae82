"""The run directory: checked writable before anything slow, and held by one process at a time.

A second `jaxcov train` on a run directory in use would write every metric twice and share the
checkpoints. The lock is an advisory `flock` on `run_dir/.lock`: the kernel releases it when the
holder exits, however it exits, so a killed run never blocks its own resume.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from typing import Iterator

import yaml

from jaxcov import distributed
from jaxcov.config import ConfigError, ExperimentConfig, to_dict

LOCK_FILE = ".lock"


def is_remote(path: str) -> bool:
    return "://" in path


def check_writable(directory: str, key: str) -> None:
    """Creates `directory` and writes a probe file in it; a ConfigError naming `key` and the
    reason if either fails. Remote (gs://) paths are left to their first write."""
    if is_remote(directory):
        return
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=directory)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{key} {directory}: cannot write there "
                          f"({e.strerror or type(e).__name__})") from None


def check_run_directories(config: ExperimentConfig) -> None:
    """The run directory and the checkpoint directory can both be written."""
    t = config.train
    check_writable(t.run_dir, "train.run_dir")
    check_writable(t.checkpoints, "train.checkpoint_dir" if t.checkpoint_dir else
                   "checkpoint directory")


def write_run_config(config: ExperimentConfig) -> None:
    if distributed.is_main_process():
        with open(os.path.join(config.train.run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(to_dict(config), f, sort_keys=False)


@contextlib.contextmanager
def run_directory_lock(run_dir: str) -> Iterator[None]:
    """Holds the run directory for this process (process 0 of a multi-host run), or raises a
    ConfigError naming the process that holds it."""
    if is_remote(run_dir) or not distributed.is_main_process():
        yield
        return
    fd = os.open(os.path.join(run_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _take(fd, run_dir)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays, as removing it would race a waiter


def _take(fd: int, run_dir: str) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        raise ConfigError(f"train.run_dir {run_dir} is in use by another jaxcov process "
                          f"(pid {holder}); wait for it to end or choose another "
                          "train.run_dir") from None
    except OSError as e:  # a file system without flock (some network mounts)
        distributed.log(f"jaxcov: warning: cannot lock {run_dir} ({e.strerror}); make sure no "
                        "other run uses it")
        return
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
