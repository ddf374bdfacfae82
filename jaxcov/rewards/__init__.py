"""Verifiable rewards: answer extraction, bounded math equivalence, synthetic tasks, reward terms.

The trainer calls `score_batch(responses, rows, response_lengths, config)`; see `scoring.py`.
"""

from jaxcov.rewards.countdown import ExpressionError, countdown_correct, evaluate_countdown
from jaxcov.rewards.extract import EXTRACTORS, Extraction, extract_answer, last_boxed
from jaxcov.rewards.pool import TaskResult, VerifierPool
from jaxcov.rewards.scoring import (TASKS, RewardScorer, Verdict, close_scorers, register_task,
                                    score_batch)
from jaxcov.rewards.synthetic import GENERATORS, generate
from jaxcov.rewards.terms import CustomRewardFn, overlong_penalty

__all__ = [
    "EXTRACTORS", "Extraction", "ExpressionError", "GENERATORS", "TASKS", "CustomRewardFn",
    "RewardScorer", "TaskResult", "Verdict", "VerifierPool", "close_scorers", "countdown_correct",
    "evaluate_countdown", "extract_answer", "generate", "last_boxed", "overlong_penalty",
    "register_task", "score_batch",
]
