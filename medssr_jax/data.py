"""One multiple-choice record type (:class:`MCQ`) and readers for every
question source the project uses.

Readers
-------
=============================  =============================================
:func:`read_medssr_eval`       MedSSR evaluation JSON (a list of
                               ``{id, question, gold, name, long, ...}``);
                               options are parsed from the question text
:func:`read_medqa`             MedQA (USMLE) native JSONL
:func:`read_medmcqa`           MedMCQA native JSONL
:func:`read_headqa`            HEAD-QA native JSON
:func:`read_synthetic_jsonl`   ``synthetic.jsonl`` of :mod:`synth.synthesize`
:func:`read_pseudo_labelled_jsonl`  ``pseudo_labelled.jsonl`` of
                               :mod:`synth.pseudo_label`
:func:`read_mcq_jsonl`         what :func:`write_jsonl` wrote
=============================  =============================================

Every reader returns a :class:`Records` object: iterating it reads the file(s)
lazily and yields :class:`MCQ` records; its :attr:`Records.stats`
(:class:`ReadStats`) counts the records read, the records skipped by reason and
the warnings, and is complete once iteration has finished (``Records.load()``
reads everything and returns the list). Iterating again reads the files again
and starts fresh counts.

Malformed records
-----------------
A record that cannot become a valid :class:`MCQ` is reported with its location
(``file:line N`` for JSONL, ``file:record N (id X)`` for JSON lists, N
1-based) and one of these reasons:

``bad_json``      the line / file is not valid JSON
``bad_utf8``      the bytes are not valid UTF-8 (for a JSON file: the records
                  whose strings hold the invalid bytes)
``bad_record``    the record is not a JSON object / has the wrong shape
``missing_field`` a required field is absent, null or empty
``no_options``    no option could be found
``bad_options``   malformed options (letters not consecutive from A, fewer
                  than 2 or more than 10, an empty option text, ...)
``bad_answer``    the gold / answer letter is not one of the options

With ``on_error="raise"`` the first one raises :class:`ValueError` with the
message ``"<location>: <reason>: <detail>"``; with ``on_error="skip"``
(default) the same message is logged as a warning, stored in
``stats.errors`` and counted in ``stats.skipped[reason]``. Nothing is dropped
without being counted.

Repairs that keep a record (also logged, listed in ``stats.warnings`` and
counted in ``stats.repaired``): in MedSSR evaluation questions, trailing lines
after the options that hold only quote characters and whitespace (e.g. a stray
``"`` line, as in ``medqa-000153``) are removed before the options are parsed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medssr_jax.answers import parse_options

__all__ = [
    "BenchmarkFile",
    "LETTERS",
    "MCQ",
    "ReadStats",
    "Records",
    "benchmark_files",
    "read_benchmark_file",
    "read_headqa",
    "read_mcq_jsonl",
    "read_medmcqa",
    "read_medqa",
    "read_medssr_eval",
    "read_pseudo_labelled_jsonl",
    "read_synthetic_jsonl",
    "write_jsonl",
]

log = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJ"
MIN_OPTIONS, MAX_OPTIONS = 2, 10


# --- the record -----------------------------------------------------------------

def _check_options(options: Mapping[str, str]) -> str | None:
    """``None`` when ``options`` is a valid option block, else the problem."""
    if not isinstance(options, Mapping):
        return f"options must be a mapping letter -> text, got {type(options).__name__}"
    letters = list(options)
    if not MIN_OPTIONS <= len(letters) <= MAX_OPTIONS:
        return f"{len(letters)} options; {MIN_OPTIONS} to {MAX_OPTIONS} (A..{LETTERS[MAX_OPTIONS - 1]}) are required"
    if letters != list(LETTERS[:len(letters)]):
        return f"option letters {letters} are not consecutive from A"
    for k, v in options.items():
        if not isinstance(v, str) or not v.strip():
            return f"option {k} has no text"
    return None


@dataclass(frozen=True)
class MCQ:
    """A multiple-choice question.

    ``question`` is the stem only; ``options`` maps consecutive letters from
    ``A`` (2 to 10 of them, A..J) to option texts, in letter order; ``answer`` is the
    gold letter or a pseudo label, ``None`` when unlabelled; ``source`` names
    the benchmark / file it came from; ``extra`` keeps every other field of the
    source record (unknown fields included).
    """

    id: str
    question: str
    options: dict[str, str]
    answer: str | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"id must be a non-empty string, got {self.id!r}")
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError(f"{self.id}: the question stem is empty")
        problem = _check_options(self.options)
        if problem:
            raise ValueError(f"{self.id}: {problem}")
        object.__setattr__(self, "options", {k: self.options[k] for k in LETTERS if k in self.options})
        if self.answer is not None and self.answer not in self.options:
            raise ValueError(f"{self.id}: answer {self.answer!r} is not one of {self.letters}")

    def __hash__(self) -> int:  # the dict fields are not hashable; equal records share these
        return hash((self.id, self.question, self.answer, self.source, tuple(self.options.items())))

    @property
    def letters(self) -> str:
        """The option letters, e.g. ``"ABCD"``."""
        return "".join(self.options)

    def prompt_text(self) -> str:
        """The stem, a newline, then one ``"A. text"`` line per option."""
        return self.question + "\n" + "\n".join(f"{k}. {v}" for k, v in self.options.items())

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "question": self.question, "options": dict(self.options),
                "answer": self.answer, "source": self.source, "extra": dict(self.extra)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MCQ:
        return cls(id=d["id"], question=d["question"], options=dict(d["options"]),
                   answer=d.get("answer"), source=d.get("source", ""), extra=dict(d.get("extra") or {}))


# --- read bookkeeping -------------------------------------------------------------

@dataclass
class ReadStats:
    """What one pass of a reader did."""

    read: int = 0
    skipped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())


class _RecordError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class _Ctx:
    """Error / warning reporting of one reader pass."""

    def __init__(self, stats: ReadStats, on_error: str):
        self.stats, self.on_error = stats, on_error

    def error(self, where: str, reason: str, detail: str) -> None:
        msg = f"{where}: {reason}: {detail}"
        if self.on_error == "raise":
            raise ValueError(msg)
        log.warning("skipped %s", msg)
        self.stats.skipped[reason] += 1
        self.stats.errors.append(msg)

    def warn(self, where: str, kind: str, detail: str) -> None:
        msg = f"{where}: {kind}: {detail}"
        log.info("%s", msg)  # repaired, kept: counted in stats.repaired, one line per record at INFO
        self.stats.repaired[kind] += 1
        self.stats.warnings.append(msg)


class Records(Iterable[MCQ]):
    """The records of a reader: iterate to read them (re-iterable: every pass
    re-reads the file(s) and resets :attr:`stats`)."""

    def __init__(self, gen: Callable[[_Ctx], Iterator[MCQ]], on_error: str):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        self._gen, self._on_error = gen, on_error
        self.stats = ReadStats()

    def __iter__(self) -> Iterator[MCQ]:
        self.stats = ReadStats()
        ctx = _Ctx(self.stats, self._on_error)
        for rec in self._gen(ctx):
            self.stats.read += 1
            yield rec

    def load(self) -> list[MCQ]:
        """Read everything; ``self.stats`` then holds the complete counts."""
        return list(self)


# --- low-level file access -----------------------------------------------------------

def _jsonl_lines(path: Path, ctx: _Ctx) -> Iterator[tuple[str, Any]]:
    """``(location, parsed object)`` per non-blank line; bad lines reported."""
    ctx.stats.files.append(str(path))
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:line {lineno}"
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                ctx.error(where, "bad_utf8", str(e))
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                ctx.error(where, "bad_json", str(e))
                continue
            yield where, obj


def _has_bad_text(obj: Any) -> bool:
    """True when a string inside ``obj`` holds undecodable bytes (lone surrogates)."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(obj, Mapping):
        return any(_has_bad_text(k) or _has_bad_text(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return any(_has_bad_text(v) for v in obj)
    return False


def _json_file(path: Path, ctx: _Ctx) -> tuple[Any, bool]:
    """The parsed JSON document (``None`` when unreadable, reported) and
    whether its bytes held invalid UTF-8 (decoded with surrogateescape so the
    records holding them can be named)."""
    ctx.stats.files.append(str(path))
    raw = Path(path).read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text, bad = raw.decode("utf-8"), False
    except UnicodeDecodeError:
        text, bad = raw.decode("utf-8", errors="surrogateescape"), True
    try:
        return json.loads(text), bad
    except json.JSONDecodeError as e:
        ctx.error(f"{path}", "bad_json", f"the file is not valid JSON ({e}); no record could be read")
        return None, bad


def _record_where(path: Path, index: int, rec: Any) -> str:
    rid = rec.get("id") if isinstance(rec, Mapping) else None
    return f"{path}:record {index}" + (f" (id {rid})" if rid is not None else "")


def _require(rec: Mapping[str, Any], *names: str) -> None:
    missing = [n for n in names if rec.get(n) is None or (isinstance(rec.get(n), str) and not rec[n].strip())]
    if missing:
        raise _RecordError("missing_field", f"missing or empty field(s): {', '.join(missing)}")


def _require_str(rec: Mapping[str, Any], *names: str) -> None:
    _require(rec, *names)
    for n in names:
        if not isinstance(rec[n], str):
            raise _RecordError("bad_record", f"field {n!r} must be a string, got {type(rec[n]).__name__}")


def _options_from_mapping(raw: Any) -> dict[str, str]:
    if not isinstance(raw, Mapping):
        if isinstance(raw, list):
            raw = {LETTERS[i] if i < len(LETTERS) else str(i): v for i, v in enumerate(raw)}
        else:
            raise _RecordError("bad_options", f"options must be an object letter -> text, got {type(raw).__name__}")
    if not raw:
        raise _RecordError("no_options", "the options are empty")
    opts: dict[str, str] = {}
    for k, v in raw.items():
        key = str(k).strip().upper()
        if not isinstance(v, str):
            raise _RecordError("bad_options", f"option {key} is not a string: {v!r}")
        opts[key] = v.strip()
    problem = _check_options(opts)
    if problem:
        raise _RecordError("bad_options", problem)
    return opts


def _mcq(rid: Any, stem: str, options: dict[str, str], answer: Any, source: str,
         extra: dict[str, Any]) -> MCQ:
    """Build an MCQ, turning validation failures into reasons."""
    problem = _check_options(options)
    if problem:
        raise _RecordError("bad_options", problem)
    if answer is not None:
        if not isinstance(answer, str) or answer.strip() not in options:
            raise _RecordError("bad_answer", f"answer {answer!r} is not one of the options {''.join(options)}")
        answer = answer.strip()
    if not isinstance(stem, str) or not stem.strip():
        raise _RecordError("missing_field", "the question stem is empty")
    return MCQ(id=str(rid), question=stem.strip(), options=options, answer=answer, source=source, extra=extra)


def _run(ctx: _Ctx, where: str, build: Callable[[], MCQ | None]) -> MCQ | None:
    try:
        return build()
    except _RecordError as e:
        ctx.error(where, e.reason, e.detail)
        return None


# --- MedSSR evaluation JSON --------------------------------------------------------------

_JUNK_LINE_RE = re.compile(r"^[\s\"'`\u201c\u201d\u2018\u2019]*$")


def _parse_eval_question(text: str, where: str, ctx: _Ctx) -> tuple[str, dict[str, str]]:
    try:
        return parse_options(text)
    except ValueError as first:
        lines = text.splitlines()
        cut = len(lines)
        while cut > 0 and _JUNK_LINE_RE.match(lines[cut - 1]):
            cut -= 1
        junk = [ln for ln in lines[cut:] if ln.strip()]
        if junk:
            try:
                stem, opts = parse_options("\n".join(lines[:cut]))
            except ValueError:
                pass
            else:
                ctx.warn(where, "trailing_junk", f"removed trailing line(s) {junk!r} after the options")
                return stem, opts
        reason = "no_options" if str(first).startswith("no options") else "bad_options"
        raise _RecordError(reason, str(first)) from None


def _eval_records(path: Path, ctx: _Ctx) -> Iterator[MCQ]:
    doc, bad_utf8 = _json_file(path, ctx)
    if doc is None:
        return
    if not isinstance(doc, list):
        ctx.error(str(path), "bad_record", f"expected a JSON list of records, got {type(doc).__name__}")
        return
    for i, rec in enumerate(doc, start=1):
        where = _record_where(path, i, rec)

        def build(rec=rec, where=where):
            if not isinstance(rec, Mapping):
                raise _RecordError("bad_record", f"expected an object, got {type(rec).__name__}")
            if bad_utf8 and _has_bad_text(rec):
                raise _RecordError("bad_utf8", "the record holds bytes that are not valid UTF-8")
            _require_str(rec, "id", "question", "gold", "name")
            stem, opts = _parse_eval_question(rec["question"], where, ctx)
            extra = {k: v for k, v in rec.items() if k not in ("id", "question", "gold", "name")}
            return _mcq(rec["id"], stem, opts, rec["gold"], rec["name"], extra)

        mcq = _run(ctx, where, build)
        if mcq is not None:
            yield mcq


DEFAULT_EVAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "medssr-eval"


def eval_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Where the MedSSR evaluation files are: `explicit` (a flag), else
    $MEDSSR_EVAL_DIR, else ../shared/data/medssr-eval beside the checkout."""
    return Path(explicit or os.environ.get("MEDSSR_EVAL_DIR") or DEFAULT_EVAL_DIR)


def read_medssr_eval(path_or_dir: str | os.PathLike, names: Sequence[str] | None = None, *,
                     on_error: str = "skip") -> Records:
    """MedSSR evaluation records (``{id, question, gold, name, long, ...}``).

    ``path_or_dir``: one ``.json`` file, or a directory whose ``*.json`` files
    are all read in name order. ``names`` (directory only) reads just
    ``<name>.json`` for each name, in the given order; a missing one raises
    ``FileNotFoundError``. The record's ``name`` becomes ``source``; the
    options are parsed from the question text with
    :func:`medssr_jax.answers.parse_options`, after removing trailing junk
    lines (reported as ``trailing_junk`` warnings); every other field (``long``
    and any unknown one) is kept in ``extra``.
    """
    p = Path(path_or_dir)
    if p.is_dir():
        if names is None:
            files = sorted(p.glob("*.json"))
        else:
            files = [p / f"{n}.json" for n in names]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"no MedSSR evaluation file(s) {missing}")
    elif p.is_file():
        if names is not None:
            raise ValueError("names selects files of a directory; pass a directory or names=None")
        files = [p]
    else:
        raise FileNotFoundError(f"{p} is neither a file nor a directory")

    def gen(ctx: _Ctx) -> Iterator[MCQ]:
        for f in files:
            yield from _eval_records(f, ctx)

    return Records(gen, on_error)


@dataclass
class BenchmarkFile:
    """One benchmark file as the MedSSR harness reads it: the raw records.

    ``name``: the file's stem (results are grouped by it); ``records``: the
    records that carry a non-empty string ``id`` and ``question`` and a gold
    letter (``A``-``Z``), every field kept as stored; ``letters``: the file's
    sorted gold letters, from all its readable records (the harness's allowed
    letters for recovery); ``skipped``: records left out, by reason (with
    ``errors`` naming each); ``duplicate_ids``: ids that occur more than once.
    """

    name: str
    path: Path
    records: list[dict]
    letters: list[str]
    skipped: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    duplicate_ids: list[str] = field(default_factory=list)


def benchmark_files(path_or_dir: str | os.PathLike) -> list[Path]:
    """The benchmark files a path names: one ``.json`` file, or a directory's
    ``*.json`` files in name order. Raises ``FileNotFoundError`` naming the
    path when it does not exist or a directory holds no ``.json`` file."""
    p = Path(path_or_dir)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.glob("*.json") if f.is_file())
        if not files:
            raise FileNotFoundError(f"no benchmark files (*.json) in {p}")
        return files
    raise FileNotFoundError(f"{p}: no such benchmark file or directory")


def read_benchmark_file(path: str | os.PathLike) -> BenchmarkFile:
    """Read one MedSSR-format benchmark file (a JSON list of ``{id, question,
    gold, name, ...}``) without parsing its options, as the harness does.

    A file that is not valid JSON or UTF-8, or not a list, raises
    ``ValueError`` naming it. Records that are not objects or lack a usable
    ``id`` / ``question`` / ``gold`` are skipped and counted by reason.
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None
    if not isinstance(doc, list):
        raise ValueError(f"{p}: expected a JSON list of records, got {type(doc).__name__}")
    records, skipped, errors = [], Counter(), []
    for i, rec in enumerate(doc, start=1):
        where = _record_where(p, i, rec)
        if not isinstance(rec, dict):
            reason, detail = "bad_record", f"expected an object, got {type(rec).__name__}"
        else:
            missing = [k for k in ("id", "question", "gold") if not (isinstance(rec.get(k), str) and rec[k].strip())]
            if missing:
                reason, detail = "missing_field", f"no usable {', '.join(missing)}"
            elif not re.fullmatch(r"[A-Za-z]", rec["gold"].strip()):
                reason, detail = "bad_answer", f"gold {rec['gold']!r} is not one option letter"
            else:
                records.append(rec)
                continue
        skipped[reason] += 1
        errors.append(f"{where}: {reason}: {detail}")
        log.warning("%s: %s: %s", where, reason, detail)
    counts = Counter(r["id"] for r in records)
    letters = sorted({r["gold"].upper() for r in records if r.get("gold")})
    return BenchmarkFile(name=p.stem, path=p, records=records, letters=letters, skipped=dict(skipped),
                         errors=errors, duplicate_ids=sorted(k for k, c in counts.items() if c > 1))


# --- MedQA ------------------------------------------------------------------------------

def read_medqa(path: str | os.PathLike, *, source: str = "medqa", on_error: str = "skip") -> Records:
    """MedQA (USMLE) native JSONL, one question per line:
    ``{"question", "answer" (text), "options": {"A": .., ...}, "meta_info",
    "answer_idx": "A"}`` (4-option and 5-option releases). The records carry no
    id: ``id`` is ``"<file stem>-<line number>"`` unless the line has an
    ``"id"``. ``answer_idx`` is the gold letter (missing or null: unlabelled);
    ``answer``, ``meta_info`` and unknown fields go to ``extra``. An ``answer``
    text that differs from the gold option's text is reported as an
    ``answer_text_mismatch`` warning, keeping the record.
    """
    path = Path(path)

    def gen(ctx: _Ctx) -> Iterator[MCQ]:
        for where, rec in _jsonl_lines(path, ctx):
            def build(rec=rec, where=where):
                if not isinstance(rec, Mapping):
                    raise _RecordError("bad_record", f"expected an object, got {type(rec).__name__}")
                _require_str(rec, "question")
                if "options" not in rec or rec["options"] is None:
                    raise _RecordError("no_options", "the record has no 'options'")
                opts = _options_from_mapping(rec["options"])
                gold = rec.get("answer_idx")
                rid = rec.get("id") or f"{path.stem}-{where.rsplit(' ', 1)[1]}"
                extra = {k: v for k, v in rec.items() if k not in ("id", "question", "options", "answer_idx")}
                mcq = _mcq(rid, rec["question"], opts, gold, source, extra)
                text = rec.get("answer")
                if mcq.answer is not None and isinstance(text, str) and text.strip() != mcq.options[mcq.answer]:
                    ctx.warn(where, "answer_text_mismatch",
                             f"answer text {text!r} differs from option {mcq.answer} {mcq.options[mcq.answer]!r}")
                return mcq

            mcq = _run(ctx, where, build)
            if mcq is not None:
                yield mcq

    return Records(gen, on_error)


# --- MedMCQA -----------------------------------------------------------------------------

_MEDMCQA_OPTS = ("opa", "opb", "opc", "opd")


def _medmcqa_cop_base(path: Path) -> tuple[int, str]:
    """Detect whether ``cop`` is 1-based (official release) or 0-based
    (the Hugging Face conversion) from the values in the file."""
    seen: set[int] = set()
    with open(path, "rb") as f:
        for raw in f:
            try:
                rec = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                continue
            cop = rec.get("cop") if isinstance(rec, dict) else None
            if isinstance(cop, int) and not isinstance(cop, bool):
                seen.add(cop)
    if 0 in seen and 4 in seen:
        raise ValueError(f"{path}: 'cop' takes both 0 and 4: cannot tell 0-based from 1-based; pass cop_base")
    if 0 in seen:
        return 0, "cop 0 occurs: 0-based"
    if 4 in seen:
        return 1, "cop 4 occurs: 1-based"
    return 1, "only cop values 1-3 (or none) occur: assumed 1-based as in the official release"


def read_medmcqa(path: str | os.PathLike, *, cop_base: int | str = "auto", source: str = "medmcqa",
                 on_error: str = "skip") -> Records:
    """MedMCQA native JSONL: ``{"id", "question", "opa", "opb", "opc", "opd",
    "cop", "choice_type", "exp", "subject_name", "topic_name"}``.

    ``cop`` (correct option) is 1..4 in the official release and 0..3 in the
    Hugging Face conversion. ``cop_base="auto"`` scans the file first: a 0
    means 0-based, a 4 means 1-based (both: ``ValueError``); a file with only
    1..3 is taken as 1-based and a ``cop_base_assumed`` warning says so. Pass
    ``cop_base=0`` or ``1`` to fix it. A missing / null ``cop`` or ``-1`` (the
    unlabelled test split) gives ``answer=None``. Every field but id, question,
    the four options and cop goes to ``extra``, plus ``cop`` itself.
    """
    path = Path(path)
    if cop_base not in ("auto", 0, 1):
        raise ValueError(f"cop_base must be 'auto', 0 or 1, got {cop_base!r}")

    def gen(ctx: _Ctx) -> Iterator[MCQ]:
        base = cop_base
        if base == "auto":
            base, why = _medmcqa_cop_base(path)
            if why.startswith("only"):
                ctx.warn(str(path), "cop_base_assumed", why)
        for where, rec in _jsonl_lines(path, ctx):
            def build(rec=rec, where=where):
                if not isinstance(rec, Mapping):
                    raise _RecordError("bad_record", f"expected an object, got {type(rec).__name__}")
                _require_str(rec, "id", "question")
                missing = [k for k in _MEDMCQA_OPTS if k not in rec or rec[k] is None]
                if len(missing) == len(_MEDMCQA_OPTS):
                    raise _RecordError("no_options", "none of opa, opb, opc, opd is present")
                if missing:
                    raise _RecordError("missing_field", f"missing option field(s): {', '.join(missing)}")
                opts = _options_from_mapping({LETTERS[i]: rec[k] for i, k in enumerate(_MEDMCQA_OPTS)})
                cop = rec.get("cop")
                if cop is None or cop == -1:
                    gold = None
                elif isinstance(cop, int) and not isinstance(cop, bool) and 0 <= cop - base < 4:
                    gold = LETTERS[cop - base]
                else:
                    raise _RecordError("bad_answer", f"cop {cop!r} is not a {base}-based index of 4 options")
                extra = {k: v for k, v in rec.items() if k not in ("id", "question", *_MEDMCQA_OPTS)}
                return _mcq(rec["id"], rec["question"], opts, gold, source, extra)

            mcq = _run(ctx, where, build)
            if mcq is not None:
                yield mcq

    return Records(gen, on_error)


# --- HEAD-QA ---------------------------------------------------------------------------------

def _headqa_questions(doc: Any) -> Iterator[tuple[str | None, dict[str, Any], Any]]:
    """``(exam name, exam-level fields, question)`` for every question of the
    accepted layouts."""
    def exam(name, ex):
        meta = {k: v for k, v in ex.items() if k != "data"}
        for q in ex["data"]:
            yield name or meta.get("name"), meta, q

    if isinstance(doc, Mapping) and isinstance(doc.get("exams"), Mapping):
        for name, ex in doc["exams"].items():
            yield from exam(name, ex)
    elif isinstance(doc, Mapping) and isinstance(doc.get("data"), list):
        yield from exam(None, doc)
    elif isinstance(doc, list) and all(isinstance(e, Mapping) and isinstance(e.get("data"), list) for e in doc):
        for ex in doc:
            yield from exam(None, ex)
    elif isinstance(doc, list):
        for q in doc:
            yield None, {}, q
    else:
        raise _RecordError("bad_record", "expected {'data': [...]}, {'exams': {...}}, a list of exams or a list of questions")


def read_headqa(path: str | os.PathLike, *, source: str = "headqa", on_error: str = "skip") -> Records:
    """HEAD-QA native JSON. Accepted layouts: ``{"data": [question, ...]}``
    (one exam), ``{"version", "language", "exams": {name: {"name", "year",
    "category", "data": [...]}}}`` (the full release), a list of such exams, or
    a plain list of questions. A question is ``{"qid", "qtext", "ra",
    "answers": [{"aid", "atext"}, ...], "image", ...}`` with 4 or 5 answers
    (2 to 10 accepted); answers are lettered A.. in ascending ``aid`` order and
    ``ra`` (the right answer's aid) becomes that letter. ``id`` is
    ``"<exam>-<qid>"`` when the exam has a name, else ``"<qid>"``; the exam's
    fields (name, year, category, ...) are kept in ``extra`` with every
    question field but qtext and answers (``aid``s included, as ``aids``).
    """
    path = Path(path)

    def gen(ctx: _Ctx) -> Iterator[MCQ]:
        doc, bad_utf8 = _json_file(path, ctx)
        if doc is None:
            return
        try:
            items = list(_headqa_questions(doc))
        except _RecordError as e:
            ctx.error(str(path), e.reason, e.detail)
            return
        for i, (exam, meta, q) in enumerate(items, start=1):
            where = f"{path}:record {i}" + (f" (exam {exam}, qid {q.get('qid')})" if isinstance(q, Mapping) else "")

            def build(exam=exam, meta=meta, q=q):
                if not isinstance(q, Mapping):
                    raise _RecordError("bad_record", f"expected an object, got {type(q).__name__}")
                if bad_utf8 and _has_bad_text(q):
                    raise _RecordError("bad_utf8", "the record holds bytes that are not valid UTF-8")
                _require(q, "qid")
                _require_str(q, "qtext")
                answers = q.get("answers")
                if not answers:
                    raise _RecordError("no_options", "the question has no answers")
                if not isinstance(answers, list) or not all(
                        isinstance(a, Mapping) and "aid" in a and "atext" in a for a in answers):
                    raise _RecordError("bad_options", "answers must be a list of {aid, atext}")
                try:
                    ordered = sorted(answers, key=lambda a: int(a["aid"]))
                except (TypeError, ValueError):
                    raise _RecordError("bad_options", "an answer's aid is not an integer") from None
                aids = [int(a["aid"]) for a in ordered]
                if len(set(aids)) != len(aids):
                    raise _RecordError("bad_options", f"repeated aid in {aids}")
                if len(ordered) > MAX_OPTIONS or len(ordered) < MIN_OPTIONS:
                    raise _RecordError("bad_options", f"{len(ordered)} answers; {MIN_OPTIONS} to {MAX_OPTIONS} are required")
                opts = {LETTERS[j]: a["atext"].strip() if isinstance(a["atext"], str) else a["atext"]
                        for j, a in enumerate(ordered)}
                ra = q.get("ra")
                gold = None
                if ra is not None:
                    try:
                        gold = LETTERS[aids.index(int(ra))]
                    except (TypeError, ValueError):
                        raise _RecordError("bad_answer", f"ra {ra!r} is not one of the aids {aids}") from None
                rid = f"{exam}-{q['qid']}" if exam else str(q["qid"])
                extra = {**{f"exam_{k}" if k in q else k: v for k, v in meta.items()},
                         **{k: v for k, v in q.items() if k not in ("qtext", "answers")}, "aids": aids}
                if exam is not None:
                    extra.setdefault("exam", exam)
                if not all(isinstance(v, str) for v in opts.values()):
                    raise _RecordError("bad_options", "an answer's atext is not a string")
                return _mcq(rid, q["qtext"], opts, gold, source, extra)

            mcq = _run(ctx, where, build)
            if mcq is not None:
                yield mcq

    return Records(gen, on_error)


# --- our own outputs ---------------------------------------------------------------------

def read_synthetic_jsonl(path: str | os.PathLike, *, source: str = "synthetic",
                         on_error: str = "skip") -> Records:
    """``synthetic.jsonl`` (:class:`synth.synthesize.SynthItem` records:
    ``{key, question, options, intended_answer, provenance}``). ``id`` is the
    item key; ``answer`` is ``None`` (the generator's ``intended_answer`` is
    provenance, never a label) and ``extra`` keeps ``intended_answer``,
    ``provenance`` and any other field."""
    return _own_jsonl(Path(path), source, on_error, id_fields=("key", "id"), label_field=None)


def read_pseudo_labelled_jsonl(path: str | os.PathLike, *, source: str = "pseudo_labelled",
                               on_error: str = "skip") -> Records:
    """``pseudo_labelled.jsonl`` (also ``pseudo_label_votes.jsonl``) of
    :mod:`synth.pseudo_label`: ``{id, question, options, label, confidence,
    counts, n, n_unparseable, unparseable_share, answers, intended_answer}``.
    ``answer`` is the pseudo ``label`` (``None`` when the vote found none);
    ``extra`` keeps label, confidence and every other field."""
    return _own_jsonl(Path(path), source, on_error, id_fields=("id", "key"), label_field="label")


def read_mcq_jsonl(path: str | os.PathLike, *, on_error: str = "skip") -> Records:
    """What :func:`write_jsonl` wrote (``MCQ.to_dict()`` per line)."""
    path = Path(path)

    def gen(ctx: _Ctx) -> Iterator[MCQ]:
        for where, rec in _jsonl_lines(path, ctx):
            def build(rec=rec):
                if not isinstance(rec, Mapping):
                    raise _RecordError("bad_record", f"expected an object, got {type(rec).__name__}")
                _require_str(rec, "id", "question")
                if not rec.get("options"):
                    raise _RecordError("no_options", "the record has no options")
                opts = _options_from_mapping(rec["options"])
                return _mcq(rec["id"], rec["question"], opts, rec.get("answer"), rec.get("source", ""),
                            dict(rec.get("extra") or {}))

            mcq = _run(ctx, where, build)
            if mcq is not None:
                yield mcq

    return Records(gen, on_error)


def _own_jsonl(path: Path, source: str, on_error: str, *, id_fields: tuple[str, ...],
               label_field: str | None) -> Records:
    def gen(ctx: _Ctx) -> Iterator[MCQ]:
        for where, rec in _jsonl_lines(path, ctx):
            def build(rec=rec):
                if not isinstance(rec, Mapping):
                    raise _RecordError("bad_record", f"expected an object, got {type(rec).__name__}")
                id_field = next((f for f in id_fields if rec.get(f)), None)
                if id_field is None:
                    raise _RecordError("missing_field", f"missing or empty field(s): {' / '.join(id_fields)}")
                _require_str(rec, "question")
                if not rec.get("options"):
                    raise _RecordError("no_options", "the record has no options")
                opts = _options_from_mapping(rec["options"])
                answer = rec.get(label_field) if label_field else None
                extra = {k: v for k, v in rec.items() if k not in (id_field, "question", "options")}
                return _mcq(rec[id_field], rec["question"], opts, answer, source, extra)

            mcq = _run(ctx, where, build)
            if mcq is not None:
                yield mcq

    return Records(gen, on_error)


# --- writing ------------------------------------------------------------------------------

def write_jsonl(records: Iterable[MCQ | Mapping[str, Any]], path: str | os.PathLike) -> int:
    """Write one JSON object per line (``MCQ.to_dict()`` for an MCQ, a mapping
    as is) atomically: to a temporary file in the same directory, fsynced, then
    renamed over ``path``; a failure leaves any earlier ``path`` untouched.
    Returns the number of lines written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                d = r.to_dict() if isinstance(r, MCQ) else dict(r)
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return n
