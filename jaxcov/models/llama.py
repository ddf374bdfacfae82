"""Llama-family decoder (Llama 2/3.x, SmolLM2, Mistral, Qwen2/2.5, Qwen3) as pure functions.

One forward covers the families through flags in `LlamaConfig`: q/k/v bias (Qwen2), q/k RMSNorm
(Qwen3), tied or untied embeddings, llama3 rope scaling, sliding-window attention (Mistral).

Parameters are a nested dict of arrays; layers are stacked on a leading axis and run with
`lax.scan`, so compile time does not grow with depth. `param_specs` is the abstract form of the
tree (shape + logical axes) and drives init, sharding, loading and `eval_shape` from one place.

Einsum letters:
  B batch        T query positions     S key positions (cache slots)
  D model dim    H query heads         K kv heads          G query heads per kv head (H = K*G)
  E head dim     F mlp hidden          V vocab             L layers
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh

from jaxcov.models import attention as attn_lib
from jaxcov.sharding import constrain

Params = dict[str, Any]

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture plus the static run options of the forward pass (hashable: a jit static arg)."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    # ("llama3", factor, low_freq_factor, high_freq_factor, original_max_position) or
    # ("linear", factor) or None.
    rope_scaling: Optional[tuple] = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: Optional[int] = None
    max_position_embeddings: int = 4096
    # Run options.
    compute_dtype: str = "float32"
    remat: str = "full"
    attention: str = "chunked"  # an `attention.IMPLEMENTATIONS` name (resolved, never "auto")
    attention_block: int = 512
    # The platform the programs are built for. "cpu" selects the CPU fast path (hand-written
    # layer backward); others use autodiff around the attention kernel, with nothing tuned for
    # XLA:CPU.
    platform: str = "cpu"

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; known: {FAMILIES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")

    @property
    def dtype(self):
        return jnp.dtype(self.compute_dtype)

    def attention_spec(self, q_offset: int = 0) -> attn_lib.Spec:
        return attn_lib.Spec(impl=self.attention, window=self.sliding_window, q_offset=q_offset,
                             block=self.attention_block, platform=self.platform)

    @property
    def cpu_fast_path(self) -> bool:
        """Whether training layers run `_train_block` (hand-written backward, CPU layouts)."""
        return self.platform == "cpu" and self.attention in ("dense", "chunked")

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)


class ParamSpec(NamedTuple):
    shape: tuple[int, ...]
    axes: tuple[Optional[str], ...]
    init: str  # "normal" | "ones" | "zeros"


def param_specs(cfg: LlamaConfig) -> Params:
    """Shape, logical axes and initialiser of every parameter."""
    L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    H, K, E = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    layer = {
        "attn_norm": ParamSpec((L, D), ("layers", "act_embed"), "ones"),
        "wq": ParamSpec((L, D, H, E), ("layers", "embed", "heads", "head_dim"), "normal"),
        "wk": ParamSpec((L, D, K, E), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
        "wv": ParamSpec((L, D, K, E), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
        "wo": ParamSpec((L, H, E, D), ("layers", "heads", "head_dim", "embed"), "normal"),
        "mlp_norm": ParamSpec((L, D), ("layers", "act_embed"), "ones"),
        "w_gate": ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal"),
        "w_up": ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal"),
        "w_down": ParamSpec((L, F, D), ("layers", "mlp", "embed"), "normal"),
    }
    if cfg.qkv_bias:
        layer["bq"] = ParamSpec((L, H, E), ("layers", "heads", "head_dim"), "zeros")
        layer["bk"] = ParamSpec((L, K, E), ("layers", "kv_heads", "head_dim"), "zeros")
        layer["bv"] = ParamSpec((L, K, E), ("layers", "kv_heads", "head_dim"), "zeros")
    if cfg.qk_norm:
        layer["q_norm"] = ParamSpec((L, E), ("layers", "head_dim"), "ones")
        layer["k_norm"] = ParamSpec((L, E), ("layers", "head_dim"), "ones")
    specs = {
        "embed": ParamSpec((V, D), ("vocab", "embed"), "normal"),
        "layers": layer,
        "final_norm": ParamSpec((D,), ("act_embed",), "ones"),
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ParamSpec((D, V), ("embed", "vocab"), "normal")
    return specs


def is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def init_params(cfg: LlamaConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random parameters (normal(std) matrices, unit norms, zero biases). Jit it with
    `out_shardings` to create them directly in place (see `jaxcov.models.api`)."""
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    keys = jax.random.split(key, len(leaves))

    def make(spec: ParamSpec, k):
        if spec.init == "ones":
            return jnp.ones(spec.shape, dtype)
        if spec.init == "zeros":
            return jnp.zeros(spec.shape, dtype)
        return (std * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)

    return jax.tree.unflatten(treedef, [make(s, k) for s, k in zip(leaves, keys)])


# ---------------------------------------------------------------------------------- components


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in fp32 (as the reference implementations do), cast back to x's dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * normed).astype(x.dtype)


def rope_inv_freq(cfg: LlamaConfig) -> jax.Array:
    """Inverse rotary frequencies [E/2], with llama3 / linear scaling applied."""
    exponents = jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** exponents)
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling[0] == "linear":
        return inv_freq / scaling[1]
    if scaling[0] == "llama3":
        return _llama3_scaled(inv_freq, *scaling[1:])
    raise ValueError(f"unsupported rope scaling {scaling[0]!r}")


def _llama3_scaled(inv_freq, factor, low_freq_factor, high_freq_factor, original_max_position):
    low_freq_wavelen = original_max_position / low_freq_factor
    high_freq_wavelen = original_max_position / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x_bthe: jax.Array, positions_bt: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding in the half-split layout used by HF checkpoints."""
    angles = positions_bt[..., None].astype(jnp.float32) * inv_freq  # [B, T, E/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x_bthe.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_bthe.dtype)


def attention_mask(valid_bs: jax.Array, query_slots_bt: jax.Array, window: Optional[int]):
    """[B, T, S] bool: key slot is real, not in the future, and inside the sliding window."""
    key_slots = jnp.arange(valid_bs.shape[1])[None, None, :]
    query_slots = query_slots_bt[:, :, None]
    mask = valid_bs[:, None, :] & (key_slots <= query_slots)
    if window is not None:
        mask &= (query_slots - key_slots) < window
    return mask


# The CPU training path attends in a head-major layout ([B, K, G, T, E], `attention.to_heads`):
# every matmul of the forward and the hand-written backward is then a plain batched product
# over (b, k), which XLA:CPU runs about twice as fast as [B, T, K, G, E] einsums (those
# transpose inside every dot); the layout changes happen once, fused into rope (q, k) and into
# the out-projection's input.


def project(spec: str, x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """einsum in `dtype` with fp32 accumulation, cast back to `dtype`. (Asking for the fp32
    result keeps XLA:CPU on its fast bf16 kernels; otherwise it upcasts the weights every call.)"""
    out = jnp.einsum(spec, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
    return out.astype(dtype)


def weight_grad(x_axes: str, dy_axes: str, w_axes: str, x: jax.Array, dy: jax.Array) -> jax.Array:
    """fp32 gradient w.r.t. w of `einsum(f"{x_axes},{w_axes}->{dy_axes}", x, w)`.

    XLA:CPU transposes the dot operand whose free axes lead the output. Autodiff's order made it
    transpose the wide activation gradient (e.g. [B*T, 1536] in the MLP) before every weight
    gradient (~20% of a SmolLM2 backward). Here the narrower of x and dy leads, and the small
    weight-sized result is transposed instead.
    """
    narrow, narrow_axes, wide, wide_axes = ((x, x_axes, dy, dy_axes) if x.size <= dy.size
                                            else (dy, dy_axes, x, x_axes))
    order = "".join(sorted(w_axes, key=lambda a: a not in narrow_axes))
    grad = jnp.einsum(f"{narrow_axes},{wide_axes}->{order}", narrow, wide,
                      preferred_element_type=jnp.float32)
    # The barrier keeps XLA from folding the transpose back into the dot, which would leave a
    # transposed-operand dot that XLA:CPU's fast kernels do not take (and its fallback has
    # no bf16 x bf16 -> f32).
    grad = jax.lax.optimization_barrier(grad)
    return jnp.transpose(grad, [order.index(a) for a in w_axes])


def input_grad(dy_axes: str, w_axes: str, x_axes: str, dy: jax.Array, w: jax.Array, dtype):
    """fp32 gradient w.r.t. x of `einsum(f"{x_axes},{w_axes}->{dy_axes}", x, w)`."""
    return jnp.einsum(f"{dy_axes},{w_axes}->{x_axes}", dy.astype(dtype), w.astype(dtype),
                      preferred_element_type=jnp.float32)


def gate_up(x_btd, layer, dtype):
    return (project("btd,df->btf", x_btd, layer["w_gate"], dtype),
            project("btd,df->btf", x_btd, layer["w_up"], dtype))


def mlp(x_btd, layer, dtype) -> jax.Array:
    gate, up = gate_up(x_btd, layer, dtype)
    return project("btf,fd->btd", jax.nn.silu(gate) * up, layer["w_down"], dtype)


# ------------------------------------------------------------------------------------ the block


def qkv_projections(x_btd, layer, cfg: LlamaConfig):
    """q [B, T, H, E], k and v [B, T, K, E], biases added, before q/k norm and rope."""
    dtype = cfg.dtype
    q = project("btd,dhe->bthe", x_btd, layer["wq"], dtype)
    k = project("btd,dke->btke", x_btd, layer["wk"], dtype)
    v = project("btd,dke->btke", x_btd, layer["wv"], dtype)
    if cfg.qkv_bias:
        q = q + layer["bq"].astype(dtype)
        k = k + layer["bk"].astype(dtype)
        v = v + layer["bv"].astype(dtype)
    return q, k, v


def finish_qk(q_bthe, k_btke, qk_norms: Params, positions_bt, cfg: LlamaConfig, inv_freq):
    """q/k RMSNorm (Qwen3; `qk_norms` holds q_norm and k_norm) and rope."""
    if cfg.qk_norm:
        q_bthe = rms_norm(q_bthe, qk_norms["q_norm"], cfg.rms_norm_eps)
        k_btke = rms_norm(k_btke, qk_norms["k_norm"], cfg.rms_norm_eps)
    return apply_rope(q_bthe, positions_bt, inv_freq), apply_rope(k_btke, positions_bt, inv_freq)


def qk_norm_weights(layer: Params) -> Params:
    return {name: layer[name] for name in ("q_norm", "k_norm") if name in layer}


class LayerResiduals(NamedTuple):
    """What `_train_block`'s backward pass reads: the layer input, the matmul outputs and the
    attention weights. Norms, rope and SwiGLU are recomputed or inverted from them (elementwise
    work), which costs less than autodiff's stacking of every intermediate (about twice the
    memory)."""

    h: jax.Array  # [B, T, D] layer input
    q: Optional[jax.Array]  # [B, T, H, E] projections before q/k norm and rope (qk_norm only)
    k: Optional[jax.Array]  # [B, T, K, E]
    v: Optional[jax.Array]  # [B, T, K, E] (training keeps the head-major `heads` instead)
    probs: Any  # what the attention keeps for its backward (`attention.HeadsResidual`) or None
    attn: jax.Array  # [B, T, H, E] attention output
    h_mid: jax.Array  # [B, T, D] after the attention residual
    gate: jax.Array  # [B, T, F]
    up: jax.Array  # [B, T, F]
    heads: Optional[tuple] = None  # training: q [B, K, G, T, E], k, v [B, K, T, E] (after rope)


# attention(q [B, T, H, E], k, v [B, T, K, E]) -> (output [B, T, H, E], softmax weights or None,
# anything the caller wants back, e.g. an updated KV cache).
Attention = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any, Any]]


def layer_forward(h_btd, layer, attention: Attention, positions_bt, inv_freq,
                  cfg: LlamaConfig, mesh):
    """One decoder layer around a given attention step: training (within the T tokens),
    a KV cache (`block`) or the sampler's prefill and decode. Returns the layer output, its
    `LayerResiduals` (unused ones cost nothing under jit) and `attention`'s extra."""
    dtype, eps = cfg.dtype, cfg.rms_norm_eps
    q_raw, k_raw, v = qkv_projections(rms_norm(h_btd, layer["attn_norm"], eps), layer, cfg)
    q, k = finish_qk(q_raw, k_raw, qk_norm_weights(layer), positions_bt, cfg, inv_freq)
    attn, probs, extra = attention(constrain(q, mesh, ("batch", "seq", "heads", "head_dim")), k, v)
    # Flattening (h, e) first keeps XLA from transposing wo instead of the small activation
    # (decode ~5% faster in fp32; the same for the training forward).
    B, T, D = h_btd.shape
    h_mid = h_btd + project("btf,fd->btd", attn.reshape(B, T, -1), layer["wo"].reshape(-1, D),
                            dtype)
    h_mid = constrain(h_mid, mesh, ("batch", "seq", "act_embed"))
    gate, up = gate_up(rms_norm(h_mid, layer["mlp_norm"], eps), layer, dtype)
    out = h_mid + project("btf,fd->btd", jax.nn.silu(gate) * up, layer["w_down"], dtype)
    out = constrain(out, mesh, ("batch", "seq", "act_embed"))
    return out, LayerResiduals(h_btd, q_raw, k_raw, v, probs, attn, h_mid, gate, up), extra


def block(h_btd, layer, ctx: "_Context"):
    """One decoder layer attending within the T given tokens (training and scoring; decoding
    with a cache is `jaxcov.models.decode`). The CPU fast path is `_train_block` (hand-written
    backward); elsewhere the layer is autodiff around `cfg.attention`'s kernel, under the
    scan's remat policy.
    """
    cfg = ctx.cfg
    if cfg.cpu_fast_path:
        return _train_block(cfg, ctx.mesh, h_btd, layer, ctx.positions_bt, ctx.valid_bs,
                            ctx.inv_freq)

    def attention_within(q, k, v):
        return attn_lib.attention(q, k, v, ctx.valid_bs, cfg.attention_spec(), ctx.mesh), \
            None, None
    out, _, _ = layer_forward(h_btd, layer, attention_within, ctx.positions_bt, ctx.inv_freq,
                              cfg, ctx.mesh)
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _train_block(cfg: LlamaConfig, mesh, h_btd, layer, positions_bt, valid_bt, inv_freq):
    """A decoder layer without cache, with a hand-written backward pass (`_block_backward`)."""
    return _block_forward(cfg, mesh, h_btd, layer, positions_bt, valid_bt, inv_freq)[0]


def _block_forward(cfg: LlamaConfig, mesh, h_btd, layer, positions_bt, valid_bt, inv_freq):
    """(layer output, `LayerResiduals`) attending within the T tokens (real ones: `valid_bt`),
    head-major through `attention.heads_forward`."""
    K, spec = cfg.num_kv_heads, cfg.attention_spec()

    def attention_within(q, k, v):
        heads = (attn_lib.to_heads(q, K),) + tuple(x.transpose(0, 2, 1, 3) for x in (k, v))
        out, saved = attn_lib.heads_forward(*heads, valid_bt, spec)
        saved = _kept_under_full_remat(saved)
        # The named output feeds the rest of the layer, so recomputing it needs no attention.
        out = out if saved.out is None else saved.out
        return attn_lib.from_heads(out), saved, heads

    out, saved, heads = layer_forward(h_btd, layer, attention_within, positions_bt, inv_freq,
                                      cfg, mesh)
    # The backward reads q, k, v head-major; it inverts rope on the gradients, so it needs the
    # projections before rope only for the q/k norms' gradient.
    saved = saved._replace(v=None, heads=heads)
    if not cfg.qk_norm:
        saved = saved._replace(q=None, k=None)
    return out, saved


# Under remat full the CPU fast path still keeps chunked attention's output and log-sum-exp
# (O(T), about one hidden state per layer), so the backward pass recomputes the projections
# and the MLP but not the attention forward, the costliest part of a long layer. Only this
# path names them: the accelerator path runs its kernels under plain nothing_saveable.
KEPT_ATTENTION = "chunked_attention_stats"


def _kept_under_full_remat(saved: attn_lib.HeadsResidual) -> attn_lib.HeadsResidual:
    """`saved` with chunked attention's O(T) statistics named KEPT_ATTENTION (the one-block
    softmax weights stay unnamed: [B, H, T, T] is recomputed rather than kept per layer)."""
    if saved.out is None:
        return saved
    return saved._replace(out=checkpoint_name(saved.out, KEPT_ATTENTION),
                          lse=checkpoint_name(saved.lse, KEPT_ATTENTION))


def _train_block_fwd(cfg, mesh, h_btd, layer, positions_bt, valid_bt, inv_freq):
    out, saved = _block_forward(cfg, mesh, h_btd, layer, positions_bt, valid_bt, inv_freq)
    return out, (saved, layer, positions_bt, valid_bt, inv_freq)


def _train_block_bwd(cfg, mesh, residuals, d_out):
    saved, layer, positions_bt, valid_bt, inv_freq = residuals
    d_h, grads = _block_backward(cfg, saved, layer, positions_bt, valid_bt, inv_freq, d_out)
    d_h = constrain(d_h, mesh, ("batch", "seq", "act_embed"))
    grads = {name: grads[name].astype(w.dtype) for name, w in layer.items()}
    return d_h, grads, None, None, None


_train_block.defvjp(_train_block_fwd, _train_block_bwd)


def _block_backward(cfg: LlamaConfig, saved: LayerResiduals, layer, positions_bt, valid_bt,
                    inv_freq, d_out):
    """(d layer input, {weight name: fp32 gradient}) of one layer, from `LayerResiduals`."""
    dtype, eps = cfg.dtype, cfg.rms_norm_eps
    norm = functools.partial(rms_norm, eps=eps)
    grads = {}
    x_mlp, mlp_norm_vjp = jax.vjp(norm, saved.h_mid, layer["mlp_norm"])
    d_x_mlp, mlp_grads = _swiglu_backward(x_mlp, saved.gate, saved.up, layer, d_out, dtype)
    grads.update(mlp_grads)
    d_h_mid, grads["mlp_norm"] = mlp_norm_vjp(d_x_mlp.astype(x_mlp.dtype))
    d_h_mid = d_h_mid + d_out

    d_attn = input_grad("btd", "hed", "bthe", d_h_mid, layer["wo"], dtype).astype(dtype)
    grads["wo"] = weight_grad("bthe", "btd", "hed", saved.attn, d_h_mid.astype(dtype))
    d_q, d_k, d_v = _attention_backward(saved, valid_bt, d_attn, cfg)
    d_q, d_k, norm_grads = _finish_qk_backward(d_q.astype(dtype), d_k.astype(dtype), saved,
                                               layer, positions_bt, cfg, inv_freq)
    grads.update(norm_grads)

    x, attn_norm_vjp = jax.vjp(norm, saved.h, layer["attn_norm"])
    d_x, qkv_grads = _qkv_backward(x, layer, d_q, d_k, d_v.astype(dtype), cfg)
    grads.update(qkv_grads)
    d_h, grads["attn_norm"] = attn_norm_vjp(d_x.astype(x.dtype))
    return d_h + d_h_mid, grads


def _attention_backward(saved: LayerResiduals, valid_bt, d_attn_bthe, cfg: LlamaConfig):
    """fp32 (d q [B, T, H, E], d k, d v [B, T, K, E]) of the head-major training attention."""
    d_out = attn_lib.to_heads(d_attn_bthe, cfg.num_kv_heads)
    d_q, d_k, d_v = attn_lib.heads_backward(*saved.heads, valid_bt, saved.probs, d_out,
                                            cfg.attention_spec())
    return attn_lib.from_heads(d_q), d_k.transpose(0, 2, 1, 3), d_v.transpose(0, 2, 1, 3)


def _swiglu_backward(x_btd, gate, up, layer, d_out, dtype):
    """d x and the MLP weight gradients of down(silu(gate) * up), silu recomputed from gate."""
    gate32, up32 = gate.astype(jnp.float32), up.astype(jnp.float32)
    sig = jax.nn.sigmoid(gate32)
    silu = (gate32 * sig).astype(dtype)
    hidden, d_out = silu * up, d_out.astype(dtype)
    d_hidden = input_grad("btd", "fd", "btf", d_out, layer["w_down"], dtype)
    d_up = (d_hidden * silu.astype(jnp.float32)).astype(dtype)
    d_gate = (d_hidden * up32 * sig * (1 + gate32 * (1 - sig))).astype(dtype)
    d_x = (input_grad("btf", "df", "btd", d_gate, layer["w_gate"], dtype)
           + input_grad("btf", "df", "btd", d_up, layer["w_up"], dtype))
    x = x_btd.astype(dtype)
    return d_x, {"w_gate": weight_grad("btd", "btf", "df", x, d_gate),
                 "w_up": weight_grad("btd", "btf", "df", x, d_up),
                 "w_down": weight_grad("btf", "btd", "fd", hidden, d_out)}


def _finish_qk_backward(d_q, d_k, saved: LayerResiduals, layer, positions_bt,
                        cfg: LlamaConfig, inv_freq):
    """(d q, d k) before `finish_qk` and the q/k norm gradients. Rope is a rotation, so its
    backward is the rotation by the opposite angle; the q/k norms (Qwen3) go through autodiff
    from the saved projections."""
    d_q = apply_rope(d_q, positions_bt, -inv_freq)
    d_k = apply_rope(d_k, positions_bt, -inv_freq)
    if not cfg.qk_norm:
        return d_q, d_k, {}
    norm = functools.partial(rms_norm, eps=cfg.rms_norm_eps)
    _, q_vjp = jax.vjp(norm, saved.q, layer["q_norm"])
    _, k_vjp = jax.vjp(norm, saved.k, layer["k_norm"])
    (d_q, d_q_norm), (d_k, d_k_norm) = q_vjp(d_q), k_vjp(d_k)
    return d_q, d_k, {"q_norm": d_q_norm, "k_norm": d_k_norm}


def _qkv_backward(x_btd, layer, d_q, d_k, d_v, cfg: LlamaConfig):
    """d x and the gradients of the q/k/v projections (and their biases)."""
    dtype = cfg.dtype
    x = x_btd.astype(dtype)
    d_x = (input_grad("bthe", "dhe", "btd", d_q, layer["wq"], dtype)
           + input_grad("btke", "dke", "btd", d_k, layer["wk"], dtype)
           + input_grad("btke", "dke", "btd", d_v, layer["wv"], dtype))
    grads = {"wq": weight_grad("btd", "bthe", "dhe", x, d_q),
             "wk": weight_grad("btd", "btke", "dke", x, d_k),
             "wv": weight_grad("btd", "btke", "dke", x, d_v)}
    if cfg.qkv_bias:
        for name, d in (("bq", d_q), ("bk", d_k), ("bv", d_v)):
            grads[name] = jnp.sum(d.astype(jnp.float32), axis=(0, 1))
    return d_x, grads


@dataclasses.dataclass(frozen=True)
class _Context:
    """Per-call values every layer needs (closed over by the scanned layer function)."""

    cfg: LlamaConfig
    mesh: Optional[Mesh]
    positions_bt: jax.Array
    valid_bs: jax.Array  # [B, T] real tokens
    inv_freq: jax.Array


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.save_only_these_names(KEPT_ATTENTION),
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _scan_layers(layers: Params, h_btd, ctx: _Context):
    """Runs every layer with `lax.scan` over the stacked layer parameters."""
    def body(h, layer):
        return block(h, layer, ctx), None

    if ctx.cfg.remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[ctx.cfg.remat])
    return jax.lax.scan(body, h_btd, layers)[0]


def default_positions(attention_mask_bt: jax.Array) -> jax.Array:
    """Positions that count only real tokens, so left padding does not shift them."""
    return jnp.maximum(jnp.cumsum(attention_mask_bt.astype(jnp.int32), axis=1) - 1, 0)


def forward_hidden(params: Params, cfg: LlamaConfig, tokens_bt: jax.Array,
                   attention_mask_bt: jax.Array, positions_bt: Optional[jax.Array] = None,
                   mesh: Optional[Mesh] = None) -> jax.Array:
    """Final-norm hidden states [B, T, D] of T tokens per row attending to each other
    (training / scoring; the sampler's cached forward is `jaxcov.models.decode`)."""
    positions_bt = default_positions(attention_mask_bt) if positions_bt is None else positions_bt
    ctx = _Context(cfg, mesh, positions_bt, attention_mask_bt.astype(bool), rope_inv_freq(cfg))
    # Gather rows from a whole table: XLA cannot gather from a vocab-split table without
    # replicating it anyway, and says so with "involuntary full rematerialization".
    embed = constrain(params["embed"], mesh, (None, None))
    h = jnp.take(embed, tokens_bt, axis=0).astype(cfg.dtype)
    h = constrain(h, mesh, ("batch", "seq", "act_embed"))
    h = _scan_layers(params["layers"], h, ctx)
    return rms_norm(h, params["final_norm"], cfg.rms_norm_eps)


def unembed_matrix(params: Params, cfg: LlamaConfig) -> jax.Array:
    """[D, V] output projection (the transposed embedding when tied)."""
    return params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]


def unembed_rows(params: Params, cfg: LlamaConfig) -> jax.Array:
    """[V, D] output projection in the compute dtype, one row per token id (the embedding
    itself when tied), as the chunked log-prob head reads it (`jaxcov.models.logprobs`)."""
    w = params["embed"] if cfg.tie_word_embeddings else params["lm_head"].T
    return w.astype(cfg.dtype)


def logits_from_hidden(params: Params, cfg: LlamaConfig, h_btd: jax.Array) -> jax.Array:
    w = unembed_matrix(params, cfg).astype(cfg.dtype)
    return jnp.einsum("btd,dv->btv", h_btd, w, preferred_element_type=jnp.float32)


def forward(params: Params, cfg: LlamaConfig, tokens_bt: jax.Array, attention_mask_bt: jax.Array,
            positions_bt: Optional[jax.Array] = None, mesh: Optional[Mesh] = None) -> jax.Array:
    """fp32 logits [B, T, V]."""
    h = forward_hidden(params, cfg, tokens_bt, attention_mask_bt, positions_bt, mesh)
    return logits_from_hidden(params, cfg, h)
