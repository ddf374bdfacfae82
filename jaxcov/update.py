"""The policy update of one optimizer mini-batch, as one jittable function.

    update = make_update_fn(logprob_fn, optimizer, algo, micro_batch_size, mesh)
    params, opt_state, metrics = update(params, opt_state, batch, key, learning_rate)

Steps, all inside one jit:
1. Selection pass, only for Clip-Cov / KL-Cov with more than one micro-batch: log-probs and
   entropies of the current parameters for the whole mini-batch (forward only, micro-batch by
   micro-batch with `lax.map` to bound memory), then `losses.select_tokens` on all of its tokens
   at once: covariance statistics, the Clip-Cov random pick or the KL-Cov top-k.
2. Gradient pass: `lax.scan` over micro-batches; each computes its loss with the mini-batch-wide
   token/sequence counts (and the selection of step 1), so its gradient is its exact share of the
   mini-batch gradient. Gradients and (additive) loss metrics are summed in float32. Without a
   selection pass (one micro-batch, or ppo_clip), the selection runs inside the gradient pass on
   stop_gradient log-probs, and the covariance statistics come from the log-probs it computed:
   no extra forward.
3. One optax update.
Because selection and normalisers are mini-batch-wide, the result does not depend on the
micro-batch size or on how the batch is sharded over devices (tests/test_update.py checks both).

The model enters only through `logprob_fn(params, tokens_bt, attention_mask_bt) ->
(logp_bt, entropy_bt)`: both [B, T] float32, index t scoring token t given tokens < t (index 0
unused), e.g. `lambda p, t, m: token_logprobs(p, cfg, t, m, mesh=mesh)` with
`jaxcov.models.logprobs.token_logprobs` (what `jaxcov.trainer.logprob_function` builds).

Metrics: those of `losses.select_tokens` and `losses.total_loss` (table in losses.py), plus
`actor/grad_norm` (global norm of the summed gradient, before any clipping in the optimizer).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from jaxcov import compiles
from jaxcov.config import AlgoConfig
from jaxcov.losses import (TOKEN_SELECTORS, TokenSelection, loss_inputs, mini_batch_counts,
                           select_nothing, select_tokens, selection_metrics, total_loss)
from jaxcov.sharding import constrain

Array = jax.Array
Params = Any
LogprobFn = Callable[[Params, Array, Array], tuple[Array, Array]]


@struct.dataclass
class MiniBatch:
    """One optimizer mini-batch; every field is [B, T] with B = rows of the mini-batch."""

    tokens_bt: Array            # int32 prompt + response ids
    attention_mask_bt: Array    # 1 on real tokens (prompt and response), 0 on padding
    response_mask_bt: Array     # 1 on response tokens that get a loss
    # Log-probs of the policy that produced the rollout; None when that is the policy being
    # updated (one update per step): the gradient pass's own log-probs are then the old ones.
    old_logp_bt: Optional[Array]
    advantages_bt: Array
    ref_logp_bt: Optional[Array] = None  # reference-policy log-probs (ref KL term / metric)


def split_micro_batches(tree: Any, num_micro: int, mesh: Optional[Mesh] = None) -> Any:
    """[B, ...] -> [M, B/M, ...], micro-batch m holding rows m, m + M, m + 2M, ...

    Strided rather than contiguous rows: with B split over devices in contiguous blocks, every
    micro-batch then has rows on every device, so no device idles during accumulation.
    """
    def split(x):
        micro_size = x.shape[0] // num_micro
        x = x.reshape(micro_size, num_micro, *x.shape[1:]).swapaxes(0, 1)
        return constrain(x, mesh, (None, "batch") + (None,) * (x.ndim - 2))
    return jax.tree.map(split, tree)


def merge_micro_batches(tree: Any) -> Any:
    """Inverse of `split_micro_batches`: [M, B/M, ...] -> [B, ...] in the original row order."""
    def merge(x):
        return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    return jax.tree.map(merge, tree)


def needs_selection_pass(algo: AlgoConfig, num_micro: int) -> bool:
    """Clip-Cov and KL-Cov choose tokens from the current log-probs of the WHOLE mini-batch. With
    one micro-batch the gradient pass sees all of them, so the choice is made inside it (on
    stop_gradient log-probs) and costs no extra forward; only accumulation needs a separate pass.
    """
    return TOKEN_SELECTORS[algo.policy_loss] is not select_nothing and num_micro > 1


def _current_logprobs(logprob_fn: LogprobFn, params: Params, micro: MiniBatch):
    """Forward-only log-probs and entropies for all micro-batches, merged back to [B, T]."""
    forward = lambda m: logprob_fn(params, m.tokens_bt, m.attention_mask_bt)  # noqa: E731
    return merge_micro_batches(jax.lax.map(forward, micro))


def _old_logprobs(batch: MiniBatch, logp_bt) -> Array:
    """The rollout policy's log-probs: given, or (on-policy) the current ones without gradient,
    so the ratio is exactly 1 and KL-Cov's |logp - old| exactly 0."""
    return jax.lax.stop_gradient(logp_bt) if batch.old_logp_bt is None else batch.old_logp_bt


def _loss_of(batch: MiniBatch, logp_bt, entropy_bt, selected_bt, counts: dict, algo: AlgoConfig):
    selection = TokenSelection(selected_bt=selected_bt, **counts, metrics={})
    x = loss_inputs(logp_bt, _old_logprobs(batch, logp_bt), batch.advantages_bt,
                    batch.response_mask_bt,
                    selection, entropy_bt if algo.entropy_coef > 0 else None, batch.ref_logp_bt)
    return total_loss(x, algo)


def _preselected_micro_loss(params, micro, counts, logprob_fn, algo):
    """Loss of one micro-batch with the tokens chosen by the selection pass."""
    batch, selected_bt = micro
    logp_bt, entropy_bt = logprob_fn(params, batch.tokens_bt, batch.attention_mask_bt)
    loss, metrics = _loss_of(batch, logp_bt, entropy_bt, selected_bt, counts, algo)
    return loss, (metrics, ())


def _self_selecting_micro_loss(params, batch, counts, key, logprob_fn, algo):
    """Loss of one micro-batch that selects its own tokens (valid when it is the whole
    mini-batch, or when the loss selects nothing); also returns its log-probs and entropies."""
    logp_bt, entropy_bt = logprob_fn(params, batch.tokens_bt, batch.attention_mask_bt)
    selector = TOKEN_SELECTORS[algo.policy_loss]
    selected_bt, selector_metrics = selector(jax.lax.stop_gradient(logp_bt),
                                             _old_logprobs(batch, logp_bt), batch.advantages_bt,
                                             batch.response_mask_bt, key, algo)
    loss, metrics = _loss_of(batch, logp_bt, entropy_bt, selected_bt, counts, algo)
    return loss, ({**metrics, **selector_metrics}, jax.lax.stop_gradient((logp_bt, entropy_bt)))


def _accumulate_gradients(params, micro, micro_loss):
    """Sum over micro-batches of gradients (float32) and of the additive loss metrics, plus the
    stacked per-micro-batch outputs. `micro_loss(params, xs) -> (loss, (metrics, outputs))`."""
    grad_fn = jax.grad(micro_loss, has_aux=True)

    def step(grads_acc, xs):
        grads, (metrics, outputs) = grad_fn(params, xs)
        grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
        return grads_acc, (metrics, outputs)

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    grads, (metrics_m, outputs_m) = jax.lax.scan(step, zeros, micro)
    return grads, jax.tree.map(lambda m: jnp.sum(m, axis=0), metrics_m), outputs_m


def _two_pass_gradients(params, batch, micro, key, learning_rate, counts, logprob_fn, algo,
                        mesh):
    """Selection pass over the whole mini-batch, then micro-batch gradients that reuse it."""
    logp_bt, entropy_bt = _current_logprobs(logprob_fn, params, micro)
    selection = select_tokens(logp_bt, _old_logprobs(batch, logp_bt), batch.advantages_bt,
                              batch.response_mask_bt, key, algo, entropy_bt, learning_rate)
    num_micro = micro.tokens_bt.shape[0]
    micro_selected = split_micro_batches(selection.selected_bt, num_micro, mesh)
    loss_fn = functools.partial(_preselected_micro_loss, counts=counts, logprob_fn=logprob_fn,
                                algo=algo)
    grads, loss_metrics, _ = _accumulate_gradients(params, (micro, micro_selected), loss_fn)
    return grads, {**selection.metrics, **loss_metrics}


def _one_pass_gradients(params, batch, micro, key, learning_rate, counts, logprob_fn, algo):
    """Micro-batch gradients that select as they go; the mini-batch covariance statistics come
    from the log-probs the gradient pass computed anyway."""
    loss_fn = functools.partial(_self_selecting_micro_loss, counts=counts, key=key,
                                logprob_fn=logprob_fn, algo=algo)
    grads, loss_metrics, outputs_m = _accumulate_gradients(params, micro, loss_fn)
    logp_bt, entropy_bt = merge_micro_batches(outputs_m)
    stats = selection_metrics(logp_bt, batch.advantages_bt, batch.response_mask_bt, counts,
                              entropy_bt, learning_rate)
    return grads, {**stats, **loss_metrics}


def update_policy(params: Params, opt_state: optax.OptState, batch: MiniBatch, key: Array,
                  learning_rate: Optional[Array | float] = None, *, logprob_fn: LogprobFn,
                  optimizer: optax.GradientTransformation, algo: AlgoConfig,
                  micro_batch_size: int, mesh: Optional[Mesh] = None):
    """One optimizer step on one mini-batch; returns (params, opt_state, metrics).

    Args:
      params, opt_state: policy parameters and optimizer state (donate them when jitting).
      batch: the mini-batch; its rows must be a multiple of `micro_batch_size`.
      key: randomness of the Clip-Cov pick (fold the step in upstream).
      learning_rate: only for the `cov/pred_dH` metric; None leaves that metric out.
      logprob_fn, optimizer, algo, micro_batch_size, mesh: static; `mesh` adds sharding
        constraints on the micro-batch split (batch rows over the logical `batch` axis).
    """
    rows = batch.tokens_bt.shape[0]
    if rows % micro_batch_size:
        raise ValueError(f"mini-batch of {rows} rows is not a multiple of micro_batch_size "
                         f"{micro_batch_size}")
    num_micro = rows // micro_batch_size
    micro = split_micro_batches(batch, num_micro, mesh)
    counts = mini_batch_counts(batch.response_mask_bt, algo)
    if needs_selection_pass(algo, num_micro):
        grads, metrics = _two_pass_gradients(params, batch, micro, key, learning_rate, counts,
                                             logprob_fn, algo, mesh)
    else:
        grads, metrics = _one_pass_gradients(params, batch, micro, key, learning_rate, counts,
                                             logprob_fn, algo)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {**metrics, "actor/grad_norm": optax.tree.norm(grads)}


def guarded_update(params: Params, opt_state: optax.OptState, batch: MiniBatch, key: Array,
                   learning_rate: Optional[Array | float] = None, **static):
    """`update_policy`, keeping the old params and optimizer state when the loss, the gradient
    norm or any updated parameter is non-finite (an absurd learning rate gives finite gradients
    and infinite parameters); `actor/nonfinite` is 1 for an update so refused."""
    new_params, new_opt_state, metrics = update_policy(params, opt_state, batch, key,
                                                       learning_rate, **static)
    finite = (jnp.isfinite(metrics["actor/grad_norm"]) & jnp.isfinite(metrics["actor/loss"])
              & _all_finite(new_params))
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    params = jax.tree.map(keep, new_params, params)
    opt_state = jax.tree.map(keep, new_opt_state, opt_state)
    return params, opt_state, {**metrics, "actor/nonfinite": 1.0 - finite.astype(jnp.float32)}


def _all_finite(tree) -> Array:
    return jax.tree.reduce(jnp.logical_and, jax.tree.map(lambda x: jnp.isfinite(x).all(), tree))


def _update_shape(params, opt_state, batch, *args) -> str:
    return f"tokens {list(batch.tokens_bt.shape)}"


def make_update_fn(logprob_fn: LogprobFn, optimizer: optax.GradientTransformation,
                   algo: AlgoConfig, micro_batch_size: int, mesh: Optional[Mesh] = None,
                   donate: bool = True, compiler_options: Optional[dict] = None):
    """`guarded_update` with its static arguments bound, jitted (the trainer's update program,
    counted by `jaxcov.compiles`), params and opt_state donated.

    Returns f(params, opt_state, batch, key, learning_rate=None) -> (params, opt_state, metrics).
    Shardings follow the inputs: pass params/opt_state in their shardings and the batch sharded
    over the batch axes.
    """
    update = functools.partial(guarded_update, logprob_fn=logprob_fn, optimizer=optimizer,
                               algo=algo, micro_batch_size=micro_batch_size, mesh=mesh)
    update = compiles.counted("update", update, _update_shape)
    return jax.jit(update, donate_argnums=(0, 1) if donate else (),
                   compiler_options=compiler_options)
