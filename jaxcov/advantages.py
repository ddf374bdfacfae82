"""Advantage estimators: one function per estimator, all with the same signature

    estimator(rewards_b, response_mask_bt, algo) -> advantages_bt

`rewards_b` is one outcome reward per sequence; `response_mask_bt` is 1 on the response tokens
that get a loss. The n samples of a prompt are contiguous rows: row i belongs to group i // n
(n = `algo.group_size`). Advantages are 0 on masked tokens. All of it is jittable; group
statistics are per group, whitening (REINFORCE++) is over every valid token of the batch.

| name                  | per-sequence score                       | token advantage            |
|-----------------------|------------------------------------------|----------------------------|
| grpo                  | (r - mean_g) / (std_g + 1e-6), std_g unbiased | score on every token  |
| drgrpo                | r - mean_g                               | score on every token       |
| rloo                  | r - mean of the other n-1 = n/(n-1) (r - mean_g) | score on every token |
| reinforce_pp          | r at the last response token, discounted returns (gamma) | whitened   |
| reinforce_pp_baseline | r - mean_g                               | whitened over valid tokens |

PRIME (implicit process rewards from an online-trained PRM) needs a second trained model and
is not implemented here.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxcov.config import AlgoConfig
from jaxcov.entropy import masked_whiten

Array = jax.Array
AdvantageFn = Callable[[Array, Array, AlgoConfig], Array]

# Keeps a group of identical rewards at advantage 0 instead of 0/0 (verl's epsilon).
GRPO_STD_EPS = 1e-6


def _grouped(rewards_b: Array, group_size: int) -> Array:
    """[B] -> [G, n]; B must be a whole number of groups."""
    batch = rewards_b.shape[0]
    if batch % group_size:
        raise ValueError(f"batch of {batch} rows is not a whole number of groups of {group_size}")
    return jnp.asarray(rewards_b, jnp.float32).reshape(batch // group_size, group_size)


def _on_tokens(score_b: Array, response_mask_bt: Array) -> Array:
    """A per-sequence score copied onto each of its valid tokens."""
    return jnp.where(response_mask_bt > 0, score_b.reshape(-1)[:, None], 0.0)


def _centered(rewards_b: Array, group_size: int) -> Array:
    """r - mean of its group, as [G, n]; exactly 0 for a group of equal rewards (the float mean
    of n equal values can be 1 ulp off, which GRPO's division would blow up to ~1e-2)."""
    rewards_gn = _grouped(rewards_b, group_size)
    all_equal_g1 = jnp.max(rewards_gn, 1, keepdims=True) == jnp.min(rewards_gn, 1, keepdims=True)
    return jnp.where(all_equal_g1, 0.0, rewards_gn - rewards_gn.mean(axis=1, keepdims=True))


def grpo(rewards_b: Array, response_mask_bt: Array, algo: AlgoConfig) -> Array:
    """GRPO: group-normalised reward, (r - mean) / (unbiased std + eps)."""
    rewards_gn = _grouped(rewards_b, algo.group_size)
    std_g1 = jnp.std(rewards_gn, axis=1, ddof=1, keepdims=True)
    score_gn = _centered(rewards_b, algo.group_size) / (std_g1 + GRPO_STD_EPS)
    return _on_tokens(score_gn, response_mask_bt)


def drgrpo(rewards_b: Array, response_mask_bt: Array, algo: AlgoConfig) -> Array:
    """Dr.GRPO: r - group mean; no std division (it biases towards easy/hard prompts)."""
    return _on_tokens(_centered(rewards_b, algo.group_size), response_mask_bt)


def rloo(rewards_b: Array, response_mask_bt: Array, algo: AlgoConfig) -> Array:
    """RLOO: r minus the mean of the other n-1 rewards of its group."""
    n = algo.group_size
    return _on_tokens(_centered(rewards_b, n) * (n / (n - 1)), response_mask_bt)


def outcome_token_rewards(rewards_b: Array, response_mask_bt: Array) -> Array:
    """The sequence reward placed on its last valid token (0 elsewhere and on empty rows)."""
    valid_bt = response_mask_bt > 0
    num_steps = valid_bt.shape[1]
    last_t_b = num_steps - 1 - jnp.argmax(valid_bt[:, ::-1], axis=1)
    is_last_bt = jnp.arange(num_steps)[None, :] == last_t_b[:, None]
    reward_b = jnp.where(jnp.any(valid_bt, axis=1), jnp.asarray(rewards_b, jnp.float32), 0.0)
    return jnp.where(is_last_bt, reward_b[:, None], 0.0)


def discounted_returns(token_rewards_bt: Array, response_mask_bt: Array, gamma: float) -> Array:
    """G_t = r_t + gamma * G_{t+1}, the running sum reset after masked positions (verl's loop)."""
    def step(running_b, xs):
        reward_b, valid_b = xs
        return_b = reward_b + gamma * running_b
        return jnp.where(valid_b, return_b, 0.0), return_b

    xs = (token_rewards_bt.T.astype(jnp.float32), response_mask_bt.T > 0)
    _, returns_tb = jax.lax.scan(step, jnp.zeros(token_rewards_bt.shape[0]), xs, reverse=True)
    return returns_tb.T


def reinforce_pp(rewards_b: Array, response_mask_bt: Array, algo: AlgoConfig) -> Array:
    """REINFORCE++: discounted token returns, whitened over all valid tokens of the batch."""
    token_rewards_bt = outcome_token_rewards(rewards_b, response_mask_bt)
    returns_bt = discounted_returns(token_rewards_bt, response_mask_bt, algo.gamma)
    return jnp.where(response_mask_bt > 0, masked_whiten(returns_bt, response_mask_bt), 0.0)


def reinforce_pp_baseline(rewards_b: Array, response_mask_bt: Array, algo: AlgoConfig) -> Array:
    """REINFORCE++-baseline: r - group mean on every token, then whitened over valid tokens."""
    score_bt = drgrpo(rewards_b, response_mask_bt, algo)
    return jnp.where(response_mask_bt > 0, masked_whiten(score_bt, response_mask_bt), 0.0)


ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {
    "grpo": grpo,
    "drgrpo": drgrpo,
    "rloo": rloo,
    "reinforce_pp": reinforce_pp,
    "reinforce_pp_baseline": reinforce_pp_baseline,
}


def compute_advantages(rewards_b: Array, response_mask_bt: Array, algo: AlgoConfig) -> Array:
    """Advantages [B, T] from the estimator named by `algo.advantage`."""
    return ADVANTAGE_ESTIMATORS[algo.advantage](rewards_b, response_mask_bt, algo)

