"""Drawing tokens: temperature, top-k, top-p and greedy on fp32 logits, with the exact log-prob
of each drawn token under the sampling distribution and under the T=1 policy; and what both
rollout programs (`jaxcov.sampler`'s static batch, `jaxcov.continuous`'s slots) share.

top-k / top-p thresholds are found by bisection on the float bit pattern (32 masked reductions)
rather than a sort of the vocabulary, which is slow on CPU.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from jaxcov.config import SamplerConfig
from jaxcov.models.llama import LlamaConfig

@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """The static part of sampling (a jit static argument)."""

    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def changes_policy(self) -> bool:
        """Whether the sampling distribution differs from the T=1 policy."""
        return self.temperature != 1.0 or self.top_k > 0 or self.top_p < 1.0

    @staticmethod
    def from_config(config: SamplerConfig) -> "SamplingOptions":
        return SamplingOptions(config.temperature, config.top_k, config.top_p)


def _sortable_bits(x: jax.Array) -> jax.Array:
    """int32 keys ordered like the float32 values (so bisection can run on integers)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(bits >= 0, bits, bits ^ jnp.int32(0x7FFFFFFF))


def _midpoint(lo: jax.Array, hi: jax.Array) -> jax.Array:
    """floor((lo + hi) / 2) without int32 overflow (keys span the whole int32 range)."""
    return (lo >> 1) + (hi >> 1) + (lo & hi & 1)


def _bisect_threshold(keys_rv: jax.Array, keeps_enough) -> jax.Array:
    """Largest int32 key t (per row) with `keeps_enough(keys_rv >= t)`; [R, 1].

    `keeps_enough` must be monotone: true for small t, false for large t.
    """
    lo = jnp.min(keys_rv, axis=-1, keepdims=True)  # keeps everything: always enough
    hi = jnp.max(keys_rv, axis=-1, keepdims=True) + 1  # keeps nothing: never enough

    def halve(_, bounds):
        lo, hi = bounds
        mid = _midpoint(lo, hi)
        ok = keeps_enough(keys_rv >= mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    return lo


def top_k_mask(logits_rv: jax.Array, k: int) -> jax.Array:
    """Tokens whose logit is at least the k-th largest (ties at the k-th value are all kept)."""
    keys = _sortable_bits(logits_rv)
    k = min(k, logits_rv.shape[-1])
    threshold = _bisect_threshold(keys, lambda kept: jnp.sum(kept, -1, keepdims=True) >= k)
    return keys >= threshold


def top_p_mask(logits_rv: jax.Array, p: float) -> jax.Array:
    """The smallest set of most likely tokens whose probability mass reaches p: a token is kept
    when the mass of the tokens strictly more likely than it is below p (HF / vLLM semantics)."""
    probs = jax.nn.softmax(logits_rv, axis=-1)
    keys = _sortable_bits(logits_rv)
    # A threshold t is too low while the tokens above t (excluding t) already hold mass >= p.
    above_mass = lambda t: jnp.sum(jnp.where(keys > t, probs, 0.0), -1, keepdims=True)  # noqa
    lo = jnp.min(keys, axis=-1, keepdims=True)
    hi = jnp.max(keys, axis=-1, keepdims=True)

    def halve(_, bounds):  # smallest t with above_mass(t) < p lies in [lo, hi]
        lo, hi = bounds
        mid = _midpoint(lo, hi)
        ok = above_mass(mid) < p
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    threshold, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    return keys >= threshold


def sampling_logits(logits_rv: jax.Array, options: SamplingOptions) -> jax.Array:
    """The logits of the sampling distribution: temperature, then top-k, then top-p (HF order);
    filtered tokens get -inf."""
    scaled = logits_rv if options.temperature == 1.0 else logits_rv / options.temperature
    if options.top_k > 0:
        scaled = jnp.where(top_k_mask(scaled, options.top_k), scaled, -jnp.inf)
    if options.top_p < 1.0:
        scaled = jnp.where(top_p_mask(scaled, options.top_p), scaled, -jnp.inf)
    return scaled


def _first_true(mask_rx: jax.Array, fallback_rx: jax.Array) -> jax.Array:
    """Index of the first True along the last axis; where there is none (rounding at the top of
    a cdf), the last True of `fallback`. Two plain min/max reductions: cheaper on CPU than
    argmax, which XLA lowers to a slow (value, index) pair reduction."""
    n = mask_rx.shape[-1]
    iota = jnp.arange(n, dtype=jnp.int32)
    first = jnp.min(jnp.where(mask_rx, iota, n), axis=-1)
    last = jnp.max(jnp.where(fallback_rx, iota, -1), axis=-1)
    return jnp.where(first < n, first, last)


def _block_size(vocab: int, largest: int = 256) -> int:
    """The largest power of two <= `largest` that divides the vocabulary size."""
    block = 1
    while block < largest and vocab % (2 * block) == 0:
        block *= 2
    return block


def _uniforms(key: jax.Array, rows: int) -> jax.Array:
    """One uniform in [0, 1) per row: from one key, or from a key per row ([R] keys: draws that
    do not depend on which rows share a batch)."""
    if key.ndim == 0:
        return jax.random.uniform(key, (rows,))
    return jax.vmap(jax.random.uniform)(key)


def _categorical(logits_rv: jax.Array, max_r1: jax.Array, key: jax.Array):
    """Inverse-CDF draw with one uniform per row, in two levels: first a block of the vocabulary
    by block mass, then a token inside it. The full-vocabulary work is one fused exp-and-sum pass
    (Gumbel-max would need a random number per token; a full-vocabulary cumsum is several passes).
    Zero-probability tokens are never drawn. Returns (token_r, log_z_r)."""
    R, V = logits_rv.shape
    block = _block_size(V)
    mass_rn = jnp.sum(jnp.exp(logits_rv - max_r1).reshape(R, V // block, block), axis=-1)
    cum_rn = jnp.cumsum(mass_rn, axis=-1)
    u_r = _uniforms(key, R) * cum_rn[:, -1]
    chosen_r = _first_true((cum_rn > u_r[:, None]) & (mass_rn > 0), mass_rn > 0)
    before_r = jnp.where(chosen_r > 0, jnp.take_along_axis(
        cum_rn, jnp.maximum(chosen_r - 1, 0)[:, None], axis=-1)[:, 0], 0.0)
    logits_rb = jnp.take_along_axis(logits_rv.reshape(R, V // block, block),
                                    chosen_r[:, None, None], axis=1)[:, 0]
    p_rb = jnp.exp(logits_rb - max_r1)
    inside_r = _first_true((jnp.cumsum(p_rb, axis=-1) > (u_r - before_r)[:, None]) & (p_rb > 0),
                           p_rb > 0)
    return chosen_r * block + inside_r, max_r1[:, 0] + jnp.log(cum_rn[:, -1])


def _log_z(logits_rv: jax.Array, max_r1: jax.Array) -> jax.Array:
    return max_r1[:, 0] + jnp.log(jnp.sum(jnp.exp(logits_rv - max_r1), axis=-1))


def _logit_of(logits_rv, token_r):
    return jnp.take_along_axis(logits_rv, token_r[:, None], axis=-1)[:, 0]


def sample_tokens(logits_rv: jax.Array, key: jax.Array, options: SamplingOptions):
    """Draws one token per row from fp32 logits [R, V] with one key, or a key per row ([R]).

    Returns (token_r, sample_logp_r, policy_logp_r): the log-prob of the token under the sampling
    distribution (0 for greedy: a point mass) and under the T=1 policy softmax(logits).
    """
    logits_rv = logits_rv.astype(jnp.float32)
    max_r1 = jnp.max(logits_rv, axis=-1, keepdims=True)
    if options.greedy:
        token = _first_true(logits_rv == max_r1, logits_rv == max_r1)
        policy_logp = _logit_of(logits_rv, token) - _log_z(logits_rv, max_r1)
        return token, jnp.zeros_like(policy_logp), policy_logp
    if not options.changes_policy:
        token, log_z = _categorical(logits_rv, max_r1, key)
        logp = _logit_of(logits_rv, token) - log_z
        return token, logp, logp
    sample_logits = sampling_logits(logits_rv, options)
    # Temperature and filters keep the top token, so the scaled maximum is max / T.
    token, sample_log_z = _categorical(sample_logits, max_r1 / options.temperature, key)
    return (token, _logit_of(sample_logits, token) - sample_log_z,
            _logit_of(logits_rv, token) - _log_z(logits_rv, max_r1))


@dataclasses.dataclass(frozen=True)
class SamplerStatic:
    """Everything about a sampler program that is fixed at compile time (hashable)."""

    cfg: LlamaConfig
    options: SamplingOptions
    n: int
    width: int
    stop_ids: tuple[int, ...]
    pad_id: int
    mesh: Optional[Mesh]
    slots: int = 0  # the continuous engine's decode slots (0: the static batch)
    groups: int = 1  # slot groups that schedule apart: one per batch shard of the mesh


def is_stop(token_r: jax.Array, stop_ids: tuple[int, ...]) -> jax.Array:
    """[R] bool: the token ends its response."""
    return jnp.isin(token_r, jnp.asarray(stop_ids, jnp.int32)) if stop_ids else jnp.zeros(
        token_r.shape, bool)


@struct.dataclass
class Generated:
    """What the program returns: the response columns of a `Rollout`."""

    response_ids: jax.Array
    response_mask: jax.Array
    sample_logprobs: jax.Array
    policy_logprobs: jax.Array
    stopped: jax.Array
    slot_steps: jax.Array  # [] int32: decode slots x loop steps (slot utilisation's denominator)
