"""Math answers on the trainer's side: cleaning, cheap pre-checks, and the exact-integer fast path.

Nothing here imports sympy or math-verify: symbolic equivalence runs in the worker processes
(`_sympy_worker.py`), and only for answers that pass the pre-checks and are not plain integers.
"""

from __future__ import annotations

import re
from typing import Optional

from jaxcov.rewards.extract import brace_depth

_INTEGER = re.compile(r"-?\d+")
# `1\,000` (thin space between digit groups) is a thousands separator; math-verify reads 1*0.
_THIN_SPACE_THOUSANDS = re.compile(r"(?<=\d)\\,(?=\d{3}(?!\d))")
_REPLACEMENTS = (
    ("\\varnothing", "\\emptyset"),  # math-verify knows only \emptyset
    ("\u2212", "-"),                # unicode minus sign
)


def clean_answer(answer: str) -> str:
    """Normalises what math-verify gets wrong or needs not see (surrounding `$`, trailing `.`)."""
    text = answer.strip()
    for old, new in _REPLACEMENTS:
        text = text.replace(old, new)
    text = _THIN_SPACE_THOUSANDS.sub("", text)
    previous = None
    while text != previous:  # "$1000$." -> "1000"
        previous = text
        text = text.strip().strip("$").strip().removesuffix(".")
    return text


def precheck(answer: str, max_chars: int, max_brace_depth: int) -> Optional[str]:
    """Why an answer is refused before verification (too long, too deeply nested), or None."""
    if len(answer) > max_chars:
        return f"longer than {max_chars} characters"
    if brace_depth(answer) > max_brace_depth:
        return f"braces nested deeper than {max_brace_depth}"
    return None


def integer_verdict(gold: str, answer: str) -> Optional[bool]:
    """Equality when both sides are plain integers (no sympy needed), else None.

    The common case for synthetic tasks; also what math-verify says (`012` equals `12`).
    """
    if _INTEGER.fullmatch(gold) and _INTEGER.fullmatch(answer):
        return int(gold) == int(answer)
    return None
