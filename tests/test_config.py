"""Config system: YAML + overrides into frozen dataclasses, one-line errors, CLI exit code 2."""

import subprocess
import sys

import pytest

from jaxcov.config import ConfigError, ExperimentConfig, load_config


def _write(tmp_path, text):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_and_overrides(tmp_path):
    path = _write(tmp_path, "model:\n  remat: dots\n  logits_chunk: 64\nmesh:\n  tensor: 2\n")
    cfg = load_config(path, ["model.logits_chunk=32", "mesh.data=4", "seed=7"])
    assert isinstance(cfg, ExperimentConfig)
    assert (cfg.model.remat, cfg.model.logits_chunk) == ("dots", 32)
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.seed) == (4, 1, 2, 7)
    with pytest.raises(Exception):
        cfg.model.remat = "none"  # frozen


@pytest.mark.parametrize("text,overrides,message", [
    ("model:\n  remat_policy: full\n", [], "exp.yaml: model.remat_policy: unknown key"),
    ("model:\n  logits_chunk: many\n", [], "exp.yaml: model.logits_chunk: expected an integer, got 'many'"),
    ("model:\n  logits_chunk: 1.5\n", [], "model.logits_chunk: expected an integer, got 1.5"),
    ("model:\n  remat: sometimes\n", [], "model.remat: must be one of"),
    ("model:\n  logits_chunk: 0\n", [], "model.logits_chunk: must be > 0"),
    ("mesh:\n  data: -1\n  fsdp: -1\n", [], "at most one mesh axis may be -1"),
    ("", ["nosuch.key=1"], "exp.yaml: nosuch: unknown key"),
    ("model: 3\n", [], "model: expected a mapping (section), got 3"),
    ("model: [1, 2\n", [], "exp.yaml (line"),
])
def test_errors_name_key_and_file(tmp_path, text, overrides, message):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: /no/such.yaml"):
        load_config("/no/such.yaml")


def test_cli_exits_2_with_one_line(tmp_path):
    path = _write(tmp_path, "model:\n  colour: blue\n")
    proc = subprocess.run([sys.executable, "-m", "jaxcov", "config", path],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"jaxcov: error: {path}: model.colour: unknown key (valid keys: name,")
