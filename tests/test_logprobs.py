"""The vocabulary-chunked head (`jaxcov.models.logprobs`): values and hand-written gradients
against a whole-vocabulary log-softmax, and the chunk layout on a vocabulary-split mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcov.config import MeshConfig
from jaxcov.models import logprobs
from jaxcov.sharding import make_mesh, named_sharding


def _reference(h_btd, w_vd, targets_bt, temperature):
    """log p(target) and entropy from the full [B, T, V] log-softmax."""
    log_p = jax.nn.log_softmax(jnp.einsum("btd,vd->btv", h_btd, w_vd) / temperature, axis=-1)
    target = jnp.take_along_axis(log_p, targets_bt[..., None], axis=-1)[..., 0]
    return target, -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def _weighted_sum(stats):
    """A loss that sends different cotangents to the log-probs and the entropies."""
    logp, entropy = stats
    return jnp.sum(logp * 1.3) + jnp.sum(entropy * jnp.linspace(-1.0, 2.0, entropy.size)
                                         .reshape(entropy.shape))


def _problem(vocab, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    h = jax.random.normal(keys[0], (3, 11, 16))
    w = jax.random.normal(keys[1], (vocab, 16))
    targets = jax.random.randint(keys[2], (3, 11), 0, vocab)
    # Every padding-sensitive id: the first and last of the vocabulary are targets too.
    return h, w, targets.at[0, 0].set(0).at[0, 1].set(vocab - 1)


@pytest.mark.parametrize("vocab, vocab_chunk, keep", [
    (256, 2048, True),    # one chunk
    (257, 50, True),      # 5 chunks of 52 ids, 3 padding ids
    (257, 50, False),     # the same, logits recomputed in the backward pass
    (1000, 64, True),     # 16 chunks of 63 ids, 8 padding ids
])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_head_matches_full_log_softmax(vocab, vocab_chunk, keep, temperature,
                                               monkeypatch):
    monkeypatch.setattr(logprobs, "VOCAB_CHUNK", vocab_chunk)
    monkeypatch.setattr(logprobs, "SAVED_LOGITS_LIMIT_BYTES", 2**40 if keep else 0)
    h, w, targets = _problem(vocab)

    def ours(h, w):
        return logprobs.logprobs_from_hidden(h, w, targets, chunk=4, temperature=temperature)

    def want(h, w):
        return _reference(h, w, targets, temperature)

    for got, expected in zip(ours(h, w), want(h, w)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda h, w: _weighted_sum(ours(h, w)), argnums=(0, 1))(h, w)
    expected = jax.grad(lambda h, w: _weighted_sum(want(h, w)), argnums=(0, 1))(h, w)
    for got, exp in zip(grads, expected):
        got, exp = np.asarray(got), np.asarray(exp)
        assert np.abs(got - exp).max() <= 1e-5 * np.abs(exp).max()


@pytest.mark.parametrize("vocab, shards, vocab_chunk", [(1000, 1, 64), (1000, 2, 64),
                                                        (256, 4, 30), (258, 4, 30)])
def test_vocab_chunks_cover_every_id_once(vocab, shards, vocab_chunk, monkeypatch):
    """Chunk rows, `locate` and `join_vocab` agree: every id sits in exactly one (chunk, row),
    padding rows are the only extra ones, and split -> join is the identity."""
    monkeypatch.setattr(logprobs, "VOCAB_CHUNK", vocab_chunk)
    mesh = make_mesh(MeshConfig(data=-1, tensor=shards))
    chunks = logprobs.vocab_chunks(vocab, mesh)
    assert chunks.shards == (shards if vocab % shards == 0 else 1)
    ids = np.stack([np.asarray(chunks.ids(k)) for k in range(chunks.count)])
    assert sorted(ids[ids < vocab].tolist()) == list(range(vocab))
    chunk, row = (np.asarray(a) for a in chunks.locate(jnp.arange(vocab)))
    np.testing.assert_array_equal(ids[chunk, row], np.arange(vocab))
    w = jnp.arange(vocab * 3, dtype=jnp.float32).reshape(vocab, 3)
    pieces = logprobs.split_vocab(w, chunks)
    for k, piece in enumerate(pieces):
        valid = ids[k] < vocab
        np.testing.assert_array_equal(np.asarray(piece)[valid], np.asarray(w)[ids[k][valid]])
    np.testing.assert_array_equal(np.asarray(logprobs.join_vocab(pieces, chunks)), np.asarray(w))


def test_vocab_split_mesh_gives_the_single_device_gradient(monkeypatch):
    """With the output projection split over tensor=2 (chunks take ids from both halves), the
    log-probs, entropies and gradients equal those of one device."""
    monkeypatch.setattr(logprobs, "VOCAB_CHUNK", 96)
    h, w, targets = _problem(384, seed=1)
    h, targets = jnp.tile(h, (4, 1, 1))[:8], jnp.tile(targets, (4, 1))[:8]

    def run(mesh):
        w_sharded = jax.device_put(w, named_sharding(mesh, ("vocab", "embed"), w.shape))
        h_sharded = jax.device_put(h, named_sharding(mesh, ("batch", "seq", "act_embed"),
                                                     h.shape))

        def loss(h, w):
            return _weighted_sum(logprobs.logprobs_from_hidden(h, w, targets, 8, mesh=mesh))
        stats = jax.jit(lambda h, w: logprobs.logprobs_from_hidden(h, w, targets, 8, mesh=mesh))
        return stats(h_sharded, w_sharded), jax.jit(jax.grad(loss, argnums=(0, 1)))(
            h_sharded, w_sharded)

    mesh8 = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert logprobs.vocab_chunks(384, mesh8).shards == 2
    single = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    for got, want in zip(jax.tree.leaves(run(mesh8)), jax.tree.leaves(run(single))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
