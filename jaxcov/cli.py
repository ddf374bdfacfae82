"""Command line: `jaxcov <command> ...` (also `python -m jaxcov <command> ...`).

Configuration and input problems print one line `jaxcov: error: ...` and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

from jaxcov.config import ConfigError

COMMANDS: dict[str, tuple[Callable, Callable]] = {}


def command(name: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Registers `fn(args) -> int` as a subcommand whose arguments `add_arguments` declares."""
    def register(fn):
        COMMANDS[name] = (fn, add_arguments)
        return fn
    return register


# ------------------------------------------------------------------------------------ config


def _config_args(p):
    p.add_argument("config", help="experiment YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")


@command("config", _config_args)
def config_command(args) -> int:
    """Validates a config and prints it fully resolved (defaults filled in)."""
    import yaml

    from jaxcov.config import load_config, to_dict

    print(yaml.safe_dump(to_dict(load_config(args.config, args.overrides)), sort_keys=False), end="")
    return 0


# ------------------------------------------------------------------------------- train / eval


@command("train", _config_args)
def train_command(args) -> int:
    """Trains (or resumes) the experiment of a config file."""
    from jaxcov.trainer import train_command as run

    return run(args)


def _eval_args(p):
    _config_args(p)
    p.add_argument("--checkpoint", default="", help="run directory whose latest checkpoint to "
                   "evaluate (default: the config's train.run_dir if it has one, else the model)")


@command("eval", _eval_args)
def eval_command(args) -> int:
    """Evaluates a model or a run's latest checkpoint on the held-out split."""
    from jaxcov.trainer import eval_command as run

    return run(args)


# ---------------------------------------------------------------------------------- generate


def _generate_args(p):
    p.add_argument("model", help="model name, HF directory or .gguf file")
    p.add_argument("--prompt", action="append", required=True, help="user message (repeatable)")
    p.add_argument("-n", type=int, default=1, help="samples per prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system", default=None, help="system prompt (default: the template's)")


@command("generate", _generate_args)
def generate_command(args) -> int:
    """Samples responses to chat prompts with the jitted sampler."""
    from jaxcov.sampler import generate_cli

    return generate_cli(args)


# ------------------------------------------------------------------------------------ export


def _export_args(p):
    p.add_argument("model", help="model name, HF directory or .gguf file")
    p.add_argument("out_dir", help="directory to write config.json + model.safetensors to")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


@command("export", _export_args)
def export_command(args) -> int:
    """Exports a model to an HF directory that transformers loads unchanged."""
    from jaxcov.models.api import load_model
    from jaxcov.models.loading import export_hf

    model = load_model(args.model)
    export_hf(args.out_dir, model.params, model.config, model.tokenizer, dtype=args.dtype)
    print(f"wrote {args.out_dir}")
    return 0


# ------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxcov", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, add_arguments) in COMMANDS.items():
        p = sub.add_parser(name, help=(fn.__doc__ or "").splitlines()[0])
        add_arguments(p)
        p.set_defaults(run=fn)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ConfigError, FileNotFoundError) as e:
        print(f"jaxcov: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
