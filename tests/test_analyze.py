"""`jaxcov analyze` and `jaxcov repro` on synthetic metrics logs: the R = -a*exp(H) + b fit
recovers known parameters, the entropy-change statistics match hand-computed values, reports and
plots are written, bad inputs give one clear error line, and repro's orchestration (skip complete
runs, the four findings) works with a fake trainer."""

import json
import math
import os

import numpy as np
import pytest
import yaml

from jaxcov import repro as repro_lib
from jaxcov.analysis import (AnalysisError, analyze_dirs, early_fit_count, fit_entropy_reward,
                             LEMMA_PLOT, PLOT_FILES)
from jaxcov.cli import main
from jaxcov.config import to_dict

A, B = 0.05, 0.95


def _step_record(step, h, r, measured=-0.01, predicted=-1e-5, cov=0.2, **extra):
    return {"step": step, "rollout/entropy": h, "reward/accuracy": r,
            "entropy/measured_dH": measured, "entropy/pred_dH": predicted, "cov/mean": cov,
            "time/step": 1.0, **extra}


def _write_run(run_dir, records, planned_steps=None, tail=""):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.write(tail)
    if planned_steps is not None:
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump({"train": {"steps": planned_steps}}, f)
    return str(run_dir)


def _law_run(run_dir, n, noise, seed=0, a=A, b=B):
    """n steps whose entropy decays and whose reward follows R = -a*exp(H) + b plus noise."""
    rng = np.random.default_rng(seed)
    h = 0.1 + 2.4 * np.exp(-np.arange(n) / (n / 4))
    r = -a * np.exp(h) + b + rng.normal(0.0, noise, n)
    return _write_run(run_dir, [_step_record(i + 1, float(h[i]), float(r[i])) for i in range(n)], n)


# ----------------------------------------------------------------------------------- the fit


def test_fit_recovers_known_a_and_b_within_1_percent(tmp_path):
    run = analyze_dirs([_law_run(tmp_path / "run", n=200, noise=0.005)])[0]
    assert run.full_fit.a == pytest.approx(A, rel=0.01)
    assert run.full_fit.b == pytest.approx(B, rel=0.01)
    assert run.full_fit.ceiling == pytest.approx(B - A, rel=0.01)
    assert run.full_rmse == pytest.approx(0.005, rel=0.2)  # the residual is the noise


def test_early_fit_on_first_15_percent_recovers_and_predicts(tmp_path):
    run = analyze_dirs([_law_run(tmp_path / "run", n=200, noise=0.001, seed=1)])[0]
    assert run.early_fit.n_points == 30
    assert run.early_fit.a == pytest.approx(A, rel=0.01)
    assert run.early_fit.b == pytest.approx(B, rel=0.01)
    assert run.early_rmse < 0.01 and abs(run.early_final_error) < 0.01


def test_fit_is_exact_without_noise():
    h = np.array([2.0, 1.5, 1.0, 0.5])
    fit = fit_entropy_reward(h, -0.2 * np.exp(h) + 0.7)
    assert (fit.a, fit.b) == (pytest.approx(0.2), pytest.approx(0.7))


def test_early_window_rounds_up_and_keeps_three_points():
    assert early_fit_count(200, 15) == 30
    assert early_fit_count(21, 15) == 4   # 3.15 -> 4
    assert early_fit_count(20, 15) == 3   # 3.0 exactly (no float round-up to 4)
    assert early_fit_count(12, 15) == 3   # 1.8 -> 2 -> at least 3


def test_fit_uses_held_out_evaluations_when_they_logged_their_entropy(tmp_path):
    """Eval points (every 2 steps, steps 0..20) follow the law exactly while the noisy step
    points do not: the fit must be on the eval points, with the first 15% of the steps (steps
    <= 3: 0 and 2) widened to 3 points."""
    steps = list(range(0, 21, 2))
    h = {s: 2.2 * np.exp(-s / 6) + 0.05 for s in steps}
    records = [_step_record(s, 1.0, 0.5 if s % 3 else 0.9) for s in range(1, 21)]
    by_step = {r["step"]: r for r in records}
    for s in steps:
        evals = {"eval/sample_entropy": h[s], "eval/avg@4": -A * math.exp(h[s]) + B,
                 "eval/avg@4_se": 0.04, "eval/examples": 40}
        if s == 0:
            records.insert(0, {"step": 0, **evals})
        else:
            by_step[s].update(evals)
    run = analyze_dirs([_write_run(tmp_path / "run", records, 20)])[0]
    assert run.points.source == "held-out evaluations"
    assert run.points.steps.tolist() == steps
    assert run.early_fit.n_points == 3
    assert (run.full_fit.a, run.full_fit.b) == (pytest.approx(A), pytest.approx(B))
    assert run.early_rmse < 1e-9 and run.points.se.tolist() == [0.04] * 11


def test_entropy_change_statistics_on_a_hand_built_log(tmp_path):
    # measured ~ x = [1, 2, 3, 4], predicted ~ y = [1, 3, 2, 4]: Pearson r = 4 / 5 = 0.8.
    x, y = np.array([1, 2, 3, 4.0]), np.array([1, 3, 2, 4.0])
    measured, predicted = 0.01 * (x - 3), 1e-5 * (y - 3)   # signs: (-,-) (-,0) (0,-) (+,+)
    covs = [0.3, -0.1, 0.2, 0.05]
    records = [_step_record(i + 1, 2.0 - 0.4 * i, 0.2 + 0.1 * i, measured[i], predicted[i], covs[i])
               for i in range(4)]
    run = analyze_dirs([_write_run(tmp_path / "run", records)])[0]
    assert run.dh_correlation == pytest.approx(0.8)
    assert run.dh_sign_agreement == pytest.approx(0.5)
    assert run.positive_cov_fraction == pytest.approx(0.75)


# ------------------------------------------------------------------------------------- the CLI


def test_analyze_writes_report_and_plots(tmp_path, capsys):
    runs = [_law_run(tmp_path / "grpo", 20, 0.01), _law_run(tmp_path / "klcov", 20, 0.01, seed=2)]
    out = tmp_path / "out"
    assert main(["analyze", *runs, "--out", str(out), "--fit-percent", "20"]) == 0
    report = (out / "report.md").read_text()
    for text in ("grpo", "klcov", "ceiling b-a", "first 4 (steps 1, 2, 3, 4;", "rollout/entropy",
                 "reward/accuracy", *PLOT_FILES.values()):
        assert text in report, text
    for filename in PLOT_FILES.values():
        assert (out / filename).stat().st_size > 1000
    assert "grpo: all 20 RL steps" in capsys.readouterr().out


def test_analyze_defaults_to_the_run_directory(tmp_path):
    run = _law_run(tmp_path / "run", 10, 0.01)
    assert main(["analyze", run]) == 0
    assert (tmp_path / "run" / "report.md").exists()


def _error(capsys, *argv):
    assert main(["analyze", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxcov: error: ") and "\n" not in err
    return err


def test_missing_directory_or_metrics_file(tmp_path, capsys):
    assert "no such run directory" in _error(capsys, str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    err = _error(capsys, str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in err and "metrics.jsonl not found" in err


def test_missing_metric_is_named(tmp_path, capsys):
    records = [_step_record(s, 2.0 - 0.1 * s, 0.1 * s) for s in range(1, 6)]
    for r in records:
        del r["cov/mean"]
    err = _error(capsys, _write_run(tmp_path / "run", records))
    assert "no step has the metric 'cov/mean'" in err
    records = [_step_record(s, 2.0 - 0.1 * s, 0.1 * s) for s in range(1, 6)]
    del records[2]["entropy/pred_dH"]
    assert "steps 3 lack the metric 'entropy/pred_dH'" in _error(
        capsys, _write_run(tmp_path / "run2", records))


def test_truncated_run_with_too_few_points(tmp_path, capsys):
    records = [{"step": 0, "eval/greedy_acc": 0.5}, _step_record(1, 2.0, 0.2),
               _step_record(2, 1.8, 0.3), _step_record(3, 1.7, 0.3)]
    run = _write_run(tmp_path / "run", records, planned_steps=16, tail='{"step": 4, "rollout/en')
    err = _error(capsys, run)
    assert "3 points with both 'rollout/entropy' and 'reward/accuracy'" in err
    assert "needs at least 4" in err and "stopped before its 16 steps" in err
    only_eval = _write_run(tmp_path / "eval_only", records[:1])
    assert "no RL step recorded" in _error(capsys, only_eval)


def test_incomplete_run_with_enough_points_is_analysed_and_flagged(tmp_path, capsys):
    records = [_step_record(s, 2.0 - 0.2 * s, 0.1 * s) for s in range(1, 7)]
    run = _write_run(tmp_path / "run", records, planned_steps=16, tail='{"step": 7, "rollout/en')
    assert main(["analyze", run]) == 0
    assert "INCOMPLETE: 6 of 16 steps" in capsys.readouterr().out
    assert "6 of 16 steps — INCOMPLETE" in (tmp_path / "run" / "report.md").read_text()


def test_bad_fit_percent_is_a_usage_error(tmp_path, capsys):
    assert main(["analyze", str(tmp_path), "--fit-percent", "0"]) == 2
    assert capsys.readouterr().err == ("jaxcov: error: argument --fit-percent: must be in "
                                       "(0, 100), got 0 (see jaxcov analyze --help)\n")
    with pytest.raises(AnalysisError, match="percentage"):
        analyze_dirs([str(tmp_path)], fit_percent=150)


# ----------------------------------------------------------------------------------- repro


def _fake_run_records(loss, steps):
    """GRPO's entropy collapses early; the covariance methods keep more; reward follows the
    law; measured dH is proportional to the predicted one; held-out eval at 0 and at the end."""
    floor = {"ppo_clip": 0.2, "clip_cov": 0.5, "kl_cov": 0.6}[loss]
    records = [{"step": 0, "eval/greedy_acc": 0.5, "eval/avg@4": 0.3, "eval/pass@4": 0.6,
                "eval/examples": 40, "time/eval": 2.0}]
    for s in range(1, steps + 1):
        h = floor + (2.1 - floor) * math.exp(-(s - 1) / 1.5)
        cov = 0.05 + 0.3 * math.exp(-(s - 1) / 1.5) + 0.01 * (s % 3)
        records.append(_step_record(s, h, -A * math.exp(h) + B, -0.2 * cov, -2e-5 * cov, cov,
                                    **{"entropy/dH_first_order": -0.19 * cov,
                                       "entropy/dH_midpoint": -0.2 * cov + 1e-4 * (s % 2)}))
    records[-1].update({"eval/greedy_acc": 0.9, "eval/avg@4": 0.85, "eval/pass@4": 0.95,
                        "eval/examples": 40, "time/eval": 2.0})
    return records


def _fake_eval_records(loss, steps):
    """`_fake_run_records` with an evaluation every 2 steps that logged its samples' entropy:
    the points follow the law exactly (so the early fit predicts them)."""
    records = _fake_run_records(loss, steps)
    for r in records:
        if r["step"] % 2 == 0:
            h = r.get("rollout/entropy", 2.1)
            r.update({"eval/sample_entropy": h, "eval/avg@4": -A * math.exp(h) + B,
                      "eval/avg@4_se": 0.04, "eval/examples": 40})
    return records


def test_repro_trains_three_runs_reports_four_findings_and_skips_complete_runs(
        tmp_path, monkeypatch, capsys):
    trained = []

    def fake_train(config):
        trained.append((config.algo.policy_loss, config.train.steps, config.train.run_dir))
        _write_run(config.train.run_dir, _fake_eval_records(config.algo.policy_loss,
                                                            config.train.steps))
        with open(os.path.join(config.train.run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(to_dict(config), f)
        return 0

    monkeypatch.setattr(repro_lib, "_train", fake_train)
    out, runs = tmp_path / "reports", tmp_path / "runs"
    argv = ["repro", "--out", str(out), "--runs-dir", str(runs), "--steps", "8", "seed=3"]
    assert main(argv) == 0
    assert trained == [(loss, 8, str(runs / name)) for loss, name in
                       (("ppo_clip", "grpo"), ("clip_cov", "clipcov"), ("kl_cov", "klcov"))]
    report = (out / "report.md").read_text()
    assert report.count("HOLDS") == 4 and "DOES NOT HOLD" not in report
    assert "python3 -m jaxcov repro --out" in report and "seed=3" in report
    assert "## Criteria" in report and "8 steps x 4 prompts x 8 samples" in report
    for name in ("grpo", "clipcov", "klcov"):
        for filename in ("metrics.jsonl", "config.yaml", repro_lib.WALL_TIME_FILE):
            assert (out / name / filename).exists(), filename
    assert "Total wall time of the three runs" in report and "## Noise" in report
    assert report.count("**on GRPO's curve**") == 2  # all runs follow the same law
    for filename in [*PLOT_FILES.values(), repro_lib.CURVE_PLOT]:
        assert (out / filename).exists()

    trained.clear()
    assert main(argv) == 0  # complete runs are skipped, the report is rebuilt
    assert trained == []
    assert "complete (8 steps" in capsys.readouterr().out


def test_repro_reports_a_finding_that_does_not_hold(tmp_path, monkeypatch):
    def flat_entropy_train(config):
        records = _fake_run_records("ppo_clip", config.train.steps)
        for r in records[1:]:
            r["rollout/entropy"] = 2.0 + 0.01 * (r["step"] % 2)  # no collapse in any run
        _write_run(config.train.run_dir, records, config.train.steps)
        return 0

    monkeypatch.setattr(repro_lib, "_train", flat_entropy_train)
    findings = repro_lib.repro(str(tmp_path / "out"), str(tmp_path / "runs"), 8, [])
    assert not findings[0].holds and not findings[2].holds
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Entropy falls early under GRPO: DOES NOT HOLD" in report


def test_repro_stops_with_a_clear_error_when_a_run_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(repro_lib, "_train", lambda config: 1)
    assert main(["repro", "--out", str(tmp_path / "o"), "--runs-dir", str(tmp_path / "r")]) == 2
    assert "grpo: training in" in capsys.readouterr().err


# ------------------------------------------------------------------------ the lemma's statistics


def test_lemma_agreement_per_step_and_per_token(tmp_path):
    """measured = 2 x first-order prediction exactly (slope 2, r 1); the midpoint with noise;
    the per-token file pooled over steps, a rewritten (resumed) step counted once."""
    rng = np.random.default_rng(0)
    first = rng.normal(0, 1e-3, 20)
    noise = rng.normal(0, 1e-3, 20)
    records = [_law_run_record(i, 2 * first[i], first[i], 2 * first[i] + noise[i])
               for i in range(20)]
    run_dir = _write_run(tmp_path / "run", records, 20)
    tokens = [{"step": 1, "measured": [9.0], "first_order": [0.0], "midpoint": [0.0]}]  # stale
    tokens += [{"step": s, "measured": [1.0 * s, 2.0 * s], "first_order": [0.5 * s, 1.0 * s],
                "midpoint": [1.0 * s, 2.0 * s + 0.1]} for s in range(1, 21)]
    with open(os.path.join(run_dir, "entropy_tokens.jsonl"), "w") as f:
        f.writelines(json.dumps(t) + "\n" for t in tokens)
    run = analyze_dirs([run_dir])[0]
    steps = run.lemma_steps["first order"]
    assert steps.r == pytest.approx(1.0) and steps.slope == pytest.approx(2.0) and steps.n == 20
    midpoint = run.lemma_steps["midpoint"]
    m = 2 * first + noise
    assert midpoint.r == pytest.approx(np.corrcoef(m, 2 * first)[0, 1])
    assert midpoint.slope == pytest.approx(np.polyfit(m, 2 * first, 1)[0])
    assert run.lemma_tokens["first order"].n == 40  # the stale step-1 line replaced
    assert run.lemma_tokens["first order"].slope == pytest.approx(2.0)
    assert run.dh_shares["top 0.2% by Cov"] == pytest.approx(0.25)
    assert main(["analyze", run_dir]) == 0
    report = open(os.path.join(run_dir, "report.md")).read()
    assert "| run | first order | +1.000 | 2.000 | 20 | +1.000 | 2.000 | 40 |" in report
    assert os.path.exists(os.path.join(run_dir, LEMMA_PLOT))


def _law_run_record(i, measured, first, midpoint):
    h = 0.1 + 2.4 * np.exp(-i / 5)
    return _step_record(i + 1, float(h), float(-A * np.exp(h) + B), measured=float(measured),
                        **{"entropy/dH_first_order": float(first),
                           "entropy/dH_midpoint": float(midpoint),
                           "entropy/dH_share_top0.2pct": 0.25})


def test_eval_metrics_by_hand():
    """avg@k's standard error is over problems (a problem's samples are correlated): per-problem
    means 0.5, 1, 0 -> SD 0.5 -> SE 0.5 / sqrt(3); entropy = summed -log q / tokens."""
    from jaxcov.evaluation import sampled_metrics

    correct = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], bool)
    m = sampled_metrics(correct, nll_sum=6.0, tokens=4)
    assert m["eval/avg@4"] == pytest.approx(0.5)
    assert m["eval/avg@4_se"] == pytest.approx(0.5 / math.sqrt(3))
    assert m["eval/pass@4"] == pytest.approx(2 / 3)
    assert m["eval/sample_entropy"] == pytest.approx(1.5)
