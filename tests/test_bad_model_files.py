"""Damaged model files and bad CLI numbers end in one `jaxcov: error:` line naming the file or
argument, exit status 2, never a traceback (issue 18)."""

import json
import os

import jax
import numpy as np
import pytest

from jaxcov.cli import main
from jaxcov.config import ConfigError, MeshConfig
from jaxcov.models.api import init_params, load_model
from jaxcov.models.loading import export_hf
from jaxcov.models.presets import tiny_config
from jaxcov.models.registry import embedded_model_path
from jaxcov.sharding import make_mesh


@pytest.fixture(scope="module")
def mesh8():
    return make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))


def _exported(tmp_path, mesh8):
    cfg = tiny_config("llama")
    export_hf(str(tmp_path), init_params(cfg, jax.random.key(0), mesh8), cfg)
    return str(tmp_path)


def _rewrite_tensors(directory, edit):
    from safetensors.numpy import load_file, save_file

    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.__setitem__("model.layers.1.mlp.up_proj.weight",
                             t["model.layers.1.mlp.up_proj.weight"][:, :-1]),
     "model.layers.1.mlp.up_proj.weight has shape"),
    (lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"),
     "missing tensor model.layers.1.self_attn.k_proj.weight"),
])
def test_wrong_shaped_or_missing_tensor_in_one_layer(tmp_path, mesh8, damage, message):
    directory = _exported(tmp_path, mesh8)
    _rewrite_tensors(directory, damage)
    with pytest.raises(ConfigError, match=message):
        load_model(directory, mesh=mesh8, with_tokenizer=False)


def test_truncated_safetensors_and_bad_config_json(tmp_path, mesh8):
    directory = _exported(tmp_path, mesh8)
    path = os.path.join(directory, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ConfigError, match="cannot load the model"):
        load_model(directory, mesh=mesh8, with_tokenizer=False)
    with open(os.path.join(directory, "config.json"), "w") as f:
        f.write('{"hidden_size": ')
    with pytest.raises(ConfigError, match=f"{directory}: cannot load the model: JSONDecodeError"):
        load_model(directory, mesh=mesh8, with_tokenizer=False)


@pytest.mark.parametrize("make", ["truncated", "empty", "garbage"])
def test_damaged_gguf_is_one_line_with_exit_2(tmp_path, capsys, make):
    path = tmp_path / f"{make}.gguf"
    with open(embedded_model_path("smollm2-135m-instruct"), "rb") as f:
        data = {"truncated": f.read(60_000_000), "empty": b"",
                "garbage": bytes(np.random.default_rng(0).integers(0, 256, 1000, np.uint8))}[make]
    path.write_bytes(data)
    assert main(["generate", str(path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"jaxcov: error: {path}: cannot load the model") and "\n" not in err


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_generate_rejects_a_bad_sample_count(capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "smollm2-135m-instruct", "--prompt", "hi", "-n", value])
    assert exit_info.value.code == 2
    assert "argument -n:" in capsys.readouterr().err


def test_non_utf8_yaml_and_non_finite_numbers(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"train:\n  steps: \xff\n")
    assert main(["config", str(bad)]) == 2
    assert f"{bad}: not UTF-8 text" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text(json.dumps({"optim": {"lr": 1e-6}}))
    for value in (".inf", "-.inf", ".nan"):
        assert main(["config", str(good), f"optim.lr={value}"]) == 2
        assert "optim.lr: must be a finite number" in capsys.readouterr().err
