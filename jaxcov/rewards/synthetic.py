"""Generated tasks with exact answers, for models too weak for competition math.

Each generator returns distinct problems (no question twice), in an order fixed by the seed, as
rows `{"question", "ground_truth", "task"}` (countdown rows also carry a reference `solution`).
Difficulty knobs come from `SyntheticConfig`. SmolLM2-135M-Instruct answers about a quarter of
times-table questions with factors below 13 and almost no two-digit additions, so both leave room
to learn.
"""

from __future__ import annotations

import itertools
import random
from fractions import Fraction
from typing import Callable

from jaxcov.config import ConfigError, SyntheticConfig


def times_table(config: SyntheticConfig) -> list[dict]:
    """a times b for every pair of factors in [min_factor, max_factor], shuffled."""
    factors = range(config.min_factor, config.max_factor + 1)
    pairs = list(itertools.product(factors, factors))
    random.Random(config.seed).shuffle(pairs)
    return [{"question": f"What is {a} times {b}?", "ground_truth": str(a * b),
             "task": "times_table"} for a, b in pairs[:config.size]]


def addition(config: SyntheticConfig) -> list[dict]:
    """Sums of `terms` random numbers with exactly `digits` digits each."""
    rng = random.Random(config.seed)
    low, high = 10 ** (config.digits - 1), 10 ** config.digits - 1
    if config.digits == 1:
        low = 0
    rows, seen = [], set()
    for _ in range(20 * config.size):  # bounded: small spaces run out of distinct problems
        if len(rows) == config.size:
            break
        operands = tuple(rng.randint(low, high) for _ in range(config.terms))
        if operands in seen:
            continue
        seen.add(operands)
        question = "What is " + " + ".join(map(str, operands)) + "?"
        rows.append({"question": question, "ground_truth": str(sum(operands)), "task": "addition"})
    return rows


def _random_expression(rng: random.Random, numbers: list[int]) -> tuple[str, Fraction]:
    """A random expression over all of `numbers` (in the given order) and its exact value."""
    if len(numbers) == 1:
        return str(numbers[0]), Fraction(numbers[0])
    split = rng.randint(1, len(numbers) - 1)
    left, left_value = _random_expression(rng, numbers[:split])
    right, right_value = _random_expression(rng, numbers[split:])
    op = rng.choice("+-*/" if right_value != 0 else "+-*")
    value = {"+": left_value + right_value, "-": left_value - right_value,
             "*": left_value * right_value}.get(op) if op != "/" else left_value / right_value
    return f"({left} {op} {right})", value


def countdown(config: SyntheticConfig) -> list[dict]:
    """Reach a target in [1, max_target] with `numbers` numbers in [1, max_number]."""
    rng = random.Random(config.seed)
    rows, seen = [], set()
    for _ in range(200 * config.size):
        if len(rows) == config.size:
            break
        numbers = [rng.randint(1, config.max_number) for _ in range(config.numbers)]
        used = rng.sample(numbers, rng.randint(2, len(numbers)))
        expression, value = _random_expression(rng, used)
        target = int(value) if value.denominator == 1 else 0
        key = (tuple(sorted(numbers)), target)
        if not 1 <= target <= config.max_target or target in numbers or key in seen:
            continue
        seen.add(key)
        rows.append({
            "question": (f"Using the numbers {numbers}, write an arithmetic expression that "
                         f"equals {target}. You may use +, -, * and /, and each number at most "
                         "once."),
            "ground_truth": {"target": target, "numbers": numbers},
            "solution": expression[1:-1] if expression.startswith("(") else expression,
            "task": "countdown"})
    return rows


GENERATORS: dict[str, Callable[[SyntheticConfig], list[dict]]] = {
    "times_table": times_table,
    "addition": addition,
    "countdown": countdown,
}


def generate(name: str, config: SyntheticConfig) -> list[dict]:
    """The rows of generated dataset `name`; ConfigError for an unknown name."""
    if name not in GENERATORS:
        raise ConfigError(f"unknown generated dataset {name!r} (known: {', '.join(GENERATORS)})")
    return GENERATORS[name](config)
