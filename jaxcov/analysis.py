"""`jaxcov analyze RUN_DIR [RUN_DIR ...]`: the entropy mechanism measured on finished runs.

For each run it fits the paper's entropy-performance law R = -a*exp(H) + b on (entropy, reward)
points, once on all steps and once on the first p% of steps (extrapolated to the rest), and it
checks how well the covariance-predicted entropy change tracks the measured one. It writes
`report.md` and PNG plots.

What is H and what is R (from metrics.jsonl):
  with at least MIN_FIT_POINTS + 1 held-out evaluations that logged their samples' entropy (as
  `jaxcov repro` runs), one point per evaluation:
    H = `eval/sample_entropy`: mean -log pi of the sampled tokens (the entropy at T = 1);
    R = `eval/avg@k` on the same samples, with its standard error over problems;
  otherwise one point per RL step:
    H = `rollout/entropy`: mean token entropy of the policy on the step's sampled responses,
        before the step's update (the paper plots the entropy of the rollouts);
    R = `reward/accuracy`: accuracy of the step's training batch (the first rollout round).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional, Sequence

import numpy as np
import yaml

from jaxcov.config import ConfigError
from jaxcov.metrics import METRICS_FILE, read_metrics

H_KEY = "rollout/entropy"
R_KEY = "reward/accuracy"
MEASURED_DH_KEY = "entropy/measured_dH"
PREDICTED_DH_KEY = "entropy/pred_dH"
COV_KEY = "cov/mean"
EVAL_H_KEY = "eval/sample_entropy"  # the entropy of the held-out samples R is measured on
REQUIRED_KEYS = (H_KEY, R_KEY, MEASURED_DH_KEY, PREDICTED_DH_KEY, COV_KEY)

# Two parameters: a fit needs more points than that to have any residual at all.
MIN_FIT_POINTS = 3
DEFAULT_FIT_PERCENT = 15.0

PLOT_FILES = {"fit": "reward_vs_entropy.png", "entropy": "entropy_vs_step.png",
              "dH": "dH_measured_vs_predicted.png"}
LEMMA_PLOT = "dH_lemma.png"  # only for runs that logged the lemma's predictions

# The predictions of the measured dH a run may have logged (`jaxcov.instrument`): the lemma's
# two forms from the real logit change, then the algorithmic forms from the advantages.
DH_PREDICTIONS = {"first order": "entropy/dH_first_order", "midpoint": "entropy/dH_midpoint",
                  "natural PG (-lr Cov(log pi, A))": PREDICTED_DH_KEY,
                  "vanilla PG (-lr Cov(log pi, pi A))": "entropy/pred_dH_pg"}
TOKEN_PREDICTIONS = {"first order": "first_order", "midpoint": "midpoint"}
SHARE_KEYS = {"selected (Clip-Cov / KL-Cov)": "entropy/dH_share_selected",
              "top 0.2% by Cov": "entropy/dH_share_top0.2pct",
              "top 2% by Cov": "entropy/dH_share_top2pct"}
TOKENS_FILE = "entropy_tokens.jsonl"  # jaxcov.instrument.TOKENS_FILE


class AnalysisError(ConfigError):
    """An input problem (missing file, key or points), described in one line naming it."""


# ------------------------------------------------------------------------------------ the fit


@dataclasses.dataclass(frozen=True)
class EntropyFit:
    """R = -a*exp(H) + b fitted on `n_points` points."""

    a: float
    b: float
    n_points: int

    @property
    def ceiling(self) -> float:
        """The predicted reward at H = 0 (entropy fully spent)."""
        return self.b - self.a

    def predict(self, entropy) -> np.ndarray:
        return -self.a * np.exp(np.asarray(entropy, float)) + self.b


def fit_entropy_reward(entropy: Sequence[float], reward: Sequence[float]) -> EntropyFit:
    """Least squares of R on [-exp(H), 1]: the model is linear in (a, b), so this is exact."""
    h, r = np.asarray(entropy, float), np.asarray(reward, float)
    if len(h) < MIN_FIT_POINTS:
        raise AnalysisError(f"the fit needs at least {MIN_FIT_POINTS} points, got {len(h)}")
    design = np.stack([-np.exp(h), np.ones_like(h)], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, r, rcond=None)
    return EntropyFit(float(a), float(b), len(h))


def early_points(steps: Sequence[int], percent: float) -> int:
    """Points in "the first p% of steps" (steps <= ceil(p% of the last), increasing), and never
    fewer than MIN_FIT_POINTS."""
    steps = np.asarray(steps)
    limit = math.ceil(round(percent / 100.0 * steps[-1], 9))
    return max(MIN_FIT_POINTS, int(np.sum(steps <= limit)))


def early_fit_count(n_points: int, percent: float) -> int:
    """`early_points` of one point per step 1..n: ceil(p% of n), at least MIN_FIT_POINTS."""
    return early_points(np.arange(1, n_points + 1), percent)


def rmse(predicted, observed) -> float:
    diff = np.asarray(predicted, float) - np.asarray(observed, float)
    return float(np.sqrt(np.mean(diff**2))) if diff.size else float("nan")


def correlation(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Pearson r; None with fewer than 3 points or a constant series."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


@dataclasses.dataclass(frozen=True)
class Agreement:
    """How well a prediction tracks the measured dH: Pearson r and the least-squares slope of
    measured on predicted (1: the right scale), over n points."""

    r: Optional[float]
    slope: Optional[float]
    n: int


def agreement(predicted, measured) -> Agreement:
    p, m = np.asarray(predicted, float), np.asarray(measured, float)
    r = correlation(p, m)
    slope = None if r is None else float(np.cov(p, m, bias=True)[0, 1] / np.var(p))
    return Agreement(r, slope, len(p))


# ------------------------------------------------------------------------------- loading runs


@dataclasses.dataclass
class RunSeries:
    """The per-step metrics of one run that the analysis uses (RL steps only, step order)."""

    name: str
    run_dir: str
    records: list[dict]            # RL step records (step >= 1), one per step
    eval_records: list[dict]       # records with held-out eval metrics (step 0 included)
    planned_steps: Optional[int]   # train.steps of the run's config.yaml, when there is one
    tokens: dict = dataclasses.field(default_factory=dict)  # TOKENS_FILE columns, pooled

    def column(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of the steps where `key` has a finite value."""
        pairs = [(r["step"], r[key]) for r in self.records if r.get(key) is not None]
        steps, values = zip(*pairs) if pairs else ((), ())
        return np.asarray(steps, int), np.asarray(values, float)

    def paired(self, key_x: str, key_y: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(steps, x, y) of the steps where both keys have values."""
        rows = [(r["step"], r[key_x], r[key_y]) for r in self.records
                if r.get(key_x) is not None and r.get(key_y) is not None]
        steps, x, y = zip(*rows) if rows else ((), (), ())
        return np.asarray(steps, int), np.asarray(x, float), np.asarray(y, float)

    def eval_points(self) -> "FitPoints":
        """The held-out evaluations with a sampled entropy: H, avg@k and its standard error."""
        rows = [(r["step"], r[EVAL_H_KEY], r[key], r.get(key + "_se", float("nan")))
                for r in self.eval_records if EVAL_H_KEY in r
                for key in [avg_key(r)] if key]
        steps, h, r, se = zip(*rows) if rows else ((), (), (), ())
        return FitPoints(np.asarray(steps, int), np.asarray(h, float), np.asarray(r, float),
                         np.asarray(se, float), "held-out evaluations",
                         EVAL_H_KEY, avg_key(self.eval_records[-1]) if rows else "")

    def step_points(self) -> "FitPoints":
        steps, h, r = self.paired(H_KEY, R_KEY)
        return FitPoints(steps, h, r, np.full(len(h), np.nan), "RL steps", H_KEY, R_KEY)

    def fit_points(self) -> "FitPoints":
        """The points R = -a exp(H) + b is fitted on: the held-out evaluations when the run
        logged enough of them with their entropy (`jaxcov repro` does), else the RL steps."""
        points = self.eval_points()
        return points if len(points.h) > MIN_FIT_POINTS else self.step_points()

    @property
    def complete(self) -> bool:
        last = self.records[-1]["step"] if self.records else 0
        return self.planned_steps is None or last >= self.planned_steps


def avg_key(record: dict) -> str:
    """The record's eval/avg@k key ("" when it has none)."""
    return next((k for k in sorted(record) if k.startswith("eval/avg@") and
                 not k.endswith("_se")), "")


@dataclasses.dataclass(frozen=True)
class FitPoints:
    """(H, R) points of a run, with R's standard error where it was measured (NaN otherwise)."""

    steps: np.ndarray
    h: np.ndarray
    r: np.ndarray
    se: np.ndarray
    source: str   # "RL steps" or "held-out evaluations"
    h_key: str
    r_key: str


def _planned_steps(run_dir: str) -> Optional[int]:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    return (values.get("train") or {}).get("steps")


def load_run(run_dir: str, required: Sequence[str] = REQUIRED_KEYS) -> RunSeries:
    """Reads a run directory's metrics.jsonl; AnalysisError names whatever is missing."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isdir(run_dir):
        raise AnalysisError(f"{run_dir}: no such run directory")
    if not os.path.exists(path):
        raise AnalysisError(f"{run_dir}: {METRICS_FILE} not found (not a jaxcov train run dir?)")
    by_step = {r["step"]: r for r in read_metrics(path) if isinstance(r.get("step"), int)}
    records = [by_step[s] for s in sorted(by_step) if s >= 1]
    if not records:
        raise AnalysisError(f"{path}: no RL step recorded (empty or only the step-0 eval)")
    for key in required:
        lacking = [r["step"] for r in records if key not in r]
        if len(lacking) == len(records):
            raise AnalysisError(f"{path}: no step has the metric '{key}'")
        if lacking:
            raise AnalysisError(f"{path}: steps {_ranges(lacking)} lack the metric '{key}'")
    evals = [by_step[s] for s in sorted(by_step) if any(k.startswith("eval/") for k in by_step[s])]
    name = os.path.basename(os.path.normpath(run_dir))
    return RunSeries(name, run_dir, records, evals, _planned_steps(run_dir),
                     _token_columns(run_dir, {r["step"] for r in records}))


def _token_columns(run_dir: str, steps: set) -> dict:
    """The sampled positions of TOKENS_FILE, pooled over `steps` (a resumed run's rewritten
    step counts once: its last line)."""
    path = os.path.join(run_dir, TOKENS_FILE)
    if not os.path.exists(path):
        return {}
    by_step = {r["step"]: r for r in read_metrics(path) if r.get("step") in steps}
    names = ("measured",) + tuple(TOKEN_PREDICTIONS.values())
    return {k: np.concatenate([np.asarray(by_step[s].get(k, []), float) for s in sorted(by_step)]
                              or [np.zeros(0)]) for k in names}


def _ranges(steps: list[int]) -> str:
    if len(steps) <= 6:
        return ", ".join(map(str, steps))
    return f"{steps[0]}..{steps[-1]} ({len(steps)} steps)"


def unique_names(runs: list[RunSeries]) -> None:
    """Runs are labelled by directory name; equal names fall back to the path given."""
    names = [r.name for r in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = os.path.normpath(run.run_dir)


# ------------------------------------------------------------------------------ per-run analysis


@dataclasses.dataclass
class RunAnalysis:
    series: RunSeries
    points: FitPoints           # what the fits are on
    full_fit: EntropyFit
    full_rmse: float            # in-sample, all points
    full_final_error: float     # predicted - observed at the final step
    early_fit: EntropyFit
    early_rmse: float           # on the points after the fit window
    early_final_error: float
    constant_rmse: float        # "R stays at its early mean", on the same steps: a baseline
    dh_correlation: Optional[float]
    dh_sign_agreement: float
    positive_cov_fraction: float
    lemma_steps: dict      # DH_PREDICTIONS name -> Agreement per step (those the run logged)
    lemma_tokens: dict     # TOKEN_PREDICTIONS name -> Agreement over the sampled positions
    dh_shares: dict        # SHARE_KEYS name -> mean over steps

    @property
    def name(self) -> str:
        return self.series.name


def analyze_run(series: RunSeries, fit_percent: float = DEFAULT_FIT_PERCENT) -> RunAnalysis:
    """Fits and entropy-change statistics of one run; AnalysisError with too few points."""
    points = series.fit_points()
    h, r = points.h, points.r
    n_early = early_points(points.steps, fit_percent) if len(h) else MIN_FIT_POINTS
    if len(h) <= n_early:
        raise AnalysisError(
            f"{series.run_dir}: {len(h)} points with both '{H_KEY}' and '{R_KEY}'; fitting the "
            f"first {fit_percent:g}% ({n_early} points) and testing on the rest needs at least "
            f"{n_early + 1}" + ("" if series.complete else
                                f" (the run stopped before its {series.planned_steps} steps)"))
    full, early = fit_entropy_reward(h, r), fit_entropy_reward(h[:n_early], r[:n_early])
    _, measured, predicted = series.paired(MEASURED_DH_KEY, PREDICTED_DH_KEY)
    _, cov = series.column(COV_KEY)
    return RunAnalysis(
        series=series, points=points, full_fit=full, full_rmse=rmse(full.predict(h), r),
        full_final_error=float(full.predict(h[-1]) - r[-1]),
        early_fit=early, early_rmse=rmse(early.predict(h[n_early:]), r[n_early:]),
        early_final_error=float(early.predict(h[-1]) - r[-1]),
        constant_rmse=rmse(np.full(len(h) - n_early, r[:n_early].mean()), r[n_early:]),
        dh_correlation=correlation(measured, predicted),
        dh_sign_agreement=_fraction(np.sign(measured) == np.sign(predicted)),
        positive_cov_fraction=_fraction(cov > 0), **lemma_statistics(series))


def lemma_statistics(series: RunSeries) -> dict:
    """RunAnalysis' lemma_steps, lemma_tokens and dh_shares (empty for a run without them)."""
    steps = {}
    for name, key in DH_PREDICTIONS.items():
        _, measured, predicted = series.paired(MEASURED_DH_KEY, key)
        if len(measured):
            steps[name] = agreement(predicted, measured)
    tokens = {name: agreement(series.tokens[key], series.tokens["measured"])
              for name, key in TOKEN_PREDICTIONS.items() if len(series.tokens.get(key, ()))}
    shares = {name: _mean(series.column(key)[1]) for name, key in SHARE_KEYS.items()
              if len(series.column(key)[1])}
    return {"lemma_steps": steps, "lemma_tokens": tokens, "dh_shares": shares}


def _fraction(flags: np.ndarray) -> float:
    return _mean(flags.astype(float))


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if values.size else float("nan")


def analyze_dirs(run_dirs: Sequence[str], fit_percent: float = DEFAULT_FIT_PERCENT
                 ) -> list[RunAnalysis]:
    if not 0 < fit_percent < 100:
        raise AnalysisError(f"the early-fit percentage must be in (0, 100), got {fit_percent:g}")
    runs = [load_run(d) for d in run_dirs]
    unique_names(runs)
    return [analyze_run(run, fit_percent) for run in runs]


# ------------------------------------------------------------------------------------- plots


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish_plot(plt, fig, ax, xlabel: str, ylabel: str, out_dir: str, filename: str) -> str:
    """Labels, grid and legend, then saves the figure as out_dir/filename and closes it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = os.path.join(out_dir, filename)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_fits(analyses: list[RunAnalysis], out_dir: str) -> str:
    """R against H per run: points, the all-steps fit and the early fit, both drawn down to
    H = 0 so the extrapolated ceiling b - a shows as the curve's end (marked)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, run in enumerate(analyses):
        color = f"C{i}"
        h, r = run.points.h, run.points.r
        n_early = run.early_fit.n_points
        ax.scatter(h[n_early:], r[n_early:], color=color, s=14, label=f"{run.name}")
        ax.scatter(h[:n_early], r[:n_early], color=color, s=30, marker="s", facecolors="none")
        grid = np.linspace(0.0, max(h.max(), 0.1) * 1.05, 200)
        ax.plot(grid, run.full_fit.predict(grid), color=color, lw=1.2)
        ax.plot(grid, run.early_fit.predict(grid), color=color, lw=1.0, ls="--")
        ax.plot([0.0], [run.full_fit.ceiling], color=color, marker="*", ms=10)
        ax.plot([0.0], [run.early_fit.ceiling], color=color, marker="*", ms=10, mfc="none")
    ax.set_title("R = -a exp(H) + b: solid all points, dashed first points (squares); "
                 "stars: ceiling b - a at H = 0",
                 fontsize=9)
    p = analyses[0].points
    return finish_plot(plt, fig, ax, f"H = {p.h_key} ({p.source})", f"R = {p.r_key}", out_dir,
                   PLOT_FILES["fit"])


def plot_entropy(analyses: list[RunAnalysis], out_dir: str) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in analyses:
        steps, h = run.series.column(H_KEY)
        ax.plot(steps, h, marker=".", label=run.name)
    return finish_plot(plt, fig, ax, "step", f"entropy ({H_KEY})", out_dir, PLOT_FILES["entropy"])


def plot_entropy_change(analyses: list[RunAnalysis], out_dir: str) -> str:
    """Measured against predicted dH per step. The prediction is -lr*Cov (natural-gradient form):
    Adam rescales the real step, so the scales differ and only the trend is comparable."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for run in analyses:
        _, measured, predicted = run.series.paired(MEASURED_DH_KEY, PREDICTED_DH_KEY)
        r = "n/a" if run.dh_correlation is None else f"{run.dh_correlation:+.2f}"
        ax.scatter(predicted, measured, s=16, label=f"{run.name} (r = {r})")
    ax.axhline(0, color="grey", lw=0.6)
    ax.axvline(0, color="grey", lw=0.6)
    return finish_plot(plt, fig, ax, f"predicted dH ({PREDICTED_DH_KEY} = -lr x Cov)",
                   f"measured dH ({MEASURED_DH_KEY})", out_dir, PLOT_FILES["dH"])


def plot_lemma(analyses: list[RunAnalysis], out_dir: str) -> Optional[str]:
    """Measured dH against the lemma's predictions, per step and per sampled token."""
    with_lemma = [run for run in analyses if run.lemma_steps.get("first order")]
    if not with_lemma:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for run in with_lemma:
        for name, key in TOKEN_PREDICTIONS.items():
            _, measured, predicted = run.series.paired(MEASURED_DH_KEY, DH_PREDICTIONS[name])
            axes[0].scatter(predicted, measured, s=14, label=f"{run.name}, {name}")
            if len(run.series.tokens.get(key, ())):
                axes[1].scatter(run.series.tokens[key], run.series.tokens["measured"], s=4,
                                alpha=0.5, label=f"{run.name}, {name}")
    for ax, title in zip(axes, ("per step (means over response tokens)", "per token (sampled)")):
        low, high = ax.get_xlim()
        ax.plot([low, high], [low, high], color="grey", lw=0.8, label="measured = predicted")
        ax.set_title(title)
        ax.set_xlabel("predicted dH")
        ax.legend(fontsize=7)
    axes[0].set_ylabel(f"measured dH ({MEASURED_DH_KEY})")
    return finish_plot(plt, fig, axes[1], "predicted dH", "measured dH", out_dir, LEMMA_PLOT)


def write_analysis_plots(analyses: list[RunAnalysis], out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    plots = [plot_fits(analyses, out_dir), plot_entropy(analyses, out_dir),
             plot_entropy_change(analyses, out_dir), plot_lemma(analyses, out_dir)]
    return [p for p in plots if p]


# ------------------------------------------------------------------------------------ report


def _num(x: Optional[float], fmt: str = ".4g") -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, fmt)


def method_section(fit_percent: float) -> str:
    return f"""## Method

- Points: with held-out evaluations that logged their samples' entropy, one point per
  evaluation, H = `{EVAL_H_KEY}` (mean -log q of the sampled tokens: the entropy at T = 1) and
  R = `eval/avg@k` on the same samples; otherwise one point per RL step, H = `{H_KEY}` (mean
  token entropy of the step's responses, before the update), R = `{R_KEY}`.
- Fit R = -a*exp(H) + b by linear least squares on [-exp(H), 1] (exact: the model is linear in
  a and b). The ceiling is the prediction at H = 0, b - a.
- Early fit: the points in the first {fit_percent:g}% of the steps (rounded up), and never
  fewer than {MIN_FIT_POINTS} points (two parameters). It is scored on the remaining points (RMSE)
  and at the final one (predicted - observed). The constant baseline predicts the mean R of the
  fit window for every later point.
- Entropy change: Pearson r between `{MEASURED_DH_KEY}` (entropy after - before the step's
  updates, on the step's responses) and `{PREDICTED_DH_KEY}` (-lr x Cov(log pi, A) summed over
  the step's updates, natural-gradient form). Adam rescales the real update, so the scales differ
  by orders of magnitude and correlation, not equality, is the test. Sign agreement: steps where
  both have the same sign. Positive covariance: steps with `{COV_KEY}` > 0.
"""


def _fit_row(name: str, n: int, label: str, fit: EntropyFit, error: float, final: float,
             baseline: Optional[float]) -> str:
    return (f"| {name} | {n} | {label} | {_num(fit.a)} | {_num(fit.b)} | {_num(fit.ceiling)} | "
            f"{_num(error)} | {_num(final, '+.4g')} | {_num(baseline)} |")


def fits_section(analyses: list[RunAnalysis]) -> str:
    rows = ["| run | points | fit on | a | b | ceiling b-a | RMSE | final-point error | "
            "constant-baseline RMSE |", "|---|---|---|---|---|---|---|---|---|"]
    for run in analyses:
        n, n_early = run.full_fit.n_points, run.early_fit.n_points
        rows.append(_fit_row(run.name, n, f"all {run.points.source} (in-sample)", run.full_fit,
                             run.full_rmse, run.full_final_error, None))
        rows.append(_fit_row(run.name, n, f"first {n_early} (steps "
                             f"{_ranges(run.points.steps[:n_early].tolist())}; RMSE on the other "
                             f"{n - n_early})", run.early_fit, run.early_rmse,
                             run.early_final_error, run.constant_rmse))
    return "## R = -a*exp(H) + b\n\n" + "\n".join(rows) + "\n"


def entropy_section(analyses: list[RunAnalysis]) -> str:
    rows = ["| run | H first step | H last step | corr(measured dH, predicted dH) | sign agreement "
            "| steps with Cov > 0 | mean measured dH | mean predicted dH |",
            "|---|---|---|---|---|---|---|---|"]
    for run in analyses:
        _, h = run.series.column(H_KEY)
        _, measured = run.series.column(MEASURED_DH_KEY)
        _, predicted = run.series.column(PREDICTED_DH_KEY)
        rows.append(f"| {run.name} | {_num(h[0])} | {_num(h[-1])} | "
                    f"{_num(run.dh_correlation, '+.3f')} | {_num(run.dh_sign_agreement, '.0%')} | "
                    f"{_num(run.positive_cov_fraction, '.0%')} | {_num(_mean(measured))} | "
                    f"{_num(_mean(predicted))} |")
    return "## Entropy change and covariance\n\n" + "\n".join(rows) + "\n"


def _agreement_cells(a: Optional[Agreement]) -> str:
    if a is None:
        return "- | - | -"
    return f"{_num(a.r, '+.3f')} | {_num(a.slope, '.3f')} | {a.n}"


def lemma_section(analyses: list[RunAnalysis]) -> str:
    """Measured dH against each prediction the run logged, and where the change sits."""
    rows = ["| run | prediction | r per step | slope per step | steps | r per token | "
            "slope per token | tokens |", "|---|---|---|---|---|---|---|---|"]
    for run in analyses:
        for name, steps in run.lemma_steps.items():
            rows.append(f"| {run.name} | {name} | {_agreement_cells(steps)} | "
                        f"{_agreement_cells(run.lemma_tokens.get(name))} |")
    if len(rows) == 2:
        return ""
    shares = ["| run | " + " | ".join(SHARE_KEYS) + " |", "|---" * (len(SHARE_KEYS) + 1) + "|"]
    for run in analyses:
        if run.dh_shares:
            shares.append(f"| {run.name} | " + " | ".join(
                _num(run.dh_shares.get(name), ".1%") for name in SHARE_KEYS) + " |")
    text = ("## The lemma: measured dH against its predictions\n\n"
            "Slope: least squares of measured on predicted (1 is the right scale).\n\n"
            + "\n".join(rows) + "\n")
    if len(shares) > 2:
        text += ("\n### Where the entropy change sits (share of the step's summed measured dH, "
                 "mean over steps)\n\n" + "\n".join(shares) + "\n")
    return text


def eval_section(analyses: list[RunAnalysis]) -> str:
    rows = []
    for run in analyses:
        for record in run.series.eval_records:
            values = ", ".join(f"`{k}` {_num(v)}" for k, v in sorted(record.items())
                               if k.startswith("eval/") and k != "eval/examples")
            rows.append(f"- {run.name}, step {record['step']}: {values} "
                        f"({record.get('eval/examples', '?')} held-out problems)")
    if not rows:
        return ""
    title = "## Held-out evaluations"
    return title + "\n\n" + "\n".join(rows) + "\n"


def status_section(analyses: list[RunAnalysis]) -> str:
    rows = []
    for run in analyses:
        last = run.series.records[-1]["step"]
        planned = run.series.planned_steps
        state = "" if run.series.complete else " — INCOMPLETE"
        rows.append(f"- {run.name}: `{run.series.run_dir}`, {last} of "
                    f"{planned if planned is not None else '?'} steps{state}")
    return "## Runs\n\n" + "\n".join(rows) + "\n"


def plots_section(plot_paths: list[str]) -> str:
    return "## Plots\n\n" + "\n".join(
        f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plot_paths) + "\n"


def report_sections(analyses: list[RunAnalysis], plot_paths: list[str],
                    fit_percent: float) -> list[str]:
    sections = [status_section(analyses), method_section(fit_percent), fits_section(analyses),
                entropy_section(analyses), lemma_section(analyses), eval_section(analyses),
                plots_section(plot_paths)]
    return [s for s in sections if s]


def write_report(out_dir: str, title: str, sections: list[str]) -> str:
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write(f"# {title}\n\n" + "\n".join(sections))
    return path


# ---------------------------------------------------------------------------------------- CLI


def default_out_dir(run_dirs: Sequence[str]) -> str:
    """The run directory itself for one run; `<common parent>/analysis` for several."""
    if len(run_dirs) == 1:
        return run_dirs[0]
    return os.path.join(os.path.commonpath([os.path.abspath(d) for d in run_dirs]), "analysis")


def summary_lines(analyses: list[RunAnalysis]) -> list[str]:
    lines = []
    for run in analyses:
        f, e = run.full_fit, run.early_fit
        lines.append(
            f"{run.name}: all {f.n_points} {run.points.source} a={f.a:.4g} b={f.b:.4g} ceiling={f.ceiling:.4g} "
            f"rmse={run.full_rmse:.4g} | first {e.n_points}: a={e.a:.4g} b={e.b:.4g} "
            f"ceiling={e.ceiling:.4g} rmse(rest)={run.early_rmse:.4g} "
            f"final err={run.early_final_error:+.4g} | corr(dH)={_num(run.dh_correlation, '+.3f')} "
            f"cov>0 {_num(run.positive_cov_fraction, '.0%')}" + _lemma_summary(run)
            + _incomplete(run.series))
    return lines


def _lemma_summary(run: RunAnalysis) -> str:
    parts = [f"{name}: r={_num(a.r, '+.3f')} slope={_num(a.slope, '.3f')}"
             for name, a in run.lemma_steps.items() if name in TOKEN_PREDICTIONS]
    return (" | dH per step, " + ", ".join(parts)) if parts else ""


def _incomplete(series: RunSeries) -> str:
    if series.complete:
        return ""
    return f" INCOMPLETE: {series.records[-1]['step']} of {series.planned_steps} steps"


def analyze_command(args) -> int:
    """`jaxcov analyze RUN_DIR [...]`: fits, entropy-change statistics, report.md and plots."""
    analyses = analyze_dirs(args.run_dirs, args.fit_percent)
    out_dir = args.out or default_out_dir(args.run_dirs)
    plots = write_analysis_plots(analyses, out_dir)
    report = write_report(out_dir, "Entropy mechanism: " + ", ".join(a.name for a in analyses),
                          report_sections(analyses, plots, args.fit_percent))
    print("\n".join(summary_lines(analyses)))
    print(f"wrote {report}, " + ", ".join(plots))
    return 0
