"""`jaxcov plan`: per-device memory from abstract shapes, checked against hand arithmetic."""

import glob
import os
import re
import shlex

import jax
import pytest

from jaxcov import plan as plan_lib
from jaxcov.cli import build_parser, main
from jaxcov.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_7B = os.path.join(ROOT, "configs", "paper_qwen2.5_7b_klcov.yaml")
CONFIG_32B = os.path.join(ROOT, "configs", "paper_qwen2.5_32b_klcov.yaml")
V5P_64 = plan_lib.parse_topology("v5p-64")


def _item(plan, prefix, phase=None):
    (item,) = [i for i in plan.items if i.name.startswith(prefix) and phase in (None, i.phase)]
    return item


def _qwen_param_counts(L, D, F, H, K, E, V):
    """(matrices, q/k/v biases, norms) of an untied Qwen2 model, from its config.json sizes."""
    matrices = 2 * V * D + L * (D * H * E + 2 * D * K * E + H * E * D + 3 * D * F)
    return matrices, L * (H + 2 * K) * E, L * 2 * D + D


def _live_bytes():
    return sum(x.nbytes for x in jax.live_arrays())


@pytest.mark.parametrize("name,expected", [("v5p-64", (32, 95)), ("v4-32", (16, 32)),
                                           ("v5litepod-16", (16, 16)), ("v6e-8", (8, 32))])
def test_topology_names(name, expected):
    topology = plan_lib.parse_topology(name)
    assert (topology.devices, topology.hbm_gib) == expected


def test_7b_params_and_adamw_match_hand_arithmetic():
    before = _live_bytes()
    plan = plan_lib.plan_memory(load_config(CONFIG_7B), V5P_64)  # mesh data=1 fsdp=-1 tensor=1
    assert _live_bytes() - before < 2**20  # eval_shape only: nothing of model size exists
    assert plan.mesh_shape == (1, 32, 1)
    matrices, biases, norms = _qwen_param_counts(L=28, D=3584, F=18944, H=28, K=4, E=128,
                                                 V=152064)
    assert matrices + biases + norms == 7_615_616_512
    # fp32; every matrix is split 32 ways along its model dim (fsdp); biases and norms are
    # replicated (no fsdp axis; tensor=1).
    per_device = 4 * (matrices // 32 + biases + norms)
    params = _item(plan, "parameters")
    assert (params.per_device, params.total) == (per_device, 4 * 7_615_616_512)
    adam_counters = 2 * 4  # AdamW's step count and the schedule's, int32, replicated
    assert _item(plan, "optimizer state").per_device == 2 * per_device + adam_counters
    assert _item(plan, "gradient accumulator").per_device == per_device
    assert not [i for i in plan.items if i.name.startswith("reference")]  # ref_kl_coef = 0


def test_32b_with_tensor_parallelism_matches_hand_arithmetic():
    plan = plan_lib.plan_memory(load_config(CONFIG_32B), V5P_64)  # tensor=4, fsdp=-1
    assert plan.mesh_shape == (1, 8, 4)
    matrices, biases, norms = _qwen_param_counts(L=64, D=5120, F=27648, H=40, K=8, E=128,
                                                 V=152064)
    # Matrices: model dim over fsdp 8, heads / mlp / vocab over tensor 4; biases: heads only.
    per_device = 4 * (matrices // 32 + biases // 4 + norms)
    assert _item(plan, "parameters").per_device == per_device
    assert _item(plan, "optimizer state").per_device == 2 * per_device + 8
    with_ref = plan_lib.plan_memory(load_config(CONFIG_32B, ["algo.ref_kl_coef=0.01"]), V5P_64)
    assert _item(with_ref, "reference parameters").per_device == per_device


def test_kv_cache_matches_hand_arithmetic():
    plan = plan_lib.plan_memory(load_config(CONFIG_7B), V5P_64)
    rows, slots = 256 * 8, 2048 + 8192  # prompts x samples; prompt + response buckets
    L, K, E, bf16 = 28, 4, 128, 2
    cache = _item(plan, "KV cache", phase="rollout")
    assert cache.total == 2 * L * rows * slots * K * E * bf16
    assert cache.per_device == cache.total // 32  # rows split over data x fsdp = 32


def test_cli_fits_exits_0(capsys):
    # 7B with 16x shorter sequences and no periodic eval fits one v5p-64 slice.
    status = main(["plan", CONFIG_7B, "sampler.max_new_tokens=512", "data.max_prompt_len=128",
                   "sampler.max_prompt_len=128", "train.eval_every=0", "--topology", "v5p-64"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "parameters (float32)" in out and re.search(r"^fits: peak .* headroom", out, re.M)


def _suggested_check(capsys, args):
    """Runs a plan that must not fit; returns the argument list of its suggested `check`."""
    status = main(["plan", *args])
    out = capsys.readouterr().out
    assert status == 2 and "does not fit" in out, out
    return shlex.split(re.search(r"^  check: jaxcov plan (.*)$", out, re.M).group(1))


def test_cli_does_not_fit_suggests_a_micro_batch_that_fits(capsys):
    # A 512-row mini-batch in one micro-batch (16 rows per device): the update's backward is
    # over budget even with splash attention.
    whole = ["train.eval_every=0", "train.mini_batch_prompts=64", "train.micro_batch_size=0"]
    check = _suggested_check(capsys, [CONFIG_7B, *whole, "--topology", "v5p-64"])
    assert [a for a in check if a.startswith(("mesh.", "train.micro"))] == [
        "train.micro_batch_size=256"]  # same mesh, the largest micro-batch that fits
    assert main(["plan", *check]) == 0, capsys.readouterr().out


def test_cli_does_not_fit_suggests_a_mesh_that_fits(capsys):
    # 7B replicated 32 ways (data=32): every device holds all parameters, AdamW state and
    # gradients, 150 GiB; fsdp shards them.
    short = ["sampler.max_new_tokens=512", "data.max_prompt_len=256", "sampler.max_prompt_len=256",
             "train.eval_every=0"]
    check = _suggested_check(capsys, [CONFIG_7B, *short, "mesh.data=32", "mesh.fsdp=1",
                                      "--topology", "v5p-64"])
    assert check[-2:] == ["--topology", "v5p-64"]
    assert ["mesh.data=1", "mesh.fsdp=32", "mesh.tensor=1"] == [a for a in check if "mesh." in a]
    assert main(["plan", *check]) == 0, capsys.readouterr().out


# --------------------------------------------------------------------- attention by platform

GPU_NODE = plan_lib.device_topology(8, 80)


def _layer_backward(plan):
    return _item(plan, "backward of one layer").per_device


@pytest.mark.parametrize("overrides,topology,expected", [
    ([], V5P_64, "splash (auto on tpu)"),
    ([], GPU_NODE, "cudnn (auto on cuda)"),
    (["model.compute_dtype=float32"], GPU_NODE, "chunked (block 512) (auto on cuda)"),
    (["model.attention=dense"], V5P_64, "dense"),
    (["model.attention=chunked", "model.attention_block=256"], V5P_64, "chunked (block 256)"),
])
def test_attention_is_the_one_the_topology_resolves(overrides, topology, expected):
    plan = plan_lib.plan_memory(load_config(CONFIG_7B, overrides), topology)
    assert plan_lib.attention_name(plan) == expected
    assert plan.arch.attention == expected.split()[0]
    assert plan.arch.platform == topology.platform
    assert f"attention {expected}" in plan_lib.describe_run(plan)[1]


def test_7b_layer_backward_with_splash_drops_the_quadratic_scores():
    # The figure: one row per device (micro-batch 32 on 32 devices), T = 2048 + 8192.
    one_row = ["train.micro_batch_size=32"]
    splash = plan_lib.plan_memory(load_config(CONFIG_7B, one_row), V5P_64)
    dense = plan_lib.plan_memory(load_config(CONFIG_7B, one_row + ["model.attention=dense"]),
                                 V5P_64)
    T, H = 10240, 28
    assert round(_layer_backward(dense) / plan_lib.GIB, 2) == 38.59  # the old estimate
    # Backward = 2 x the forward's arrays. Dense: fp32 scores + bf16 softmax, [H, T, T] each;
    # splash: one fp32 512 x 512 tile per head and the fp32 log-sum-exp [H, T].
    dense_attention = H * T * T * (4 + 2)
    splash_attention = H * 512 * 512 * 4 + H * T * 4
    assert _layer_backward(dense) - _layer_backward(splash) == 2 * (dense_attention
                                                                    - splash_attention)
    assert _layer_backward(splash) < 6 * plan_lib.GIB  # vs 38.6 GiB with dense scores


def _layer_bytes(cfg, seq):
    mesh = plan_lib.abstract_mesh((1, 1, 1))
    return plan_lib.array_item("update", "", plan_lib.layer_activations(cfg, 1, seq, seq),
                               mesh).per_device


@pytest.mark.parametrize("attention,low,high", [("dense", 3.5, 4.0), ("chunked", 1.9, 2.0),
                                                ("splash", 1.9, 2.0), ("cudnn", 1.9, 2.0)])
def test_layer_activations_grow_quadratically_only_with_dense(attention, low, high):
    cfg = plan_lib.model_architecture(load_config(CONFIG_7B, [f"model.attention={attention}"]),
                                      "tpu")
    ratio = _layer_bytes(cfg, 65536) / _layer_bytes(cfg, 32768)
    assert low < ratio <= high, ratio


def test_chunked_attention_holds_one_block_pair_and_the_log_sum_exp():
    cfg = plan_lib.model_architecture(load_config(CONFIG_7B, ["model.attention=chunked",
                                                              "model.attention_block=256"]), "tpu")
    H, T = 28, 10240
    arrays = plan_lib.attention_arrays(cfg, 1, T, T)
    # fp32 scores and bf16 probabilities of one 256 x 256 block per head, fp32 lse per query.
    assert sum(plan_lib.full_bytes(a.shape, a.dtype) for a in arrays) == (
        H * 256 * 256 * (4 + 2) + H * T * 4)
    # A sequence of one block runs dense (`attention.attention`): the same as dense there.
    dense = cfg.replace(attention="dense")
    assert plan_lib.attention_arrays(cfg, 2, 256, 256) == plan_lib.attention_arrays(dense, 2, 256,
                                                                                    256)


def test_cli_report_names_the_attention(capsys):
    main(["plan", CONFIG_7B, "--topology", "v5p-64"])
    assert "remat full, attention splash (auto on tpu)" in capsys.readouterr().out
    main(["plan", CONFIG_7B, "model.attention=dense", "--devices", "8", "--hbm-gib", "80"])
    assert "remat full, attention dense\n" in capsys.readouterr().out


def test_unknown_topology_is_one_line_error(capsys):
    assert main(["plan", CONFIG_7B, "--topology", "v9x-8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxcov: error: --topology: unknown topology")


@pytest.mark.parametrize("args,message", [
    (["mesh.tensor=3", "--topology", "v5p-64"], "mesh: 32 devices are not divisible by 3"),
    (["--topology", "v5p-63"], "must count a positive multiple of 2"),
    ([], "needs --topology"),
    (["--devices", "8"], "needs --topology"),
])
def test_bad_layouts_are_one_line_errors(capsys, args, message):
    assert main(["plan", CONFIG_7B, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_base_key_merges_sections(tmp_path):
    (tmp_path / "parent.yaml").write_text("model:\n  remat: dots\n  logits_chunk: 64\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\nmodel:\n  logits_chunk: 32\n")
    cfg = load_config(str(tmp_path / "child.yaml"), ["seed=3"])
    assert (cfg.model.remat, cfg.model.logits_chunk, cfg.seed) == ("dots", 32, 3)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="a cycle"):
        load_config(str(tmp_path / "loop.yaml"))


PAPER_TOPOLOGY_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "paper", "*.yaml")))


@pytest.mark.parametrize("path", PAPER_TOPOLOGY_CONFIGS, ids=os.path.basename)
def test_recorded_plan_verdicts_are_current(path):
    """Each topology config records its `jaxcov plan` command, phase peaks and verdict."""
    text = open(path).read()
    command = shlex.split(re.search(r"\$ python3 -m jaxcov plan (.*)", text).group(1))
    args = build_parser().parse_args(["plan", *command])
    topology = plan_lib.topology_from_args(args)
    plan = plan_lib.plan_memory(load_config(os.path.join(ROOT, args.config)), topology)
    recorded = dict(re.findall(r"(\w+) (\d+\.\d)", re.search(r"usable\): (.*)", text).group(1)))
    assert recorded == {p: f"{plan.phase_peak(p) / plan_lib.GIB:.1f}" for p in recorded}
    assert ("verdict: fits" in text) == plan.fits
