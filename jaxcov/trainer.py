"""The RL loop: `jaxcov train CONFIG [overrides]`.

One step:
  draw prompts -> sample n responses each (jitted sampler) -> rewards (host verifier pool)
  -> [dynamic sampling: draw more prompts until enough groups have varied rewards]
  -> advantages -> old log-probs + entropy (jit forward) [-> reference log-probs]
  -> ppo_epochs x mini-batches of updates (jitted: global Clip-Cov/KL-Cov selection, micro-batch
     gradient accumulation, optax step; a non-finite update is skipped)
  -> entropy after the update (measured dH next to the covariance-predicted dH)
  -> metrics (JSONL / TensorBoard / progress bar) -> periodic eval -> checkpoint.

The trainer state (params, optimizer state, step, RNG) lives on the mesh; the data position and
bookkeeping live in the checkpoint's JSON record, so a restart in the same run directory resumes
exactly. SIGTERM / SIGINT finish the current step, save, and exit 0.

Multi-host: one process per host runs this same loop on the same host-side data (seeds, prompt
order); each puts only its own slice of every batch on its devices, verifies its own part of
the responses (rewards are all-gathered), and process 0 alone writes metrics, plots and the HF
export, while orbax checkpoints are written by all together (`jaxcov.distributed`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxcov import advantages as advantages_lib
from jaxcov import batch as batch_lib
from jaxcov import compiles
from jaxcov import distributed
from jaxcov import instrument
from jaxcov import rundir
from jaxcov.checkpoint import CheckpointSaveError, Checkpointer, exit_abandoning_failed_saves
from jaxcov.config import ConfigError, ExperimentConfig, SamplerConfig, load_config, to_dict
from jaxcov.data import PromptIterator, check_dataset_sources, load_datasets
from jaxcov.entropy import masked_mean
from jaxcov.evaluation import evaluate
from jaxcov.metrics import (METRICS_FILE, MetricsSink, eval_summary, make_sink, read_metrics,
                            summary_table, write_plots)
from jaxcov.models.api import Model, check_tokenizer_source, load_model
from jaxcov.models.logprobs import token_logprobs
from jaxcov.optim import make_optimizer
from jaxcov.rewards import close_scorers
from jaxcov.sampler import bucket, dataset_prompt_width, generate
from jaxcov.sharding import batch_size_multiple, constrain, make_mesh, named_sharding
from jaxcov.update import MiniBatch, make_update_fn, merge_micro_batches, split_micro_batches
from jaxcov.xla_cpu import model_compile_options


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many non-finite updates in a row); the message says why."""


# ------------------------------------------------------------------------------ validation


def check_batch_shapes(config: ExperimentConfig, mesh) -> None:
    """Fails before any compile when batch sizes do not fit the mesh or each other."""
    t, n = config.train, config.algo.group_size
    rows, micro = config.mini_batch_rows, config.micro_batch_rows
    multiple = batch_size_multiple(mesh)
    if rows % multiple:
        raise ConfigError(f"train.mini_batch_prompts: {t.mini_batch_prompts} prompts x "
                          f"{n} samples = {rows} rows is not divisible by the mesh batch "
                          f"axes (data x fsdp = {multiple})")
    if rows % micro or micro % multiple:
        raise ConfigError(f"train.micro_batch_size: {micro} must divide the mini-batch of {rows} "
                          f"rows and be a multiple of data x fsdp = {multiple}")


# ---------------------------------------------------------------------------------- context


@dataclasses.dataclass
class RunContext:
    """Everything a step needs that is not the train state."""

    config: ExperimentConfig
    model: Model
    optimizer: Any
    schedule: Any
    update_fn: Any
    score_fn: Any
    data: PromptIterator
    eval_data: Any
    base_key: jax.Array
    ref_params: Any = None  # a frozen copy of the initial policy, only when a ref-KL term is on
    entropy_fn: Any = None  # `instrument.entropy_change_function`, when train.entropy_instrument
    prompt_width: Optional[int] = None  # every rollout's prompt columns (sampler.pad_prompts)

    @property
    def mesh(self):
        return self.model.mesh


def logprob_function(cfg, mesh, chunk):
    """(params, tokens_bt, attention_mask_bt) -> (logp_bt, entropy_bt) of the policy."""
    def logprobs(params, tokens_bt, attention_mask_bt):
        return token_logprobs(params, cfg, tokens_bt, attention_mask_bt, mesh=mesh, chunk=chunk)
    return logprobs


def scoring_function(logprob_fn, micro_rows: int, mesh, compiler_options=None):
    """Jitted (params, tokens_bt, mask_bt) -> (logp_bt, entropy_bt) for a whole step batch, run
    `micro_rows` rows at a time, so scoring never holds more activations than one update
    micro-batch (the step batch can be many mini-batches)."""
    def score(params, tokens_bt, attention_mask_bt):
        rows = tokens_bt.shape[0]
        if rows <= micro_rows or rows % micro_rows:
            return logprob_fn(params, tokens_bt, attention_mask_bt)
        micro = split_micro_batches((tokens_bt, attention_mask_bt), rows // micro_rows, mesh)
        return merge_micro_batches(jax.lax.map(lambda x: logprob_fn(params, *x), micro))
    shape = lambda params, tokens_bt, mask_bt: f"tokens {list(tokens_bt.shape)}"  # noqa: E731
    return jax.jit(compiles.counted("score", score, shape), compiler_options=compiler_options)


def longest_training_sequence(s: SamplerConfig, prompt_width: Optional[int]) -> int:
    """Prompt plus response columns of the longest batch the run can score."""
    return (prompt_width or bucket(s.max_prompt_len, s.min_bucket, s.max_prompt_len)) + \
        s.max_new_tokens


def build_context(config: ExperimentConfig) -> RunContext:
    mesh = make_mesh(config.mesh)
    check_batch_shapes(config, mesh)
    m = config.model
    # What can be wrong with the tokenizer or the data is found before minutes of loading.
    check_tokenizer_source(m.name, m.tokenizer, "training and eval")
    check_dataset_sources(config.data)
    model = load_model(m.name, mesh=mesh, dtype=m.param_dtype, compute_dtype=m.compute_dtype,
                       remat=m.remat, tokenizer=m.tokenizer, seed=config.seed,
                       attention=m.attention, attention_block=m.attention_block)
    train_set, eval_set = load_datasets(config.data, model.require_tokenizer("training and eval"))
    t = config.train
    optimizer, schedule = make_optimizer(config.optim, t.steps * t.updates_per_step)
    logprob_fn = logprob_function(model.config, mesh, m.logits_chunk)
    micro = config.micro_batch_rows
    prompt_width = dataset_prompt_width(config.sampler, train_set, eval_set)
    options = model_compile_options(model.config.compute_dtype,
                                    longest_training_sequence(config.sampler, prompt_width),
                                    model.config.attention_block)
    return RunContext(
        config=config, model=model, optimizer=optimizer, schedule=schedule,
        update_fn=make_update_fn(logprob_fn, optimizer, config.algo, micro, mesh,
                                 compiler_options=options),
        score_fn=scoring_function(logprob_fn, micro, mesh, options),
        data=PromptIterator(train_set, t.prompts_per_step, config.data.seed, config.data.shuffle),
        eval_data=eval_set, base_key=jax.random.key(config.seed),
        ref_params=jax.tree.map(jnp.copy, model.params) if config.algo.ref_kl_coef > 0 else None,
        prompt_width=prompt_width,
        entropy_fn=(instrument.entropy_change_function(model.config, mesh, m.logits_chunk, micro,
                                                       options)
                    if t.entropy_instrument else None))


# ------------------------------------------------------------------------------ train state


def initial_state(ctx: RunContext) -> dict:
    params = ctx.model.params
    opt_state = jax.jit(ctx.optimizer.init)(params)
    state = {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(ctx.base_key)}
    return jax.tree.map(functools.partial(_on_mesh_replicated, ctx.mesh), state)


def _on_mesh_replicated(mesh, x: jax.Array) -> jax.Array:
    """Leaves placed on one device (step, RNG, optimizer counters) go replicated on the mesh,
    so a restored state is placed exactly like a fresh one."""
    if isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh:
        return x
    return distributed.to_global(x, NamedSharding(mesh, PartitionSpec()))


# ---------------------------------------------------------------------------------- rollout


def _decode(tokenizer, rollout) -> list[str]:
    """Response texts of a rollout already on the host."""
    ids, mask = rollout.response_ids, rollout.response_mask
    ids = np.clip(ids, 0, len(tokenizer) - 1)  # a policy with non-finite weights samples junk ids
    return tokenizer.batch_decode([row[m] for row, m in zip(ids, mask)], skip_special_tokens=True)


def sample_and_score(ctx: RunContext, params, examples: list, key) -> tuple[Any, dict]:
    """One round: n responses for each example, decoded and scored (each process verifies its
    own part of the responses; all get every reward)."""
    n = ctx.config.algo.group_size
    start = time.perf_counter()
    rollout = generate(ctx.model, [e["prompt_ids"] for e in examples], key,
                       ctx.config.sampler, n=n, params=params, prompt_width=ctx.prompt_width)
    rollout = distributed.tree_to_host(rollout)
    texts = _decode(ctx.model.tokenizer, rollout)
    sampled = time.perf_counter()
    rows = [e for e in examples for _ in range(n)]
    lengths = rollout.response_mask.sum(axis=1).tolist()
    rewards, reward_metrics = distributed.score_batch(texts, rows, lengths, ctx.config)
    reward_metrics["time/sample"] = sampled - start
    reward_metrics["time/reward"] = time.perf_counter() - sampled
    # Kept tokens per decode slot-step: how much of the sampler's decoding produced a token.
    reward_metrics["rollout/slot_utilisation"] = rollout.slot_utilisation()
    return batch_lib.from_rollout(rollout, examples, n, texts, rewards), reward_metrics


def collect_rollouts(ctx: RunContext, params, key) -> tuple[batch_lib.RolloutBatch, dict]:
    """Rollouts for one step, with DAPO dynamic sampling when `algo.filter_groups` is on."""
    wanted = ctx.config.train.prompts_per_step
    rounds, metrics_per_round = [], []
    for round_index in range(1 + ctx.config.train.max_resample_rounds):
        examples = ctx.data.next_batch()
        batch, metrics = sample_and_score(ctx, params, examples, jax.random.fold_in(key, round_index))
        rounds.append(batch)
        metrics_per_round.append(metrics)
        merged = batch_lib.concat(rounds)
        informative = int(batch_lib.informative_groups(merged.rewards, merged.n).sum())
        if not ctx.config.algo.filter_groups or informative >= wanted:
            break
    chosen, kept = batch_lib.fill_groups(merged, wanted, ctx.config.algo.filter_groups)
    metrics = _mean_dicts(metrics_per_round[:1])  # the first round is an unbiased sample
    for phase in ("time/sample", "time/reward"):  # ... but time is spent in every round
        metrics[phase] = float(sum(m[phase] for m in metrics_per_round))
    metrics.update({"batch/rounds": float(len(rounds)), "batch/informative_groups": float(kept),
                    "batch/informative_frac": kept / wanted})
    return chosen, metrics


def _mean_dicts(dicts: list[dict]) -> dict:
    keys = dicts[0].keys()
    return {k: float(np.mean([d[k] for d in dicts if k in d])) for k in keys}


# ------------------------------------------------------------------------------------ update


def _on_mesh(ctx: RunContext, x: np.ndarray) -> jax.Array:
    axes = ("batch",) + (None,) * (x.ndim - 1)
    return distributed.to_global(x, named_sharding(ctx.mesh, axes, x.shape))


def prepare_batch(ctx: RunContext, params, rollout: batch_lib.RolloutBatch,
                  plan: list[np.ndarray]) -> tuple[dict, dict]:
    """Device arrays of the whole step batch: advantages, old log-probs, reference log-probs
    for a KL term; and what the scoring forward measured of the entropy before the updates.

    The first update of `plan` (`mini_batch_rows`) runs the rollout policy itself, so with
    old_logprobs auto its rows need no scoring forward: their old log-probs and entropy come
    from its gradient pass (`MiniBatch.old_logp_bt` None, `combined_entropy_before`).
    """
    t = ctx.config.train
    tokens = _on_mesh(ctx, rollout.tokens)
    attention = _on_mesh(ctx, rollout.attention_mask.astype(np.int32))
    response = _on_mesh(ctx, rollout.response_mask.astype(np.float32))
    rewards = jnp.asarray(rollout.rewards)
    adv = advantages_lib.compute_advantages(rewards, response, ctx.config.algo)
    arrays = {"tokens_bt": tokens, "attention_mask_bt": attention, "response_mask_bt": response,
              "advantages_bt": adv}
    metrics = {"adv/abs_mean": masked_mean(jnp.abs(adv), response)}
    if t.old_logprobs == "sampler":
        arrays["old_logp_bt"] = _on_mesh(ctx, rollout.sampler_logp)
    rows = scored_rows(ctx.config, len(rollout.rewards), plan)
    if rows.size:
        whole = rows.size == len(rollout.rewards)
        sub = {"tokens_bt": tokens, "attention_mask_bt": attention, "response_mask_bt": response,
               "sampler_logp_bt": _on_mesh(ctx, rollout.sampler_logp)}
        sub = sub if whole else _take_rows(sub, rows, ctx.mesh)
        logp, entropy = ctx.score_fn(params, sub["tokens_bt"], sub["attention_mask_bt"])
        if "old_logp_bt" not in arrays:  # the first update's rows stay 0: it ignores them
            arrays["old_logp_bt"] = logp if whole else _put_rows(jnp.zeros_like(adv), rows,
                                                                 logp, ctx.mesh)
        mask = sub["response_mask_bt"]
        metrics["rollout/sampler_logp_gap"] = masked_mean(
            jnp.abs(sub["sampler_logp_bt"] - logp), mask)
        metrics.update({"rollout/entropy": masked_mean(entropy, mask)} if whole else
                       {"scored/entropy_sum": jnp.sum(entropy * mask),
                        "scored/tokens": jnp.sum(mask)})
    if ctx.ref_params is not None:
        arrays["ref_logp_bt"] = ctx.score_fn(ctx.ref_params, tokens, attention)[0]
    return arrays, metrics


def first_update_takes_old_logprobs(config: ExperimentConfig) -> bool:
    """Whether the step's first update takes its old log-probs from its gradient pass (with
    several epochs its rows come back later, and need them scored)."""
    return config.train.old_logprobs == "auto" and config.train.ppo_epochs == 1


def scored_rows(config: ExperimentConfig, rows: int, plan: list[np.ndarray]) -> np.ndarray:
    """Rows the scoring forward runs on: all of them for recomputed old log-probs, else those
    outside the first update (whose gradient pass measures its own)."""
    t = config.train
    if t.old_logprobs == "recompute" or (t.old_logprobs == "auto" and t.ppo_epochs > 1):
        return np.arange(rows)
    return np.setdiff1d(np.arange(rows), plan[0])


def combined_entropy_before(prep_metrics: dict, first_update: dict) -> float:
    """The step batch's mean response-token entropy before the updates: the scored rows' and
    the first update's (its gradient pass sees the same policy), weighted by their tokens."""
    scored_sum = float(prep_metrics.pop("scored/entropy_sum", 0.0))
    scored_tokens = float(prep_metrics.pop("scored/tokens", 0.0))
    first_tokens = float(first_update["batch/valid_tokens"])
    total = float(first_update["actor/entropy"]) * first_tokens + scored_sum
    return total / max(first_tokens + scored_tokens, 1.0)


def mini_batch_rows(ctx: RunContext, key) -> list[np.ndarray]:
    """Rows of each update of the step: whole groups, in a seeded order per epoch."""
    t, n = ctx.config.train, ctx.config.algo.group_size
    plan = []
    for epoch in range(t.ppo_epochs):
        order = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch),
                                                  t.prompts_per_step))
        for start in range(0, t.prompts_per_step, t.mini_batch_prompts):
            plan.append(np.concatenate([np.arange(g * n, (g + 1) * n)
                                        for g in order[start:start + t.mini_batch_prompts]]))
    return plan


def _mini_batches(ctx: RunContext, arrays: dict, plan: list[np.ndarray]) -> list[MiniBatch]:
    on_policy_first = first_update_takes_old_logprobs(ctx.config)
    batches = []
    for i, rows in enumerate(plan):
        mini = MiniBatch(**{"old_logp_bt": None, **_take_rows(arrays, rows, ctx.mesh)})
        batches.append(mini.replace(old_logp_bt=None) if i == 0 and on_policy_first else mini)
    return batches


@functools.partial(jax.jit, static_argnames=("mesh",))
def _put_rows(full, rows, values, mesh):
    """`full` with `values` written at `rows` (the inverse of `_take_rows`)."""
    return constrain(full.at[rows].set(values), mesh, ("batch", None))


@functools.partial(jax.jit, static_argnames=("mesh",))
def _take_rows(arrays: dict, rows, mesh) -> dict:
    """The given rows of every [B, ...] array, split over the batch axes again: one program,
    on device (so also across hosts), nothing through host memory."""
    return {k: constrain(jnp.take(x, rows, axis=0), mesh, ("batch",) + (None,) * (x.ndim - 1))
            for k, x in arrays.items()}


def run_updates(ctx: RunContext, state: dict, arrays: dict, plan: list[np.ndarray],
                key) -> tuple[dict, dict, dict]:
    """All mini-batch updates of one step: the new state, the metrics (averaged; predicted dH
    summed) and the first update's own metrics."""
    params, opt_state = state["params"], state["opt_state"]
    update_count = int(state["step"]) * ctx.config.train.updates_per_step
    per_update = []
    for i, mini in enumerate(_mini_batches(ctx, arrays, plan)):
        lr = jnp.float32(ctx.schedule(update_count + i))
        params, opt_state, metrics = ctx.update_fn(params, opt_state, mini,
                                                   jax.random.fold_in(key, 100 + i), lr)
        per_update.append(jax.device_get(metrics))
    metrics = _mean_dicts(per_update)
    metrics["entropy/pred_dH"] = float(sum(m.get("cov/pred_dH", 0.0) for m in per_update))
    metrics["optim/lr_sum"] = float(sum(ctx.schedule(update_count + i)
                                        for i in range(len(per_update))))
    metrics["actor/nonfinite"] = float(sum(m["actor/nonfinite"] for m in per_update))
    metrics["optim/lr"] = float(ctx.schedule(update_count))
    return {**state, "params": params, "opt_state": opt_state}, metrics, per_update[0]


# --------------------------------------------------------------------------------- one step


@jax.jit
def _copy_tree(tree):
    """A copy in new buffers, one program for the whole tree (the original is donated next)."""
    return jax.tree.map(jnp.copy, tree)


def rl_step(ctx: RunContext, state: dict) -> tuple[dict, dict]:
    """One full RL step; returns the new state and the step's metrics."""
    step = int(state["step"])
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    times = {}
    t0 = time.perf_counter()
    rollout, metrics = collect_rollouts(ctx, state["params"], jax.random.fold_in(key, 0))
    times["time/rollout"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    plan = mini_batch_rows(ctx, jax.random.fold_in(key, 1))
    arrays, prep_metrics = prepare_batch(ctx, state["params"], rollout, plan)
    jax.block_until_ready(arrays)
    times["time/logprobs"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    # The updates donate the params; the instrument compares the logits before and after.
    params_before = _copy_tree(state["params"]) if ctx.entropy_fn else None
    new_state, update_metrics, first_update = run_updates(ctx, state, arrays, plan, key)
    times["time/update"] = time.perf_counter() - t2
    prep_metrics = jax.device_get(prep_metrics)
    if "rollout/entropy" not in prep_metrics:  # not every row was scored
        prep_metrics["rollout/entropy"] = combined_entropy_before(prep_metrics, first_update)
    t3 = time.perf_counter()
    metrics.update(entropy_metrics(ctx, step + 1, params_before, new_state["params"], arrays,
                                   float(prep_metrics["rollout/entropy"]),
                                   update_metrics["optim/lr_sum"], jax.random.fold_in(key, 2)))
    times["time/entropy"] = time.perf_counter() - t3
    metrics.update({k: float(v) for k, v in prep_metrics.items()})
    metrics.update(update_metrics)
    metrics.update(_response_metrics(rollout))
    metrics.update(compiles.metrics())
    times["time/step"] = time.perf_counter() - t0
    metrics.update(times)
    metrics["throughput/gen_tokens_per_s"] = float(rollout.response_lengths.sum()) / max(
        times["time/rollout"], 1e-9)
    return {**new_state, "step": state["step"] + 1}, metrics


def entropy_metrics(ctx: RunContext, step: int, params_before, params_after, arrays: dict,
                    before: float, lr_sum: float, key) -> dict:
    """The entropy after the step's updates and its change; with the instrument on
    (`params_before` given), `jaxcov.instrument`'s metrics on its rows."""
    if params_before is None:
        _, entropy_after = ctx.score_fn(params_after, arrays["tokens_bt"],
                                        arrays["attention_mask_bt"])
        after = float(masked_mean(entropy_after, arrays["response_mask_bt"]))
        return {"entropy/before": before, "entropy/after": after,
                "entropy/measured_dH": after - before}
    rows = instrument.instrument_rows(arrays["tokens_bt"].shape[0],
                                      ctx.config.train.entropy_rows, jax.random.fold_in(key, 0))
    names = ("tokens_bt", "attention_mask_bt", "response_mask_bt", "old_logp_bt",
             "advantages_bt")
    sub = {k: arrays[k] for k in names if k in arrays}
    sub = sub if rows is None else _take_rows(sub, rows, ctx.mesh)
    if first_update_takes_old_logprobs(ctx.config):  # not all scored: score the instrument's rows
        sub["old_logp_bt"] = ctx.score_fn(params_before, sub["tokens_bt"],
                                          sub["attention_mask_bt"])[0]
    change = ctx.entropy_fn(params_before, params_after, sub["tokens_bt"],
                            sub["attention_mask_bt"])
    metrics, sample = jax.device_get(instrument.entropy_change_metrics(
        change, sub["old_logp_bt"], sub["advantages_bt"], sub["response_mask_bt"],
        jax.random.fold_in(key, 1), jnp.float32(lr_sum), algo=ctx.config.algo))
    if distributed.is_main_process():
        instrument.append_token_sample(ctx.config.train.run_dir, step, sample)
    return {k: float(v) for k, v in metrics.items()}


def _response_metrics(rollout: batch_lib.RolloutBatch) -> dict:
    lengths = rollout.response_lengths
    return {"response/length_mean": float(lengths.mean()), "response/length_max": float(lengths.max()),
            "response/truncated_frac": float(1.0 - rollout.stopped.mean()),
            "reward/step_batch_mean": float(rollout.rewards.mean())}


# ---------------------------------------------------------------------------------- the loop


class StopSignal:
    """Turns SIGTERM / SIGINT into a flag the loop checks between steps (preemption-safe)."""

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}

    def __enter__(self) -> "StopSignal":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _save(checkpointer: Checkpointer, ctx: RunContext, state: dict, meta: dict) -> None:
    meta = {**meta, "data": ctx.data.state_dict()}
    checkpointer.save(int(state["step"]), state, meta)


def restore_or_init(ctx: RunContext, checkpointer: Checkpointer) -> tuple[dict, dict]:
    """The newest checkpoint of the run directory that restores, or a fresh state."""
    step, state, meta = checkpointer.restore_newest(initial_state(ctx))
    if step is None:
        return state, {"bad_steps": 0}
    ctx.data.load_state_dict(meta["data"])
    distributed.log(f"jaxcov: resumed from step {step} in {ctx.config.train.run_dir}")
    return state, meta


def maybe_evaluate(ctx: RunContext, state: dict, step: int, final: bool) -> dict:
    t = ctx.config.train
    due = t.eval_every and (step % t.eval_every == 0 or final)
    if ctx.eval_data is None or not due:
        return {}
    when = "before training" if step == 0 else f"after step {step}"
    greedy = "greedy and " if t.eval_greedy else ""
    say(ctx.config, f"evaluating {_eval_size(ctx)} held-out prompts {when} ({greedy}"
                    f"{t.eval_samples} samples each)")
    start = time.perf_counter()
    metrics = evaluate(ctx.model, state["params"], ctx.eval_data, ctx.config,
                       jax.random.fold_in(ctx.base_key, 10**6 + step), ctx.prompt_width)
    metrics["time/eval"] = time.perf_counter() - start
    shown = ", ".join(f"{k[len('eval/'):]} {v:.3f}" for k, v in metrics.items()
                      if k.startswith(("eval/greedy_acc", "eval/avg@")) and not k.endswith("_se"))
    say(ctx.config, f"held-out {when}: {shown} ({metrics['time/eval']:.0f} s)")
    return metrics


def _eval_size(ctx: RunContext) -> int:
    n = len(ctx.eval_data.examples)
    return min(n, ctx.config.train.eval_examples) if ctx.config.train.eval_examples else n


def _progress(ctx: RunContext, start_step: int):
    if not ctx.config.train.progress or not distributed.is_main_process():
        return None
    from tqdm import tqdm

    return tqdm(total=ctx.config.train.steps, initial=start_step, desc="train", dynamic_ncols=True,
                file=sys.stderr)


def _nonfinite_metrics(metrics: dict) -> list[str]:
    """The logged numbers of a step that are NaN or infinite: parameters that are finite but
    absurd (5e29) still give a NaN entropy after the update."""
    return sorted(k for k, v in metrics.items()
                  if isinstance(v, float) and not math.isfinite(v))


def _judge_step(metrics: dict, meta: dict, limit: int, step: int, checkpointer) -> bool:
    """Whether the step was good (its state may be checkpointed); counts bad steps in a row and
    stops the run at `limit` of them, naming the checkpoint that holds the last good state."""
    nonfinite = _nonfinite_metrics(metrics)
    bad = bool(metrics["actor/nonfinite"] or nonfinite)
    meta["bad_steps"] = meta.get("bad_steps", 0) + 1 if bad else 0
    if meta["bad_steps"] < limit:
        return not bad
    what = (f"non-finite {', '.join(nonfinite[:3])}" if nonfinite else
            "a non-finite loss, gradient or parameter update")
    checkpointer.wait()  # a save still in flight may be the last good one
    good = checkpointer.latest_good_step()
    kept = (f"checkpoint {good} in {checkpointer.directory} holds the last good state"
            if good is not None else "no good state was checkpointed before them")
    raise TrainingStopped(f"{meta['bad_steps']} steps in a row were non-finite (last: step "
                          f"{step}, {what}); stopped. {kept[0].upper()}{kept[1:]}.")


def _sink(ctx: RunContext, step: int) -> MetricsSink:
    """Metric writers; in a multi-process run only process 0 has any."""
    t = ctx.config.train
    if not distributed.is_main_process():
        return MetricsSink([])
    return make_sink(t.run_dir, step if step else None, t.tensorboard, t.wandb_project or None,
                     to_dict(ctx.config))


def _stop_requested(stop: StopSignal) -> bool:
    """A signal reached any process (all of them must stop at the same step)."""
    return distributed.any_process(stop.received is not None)


# Steps (of this process) in which the training programs may compile: the first rollouts
# meet the prompt buckets; a program compiled after them gets a warning.
WARMUP_STEPS = 3


def _watched_step(ctx: RunContext, state: dict, warm: bool, evaluated: bool):
    """`rl_step` and the eval due after it, each warning about any program it compiles once
    the run is warm (training: past WARMUP_STEPS; eval: an eval already ran in this process)."""
    step = int(state["step"]) + 1
    with compiles.warn_if_compiled(f"step {step}", late=warm):
        state, metrics = rl_step(ctx, state)
    with compiles.warn_if_compiled(f"the eval at step {step}", late=evaluated):
        metrics.update(maybe_evaluate(ctx, state, step, final=step == ctx.config.train.steps))
    return state, metrics


def train_loop(ctx: RunContext, checkpointer: Checkpointer, stop: StopSignal) -> dict:
    t = ctx.config.train
    state, meta = restore_or_init(ctx, checkpointer)
    step = int(state["step"])
    sink = _sink(ctx, step)
    bar = None
    try:
        start, evaluated = step, False
        if step == 0:
            metrics = maybe_evaluate(ctx, state, 0, final=False)
            sink.write(0, metrics)
            evaluated = bool(metrics)
        if step < t.steps:
            say(ctx.config, f"training steps {step + 1}-{t.steps}; the first compiles (or loads) "
                            "the rollout, scoring and update programs")
        bar = _progress(ctx, step)
        while step < t.steps and not _stop_requested(stop):
            state, metrics = _watched_step(ctx, state, step - start >= WARMUP_STEPS, evaluated)
            step = int(state["step"])
            evaluated = evaluated or "time/eval" in metrics
            sink.write(step, metrics)
            good = _judge_step(metrics, meta, t.max_bad_steps, step, checkpointer)
            if good and (step == t.steps or
                         (t.checkpoint_every and step % t.checkpoint_every == 0)):
                _save(checkpointer, ctx, state, meta)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}",
                                entropy=f"{metrics['rollout/entropy']:.3f}")
        if step < t.steps:  # stopped by a signal
            reason = (f"signal {stop.received}" if stop.received is not None
                      else "another process got a stop signal")
            if meta.get("bad_steps", 0):  # a bad state is never saved; resume from the last good
                distributed.log(f"jaxcov: {reason}: step {step} was non-finite, not saved; exiting")
            else:
                _save(checkpointer, ctx, state, meta)
                distributed.log(f"jaxcov: {reason}: saved step {step}, exiting")
    finally:
        if bar is not None:
            bar.close()
        sink.close()
    return state


def finish_run(ctx: RunContext, state: dict) -> None:
    """Summary table, plots, and the optional HF export, at the end of a completed run (written
    by process 0; every process takes part in gathering the parameters for the export)."""
    main = distributed.is_main_process()
    if main:
        records = read_metrics(os.path.join(ctx.config.train.run_dir, METRICS_FILE))
        print(summary_table([r for r in records if r["step"] > 0]))
        held_out = eval_summary(records)
        if held_out:
            print(held_out)
        plots = write_plots(ctx.config.train.run_dir, records)
        if plots:
            print("plots: " + ", ".join(plots))
    if ctx.config.train.export_hf:
        from jaxcov.models.loading import export_hf

        params = state["params"]
        if jax.process_count() > 1:  # export_hf reads whole leaves: every process helps gather
            params = distributed.tree_to_host(params)
        if main:
            out = os.path.join(ctx.config.train.run_dir, "hf")
            export_hf(out, params, ctx.model.config, ctx.model.tokenizer)
            print(f"exported the policy to {out}")


def say(config: ExperimentConfig, message: str) -> None:
    """What the run is doing, on stderr, where a progress bar would sit still (train.progress)."""
    if config.train.progress and distributed.is_main_process():
        from tqdm import tqdm

        tqdm.write(f"jaxcov: {message}", file=sys.stderr)  # clears and redraws a live bar


def loaded_context(config: ExperimentConfig) -> RunContext:
    """`build_context`, saying what it loads and what it got."""
    say(config, f"loading the model {config.model.name} and the data {config.data.source}")
    start = time.perf_counter()
    ctx = build_context(config)
    size = sum(x.size for x in jax.tree.leaves(ctx.model.params))
    held_out = f", {len(ctx.eval_data.examples)} held out" if ctx.eval_data else ""
    say(config, f"loaded in {time.perf_counter() - start:.0f} s: {size / 1e6:.1f}M parameters, "
                f"{len(ctx.data.dataset.examples)} training prompts{held_out}")
    return ctx


def train(config: ExperimentConfig) -> int:
    """Runs (or resumes) the experiment; returns the process exit status."""
    rundir.check_run_directories(config)  # one error line before minutes of loading
    with rundir.run_directory_lock(config.train.run_dir):
        rundir.write_run_config(config)
        ctx = loaded_context(config)
        checkpointer = Checkpointer(config.train.checkpoints, keep=config.train.keep_checkpoints)
        try:
            with StopSignal() as stop:
                state = train_loop(ctx, checkpointer, stop)
            if int(state["step"]) >= config.train.steps:
                finish_run(ctx, state)
            return 0
        except (TrainingStopped, CheckpointSaveError) as e:
            distributed.log(f"jaxcov: error: {e}")
            return 1
        finally:
            checkpointer.close()
            close_scorers()


def train_command(args) -> int:
    config = load_config(args.config, args.overrides)
    compiles.enable_persistent_cache()  # a resumed run loads its programs instead
    distributed.maybe_initialize()  # before anything touches a device
    code = train(config)
    exit_abandoning_failed_saves(code)  # a failed save's threads would block the exit forever
    return code


def eval_checkpoint(checkpoint_arg: str, config: ExperimentConfig
                    ) -> tuple[Optional[Checkpointer], Optional[int]]:
    """The checkpointer and step `jaxcov eval` restores: the latest of the run directory
    `--checkpoint` names, which must hold one (evaluating the model instead would hide a typo),
    else the latest of the config's own run, else (None, None): the model itself is evaluated."""
    directory = (os.path.join(checkpoint_arg, "checkpoints") if checkpoint_arg
                 else config.train.checkpoints)
    if "://" not in directory and not os.path.isdir(directory):
        if checkpoint_arg:
            raise ConfigError(_no_checkpoint_in(checkpoint_arg))
        return None, None
    checkpointer = Checkpointer(directory, keep=config.train.keep_checkpoints)
    step = checkpointer.latest_step()
    if step is None and checkpoint_arg:
        checkpointer.close()
        raise ConfigError(_no_checkpoint_in(checkpoint_arg))
    return checkpointer, step


def _no_checkpoint_in(path: str) -> str:
    if "://" not in path and not os.path.exists(path):
        return f"--checkpoint {path}: no such directory"
    return (f"--checkpoint {path}: no checkpoint there (expected a run directory holding "
            "checkpoints/<step>)")


def eval_command(args) -> int:
    """`jaxcov eval`: the held-out metrics of a run's latest checkpoint (or of the model)."""
    config = load_config(args.config, args.overrides)
    if config.data.eval_size == 0 and not config.data.eval_source:
        raise ConfigError("eval needs a held-out split: set data.eval_size or data.eval_source")
    compiles.enable_persistent_cache()
    distributed.maybe_initialize()  # before anything touches a device
    checkpointer, step = eval_checkpoint(args.checkpoint, config)  # before the model loads
    try:
        ctx = build_context(config)
        state = initial_state(ctx)
        if step is not None:
            state, _ = checkpointer.restore(step, state)
    finally:
        if checkpointer is not None:
            checkpointer.close()
    if distributed.is_main_process():
        run_dir = args.checkpoint or config.train.run_dir
        print(f"evaluating step {step} of {run_dir}" if step is not None else
              f"evaluating the model {config.model.name} itself (no checkpoint in {run_dir})")
    metrics = evaluate(ctx.model, state["params"], ctx.eval_data, config,
                       jax.random.fold_in(ctx.base_key, 10**6), ctx.prompt_width)
    close_scorers()
    if distributed.is_main_process():
        for key, value in metrics.items():
            print(f"{key:20} {value:.4f}" if isinstance(value, float) else f"{key:20} {value}")
    return 0
