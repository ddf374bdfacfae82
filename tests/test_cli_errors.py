"""Bad input on the command line ends in one `jaxcov: error:` line on stderr naming the file or
argument and what is wrong, exit status 2, never a traceback or a silent success (issue 18);
`eval` takes the same overrides as `train`."""

import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcov import trainer
from jaxcov.checkpoint import Checkpointer
from jaxcov.cli import main, parse_args
from jaxcov.config import load_config
from jaxcov.models.llama import is_spec, param_specs
from jaxcov.models.presets import tiny_config
from jaxcov.models.registry import embedded_model_path
from tests.test_bad_model_files import (break_config_json, drop_from_one_layer, reshape_one_layer,
                                        rewrite_tensors, tiny_hf_dir, truncate_safetensors)
from tests.tiny_run import write_tiny_config


def _config(tmp_path, **data):
    return write_tiny_config(tmp_path / "exp.yaml", data={"eval_size": 4, **data},
                             train={"run_dir": str(tmp_path / "run")})


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxcov: error: ") and "\n" not in err, err
    return err


class ModelLoadReached(Exception):
    """Raised where the model would load: an error expected before it fails the test instead."""


@pytest.fixture
def model_load(monkeypatch):
    """Stops a command where it would load the model; the list gets the config it had."""
    configs = []

    def build_context(config):
        configs.append(config)
        raise ModelLoadReached
    monkeypatch.setattr(trainer, "build_context", build_context)
    return configs


# ----------------------------------------------------------------------- what the cases make


class Scratch:
    """A case's tmp_path, and directories it made read-only (made writable again after it)."""

    def __init__(self, path):
        self.path, self._undo = path, []

    def read_only_dir(self, name: str):
        """A directory this process cannot write in: mode 0o500, and for root (whom modes do
        not stop) the immutable attribute; skips the test where neither stops writing."""
        directory = self.path / name
        directory.mkdir()
        os.chmod(directory, 0o500)
        self._undo.append(lambda: os.chmod(directory, 0o700))
        if not _writable(directory) or self._immutable(directory):
            return directory
        pytest.skip("neither permissions nor chattr +i stop this user from writing")

    def _immutable(self, directory) -> bool:
        try:
            subprocess.run(["chattr", "+i", str(directory)], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError):
            return False
        self._undo.append(lambda: subprocess.run(["chattr", "-i", str(directory)], check=True))
        return not _writable(directory)

    def undo(self):
        for undo in reversed(self._undo):
            undo()


def _writable(directory) -> bool:
    try:
        (directory / "probe").write_text("")
    except OSError:
        return False
    (directory / "probe").unlink()
    return True


def _file(name, data):
    """A setup writing `data` (bytes) to `name`; it is {path} in the case."""
    def setup(s):
        (s.path / name).write_bytes(data)
        return {"path": s.path / name}
    return setup


def _gguf(content):
    """A setup writing t.gguf ({path}): `content` of the open SmolLM2 GGUF file."""
    def setup(s):
        with open(embedded_model_path("smollm2-135m-instruct"), "rb") as f:
            (s.path / "t.gguf").write_bytes(content(f))
        return {"path": s.path / "t.gguf"}
    return setup


TRUNCATED_GGUF = _gguf(lambda f: f.read(60_000_000))  # the header and some tensors
EMPTY_GGUF = _gguf(lambda f: b"")
GARBAGE_GGUF = _gguf(lambda f: os.urandom(1000))


def _hf_dir(damage=None, *args):
    """A setup making a tiny HF directory ({path}, no tokenizer files), then `damage(it, *args)`."""
    def setup(s):
        directory = tiny_hf_dir(s.path / "hf")
        if damage:
            damage(directory, *args)
        return {"path": directory}
    return setup


def _read_only(inside):
    def setup(s):
        directory = s.read_only_dir("read_only")
        return {"path": directory / "run" if inside else directory}
    return setup


def _a_file(under):
    def setup(s):
        (s.path / "a_file").write_text("")
        return {"path": s.path / "a_file" / "run" if under else s.path / "a_file"}
    return setup


def _other_architectures_checkpoint(s):
    """A run directory whose checkpoint holds a tiny Qwen2's parameters."""
    run = s.path / "qwen2_run"
    params = jax.tree.map(lambda spec: np.zeros(spec.shape, np.float32),
                          param_specs(tiny_config("qwen2")), is_leaf=is_spec)
    saver = Checkpointer(str(run / "checkpoints"), asynchronous=False)
    saver.save(1, {"params": params, "step": np.ones((), np.int32)}, {})
    saver.close()
    return {"path": run}


def _nothing(s):
    return {}


LATIN1_ROW = b'{"question": "caf\xe9?", "answer": "1"}\n'
TRAIN = ("train", "{config}")
GENERATE = ("generate", "smollm2-135m-instruct", "--prompt", "hi")
EXPORT = ("export", "smollm2-135m-instruct")

# id, setup (Scratch -> names for argv and start), argv, the start of the error line after
# "jaxcov: error: ". Names: {config} the tiny experiment (tests/tiny_run.py), {tmp} tmp_path.
BAD_INPUT = [
    ("truncated_gguf", TRUNCATED_GGUF, (*TRAIN, "model.name={path}"),
     "{path}: cannot load the model: "),
    ("empty_gguf", EMPTY_GGUF, (*TRAIN, "model.name={path}"),
     "{path}: cannot load the model: "),
    ("garbage_gguf", GARBAGE_GGUF, (*TRAIN, "model.name={path}"),
     "{path}: cannot load the model: "),
    # Here the tokenizer comes from the damaged file too.
    ("garbage_gguf_generate", GARBAGE_GGUF, ("generate", "{path}", "--prompt", "hi"),
     "{path}: cannot load the model: "),
    ("safetensors_wrong_shape", _hf_dir(rewrite_tensors, reshape_one_layer),
     (*TRAIN, "model.name={path}"),
     "{path}: checkpoint tensor model.layers.1.mlp.up_proj.weight has shape [63, 128]"),
    ("safetensors_missing_tensor", _hf_dir(rewrite_tensors, drop_from_one_layer),
     (*TRAIN, "model.name={path}"),
     "{path}: checkpoint is missing tensor model.layers.1.self_attn.k_proj.weight"),
    ("safetensors_truncated", _hf_dir(truncate_safetensors),
     (*TRAIN, "model.name={path}"), "{path}: cannot load the model: SafetensorError: "),
    ("bad_config_json", _hf_dir(break_config_json), (*TRAIN, "model.name={path}"),
     "{path}: cannot load the model: JSONDecodeError: "),
    ("non_utf8_yaml", _file("bad.yaml", b"train:\n  steps: \xff\n"), ("train", "{path}"),
     "{path}: not UTF-8 text"),
    ("random_family_unknown", _nothing, (*TRAIN, "model.name=random:nosuch"),
     "{config}: model.name: random:nosuch: no such random model"),
    ("random_family_unknown_generate", _nothing,
     ("generate", "random:nosuch", "--tokenizer", "smollm2-135m-instruct", "--prompt", "hi"),
     "random:nosuch: no such random model"),
    ("non_utf8_jsonl", _file("latin1.jsonl", LATIN1_ROW), (*TRAIN, "data.source={path}"),
     "{path} row 1: not UTF-8 text"),
    # Skipped, the bad row leaves no example.
    ("non_utf8_jsonl_skipped", _file("latin1.jsonl", LATIN1_ROW),
     (*TRAIN, "data.source={path}", "data.on_bad_row=skip", "data.eval_size=0"),
     "{path}: no usable train examples (1 rows, 1 bad"),
    ("garbage_parquet", _file("garbage.parquet", os.urandom(3000)),
     (*TRAIN, "data.source={path}"), "{path}: cannot read it as parquet: "),
    ("read_only_run_dir", _read_only(inside=False), (*TRAIN, "train.run_dir={path}"),
     "train.run_dir {path}: cannot write there ("),
    ("run_dir_in_read_only_dir", _read_only(inside=True), (*TRAIN, "train.run_dir={path}"),
     "train.run_dir {path}: cannot write there ("),
    ("run_dir_is_a_file", _a_file(under=False), (*TRAIN, "train.run_dir={path}"),
     "train.run_dir {path}: cannot write there (File exists)"),
    ("run_dir_under_a_file", _a_file(under=True), (*TRAIN, "train.run_dir={path}"),
     "train.run_dir {path}: cannot write there (Not a directory)"),
    ("generate_n_0", _nothing, (*GENERATE, "-n", "0"), "argument -n: must be >= 1, got 0"),
    ("generate_n_minus_1", _nothing, (*GENERATE, "-n", "-1"),
     "argument -n: must be >= 1, got -1"),
    ("generate_n_not_a_number", _nothing, (*GENERATE, "-n", "two"),
     "argument -n: expected an integer, got 'two'"),
    # Checked before the model loads (item 9): no loading notice comes first.
    ("generate_without_tokenizer", _hf_dir(),
     ("generate", "{path}", "--prompt", "hi"), "{path} has no tokenizer, which generate needs: "),
    ("eval_other_architecture", _other_architectures_checkpoint,
     ("eval", "{config}", "--checkpoint", "{path}"),
     "checkpoint {path}/checkpoints/1 does not fit the model: params/embed has shape [256, 64]"),
    ("export_to_a_file", _a_file(under=False), (*EXPORT, "{path}"),
     "{path}: exists and is not a directory"),
    ("export_under_a_file", _a_file(under=True), (*EXPORT, "{path}"),
     "{path}: cannot make the directory: {tmp}/a_file is a file"),
    ("export_to_read_only_dir", _read_only(inside=False), (*EXPORT, "{path}"),
     "{path}: cannot export there: the directory is not writable"),
    ("export_in_read_only_dir", _read_only(inside=True), (*EXPORT, "{path}"),
     "{path}: cannot export there: the parent {tmp}/read_only is not writable"),
]


@pytest.mark.parametrize("setup, argv, start", [case[1:] for case in BAD_INPUT],
                         ids=[case[0] for case in BAD_INPUT])
def test_bad_input_is_one_error_line_with_exit_2(tmp_path, capsys, setup, argv, start):
    scratch = Scratch(tmp_path)
    try:
        names = {"tmp": tmp_path, "config": _config(tmp_path), **setup(scratch)}
        code = main([arg.format(**names) for arg in argv])
    finally:
        scratch.undo()
    line = _one_error_line(capsys)
    assert code == 2
    assert line.startswith("jaxcov: error: " + start.format(**names)), line


# ------------------------------------------------------------------------------- eval


def test_eval_checkpoint_that_is_missing_or_holds_none(tmp_path, capsys, model_load):
    config = _config(tmp_path)
    missing = tmp_path / "nope"
    assert main(["eval", config, "--checkpoint", str(missing)]) == 2
    assert _one_error_line(capsys) == f"jaxcov: error: --checkpoint {missing}: no such directory"
    assert not missing.exists()  # not created by the look
    empty_run, no_steps_run = tmp_path / "empty_run", tmp_path / "no_steps_run"
    empty_run.mkdir()
    (no_steps_run / "checkpoints").mkdir(parents=True)
    for run in (empty_run, no_steps_run):
        assert main(["eval", config, "--checkpoint", str(run)]) == 2
        assert _one_error_line(capsys).startswith(
            f"jaxcov: error: --checkpoint {run}: no checkpoint there")


def test_eval_takes_overrides_after_the_checkpoint_option(tmp_path, capsys, model_load):
    config, run = _config(tmp_path), tmp_path / "trained"
    args = parse_args(["eval", config, "--checkpoint", str(run), "data.eval_size=3",
                       "optim.lr=0.5"])
    assert args.checkpoint == str(run) and args.overrides == ["data.eval_size=3", "optim.lr=0.5"]
    assert load_config(args.config, args.overrides).data.eval_size == 3
    assert main(["eval", config, "--checkpoint", str(run), "train.bogus=1"]) == 2
    assert "train.bogus: unknown key" in _one_error_line(capsys)

    saver = Checkpointer(str(run / "checkpoints"), asynchronous=False)
    saver.save(7, {"w": jnp.zeros(2)}, {})
    saver.close()
    checkpointer, step = trainer.eval_checkpoint(str(run), load_config(config))
    checkpointer.close()
    assert step == 7
    with pytest.raises(ModelLoadReached):  # a run directory with a checkpoint gets this far
        main(["eval", config, "--checkpoint", str(run), "data.eval_size=3"])
    assert [c.data.eval_size for c in model_load] == [3]
