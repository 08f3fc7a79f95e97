"""One question protocol for labelling votes, GRPO rollouts and evaluation.

Two protocols exist; a :class:`Prompter` holds one of them for one model and
tokenizer, and every stage builds its prompts, reads its answers and recovers
unreadable answers through it, so the policy is trained on what it is
evaluated on.

``medssr`` (the default of every preset): the authors' released evaluation
harness (``vllm_logitsbias_multi.py`` and ``utils/logits_bias.py`` in the
tdlhl/MedSSR repository), transcribed:

* **Prompt.** Base models (chat template ``"raw"``) get :data:`BASE_TEMPLATE`
  around the question text as stored (the stem followed by its ``A. text``
  option lines). Chat models get :data:`SYSTEM_MESSAGE` as the system turn and
  the question text as the user turn, rendered with the checkpoint's own chat
  template (``tokenizer.chat_template`` through ``apply_chat_template``), with
  the generation prompt. Where a tokenizer carries no template, the
  project's renderer of the named template (:mod:`medssr_jax.chat`) stands in
  for it (the harness would fall back to the base-model prompt there). The
  prompt text is encoded with the tokenizer's default special tokens, as a
  text prompt handed to vLLM is (for Llama-3 chat templates that write
  ``<|begin_of_text|>`` themselves this gives two BOS tokens, as in the
  authors' runs).
* **Extraction** (:func:`extract_option`): on the stripped completion the
  patterns ``The answer is X``, ``The answer is $\\boxed{X}$`` and
  ``The answer is [X]`` are tried in that order, each case-sensitive, and the
  last match of the first pattern that matches wins; then ``The answer is X``
  ignoring case, upper-cased. ``X`` is any letter ``A``-``Z`` (the harness does
  not check it against the options: a letter that is no option scores wrong).
* **Recovery** of a completion with no readable answer: the recovery prompt
  (:meth:`Prompter.recovery_text`; base models: prompt + answer + a full stop
  unless the answer ends with one + ``"\\nRespond with one option only.\\nThe
  answer is "``; chat models: the four-turn conversation system / question /
  answer / ``"Respond with one option only. The answer is "``) is decoded
  greedily with :data:`LOGIT_BIAS` added to the logits of
  :meth:`Prompter.biased_ids` and the stop tokens barred from the first
  token, for one token (Qwen family) or two (Llama family); the decoded text,
  stripped, is the prediction. The harness picks those family rules from the
  model's path name; here the architecture decides: Qwen2/Qwen3 take the
  Qwen rule, Llama-architecture models (SmolLM2 included) the Llama rule
  (bias also on every token of ``"X."``, i.e. ``X``, ``.`` and any BOS the
  tokenizer adds by default).
* **Scoring** (:func:`normalize_prediction`, :func:`generation_metrics`): a
  prediction is compared with the gold letter after
  ``(pred or "UNKNOWN").strip().rstrip(".").upper()``; a generation's accuracy
  is the percentage of correct items rounded to 2 decimals; a file's score is
  the mean and population standard deviation of those, each rounded to 2
  decimals.

``legacy``: the protocol of earlier releases of this project (its own
instruction, options re-rendered, ``"\\n\\nAnswer:"`` for base models,
:func:`medssr_jax.answers.extract_answer`, a restricted one-letter recovery
after ``"\\nThe answer is "``). It is not the paper's and numbers made with it
do not compare with the paper's tables.

Small policies may also read a reply that *opens* with ``X.``
(``lenient=True``, see :func:`medssr_jax.answers.extract_answer`) when the
protocol's own extraction finds nothing; evaluation never does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medssr_jax.chat import render_chat

__all__ = [
    "ANSWER_CUE",
    "BASE_TEMPLATE",
    "LOGIT_BIAS",
    "PROTOCOLS",
    "RECOVERY_REQUEST",
    "SYSTEM_MESSAGE",
    "Prompter",
    "allowed_letters",
    "biased_greedy",
    "extract_option",
    "generation_metrics",
    "normalize_prediction",
    "question_text",
]

PROTOCOLS = ("medssr", "legacy")

BASE_TEMPLATE = (
    "You are a professional medical expert answering a multiple-choice medical question.\n"
    "Please think step by step and then provide exactly one final option.\n"
    "Format the final answer as: The answer is [LETTER].\n"
    "\n"
    "Question:\n"
    "{question}\n"
    "\n"
)
SYSTEM_MESSAGE = "Please think step by step and output the final answer as 'The answer is [LETTER]'."
RECOVERY_REQUEST = "Respond with one option only."
ANSWER_CUE = "The answer is "
LOGIT_BIAS = 100.0

_PATTERNS = (
    re.compile(r"The answer is ([A-Z])"),
    re.compile(r"The answer is \$\\boxed{([A-Z])}\$"),
    re.compile(r"The answer is \[([A-Z])\]"),
)
_ANY_CASE = re.compile(r"The answer is ([A-Z])", re.IGNORECASE)


def _last(pattern: re.Pattern, text: str) -> re.Match | None:
    match = None
    for match in pattern.finditer(text):
        pass
    return match


def extract_option(text: str | None) -> str | None:
    """The option letter a completion states, read as the MedSSR harness reads it."""
    if not text:
        return None
    text = text.strip()
    for pattern in _PATTERNS:
        m = _last(pattern, text)
        if m:
            return m.group(1)
    m = _last(_ANY_CASE, text)
    return m.group(1).upper() if m else None


def normalize_prediction(pred: str | None) -> str:
    """A prediction as the harness compares it with the gold letter."""
    return (pred or "UNKNOWN").strip().rstrip(".").upper()


def allowed_letters(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The option letters recovery may choose for a benchmark file: its sorted gold letters."""
    return sorted({str(r["gold"]).upper() for r in records if r.get("gold")})


def generation_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One generation's scores over its rows (``gold``, ``pred``, ``recovery_used``)."""
    preds = [normalize_prediction(r["pred"]) for r in rows]
    correct = sum(p == str(r["gold"]).upper() for p, r in zip(preds, rows))
    return {
        "accuracy": round(100.0 * correct / len(rows), 2) if rows else float("nan"),
        "recovery_used": sum(1 for r in rows if r.get("recovery_used", False)),
        "invalid_answers": sum(1 for p in preds if p == "UNKNOWN"),
        "sample_count": len(rows),
    }


def question_text(stem: str, options: Mapping[str, str]) -> str:
    """A question in the benchmark files' layout: the stem, then one ``X. text`` line per option."""
    return stem.strip() + "\n" + "\n".join(f"{k}. {v}" for k, v in options.items())


def _encode(tokenizer, text: str, **kw) -> list[int]:
    out = tokenizer.encode(text, **kw)
    return list(getattr(out, "ids", out))


@dataclass(frozen=True)
class Prompter:
    """Prompts, answer reading and recovery of one protocol for one model.

    ``template``: the model's chat template name (``"raw"`` for base models);
    ``family``: the model architecture (``"qwen3"`` or ``"llama"``), which
    picks the harness's recovery rule; ``lenient``: also read a leading
    ``X.`` when the protocol's extraction finds nothing (small policies'
    labels and rewards, never evaluation).
    """

    tokenizer: Any
    template: str
    family: str = "llama"
    protocol: str = "medssr"
    lenient: bool = False

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; known: {', '.join(PROTOCOLS)}")
        if self.family not in ("qwen3", "llama"):
            raise ValueError(f"unknown model family {self.family!r} (qwen3, llama)")

    @property
    def base(self) -> bool:
        return self.template == "raw"

    def _chat(self, messages: list[dict[str, str]]) -> str:
        return render_chat(messages, self.template, self.tokenizer)

    # --- prompts ---------------------------------------------------------------
    def prompt_text(self, question: str, options: Mapping[str, str] | None = None) -> str:
        """The prompt for a question. ``question`` is the full question text
        (stem and option lines, as the benchmark files store it); with
        ``options`` it is the stem and the option lines are added."""
        if self.protocol == "legacy":
            from medssr_jax.answers import parse_options
            from medssr_jax.evaluation import legacy_prompt
            stem, opts = (question, options) if options is not None else parse_options(question)
            return legacy_prompt(stem, opts, self.template)
        if options is not None:
            question = question_text(question, options)
        if self.base:
            return BASE_TEMPLATE.format(question=question)
        return self._chat([{"role": "system", "content": SYSTEM_MESSAGE},
                           {"role": "user", "content": question}])

    def encode(self, text: str) -> list[int]:
        """Prompt text -> token ids: the tokenizer's default special tokens (medssr, as
        a text prompt reaches vLLM); legacy: none but a default BOS."""
        if self.protocol == "legacy":
            from medssr_jax.evaluation import encode_prompt
            return encode_prompt(self.tokenizer, text)
        return _encode(self.tokenizer, text)

    def prompt_ids(self, question: str, options: Mapping[str, str] | None = None) -> list[int]:
        return self.encode(self.prompt_text(question, options))

    # --- answers ---------------------------------------------------------------
    def read(self, text: str | None, options: str | Sequence[str] | None = None) -> str | None:
        """The answer a completion states (``None`` when unreadable). ``options``
        restricts the legacy reading and the lenient fallback; the medssr
        reading takes any letter, as the harness does."""
        from medssr_jax.answers import extract_answer
        letters = "".join(options) if options else "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        if self.protocol == "legacy":
            return extract_answer(text, letters, lenient=self.lenient)
        pred = extract_option(text)
        if pred is None and self.lenient and text:
            pred = extract_answer(text.strip(), letters, lenient=True)
        return pred

    # --- recovery --------------------------------------------------------------
    def recovery_text(self, question: str, answer: str) -> str:
        """The harness's recovery prompt after the (stripped) completion ``answer``."""
        if self.base:
            stop = "" if answer.strip().endswith(".") else "."
            return BASE_TEMPLATE.format(question=question) + answer + stop + f"\n{RECOVERY_REQUEST}\n{ANSWER_CUE}"
        return self._chat([{"role": "system", "content": SYSTEM_MESSAGE},
                           {"role": "user", "content": question},
                           {"role": "assistant", "content": answer},
                           {"role": "user", "content": f"{RECOVERY_REQUEST} {ANSWER_CUE}"}])

    def biased_ids(self, letters: Sequence[str]) -> list[int]:
        """Token ids whose logits get :data:`LOGIT_BIAS` in recovery, as the harness
        computes them (first id of each letter's default encoding; Llama rule: also
        every id of ``"X."``)."""
        ids: set[int] = set()
        for letter in letters:
            ids.add(_encode(self.tokenizer, letter)[0])
            if self.family == "llama":
                ids.update(_encode(self.tokenizer, f"{letter}."))
        return sorted(ids)

    @property
    def recovery_tokens(self) -> int:
        return 1 if self.family == "qwen3" else 2


# --- biased greedy decoding ------------------------------------------------------

def biased_greedy(model, contexts: Sequence[Sequence[int]], biased: Sequence[Sequence[int]], *,
                  max_tokens: int, stop_ids: Sequence[int], bias: float = LOGIT_BIAS,
                  batch_size: int = 8, pad_id: int = 0) -> list[list[int]]:
    """Greedy continuation of each context by up to ``max_tokens`` tokens with
    ``bias`` added to the logits of that context's ``biased`` ids and the
    ``stop_ids`` barred from the first token (vLLM's ``min_tokens=1``); a stop
    token ends a continuation and is not returned."""
    from medssr_jax.evaluation import each_last_logits

    if not contexts:
        return []
    stops = np.asarray(sorted(set(stop_ids)), np.int64)
    outs: list[list[int]] = [[] for _ in contexts]
    live = list(range(len(contexts)))
    stop_set = set(stops.tolist())
    for step in range(max_tokens):
        picked: dict[int, int] = {}

        def use(row, logits, step=step):
            i = live[row]
            z = logits.copy()
            z[np.asarray(biased[i], np.int64)] += np.float32(bias)
            if step == 0 and stops.size:
                z[stops] = -np.inf
            picked[i] = int(np.argmax(z))
        each_last_logits(model, [list(contexts[i]) + outs[i] for i in live], use, batch_size=batch_size,
                         pad_id=pad_id)
        still = []
        for i in live:
            if picked[i] in stop_set:
                continue
            outs[i].append(picked[i])
            still.append(i)
        live = still
        if not live:
            break
    return outs
