"""Llama-family decoder (Llama 2/3.x, SmolLM2, Mistral, Qwen2/2.5, Qwen3) as pure functions.

One forward covers the families through flags in `LlamaConfig`: q/k/v bias (Qwen2), q/k RMSNorm
(Qwen3), tied or untied embeddings, llama3 rope scaling, sliding-window attention (Mistral).

Parameters are a nested dict of arrays; layers are stacked on a leading axis and run with
`lax.scan`, so compile time does not grow with depth. `param_specs` is the abstract form of the
tree (shape + logical axes) and drives init, sharding, loading and `eval_shape` from one place.

Einsum letters:
  B batch        T query positions     S key positions (cache slots)
  D model dim    H query heads         K kv heads          G query heads per kv head (H = K*G)
  E head dim     F mlp hidden          V vocab             L layers
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from jaxcov.sharding import constrain

Params = dict[str, Any]

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture plus the static run options of the forward pass (hashable: a jit static arg)."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    # ("llama3", factor, low_freq_factor, high_freq_factor, original_max_position) or
    # ("linear", factor) or None.
    rope_scaling: Optional[tuple] = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: Optional[int] = None
    max_position_embeddings: int = 4096
    # Run options.
    compute_dtype: str = "float32"
    remat: str = "full"

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; known: {FAMILIES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")

    @property
    def dtype(self):
        return jnp.dtype(self.compute_dtype)

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)


class ParamSpec(NamedTuple):
    shape: tuple[int, ...]
    axes: tuple[Optional[str], ...]
    init: str  # "normal" | "ones" | "zeros"


def param_specs(cfg: LlamaConfig) -> Params:
    """Shape, logical axes and initialiser of every parameter."""
    L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    H, K, E = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    layer = {
        "attn_norm": ParamSpec((L, D), ("layers", "act_embed"), "ones"),
        "wq": ParamSpec((L, D, H, E), ("layers", "embed", "heads", "head_dim"), "normal"),
        "wk": ParamSpec((L, D, K, E), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
        "wv": ParamSpec((L, D, K, E), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
        "wo": ParamSpec((L, H, E, D), ("layers", "heads", "head_dim", "embed"), "normal"),
        "mlp_norm": ParamSpec((L, D), ("layers", "act_embed"), "ones"),
        "w_gate": ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal"),
        "w_up": ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal"),
        "w_down": ParamSpec((L, F, D), ("layers", "mlp", "embed"), "normal"),
    }
    if cfg.qkv_bias:
        layer["bq"] = ParamSpec((L, H, E), ("layers", "heads", "head_dim"), "zeros")
        layer["bk"] = ParamSpec((L, K, E), ("layers", "kv_heads", "head_dim"), "zeros")
        layer["bv"] = ParamSpec((L, K, E), ("layers", "kv_heads", "head_dim"), "zeros")
    if cfg.qk_norm:
        layer["q_norm"] = ParamSpec((L, E), ("layers", "head_dim"), "ones")
        layer["k_norm"] = ParamSpec((L, E), ("layers", "head_dim"), "ones")
    specs = {
        "embed": ParamSpec((V, D), ("vocab", "embed"), "normal"),
        "layers": layer,
        "final_norm": ParamSpec((D,), ("act_embed",), "ones"),
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ParamSpec((D, V), ("embed", "vocab"), "normal")
    return specs


def is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def init_params(cfg: LlamaConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random parameters (normal(std) matrices, unit norms, zero biases). Jit it with
    `out_shardings` to create them directly in place (see `jaxcov.models.api`)."""
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    keys = jax.random.split(key, len(leaves))

    def make(spec: ParamSpec, k):
        if spec.init == "ones":
            return jnp.ones(spec.shape, dtype)
        if spec.init == "zeros":
            return jnp.zeros(spec.shape, dtype)
        return (std * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)

    return jax.tree.unflatten(treedef, [make(s, k) for s, k in zip(leaves, keys)])


# ----------------------------------------------------------------------------------- KV cache


@struct.dataclass
class KVCache:
    """Keys and values of every layer for a batch of sequences, one slot per sequence position.

    Slot i of a row holds the token at sequence index i of that row (prompt padding included), so
    causality and sliding windows compare slot indices. `valid_bs` marks slots that hold real
    tokens; `end` is how many slots have been written (the same for every row).
    """

    k: jax.Array  # [L, B, S, K, E]
    v: jax.Array  # [L, B, S, K, E]
    valid_bs: jax.Array  # [B, S] bool
    end: jax.Array  # [] int32

    @staticmethod
    def axes() -> "KVCache":
        kv = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")
        return KVCache(k=kv, v=kv, valid_bs=("batch", "cache_seq"), end=())


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    dtype = dtype or cfg.dtype
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   valid_bs=jnp.zeros((batch, max_len), bool), end=jnp.zeros((), jnp.int32))


# ---------------------------------------------------------------------------------- components


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in fp32 (as the reference implementations do), cast back to x's dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * normed).astype(x.dtype)


def rope_inv_freq(cfg: LlamaConfig) -> jax.Array:
    """Inverse rotary frequencies [E/2], with llama3 / linear scaling applied."""
    exponents = jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** exponents)
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling[0] == "linear":
        return inv_freq / scaling[1]
    if scaling[0] == "llama3":
        return _llama3_scaled(inv_freq, *scaling[1:])
    raise ValueError(f"unsupported rope scaling {scaling[0]!r}")


def _llama3_scaled(inv_freq, factor, low_freq_factor, high_freq_factor, original_max_position):
    low_freq_wavelen = original_max_position / low_freq_factor
    high_freq_wavelen = original_max_position / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x_bthe: jax.Array, positions_bt: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding in the half-split layout used by HF checkpoints."""
    angles = positions_bt[..., None].astype(jnp.float32) * inv_freq  # [B, T, E/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x_bthe.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_bthe.dtype)


def attention_mask(valid_bs: jax.Array, query_slots_bt: jax.Array, window: Optional[int]):
    """[B, T, S] bool: key slot is real, not in the future, and inside the sliding window."""
    key_slots = jnp.arange(valid_bs.shape[1])[None, None, :]
    query_slots = query_slots_bt[:, :, None]
    mask = valid_bs[:, None, :] & (key_slots <= query_slots)
    if window is not None:
        mask &= (query_slots - key_slots) < window
    return mask


def attend(q_bthe, k_bske, v_bske, mask_bts, cfg: LlamaConfig) -> jax.Array:
    """Grouped-query attention, softmax in fp32. Returns [B, T, H, E]."""
    B, T, H, E = q_bthe.shape
    K = k_bske.shape[2]
    q_btkge = q_bthe.reshape(B, T, K, H // K, E)
    scores = jnp.einsum("btkge,bske->bkgts", q_btkge, k_bske,
                        preferred_element_type=jnp.float32) / math.sqrt(E)
    scores = jnp.where(mask_bts[:, None, None], scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bske.dtype)
    out = jnp.einsum("bkgts,bske->btkge", probs, v_bske)
    return out.reshape(B, T, H, E)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def project(spec: str, x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """einsum in `dtype` with fp32 accumulation, cast back to `dtype`. (Asking for the fp32
    result keeps XLA:CPU on its fast bf16 kernels; otherwise it upcasts the weights every call.)

    The custom VJP orders the weight-gradient einsum so that the narrower of x and dy comes
    first: XLA:CPU materialises a transpose of that operand, and autodiff's fixed order made it
    transpose the wide activation gradient (e.g. [B*T, 1536] in the MLP) before every
    weight-gradient dot; ~20% of a SmolLM2 backward.
    """
    out = jnp.einsum(spec, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
    return out.astype(dtype)


def _project_fwd(spec, x, w, dtype):
    return project(spec, x, w, dtype), (x, w)


def _project_bwd(spec, dtype, residuals, dy):
    x, w = residuals
    x_axes, rest = spec.split(",")
    w_axes, out_axes = rest.split("->")
    dy = dy.astype(dtype)
    dx = jnp.einsum(f"{out_axes},{w_axes}->{x_axes}", dy, w.astype(dtype),
                    preferred_element_type=jnp.float32)
    # Lead with the narrower of x and dy: XLA:CPU transposes the first operand of this dot.
    if x.size <= dy.size:
        dw = jnp.einsum(f"{x_axes},{out_axes}->{w_axes}", x.astype(dtype), dy,
                        preferred_element_type=jnp.float32)
    else:
        dw = jnp.einsum(f"{out_axes},{x_axes}->{w_axes}", dy, x.astype(dtype),
                        preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


project.defvjp(_project_fwd, _project_bwd)


def mlp(x_btd, layer, dtype) -> jax.Array:
    gate = project("btd,df->btf", x_btd, layer["w_gate"], dtype)
    up = project("btd,df->btf", x_btd, layer["w_up"], dtype)
    return project("btf,fd->btd", jax.nn.silu(gate) * up, layer["w_down"], dtype)


# ------------------------------------------------------------------------------------ the block


def project_qkv(x_btd, layer, positions_bt, cfg: LlamaConfig, inv_freq):
    dtype = cfg.dtype
    q = project("btd,dhe->bthe", x_btd, layer["wq"], dtype)
    k = project("btd,dke->btke", x_btd, layer["wk"], dtype)
    v = project("btd,dke->btke", x_btd, layer["wv"], dtype)
    if cfg.qkv_bias:
        q = q + layer["bq"].astype(dtype)
        k = k + layer["bk"].astype(dtype)
        v = v + layer["bv"].astype(dtype)
    if cfg.qk_norm:
        q = rms_norm(q, layer["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, layer["k_norm"], cfg.rms_norm_eps)
    return apply_rope(q, positions_bt, inv_freq), apply_rope(k, positions_bt, inv_freq), v


def block(h_btd, layer, kv_cache, ctx: "_Context"):
    """One decoder layer.

    `kv_cache` is None (attend within the T given tokens) or this layer's (k, v) cache slices
    [B, S, K, E], into which this step's keys and values are written before attending.
    """
    cfg, mesh = ctx.cfg, ctx.mesh
    x = rms_norm(h_btd, layer["attn_norm"], cfg.rms_norm_eps)
    q, k, v = project_qkv(x, layer, ctx.positions_bt, cfg, ctx.inv_freq)
    q = constrain(q, mesh, ("batch", "seq", "heads", "head_dim"))
    if kv_cache is not None:
        k_cache, v_cache = kv_cache
        k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), ctx.start, 1)
        v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), ctx.start, 1)
        kv_cache = (k_cache, v_cache)
        k, v = k_cache.astype(cfg.dtype), v_cache.astype(cfg.dtype)
    attn = attend(q, k, v, ctx.mask_bts, cfg)
    h_btd = h_btd + project("bthe,hed->btd", attn, layer["wo"], cfg.dtype)
    h_btd = constrain(h_btd, mesh, ("batch", "seq", "act_embed"))
    h_btd = h_btd + mlp(rms_norm(h_btd, layer["mlp_norm"], cfg.rms_norm_eps), layer, cfg.dtype)
    return constrain(h_btd, mesh, ("batch", "seq", "act_embed")), kv_cache


@dataclasses.dataclass(frozen=True)
class _Context:
    """Per-call values every layer needs (closed over by the scanned layer function)."""

    cfg: LlamaConfig
    mesh: Optional[Mesh]
    positions_bt: jax.Array
    mask_bts: jax.Array
    start: jax.Array
    inv_freq: jax.Array


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _scan_layers(layers: Params, h_btd, kv_cache, ctx: _Context):
    """Runs every layer with `lax.scan`; `kv_cache` is None or stacked (k, v) [L, B, S, K, E]."""
    def body(h, xs):
        layer, kv = xs
        h, kv = block(h, layer, kv, ctx)
        return h, kv

    if ctx.cfg.remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[ctx.cfg.remat])
    return jax.lax.scan(body, h_btd, (layers, kv_cache))


def default_positions(attention_mask_bt: jax.Array) -> jax.Array:
    """Positions that count only real tokens, so left padding does not shift them."""
    return jnp.maximum(jnp.cumsum(attention_mask_bt.astype(jnp.int32), axis=1) - 1, 0)


def forward_hidden(params: Params, cfg: LlamaConfig, tokens_bt: jax.Array,
                   attention_mask_bt: jax.Array, positions_bt: Optional[jax.Array] = None,
                   cache: Optional[KVCache] = None, mesh: Optional[Mesh] = None):
    """Final-norm hidden states [B, T, D] and the updated cache (None when no cache is given).

    Without a cache the sequence attends to itself (training / scoring). With a cache the T new
    tokens are written at slots [cache.end, cache.end + T) and attend to every valid earlier slot.
    """
    B, T = tokens_bt.shape
    positions_bt = default_positions(attention_mask_bt) if positions_bt is None else positions_bt
    if cache is None:
        start, valid_bs, kv = jnp.zeros((), jnp.int32), attention_mask_bt.astype(bool), None
    else:
        start, kv = cache.end, (cache.k, cache.v)
        valid_bs = jax.lax.dynamic_update_slice_in_dim(
            cache.valid_bs, attention_mask_bt.astype(bool), start, 1)
    query_slots_bt = jnp.broadcast_to(start + jnp.arange(T), (B, T))
    mask_bts = attention_mask(valid_bs, query_slots_bt, cfg.sliding_window)
    ctx = _Context(cfg, mesh, positions_bt, mask_bts, start, rope_inv_freq(cfg))
    # Gather rows from a whole table: XLA cannot gather from a vocab-split table without
    # replicating it anyway, and says so with "involuntary full rematerialization".
    embed = constrain(params["embed"], mesh, (None, None))
    h = jnp.take(embed, tokens_bt, axis=0).astype(cfg.dtype)
    h = constrain(h, mesh, ("batch", "seq", "act_embed"))
    h, kv = _scan_layers(params["layers"], h, kv, ctx)
    h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    if cache is None:
        return h, None
    return h, KVCache(k=kv[0], v=kv[1], valid_bs=valid_bs, end=start + T)


def unembed_matrix(params: Params, cfg: LlamaConfig) -> jax.Array:
    """[D, V] output projection (the transposed embedding when tied)."""
    return params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]


def logits_from_hidden(params: Params, cfg: LlamaConfig, h_btd: jax.Array) -> jax.Array:
    w = unembed_matrix(params, cfg).astype(cfg.dtype)
    return jnp.einsum("btd,dv->btv", h_btd, w, preferred_element_type=jnp.float32)


def forward(params: Params, cfg: LlamaConfig, tokens_bt: jax.Array, attention_mask_bt: jax.Array,
            positions_bt: Optional[jax.Array] = None, cache: Optional[KVCache] = None,
            mesh: Optional[Mesh] = None):
    """fp32 logits [B, T, V] (and the updated cache when one is given)."""
    h, new_cache = forward_hidden(params, cfg, tokens_bt, attention_mask_bt, positions_bt, cache, mesh)
    logits = logits_from_hidden(params, cfg, h)
    return (logits, new_cache) if cache is not None else logits
