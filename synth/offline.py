"""Offline question generator: phenotype-to-diagnosis MCQs from the HPO graph.

No endpoint is needed. For item ``i`` of a run with seed ``s``, a
``random.Random`` seeded from ``(s, i)`` picks a disease (among those with at
least ``min_phenotypes`` annotated phenotypes) and presents 3-6 of its
phenotypes in a vignette-like stem. Phenotypes are drawn without replacement
with weights equal to their annotated frequency (a missing frequency counts
as 0.5), so frequent ones are preferred. The correct option is the disease's
name; the 3-4 distractors are the other diseases with the highest phenotype
overlap (Jaccard similarity of their HPO id sets; ties broken by disease id),
i.e. hard distractors. Option order is shuffled by the same RNG.

Output is :class:`synth.synthesize.SynthItem` with generator ``offline-hpo``
in the provenance; the same inputs and seed give the same items.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medssr_jax.atomic import atomic_open
from synth.synthesize import LETTERS, SynthItem

__all__ = ["GENERATOR", "generate_for_plan", "generate_offline", "jaccard", "phenotype_ids", "write_offline"]

GENERATOR = "offline-hpo"
DEFAULT_FREQUENCY = 0.5


def phenotype_ids(disease) -> frozenset[str]:
    return frozenset(p.hpo_id for p in disease.phenotypes)


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    union = a | b
    return len(a & b) / len(union) if union else 0.0


def _weighted_sample(rng: random.Random, items: Sequence, weights: Sequence[float], k: int) -> list:
    items, weights = list(items), [max(float(w), 1e-6) for w in weights]
    out = []
    for _ in range(min(k, len(items))):
        j = rng.choices(range(len(items)), weights=weights)[0]
        out.append(items.pop(j))
        weights.pop(j)
    return out


def _lc(name: str) -> str:
    """Lower-case the first letter unless the word looks like an acronym."""
    return name if name[:2].isupper() else name[:1].lower() + name[1:]


def _stem(rng: random.Random, names: Sequence[str], onset: Sequence[str]) -> str:
    who = rng.choice(["A patient", "A child", "An adolescent", "A young adult", "An adult"])
    if onset:
        who += f" with {_lc(onset[0]).replace(' onset', '')} onset of symptoms"
    names = [_lc(n) for n in names]
    findings = f"{', '.join(names[:-1])} and {names[-1]}" if len(names) > 1 else names[0]
    return f"{who} is evaluated for {findings}. Which diagnosis best explains these findings?"


def _prepare(diseases, n_options: int, min_phenotypes: int, max_phenotypes: int):
    if n_options not in (4, 5):
        raise ValueError("n_options must be 4 or 5")
    if not 3 <= min_phenotypes <= max_phenotypes:
        raise ValueError("need 3 <= min_phenotypes <= max_phenotypes")
    if diseases is None:
        from synth.knowledge import load_diseases
        diseases = load_diseases()
    diseases = sorted(diseases, key=lambda d: d.id)
    names = [d.name for d in diseases]
    if len(set(n.strip().lower() for n in names)) != len(names):
        # distinct options need distinct names: keep the first disease of each name
        seen, kept = set(), []
        for d in diseases:
            k = d.name.strip().lower()
            if k not in seen:
                seen.add(k)
                kept.append(d)
        diseases = kept
    if len(diseases) < n_options:
        raise ValueError(f"need at least {n_options} diseases with distinct names")
    ids = [phenotype_ids(d) for d in diseases]
    eligible = [i for i, d in enumerate(diseases) if len(ids[i]) >= min_phenotypes]
    if not eligible:
        raise ValueError(f"no disease has {min_phenotypes} or more phenotypes")
    return diseases, ids, eligible


def _item(diseases, ids, t: int, rng: random.Random, key: str, prov: dict[str, Any], *,
          n_options: int, min_phenotypes: int, max_phenotypes: int) -> SynthItem:
    """The MCQ whose answer is ``diseases[t]`` (see the module docstring)."""
    target = diseases[t]
    phen = sorted({p.hpo_id: p for p in target.phenotypes}.values(), key=lambda p: p.hpo_id)
    k = rng.randint(min_phenotypes, min(max_phenotypes, len(phen)))
    shown = _weighted_sample(rng, phen, [DEFAULT_FREQUENCY if p.frequency is None else p.frequency
                                         for p in phen], k)
    overlap = sorted(((jaccard(ids[t], ids[j]), diseases[j].id, j)
                      for j in range(len(diseases)) if j != t), key=lambda x: (-x[0], x[1]))
    distractors = [j for _, _, j in overlap[:n_options - 1]]
    choice_idx = [t] + distractors
    rng.shuffle(choice_idx)
    options = {LETTERS[n]: diseases[j].name for n, j in enumerate(choice_idx)}
    answer = LETTERS[choice_idx.index(t)]
    question = _stem(rng, [p.name for p in shown], tuple(getattr(target, "onset", ()) or ()))
    prov = dict(prov, generator=GENERATOR, disease_id=target.id,
                phenotype_ids=[p.hpo_id for p in shown],
                distractor_ids=[diseases[j].id for j in distractors],
                distractor_jaccard=[round(jaccard(ids[t], ids[j]), 4) for j in distractors],
                pmids=list(getattr(target, "pmids", ()) or ()))
    return SynthItem(key=key, question=question, options=options, intended_answer=answer, provenance=prov)


def generate_offline(diseases: Sequence | None = None, n_items: int = 100, *, seed: int = 0,
                     n_options: int = 5, min_phenotypes: int = 3, max_phenotypes: int = 6
                     ) -> list[SynthItem]:
    """``n_items`` MCQs (see the module docstring). ``diseases`` default to
    :func:`synth.knowledge.load_diseases`; ``n_options`` is 4 or 5."""
    diseases, ids, eligible = _prepare(diseases, n_options, min_phenotypes, max_phenotypes)
    items = []
    for i in range(n_items):
        rng = random.Random(f"{seed}:{i}")
        t = eligible[rng.randrange(len(eligible))]
        key = hashlib.sha256(json.dumps({"generator": GENERATOR, "seed": seed, "index": i,
                                         "disease": diseases[t].id}, sort_keys=True).encode()).hexdigest()[:32]
        items.append(_item(diseases, ids, t, rng, key, {"seed": seed, "index": i}, n_options=n_options,
                           min_phenotypes=min_phenotypes, max_phenotypes=max_phenotypes))
    return items


def generate_for_plan(specs: Sequence, diseases: Sequence, retriever=None, *, k_docs: int = 3,
                      n_options: int = 5, min_phenotypes: int = 3, max_phenotypes: int = 6,
                      seeds: Sequence | None = None) -> list[SynthItem]:
    """One MCQ per planned prompt (:func:`synth.synthesize.plan_prompts`), the
    offline stand-in for the LLM generator.

    A prompt with a rare-disease entity (the share ``alpha`` of the plan)
    retrieves the ``k_docs`` profiles nearest to the entity name, as API
    synthesis does for its knowledge block, and asks about the best-ranked
    retrieved disease. A prompt without one is built from its pair of seed
    questions (``seeds``, :class:`synth.synthesize.SeedQuestion`): the first
    seed's stem and options with one distractor replaced by the second
    seed's correct option (or its last option when it has no answer),
    shuffled by a ``random.Random`` seeded from the prompt's key; the first
    seed's answer is the intended answer. Without ``seeds`` such a prompt
    asks about a disease drawn by that RNG (earlier behaviour). Items carry
    the prompt's key and the provenance fields of API synthesis (seed ids,
    entity, retrieved doc ids and scores, rho, index), so the outputs of both
    generators read alike.
    """
    diseases, ids, eligible = _prepare(diseases, n_options, min_phenotypes, max_phenotypes)
    by_id = {d.id: i for i, d in enumerate(diseases)}
    eligible_set = set(eligible)
    seed_of = {s.id: s for s in seeds or ()}
    missing = sorted({i for s in specs if s.entity is None and seeds is not None for i in s.seed_ids} - set(seed_of))
    if missing:
        raise ValueError(f"planned prompts name seed questions that were not given: {missing[:5]}")
    rare = [s for s in specs if s.entity is not None]
    if rare and retriever is None:
        raise ValueError("prompts with a rare-disease entity need a retriever")
    hits = dict(zip((s.key for s in rare),
                    retriever.retrieve_batch([s.entity for s in rare], k_docs) if rare else []))
    items = []
    for spec in specs:
        rng = random.Random(spec.key)
        prov: dict[str, Any] = {"seed_ids": list(spec.seed_ids), "entity": spec.entity, "rho": spec.rho,
                                "index": spec.index, "retrieved_doc_ids": [], "retrieved_scores": []}
        if spec.entity is None and seeds is not None:
            items.append(_seed_item([seed_of[i] for i in spec.seed_ids], rng, spec.key, prov))
            continue
        t = None
        if spec.entity is not None:
            docs = hits[spec.key]
            prov.update(retrieved_doc_ids=[d.get("id") for d, _ in docs],
                        retrieved_scores=[round(float(sc), 4) for _, sc in docs])
            t = next((by_id[d["id"]] for d, _ in docs if by_id.get(d.get("id")) in eligible_set), None)
        if t is None:
            t = eligible[rng.randrange(len(eligible))]
        items.append(_item(diseases, ids, t, rng, spec.key, prov, n_options=n_options,
                           min_phenotypes=min_phenotypes, max_phenotypes=max_phenotypes))
    return items


def _seed_item(pair: Sequence, rng: random.Random, key: str, prov: dict[str, Any]) -> SynthItem:
    """A question from a pair of seed questions, without knowledge (see :func:`generate_for_plan`)."""
    first, second = pair[0], pair[-1]
    texts = list(first.options.values())
    correct = first.options.get(first.answer) if first.answer else None
    borrowed = second.options.get(second.answer) if second.answer else list(second.options.values())[-1]
    wrong = [j for j, t in enumerate(texts) if t != correct]
    if borrowed and borrowed not in texts and wrong:
        texts[wrong[rng.randrange(len(wrong))]] = borrowed
    rng.shuffle(texts)
    letters = "ABCDEFGHIJ"
    options = {letters[n]: t for n, t in enumerate(texts)}
    answer = letters[texts.index(correct)] if correct in texts else None
    prov = dict(prov, generator=GENERATOR + "-seeds", borrowed_option=borrowed)
    return SynthItem(key=key, question=first.question, options=options, intended_answer=answer, provenance=prov)


def write_offline(items: Sequence[SynthItem], path: str | os.PathLike) -> Path:
    """Write items as JSONL (the format of ``synthetic.jsonl``), atomically."""
    path = Path(path)
    with atomic_open(path) as f:
        for it in items:
            f.write(json.dumps(it.to_dict(), ensure_ascii=False, sort_keys=True) + "\n")
    return path
