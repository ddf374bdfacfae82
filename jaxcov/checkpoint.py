"""Orbax checkpoints: asynchronous saves, keep-last-k, restore straight into target shardings.

A checkpoint holds the train state pytree (params, optimizer state, step, RNG key data) and a
small JSON record (data iterator position, run bookkeeping). Paths may be local or `gs://`
(orbax writes through tensorstore).

A failed save raises `CheckpointSaveError`. Orbax's commit threads of that save then wait forever,
so a process that met one leaves through `exit_abandoning_failed_saves` instead of joining them.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxcov.config import ConfigError
from jaxcov.distributed import is_main_process, log


def _abstract(tree: Any) -> Any:
    """ShapeDtypeStructs carrying each leaf's sharding, the restore target."""
    def leaf(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return jax.tree.map(leaf, tree)


def _leaf_shapes(tree: Any) -> dict[str, tuple]:
    """'params/layers/wq' -> shape; saved metadata and live state spell their paths alike."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(x.shape)
            for path, x in leaves}


def state_mismatch(saved: Any, target: Any) -> Optional[str]:
    """The first way a saved state tree (orbax metadata) does not fit `target`'s leaves and
    shapes, parameters first, or None when it fits. Orbax's own error names no leaf."""
    saved, target = _leaf_shapes(saved), _leaf_shapes(target)
    for path in sorted(target, key=lambda p: (not p.startswith("params/"), p)):
        if path not in saved:
            return f"it has no {path}"
        if saved[path] != target[path]:
            return (f"{path} has shape {list(saved[path])} in it, the model's is "
                    f"{list(target[path])}")
    extra = sorted(saved.keys() - target.keys(), key=lambda p: (not p.startswith("params/"), p))
    return f"it has {extra[0]}, which the model has not" if extra else None


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else "no message"


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the earlier checkpoints are untouched."""


# Set once any save of this process failed: its orbax threads will never finish.
_failed_saves: list[str] = []


def exit_abandoning_failed_saves(code: int) -> None:
    """Ends the process with `code` without joining the threads of a failed save (which never
    return); does nothing if no save failed."""
    if not _failed_saves:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Checkpointer:
    """Saves and restores (state pytree, JSON metadata) pairs by step."""

    def __init__(self, directory: str, keep: int = 2, asynchronous: bool = True):
        directory = directory if "://" in directory else os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=asynchronous)
        self.directory = directory
        self._pending: Optional[int] = None
        # Handlers named up front, so a fresh manager can read a checkpoint's metadata.
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(directory, options=options, item_handlers=handlers)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict, force: bool = True) -> None:
        """Starts saving `step` (an earlier asynchronous save must have succeeded first)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        with self._reporting_failure(f"step {step}"):
            self.manager.save(step, args=args, force=force)
        self._pending = step  # the step an asynchronous failure belongs to

    def restore(self, step: int, like_state: Any) -> tuple[Any, dict]:
        """Restores step `step` into the shapes, dtypes and shardings of `like_state`; a
        checkpoint of another architecture is a ConfigError naming it and the first mismatch."""
        saved = self.manager.item_metadata(step)["state"]
        problem = state_mismatch(getattr(saved, "tree", saved), like_state)
        if problem:
            where = os.path.join(str(self.manager.directory), str(step))
            raise ConfigError(f"checkpoint {where} does not fit the model: {problem}")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(like_state)),
                                  meta=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored["state"], dict(restored["meta"])

    def restore_newest(self, like_state: Any) -> tuple[Optional[int], Any, dict]:
        """(step, state, meta) of the newest checkpoint that restores, or (None, like_state, {})
        when there is none. Damaged newer ones (a truncated or missing file) are renamed to
        `<step>.damaged`, with a notice, so the run goes on from the older one; if every
        checkpoint is damaged, a ConfigError lists them and nothing is renamed."""
        failures = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, meta = self.restore(step, like_state)
            except ConfigError:
                raise  # another model's checkpoint is not damage: falling back would hide it
            except Exception as e:  # noqa: BLE001 (orbax and tensorstore raise many kinds)
                failures.append((step, f"{type(e).__name__}: {_first_line(e)}"))
                continue
            for damaged, reason in failures:
                self._set_aside(damaged, reason, step)
            return step, state, meta
        if failures:
            listed = "; ".join(f"step {s}: {r}" for s, r in failures)
            raise ConfigError(f"no checkpoint in {self.directory} can be restored ({listed}); "
                              "move them away to start the run afresh")
        return None, like_state, {}

    def _set_aside(self, step: int, reason: str, fallback: int) -> None:
        step_dir = epath.Path(self.directory) / str(step)
        if is_main_process():  # one rename of the shared directory
            step_dir.rename(step_dir.parent / f"{step}.damaged")
        self.manager.reload()
        log(f"jaxcov: warning: checkpoint {step} cannot be restored ({reason}); moved it to "
            f"{step_dir}.damaged and resuming from step {fallback}")

    def wait(self) -> None:
        """Blocks until every pending asynchronous save has been committed."""
        with self._reporting_failure(f"step {self._pending}"):
            self.manager.wait_until_finished()

    def close(self) -> None:
        if not _failed_saves:  # after a failure, waiting only raises the same error again
            self.wait()
        self.manager.close()

    def _reporting_failure(self, what: str):
        return _SaveFailure(f"saving {what} to {self.directory} failed", self.latest_good_step)

    def latest_good_step(self) -> Optional[int]:
        """The newest checkpoint committed on disk (orbax lists only committed ones)."""
        self.manager.reload()
        return self.manager.latest_step()


class _SaveFailure:
    """Turns any error of a save into one `CheckpointSaveError` naming what is left on disk."""

    def __init__(self, message: str, latest_good_step):
        self.message, self.latest_good_step = message, latest_good_step

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if error is None or isinstance(error, CheckpointSaveError):
            return False
        if not isinstance(error, Exception):
            return False
        _failed_saves.append(self.message)
        good = self.latest_good_step()
        kept = f"step {good} is the last good checkpoint" if good is not None else (
            "no checkpoint was saved before")
        raise CheckpointSaveError(f"{self.message}: {type(error).__name__}: {error}; {kept}") \
            from error
