"""Checkpoint I/O: HF directories (config.json + safetensors), GGUF files, and HF export.

Loading streams tensor by tensor: each parameter leaf is built with
`jax.make_array_from_callback`, whose callback reads (and converts) only the layers a device's
shard needs, so the host never holds more than a few layer tensors and no device ever receives a
full copy it does not own. Only safetensors and GGUF are read: no pickle, no remote code.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Callable, Optional

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh

from jaxcov.config import ConfigError
from jaxcov.models.llama import LlamaConfig, Params, is_spec, param_specs
from jaxcov.sharding import named_sharding

# ------------------------------------------------------------------------- HF config <-> ours

_HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def _rope_scaling_from_hf(hf: dict) -> Optional[tuple]:
    scaling = hf.get("rope_scaling") or (hf.get("rope_parameters") or {})
    kind = scaling.get("rope_type", scaling.get("type")) if scaling else None
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return ("linear", float(scaling["factor"]))
    if kind == "llama3":
        return ("llama3", float(scaling["factor"]), float(scaling["low_freq_factor"]),
                float(scaling["high_freq_factor"]),
                int(scaling["original_max_position_embeddings"]))
    raise ConfigError(f"rope scaling type {kind!r} is not supported (llama3, linear)")


def _rope_theta_from_hf(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    return float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict, **run_options) -> LlamaConfig:
    """Our config from an HF config.json dict (llama, mistral, qwen2, qwen3)."""
    family = hf.get("model_type")
    if family not in _HF_ARCHITECTURES:
        raise ConfigError(f"model_type {family!r} is not supported; supported: "
                          f"{', '.join(_HF_ARCHITECTURES)}")
    heads = hf["num_attention_heads"]
    sliding = hf.get("sliding_window") if family == "mistral" or hf.get("use_sliding_window") else None
    return LlamaConfig(
        family=family, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rope_theta=_rope_theta_from_hf(hf), rope_scaling=_rope_scaling_from_hf(hf),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
        qk_norm=family == "qwen3", sliding_window=sliding,
        max_position_embeddings=hf.get("max_position_embeddings", 4096), **run_options)


def hf_config_from(cfg: LlamaConfig, dtype: str = "float32", **token_ids) -> dict:
    """An HF config.json dict that transformers loads as the same architecture."""
    hf = {
        "architectures": [_HF_ARCHITECTURES[cfg.family]], "model_type": cfg.family,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "torch_dtype": dtype, "dtype": dtype,
        "attention_bias": cfg.qkv_bias if cfg.family in ("llama", "qwen3") else False,
        "sliding_window": cfg.sliding_window, "use_sliding_window": cfg.sliding_window is not None,
    }
    if cfg.rope_scaling and cfg.rope_scaling[0] == "llama3":
        _, factor, low, high, original = cfg.rope_scaling
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                              "high_freq_factor": high, "original_max_position_embeddings": original}
    elif cfg.rope_scaling:
        hf["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope_scaling[1]}
    hf.update({k: v for k, v in token_ids.items() if v is not None})
    return hf


# ------------------------------------------------------------------ tensor names and layouts
# Each of our leaves maps to a source tensor name (per layer for stacked leaves) and a function
# from the source layout (HF: [out, in]) to ours.

def _heads_out(n_heads: int):
    """[n*E, D] -> [D, n, E] (q/k/v projections)."""
    return lambda w: w.reshape(n_heads, -1, w.shape[-1]).transpose(2, 0, 1)


def _heads_in(n_heads: int):
    """[D, n*E] -> [n, E, D] (output projection)."""
    return lambda w: w.reshape(w.shape[0], n_heads, -1).transpose(1, 2, 0)


def _reshape_to(*shape):
    return lambda w: w.reshape(shape)


_identity = lambda w: w  # noqa: E731
_transpose = lambda w: w.T  # noqa: E731


def hf_layout(cfg: LlamaConfig) -> dict[str, tuple[str, Callable]]:
    """Our flat leaf path -> (HF tensor name with `{i}` for the layer, conversion)."""
    H, K, E = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    p = "model.layers.{i}."
    layout = {
        "embed": ("model.embed_tokens.weight", _identity),
        "final_norm": ("model.norm.weight", _identity),
        "layers/attn_norm": (p + "input_layernorm.weight", _identity),
        "layers/mlp_norm": (p + "post_attention_layernorm.weight", _identity),
        "layers/wq": (p + "self_attn.q_proj.weight", _heads_out(H)),
        "layers/wk": (p + "self_attn.k_proj.weight", _heads_out(K)),
        "layers/wv": (p + "self_attn.v_proj.weight", _heads_out(K)),
        "layers/wo": (p + "self_attn.o_proj.weight", _heads_in(H)),
        "layers/w_gate": (p + "mlp.gate_proj.weight", _transpose),
        "layers/w_up": (p + "mlp.up_proj.weight", _transpose),
        "layers/w_down": (p + "mlp.down_proj.weight", _transpose),
        "layers/bq": (p + "self_attn.q_proj.bias", _reshape_to(H, E)),
        "layers/bk": (p + "self_attn.k_proj.bias", _reshape_to(K, E)),
        "layers/bv": (p + "self_attn.v_proj.bias", _reshape_to(K, E)),
        "layers/q_norm": (p + "self_attn.q_norm.weight", _identity),
        "layers/k_norm": (p + "self_attn.k_norm.weight", _identity),
        "lm_head": ("lm_head.weight", _transpose),
    }
    return layout


def _gguf_layout(cfg: LlamaConfig) -> dict[str, tuple[str, Callable]]:
    """GGUF names; dequantised tensors come in HF's [out, in] order, q/k still permuted."""
    hf = hf_layout(cfg)
    names = {
        "embed": "token_embd.weight", "final_norm": "output_norm.weight",
        "layers/attn_norm": "blk.{i}.attn_norm.weight", "layers/mlp_norm": "blk.{i}.ffn_norm.weight",
        "layers/wq": "blk.{i}.attn_q.weight", "layers/wk": "blk.{i}.attn_k.weight",
        "layers/wv": "blk.{i}.attn_v.weight", "layers/wo": "blk.{i}.attn_output.weight",
        "layers/w_gate": "blk.{i}.ffn_gate.weight", "layers/w_up": "blk.{i}.ffn_up.weight",
        "layers/w_down": "blk.{i}.ffn_down.weight", "layers/bq": "blk.{i}.attn_q.bias",
        "layers/bk": "blk.{i}.attn_k.bias", "layers/bv": "blk.{i}.attn_v.bias",
        "layers/q_norm": "blk.{i}.attn_q_norm.weight", "layers/k_norm": "blk.{i}.attn_k_norm.weight",
        "lm_head": "output.weight",
    }
    layout = {path: (names[path], convert) for path, (_, convert) in hf.items()}
    if cfg.family in ("llama", "mistral"):  # llama.cpp permutes q/k rows for its rope layout
        for path, n in (("layers/wq", cfg.num_heads), ("layers/wk", cfg.num_kv_heads)):
            name, convert = layout[path]
            layout[path] = (name, lambda w, c=convert, n=n: c(undo_gguf_qk_permute(w, n)))
    return layout


def undo_gguf_qk_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: (n, 2, E/2) interleaved rows back to (n, E/2, 2)... i.e.
    each head's rows from [pairs interleaved] back to HF's [first half; second half]."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- tensor sources


class SafetensorsSource:
    """Reads named tensors from an HF directory (single file or sharded index)."""

    def __init__(self, directory: str):
        from safetensors import safe_open

        index_path = os.path.join(directory, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        else:
            single = os.path.join(directory, "model.safetensors")
            if not os.path.isfile(single):
                raise ConfigError(f"{directory}: no model.safetensors or model.safetensors.index.json "
                                  "(only safetensors checkpoints are loaded)")
            with safe_open(single, "np") as f:
                weight_map = {name: "model.safetensors" for name in f.keys()}
        self._files = {name: os.path.join(directory, file) for name, file in weight_map.items()}
        self._open = functools.lru_cache(maxsize=None)(lambda path: safe_open(path, "np"))

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def get(self, name: str) -> np.ndarray:
        return self._open(self._files[name]).get_tensor(name)


class GGUFSource:
    """Reads and dequantises named tensors from a GGUF file (memory-mapped)."""

    def __init__(self, path: str):
        import gguf

        self._gguf = gguf
        self.reader = gguf.GGUFReader(path)
        self._tensors = {t.name: t for t in self.reader.tensors}

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def get(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        data = self._gguf.quants.dequantize(t.data, t.tensor_type)
        return np.asarray(data, dtype=np.float32)

    def field(self, key: str, default=None):
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def config(self, **run_options) -> LlamaConfig:
        arch = self.field("general.architecture")
        if arch not in ("llama", "qwen2", "qwen3"):
            raise ConfigError(f"GGUF architecture {arch!r} is not supported (llama, qwen2, qwen3)")
        heads = self.field(f"{arch}.attention.head_count")
        hidden = self.field(f"{arch}.embedding_length")
        return LlamaConfig(
            family=arch, vocab_size=int(self._tensors["token_embd.weight"].shape[-1]),
            hidden_size=hidden, intermediate_size=self.field(f"{arch}.feed_forward_length"),
            num_layers=self.field(f"{arch}.block_count"), num_heads=heads,
            num_kv_heads=self.field(f"{arch}.attention.head_count_kv", heads),
            head_dim=self.field(f"{arch}.attention.key_length", hidden // heads),
            rope_theta=float(self.field(f"{arch}.rope.freq_base", 10000.0)),
            rms_norm_eps=float(self.field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
            tie_word_embeddings="output.weight" not in self, qkv_bias=arch == "qwen2",
            qk_norm=arch == "qwen3",
            max_position_embeddings=self.field(f"{arch}.context_length", 4096), **run_options)


# ------------------------------------------------------------------------- streaming loader


def _leaf_reader(source, name: str, convert: Callable, stacked: bool, num_layers: int,
                 shape: tuple):
    """index -> numpy block of our leaf (one layer's `shape`), reading only the layers the index
    selects; a missing or wrong-shaped tensor is a ConfigError naming it."""
    @functools.lru_cache(maxsize=2)  # shards of one leaf usually ask for the same layer in turn
    def layer_tensor(i):
        tensor_name = name.format(i=i)
        if tensor_name not in source:
            raise ConfigError(f"checkpoint is missing tensor {tensor_name}")
        tensor = convert(source.get(tensor_name))
        if tuple(tensor.shape) != tuple(shape):
            raise ConfigError(f"checkpoint tensor {tensor_name} has shape {list(tensor.shape)}, "
                              f"the config asks for {list(shape)}")
        return tensor

    def read(index: tuple) -> np.ndarray:
        if not stacked:
            return layer_tensor(0)[index]
        layers = range(num_layers)[index[0]]
        return np.stack([layer_tensor(i)[index[1:]] for i in layers])

    return read


def load_params(source, layout: dict, cfg: LlamaConfig, mesh: Mesh, dtype) -> Params:
    """Builds every leaf directly in its NamedSharding from `source`."""
    flat_specs = traverse_util.flatten_dict(param_specs(cfg), sep="/", is_leaf=lambda _, x: is_spec(x))
    flat = {}
    for path, spec in flat_specs.items():
        name, convert = layout[path]
        stacked = path.startswith("layers/")
        if (name.format(i=0) if stacked else name) not in source:
            raise ConfigError(f"checkpoint is missing tensor {name.format(i=0)} (for {path})")
        read = _leaf_reader(source, name, convert, stacked, cfg.num_layers,
                            spec.shape[1:] if stacked else spec.shape)
        sharding = named_sharding(mesh, spec.axes, spec.shape)
        flat[path] = jax.make_array_from_callback(
            spec.shape, sharding, lambda idx, r=read: np.asarray(r(idx), dtype=dtype))
    return traverse_util.unflatten_dict(flat, sep="/")


def load_checkpoint(kind: str, path: str, mesh: Mesh, dtype=np.float32, **run_options):
    """(LlamaConfig, params) from an HF directory (kind "hf") or a GGUF file (kind "gguf")."""
    if kind == "hf":
        with open(os.path.join(path, "config.json")) as f:
            cfg = config_from_hf(json.load(f), **run_options)
        source, layout = SafetensorsSource(path), hf_layout(cfg)
    else:
        source = GGUFSource(path)
        cfg = source.config(**run_options)
        layout = _gguf_layout(cfg)
    return cfg, load_params(source, layout, cfg, mesh, dtype)


# ---------------------------------------------------------------------------------- export


def _to_hf_tensor(path: str, leaf: np.ndarray, cfg: LlamaConfig) -> np.ndarray:
    """Inverse of the `hf_layout` conversions for one layer's (or an unstacked) tensor."""
    if path in ("layers/wq", "layers/wk", "layers/wv"):  # [D, n, E] -> [n*E, D]
        return leaf.transpose(1, 2, 0).reshape(-1, leaf.shape[0])
    if path == "layers/wo":  # [H, E, D] -> [D, H*E]
        return leaf.transpose(2, 0, 1).reshape(leaf.shape[2], -1)
    if path in ("layers/w_gate", "layers/w_up", "layers/w_down", "lm_head"):
        return leaf.T
    if path in ("layers/bq", "layers/bk", "layers/bv"):
        return leaf.reshape(-1)
    return leaf


def check_export_dir(directory: str) -> None:
    """A ConfigError naming `directory` unless it is, or can be made, a writable directory; run
    before loading the model, so a bad output path fails fast instead of after the load."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ConfigError(f"{directory}: exists and is not a directory (export writes a directory)")
    existing = os.path.abspath(directory)
    while not os.path.exists(existing):  # the missing folders get made inside this one
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{directory}: cannot make the directory: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "directory is" if existing == os.path.abspath(directory) else f"parent {existing} is"
        raise ConfigError(f"{directory}: cannot export there: the {what} not writable")


def export_hf(directory: str, params: Params, cfg: LlamaConfig, tokenizer=None,
              dtype: str = "float32") -> None:
    """Writes config.json + model.safetensors (+ tokenizer files) that transformers loads as is."""
    from safetensors.numpy import save_file

    check_export_dir(directory)
    os.makedirs(directory, exist_ok=True)
    layout = hf_layout(cfg)
    tensors = {}
    for path, leaf in traverse_util.flatten_dict(params, sep="/").items():
        array = np.asarray(jax.device_get(leaf)).astype(np.dtype(dtype) if dtype != "bfloat16"
                                                        else jax.numpy.bfloat16)
        name = layout[path][0]
        if path.startswith("layers/"):
            for i in range(cfg.num_layers):
                tensors[name.format(i=i)] = np.ascontiguousarray(_to_hf_tensor(path, array[i], cfg))
        else:
            tensors[name] = np.ascontiguousarray(_to_hf_tensor(path, array, cfg))
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    token_ids = {}
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
        token_ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                     "bos_token_id": tokenizer.bos_token_id}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config_from(cfg, dtype, **token_ids), f, indent=2)
