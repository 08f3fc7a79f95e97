"""MedSSR question synthesis through an OpenAI-compatible chat endpoint.

Pipeline
--------
1. **Plan** (:func:`plan_prompts`, deterministic given ``seed``). A
   ``random.Random(seed)`` shuffles the seed questions and pairs them
   consecutively, (s0, s1), (s2, s3), ...; when a shuffled pass runs out it is
   reshuffled (so every seed is used about equally often and a pair never holds
   the same seed twice). For every prompt the same RNG then draws
   ``rho ~ U(0, 1)``; when ``rho < alpha`` a rare-disease entity is drawn
   uniformly from ``entities`` and its top-``k_docs`` passages from the
   retriever are put into the prompt. The realised share of prompts with an
   entity is reported as the *rare ratio*.
2. **Generate**: one chat request per planned prompt asks for a JSON object
   ``{"question": ..., "options": {"A": ..., ..., "E": ...}, "answer": "A"}``.
   The reply is parsed robustly (code fences, prose around the object). The
   generator's ``answer`` is stored as ``intended_answer`` only; labels come
   from :mod:`synth.pseudo_label`.
3. **Validate** every item (:func:`validate_item`): a stem, 4-5 options
   lettered from A, distinct non-empty options, the intended answer is one of
   the letters, the answer's text does not occur verbatim in the stem; then
   exact and near-duplicate removal (:class:`Deduper`) against the seeds and
   every earlier accepted output.

Outputs (all in ``out_dir``)
----------------------------
``synthetic.jsonl``  accepted :class:`SynthItem` records, append-only.
``rejected.jsonl``   ``{key, reason, detail, raw, provenance}`` per rejected
                     item, append-only; reasons are counted in the report.
``usage.json``       request / token / dollar totals of all runs and per run,
                     rewritten (atomically) after every item, so a killed run's
                     spending up to its last finished item is on record.

Idempotency and restarts
------------------------
Every planned prompt has a key: the SHA-256 of its inputs (seed ids, entity,
rho, index). A record line is written with one ``write`` under a lock and
flushed + fsynced before the key counts as finished; keys found in either
JSONL file (rejections included) are never requested again. A run killed at
any moment and restarted with the same arguments therefore loses nothing,
duplicates nothing and does not re-request finished keys. A final line cut
off by a kill is dropped on restart (the file is truncated back to its last
newline) and that key is requested again. Items whose requests failed after
all retries are not recorded: they count as ``failed`` in the report and are
requested again by the next run.

Near-duplicate removal compares against earlier *accepted* outputs in the
order they were written; with ``workers > 1`` that order is completion order,
so among two near-duplicate generations the first one to finish is kept.

Retries, budget, concurrency
----------------------------
The ``openai`` client is built with ``max_retries=0``; :class:`ChatCaller`
retries itself: on 429 it waits for ``Retry-After`` / ``retry-after-ms`` when
the server sends one (else exponential backoff), on 5xx, timeouts, connection
errors and unreadable response bodies it backs off exponentially
(``backoff_base * 2**attempt`` capped at ``backoff_cap``, times a jitter in
[0.5, 1]). Other 4xx answers are not retried: 400/413/422 reject the item
(reason ``api_bad_request``), 401/403/404 stop the run (:class:`SynthesisError`).

A :class:`Budget` (max requests, max total tokens, max dollars; the limits
apply to one :func:`synthesize` call) is checked before every HTTP attempt,
retries included. Each attempt reserves its worst case (prompt tokens
estimated as characters / 3, plus ``max_tokens`` of completion) until its
usage is known, so in-flight requests cannot overrun the limits. When the
next attempt does not fit, the run stops cleanly: no new request starts,
in-flight ones finish and are recorded, and the report says which limit
stopped it. Prices are USD per million tokens (:data:`PRICES`, overridable);
``max_dollars`` with a model that has no price is an error.

Requests run on a thread pool of ``workers`` threads (bounded concurrency).

The API key is only handed to the ``openai`` client. It is never written to
the outputs, logs, provenance or error messages raised here (any text that
reaches them passes through a redaction of the key).

Batch mode
----------
:func:`synthesize_batch` sends the unfinished prompts through the OpenAI Batch
API instead: it writes ``batch_input.jsonl`` (``custom_id`` = item key),
uploads it, creates the batch, records ``batch_state.json`` (so a restarted
run resumes polling the same batch rather than submitting again), polls until
the batch ends, downloads the output and merges every line through the same
validation and the same append-only files. Keys finished meanwhile are
skipped at merge time, so merging is idempotent too.
"""

from __future__ import annotations

import dataclasses
import email.utils
import hashlib
import json
import logging
import os
import random
import re
import threading
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medssr_jax.atomic import write_json_atomic, write_text_atomic
from medssr_jax.progress import progress_bar
from medssr_jax.redact import redact_text

__all__ = [
    "PRICES",
    "Budget",
    "ChatCaller",
    "ChatResult",
    "Deduper",
    "PromptSpec",
    "SeedQuestion",
    "SynthItem",
    "SynthReport",
    "SynthesisError",
    "build_messages",
    "make_client",
    "parse_generation",
    "plan_prompts",
    "synthesize",
    "synthesize_batch",
    "validate_item",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gpt-4.1"
LETTERS = "ABCDE"

# USD per 1M tokens (input, output), OpenAI list prices for the standard tier.
PRICES: dict[str, tuple[float, float]] = {
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
}
BATCH_DISCOUNT = 0.5  # Batch API requests are billed at half price.


class SynthesisError(RuntimeError):
    """A run cannot go on (bad credentials, unknown model, bad arguments)."""


# --- records ------------------------------------------------------------------

@dataclass(frozen=True)
class SeedQuestion:
    id: str
    question: str
    options: dict[str, str]
    answer: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SeedQuestion:
        return cls(id=str(d["id"]), question=d["question"], options=dict(d["options"]),
                   answer=d.get("answer"))


@dataclass(frozen=True)
class SynthItem:
    """One synthetic question. ``intended_answer`` is what the generator said
    the answer is; it is provenance, never a training label."""

    key: str
    question: str
    options: dict[str, str]
    intended_answer: str | None
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SynthItem:
        return cls(key=d["key"], question=d["question"], options=dict(d["options"]),
                   intended_answer=d.get("intended_answer"), provenance=dict(d.get("provenance", {})))


@dataclass(frozen=True)
class PromptSpec:
    """One planned prompt; ``key`` is the idempotency key of its item."""

    index: int
    seed_ids: tuple[str, ...]
    entity: str | None
    rho: float

    @property
    def key(self) -> str:
        return item_key(self.seed_ids, self.entity, self.rho, self.index)


def item_key(seed_ids: Sequence[str], entity: str | None, rho: float, index: int) -> str:
    payload = json.dumps({"seed_ids": list(seed_ids), "entity": entity, "rho": repr(float(rho)),
                          "index": int(index)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


# --- planning -----------------------------------------------------------------

def plan_prompts(seeds: Sequence[SeedQuestion], n_prompts: int, *, alpha: float = 0.3,
                 entities: Sequence[str] = (), seed: int = 0) -> list[PromptSpec]:
    """The ``n_prompts`` prompts of a run (see the module docstring)."""
    if len(seeds) < 2:
        raise ValueError("need at least two seed questions to pair")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha > 0 and not entities:
        raise ValueError("alpha > 0 needs a non-empty list of rare-disease entities")
    ids = [s.id for s in seeds]
    if len(set(ids)) != len(ids):
        raise ValueError("seed question ids must be unique")
    rng = random.Random(seed)
    order: list[int] = []
    specs = []
    for i in range(n_prompts):
        if len(order) < 2:
            order = list(range(len(seeds)))
            rng.shuffle(order)
        a, b = order.pop(), order.pop()
        rho = rng.random()
        entity = entities[rng.randrange(len(entities))] if rho < alpha else None
        specs.append(PromptSpec(index=i, seed_ids=(ids[a], ids[b]), entity=entity, rho=rho))
    return specs


def rare_ratio(specs: Sequence[PromptSpec]) -> float:
    return sum(s.entity is not None for s in specs) / len(specs) if specs else 0.0


SYSTEM_PROMPT = (
    "You are a medical educator who writes difficult, clinically realistic multiple-choice "
    "questions that require multi-step reasoning rather than recall of a single fact. "
    "Reply with one JSON object only, no prose."
)


def _format_seed(q: SeedQuestion) -> str:
    opts = "\n".join(f"{k}. {v}" for k, v in q.options.items())
    return f"{q.question}\n{opts}"


def build_messages(spec: PromptSpec, seeds_by_id: Mapping[str, SeedQuestion],
                   docs: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, str]]:
    """The chat messages of one prompt: two example seed questions, the
    retrieved passages about the entity when there is one, and the JSON format."""
    parts = ["Here are two example questions:"]
    for j, sid in enumerate(spec.seed_ids, 1):
        parts.append(f"Example {j}:\n{_format_seed(seeds_by_id[sid])}")
    if spec.entity is not None:
        parts.append(f"Background knowledge about the rare disease \"{spec.entity}\":")
        for d in docs:
            title = d.get("title") or ""
            parts.append(f"[{d.get('id')}] {title}\n{d.get('text', '')}".strip())
        parts.append(f"Write one new question in the style of the examples that tests reasoning "
                     f"about {spec.entity}, using the background knowledge.")
    else:
        parts.append("Write one new question in the style of the examples that combines or "
                     "extends their clinical reasoning; do not copy either example.")
    parts.append(
        "Requirements: a clinical vignette stem; five options A-E, all distinct and plausible; "
        "exactly one correct option; do not state the correct option's text in the stem.\n"
        'Reply with JSON: {"question": "<stem>", "options": {"A": "...", "B": "...", "C": "...", '
        '"D": "...", "E": "..."}, "answer": "<letter>"}'
    )
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": "\n\n".join(parts)}]


def prompt_hash(messages: Sequence[Mapping[str, str]]) -> str:
    return hashlib.sha256(json.dumps(list(messages), sort_keys=True).encode()).hexdigest()[:16]


# --- parsing and validation ---------------------------------------------------

_FENCE_RE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def _json_candidates(text: str) -> Iterable[str]:
    yield text.strip()
    for m in _FENCE_RE.finditer(text):
        yield m.group(1).strip()
    start = text.find("{")
    while start != -1:
        yield text[start:text.rfind("}") + 1]
        start = text.find("{", start + 1)
        if start > 2000:
            break


class ParseFailure(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def parse_generation(text: str | None) -> tuple[str, dict[str, str], str | None]:
    """``(question, options, answer)`` from a generator reply.

    Accepts the JSON object alone, inside a code fence or inside prose;
    ``options`` may be a letter->text object or a list (lettered A, B, ...).
    Raises :class:`ParseFailure` with reason ``refusal`` (no JSON object at
    all) or ``unparseable`` (a JSON object that is broken or has the wrong shape).
    """
    if not text or "{" not in text:
        raise ParseFailure("refusal", "the reply contains no JSON object")
    obj = None
    for cand in _json_candidates(text):
        try:
            v = json.loads(cand)
        except (json.JSONDecodeError, ValueError):
            continue
        if isinstance(v, dict):
            obj = v
            break
    if obj is None:
        raise ParseFailure("unparseable", "no complete JSON object in the reply")
    lower = {str(k).lower(): v for k, v in obj.items()}
    question = lower.get("question", lower.get("stem"))
    options = lower.get("options", lower.get("choices"))
    answer = lower.get("answer", lower.get("correct_answer"))
    if not isinstance(question, str):
        question = "" if question is None else None
    if question is None:
        raise ParseFailure("unparseable", "'question' is not a string")
    if isinstance(options, list):
        options = {LETTERS[i] if i < len(LETTERS) else str(i): v for i, v in enumerate(options)}
    if not isinstance(options, dict):
        raise ParseFailure("unparseable", "'options' is not an object or a list")
    options = {str(k).strip().upper().rstrip(".)"): ("" if v is None else str(v)).strip()
               for k, v in options.items()}
    if isinstance(answer, str):
        m = re.match(r"\s*\(?([A-Za-z])\b", answer)
        answer = m.group(1).upper() if m else answer.strip()
    elif answer is not None:
        answer = str(answer)
    return question.strip(), options, answer


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(re.findall(r"[a-z0-9]+", text))


def validate_item(question: str, options: Mapping[str, str], answer: str | None
                  ) -> tuple[str, str] | None:
    """``None`` when the item is well formed, else ``(reason, detail)``.

    Reasons: ``missing_stem``, ``option_count``, ``option_letters``,
    ``empty_option``, ``duplicate_options``, ``invalid_answer``, ``answer_leaked``.
    """
    if not question or not normalize(question):
        return "missing_stem", "the question has no stem"
    if not 4 <= len(options) <= 5:
        return "option_count", f"{len(options)} options; 4 or 5 are required"
    if list(options) != list(LETTERS[:len(options)]):
        return "option_letters", f"option letters {list(options)} are not consecutive from A"
    empty = [k for k, v in options.items() if not normalize(v)]
    if empty:
        return "empty_option", f"option(s) {', '.join(empty)} are empty"
    seen: dict[str, str] = {}
    for k, v in options.items():
        n = normalize(v)
        if n in seen:
            return "duplicate_options", f"options {seen[n]} and {k} are the same"
        seen[n] = k
    if answer not in options:
        return "invalid_answer", f"intended answer {answer!r} is not one of {''.join(options)}"
    ans, stem = normalize(options[answer]), normalize(question)
    if re.search(r"(?<![a-z0-9])" + re.escape(ans) + r"(?![a-z0-9])", stem):
        return "answer_leaked", f"the stem contains the answer text {options[answer]!r}"
    return None


def _dedup_text(question: str, options: Mapping[str, str]) -> str:
    return normalize(question) + " || " + " | ".join(sorted(normalize(v) for v in options.values()))


def char_ngrams(text: str, n: int = 5) -> frozenset[str]:
    if len(text) <= n:
        return frozenset([text])
    return frozenset(text[i:i + n] for i in range(len(text) - n + 1))


class Deduper:
    """Exact (normalised text) and near-duplicate detection.

    Near duplicates: character ``ngram``-gram Jaccard similarity of the
    normalised stem + options >= ``jaccard_threshold``; with ``embed_fn``
    (text -> vector) also cosine similarity >= ``cosine_threshold``.
    Each check is linear in the number of texts held. Thread-safe.
    """

    def __init__(self, *, jaccard_threshold: float = 0.8, ngram: int = 5,
                 embed_fn: Callable[[str], Sequence[float]] | None = None,
                 cosine_threshold: float = 0.95):
        self.jaccard_threshold, self.ngram = jaccard_threshold, ngram
        self.embed_fn, self.cosine_threshold = embed_fn, cosine_threshold
        self._exact: dict[str, str] = {}
        self._grams: list[tuple[str, frozenset[str]]] = []
        self._vecs: list[tuple[str, Any]] = []
        self._lock = threading.Lock()

    def _embed(self, text: str):
        import numpy as np
        v = np.asarray(self.embed_fn(text), dtype=np.float64)
        return v / (np.linalg.norm(v) or 1.0)

    def check(self, question: str, options: Mapping[str, str]) -> tuple[str, str] | None:
        """``(reason, detail)`` when a duplicate of something held, else ``None``."""
        text = _dedup_text(question, options)
        with self._lock:
            if text in self._exact:
                return "exact_duplicate", f"same text as {self._exact[text]}"
            grams = char_ngrams(text, self.ngram)
            for ref, g in self._grams:
                j = len(grams & g) / len(grams | g)
                if j >= self.jaccard_threshold:
                    return "near_duplicate", f"character {self.ngram}-gram Jaccard {j:.3f} with {ref}"
            if self.embed_fn is not None:
                v = self._embed(text)
                for ref, w in self._vecs:
                    c = float(v @ w)
                    if c >= self.cosine_threshold:
                        return "near_duplicate", f"embedding cosine {c:.3f} with {ref}"
        return None

    def add(self, ref: str, question: str, options: Mapping[str, str]) -> None:
        text = _dedup_text(question, options)
        vec = self._embed(text) if self.embed_fn is not None else None
        with self._lock:
            self._exact.setdefault(text, ref)
            self._grams.append((ref, char_ngrams(text, self.ngram)))
            if vec is not None:
                self._vecs.append((ref, vec))


# --- budget -------------------------------------------------------------------

@dataclass
class Budget:
    """Hard limits for one run; ``None`` means unlimited."""

    max_requests: int | None = None
    max_tokens: int | None = None
    max_dollars: float | None = None

    def __post_init__(self):
        self._lock = threading.Lock()
        self.requests = 0
        self.tokens = 0
        self.dollars = 0.0
        self._reserved_tokens = 0
        self._reserved_dollars = 0.0
        self.exhausted: str | None = None

    def acquire(self, est_tokens: int, est_dollars: float) -> bool:
        """Reserve one request with its worst-case usage; False (and
        ``exhausted`` set) when it would not fit."""
        with self._lock:
            if self.exhausted:
                return False
            if self.max_requests is not None and self.requests + 1 > self.max_requests:
                self.exhausted = "max_requests"
            elif self.max_tokens is not None and (
                    self.tokens + self._reserved_tokens + est_tokens > self.max_tokens):
                self.exhausted = "max_tokens"
            elif self.max_dollars is not None and (
                    self.dollars + self._reserved_dollars + est_dollars > self.max_dollars):
                self.exhausted = "max_dollars"
            if self.exhausted:
                return False
            self.requests += 1
            self._reserved_tokens += est_tokens
            self._reserved_dollars += est_dollars
            return True

    def settle(self, est_tokens: int, est_dollars: float, tokens: int, dollars: float) -> None:
        with self._lock:
            self._reserved_tokens -= est_tokens
            self._reserved_dollars -= est_dollars
            self.tokens += tokens
            self.dollars += dollars


def _price(model: str, prices: Mapping[str, tuple[float, float]]) -> tuple[float, float] | None:
    if model in prices:
        return prices[model]
    # dated snapshots, e.g. "gpt-4.1-2025-04-14"
    base = re.sub(r"-\d{4}-\d{2}-\d{2}$", "", model)
    return prices.get(base)


def cost_usd(model: str, prompt_tokens: int, completion_tokens: int,
             prices: Mapping[str, tuple[float, float]] = PRICES, discount: float = 1.0) -> float:
    p = _price(model, prices)
    if p is None:
        return 0.0
    return discount * (prompt_tokens * p[0] + completion_tokens * p[1]) / 1e6


# --- the chat call with our own retries ---------------------------------------

class _Redactor:
    def __init__(self, secret: str | None):
        self.secret = secret or None

    def __call__(self, text: Any) -> str:
        text = str(text)
        if self.secret:
            text = text.replace(self.secret, "[REDACTED]")
        return redact_text(text)  # credentials in an endpoint URL


def make_client(*, base_url: str | None = None, api_key: str | None = None, timeout: float = 60.0):
    """An ``openai.OpenAI`` client with retries off (:class:`ChatCaller` retries).

    ``base_url`` / ``api_key`` default to ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``.
    """
    import openai

    api_key = api_key or os.environ.get("OPENAI_API_KEY")
    if not api_key:
        raise SynthesisError("no API key: pass api_key or set OPENAI_API_KEY")
    base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
    return openai.OpenAI(api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout)


@dataclass
class ChatResult:
    """Outcome of :meth:`ChatCaller.call`.

    ``status``: ``ok`` (``text`` holds the reply), ``rejected`` (a 4xx that
    retrying cannot fix; ``error`` says which), ``failed`` (retries used up),
    ``budget`` (the budget stopped it before a request was sent).
    """

    status: str
    text: str | None = None
    refusal: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    attempts: int = 0
    error: str | None = None


def _retry_after(headers) -> float | None:
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(float(ms) / 1000.0, 0.0)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if not ra:
        return None
    try:
        return max(float(ra), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(ra)
        return max(when.timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None


class ChatCaller:
    """Chat completions with retries, backoff, budget and usage accounting.

    Thread-safe; one instance is shared by the workers of a run.
    """

    def __init__(self, client, *, model: str = DEFAULT_MODEL, temperature: float = 1.0,
                 max_tokens: int = 1024, json_mode: bool = True, max_attempts: int = 6,
                 backoff_base: float = 0.5, backoff_cap: float = 30.0,
                 budget: Budget | None = None, prices: Mapping[str, tuple[float, float]] = PRICES,
                 sleep: Callable[[float], None] = time.sleep, seed: int = 0,
                 redact: Callable[[Any], str] | None = None,
                 stop_event: threading.Event | None = None):
        self.client, self.model = client, model
        self.temperature, self.max_tokens, self.json_mode = temperature, max_tokens, json_mode
        self.max_attempts, self.backoff_base, self.backoff_cap = max_attempts, backoff_base, backoff_cap
        self.budget = budget or Budget()
        self.prices = dict(prices)
        if self.budget.max_dollars is not None and _price(model, self.prices) is None:
            raise SynthesisError(f"max_dollars is set but model {model!r} has no price; pass prices=")
        self.sleep = sleep
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self.redact = redact or _Redactor(getattr(client, "api_key", None))
        self.stop_event = stop_event or threading.Event()
        self.usage = Counter()
        self._usage_lock = threading.Lock()

    def _backoff(self, attempt: int) -> float:
        with self._rng_lock:
            jitter = self._rng.uniform(0.5, 1.0)
        return min(self.backoff_cap, self.backoff_base * 2 ** attempt) * jitter

    def estimate(self, messages: Sequence[Mapping[str, str]]) -> tuple[int, float]:
        chars = sum(len(m["content"]) for m in messages)
        prompt_est = chars // 3 + 16 * len(messages)
        return prompt_est + self.max_tokens, cost_usd(self.model, prompt_est, self.max_tokens, self.prices)

    def request_kwargs(self, messages, key: str | None) -> dict[str, Any]:
        kw: dict[str, Any] = dict(model=self.model, messages=list(messages),
                                  temperature=self.temperature, max_tokens=self.max_tokens)
        if self.json_mode:
            kw["response_format"] = {"type": "json_object"}
        return kw

    def call(self, messages: Sequence[Mapping[str, str]], key: str | None = None) -> ChatResult:
        import openai

        est_tokens, est_dollars = self.estimate(messages)
        headers = {"Idempotency-Key": key} if key else None
        last_error = None
        for attempt in range(self.max_attempts):
            if self.stop_event.is_set():
                return ChatResult("budget", attempts=attempt, error=self.budget.exhausted or "stopped")
            if not self.budget.acquire(est_tokens, est_dollars):
                self.stop_event.set()
                return ChatResult("budget", attempts=attempt, error=self.budget.exhausted)
            settled, fatal = False, None
            try:
                with self._usage_lock:
                    self.usage["requests"] += 1
                resp = self.client.chat.completions.create(
                    **self.request_kwargs(messages, key), extra_headers=headers)
                choice = resp.choices[0]
                u = resp.usage
                pt = int(getattr(u, "prompt_tokens", 0) or 0) if u else 0
                ct = int(getattr(u, "completion_tokens", 0) or 0) if u else 0
                cost = cost_usd(self.model, pt, ct, self.prices)
                self.budget.settle(est_tokens, est_dollars, pt + ct, cost)
                settled = True
                with self._usage_lock:
                    self.usage["prompt_tokens"] += pt
                    self.usage["completion_tokens"] += ct
                    self.usage["cost_usd_micros"] += round(cost * 1e6)
                msg = choice.message
                return ChatResult("ok", text=msg.content, refusal=getattr(msg, "refusal", None),
                                  finish_reason=choice.finish_reason, prompt_tokens=pt,
                                  completion_tokens=ct, cost=cost, attempts=attempt + 1)
            except openai.APIStatusError as e:
                code = e.status_code
                if code == 429:
                    wait = _retry_after(e.response.headers if e.response is not None else None)
                    wait = self._backoff(attempt) if wait is None else wait
                    last_error = "rate_limited(429)"
                elif code >= 500:
                    wait = _retry_after(e.response.headers if e.response is not None else None)
                    wait = self._backoff(attempt) if wait is None else wait
                    last_error = f"server_error({code})"
                elif code in (401, 403, 404):
                    fatal = f"{code} ({type(e).__name__})"  # raised below, outside this handler
                else:
                    return ChatResult("rejected", attempts=attempt + 1,
                                      error=self.redact(f"api_bad_request({code}): {e.message}")[:500])
            except openai.APITimeoutError:
                wait, last_error = self._backoff(attempt), "timeout"
            except openai.APIConnectionError as e:
                wait, last_error = self._backoff(attempt), f"connection_error({type(e.__cause__).__name__})"
            except (openai.APIResponseValidationError, json.JSONDecodeError, ValueError,
                    AttributeError, IndexError, TypeError) as e:
                # a 200 whose body is not a chat completion: unreadable, retried
                wait, last_error = self._backoff(attempt), f"bad_response({type(e).__name__})"
            finally:
                if not settled:
                    self.budget.settle(est_tokens, est_dollars, 0, 0.0)
            if fatal:
                # raised outside the except block so that no exception holding the
                # server's reply (which may quote the credentials) is chained to it
                self.stop_event.set()
                raise SynthesisError(f"the endpoint answered {fatal}; check the API key, "
                                     f"base URL and model name")
            log.info("attempt %d for %s failed: %s; retrying in %.2fs",
                     attempt + 1, key or "request", last_error, wait)
            if attempt + 1 < self.max_attempts:
                self.sleep(wait)
        return ChatResult("failed", attempts=self.max_attempts, error=last_error)


# --- append-only JSONL store --------------------------------------------------

def _repair_tail(path: Path) -> None:
    """Drop a final line cut off by a kill (everything after the last newline)."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        block, pos = 1 << 16, size
        keep = 0
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            i = chunk.rfind(b"\n")
            if i != -1:
                keep = start + i + 1
                break
            pos = start
        log.warning("%s: dropping an incomplete last line (%d bytes)", path, size - keep)
        f.truncate(keep)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n") and line.strip():
                out.append(json.loads(line))
    return out


class JsonlStore:
    """Append-only JSONL: one ``write`` per record, flushed and fsynced."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _repair_tail(self.path)
        self._f = open(self.path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def append(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"
        with self._lock:
            self._f.write(line)
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def _write_json_atomic(path: Path, obj: Any) -> None:
    write_json_atomic(path, obj, default=None)


# --- the run ------------------------------------------------------------------

@dataclass
class SynthReport:
    planned: int = 0
    already_done: int = 0
    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    not_started: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    rare_ratio: float = 0.0
    stopped: str | None = None  # budget limit that stopped the run
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


class _Run:
    """State shared by the workers of one synthesis run."""

    def __init__(self, seeds, out_dir, *, retriever, k_docs, model, dedup_kwargs, caller_id):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.seeds_by_id = {s.id: s for s in seeds}
        self.retriever, self.k_docs, self.model = retriever, k_docs, model
        self.synth_path, self.rej_path = self.out / "synthetic.jsonl", self.out / "rejected.jsonl"
        _repair_tail(self.synth_path)
        _repair_tail(self.rej_path)
        self.done: set[str] = set()
        self.deduper = Deduper(**dedup_kwargs)
        for s in seeds:
            self.deduper.add(f"seed:{s.id}", s.question, s.options)
        for r in read_jsonl(self.synth_path):
            self.done.add(r["key"])
            self.deduper.add(f"item:{r['key']}", r["question"], r["options"])
        for r in read_jsonl(self.rej_path):
            self.done.add(r["key"])
        self.synth = JsonlStore(self.synth_path)
        self.rejected = JsonlStore(self.rej_path)
        self.reasons: Counter = Counter()
        self.counts: Counter = Counter()
        self.lock = threading.Lock()
        self.generator = caller_id

    def close(self):
        self.synth.close()
        self.rejected.close()

    def docs_for(self, spec: PromptSpec) -> list[dict]:
        if spec.entity is None or self.retriever is None:
            return []
        return [dict(d) for d, _score in self.retriever.retrieve(spec.entity, self.k_docs)]

    def provenance(self, spec: PromptSpec, docs, messages) -> dict[str, Any]:
        return {"seed_ids": list(spec.seed_ids), "entity": spec.entity,
                "retrieved_doc_ids": [d.get("id") for d in docs], "rho": spec.rho,
                "index": spec.index, "generator": self.generator,
                "prompt_hash": prompt_hash(messages)}

    def reject(self, key, reason, detail, prov, raw=None):
        self.rejected.append({"key": key, "reason": reason, "detail": detail,
                              "raw": None if raw is None else raw[:4000], "provenance": prov})
        with self.lock:
            self.reasons[reason] += 1
            self.counts["rejected"] += 1

    def finish(self, key: str, prov: dict, text: str | None, refusal: str | None,
               finish_reason: str | None) -> None:
        """Validate a reply and record it as accepted or rejected."""
        if refusal:
            return self.reject(key, "refusal", "the model refused", prov, refusal)
        try:
            question, options, answer = parse_generation(text)
        except ParseFailure as e:
            reason = e.reason
            if reason == "unparseable" and finish_reason == "length":
                reason = "truncated"
            return self.reject(key, reason, str(e), prov, text)
        bad = validate_item(question, options, answer)
        if bad:
            return self.reject(key, bad[0], bad[1], prov, text)
        # the check and the add are one step for this run's outputs
        with self.lock:
            dup = self.deduper.check(question, options)
            if dup is None:
                self.deduper.add(f"item:{key}", question, options)
        if dup:
            return self.reject(key, dup[0], dup[1], prov, text)
        item = SynthItem(key=key, question=question, options=options, intended_answer=answer,
                         provenance=prov)
        self.synth.append(item.to_dict())
        with self.lock:
            self.counts["accepted"] += 1


def _load_usage(path: Path) -> dict:
    if path.exists():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            log.warning("%s is unreadable; starting usage totals afresh", path)
    return {"total": {}, "runs": []}


def _record_usage(out: Path, run_usage: dict) -> None:
    """Add or update (same ``started``) this run's entry and the totals."""
    path = out / "usage.json"
    usage = _load_usage(path)
    runs = [r for r in usage["runs"] if r.get("started") != run_usage["started"]]
    usage["runs"] = runs + [run_usage]
    total: Counter = Counter()
    for r in usage["runs"]:
        for k in ("requests", "prompt_tokens", "completion_tokens"):
            total[k] += r.get(k, 0)
        total["cost_usd"] = round(total["cost_usd"] + r.get("cost_usd", 0.0), 6)
    usage["total"] = dict(total)
    _write_json_atomic(path, usage)


def synthesize(seeds: Sequence[SeedQuestion], out_dir: str | os.PathLike, *, n_prompts: int,
               alpha: float = 0.3, entities: Sequence[str] = (), retriever=None, k_docs: int = 3,
               seed: int = 0, model: str = DEFAULT_MODEL, base_url: str | None = None,
               api_key: str | None = None, client=None, temperature: float = 1.0,
               max_tokens: int = 1024, json_mode: bool = True, workers: int = 8,
               timeout: float = 60.0, max_attempts: int = 6, backoff_base: float = 0.5,
               backoff_cap: float = 30.0, budget: Budget | None = None,
               prices: Mapping[str, tuple[float, float]] = PRICES,
               embed_fn: Callable[[str], Sequence[float]] | None = None,
               jaccard_threshold: float = 0.8, sleep: Callable[[float], None] = time.sleep,
               progress: bool = True) -> SynthReport:
    """Plan ``n_prompts`` prompts, request the unfinished ones, validate and
    record them in ``out_dir`` (see the module docstring). Rerunning with the
    same arguments resumes. Returns a :class:`SynthReport` for this call.
    ``progress``: a tqdm bar of the planned prompts on stderr when it is a terminal.
    """
    if workers < 1:
        raise ValueError("workers must be >= 1")
    specs = plan_prompts(seeds, n_prompts, alpha=alpha, entities=entities, seed=seed)
    if client is None:
        client = make_client(base_url=base_url, api_key=api_key, timeout=timeout)
    redact = _Redactor(api_key or getattr(client, "api_key", None))
    budget = budget or Budget()
    caller = ChatCaller(client, model=model, temperature=temperature, max_tokens=max_tokens,
                        json_mode=json_mode, max_attempts=max_attempts, backoff_base=backoff_base,
                        backoff_cap=backoff_cap, budget=budget, prices=prices, sleep=sleep,
                        seed=seed, redact=redact)
    run = _Run(seeds, out_dir, retriever=retriever, k_docs=k_docs, model=model,
               dedup_kwargs=dict(jaccard_threshold=jaccard_threshold, embed_fn=embed_fn),
               caller_id=model)
    todo = [s for s in specs if s.key not in run.done]
    report = SynthReport(planned=len(specs), already_done=len(specs) - len(todo),
                         rare_ratio=rare_ratio(specs))
    log.info("synthesis: %d planned, %d already done, rare ratio %.3f (alpha %.3f)",
             len(specs), report.already_done, report.rare_ratio, alpha)

    t0 = time.time()
    usage_lock = threading.Lock()

    def run_usage_now() -> dict:
        u = caller.usage
        return {"model": model, "started": t0, "seconds": round(time.time() - t0, 3),
                "requests": u["requests"], "prompt_tokens": u["prompt_tokens"],
                "completion_tokens": u["completion_tokens"],
                "cost_usd": round(u["cost_usd_micros"] / 1e6, 6), "stopped": budget.exhausted}

    def work(spec: PromptSpec) -> str:
        try:
            return _work(spec)
        finally:
            # kept current while running, so a killed run's spending is on record
            with usage_lock:
                _record_usage(run.out, run_usage_now())

    def _work(spec: PromptSpec) -> str:
        if caller.stop_event.is_set():
            return "not_started"
        docs = run.docs_for(spec)
        messages = build_messages(spec, run.seeds_by_id, docs)
        prov = run.provenance(spec, docs, messages)
        res = caller.call(messages, key=spec.key)
        if res.status == "ok":
            run.finish(spec.key, prov, res.text, res.refusal, res.finish_reason)
            return "done"
        if res.status == "rejected":
            run.reject(spec.key, "api_bad_request", res.error, prov)
            return "done"
        if res.status == "failed":
            log.warning("item %s failed after %d attempts (%s); a rerun will retry it",
                        spec.key, res.attempts, res.error)
            return "failed"
        return "not_started"

    outcomes: Counter = Counter()
    bar = progress_bar(len(specs), "synthesize", enabled=progress, initial=report.already_done,
                       unit="prompt")
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="synth") as pool:
            futures = [pool.submit(work, s) for s in todo]
            try:
                for f in as_completed(futures):
                    outcomes[f.result()] += 1
                    if bar is not None:
                        bar.set_postfix(accepted=run.counts["accepted"], rejected=run.counts["rejected"],
                                        failed=outcomes["failed"], refresh=False)
                        bar.update(1)
            except BaseException:
                caller.stop_event.set()
                for f in futures:
                    f.cancel()
                raise
    finally:
        if bar is not None:
            bar.close()
        run.close()
        run_usage = run_usage_now()
        with usage_lock:
            _record_usage(run.out, run_usage)
    report.accepted = run.counts["accepted"]
    report.rejected = run.counts["rejected"]
    report.rejected_by_reason = dict(sorted(run.reasons.items()))
    report.failed = outcomes["failed"]
    report.not_started = outcomes["not_started"]
    report.stopped = budget.exhausted
    report.requests = run_usage["requests"]
    report.prompt_tokens, report.completion_tokens = run_usage["prompt_tokens"], run_usage["completion_tokens"]
    report.cost_usd = run_usage["cost_usd"]
    log.info("synthesis: %d accepted, %d rejected %s, %d failed, %d not started%s",
             report.accepted, report.rejected, report.rejected_by_reason, report.failed,
             report.not_started, f", stopped by {report.stopped}" if report.stopped else "")
    return report


# --- batch mode ---------------------------------------------------------------

def synthesize_batch(seeds: Sequence[SeedQuestion], out_dir: str | os.PathLike, *, n_prompts: int,
                     alpha: float = 0.3, entities: Sequence[str] = (), retriever=None,
                     k_docs: int = 3, seed: int = 0, model: str = DEFAULT_MODEL,
                     base_url: str | None = None, api_key: str | None = None, client=None,
                     temperature: float = 1.0, max_tokens: int = 1024, json_mode: bool = True,
                     timeout: float = 60.0, poll_interval: float = 30.0,
                     max_wait: float = 26 * 3600.0,
                     prices: Mapping[str, tuple[float, float]] = PRICES,
                     embed_fn: Callable[[str], Sequence[float]] | None = None,
                     jaccard_threshold: float = 0.8,
                     sleep: Callable[[float], None] = time.sleep) -> SynthReport:
    """The unfinished prompts of a run through the Batch API (module docstring).

    Same plan, keys, validation and output files as :func:`synthesize`.
    ``batch_state.json`` holds the submitted batch until its output is merged;
    a rerun finds it and polls that batch instead of submitting a new one.
    Lines of the batch that failed are not recorded (a rerun submits them
    again). Usage is costed at the batch discount.
    """
    specs = plan_prompts(seeds, n_prompts, alpha=alpha, entities=entities, seed=seed)
    if client is None:
        client = make_client(base_url=base_url, api_key=api_key, timeout=timeout)
    run = _Run(seeds, out_dir, retriever=retriever, k_docs=k_docs, model=model,
               dedup_kwargs=dict(jaccard_threshold=jaccard_threshold, embed_fn=embed_fn),
               caller_id=model)
    caller = ChatCaller(client, model=model, temperature=temperature, max_tokens=max_tokens,
                        json_mode=json_mode, prices=prices)
    state_path = run.out / "batch_state.json"
    report = SynthReport(planned=len(specs), rare_ratio=rare_ratio(specs))
    usage = Counter()
    t0 = time.time()
    try:
        todo = [s for s in specs if s.key not in run.done]
        report.already_done = len(specs) - len(todo)
        provs: dict[str, dict] = {}
        lines = []
        for spec in todo:
            docs = run.docs_for(spec)
            messages = build_messages(spec, run.seeds_by_id, docs)
            provs[spec.key] = run.provenance(spec, docs, messages)
            lines.append({"custom_id": spec.key, "method": "POST", "url": "/v1/chat/completions",
                          "body": caller.request_kwargs(messages, spec.key)})
        state = json.loads(state_path.read_text()) if state_path.exists() else None
        if state is None and lines:
            inp = run.out / "batch_input.jsonl"
            write_text_atomic(inp, "".join(json.dumps(ln, sort_keys=True) + "\n" for ln in lines))
            with open(inp, "rb") as f:
                up = client.files.create(file=f, purpose="batch")
            batch = client.batches.create(input_file_id=up.id, endpoint="/v1/chat/completions",
                                          completion_window="24h")
            usage["requests"] += 2
            state = {"batch_id": batch.id, "input_file_id": up.id, "keys": [ln["custom_id"] for ln in lines]}
            _write_json_atomic(state_path, state)
            log.info("batch %s submitted with %d requests", batch.id, len(lines))
        if state is not None:
            waited = 0.0
            while True:
                batch = client.batches.retrieve(state["batch_id"])
                usage["requests"] += 1
                if batch.status in ("completed", "failed", "expired", "cancelled"):
                    break
                if waited >= max_wait:
                    raise SynthesisError(f"batch {state['batch_id']} still {batch.status} after {waited:.0f}s; "
                                         f"rerun to keep polling it")
                sleep(poll_interval)
                waited += poll_interval
            if batch.output_file_id:
                content = client.files.content(batch.output_file_id)
                usage["requests"] += 1
                for raw in content.text.splitlines():
                    if not raw.strip():
                        continue
                    line = json.loads(raw)
                    key = line.get("custom_id")
                    if key in run.done or key not in provs:
                        continue  # merged before, or not part of this plan
                    resp = line.get("response") or {}
                    body = resp.get("body") or {}
                    if resp.get("status_code") != 200 or not body.get("choices"):
                        report.failed += 1
                        continue
                    u = body.get("usage") or {}
                    pt, ct = int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0))
                    usage["prompt_tokens"] += pt
                    usage["completion_tokens"] += ct
                    usage["cost_usd_micros"] += round(
                        cost_usd(model, pt, ct, prices, BATCH_DISCOUNT) * 1e6)
                    choice = body["choices"][0]
                    msg = choice.get("message") or {}
                    run.finish(key, provs[key], msg.get("content"), msg.get("refusal"),
                               choice.get("finish_reason"))
                    run.done.add(key)
            if batch.status != "completed":
                log.warning("batch %s ended %s; unfinished items will be resubmitted by a rerun",
                            state["batch_id"], batch.status)
            state_path.unlink(missing_ok=True)
    finally:
        run.close()
        run_usage = {"model": model, "mode": "batch", "started": t0,
                     "seconds": round(time.time() - t0, 3), "requests": usage["requests"],
                     "prompt_tokens": usage["prompt_tokens"],
                     "completion_tokens": usage["completion_tokens"],
                     "cost_usd": round(usage["cost_usd_micros"] / 1e6, 6), "stopped": None}
        _record_usage(run.out, run_usage)
    report.accepted, report.rejected = run.counts["accepted"], run.counts["rejected"]
    report.rejected_by_reason = dict(sorted(run.reasons.items()))
    report.requests = run_usage["requests"]
    report.prompt_tokens, report.completion_tokens = run_usage["prompt_tokens"], run_usage["completion_tokens"]
    report.cost_usd = run_usage["cost_usd"]
    return report
