"""Advantage estimators: hand-computed values, NumPy references, degenerate groups, config."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxcov.advantages import (ADVANTAGE_ESTIMATORS, GRPO_STD_EPS, compute_advantages,
                               discounted_returns, outcome_token_rewards)
from jaxcov.config import AlgoConfig, ConfigError, load_config

# ----------------------------------------------------------------------------- NumPy references


def np_whiten(x_bt, mask_bt):
    valid = mask_bt > 0
    mean = x_bt[valid].mean()
    var = x_bt[valid].var(ddof=1)
    return (x_bt - mean) / np.sqrt(var + 1e-8)


def np_advantages(name, rewards_b, mask_bt, n, gamma):
    """Straight from the published definitions, one loop per group / per token."""
    rewards_b = np.asarray(rewards_b, np.float64)
    batch, steps = mask_bt.shape
    score_b = np.zeros(batch)
    for g in range(batch // n):
        r = rewards_b[g * n:(g + 1) * n]
        if name == "grpo":
            score_b[g * n:(g + 1) * n] = (r - r.mean()) / (r.std(ddof=1) + GRPO_STD_EPS)
        elif name in ("drgrpo", "reinforce_pp_baseline"):
            score_b[g * n:(g + 1) * n] = r - r.mean()
        elif name == "rloo":
            score_b[g * n:(g + 1) * n] = [r[i] - np.delete(r, i).mean() for i in range(n)]
    if name == "reinforce_pp":
        returns_bt = np.zeros((batch, steps))
        for b in range(batch):
            valid_t = np.flatnonzero(mask_bt[b])
            running = 0.0
            for t in reversed(range(steps)):
                reward = rewards_b[b] if len(valid_t) and t == valid_t[-1] else 0.0
                running = reward + gamma * running
                returns_bt[b, t] = running
                running *= mask_bt[b, t]
        return np_whiten(returns_bt, mask_bt) * mask_bt
    token_bt = score_b[:, None] * mask_bt
    if name == "reinforce_pp_baseline":
        return np_whiten(token_bt, mask_bt) * mask_bt
    return token_bt


def random_batch(seed, groups=3, n=4, steps=7):
    rng = np.random.default_rng(seed)
    rewards_b = rng.normal(size=groups * n).astype(np.float32)
    lengths_b = rng.integers(1, steps + 1, size=groups * n)
    starts_b = rng.integers(0, 2, size=groups * n)
    t = np.arange(steps)[None]
    mask_bt = ((t >= starts_b[:, None]) & (t < starts_b[:, None] + lengths_b[:, None]))
    return rewards_b, mask_bt.astype(np.float32)


# ----------------------------------------------------------------------------- tests

HAND_REWARDS = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0], np.float32)
HAND_MASK = np.ones((8, 2), np.float32)


@pytest.mark.parametrize("name, first_group, second_group", [
    # group 1: mean 0.5, unbiased std sqrt(1/3); group 2: mean 0.75, unbiased std 0.5
    ("grpo", [0.5 / (np.sqrt(1 / 3) + 1e-6), -0.5 / (np.sqrt(1 / 3) + 1e-6)],
     [0.25 / (0.5 + 1e-6), -0.75 / (0.5 + 1e-6)]),
    ("drgrpo", [0.5, -0.5], [0.25, -0.75]),
    ("rloo", [1 - 1 / 3, 0 - 2 / 3], [1 - 2 / 3, 0 - 1.0]),  # r minus mean of the other three
])
def test_group_estimators_match_hand_values(name, first_group, second_group):
    algo = AlgoConfig(advantage=name, group_size=4)
    adv_bt = np.asarray(compute_advantages(HAND_REWARDS, HAND_MASK, algo))
    np.testing.assert_allclose(adv_bt[[0, 1], 0], first_group, rtol=1e-5)
    np.testing.assert_allclose(adv_bt[[4, 7], 1], second_group, rtol=1e-5)


def test_reinforce_pp_hand_values():
    """Two rows, reward on the last valid token, gamma 0.5, then whitening."""
    mask_bt = np.array([[1, 1, 1, 0], [0, 1, 1, 1]], np.float32)
    token_rewards_bt = outcome_token_rewards(np.array([4.0, 2.0]), mask_bt)
    returns_bt = discounted_returns(token_rewards_bt, mask_bt, 0.5)
    np.testing.assert_allclose(np.asarray(returns_bt) * mask_bt,
                               [[1.0, 2.0, 4.0, 0.0], [0.0, 0.5, 1.0, 2.0]])
    algo = AlgoConfig(advantage="reinforce_pp", group_size=1, filter_groups=False, gamma=0.5)
    adv_bt = np.asarray(compute_advantages(np.array([4.0, 2.0]), mask_bt, algo))
    values = np.array([1.0, 2.0, 4.0, 0.5, 1.0, 2.0])
    expected = (values - values.mean()) / np.sqrt(values.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(adv_bt[mask_bt > 0], expected, rtol=1e-5)
    assert np.all(adv_bt[mask_bt == 0] == 0)


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
@pytest.mark.parametrize("seed", [0, 1])
def test_estimators_match_numpy_reference(name, seed):
    rewards_b, mask_bt = random_batch(seed)
    algo = AlgoConfig(advantage=name, group_size=4, gamma=0.9)
    expected = np_advantages(name, rewards_b, mask_bt, 4, 0.9)
    actual = jax.jit(compute_advantages, static_argnums=2)(rewards_b, mask_bt, algo)
    np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=2e-6)
    assert np.all(np.asarray(actual)[mask_bt == 0] == 0)


@pytest.mark.parametrize("name", sorted(set(ADVANTAGE_ESTIMATORS) - {"reinforce_pp"}))
@pytest.mark.parametrize("group_size", [3, 4])
def test_equal_rewards_give_zero_advantages_and_no_nan(name, group_size):
    # 0.1 * 3 / 3 != 0.1 in float32: the mean of equal rewards must not leak a tiny advantage.
    rewards_b = np.repeat(np.array([1.0, 0.0, 0.1, 0.7], np.float32), group_size)
    mask_bt = np.ones((len(rewards_b), 5), np.float32)
    algo = AlgoConfig(advantage=name, group_size=group_size)
    adv_bt = np.asarray(compute_advantages(rewards_b, mask_bt, algo))
    assert np.all(adv_bt == 0.0)


def test_reinforce_pp_with_one_reward_everywhere_is_zero():
    mask_bt = random_batch(3)[1]
    algo = AlgoConfig(advantage="reinforce_pp", group_size=4)
    adv_bt = np.asarray(compute_advantages(np.ones(12, np.float32), mask_bt, algo))
    assert np.all(np.isfinite(adv_bt))
    np.testing.assert_allclose(adv_bt, 0.0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_empty_response_rows_and_empty_batch(name):
    """A row without response tokens gets 0 and leaves the others as the NumPy reference has
    them (its reward still counts in its group's baseline; REINFORCE++ whitens over the valid
    tokens only); a batch without any valid token is all 0, not NaN."""
    rewards_b, mask_bt = random_batch(4)
    mask_bt[2] = mask_bt[5] = 0.0
    algo = AlgoConfig(advantage=name, group_size=4, gamma=0.9)
    adv_bt = np.asarray(compute_advantages(rewards_b, mask_bt, algo))
    np.testing.assert_allclose(adv_bt, np_advantages(name, rewards_b, mask_bt, 4, 0.9),
                               rtol=2e-5, atol=2e-6)
    assert np.all(adv_bt[[2, 5]] == 0)
    adv_bt = np.asarray(compute_advantages(rewards_b, np.zeros_like(mask_bt), algo))
    assert np.all(adv_bt == 0)


def test_batch_must_be_whole_groups():
    with pytest.raises(ValueError, match="whole number of groups"):
        compute_advantages(np.zeros(6), np.ones((6, 2)), AlgoConfig(group_size=4))


@pytest.mark.parametrize("name", ["grpo", "rloo", "drgrpo", "reinforce_pp_baseline"])
def test_group_size_one_is_a_config_error(name):
    with pytest.raises(ConfigError, match=f"group_size: {name} needs group_size >= 2"):
        AlgoConfig(advantage=name, group_size=1, filter_groups=False)
    with pytest.raises(ConfigError, match="algo.group_size"):
        load_config(None, [f"algo.advantage={name}", "algo.group_size=1"])


@pytest.mark.parametrize("change, key", [
    ({"filter_groups": True, "advantage": "reinforce_pp", "group_size": 1}, "filter_groups"),
    ({"eps_low": 1.0}, "eps_low"), ({"dual_clip_c": 1.0}, "dual_clip_c"),
    ({"clip_cov_ratio": 0.0}, "clip_cov_ratio"), ({"kl_cov_ratio": 1.5}, "kl_cov_ratio"),
    ({"clip_cov_lb": 5.0}, "clip_cov_lb"), ({"gamma": 1.5}, "gamma"),
    ({"ref_kl_coef": -1.0}, "ref_kl_coef"),
])
def test_algo_config_validation_names_the_key(change, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        dataclasses.replace(AlgoConfig(), **change)


def test_algo_config_loads_from_overrides():
    config = load_config(None, ["algo.policy_loss=kl_cov", "algo.eps_high=0.28",
                                "algo.dual_clip_c=3", "algo.loss_agg_mode=seq-mean-token-sum"])
    assert config.algo.policy_loss == "kl_cov" and config.algo.dual_clip_c == 3.0
    with pytest.raises(ConfigError, match="algo.policy_loss: must be one of"):
        load_config(None, ["algo.policy_loss=clip"])
