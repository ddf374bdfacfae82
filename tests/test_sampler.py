"""The rollout sampler: exact cached decoding and log-probs, sampling distributions, stop and
padding handling, groups, buckets, sharding, errors, and greedy parity with transformers."""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcov import sampler
from jaxcov.config import ConfigError, MeshConfig, SamplerConfig
from jaxcov.models import decode, llama
from jaxcov.models.api import param_shardings
from jaxcov.models.presets import TINY_CONFIGS, tiny_config
from jaxcov.sharding import make_mesh

FAMILIES = sorted(TINY_CONFIGS)
PAD = 0
PROMPTS = [[5, 17, 99, 3], [42, 8, 250, 61, 7, 19, 23], [200]]
# The same prompts behind a shared 18-token "system prompt": 16 of it run once per batch.
SYSTEM = list(range(100, 118))
PREFIXED = [SYSTEM + p for p in PROMPTS]
# Most tests share one program: a tiny llama, these settings, 2 samples per prompt, stop id 1.
BASE = SamplerConfig(max_new_tokens=10, temperature=0.8, top_k=50, top_p=0.95)


@functools.lru_cache(maxsize=None)
def tiny_params(cfg, mesh=None, seed=0):
    """Random parameters from numpy (no init program to compile). std 0.2, not 0.02: peaked
    next-token distributions, so greedy comparisons meet no near-ties."""
    rng = np.random.RandomState(seed)

    def make(spec):
        if spec.init != "normal":
            return np.full(spec.shape, spec.init == "ones", np.float32)
        return (0.2 * rng.standard_normal(spec.shape)).astype(np.float32)

    params = jax.tree.map(make, llama.param_specs(cfg), is_leaf=llama.is_spec)
    return jax.device_put(params, param_shardings(cfg, mesh) if mesh is not None else None)


@functools.lru_cache(maxsize=None)
def single_device_mesh():
    return make_mesh(MeshConfig(), devices=jax.devices()[:1])


def full_logits(params, cfg, rollout):
    """Fresh forward over prompt + response: logits predicting each response token [R, N, V]."""
    tokens = np.concatenate([np.asarray(rollout.prompt_ids), np.asarray(rollout.response_ids)], 1)
    mask = np.concatenate([np.asarray(rollout.prompt_mask), np.asarray(rollout.response_mask)], 1)
    logits = llama.forward(params, cfg, jnp.asarray(tokens), jnp.asarray(mask))
    P, N = rollout.prompt_ids.shape[1], rollout.response_ids.shape[1]
    return np.asarray(logits[:, P - 1:P + N - 1], np.float64)


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference_sampling_logp(logits, temperature, top_k, top_p):
    """numpy: log-probs of the sampling distribution (temperature, then top-k, then top-p)."""
    scaled = logits / temperature
    if top_k:
        kth = np.sort(scaled, -1)[..., -top_k][..., None]
        scaled = np.where(scaled >= kth, scaled, -np.inf)
    if top_p < 1.0:
        probs = np.exp(log_softmax(scaled))
        order = np.argsort(-scaled, -1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, -1)
        before = np.cumsum(sorted_p, -1) - sorted_p
        cutoff = np.min(np.where(before < top_p, np.take_along_axis(scaled, order, -1), np.inf),
                        -1, keepdims=True)
        scaled = np.where(scaled >= cutoff, scaled, -np.inf)
    return log_softmax(scaled)


# ------------------------------------------------------------------------------- exactness


@functools.partial(jax.jit, static_argnums=(1,))
def cached_and_full_logits(params, cfg, prefix_c, prompt_bp, prompt_mask_bp, response_bt):
    """Logits of prefill + each cached decode step (the sampler's own functions), and of one
    full forward pass over the same tokens, at the same positions: both [B, T, V]."""
    B, P = prompt_bp.shape
    C, T = prefix_c.shape[0], response_bt.shape[1]
    original, (params, layers) = params, decode.decode_params(params, cfg)
    logits, cache = decode.prefill(params, layers, cfg, prefix_c, prompt_bp, prompt_mask_bp, T,
                                    None)
    cached = [logits]
    for t in range(T - 1):
        position = C + jnp.sum(prompt_mask_bp, axis=1) + t
        logits, cache = decode.decode_step(params, layers, cfg, response_bt[:, t], position,
                                            cache, None)
        cached.append(logits)
    tokens = jnp.concatenate([jnp.broadcast_to(prefix_c, (B, C)), prompt_bp, response_bt], 1)
    mask = jnp.concatenate([jnp.ones((B, C), bool), prompt_mask_bp, jnp.ones((B, T), bool)], 1)
    full = llama.forward(original, cfg, tokens, mask)
    return jnp.stack(cached, 1), full[:, C + P - 1:C + P + T - 1]


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decode_logits_equal_full_forward(family):
    """Every family: the logits of the prefill and of each cached decode step equal a full
    forward pass over the same tokens. Prompts share a 3-token prefix (run once), except for
    mistral, whose sliding window turns prefix sharing off."""
    cfg = tiny_config(family)
    prefix = 0 if cfg.sliding_window else 3
    rng = np.random.RandomState(0)
    prompt = rng.randint(1, cfg.vocab_size, (3, 8))
    prompt_mask = np.ones((3, 8), bool)
    prompt_mask[1, :3] = prompt_mask[2, :6] = False  # left padding
    response = rng.randint(1, cfg.vocab_size, (3, 4))  # prompt + response > mistral's window
    cached, full = cached_and_full_logits(tiny_params(cfg), cfg, rng.randint(1, 256, prefix),
                                          prompt, prompt_mask, response)
    np.testing.assert_allclose(cached, full, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_returned_logprobs_equal_fresh_forward(family):
    """End to end through `sample` (every family's cached path is checked above)."""
    cfg = tiny_config(family)
    params = tiny_params(cfg)
    rollout = sampler.sample(params, cfg, None, PREFIXED, jax.random.key(1), BASE, n=2,
                             stop_ids=(1,), pad_id=PAD)
    logits = full_logits(params, cfg, rollout)
    mask = np.asarray(rollout.response_mask)
    tokens = np.asarray(rollout.response_ids)[..., None]
    policy = np.take_along_axis(log_softmax(logits), tokens, -1)[..., 0]
    np.testing.assert_allclose(np.asarray(rollout.policy_logprobs)[mask], policy[mask], atol=1e-4)
    reference = reference_sampling_logp(logits, BASE.temperature, BASE.top_k, BASE.top_p)
    sampled = np.take_along_axis(reference, tokens, -1)[..., 0]
    np.testing.assert_allclose(np.asarray(rollout.sample_logprobs)[mask], sampled[mask],
                               atol=1e-4)
    assert np.all(np.asarray(rollout.policy_logprobs)[~mask] == 0)


# --------------------------------------------------------------------- sampling distributions

SAMPLING_CASES = [  # (temperature, top_k, top_p)
    (1.0, 0, 1.0), (0.5, 0, 1.0), (1.7, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.7), (1.5, 4, 0.8)]
SMALL_VOCAB = np.log(np.array([0.35, 0.25, 0.15, 0.12, 0.08, 0.05]))
# 40 tokens = 5 blocks of 8 for the two-level draw; mass spread over every block.
SPREAD_VOCAB = np.random.RandomState(0).normal(0.0, 1.0, 40)


@pytest.mark.parametrize("temperature,top_k,top_p", SAMPLING_CASES)
@pytest.mark.parametrize("logits", [SMALL_VOCAB, SPREAD_VOCAB], ids=["v6", "v40"])
def test_sampling_matches_target_distribution(logits, temperature, top_k, top_p):
    """200k seeded draws: every empirical token frequency lies within 5 standard errors (+1e-3)
    of the target probability; filtered-out tokens never appear."""
    draws, vocab = 200_000, len(logits)
    options = sampler.SamplingOptions(temperature, top_k, top_p)
    fn = jax.jit(lambda l, k: sampler.sample_tokens(l, k, options))
    token, sample_logp, policy_logp = fn(jnp.tile(jnp.asarray(logits, jnp.float32), (draws, 1)),
                                         jax.random.key(7))
    token = np.asarray(token)
    target = np.exp(reference_sampling_logp(logits, temperature, top_k, top_p))
    freq = np.bincount(token, minlength=vocab) / draws
    tolerance = 5 * np.sqrt(target * (1 - target) / draws) + 1e-3
    assert np.all(np.abs(freq - target) <= tolerance), (freq, target)
    assert np.all(freq[target == 0] == 0)
    np.testing.assert_allclose(sample_logp, np.log(target[token]), atol=1e-5)
    np.testing.assert_allclose(policy_logp, log_softmax(logits)[token], atol=1e-5)


def test_greedy_picks_argmax_with_zero_sampling_logprob():
    logits = jax.random.normal(jax.random.key(0), (64, 300))
    token, sample_logp, policy_logp = sampler.sample_tokens(
        logits, jax.random.key(1), sampler.SamplingOptions(temperature=0.0))
    np.testing.assert_array_equal(token, jnp.argmax(logits, -1))
    assert np.all(np.asarray(sample_logp) == 0)
    np.testing.assert_allclose(policy_logp, jnp.max(jax.nn.log_softmax(logits), -1), atol=1e-6)


def test_top_k_and_top_p_masks_on_ties_and_extremes():
    logits = jnp.array([[3.0, 1.0, 1.0, 1.0, -jnp.inf, 0.0]])
    assert np.asarray(sampler.top_k_mask(logits, 2)).tolist() == [[1, 1, 1, 1, 0, 0]]  # ties kept
    assert np.asarray(sampler.top_k_mask(logits, 10)).sum() == 6
    assert np.asarray(sampler.top_p_mask(logits, 1e-6)).tolist() == [[1, 0, 0, 0, 0, 0]]


# ------------------------------------------------------------------ rows, groups and stopping

def base_sample(prompts=PREFIXED, key=0, config=BASE, mesh=None, prompt_width=None):
    cfg = tiny_config("llama")
    return sampler.sample(tiny_params(cfg, mesh), cfg, mesh, prompts, jax.random.key(key),
                          config, 2, (1,), PAD, prompt_width)


@pytest.mark.parametrize("engine", ["continuous", "static"])
def test_stop_tokens_mask_and_padding_when_eos_is_pad(engine):
    """Stop ids include the pad id (SmolLM2: EOS = PAD): the mask covers each response up to and
    including its first stop token; everything after it is padding outside the mask."""
    cfg = tiny_config("llama")
    stop_ids = tuple(range(0, cfg.vocab_size, 13))  # ~8% of tokens stop: some rows end early
    config = dataclasses.replace(BASE, engine=engine, slots=5)
    rollout = sampler.sample(tiny_params(cfg), cfg, None, PROMPTS, jax.random.key(3), config,
                             n=4, stop_ids=stop_ids, pad_id=PAD)
    ids, mask = np.asarray(rollout.response_ids), np.asarray(rollout.response_mask)
    lengths, stopped = mask.sum(1), np.asarray(rollout.stopped)
    assert stopped.any() and not stopped.all()
    for row in range(len(ids)):
        assert mask[row, :lengths[row]].all() and not mask[row, lengths[row]:].any()
        assert np.all(ids[row, lengths[row]:] == PAD)
        is_stop = np.isin(ids[row, :lengths[row]], stop_ids)
        assert not is_stop[:-1].any()
        assert is_stop[-1] == stopped[row]
        assert stopped[row] or lengths[row] == BASE.max_new_tokens
    assert rollout.finish_reasons() == ["stop" if s else "length" for s in stopped]
    np.testing.assert_array_equal(rollout.response_lengths, lengths)


def test_groups_are_contiguous_rows_of_one_prefill():
    """Greedy, n=2: rows 2i and 2i+1 hold prompt i and the same response (the prompt's prefill
    is repeated, not recomputed, so the two rows are bit-identical)."""
    greedy = dataclasses.replace(BASE, temperature=0.0)
    rollout = base_sample(config=greedy)
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "policy_logprobs",
                 "stopped"):
        rows = np.asarray(getattr(rollout, name))
        np.testing.assert_array_equal(rows[0::2], rows[1::2], err_msg=name)
    prompt_ids, prompt_mask = np.asarray(rollout.prompt_ids), np.asarray(rollout.prompt_mask)
    for i, prompt in enumerate(PREFIXED):
        assert prompt_ids[2 * i][prompt_mask[2 * i]].tolist() == prompt


def test_deterministic_for_a_key():
    first, again, other = base_sample(key=0), base_sample(key=0), base_sample(key=1)
    np.testing.assert_array_equal(first.response_ids, again.response_ids)
    np.testing.assert_array_equal(first.sample_logprobs, again.sample_logprobs)
    assert not np.array_equal(first.response_ids, other.response_ids)
    assert not np.array_equal(first.response_ids[0::2], first.response_ids[1::2])  # per-row noise


def test_shared_prompt_prefix_changes_nothing():
    assert sampler.shared_prefix_len(PREFIXED, 16) == 16
    assert sampler.shared_prefix_len(PREFIXED, 5) == 15  # 18 shared, rounded down
    assert sampler.shared_prefix_len([[1, 2, 3], [1, 2, 3]], 1) == 2  # one token stays own
    shared = base_sample(key=4)
    separate = base_sample(key=4,
                           config=dataclasses.replace(BASE, share_prompt_prefix=False))
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "stopped"):
        np.testing.assert_array_equal(getattr(shared, name), getattr(separate, name), name)
    for name in ("sample_logprobs", "policy_logprobs"):
        np.testing.assert_allclose(getattr(shared, name), getattr(separate, name), atol=1e-5)


def test_bucketed_shapes_reuse_compiled_programs():
    base_sample()
    before = sampler.compile_count()
    # Same shapes (shared prefix 16, own part 16, 4 prompts, response width 16): no new program.
    longer = dataclasses.replace(BASE, max_new_tokens=14)
    out = base_sample([SYSTEM + [9] * 13, SYSTEM + [4, 5], SYSTEM + [6]], config=longer)
    longest = dataclasses.replace(BASE, max_new_tokens=16)
    base_sample([SYSTEM + [7, 7, 7], SYSTEM + [1] * 11, SYSTEM + [2], SYSTEM + [3]],
                config=longest)
    assert sampler.compile_count() == before
    assert out.response_ids.shape == (6, 14) and out.prompt_ids.shape == (6, 32)
    base_sample([SYSTEM + [9] * 20])  # a new prompt width (64): +1
    assert sampler.compile_count() == before + 1


def test_a_fixed_prompt_width_changes_only_the_padding():
    """`prompt_width` (sampler.pad_prompts: dataset) pads further left; the responses and
    their log-probs are those of the batch's own bucket, and a width too small is refused."""
    own, wide = base_sample(key=6), base_sample(key=6, prompt_width=40)
    assert own.prompt_ids.shape[1] == 32 and wide.prompt_ids.shape[1] == 40
    np.testing.assert_array_equal(wide.prompt_ids[:, 8:], own.prompt_ids)
    assert not wide.prompt_mask[:, :8].any()
    for name in ("response_ids", "response_mask", "stopped"):
        np.testing.assert_array_equal(getattr(wide, name), getattr(own, name), name)
    for name in ("sample_logprobs", "policy_logprobs"):
        np.testing.assert_allclose(getattr(wide, name), getattr(own, name), atol=1e-5)
    with pytest.raises(ValueError, match="prompt_width=20 is shorter than the longest prompt"):
        base_sample(prompt_width=20)
    train = [{"prompt_ids": [1] * 20}, {"prompt_ids": [1] * 70}]
    assert sampler.dataset_prompt_width(BASE, train, None, [{"prompt_ids": [2] * 3}]) == 128
    assert sampler.dataset_prompt_width(dataclasses.replace(BASE, max_prompt_len=100),
                                        train) == 100
    assert sampler.dataset_prompt_width(dataclasses.replace(BASE, pad_prompts="batch"),
                                        train) is None


def test_bucket_sizes():
    # Powers of two times the minimum: prompts of 20..400 tokens land in 5 widths, not 9.
    assert [sampler.bucket(n, 16) for n in (1, 16, 17, 25, 33, 49, 65, 200, 257)] == [
        16, 16, 32, 32, 64, 64, 128, 256, 512]
    assert sorted({sampler.bucket(n, 16, maximum=400) for n in range(20, 401)}) == [
        32, 64, 128, 256, 400]
    assert sampler.bucket(300, 16, maximum=256) == 256
    # The shared prefix is cut down to 8 x (1, 1.5, 2, 3, ...): 27 and 31 shared tokens run the
    # same program, and at most a third of the prefix runs once per prompt instead of once.
    assert [sampler.prefix_bucket(n) for n in (0, 7, 8, 11, 12, 17, 27, 31, 32, 47, 100)] == [
        0, 0, 8, 8, 12, 16, 24, 24, 32, 32, 96]
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert [sampler.batch_bucket(b, 1, mesh) for b in (1, 3, 5, 9)] == [4, 4, 8, 16]
    assert sampler.batch_bucket(3, 2, mesh) == 4 and sampler.batch_bucket(1, 8, mesh) == 1


# ----------------------------------------------------------------------------------- sharding


def test_mesh_output_equals_single_device_output():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded, single = base_sample(key=5, mesh=mesh), base_sample(key=5)
    assert len(sharded.response_ids.sharding.device_set) == 8
    for name in ("prompt_ids", "response_ids", "response_mask", "stopped"):
        np.testing.assert_array_equal(getattr(sharded, name), getattr(single, name), name)
    for name in ("sample_logprobs", "policy_logprobs"):
        np.testing.assert_allclose(getattr(sharded, name), getattr(single, name), atol=1e-5)


def test_mesh_continuous_engine_schedules_each_shard_and_matches_single_device():
    """Slots split into one group per batch shard (4 here), each refilled from its own
    prompts' items: the tokens equal the single-device engine's with other slot counts."""
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    config = dataclasses.replace(BASE, slots=4)  # one slot per shard: every item is a refill
    prompts = PREFIXED + [SYSTEM + [77, 78]]
    sharded = base_sample(prompts, key=5, mesh=mesh, config=config)
    single = base_sample(prompts, key=5, config=dataclasses.replace(BASE, slots=3))
    for name in ("response_ids", "response_mask", "stopped"):
        np.testing.assert_array_equal(getattr(sharded, name), getattr(single, name), name)
    np.testing.assert_allclose(sharded.policy_logprobs, single.policy_logprobs, atol=1e-5)


# -------------------------------------------------------------------------- continuous engine

# Prompts whose greedy responses end at 1..12 tokens (stop ids: every 7th token) or at the cap.
VARIED = [[5, 17, 99, 3], [42, 8, 250, 61, 7, 19, 23], [200], [9, 9], [31, 4, 160],
          [77] * 11, [12, 130, 6, 201, 44], [250, 3]]
EVERY_7TH = tuple(range(0, 256, 7))


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_continuous_greedy_equals_static_for_widely_varying_lengths(family):
    """Every prompt of the batch, with 1, 3 and 16 slots (every item refilled into a used slot;
    a few refills; no refill): the static batch's tokens, lengths, stops and log-probs."""
    cfg = tiny_config(family)
    greedy = dataclasses.replace(BASE, temperature=0.0, max_new_tokens=12)
    run = lambda **kw: sampler.sample(tiny_params(cfg), cfg, None, VARIED, jax.random.key(0),  # noqa
                                      dataclasses.replace(greedy, **kw), 2, EVERY_7TH, PAD)
    static = run(engine="static")
    lengths = np.asarray(static.response_lengths)
    assert lengths.min() <= 3 and lengths.max() == 12 and len(set(lengths.tolist())) >= 4
    for slots in (1, 3, 16):
        slotted = run(slots=slots)
        for name in ("response_ids", "response_mask", "stopped"):
            np.testing.assert_array_equal(getattr(slotted, name), getattr(static, name),
                                          f"{slots} slots: {name}")
        np.testing.assert_allclose(slotted.policy_logprobs, static.policy_logprobs, atol=1e-5)


def test_attention_over_filled_width_buckets_changes_nothing(monkeypatch):
    """With width buckets forced on these small caches (4-8 slots a bucket, so the chosen
    width changes every few steps, and the continuous engine's response ring wraps with 3
    slots), every cached decode step's logits still equal a full forward, and both engines
    return the unbucketed tokens and log-probs."""
    cfg = tiny_config("llama")
    greedy = dataclasses.replace(BASE, temperature=0.0, max_new_tokens=12)
    run = lambda **kw: sampler.sample(tiny_params(cfg), cfg, None, VARIED, jax.random.key(0),  # noqa
                                      dataclasses.replace(greedy, **kw), 2, EVERY_7TH, PAD)
    plain = {"static": run(engine="static"), 3: run(slots=3)}
    monkeypatch.setattr(decode, "MIN_BUCKETED_WIDTH", 8)
    monkeypatch.setattr(decode, "WIDTH_BUCKETS", 4)
    assert decode.width_buckets(20) == (8, 16, 20) and decode.width_buckets(7) == (7,)
    jax.clear_caches()  # the programs above were traced with one width
    rng = np.random.RandomState(1)
    prompt, response = rng.randint(1, cfg.vocab_size, (2, 8)), rng.randint(1, 256, (2, 12))
    prompt_mask = np.ones((2, 8), bool)
    prompt_mask[1, :5] = False
    cached, full = cached_and_full_logits(tiny_params(cfg), cfg, np.zeros(0, np.int32),
                                              prompt, prompt_mask, response)
    np.testing.assert_allclose(cached, full, atol=2e-5, rtol=1e-5)
    for key, kw in (("static", {"engine": "static"}), (3, {"slots": 3})):
        bucketed = run(**kw)
        for name in ("response_ids", "response_mask", "stopped"):
            np.testing.assert_array_equal(getattr(bucketed, name), getattr(plain[key], name),
                                          f"{key}: {name}")
        np.testing.assert_allclose(bucketed.policy_logprobs, plain[key].policy_logprobs,
                                   atol=1e-5)
    jax.clear_caches()  # later tests trace with the real buckets


def test_continuous_sampled_logprobs_equal_teacher_forcing_and_ignore_slot_count():
    """Sampling (T=0.8, top-k, top-p) with refills: each item's draws come from its own key, so
    2 and 5 slots give the same tokens; both log-probs equal a fresh forward to 1e-4."""
    cfg = tiny_config("llama")
    params = tiny_params(cfg)
    run = lambda slots: sampler.sample(params, cfg, None, VARIED, jax.random.key(2),  # noqa
                                       dataclasses.replace(BASE, slots=slots), 3, EVERY_7TH, PAD)
    two, five = run(2), run(5)
    np.testing.assert_array_equal(two.response_ids, five.response_ids)
    np.testing.assert_allclose(two.sample_logprobs, five.sample_logprobs, atol=1e-5)
    logits = full_logits(params, cfg, two)
    mask, tokens = np.asarray(two.response_mask), np.asarray(two.response_ids)[..., None]
    policy = np.take_along_axis(log_softmax(logits), tokens, -1)[..., 0]
    np.testing.assert_allclose(np.asarray(two.policy_logprobs)[mask], policy[mask], atol=1e-4)
    reference = reference_sampling_logp(logits, BASE.temperature, BASE.top_k, BASE.top_p)
    sampled = np.take_along_axis(reference, tokens, -1)[..., 0]
    np.testing.assert_allclose(np.asarray(two.sample_logprobs)[mask], sampled[mask], atol=1e-4)
    assert np.all(np.asarray(two.sample_logprobs)[~mask] == 0)


def test_slot_utilisation_counts_kept_tokens_per_slot_step():
    """One slot decodes one item after another with no idle step: utilisation 1 and as many
    slot-steps as kept tokens. The static batch spends (prompt bucket x n) rows x its longest
    response."""
    cfg = tiny_config("llama")
    run = lambda **kw: sampler.sample(  # noqa: E731
        tiny_params(cfg), cfg, None, VARIED, jax.random.key(0),
        dataclasses.replace(BASE, temperature=0.0, max_new_tokens=12, **kw), 2, EVERY_7TH, PAD)
    one, static = run(slots=1), run(engine="static")
    kept = int(np.asarray(one.response_mask).sum())
    assert int(one.slot_steps) == kept and one.slot_utilisation() == 1.0
    longest = int(np.asarray(static.response_lengths).max())
    assert int(static.slot_steps) == 16 * longest
    assert static.slot_utilisation() == pytest.approx(kept / (16 * longest))


# ------------------------------------------------------------------------------------- errors


def test_prompt_errors_and_explicit_truncation():
    short = SamplerConfig(max_prompt_len=5)
    with pytest.raises(ConfigError, match="max_prompt_len"):
        base_sample(config=short)
    with pytest.raises(ValueError, match="prompt list is empty"):
        base_sample([])
    with pytest.raises(ValueError, match="no tokens"):
        base_sample([[3], []])
    truncating = SamplerConfig(max_prompt_len=5, truncate_prompts=True)
    kept = sampler.check_prompts(PROMPTS, truncating)
    assert kept == [PROMPTS[0], PROMPTS[1][-5:], PROMPTS[2]]
    ids, mask = sampler.left_pad(kept, 5, PAD, batch=4)
    assert ids.shape == (4, 5) and ids[1].tolist() == PROMPTS[1][-5:] and mask[1].all()
    assert ids[0, 1:].tolist() == PROMPTS[0] and mask[0].tolist() == [0, 1, 1, 1, 1]
    assert mask[3].tolist() == [0, 0, 0, 0, 1]  # a bucket-filling row: one pad token


# -------------------------------------------------------------- SmolLM2 vs transformers (slow)

# Responses of very different lengths: two stop after 8 tokens, two run to the cap.
CHAT = ["What is 2+2? Answer with just the number.", "Name a primary color.",
        "What is the capital of France? Answer with one word.",
        "Write a long story about a cat who sails the sea."]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def smollm2():
    from jaxcov.models.api import load_model

    return load_model("smollm2-135m-instruct", mesh=single_device_mesh())


def _transformers_greedy(prompts) -> np.ndarray:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxcov.models.registry import embedded_model_path

    path = embedded_model_path("smollm2-135m-instruct")
    torch.set_num_threads(1)  # robust to a busy machine (2 threads spin-wait on each other)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    width = max(map(len, prompts))
    ids = torch.tensor([[2] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                          max_new_tokens=NEW_TOKENS, pad_token_id=2, eos_token_id=2)
    expected = np.full((len(prompts), NEW_TOKENS), 2)
    expected[:, :out.shape[1] - width] = out[:, width:].numpy()
    return expected


def test_greedy_matches_transformers_generate(smollm2):
    """Both engines, the continuous one with its default slots and with one slot (every item
    after the first refilled into a used slot): transformers' tokens for every prompt."""
    prompts = sampler.encode_prompts(smollm2.tokenizer, CHAT)
    expected = _transformers_greedy(prompts)
    first_eos = [list(row).index(2) + 1 if 2 in row else NEW_TOKENS for row in expected]
    assert first_eos == [8, NEW_TOKENS, 8, NEW_TOKENS]  # lengths differ widely
    for engine, slots in (("continuous", 0), ("continuous", 1), ("static", 0)):
        config = SamplerConfig(max_new_tokens=NEW_TOKENS, temperature=0.0, engine=engine,
                               slots=slots)
        ours = sampler.generate(smollm2, prompts, jax.random.key(0), config)
        np.testing.assert_array_equal(np.asarray(ours.response_ids), expected, (engine, slots))
        np.testing.assert_array_equal(np.asarray(ours.response_lengths), first_eos)
    assert ours.finish_reasons()[:2] == ["stop", "length"]  # "2 + 2 = 4<|im_end|>": EOS = PAD
    texts = sampler.decode_responses(smollm2.tokenizer, ours)
    assert texts[0].strip() == smollm2.tokenizer.decode(expected[0],
                                                        skip_special_tokens=True).strip()


def test_generate_cli_prints_each_completion(capsys, monkeypatch):
    """`jaxcov generate` end to end: a tiny random model with SmolLM2's tokenizer stands in for
    the loaded model."""
    from jaxcov.cli import parse_args
    from jaxcov.models import api
    from jaxcov.models.registry import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    cfg = tiny_config("llama", vocab_size=len(tokenizer))
    model = api.Model(cfg, tiny_params(cfg), single_device_mesh(), tokenizer)
    monkeypatch.setattr(api, "load_model", lambda name, **kwargs: model)
    args = parse_args(["generate", "tiny", "--prompt", "Hi there", "--prompt", "What is 2+2?",
                       "-n", "2", "--top-p", "0.9", "--top-k", "20", "--max-new-tokens", "5",
                       "--seed", "3"])  # the real parser: the options generate_cli may read
    assert sampler.generate_cli(args) == 0
    out, err = capsys.readouterr()
    headers = [line for line in out.splitlines() if line.startswith("=== prompt")]
    assert len(headers) == 4 and headers[0].startswith("=== prompt 1, sample 1 (")
    assert "tokens/s" in err
