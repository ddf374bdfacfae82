"""Architectures by name: tiny random configs for tests, and real sizes for planning.

Real sizes are the published config.json values; they are used abstractly (`jax.eval_shape`,
the memory planner), never downloaded.
"""

from __future__ import annotations

from jaxcov.config import ConfigError
from jaxcov.models.llama import LlamaConfig

_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
             num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=512)

TINY_CONFIGS = {
    "llama": LlamaConfig(family="llama", rope_theta=10000.0, tie_word_embeddings=False, **_TINY),
    "llama-tied": LlamaConfig(family="llama", tie_word_embeddings=True,
                              rope_scaling=("llama3", 8.0, 1.0, 4.0, 64), **_TINY),
    "mistral": LlamaConfig(family="mistral", sliding_window=5, **_TINY),
    "qwen2": LlamaConfig(family="qwen2", qkv_bias=True, rope_theta=1e6, tie_word_embeddings=True,
                         **_TINY),
    "qwen3": LlamaConfig(family="qwen3", qk_norm=True, rope_theta=1e6, **_TINY),
}


def tiny_config(name: str = "llama", **changes) -> LlamaConfig:
    """A 2-layer random-init config of one family (see TINY_CONFIGS), fast on CPU."""
    if name not in TINY_CONFIGS:  # `jaxcov generate random:<name>` gets here unchecked
        raise ConfigError(f"random:{name}: no such random model (the families: "
                          f"{', '.join(TINY_CONFIGS)})")
    return TINY_CONFIGS[name].replace(**changes)


REAL_CONFIGS = {
    "smollm2-135m": LlamaConfig(
        family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, max_position_embeddings=8192),
    "llama-3.1-8b": LlamaConfig(
        family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling=("llama3", 8.0, 1.0, 4.0, 8192), rms_norm_eps=1e-5,
        max_position_embeddings=131072),
    "qwen2.5-7b": LlamaConfig(
        family="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1000000.0,
        rms_norm_eps=1e-6, qkv_bias=True, max_position_embeddings=131072),
    "qwen2.5-32b": LlamaConfig(
        family="qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=27648,
        num_layers=64, num_heads=40, num_kv_heads=8, head_dim=128, rope_theta=1000000.0,
        rms_norm_eps=1e-6, qkv_bias=True, max_position_embeddings=131072),
    "qwen3-8b": LlamaConfig(
        family="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
        num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1000000.0,
        rms_norm_eps=1e-6, qk_norm=True, max_position_embeddings=40960),
}
