"""Memory planner: will a config fit a topology? `jaxcov plan CONFIG [k=v ...] --topology v5p-64`.

Everything is abstract: parameter and optimizer-state shapes come from `jax.eval_shape`, and
every array's per-device size is the size of its shard under the real sharding rules
(`jaxcov.sharding.logical_spec` on a `jax.sharding.AbstractMesh` of the requested shape). No
array of model size is ever allocated, so a 32B plan takes about a second on a laptop.

A run's memory is modelled as what lives for the whole run (the state: parameters, optimizer
state, a frozen reference copy when `algo.ref_kl_coef > 0`) plus the largest of three phases,
which never overlap (each is its own jitted program):

  rollout  the sampler (`jaxcov.sampler.sample`): a compute-dtype copy of the weights gathered
           over fsdp, the KV cache of every rollout row (prompt bucket + response bucket slots),
           the prompt-only cache before it is repeated n times, and the prefill of one layer.
  eval     the same for one held-out batch (train.eval_batch_prompts prompts, or
           train.eval_examples if fewer, x train.eval_samples), when train.eval_every > 0.
  score    old log-probs and entropies of the whole step batch (`trainer.scoring_function`
           runs it one update micro-batch of rows at a time): one layer's forward.
  update   one mini-batch update (`jaxcov.update.update_policy`): fp32 gradient accumulator and
           one micro-batch's gradient, the activations the remat policy saves for every layer,
           one layer's backward working set, and the chunked logits buffer.

Activations are estimates from the model dimensions (the table in `layer_activations`). The
attention is the one a run on the topology's platform resolves (`model.attention: auto` is
splash on TPU, cuDNN on GPU in bf16, chunked otherwise; see `attention_arrays`): only dense
attention keeps [rows, heads, T, S] scores, the others hold O(T) per layer. A plan fits when
the peak is below USABLE_FRACTION of HBM: the rest is left for XLA temporaries, fusion buffers
and fragmentation that an estimate cannot see.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, NamedSharding

from jaxcov.config import ConfigError, ExperimentConfig, MeshConfig, load_config
from jaxcov.models import llama
from jaxcov.models.api import abstract_params, run_options_for
from jaxcov.models.llama import LlamaConfig
from jaxcov.models.presets import REAL_CONFIGS, TINY_CONFIGS
from jaxcov.optim import make_optimizer
from jaxcov.continuous import slot_count
from jaxcov.sampler import batch_bucket, bucket
from jaxcov.sharding import MESH_AXES, logical_spec, mesh_shape
from jaxcov.update import MiniBatch

GIB = 1024 ** 3
USABLE_FRACTION = 0.9  # of HBM; the rest is headroom for what the estimate cannot see


# ---------------------------------------------------------------------------------- topologies


@dataclasses.dataclass(frozen=True)
class Topology:
    """A slice or machine: how many JAX devices, how much HBM each has, and the platform
    (`attention.PLATFORMS`) whose attention kernel the run would use."""

    name: str
    devices: int
    hbm_gib: float
    platform: str = "tpu"


# TPU kind -> (HBM GiB per chip, how many of the name's number make one chip). v4-N and v5p-N
# count TensorCores (2 per chip, one JAX device per chip); v5litepod-N and v6e-N count chips.
TPU_KINDS = {"v4": (32.0, 2), "v5p": (95.0, 2), "v5litepod": (16.0, 1), "v5e": (16.0, 1),
             "v6e": (32.0, 1)}


def parse_topology(name: str) -> Topology:
    """`v5p-64` -> 32 devices of 95 GiB; an unknown name or size is a ConfigError."""
    match = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name.strip().lower())
    if not match:
        raise ConfigError(f"--topology: unknown topology {name!r}; expected one of "
                          f"{', '.join(k + '-N' for k in TPU_KINDS)} (or --devices N --hbm-gib G)")
    kind, count = match.group(1), int(match.group(2))
    hbm_gib, per_chip = TPU_KINDS[kind]
    if count < per_chip or count % per_chip:
        raise ConfigError(f"--topology: {name} must count a positive multiple of {per_chip} "
                          f"({'TensorCores, 2 per chip' if per_chip == 2 else 'chips'})")
    return Topology(name=f"{kind}-{count}", devices=count // per_chip, hbm_gib=hbm_gib,
                    platform="tpu")


def device_topology(devices: int, hbm_gib: float) -> Topology:
    """N GPUs of G GiB each (8 x 80 for an 8xH100 node): `--devices` is for GPUs, so the
    platform is cuda."""
    if devices < 1 or hbm_gib <= 0:
        raise ConfigError(f"--devices/--hbm-gib: need N >= 1 and G > 0, got {devices}, {hbm_gib}")
    return Topology(name=f"{devices}x{hbm_gib:g}GiB", devices=devices, hbm_gib=hbm_gib,
                    platform="cuda")


def scaled_topology(topology: Topology, factor: int) -> Topology:
    """The same kind of slice with `factor` times the devices (for "or use a bigger slice")."""
    kind, _, count = topology.name.rpartition("-")
    if kind in TPU_KINDS:
        return parse_topology(f"{kind}-{int(count) * factor}")
    return device_topology(topology.devices * factor, topology.hbm_gib)


def topology_flags(topology: Topology) -> str:
    kind = topology.name.rpartition("-")[0]
    if kind in TPU_KINDS:
        return f"--topology {topology.name}"
    return f"--devices {topology.devices} --hbm-gib {topology.hbm_gib:g}"


# -------------------------------------------------------------------------------- architecture


def model_architecture(config: ExperimentConfig, platform: Optional[str] = None) -> LlamaConfig:
    """The architecture of `model.name` without reading weights: an HF directory's
    config.json, a `random:` preset (its vocabulary, not the tokenizer's), or a
    `presets.REAL_CONFIGS` entry named like the last path component
    (`checkpoints/Qwen2.5-7B` -> qwen2.5-7b; an `-instruct` suffix is ignored). Its run
    options are the ones a run on `platform` gets (default: jax's backend here), so
    `cfg.attention` is the implementation that run would resolve."""
    from jaxcov.models.loading import config_from_hf

    m = config.model
    run_options = run_options_for(None, m.compute_dtype, m.remat, m.attention,
                                  m.attention_block, platform)
    if m.name.startswith("random:") and m.name[len("random:"):] in TINY_CONFIGS:
        return TINY_CONFIGS[m.name[len("random:"):]].replace(**run_options)
    hf_config = os.path.join(m.name, "config.json")
    if os.path.isfile(hf_config):
        with open(hf_config) as f:
            return config_from_hf(json.load(f), **run_options)
    key = os.path.basename(m.name.rstrip("/")).lower()
    for candidate in (key, key.removesuffix("-instruct")):
        if candidate in REAL_CONFIGS:
            return REAL_CONFIGS[candidate].replace(**run_options)
    raise ConfigError(f"model.name: cannot tell the architecture of {m.name!r} (no config.json "
                      f"there and no preset of that name; presets: {', '.join(REAL_CONFIGS)})")


# ---------------------------------------------------------------------------- sizes on the mesh


def abstract_mesh(shape: Sequence[int]) -> AbstractMesh:
    return AbstractMesh(tuple(shape), MESH_AXES)


def shard_bytes(shape: Sequence[int], dtype, axes: Sequence[Optional[str]],
                mesh: AbstractMesh) -> int:
    """Bytes one device holds of an array with logical `axes`, under the real sharding rules."""
    sharding = NamedSharding(mesh, logical_spec(axes, shape, mesh))
    return math.prod(sharding.shard_shape(tuple(shape))) * jnp.dtype(dtype).itemsize


def full_bytes(shape: Sequence[int], dtype) -> int:
    return math.prod(shape) * jnp.dtype(dtype).itemsize


def tree_bytes(tree: Any) -> tuple[int, int]:
    """(per-device, global) bytes of a tree of ShapeDtypeStructs; no sharding means replicated."""
    per_device = total = 0
    for leaf in jax.tree.leaves(tree):
        local = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        per_device += math.prod(local) * leaf.dtype.itemsize
        total += full_bytes(leaf.shape, leaf.dtype)
    return per_device, total


def with_param_shardings(tree: Any, params: Any) -> Any:
    """Gives every subtree shaped like the parameters (AdamW's mu and nu) the parameters'
    shardings: `eval_shape` of `optimizer.init` returns none. Other leaves (step counters)
    stay without one, i.e. replicated."""
    structure = jax.tree.structure(params)
    is_param_tree = lambda x: jax.tree.structure(x) == structure  # noqa: E731

    def place(sub):
        if not is_param_tree(sub):
            return sub
        return jax.tree.map(lambda x, p: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                              sharding=p.sharding), sub, params)
    return jax.tree.map(place, tree, is_leaf=is_param_tree)


# -------------------------------------------------------------------------------- run shapes


@dataclasses.dataclass(frozen=True)
class RunShapes:
    """The batch and sequence sizes the code will actually use (buckets included)."""

    rollout_prompts: int  # the sampler's prompt-count bucket for one step's draw
    eval_prompts: int  # the same for one held-out batch; 0 without periodic eval
    rollout_slots: int  # the continuous engine's decode slots (0: the static batch)
    eval_slots: int
    prompt_slots: int  # prompt bucket of the sampler
    cache_slots: int  # prompt bucket + response bucket
    train_seq: int  # columns of a training row: prompt width + max_new_tokens
    step_rows: int  # prompts_per_step x group_size
    mini_rows: int
    micro_rows: int


def run_shapes(config: ExperimentConfig, mesh: AbstractMesh) -> RunShapes:
    """Sizes as `sampler.sample` buckets them and
    `batch.from_rollout` lays rows out."""
    s, t = config.sampler, config.train
    longest_prompt = min(config.data.max_prompt_len, s.max_prompt_len)  # longer: dropped/refused
    prompt_slots = bucket(longest_prompt, s.min_bucket)
    slotted = s.engine == "continuous"  # whole prompts per batch shard, then n items each

    def prompts_and_slots(prompts: int, n: int) -> tuple[int, int]:
        batch = batch_bucket(prompts, 1 if slotted else n, mesh)
        return batch, slot_count(s, batch * n, mesh) if slotted else 0

    rollout_prompts, rollout_slots = prompts_and_slots(t.prompts_per_step, config.algo.group_size)
    eval_prompts, eval_slots = (prompts_and_slots(held_out_prompts(config), t.eval_samples)
                                if t.eval_every else (0, 0))
    return RunShapes(
        rollout_prompts=rollout_prompts, eval_prompts=eval_prompts,
        rollout_slots=rollout_slots, eval_slots=eval_slots,
        prompt_slots=prompt_slots,
        cache_slots=prompt_slots + bucket(s.max_new_tokens, s.min_bucket),
        train_seq=bucket(longest_prompt, s.min_bucket, s.max_prompt_len) + s.max_new_tokens,
        step_rows=config.step_rows, mini_rows=config.mini_batch_rows,
        micro_rows=config.micro_batch_rows)


def held_out_prompts(config: ExperimentConfig) -> int:
    """Prompts of one held-out batch (`evaluation.evaluate` draws eval_batch_prompts at a time).
    The held-out set's size is not known here, so only train.eval_examples bounds it."""
    t = config.train
    batch = t.eval_batch_prompts or t.prompts_per_step
    return min(t.eval_examples or batch, batch)


# ------------------------------------------------------------------------------------ items


class Item(NamedTuple):
    """One line of the plan."""

    phase: str  # state | rollout | eval | score | update
    name: str
    per_device: int  # bytes
    total: int  # bytes of the unsharded array(s)


class Array(NamedTuple):
    """An activation, by logical axes; `kind` says which remat policies save it."""

    kind: str  # which remat policies save it: see SAVED_BY_REMAT
    shape: tuple[int, ...]
    axes: tuple[Optional[str], ...]
    dtype: Any
    count: int = 1


def array_item(phase: str, name: str, arrays: Sequence[Array], mesh, times: int = 1) -> Item:
    per_device = sum(a.count * shard_bytes(a.shape, a.dtype, a.axes, mesh) for a in arrays)
    total = sum(a.count * full_bytes(a.shape, a.dtype) for a in arrays)
    return Item(phase, name, per_device * times, total * times)


# Splash's tiles are 512 x 512 at most (`attention._splash_block`); cuDNN's flash kernels tile
# alike. Both keep their tiles on chip, so one fp32 tile per (row, head) in HBM is generous.
KERNEL_BLOCK = 512


def attention_arrays(cfg: LlamaConfig, rows: int, queries: int, keys: int) -> list[Array]:
    """What `cfg.attention` holds for one layer besides q, k, v and its output.

      dense          the whole fp32 scores [rows, H, T, S] and their softmax: O(T*S).
      chunked        the same two for one block pair (attention_block each way), plus the
                     fp32 log-sum-exp per query that its custom_vjp saves beside the output:
                     O(T). A sequence of one block runs dense (`attention.attention`).
      splash, cudnn  the kernel's fp32 tile of scores and the log-sum-exp it saves: O(T).

    Block-sized arrays live inside the kernel or loop only (kind `attn_block`, which no remat
    policy saves); the log-sum-exp is saved with the output (kind `attn_out`). Their gradients
    (dQ accumulators included) are in the x2 that `update_items` gives one layer's backward."""
    H, a, f32 = cfg.num_heads, cfg.dtype, jnp.float32
    scores_axes = ("batch", "heads", "seq", "cache_seq")
    block = cfg.attention_block if cfg.attention == "chunked" else KERNEL_BLOCK
    if cfg.attention == "dense" or (cfg.attention == "chunked" and max(queries, keys) <= block):
        return [Array("scores", (rows, H, queries, keys), scores_axes, f32),
                Array("softmax", (rows, H, queries, keys), scores_axes, a)]
    tile = (rows, H, min(block, queries), min(block, keys))
    lse = Array("attn_out", (rows, H, queries), ("batch", "heads", "seq"), f32)
    if cfg.attention == "chunked":
        return [Array("attn_block", tile, scores_axes, f32),
                Array("attn_block", tile, scores_axes, a), lse]
    return [Array("attn_block", tile, scores_axes, f32), lse]


def layer_activations(cfg: LlamaConfig, rows: int, queries: int, keys: int) -> list[Array]:
    """The intermediates of one decoder layer (`llama.layer_forward`) for `rows` sequences of
    `queries` tokens attending to `keys` slots. Projections are fp32 dot outputs cast to the
    compute dtype; the attention's own arrays are `attention_arrays`."""
    D, F, H, K, E = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                     cfg.head_dim)
    a, f32 = cfg.dtype, jnp.float32
    bt, btd = ("batch", "seq"), ("batch", "seq", "act_embed")
    return [
        Array("residual", (rows, queries, D), btd, a),  # layer input
        Array("proj", (rows, queries, H, E), bt + ("heads", "head_dim"), f32),  # q
        Array("proj", (rows, queries, K, E), bt + ("kv_heads", "head_dim"), f32, count=2),  # k, v
        Array("proj", (rows, queries, F), bt + ("mlp",), f32, count=2),  # gate, up
        Array("proj_out", (rows, queries, D), btd, f32, count=2),  # attention out-proj, mlp down
        *attention_arrays(cfg, rows, queries, keys),
        Array("attn_out", (rows, queries, H, E), bt + ("heads", "head_dim"), a),
        Array("mid", (rows, queries, D), btd, a),  # after the attention residual
        Array("other", (rows, queries, D), btd, a, count=2),  # normed inputs
        Array("other", (rows, queries, D), btd, f32),  # RMSNorm in fp32
        Array("other", (rows, queries, H + K, E), bt + ("heads", "head_dim"), f32),  # rope
        Array("other", (rows, queries, F), bt + ("mlp",), a),  # silu(gate) * up
    ]


# What each remat policy keeps of a layer for the backward pass: jax.checkpoint_policies
# around `llama._train_block`, whose own residuals are the `none` row (matmul outputs,
# softmax, attention output and the mid-layer residual; norms, rope and SwiGLU recomputed).
# `scores` and `softmax` exist only where attention runs dense; `attn_block` is in no row.
SAVED_BY_REMAT = {
    "full": {"residual"},  # nothing_saveable: only the scan carry
    "dots_no_batch": {"residual", "proj", "proj_out"},  # matmuls without batch dims
    "dots": {"residual", "proj", "proj_out", "scores", "attn_out"},  # every matmul
    "none": {"residual", "proj", "softmax", "attn_out", "mid"},
}


def param_dtype(config: ExperimentConfig):
    return jnp.dtype(config.model.param_dtype)


def sampler_dtype(config: ExperimentConfig):
    return jnp.dtype(config.sampler.compute_dtype or config.model.compute_dtype)


def total_updates(config: ExperimentConfig) -> int:
    return config.train.steps * config.train.updates_per_step


# ------------------------------------------------------------------------------------- state


def state_items(config: ExperimentConfig, cfg: LlamaConfig, shape: tuple[int, ...]) -> list[Item]:
    """Parameters, AdamW state (from `jax.eval_shape(optimizer.init, ...)`) and the reference
    copy (`trainer.build_context` keeps one only when algo.ref_kl_coef > 0)."""
    dtype = config.model.param_dtype
    items = [Item("state", f"parameters ({dtype})", *param_bytes(cfg, shape, dtype)),
             Item("state", "optimizer state (AdamW mu, nu)",
                  *optimizer_bytes(cfg, shape, dtype, config.optim, total_updates(config)))]
    if config.algo.ref_kl_coef > 0:
        items.append(Item("state", "reference parameters (ref_kl_coef > 0)",
                          *param_bytes(cfg, shape, dtype)))
    return items


# Cached: the suggestion search plans the same mesh for many micro-batch sizes.
@functools.lru_cache(maxsize=64)
def param_bytes(cfg: LlamaConfig, shape: tuple[int, ...], dtype: str) -> tuple[int, int]:
    """(per-device, global) bytes of the parameters in `dtype` on a mesh of `shape`."""
    return tree_bytes(abstract_params(cfg, abstract_mesh(shape), dtype=jnp.dtype(dtype)))


@functools.lru_cache(maxsize=64)
def optimizer_bytes(cfg: LlamaConfig, shape: tuple[int, ...], dtype: str, optim,
                    updates: int) -> tuple[int, int]:
    """(per-device, global) bytes of the configured optax optimizer's state."""
    params = abstract_params(cfg, abstract_mesh(shape), dtype=jnp.dtype(dtype))
    optimizer, _ = make_optimizer(optim, updates)
    return tree_bytes(with_param_shardings(jax.eval_shape(optimizer.init, params), params))


def weights_item(phase: str, name: str, cfg: LlamaConfig, mesh, dtype, layers: int,
                 keep=lambda section: True) -> Item:
    """Bytes of parameters gathered over fsdp (their `embed` axis whole, as `decode_params`
    and the all-gather of a layer inside the scan make them), `layers` layers' worth."""
    per_device = total = 0
    specs = llama.param_specs(cfg)
    for path, spec in jax.tree_util.tree_flatten_with_path(specs, is_leaf=llama.is_spec)[0]:
        stacked = path[0].key == "layers"
        if not keep(path[0].key):
            continue
        shape, axes = (spec.shape[1:], spec.axes[1:]) if stacked else (spec.shape, spec.axes)
        axes = tuple(None if a == "embed" else a for a in axes)
        times = layers if stacked else 1
        per_device += times * shard_bytes(shape, dtype, axes, mesh)
        total += times * full_bytes(shape, dtype)
    return Item(phase, name, per_device, total)


# ----------------------------------------------------------------------------------- rollout


def kv_cache_arrays(cfg: LlamaConfig, rows: int, slots: int, dtype) -> list[Array]:
    """`decode.DecodeCache`: k and v, L x [R, K, S, E] (the layout in its AXES)."""
    shape = (rows, cfg.num_kv_heads, slots, cfg.head_dim)
    axes = ("batch", "kv_heads", "cache_seq", "head_dim")
    return [Array("cache", shape, axes, dtype, count=2 * cfg.num_layers)]


def rollout_items(phase: str, config: ExperimentConfig, cfg: LlamaConfig, mesh,
                  shapes: RunShapes, prompts: int, n: int, slots: int) -> list[Item]:
    """`sampler.sample` of `prompts` (bucketed) prompts x `n` samples each: the static batch
    (`slots` 0) caches every row, the continuous engine its slots and the prompts."""
    dtype = sampler_dtype(config)
    run_cfg = cfg.replace(compute_dtype=dtype.name)
    rows, width = prompts * n, shapes.cache_slots
    if slots:
        caches = [array_item(phase, f"KV cache ({slots} decode slots x {width} cache slots)",
                             kv_cache_arrays(cfg, slots, width, dtype), mesh),
                  array_item(phase, f"prompt cache ({prompts} prompts x "
                                    f"{shapes.prompt_slots} slots)",
                             kv_cache_arrays(cfg, prompts, shapes.prompt_slots, dtype), mesh)]
    else:
        caches = [array_item(phase, f"KV cache ({prompts} prompts x {n} = {rows} rows x {width} "
                                    f"slots)", kv_cache_arrays(cfg, rows, width, dtype), mesh),
                  array_item(phase, f"prompt cache before the x{n} repeat",
                             kv_cache_arrays(cfg, prompts, width, dtype), mesh)]
    return [
        weights_item(phase, f"decode weights ({dtype.name}, gathered over fsdp)", cfg, mesh,
                     dtype, cfg.num_layers),
        *caches,
        array_item(phase, f"prefill: one layer, {prompts} prompts",
                   layer_activations(run_cfg, prompts, shapes.prompt_slots,
                                     shapes.prompt_slots), mesh),
        array_item(phase, "decode logits and sampling buffers",
                   [Array("other", (slots or rows, cfg.vocab_size), ("batch", "vocab"),
                          jnp.float32, count=3)], mesh),
    ]


def sampling_items(config: ExperimentConfig, cfg: LlamaConfig, mesh, shapes: RunShapes):
    """The step's rollout, and (with periodic eval) a held-out batch at eval_samples each."""
    items = rollout_items("rollout", config, cfg, mesh, shapes, shapes.rollout_prompts,
                          config.algo.group_size, shapes.rollout_slots)
    if shapes.eval_prompts:
        items += rollout_items("eval", config, cfg, mesh, shapes, shapes.eval_prompts,
                               config.train.eval_samples, shapes.eval_slots)
    return items


# ---------------------------------------------------------------------------- score / update


def batch_arrays(rows: int, seq: int, fields: int) -> list[Array]:
    """`fields` [rows, seq] 4-byte arrays (token ids, masks, log-probs, advantages)."""
    return [Array("other", (rows, seq), ("batch", "seq"), jnp.float32, count=fields)]


def head_arrays(cfg: LlamaConfig, rows: int, seq: int, chunk: int, logit_copies: int):
    """Final hidden states and the [rows, chunk, V] fp32 logits of one log-prob chunk."""
    D, V = cfg.hidden_size, cfg.vocab_size
    return [Array("other", (rows, seq, D), ("batch", "seq", "act_embed"), cfg.dtype, count=2),
            Array("other", (rows, chunk, V), ("batch", "seq", "vocab"), jnp.float32,
                  count=logit_copies)]


def embedding_item(phase: str, cfg: LlamaConfig, mesh, dtype) -> Item:
    """The lookup gathers the whole embedding table (llama.forward_hidden); in the backward
    pass its gradient is a whole fp32 table too."""
    return array_item(phase, "embedding table, whole on every device",
                      [Array("other", (cfg.vocab_size, cfg.hidden_size), (None, None), dtype)],
                      mesh)


# The scorer's per-token outputs (log-probs, entropy) that the step batch holds beside them.
SCORER_OUTPUTS = 2


def step_batch_fields(config: ExperimentConfig) -> int:
    """Step-batch arrays of `trainer.prepare_batch`: the `MiniBatch` fields (reference
    log-probs only with a KL term) and the scorer's outputs."""
    fields = [f.name for f in dataclasses.fields(MiniBatch)]
    unused = 0 if config.algo.ref_kl_coef > 0 else 1  # ref_logp_bt
    return len(fields) - unused + SCORER_OUTPUTS


def combined(name: str, *items: Item) -> Item:
    return Item(items[0].phase, name, sum(i.per_device for i in items),
                sum(i.total for i in items))


def gathered_weights(phase: str, cfg: LlamaConfig, mesh, with_gradient: bool) -> list[Item]:
    """One layer's weights and the output projection, all-gathered over fsdp in the compute
    dtype for their matmuls (and, in the backward pass, their fp32 gradients before the
    reduce-scatter)."""
    head = "embed" if cfg.tie_word_embeddings else "lm_head"
    dtypes = (cfg.dtype, jnp.float32) if with_gradient else (cfg.dtype,)
    suffix = " + fp32 gradient" if with_gradient else ""
    layer = [weights_item(phase, "", cfg, mesh, d, 1, keep=lambda k: k == "layers")
             for d in dtypes]
    output = [weights_item(phase, "", cfg, mesh, d, 1, keep=lambda k: k == head) for d in dtypes]
    return [combined(f"one layer's weights gathered{suffix}", *layer),
            combined(f"output projection gathered{suffix}", *output)]


def score_items(config: ExperimentConfig, cfg: LlamaConfig, mesh, shapes: RunShapes):
    """`trainer.scoring_function`: a forward over the step batch, a micro-batch at a time."""
    rows, seq = shapes.micro_rows, shapes.train_seq
    chunk = min(config.model.logits_chunk, seq - 1)
    return [
        array_item("score", "step batch arrays",
                   batch_arrays(shapes.step_rows, seq, step_batch_fields(config)), mesh),
        array_item("score", f"forward of one layer, {rows} rows at a time",
                   layer_activations(cfg, rows, seq, seq), mesh),
        *gathered_weights("score", cfg, mesh, with_gradient=False),
        embedding_item("score", cfg, mesh, param_dtype(config)),
        array_item("score", f"hidden states + logits chunk ({chunk} tokens, fp32)",
                   head_arrays(cfg, rows, seq, chunk, logit_copies=2), mesh),
    ]


def gradient_items(cfg: LlamaConfig, shape: tuple[int, ...]) -> list[Item]:
    """update._accumulate_gradients: an fp32 accumulator plus the micro-batch's own gradient."""
    grads = param_bytes(cfg, shape, "float32")
    return [Item("update", "gradient accumulator (fp32)", *grads),
            Item("update", "micro-batch gradient (fp32)", *grads)]


def update_items(config: ExperimentConfig, cfg: LlamaConfig, mesh, shapes: RunShapes):
    """One mini-batch update: gradients, saved activations of every layer under the remat
    policy, one layer's backward (its recomputed intermediates and their gradients: 2x the
    forward), gathered weights with their gradients, and the logits chunk (logits,
    probabilities and their gradient)."""
    b, seq, remat = shapes.micro_rows, shapes.train_seq, cfg.remat
    chunk = min(config.model.logits_chunk, seq - 1)
    layer = layer_activations(cfg, b, seq, seq)
    saved = [a for a in layer if a.kind in SAVED_BY_REMAT[remat]]
    widest = max(param_dtype(config), jnp.dtype(jnp.float32), key=lambda d: d.itemsize)
    return gradient_items(cfg, tuple(mesh.axis_sizes)) + [
        array_item("update", "step + mini-batch arrays",
                   batch_arrays(shapes.step_rows, seq, step_batch_fields(config))
                   + batch_arrays(shapes.mini_rows, seq, 9), mesh),
        array_item("update", f"activations saved for backward (remat={remat}, "
                   f"{cfg.num_layers} layers)", saved, mesh, times=cfg.num_layers),
        array_item("update", f"backward of one layer ({b} rows)", layer, mesh, times=2),
        *gathered_weights("update", cfg, mesh, with_gradient=True),
        embedding_item("update", cfg, mesh, widest),
        array_item("update", f"hidden states + logits chunk ({chunk} tokens, fp32)",
                   head_arrays(cfg, b, seq, chunk, logit_copies=3), mesh),
    ]


# -------------------------------------------------------------------------------------- plan


PHASES = ("rollout", "eval", "score", "update")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Every item of a config on a topology, and the verdict."""

    config: ExperimentConfig
    arch: LlamaConfig
    topology: Topology
    mesh_shape: tuple[int, int, int]
    shapes: RunShapes
    items: tuple[Item, ...]
    usable_fraction: float = USABLE_FRACTION

    @property
    def usable(self) -> float:
        return self.topology.hbm_gib * GIB * self.usable_fraction

    @property
    def state(self) -> int:
        return sum(i.per_device for i in self.items if i.phase == "state")

    def phase_peak(self, phase: str) -> int:
        """The state plus everything of `phase`: the phase's peak per device."""
        return self.state + sum(i.per_device for i in self.items if i.phase == phase)

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=self.phase_peak)

    @property
    def peak(self) -> int:
        return self.phase_peak(self.peak_phase)

    @property
    def fits(self) -> bool:
        return self.peak <= self.usable


def check_layout(config: ExperimentConfig, mesh: AbstractMesh) -> None:
    """The trainer's own batch-vs-mesh check, so a plan never accepts what training refuses."""
    from jaxcov.trainer import check_batch_shapes

    check_batch_shapes(config, mesh)


def plan_memory(config: ExperimentConfig, topology: Topology,
                usable_fraction: float = USABLE_FRACTION) -> Plan:
    """The per-device memory of `config` on `topology` (ConfigError when the mesh or the batch
    sizes do not divide)."""
    shape = mesh_shape(config.mesh, topology.devices)
    mesh = abstract_mesh(shape)
    check_layout(config, mesh)
    cfg = model_architecture(config, topology.platform)
    shapes = run_shapes(config, mesh)
    items = (state_items(config, cfg, shape) + sampling_items(config, cfg, mesh, shapes)
             + score_items(config, cfg, mesh, shapes) + update_items(config, cfg, mesh, shapes))
    return Plan(config, cfg, topology, shape, shapes, tuple(items), usable_fraction)


# -------------------------------------------------------------------------------- suggestions


@dataclasses.dataclass(frozen=True)
class Suggestion:
    """A layout that fits: overrides for the config, on `plan.topology`."""

    overrides: tuple[str, ...]
    plan: Plan


def with_layout(config: ExperimentConfig, mesh: MeshConfig, micro: int) -> ExperimentConfig:
    return dataclasses.replace(config, mesh=mesh,
                               train=dataclasses.replace(config.train, micro_batch_size=micro))


def mesh_candidates(config: ExperimentConfig, devices: int, cfg: LlamaConfig) -> list[MeshConfig]:
    """(data, fsdp, tensor) shapes worth trying: tensor splits heads (1..16), fsdp takes the
    rest; data stays 1 or the config's (data only replicates, it never saves memory)."""
    datas = {1} | ({config.mesh.data} if config.mesh.data > 0 else set())
    meshes = []
    for tensor in (t for t in (1, 2, 4, 8, 16) if devices % t == 0 and cfg.num_heads % t == 0):
        for data in sorted(d for d in datas if (devices // tensor) % d == 0):
            meshes.append(MeshConfig(data=data, fsdp=devices // tensor // data, tensor=tensor))
    return meshes


def micro_candidates(config: ExperimentConfig, mesh: MeshConfig) -> list[int]:
    """Micro-batch sizes the trainer accepts on `mesh`, largest (fastest) first."""
    rows = config.mini_batch_rows
    multiple = mesh.data * mesh.fsdp
    return [m for m in range(rows, 0, -1) if rows % m == 0 and m % multiple == 0]


def _layouts(config: ExperimentConfig, devices: int, cfg: LlamaConfig):
    """(mesh, micro) pairs in order of preference: the config's own mesh first (only the
    micro-batch changes, which leaves updates unchanged), then less tensor parallelism, then
    bigger micro-batches."""
    current = mesh_shape(config.mesh, devices) if _divides(config.mesh, devices) else None
    pairs = [(m, micro) for m in mesh_candidates(config, devices, cfg)
             for micro in micro_candidates(config, m)]
    own = lambda m: (m.data, m.fsdp, m.tensor) == current  # noqa: E731
    return sorted(pairs, key=lambda p: (not own(p[0]), p[0].tensor, -p[1], p[0].data))


def _divides(mesh: MeshConfig, devices: int) -> bool:
    try:
        mesh_shape(mesh, devices)
        return True
    except ConfigError:
        return False


def layout_overrides(config: ExperimentConfig, changed: ExperimentConfig,
                     devices: int) -> tuple[str, ...]:
    """The overrides that turn `config` into `changed` (a mesh whose -1 resolves to the same
    shape on `devices` is no change)."""
    out = []
    same_mesh = _divides(config.mesh, devices) and (
        mesh_shape(config.mesh, devices) == mesh_shape(changed.mesh, devices))
    if not same_mesh:
        m = changed.mesh
        out += [f"mesh.data={m.data}", f"mesh.fsdp={m.fsdp}", f"mesh.tensor={m.tensor}"]
    if changed.train.micro_batch_size != config.train.micro_batch_size:
        out.append(f"train.micro_batch_size={changed.train.micro_batch_size}")
    return tuple(out)


def fitting_layout(config: ExperimentConfig, topology: Topology,
                   usable_fraction: float) -> Optional[Suggestion]:
    """The first layout (in `_layouts` order) whose plan fits on `topology`."""
    cfg = model_architecture(config, topology.platform)
    for mesh, micro in _layouts(config, topology.devices, cfg):
        candidate = with_layout(config, mesh, micro)
        try:
            plan = plan_memory(candidate, topology, usable_fraction)
        except ConfigError:
            continue
        if plan.fits:
            return Suggestion(layout_overrides(config, candidate, topology.devices), plan)
    return None


def suggest(config: ExperimentConfig, topology: Topology,
            usable_fraction: float = USABLE_FRACTION, max_factor: int = 64) -> Optional[Suggestion]:
    """A mesh shape and micro-batch size that fit on `topology`, else the smallest slice of the
    same kind (2x, 4x, ... up to `max_factor`x the devices) on which some layout fits."""
    factor = 1
    while factor <= max_factor:
        try:
            bigger = scaled_topology(topology, factor)
        except ConfigError:
            return None
        found = fitting_layout(config, bigger, usable_fraction)
        if found is not None:
            return found
        factor *= 2
    return None


# ---------------------------------------------------------------------------------- printing


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def describe_run(plan: Plan) -> list[str]:
    cfg, s, (data, fsdp, tensor) = plan.arch, plan.shapes, plan.mesh_shape
    params = sum(i.total for i in plan.items if i.name.startswith("parameters"))
    count = params / jnp.dtype(plan.config.model.param_dtype).itemsize
    m = plan.config.model
    return [
        f"topology {plan.topology.name}: {plan.topology.devices} devices x "
        f"{plan.topology.hbm_gib:g} GiB HBM; mesh data={data} fsdp={fsdp} tensor={tensor}",
        f"model {cfg.family} {count / 1e9:.2f}B params (L={cfg.num_layers} D={cfg.hidden_size} "
        f"H={cfg.num_heads} K={cfg.num_kv_heads} F={cfg.intermediate_size} "
        f"V={cfg.vocab_size}); params {m.param_dtype}, compute {m.compute_dtype}, "
        f"remat {m.remat}, attention {attention_name(plan)}",
        f"rollout {s.rollout_prompts * plan.config.algo.group_size} rows"
        + (f" in {s.rollout_slots} decode slots" if s.rollout_slots else "")
        + f" x {s.cache_slots} cache slots; step batch "
        f"{s.step_rows} rows x {s.train_seq} tokens; mini-batch {s.mini_rows} rows; "
        f"micro-batch {s.micro_rows} rows ({s.micro_rows // (data * fsdp)} per device)",
    ]


def attention_name(plan: Plan) -> str:
    """`splash`, `chunked (block 512)`, ...; `(auto on tpu)` when the platform chose it."""
    cfg = plan.arch
    name = cfg.attention + (f" (block {cfg.attention_block})" if cfg.attention == "chunked"
                            else "")
    if plan.config.model.attention == "auto":
        name += f" (auto on {plan.topology.platform})"
    return name


def format_table(plan: Plan) -> list[str]:
    width = max(len(i.name) for i in plan.items) + 2
    lines = [f"{'phase':8} {'component':{width}} {'GiB/device':>10} {'GiB global':>11}"]
    for phase in ("state",) + PHASES:
        items = [i for i in plan.items if i.phase == phase]
        if not items:
            continue
        for item in items:
            lines.append(f"{phase:8} {item.name:{width}} {gib(item.per_device):>10} "
                         f"{gib(item.total):>11}")
        total = plan.state if phase == "state" else plan.phase_peak(phase)
        label = "total" if phase == "state" else "total, state included"
        lines.append(f"{'':8} {label:{width}} {gib(total):>10}")
    return lines


def verdict(plan: Plan) -> str:
    budget = (f"{gib(plan.usable)} GiB usable ({plan.usable_fraction:.0%} of "
              f"{plan.topology.hbm_gib:g} GiB HBM)")
    if plan.fits:
        return (f"fits: peak {gib(plan.peak)} GiB per device ({plan.peak_phase} phase) of "
                f"{budget}; headroom {gib(plan.usable - plan.peak)} GiB")
    largest = max((i for i in plan.items if i.phase in ("state", plan.peak_phase)),
                  key=lambda i: i.per_device)
    over = [p for p in PHASES if plan.phase_peak(p) > plan.usable]
    why = (f"does not fit: peak {gib(plan.peak)} GiB per device ({plan.peak_phase} phase) > "
           f"{budget}; over budget: {', '.join(over)}; largest item: {largest.name} "
           f"({gib(largest.per_device)} GiB)")
    return why


def suggestion_lines(plan: Plan, found: Optional[Suggestion], config_path: str,
                     overrides: Sequence[str]) -> list[str]:
    if found is None:
        return ["suggestion: none found (no mesh shape or micro-batch size fits, even on 64x "
                "the devices); shorten sampler.max_new_tokens or train.prompts_per_step"]
    bigger = found.plan.topology != plan.topology
    replaced = {o.split("=", 1)[0] for o in found.overrides}
    kept = [o for o in overrides if o.split("=", 1)[0].strip() not in replaced]
    usable = found.plan.usable_fraction
    command = " ".join(["jaxcov plan", config_path, *kept, *found.overrides,
                        topology_flags(found.plan.topology)]
                       + ([f"--usable {usable:g}"] if usable != USABLE_FRACTION else []))
    where = f"on {found.plan.topology.name} " if bigger else ""
    return [f"suggestion: {where}{' '.join(found.overrides) or '(the config as is)'}: peak "
            f"{gib(found.plan.peak)} GiB of {gib(found.plan.usable)} GiB usable",
            f"  check: {command}"]


# --------------------------------------------------------------------------------------- CLI


def topology_from_args(args: argparse.Namespace) -> Topology:
    if args.topology and (args.devices or args.hbm_gib):
        raise ConfigError("plan: give either --topology or --devices N --hbm-gib G, not both")
    if args.topology:
        return parse_topology(args.topology)
    if args.devices is None or args.hbm_gib is None:
        raise ConfigError("plan: needs --topology (e.g. v5p-64) or --devices N --hbm-gib G")
    return device_topology(args.devices, args.hbm_gib)


def plan_command(args: argparse.Namespace) -> int:
    """Prints the plan; 0 when it fits, 2 (with a suggestion) when it does not."""
    usable = USABLE_FRACTION if args.usable is None else args.usable
    if not 0 < usable <= 1:
        raise ConfigError(f"--usable: must be in (0, 1], got {usable}")
    topology = topology_from_args(args)
    config = load_config(args.config, args.overrides)
    plan = plan_memory(config, topology, usable)
    print("\n".join(describe_run(plan) + [""] + format_table(plan) + ["", verdict(plan)]))
    if plan.fits:
        return 0
    found = suggest(config, topology, usable)
    print("\n".join(suggestion_lines(plan, found, args.config, args.overrides)))
    return 2
