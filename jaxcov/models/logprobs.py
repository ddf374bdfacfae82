"""Per-token log-probabilities and entropies of given token ids, computed in chunks.

The full B x T x V fp32 logits (16 x 1024 x 49152 x 4 bytes = 3.2 GB) never exist at once.
Hidden states are split into chunks along the sequence, and each chunk's logits are made one
vocabulary chunk at a time (`VOCAB_CHUNK` ids), folded into an online log-sum-exp, target logit
and entropy, and dropped. A [tokens x 2048] fp32 block stays in cache between the matmul that
makes it and the reductions that read it; whole-vocabulary logits did not (SmolLM2 16 x 128: head
forward 1.02 -> 0.76 s, forward+backward 2.8 -> 2.2 s, `bench/RESULTS.md`).

The backward pass is written by hand (`_head_stats_bwd`): per vocabulary chunk, the logit
gradient onehot - p (plus the entropy term) and its two matmuls. It reads the chunk logits saved
by the forward when the logits of the whole batch stay under `SAVED_LOGITS_LIMIT_BYTES` (short RL
micro-batches of a small model) and recomputes them (one more [tokens x D x V] matmul) above it.

On a mesh whose `tensor` axis splits the vocabulary, every chunk takes ids from every tensor
device's block (`VocabChunks`), so the chunk loop stays local to each device.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxcov.models.llama import LlamaConfig, Params, forward_hidden, unembed_rows
from jaxcov.sharding import constrain

# fp32 logits of a [B, T] batch up to this size are kept for the backward pass; larger ones are
# recomputed there.
SAVED_LOGITS_LIMIT_BYTES = 512 * 2**20
# Vocabulary ids per logits block (about: the vocabulary is cut into equal chunks).
VOCAB_CHUNK = 2048
# Rows (batch x positions) per sequence chunk at least: a long single row scored 128
# positions at a time ran its head matmuls at 60% of the speed of 2048-row ones (XLA:CPU).
MIN_CHUNK_ROWS = 2048
# Logit of the padding ids that make the vocabulary a multiple of the chunk count: finite, so
# that exp() gives 0 and 0 * logit stays 0 (no NaN) in the entropy sums.
_PAD_LOGIT = -1e30


class VocabChunks(NamedTuple):
    """How the [V, D] output projection is cut into `count` chunks of `size` ids.

    The vocabulary is split over the `tensor` mesh axis in `shards` contiguous blocks; chunk k
    takes `size / shards` consecutive ids of every block, so each chunk has rows on every
    tensor device and the loop over chunks stays local. With one shard a chunk is a plain
    contiguous run of ids and cutting the matrix copies nothing.
    """

    vocab: int
    shards: int
    count: int
    size: int  # ids per chunk, a multiple of shards

    @property
    def per_shard(self) -> int:
        return self.size // self.shards

    @property
    def padded(self) -> bool:
        return self.count * self.per_shard != self.vocab // self.shards

    def ids(self, k: int) -> jax.Array:
        """[size] token id of each row of chunk k (`vocab` on padding rows)."""
        shard, row = jnp.divmod(jnp.arange(self.size), self.per_shard)
        offset = k * self.per_shard + row  # within the shard's block
        block = self.vocab // self.shards
        return jnp.where(offset < block, shard * block + offset, self.vocab)

    def locate(self, ids_n: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(chunk, row within the chunk) of each token id."""
        shard, offset = jnp.divmod(ids_n, self.vocab // self.shards)
        chunk, row = jnp.divmod(offset, self.per_shard)
        return chunk, shard * self.per_shard + row


def vocab_chunks(vocab: int, mesh: Optional[Mesh]) -> VocabChunks:
    shards = mesh.shape["tensor"] if mesh is not None else 1
    shards = shards if vocab % shards == 0 else 1  # an indivisible vocabulary stays whole
    per_shard = vocab // shards
    count = max(1, round(vocab / VOCAB_CHUNK))
    return VocabChunks(vocab, shards, count, shards * math.ceil(per_shard / count))


def split_vocab(w_vd: jax.Array, chunks: VocabChunks) -> list[jax.Array]:
    """The [size, D] rows of every chunk (zero rows where the vocabulary is padded)."""
    D = w_vd.shape[1]
    w = w_vd.reshape(chunks.shards, chunks.vocab // chunks.shards, D)
    w = jnp.pad(w, ((0, 0), (0, chunks.count * chunks.per_shard - w.shape[1]), (0, 0)))
    w = w.reshape(chunks.shards, chunks.count, chunks.per_shard, D).swapaxes(0, 1)
    w = w.reshape(chunks.count, chunks.size, D)
    return [w[k] for k in range(chunks.count)]


def join_vocab(w_chunks: list[jax.Array], chunks: VocabChunks) -> jax.Array:
    """Inverse of `split_vocab`: [V, D] from the chunks' rows."""
    D = w_chunks[0].shape[1]
    w = jnp.stack(w_chunks).reshape(chunks.count, chunks.shards, chunks.per_shard, D)
    w = w.swapaxes(0, 1).reshape(chunks.shards, chunks.count * chunks.per_shard, D)
    return w[:, :chunks.vocab // chunks.shards].reshape(chunks.vocab, D)


def _chunk_logits(h_nd, w_cd, chunks: VocabChunks, k: int, temperature: float):
    """[N, size] fp32 logits of chunk k, padding ids at `_PAD_LOGIT`."""
    logits = jnp.einsum("nd,cd->nc", h_nd, w_cd, preferred_element_type=jnp.float32)
    logits = logits / temperature
    if not chunks.padded:
        return logits
    return jnp.where(chunks.ids(k)[None, :] < chunks.vocab, logits, _PAD_LOGIT)


def _head_forward(h_nd, targets_n, w_vd, chunks: VocabChunks, temperature, keep_logits):
    """(log-prob, entropy, log Z) [N] and the chunk logits (None unless kept).

    The chunks are a Python loop rather than a scan: a scan would stack the kept logits into a
    zero-filled buffer (a quarter second at SmolLM2 16 x 128) and copy them in.
    """
    target_chunk, target_row = chunks.locate(targets_n)
    N = h_nd.shape[0]
    max_n = jnp.full((N,), -jnp.inf, jnp.float32)
    sum_exp = sum_exp_logit = target_logit = jnp.zeros((N,), jnp.float32)
    kept = []
    for k, w_cd in enumerate(split_vocab(w_vd, chunks)):
        logits = _chunk_logits(h_nd, w_cd, chunks, k, temperature)
        new_max = jnp.maximum(max_n, jnp.max(logits, axis=-1))
        rescale = jnp.exp(max_n - new_max)
        exp = jnp.exp(logits - new_max[:, None])
        sum_exp = sum_exp * rescale + jnp.sum(exp, axis=-1)
        sum_exp_logit = sum_exp_logit * rescale + jnp.sum(exp * logits, axis=-1)
        in_chunk = jnp.take_along_axis(logits, target_row[:, None], axis=-1)[:, 0]
        target_logit = target_logit + jnp.where(target_chunk == k, in_chunk, 0.0)
        max_n = new_max
        if keep_logits:
            kept.append(logits)
    log_z = max_n + jnp.log(sum_exp)
    return (target_logit - log_z, log_z - sum_exp_logit / sum_exp, log_z,
            kept if keep_logits else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def head_stats(h_nd, targets_n, w_vd, chunks: VocabChunks, temperature: float,
               keep_logits: bool):
    """log p(target | h) and the entropy of softmax(h @ w_vd.T / temperature), both [N]."""
    logp, entropy, _, _ = _head_forward(h_nd, targets_n, w_vd, chunks, temperature, False)
    return logp, entropy


def _head_stats_fwd(h_nd, targets_n, w_vd, chunks, temperature, keep_logits):
    logp, entropy, log_z, logits = _head_forward(h_nd, targets_n, w_vd, chunks, temperature,
                                                 keep_logits)
    return (logp, entropy), (h_nd, targets_n, w_vd, log_z, entropy, logits)


def _head_stats_bwd(chunks, temperature, keep_logits, residuals, cotangents):
    """d logit_j = g_logp (onehot_j - p_j) - g_entropy p_j (log p_j + H), divided by T."""
    h_nd, targets_n, w_vd, log_z, entropy, kept = residuals
    g_logp, g_entropy = (g[:, None] for g in cotangents)
    target_chunk, target_row = chunks.locate(targets_n)
    d_h = jnp.zeros(h_nd.shape, jnp.float32)
    d_w = []
    for k, w_cd in enumerate(split_vocab(w_vd, chunks)):
        logits = kept[k] if kept is not None else _chunk_logits(h_nd, w_cd, chunks, k,
                                                                 temperature)
        log_p = logits - log_z[:, None]
        p = jnp.exp(log_p)
        onehot = ((target_chunk == k)[:, None]
                  & (jnp.arange(chunks.size)[None, :] == target_row[:, None]))
        d_logits = (jnp.where(onehot, g_logp, 0.0)
                    - p * (g_logp + g_entropy * (log_p + entropy[:, None])))
        d_logits = (d_logits / temperature).astype(w_cd.dtype)
        d_h = d_h + jnp.einsum("nc,cd->nd", d_logits, w_cd, preferred_element_type=jnp.float32)
        d_w.append(jnp.einsum("nc,nd->cd", d_logits, h_nd,
                              preferred_element_type=jnp.float32).astype(w_vd.dtype))
    return d_h.astype(h_nd.dtype), None, join_vocab(d_w, chunks)


head_stats.defvjp(_head_stats_fwd, _head_stats_bwd)


def logprobs_from_hidden(h_btd: jax.Array, w_vd: jax.Array, targets_bt: jax.Array,
                         chunk: int, temperature: float = 1.0, mesh: Optional[Mesh] = None):
    """log p(targets[t] | h[t]) and the entropy at each position, both [B, T] fp32.

    `w_vd` is the [V, D] output projection (`unembed_rows`); `chunk` positions of every row are
    scored at a time, more when B x chunk < MIN_CHUNK_ROWS (the transients are [rows,
    VOCAB_CHUNK], small either way).
    """
    B, T, D = h_btd.shape
    V = w_vd.shape[0]
    chunk = min(max(chunk, -(-MIN_CHUNK_ROWS // B)), T)
    pad = -T % chunk
    h = jnp.pad(h_btd, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets_bt, ((0, 0), (0, pad)))
    n = (T + pad) // chunk
    h_nmd = h.reshape(B, n, chunk, D).swapaxes(0, 1).reshape(n, B * chunk, D)
    targets_nm = targets.reshape(B, n, chunk).swapaxes(0, 1).reshape(n, B * chunk)
    chunks = vocab_chunks(V, mesh)
    keep_logits = B * T * V * 4 <= SAVED_LOGITS_LIMIT_BYTES
    stats = lambda xs: head_stats(xs[0], xs[1], w_vd, chunks, temperature, keep_logits)  # noqa
    logp_nm, ent_nm = jax.lax.map(stats, (h_nmd, targets_nm))
    unchunk = lambda x: x.reshape(n, B, chunk).swapaxes(0, 1).reshape(B, T + pad)[:, :T]  # noqa
    return unchunk(logp_nm), unchunk(ent_nm)


def token_logprobs(params: Params, cfg: LlamaConfig, tokens_bt: jax.Array,
                   attention_mask_bt: jax.Array, mesh: Optional[Mesh] = None,
                   chunk: int = 128, temperature: float = 1.0):
    """Log-prob and entropy of each token given the tokens before it.

    Returns `(logp_bt, entropy_bt)`, both [B, T] fp32, aligned with `tokens_bt`: index t scores
    token t under the distribution predicted at t-1 (index 0 has no prediction and is 0).
    """
    h = forward_hidden(params, cfg, tokens_bt, attention_mask_bt, mesh=mesh)
    logp, ent = logprobs_from_hidden(h[:, :-1], unembed_rows(params, cfg), tokens_bt[:, 1:],
                                     chunk, temperature, mesh)
    logp = jnp.pad(logp, ((0, 0), (1, 0)))
    ent = jnp.pad(ent, ((0, 0), (1, 0)))
    return constrain(logp, mesh, ("batch", "seq")), constrain(ent, mesh, ("batch", "seq"))


# ------------------------------------------------------------------ entropy change of an update

class EntropyChange(NamedTuple):
    """Per position [B, T] (index t: the distribution predicted at t-1, as `token_logprobs`)."""

    before: jax.Array  # H(pi_k)
    after: jax.Array  # H(pi_k+1)
    first_order: jax.Array  # -Cov_{pi_k}(log pi_k, dz): the paper's lemma
    midpoint: jax.Array  # -Cov_{pi_mid}(log pi_mid, dz), pi_mid = softmax(z_k + dz / 2)


def _moments(state, x_nc, d_nc):
    """Folds a vocabulary chunk into the online moments of p = softmax(x): running max m and,
    relative to it, (sum e, sum e x', sum e d, sum e x' d) with e = exp(x - m), x' = x - m.
    Centring x on m keeps Cov(x, d) = E[x' d] - E[x'] E[d] free of cancellation."""
    m, s0, s1, sd, s1d = state
    new_m = jnp.maximum(m, jnp.max(x_nc, axis=-1))
    shift = m - new_m  # <= 0: old terms x' grow by `shift`
    scale = jnp.exp(shift)
    s1 = scale * (s1 + jnp.where(s0 > 0, shift * s0, 0.0))
    s1d = scale * (s1d + jnp.where(s0 > 0, shift * sd, 0.0))
    e = jnp.exp(x_nc - new_m[:, None])
    x_rel = jnp.where(e > 0, x_nc - new_m[:, None], 0.0)  # padding ids: 0 * (-1e30) stays 0
    return (new_m, scale * s0 + jnp.sum(e, -1), s1 + jnp.sum(e * x_rel, -1),
            scale * sd + jnp.sum(e * d_nc, -1), s1d + jnp.sum(e * x_rel * d_nc, -1))


def _entropy_and_cov(state):
    """(H(p), Cov_p(log p, d)) from `_moments`' state (log p = x - const)."""
    _, s0, s1, sd, s1d = state
    mean_x, mean_d = s1 / s0, sd / s0
    return jnp.log(s0) - mean_x, s1d / s0 - mean_x * mean_d


def _exact_chunk_logits(h_nd, w_cd, chunks: VocabChunks, k: int, dtype):
    """`_chunk_logits` accumulated in `dtype` (float64 in the error-order tests)."""
    logits = jnp.einsum("nd,cd->nc", h_nd, w_cd, preferred_element_type=dtype)
    if not chunks.padded:
        return logits
    return jnp.where(chunks.ids(k)[None, :] < chunks.vocab, logits, _PAD_LOGIT)


def _entropy_change_rows(h_before_nd, w_before_vd, h_after_nd, w_after_vd, chunks: VocabChunks):
    """EntropyChange fields [N] for N positions, one vocabulary chunk of logits at a time."""
    N = h_before_nd.shape[0]
    dtype = jnp.promote_types(h_before_nd.dtype, jnp.float32)  # float64 under x64 (tests)
    zero = jnp.zeros((N,), dtype)
    start = (jnp.full((N,), -jnp.inf, dtype), zero, zero, zero, zero)
    before = middle = after = start
    w_before, w_after = split_vocab(w_before_vd, chunks), split_vocab(w_after_vd, chunks)
    for k, (wb_cd, wa_cd) in enumerate(zip(w_before, w_after)):
        z_b = _exact_chunk_logits(h_before_nd, wb_cd, chunks, k, dtype)
        z_a = _exact_chunk_logits(h_after_nd, wa_cd, chunks, k, dtype)
        dz = z_a - z_b  # 0 at padding ids (both at _PAD_LOGIT)
        before = _moments(before, z_b, dz)
        middle = _moments(middle, z_b + dz / 2, dz)
        after = _moments(after, z_a, dz)
    h_before, cov_before = _entropy_and_cov(before)
    _, cov_middle = _entropy_and_cov(middle)
    h_after, _ = _entropy_and_cov(after)
    return EntropyChange(before=h_before, after=h_after, first_order=-cov_before,
                         midpoint=-cov_middle)


def token_entropy_change(params_before: Params, params_after: Params, cfg: LlamaConfig,
                         tokens_bt: jax.Array, attention_mask_bt: jax.Array,
                         mesh: Optional[Mesh] = None, chunk: int = 128) -> EntropyChange:
    """How an update changed the policy's entropy at every position of a batch, measured and
    predicted from the change of the logits over the whole vocabulary, dz = z_k+1 - z_k:
    H(pi_k+1) - H(pi_k) = -Cov_{pi_k}(log pi_k, dz) + O(dz^2) for any optimizer (the paper's
    lemma); the covariance under the midpoint softmax(z_k + dz / 2) is exact to O(dz^3).
    Positions are taken `chunk` at a time (at least MIN_CHUNK_ROWS rows), B x T x V never
    exists at once."""
    h_b = forward_hidden(params_before, cfg, tokens_bt, attention_mask_bt, mesh=mesh)[:, :-1]
    h_a = forward_hidden(params_after, cfg, tokens_bt, attention_mask_bt, mesh=mesh)[:, :-1]
    B, T, D = h_b.shape
    chunk = min(max(chunk, -(-MIN_CHUNK_ROWS // B)), T)
    pad = -T % chunk
    n = (T + pad) // chunk
    rows = lambda h: jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(  # noqa: E731
        B, n, chunk, D).swapaxes(0, 1).reshape(n, B * chunk, D)
    chunks = vocab_chunks(cfg.vocab_size, mesh)
    w_b, w_a = unembed_rows(params_before, cfg), unembed_rows(params_after, cfg)
    per_chunk = jax.lax.map(lambda hs: _entropy_change_rows(hs[0], w_b, hs[1], w_a, chunks),
                            (rows(h_b), rows(h_a)))
    unchunk = lambda x: constrain(jnp.pad(  # noqa: E731
        x.reshape(n, B, chunk).swapaxes(0, 1).reshape(B, T + pad)[:, :T], ((0, 0), (1, 0))),
        mesh, ("batch", "seq"))
    return EntropyChange(*map(unchunk, per_chunk))
