"""Reasoning vs memorization classifier for MCQs, through the chat endpoint.

Each question (a seed :class:`~synth.synthesize.SeedQuestion`, a
:class:`~synth.synthesize.SynthItem` or a dict with ``question``/``options``)
is sent with a prompt asking whether answering it needs multi-step reasoning
or recall of a fact, to be answered with the tag ``<Reasoning>`` or
``<Memorization>``. :func:`parse_label` takes the last tag in the reply
(case-insensitive); a reply with neither tag is a parse failure: the label is
``None`` and the raw reply is kept -- it is never guessed.

Requests go through :class:`synth.synthesize.ChatCaller` (own retries,
``Retry-After``, budget). Results are appended to ``out_path`` (JSONL,
``{id, label, raw, error}``) keyed by question id, so a rerun skips ids
already classified; requests that failed after all retries are not written
and are retried by the next run.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from synth.synthesize import (DEFAULT_MODEL, Budget, ChatCaller, JsonlStore, _repair_tail,
                              make_client, read_jsonl)

__all__ = ["CLASSIFY_PROMPT", "LABELS", "build_classify_messages", "classify", "parse_label"]

LABELS = ("reasoning", "memorization")

CLASSIFY_PROMPT = (
    "Decide whether answering the following multiple-choice medical question mainly requires "
    "multi-step clinical reasoning (combining several findings, mechanisms or steps) or mainly "
    "recall of a single memorized fact.\n\n{question}\n\n"
    "Answer with exactly one tag: <Reasoning> or <Memorization>."
)

_TAG_RE = re.compile(r"<\s*(reasoning|memorization|memorisation)\s*>", re.IGNORECASE)


def parse_label(text: str | None) -> str | None:
    """``"reasoning"``, ``"memorization"`` (the last tag in ``text``) or ``None``."""
    if not text:
        return None
    tags = _TAG_RE.findall(text)
    if not tags:
        return None
    tag = tags[-1].lower()
    return "memorization" if tag.startswith("memori") else "reasoning"


def _fields(item: Any) -> tuple[str, str, Mapping[str, str]]:
    if isinstance(item, Mapping):
        ident = item.get("id") or item.get("key")
        return str(ident), item["question"], item["options"]
    ident = getattr(item, "id", None) or getattr(item, "key")
    return str(ident), item.question, item.options


def build_classify_messages(question: str, options: Mapping[str, str]) -> list[dict[str, str]]:
    text = question.strip() + "\n" + "\n".join(f"{k}. {v}" for k, v in options.items())
    return [{"role": "user", "content": CLASSIFY_PROMPT.format(question=text)}]


def classify(items: Sequence[Any], out_path: str | os.PathLike, *, model: str = DEFAULT_MODEL,
             base_url: str | None = None, api_key: str | None = None, client=None,
             workers: int = 8, timeout: float = 60.0, max_attempts: int = 6,
             backoff_base: float = 0.5, backoff_cap: float = 30.0, budget: Budget | None = None,
             temperature: float = 0.0, max_tokens: int = 16, sleep=None) -> dict[str, Any]:
    """Classify ``items`` (see the module docstring); returns a summary with
    counts per label (``None`` counted as ``"unparsed"``), failures and
    whether the budget stopped the run."""
    import time

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _repair_tail(out_path)
    done = {r["id"] for r in read_jsonl(out_path)}
    if client is None:
        client = make_client(base_url=base_url, api_key=api_key, timeout=timeout)
    budget = budget or Budget()
    caller = ChatCaller(client, model=model, temperature=temperature, max_tokens=max_tokens,
                        json_mode=False, max_attempts=max_attempts, backoff_base=backoff_base,
                        backoff_cap=backoff_cap, budget=budget, sleep=sleep or time.sleep)
    store = JsonlStore(out_path)
    counts: Counter = Counter()
    lock = threading.Lock()

    def work(item) -> None:
        ident, question, options = _fields(item)
        if ident in done or caller.stop_event.is_set():
            with lock:
                counts["skipped"] += 1
            return
        res = caller.call(build_classify_messages(question, options), key=f"filter:{ident}")
        if res.status == "ok":
            label = parse_label(res.text)
            store.append({"id": ident, "label": label, "raw": res.text, "error": None})
            with lock:
                counts[label or "unparsed"] += 1
        elif res.status == "rejected":
            store.append({"id": ident, "label": None, "raw": None, "error": res.error})
            with lock:
                counts["unparsed"] += 1
        else:
            with lock:
                counts[res.status] += 1

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(work, items))
    finally:
        store.close()
    return {"counts": dict(counts), "stopped": budget.exhausted,
            "requests": caller.usage["requests"]}


def load_labels(path: str | os.PathLike) -> dict[str, str | None]:
    """``{id: label}`` from a classification file."""
    return {r["id"]: r["label"] for r in read_jsonl(path)}


if __name__ == "__main__":  # pragma: no cover
    import argparse

    ap = argparse.ArgumentParser(description="classify MCQs as reasoning or memorization")
    ap.add_argument("inputs", help="JSONL with id/key, question, options")
    ap.add_argument("out")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args()
    print(json.dumps(classify(read_jsonl(args.inputs), args.out, model=args.model,
                              workers=args.workers), indent=2))
