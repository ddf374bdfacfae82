"""Orbax checkpoints: asynchronous saves, keep-last-k, restore straight into target shardings.

A checkpoint holds the train state pytree (params, optimizer state, step, RNG key data) and a
small JSON record (data iterator position, run bookkeeping). Paths may be local or `gs://`
(orbax writes through tensorstore).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


def _abstract(tree: Any) -> Any:
    """ShapeDtypeStructs carrying each leaf's sharding, the restore target."""
    def leaf(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return jax.tree.map(leaf, tree)


class Checkpointer:
    """Saves and restores (state pytree, JSON metadata) pairs by step."""

    def __init__(self, directory: str, keep: int = 2, asynchronous: bool = True):
        directory = directory if "://" in directory else os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=asynchronous)
        self.manager = ocp.CheckpointManager(directory, options=options,
                                             item_names=("state", "meta"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict, force: bool = True) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=force)

    def restore(self, step: int, like_state: Any) -> tuple[Any, dict]:
        """Restores step `step` into the shapes, dtypes and shardings of `like_state`."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(like_state)),
                                  meta=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored["state"], dict(restored["meta"])

    def wait(self) -> None:
        """Blocks until every pending asynchronous save has been committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
