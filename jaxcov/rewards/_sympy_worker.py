"""Symbolic answer equivalence with math-verify; runs only inside the verifier worker processes.

math-verify's own timeouts use SIGALRM, which works only in a main thread and in whole seconds,
so they are switched off here: the parent process bounds every task by killing the worker.
"""

from __future__ import annotations

import functools
import logging

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

# The answer is given to math-verify inside a box, so the boxed pattern must come first.
_EXTRACTION = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


class UnparsableGroundTruth(ValueError):
    """The ground truth gives math-verify nothing to compare with: a data problem."""


def _parse(answer: str) -> list:
    return parse("\\boxed{" + answer + "}", extraction_config=list(_EXTRACTION),
                 parsing_timeout=None)


@functools.lru_cache(maxsize=4096)
def _parse_ground_truth(gold: str) -> tuple:
    # Cached: the samples of one group share their prompt's ground truth.
    parsed = _parse(gold)
    if not parsed:
        raise UnparsableGroundTruth(gold[:80])
    return tuple(parsed)


def answers_equivalent(gold: str, answer: str) -> bool:
    """Whether `answer` is mathematically equivalent to the ground truth `gold` (both cleaned)."""
    predicted = _parse(answer)
    if not predicted:
        return False
    return bool(verify(list(_parse_ground_truth(gold)), predicted, timeout_seconds=None))


_WARMED_UP = False


def warm_up() -> None:
    """Builds math-verify's parsers once (~0.2 s), so the first real task is not slowed."""
    global _WARMED_UP
    if not _WARMED_UP:
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        answers_equivalent("\\frac{1}{2}", "0.5")
        answers_equivalent("\\{1,2\\}", "(0, 1]")
        _parse_ground_truth.cache_clear()
        _WARMED_UP = True
