"""Where metrics go: a JSONL line per step, TensorBoard events, W&B (optional), a progress bar,
and at the end a summary table and PNG plots in the run directory."""

from __future__ import annotations

import json
import math
import os
from typing import Iterable, Optional

import numpy as np

METRICS_FILE = "metrics.jsonl"


def _plain(value):
    """JSON-safe scalar: numpy/jax scalars to float, non-finite numbers to None."""
    value = float(np.asarray(value)) if not isinstance(value, (str, bool, int)) else value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlWriter:
    """Appends one JSON object per step; on resume, drops lines of steps after the checkpoint."""

    def __init__(self, run_dir: str, resume_step: Optional[int] = None):
        self.path = os.path.join(run_dir, METRICS_FILE)
        if resume_step is not None and os.path.exists(self.path):
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
        self._file = open(self.path, "a")

    def write(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in sorted(metrics.items())}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str) -> list[dict]:
    """All complete records of a metrics.jsonl (a truncated last line is ignored)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class TensorBoardWriter:
    def __init__(self, run_dir: str):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            value = _plain(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbWriter:
    def __init__(self, run_dir: str, project: str, config: dict):
        import wandb  # optional dependency

        self._run = wandb.init(project=project, dir=run_dir, config=config, resume="allow")

    def write(self, step: int, metrics: dict) -> None:
        self._run.log({k: _plain(v) for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self._run.finish()


class MetricsSink:
    """Fans each step's metrics out to every writer."""

    def __init__(self, writers: Iterable):
        self.writers = list(writers)

    def write(self, step: int, metrics: dict) -> None:
        for writer in self.writers:
            writer.write(step, metrics)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def make_sink(run_dir: str, resume_step: Optional[int], tensorboard: bool = True,
              wandb_project: Optional[str] = None, config: Optional[dict] = None) -> MetricsSink:
    writers = [JsonlWriter(run_dir, resume_step)]
    if tensorboard:
        writers.append(TensorBoardWriter(run_dir))
    if wandb_project:
        try:
            writers.append(WandbWriter(run_dir, wandb_project, config or {}))
        except ImportError:
            print("jaxcov: wandb is not installed; W&B logging is off")
    return MetricsSink(writers)


# --------------------------------------------------------------------------- end-of-run report

SUMMARY_KEYS = ("reward/mean", "reward/accuracy", "actor/entropy", "cov/mean",
                "response/length_mean", "time/step")

PLOTS = {
    "reward.png": ("reward/mean", "reward"),
    "entropy.png": ("actor/entropy", "policy entropy (response tokens)"),
    "covariance.png": ("cov/mean", "mean token cov(log pi, A)"),
}


def summary_table(records: list[dict], keys: Iterable[str] = SUMMARY_KEYS) -> str:
    """First / last / min / max of the main metrics, as a text table."""
    rows = [f"{'metric':28}{'first':>10}{'last':>10}{'min':>10}{'max':>10}"]
    for key in keys:
        values = [r[key] for r in records if r.get(key) is not None]
        if values:
            rows.append(f"{key:28}{values[0]:10.4g}{values[-1]:10.4g}{min(values):10.4g}"
                        f"{max(values):10.4g}")
    return "\n".join(rows)


# Held-out metrics the summary compares before and after training (avg@k / pass@k by prefix).
EVAL_SUMMARY_PREFIXES = ("eval/greedy_acc", "eval/avg@", "eval/pass@", "eval/sample_entropy")


def eval_summary(records: list[dict]) -> str:
    """The held-out metrics of the first eval (step 0: the model before training) and of the
    last one, as a text table; '' when the run has evaluated at most once."""
    evals = [r for r in records if "eval/examples" in r]
    if len(evals) < 2:
        return ""
    first, last = evals[0], evals[-1]
    keys = [k for k in last if k.startswith(EVAL_SUMMARY_PREFIXES) and not k.endswith("_se")
            and first.get(k) is not None and last[k] is not None]
    rows = [f"held-out eval ({last['eval/examples']} prompts)",
            f"{'metric':28}{'step ' + str(first['step']):>10}{'step ' + str(last['step']):>10}"
            f"{'change':>10}"]
    for key in keys:
        rows.append(f"{key:28}{first[key]:10.4g}{last[key]:10.4g}{last[key] - first[key]:+10.4g}")
    return "\n".join(rows)


def write_plots(run_dir: str, records: list[dict]) -> list[str]:
    """PNG plots of reward, entropy and covariance against step; returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for filename, (key, label) in PLOTS.items():
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if not points:
            continue
        steps, values = zip(*points)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, values, marker=".")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(run_dir, filename)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
