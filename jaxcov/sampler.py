"""Rollout sampler: prefill a prompt batch once, then decode in one jitted while loop.

    rollout = generate(model, prompt_ids, jax.random.key(0), SamplerConfig(max_new_tokens=64), n=8)
    texts = decode_responses(model.tokenizer, rollout)

One call of `generate` / `sample`:
  host  check the prompts; split off the prefix they all share (a chat template's system
        prompt); left-pad the rest; round prompt length, prompt count and response length up
        to buckets, so a run compiles a few programs, not one per batch.
  jit   run the shared prefix once and each prompt's rest once -> repeat each prompt's cache
        row n times (row r belongs to prompt r // n: a GRPO group is contiguous) -> sample
        token 0 -> `lax.while_loop` that feeds one token per row per step through the KV cache
        and stops when every row has produced a stop token or the length limit is reached.
        The cache is made inside the program and lives in the loop carry, so XLA updates it in
        place; nothing returns to the host until the loop ends.
  host  trim the bucket padding; decode text with the tokenizer.

The model side (prefill into the cache, one decode step) is `jaxcov.models.decode`.

Sampling (temperature, top-k, top-p, greedy) works on fp32 logits. Each step returns the
log-prob of the sampled token under the distribution it was drawn from and under the plain T=1
policy (the one the loss scores), both from the same logits, so they are exact, not re-computed.
top-k / top-p thresholds are found by bisection on the float bit pattern (32 masked reductions)
rather than a sort of the vocabulary, which is slow on CPU.

Dimension letters: B prompts, R rows (B * n), C shared prefix, P prompt slots, N response
slots, S cache slots, V vocab, L layers, K kv heads, G query heads per kv head, E head dim.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh

from jaxcov import compiles, continuous
from jaxcov.config import ConfigError, SamplerConfig
from jaxcov.distributed import to_global, to_host
from jaxcov.models.llama import LlamaConfig, Params
from jaxcov.models.decode import (DecodeCache, decode_params, decode_step, prefill,
                                  repeat_cache, repeat_rows)
from jaxcov.sampling import (Generated, SamplerStatic, SamplingOptions, is_stop,  # noqa: F401
                             sample_tokens, top_k_mask, top_p_mask)
from jaxcov.sharding import batch_size_multiple, constrain, named_sharding


def compile_count() -> int:
    """How many sampler programs this process has compiled (a metric: should stay small)."""
    return compiles.count("sampler")


# ------------------------------------------------------------------------------ rollout pytrees


@struct.dataclass
class Rollout:
    """Generated rows; row r belongs to prompt r // n (a group's rows are contiguous)."""

    prompt_ids: jax.Array  # [R, P] int32, left-padded with pad_id
    prompt_mask: jax.Array  # [R, P] bool
    response_ids: jax.Array  # [R, N] int32, pad_id after the end
    response_mask: jax.Array  # [R, N] bool: sampled tokens up to and including the stop token
    sample_logprobs: jax.Array  # [R, N] fp32: log-prob under the sampling distribution
    policy_logprobs: jax.Array  # [R, N] fp32: log-prob under the T=1 policy
    stopped: jax.Array  # [R] bool: ended with a stop token (else it hit the length limit)
    slot_steps: jax.Array  # [] int32: decode slots x loop steps the program ran

    @property
    def response_lengths(self) -> jax.Array:
        return jnp.sum(self.response_mask, axis=-1)

    def slot_utilisation(self) -> float:
        """The fraction of slot-steps that produced a kept token."""
        kept = np.sum(to_host(self.response_mask))
        return float(kept / max(1, int(to_host(self.slot_steps))))

    def finish_reasons(self) -> list[str]:
        return ["stop" if s else "length" for s in to_host(self.stopped)]


@struct.dataclass
class DecodeState:
    """The while-loop carry."""

    step: jax.Array  # [] int32: the response slot filled next
    tokens_rn: jax.Array  # [R, N] int32
    sample_logp_rn: jax.Array  # [R, N] fp32
    policy_logp_rn: jax.Array  # [R, N] fp32
    length_r: jax.Array  # [R] int32: tokens in the response so far (stop token included)
    done_r: jax.Array  # [R] bool
    cache: "DecodeCache"


# ---------------------------------------------------------------------------------- the program


# Prefill and decode run the layers as a Python loop over per-layer weights, not `lax.scan`
# over the stacked [L, ...] weights: XLA:CPU copies a scanned layer's weights out of the stack
# on every step (and upcasts bf16 weights it slices inside a loop), which made decoding ~3x
# slower. The price is compile time that grows with depth (SmolLM2's 30 layers: ~7 s).


def _record(state: DecodeState, token_r, sample_logp_r, policy_logp_r, stop_ids, pad_id):
    """Writes one sampled token per row at `state.step`; finished rows get padding."""
    active_r = ~state.done_r
    token_r = jnp.where(active_r, token_r, pad_id)

    def put(buffer_rn, column_r):
        column = jnp.where(active_r, column_r, 0).astype(buffer_rn.dtype)
        return jax.lax.dynamic_update_slice_in_dim(buffer_rn, column[:, None], state.step, 1)

    stops = is_stop(token_r, stop_ids)
    return state.replace(
        step=state.step + 1,
        tokens_rn=jax.lax.dynamic_update_slice_in_dim(state.tokens_rn, token_r[:, None],
                                                      state.step, 1),
        sample_logp_rn=put(state.sample_logp_rn, sample_logp_r),
        policy_logp_rn=put(state.policy_logp_rn, policy_logp_r),
        length_r=state.length_r + active_r.astype(jnp.int32),
        done_r=state.done_r | (active_r & stops))


def _initial_state(cache: DecodeCache, real_r, width: int, pad_id: int) -> DecodeState:
    rows = real_r.shape[0]
    return DecodeState(
        step=jnp.zeros((), jnp.int32), tokens_rn=jnp.full((rows, width), pad_id, jnp.int32),
        sample_logp_rn=jnp.zeros((rows, width), jnp.float32),
        policy_logp_rn=jnp.zeros((rows, width), jnp.float32),
        length_r=jnp.zeros((rows,), jnp.int32), done_r=~real_r, cache=cache)


def _decode_loop(params, layers, static: SamplerStatic, state: DecodeState, prompt_len_r, key, limit):
    """Samples until every row is done or `limit` tokens exist (no host round-trip)."""
    def keep_going(s: DecodeState):
        return (s.step < limit) & ~jnp.all(s.done_r)

    def one_token(s: DecodeState):
        last_r = jax.lax.dynamic_index_in_dim(s.tokens_rn, s.step - 1, axis=1, keepdims=False)
        logits_rv, cache = decode_step(params, layers, static.cfg, last_r,
                                       prompt_len_r + s.step - 1, s.cache, static.mesh)
        sampled = sample_tokens(logits_rv, jax.random.fold_in(key, s.step), static.options)
        return _record(s.replace(cache=cache), *sampled, static.stop_ids, static.pad_id)

    return jax.lax.while_loop(keep_going, one_token, state)


@functools.partial(jax.jit, static_argnames=("static",))
def _sample_program(params_and_layers, prefix_c, prompt_bp, mask_bp, real_b, key, max_new_tokens,
                    static: SamplerStatic) -> Generated:
    compiles.record("sampler", f"prefix {prefix_c.shape[0]}, prompts {list(prompt_bp.shape)}, "
                               f"n {static.n}")
    cfg, mesh, n = static.cfg, static.mesh, static.n
    params, layers = params_and_layers
    logits_bv, cache = prefill(params, layers, cfg, prefix_c, prompt_bp, mask_bp, static.width,
                               mesh)
    state = _initial_state(repeat_cache(cache, n, mesh), repeat_rows(real_b, n), static.width,
                           static.pad_id)
    sampled = sample_tokens(repeat_rows(logits_bv, n), jax.random.fold_in(key, 0), static.options)
    state = _record(state, *sampled, static.stop_ids, static.pad_id)
    prompt_len_r = repeat_rows(prefix_c.shape[0] + jnp.sum(mask_bp, axis=1, dtype=jnp.int32), n)
    limit = jnp.minimum(max_new_tokens, static.width)
    state = _decode_loop(params, layers, static, state, prompt_len_r, key, limit)
    rows = lambda x: constrain(x, mesh, ("batch",) + (None,) * (x.ndim - 1))  # noqa: E731
    return Generated(
        response_ids=rows(state.tokens_rn),
        response_mask=rows(jnp.arange(static.width)[None, :] < state.length_r[:, None]),
        sample_logprobs=rows(state.sample_logp_rn), policy_logprobs=rows(state.policy_logp_rn),
        stopped=rows(state.done_r), slot_steps=state.step * state.done_r.shape[0])


# ------------------------------------------------------------------------------ host-side entry


def bucket(length: int, minimum: int, maximum: Optional[int] = None) -> int:
    """The smallest of minimum x (1, 2, 4, 8, ...) that holds `length`, capped at `maximum`.

    Powers of two, not a finer ladder: a prompt width compiles the sampler, scoring and update
    programs anew, so a run over prompts of 16..512 tokens compiles each at most 6 times, at the
    price of at most half the prompt slots being padding."""
    size = minimum
    while size < length:
        size *= 2
    return min(size, maximum) if maximum is not None else size


def batch_bucket(prompts: int, n: int, mesh: Optional[Mesh]) -> int:
    """Prompt count rounded up to a power of two whose rows (x n) split evenly over the mesh."""
    multiple = batch_size_multiple(mesh) if mesh is not None else 1
    size = 1 << max(0, prompts - 1).bit_length()
    while (size * n) % multiple:
        size += 1
    return size


def check_prompts(prompts: Sequence[Sequence[int]], config: SamplerConfig) -> list[list[int]]:
    """The prompts as lists; a clear error for no prompts, an empty prompt, or one longer than
    `max_prompt_len` (unless `truncate_prompts`: then its last max_prompt_len tokens)."""
    if len(prompts) == 0:
        raise ValueError("generate: the prompt list is empty")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"generate: prompt {lengths.index(0)} has no tokens")
    longest = max(lengths)
    if longest > config.max_prompt_len and not config.truncate_prompts:
        raise ConfigError(
            f"sampler.max_prompt_len: prompt {lengths.index(longest)} has {longest} tokens, more "
            f"than max_prompt_len={config.max_prompt_len}; raise it or set truncate_prompts=true "
            f"(keeps the last max_prompt_len tokens)")
    return [[int(t) for t in p][-config.max_prompt_len:] for p in prompts]


def left_pad(prompts: Sequence[Sequence[int]], width: int, pad_id: int,
             batch: int) -> tuple[np.ndarray, np.ndarray]:
    """[batch, width] ids and mask, each prompt at the right end. Rows past the prompts (filling
    a batch bucket) hold one pad token; their rows start finished."""
    ids = np.full((batch, width), pad_id, np.int32)
    mask = np.zeros((batch, width), bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = True
    mask[len(prompts):, -1] = True
    return ids, mask


# The shared prefix is cut down to PREFIX_MULTIPLE x (1, 1.5, 2, 3, 4, 6, ...): its length is
# a program shape, and a batch's prompts share by chance a few tokens more or less.
PREFIX_MULTIPLE = 8


def prefix_bucket(length: int, minimum: int = PREFIX_MULTIPLE) -> int:
    """The largest of minimum x (1, 1.5, 2, 3, 4, 6, ...) that is <= `length` (0 below it)."""
    best, scale = 0, 0
    while minimum << scale <= length:
        best = max(s for s in (minimum << scale, 3 * minimum << scale >> 1) if s <= length)
        scale += 1
    return best


def shared_prefix_len(prompts: Sequence[Sequence[int]], granularity: int) -> int:
    """How many leading tokens all prompts share (a chat template's system prompt, say), rounded
    down to a multiple of `granularity` and leaving every prompt at least one token of its own."""
    limit = min(len(p) for p in prompts) - 1
    heads = np.array([p[:limit] for p in prompts], np.int64).reshape(len(prompts), limit)
    differs = np.any(heads != heads[:1], axis=0)
    common = int(np.argmax(differs)) if differs.any() else limit
    return common // granularity * granularity


def default_stop_ids(tokenizer, extra: Sequence[int] = ()) -> tuple[int, ...]:
    """EOS plus the chat end-of-turn tokens the vocabulary has, plus `extra`."""
    ids = set(int(i) for i in extra)
    if tokenizer is not None:
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        vocab = tokenizer.get_vocab()
        ids.update(vocab[t] for t in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>") if t in vocab)
    if not ids:
        raise ConfigError("sampler.stop_token_ids: no tokenizer EOS and no stop ids given")
    return tuple(sorted(ids))


def sampler_program(config: SamplerConfig):
    """The jitted program of `config.engine` (arguments as `_sample_program`'s)."""
    return continuous.continuous_program if config.engine == "continuous" else _sample_program


def sampler_static(cfg: LlamaConfig, mesh: Optional[Mesh], config: SamplerConfig, n: int,
                   stop_ids: Sequence[int], pad_id: int, rows: int = 0) -> SamplerStatic:
    """The compile-time part of a sampler program; `rows` (prompt slots x n) sizes the
    continuous engine's slots."""
    dtype = config.compute_dtype or cfg.compute_dtype
    slotted = config.engine == "continuous"
    return SamplerStatic(
        cfg=cfg.replace(compute_dtype=dtype, remat="none"),
        options=SamplingOptions.from_config(config), n=n,
        width=bucket(config.max_new_tokens, config.min_bucket),
        stop_ids=tuple(sorted(set(int(i) for i in stop_ids))), pad_id=int(pad_id), mesh=mesh,
        slots=continuous.slot_count(config, rows, mesh) if slotted else 0,
        groups=batch_size_multiple(mesh) if slotted and mesh is not None else 1)


def sample(params: Params, cfg: LlamaConfig, mesh: Optional[Mesh],
           prompts: Sequence[Sequence[int]], key: jax.Array,
           config: SamplerConfig = SamplerConfig(), n: int = 1,
           stop_ids: Sequence[int] = (), pad_id: int = 0,
           prompt_width: Optional[int] = None) -> Rollout:
    """Samples n responses per prompt (token ids); see the module docstring.

    The returned arrays have one row per (prompt, sample) in prompt-major order, P =
    `prompt_width` (default: the bucket of the longest prompt), and N = config.max_new_tokens
    columns. Without `stop_ids` every row runs to the length limit (benchmarks).
    """
    if n < 1:
        raise ValueError(f"generate: n must be >= 1, got {n}")
    prompts = check_prompts(prompts, config)
    width = padded_prompt_width(prompts, config, prompt_width)
    slotted = config.engine == "continuous"
    # The continuous engine schedules whole prompts per batch shard: B splits over the mesh.
    batch = batch_bucket(len(prompts), 1 if slotted else n, mesh)
    # A shared prefix changes slot distances, which sliding windows compare: not for those.
    # cuDNN's kernel masks by lengths only, so it cannot attend past a prefix either.
    share = (config.share_prompt_prefix and cfg.sliding_window is None
             and cfg.attention != "cudnn")
    prefix_len = prefix_bucket(shared_prefix_len(prompts, 1)) if share else 0
    # The prefix and the rest fill exactly `width` cache slots, as the whole prompts would.
    rest_bp, rest_mask_bp = left_pad([p[prefix_len:] for p in prompts], width - prefix_len,
                                     pad_id, batch)
    static = sampler_static(cfg, mesh, config, n, stop_ids, pad_id, rows=batch * n)
    generated = sampler_program(config)(
        decode_params(params, static.cfg, mesh), jnp.asarray(prompts[0][:prefix_len], jnp.int32),
        _on_mesh(rest_bp, mesh), _on_mesh(rest_mask_bp, mesh),
        _on_mesh(np.arange(batch) < len(prompts), mesh), key, jnp.int32(config.max_new_tokens),
        static)
    return _rollout(generated, prompts, width, config, n, pad_id, batch, mesh)


def padded_prompt_width(prompts: Sequence[Sequence[int]], config: SamplerConfig,
                        prompt_width: Optional[int] = None) -> int:
    """The prompt columns of a batch: `prompt_width` when given (it must hold every prompt),
    else the bucket of the longest prompt, capped at max_prompt_len."""
    longest = max(map(len, prompts))
    if prompt_width is None:
        return bucket(longest, config.min_bucket, config.max_prompt_len)
    if prompt_width < longest:
        raise ValueError(f"generate: prompt_width={prompt_width} is shorter than the longest "
                         f"prompt ({longest} tokens)")
    return prompt_width


def _rollout(generated: Generated, prompts: list[list[int]], width: int, config: SamplerConfig,
             n: int, pad_id: int, batch: int, mesh: Optional[Mesh]) -> Rollout:
    """The program's responses next to the whole prompts (left-padded to `width`, each
    repeated n times), without the rows and columns that only fill a bucket."""
    ids_bp, mask_bp = left_pad(prompts, width, pad_id, batch)
    rollout = Rollout(prompt_ids=_on_mesh(np.repeat(ids_bp, n, axis=0), mesh),
                      prompt_mask=_on_mesh(np.repeat(mask_bp, n, axis=0), mesh),
                      **{f.name: getattr(generated, f.name)
                         for f in dataclasses.fields(Generated)})
    rows, columns = len(prompts) * n, config.max_new_tokens
    if rollout.response_ids.shape == (rows, columns):
        return rollout
    return _trim(rollout, rows, columns)


def _on_mesh(x: np.ndarray, mesh: Optional[Mesh]) -> jax.Array:
    """Host array -> device array split along its leading (batch) axis."""
    if mesh is None:
        return jnp.asarray(x)
    axes = ("batch",) + (None,) * (x.ndim - 1)
    return to_global(x, named_sharding(mesh, axes, x.shape))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _trim(rollout: Rollout, rows: int, columns: int) -> Rollout:
    """Drops the rows and response columns that only exist to fill a bucket."""
    trimmed = jax.tree.map(lambda x: x[:rows] if x.ndim else x, rollout)
    return trimmed.replace(**{name: getattr(trimmed, name)[:, :columns] for name in (
        "response_ids", "response_mask", "sample_logprobs", "policy_logprobs")})


def generate(model, prompts: Sequence[Sequence[int]], key: jax.Array,
             config: SamplerConfig = SamplerConfig(), n: int = 1,
             params: Optional[Params] = None, prompt_width: Optional[int] = None) -> Rollout:
    """`sample` for a `jaxcov.models.api.Model`: stop ids and padding from its tokenizer (EOS,
    end-of-turn tokens, `config.stop_token_ids`); `params` overrides the model's (e.g. the
    policy being trained); `prompt_width` as in `sample`."""
    tokenizer = model.tokenizer
    stop_ids = default_stop_ids(tokenizer, config.stop_token_ids)
    pad_id = tokenizer.pad_token_id if tokenizer is not None else None
    pad_id = stop_ids[0] if pad_id is None else pad_id
    return sample(model.params if params is None else params, model.config, model.mesh, prompts,
                  key, config, n, stop_ids, pad_id, prompt_width)


def dataset_prompt_width(config: SamplerConfig, *datasets) -> Optional[int]:
    """The prompt width for every batch drawn from `datasets` (lists of examples with
    `prompt_ids`; None entries skipped) under `config.pad_prompts`: "dataset" gives the bucket
    of their longest prompt, so no batch builds a new program; "batch" gives None."""
    if config.pad_prompts == "batch":
        return None
    lengths = [len(e["prompt_ids"]) for d in datasets if d is not None for e in d]
    return bucket(max(lengths), config.min_bucket, config.max_prompt_len) if lengths else None


# ---------------------------------------------------------------------------------------- text


@dataclasses.dataclass(frozen=True)
class Completion:
    """One decoded response."""

    prompt_index: int
    sample_index: int
    text: str
    num_tokens: int  # stop token included
    finish_reason: str  # "stop" | "length"


def encode_prompts(tokenizer, texts: Sequence[str], system: Optional[str] = None,
                   chat: Optional[bool] = None) -> list[list[int]]:
    """Token ids of user messages, through the chat template (with a generation prompt) when the
    tokenizer has one and `chat` is not False; `system` replaces the template's system prompt."""
    chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if not chat:
        return [tokenizer(t)["input_ids"] for t in texts]
    ids = []
    for text in texts:
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
        # The template already holds BOS and friends; adding them again would double them.
        ids.append(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return ids


def decode_responses(tokenizer, rollout: Rollout, skip_special_tokens: bool = True) -> list[str]:
    """The text of each row's response (its masked tokens)."""
    ids, mask = to_host(rollout.response_ids), to_host(rollout.response_mask)
    return tokenizer.batch_decode([row[m].tolist() for row, m in zip(ids, mask)],
                                  skip_special_tokens=skip_special_tokens)


def generate_text(model, texts: Sequence[str], key: jax.Array,
                  config: SamplerConfig = SamplerConfig(), n: int = 1,
                  system: Optional[str] = None, chat: Optional[bool] = None) -> list[Completion]:
    """Samples n responses to each user message and decodes them (prompt-major order)."""
    tokenizer = model.require_tokenizer("generate")
    if len(texts) == 0:
        raise ValueError("generate: the prompt list is empty")
    rollout = generate(model, encode_prompts(tokenizer, texts, system, chat), key, config, n)
    decoded = decode_responses(tokenizer, rollout)
    lengths = to_host(rollout.response_lengths).tolist()
    return [Completion(r // n, r % n, text, lengths[r], reason)
            for r, (text, reason) in enumerate(zip(decoded, rollout.finish_reasons()))]


def generate_cli(args: argparse.Namespace) -> int:
    """`jaxcov generate MODEL --prompt TEXT [--prompt ...] [-n --temperature --top-p --top-k
    --max-new-tokens --seed --system]`: prints each completion, then timing on stderr."""
    from jaxcov.models.api import load_model

    config = SamplerConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p)
    model = load_model(args.model, tokenizer=args.tokenizer)
    start = time.perf_counter()
    completions = generate_text(model, args.prompt, jax.random.key(args.seed), config, args.n,
                                system=args.system)
    seconds = time.perf_counter() - start
    for c in completions:
        print(f"=== prompt {c.prompt_index + 1}, sample {c.sample_index + 1} "
              f"({c.finish_reason}, {c.num_tokens} tokens)")
        print(c.text)
    tokens = sum(c.num_tokens for c in completions)
    print(f"{tokens} tokens in {seconds:.1f} s ({tokens / seconds:.1f} tokens/s, compilation "
          f"included; {compile_count()} sampler program(s) compiled)", file=sys.stderr)
    return 0
