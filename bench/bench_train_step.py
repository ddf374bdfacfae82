"""One policy update of SmolLM2-135M at 16 x 128 tokens per policy loss: what Clip-Cov and
KL-Cov cost over plain PPO clipping.

    python bench/bench_train_step.py [--repeats 5 --compute-dtype float32 --micro-batch 16]

A train step's update = forward + covariance selection + loss + backward + AdamW step on one
mini-batch (2 prompts x 8 samples, 32 prompt + 96 response tokens), jitted with donated state,
exactly as the trainer runs it (`jaxcov.update.make_update_fn`). The three losses are timed in
interleaved rounds (ppo_clip, clip_cov, kl_cov, ppo_clip, ...) so that load changes on the
machine hit them alike; the best time per loss and the ratio to ppo_clip are printed.
With --micro-batch below 16 the update accumulates gradients over micro-batches, and Clip-Cov /
KL-Cov then need a selection forward over the whole mini-batch first (update.py).
"""

import argparse
import time

import numpy as np

from machine import machine_line

LOSSES = ("ppo_clip", "clip_cov", "kl_cov")
PROMPT, RESPONSE, GROUP = 32, 96, 8


def make_batch(model, logprob_fn, rows: int, seed: int = 0):
    """Random tokens with a GRPO advantage structure; old log-probs from the model itself."""
    import jax
    import jax.numpy as jnp

    from jaxcov.advantages import grpo
    from jaxcov.config import AlgoConfig
    from jaxcov.update import MiniBatch

    rng = np.random.default_rng(seed)
    width = PROMPT + RESPONSE
    tokens = rng.integers(0, model.config.vocab_size, (rows, width)).astype(np.int32)
    lengths = rng.integers(RESPONSE // 2, RESPONSE + 1, rows)
    t = np.arange(width)[None, :]
    response = (t >= PROMPT) & (t < PROMPT + lengths[:, None])
    attention = t < PROMPT + lengths[:, None]
    rewards = rng.integers(0, 2, rows).astype(np.float32)
    tokens_bt, attention_bt = jnp.asarray(tokens), jnp.asarray(attention, jnp.int32)
    response_bt = jnp.asarray(response, jnp.float32)
    old_logp_bt, _ = jax.jit(logprob_fn)(model.params, tokens_bt, attention_bt)
    advantages_bt = grpo(jnp.asarray(rewards), response_bt, AlgoConfig(group_size=GROUP))
    return MiniBatch(tokens_bt=tokens_bt, attention_mask_bt=attention_bt,
                     response_mask_bt=response_bt, old_logp_bt=old_logp_bt,
                     advantages_bt=advantages_bt)


def algo_for(loss: str):
    from jaxcov.config import AlgoConfig

    # The paper's 7B ratios (Clip-Cov 2e-4, KL-Cov 2e-3) and bounds; group of 8.
    return AlgoConfig(group_size=GROUP, policy_loss=loss, clip_cov_ratio=2e-4,
                      kl_cov_ratio=2e-3, eps_high=0.28)


def build_updates(model, logprob_fn, args):
    """loss -> (jitted update, params, opt_state), each with its own copy of the state."""
    import jax
    import jax.numpy as jnp

    from jaxcov.config import OptimConfig
    from jaxcov.optim import make_optimizer
    from jaxcov.update import make_update_fn
    from jaxcov.xla_cpu import model_compile_options

    optimizer, _ = make_optimizer(OptimConfig(lr=1e-6), 1000)
    options = model_compile_options(model.config.compute_dtype)  # as the trainer compiles it
    updates = {}
    for loss in LOSSES:
        fn = make_update_fn(logprob_fn, optimizer, algo_for(loss), args.micro_batch,
                            compiler_options=options)
        params = jax.tree.map(jnp.copy, model.params)
        updates[loss] = [fn, params, optimizer.init(params)]
    return updates


def run_once(entry, batch, key) -> float:
    import jax

    fn, params, opt_state = entry
    start = time.perf_counter()
    params, opt_state, metrics = fn(params, opt_state, batch, key, 1e-6)
    jax.block_until_ready((params, metrics))
    entry[1], entry[2] = params, opt_state
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compute-dtype", default="float32")
    p.add_argument("--remat", default="none")
    p.add_argument("--chunk", type=int, default=128, help="logits chunk (tokens per step)")
    args = p.parse_args()

    import jax

    from jaxcov.models.api import load_model
    from jaxcov.trainer import logprob_function

    model = load_model("smollm2-135m-instruct", compute_dtype=args.compute_dtype,
                       remat=args.remat, with_tokenizer=False)
    logprob_fn = logprob_function(model.config, model.mesh, args.chunk)
    batch = make_batch(model, logprob_fn, args.rows)
    updates = build_updates(model, logprob_fn, args)
    key = jax.random.key(0)
    compile_s = {loss: run_once(updates[loss], batch, key) for loss in LOSSES}
    best = {loss: float("inf") for loss in LOSSES}
    for _ in range(args.repeats):
        for loss in LOSSES:
            best[loss] = min(best[loss], run_once(updates[loss], batch, key))
    print(f"SmolLM2-135M update, {args.rows}x{PROMPT + RESPONSE} tokens, micro-batch "
          f"{args.micro_batch}, compute {args.compute_dtype}, remat {args.remat}, "
          f"best of {args.repeats}")
    print(f"{'loss':10}{'update s':>10}{'vs ppo_clip':>13}{'first call s':>14}")
    for loss in LOSSES:
        overhead = best[loss] / best["ppo_clip"] - 1.0
        print(f"{loss:10}{best[loss]:10.3f}{overhead:+12.1%}{compile_s[loss]:14.1f}")
    print(machine_line())


if __name__ == "__main__":
    main()
