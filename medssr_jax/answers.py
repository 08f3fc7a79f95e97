"""Multiple-choice answer extraction, option parsing and majority voting.

Shared by the RL reward (:func:`option_reward`), pseudo-labelling of unlabelled
questions (:func:`majority_vote` over sampled completions) and evaluation, so
that all three score a completion the same way.

Answer extraction protocol (:func:`extract_answer`)
---------------------------------------------------
A completion states its answer in one of three forms:

1. ``The answer is X`` -- the phrase is case-insensitive and may read
   ``the final answer is`` / ``the correct answer is``; between the phrase and
   the letter any of ``:``, whitespace, ``*``/``_`` (markdown emphasis), ``$``,
   ``(``, ``[``, ``{``, ``\\(``, ``\\boxed{``, ``\\text{``/``\\textbf{``/
   ``\\mathrm{``/``\\mathbf{`` and the words ``option``/``choice`` may appear, so
   ``The answer is: (B).``, ``the answer is **C**`` and
   ``The answer is $\\boxed{D}$`` all count;
2. ``\\boxed{X}`` anywhere (also ``\\boxed{\\text{X}}``, ``\\boxed{(X)}``,
   ``\\boxed{X. text}``);
3. ``[X]`` anywhere: a single letter in square brackets.

``X`` is a single upper-case letter that is not followed by another letter or
digit (``The answer is Amoxicillin`` states no letter). Every occurrence of
every form is a candidate, located at the position of its letter; **the
candidate that is last in the text wins, whatever its form** (a form that nests
another, e.g. ``The answer is [B]``, points at the same letter). The winning
letter must be one of ``options``, otherwise the completion has no valid
answer and ``None`` is returned -- an earlier valid candidate does not rescue
a final invalid one.

``lenient=True`` adds one form, tried only when none of the three occurs: a
completion that *opens* with an option letter followed by ``.``, ``)`` or
``:`` (``C. Elastosis ...``, ``(B) ...``), the way small instruct models
often reply to a listed question. The MedSSR evaluation protocol reads the
strict forms only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "Vote",
    "extract_answer",
    "majority_vote",
    "option_reward",
    "parse_options",
]

_LETTER = r"([A-Z])(?![A-Za-z0-9])"

_PHRASE_RE = re.compile(
    r"(?i:\bthe\s+(?:final\s+|correct\s+)?answer\s+is)"
    r"(?i:[\s:*_$(\[{]|\\\(|\\(?:boxed|text|textbf|mathrm|mathbf)\s*\{|\b(?:option|choice)\b)*"
    + _LETTER
)
_BOXED_RE = re.compile(
    r"\\boxed\s*\{\s*(?:\\(?:text|textbf|mathrm|mathbf)\s*\{\s*)?[(\[]?\s*" + _LETTER
)
_BRACKET_RE = re.compile(r"\[([A-Z])\]")

_FORMS = (_PHRASE_RE, _BOXED_RE, _BRACKET_RE)


def _option_set(options: str | Iterable[str]) -> frozenset[str]:
    letters = list(options)
    if not letters:
        raise ValueError("options must name at least one letter")
    for o in letters:
        if not (isinstance(o, str) and len(o) == 1 and "A" <= o <= "Z"):
            raise ValueError(f"options must be single upper-case letters, got {o!r}")
    if len(set(letters)) != len(letters):
        raise ValueError(f"options contain a repeated letter: {letters!r}")
    return frozenset(letters)


_LEADING_RE = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])[.):])(?=\s|$)")


def extract_answer(text: str | None, options: str | Iterable[str] = "ABCDE", *,
                   lenient: bool = False) -> str | None:
    """The option letter a completion commits to, or ``None``.

    See the module docstring for the recognised forms. The last candidate in
    the text decides; it must be one of ``options`` (a string such as
    ``"ABCD"`` or an iterable of letters), otherwise ``None``. ``lenient``
    also reads a leading ``X.`` when no other form occurs.
    """
    allowed = _option_set(options)
    if not text:
        return None
    best_pos, best = -1, None
    for pattern in _FORMS:
        for m in pattern.finditer(text):
            if m.start(1) > best_pos:
                best_pos, best = m.start(1), m.group(1)
    if best is None and lenient:
        m = _LEADING_RE.match(text)
        best = m and (m.group(1) or m.group(2))
    return best if best in allowed else None


def option_reward(text: str | None, label: str, options: str | Iterable[str] = "ABCDE", *,
                  lenient: bool = False) -> float:
    """1.0 when :func:`extract_answer` of ``text`` equals ``label``, else 0.0."""
    return 1.0 if extract_answer(text, options, lenient=lenient) == label else 0.0


_OPTION_LINE_RE = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])[.):])(?:\s+(.*?))?\s*$")
_OPTIONS_HEADER_RE = re.compile(r"^\s*(?:answer\s+)?(?:options|choices)\s*:?\s*$", re.IGNORECASE)


def parse_options(question_text: str) -> tuple[str, dict[str, str]]:
    """Split a multiple-choice question into its stem and its options.

    Options are the lines ``A. text``, ``A) text``, ``A: text`` or
    ``(A) text`` that follow the stem, one per line, starting at ``A`` with
    consecutive letters, 2 to 10 of them (A..J). The block begins at the last
    ``A`` line of the text. Blank lines between options are allowed; any other
    line after the first option is an error. A line that
    only says ``Options:`` / ``Choices:`` / ``Answer choices:`` just before the
    options is dropped from the stem. The stem and option texts are stripped.

    Returns ``(stem, {"A": text, "B": text, ...})`` (dict in letter order).
    Raises ``ValueError`` describing the problem when the stem is empty, no
    ``A`` option line exists, letters are not consecutive from ``A``, an
    option has no text, an option is followed by a non-option line, or there
    are fewer than 2 or more than 10 options.
    """
    if not isinstance(question_text, str):
        raise TypeError(f"question_text must be a string, got {type(question_text).__name__}")
    lines = question_text.splitlines()
    # The option block starts at the last "A" line, so a stem line that merely
    # begins like one (e.g. the species abbreviation "A. baumannii ...") is
    # kept in the stem.
    first = None
    for i in range(len(lines) - 1, -1, -1):
        m = _OPTION_LINE_RE.match(lines[i])
        if m and (m.group(1) or m.group(2)) == "A":
            first = i
            break
    if first is None:
        raise ValueError("no options found: expected lines like 'A. text' or 'A) text' after the stem")

    options: dict[str, str] = {}
    for lineno, line in enumerate(lines[first:], start=first + 1):
        if not line.strip():
            continue
        m = _OPTION_LINE_RE.match(line)
        if not m:
            raise ValueError(f"line {lineno} after the options is not an option line: {line.strip()!r}")
        letter, text = m.group(1) or m.group(2), m.group(3) or ""
        expected = chr(ord("A") + len(options))
        if letter != expected:
            raise ValueError(
                f"option letters must be consecutive from A: expected {expected!r} on line {lineno}, got {letter!r}"
            )
        if not text:
            raise ValueError(f"option {letter} on line {lineno} has no text")
        options[letter] = text
    if len(options) < 2:
        raise ValueError(f"a question needs 2 to 10 options (A..J), found {len(options)}")
    if len(options) > 10:
        raise ValueError(f"a question needs 2 to 10 options (A..J), found {len(options)} (A..{letter})")

    stem_lines = lines[:first]
    while stem_lines and not stem_lines[-1].strip():
        stem_lines.pop()
    if stem_lines and _OPTIONS_HEADER_RE.match(stem_lines[-1]):
        stem_lines.pop()
    stem = "\n".join(stem_lines).strip()
    if not stem:
        raise ValueError("the question has no stem before its options")
    return stem, options


@dataclass(frozen=True)
class Vote:
    """Result of :func:`majority_vote`.

    ``label``: the winning letter, or ``None`` when no answer was valid.
    ``confidence``: votes for ``label`` / ``n`` (0.0 when ``label`` is None).
    ``counts``: votes per option letter, every option present, in option order.
    ``n``: number of answers, unparseable ones included.
    ``n_unparseable``: answers that were ``None`` or not one of the options.
    """

    label: str | None
    confidence: float
    counts: dict[str, int] = field(default_factory=dict)
    n: int = 0
    n_unparseable: int = 0


def majority_vote(answers: Sequence[str | None], options: str | Iterable[str] = "ABCDE") -> Vote:
    """Majority vote over extracted answers (e.g. from sampled completions).

    ``label`` is the option with the most votes. Ties are broken
    deterministically by the earliest first occurrence in ``answers``: among the
    tied letters, the one that appears first in the sample order wins.
    ``confidence`` is the winner's votes divided by ``n = len(answers)``, which
    counts unparseable answers too (``None`` or a value that is not one of
    ``options``), so a vote diluted by failures is less confident. With no
    valid answer (or no answers), ``label`` is ``None`` and ``confidence`` 0.0.
    """
    letters = list(options)
    allowed = _option_set(letters)
    counts = {o: 0 for o in letters}
    first_seen: dict[str, int] = {}
    unparseable = 0
    for i, a in enumerate(answers):
        if isinstance(a, str) and a in allowed:
            counts[a] += 1
            first_seen.setdefault(a, i)
        else:
            unparseable += 1
    n = len(answers)
    if not first_seen:
        return Vote(label=None, confidence=0.0, counts=counts, n=n, n_unparseable=unparseable)
    label = min(first_seen, key=lambda o: (-counts[o], first_seen[o]))
    return Vote(label=label, confidence=counts[label] / n, counts=counts, n=n, n_unparseable=unparseable)
