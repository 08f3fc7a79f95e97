"""Multiple-choice benchmark evaluation with the MedSSR protocol.

    results = evaluate(model, tokenizer, {"medqa": records, ...}, template="qwen3")
    write_results(results, "runs/eval")

Protocol (defaults follow the MedSSR evaluation harness)
--------------------------------------------------------
1. Each question is rendered by :func:`build_prompt`: an instruction asking to
   reason and finish with ``The answer is X``, the question stem and one line
   ``X. text`` per option. Base models (template ``"raw"``) get the plain text
   followed by ``Answer:``; instruct models get it as one user turn of their
   chat template (:func:`medssr_jax.chat.format_chat`).
2. ``num_generations`` (4) completions are sampled per question at
   temperature 0.6, top-p 0.95, top-k 20, with at most 2048 new tokens, by
   :func:`medssr_jax.sampler.generate`.
3. The answer of a completion is read by
   :func:`medssr_jax.answers.extract_answer` against the question's own
   options: the last ``The answer is X`` / ``\\boxed{X}`` / ``[X]`` wins.
4. Recovery pass: a completion from which no answer can be read is
   continued by one greedy token after ``...\\nThe answer is `` with the choice
   restricted to the benchmark's option letters (the union of the option
   letters of its items, e.g. A-D for MedQA). Concretely the context is
   ``prompt tokens + completion tokens (EOS removed) + tokens of
   "\\nThe answer is "``, the completion cut from its end so that the context
   fits in ``recovery_max_len`` tokens (default: the model's context); one
   forward pass gives the logits at the last position, and the letter with the
   largest logit among the benchmark's letters is the prediction (ties: the
   earliest letter). Contexts are batched, left-padded.
5. The accuracy of generation ``g`` is the mean over a benchmark's items of
   ``prediction_g == gold``; the benchmark's accuracy is the mean over the
   generations, reported with the population standard deviation (ddof=0) of
   the per-generation accuracies.

Option-letter tokens (:func:`option_letter_ids`)
-------------------------------------------------
The letter token is found by asking the tokenizer how it encodes the text
``"\\nThe answer is X"`` compared with ``"\\nThe answer is "``:

* if the letter is one extra token after the unchanged encoding of the
  suffix (byte-level and character tokenizers: ``"X"``), the recovery context
  ends with the suffix's tokens, trailing space included, and the letter id is
  that extra token;
* if the tokenizer merges the trailing space into the letter (GPT-2-style
  byte-level BPE such as Qwen, Llama 3 and SmolLM2: ``" X"``), the context
  ends with the suffix *without* its final space token (``...The answer is``)
  and the letter id is the ``" X"`` token.

Either way the model scores exactly the token sequence the tokenizer would
produce for the text ``...The answer is X``. Any other behaviour (a letter
split in several tokens, letters that differ in structure, two letters sharing
a token) raises ``ValueError``.

Records are duck-typed: anything with ``.id``, ``.question`` (the stem),
``.options`` (``{"A": text, ...}`` in letter order) and ``.answer`` (gold
letter); ``.source`` is used when present.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medssr_jax.answers import extract_answer
from medssr_jax.chat import format_chat

__all__ = [
    "ANSWER_SUFFIX",
    "DEFAULT_INSTRUCTION",
    "LetterTokens",
    "build_prompt",
    "encode_prompt",
    "evaluate",
    "greedy_predictions",
    "option_letter_ids",
    "recover_letters",
    "recovery_context",
    "recovery_letters",
    "write_results",
]

DEFAULT_INSTRUCTION = (
    "Answer the following multiple-choice question. Think step by step, then finish "
    'your response with "The answer is X", where X is the letter of the correct option.'
)
ANSWER_SUFFIX = "\nThe answer is "


# --- prompts ------------------------------------------------------------------

def _question_block(record) -> str:
    options = record.options
    if not options:
        raise ValueError(f"record {getattr(record, 'id', '?')!r} has no options")
    lines = [str(record.question).strip(), ""]
    lines += [f"{letter}. {text}" for letter, text in options.items()]
    return "\n".join(lines)


def build_prompt(record, template: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The legacy prompt text for one question.

    ``instruction``, a blank line, the stem, a blank line and the options one
    per line (``A. text``). Template ``"raw"`` (base models) returns that text
    followed by ``"\\n\\nAnswer:"``; any other template renders it as the single
    user message of :func:`format_chat` with the generation prompt appended.
    """
    body = f"{instruction.strip()}\n\n{_question_block(record)}" if instruction else _question_block(record)
    if template == "raw":
        return body + "\n\nAnswer:"
    return format_chat([{"role": "user", "content": body}], template)


def legacy_prompt(stem: str, options: Mapping[str, str], template: str,
                  instruction: str = DEFAULT_INSTRUCTION) -> str:
    """:func:`build_prompt` of a question given as stem and options."""
    from types import SimpleNamespace
    return build_prompt(SimpleNamespace(id="?", question=stem, options=dict(options)), template, instruction)


def _adds_bos(tokenizer) -> int | None:
    """The BOS id the tokenizer puts in front of plain text by default, else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt: no special tokens added, except the tokenizer's
    default BOS when it has one and the text does not already start with it
    (chat templates such as ``llama3`` write it themselves)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = _adds_bos(tokenizer)
    if bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids


# --- the recovery pass --------------------------------------------------------

class LetterTokens:
    """How option letters follow :data:`ANSWER_SUFFIX` for one tokenizer.

    ``suffix_ids``: the tokens appended after the completion (the suffix's
    encoding, without its final space token when the tokenizer merges that
    space into the letter); ``ids``: letter -> token id; ``merged_space``:
    whether the letter tokens carry the leading space (``" X"``).
    """

    def __init__(self, suffix_ids: list[int], ids: dict[str, int], merged_space: bool):
        self.suffix_ids = suffix_ids
        self.ids = ids
        self.merged_space = merged_space

    def __repr__(self) -> str:
        return f"LetterTokens(suffix_ids={self.suffix_ids}, ids={self.ids}, merged_space={self.merged_space})"


def option_letter_ids(tokenizer, letters: str | Sequence[str] = "ABCDE",
                      suffix: str = ANSWER_SUFFIX) -> LetterTokens:
    """Token ids of the option letters as the tokenizer encodes them right after
    ``suffix`` (see the module docstring). Raises ``ValueError`` when a letter
    is not a single token there."""
    def enc(s):
        return list(tokenizer(s, add_special_tokens=False)["input_ids"])

    base = enc(suffix)
    ids: dict[str, int] = {}
    kinds = set()
    for letter in letters:
        full = enc(suffix + letter)
        if len(full) == len(base) + 1 and full[:-1] == base:
            kinds.add(False)
        elif len(full) == len(base) and full[:-1] == base[:-1] and suffix.endswith(" "):
            kinds.add(True)
        else:
            raise ValueError(
                f"option letter {letter!r} is not a single token after {suffix!r}: "
                f"{suffix + letter!r} encodes as {full}, {suffix!r} as {base}")
        ids[letter] = full[-1]
    if len(kinds) > 1:
        raise ValueError(f"option letters tokenize inconsistently after {suffix!r}: {ids}")
    if len(set(ids.values())) != len(ids):
        raise ValueError(f"two option letters share a token: {ids}")
    merged = kinds.pop() if kinds else False
    return LetterTokens(base[:-1] if merged else base, ids, merged)


def recovery_context(prompt_ids: Sequence[int], completion_ids: Sequence[int],
                     suffix_ids: Sequence[int], max_len: int,
                     eos_ids: Sequence[int] = ()) -> list[int]:
    """``prompt + completion + suffix`` with EOS tokens dropped from the
    completion and the completion cut from its end to fit ``max_len``."""
    eos = set(eos_ids)
    completion = [t for t in completion_ids if t not in eos]
    room = max_len - len(prompt_ids) - len(suffix_ids)
    if room < 0:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) plus answer suffix does not fit in {max_len} tokens")
    return list(prompt_ids) + completion[:room] + list(suffix_ids)


def recovery_letters(records: Sequence) -> str:
    """A benchmark's option letters: the sorted union of its items' options."""
    return "".join(sorted({letter for r in records for letter in r.options}))


@functools.cache
def _last_logits_fn():
    import jax
    from flax import nnx

    from models.transformer import forward_hidden, logits_from_hidden

    @functools.partial(jax.jit, static_argnames=("graphdef",))
    def last_logits(graphdef, state, tokens, mask):
        model = nnx.merge(graphdef, state)
        hidden = forward_hidden(model, tokens, mask)
        return logits_from_hidden(model, hidden[:, -1])  # left padding: the last column is real

    return last_logits


def _bucket(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def each_last_logits(model, contexts: Sequence[Sequence[int]], use: Callable[[int, np.ndarray], None], *,
                     batch_size: int = 8, length_bucket: int = 64, pad_id: int = 0) -> None:
    """Call ``use(i, logits)`` with the fp32 next-token logits ``[V]`` after each context.

    Contexts are sorted by length and left-padded into batches of ``batch_size``
    rows, lengths rounded up to a multiple of ``length_bucket`` (or of an eighth
    of the next power of two, when that is larger; shapes repeat, so the jitted
    forward is compiled a few times only); only the last position's logits are
    computed beyond the hidden states, and one batch's logits are on the host at
    a time."""
    import jax.numpy as jnp
    from flax import nnx

    if not contexts:
        return
    fn = _last_logits_fn()
    graphdef, state = nnx.split(model)
    order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        longest = max(len(contexts[i]) for i in idx)
        t = _bucket(longest, max(length_bucket, (1 << (longest - 1).bit_length()) // 8))
        tokens = np.full((batch_size, t), pad_id, np.int32)
        mask = np.zeros((batch_size, t), bool)
        for row, i in enumerate(idx):
            c = contexts[i]
            tokens[row, t - len(c):] = c
            mask[row, t - len(c):] = True
        mask[len(idx):, -1] = True  # filler rows: one token
        logits = np.asarray(fn(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask)), np.float32)
        for row, i in enumerate(idx):
            use(i, logits[row])


def restricted_argmax(model, contexts: Sequence[Sequence[int]], letter_ids: Sequence[Sequence[int]],
                      *, batch_size: int = 8, length_bucket: int = 64, pad_id: int = 0
                      ) -> tuple[list[int], np.ndarray | list]:
    """For each context, the index (into its ``letter_ids``) of the largest
    next-token logit among ``letter_ids`` (first on ties), and those logits
    (batching: :func:`each_last_logits`)."""
    choice: list[int] = [0] * len(contexts)
    scores: list = [None] * len(contexts)

    def use(i, logits):
        scores[i] = logits[list(letter_ids[i])]
        choice[i] = int(np.argmax(scores[i]))
    each_last_logits(model, contexts, use, batch_size=batch_size, length_bucket=length_bucket, pad_id=pad_id)
    return choice, scores


def recover_letters(model, contexts: Sequence[Sequence[int]], letter_sets: Sequence[str],
                    letter_tokens: LetterTokens, *, batch_size: int = 8, pad_id: int = 0) -> list[str]:
    """The recovery pass: for each context (:func:`recovery_context`), the letter of its
    ``letter_sets`` entry whose token has the largest next-token logit."""
    choice, _ = restricted_argmax(model, contexts, [[letter_tokens.ids[x] for x in ls] for ls in letter_sets],
                                  batch_size=batch_size, pad_id=pad_id)
    return [ls[j] for ls, j in zip(letter_sets, choice)]


# --- evaluation ---------------------------------------------------------------

def _default_eos(model, tokenizer, template: str) -> list[int]:
    ids = list(getattr(model.config, "eos_token_ids", ()) or ())
    try:
        from medssr_jax.tokenizers import stop_token_ids

        ids += [i for i in stop_token_ids(tokenizer, template) if i not in ids]
    except ValueError:
        pass
    return ids


def _sampler_generate(model, prompts, **kw):
    from medssr_jax.sampler import generate

    return generate(model, prompts, **kw)


def evaluate(model, tokenizer, records_by_benchmark: Mapping[str, Sequence], *, template: str,
             num_generations: int = 4, temperature: float = 0.6, top_p: float = 0.95,
             top_k: int = 20, max_new_tokens: int = 2048, seed: int = 0,
             eos_ids: Sequence[int] | None = None, batch_size: int = 32,
             instruction: str = DEFAULT_INSTRUCTION, recover: bool = True,
             recovery_batch_size: int = 8, recovery_max_len: int | None = None,
             keep_texts: bool = False, generate_fn: Callable | None = None,
             progress: bool | Callable | None = None) -> dict[str, Any]:
    """Evaluate ``model`` on multiple-choice benchmarks (protocol: module docstring).

    ``records_by_benchmark``: benchmark name -> records. ``batch_size``:
    prompts per sampler call (each sampled ``num_generations`` times); prompts
    of all benchmarks are sorted by length before batching. ``eos_ids``:
    default the model config's EOS plus the template's stop tokens.
    When a prompt plus ``max_new_tokens`` exceeds the model's context, that
    batch's budget is reduced to fit (counted in
    ``results["config"]["clipped_batches"]``). ``generate_fn`` replaces
    :func:`medssr_jax.sampler.generate` (same signature; for tests).
    ``keep_texts`` stores each completion's decoded text in the items.

    Returns ``{"config": {...}, "benchmarks": {name: {"n", "accuracy_mean",
    "accuracy_std", "accuracy_per_generation", "unreadable", "unreadable_rate",
    "recovered", "recovered_correct", "letters", "items": [...]}}}``; each item
    is ``{"id", "source", "gold", "options", "predictions", "recovered",
    "correct", "lengths", "finish_reasons"}`` (+ ``"texts"``), one list entry per
    generation. Accuracies are fractions in [0, 1]; ``unreadable_rate`` is the
    share of generations with no readable answer before recovery.
    """
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    gen = generate_fn or _sampler_generate
    eos = list(_default_eos(model, tokenizer, template) if eos_ids is None else eos_ids)
    context = int(model.config.max_position_embeddings)
    max_len = int(recovery_max_len or context)
    t0 = time.perf_counter()

    # Flatten: (benchmark, index) per prompt.
    entries = []
    for name, records in records_by_benchmark.items():
        for k, r in enumerate(records):
            ids = encode_prompt(tokenizer, build_prompt(r, template, instruction))
            entries.append((name, k, ids))
    completions, stats = _generate_sorted(
        model, [e[2] for e in entries], gen, n=num_generations, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, eos=eos, batch_size=batch_size,
        progress=progress)
    clipped = stats.pop("clipped_batches")

    # Read answers.
    eos_set = set(eos)
    by_bench: dict[str, list[dict]] = {name: [None] * len(recs) for name, recs in records_by_benchmark.items()}
    letters_of = {name: recovery_letters(recs) for name, recs in records_by_benchmark.items() if recs}
    pending = []  # (item dict, generation, context, letters)
    letter_tokens = option_letter_ids(tokenizer, "".join(sorted(set("".join(letters_of.values()))))) \
        if (recover and letters_of) else None
    for i, (name, k, prompt_ids) in enumerate(entries):
        r = records_by_benchmark[name][k]
        options = "".join(r.options)
        item = dict(id=r.id, source=getattr(r, "source", name), gold=r.answer, options=options,
                    predictions=[], recovered=[], correct=[], lengths=[], finish_reasons=[])
        texts = []
        for g, c in enumerate(completions[i]):
            text = tokenizer.decode([t for t in c.tokens if t not in eos_set], skip_special_tokens=True)
            pred = extract_answer(text, options)
            item["predictions"].append(pred)
            item["recovered"].append(False)
            item["lengths"].append(len(c.tokens))
            item["finish_reasons"].append(getattr(c, "finish_reason", None))
            texts.append(text)
            if pred is None and letter_tokens is not None:
                ctx = recovery_context(prompt_ids, c.tokens, letter_tokens.suffix_ids, max_len, eos)
                pending.append((item, g, ctx, letters_of[name]))
        if keep_texts:
            item["texts"] = texts
        by_bench[name][k] = item

    tr = time.perf_counter()
    if pending:
        read = recover_letters(model, [p[2] for p in pending], [p[3] for p in pending], letter_tokens,
                               batch_size=recovery_batch_size,
                               pad_id=int(getattr(tokenizer, "pad_token_id", None) or 0))
        for (item, g, _, _), letter in zip(pending, read):
            item["predictions"][g] = letter
            item["recovered"][g] = True
    stats["recovery_seconds"] = time.perf_counter() - tr

    benchmarks = {}
    for name, items in by_bench.items():
        n = len(items)
        correct = np.zeros((n, num_generations), bool)
        unread = np.zeros((n, num_generations), bool)
        for row, item in enumerate(items):
            item["correct"] = [p == item["gold"] for p in item["predictions"]]
            correct[row] = item["correct"]
            unread[row] = item["recovered"] if recover else [p is None for p in item["predictions"]]
        per_gen = correct.mean(0) if n else np.full(num_generations, math.nan)
        benchmarks[name] = dict(
            n=n,
            accuracy_mean=float(per_gen.mean()),
            accuracy_std=float(per_gen.std()),
            accuracy_per_generation=[float(a) for a in per_gen],
            unreadable=int(unread.sum()),
            unreadable_rate=float(unread.mean()) if n else math.nan,
            recovered=int(sum(sum(it["recovered"]) for it in items)),
            recovered_correct=int((correct & unread).sum()) if recover else 0,
            letters=letters_of.get(name, ""),
            items=items,
        )
    stats["seconds"] = time.perf_counter() - t0
    config = dict(template=template, num_generations=num_generations, temperature=temperature,
                  top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, seed=seed, eos_ids=eos,
                  instruction=instruction, recover=recover, recovery_max_len=max_len,
                  answer_suffix=ANSWER_SUFFIX, clipped_batches=int(clipped),
                  letter_tokens=None if letter_tokens is None else dict(
                      ids=letter_tokens.ids, suffix_ids=letter_tokens.suffix_ids,
                      merged_space=letter_tokens.merged_space),
                  **stats)
    return dict(config=config, benchmarks=benchmarks)


def greedy_predictions(model, tokenizer, records: Sequence, *, template: str,
                       max_new_tokens: int = 2048, eos_ids: Sequence[int] | None = None,
                       batch_size: int = 32, instruction: str = DEFAULT_INSTRUCTION,
                       recover: bool = True, benchmark: str = "greedy", **kw) -> list[dict]:
    """One greedy (temperature 0) completion per record, read like :func:`evaluate`.

    Returns the items of :func:`evaluate` (with ``"texts"``), in record order;
    ``item["predictions"][0]`` is the answer. Meant for agreement checks
    against another implementation's greedy decoding (e.g. transformers'
    ``generate``) on the same prompt tokens (:func:`encode_prompt` of
    :func:`build_prompt`).
    """
    res = evaluate(model, tokenizer, {benchmark: list(records)}, template=template, num_generations=1,
                   temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                   batch_size=batch_size, instruction=instruction, recover=recover, keep_texts=True, **kw)
    return res["benchmarks"][benchmark]["items"]


# --- the MedSSR protocol (the authors' harness) -------------------------------

def _generate_sorted(model, prompts: Sequence[Sequence[int]], gen: Callable, *, n: int, max_new_tokens: int,
                     temperature: float, top_p: float, top_k: int, seed: int, eos: Sequence[int],
                     batch_size: int, progress) -> tuple[list, dict]:
    """``n`` completions per prompt, prompts sorted by length into batches of
    ``batch_size``; batch ``b`` samples with seed ``seed * 1_000_003 + b``. A
    batch whose longest prompt plus ``max_new_tokens`` exceeds the model's
    context gets a smaller budget (counted in ``clipped_batches``)."""
    from medssr_jax.progress import progress_bar

    context = int(model.config.max_position_embeddings)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    completions: list = [None] * len(prompts)
    stats = dict(generated_tokens=0, generate_seconds=0.0, clipped_batches=0)
    bar = progress_bar(len(prompts), "questions", enabled=progress is not False, unit="q")
    for b, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start:start + batch_size]
        batch = [prompts[i] for i in idx]
        budget = min(max_new_tokens, context - max(map(len, batch)))
        if budget < 1:
            raise ValueError(f"a prompt of {max(map(len, batch))} tokens leaves no room to generate "
                             f"in the model's context of {context}")
        stats["clipped_batches"] += int(budget < max_new_tokens)
        tg = time.perf_counter()
        out = gen(model, batch, n=n, max_new_tokens=budget, temperature=temperature, top_p=top_p, top_k=top_k,
                  seed=(seed * 1_000_003 + b) % (1 << 31), eos_ids=list(eos), progress=progress)
        stats["generate_seconds"] += time.perf_counter() - tg
        if len(out) != len(batch):
            raise RuntimeError(f"generate returned {len(out)} groups for {len(batch)} prompts")
        for i, group in zip(idx, out):
            if len(group) != n:
                raise RuntimeError(f"generate returned {len(group)} completions, expected {n}")
            completions[i] = group
            stats["generated_tokens"] += sum(len(c.tokens) for c in group)
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return completions, stats


def evaluate_medssr(model, prompter, files: Sequence, *, num_generations: int = 4, temperature: float = 0.6,
                    top_p: float = 0.95, top_k: int = 20, max_new_tokens: int = 2048, seed: int = 0,
                    eos_ids: Sequence[int] | None = None, batch_size: int = 32, recovery_batch_size: int = 8,
                    model_name: str = "model", generate_fn: Callable | None = None,
                    progress: bool | Callable | None = None) -> dict[str, Any]:
    """Evaluate ``model`` on benchmark files with the MedSSR harness's protocol
    (:mod:`medssr_jax.protocol`).

    ``prompter``: a :class:`medssr_jax.protocol.Prompter` of protocol
    ``medssr`` (its ``lenient`` reading is not used here). ``files``:
    :class:`medssr_jax.data.BenchmarkFile` objects (raw records, the file's
    allowed letters). Temperature 0 decodes greedily.

    Returns ``{"config": {...}, "benchmarks": {name: {...}}}``. Each benchmark
    holds the harness's scores (``per_generation`` with ``accuracy`` in
    percent, ``average_accuracy``, ``std_accuracy``), the same as fractions
    (``accuracy_mean``, ``accuracy_std``), the read bookkeeping of its file
    (``skipped``, ``duplicate_ids``), per-item predictions (``items``), and
    ``generations`` (one list of rows per generation, in the harness's layout
    and order) and ``log_entry`` (the harness's log record), which
    :func:`write_results` writes as ``<name>_gen<g>.json`` and appends to
    ``<name>.eval.log``.
    """
    from medssr_jax.protocol import biased_greedy, extract_option, generation_metrics, normalize_prediction

    if prompter.protocol != "medssr":
        raise ValueError(f"evaluate_medssr needs a medssr prompter, got protocol {prompter.protocol!r}")
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokenizer = prompter.tokenizer
    gen = generate_fn or _sampler_generate
    eos = list(_default_eos(model, tokenizer, prompter.template) if eos_ids is None else eos_ids)
    eos_set = set(eos)
    model_name = model_name.rstrip("/").split("/")[-1]  # as the harness names a model path
    t0 = time.perf_counter()

    entries = [(f, k, prompter.prompt_ids(r["question"])) for f, bf in enumerate(files)
               for k, r in enumerate(bf.records)]
    completions, stats = _generate_sorted(
        model, [e[2] for e in entries], gen, n=num_generations, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, eos=eos, batch_size=batch_size,
        progress=progress)

    # free generations: (file, record, generation) -> row; unreadable ones go to recovery
    rows: dict[tuple[int, int, int], dict] = {}
    pending = []  # (key, recovery context, biased ids)
    biased_of = {f: prompter.biased_ids(bf.letters) for f, bf in enumerate(files) if bf.letters}
    lengths, finish = {}, {}
    for (f, k, _), group in zip(entries, completions):
        r = files[f].records[k]
        for g, c in enumerate(group):
            answer = tokenizer.decode([t for t in c.tokens if t not in eos_set], skip_special_tokens=True).strip()
            pred = extract_option(answer)
            lengths[f, k, g], finish[f, k, g] = len(c.tokens), getattr(c, "finish_reason", None)
            row = dict(id=r["id"], name=r.get("name", "unknown"), gold=r["gold"], model=model_name,
                       generation_idx=g, answer=answer, pred=pred, recovery_used=False)
            rows[f, k, g] = row
            if pred is None and f in biased_of:
                ctx = prompter.encode(prompter.recovery_text(r["question"], answer))
                pending.append(((f, k, g), ctx, biased_of[f]))

    tr = time.perf_counter()
    if pending:
        pad = int(getattr(tokenizer, "pad_token_id", None) or 0)
        outs = biased_greedy(model, [p[1] for p in pending], [p[2] for p in pending],
                             max_tokens=prompter.recovery_tokens, stop_ids=eos,
                             batch_size=recovery_batch_size, pad_id=pad)
        for (key, _, _), toks in zip(pending, outs):
            recovered = tokenizer.decode(toks, skip_special_tokens=True).strip()
            row = rows[key]
            row.update(answer=row["answer"] + "\nThe answer is " + recovered, pred=recovered, recovery_used=True)
    stats["recovery_seconds"] = time.perf_counter() - tr
    stats["recovered_generations"] = len(pending)

    params = dict(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_new_tokens,
                  num_generations=num_generations, seed=seed)
    benchmarks = {}
    for f, bf in enumerate(files):
        n = len(bf.records)
        keys = [(f, k, g) for k in range(n) for g in range(num_generations)]
        # the harness's order: free generations in record order, then recovered ones
        ordered = [rows[key] for key in keys if not rows[key]["recovery_used"]] + \
                  [rows[key] for key in keys if rows[key]["recovery_used"]]
        generations = [[row for row in ordered if row["generation_idx"] == g] for g in range(num_generations)]
        per_gen = [dict(generation=g, **generation_metrics(rs)) for g, rs in enumerate(generations)]
        accs = [m["accuracy"] for m in per_gen]
        average = round(float(np.mean(accs)), 2) if n else math.nan
        std = round(float(np.std(accs)), 2) if n else math.nan
        items = []
        for k, r in enumerate(bf.records):
            preds = [normalize_prediction(rows[f, k, g]["pred"]) for g in range(num_generations)]
            items.append(dict(id=r["id"], gold=str(r["gold"]).upper(), predictions=preds,
                              recovered=[rows[f, k, g]["recovery_used"] for g in range(num_generations)],
                              correct=[p == str(r["gold"]).upper() for p in preds],
                              lengths=[lengths[f, k, g] for g in range(num_generations)],
                              finish_reasons=[finish[f, k, g] for g in range(num_generations)]))
        recovered = sum(sum(it["recovered"]) for it in items)
        benchmarks[bf.name] = dict(
            file=str(bf.path), n=n, allowed_letters=list(bf.letters), skipped=dict(bf.skipped),
            duplicate_ids=list(bf.duplicate_ids),
            per_generation=per_gen, average_accuracy=average, std_accuracy=std,
            accuracy_mean=average / 100 if n else math.nan, accuracy_std=std / 100 if n else math.nan,
            unreadable=recovered, unreadable_rate=recovered / (n * num_generations) if n else math.nan,
            recovered=recovered,
            recovered_correct=sum(c for it in items for c, rc in zip(it["correct"], it["recovered"]) if rc),
            items=items, generations=generations,
            log_entry=dict(dataset=bf.records[0].get("name", "unknown") if n else "unknown", model=model_name,
                           per_generation=per_gen, average_accuracy=average, std_accuracy=std,
                           num_generations=num_generations, total_records=n * num_generations,
                           params=params))
    stats["seconds"] = time.perf_counter() - t0
    config = dict(protocol="medssr", template=prompter.template, family=prompter.family,
                  chat_template_source="checkpoint" if getattr(tokenizer, "chat_template", None) else "built-in",
                  num_generations=num_generations, temperature=temperature, top_p=top_p, top_k=top_k,
                  max_new_tokens=max_new_tokens, seed=seed, eos_ids=eos, recovery_tokens=prompter.recovery_tokens,
                  model=model_name, **stats)
    return dict(config=config, benchmarks=benchmarks)


# --- reporting ----------------------------------------------------------------

def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def markdown_table(results: Mapping[str, Any]) -> str:
    """One row per benchmark: n, accuracy mean ± std (%), unreadable rate (%), and the
    records its file lost to read errors."""
    lines = ["| benchmark | n | accuracy (%) | unreadable (%) | skipped records |", "|---|---:|---:|---:|---:|"]
    for name, b in results["benchmarks"].items():
        skipped = sum((b.get("skipped") or {}).values())
        lines.append(f"| {name} | {b['n']} | {100 * b['accuracy_mean']:.2f} ± {100 * b['accuracy_std']:.2f} "
                     f"| {100 * b['unreadable_rate']:.2f} | {skipped} |")
    return "\n".join(lines) + "\n"


def write_results(results: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` (the :func:`markdown_table`) and
    ``accuracy.png`` (accuracy per benchmark, std error bars) into ``out_dir``.
    Returns the three paths by kind (``json``, ``markdown``, ``plot``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from medssr_jax.atomic import atomic_open, write_text_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = dict(json=out / "results.json", markdown=out / "results.md", plot=out / "accuracy.png")
    lean = dict(results, benchmarks={})
    for name, b in results["benchmarks"].items():
        b = dict(b)
        generations = b.pop("generations", None)
        log_entry = b.get("log_entry")
        if generations is not None:  # the harness's files, to diff against its outputs
            for g, rows in enumerate(generations):
                write_text_atomic(out / f"{name}_gen{g}.json",
                                   json.dumps(rows, indent=2, ensure_ascii=False, default=_json_default))
            with open(out / f"{name}.eval.log", "a", encoding="utf-8") as f:
                json.dump(log_entry, f, indent=2, ensure_ascii=False, default=_json_default)
                f.write("\n")
        lean["benchmarks"][name] = b
    write_text_atomic(paths["json"], json.dumps(lean, indent=1, default=_json_default) + "\n")
    write_text_atomic(paths["markdown"], markdown_table(results))

    names = list(results["benchmarks"])
    means = [100 * results["benchmarks"][n]["accuracy_mean"] for n in names]
    stds = [100 * results["benchmarks"][n]["accuracy_std"] for n in names]
    fig = Figure(figsize=(max(4.0, 1.1 * len(names) + 1.5), 3.6), dpi=120)
    FigureCanvasAgg(fig)  # Agg canvas; no pyplot, no global backend
    ax = fig.add_subplot()
    x = np.arange(len(names))
    ax.bar(x, means, yerr=stds, capsize=4, color="#4C72B0")
    for xi, m in zip(x, means):
        ax.text(xi, m + 1, f"{m:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, names, rotation=20 if len(names) > 4 else 0)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    n_gen = results.get("config", {}).get("num_generations")
    ax.set_title("Accuracy per benchmark" + (f" (mean ± std over {n_gen} generations)" if n_gen else ""),
                 fontsize=9)
    fig.tight_layout()
    with atomic_open(paths["plot"], "wb") as f:
        fig.savefig(f, format="png")
    return paths
