"""Multi-host (multi-process) runs: start-up from the environment, and the few places where a
host's memory meets arrays that span every host's devices.

One process runs per host (per GPU node, per TPU VM); all of them run the same program on the
same host-side data (same seeds, same prompt order), so host values agree without messages.
`maybe_initialize()` calls `jax.distributed.initialize` when the environment describes such a
run, before anything touches a device:

- explicit: JAXCOV_COORDINATOR_ADDRESS (host:port of process 0), JAXCOV_NUM_PROCESSES and
  JAXCOV_PROCESS_ID, all three or none;
- SLURM: `srun` with more than one task (SLURM_NTASKS > 1); jax reads the rest;
- a multi-host Cloud TPU slice, from the variables TPU VMs and GKE set (TPU_WORKER_HOSTNAMES
  naming more than one host, MEGASCALE_COORDINATOR_ADDRESS, TPU_HOST_BOUNDS beyond one host);
- JAXCOV_DISTRIBUTED=jax: always, with jax's own cluster detection (e.g. a GCE TPU pod whose
  hosts are known only to the metadata server); JAXCOV_DISTRIBUTED=off: never.

After that the helpers keep single-process runs exactly as they were: `to_global` is
`jax.device_put` and `to_host` is `np.asarray` unless an array spans other processes.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Sharding

from jaxcov.config import ConfigError

EXPLICIT_VARIABLES = ("JAXCOV_COORDINATOR_ADDRESS", "JAXCOV_NUM_PROCESSES", "JAXCOV_PROCESS_ID")
# What jax's SLURM detection reads (jax/_src/clusters/slurm_cluster.py).
SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                   "SLURM_LOCALID")
MODES = ("auto", "jax", "off")


# ------------------------------------------------------------------------------------ start-up


def launch_plan(environ: Mapping[str, str] = os.environ) -> Optional[dict]:
    """The `jax.distributed.initialize` arguments the environment asks for ({} lets jax detect
    the cluster itself), or None for a single-process run. A partial set of explicit
    variables, or SLURM tasks not started by srun, is a ConfigError naming what is missing."""
    mode = environ.get("JAXCOV_DISTRIBUTED", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ConfigError(f"JAXCOV_DISTRIBUTED: must be one of {list(MODES)}, got {mode!r}")
    if mode == "off":
        return None
    if any(environ.get(name) for name in EXPLICIT_VARIABLES):
        return _explicit_plan(environ)
    if mode == "jax":
        return {}
    if _int(environ, "SLURM_NTASKS", default=1) > 1:
        missing = [name for name in SLURM_VARIABLES if name not in environ]
        if missing:
            raise ConfigError(f"SLURM_NTASKS={environ['SLURM_NTASKS']} but {', '.join(missing)} "
                              f"{'is' if len(missing) == 1 else 'are'} not set: start each "
                              f"process with srun (or set JAXCOV_DISTRIBUTED=off)")
        return {}
    return {} if _tpu_pod(environ) else None


def _explicit_plan(environ: Mapping[str, str]) -> Optional[dict]:
    missing = [name for name in EXPLICIT_VARIABLES if not environ.get(name)]
    if missing:
        given = [name for name in EXPLICIT_VARIABLES if name not in missing]
        raise ConfigError(f"{', '.join(given)} set but {', '.join(missing)} not: a multi-process "
                          f"run needs all of {', '.join(EXPLICIT_VARIABLES)}")
    count = _int(environ, "JAXCOV_NUM_PROCESSES")
    index = _int(environ, "JAXCOV_PROCESS_ID")
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"JAXCOV_PROCESS_ID={index} must lie in [0, JAXCOV_NUM_PROCESSES="
                          f"{count})")
    if count == 1:
        return None
    return {"coordinator_address": environ["JAXCOV_COORDINATOR_ADDRESS"],
            "num_processes": count, "process_id": index}


def _int(environ: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    value = environ.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: must be an integer, got {value!r}") from None


def _tpu_pod(environ: Mapping[str, str]) -> bool:
    """The environment describes TPU hosts beyond this one: several slices (multislice), several
    worker hostnames, or host bounds larger than one host (the variables jax's TPU detection
    reads, see jax/_src/clusters/cloud_tpu_cluster.py)."""
    if environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    try:
        bounds = math.prod(int(b) for b in environ.get("TPU_HOST_BOUNDS", "1").split(","))
    except ValueError:
        bounds = 1
    return len(hosts) > 1 or bounds > 1


def maybe_initialize(environ: Mapping[str, str] = os.environ) -> bool:
    """Joins the multi-process run the environment describes (see the module docstring);
    returns whether this is one. Call it before anything touches a device."""
    plan = launch_plan(environ)
    if plan is None:
        return False
    if not jax.distributed.is_initialized():
        # On CPU, cross-process collectives use jax's default implementation (gloo).
        try:
            jax.distributed.initialize(**plan)
        except ValueError as e:  # jax's detection found no cluster
            raise ConfigError(f"jax.distributed.initialize: {e} (set {', '.join(EXPLICIT_VARIABLES)}"
                              f", or JAXCOV_DISTRIBUTED=off)") from None
        _label_log_records(log_prefix())
    return True


def _label_log_records(prefix: str) -> None:
    """Every `logging` message (jaxcov's and libraries') starts with the process label."""
    if not prefix:
        return
    make_record = logging.getLogRecordFactory()

    def labelled(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        record.msg = f"{prefix}{record.msg}"
        return record

    logging.setLogRecordFactory(labelled)


# ------------------------------------------------------------------------------------ identity


def is_main_process() -> bool:
    """Process 0 writes what must be written once (metrics, plots, exports)."""
    return jax.process_index() == 0


def log_prefix() -> str:
    """'[process 1/2] ' in a multi-process run, '' otherwise (never starts a backend itself)."""
    if not jax.distributed.is_initialized() or jax.process_count() == 1:
        return ""
    return f"[process {jax.process_index()}/{jax.process_count()}] "


def log(message: str) -> None:
    """One line on stderr, saying which process wrote it when there are several."""
    print(f"{log_prefix()}{message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- host <-> global


def to_global(x: Any, sharding: Sharding) -> jax.Array:
    """A host value (the same on every process) as an array laid out by `sharding`; each
    process transfers only the pieces its own devices hold. (`jax.device_put` would first
    all-gather the whole value to check that every process passed the same one.)"""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_host(x: Any) -> np.ndarray:
    """The whole value of an array on this host (all-gathered when it spans other processes:
    then every process must call this at the same point)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def tree_to_host(tree: Any) -> Any:
    """`to_host` of every leaf."""
    return jax.tree.map(to_host, tree)


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process (e.g. one host got SIGTERM: all must stop)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, bool))))


# ------------------------------------------------------------------------ rows split by process


def process_rows(total: int, index: Optional[int] = None, count: Optional[int] = None) -> slice:
    """The contiguous part of `total` rows that process `index` (default: this one) works on;
    parts differ in size by at most one row."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    return slice(index * total // count, (index + 1) * total // count)


def gather_rows(part: np.ndarray, total: int) -> np.ndarray:
    """The [total, ...] array whose `process_rows` part each process holds, on every process."""
    count = jax.process_count()
    if count == 1:
        return np.asarray(part)
    part = np.ascontiguousarray(part)
    # Moved as raw bytes: exact for every dtype (jax would turn float64 into float32).
    row_bytes = part.dtype.itemsize * math.prod(part.shape[1:])
    padded = np.zeros((-(-total // count), row_bytes), np.uint8)  # room for the largest part
    padded[:len(part)] = part.view(np.uint8).reshape(len(part), row_bytes)
    stacked = np.asarray(multihost_utils.process_allgather(padded))  # [count, size, row_bytes]
    sizes = [len(range(total)[process_rows(total, i, count)]) for i in range(count)]
    joined = np.concatenate([stacked[i, :n] for i, n in enumerate(sizes)])
    return joined.reshape(-1).view(part.dtype).reshape((total,) + part.shape[1:])


def score_batch(responses: Sequence[str], rows: Sequence[dict], response_lengths: Sequence[int],
                config: Any) -> tuple[np.ndarray, dict]:
    """`rewards.score_batch` with verification split over the processes: each scores its own
    `process_rows` part and the per-row results are all-gathered, so every process returns the
    same rewards and metrics (those of one process scoring everything)."""
    from jaxcov.rewards.scoring import score_batch_part

    total = len(responses)
    return score_batch_part(responses, rows, response_lengths, config, process_rows(total),
                            join=lambda scores: scores.map_arrays(lambda a: gather_rows(a, total)))
