"""Rewards: answer extraction, math equivalence (a table of verdicts), time bounds, reward terms."""

import math
import re
import time

import numpy as np
import pytest

from jaxcov.config import ConfigError, ExperimentConfig, OverlongConfig, RewardConfig
from jaxcov.rewards import (RewardScorer, close_scorers, extract_answer, last_boxed,
                            overlong_penalty, score_batch)
from jaxcov.rewards.extract import Extraction, brace_depth
from jaxcov.rewards.math_answers import clean_answer, integer_verdict, precheck


def boxed(answer: str) -> str:
    return "Let me think step by step. So the final answer is \\boxed{" + answer + "}."


# (ground truth, response, expected verdict). Verdicts are what a careful grader would say;
# where math-verify's reading is debatable the comment says so. Two known disagreements, where
# math-verify says "not equivalent" and a human would not, are in KNOWN_MATH_VERIFY_MISSES.
ANSWER_TABLE = [
    # fractions, decimals, \frac variants
    ("0.5", boxed("\\frac{1}{2}"), True),
    ("\\frac{1}{2}", boxed("0.5"), True),
    ("\\frac12", boxed("\\dfrac{1}{2}"), True),
    ("0.75", boxed("\\tfrac{3}{4}"), True),
    ("\\frac{1}{2}", boxed("1/2"), True),
    ("\\frac{1}{3}", boxed("0.333333"), True),   # math-verify rounds to 6 decimals
    ("\\frac{1}{3}", boxed("0.333"), False),
    ("\\frac{2}{3}", boxed("\\frac{3}{2}"), False),
    ("2", boxed("\\frac{4}{2}"), True),
    ("\\frac{1}{2}", boxed("\\frac{1}{\\sqrt{4}}"), True),
    # units, percent, currency, degrees
    ("5", boxed("5 \\text{ cm}"), True),
    ("5", boxed("5\\,\\text{cm}"), True),
    ("5", boxed("5 \\text{ meters}"), True),
    ("5", boxed("\\$5"), True),
    ("30", boxed("30^\\circ"), True),
    ("10\\%", boxed("0.1"), True),
    ("10\\%", boxed("10"), True),                # lenient: a percent gold also accepts its number
    ("\\frac{1}{2}", boxed("50\\%"), True),
    # intervals
    ("(1,2)", boxed("(1, 2)"), True),
    ("[1,2)", boxed("[1,2]"), False),
    ("(-\\infty,3]", boxed("(-\\infty, 3]"), True),
    ("(0,1)", boxed("(0,1]"), False),
    ("(2,1)", boxed("(1,2)"), False),
    # sets and lists
    ("\\{1,2,3\\}", boxed("\\{3,2,1\\}"), True),
    ("\\{1,2\\}", boxed("\\{1,2,3\\}"), False),
    ("\\emptyset", boxed("\\varnothing"), True),  # math-verify alone says False; we normalise
    ("1,2", boxed("2, 1"), True),                # a bare list is read as a set (order ignored)
    # text and multiple choice
    ("\\text{Monday}", boxed("\\text{Monday}"), True),
    ("\\text{Monday}", boxed("\\text{monday}"), True),
    ("\\text{Monday}", boxed("Tuesday"), False),
    ("A", boxed("\\text{(A)}"), True),
    ("A", boxed("B"), False),
    ("C", boxed("C"), True),
    # radicals, algebra, equations
    ("2\\sqrt{2}", boxed("\\sqrt{8}"), True),
    ("\\frac{\\sqrt{3}}{2}", boxed("\\sqrt{3}/2"), True),
    ("x^2+2x+1", boxed("(x+1)^2"), True),
    ("x^3", boxed("x^2"), False),
    ("a+b", boxed("b+a"), True),
    ("3", boxed("x = 3"), True),
    ("y=2x+1", boxed("y=1+2x"), True),
    # integers and number formatting
    ("1000", boxed("1,000"), True),
    ("1000", boxed("1\\,000"), True),            # math-verify alone reads 1*0; we normalise
    ("1000000", boxed("1\\,000\\,000"), True),
    ("1000", boxed("1{,}000"), True),
    ("12", boxed("12.0"), True),
    ("12", boxed("012"), True),
    ("-3", boxed("\u22123"), True),              # unicode minus sign
    ("5", boxed("-5"), False),
    ("5", boxed("5.01"), False),
    ("5", boxed("6"), False),
    ("12", boxed("1.2"), False),
    ("-\\frac{1}{2}", boxed("\\frac{1}{2}"), False),
    ("\\frac{1}{2}", boxed("\\frac{1}{4}"), False),
    ("\\sqrt{2}", boxed("2"), False),
    ("x+1", boxed("x-1"), False),
    ("3", boxed("x = 4"), False),
    ("\\text{Monday}", boxed("5"), False),
    ("\\pi", boxed("\\pi"), True),
    ("\\pi", boxed("3.14"), False),
    ("-\\infty", boxed("\\infty"), False),
    # box handling: nested, several, broken, empty
    ("The answer is \\boxed{7}.", boxed("7"), True),  # a solution as ground truth: its box
    ("5", "\\boxed{\\boxed{5}}", True),
    ("5", "\\boxed{3} no wait, \\boxed{5}", True),     # the last box is the answer
    ("3", "\\boxed{3} no wait, \\boxed{5}", False),
    ("3, 5", "\\boxed{3} and \\boxed{5}", False),      # only the last box counts
    ("5", "\\boxed {5}", True),
    ("5", "\\fbox{5}", True),
    ("5", "\\boxed{}", False),
    ("5", "\\boxed{5} wait, \\boxed{7", False),        # revised to a broken 7: not the 5
    ("5", "\\boxed{5", False),                         # broken box: the answer was cut off
    ("5", "\\boxed{{{{5", False),                      # no fallback to the number in it either
    ("5", "The answer is 5. \\boxed{", False),
    # fallbacks (default extractors: boxed, answer_is, last_number)
    ("42", "The answer is 42.", True),
    ("0.75", "Answer: $\\frac{3}{4}$", True),
    ("42", "**Final Answer:** 42", True),
    ("42", "First 41, then 42", True),
    ("5", "I do not know", False),
]

# math-verify says not equivalent; a human would say equivalent. Documented, not patched: rare in
# model outputs, and "fixing" them (degrees, e-notation) would misread other answers.
KNOWN_MATH_VERIFY_MISSES = [
    ("\\frac{\\sqrt{3}}{2}", boxed("\\sin(60^\\circ)"), False),  # 60^\circ read as 60 radians
    ("1000", boxed("1e3"), False),                               # e read as Euler's number
]

# With extractors=("boxed",) only a well-formed box counts.
STRICT_DIFFERENCES = {"The answer is 42.": False,
                      "Answer: $\\frac{3}{4}$": False, "**Final Answer:** 42": False,
                      "First 41, then 42": False}


@pytest.fixture(scope="module")
def scorer():
    # A generous bound: these are verdict tests, not timing tests.
    with RewardScorer(RewardConfig(timeout_s=10.0, num_workers=2)) as s:
        yield s


def _score(scorer, cases):
    responses = [c[1] for c in cases]
    rows = [{"ground_truth": c[0]} for c in cases]
    return scorer.score(responses, rows, [10] * len(cases))


def test_answer_table_has_at_least_60_cases_of_both_verdicts():
    verdicts = [c[2] for c in ANSWER_TABLE]
    assert len(ANSWER_TABLE) >= 60
    assert verdicts.count(True) >= 20 and verdicts.count(False) >= 20


def test_answer_table_verdicts(scorer):
    cases = ANSWER_TABLE + KNOWN_MATH_VERIFY_MISSES
    rewards, metrics = _score(scorer, cases)
    wrong = [(c[0], c[1], c[2]) for c, r in zip(cases, rewards) if bool(r) != c[2]]
    assert wrong == []
    assert metrics["reward/timeouts"] == 0 and metrics["reward/errors"] == 0
    assert metrics["reward/accuracy"] == pytest.approx(np.mean([c[2] for c in cases]))


def test_strict_extractors_refuse_unboxed_answers():
    config = RewardConfig(timeout_s=10.0, num_workers=1, extractors=("boxed",))
    with RewardScorer(config) as strict:
        rewards, metrics = _score(strict, ANSWER_TABLE)
    for (gold, response, verdict), reward in zip(ANSWER_TABLE, rewards):
        assert bool(reward) == STRICT_DIFFERENCES.get(response, verdict), (gold, response)
    # the 5 unboxed answers, 4 broken boxes and 1 empty box
    assert metrics["reward/no_answer"] == pytest.approx(10 / len(ANSWER_TABLE))


# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("text, expected", [
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),          # escaped braces do not close the box
    ("a \\boxed{1} b \\boxed{2} c", "2"),
    ("\\boxed{\\fbox{\\boxed{x}}}", "x"),
    ("\\boxed{\\boxed{5} + 1}", "\\boxed{5} + 1"),
    ("\\boxed{1} then \\boxed{2", None),
    ("no box", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("text, extractors, expected", [
    ("The answer is 3.5.", ("answer_is",), ("3.5", "answer_is")),
    ("The final answer is: **42**", ("answer_is",), ("42", "answer_is")),
    ("Answer: $\\frac{1}{2}$\nCheck: 2", ("answer_is",), ("\\frac{1}{2}", "answer_is")),
    ("the answer is \\boxed{7} because", ("answer_is",), ("7", "answer_is")),
    ("I have 1,000 apples and 3/4 pears", ("last_number",), ("3/4", "last_number")),
    ("Total: 1,000 apples", ("last_number",), ("1000", "last_number")),
    ("x \\boxed{2} then 5", ("last_number", "boxed"), ("5", "last_number")),
    ("x \\boxed{2} then 5", ("boxed", "last_number"), ("2", "boxed")),
    ("nothing here", ("boxed", "answer_is", "last_number"), None),
    ("\\boxed{{{{5", ("boxed", "answer_is", "last_number"), None),  # cut off: no guessing
    ("Answer: 4. \\boxed{4", ("boxed", "answer_is"), None),
    ("\\boxed{{{{5", ("last_number",), ("5", "last_number")),  # without boxes, boxes mean nothing
])
def test_extract_answer(text, extractors, expected):
    found = extract_answer(text, extractors)
    if expected is None:
        assert found is None
    else:
        assert (found.answer, found.method) == expected


def test_cleaning_prechecks_and_integer_fast_path():
    assert clean_answer(" $1\\,000$. ") == "1000"
    assert clean_answer("\\varnothing") == "\\emptyset"
    assert clean_answer("1\\,5") == "1\\,5"  # not a thousands group: left alone
    assert precheck("1" * 301, 300, 10) is not None
    assert precheck("{" * 11 + "}" * 11, 300, 10) is not None
    assert precheck("\\{" * 50, 300, 10) is None  # escaped braces are not nesting
    assert brace_depth("{{}{{{}}}}") == 4
    assert integer_verdict("12", "012") is True
    assert integer_verdict("12", "-12") is False
    assert integer_verdict("12", "12.0") is None  # not both integers: math-verify decides


# --------------------------------------------------------------------------- time bounds


ADVERSARIAL = {
    "100 kB of text": "lorem ipsum " * 9000,
    "100 kB number": "1" * 100_000,
    "10k nested braces": "\\boxed{" + "{" * 10_000 + "5" + "}" * 10_000 + "}",
    "100 kB box": "\\boxed{" + "x+" * 50_000 + "}",
    "power tower": "\\boxed{9^{9^{9^{9}}}}",
    "flat power tower": "\\boxed{9^9^9^9}",
    "huge factorial": "\\boxed{(10^{10})!}",
    "multifactorial": "\\boxed{9!!!!!}",
    "huge power": "\\boxed{10^{10^{10}}}",
    "unclosed 100k": "\\boxed{" * 20_000,
}
HANGS = {"power tower", "huge factorial", "multifactorial", "huge power"}  # sympy never returns


def test_adversarial_answers_score_zero_within_the_bound():
    # One worker per core: with more, a slow but finite answer (the flat tower, ~0.2 s) could be
    # starved of CPU by the hangs and time out too.
    timeout_s, workers = 1.0, 2
    config = RewardConfig(timeout_s=timeout_s, num_workers=workers)
    with RewardScorer(config) as scorer:
        scorer.score(["\\boxed{1/2}"], [{"ground_truth": "0.5"}], [5])  # start the pool
        start = time.monotonic()
        rewards, metrics = scorer.score(list(ADVERSARIAL.values()),
                                        [{"ground_truth": "5"}] * len(ADVERSARIAL),
                                        [100] * len(ADVERSARIAL))
        elapsed = time.monotonic() - start
        # the pool replaced the killed workers and still answers correctly
        again, _ = scorer.score(["\\boxed{\\frac{1}{2}}", "\\boxed{3}"],
                                [{"ground_truth": "0.5"}, {"ground_truth": "0.5"}], [5, 5])
    assert rewards.tolist() == [0.0] * len(ADVERSARIAL)
    assert metrics["reward/timeouts"] == len(HANGS)
    assert metrics["reward/rejected"] == 3  # 100 kB number, 100 kB box, 10k nested braces
    # The hangs run two at a time: about two bounds on an idle machine. The bound is CPU time
    # (wall-clock time is capped at 10x), so a busy machine stretches this; the slack covers it.
    print(f"adversarial batch: {elapsed:.2f} s")
    assert elapsed < math.ceil(len(HANGS) / workers) * timeout_s * 5 + 5.0
    assert again.tolist() == [1.0, 0.0]


def test_deeply_nested_boxes_unwrap_in_linear_time(scorer):
    # 20,000 boxes around a 5 (160 kB). Unwrapping box by box rescans the rest each time: that
    # took 14 s at depth 5,000 and would take minutes here. One matching pass takes milliseconds.
    depth = 20_000
    response = "\\boxed{" * depth + "5" + "}" * depth
    start = time.monotonic()
    extraction = extract_answer(response)
    rewards, _ = _score(scorer, [("5", response, True)])
    elapsed = time.monotonic() - start
    assert extraction == Extraction("5", "boxed")
    assert rewards.tolist() == [1.0]
    assert elapsed < 2.0, f"{elapsed:.1f} s"


def test_scoring_is_deterministic_across_pool_sizes(scorer):
    cases = ANSWER_TABLE[:30]
    first, _ = _score(scorer, cases)
    with RewardScorer(RewardConfig(timeout_s=10.0, num_workers=3)) as other:
        second, _ = _score(other, list(reversed(cases)))
    np.testing.assert_array_equal(first, second[::-1])


def test_unparsable_ground_truth_counts_as_error(scorer):
    rewards, metrics = scorer.score(["\\boxed{x+1}"], [{"ground_truth": ""}], [3])
    assert rewards.tolist() == [0.0] and metrics["reward/errors"] == 1


# --------------------------------------------------------------------------- reward terms


@pytest.mark.parametrize("length, expected", [
    (0, 0.0), (80, 0.0), (81, -0.05), (90, -0.5), (99, -0.95), (100, -1.0), (101, -1.0),
    (5000, -1.0),
])
def test_overlong_penalty(length, expected):
    assert overlong_penalty(length, max_len=100, buffer=20) == pytest.approx(expected)


CUSTOM_MODULE = '''
def length_bonus(response, row, response_length):
    return response_length / 100.0 + (1.0 if row.get("bonus") else 0.0)

def broken(response, row, response_length):
    if "boom" in response:
        raise RuntimeError("user bug")
    return float("nan") if "nan" in response else 2.0
'''


def test_weighted_terms_and_custom_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(CUSTOM_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = RewardConfig(correct_weight=2.0, incorrect_value=-1.0, format_weight=0.5,
                          overlong=OverlongConfig(weight=1.0, max_len=100, buffer=20),
                          custom_fn="my_rewards:length_bonus", custom_weight=0.1, num_workers=1)
    responses = ["\\boxed{12}", "The answer is 12", "\\boxed{13}", "no idea"]
    rows = [{"ground_truth": "12"}, {"ground_truth": "12", "bonus": True},
            {"ground_truth": "12"}, {"ground_truth": "12"}]
    lengths = [10, 90, 100, 150]
    with RewardScorer(config) as scorer:
        rewards, metrics = scorer.score(responses, rows, lengths)
    expected = [2 + 0.5 + 0 + 0.1 * 0.1,
                2 + 0 - 0.5 + 0.1 * 1.9,
                -2 + 0.5 - 1 + 0.1 * 1.0,
                -2 + 0 - 1 + 0.1 * 1.5]
    np.testing.assert_allclose(rewards, expected, rtol=1e-6)
    assert metrics["reward/accuracy"] == 0.5 and metrics["reward/format"] == 0.5
    assert metrics["reward/term/overlong"] == pytest.approx((0 - 0.5 - 1 - 1) / 4)
    assert metrics["reward/overlong_frac"] == 0.75
    assert metrics["reward/term/correct"] == pytest.approx(0.0)  # (1 + 1 - 1 - 1) / 4
    assert metrics["reward/custom_errors"] == 0


def test_custom_function_failures_score_zero_and_are_counted(tmp_path, monkeypatch):
    (tmp_path / "my_rewards2.py").write_text(CUSTOM_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = RewardConfig(correct_weight=0.0, custom_fn="my_rewards2:broken")
    with RewardScorer(config) as scorer:
        rewards, metrics = scorer.score(["ok", "boom", "nan"], [{"ground_truth": "1"}] * 3,
                                        [1, 1, 1])
    assert rewards.tolist() == [2.0, 0.0, 0.0] and metrics["reward/custom_errors"] == 2


def test_custom_function_that_cannot_be_imported_is_a_config_error():
    with pytest.raises(ConfigError, match="custom_fn"):
        RewardScorer(RewardConfig(custom_fn="no_such_module_xyz:fn"))
    with pytest.raises(ConfigError, match="custom_fn"):
        RewardScorer(RewardConfig(custom_fn="math:no_such_function"))


def test_unknown_task_is_an_error_naming_the_row():
    with RewardScorer(RewardConfig()) as scorer:
        with pytest.raises(ConfigError, match=r"rows\[1\]"):
            scorer.score(["a", "b"], [{"ground_truth": "1"},
                                      {"ground_truth": "1", "task": "chess"}], [1, 1])


def test_score_batch_entry_point_with_mixed_tasks():
    config = ExperimentConfig(reward=RewardConfig(format_weight=0.1, num_workers=1))
    responses = ["\\boxed{56}", "7 times 8 is 54", "\\boxed{(5 - 2) * 8}", "\\boxed{3 * 8 * 1}"]
    rows = [{"ground_truth": "56", "task": "times_table"},
            {"ground_truth": "56", "task": "times_table"},
            {"ground_truth": {"target": 24, "numbers": [2, 5, 8]}, "task": "countdown"},
            {"ground_truth": '{"target": 24, "numbers": [3, 8]}', "task": "countdown"}]
    try:
        rewards, metrics = score_batch(responses, rows, [5, 5, 5, 5], config)
    finally:
        close_scorers()
    assert rewards.dtype == np.float32
    np.testing.assert_allclose(rewards, [1.1, 0.0, 1.1, 0.1], rtol=1e-6)
    assert metrics["reward/accuracy/times_table"] == 0.5
    assert metrics["reward/accuracy/countdown"] == 0.5
    assert metrics["reward/accuracy"] == 0.5


def test_mismatched_batch_lengths_are_refused():
    with RewardScorer(RewardConfig()) as scorer:
        with pytest.raises(ValueError, match="must match"):
            scorer.score(["a"], [], [1])


@pytest.mark.parametrize("override, message", [
    ("reward.extractors=[boxed, guess]", "reward.extractors[1]: must be one of"),
    ("reward.extractors=[]", "reward.extractors: must name at least one"),
    ("reward.timeout_s=0", "reward.timeout_s: must be > 0"),
    ("reward.overlong.weight=1.0", "reward.overlong.max_len: must be > 0"),
    ("reward.custom_fn=my_module", "reward.custom_fn: expected module:function"),
    ("reward.num_workers=-1", "reward.num_workers: must be >= 0"),
])
def test_reward_config_errors_name_the_key(override, message):
    from jaxcov.config import load_config
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])
