"""Damaged model files are a ConfigError naming the file and the tensor (issue 18; the CLI's one
error line for each is in tests/test_cli_errors.py), and a model directory without tokenizer
files loads without a tokenizer, takes one from elsewhere, and exports none (issue 18, item 9)."""

import json
import os

import jax
import numpy as np
import pytest

from jaxcov.cli import main
from jaxcov.config import ConfigError, MeshConfig
from jaxcov.models.api import load_model
from jaxcov.models.llama import is_spec, param_specs
from jaxcov.models.loading import export_hf
from jaxcov.models.presets import tiny_config
from jaxcov.models.registry import TOKENIZER_VOCAB_FILES, has_tokenizer_files, load_tokenizer
from jaxcov.sharding import make_mesh
from tests.tiny_run import write_tiny_config


@pytest.fixture(scope="module")
def mesh8():
    return make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tokenizer):
    """A `save_pretrained` tokenizer directory: tokenizer files, no config.json."""
    directory = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(directory)
    return str(directory)


def tiny_hf_dir(directory, family="llama", tokenizer=None, **changes) -> str:
    """config.json + model.safetensors (+ the tokenizer's files) of a tiny random model of
    `presets.TINY_CONFIGS`, made with numpy: no program is compiled."""
    cfg, rng = tiny_config(family, **changes), np.random.default_rng(0)
    params = jax.tree.map(lambda spec: rng.normal(0, 0.02, spec.shape).astype(np.float32),
                          param_specs(cfg), is_leaf=is_spec)
    export_hf(str(directory), params, cfg, tokenizer)
    return str(directory)


def rewrite_tensors(directory, edit) -> None:
    """Applies `edit` to the dict of a directory's model.safetensors tensors, in place."""
    from safetensors.numpy import load_file, save_file

    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def reshape_one_layer(tensors):
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name][:, :-1]


def drop_from_one_layer(tensors):
    del tensors["model.layers.1.self_attn.k_proj.weight"]


def truncate_safetensors(directory):
    path = os.path.join(directory, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def break_config_json(directory):
    with open(os.path.join(directory, "config.json"), "w") as f:
        f.write('{"hidden_size": ')


# ------------------------------------------------------------------------ damaged files


@pytest.mark.parametrize("damage, message", [
    (reshape_one_layer, "checkpoint tensor model.layers.1.mlp.up_proj.weight has shape [63, 128], "
                        "the config asks for [64, 128]"),
    (drop_from_one_layer, "checkpoint is missing tensor model.layers.1.self_attn.k_proj.weight"),
], ids=["wrong_shape", "missing"])
def test_wrong_shaped_or_missing_tensor_in_one_layer(tmp_path, mesh8, damage, message):
    directory = tiny_hf_dir(tmp_path)
    rewrite_tensors(directory, damage)
    with pytest.raises(ConfigError) as error:
        load_model(directory, mesh=mesh8, with_tokenizer=False)
    assert str(error.value) == f"{directory}: {message}"


def test_truncated_safetensors_and_bad_config_json(tmp_path, mesh8):
    directory = tiny_hf_dir(tmp_path)
    truncate_safetensors(directory)
    with pytest.raises(ConfigError, match="cannot load the model"):
        load_model(directory, mesh=mesh8, with_tokenizer=False)
    break_config_json(directory)
    with pytest.raises(ConfigError, match=f"{directory}: cannot load the model: JSONDecodeError"):
        load_model(directory, mesh=mesh8, with_tokenizer=False)


def test_non_finite_config_numbers(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(json.dumps({"optim": {"lr": 1e-6}}))
    for value in (".inf", "-.inf", ".nan"):
        assert main(["config", str(good), f"optim.lr={value}"]) == 2
        assert "optim.lr: must be a finite number" in capsys.readouterr().err


# ------------------------------------------------------- directories without tokenizer files


def _bare(tmp_path, family, tokenizer) -> str:
    """A plain `export_hf(dir, params, cfg)` (as a save_pretrained without a tokenizer): a
    vocabulary as large as the tokenizer's, and no tokenizer files."""
    directory = tiny_hf_dir(tmp_path / f"bare_{family}", family, vocab_size=len(tokenizer))
    assert sorted(os.listdir(directory)) == ["config.json", "model.safetensors"]
    return directory


# Transformers builds Qwen2/3 a 1-token tokenizer from such a directory (it encodes any text to
# []) and fails for Llama: neither may pass for the model's own.
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_directory_without_tokenizer_loads_with_a_notice(tmp_path, capsys, mesh8, tokenizer,
                                                         family):
    directory = _bare(tmp_path, family, tokenizer)
    model = load_model(directory, mesh=mesh8)
    assert model.tokenizer is None
    assert capsys.readouterr().err == (
        f"jaxcov: {directory} has no tokenizer files; loading it without a tokenizer "
        "(model.tokenizer or --tokenizer gives one)\n")
    with pytest.raises(ConfigError, match=f"^{directory} has no tokenizer, which generate needs: "
                                          "set model.tokenizer"):
        model.require_tokenizer("generate")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_directory_without_tokenizer_takes_one(tmp_path, capsys, mesh8, tokenizer, tokenizer_dir,
                                               family):
    directory = _bare(tmp_path, family, tokenizer)
    for given in (tokenizer_dir, "smollm2-135m-instruct"):
        model = load_model(directory, mesh=mesh8, tokenizer=given)
        assert model.tokenizer.encode("hello world") == tokenizer.encode("hello world") != []
    assert capsys.readouterr().err == ""  # no notice: it has a tokenizer


def test_tokenizer_larger_than_the_vocabulary_is_an_error(tmp_path, mesh8, tokenizer_dir):
    directory = tiny_hf_dir(tmp_path)  # vocab_size 256 < the tokenizer's 49152
    with pytest.raises(ConfigError) as error:
        load_model(directory, mesh=mesh8, tokenizer=tokenizer_dir)
    assert str(error.value) == (f"{tokenizer_dir}: the tokenizer has 49152 tokens, more than the "
                                f"vocab_size 256 of the model {directory}")


def _tokenizer_files(directory) -> list:
    return sorted(f for f in os.listdir(directory) if f.startswith("tokenizer")
                  or f in TOKENIZER_VOCAB_FILES or f in ("special_tokens_map.json", "merges.txt"))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_export_writes_a_tokenizer_only_when_there_is_one(tmp_path, tokenizer, tokenizer_dir,
                                                          family):
    bare, out = _bare(tmp_path, family, tokenizer), tmp_path / "out"
    assert main(["export", bare, str(out)]) == 0
    assert _tokenizer_files(out) == [] and sorted(os.listdir(out)) == [
        "config.json", "model.safetensors"]
    with_tokenizer = tiny_hf_dir(tmp_path / "with_tokenizer", family, tokenizer,
                                 vocab_size=len(tokenizer))
    for source, extra, out in ((with_tokenizer, [], tmp_path / "out_own"),
                               (bare, ["--tokenizer", tokenizer_dir], tmp_path / "out_given")):
        assert main(["export", source, str(out), *extra]) == 0
        assert has_tokenizer_files(str(out)), os.listdir(out)
        assert load_tokenizer(str(out)).encode("hello world") == tokenizer.encode("hello world")


def test_training_a_directory_without_tokenizer_needs_model_tokenizer(tmp_path, capsys,
                                                                      tokenizer):
    bare = _bare(tmp_path, "llama", tokenizer)
    config = write_tiny_config(tmp_path / "exp.yaml", model={"name": bare, "tokenizer": ""},
                               train={"run_dir": str(tmp_path / "run")})
    assert main(["train", config]) == 2
    # One line, before the model loads (no loading notice, no loading).
    assert capsys.readouterr().err.strip().splitlines() == [
        f"jaxcov: error: {bare} has no tokenizer, which training and eval needs: set "
        "model.tokenizer (--tokenizer on the command line) to a tokenizer directory, .gguf file "
        "or registered model name"]
