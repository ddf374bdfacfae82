"""Causal grouped-query attention, one implementation per platform, chosen by name.

  dense    softmax over the whole [T, S] score matrix: O(T*S) memory. The reference, and what
           the CPU fast path uses up to one block of tokens.
  chunked  flash-style online softmax over key blocks in plain XLA: blocks above the diagonal
           and outside the sliding window are skipped, and the backward keeps only the
           log-sum-exp per query (O(T) memory). Runs anywhere; the CPU default.
  splash   Pallas splash attention (`jax.experimental.pallas.ops.tpu`): the TPU default.
  cudnn    cuDNN flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`):
           the GPU default for bf16 (cuDNN's flash kernels take no fp32).

Every implementation computes the same function: query t of a row sits at key slot
`q_offset + t` and attends to key slots s with `valid_bs[b, s]` (real tokens: left and right
padding are False), `s <= q_offset + t` and, with a sliding window W, `q_offset + t - s < W`.
Rows of padding queries are unspecified (nothing reads them).

Einsum letters: B batch, T queries, S keys, H query heads, K kv heads, G = H / K, E head dim,
Q and C a block of queries and of keys.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

IMPLEMENTATIONS = ("dense", "chunked", "splash", "cudnn")
PLATFORMS = ("cpu", "tpu", "cuda")
MASKED = -1e30  # finite, so a row with no visible key gives no inf - inf


def platform_of(backend: str) -> str:
    """jax's backend name ("cpu", "tpu", "gpu", "cuda") as one of PLATFORMS."""
    return "cuda" if backend in ("gpu", "cuda", "rocm") else backend


def resolve(name: str, platform: str, compute_dtype: str) -> str:
    """The implementation that `model.attention: name` means on `platform`.

    `auto` picks the platform's kernel: splash on TPU, cuDNN on GPU (bf16; fp32 runs chunked,
    which cuDNN's flash kernels cannot), chunked on CPU. An explicit choice is kept, so any
    implementation can be lowered for a platform the host does not have.
    """
    if name != "auto":
        if name not in IMPLEMENTATIONS:
            raise ValueError(f"model.attention: unknown implementation {name!r}; "
                             f"known: auto, {', '.join(IMPLEMENTATIONS)}")
        if name == "cudnn" and compute_dtype != "bfloat16":
            raise ValueError("model.attention: cudnn needs model.compute_dtype bfloat16 "
                             f"(got {compute_dtype}); use chunked for fp32")
        return name
    if platform == "tpu":
        return "splash"
    if platform == "cuda" and compute_dtype == "bfloat16":
        return "cudnn"
    return "chunked"


@dataclasses.dataclass(frozen=True)
class Spec:
    """The static part of an attention call (hashable)."""

    impl: str = "chunked"
    window: Optional[int] = None
    q_offset: int = 0
    block: int = 512  # query and key block of `chunked`
    platform: str = "cpu"  # the target: splash runs in Pallas interpret mode on "cpu"


def attention(q_bthe, k_bske, v_bske, valid_bs, spec: Spec, mesh: Optional[Mesh] = None):
    """Causal GQA attention [B, T, H, E] in q's dtype (softmax in fp32); differentiable."""
    one_block = max(q_bthe.shape[1], k_bske.shape[1]) <= spec.block
    if spec.impl == "dense" or (spec.impl == "chunked" and one_block):
        return dense(q_bthe, k_bske, v_bske, valid_bs, spec)
    if spec.impl == "chunked":
        return from_heads(chunked_heads(to_heads(q_bthe, k_bske.shape[2]),
                                        k_bske.transpose(0, 2, 1, 3),
                                        v_bske.transpose(0, 2, 1, 3), valid_bs, spec))
    kernel = {"splash": splash, "cudnn": cudnn}[spec.impl]
    return _per_shard(functools.partial(kernel, spec=spec), mesh, q_bthe, k_bske, v_bske,
                      valid_bs)


# ------------------------------------------------------------------------------------- masks


def visible(valid_bs, query_slots, key_slots, window: Optional[int]):
    """[B, Q, C] bool: key slot is real, not in the future, and inside the sliding window."""
    mask = valid_bs[:, None, :] & (key_slots[None, None, :] <= query_slots[None, :, None])
    if window is not None:
        mask &= (query_slots[None, :, None] - key_slots[None, None, :]) < window
    return mask


def full_mask(valid_bs, num_queries: int, spec: Spec):
    """[B, T, S] bool mask of the whole score matrix (dense only)."""
    return visible(valid_bs, spec.q_offset + jnp.arange(num_queries),
                   jnp.arange(valid_bs.shape[1]), spec.window)


# ------------------------------------------------------------------------------------- dense


def dense(q_bthe, k_bske, v_bske, valid_bs, spec: Spec):
    B, T, H, E = q_bthe.shape
    K = k_bske.shape[2]
    q = q_bthe.reshape(B, T, K, H // K, E)
    scores = jnp.einsum("btkge,bske->bkgts", q, k_bske,
                        preferred_element_type=jnp.float32) / math.sqrt(E)
    scores = jnp.where(full_mask(valid_bs, T, spec)[:, None, None], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(q_bthe.dtype)
    out = jnp.einsum("bkgts,bske->btkge", probs, v_bske.astype(probs.dtype))
    return out.reshape(B, T, H, E)


# ---------------------------------------------------------- head-major layout (chunked, CPU)


def to_heads(x_bthe, kv_heads: int):
    """[B, T, K*G, E] -> [B, K, G, T, E]."""
    B, T, H, E = x_bthe.shape
    return x_bthe.reshape(B, T, kv_heads, H // kv_heads, E).transpose(0, 2, 3, 1, 4)


def from_heads(x_bkgte):
    """[B, K, G, T, E] -> [B, T, K*G, E]."""
    B, K, G, T, E = x_bkgte.shape
    return x_bkgte.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, E)


def _pad_axis(x, axis: int, size: int, value=0):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _key_block_range(i, num_key_blocks: int, spec: Spec, bq: int, bk: int):
    """[first, last) key blocks that query block i can see (traced i)."""
    first_query = spec.q_offset + i * bq
    last = jnp.minimum(num_key_blocks, (first_query + bq - 1) // bk + 1)
    if spec.window is None:
        return jnp.zeros_like(last), last
    return jnp.maximum(0, first_query - spec.window + 1) // bk, last


def _block_scores(q_bkme, k_bkse, valid_bs, i, j, spec: Spec):
    """Scaled fp32 scores [B, K, M, C] of query block i (its G heads stacked along M = G*Q
    rows, so every block matmul is a plain batched product) against key block j, masked; and
    the mask [B, 1, M, C]."""
    block = spec.block
    k = jax.lax.dynamic_slice_in_dim(k_bkse, j * block, block, axis=2)
    valid = jax.lax.dynamic_slice_in_dim(valid_bs, j * block, block, axis=1)
    query_slots = spec.q_offset + i * block + jnp.arange(q_bkme.shape[2]) % block
    mask = visible(valid, query_slots, j * block + jnp.arange(block), spec.window)[:, None]
    scores = jnp.einsum("bkme,bkce->bkmc", q_bkme, k, preferred_element_type=jnp.float32)
    return jnp.where(mask, scores / math.sqrt(q_bkme.shape[-1]), MASKED), mask


def _padded(q, k, v, valid_bs, block: int):
    T, S = q.shape[3], k.shape[2]
    Tp, Sp = -(-T // block) * block, -(-S // block) * block
    return (_pad_axis(q, 3, Tp), _pad_axis(k, 2, Sp), _pad_axis(v, 2, Sp),
            _pad_axis(valid_bs, 1, Sp, False))


def _query_block(x_bkgt_, i, block: int):
    """Query block i of a [B, K, G, T, ...] array, its heads stacked: [B, K, G*Q, ...]."""
    x = jax.lax.dynamic_slice_in_dim(x_bkgt_, i * block, block, axis=3)
    return x.reshape(x.shape[:2] + (-1,) + x.shape[4:])


def _unblocked(blocks_n, shape):
    """Stacked query blocks [n, B, K, G*Q, ...] -> [B, K, G, n*Q, ...]."""
    n, B, K = blocks_n.shape[:3]
    G = shape[2]
    x = blocks_n.reshape((n, B, K, G, -1) + blocks_n.shape[4:])
    return jnp.moveaxis(x, 0, 3).reshape(shape)


def chunked_forward(q_bkgte, k_bkse, v_bkse, valid_bs, spec: Spec):
    """(output [B, K, G, T, E] in q's dtype, log-sum-exp [B, K, G, T] fp32), one query block
    at a time with an online softmax over the key blocks it can see."""
    T, bq = q_bkgte.shape[3], spec.block
    q, k, v, valid = _padded(q_bkgte, k_bkse, v_bkse, valid_bs, bq)
    num_key_blocks = k.shape[2] // bq

    def query_block(_, i):
        q_i = _query_block(q, i, bq)

        def key_block(j, carry):
            m, l, acc = carry
            scores, _ = _block_scores(q_i, k, valid, i, j, spec)
            m_new = jnp.maximum(m, scores.max(axis=-1))
            p = jnp.exp(scores - m_new[..., None])
            rescale = jnp.exp(m - m_new)
            v_j = jax.lax.dynamic_slice_in_dim(v, j * bq, bq, axis=2)
            pv = jnp.einsum("bkmc,bkce->bkme", p.astype(v.dtype), v_j,
                            preferred_element_type=jnp.float32)
            return m_new, l * rescale + p.sum(axis=-1), acc * rescale[..., None] + pv

        shape = q_i.shape[:-1]
        init = (jnp.full(shape, MASKED, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros(q_i.shape, jnp.float32))
        m, l, acc = jax.lax.fori_loop(*_key_block_range(i, num_key_blocks, spec, bq, bq),
                                      key_block, init)
        return None, ((acc / l[..., None]).astype(q.dtype), m + jnp.log(l))

    _, (out, lse) = jax.lax.scan(query_block, None, jnp.arange(q.shape[3] // bq))
    return (_unblocked(out, q.shape)[:, :, :, :T],
            _unblocked(lse, q.shape[:-1])[..., :T])


def chunked_backward(q_bkgte, k_bkse, v_bkse, valid_bs, out_bkgte, lse_bkgt, d_out_bkgte,
                     spec: Spec):
    """fp32 (d q, d k, d v) of `chunked_forward`: probabilities recomputed from the saved
    log-sum-exp block by block; d k and d v accumulate over the query blocks."""
    T, S, bq = q_bkgte.shape[3], k_bkse.shape[2], spec.block
    q, k, v, valid = _padded(q_bkgte, k_bkse, v_bkse, valid_bs, bq)
    d_out = _pad_axis(d_out_bkgte.astype(q.dtype), 3, q.shape[3])
    lse = _pad_axis(lse_bkgt, 3, q.shape[3])
    delta = _pad_axis(jnp.sum(d_out_bkgte.astype(jnp.float32) * out_bkgte.astype(jnp.float32),
                              axis=-1), 3, q.shape[3])
    num_key_blocks = k.shape[2] // bq

    def query_block(d_kv, i):
        q_i, d_out_i, lse_i, delta_i = (_query_block(x, i, bq) for x in (q, d_out, lse, delta))

        def key_block(j, carry):
            d_q, (d_k, d_v) = carry
            scores, mask = _block_scores(q_i, k, valid, i, j, spec)
            p = jnp.where(mask, jnp.exp(scores - lse_i[..., None]), 0.0)
            k_j, v_j = (jax.lax.dynamic_slice_in_dim(x, j * bq, bq, axis=2) for x in (k, v))
            d_p = jnp.einsum("bkme,bkce->bkmc", d_out_i, v_j, preferred_element_type=jnp.float32)
            d_s = (p * (d_p - delta_i[..., None]) / math.sqrt(q.shape[-1])).astype(q.dtype)
            d_q = d_q + jnp.einsum("bkmc,bkce->bkme", d_s, k_j,
                                   preferred_element_type=jnp.float32)
            d_k_j = jnp.einsum("bkmc,bkme->bkce", d_s, q_i, preferred_element_type=jnp.float32)
            d_v_j = jnp.einsum("bkmc,bkme->bkce", p.astype(q.dtype), d_out_i,
                               preferred_element_type=jnp.float32)
            add = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
                acc, jax.lax.dynamic_slice_in_dim(acc, j * bq, bq, axis=2) + x, j * bq, axis=2)
            return d_q, (add(d_k, d_k_j), add(d_v, d_v_j))

        d_q, d_kv = jax.lax.fori_loop(*_key_block_range(i, num_key_blocks, spec, bq, bq),
                                      key_block, (jnp.zeros(q_i.shape, jnp.float32), d_kv))
        return d_kv, d_q

    zeros = jnp.zeros(k.shape, jnp.float32)
    (d_k, d_v), d_q = jax.lax.scan(query_block, (zeros, zeros), jnp.arange(q.shape[3] // bq))
    return _unblocked(d_q, q.shape)[:, :, :, :T], d_k[:, :, :S], d_v[:, :, :S]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def chunked_heads(q_bkgte, k_bkse, v_bkse, valid_bs, spec: Spec):
    """`chunked_forward`'s output, differentiable with O(T) residuals."""
    return chunked_forward(q_bkgte, k_bkse, v_bkse, valid_bs, spec)[0]


def _chunked_fwd(q, k, v, valid_bs, spec):
    out, lse = chunked_forward(q, k, v, valid_bs, spec)
    return out, (q, k, v, valid_bs, out, lse)


def _chunked_bwd(spec, residuals, d_out):
    q, k, v, valid_bs, out, lse = residuals
    d_q, d_k, d_v = chunked_backward(q, k, v, valid_bs, out, lse, d_out, spec)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


chunked_heads.defvjp(_chunked_fwd, _chunked_bwd)


class HeadsResidual(NamedTuple):
    """What the CPU layer backward keeps of `heads_forward`: the softmax weights when the
    sequence fits one block (saving them beats recomputing), else output and log-sum-exp."""

    probs: Optional[jax.Array]  # [B, K, G*T, S]
    out: Optional[jax.Array]  # [B, K, G, T, E]
    lse: Optional[jax.Array]  # [B, K, G, T]


def heads_forward(q_bkgte, k_bkse, v_bkse, valid_bs, spec: Spec):
    """(output [B, K, G, T, E], `HeadsResidual`) for the hand-written CPU layer backward:
    `dense` or one block of `chunked` as whole matrices, longer `chunked` block by block."""
    B, K, G, T, E = q_bkgte.shape
    if spec.impl == "chunked" and max(T, k_bkse.shape[2]) > spec.block:
        out, lse = chunked_forward(q_bkgte, k_bkse, v_bkse, valid_bs, spec)
        return out, HeadsResidual(None, out, lse)
    q_bkme = q_bkgte.reshape(B, K, G * T, E)  # free: G query heads stacked along rows
    scores = jnp.einsum("bkme,bkse->bkms", q_bkme, k_bkse,
                        preferred_element_type=jnp.float32) / math.sqrt(E)
    mask = full_mask(valid_bs, T, spec)[:, None, None]
    scores = jnp.where(mask, scores.reshape(B, K, G, T, -1), MASKED)
    probs = jax.nn.softmax(scores, axis=-1).reshape(B, K, G * T, -1).astype(q_bkgte.dtype)
    out = jnp.einsum("bkms,bkse->bkme", probs, v_bkse.astype(probs.dtype),
                     preferred_element_type=jnp.float32).astype(probs.dtype)
    return out.reshape(q_bkgte.shape), HeadsResidual(probs, None, None)


def heads_backward(q_bkgte, k_bkse, v_bkse, valid_bs, saved: HeadsResidual, d_out_bkgte,
                   spec: Spec):
    """fp32 (d q [B, K, G, T, E], d k, d v [B, K, S, E]) of `heads_forward`."""
    if saved.probs is None:
        return chunked_backward(q_bkgte, k_bkse, v_bkse, valid_bs, saved.out, saved.lse,
                                d_out_bkgte, spec)
    B, K, G, T, E = q_bkgte.shape
    S, dtype = k_bkse.shape[2], saved.probs.dtype
    d_out = d_out_bkgte.astype(dtype).reshape(B, K, G * T, E)
    d_v = jnp.einsum("bkms,bkme->bkse", saved.probs, d_out, preferred_element_type=jnp.float32)
    d_probs = jnp.einsum("bkme,bkse->bkms", d_out, v_bkse.astype(dtype),
                         preferred_element_type=jnp.float32)
    probs = saved.probs.astype(jnp.float32)
    d_scores = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True))
    mask = full_mask(valid_bs, T, spec)[:, None, None]
    d_scores = jnp.where(mask, d_scores.reshape(B, K, G, T, S), 0.0)
    d_scores = (d_scores.reshape(B, K, G * T, S) / math.sqrt(E)).astype(dtype)
    d_q = jnp.einsum("bkms,bkse->bkme", d_scores, k_bkse, preferred_element_type=jnp.float32)
    d_k = jnp.einsum("bkms,bkme->bkse", d_scores, q_bkgte.reshape(B, K, G * T, E),
                     preferred_element_type=jnp.float32)
    return d_q.reshape(q_bkgte.shape), d_k, d_v


# ---------------------------------------------------------------------- kernels (TPU, GPU)


def _per_shard(kernel, mesh: Optional[Mesh], q, k, v, valid_bs):
    """Runs `kernel` on each device's rows and heads (`shard_map`): custom kernels are opaque
    to the SPMD partitioner. Heads are split over `tensor` only when both q and kv heads are."""
    if mesh is None:
        return kernel(q, k, v, valid_bs)
    from jaxcov.sharding import logical_spec

    rows = logical_spec(("batch",), q.shape[:1], mesh)[0]
    tensor = mesh.shape["tensor"]
    heads = "tensor" if tensor > 1 and not (q.shape[2] % tensor or k.shape[2] % tensor) else None
    qkv = PartitionSpec(rows, None, heads, None)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(qkv, qkv, qkv, PartitionSpec(rows, None)),
                         out_specs=qkv, check_vma=False)(q, k, v, valid_bs)


def _splash_block(length: int) -> int:
    return next(b for b in (512, 256, 128) if length % b == 0)


def _splash_kernel(T: int, S: int, G: int, q_offset: int, window: Optional[int],
                   interpret: bool):
    """A single-device splash MQA kernel over G query heads. Built afresh in every trace (its
    mask tables are arrays of the trace that made them; a cached kernel leaks tracers)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if window is None:
        mask = sa.CausalMask((T, S), offset=q_offset)
    else:
        mask = sa.LocalMask((T, S), window_size=(window - 1, 0), offset=q_offset)
    bq, bk = _splash_block(T), _splash_block(S)
    sizes = sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                          block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    return sa.make_splash_mqa_single_device(sa.MultiHeadMask([mask] * G), block_sizes=sizes,
                                            interpret=interpret)


def splash(q_bthe, k_bske, v_bske, valid_bs, spec: Spec):
    """Pallas splash attention: one MQA kernel per (row, kv head); padding is segment 0 and
    real tokens segment 1, so real queries never see padding. Lengths are padded to 128."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    B, T, H, E = q_bthe.shape
    S, K = k_bske.shape[1:3]
    Tp, Sp = -(-T // 128) * 128, -(-S // 128) * 128
    q = _pad_axis(q_bthe / math.sqrt(E), 1, Tp).astype(q_bthe.dtype)
    k, v = (_pad_axis(x, 1, Sp) for x in (k_bske, v_bske))
    valid = _pad_axis(valid_bs, 1, Sp, False).astype(jnp.int32)
    q_segments = _pad_axis(valid_bs[:, spec.q_offset:spec.q_offset + T], 1, Tp, False)
    kernel = _splash_kernel(Tp, Sp, H // K, spec.q_offset, spec.window, spec.platform == "cpu")
    per_row = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over kv heads
    out = jax.vmap(per_row)(to_heads(q, K).reshape(B, K, H // K, Tp, E),
                            k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                            SegmentIds(q=q_segments.astype(jnp.int32), kv=valid))
    return from_heads(out)[:, :T]


def cudnn(q_bthe, k_bske, v_bske, valid_bs, spec: Spec, implementation: str = "cudnn"):
    """cuDNN flash attention. cuDNN masks padding by lengths at the end of a row, so each row's
    real tokens (contiguous: [left padding | prompt | response | right padding]) are rotated
    to the front, attended causally, and rotated back. (`implementation="xla"` runs the same
    call through XLA, which is how CPU tests check the layout.)"""
    if spec.q_offset:
        raise ValueError("cudnn attention takes no query offset (the sampler shares no prefix)")
    T, E = q_bthe.shape[1], q_bthe.shape[3]
    first = jnp.argmax(valid_bs, axis=1).astype(jnp.int32)
    lengths = jnp.maximum(jnp.sum(valid_bs, axis=1, dtype=jnp.int32), 1)
    rotate = lambda x, by: jnp.take_along_axis(  # noqa: E731
        x, ((jnp.arange(T)[None] + by[:, None]) % T)[:, :, None, None], axis=1)
    q, k, v = (rotate(x, first) for x in (q_bthe, k_bske, v_bske))
    window = None if spec.window is None else (spec.window - 1, 0)
    out = jax.nn.dot_product_attention(q, k, v, scale=1 / math.sqrt(E), is_causal=True,
                                       query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                       local_window_size=window, implementation=implementation)
    return rotate(out, -first)


def cudnn_custom_calls() -> list[str]:
    """The cuDNN custom-call targets of `cudnn` (jax.export must be told to accept them)."""
    return ["__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"]


def assume_cudnn_on_host(version: int = 90800):
    """Lets a host without CUDA lower `cudnn` for a GPU target. jax asks the local cuDNN for its
    version while tracing (to pick kernel features); this names the target's instead."""
    from jax._src.cudnn import fused_attention_stablehlo as fused

    if fused.cuda_versions is None:
        fused.check_cudnn_version = lambda: version

