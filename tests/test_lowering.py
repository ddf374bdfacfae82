"""The run's programs (scoring forward, mini-batch update, sampler prefill + decode loop) at
SmolLM2 shape on the 8-device CPU mesh, exported for TPU and for GPU with `jax.export`."""

import pytest

from jaxcov.config import load_config
from jaxcov.lowering import lower_programs, target_architecture
from jaxcov.sharding import make_mesh

# The default run at a longer prompt and response: 16 rows (8 per mini-batch over 8 devices).
OVERRIDES = ["sampler.max_prompt_len=192", "sampler.max_new_tokens=64",
             "train.mini_batch_prompts=2", "algo.group_size=8"]
KERNEL_CALL = {"tpu": "tpu_custom_call", "cuda": "__cudnn$fmha"}


@pytest.fixture(scope="module")
def config():
    return load_config("configs/default.yaml", OVERRIDES)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_programs_lower_with_the_platform_kernel(config, platform):
    cfg = target_architecture(config, platform)
    assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)  # SmolLM2
    assert cfg.attention == {"tpu": "splash", "cuda": "cudnn"}[platform]
    assert not cfg.cpu_fast_path
    exported = lower_programs(config, platform, make_mesh(config.mesh))
    assert set(exported) == {"score", "update", "sample"}
    for name, program in exported.items():
        text = program.mlir_module()
        assert program.platforms == (platform,), name
        assert program.nr_devices == 8, name
        assert KERNEL_CALL[platform] in text, name
        # XLA:CPU tuning stays on CPU: the hand-written backward's barrier is not in these.
        assert "optimization_barrier" not in text or name == "sample", name


def test_fp32_gpu_programs_lower_with_chunked_attention(config):
    """cuDNN's flash kernels take no fp32: an fp32 run on GPU attends chunked, in plain XLA."""
    fp32 = load_config("configs/default.yaml", OVERRIDES + ["model.compute_dtype=float32"])
    assert target_architecture(fp32, "cuda").attention == "chunked"
    exported = lower_programs(fp32, "cuda", make_mesh(fp32.mesh), programs=("update",))
    assert "__cudnn$fmha" not in exported["update"].mlir_module()


def test_lower_command_writes_each_program(tmp_path, capsys):
    from jaxcov.cli import main

    assert main(["lower", "configs/default.yaml", *OVERRIDES, "--platform", "tpu",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tpu: attention splash" in out
    assert out.count("kernel call tpu_custom_call: True") == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "sample.tpu.mlir", "score.tpu.mlir", "update.tpu.mlir"]


def test_cudnn_in_fp32_is_a_config_error():
    from jaxcov.config import ConfigError

    with pytest.raises(ConfigError, match="model.attention: cudnn needs compute_dtype bfloat16"):
        load_config("configs/default.yaml", ["model.attention=cudnn",
                                             "model.compute_dtype=float32"])
