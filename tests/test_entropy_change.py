"""The exact entropy instrument (`logprobs.token_entropy_change`): values against a
whole-vocabulary reference, and the error orders of the lemma's first-order and midpoint
predictions after one optimizer step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcov.models import llama, logprobs
from jaxcov.models.presets import tiny_config


def _batch(cfg, rows=3, length=9, seed=1):
    tokens = jax.random.randint(jax.random.key(seed), (rows, length), 0, cfg.vocab_size)
    mask = jnp.ones((rows, length), jnp.int32).at[0, :3].set(0)  # a left-padded row
    return tokens, mask


def _reference(params_before, params_after, cfg, tokens, mask):
    """Measured dH and both predictions from whole-vocabulary logits."""
    def log_p(params):
        return jax.nn.log_softmax(llama.forward(params, cfg, tokens, mask)[:, :-1], axis=-1)

    def neg_cov(log_q, dz):
        q = jnp.exp(log_q)
        mean = lambda x: jnp.sum(q * x, -1, keepdims=True)  # noqa: E731
        return -jnp.sum(q * (log_q - mean(log_q)) * (dz - mean(dz)), -1)

    logits_b = llama.forward(params_before, cfg, tokens, mask)[:, :-1]
    logits_a = llama.forward(params_after, cfg, tokens, mask)[:, :-1]
    lp_b, lp_a = log_p(params_before), log_p(params_after)
    entropy = lambda lp: -jnp.sum(jnp.exp(lp) * lp, -1)  # noqa: E731
    dz = logits_a - logits_b
    middle = jax.nn.log_softmax(logits_b + dz / 2, axis=-1)
    pad = lambda x: jnp.pad(x, ((0, 0), (1, 0)))  # noqa: E731
    return (pad(entropy(lp_a) - entropy(lp_b)), pad(neg_cov(lp_b, dz)), pad(neg_cov(middle, dz)))


def _perturbed(params, scale, seed=7):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return tree.unflatten([x + scale * jax.random.normal(k, x.shape, x.dtype)
                           for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("vocab_chunk", [2048, 50])  # one chunk; chunks with padding ids
def test_matches_whole_vocabulary_reference(vocab_chunk, monkeypatch):
    monkeypatch.setattr(logprobs, "VOCAB_CHUNK", vocab_chunk)
    cfg = tiny_config("llama")
    before = llama.init_params(cfg, jax.random.key(0))
    after = _perturbed(before, 0.02)
    tokens, mask = _batch(cfg)
    ours = logprobs.token_entropy_change(before, after, cfg, tokens, mask, chunk=4)
    measured, first, midpoint = _reference(before, after, cfg, tokens, mask)
    np.testing.assert_allclose(ours.after - ours.before, measured, atol=2e-5)
    np.testing.assert_allclose(ours.first_order, first, atol=2e-5)
    np.testing.assert_allclose(ours.midpoint, midpoint, atol=2e-5)
    entropy = logprobs.token_logprobs(before, cfg, tokens, mask)[1]
    np.testing.assert_allclose(ours.before, entropy, atol=2e-5)
    assert np.all(ours.before[:, 0] == 0)  # index 0 has no prediction
    assert float(jnp.max(jnp.abs(first))) > 1e-3  # the update moved the entropy


def _errors_after_one_step(optimizer, lr):
    """Mean |measured - predicted| over positions, first order and midpoint, after one step
    of a policy-gradient loss with random advantages (float64 throughout)."""
    cfg = tiny_config("llama", compute_dtype="float64")
    params = llama.init_params(cfg, jax.random.key(0), dtype=jnp.float64)
    tokens, mask = _batch(cfg)
    advantages = jax.random.normal(jax.random.key(3), tokens.shape, jnp.float64)

    def loss(params):
        logp, _ = logprobs.token_logprobs(params, cfg, tokens, mask)
        return -jnp.mean(logp * advantages * mask)

    tx = optimizer(lr)
    updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params)
    change = logprobs.token_entropy_change(params, optax.apply_updates(params, updates), cfg,
                                           tokens, mask)
    measured = change.after - change.before
    valid = np.asarray(mask)[:, 1:] > 0
    error = lambda pred: float(np.mean(np.abs(np.asarray(measured - pred)[:, 1:][valid])))  # noqa
    return error(change.first_order), error(change.midpoint), float(np.mean(np.abs(measured)))


@pytest.mark.parametrize("optimizer, lr", [(optax.sgd, 2e-3), (optax.adam, 1e-4)])
def test_error_orders_first_order_two_midpoint_three(optimizer, lr):
    """Halving the step shrinks the first-order error ~4x and the midpoint error ~8x."""
    with jax.enable_x64(True):
        first, midpoint, size = _errors_after_one_step(optimizer, lr)
        first_half, midpoint_half, _ = _errors_after_one_step(optimizer, lr / 2)
    print(f"{optimizer.__name__}: |dH| {size:.2e}, first-order error {first:.2e} -> "
          f"{first_half:.2e}, midpoint {midpoint:.2e} -> {midpoint_half:.2e}")
    assert midpoint < 1e-2 * first and first < 0.6 * size  # the lemma holds at a small step
    assert 3.5 < first / first_half < 4.5  # O(lr^2)
    assert 7.0 < midpoint / midpoint_half < 9.0  # O(lr^3)
