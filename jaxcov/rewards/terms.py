"""Reward terms besides correctness: DAPO's overlong penalty and a user function by import path."""

from __future__ import annotations

import importlib
from typing import Callable

from jaxcov.config import ConfigError

# fn(response, row, response_length) -> float; `row` is the dataset example (ground_truth, task,
# question, ...), `response_length` the response's length in tokens.
CustomRewardFn = Callable[[str, dict, int], float]


def overlong_penalty(length: int, max_len: int, buffer: int) -> float:
    """DAPO's soft overlong punishment of a response of `length` tokens (0 down to -1).

    0 while length <= max_len - buffer, then (max_len - buffer - length) / buffer, which reaches
    -1 at max_len, and -1 beyond max_len.
    """
    safe_len = max_len - buffer
    if length <= safe_len:
        return 0.0
    if length <= max_len:
        return (safe_len - length) / buffer
    return -1.0


def load_custom_reward(path: str) -> CustomRewardFn:
    """The function named `module:function`; ConfigError if it cannot be imported."""
    module_name, _, name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"reward.custom_fn: cannot import {module_name!r}: {e}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"reward.custom_fn: {module_name!r} has no function {name!r}")
    return function
