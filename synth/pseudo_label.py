"""Pseudo-labels for unlabelled MCQs by self-consistency voting of the policy.

For every item, ``n`` completions are sampled with
:func:`medssr_jax.sampler.generate` from the prompt ``INSTRUCTION + question +
options`` rendered with the model's chat template; each completion's answer
is read with :func:`medssr_jax.answers.extract_answer` (restricted to the
item's option letters) and :func:`medssr_jax.answers.majority_vote` gives the
label, its confidence (votes for the label / n, unparseable answers
included in n), the votes per option and the number of unparseable answers.
Ties go to the letter that appears first in sample order (the
``majority_vote`` rule). With ``recover=True`` an unreadable answer is read
as the evaluation protocol reads one (:mod:`medssr_jax.evaluation`): one
greedy token after ``prompt + completion + "The answer is "``, restricted to
the item's option letters; such votes are counted in ``n_recovered``. An item whose answers are all unparseable has label
``None`` and confidence 0 and is always dropped. An item is kept when
``confidence >= threshold``.

Outputs in ``out_dir`` (when given):

``pseudo_labelled.jsonl``  kept items: ``{id, question, options, label,
                           confidence, counts, n, n_unparseable,
                           unparseable_share, intended_answer, answers}``
``pseudo_label_votes.jsonl``  the same record for every item, with ``kept``
``label_summary.json``     ``{items, kept, dropped, dropped_no_label,
                           threshold, n, label_distribution (kept items),
                           mean_confidence, unparseable_share,
                           agreement_with_intended (kept items that have one)}``

Prompts are sampled ``batch_size`` at a time; batch ``b`` uses sampler seed
``seed + b``, so results are deterministic given the seed and batch size.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medssr_jax.answers import extract_answer, majority_vote
from medssr_jax.atomic import atomic_open, write_text_atomic
from medssr_jax.chat import format_chat

__all__ = ["INSTRUCTION", "LabelledItem", "build_prompt", "pseudo_label", "summarize"]

INSTRUCTION = ("Answer the multiple-choice question. Think briefly, then finish with "
               "\"The answer is X\" where X is the letter of the correct option.")


@dataclass
class LabelledItem:
    id: str
    question: str
    options: dict[str, str]
    label: str | None
    confidence: float
    counts: dict[str, int]
    n: int
    n_unparseable: int
    unparseable_share: float
    kept: bool
    n_recovered: int = 0
    answers: list[str | None] = field(default_factory=list)
    intended_answer: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fields(item: Any) -> tuple[str, str, dict[str, str], str | None]:
    if isinstance(item, Mapping):
        return (str(item.get("id") or item.get("key")), item["question"], dict(item["options"]),
                item.get("intended_answer"))
    ident = getattr(item, "id", None) or getattr(item, "key")
    return str(ident), item.question, dict(item.options), getattr(item, "intended_answer", None)


def build_prompt(question: str, options: Mapping[str, str], template: str) -> str:
    body = question.strip() + "\n" + "\n".join(f"{k}. {v}" for k, v in options.items())
    return format_chat([{"role": "user", "content": f"{INSTRUCTION}\n\n{body}"}], template)


def _codec(tokenizer) -> tuple[Callable[[str], list[int]], Callable[[Sequence[int]], str]]:
    """(encode, decode) from a tokenizer object or an ``(encode, decode)`` pair."""
    if isinstance(tokenizer, tuple):
        enc, dec = tokenizer
        return (lambda s: list(enc(s))), (lambda t: dec(list(t)))

    def encode(text: str) -> list[int]:
        try:
            out = tokenizer.encode(text, add_special_tokens=False)
        except TypeError:
            out = tokenizer.encode(text)
        return list(getattr(out, "ids", out))

    def decode(tokens: Sequence[int]) -> str:
        try:
            return tokenizer.decode(list(tokens), skip_special_tokens=True)
        except TypeError:
            return tokenizer.decode(list(tokens))

    return encode, decode


def summarize(records: Sequence[LabelledItem], threshold: float, n: int) -> dict[str, Any]:
    kept = [r for r in records if r.kept]
    total_answers = sum(r.n for r in records)
    with_intended = [r for r in kept if r.intended_answer is not None]
    return {
        "items": len(records),
        "kept": len(kept),
        "dropped": len(records) - len(kept),
        "dropped_no_label": sum(r.label is None for r in records),
        "threshold": threshold,
        "n": n,
        "label_distribution": dict(sorted(Counter(r.label for r in kept).items())),
        "mean_confidence": (sum(r.confidence for r in records) / len(records)) if records else 0.0,
        "unparseable_share": (sum(r.n_unparseable for r in records) / total_answers) if total_answers else 0.0,
        "recovered_share": (sum(r.n_recovered for r in records) / total_answers) if total_answers else 0.0,
        "agreement_with_intended": (sum(r.label == r.intended_answer for r in with_intended)
                                    / len(with_intended)) if with_intended else None,
    }


def pseudo_label(model, tokenizer, items: Sequence[Any], *, n: int = 8, threshold: float = 0.75,
                 template: str | None = None, max_new_tokens: int = 512, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                 eos_ids: Sequence[int] | None = None, batch_size: int = 16,
                 out_dir: str | os.PathLike | None = None,
                 generate_fn: Callable[..., Any] | None = None,
                 recover: bool = False, lenient: bool = False) -> tuple[list[LabelledItem], dict]:
    """Label ``items`` (dicts / SynthItem / SeedQuestion with question and
    options) by majority vote over ``n`` samples; see the module docstring.

    ``tokenizer``: an object with ``encode``/``decode`` or an
    ``(encode, decode)`` pair. ``template`` defaults to the model config's
    chat template. ``generate_fn`` replaces the sampler (same signature as
    :func:`medssr_jax.sampler.generate`). Returns ``(records, summary)``.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if n < 1 or batch_size < 1:
        raise ValueError("n and batch_size must be >= 1")
    if generate_fn is None:
        from medssr_jax.sampler import generate as generate_fn
    cfg = getattr(model, "config", None)
    template = template or getattr(cfg, "chat_template", None) or "raw"
    eos = list(eos_ids if eos_ids is not None else getattr(cfg, "eos_token_ids", ()))
    encode, decode = _codec(tokenizer)
    fields = [_fields(it) for it in items]
    letter_tokens = None
    if recover:
        if isinstance(tokenizer, tuple):
            raise ValueError("recover=True needs a tokenizer object, not an (encode, decode) pair")
        from medssr_jax.evaluation import option_letter_ids
        letter_tokens = option_letter_ids(tokenizer, "".join(sorted({k for _, _, o, _ in fields for k in o})))
    max_len = int(getattr(cfg, "max_position_embeddings", 0) or 1 << 30)
    records: list[LabelledItem] = []
    for b, start in enumerate(range(0, len(fields), batch_size)):
        chunk = fields[start:start + batch_size]
        prompts = [encode(build_prompt(q, opts, template)) for _, q, opts, _ in chunk]
        groups = generate_fn(model, prompts, n=n, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, top_k=top_k, seed=seed + b,
                             eos_ids=eos)
        answers_of, pending = [], []  # pending: (row, vote, recovery context, letters)
        for row, ((_, _, opts, _), prompt, group) in enumerate(zip(chunk, prompts, groups, strict=True)):
            letters = "".join(opts)
            answers = []
            for v, c in enumerate(group):
                toks = list(c.tokens)
                while toks and toks[-1] in eos:
                    toks.pop()
                answers.append(extract_answer(decode(toks), letters, lenient=lenient))
                if answers[-1] is None and letter_tokens is not None:
                    from medssr_jax.evaluation import recovery_context
                    pending.append((row, v, recovery_context(prompt, c.tokens, letter_tokens.suffix_ids,
                                                             max_len, eos), letters))
            answers_of.append(answers)
        recovered = Counter()
        if pending:
            from medssr_jax.evaluation import recover_letters
            read = recover_letters(model, [p[2] for p in pending], [p[3] for p in pending], letter_tokens,
                                   pad_id=int(getattr(tokenizer, "pad_token_id", None) or 0))
            for (row, v, _, _), letter in zip(pending, read):
                answers_of[row][v] = letter
                recovered[row] += 1
        for row, (ident, q, opts, intended) in enumerate(chunk):
            answers = answers_of[row]
            vote = majority_vote(answers, "".join(opts))
            records.append(LabelledItem(
                id=ident, question=q, options=opts, label=vote.label, confidence=vote.confidence,
                counts=vote.counts, n=vote.n, n_unparseable=vote.n_unparseable,
                unparseable_share=vote.n_unparseable / vote.n if vote.n else 0.0,
                kept=vote.label is not None and vote.confidence >= threshold,
                n_recovered=recovered[row], answers=answers, intended_answer=intended))
    summary = summarize(records, threshold, n)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_open(out / "pseudo_labelled.jsonl") as f:
            for r in records:
                if r.kept:
                    d = r.to_dict()
                    d.pop("kept")
                    f.write(json.dumps(d, ensure_ascii=False) + "\n")
        with atomic_open(out / "pseudo_label_votes.jsonl") as f:
            for r in records:
                f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
        write_text_atomic(out / "label_summary.json", json.dumps(summary, indent=2))
    return records, summary
