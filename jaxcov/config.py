"""Experiment configuration: frozen dataclasses are the schema, YAML files hold the values.

`load_config(path, overrides)` reads a YAML file, applies dotted `section.key=value` overrides and
builds an `ExperimentConfig`. Every problem (unknown key, wrong type, bad value, missing file) is a
`ConfigError` whose message is one line naming the key and where it came from; the CLI prints it
and exits with status 2.

Each section validates its own values in `__post_init__` by raising `ConfigError` with the field
name; the loader adds the section and the file to the message.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A configuration problem, described in one line."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which model to load and how to run it.

    Attributes:
      name: a registered name (`smollm2-135m-instruct`), an HF directory, or a `.gguf` file.
      param_dtype: dtype the parameters are stored and updated in.
      compute_dtype: dtype of matmuls and activations (softmax, norms and log-probs stay fp32).
      remat: rematerialisation policy of each layer: none | full | dots | dots_no_batch.
      logits_chunk: sequence chunk for log-prob/entropy so full B x T x V logits never exist at once.
      max_seq_len: longest prompt + response the run may use.
    """

    name: str = "smollm2-135m-instruct"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "full"
    logits_chunk: int = 128
    max_seq_len: int = 1024

    def __post_init__(self):
        _require(self.logits_chunk > 0, "logits_chunk", f"must be > 0, got {self.logits_chunk}")
        _require(self.max_seq_len > 0, "max_seq_len", f"must be > 0, got {self.max_seq_len}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes along (data, fsdp, tensor); one size may be -1 for "all the rest"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for key, size in sizes.items():
            _require(size == -1 or size >= 1, key, f"must be >= 1 or -1, got {size}")
        _require(list(sizes.values()).count(-1) <= 1, "data", "at most one mesh axis may be -1")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """The whole experiment: one field per YAML section."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    seed: int = 0


# --------------------------------------------------------------------------- building from dicts


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against the annotation `tp`, converting only where it is lossless."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: must not be null")
    if origin is Literal:
        choices = typing.get_args(tp)
        _require(value in choices, key, f"must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (tuple, list):
        _require(isinstance(value, (list, tuple)), key, f"expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        _require(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        _require(isinstance(value, dict), key, f"expected a mapping (section), got {value!r}")
        return build_dataclass(tp, value, prefix=key + ".")
    if tp is Any:
        return value
    if tp is bool:
        _require(isinstance(value, bool), key, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key,
                 f"expected an integer, got {value!r}")
        return value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _require(ok, key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        _require(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {_type_name(tp)}")


def build_dataclass(cls: type, values: dict, prefix: str = "") -> Any:
    """Builds dataclass `cls` from a plain dict, checking keys and types recursively."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (valid keys: {', '.join(fields)})")
    kwargs = {name: _coerce(v, hints[name], prefix + name) for name, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(prefix + str(e)) from None


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Returns a copy of the nested dict `values` with dotted overrides applied."""
    values = _deep_copy(values)
    for text in overrides:
        path, value = _parse_override(text)
        node = values
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return values


def _deep_copy(values: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in values.items()}


def read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            values = yaml.safe_load(f)
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise ConfigError(f"{path}{where}: not valid YAML") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return values


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None,
                cls: type = ExperimentConfig) -> Any:
    """Loads a config from a YAML file (or defaults when `path` is None) plus overrides."""
    values = read_yaml(path) if path else {}
    values = apply_overrides(values, list(overrides or []))
    try:
        return build_dataclass(cls, values)
    except ConfigError as e:
        source = path or "command line"
        raise ConfigError(f"{source}: {e}") from None


def to_dict(config: Any) -> dict:
    """The config as plain YAML-able data (tuples become lists)."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(config))
