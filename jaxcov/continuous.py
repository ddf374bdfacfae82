"""The continuous rollout engine: R decode slots draw (prompt, sample) work items from a queue
until it is empty, so a rollout costs the tokens it generates, not its longest response times
its row count (`sampler.engine: continuous`; `jaxcov.sampler`'s static batch is the other).

One jitted program, no host round-trip:
  prefill  every prompt of the batch once (a shared prefix once), into a prompt cache [B, ...]
           and the logits at each prompt's last slot.
  loop     `lax.while_loop`, one token per busy slot per iteration:
           refill  free slots take the next items of their group's queue: the item's prompt
                   keys and values are copied from the prompt cache (all n samples of a prompt
                   copy the same prefilled rows) and its first logits are the prompt's;
           sample  one token per busy slot, from a key per (item, position): the tokens do not
                   depend on the slot count or on which slot an item lands in;
           record  into per-item buffers [W, N], prompt-major, so a prompt's rows come back
                   contiguous, as the trainer expects;
           decode  the drawn tokens through `models.decode.decode_step` at each item's own
                   rope position. The response slots of the cache are a ring: iteration t
                   writes every slot's token at response slot t mod N (one in-place update for
                   all rows); an item lasts at most N tokens, so it never meets its own start,
                   and attention follows the token positions, not the slot order.
On a mesh, slots and items split into one group per batch shard; a group fills its slots only
from its own prompts' items, so a refill never leaves the shard (each host schedules its own).

Dimension letters as in `jaxcov.sampler`, plus W work items (B * n), D groups, Q = C + P
prompt cache slots.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from jaxcov import compiles
from jaxcov.config import SamplerConfig
from jaxcov.models.decode import EMPTY, DecodeCache, decode_step, prefill
from jaxcov.sampling import Generated, SamplerStatic, is_stop, sample_tokens
from jaxcov.sharding import batch_size_multiple, constrain

# The loop's phases: all slots while the queue lasts, then half, then a quarter as items end.
# A phase is another copy of the decode step in the program (compile time), and the cheaper
# step pays off where a step costs about its rows (CPU) or its KV reads (long responses).
DRAIN_PHASES = 3


def slot_count(config: SamplerConfig, rows: int, mesh: Optional[Mesh]) -> int:
    """Decode slots for `rows` work items: `config.slots`, or with 0 one per row (a decode step
    pays a fixed cost, reading the weights, whatever its rows, so the fewest steps win; the
    drain phases then shed the rows that ended, bench/RESULTS.md), rounded up to a multiple of
    the batch shards and at most one per row."""
    groups = batch_size_multiple(mesh) if mesh is not None else 1
    slots = min(config.slots or rows, rows)
    return -(-slots // groups) * groups


@struct.dataclass
class PromptCache:
    """The prefilled prompts (loop invariants)."""

    k: tuple[jax.Array, ...]  # L x [B, K, Q, E]
    v: tuple[jax.Array, ...]
    positions_bq: jax.Array  # [B, Q] int32: rope position of each prompt slot (EMPTY: padding)
    logits_bv: jax.Array  # [B, V] fp32: logits of each prompt's first response token
    length_b: jax.Array  # [B] int32: prompt tokens (the rope position of the first response token)
    items_d: jax.Array  # [D] int32: real work items in each group's queue


@struct.dataclass
class Outputs:
    """Per work item, prompt-major."""

    tokens_wn: jax.Array
    sample_logp_wn: jax.Array
    policy_logp_wn: jax.Array
    length_w: jax.Array  # [W] int32, the stop token included
    stopped_w: jax.Array  # [W] bool


@struct.dataclass
class SlotState:
    """The while-loop carry."""

    item_r: jax.Array  # [R] int32: the slot's work item (global, prompt-major)
    prompt_r: jax.Array  # [R] int32: that item's prompt row
    length_r: jax.Array  # [R] int32: tokens of the item so far
    free_r: jax.Array  # [R] bool: the slot holds no unfinished item
    next_d: jax.Array  # [D] int32: each group's next unscheduled item (group-local index)
    logits_rv: jax.Array  # [R, V] fp32: what the slot's next token is drawn from
    cache: DecodeCache  # L x [R, K, Q + N, E]; `end` [R]
    out: Outputs
    steps: jax.Array  # [] int32: loop iterations
    slot_steps: jax.Array  # [] int32: slots x iterations, summed over the drain phases


def _group_take(x_b: jax.Array, local_r: jax.Array, groups: int) -> jax.Array:
    """Rows of x [B, ...] for each slot: slot r of group d takes row `local_r[r]` of group d's
    block of x (B // D rows), a gather that stays inside the group."""
    x_dg = x_b.reshape((groups, x_b.shape[0] // groups) + x_b.shape[1:])
    taken = jax.vmap(lambda x, i: x[i])(x_dg, local_r.reshape(groups, -1))
    return taken.reshape((local_r.shape[0],) + x_b.shape[1:])


def _refill(s: SlotState, prompts: PromptCache, static: SamplerStatic) -> SlotState:
    """Free slots take their group's next items: prompt KV, positions and first logits."""
    D, n = static.groups, static.n
    prompts_per_group = prompts.positions_bq.shape[0] // D
    free_dr = s.free_r.reshape(D, -1)
    local_dr = s.next_d[:, None] + jnp.cumsum(free_dr, axis=1) - 1
    take_dr = free_dr & (local_dr < prompts.items_d[:, None])
    take_r, local_r = take_dr.reshape(-1), local_dr.reshape(-1)
    local_prompt_r = jnp.minimum(local_r // n, prompts_per_group - 1)
    R = s.free_r.shape[0]
    group_r = jnp.arange(R) // (R // D)
    Q = prompts.positions_bq.shape[1]

    def fill(slot_rkse, prompt_bkqe):  # the prompt slots of the rows that take an item
        taken = _group_take(prompt_bkqe, local_prompt_r, D).astype(slot_rkse.dtype)
        region = jnp.where(take_r[:, None, None, None], taken, slot_rkse[:, :, :Q])
        return jax.lax.dynamic_update_slice(slot_rkse, region, (0, 0, 0, 0))

    # The taking rows' response slots hold the previous item's tokens: emptied.
    positions_rs = jnp.where(take_r[:, None], jnp.pad(
        _group_take(prompts.positions_bq, local_prompt_r, D), ((0, 0), (0, static.width)),
        constant_values=EMPTY), s.cache.positions_rs)
    cache = s.cache.replace(k=tuple(map(fill, s.cache.k, prompts.k)),
                            v=tuple(map(fill, s.cache.v, prompts.v)), positions_rs=positions_rs)
    taken_logits = _group_take(prompts.logits_bv, local_prompt_r, D)
    return s.replace(
        item_r=jnp.where(take_r, group_r * prompts_per_group * n + local_r, s.item_r),
        prompt_r=jnp.where(take_r, group_r * prompts_per_group + local_prompt_r, s.prompt_r),
        length_r=jnp.where(take_r, 0, s.length_r), free_r=s.free_r & ~take_r,
        next_d=s.next_d + jnp.sum(take_dr, axis=1, dtype=jnp.int32),
        logits_rv=jnp.where(take_r[:, None], taken_logits, s.logits_rv), cache=cache)


def _queue_left(s: SlotState, prompts: PromptCache, groups: int) -> jax.Array:
    """Whether some group has a free slot and an unscheduled item."""
    return jnp.any(jnp.any(s.free_r.reshape(groups, -1), axis=1) & (s.next_d < prompts.items_d))


def _record(s: SlotState, token_r, sample_logp_r, policy_logp_r, limit,
            static: SamplerStatic) -> SlotState:
    """Writes each busy slot's token into its item's row; a stop token or the length limit
    frees the slot."""
    busy_r = ~s.free_r
    W = s.out.length_w.shape[0]
    row_r, column_r = jnp.where(busy_r, s.item_r, W), s.length_r  # row W: dropped
    put = lambda buffer_wn, x_r: buffer_wn.at[row_r, column_r].set(  # noqa: E731
        x_r.astype(buffer_wn.dtype), mode="drop")
    stop_r = busy_r & is_stop(token_r, static.stop_ids)
    length_r = s.length_r + busy_r.astype(jnp.int32)
    out = Outputs(tokens_wn=put(s.out.tokens_wn, token_r),
                  sample_logp_wn=put(s.out.sample_logp_wn, sample_logp_r),
                  policy_logp_wn=put(s.out.policy_logp_wn, policy_logp_r),
                  length_w=s.out.length_w.at[row_r].set(length_r, mode="drop"),
                  stopped_w=s.out.stopped_w.at[row_r].set(stop_r, mode="drop"))
    return s.replace(length_r=length_r, free_r=s.free_r | stop_r | (length_r >= limit), out=out)


def _one_token(params, layers, prompts: PromptCache, key, limit, static: SamplerStatic,
               s: SlotState) -> SlotState:
    """Refill, sample, record, decode: one loop iteration."""
    s = jax.lax.cond(_queue_left(s, prompts, static.groups),
                     lambda s: _refill(s, prompts, static), lambda s: s, s)
    keys_r = jax.vmap(lambda item, t: jax.random.fold_in(jax.random.fold_in(key, item), t))(
        s.item_r, s.length_r)
    token_r, sample_logp_r, policy_logp_r = sample_tokens(s.logits_rv, keys_r, static.options)
    token_r = jnp.where(s.free_r, static.pad_id, token_r)
    s = _record(s, token_r, sample_logp_r, policy_logp_r, limit, static)
    # The drawn token's rope position is prompt length + its index (as in the static batch);
    # a slot that just finished feeds one token nobody reads.
    Q = prompts.positions_bq.shape[1]
    position_r = jnp.take(prompts.length_b, s.prompt_r) + jnp.maximum(s.length_r - 1, 0)
    ring_slot = Q + s.steps % static.width
    logits_rv, cache = decode_step(params, layers, static.cfg, token_r, position_r,
                                   s.cache.replace(end=ring_slot), static.mesh)
    return s.replace(logits_rv=logits_rv, cache=cache, steps=s.steps + 1,
                     slot_steps=s.slot_steps + token_r.shape[0])


def _initial_state(prompts: PromptCache, rows: int, static: SamplerStatic) -> SlotState:
    R, width, mesh = static.slots, static.width, static.mesh
    k0 = prompts.k[0]
    slot_shape = (R, k0.shape[1], k0.shape[2] + width, k0.shape[3])
    empty = lambda: constrain(jnp.zeros(slot_shape, k0.dtype), mesh, DecodeCache.AXES)  # noqa
    Q = prompts.positions_bq.shape[1]
    cache = DecodeCache(k=tuple(empty() for _ in prompts.k), v=tuple(empty() for _ in prompts.v),
                        positions_rs=jnp.full((R, Q + width), EMPTY, jnp.int32),
                        end=jnp.int32(Q), extent=jnp.int32(Q))
    per_item = lambda dtype, fill=0: jnp.full((rows, width), fill, dtype)  # noqa: E731
    out = Outputs(tokens_wn=per_item(jnp.int32, static.pad_id),
                  sample_logp_wn=per_item(jnp.float32), policy_logp_wn=per_item(jnp.float32),
                  length_w=jnp.zeros((rows,), jnp.int32), stopped_w=jnp.zeros((rows,), bool))
    return SlotState(item_r=jnp.full((R,), rows, jnp.int32), prompt_r=jnp.zeros((R,), jnp.int32),
                     length_r=jnp.zeros((R,), jnp.int32), free_r=jnp.ones((R,), bool),
                     next_d=jnp.zeros((static.groups,), jnp.int32),
                     logits_rv=jnp.zeros((R, prompts.logits_bv.shape[1]), jnp.float32),
                     cache=cache, out=out, steps=jnp.zeros((), jnp.int32),
                     slot_steps=jnp.zeros((), jnp.int32))


def drain_phases(slots: int, groups: int) -> tuple[int, ...]:
    """Slot counts of the loop's phases: `slots`, then halved (DRAIN_PHASES in all, each a
    multiple of `groups`) once the queue is empty and the live items fit the smaller count."""
    phases = [slots]
    while len(phases) < DRAIN_PHASES and phases[-1] // 2 % groups == 0 and phases[-1] // 2:
        phases.append(phases[-1] // 2)
    return tuple(phases)


def _live_d(s: SlotState, groups: int) -> jax.Array:
    return jnp.sum(~s.free_r.reshape(groups, -1), axis=1, dtype=jnp.int32)


def _compact(s: SlotState, slots: int, groups: int) -> SlotState:
    """The state with `slots` slots: each group keeps its live slots (at most slots / groups,
    the phase's entry condition), gathered inside the group; the per-item outputs stay put."""
    keep_dr = jnp.argsort(s.free_r.reshape(groups, -1), axis=1, stable=True)
    keep_r = keep_dr[:, :slots // groups].reshape(-1)
    take = lambda x: _group_take(x, keep_r, groups)  # noqa: E731
    cache = s.cache.replace(k=tuple(map(take, s.cache.k)), v=tuple(map(take, s.cache.v)),
                            positions_rs=take(s.cache.positions_rs))
    return s.replace(item_r=take(s.item_r), prompt_r=take(s.prompt_r),
                     length_r=take(s.length_r), free_r=take(s.free_r),
                     logits_rv=take(s.logits_rv), cache=cache)


def _prefill_prompts(params, layers, static: SamplerStatic, prefix_c, prompt_bp, mask_bp,
                     real_b) -> PromptCache:
    logits_bv, cache = prefill(params, layers, static.cfg, prefix_c, prompt_bp, mask_bp, 0,
                               static.mesh)
    real_prompts_d = jnp.sum(real_b.reshape(static.groups, -1), axis=1, dtype=jnp.int32)
    return PromptCache(k=cache.k, v=cache.v, positions_bq=cache.positions_rs,
                       logits_bv=logits_bv,
                       length_b=prefix_c.shape[0] + jnp.sum(mask_bp, axis=1, dtype=jnp.int32),
                       items_d=real_prompts_d * static.n)


@functools.partial(jax.jit, static_argnames=("static",))
def continuous_program(params_and_layers, prefix_c, prompt_bp, mask_bp, real_b, key,
                       max_new_tokens, static: SamplerStatic) -> Generated:
    """n samples of each real prompt through `static.slots` slots; arguments as the static
    program's (`jaxcov.sampler`), with B a multiple of the mesh's batch shards."""
    compiles.record("sampler", f"continuous, {static.slots} slots, prefix {prefix_c.shape[0]}, "
                               f"prompts {list(prompt_bp.shape)}, n {static.n}")
    params, layers = params_and_layers
    prompts = _prefill_prompts(params, layers, static, prefix_c, prompt_bp, mask_bp, real_b)
    rows = prompt_bp.shape[0] * static.n
    limit = jnp.minimum(max_new_tokens, static.width)
    step = functools.partial(_one_token, params, layers, prompts, key, limit, static)
    D = static.groups
    phases = drain_phases(static.slots, D)
    s = _initial_state(prompts, rows, static)
    for i, slots in enumerate(phases):
        if i:
            s = _compact(s, slots, D)
        # Leave for the next phase once the queue is empty and each group's live items fit it.
        fits = phases[i + 1] // D if i + 1 < len(phases) else -1

        def in_phase(s, fits=fits):
            queue_left = _queue_left(s, prompts, D)
            return (jnp.any(~s.free_r) | queue_left) & (queue_left | jnp.any(_live_d(s, D) > fits))
        s = jax.lax.while_loop(in_phase, step, s)
    on_rows = lambda x: constrain(x, static.mesh, ("batch",) + (None,) * (x.ndim - 1))  # noqa
    out = s.out
    return Generated(
        response_ids=on_rows(out.tokens_wn),
        response_mask=on_rows(jnp.arange(static.width)[None, :] < out.length_w[:, None]),
        sample_logprobs=on_rows(out.sample_logp_wn), policy_logprobs=on_rows(out.policy_logp_wn),
        stopped=on_rows(out.stopped_w), slot_steps=s.slot_steps)
