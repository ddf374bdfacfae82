"""The run's programs lowered for a platform the host need not have (`jax.export`).

    exported = lower_programs(config, "tpu", mesh)   # {"score": Exported, "update": ..., ...}

Each program is the trainer's own (the scoring forward, the guarded mini-batch update, the
sampler's prefill + decode loop), built from the config's architecture with abstract parameters
on `mesh`, so nothing is allocated and no weights are read. A program that lowers here is what
XLA on TPU or GPU will compile: it shows the attention kernel is there (`tpu_custom_call` for
Pallas splash, `__cudnn$fmha*` for cuDNN) and that no CPU-only path leaked in.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxcov import sampler as sampler_lib
from jaxcov.config import ExperimentConfig
from jaxcov.models import attention as attn_lib
from jaxcov.models import decode as decode_lib
from jaxcov.models.api import abstract_params, run_options_for
from jaxcov.models.llama import LlamaConfig
from jaxcov.optim import make_optimizer
from jaxcov.sharding import named_sharding
from jaxcov.update import MiniBatch, guarded_update

PROGRAMS = ("score", "update", "sample")
# Typed keys do not round-trip through jax.export's argument trees: programs take key data.
KEY_DATA = jax.ShapeDtypeStruct((2,), jnp.uint32)


def target_architecture(config: ExperimentConfig, platform: str) -> LlamaConfig:
    """The config's architecture with the run options it gets on `platform`."""
    from jaxcov.plan import model_architecture

    m = config.model
    return model_architecture(config).replace(**run_options_for(
        None, m.compute_dtype, m.remat, m.attention, m.attention_block, platform))


def _rows(mesh: Mesh, shape, dtype):
    axes = ("batch",) + (None,) * (len(shape) - 1)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=named_sharding(mesh, axes, shape))


def _exported(fn, platform: str, *args, **kwargs) -> jax.export.Exported:
    checks = []
    if platform == "cuda":
        attn_lib.assume_cudnn_on_host()
        checks = [jax.export.DisabledSafetyCheck.custom_call(target)
                  for target in attn_lib.cudnn_custom_calls()]
    return jax.export.export(fn, platforms=[platform], disabled_checks=checks)(*args, **kwargs)


def lower_programs(config: ExperimentConfig, platform: str, mesh: Mesh, rows: int = 0,
                   seq: int = 0, programs=PROGRAMS) -> dict[str, jax.export.Exported]:
    """`programs` of the run, exported for `platform` ("tpu" or "cuda"). `rows` and `seq`
    (default: one mini-batch, the longest prompt + response) size the batch."""
    from jaxcov.trainer import logprob_function, scoring_function

    cfg = target_architecture(config, platform)
    t, s = config.train, config.sampler
    rows = rows or config.mini_batch_rows
    seq = seq or s.max_prompt_len + s.max_new_tokens
    params = abstract_params(cfg, mesh, jnp.dtype(config.model.param_dtype))
    tokens = _rows(mesh, (rows, seq), jnp.int32)
    logprob_fn = logprob_function(cfg, mesh, config.model.logits_chunk)
    out = {}
    if "score" in programs:
        out["score"] = _exported(scoring_function(logprob_fn, rows, mesh), platform, params,
                                 tokens, tokens)
    if "update" in programs:
        out["update"] = _export_update(config, cfg, mesh, params, logprob_fn, rows, seq, platform)
    if "sample" in programs:
        out["sample"] = _export_sampler(config, cfg, mesh, params, rows, platform)
    return out


def _export_update(config, cfg, mesh, params, logprob_fn, rows, seq, platform):
    optimizer, _ = make_optimizer(config.optim, max(1, config.train.steps))
    opt_state = jax.eval_shape(optimizer.init, params)
    floats = _rows(mesh, (rows, seq), jnp.float32)
    batch = MiniBatch(tokens_bt=_rows(mesh, (rows, seq), jnp.int32),
                      attention_mask_bt=_rows(mesh, (rows, seq), jnp.int32),
                      response_mask_bt=floats, old_logp_bt=floats, advantages_bt=floats,
                      ref_logp_bt=floats if config.algo.ref_kl_coef > 0 else None)
    micro = config.train.micro_batch_size or rows
    update = functools.partial(guarded_update, logprob_fn=logprob_fn, optimizer=optimizer,
                               algo=config.algo, micro_batch_size=micro, mesh=mesh)
    with_key = lambda p, o, b, key_data, lr: update(  # noqa: E731
        p, o, b, jax.random.wrap_key_data(key_data), lr)
    # keep_unused: export needs every argument (KL-Cov never reads the key).
    return _exported(jax.jit(with_key, donate_argnums=(0, 1), keep_unused=True), platform,
                     params, opt_state,
                     batch, KEY_DATA, jax.ShapeDtypeStruct((), jnp.float32))


def _export_sampler(config, cfg, mesh, params, rows, platform):
    """The sampler program of `sampler.engine` (prefill with a shared prefix where the kernel
    allows it, then the decode `while_loop`) for `rows` prompts of `max_prompt_len` tokens, one
    sample each."""
    s = config.sampler
    static = sampler_lib.sampler_static(cfg, mesh, s, n=1, stop_ids=(0,), pad_id=0, rows=rows)
    weights = jax.eval_shape(functools.partial(decode_lib.decode_params, cfg=static.cfg,
                                               mesh=mesh), params)
    prefix = 0 if cfg.attention == "cudnn" else sampler_lib.PREFIX_MULTIPLE
    prompt = _rows(mesh, (rows, sampler_lib.bucket(s.max_prompt_len, s.min_bucket)), jnp.int32)
    program = lambda w, prefix_c, prompt_bp, mask_bp, real_b, key_data, limit: (  # noqa: E731
        sampler_lib.sampler_program(s)(w, prefix_c, prompt_bp, mask_bp, real_b,
                                       jax.random.wrap_key_data(key_data), limit, static=static))
    return _exported(jax.jit(program, keep_unused=True), platform, weights,
                     jax.ShapeDtypeStruct((prefix,), jnp.int32), prompt, prompt,
                     _rows(mesh, (rows,), bool), KEY_DATA, jax.ShapeDtypeStruct((), jnp.int32))


def lower_command(args) -> int:
    """`jaxcov lower CONFIG --platform P`: one line per program (its kernel, its size), and
    the StableHLO text of each under `--out`."""
    import os

    from jaxcov.config import load_config
    from jaxcov.sharding import make_mesh

    config = load_config(args.config, args.overrides)
    cfg = target_architecture(config, args.platform)
    mesh = make_mesh(config.mesh)
    print(f"{args.platform}: attention {cfg.attention}, {mesh.size} device(s) "
          f"{dict(mesh.shape)}")
    for name, program in lower_programs(config, args.platform, mesh).items():
        text = program.mlir_module()
        kernel = {"splash": "tpu_custom_call", "cudnn": "__cudnn$fmha"}.get(cfg.attention)
        found = "" if kernel is None else f", kernel call {kernel}: {kernel in text}"
        print(f"  {name}: lowered, {len(text) / 1e6:.1f} MB of StableHLO{found}")
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"{name}.{args.platform}.mlir"), "w") as f:
                f.write(text)
    return 0
