"""The mini-batch policy update: same parameters for any micro-batch size and mesh shape."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxcov.advantages import grpo
from jaxcov.config import AlgoConfig, MeshConfig
from jaxcov.entropy import token_entropy
from jaxcov.losses import batch_loss
from jaxcov.sharding import make_mesh
from jaxcov.update import MiniBatch, make_update_fn, merge_micro_batches, split_micro_batches

VOCAB, WIDTH, STEPS = 32, 16, 12
LEARNING_RATE = 0.1


# ----------------------------------------------------------------------------- tiny policies
# A model enters the update only through logprob_fn(params, tokens_bt, attention_mask_bt).
# Test data comes from NumPy: every jax.random call site would be one more (slow) CPU compile.


def normal(rng, shape, std):
    return jnp.asarray(std * rng.standard_normal(shape), jnp.float32)


def bigram_init(seed):
    rng = np.random.default_rng(seed)
    return {"embed_vd": normal(rng, (VOCAB, WIDTH), 0.8),
            "dense_dd": normal(rng, (WIDTH, WIDTH), 0.5)}


def bigram_logprobs(params, tokens_bt, attention_mask_bt):
    """Embedding, one dense layer, tied softmax: p(token t | token t-1)."""
    del attention_mask_bt
    h_btd = jnp.tanh(params["embed_vd"][tokens_bt] @ params["dense_dd"])
    logits_btv = (h_btd @ params["embed_vd"].T)[:, :-1]
    logp_btv = jax.nn.log_softmax(logits_btv, axis=-1)
    logp_bt = jnp.take_along_axis(logp_btv, tokens_bt[:, 1:, None], axis=-1)[..., 0]
    pad = lambda x: jnp.pad(x, ((0, 0), (1, 0)))  # noqa: E731
    return pad(logp_bt), pad(token_entropy(logits_btv))


def llama_policy():
    """(init, logprob_fn) of the tiny Llama, or None while the model core is not there."""
    try:
        from jaxcov.models import llama
        from jaxcov.models.logprobs import token_logprobs
        from jaxcov.models.presets import tiny_config
    except ImportError:
        return None
    cfg = tiny_config("llama", vocab_size=VOCAB)

    def init(seed):  # llama.init_params's layout, with NumPy randomness and std 0.3
        rng = np.random.default_rng(seed)
        fill = {"ones": jnp.ones, "zeros": jnp.zeros, "normal": lambda s: normal(rng, s, 0.3)}
        return jax.tree.map(lambda spec: fill[spec.init](spec.shape), llama.param_specs(cfg),
                            is_leaf=llama.is_spec)

    return init, lambda p, t, m: token_logprobs(p, cfg, t, m, chunk=8)


# name -> (init, logprob_fn, gradient tolerance). The tiny Llama's float32 gradients are only
# ~5e-5 from float64 ones, so its micro-batch splits are compared at that noise floor.
POLICIES = {"bigram": (bigram_init, bigram_logprobs, 1e-5)}
LLAMA = llama_policy()
if LLAMA is not None:
    POLICIES["llama"] = (*LLAMA, 1e-4)


# ----------------------------------------------------------------------------- data


def make_batch(logprob_fn, params, rows, algo, seed=0):
    """A mini-batch whose old log-probs come from perturbed params, so ratios differ from 1."""
    rng = np.random.default_rng(seed)
    tokens_bt = jnp.asarray(rng.integers(0, VOCAB, (rows, STEPS)), jnp.int32)
    prompt_len, lengths_b = 3, rng.integers(2, STEPS - 3 + 1, rows)
    t = np.arange(STEPS)[None, :]
    ends_b1 = prompt_len + lengths_b[:, None]
    response_mask_bt = jnp.asarray((t >= prompt_len) & (t < ends_b1), jnp.float32)
    attention_mask_bt = jnp.asarray(t < ends_b1, jnp.int32)
    rewards_b = rng.integers(0, 2, rows).astype(np.float32)
    rewards_b[::algo.group_size], rewards_b[1::algo.group_size] = 1.0, 0.0
    old_params = jax.tree.map(lambda p: p + normal(rng, p.shape, 0.05), params)
    old_logp_bt, _ = jax.jit(logprob_fn)(old_params, tokens_bt, attention_mask_bt)
    advantages_bt = grpo(rewards_b, response_mask_bt, algo)
    return MiniBatch(tokens_bt=tokens_bt, attention_mask_bt=attention_mask_bt,
                     response_mask_bt=response_mask_bt, old_logp_bt=old_logp_bt,
                     advantages_bt=advantages_bt)


def direct_update(logprob_fn, params, batch, key, algo, optimizer):
    """Reference: gradient of the whole mini-batch loss at once, no accumulation."""
    def loss_fn(p):
        logp_bt, entropy_bt = logprob_fn(p, batch.tokens_bt, batch.attention_mask_bt)
        return batch_loss(logp_bt, batch.old_logp_bt, batch.advantages_bt, batch.response_mask_bt,
                          key, algo, entropy_bt=entropy_bt)
    grads, metrics = jax.jit(jax.grad(loss_fn, has_aux=True))(params)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    return optax.apply_updates(params, updates), metrics


def optimizer():
    # SGD, so that equal parameter changes mean equal gradients (Adam's first step is ~sign(g)).
    return optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(LEARNING_RATE))


ALGOS = {
    "ppo_clip": AlgoConfig(group_size=4, policy_loss="ppo_clip", eps_high=0.28, dual_clip_c=3.0),
    "clip_cov": AlgoConfig(group_size=4, policy_loss="clip_cov", clip_cov_ratio=0.1,
                           clip_cov_lb=0.0, eps_high=0.28),
    "kl_cov": AlgoConfig(group_size=4, policy_loss="kl_cov", kl_cov_ratio=0.1,
                         loss_agg_mode="seq-mean-token-mean", entropy_coef=0.01),
}


def selected_fraction(metrics):
    """Share of tokens the Clip-Cov / KL-Cov selection touched."""
    return metrics.get("clip_cov/clipped_frac", metrics.get("kl_cov/penalized_frac"))


def relative_error(actual, expected):
    return np.linalg.norm(np.asarray(actual) - expected) / np.linalg.norm(expected)


def assert_same_update(actual, expected, start, change_rtol=1e-5):
    """Every parameter array agrees to 1e-5 relative (in norm), and so does its change in the
    step (to change_rtol): with SGD that is the gradient itself."""
    for a, e, s in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), jax.tree.leaves(start)):
        assert relative_error(a, e) <= 1e-5
        assert relative_error(np.asarray(a) - s, np.asarray(e) - s) <= change_rtol


def test_split_and_merge_are_inverse_and_strided():
    x = jnp.arange(12 * 2).reshape(12, 2)
    micro = split_micro_batches(x, 3)
    assert micro.shape == (3, 4, 2)
    np.testing.assert_array_equal(micro[1, :, 0], x[1::3, 0])
    np.testing.assert_array_equal(merge_micro_batches(micro), x)


# The tiny Llama runs Clip-Cov only (random pick + PPO clip: the most selection-sensitive loss)
# and only the extreme micro-batch sizes, to keep compile time down.
MICRO_BATCH_SIZES = {"bigram": (4, 2, 1), "llama": (4, 1)}
CASES = [("bigram", "ppo_clip"), ("bigram", "clip_cov"), ("bigram", "kl_cov")]
if "llama" in POLICIES:
    CASES.append(("llama", "clip_cov"))


@pytest.mark.parametrize("policy, loss", CASES)
def test_update_is_invariant_to_micro_batch_size(policy, loss):
    """Micro-batches of 1, 2 and 4 rows of a 4-row mini-batch give the same update as the
    gradient of the whole mini-batch loss taken at once (for the Llama: 1 row vs all 4)."""
    init, logprob_fn, change_rtol = POLICIES[policy]
    algo = ALGOS[loss]
    params = init(1)
    batch = make_batch(logprob_fn, params, 4, algo)
    key = jax.random.key(7)
    results = {}
    for micro_batch_size in MICRO_BATCH_SIZES[policy]:
        update = make_update_fn(logprob_fn, optimizer(), algo, micro_batch_size, donate=False)
        results[micro_batch_size] = update(params, optimizer().init(params), batch, key,
                                           LEARNING_RATE)
    if policy == "bigram":
        expected, expected_metrics = direct_update(logprob_fn, params, batch, key, algo,
                                                   optimizer())
    else:  # compiling a separate Llama reference would cost more test time than it adds
        expected, _, expected_metrics = results[4]
    assert loss == "ppo_clip" or selected_fraction(expected_metrics) > 0  # selection exercised
    for new_params, _, metrics in results.values():
        assert_same_update(new_params, expected, params, change_rtol)
        for name, value in expected_metrics.items():
            np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
        assert np.isfinite(metrics["actor/grad_norm"]) and "cov/pred_dH" in metrics


@pytest.mark.parametrize("loss", sorted(ALGOS))
def test_update_is_invariant_to_mesh(loss):
    """One device, whole mini-batch at once == 8 devices (data axis) with two micro-batches."""
    assert jax.device_count() == 8
    algo = ALGOS[loss]
    params = bigram_init(2)
    batch = make_batch(bigram_logprobs, params, 16, algo, seed=3)
    key = jax.random.key(5)
    expected, expected_metrics = direct_update(bigram_logprobs, params, batch, key, algo,
                                               optimizer())
    assert loss == "ppo_clip" or selected_fraction(expected_metrics) > 0

    mesh = make_mesh(MeshConfig(data=8))
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded_batch = jax.device_put(batch, rows)
    sharded_params = jax.device_put(jax.tree.map(np.asarray, params), replicated)  # donated
    sharded = make_update_fn(bigram_logprobs, optimizer(), algo, 8, mesh=mesh)
    new_params, _, metrics = sharded(sharded_params, optimizer().init(sharded_params),
                                     sharded_batch, key)
    assert new_params["dense_dd"].sharding.is_equivalent_to(replicated, 2)
    assert_same_update(new_params, expected, params)
    for name, value in expected_metrics.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert "cov/pred_dH" not in metrics  # no learning rate given


def test_update_rejects_ragged_micro_batches():
    algo = AlgoConfig(group_size=4)
    params = bigram_init(0)
    zeros = jnp.zeros((8, STEPS))
    batch = MiniBatch(zeros.astype(jnp.int32), zeros, zeros, zeros, zeros)
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        make_update_fn(bigram_logprobs, optimizer(), algo, 3)(params, optimizer().init(params),
                                                             batch, jax.random.key(0))


@pytest.mark.parametrize("loss", sorted(ALGOS))
@pytest.mark.parametrize("micro_batch_size", [4, 2])  # one pass / selection pass + accumulation
def test_on_policy_old_logprobs_from_the_gradient_pass(loss, micro_batch_size):
    """old_logp_bt=None (one update per step: the trainer skips its scoring forward) gives the
    update that the recomputed old log-probs give, and the skipped pass would have produced
    exactly the gradient pass's log-probs: ratio 1, KL-Cov's penalty exactly 0."""
    algo = ALGOS[loss]
    params = bigram_init(4)
    off_policy = make_batch(bigram_logprobs, params, 4, algo, seed=6)
    recomputed, _ = jax.jit(bigram_logprobs)(params, off_policy.tokens_bt,
                                             off_policy.attention_mask_bt)
    update = make_update_fn(bigram_logprobs, optimizer(), algo, micro_batch_size, donate=False)
    key = jax.random.key(3)
    given = update(params, optimizer().init(params),
                   off_policy.replace(old_logp_bt=recomputed), key, LEARNING_RATE)
    from_pass = update(params, optimizer().init(params), off_policy.replace(old_logp_bt=None),
                       key, LEARNING_RATE)
    assert_same_update(from_pass[0], given[0], params)
    assert given[2].keys() == from_pass[2].keys()
    for name, value in given[2].items():
        np.testing.assert_allclose(from_pass[2][name], value, rtol=1e-6, atol=1e-7, err_msg=name)
    assert float(from_pass[2]["actor/abs_dlogp"]) == 0.0  # ratio exactly 1
    if loss == "kl_cov":
        assert float(from_pass[2]["kl_cov/penalized_frac"]) > 0
        assert float(from_pass[2]["kl_cov/penalty"]) == 0.0
    off = update(params, optimizer().init(params), off_policy, key, LEARNING_RATE)
    assert relative_error(off[0]["dense_dd"] - params["dense_dd"],
                          np.asarray(from_pass[0]["dense_dd"] - params["dense_dd"])) > 1e-3
