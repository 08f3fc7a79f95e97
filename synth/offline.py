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

from synth.synthesize import LETTERS, SynthItem

__all__ = ["GENERATOR", "generate_offline", "jaccard", "phenotype_ids", "write_offline"]

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


def generate_offline(diseases: Sequence | None = None, n_items: int = 100, *, seed: int = 0,
                     n_options: int = 5, min_phenotypes: int = 3, max_phenotypes: int = 6
                     ) -> list[SynthItem]:
    """``n_items`` MCQs (see the module docstring). ``diseases`` default to
    :func:`synth.knowledge.load_diseases`; ``n_options`` is 4 or 5."""
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
    items = []
    for i in range(n_items):
        rng = random.Random(f"{seed}:{i}")
        t = eligible[rng.randrange(len(eligible))]
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
        prov: dict[str, Any] = {
            "generator": GENERATOR, "seed": seed, "index": i, "disease_id": target.id,
            "phenotype_ids": [p.hpo_id for p in shown],
            "distractor_ids": [diseases[j].id for j in distractors],
            "distractor_jaccard": [round(jaccard(ids[t], ids[j]), 4) for j in distractors],
            "pmids": list(getattr(target, "pmids", ()) or ()),
        }
        key = hashlib.sha256(json.dumps({"generator": GENERATOR, "seed": seed, "index": i,
                                         "disease": target.id}, sort_keys=True).encode()).hexdigest()[:32]
        items.append(SynthItem(key=key, question=question, options=options, intended_answer=answer,
                               provenance=prov))
    return items


def write_offline(items: Sequence[SynthItem], path: str | os.PathLike) -> Path:
    """Write items as JSONL (the format of ``synthetic.jsonl``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it.to_dict(), ensure_ascii=False, sort_keys=True) + "\n")
    return path
