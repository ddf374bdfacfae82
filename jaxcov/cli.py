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


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse prints the usage line and exits 2 otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _generate_args(p):
    p.add_argument("model", help="model name, HF directory or .gguf file")
    p.add_argument("--prompt", action="append", required=True, help="user message (repeatable)")
    p.add_argument("-n", type=_positive_int, default=1, help="samples per prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=_positive_int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system", default=None, help="system prompt (default: the template's)")
    _tokenizer_arg(p)


def _tokenizer_arg(p):
    p.add_argument("--tokenizer", default="", help="tokenizer directory, .gguf file or model "
                   "name (default: the model's own; for a directory without tokenizer files)")


@command("generate", _generate_args)
def generate_command(args) -> int:
    """Samples responses to chat prompts with the jitted sampler."""
    from jaxcov.models.api import check_tokenizer_source
    from jaxcov.sampler import generate_cli

    check_tokenizer_source(args.model, args.tokenizer, "generate")  # one line, before the load
    return generate_cli(args)


# ------------------------------------------------------------------------------------ export


def _export_args(p):
    p.add_argument("model", help="model name, HF directory or .gguf file")
    p.add_argument("out_dir", help="directory to write config.json + model.safetensors to")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    _tokenizer_arg(p)


@command("export", _export_args)
def export_command(args) -> int:
    """Exports a model to an HF directory that transformers loads unchanged."""
    from jaxcov.models.api import load_model
    from jaxcov.models.loading import check_export_dir, export_hf

    check_export_dir(args.out_dir)  # before the (possibly long) load
    model = load_model(args.model, tokenizer=args.tokenizer)
    export_hf(args.out_dir, model.params, model.config, model.tokenizer, dtype=args.dtype)
    print(f"wrote {args.out_dir}")
    return 0


# ----------------------------------------------------------------------------- analyze / repro


def _fit_percent(text: str) -> float:
    value = float(text)
    if not 0 < value < 100:
        raise argparse.ArgumentTypeError(f"must be in (0, 100), got {text}")
    return value


def _analyze_args(p):
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (metrics.jsonl)")
    p.add_argument("--fit-percent", type=_fit_percent, default=15.0,
                   help="fit R = -a*exp(H) + b on the first p%% of steps too (default 15)")
    p.add_argument("--out", default="", help="where report.md and the plots go (default: the "
                   "run directory for one run, <common parent>/analysis for several)")


@command("analyze", _analyze_args)
def analyze_command(args) -> int:
    """Fits R = -a*exp(H) + b, compares measured and predicted dH; writes report.md and plots."""
    from jaxcov.analysis import analyze_command as run

    return run(args)


def _repro_args(p):
    from jaxcov.repro import DEFAULT_STEPS

    p.add_argument("--out", default="reports/repro", help="report, plots and copied metrics")
    p.add_argument("--runs-dir", default="runs/repro", help="the three run directories")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="RL steps per run")
    p.add_argument("--fit-percent", type=_fit_percent, default=15.0)
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for all three runs")


@command("repro", _repro_args)
def repro_command(args) -> int:
    """Runs GRPO, Clip-Cov and KL-Cov on the embedded task and reports the paper's findings."""
    from jaxcov.repro import repro_command as run

    return run(args)


# -------------------------------------------------------------------------------------- plan


def _plan_args(p):
    _config_args(p)
    p.add_argument("--topology", help="TPU slice: v4-N or v5p-N (N TensorCores, 2 per chip), "
                   "v5litepod-N or v6e-N (N chips)")
    p.add_argument("--devices", type=int, help="number of devices (e.g. GPUs), with --hbm-gib")
    p.add_argument("--hbm-gib", type=float, help="memory per device in GiB, with --devices")
    p.add_argument("--usable", type=float, default=None,
                   help="fraction of HBM the plan may fill (default 0.9; the rest is headroom "
                   "for XLA temporaries and fragmentation)")


@command("plan", _plan_args)
def plan_command(args) -> int:
    """Per-device memory of a config on a TPU slice or GPUs; exit 2 (with a fix) if it won't fit."""
    from jaxcov.plan import plan_command as run

    return run(args)


# ------------------------------------------------------------------------------------- lower


def _lower_args(p):
    _config_args(p)
    p.add_argument("--platform", required=True, choices=["tpu", "cuda"],
                   help="the accelerator to lower for (the host need not have it)")
    p.add_argument("--out", default="", help="directory for each program's StableHLO text")


@command("lower", _lower_args)
def lower_command(args) -> int:
    """Lowers the run's score, update and sampler programs for TPU or GPU (jax.export)."""
    from jaxcov.lowering import lower_command as run

    return run(args)


# ------------------------------------------------------------------------------------- main


class UsageError(ConfigError):
    """A command line that argparse rejects."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one `jaxcov: error:` line like every other bad input (argparse
    itself prints the usage block and a `jaxcov <command>: error:` line, and exits)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxcov", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, add_arguments) in COMMANDS.items():
        p = sub.add_parser(name, help=(fn.__doc__ or "").splitlines()[0])
        add_arguments(p)
        p.set_defaults(run=fn)
    return parser


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The command line, with `section.key=value` overrides allowed after options too
    (`eval CFG --checkpoint RUN k=v`): argparse fills the `overrides` list only where it first
    meets it and would call later overrides unrecognized arguments."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all(_is_override(a) for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _is_override(text: str) -> bool:
    return "=" in text and not text.startswith("-")


def main(argv: Optional[list[str]] = None) -> int:
    try:
        args = parse_args(argv)
        return int(args.run(args) or 0)
    except (ConfigError, FileNotFoundError) as e:
        print(f"{_process_label()}jaxcov: error: {e}", file=sys.stderr)
        return 2


def _process_label() -> str:
    """'[process i/n] ' in a multi-process run (only commands that run JAX import the module)."""
    distributed = sys.modules.get("jaxcov.distributed")
    return distributed.log_prefix() if distributed is not None else ""


if __name__ == "__main__":
    sys.exit(main())
