"""XLA:CPU compile options for jaxcov's scoring and training programs.

On the CPU backend, fp32 matmuls run faster through XNNPACK than through the YNNPACK fusions
XLA picks by default, in the layer forward and the hand-written backward
(`python bench/bench_model.py`, SmolLM2 16x128: forward -10%, forward+backward -5%). Not used
for bf16 matmuls (that path has no bf16 x bf16 -> f32 dot) nor for the sampler, whose decode
steps got ~20% slower with it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_XNNPACK_DOTS = {"xla_cpu_experimental_ynn_fusion_type": "",
                 "xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def model_compile_options(compute_dtype, longest_seq: int = 0, attention_block: int = 512) -> dict:
    """`compiler_options` for `jax.jit` of a forward or forward+backward pass over sequences of
    at most `longest_seq` tokens (0: short).

    XNNPACK dots only while the attention is one block (`attention_block`): past it, most of
    a layer's time goes to the chunked attention's row max / exp / sum passes, which XLA's
    default (YNNPACK) fusions run 3.6x faster than with YNNPACK off (a [3, 1536, 512] block:
    0.8 ms against 2.9 ms), and SmolLM2 fwd+bwd at 1x4096 is 4% faster with the defaults.
    """
    if (jax.default_backend() != "cpu" or jnp.dtype(compute_dtype) != jnp.float32
            or longest_seq > attention_block):
        return {}
    return dict(_XNNPACK_DOTS)
