"""Token statistics of the entropy mechanism: masked reductions, token entropy, the token
covariance Cov(log pi, A), and the entropy change that covariance predicts.

All reductions run over the valid tokens of whatever arrays they are given. Under `jax.jit` with
batch arrays sharded over the mesh they are global (XLA inserts the all-reduces), which is how the
policy update gets mini-batch-wide statistics without any per-device code.

Shapes: B sequences, T token positions, V vocabulary. A `mask_bt` is 1 on valid (response) tokens
and 0 on prompt and padding; any float or bool dtype is accepted.

The R = -a*exp(H) + b fit lives with the analysis code, not here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# The paper's headline statistic: the top 0.02% of tokens by covariance.
TOP_COV_FRACTION = 2e-4


def masked_sum(x_bt: Array, mask_bt: Array) -> Array:
    return jnp.sum(jnp.where(mask_bt > 0, x_bt, 0.0))


def masked_count(mask_bt: Array) -> Array:
    """Number of valid tokens, as float32 (it is used as a divisor)."""
    return jnp.sum((mask_bt > 0).astype(jnp.float32))


def valid_token_count(mask_bt: Array) -> Array:
    """Number of valid tokens as int32 (exact beyond float32's 2**24)."""
    return jnp.sum((mask_bt > 0).astype(jnp.int32))


def masked_mean(x_bt: Array, mask_bt: Array) -> Array:
    """Mean over valid tokens; 0 when there are none (never NaN)."""
    return masked_sum(x_bt, mask_bt) / jnp.maximum(masked_count(mask_bt), 1.0)


def masked_var(x_bt: Array, mask_bt: Array, unbiased: bool = False) -> Array:
    """Variance over valid tokens (Bessel-corrected when `unbiased`); 0 with too few tokens."""
    count = masked_count(mask_bt)
    centered_bt = x_bt - masked_mean(x_bt, mask_bt)
    sum_sq = masked_sum(centered_bt**2, mask_bt)
    divisor = count - 1.0 if unbiased else count
    return sum_sq / jnp.maximum(divisor, 1.0)


def masked_whiten(x_bt: Array, mask_bt: Array, eps: float = 1e-8) -> Array:
    """(x - mean) / sqrt(var + eps) over valid tokens, unbiased var (verl's masked_whiten)."""
    mean = masked_mean(x_bt, mask_bt)
    var = masked_var(x_bt, mask_bt, unbiased=True)
    return (x_bt - mean) * jax.lax.rsqrt(var + eps)


def token_entropy(logits_btv: Array) -> Array:
    """Entropy of the softmax over the last axis, in float32: logsumexp(z) - sum(p * z)."""
    logits_btv = logits_btv.astype(jnp.float32)
    log_norm_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    probs_btv = jax.nn.softmax(logits_btv, axis=-1)
    return log_norm_bt - jnp.sum(probs_btv * logits_btv, axis=-1)


def token_covariance(logp_bt: Array, advantages_bt: Array, mask_bt: Array) -> Array:
    """cov_i = (logp_i - mean(logp)) * (A_i - mean(A)), means over valid tokens; 0 elsewhere.

    This is the per-token term whose mean is Cov(log pi, A); it is what Clip-Cov and KL-Cov rank.
    """
    logp_bt = jax.lax.stop_gradient(logp_bt)
    advantages_bt = jax.lax.stop_gradient(advantages_bt)
    centered_logp_bt = logp_bt - masked_mean(logp_bt, mask_bt)
    centered_adv_bt = advantages_bt - masked_mean(advantages_bt, mask_bt)
    return jnp.where(mask_bt > 0, centered_logp_bt * centered_adv_bt, 0.0)


def predicted_entropy_change(cov_mean: Array, learning_rate: Array | float) -> Array:
    """dH ~= -eta * Cov(log pi, A): the natural-policy-gradient form of the paper's Theorem 2.

    Under natural PG the logit change is eta * A, so one step moves entropy by minus the step
    size times the covariance. The trainer logs it next to the entropy change it measures.
    """
    return -jnp.asarray(learning_rate, jnp.float32) * cov_mean


# ----------------------------------------------------------------------------- exact top-k


def fraction_count_thresholds(ratio: float, capacity: int) -> np.ndarray:
    """For j = 1..k_max, the least n with int(ratio * n) >= j, where k_max = int(ratio * capacity).

    Why a table: `max(1, int(ratio * n))` in float32 differs from the reference's float64 (e.g.
    0.7 * 10 gives 6 in float32). Counting table entries <= n reproduces the float64 value
    exactly for a traced n, and the table has only k_max entries.
    """
    k_max = max(1, int(ratio * capacity))
    wanted = np.arange(1, k_max + 1, dtype=np.int64)
    n = np.ceil(wanted / ratio).astype(np.int64)
    # ceil(j / ratio) can be off by one either way after float rounding; walk to the exact edge.
    while True:
        can_lower = (n > 0) & (np.floor(ratio * (n - 1)) >= wanted)
        if not can_lower.any():
            break
        n[can_lower] -= 1
    while True:
        too_low = np.floor(ratio * n) < wanted
        if not too_low.any():
            break
        n[too_low] += 1
    return n


def fraction_count(ratio: float, n_valid: Array, capacity: int) -> tuple[Array, int]:
    """(k, k_max) for a traced int32 count n_valid.

    k = max(1, int(ratio * n_valid)) exactly as float64 Python computes it; k_max =
    max(1, int(ratio * capacity)) is the static bound that sizes the top-k buffers.
    """
    thresholds = fraction_count_thresholds(ratio, capacity)
    thresholds = jnp.asarray(np.minimum(thresholds, np.iinfo(np.int32).max), jnp.int32)
    reached = jnp.sum(thresholds <= n_valid)
    return jnp.maximum(1, reached), len(thresholds)


def largest_k_mask(scores_bt: Array, eligible_bt: Array, k: Array, k_max: int) -> Array:
    """Boolean mask of the k largest eligible scores (k traced, k <= static k_max).

    Ties are broken by flat index (lax.top_k is stable), so exactly min(k, #eligible) tokens are
    picked. Why lax.top_k with a static bound (bench/bench_losses.py, bench/RESULTS.md): on CPU
    at N = 1e6 it is 3-8x faster than `radix_select_mask` and ~100x faster than a full sort, and
    approx_max_k is not exact. On a sharded batch XLA all-gathers the N scores to every device
    first (40 MB at 1e7 tokens, once per mini-batch); if that shows up in a TPU profile,
    `radix_select_mask` returns the same mask with only scalar all-reduces.
    """
    scores_bt, eligible_bt = jnp.asarray(scores_bt), jnp.asarray(eligible_bt, bool)
    # top_k orders -0.0 below +0.0; fold it so equal values tie and go by index.
    scores_bt = jnp.where(scores_bt == 0, 0.0, scores_bt)
    flat_scores_n = jnp.where(eligible_bt, scores_bt, -jnp.inf).reshape(-1)
    k_max = min(k_max, flat_scores_n.shape[0])
    _, index_k = jax.lax.top_k(flat_scores_n, k_max)
    keep_k = (jnp.arange(k_max) < k) & eligible_bt.reshape(-1)[index_k]
    picked_n = jnp.zeros(flat_scores_n.shape, bool).at[index_k].set(keep_k)
    return picked_n.reshape(scores_bt.shape)


def _sortable_bits(x: Array) -> Array:
    """uint32 keys with the order of the float32 values (-0.0 folded into +0.0)."""
    x = jnp.where(x == 0, 0.0, x.astype(jnp.float32))
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    negative = bits >= jnp.uint32(0x80000000)
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _largest_bound(count_at_least, bits: int, k: Array) -> Array:
    """Largest uint32 t (of `bits` bits) with count_at_least(t) >= k, built MSB first."""
    def try_bit(i, bound):
        candidate = bound | (jnp.uint32(1) << (bits - 1 - i).astype(jnp.uint32))
        return jnp.where(count_at_least(candidate) >= k, candidate, bound)
    return jax.lax.fori_loop(0, bits, try_bit, jnp.uint32(0))


def radix_select_mask(scores_bt: Array, eligible_bt: Array, k: Array) -> Array:
    """Same mask as `largest_k_mask` (k largest eligible, ties to the lower flat index) by
    bisection: 32 global counts find the k-th largest key, log2(N) more place the cut among
    tied keys. Only elementwise work and scalar reductions, so sharded inputs need no gather."""
    keys_n = _sortable_bits(jnp.asarray(scores_bt)).reshape(-1)
    eligible_n = jnp.asarray(eligible_bt, bool).reshape(-1)
    count = lambda m: jnp.sum(m.astype(jnp.int32))  # noqa: E731
    kth_key = _largest_bound(lambda t: count(eligible_n & (keys_n >= t)), 32, k)
    above_n = eligible_n & (keys_n > kth_key)
    tied_n = eligible_n & (keys_n == kth_key)
    still_needed = k - count(above_n)
    index_n = jnp.arange(keys_n.shape[0], dtype=jnp.uint32)
    # Tied keys are taken in index order: find the index of the still_needed-th tied key.
    index_bits = max(1, int(keys_n.shape[0] - 1).bit_length())
    last = _largest_bound(lambda t: count(tied_n & (index_n >= t)), index_bits,
                          count(tied_n) - still_needed + 1)
    picked_n = above_n | (tied_n & (index_n <= last) & (still_needed > 0))
    enough = count(eligible_n) > k
    return jnp.where(enough, picked_n, eligible_n).reshape(jnp.shape(scores_bt))


# ----------------------------------------------------------------------------- metrics


def covariance_metrics(cov_bt: Array, mask_bt: Array) -> dict[str, Array]:
    """`cov/mean`, `cov/std`, `cov/max`, `cov/min` and `cov/top0.02pct_mean` over valid tokens.

    `cov/top0.02pct_mean` is the mean of the max(1, int(2e-4 * N)) largest token covariances,
    the statistic the paper contrasts with the overall mean.
    """
    valid_bt = mask_bt > 0
    k, k_max = fraction_count(TOP_COV_FRACTION, valid_token_count(mask_bt), cov_bt.size)
    top_bt = largest_k_mask(cov_bt, valid_bt, k, k_max)
    any_valid = jnp.any(valid_bt)
    return {
        "cov/mean": masked_mean(cov_bt, mask_bt),
        "cov/std": jnp.sqrt(masked_var(cov_bt, mask_bt)),
        "cov/max": jnp.where(any_valid, jnp.max(jnp.where(valid_bt, cov_bt, -jnp.inf)), 0.0),
        "cov/min": jnp.where(any_valid, jnp.min(jnp.where(valid_bt, cov_bt, jnp.inf)), 0.0),
        "cov/top0.02pct_mean": masked_sum(cov_bt, top_bt) / jnp.maximum(masked_count(top_bt), 1.0),
    }
