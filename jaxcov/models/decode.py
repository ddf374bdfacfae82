"""The decode-time forward pass: prefill a prompt batch into a KV cache, then one token per
row per step (`decode_step`). Its layers are `llama.layer_forward`, the training forward's
own layer code, with an attention that reads and writes the cache; the sampler
(`jaxcov.sampler`) keeps sampling and scheduling.

    top, layers = decode_params(params, cfg, mesh)      # cast and unstacked once per call
    logits_bv, cache = prefill(top, layers, cfg, prefix_c, prompt_bp, mask_bp, width, mesh)
    logits_rv, cache = decode_step(top, layers, cfg, token_r, position_r, cache, mesh)

Layers are a Python loop over per-layer weights, not a scan: XLA:CPU copied a scanned layer's
weights out of the stack on every decode step (bench/RESULTS.md, rollout sampler).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from jaxcov.models import attention as attention_lib
from jaxcov.models import llama
from jaxcov.models.llama import LlamaConfig, Params
from jaxcov.sharding import constrain


def unstack_layers(params: Params, cfg: LlamaConfig) -> list[Params]:
    """The stacked [L, ...] layer parameters as one tree per layer."""
    return [jax.tree.map(lambda x: x[i], params["layers"]) for i in range(cfg.num_layers)]


@functools.partial(jax.jit, static_argnames=("cfg", "mesh"))
def decode_params(params: Params, cfg: LlamaConfig,
                  mesh: Optional[Mesh] = None) -> tuple[Params, list[Params]]:
    """(top-level params, per-layer params) as the sampler takes them, made in one pass.

    Cast to the sampling dtype here, not inside the program: bf16 weights that arrive as bf16
    run on XLA:CPU's bf16 kernels, while a cast inside gets folded into fp32 dots. Weights are
    gathered along `embed` (their fsdp split), so the decode loop does not all-gather every
    weight on every token; the tensor split of heads / mlp / vocab stays.
    """
    def prepare(x, spec: llama.ParamSpec):
        axes = tuple(None if a == "embed" else a for a in spec.axes[-x.ndim:])
        return constrain(x.astype(cfg.dtype), mesh, axes)

    specs = llama.param_specs(cfg)
    top = {k: prepare(v, specs[k]) for k, v in params.items() if k != "layers"}
    layers = [jax.tree.map(prepare, layer, specs["layers"], is_leaf=llama.is_spec)
              for layer in unstack_layers(params, cfg)]
    return top, layers


def embed_tokens(embed_vd: jax.Array, tokens: jax.Array, dtype) -> jax.Array:
    """Embedding rows of `tokens`. A 16-bit table is gathered as uint16 bits: XLA:CPU would
    otherwise convert the whole table to fp32 first."""
    if embed_vd.dtype.itemsize != 2:
        return jnp.take(embed_vd, tokens, axis=0).astype(dtype)
    bits = jnp.take(jax.lax.bitcast_convert_type(embed_vd, jnp.uint16), tokens, axis=0)
    return jax.lax.bitcast_convert_type(bits, embed_vd.dtype).astype(dtype)


def unembed(params: Params, cfg: LlamaConfig, h_xd: jax.Array) -> jax.Array:
    """fp32 logits [..., V] (a tied embedding is contracted as stored, not transposed)."""
    if cfg.tie_word_embeddings:
        w_vd = params["embed"].astype(cfg.dtype)
        return jnp.einsum("...d,vd->...v", h_xd, w_vd, preferred_element_type=jnp.float32)
    w_dv = params["lm_head"].astype(cfg.dtype)
    return jnp.einsum("...d,dv->...v", h_xd, w_dv, preferred_element_type=jnp.float32)


EMPTY = -1  # the position of a cache slot that holds no token


@struct.dataclass
class DecodeCache:
    """The KV cache of the sampler: one array per layer (so XLA updates each in place inside
    the loop) in layout [R, K, S, E] (so one-token attention needs no transposes). Slots hold
    [shared prefix | left padding | rest of the prompt | response tokens].

    A query attends to the slots whose token position is at most its own (and inside a sliding
    window), whatever their order: so every row writes its next token at the same slot `end`
    (one in-place slice update; a slot per row would be a scatter, 2x slower on XLA:CPU), and
    the continuous engine can treat the response slots as a ring."""

    k: tuple[jax.Array, ...]  # L x [R, K, S, E]
    v: tuple[jax.Array, ...]  # L x [R, K, S, E]
    positions_rs: jax.Array  # [R, S] int32: rope position of each slot's token, EMPTY if none
    end: jax.Array  # [] int32: the slot the next token of every row goes to
    extent: jax.Array  # [] int32: slots [0, extent) may hold tokens, the rest are empty

    AXES = ("batch", "kv_heads", "cache_seq", "head_dim")


def repeat_rows(x: jax.Array, n: int) -> jax.Array:
    """Repeats every row (leading axis) n times: row r -> rows r*n .. r*n+n-1."""
    return x if n == 1 else jnp.repeat(x, n, axis=0)


def repeat_cache(cache: DecodeCache, n: int, mesh: Optional[Mesh]) -> DecodeCache:
    """Each prompt's cache row repeated n times, for n samples per prompt."""
    fix = lambda x: constrain(repeat_rows(x, n), mesh, DecodeCache.AXES)  # noqa: E731
    return cache.replace(k=tuple(map(fix, cache.k)), v=tuple(map(fix, cache.v)),
                         positions_rs=constrain(repeat_rows(cache.positions_rs, n), mesh,
                                                ("batch", "cache_seq")))


def _prompt_pass(params, layers, cfg: LlamaConfig, tokens_bt, positions_bt, valid_bs, past,
                 mesh):
    """Runs T prompt tokens per row through every layer. Each attends to `past` (per layer,
    (k, v) [B, C, K, E] of earlier tokens, or None) and to the T tokens, causally, over the
    real slots `valid_bs` [B, C + T], through `cfg.attention`'s kernel. Returns the hidden
    states [B, T, D] and per layer (k, v) [B, C + T, K, E]."""
    inv_freq = llama.rope_inv_freq(cfg)
    spec = cfg.attention_spec(q_offset=valid_bs.shape[1] - tokens_bt.shape[1])

    def attention_after(past_kv):
        def attention(q_bthe, k_btke, v_btke):
            if past_kv is not None:
                k_btke = jnp.concatenate([past_kv[0], k_btke], axis=1)
                v_btke = jnp.concatenate([past_kv[1], v_btke], axis=1)
            out = attention_lib.attention(q_bthe, k_btke, v_btke, valid_bs, spec, mesh)
            return out, None, (k_btke, v_btke)
        return attention

    h = constrain(embed_tokens(params["embed"], tokens_bt, cfg.dtype), mesh,
                  ("batch", "seq", "act_embed"))
    kvs = []
    for i, layer in enumerate(layers):
        attention = attention_after(None if past is None else past[i])
        h, _, kv = llama.layer_forward(h, layer, attention, positions_bt, inv_freq, cfg, mesh)
        kvs.append(kv)
    return h, kvs


def prefill(params: Params, layers: Sequence[Params], cfg: LlamaConfig, prefix_c: jax.Array,
            prompt_bp: jax.Array, mask_bp: jax.Array, width: int, mesh: Optional[Mesh]):
    """Runs the prompts through the model once (`layers` from `decode_params`).

    `prefix_c` [C] holds tokens that every prompt starts with (C may be 0): they run once, as
    one row, and all rows share their keys and values. `prompt_bp` holds the rest of each
    prompt, left-padded, so the cache is [prefix | padding | rest | room for `width` tokens].
    Returns the fp32 logits at the last prompt slot [B, V] and the cache.
    """
    B, P = prompt_bp.shape
    C = prefix_c.shape[0]
    past = None
    if C:
        _, past = _prompt_pass(params, layers, cfg, prefix_c[None], jnp.arange(C)[None],
                               jnp.ones((1, C), bool), None, mesh)
        past = jax.tree.map(lambda x: jnp.broadcast_to(x, (B,) + x.shape[1:]), past)
    valid_bs = jnp.concatenate([jnp.ones((B, C), bool), mask_bp.astype(bool)], axis=1)
    positions_bp = C + llama.default_positions(mask_bp)
    h, kvs = _prompt_pass(params, layers, cfg, prompt_bp, positions_bp, valid_bs, past, mesh)
    to_cache = lambda x_bske: constrain(  # noqa: E731
        jnp.pad(x_bske.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, width), (0, 0))),
        mesh, DecodeCache.AXES)
    positions_bs = jnp.concatenate([jnp.broadcast_to(jnp.arange(C), (B, C)), positions_bp], 1)
    positions_bs = jnp.where(valid_bs, positions_bs, EMPTY).astype(jnp.int32)
    cache = DecodeCache(k=tuple(to_cache(k) for k, _ in kvs), v=tuple(to_cache(v) for _, v in kvs),
                        positions_rs=jnp.pad(positions_bs, ((0, 0), (0, width)),
                                             constant_values=EMPTY),
                        end=jnp.int32(C + P), extent=jnp.int32(C + P))
    h_bd = llama.rms_norm(h[:, -1], params["final_norm"], cfg.rms_norm_eps)
    return unembed(params, cfg, h_bd), cache


def _attend_cache(q_rkge, k_cache_rkse, v_cache_rkse, mask_rs) -> jax.Array:
    """One query per row against the cache (this token's key and value already written);
    softmax in fp32, normalised after the value matmul (one pass fewer over the scores). The
    cache is read only by the two matmuls: anything that reads it as a fused elementwise op
    (an fp32 cast, say) makes XLA copy the whole cache every layer."""
    q_rkge = q_rkge * jnp.asarray(1 / math.sqrt(q_rkge.shape[-1]), q_rkge.dtype)
    scores_rkgs = jnp.einsum("rkge,rkse->rkgs", q_rkge, k_cache_rkse,
                             preferred_element_type=jnp.float32)
    scores_rkgs = scores_rkgs + jnp.where(mask_rs, 0.0, -1e30)[:, None, None, :]
    weights_rkgs = jnp.exp(scores_rkgs - jnp.max(scores_rkgs, axis=-1, keepdims=True))
    out = jnp.einsum("rkgs,rkse->rkge", weights_rkgs.astype(v_cache_rkse.dtype), v_cache_rkse,
                     preferred_element_type=jnp.float32)
    return (out / jnp.sum(weights_rkgs, axis=-1, keepdims=True)).astype(q_rkge.dtype)


# Attention reads the smallest of these many cache widths that covers the filled slots
# (`lax.switch`), so a decode step's KV reads follow the tokens so far, not the cache size.
WIDTH_BUCKETS = 8
MIN_BUCKETED_WIDTH = 128  # below this one width: the reads saved do not pay for the switch


def width_buckets(slots: int) -> tuple[int, ...]:
    """Ascending cache widths (multiples of 8, the last one `slots`) that attention chooses
    from."""
    if slots < MIN_BUCKETED_WIDTH:
        return (slots,)
    step = -(-slots // (8 * WIDTH_BUCKETS)) * 8
    return tuple(sorted({min(slots, step * i) for i in range(1, WIDTH_BUCKETS + 1)}))


def _attend_filled(q_rkge, k_cache_rkse, v_cache_rkse, mask_rs, extent) -> jax.Array:
    """`_attend_cache` over the first slots of the cache only: the smallest width bucket that
    holds [0, extent). The slots past it are empty, so the result is the full cache's."""
    widths = width_buckets(k_cache_rkse.shape[2])

    def over(width):
        return lambda: _attend_cache(q_rkge, k_cache_rkse[:, :, :width],
                                     v_cache_rkse[:, :, :width], mask_rs[:, :width])
    if len(widths) == 1:
        return over(widths[0])()
    index = jnp.searchsorted(jnp.asarray(widths, jnp.int32), extent)
    return jax.lax.switch(jnp.minimum(index, len(widths) - 1), [over(w) for w in widths])


def _cache_mask(positions_rs: jax.Array, position_r: jax.Array, window: Optional[int]):
    """[R, S] bool: the slots a query at `position_r` attends to (this token's own included)."""
    query_r1 = position_r[:, None]
    mask = (positions_rs != EMPTY) & (positions_rs <= query_r1)
    if window is not None:
        mask &= (query_r1 - positions_rs) < window
    return mask


def decode_step(params: Params, layers: Sequence[Params], cfg: LlamaConfig, token_r: jax.Array,
                position_r: jax.Array, cache: DecodeCache, mesh: Optional[Mesh]):
    """Feeds one token per row (rope position `position_r`, cache slot `cache.end`); returns
    fp32 logits [R, V] and the updated cache."""
    R, K, slot = token_r.shape[0], cfg.num_kv_heads, cache.end
    write = lambda c_rsx, x_rx: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
        c_rsx, x_rx[:, None].astype(c_rsx.dtype), slot, 1)
    positions_rs = write(cache.positions_rs, position_r)
    extent = jnp.maximum(cache.extent, slot + 1)
    mask_rs = _cache_mask(positions_rs, position_r, cfg.sliding_window)
    write_kv = lambda c_rkse, x_rke: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
        c_rkse, x_rke[:, :, None].astype(c_rkse.dtype), slot, 2)
    h = constrain(embed_tokens(params["embed"], token_r[:, None], cfg.dtype), mesh,
                  ("batch", "seq", "act_embed"))
    inv_freq = llama.rope_inv_freq(cfg)
    ks, vs = [], []
    for layer, k_cache, v_cache in zip(layers, cache.k, cache.v):
        def attention(q_r1he, k_r1ke, v_r1ke, k_cache=k_cache, v_cache=v_cache):
            k_cache, v_cache = write_kv(k_cache, k_r1ke[:, 0]), write_kv(v_cache, v_r1ke[:, 0])
            q_rkge = q_r1he.reshape(R, K, cfg.num_heads // K, cfg.head_dim)
            out_rkge = _attend_filled(q_rkge, k_cache, v_cache, mask_rs, extent)
            out_r1he = out_rkge.reshape(R, 1, cfg.num_heads, cfg.head_dim)
            return out_r1he, None, (k_cache, v_cache)

        h, _, (k_cache, v_cache) = llama.layer_forward(h, layer, attention, position_r[:, None],
                                                       inv_freq, cfg, mesh)
        ks.append(k_cache)
        vs.append(v_cache)
    h_rd = llama.rms_norm(h[:, 0], params["final_norm"], cfg.rms_norm_eps)
    return unembed(params, cfg, h_rd), cache.replace(k=tuple(ks), v=tuple(vs),
                                                     positions_rs=positions_rs, end=slot + 1,
                                                     extent=extent)
