"""Device mesh and the one table that maps logical axis names to mesh axes.

Every array that matters (parameters, activations at block boundaries, KV cache, batches) names
its dimensions with logical axes (`batch`, `seq`, `embed`, ...). `LOGICAL_RULES` says which mesh
axes each one is split over; nothing else in the code mentions mesh axes. The mesh is always
passed explicitly, never read from a global context.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcov.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes it is split over (None: replicated). Parameters are split over
# `fsdp` along their model dimension (ZeRO-3 style) and over `tensor` along heads / mlp / vocab;
# activations are split over (data, fsdp) along the batch and over `tensor` along heads.
LOGICAL_RULES: dict[str, Optional[tuple[str, ...]]] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "cache_seq": None,
    "embed": ("fsdp",),
    "act_embed": None,
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": None,
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "layers": None,
}


def mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolves -1 in the configured (data, fsdp, tensor) sizes against the device count."""
    sizes = [config.data, config.fsdp, config.tensor]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise ConfigError(f"mesh: {num_devices} devices are not divisible by {fixed} "
                              f"(data={config.data}, fsdp={config.fsdp}, tensor={config.tensor})")
        sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are "
                          f"{num_devices} devices")
    return tuple(sizes)


def make_mesh(config: MeshConfig = MeshConfig(),
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(config, len(devices))
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES)


def logical_spec(axes: Sequence[Optional[str]], shape: Optional[Sequence[int]] = None,
                 mesh: Optional[Mesh] = None) -> PartitionSpec:
    """PartitionSpec of an array whose dimensions have logical names `axes`.

    With `shape` and `mesh`, a dimension that its mesh axes do not divide evenly stays
    replicated (e.g. SmolLM2's 3 KV heads on tensor=2), and a mesh axis is used at most once.
    """
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(axes):
        mesh_axes = LOGICAL_RULES.get(name) if name else None
        if mesh_axes is None:
            spec.append(None)
            continue
        if name not in LOGICAL_RULES:
            raise KeyError(f"logical axis {name!r} has no rule")
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        if shape is not None and mesh is not None:
            split = math.prod(mesh.shape[a] for a in mesh_axes)
            if split == 0 or shape[dim] % split:
                mesh_axes = ()
        used.update(mesh_axes)
        spec.append(mesh_axes if len(mesh_axes) > 1 else (mesh_axes[0] if mesh_axes else None))
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, axes: Sequence[Optional[str]],
                   shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(axes, shape, mesh))


def constrain(x: jax.Array, mesh: Optional[Mesh], axes: Sequence[Optional[str]]) -> jax.Array:
    """Sharding constraint by logical axes (no-op without a mesh)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, axes, x.shape))


def batch_size_multiple(mesh: Mesh) -> int:
    """Batch sizes must be a multiple of this to split over the batch mesh axes."""
    return math.prod(mesh.shape[a] for a in LOGICAL_RULES["batch"])
