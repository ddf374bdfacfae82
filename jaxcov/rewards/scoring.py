"""Scoring a batch of responses: the trainer's entry point to rewards.

    rewards, metrics = score_batch(responses, rows, response_lengths, config)

Each row is a dataset example (see `jaxcov.data`): it has a `ground_truth` and may name its
`task`; rows that name none use `config.reward.task`. A task maps to a verifier:

- `math` (also times_table, addition): the final answer is extracted here, refused if too long
  or too deeply nested, compared exactly when both sides are integers, and otherwise sent to the
  verifier pool, where math-verify decides equivalence under a hard time bound.
- `countdown`: the expression is checked here by a whitelist parser (cheap and bounded).

Every answer ends in one status: ok, no_answer, rejected (pre-check), timeout or error; only ok
answers can be correct. The reward is the weighted sum of the terms (see `RewardConfig`).

Metrics (floats): reward/mean, reward/std, reward/accuracy (fraction correct), reward/format
(fraction with a well-formed box), reward/no_answer (fraction), reward/timeouts,
reward/errors and reward/rejected (counts), reward/term/<name> (mean of each unweighted term),
reward/overlong_frac (fraction penalised; with the overlong term), reward/custom_errors (with a
custom term), reward/accuracy/<task> (when the batch mixes tasks), reward/score_time_s.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from jaxcov.config import ConfigError, RewardConfig
from jaxcov.rewards import countdown as countdown_lib
from jaxcov.rewards.extract import extract_answer, ground_truth_answer, last_boxed
from jaxcov.rewards.math_answers import clean_answer, integer_verdict, precheck
from jaxcov.rewards.pool import VerifierPool, default_num_workers
from jaxcov.rewards.terms import load_custom_reward, overlong_penalty

EQUIVALENCE_FUNCTION = "jaxcov.rewards._sympy_worker:answers_equivalent"

# task name -> verifier ("math" or "countdown"); `register_task` adds names.
TASKS: dict[str, str] = {
    "math": "math",
    "times_table": "math",
    "addition": "math",
    "countdown": "countdown",
}
VERIFIERS = ("math", "countdown")


def register_task(name: str, verifier: str = "math") -> None:
    """Makes rows whose task is `name` (e.g. a verl `data_source`) score with `verifier`."""
    if verifier not in VERIFIERS:
        raise ValueError(f"unknown verifier {verifier!r} (known: {', '.join(VERIFIERS)})")
    TASKS[name] = verifier


@dataclasses.dataclass
class Verdict:
    """How one response fared: status is ok | no_answer | rejected | timeout | error."""

    correct: bool = False
    formatted: bool = False
    status: str = "ok"


STATUSES = ("ok", "no_answer", "rejected", "timeout", "error")


@dataclasses.dataclass
class RowScores:
    """Per-response results as arrays, so that parts of a batch scored apart (one per host in a
    multi-process run, see `score_batch_part`) join by concatenating each array."""

    rewards: np.ndarray         # [R] float32: weighted sum of the terms
    correct: np.ndarray         # [R] bool
    formatted: np.ndarray       # [R] bool
    status: np.ndarray          # [R] int8: index into STATUSES
    terms: dict                 # term name -> unweighted values [R] float
    custom_failed: np.ndarray   # [R] bool: the custom reward raised or returned a non-finite value

    def map_arrays(self, fn) -> "RowScores":
        """The same scores with `fn` applied to every per-row array."""
        arrays = {f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
                  if f.name != "terms"}
        return RowScores(**arrays, terms={name: fn(v) for name, v in self.terms.items()})


def math_verdict(response: str, ground_truth: Any,
                 config: RewardConfig) -> tuple[Verdict, Optional[tuple[str, str]]]:
    """The verdict decidable without sympy, and the (gold, answer) job if the pool must decide."""
    formatted = bool((last_boxed(response) or "").strip())
    extraction = extract_answer(response, config.extractors)
    if extraction is None:
        return Verdict(formatted=formatted, status="no_answer"), None
    answer = clean_answer(extraction.answer)
    gold = clean_answer(ground_truth_answer(ground_truth))
    if precheck(answer, config.max_answer_chars, config.max_brace_depth) is not None:
        return Verdict(formatted=formatted, status="rejected"), None
    exact = integer_verdict(gold, answer)
    if exact is not None:
        return Verdict(correct=exact, formatted=formatted), None
    return Verdict(formatted=formatted), (gold, answer)


def countdown_verdict(response: str, ground_truth: Any) -> Verdict:
    """Countdown is decided here: parsing is whitelisted and the arithmetic bounded."""
    expression, formatted = countdown_lib.countdown_expression(response)
    if expression is None:
        return Verdict(formatted=formatted, status="no_answer")
    try:
        countdown_lib.parse_countdown_truth(ground_truth)
    except (KeyError, TypeError, ValueError):  # the data is broken, not the answer
        return Verdict(formatted=formatted, status="error")
    return Verdict(countdown_lib.countdown_correct(expression, ground_truth), formatted)


class RewardScorer:
    """Scores batches under one `RewardConfig`; owns the verifier pool (started when first needed).

    Use as a context manager, or call `close()`, to stop the pool's processes.
    """

    def __init__(self, config: RewardConfig):
        self.config = config
        self._custom = load_custom_reward(config.custom_fn) if config.custom_fn else None
        self._pool: Optional[VerifierPool] = None

    @property
    def pool(self) -> VerifierPool:
        if self._pool is None:
            workers = self.config.num_workers or default_num_workers()
            self._pool = VerifierPool(EQUIVALENCE_FUNCTION, workers, self.config.worker_memory_mb)
        return self._pool

    def score(self, responses: Sequence[str], rows: Sequence[dict],
              response_lengths: Sequence[int]) -> tuple[np.ndarray, dict[str, float]]:
        """Rewards (float32, one per response) and `reward/...` metrics of one batch."""
        start = time.perf_counter()
        scores = self.score_rows(responses, rows, response_lengths)
        return scores.rewards, self.metrics(scores, rows, start)

    def score_rows(self, responses: Sequence[str], rows: Sequence[dict],
                   response_lengths: Sequence[int]) -> RowScores:
        """The per-response results of one batch (or of one part of it)."""
        if not len(responses) == len(rows) == len(response_lengths):
            raise ValueError(f"got {len(responses)} responses, {len(rows)} rows and "
                             f"{len(response_lengths)} lengths; they must match")
        tasks = [self._task_of(row, i) for i, row in enumerate(rows)]
        verdicts = self._verdicts(responses, rows, tasks)
        terms, custom_failed = self._terms(responses, rows, response_lengths, verdicts)
        rewards = sum(weight * values for weight, values in terms.values())
        return RowScores(
            rewards=np.asarray(rewards, np.float32).reshape(len(responses)),
            correct=np.array([v.correct for v in verdicts], bool),
            formatted=np.array([v.formatted for v in verdicts], bool),
            status=np.array([STATUSES.index(v.status) for v in verdicts], np.int8),
            terms={name: np.asarray(values, np.float64) for name, (_, values) in terms.items()},
            custom_failed=custom_failed)

    def metrics(self, scores: RowScores, rows: Sequence[dict], start: float) -> dict[str, float]:
        """The `reward/...` metrics of a whole batch's scores (`start`: when scoring began)."""
        tasks = [self._task_of(row, i) for i, row in enumerate(rows)]
        metrics = _metrics(scores, tasks)
        if self._custom is not None:
            metrics["reward/custom_errors"] = float(scores.custom_failed.sum())
        metrics["reward/score_time_s"] = time.perf_counter() - start
        return metrics

    def _task_of(self, row: dict, index: int) -> str:
        if "ground_truth" not in row:
            raise ValueError(f"rows[{index}] has no 'ground_truth'")
        task = row.get("task") or self.config.task
        if task not in TASKS:
            raise ConfigError(f"reward task {task!r} of rows[{index}] is not registered "
                              f"(known: {', '.join(TASKS)})")
        return task

    def _verdicts(self, responses, rows, tasks) -> list[Verdict]:
        verdicts, jobs, job_rows = [], [], []
        for i, (response, row, task) in enumerate(zip(responses, rows, tasks)):
            if TASKS[task] == "countdown":
                verdicts.append(countdown_verdict(response, row["ground_truth"]))
                continue
            verdict, job = math_verdict(response, row["ground_truth"], self.config)
            verdicts.append(verdict)
            if job is not None:
                jobs.append(job)
                job_rows.append(i)
        if jobs:
            # The samples of a group often give the same answer: verify each pair only once.
            distinct = list(dict.fromkeys(jobs))
            results = self.pool.run(distinct, self.config.timeout_s)
            result_of = dict(zip(distinct, results))
            for i, job in zip(job_rows, jobs):
                verdicts[i].status = result_of[job].status
                verdicts[i].correct = result_of[job].status == "ok" and bool(result_of[job].value)
        return verdicts

    def _terms(self, responses, rows, lengths, verdicts) -> tuple[dict, np.ndarray]:
        """({term name: (weight, per-response values)}, which custom calls failed)."""
        config = self.config
        correct = np.array([v.correct for v in verdicts], bool)
        terms = {"correct": (config.correct_weight,
                             np.where(correct, 1.0, config.incorrect_value))}
        if config.format_weight:
            terms["format"] = (config.format_weight,
                               np.array([float(v.formatted) for v in verdicts]))
        if config.overlong.weight:
            o = config.overlong
            terms["overlong"] = (o.weight, np.array(
                [overlong_penalty(int(n), o.max_len, o.buffer) for n in lengths]))
        failed = np.zeros(len(responses), bool)
        if self._custom is not None:
            values, failed = self._custom_values(responses, rows, lengths)
            terms["custom"] = (config.custom_weight, values)
        return terms, failed

    def _custom_values(self, responses, rows, lengths) -> tuple[np.ndarray, np.ndarray]:
        values = np.zeros(len(responses))
        failed = np.zeros(len(responses), bool)
        for i, (response, row, length) in enumerate(zip(responses, rows, lengths)):
            try:
                value = float(self._custom(response, row, int(length)))
            except Exception:  # noqa: BLE001  a user bug scores 0 and is counted, not fatal
                value = math.nan
            if math.isfinite(value):
                values[i] = value
            else:
                failed[i] = True
        return values, failed

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _mean(values) -> float:
    return float(np.mean(values)) if len(values) else 0.0


def _metrics(scores: RowScores, tasks: Sequence[str]) -> dict[str, float]:
    rewards, status = scores.rewards, scores.status
    metrics = {
        "reward/mean": _mean(rewards),
        "reward/std": float(np.std(rewards)) if len(rewards) else 0.0,
        "reward/accuracy": _mean(scores.correct),
        "reward/format": _mean(scores.formatted),
        "reward/no_answer": _mean(status == STATUSES.index("no_answer")),
        "reward/timeouts": float(np.sum(status == STATUSES.index("timeout"))),
        "reward/errors": float(np.sum(status == STATUSES.index("error"))),
        "reward/rejected": float(np.sum(status == STATUSES.index("rejected"))),
    }
    for name, values in scores.terms.items():
        metrics[f"reward/term/{name}"] = _mean(values)
    if "overlong" in scores.terms:
        metrics["reward/overlong_frac"] = _mean(scores.terms["overlong"] < 0)
    if len(set(tasks)) > 1:
        task_of_row = np.asarray(tasks)
        for task in sorted(set(tasks)):
            metrics[f"reward/accuracy/{task}"] = _mean(scores.correct[task_of_row == task])
    return metrics


_SCORERS: dict[RewardConfig, RewardScorer] = {}


def score_batch(responses: Sequence[str], rows: Sequence[dict], response_lengths: Sequence[int],
                config: Any) -> tuple[np.ndarray, dict[str, float]]:
    """Rewards and metrics of a batch; `config` is an `ExperimentConfig` or a `RewardConfig`.

    Args:
      responses: decoded responses (special tokens stripped).
      rows: the dataset example each response answers (`ground_truth`, optional `task`).
      response_lengths: response lengths in tokens (for the overlong penalty).
      config: the experiment config (its `reward` section is used) or a `RewardConfig`.

    Returns:
      (rewards float32 [len(responses)], metrics dict of floats named `reward/...`).
      The scorer and its verifier processes are kept per config for the next batch.
    """
    return _scorer(config).score(responses, rows, response_lengths)


def score_batch_part(responses: Sequence[str], rows: Sequence[dict],
                     response_lengths: Sequence[int], config: Any, part: slice,
                     join: Callable[[RowScores], RowScores]) -> tuple[np.ndarray, dict[str, float]]:
    """`score_batch` with the verification split between callers: this one scores only the
    responses in `part`, and `join` turns their `RowScores` into the whole batch's (in a
    multi-process run every process scores its own part and `join` all-gathers; see
    `jaxcov.distributed.score_batch`). Every caller returns the same rewards and metrics."""
    scorer = _scorer(config)
    start = time.perf_counter()
    scores = join(scorer.score_rows(list(responses[part]), list(rows[part]),
                                    list(response_lengths[part])))
    return scores.rewards, scorer.metrics(scores, rows, start)


def _scorer(config: Any) -> RewardScorer:
    reward_config = getattr(config, "reward", config)
    scorer = _SCORERS.get(reward_config)
    if scorer is None:
        scorer = _SCORERS[reward_config] = RewardScorer(reward_config)
    return scorer


def close_scorers() -> None:
    """Stops the verifier processes of every scorer `score_batch` created."""
    for scorer in _SCORERS.values():
        scorer.close()
    _SCORERS.clear()
