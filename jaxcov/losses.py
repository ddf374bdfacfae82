"""Policy losses (ppo_clip, clip_cov, kl_cov), the entropy bonus and the reference-KL term.

Every policy loss has the signature `loss_fn(inputs: LossInputs, algo) -> (loss, metrics)` and is
chosen by name from `POLICY_LOSSES`. Clip-Cov and KL-Cov act on a set of tokens that is chosen
ONCE per optimizer mini-batch by `select_tokens` (covariance means, candidates, random pick and
top-k over every valid token of the mini-batch on every device) and handed to the loss as
`LossInputs.selected_bt`. Normalisers (`token_count`, `seq_count`) are those of the whole
mini-batch too, so the loss of a micro-batch is its exact share of the mini-batch loss and summed
micro-batch gradients equal the mini-batch gradient, whatever the micro-batch size or mesh.

Semantics (Cui et al. 2025; verl's compute_policy_loss_clip_cov / _kl_cov), N = valid tokens,
ratio = exp(logp - old_logp), cov_i = (logp_i - mean logp)(A_i - mean A):
  ppo_clip  max(-A ratio, -A clip(ratio, 1-eps_low, 1+eps_high)); with dual_clip_c = c, tokens with
            A < 0 are further capped at -A c.
  clip_cov  ppo_clip's surrogate times 0 on max(1, int(clip_cov_ratio N)) tokens drawn uniformly
            (from the key) among valid tokens with lb < cov < ub that PPO has not clipped (fewer if
            there are fewer candidates); they stay in the denominators. (verl has no dual clip
            here; with one, dual-clipped tokens are not candidates either.)
  kl_cov    -A ratio on every token, plus kl_cov_coef |logp - old_logp| on the
            max(1, int(kl_cov_ratio N)) tokens of largest cov.

Aggregation (`algo.loss_agg_mode`), with mini-batch-wide counts:
  token-mean               sum of token losses / N
  seq-mean-token-sum       sum of token losses / S      (S = sequences with a valid token)
  seq-mean-token-mean      sum over sequences of (mean over its tokens) / S
  seq-mean-token-sum-norm  sum of token losses / (S L)  (Dr.GRPO; L = algo.loss_norm_length or
                           the padded length; verl omits the 1/S, which makes the scale depend on
                           the batch size)

Metrics. Loss metrics are ADDITIVE: each is a sum over the given tokens divided by mini-batch
counts, so summing them over micro-batches gives the mini-batch value.
  actor/loss            total loss (policy + entropy bonus + reference KL)
  actor/pg_loss         policy-loss part
  ppo/clipfrac_high     fraction of tokens with A > 0 and ratio > 1 + eps_high (PPO-clipped)
  ppo/clipfrac_low      fraction of tokens with A < 0 and ratio < 1 - eps_low (PPO-clipped)
  ppo/dual_clipfrac     fraction of tokens capped by the dual clip (0 when it is off)
  actor/abs_dlogp       mean |logp - old_logp|
  actor/k3_old          mean k3 estimate of KL(pi || pi_old): exp(old - logp) - (old - logp) - 1
  clip_cov/clipped_frac fraction of tokens Clip-Cov removed from the gradient (clip_cov only)
  kl_cov/penalized_frac fraction of tokens KL-Cov penalised (kl_cov only)
  kl_cov/penalty        mean over all tokens of the KL-Cov penalty term (kl_cov only)
  actor/ref_kl          mean reference KL of the configured type (only with ref_logp_bt)
Selection metrics are computed once on the whole mini-batch by `select_tokens` (before the update):
  batch/valid_tokens, batch/valid_seqs   N and S
  adv/mean, adv/std                      over valid tokens
  actor/entropy                          mean token entropy (when entropies are given)
  cov/mean, cov/std, cov/max, cov/min, cov/top0.02pct_mean   token covariance (see entropy.py)
  cov/pred_dH                            -learning_rate * cov/mean (when a learning rate is given)
  clip_cov/candidate_frac                fraction of tokens eligible for Clip-Cov (clip_cov only)
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import struct

from jaxcov.config import AlgoConfig
from jaxcov.entropy import (covariance_metrics, fraction_count, largest_k_mask, masked_count,
                            masked_mean, masked_sum, masked_var, predicted_entropy_change,
                            token_covariance, valid_token_count)

Array = jax.Array

# Log-ratios beyond this are clamped before exp (verl does the same) so ratios stay finite.
MAX_LOG_RATIO = 20.0


@struct.dataclass
class LossInputs:
    """Everything a policy loss reads. [B, T] arrays may be one micro-batch of a mini-batch;
    the counts are always those of the whole mini-batch."""

    logp_bt: Array            # current policy log-probs (differentiated)
    old_logp_bt: Array        # log-probs of the policy that sampled (or of the rollout step)
    advantages_bt: Array
    mask_bt: Array            # 1 on response tokens that get a loss
    selected_bt: Array        # bool: tokens chosen by the mini-batch-wide covariance selection
    token_count: Array        # N: valid tokens of the mini-batch
    seq_count: Array          # S: sequences of the mini-batch with at least one valid token
    norm_length: Array        # L of seq-mean-token-sum-norm
    entropy_bt: Optional[Array] = None   # needed when algo.entropy_coef > 0
    ref_logp_bt: Optional[Array] = None  # needed when algo.ref_kl_coef > 0


@struct.dataclass
class TokenSelection:
    """Result of the once-per-mini-batch selection pass."""

    selected_bt: Array
    token_count: Array
    seq_count: Array
    norm_length: Array
    metrics: dict


# ----------------------------------------------------------------------------- pieces


def log_ratio(logp_bt: Array, old_logp_bt: Array) -> Array:
    return jnp.clip(logp_bt - old_logp_bt, -MAX_LOG_RATIO, MAX_LOG_RATIO)


def abs_with_zero_subgradient(x: Array) -> Array:
    """|x| whose gradient at 0 is 0 (jnp.abs has 1 there), so that KL-Cov's penalty has no
    gradient on policy, as in the paper and in PyTorch."""
    return x * jax.lax.stop_gradient(jnp.sign(x))


def ppo_clip_active(ratio_bt: Array, advantages_bt: Array, algo: AlgoConfig) -> Array:
    """Where the clipped term wins the max, i.e. PPO has clipped the token (zero gradient)."""
    unclipped_bt = -advantages_bt * ratio_bt
    clipped_bt = -advantages_bt * jnp.clip(ratio_bt, 1.0 - algo.eps_low, 1.0 + algo.eps_high)
    return clipped_bt > unclipped_bt


def ppo_surrogate(ratio_bt: Array, advantages_bt: Array, algo: AlgoConfig) -> tuple[Array, Array]:
    """Per-token PPO loss and where the dual clip capped it."""
    unclipped_bt = -advantages_bt * ratio_bt
    clipped_bt = -advantages_bt * jnp.clip(ratio_bt, 1.0 - algo.eps_low, 1.0 + algo.eps_high)
    loss_bt = jnp.maximum(unclipped_bt, clipped_bt)
    if algo.dual_clip_c is None:
        return loss_bt, jnp.zeros(loss_bt.shape, bool)
    # Dual clip: a very large ratio on a negative-advantage token must not dominate the loss.
    cap_bt = -advantages_bt * algo.dual_clip_c
    dual_bt = (advantages_bt < 0) & (loss_bt > cap_bt)
    return jnp.where(dual_bt, cap_bt, loss_bt), dual_bt


def aggregate(loss_bt: Array, x: LossInputs, mode: str) -> Array:
    """Reduces token losses to a scalar with mini-batch-wide normalisers (see module doc)."""
    total = masked_sum(loss_bt, x.mask_bt)
    if mode == "token-mean":
        return total / jnp.maximum(x.token_count, 1.0)
    if mode == "seq-mean-token-sum":
        return total / jnp.maximum(x.seq_count, 1.0)
    if mode == "seq-mean-token-sum-norm":
        return total / (jnp.maximum(x.seq_count, 1.0) * x.norm_length)
    if mode == "seq-mean-token-mean":
        valid_bt = x.mask_bt > 0
        seq_sum_b = jnp.sum(jnp.where(valid_bt, loss_bt, 0.0), axis=1)
        seq_len_b = jnp.sum(valid_bt, axis=1).astype(jnp.float32)
        return jnp.sum(seq_sum_b / jnp.maximum(seq_len_b, 1.0)) / jnp.maximum(x.seq_count, 1.0)
    raise ValueError(f"unknown loss_agg_mode {mode!r}")


def token_fraction(flag_bt: Array, x: LossInputs) -> Array:
    """Additive share of the mini-batch's valid tokens where flag_bt holds."""
    return masked_count(flag_bt & (x.mask_bt > 0)) / jnp.maximum(x.token_count, 1.0)


def token_share(value_bt: Array, x: LossInputs) -> Array:
    """Additive share of the mini-batch token mean of value_bt."""
    return masked_sum(jax.lax.stop_gradient(value_bt), x.mask_bt) / jnp.maximum(x.token_count, 1.0)


def _drift_metrics(x: LossInputs, ratio_bt: Array) -> dict[str, Array]:
    dlogp_bt = log_ratio(x.logp_bt, x.old_logp_bt)
    k3_bt = 1.0 / ratio_bt + dlogp_bt - 1.0  # exp(old - logp) - (old - logp) - 1
    return {"actor/abs_dlogp": token_share(jnp.abs(dlogp_bt), x),
            "actor/k3_old": token_share(k3_bt, x)}


# ----------------------------------------------------------------------------- policy losses


def ppo_clip(x: LossInputs, algo: AlgoConfig) -> tuple[Array, dict[str, Array]]:
    """PPO clipped surrogate with clip-higher (eps_low != eps_high) and optional dual clip."""
    ratio_bt = jnp.exp(log_ratio(x.logp_bt, x.old_logp_bt))
    loss_bt, dual_bt = ppo_surrogate(ratio_bt, x.advantages_bt, algo)
    loss = aggregate(loss_bt, x, algo.loss_agg_mode)
    return loss, {**_ppo_metrics(x, ratio_bt, dual_bt, algo), "actor/pg_loss": loss}


def _ppo_metrics(x: LossInputs, ratio_bt: Array, dual_bt: Array, algo: AlgoConfig) -> dict:
    ratio_bt = jax.lax.stop_gradient(ratio_bt)
    adv_bt = x.advantages_bt
    return {
        "ppo/clipfrac_high": token_fraction((adv_bt > 0) & (ratio_bt > 1.0 + algo.eps_high), x),
        "ppo/clipfrac_low": token_fraction((adv_bt < 0) & (ratio_bt < 1.0 - algo.eps_low), x),
        "ppo/dual_clipfrac": token_fraction(dual_bt, x),
        **_drift_metrics(x, ratio_bt),
    }


def clip_cov(x: LossInputs, algo: AlgoConfig) -> tuple[Array, dict[str, Array]]:
    """PPO surrogate with the selected tokens' terms multiplied by 0 (kept in the counts)."""
    ratio_bt = jnp.exp(log_ratio(x.logp_bt, x.old_logp_bt))
    loss_bt, dual_bt = ppo_surrogate(ratio_bt, x.advantages_bt, algo)
    # where, not multiply: 0 * inf would be NaN, and where gives an exactly zero gradient.
    loss_bt = jnp.where(x.selected_bt, 0.0, loss_bt)
    loss = aggregate(loss_bt, x, algo.loss_agg_mode)
    metrics = _ppo_metrics(x, ratio_bt, dual_bt, algo)
    metrics["actor/pg_loss"] = loss
    metrics["clip_cov/clipped_frac"] = token_fraction(x.selected_bt, x)
    return loss, metrics


def kl_cov(x: LossInputs, algo: AlgoConfig) -> tuple[Array, dict[str, Array]]:
    """Unclipped -A ratio everywhere, plus coef |logp - old_logp| on the selected tokens."""
    dlogp_bt = log_ratio(x.logp_bt, x.old_logp_bt)
    ratio_bt = jnp.exp(dlogp_bt)
    abs_dlogp_bt = abs_with_zero_subgradient(dlogp_bt)
    penalty_bt = jnp.where(x.selected_bt, algo.kl_cov_coef * abs_dlogp_bt, 0.0)
    loss = aggregate(-x.advantages_bt * ratio_bt + penalty_bt, x, algo.loss_agg_mode)
    metrics = _drift_metrics(x, jax.lax.stop_gradient(ratio_bt))
    metrics.update({"actor/pg_loss": loss,
                    "kl_cov/penalized_frac": token_fraction(x.selected_bt, x),
                    "kl_cov/penalty": token_share(penalty_bt, x)})
    return loss, metrics


PolicyLossFn = Callable[[LossInputs, AlgoConfig], tuple[Array, dict[str, Array]]]
POLICY_LOSSES: dict[str, PolicyLossFn] = {"ppo_clip": ppo_clip, "clip_cov": clip_cov,
                                          "kl_cov": kl_cov}


# ----------------------------------------------------------------------------- regularisers


def reference_kl(logp_bt: Array, ref_logp_bt: Array, kind: str) -> Array:
    """Per-token KL(pi || pi_ref) estimate: k1, k2 (0.5 d^2), k3 (low variance) or abs."""
    delta_bt = logp_bt - ref_logp_bt
    if kind == "k1":
        return delta_bt
    if kind == "k2":
        return 0.5 * delta_bt**2
    if kind == "abs":
        return abs_with_zero_subgradient(delta_bt)
    if kind == "k3":
        back_bt = jnp.clip(-delta_bt, -MAX_LOG_RATIO, MAX_LOG_RATIO)  # log(pi_ref / pi)
        return jnp.clip(jnp.exp(back_bt) - back_bt - 1.0, -10.0, 10.0)
    raise ValueError(f"unknown ref_kl_type {kind!r}")


def total_loss(x: LossInputs, algo: AlgoConfig) -> tuple[Array, dict[str, Array]]:
    """Policy loss - entropy_coef * entropy + ref_kl_coef * KL(pi || pi_ref), one aggregation."""
    loss, metrics = POLICY_LOSSES[algo.policy_loss](x, algo)
    if algo.entropy_coef > 0:
        if x.entropy_bt is None:
            raise ValueError("entropy_coef > 0 needs LossInputs.entropy_bt")
        loss = loss - algo.entropy_coef * aggregate(x.entropy_bt, x, algo.loss_agg_mode)
    if algo.ref_kl_coef > 0 and x.ref_logp_bt is None:
        raise ValueError("ref_kl_coef > 0 needs LossInputs.ref_logp_bt")
    if x.ref_logp_bt is not None:
        kl_bt = reference_kl(x.logp_bt, x.ref_logp_bt, algo.ref_kl_type)
        metrics["actor/ref_kl"] = token_share(kl_bt, x)
        if algo.ref_kl_coef > 0:
            loss = loss + algo.ref_kl_coef * aggregate(kl_bt, x, algo.loss_agg_mode)
    metrics["actor/loss"] = loss
    return loss, metrics


# ----------------------------------------------------------------------------- global selection
# Selectors share one signature and run once per optimizer mini-batch on all of its tokens, with
# the current policy's log-probs (no gradient). Under jit with sharded inputs every mean, count
# and top-k below is mesh-wide.

Selector = Callable[[Array, Array, Array, Array, Array, AlgoConfig], tuple[Array, dict]]


def select_nothing(logp_bt, old_logp_bt, advantages_bt, mask_bt, key, algo):
    return jnp.zeros(mask_bt.shape, bool), {}


def clip_cov_candidates(logp_bt, old_logp_bt, advantages_bt, mask_bt, algo: AlgoConfig) -> Array:
    """Valid tokens with clip_cov_lb < cov < clip_cov_ub that PPO (or its dual clip) has not
    already clipped."""
    cov_bt = token_covariance(logp_bt, advantages_bt, mask_bt)
    ratio_bt = jnp.exp(log_ratio(logp_bt, old_logp_bt))
    in_band_bt = (cov_bt > algo.clip_cov_lb) & (cov_bt < algo.clip_cov_ub)
    _, dual_clipped_bt = ppo_surrogate(ratio_bt, advantages_bt, algo)
    clipped_bt = ppo_clip_active(ratio_bt, advantages_bt, algo) | dual_clipped_bt
    return (mask_bt > 0) & in_band_bt & ~clipped_bt


def select_clip_cov(logp_bt, old_logp_bt, advantages_bt, mask_bt, key, algo: AlgoConfig):
    """max(1, int(clip_cov_ratio N)) candidates drawn uniformly without replacement."""
    candidates_bt = clip_cov_candidates(logp_bt, old_logp_bt, advantages_bt, mask_bt, algo)
    k, k_max = fraction_count(algo.clip_cov_ratio, valid_token_count(mask_bt), mask_bt.size)
    # A uniform random k-subset is the k largest of iid uniform priorities; the priorities are
    # drawn for the whole [B, T] grid, so they do not depend on micro-batching or sharding.
    priority_bt = jax.random.uniform(key, mask_bt.shape, jnp.float32)
    selected_bt = largest_k_mask(priority_bt, candidates_bt, k, k_max)
    candidate_frac = masked_count(candidates_bt) / jnp.maximum(masked_count(mask_bt), 1.0)
    return selected_bt, {"clip_cov/candidate_frac": candidate_frac}


def select_kl_cov(logp_bt, old_logp_bt, advantages_bt, mask_bt, key, algo: AlgoConfig):
    """The max(1, int(kl_cov_ratio N)) valid tokens of largest covariance."""
    cov_bt = token_covariance(logp_bt, advantages_bt, mask_bt)
    k, k_max = fraction_count(algo.kl_cov_ratio, valid_token_count(mask_bt), mask_bt.size)
    return largest_k_mask(cov_bt, mask_bt > 0, k, k_max), {}


TOKEN_SELECTORS: dict[str, Selector] = {"ppo_clip": select_nothing, "clip_cov": select_clip_cov,
                                        "kl_cov": select_kl_cov}


def mini_batch_counts(mask_bt: Array, algo: AlgoConfig) -> dict[str, Array]:
    """The loss normalisers of a mini-batch: they depend on the mask only, not on the policy."""
    valid_bt = mask_bt > 0
    return {"token_count": masked_count(mask_bt),
            "seq_count": jnp.sum(jnp.any(valid_bt, axis=1)).astype(jnp.float32),
            "norm_length": jnp.float32(algo.loss_norm_length or mask_bt.shape[1])}


def selection_metrics(logp_bt: Array, advantages_bt: Array, mask_bt: Array, counts: dict,
                      entropy_bt: Optional[Array] = None,
                      learning_rate: Optional[Array | float] = None) -> dict[str, Array]:
    """Covariance, advantage and entropy statistics of the whole mini-batch (no gradient);
    `counts` is its `mini_batch_counts`."""
    logp_bt, entropy_bt = jax.lax.stop_gradient((logp_bt, entropy_bt))
    cov = covariance_metrics(token_covariance(logp_bt, advantages_bt, mask_bt), mask_bt)
    metrics = {**cov, "batch/valid_tokens": counts["token_count"],
               "batch/valid_seqs": counts["seq_count"],
               "adv/mean": masked_mean(advantages_bt, mask_bt),
               "adv/std": jnp.sqrt(masked_var(advantages_bt, mask_bt))}
    if entropy_bt is not None:
        metrics["actor/entropy"] = masked_mean(entropy_bt, mask_bt)
    if learning_rate is not None:
        metrics["cov/pred_dH"] = predicted_entropy_change(cov["cov/mean"], learning_rate)
    return metrics


def select_tokens(logp_bt: Array, old_logp_bt: Array, advantages_bt: Array, mask_bt: Array,
                  key: Array, algo: AlgoConfig, entropy_bt: Optional[Array] = None,
                  learning_rate: Optional[Array | float] = None) -> TokenSelection:
    """The once-per-mini-batch pass: token selection, normalisers and selection metrics.

    Give it the WHOLE mini-batch (all micro-batches, all devices) and the current parameters'
    log-probs; the micro-batch loss passes then reuse `selected_bt` and the counts.
    """
    old_logp_bt, advantages_bt, mask_bt = map(jnp.asarray, (old_logp_bt, advantages_bt, mask_bt))
    selector = TOKEN_SELECTORS[algo.policy_loss]
    selected_bt, metrics = selector(jax.lax.stop_gradient(logp_bt), old_logp_bt, advantages_bt,
                                    mask_bt, key, algo)
    counts = mini_batch_counts(mask_bt, algo)
    metrics.update(selection_metrics(logp_bt, advantages_bt, mask_bt, counts, entropy_bt,
                                     learning_rate))
    return TokenSelection(selected_bt=selected_bt, **counts, metrics=metrics)


def loss_inputs(logp_bt: Array, old_logp_bt: Array, advantages_bt: Array, mask_bt: Array,
                selection: TokenSelection, entropy_bt: Optional[Array] = None,
                ref_logp_bt: Optional[Array] = None) -> LossInputs:
    """LossInputs for (a micro-batch of) the mini-batch `selection` was computed on;
    `selection.selected_bt` must already be cut to the same rows."""
    return LossInputs(logp_bt=logp_bt, old_logp_bt=old_logp_bt, advantages_bt=advantages_bt,
                      mask_bt=mask_bt, selected_bt=selection.selected_bt,
                      token_count=selection.token_count, seq_count=selection.seq_count,
                      norm_length=selection.norm_length, entropy_bt=entropy_bt,
                      ref_logp_bt=ref_logp_bt)


def batch_loss(logp_bt: Array, old_logp_bt: Array, advantages_bt: Array, mask_bt: Array,
               key: Array, algo: AlgoConfig, entropy_bt: Optional[Array] = None,
               ref_logp_bt: Optional[Array] = None,
               learning_rate: Optional[Array | float] = None) -> tuple[Array, dict[str, Array]]:
    """Selection and loss on one batch that is the whole mini-batch (no accumulation).

    Differentiable in logp_bt: the selection sees it through stop_gradient only."""
    selection = select_tokens(logp_bt, old_logp_bt, advantages_bt, mask_bt, key, algo, entropy_bt,
                              learning_rate)
    x = loss_inputs(logp_bt, old_logp_bt, advantages_bt, mask_bt, selection, entropy_bt,
                    ref_logp_bt)
    loss, metrics = total_loss(x, algo)
    return loss, {**selection.metrics, **metrics}
