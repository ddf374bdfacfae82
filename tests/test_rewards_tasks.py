"""Countdown's safe parser and the generated tasks (times tables, addition, countdown)."""

import re
from fractions import Fraction

import pytest

from jaxcov.config import ConfigError, SyntheticConfig
from jaxcov.rewards import ExpressionError, countdown_correct, evaluate_countdown, generate
from jaxcov.rewards.countdown import countdown_expression
from jaxcov.rewards.scoring import countdown_verdict

TRUTH = {"target": 24, "numbers": [3, 8, 2, 5]}


@pytest.mark.parametrize("expression", [
    "3 * 8",
    "(5 - 2) * 8",
    "8 * (5 - 2)",
    "(3)*(8)",
    "3 \\times 8 = 24",
    "3 \u00d7 8",
    "\\left(5 - 2\\right) \\cdot 8",
    "$ 8 * 3 $",
    "{5 - 2} * 8",
    "8 * 2 + 5 + 3",                # all four numbers
])
def test_countdown_accepts_correct_expressions(expression):
    assert countdown_correct(expression, TRUTH)


def test_countdown_uses_exact_fractions():
    # 8 / 3 is not an integer, yet (8 / 3) * 3 is exactly 8
    assert evaluate_countdown("8 / 3 * 3", [8, 3, 3]) == Fraction(8)
    assert countdown_correct("(1 + 1 / 3) * 6", {"target": 8, "numbers": [1, 1, 3, 6]})


@pytest.mark.parametrize("expression, reason", [
    ("__import__('os').system('x')", "allowed"),
    ("().__class__.__bases__[0].__subclasses__()", "allowed"),
    ("open('/etc/passwd').read()", "allowed"),
    ("lambda: 24", "allowed"),
    ("3 ** 8", "allowed"),
    ("3 ^ 8", "allowed"),
    ("0x3 * 8", "allowed"),
    ("3_0 - 6", "allowed"),
    ("8 * 3.0", "allowed"),
    ("-3 * -8", "UnaryOp"),
    ("[3][0] * 8", "allowed"),
    ("3 * 8 if 1 else 2", "allowed"),
    ("3 * (8", "not an expression"),
    ("3 * * 8", "not an expression"),
    ("3 8", "not an expression"),
    ("", "not an expression"),
    ("(" * 150 + "3" + ")" * 150, "longer than"),
    ("03 * 8", "not an expression"),
    ("8 * 3 * 1", "not available"),        # 1 is not given
    ("8 * 3 + 3 - 3", "not available"),    # 3 used three times, given once
    ("8 / (5 - 5) + 3 * 8", "not available"),
])
def test_countdown_rejects_unsafe_or_malformed_expressions(expression, reason):
    with pytest.raises(ExpressionError, match=re.escape(reason)):
        evaluate_countdown(expression, TRUTH["numbers"])
    assert not countdown_correct(expression, TRUTH)


def test_countdown_division_by_zero_and_wrong_value():
    with pytest.raises(ExpressionError, match="division by zero"):
        evaluate_countdown("8 / (5 - 5)", [8, 5, 5])
    assert evaluate_countdown("3 + 8", TRUTH["numbers"]) == 11
    assert not countdown_correct("3 + 8", TRUTH)


def test_countdown_expression_extraction_and_verdicts():
    assert countdown_expression("so \\boxed{3 * 8}") == ("3 * 8", True)
    assert countdown_expression("<answer>(5-2)*8</answer>") == ("(5-2)*8", True)
    assert countdown_expression("The answer is 3 * 8.") == ("3 * 8", False)
    verdict = countdown_verdict("\\boxed{__import__('os').system('echo hi')}", TRUTH)
    assert (verdict.correct, verdict.formatted, verdict.status) == (False, True, "ok")
    assert countdown_verdict("no idea", TRUTH).status == "no_answer"
    assert countdown_verdict("\\boxed{3 * 8}", {"numbers": [3, 8]}).status == "error"
    assert countdown_verdict("\\boxed{3 * 8}", '{"target": 24, "numbers": [8, 3]}').correct


# --------------------------------------------------------------------------- generated tasks


def test_times_table_is_every_pair_once_and_seeded():
    config = SyntheticConfig(size=10_000, min_factor=2, max_factor=12, seed=3)
    rows = generate("times_table", config)
    pairs = {tuple(map(int, re.findall(r"\d+", r["question"]))) for r in rows}
    assert len(rows) == len(pairs) == 121
    for row in rows:
        a, b = map(int, re.findall(r"\d+", row["question"]))
        assert row["ground_truth"] == str(a * b) and row["task"] == "times_table"
    assert rows == generate("times_table", config)
    assert rows != generate("times_table", SyntheticConfig(size=10_000, seed=4))
    assert len(generate("times_table", SyntheticConfig(size=7))) == 7


@pytest.mark.parametrize("digits, terms", [(1, 2), (2, 2), (3, 4)])
def test_addition_digits_and_terms(digits, terms):
    rows = generate("addition", SyntheticConfig(size=50, digits=digits, terms=terms, seed=1))
    assert len(rows) == 50 and len({r["question"] for r in rows}) == 50
    for row in rows:
        operands = [int(x) for x in re.findall(r"\d+", row["question"])]
        assert len(operands) == terms
        assert all(len(str(x)) == digits for x in operands)
        assert row["ground_truth"] == str(sum(operands))


def test_countdown_problems_are_solvable_and_within_the_knobs():
    config = SyntheticConfig(size=200, numbers=4, max_number=25, max_target=50, seed=7)
    rows = generate("countdown", config)
    assert len(rows) == 200
    for row in rows:
        truth = row["ground_truth"]
        assert len(truth["numbers"]) == 4 and all(1 <= n <= 25 for n in truth["numbers"])
        assert 1 <= truth["target"] <= 50 and truth["target"] not in truth["numbers"]
        assert countdown_correct(row["solution"], truth), row
    assert rows == generate("countdown", config)


def test_unknown_generated_dataset_is_a_config_error():
    with pytest.raises(ConfigError, match="times_table"):
        generate("sudoku", SyntheticConfig())
