"""Countdown: reach a target with the given numbers, each used at most once, with + - * /.

The expression is parsed with `ast.parse` and walked over a whitelist (numbers, the four binary
operators, parentheses); nothing is ever `eval`ed. Arithmetic is exact (`Fraction`), and the
numbers are checked against the allowed ones before any arithmetic, so a response cannot make
the trainer compute with huge values.
"""

from __future__ import annotations

import ast
import collections
import json
import operator
import re
from fractions import Fraction
from typing import Optional

from jaxcov.rewards.extract import answer_after_anchor, last_boxed

MAX_EXPRESSION_CHARS = 200

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub,
              ast.Mult: operator.mul, ast.Div: operator.truediv}
_SYMBOLS = (("\\times", "*"), ("\\cdot", "*"), ("\u00d7", "*"), ("\u00b7", "*"),
            ("\\div", "/"), ("\u00f7", "/"), ("\u2212", "-"), ("\\left", ""), ("\\right", ""),
            ("\\(", ""), ("\\)", ""), ("$", ""))
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# Checked before parsing: no names, strings, `0x`, `1_000` or `**` can get as far as `ast`.
_ALLOWED_TEXT = re.compile(r"[0-9+\-*/() ]*")


class ExpressionError(ValueError):
    """The text is not an allowed countdown expression."""


def _clean(expression: str) -> str:
    for old, new in _SYMBOLS:
        expression = expression.replace(old, new)
    expression = expression.replace("{", "(").replace("}", ")").strip()
    return expression.split("=", 1)[0].strip()  # "3 * 4 = 12": the left side is the expression


def _parse(expression: str) -> ast.expr:
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"longer than {MAX_EXPRESSION_CHARS} characters")
    if not _ALLOWED_TEXT.fullmatch(expression) or "**" in expression:
        raise ExpressionError("only digits, + - * /, parentheses and spaces are allowed")
    try:
        return ast.parse(expression, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ExpressionError(f"not an expression: {type(e).__name__}") from None


def _numbers_used(node: ast.expr) -> list[int]:
    """The integer literals of a whitelisted tree; anything else raises ExpressionError."""
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _numbers_used(node.left) + _numbers_used(node.right)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return [node.value]
    raise ExpressionError(f"{type(node).__name__} is not allowed")


def _evaluate(node: ast.expr) -> Fraction:
    if isinstance(node, ast.Constant):
        return Fraction(node.value)
    left, right = _evaluate(node.left), _evaluate(node.right)
    if isinstance(node.op, ast.Div) and right == 0:
        raise ExpressionError("division by zero")
    return _OPERATORS[type(node.op)](left, right)


def evaluate_countdown(expression: str, numbers: list[int]) -> Fraction:
    """The exact value of `expression`, which may use each of `numbers` at most once.

    Raises:
      ExpressionError: not a whitelisted expression, a number not available (or used too
        often), or a division by zero.
    """
    tree = _parse(_clean(expression))
    used = collections.Counter(_numbers_used(tree))
    missing = used - collections.Counter(numbers)
    if missing:
        raise ExpressionError(f"uses numbers that are not available: {sorted(missing.elements())}")
    return _evaluate(tree)


def countdown_expression(response: str) -> tuple[Optional[str], bool]:
    """(final expression of a response, whether it was well-formed: boxed or <answer>-tagged)."""
    boxed = last_boxed(response)
    if boxed is not None and boxed.strip():
        return boxed, True
    tags = _ANSWER_TAG.findall(response)
    if tags and tags[-1].strip():
        return tags[-1], True
    return answer_after_anchor(response), False


def parse_countdown_truth(ground_truth) -> tuple[int, list[int]]:
    """(target, numbers) from `{"target": 24, "numbers": [...]}` or its JSON text."""
    if isinstance(ground_truth, str):
        ground_truth = json.loads(ground_truth)
    target = ground_truth["target"]
    numbers = [int(n) for n in ground_truth["numbers"]]
    return int(target), numbers


def countdown_correct(expression: str, ground_truth) -> bool:
    """Whether `expression` reaches the target using only the allowed numbers."""
    target, numbers = parse_countdown_truth(ground_truth)
    try:
        return evaluate_countdown(expression, numbers) == target
    except ExpressionError:
        return False
