"""The public model API: load or create a sharded model, and score token ids with it.

    model = jaxcov.load_model("smollm2-135m-instruct")          # or an HF dir / .gguf file
    logits = model.logits(tokens_bt, mask_bt)                   # [B, T, V] fp32
    logp_bt, entropy_bt = model.logprobs(tokens_bt, mask_bt)    # chunked over the sequence
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import struct
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxcov.config import ConfigError, MeshConfig
from jaxcov.distributed import log
from jaxcov.models import attention as attn_lib
from jaxcov.models import llama
from jaxcov.models.llama import LlamaConfig, Params, is_spec, param_specs
from jaxcov.models.loading import load_checkpoint
from jaxcov.models.logprobs import token_logprobs
from jaxcov.models.presets import tiny_config
from jaxcov.models.registry import load_tokenizer, model_has_tokenizer, resolve_model_source
from jaxcov.sharding import make_mesh, named_sharding
from jaxcov.xla_cpu import model_compile_options


def param_shardings(cfg: LlamaConfig, mesh: Mesh):
    """The NamedSharding of every parameter, from the logical axes and the rules table."""
    return jax.tree.map(lambda s: named_sharding(mesh, s.axes, s.shape), param_specs(cfg),
                        is_leaf=is_spec)


def abstract_params(cfg: LlamaConfig, mesh: Mesh, dtype=jnp.float32):
    """ShapeDtypeStructs (with shardings) of the parameters: nothing is allocated."""
    shapes = jax.eval_shape(functools.partial(llama.init_params, cfg, dtype=dtype),
                            jax.random.key(0))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        shapes, param_shardings(cfg, mesh))


def init_params(cfg: LlamaConfig, key: jax.Array, mesh: Mesh, dtype=jnp.float32) -> Params:
    """Random parameters created directly in their shardings (no host or single-device copy)."""
    init = jax.jit(functools.partial(llama.init_params, cfg, dtype=dtype),
                   out_shardings=param_shardings(cfg, mesh))
    return init(key)


def _logits(params, tokens_bt, mask_bt, cfg, mesh):
    return llama.forward(params, cfg, tokens_bt, mask_bt, mesh=mesh)


def _logprobs(params, tokens_bt, mask_bt, cfg, mesh, chunk):
    return token_logprobs(params, cfg, tokens_bt, mask_bt, mesh=mesh, chunk=chunk)


@functools.cache
def _jitted(fn, compute_dtype: str, static_argnames: tuple[str, ...]):
    """`fn` jitted with the XLA options of its compute dtype, as the trainer compiles its
    scoring programs (`jaxcov.xla_cpu`)."""
    return jax.jit(fn, static_argnames=static_argnames,
                   compiler_options=model_compile_options(compute_dtype))


@dataclasses.dataclass
class Model:
    """A model's architecture, sharded parameters, mesh and (optionally) tokenizer."""

    config: LlamaConfig
    params: Params
    mesh: Mesh
    tokenizer: Any = None
    source: str = ""  # what it was loaded from, for messages

    def require_tokenizer(self, purpose: str):
        """The tokenizer, or a ConfigError saying `purpose` needs one and how to give it."""
        if self.tokenizer is None:
            raise ConfigError(_no_tokenizer(self.source or "the model", purpose))
        return self.tokenizer

    def logits(self, tokens_bt, attention_mask_bt) -> jax.Array:
        """fp32 logits [B, T, V]; positions count only unmasked tokens (left padding is fine)."""
        logits = _jitted(_logits, self.config.compute_dtype, ("cfg", "mesh"))
        return logits(self.params, jnp.asarray(tokens_bt), jnp.asarray(attention_mask_bt),
                      self.config, self.mesh)

    def logprobs(self, tokens_bt, attention_mask_bt, chunk: int = 128):
        """(logp_bt, entropy_bt): log-prob of each token given its prefix, and the entropy of
        the distribution it was drawn from; index 0 is 0. Full logits never materialise."""
        logprobs = _jitted(_logprobs, self.config.compute_dtype, ("cfg", "mesh", "chunk"))
        return logprobs(self.params, jnp.asarray(tokens_bt), jnp.asarray(attention_mask_bt),
                        self.config, self.mesh, chunk)


RANDOM_PREFIX = "random:"


def run_options_for(mesh: Optional[Mesh], compute_dtype: str, remat: str, attention: str,
                    attention_block: int, platform: Optional[str] = None) -> dict:
    """The run options of `LlamaConfig` with the attention implementation resolved for the
    platform (default: the mesh's devices, else jax's default backend)."""
    if platform is None:
        backend = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
        platform = attn_lib.platform_of(backend)
    return dict(compute_dtype=compute_dtype, remat=remat, attention_block=attention_block,
                attention=attn_lib.resolve(attention, platform, compute_dtype), platform=platform)


# What reading a damaged model file raises (truncated, empty or garbage GGUF / safetensors, a
# malformed config.json, a tensor missing in one layer): an input error, not a bug.
MODEL_FILE_ERRORS = (ValueError, KeyError, OSError, EOFError, IndexError, struct.error,
                     UnicodeDecodeError)


@contextlib.contextmanager
def _model_file_errors(path: str):
    """Turns a damaged model file's exception into one ConfigError line naming the file."""
    try:
        yield
    except ConfigError as e:
        if path in str(e):
            raise
        # The loader names the tensor or config value, not the file it read.
        raise ConfigError(f"{path}: {e}") from None
    except MODEL_FILE_ERRORS + (_safetensor_error(),) as e:
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"{path}: cannot load the model: {type(e).__name__}: {reason}") from None


def _safetensor_error() -> type:
    try:
        from safetensors import SafetensorError
        return SafetensorError
    except ImportError:  # older safetensors: its errors are OSError / ValueError
        return OSError


def load_model(source: str = "smollm2-135m-instruct", mesh: Optional[Mesh] = None,
               dtype: str = "float32", compute_dtype: Optional[str] = None,
               remat: str = "full", with_tokenizer: bool = True, tokenizer: str = "",
               seed: int = 0, attention: str = "auto", attention_block: int = 512,
               platform: Optional[str] = None) -> Model:
    """Loads a registered name, HF directory or GGUF file into sharded parameters.

    Args:
      source: `smollm2-135m-instruct`, a directory with config.json + safetensors, a .gguf, or
        `random:<preset>` (a tiny random model of `presets.TINY_CONFIGS`, for tests and smoke
        runs; its vocabulary is resized to the tokenizer's).
      mesh: device mesh; default all devices on the data axis.
      dtype: parameter dtype; compute_dtype: matmul/activation dtype (default: dtype).
      remat: rematerialisation policy of each layer (none | full | dots | dots_no_batch).
      tokenizer: a tokenizer directory, .gguf file or model name to use instead of `source`'s
        own (required for random:; a directory without tokenizer files loads without one).
      seed: initialisation seed of a random model.
      attention: `jaxcov.models.attention` implementation, or auto (by platform);
        attention_block: chunked attention's block.
      platform: what the programs are built for (default: the mesh's devices).
    """
    mesh = mesh if mesh is not None else make_mesh(MeshConfig())
    run_options = run_options_for(mesh, compute_dtype or dtype, remat, attention,
                                  attention_block, platform)
    is_random = source.startswith(RANDOM_PREFIX)
    tok = _tokenizer_of(source, tokenizer) if with_tokenizer or is_random else None
    if is_random:
        cfg = tiny_config(source[len(RANDOM_PREFIX):], vocab_size=len(tok), **run_options)
        params = init_params(cfg, jax.random.key(seed), mesh, dtype=jnp.dtype(dtype))
    else:
        kind, path = resolve_model_source(source)
        with _model_file_errors(path):
            cfg, params = load_checkpoint(kind, path, mesh, dtype=jnp.dtype(dtype),
                                          **run_options)
        if tok is not None and len(tok) > cfg.vocab_size:  # its ids would index past the table
            raise ConfigError(f"{tokenizer or source}: the tokenizer has {len(tok)} tokens, more "
                              f"than the vocab_size {cfg.vocab_size} of the model {source}")
    return Model(config=cfg, params=params, mesh=mesh, tokenizer=tok if with_tokenizer else None,
                 source=source)


def _no_tokenizer(source: str, purpose: str) -> str:
    return (f"{source} has no tokenizer, which {purpose} needs: set model.tokenizer (--tokenizer "
            "on the command line) to a tokenizer directory, .gguf file or registered model name")


def check_tokenizer_source(source: str, tokenizer: str, purpose: str) -> None:
    """`Model.require_tokenizer`'s ConfigError, before the model loads (which takes minutes for
    a large one): `purpose` needs a tokenizer and neither `tokenizer` nor `source` gives one."""
    if not tokenizer and (source.startswith(RANDOM_PREFIX) or not model_has_tokenizer(source)):
        raise ConfigError(_no_tokenizer(source, purpose))


def _tokenizer_of(source: str, tokenizer: str = ""):
    """The tokenizer `tokenizer` names, else the model's own; None (with a notice on stderr) for
    a model directory without tokenizer files, so it still loads, scores and exports."""
    if not tokenizer and source.startswith(RANDOM_PREFIX):
        raise ConfigError(f"a random model ({source}) needs a tokenizer: set model.tokenizer")
    if not tokenizer and not model_has_tokenizer(source):
        log(f"jaxcov: {source} has no tokenizer files; loading it without a tokenizer "
            "(model.tokenizer or --tokenizer gives one)")
        return None
    with _model_file_errors(tokenizer or source):
        return load_tokenizer(tokenizer or source)
