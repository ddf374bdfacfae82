"""Model core: parity with transformers, sharding, export round-trip, abstract real sizes."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from jaxcov.config import MeshConfig
from jaxcov.models import llama
from jaxcov.models.api import abstract_params, init_params, load_model, param_shardings
from jaxcov.models.loading import export_hf, undo_gguf_qk_permute
from jaxcov.models.presets import REAL_CONFIGS, tiny_config
from jaxcov.sharding import logical_spec, make_mesh

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6)
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8}

HF_FAMILIES = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **_COMMON, tie_word_embeddings=False)),
    "llama-tied-rope3": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **_COMMON, tie_word_embeddings=True, rope_scaling=_LLAMA3_ROPE, rope_theta=500000.0)),
    "mistral-window": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        **_COMMON, sliding_window=5)),
    "qwen2-bias": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_COMMON)),
    "qwen3-qknorm": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**_COMMON)),
}


def _hf_tiny(name, directory):
    torch.manual_seed(0)
    model = HF_FAMILIES[name]().eval()
    with torch.no_grad():  # HF inits biases/norms to 0/1; perturb so every term matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory)
    return model


def _padded_batch(padding: str):
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 256, (3, 12))
    mask = np.ones_like(tokens)
    lengths = [12, 8, 5]
    for row, n in enumerate(lengths):
        if padding == "left":
            mask[row, : 12 - n] = 0
        else:
            mask[row, n:] = 0
    return tokens, mask


def _hf_logits(model, tokens, mask):
    positions = np.maximum(mask.cumsum(1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions))
    return out.logits.numpy()


def _rel_err(a, b, mask):
    valid = mask.astype(bool)
    return np.abs(a - b)[valid].max() / np.abs(b[valid]).max()


@pytest.fixture(scope="module")
def mesh8():
    return make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))


@pytest.mark.parametrize("family", sorted(HF_FAMILIES))
def test_parity_with_transformers(family, tmp_path, mesh8):
    hf_model = _hf_tiny(family, tmp_path)
    model = load_model(str(tmp_path), mesh=mesh8, with_tokenizer=False)
    for padding in ("left", "right"):
        tokens, mask = _padded_batch(padding)
        ours = np.asarray(model.logits(tokens, mask))
        assert _rel_err(ours, _hf_logits(hf_model, tokens, mask), mask) < 1e-4, padding


def test_loaded_config_flags(tmp_path, mesh8):
    _hf_tiny("qwen3-qknorm", tmp_path / "q3")
    _hf_tiny("llama-tied-rope3", tmp_path / "l3")
    q3 = load_model(str(tmp_path / "q3"), mesh=mesh8, with_tokenizer=False).config
    l3 = load_model(str(tmp_path / "l3"), mesh=mesh8, with_tokenizer=False).config
    assert (q3.family, q3.qk_norm, q3.qkv_bias) == ("qwen3", True, False)
    assert l3.tie_word_embeddings and l3.rope_scaling == ("llama3", 8.0, 1.0, 4.0, 8)


def test_export_round_trip(tmp_path, mesh8):
    cfg = tiny_config("qwen2")
    params = init_params(cfg, jax.random.key(3), mesh8)
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(4), p.shape), params)
    export_hf(str(tmp_path), params, cfg)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    tokens, mask = _padded_batch("left")
    ours = np.asarray(llama.forward(params, cfg, jnp.asarray(tokens), jnp.asarray(mask)))
    assert _rel_err(ours, _hf_logits(hf_model.eval(), tokens, mask), mask) < 1e-5
    reloaded = load_model(str(tmp_path), mesh=mesh8, with_tokenizer=False)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reloaded.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_forward_equals_single_device(mesh8):
    cfg = tiny_config("llama")
    single = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    params8 = init_params(cfg, jax.random.key(0), mesh8)
    params1 = init_params(cfg, jax.random.key(0), single)
    tokens, mask = _padded_batch("left")
    tokens, mask = np.tile(tokens, (4, 1))[:8], np.tile(mask, (4, 1))[:8]
    run = jax.jit(llama.forward, static_argnames=("cfg", "mesh"))
    out8 = run(params8, tokens_bt=tokens, attention_mask_bt=mask, cfg=cfg, mesh=mesh8)
    out1 = run(params1, tokens_bt=tokens, attention_mask_bt=mask, cfg=cfg, mesh=single)
    np.testing.assert_allclose(np.asarray(out8), np.asarray(out1), rtol=1e-5, atol=1e-5)
    assert out8.sharding.spec[0] == ("data", "fsdp")  # batch stayed split over the mesh


def test_param_shardings_follow_rules(mesh8):
    cfg = tiny_config("qwen2")
    params = init_params(cfg, jax.random.key(0), mesh8)
    assert params["layers"]["wq"].sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor", None)
    assert params["embed"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert params["layers"]["w_down"].sharding.spec == jax.sharding.PartitionSpec(
        None, "tensor", "fsdp")
    expected = param_shardings(cfg, mesh8)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        assert got.sharding == want
        # each device holds only its shard, not a full copy
        assert got.addressable_shards[0].data.size == math.prod(want.shard_shape(got.shape))


def test_indivisible_dims_stay_replicated(mesh8):
    # SmolLM2 has 3 KV heads: they cannot split over tensor=2, so that dim stays whole.
    spec = logical_spec(("layers", "embed", "kv_heads", "head_dim"), (30, 576, 3, 64), mesh8)
    assert spec == jax.sharding.PartitionSpec(None, "fsdp", None, None)


@pytest.mark.parametrize("name,expected_params", [
    ("qwen2.5-7b", 7_615_616_512), ("llama-3.1-8b", 8_030_261_248),
    ("qwen2.5-32b", 32_763_876_352)])
def test_real_sizes_abstract_on_64_devices(name, expected_params):
    mesh64 = AbstractMesh((8, 4, 2), ("data", "fsdp", "tensor"))
    shapes = abstract_params(REAL_CONFIGS[name], mesh64, dtype=jnp.bfloat16)
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) == expected_params
    wq = shapes["layers"]["wq"]
    assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    L, D, H, E = wq.shape
    assert wq.sharding.shard_shape(wq.shape) == (L, D // 4, H // 2, E)


def test_gguf_unpermute_inverts_llama_cpp_permute():
    rng = np.random.RandomState(0)
    w = rng.randn(3 * 8, 5)

    def llama_cpp_permute(x, n):  # convert_hf_to_gguf.py's LlamaModel.permute
        return x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    np.testing.assert_array_equal(undo_gguf_qk_permute(llama_cpp_permute(w, 3), 3), w)


def test_embedded_smollm2_matches_transformers_gguf():
    from jaxcov.models.registry import embedded_model_path

    model = load_model("smollm2-135m-instruct")
    cfg = model.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (
        30, 576, 9, 3, 49152)
    text = model.tokenizer.apply_chat_template([{"role": "user", "content": "What is 7 times 8?"}],
                                               tokenize=False, add_generation_prompt=True)
    tokens = np.array([model.tokenizer(text)["input_ids"]])
    mask = np.ones_like(tokens)
    ours = np.asarray(model.logits(tokens, mask))
    path = embedded_model_path("smollm2-135m-instruct")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    assert _rel_err(ours, _hf_logits(hf_model, tokens, mask), mask) < 1e-4


def test_chunked_logprobs_match_full_log_softmax(mesh8):
    cfg = tiny_config("llama-tied")
    params = init_params(cfg, jax.random.key(1), mesh8)
    tokens, mask = _padded_batch("right")
    from jaxcov.models.logprobs import token_logprobs

    logp, ent = token_logprobs(params, cfg, jnp.asarray(tokens), jnp.asarray(mask), chunk=5)
    logits = llama.forward(params, cfg, jnp.asarray(tokens), jnp.asarray(mask))
    full = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    want = np.take_along_axis(np.asarray(full), tokens[:, 1:, None], axis=-1)[..., 0]
    want_ent = -np.sum(np.exp(full) * full, axis=-1)
    np.testing.assert_allclose(np.asarray(logp[:, 1:]), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent[:, 1:]), want_ent, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(logp[:, 0]) == 0)


def _mean_logp_weights(mask):
    """Weights of positions t >= 1 whose token and predecessor are both real (right padding)."""
    weights = (mask[:, 1:] * mask[:, :-1]).astype(np.float32)
    return weights / weights.sum()


def _hf_mean_logp_grads(model, tokens, mask):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits
    logp = torch.log_softmax(logits[:, :-1].double(), -1).gather(
        -1, torch.tensor(tokens[:, 1:, None])).squeeze(-1)
    (logp * torch.tensor(_mean_logp_weights(mask), dtype=torch.float64)).sum().backward()
    return {name: p.grad.numpy() for name, p in model.named_parameters()}


@pytest.mark.parametrize("family, saved_logits_limit", [("qwen2-bias", None),
                                                         ("llama-tied-rope3", 0)])
def test_gradients_match_transformers(family, saved_logits_limit, tmp_path, monkeypatch):
    """The gradient of the mean token log-prob (custom matmul VJPs, chunked head with saved or,
    with a zero limit, recomputed logits) equals torch autograd's, tensor by tensor (exported
    to the HF layout with export_hf)."""
    from jaxcov.models import logprobs

    if saved_logits_limit is not None:
        monkeypatch.setattr(logprobs, "SAVED_LOGITS_LIMIT_BYTES", saved_logits_limit)
    hf_model = _hf_tiny(family, tmp_path / "model")
    model = load_model(str(tmp_path / "model"), with_tokenizer=False)
    tokens, mask = _padded_batch("right")
    weights = jnp.asarray(np.pad(_mean_logp_weights(mask), ((0, 0), (1, 0))))

    def mean_logp(params):
        logp_bt, _ = logprobs.token_logprobs(params, model.config, jnp.asarray(tokens),
                                             jnp.asarray(mask), chunk=4)
        return jnp.sum(logp_bt * weights)

    grads = jax.jit(jax.grad(mean_logp))(model.params)
    export_hf(str(tmp_path / "grads"), grads, model.config)
    from safetensors.numpy import load_file

    ours = load_file(str(tmp_path / "grads" / "model.safetensors"))
    expected = _hf_mean_logp_grads(hf_model, tokens, mask)
    assert set(ours) == set(expected) - {"lm_head.weight"} if model.config.tie_word_embeddings \
        else set(ours) == set(expected)
    for name, grad in ours.items():
        scale = np.abs(expected[name]).max()
        assert np.abs(grad - expected[name]).max() <= 1e-4 * scale + 1e-9, name


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("block", [512, 4])
def test_hand_written_layer_backward_matches_autodiff(family, compute_dtype, block):
    """`llama._train_block`'s backward pass (matmul outputs saved, norms/rope/SwiGLU recomputed,
    attention by hand) equals JAX autodiff of the same forward, for every family flag (bias,
    q/k norm, sliding window), left padding and bf16 matmuls; with the softmax saved whole
    (one block) and with chunked attention over blocks of 4 (log-sum-exp saved)."""
    cfg = tiny_config(family, compute_dtype=compute_dtype, attention_block=block)
    params = llama.init_params(cfg, jax.random.key(3), std=0.3)
    params["layers"] = jax.tree.map(lambda w: w + 0.1 * jax.random.normal(  # non-trivial norms
        jax.random.key(4), w.shape), params["layers"])
    layer = jax.tree.map(lambda w: w[0], params["layers"])
    _, mask = _padded_batch("left")
    mask = jnp.asarray(mask)
    keys = jax.random.split(jax.random.key(5), 2)
    h = jax.random.normal(keys[0], (*mask.shape, cfg.hidden_size)).astype(cfg.dtype)
    # Padding positions get no cotangent (no loss reads them; their attention rows are
    # unspecified and differ between implementations).
    d_out = (jax.random.normal(keys[1], h.shape) * mask[..., None]).astype(cfg.dtype)
    positions = llama.default_positions(mask)
    args = (positions, mask.astype(bool), llama.rope_inv_freq(cfg))

    def grads(block):
        out, vjp = jax.vjp(lambda h, layer: block(cfg, None, h, layer, *args), h, layer)
        return out, vjp(d_out)

    out, (d_h, d_layer) = grads(llama._train_block)
    dense = cfg.replace(attention="dense")  # autodiff reference: the whole softmax, no blocks
    want_out, (want_d_h, want_d_layer) = grads(
        lambda _, *a: llama._block_forward(dense, *a)[0])
    tol = 1e-5 if compute_dtype == "float32" else 2e-2
    real = np.asarray(mask, bool)
    out, want_out = np.asarray(out, np.float32)[real], np.asarray(want_out, np.float32)[real]
    if block == 512:  # the same computation
        np.testing.assert_array_equal(out, want_out)
    assert np.abs(out - want_out).max() <= tol * np.abs(want_out).max()
    for name, got, want in [("h", d_h, want_d_h)] + [(k, d_layer[k], want_d_layer[k])
                                                     for k in sorted(layer)]:
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert np.abs(got - want).max() <= tol * np.abs(want).max(), name


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
@pytest.mark.parametrize("block", [512, 4])
def test_remat_policies_give_the_same_gradient(remat, block):
    """Rematerialisation around the hand-written layer backward changes what is recomputed,
    never the gradient; under `full` chunked attention (block 4) keeps its output and
    log-sum-exp, so the backward runs no second attention forward (no extra loop)."""
    from jaxcov.models.logprobs import token_logprobs

    tokens, mask = (jnp.asarray(a) for a in _padded_batch("left"))

    def grad_fn(remat):
        cfg = tiny_config("qwen3", remat=remat, attention_block=block)
        params = llama.init_params(cfg, jax.random.key(1), std=0.3)
        loss = lambda p: jnp.mean(token_logprobs(p, cfg, tokens, mask, chunk=4)[0])  # noqa
        return jax.grad(loss), params

    for got, want in zip(jax.tree.leaves(jax.jit(grad_fn(remat)[0])(grad_fn(remat)[1])),
                         jax.tree.leaves(jax.jit(grad_fn("none")[0])(grad_fn("none")[1]))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)
    if remat == "full":
        loops = lambda remat: str(jax.make_jaxpr(grad_fn(remat)[0])(  # noqa: E731
            grad_fn(remat)[1])).count("while[")
        assert loops("full") == loops("none")


def test_bf16_gradient_at_real_layer_sizes_matches_fp32():
    """One SmolLM2-sized layer (D=576, F=1536, 9/3 heads) at 2x64 tokens: the bf16-matmul
    gradient runs (XLA:CPU picks other dot kernels at these sizes than in the tiny configs;
    one of them has no bf16) and agrees with fp32 to bf16 precision."""
    from jaxcov.models.logprobs import token_logprobs

    base = tiny_config("llama-tied", vocab_size=512, hidden_size=576, intermediate_size=1536,
                       num_layers=1, num_heads=9, num_kv_heads=3, head_dim=64)
    tokens = jax.random.randint(jax.random.key(0), (2, 64), 0, 512)
    mask = jnp.ones_like(tokens)
    params = llama.init_params(base, jax.random.key(1), std=0.05)

    def grads(compute_dtype):
        cfg = base.replace(compute_dtype=compute_dtype)
        loss = lambda p: jnp.mean(token_logprobs(p, cfg, tokens, mask, chunk=64)[0][:, 1:])
        return jax.jit(jax.grad(loss))(params)

    for got, want in zip(jax.tree.leaves(grads("bfloat16")), jax.tree.leaves(grads("float32"))):
        got, want = np.asarray(got, np.float32), np.asarray(want)
        assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()


def test_cpu_compile_options_keep_the_gradient():
    """The XLA:CPU options the trainer compiles fp32 programs with (XNNPACK dots) are accepted
    by this jaxlib and change no gradient; bf16 programs get none."""
    from jaxcov.models.logprobs import token_logprobs
    from jaxcov.xla_cpu import model_compile_options

    options = model_compile_options("float32")
    assert options and model_compile_options("bfloat16") == {}
    # Past one attention block XLA's default fusions run the chunked attention faster.
    assert model_compile_options("float32", 640, 512) == {}
    assert model_compile_options("float32", 512, 512) == options
    cfg = tiny_config("qwen2", hidden_size=128, intermediate_size=384)
    params = llama.init_params(cfg, jax.random.key(1), std=0.1)
    tokens, mask = (jnp.asarray(a) for a in _padded_batch("left"))
    grad = jax.grad(lambda p: jnp.mean(token_logprobs(p, cfg, tokens, mask, chunk=4)[0]))
    for got, want in zip(jax.tree.leaves(jax.jit(grad, compiler_options=options)(params)),
                         jax.tree.leaves(jax.jit(grad)(params))):
        got, want = np.asarray(got), np.asarray(want)  # equal up to summation order
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
