"""Finding the final answer in a model response, in linear time and without regex back-tracking.

Extractors are tried in the configured order; the first that finds something wins:

- `boxed`: the last top-level `\\boxed{...}` (or `\\fbox{...}`), nested braces included. A box
  inside a box belongs to the outer one. If the last `\\boxed{` never closes (a truncated
  response), no extractor finds anything: the final answer was cut off, and neither a number
  inside the open box nor an earlier answer the model revised may stand in for it.
- `answer_is`: the rest of the line after the last "answer is" / "answer:" (DAPO's `Answer:`).
- `last_number`: the last number in the text (`-12`, `3.5`, `1,000`, `3/4`).

Everything here runs in the trainer process, so it must stay cheap on 100 kB adversarial strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

EXTRACTORS = ("boxed", "answer_is", "last_number")

_BOX_OPENERS = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_ANCHOR = re.compile(r"answer\s*(?:is\b\s*:?|:|=)\s*", re.IGNORECASE)
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
_ANSWER_IS_MAX_CHARS = 400  # only this much of the line after the anchor is looked at


@dataclass(frozen=True)
class Extraction:
    """An answer found in a response and the extractor that found it."""

    answer: str
    method: str


_BRACE_TOKENS = re.compile(r"\\.|[{}]", re.DOTALL)  # an escape pair, or a brace


def matching_brace(text: str, open_index: int) -> int:
    """Index of the `}` closing the `{` at `open_index`, or -1 if it never closes.

    Escaped braces (`\\{`, `\\}`, LaTeX set delimiters) do not count.
    """
    depth = 0
    for token in _BRACE_TOKENS.finditer(text, open_index):
        ch = token.group(0)
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return token.start()
    return -1


def last_boxed(text: str) -> Optional[str]:
    """Content of the last top-level `\\boxed{...}`; None if absent or if the last one is broken."""
    content, _ = _last_box(text)
    return content


def ends_in_unclosed_box(text: str) -> bool:
    """Whether the last top-level `\\boxed{` never closes (a truncated or broken final answer)."""
    return _last_box(text)[1]


def _last_box(text: str) -> tuple[Optional[str], bool]:
    """(content of the last top-level box or None, whether that last box is unclosed)."""
    found = None
    position = 0
    while True:
        match = _BOX_OPENERS.search(text, position)
        if match is None:
            return found, False
        open_index = match.end() - 1
        close_index = matching_brace(text, open_index)
        if close_index < 0:
            return None, True
        found = _unwrap_boxes(text, open_index + 1, close_index)
        position = close_index + 1  # boxes nested inside this one are part of it


_SPACES = re.compile(r"\s*")


def _unwrap_boxes(text: str, start: int, end: int) -> str:
    """`\\boxed{\\boxed{5}}` means 5: strip boxes that wrap the whole of `text[start:end]`.

    The braces are matched once for the whole span, so deep nesting costs linear time.
    """
    closing = _closing_braces(text, start, end)
    while True:
        lo = _SPACES.match(text, start, end).end()
        hi = end
        while hi > lo and text[hi - 1].isspace():
            hi -= 1
        match = _BOX_OPENERS.match(text, lo, hi)
        if match is None or closing.get(match.end() - 1) != hi - 1:
            return text[start:end]
        start, end = match.end(), hi - 1


def _closing_braces(text: str, start: int, end: int) -> dict[int, int]:
    """Index of each unescaped `{` in `text[start:end]` -> index of its matching `}`."""
    opened: list[int] = []
    closing: dict[int, int] = {}
    for token in _BRACE_TOKENS.finditer(text, start, end):
        ch = token.group(0)
        if ch == "{":
            opened.append(token.start())
        elif ch == "}" and opened:
            closing[opened.pop()] = token.start()
    return closing


def answer_after_anchor(text: str) -> Optional[str]:
    """What follows the last "answer is" / "answer:" up to the end of its line or sentence."""
    last = None
    for last in _ANSWER_ANCHOR.finditer(text):
        pass
    if last is None:
        return None
    tail = text[last.end():last.end() + _ANSWER_IS_MAX_CHARS].split("\n", 1)[0]
    boxed = last_boxed(tail)
    if boxed is not None:
        return boxed
    sentence_end = re.search(r"\.(?:\s|$)", tail)
    if sentence_end:
        tail = tail[:sentence_end.start()]
    answer = tail.strip().strip("*").strip().strip("$").strip()
    return answer or None


def last_number(text: str) -> Optional[str]:
    """The last number in the text, thousands separators removed."""
    last = None
    for last in _NUMBER.finditer(text):
        pass
    return None if last is None else last.group(0).replace(",", "")


_EXTRACTOR_FNS = {"boxed": last_boxed, "answer_is": answer_after_anchor, "last_number": last_number}


def extract_answer(text: str, extractors: Sequence[str] = EXTRACTORS) -> Optional[Extraction]:
    """The final answer of a response by the first extractor (in order) that finds one."""
    if "boxed" in extractors and ends_in_unclosed_box(text):
        return None  # the final answer was cut off: no other extractor may guess it
    for name in extractors:
        answer = _EXTRACTOR_FNS[name](text)
        if answer is not None and answer.strip():
            return Extraction(answer.strip(), name)
    return None


def brace_depth(text: str) -> int:
    """Deepest nesting of unescaped `{` in `text` (an unbalanced `}` does not go below 0)."""
    depth = deepest = 0
    for token in _BRACE_TOKENS.finditer(text):
        ch = token.group(0)
        if ch == "{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == "}":
            depth = max(0, depth - 1)
    return deepest


def ground_truth_answer(ground_truth: str) -> str:
    """A ground truth as an answer string: the last box of a solution, else the text itself."""
    text = str(ground_truth).strip()
    boxed = last_boxed(text)
    answer = boxed if boxed is not None else text
    return answer.strip().strip("$").strip()
