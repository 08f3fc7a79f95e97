"""Pseudo-labels for unlabelled MCQs by self-consistency voting of the policy.

For every item, ``n`` completions are sampled with
:func:`medssr_jax.sampler.generate` from the protocol's prompt
(:class:`medssr_jax.protocol.Prompter`: under the default ``medssr``
protocol the evaluation harness's prompt, so votes are cast on the prompt
the policy is evaluated on); each completion's answer is read by the same
protocol (:meth:`Prompter.read`) and :func:`medssr_jax.answers.majority_vote`
over the item's option letters gives the label, its confidence (votes for
the label / n, unreadable answers and letters that are no option included in
n), the votes per option and the number of unreadable answers. Ties go to the
letter that appears first in sample order (the ``majority_vote`` rule). With
``recover=True`` an unreadable answer is read as the evaluation reads one:
``medssr``, the harness's logit-biased greedy decode after its recovery
prompt, biased towards the item's option letters; ``legacy``, one greedy
token after ``prompt + completion + "The answer is "`` restricted to them.
Such votes are counted in ``n_recovered``. An item whose answers are all
unreadable has label ``None`` and confidence 0 and is always dropped.

Keep rule: ``keep="gt"`` (the paper: confidence *exceeds* the threshold) or
``"ge"`` (confidence >= threshold).

Outputs in ``out_dir`` (when given):

``pseudo_labelled.jsonl``  kept items: ``{id, question, options, label,
                           confidence, counts, n, n_unparseable,
                           unparseable_share, intended_answer, answers}``
``pseudo_label_votes.jsonl``  the same record for every item, with ``kept``
``label_summary.json``     ``{items, kept, dropped, dropped_no_label,
                           threshold, keep, n, label_distribution (kept items),
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

from medssr_jax.answers import majority_vote
from medssr_jax.atomic import atomic_open, write_text_atomic
from medssr_jax.protocol import Prompter, biased_greedy, normalize_prediction, question_text

__all__ = ["KEEP_RULES", "LabelledItem", "keeps", "pseudo_label", "summarize"]

KEEP_RULES = ("gt", "ge")


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


class _Codec:
    """A tokenizer stand-in over an ``(encode, decode)`` pair (no chat template)."""

    chat_template = None
    bos_token_id = None
    pad_token_id = None

    def __call__(self, text: str, **_) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text)}

    def __init__(self, encode: Callable[[str], Sequence[int]], decode: Callable[[Sequence[int]], str]):
        self._encode, self._decode = encode, decode

    def encode(self, text: str, **_) -> list[int]:
        return list(self._encode(text))

    def decode(self, tokens: Sequence[int], **_) -> str:
        return self._decode(list(tokens))


def keeps(label: str | None, confidence: float, threshold: float, keep: str = "gt") -> bool:
    """Whether a vote's label is kept under the keep rule."""
    if keep not in KEEP_RULES:
        raise ValueError(f"keep must be one of {KEEP_RULES}, got {keep!r}")
    if label is None:
        return False
    return confidence > threshold if keep == "gt" else confidence >= threshold


def summarize(records: Sequence[LabelledItem], threshold: float, n: int, keep: str = "gt") -> dict[str, Any]:
    kept = [r for r in records if r.kept]
    total_answers = sum(r.n for r in records)
    with_intended = [r for r in kept if r.intended_answer is not None]
    return {
        "items": len(records),
        "kept": len(kept),
        "dropped": len(records) - len(kept),
        "dropped_no_label": sum(r.label is None for r in records),
        "threshold": threshold,
        "keep": keep,
        "n": n,
        "label_distribution": dict(sorted(Counter(r.label for r in kept).items())),
        "mean_confidence": (sum(r.confidence for r in records) / len(records)) if records else 0.0,
        "unparseable_share": (sum(r.n_unparseable for r in records) / total_answers) if total_answers else 0.0,
        "recovered_share": (sum(r.n_recovered for r in records) / total_answers) if total_answers else 0.0,
        "agreement_with_intended": (sum(r.label == r.intended_answer for r in with_intended)
                                    / len(with_intended)) if with_intended else None,
    }


def pseudo_label(model, tokenizer, items: Sequence[Any], *, n: int = 8, threshold: float = 0.75,
                 keep: str = "gt", template: str | None = None, protocol: str = "medssr",
                 prompter: Prompter | None = None, max_new_tokens: int = 512, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                 eos_ids: Sequence[int] | None = None, batch_size: int = 16,
                 out_dir: str | os.PathLike | None = None,
                 generate_fn: Callable[..., Any] | None = None,
                 recover: bool = False, lenient: bool = False) -> tuple[list[LabelledItem], dict]:
    """Label ``items`` (dicts / SynthItem / SeedQuestion with question and
    options) by majority vote over ``n`` samples; see the module docstring.

    ``tokenizer``: a tokenizer object or an ``(encode, decode)`` pair.
    ``prompter`` (else one of ``protocol`` is built from the tokenizer,
    ``template`` (default: the model config's chat template), the model's
    family and ``lenient``) gives prompts, answer reading and recovery.
    ``generate_fn`` replaces the sampler (same signature as
    :func:`medssr_jax.sampler.generate`). Returns ``(records, summary)``.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if keep not in KEEP_RULES:
        raise ValueError(f"keep must be one of {KEEP_RULES}, got {keep!r}")
    if n < 1 or batch_size < 1:
        raise ValueError("n and batch_size must be >= 1")
    if generate_fn is None:
        from medssr_jax.sampler import generate as generate_fn
    cfg = getattr(model, "config", None)
    eos = list(eos_ids if eos_ids is not None else getattr(cfg, "eos_token_ids", ()))
    if prompter is None:
        if recover and isinstance(tokenizer, tuple):
            raise ValueError("recover=True needs a tokenizer object, not an (encode, decode) pair")
        tok = _Codec(*tokenizer) if isinstance(tokenizer, tuple) else tokenizer
        prompter = Prompter(tok, template or getattr(cfg, "chat_template", None) or "raw",
                            family=getattr(cfg, "family", None) or "llama", protocol=protocol, lenient=lenient)
    tok = prompter.tokenizer

    def decode(tokens: Sequence[int]) -> str:
        return tok.decode(list(tokens), skip_special_tokens=True)

    fields = [_fields(it) for it in items]
    letter_tokens = None
    if recover and prompter.protocol == "legacy":
        from medssr_jax.evaluation import option_letter_ids
        letter_tokens = option_letter_ids(tok, "".join(sorted({k for _, _, o, _ in fields for k in o})))
    max_len = int(getattr(cfg, "max_position_embeddings", 0) or 1 << 30)
    pad_id = int(getattr(tok, "pad_token_id", None) or 0)
    from medssr_jax.progress import progress_bar
    bar = progress_bar(len(fields), "labels", unit="q")
    records: list[LabelledItem] = []
    for b, start in enumerate(range(0, len(fields), batch_size)):
        chunk = fields[start:start + batch_size]
        prompts = [prompter.prompt_ids(q, opts) for _, q, opts, _ in chunk]
        groups = generate_fn(model, prompts, n=n, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, top_k=top_k, seed=seed + b,
                             eos_ids=eos)
        answers_of, pending = [], []  # pending: (row, vote, recovery context, letters)
        for row, ((_, q, opts, _), prompt, group) in enumerate(zip(chunk, prompts, groups, strict=True)):
            letters = "".join(opts)
            answers = []
            for v, c in enumerate(group):
                toks = list(c.tokens)
                while toks and toks[-1] in eos:
                    toks.pop()
                text = decode(toks)
                answers.append(prompter.read(text, letters))
                if answers[-1] is None and recover:
                    if letter_tokens is not None:
                        from medssr_jax.evaluation import recovery_context
                        ctx = recovery_context(prompt, c.tokens, letter_tokens.suffix_ids, max_len, eos)
                    else:
                        ctx = prompter.encode(prompter.recovery_text(question_text(q, opts), text.strip()))
                    pending.append((row, v, ctx, letters))
            answers_of.append(answers)
        recovered = Counter()
        if pending:
            if letter_tokens is not None:
                from medssr_jax.evaluation import recover_letters
                read = recover_letters(model, [p[2] for p in pending], [p[3] for p in pending], letter_tokens,
                                       pad_id=pad_id)
            else:
                outs = biased_greedy(model, [p[2] for p in pending],
                                     [prompter.biased_ids(p[3]) for p in pending],
                                     max_tokens=prompter.recovery_tokens, stop_ids=eos, pad_id=pad_id)
                read = [normalize_prediction(decode(o)) for o in outs]
                read = [x if x in p[3] else None for x, p in zip(read, pending)]
            for (row, v, _, _), letter in zip(pending, read):
                answers_of[row][v] = letter
                recovered[row] += letter is not None
        for row, (ident, q, opts, intended) in enumerate(chunk):
            answers = answers_of[row]
            vote = majority_vote(answers, "".join(opts))
            records.append(LabelledItem(
                id=ident, question=q, options=opts, label=vote.label, confidence=vote.confidence,
                counts=vote.counts, n=vote.n, n_unparseable=vote.n_unparseable,
                unparseable_share=vote.n_unparseable / vote.n if vote.n else 0.0,
                kept=keeps(vote.label, vote.confidence, threshold, keep),
                n_recovered=recovered[row], answers=answers, intended_answer=intended))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    summary = summarize(records, threshold, n, keep)
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
