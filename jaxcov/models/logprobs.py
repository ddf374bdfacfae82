"""Per-token log-probabilities and entropies of given token ids, computed in sequence chunks.

The full B x T x V fp32 logits (16 x 1024 x 49152 x 4 bytes = 3.2 GB) never exist at once:
hidden states are split into chunks along the sequence and each chunk's logits are made, reduced
to (log-prob, entropy) and dropped. When the logits of the whole batch would exceed
`SAVED_LOGITS_LIMIT_BYTES`, the chunk function is rematerialised, so the backward pass recomputes
a chunk's logits (one more [tokens x D x V] matmul) instead of storing them; below it (short RL
micro-batches of a small model) they are kept, which saves ~10% of a SmolLM2 forward+backward.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxcov.models.llama import LlamaConfig, Params, forward_hidden, unembed_matrix
from jaxcov.sharding import constrain

# fp32 logits of a [B, T] batch up to this size are kept for the backward pass (with the
# probabilities derived from them, about 3x this in residuals); larger ones are recomputed.
SAVED_LOGITS_LIMIT_BYTES = 512 * 2**20


def _chunk_stats(h_bcd, targets_bc, w_dv, temperature):
    logits = jnp.einsum("bcd,dv->bcv", h_bcd, w_dv, preferred_element_type=jnp.float32)
    logits = logits / temperature
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets_bc[..., None], axis=-1)[..., 0]
    probs = jnp.exp(logits - log_z[..., None])
    entropy = log_z - jnp.sum(probs * logits, axis=-1)
    return target_logit - log_z, entropy


def logprobs_from_hidden(h_btd: jax.Array, w_dv: jax.Array, targets_bt: jax.Array,
                         chunk: int, temperature: float = 1.0):
    """log p(targets[t] | h[t]) and the entropy at each position, both [B, T] fp32."""
    B, T, D = h_btd.shape
    chunk = min(chunk, T)
    pad = -T % chunk
    h = jnp.pad(h_btd, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets_bt, ((0, 0), (0, pad)))
    n = (T + pad) // chunk
    h_nbcd = h.reshape(B, n, chunk, D).swapaxes(0, 1)
    targets_nbc = targets.reshape(B, n, chunk).swapaxes(0, 1)
    stats = lambda xs: _chunk_stats(xs[0], xs[1], w_dv, temperature)  # noqa: E731
    if B * T * w_dv.shape[1] * 4 > SAVED_LOGITS_LIMIT_BYTES:
        stats = jax.checkpoint(stats)
    logp_nbc, ent_nbc = jax.lax.map(stats, (h_nbcd, targets_nbc))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(B, T + pad)[:, :T]  # noqa: E731
    return unchunk(logp_nbc), unchunk(ent_nbc)


def token_logprobs(params: Params, cfg: LlamaConfig, tokens_bt: jax.Array,
                   attention_mask_bt: jax.Array, mesh: Optional[Mesh] = None,
                   chunk: int = 128, temperature: float = 1.0):
    """Log-prob and entropy of each token given the tokens before it.

    Returns `(logp_bt, entropy_bt)`, both [B, T] fp32, aligned with `tokens_bt`: index t scores
    token t under the distribution predicted at t-1 (index 0 has no prediction and is 0).
    """
    h, _ = forward_hidden(params, cfg, tokens_bt, attention_mask_bt, mesh=mesh)
    w = unembed_matrix(params, cfg).astype(cfg.dtype)
    logp, ent = logprobs_from_hidden(h[:, :-1], w, tokens_bt[:, 1:], chunk, temperature)
    logp = jnp.pad(logp, ((0, 0), (1, 0)))
    ent = jnp.pad(ent, ((0, 0), (1, 0)))
    return constrain(logp, mesh, ("batch", "seq")), constrain(ent, mesh, ("batch", "seq"))
