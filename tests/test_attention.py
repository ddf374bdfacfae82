"""Every attention implementation against dense attention: outputs and gradients in fp32 at
1e-5, with left and right padding, GQA, a sliding window and a query offset (a shared prefix).
Pallas splash runs in interpret mode on CPU; cuDNN's row rotation is checked through XLA's
implementation of the same `jax.nn.dot_product_attention` call."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcov.models import attention as A
from jaxcov.models import llama
from jaxcov.models.logprobs import token_logprobs
from jaxcov.models.presets import tiny_config


def _inputs(B, T, S, H, K, E, q_offset):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (B, T, H, E))
    k, v = (jax.random.normal(key, (B, S, K, E)) for key in keys[1:3])
    valid = np.ones((B, S), bool)
    valid[0, q_offset:q_offset + 5] = False  # left padding after the prefix
    valid[-1, S - 3:] = False  # right padding
    valid = jnp.asarray(valid)
    real_q = valid[:, q_offset:q_offset + T]
    d_out = jax.random.normal(keys[3], q.shape) * real_q[:, :, None, None]
    return q, k, v, valid, real_q, d_out


def _check_against_dense(attend, B, T, S, H, K, E, window, q_offset, tol=1e-5):
    q, k, v, valid, real_q, d_out = _inputs(B, T, S, H, K, E, q_offset)
    dense = functools.partial(A.dense, spec=A.Spec("dense", window, q_offset))

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, valid) * d_out)

    got, want = attend(q, k, v, valid), dense(q, k, v, valid)
    real = np.asarray(real_q)
    scale = np.abs(np.asarray(want)[real]).max()
    assert np.abs(np.asarray(got - want)[real]).max() <= tol * scale
    got_grads = jax.grad(loss(attend), argnums=(0, 1, 2))(q, k, v)
    want_grads = jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got_grads, want_grads):
        assert np.abs(np.asarray(g - w)).max() <= tol * np.abs(np.asarray(w)).max(), name


CASES = [  # B, T, S, H, K, E, window, q_offset
    (2, 100, 100, 6, 2, 16, None, 0),  # T not a multiple of the block
    (2, 100, 100, 6, 2, 16, 20, 0),  # sliding window across block edges
    (2, 64, 96, 6, 3, 16, None, 32),  # a 32-token prefix before the queries
    (2, 64, 96, 6, 3, 16, 17, 32),
    (1, 64, 64, 4, 4, 8, None, 0),  # multi-head (G = 1)
]


@pytest.mark.parametrize("case", CASES)
def test_chunked_matches_dense(case):
    B, T, S, H, K, E, window, q_offset = case
    spec = A.Spec("chunked", window, q_offset, block=16)
    _check_against_dense(functools.partial(A.attention, spec=spec), *case)


@pytest.mark.parametrize("case", [
    (2, 128, 128, 4, 2, 64, None, 0),
    (2, 256, 256, 4, 2, 64, 70, 0),  # window, two 128-blocks
    (2, 100, 100, 4, 1, 64, None, 0),  # padded up to 128 inside
    (2, 128, 256, 4, 2, 64, None, 128),  # query offset (prefill after a shared prefix)
])
def test_splash_kernel_matches_dense_in_interpret_mode(case):
    B, T, S, H, K, E, window, q_offset = case
    spec = A.Spec("splash", window, q_offset, platform="cpu")
    _check_against_dense(functools.partial(A.attention, spec=spec), *case)


@pytest.mark.parametrize("window", [None, 9])
def test_cudnn_row_rotation_matches_dense(window):
    """The rotation that turns left padding into cuDNN's trailing lengths, run through XLA."""
    spec = A.Spec("cudnn", window)
    attend = functools.partial(A.cudnn, spec=spec, implementation="xla")
    _check_against_dense(attend, 2, 48, 48, 4, 2, 16, window, 0)


def test_splash_and_chunked_on_a_mesh_match_one_device():
    """Under shard_map over an 8-device mesh (rows over data, heads over tensor)."""
    from jaxcov.config import MeshConfig
    from jaxcov.sharding import make_mesh

    mesh = make_mesh(MeshConfig(data=4, fsdp=1, tensor=2))
    q, k, v, valid, real_q, _ = _inputs(4, 128, 128, 4, 2, 32, 0)
    spec = A.Spec("splash", None, 0, platform="cpu")
    got = jax.jit(lambda *a: A.attention(*a, spec=spec, mesh=mesh))(q, k, v, valid)
    want = A.dense(q, k, v, valid, spec)
    real = np.asarray(real_q)
    assert np.abs(np.asarray(got - want)[real]).max() <= 1e-5 * np.abs(np.asarray(want)).max()


def test_auto_picks_the_platform_kernel():
    assert A.resolve("auto", "tpu", "float32") == "splash"
    assert A.resolve("auto", "cuda", "bfloat16") == "cudnn"
    assert A.resolve("auto", "cuda", "float32") == "chunked"
    assert A.resolve("auto", "cpu", "bfloat16") == "chunked"
    assert A.resolve("splash", "cpu", "float32") == "splash"  # lowered for a TPU elsewhere
    with pytest.raises(ValueError, match="cudnn needs model.compute_dtype bfloat16"):
        A.resolve("cudnn", "cuda", "float32")
    with pytest.raises(ValueError, match="unknown implementation 'flash'"):
        A.resolve("flash", "cpu", "float32")


def _gradient_temp_bytes(cfg, seq: int) -> int:
    params = jax.eval_shape(lambda: llama.init_params(cfg, jax.random.key(0)))
    tokens = jax.ShapeDtypeStruct((1, seq), jnp.int32)
    grad = jax.jit(jax.grad(lambda p, t, m: jnp.mean(token_logprobs(p, cfg, t, m, chunk=128)[0])))
    return grad.lower(params, tokens, tokens).compile().memory_analysis().temp_size_in_bytes


def test_training_attention_memory_grows_linearly():
    """The compiled gradient's temporaries (remat full) grow about 4x from 2048 to 8192 tokens
    with chunked attention, against about 16x with dense (the [T, T] softmax)."""
    cfg = tiny_config("llama", vocab_size=512, hidden_size=128, intermediate_size=256,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, remat="full",
                      max_position_embeddings=8192)
    chunked = [_gradient_temp_bytes(cfg.replace(attention="chunked"), t) for t in (2048, 8192)]
    dense = [_gradient_temp_bytes(cfg.replace(attention="dense"), t) for t in (2048, 8192)]
    assert chunked[1] <= 4.5 * chunked[0]
    assert dense[1] >= 12 * dense[0]
    assert chunked[1] * 8 <= dense[1]
