"""Policy losses, global token selection and entropy/covariance statistics against NumPy
references written from the published semantics (DESIGN.md section 1, verl's clip_cov/kl_cov)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcov.config import AlgoConfig
from jaxcov.entropy import (covariance_metrics, fraction_count, largest_k_mask,
                            radix_select_mask, token_covariance, token_entropy)
from jaxcov.losses import (POLICY_LOSSES, batch_loss, clip_cov_candidates, loss_inputs,
                           reference_kl, select_tokens, total_loss)

AGG_MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]

# ----------------------------------------------------------------------------- NumPy references


def np_cov(logp, adv, mask):
    valid = mask > 0
    cov = (adv - adv[valid].mean()) * (logp - logp[valid].mean())
    return np.where(valid, cov, 0.0)


def np_ppo(logp, old, adv, algo):
    """Per-token PPO loss and where plain PPO clipped (pg_losses2 > pg_losses1)."""
    ratio = np.exp(logp - old)
    pg1 = -adv * ratio
    pg2 = -adv * np.clip(ratio, 1 - algo.eps_low, 1 + algo.eps_high)
    loss = np.maximum(pg1, pg2)
    if algo.dual_clip_c is not None:
        loss = np.where(adv < 0, np.minimum(loss, -adv * algo.dual_clip_c), loss)
    return loss, pg2 > pg1


def np_agg(loss, mask, mode, norm_length=None):
    norm_length = norm_length or mask.shape[1]
    seqs = np.sum(mask.sum(1) > 0)
    if mode == "token-mean":
        return (loss * mask).sum() / mask.sum()
    if mode == "seq-mean-token-sum":
        return (loss * mask).sum() / seqs
    if mode == "seq-mean-token-sum-norm":
        return (loss * mask).sum() / seqs / norm_length
    lengths = np.maximum(mask.sum(1), 1)
    return ((loss * mask).sum(1) / lengths).sum() / seqs


def np_dual_capped(logp, old, adv, algo):
    """Where the dual clip caps a negative-advantage token's loss at -A c."""
    if algo.dual_clip_c is None:
        return np.zeros(logp.shape, bool)
    ratio = np.exp(logp - old)
    loss = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - algo.eps_low, 1 + algo.eps_high))
    return (adv < 0) & (loss > -adv * algo.dual_clip_c)


def np_clip_cov_candidates(logp, old, adv, mask, algo):
    """Valid tokens with lb < cov < ub that neither PPO's clip nor the dual clip has clipped."""
    cov = np_cov(logp, adv, mask)
    _, clipped = np_ppo(logp, old, adv, algo)
    clipped |= np_dual_capped(logp, old, adv, algo)
    cov = np.where((mask == 0) | clipped, -np.inf, cov)
    return (cov < algo.clip_cov_ub) & (cov > algo.clip_cov_lb) & (mask > 0)


def np_clip_cov_loss(logp, old, adv, mask, picked, algo):
    loss, _ = np_ppo(logp, old, adv, algo)
    return np_agg(loss * (1 - picked), mask, algo.loss_agg_mode)


def np_kl_cov(logp, old, adv, mask, algo):
    """(loss, penalised mask): top max(1, int(ratio N)) valid tokens by cov get coef |dlogp|."""
    valid_idx = np.flatnonzero(mask.reshape(-1) > 0)
    a, lp = adv.reshape(-1)[valid_idx], logp.reshape(-1)[valid_idx]
    cov = (a - a.mean()) * (lp - lp.mean())
    k = max(1, int(len(cov) * algo.kl_cov_ratio))
    top = valid_idx[np.argsort(-cov, kind="stable")[:k]]
    penalised = np.zeros(mask.size, bool)
    penalised[top] = True
    penalised = penalised.reshape(mask.shape)
    loss = -adv * np.exp(logp - old) + penalised * algo.kl_cov_coef * np.abs(logp - old)
    return np_agg(loss, mask, algo.loss_agg_mode), penalised


def random_tokens(seed, rows=6, steps=50, spread=0.3):
    rng = np.random.default_rng(seed)
    logp = -np.abs(rng.normal(1.0, 1.5, (rows, steps)))
    old = logp + rng.normal(0.0, spread, (rows, steps))
    adv = rng.normal(0.0, 1.5, (rows, 1)) + rng.normal(0.0, 0.3, (rows, steps))
    lengths = rng.integers(steps // 3, steps + 1, rows)
    mask = (np.arange(steps)[None] < lengths[:, None]).astype(np.float64)
    f32 = lambda x: x.astype(np.float32)  # noqa: E731
    return f32(logp), f32(old), f32(adv), f32(mask)


# Most tests run eagerly: op-by-op kernels are cached across tests, while each jit of a new
# config would compile again. test_jitted_loss_and_every_metric_match_numpy checks the
# jitted path.


def selection_of(logp, old, adv, mask, algo, key=jax.random.key(0)):
    return select_tokens(logp, old, adv, mask, key, algo)


def loss_of(name, logp, old, adv, mask, algo, key=jax.random.key(0)):
    return batch_loss(logp, old, adv, mask, key, dataclasses.replace(algo, policy_loss=name))


CLIP_COV = AlgoConfig(policy_loss="clip_cov", clip_cov_ratio=0.05, clip_cov_lb=0.5,
                      clip_cov_ub=3.0, eps_high=0.28)
KL_COV = AlgoConfig(policy_loss="kl_cov", kl_cov_ratio=0.05, kl_cov_coef=0.7)


# ----------------------------------------------------------------------------- ppo_clip


def test_ppo_clip_hand_values():
    # ratio 1.5, A=+1 -> clipped to 1.2: -1.2; ratio 0.5, A=-1 -> clipped to 0.8: 0.8;
    # ratio 1, A=2 -> -2; ratio 5, A=-1 -> 5, capped by dual clip c=3 at 3.
    logp = np.log(np.array([[1.5, 0.5, 1.0, 5.0]], np.float32))
    adv = np.array([[1.0, -1.0, 2.0, -1.0]], np.float32)
    old, mask = np.zeros_like(logp), np.ones_like(logp)
    loss, metrics = loss_of("ppo_clip", logp, old, adv, mask, AlgoConfig())
    np.testing.assert_allclose(loss, (-1.2 + 0.8 - 2.0 + 5.0) / 4, rtol=1e-6)
    assert metrics["ppo/clipfrac_high"] == 0.25 and metrics["ppo/clipfrac_low"] == 0.25
    loss, metrics = loss_of("ppo_clip", logp, old, adv, mask, AlgoConfig(dual_clip_c=3.0))
    np.testing.assert_allclose(loss, (-1.2 + 0.8 - 2.0 + 3.0) / 4, rtol=1e-6)
    assert metrics["ppo/dual_clipfrac"] == 0.25


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("dual_clip_c", [None, 2.0])
def test_ppo_clip_matches_numpy(mode, dual_clip_c):
    logp, old, adv, mask = random_tokens(1)
    algo = AlgoConfig(eps_low=0.2, eps_high=0.28, dual_clip_c=dual_clip_c, loss_agg_mode=mode)
    loss, metrics = loss_of("ppo_clip", logp, old, adv, mask, algo)
    token_loss, _ = np_ppo(logp.astype(np.float64), old, adv, algo)
    np.testing.assert_allclose(loss, np_agg(token_loss, mask, mode), rtol=1e-5)
    ratio = np.exp(logp - old)
    high = ((adv > 0) & (ratio > 1.28) & (mask > 0)).sum() / mask.sum()
    np.testing.assert_allclose(metrics["ppo/clipfrac_high"], high, rtol=1e-6)
    np.testing.assert_allclose(metrics["actor/abs_dlogp"], np.abs(logp - old)[mask > 0].mean(),
                               rtol=1e-5)


def test_loss_norm_length_overrides_padded_length():
    logp, old, adv, mask = random_tokens(2)
    algo = AlgoConfig(loss_agg_mode="seq-mean-token-sum-norm", loss_norm_length=100)
    loss, _ = loss_of("ppo_clip", logp, old, adv, mask, algo)
    token_loss, _ = np_ppo(logp.astype(np.float64), old, adv, algo)
    np.testing.assert_allclose(loss, np_agg(token_loss, mask, algo.loss_agg_mode, 100), rtol=1e-5)


# ----------------------------------------------------------------------------- Clip-Cov


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clip_cov_selection_respects_candidates_and_count(seed):
    logp, old, adv, mask = random_tokens(seed)
    mask[1, :5] = 0.0  # a padded hole inside a row
    candidates = np_clip_cov_candidates(logp, old, adv, mask, CLIP_COV)
    np.testing.assert_array_equal(clip_cov_candidates(logp, old, adv, mask, CLIP_COV), candidates)
    _, clipped = np_ppo(logp, old, adv, CLIP_COV)
    assert candidates.sum() > 0 and (clipped & (mask > 0)).sum() > 0  # the case is exercised
    picked = np.asarray(selection_of(logp, old, adv, mask, CLIP_COV).selected_bt)
    assert not np.any(picked & ~candidates)  # strict band, valid, not PPO-clipped
    cov = np_cov(logp, adv, mask)
    assert np.all((cov[picked] > 0.5) & (cov[picked] < 3.0)) and np.all(mask[picked] > 0)
    expected_count = min(max(1, int(CLIP_COV.clip_cov_ratio * mask.sum())), candidates.sum())
    assert picked.sum() == expected_count


def test_clip_cov_picks_fewer_when_candidates_run_out_and_none_without_any():
    logp, old, adv, mask = random_tokens(3)
    algo = dataclasses.replace(CLIP_COV, clip_cov_ratio=0.9)
    candidates = np_clip_cov_candidates(logp, old, adv, mask, algo)
    picked = np.asarray(selection_of(logp, old, adv, mask, algo).selected_bt)
    np.testing.assert_array_equal(picked, candidates)
    algo = dataclasses.replace(CLIP_COV, clip_cov_lb=100.0, clip_cov_ub=200.0)
    assert not np.any(selection_of(logp, old, adv, mask, algo).selected_bt)


def test_clip_cov_pick_is_reproducible_from_the_key_and_uniform():
    logp, old, adv, mask = random_tokens(4)

    def pick(seed):
        key = jax.random.key(seed)
        return np.asarray(selection_of(logp, old, adv, mask, CLIP_COV, key).selected_bt)

    np.testing.assert_array_equal(pick(11), pick(11))
    picks = np.stack([pick(k) for k in range(40)])
    assert len({p.tobytes() for p in picks}) > 30
    candidates = np_clip_cov_candidates(logp, old, adv, mask, CLIP_COV)
    assert np.all(picks.any(axis=0)[candidates])  # every candidate gets picked sometimes


@pytest.mark.parametrize("mode", AGG_MODES)
def test_clip_cov_loss_matches_numpy_given_the_pick(mode):
    logp, old, adv, mask = random_tokens(5)
    algo = dataclasses.replace(CLIP_COV, loss_agg_mode=mode)
    loss, metrics = loss_of("clip_cov", logp, old, adv, mask, algo)
    picked = np.asarray(selection_of(logp, old, adv, mask, algo).selected_bt)
    expected = np_clip_cov_loss(logp.astype(np.float64), old, adv, mask, picked, algo)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["clip_cov/clipped_frac"], picked.sum() / mask.sum())


def test_clip_cov_zeroes_exactly_the_selected_gradients():
    logp, old, adv, mask = random_tokens(6)
    selection = selection_of(logp, old, adv, mask, CLIP_COV)
    picked = np.asarray(selection.selected_bt)

    def grad_of(name):
        def loss(lp):
            x = loss_inputs(lp, old, adv, mask, selection)
            return total_loss(x, dataclasses.replace(CLIP_COV, policy_loss=name))[0]
        return np.asarray(jax.grad(loss)(jnp.asarray(logp)))

    clip_grad, ppo_grad = grad_of("clip_cov"), grad_of("ppo_clip")
    assert np.all(clip_grad[picked] == 0.0) and np.all(ppo_grad[picked] != 0.0)
    np.testing.assert_array_equal(clip_grad[~picked], ppo_grad[~picked])


# ----------------------------------------------------------------------------- KL-Cov


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("seed", [0, 7])
def test_kl_cov_matches_numpy(mode, seed):
    logp, old, adv, mask = random_tokens(seed)
    algo = dataclasses.replace(KL_COV, loss_agg_mode=mode)
    loss, metrics = loss_of("kl_cov", logp, old, adv, mask, algo)
    expected, penalised = np_kl_cov(logp.astype(np.float64), old, adv, mask, algo)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    selected = np.asarray(selection_of(logp, old, adv, mask, algo).selected_bt)
    np.testing.assert_array_equal(selected, penalised)  # exactly the top-k
    np.testing.assert_allclose(metrics["kl_cov/penalized_frac"], penalised.sum() / mask.sum())


def test_kl_cov_penalty_vanishes_on_policy_and_has_the_right_gradient():
    logp, old, adv, mask = random_tokens(8)
    selection = selection_of(logp, old, adv, mask, KL_COV)
    picked = np.asarray(selection.selected_bt)

    def loss(lp, reference):
        return total_loss(loss_inputs(lp, reference, adv, mask, selection), KL_COV)[0]

    # On policy (logp == old): the value and the gradient are those of -A * ratio.
    grad = np.asarray(jax.grad(loss)(jnp.asarray(logp), logp))
    np.testing.assert_allclose(grad, -adv * mask / mask.sum(), rtol=1e-6)
    np.testing.assert_allclose(loss(logp, logp), -(adv * mask).sum() / mask.sum(), rtol=1e-6)
    # Off policy: d/dlogp = (-A ratio + coef sign(logp - old) on the top-k) / N.
    grad = np.asarray(jax.grad(loss)(jnp.asarray(logp), old))
    expected = (-adv * np.exp(logp - old) + picked * 0.7 * np.sign(logp - old)) * mask / mask.sum()
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------- shared pieces


@pytest.mark.parametrize("ratio", [0.7, 0.3, 0.1, 2e-3, 2e-4, 1.0])
def test_fraction_count_matches_float64_python(ratio):
    capacity = 25000
    counts = np.arange(0, capacity + 1, 7)
    k = jax.vmap(lambda n: fraction_count(ratio, n, capacity)[0])(counts)
    np.testing.assert_array_equal(k, [max(1, int(ratio * n)) for n in counts])
    assert fraction_count(ratio, jnp.int32(3), capacity)[1] == max(1, int(ratio * capacity))


def test_largest_k_mask_keeps_k_eligible_and_breaks_ties_by_index():
    scores = jnp.array([[3.0, 1.0, 3.0, 7.0], [9.0, 3.0, 0.0, 2.0]])
    eligible = jnp.array([[1, 1, 1, 1], [0, 1, 1, 1]], bool)
    mask = largest_k_mask(scores, eligible, jnp.int32(3), 4)
    np.testing.assert_array_equal(mask, [[1, 0, 1, 1], [0, 0, 0, 0]])
    assert largest_k_mask(scores, eligible & False, jnp.int32(1), 4).sum() == 0


def test_reference_kl_estimators():
    logp, ref = np.log([0.2, 0.5, 0.9]), np.log([0.4, 0.5, 0.3])
    d = logp - ref
    expected = {"k1": d, "k2": 0.5 * d**2, "abs": np.abs(d), "k3": np.exp(-d) + d - 1}
    for kind, value in expected.items():
        np.testing.assert_allclose(reference_kl(logp, ref, kind), value, rtol=1e-6)


def test_entropy_bonus_and_reference_kl_enter_the_total_loss():
    logp, old, adv, mask = random_tokens(9)
    entropy = np.random.default_rng(0).uniform(0, 3, logp.shape).astype(np.float32)
    ref = old + 0.1
    base, _ = loss_of("ppo_clip", logp, old, adv, mask, AlgoConfig())
    algo = AlgoConfig(entropy_coef=0.01, ref_kl_coef=0.5, ref_kl_type="k3")
    loss, metrics = batch_loss(logp, old, adv, mask, jax.random.key(0), algo, entropy, ref)
    kl = np.exp(ref - logp) - (ref - logp) - 1
    expected = (base - 0.01 * np_agg(entropy, mask, "token-mean")
                + 0.5 * np_agg(kl, mask, "token-mean"))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["actor/ref_kl"], kl[mask > 0].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["actor/entropy"], entropy[mask > 0].mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="entropy_bt"):
        batch_loss(logp, old, adv, mask, jax.random.key(0), algo)


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_micro_batch_shares_sum_to_the_mini_batch_loss(name):
    """Loss and metrics of row halves, with the mini-batch selection and counts, add up."""
    logp, old, adv, mask = random_tokens(10)
    algo = dataclasses.replace(CLIP_COV if name == "clip_cov" else KL_COV, policy_loss=name,
                               loss_agg_mode="seq-mean-token-mean")
    selection = selection_of(logp, old, adv, mask, algo)
    full, full_metrics = total_loss(loss_inputs(logp, old, adv, mask, selection), algo)
    parts = []
    for rows in (slice(0, 3), slice(3, 6)):
        part_selection = selection.replace(selected_bt=selection.selected_bt[rows])
        x = loss_inputs(logp[rows], old[rows], adv[rows], mask[rows], part_selection)
        parts.append(total_loss(x, algo))
    np.testing.assert_allclose(parts[0][0] + parts[1][0], full, rtol=1e-5)
    for metric, value in full_metrics.items():
        np.testing.assert_allclose(parts[0][1][metric] + parts[1][1][metric], value, rtol=1e-5,
                                   atol=1e-7, err_msg=metric)


def np_metrics(name, logp, old, adv, mask, picked, algo):
    """(loss, every metric of `batch_loss`) from NumPy, given Clip-Cov's random pick."""
    valid = mask > 0
    n_tokens = mask.sum()
    token_mean = lambda x: (x * mask).sum() / n_tokens  # noqa: E731
    cov = np_cov(logp, adv, mask)
    ratio, dlogp = np.exp(logp - old), logp - old
    metrics = {
        "actor/abs_dlogp": token_mean(np.abs(dlogp)),
        "actor/k3_old": token_mean(np.exp(-dlogp) + dlogp - 1),
        "adv/mean": adv[valid].mean(), "adv/std": adv[valid].std(),
        "cov/mean": cov[valid].mean(), "cov/std": cov[valid].std(), "cov/max": cov[valid].max(),
        "cov/min": cov[valid].min(), "cov/top0.02pct_mean": cov[valid].max(),  # N < 5000: k = 1
        "batch/valid_tokens": n_tokens, "batch/valid_seqs": np.sum(valid.any(axis=1)),
    }
    if name == "kl_cov":
        loss, penalised = np_kl_cov(logp, old, adv, mask, algo)
        metrics.update({"kl_cov/penalized_frac": (penalised & valid).sum() / n_tokens,
                        "kl_cov/penalty": token_mean(penalised * algo.kl_cov_coef
                                                     * np.abs(dlogp))})
    else:
        token_loss, _ = np_ppo(logp, old, adv, algo)
        capped = np_dual_capped(logp, old, adv, algo)
        metrics.update({"ppo/clipfrac_high": token_mean((adv > 0) & (ratio > 1 + algo.eps_high)),
                        "ppo/clipfrac_low": token_mean((adv < 0) & (ratio < 1 - algo.eps_low)),
                        "ppo/dual_clipfrac": token_mean(capped)})
        loss = np_agg(token_loss * (1 - picked), mask, algo.loss_agg_mode)
        if name == "clip_cov":
            candidates = np_clip_cov_candidates(logp, old, adv, mask, algo)
            metrics.update({"clip_cov/clipped_frac": (picked & valid).sum() / n_tokens,
                            "clip_cov/candidate_frac": candidates.sum() / n_tokens})
    return loss, {**metrics, "actor/loss": loss, "actor/pg_loss": loss}


JIT_ALGOS = {  # one aggregation each, the dual clip on where the loss has one
    "ppo_clip": dataclasses.replace(CLIP_COV, policy_loss="ppo_clip", dual_clip_c=2.0,
                                    loss_agg_mode="seq-mean-token-sum"),
    "clip_cov": dataclasses.replace(CLIP_COV, dual_clip_c=2.0),
    "kl_cov": dataclasses.replace(KL_COV, loss_agg_mode="seq-mean-token-mean"),
}


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_jitted_loss_and_every_metric_match_numpy(name):
    """Under jit (as the update runs it): the loss and each metric, no more and no fewer, equal
    their NumPy values; a row without tokens counts in no normaliser."""
    logp, old, adv, mask = random_tokens(14)
    mask[4] = 0.0
    algo, key = JIT_ALGOS[name], jax.random.key(3)
    loss, metrics = jax.jit(batch_loss, static_argnums=5)(logp, old, adv, mask, key, algo)
    picked = np.asarray(selection_of(logp, old, adv, mask, algo, key).selected_bt)
    expected_loss, expected = np_metrics(name, logp, old, adv, mask, picked, algo)
    assert set(metrics) == set(expected)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    for metric, value in expected.items():
        np.testing.assert_allclose(metrics[metric], value, rtol=1e-5, atol=1e-7, err_msg=metric)
    assert expected["batch/valid_seqs"] == 5
    for metric in ("ppo/clipfrac_high", "ppo/clipfrac_low", "ppo/dual_clipfrac",
                   "clip_cov/clipped_frac", "kl_cov/penalized_frac"):
        assert expected.get(metric, 1) > 0, metric  # every counted case occurs


def test_no_valid_tokens_gives_finite_zero_loss():
    logp, old, adv, mask = random_tokens(12)
    for name in POLICY_LOSSES:
        loss, metrics = loss_of(name, logp, old, adv, np.zeros_like(mask), CLIP_COV)
        assert loss == 0.0 and all(np.isfinite(v) for v in metrics.values())


# ----------------------------------------------------------------------------- statistics


def test_token_entropy_matches_numpy():
    logits = np.random.default_rng(0).normal(0, 3, (2, 3, 11))
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(token_entropy(logits), -(p * np.log(p)).sum(-1), rtol=1e-5)


def test_covariance_metrics_match_numpy():
    rng = np.random.default_rng(1)
    logp, adv = -rng.exponential(1.0, (40, 300)), rng.normal(0, 1, (40, 300))
    mask = (rng.uniform(size=(40, 300)) < 0.8).astype(np.float32)
    cov = np_cov(logp, adv, mask)
    np.testing.assert_allclose(token_covariance(logp, adv, mask), cov, rtol=1e-4, atol=1e-6)
    metrics = covariance_metrics(jnp.asarray(cov, jnp.float32), mask)
    valid = cov[mask > 0]
    top = np.sort(valid)[::-1][:max(1, int(2e-4 * valid.size))]
    np.testing.assert_allclose(metrics["cov/mean"], valid.mean(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(metrics["cov/std"], valid.std(), rtol=1e-4)
    np.testing.assert_allclose(metrics["cov/max"], valid.max(), rtol=1e-5)
    np.testing.assert_allclose(metrics["cov/top0.02pct_mean"], top.mean(), rtol=1e-5)
    assert len(top) == 1 + (valid.size >= 10000)


def test_predicted_entropy_change_is_that_of_a_natural_gradient_step():
    """cov/pred_dH is the paper's first-order entropy change of a softmax policy under natural
    PG, dz = lr A. Eight tokens drawn in exact proportion to pi = (1/2, 1/4, 1/8, 1/8) make the
    token covariance the exact Cov_{a~pi}(log pi(a), A(a)), so the prediction must match the
    entropy change of softmax(z + lr A) up to O(lr^2) (here Cov = 0.2274, dH = -2.27e-4)."""
    pi, adv_a, lr = np.array([0.5, 0.25, 0.125, 0.125]), np.array([1.0, -0.5, 2.0, -1.5]), 1e-3
    actions = np.array([0, 0, 0, 0, 1, 1, 2, 3])
    logp = np.log(pi)[actions][None].astype(np.float32)
    adv = adv_a[actions][None].astype(np.float32)
    selection = select_tokens(logp, logp, adv, np.ones_like(logp), jax.random.key(0),
                              AlgoConfig(), None, lr)

    def entropy(z):
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        return -(p * np.log(p)).sum()

    measured = entropy(np.log(pi) + lr * adv_a) - entropy(np.log(pi))
    np.testing.assert_allclose(selection.metrics["cov/pred_dH"], measured, rtol=1e-2)
    assert measured == pytest.approx(-2.274e-4, rel=1e-2)


def np_largest_k(scores, eligible, k):
    """The k largest eligible scores, equal values (-0.0 == 0.0) taken in flat-index order."""
    flat, index = scores.reshape(-1), np.flatnonzero(eligible.reshape(-1))
    order = index[np.lexsort((index, -flat[index]))]
    mask = np.zeros(flat.size, bool)
    mask[order[:k]] = True
    return mask.reshape(scores.shape)


def test_top_k_selection_matches_numpy_on_ties():
    """`largest_k_mask`, which picks the Clip-Cov / KL-Cov tokens and the top-cov metric, against
    a stable NumPy sort on scores full of ties, -0.0 among them, with k beyond the eligible
    count too; `radix_select_mask` (the gather-free peer bench/bench_losses.py times) as well."""
    rng = np.random.default_rng(15)
    radix = jax.jit(radix_select_mask)
    top_k = jax.jit(largest_k_mask, static_argnums=3)
    for trial in range(12):
        scores = np.round(rng.normal(size=(3, 17)), trial % 3).astype(np.float32)
        scores[0, trial % 17] = -0.0
        eligible = rng.uniform(size=scores.shape) < 0.8
        k = int(rng.integers(1, 60))
        expected = np_largest_k(scores, eligible, k)
        assert expected.sum() == min(k, eligible.sum())
        np.testing.assert_array_equal(top_k(scores, eligible, jnp.int32(k), 51), expected)
        np.testing.assert_array_equal(radix(scores, eligible, jnp.int32(k)), expected)
        k_max = 20  # the static bound of the top-k buffers, below the eligible count
        np.testing.assert_array_equal(
            top_k(scores, eligible, jnp.int32(min(k, k_max)), k_max),
            np_largest_k(scores, eligible, min(k, k_max)))
