"""Compiled programs: how many each jitted entry point built, a warning when a run builds one
late (a shape that escaped its bucket), and the persistent compilation cache.

    update = jax.jit(compiles.counted("update", update_fn, describe=lambda p, o, batch, *a: ...))
    compiles.metrics()  # {"sampler/compiles": 2, "score/compiles": 1, "update/compiles": 1}

Python runs the body of a jitted function once per trace, which jax does once per new input
signature (shapes, dtypes, shardings, static arguments): so a count of calls to the traced body
is a count of programs built, whether XLA then compiles them or finds them in the cache.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
from typing import Callable, Iterator, Optional

import jax

# The programs whose counts are metrics (`<name>/compiles`), also when still 0.
PROGRAMS = ("sampler", "score", "update", "entropy")

_COUNTS: collections.Counter = collections.Counter()
_LAST_SHAPE: dict[str, str] = {}


def record(name: str, shape: str = "") -> None:
    """Counts one program of `name` (call it from inside the traced function)."""
    _COUNTS[name] += 1
    _LAST_SHAPE[name] = shape


def count(name: str) -> int:
    return _COUNTS[name]


def counted(name: str, fn: Callable, describe: Optional[Callable[..., str]] = None) -> Callable:
    """`fn`, recording a program of `name` (with `describe(*args)` as its shape) per trace."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        record(name, describe(*args, **kwargs) if describe else "")
        return fn(*args, **kwargs)
    if not hasattr(fn, "__name__"):  # a partial: name the program (jit_update), not "traced"
        traced.__name__ = traced.__qualname__ = name
    return traced


def metrics() -> dict[str, float]:
    return {f"{name}/compiles": float(_COUNTS[name]) for name in PROGRAMS}


@contextlib.contextmanager
def warn_if_compiled(when: str, late: bool) -> Iterator[None]:
    """Logs one line per program the block built, when `late` (after a run's warm-up most
    programs exist; each new one costs seconds to minutes of compile)."""
    from jaxcov.distributed import log

    before = dict(_COUNTS)
    yield
    if not late:
        return
    for name, total in _COUNTS.items():
        if total > before.get(name, 0):
            shape = f" for {_LAST_SHAPE[name]}" if _LAST_SHAPE.get(name) else ""
            log(f"jaxcov: warning: {when} compiled the {name} program again{shape} "
                f"({total} so far): a prompt width or prefix bucket first seen now")


# ---------------------------------------------------------------------- persistent cache

CACHE_ENV = "JAXCOV_COMPILATION_CACHE"  # a directory, or "off"
# Low enough to keep every program that costs a resumed run noticeable time (the sampler,
# scoring and update programs take seconds), high enough to skip one-op eager dispatches.
MIN_COMPILE_SECS = 0.1
MAX_CACHE_BYTES = 8 << 30  # least recently used entries go first


def cache_dir() -> Optional[str]:
    """Where compiled programs are kept: $JAXCOV_COMPILATION_CACHE ("off": nowhere), else jax's
    own JAX_COMPILATION_CACHE_DIR when set, else `xla` in the jaxcov cache directory."""
    from jaxcov.models.registry import cache_dir as jaxcov_cache

    chosen = os.environ.get(CACHE_ENV, "").strip()
    if chosen.lower() == "off":
        return None
    return chosen or jax.config.jax_compilation_cache_dir or os.path.join(jaxcov_cache(), "xla")


def enable_persistent_cache() -> Optional[str]:
    """Turns on jax's persistent compilation cache (before the first compile), so a resumed or
    repeated run loads its programs instead of compiling them; returns the directory."""
    path = cache_dir()
    jax.config.update("jax_enable_compilation_cache", path is not None)
    if path is None:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    jax.config.update("jax_compilation_cache_max_size", MAX_CACHE_BYTES)
    return path
