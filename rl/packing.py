"""Packed micro-batches: GRPO rows (prompt + response) packed by length into fixed-size rows.

A rollout row is its prompt followed by its response, with no padding in
between. Rows are sorted by length and packed first-fit-decreasing into pack
rows of `pack_len` tokens (at most `max_segments` sequences each); every
sequence keeps its own positions (0, 1, ...) and a segment id, so attention
never crosses sequences and the forward of a packed sequence is the forward of
the sequence alone. `rows_per_micro` pack rows make one micro-batch, and
micro-batches are stacked into arrays [max_micro, rows_per_micro, pack_len];
only the first `num_micro` are real, the train step and the reference pass
loop over exactly those (a dynamic trip count: no recompilation when the
number of micro-batches changes from step to step).

Per-token arrays are aligned with the *predicting* position: at position t,
`targets[t]` is the token at t + 1 and the loss/logprob entries describe that
token. A response token is scored where its predecessor (the last prompt token
or the previous response token) sits.

Loss. The GRPO loss of a mini-batch is numerator / D (rl.grpo.aggregate_terms).
The numerator is a sum over response tokens of weight * value, with weight 1
for token-mean and seq-mean-token-sum, 1 / n_b for seq-mean-token-mean and
1 / max_response_len for seq-mean-token-sum-norm; D is the token count or the
number of non-empty rows. Both are computed here from the unpacked rows, so the
packed loss is exactly the unpacked one (up to float summation order).

Balance across data shards: the micro-batch axis 1 is sharded over the mesh's
data axes; pack rows are dealt to (micro-batch, slot) in serpentine order of
decreasing load, so every shard of every micro-batch gets a similar number of
real tokens.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import numpy as np

from rl import grpo


class PackedBatch(NamedTuple):
    tokens: jax.Array        # [M, Bm, L] int32
    segment_ids: jax.Array   # [M, Bm, L] int32, 1.. per pack row, 0 = padding
    positions: jax.Array     # [M, Bm, L] int32, restarting at 0 in every sequence
    targets: jax.Array       # [M, Bm, L] int32, the next token
    response_mask: jax.Array  # [M, Bm, L] float: 1 where targets is a response token
    loss_weight: jax.Array   # [M, Bm, L] float: aggregation weight of that token (0 elsewhere)
    old_logp: jax.Array      # [M, Bm, L]
    ref_logp: jax.Array | None  # [M, Bm, L] or None when kl_coef == 0
    advantages: jax.Array    # [M, Bm, L]: the row's advantage on its response tokens
    num_micro: jax.Array     # int32 scalar: micro-batches in use (<= M)
    denominator: jax.Array   # float32 scalar: the loss denominator D of the whole mini-batch


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each unpacked row went: micro-batch, pack row, first token, prompt and response lengths."""
    micro: np.ndarray
    slot: np.ndarray
    start: np.ndarray
    prompt_len: np.ndarray
    response_len: np.ndarray
    num_micro: int
    max_micro: int
    rows_per_micro: int
    pack_len: int

    @property
    def real_tokens(self) -> int:
        return int((self.prompt_len + self.response_len).sum())

    @property
    def padded_tokens(self) -> int:
        return self.num_micro * self.rows_per_micro * self.pack_len


def token_weights(response_lens: np.ndarray, agg: str, max_response_len: int) -> tuple[np.ndarray, float]:
    """Per-row weight of each response token and the denominator D (see the module docstring)."""
    grpo._check_agg(agg)
    n = np.asarray(response_lens, np.float64)
    if agg == "token-mean":
        return np.ones_like(n), float(n.sum())
    nonempty = n > 0
    if agg == "seq-mean-token-sum":
        w = np.ones_like(n)
    elif agg == "seq-mean-token-mean":
        w = 1.0 / np.where(nonempty, n, 1.0)
    else:
        w = np.full_like(n, 1.0 / max_response_len)
    return w, float(nonempty.sum())


def plan_layout(lengths: Sequence[int], *, pack_len: int, rows_per_micro: int, max_segments: int,
                shards: int = 1, max_micro: int | None = None) -> tuple[list[list[int]], int]:
    """First-fit-decreasing bins of row indices (each bin at most pack_len tokens and
    max_segments rows), and the number of micro-batches they fill."""
    lengths = [int(x) for x in lengths]
    if rows_per_micro < 1 or rows_per_micro % shards:
        raise ValueError(f"rows_per_micro={rows_per_micro} must be a positive multiple of the "
                         f"{shards} data shards (GRPOPlan.rows_per_micro)")
    for i, n in enumerate(lengths):
        if n > pack_len:
            raise ValueError(f"row {i} has {n} tokens > pack_len={pack_len}; raise the plan's pack_len "
                             f"to at least max_prompt_len + max_new_tokens")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if free >= lengths[i] and len(bins[b]) < max_segments:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(pack_len - lengths[i])
    num_micro = max(1, -(-len(bins) // rows_per_micro))
    if max_micro is not None and num_micro > max_micro:
        raise ValueError(f"{len(bins)} pack rows need {num_micro} micro-batches > max_micro={max_micro}")
    return bins, num_micro


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
         old_logps: Sequence[Sequence[float]], advantages: Sequence[float], *, pack_len: int,
         rows_per_micro: int, max_micro: int, max_segments: int, agg: str, max_response_len: int,
         shards: int = 1, pad_id: int = 0) -> tuple[dict[str, np.ndarray], Layout]:
    """Host-side packing of unpacked rows; returns the PackedBatch fields as numpy (ref_logp
    left out: the reference pass fills it in the same layout) and the Layout."""
    b = len(prompts)
    if not (len(responses) == len(old_logps) == len(advantages) == b):
        raise ValueError("pack: prompts, responses, old_logps and advantages differ in length")
    plens = np.asarray([len(p) for p in prompts], np.int64)
    rlens = np.asarray([len(r) for r in responses], np.int64)
    for i, (r, lp) in enumerate(zip(responses, old_logps)):
        if len(lp) != len(r):
            raise ValueError(f"row {i}: {len(lp)} old logprobs for {len(r)} response tokens")
        if len(r) > max_response_len:
            raise ValueError(f"row {i}: response of {len(r)} tokens > max_response_len={max_response_len}")
        if plens[i] < 1:
            raise ValueError(f"row {i}: empty prompt")
    bins, num_micro = plan_layout(plens + rlens, pack_len=pack_len, rows_per_micro=rows_per_micro,
                                  max_segments=max_segments, shards=shards, max_micro=max_micro)
    # serpentine deal of the bins (heaviest first) over the shards' slots of each micro-batch
    loads = np.asarray([sum(int(plens[i] + rlens[i]) for i in bn) for bn in bins])
    order = np.argsort(-loads, kind="stable")
    per_shard = rows_per_micro // shards
    slots = []  # (micro, row) in dealing order
    for m in range(num_micro):
        lanes = list(range(shards)) if m % 2 == 0 else list(range(shards))[::-1]
        for j in range(per_shard):
            for s in lanes:
                slots.append((m, s * per_shard + j))
    shape = (max_micro, rows_per_micro, pack_len)
    out = dict(tokens=np.full(shape, pad_id, np.int32), segment_ids=np.zeros(shape, np.int32),
               positions=np.zeros(shape, np.int32), targets=np.full(shape, pad_id, np.int32),
               response_mask=np.zeros(shape, np.float32), loss_weight=np.zeros(shape, np.float32),
               old_logp=np.zeros(shape, np.float32), advantages=np.zeros(shape, np.float32))
    weights, denominator = token_weights(rlens, agg, max_response_len)
    micro = np.zeros(b, np.int64)
    slot = np.zeros(b, np.int64)
    start = np.zeros(b, np.int64)
    for k, bi in enumerate(order):
        m, r = slots[k]
        offset = 0
        for seg, i in enumerate(sorted(bins[bi]), start=1):
            p, n = int(plens[i]), int(rlens[i])
            span = slice(offset, offset + p + n)
            out["tokens"][m, r, span] = list(prompts[i]) + list(responses[i])
            out["segment_ids"][m, r, span] = seg
            out["positions"][m, r, span] = np.arange(p + n)
            out["targets"][m, r, offset:offset + p + n - 1] = out["tokens"][m, r, offset + 1:offset + p + n]
            pred = slice(offset + p - 1, offset + p - 1 + n)  # positions predicting the response
            out["response_mask"][m, r, pred] = 1.0
            out["loss_weight"][m, r, pred] = weights[i]
            out["old_logp"][m, r, pred] = old_logps[i]
            out["advantages"][m, r, pred] = advantages[i]
            micro[i], slot[i], start[i] = m, r, offset
            offset += p + n
    out["num_micro"] = np.asarray(num_micro, np.int32)
    out["denominator"] = np.asarray(denominator, np.float32)
    layout = Layout(micro, slot, start, plens, rlens, num_micro, max_micro, rows_per_micro, pack_len)
    return out, layout


def unpack_response(packed: np.ndarray, layout: Layout, max_response_len: int) -> np.ndarray:
    """[B, max_response_len] per-response-token values (e.g. logprobs) from the packed layout."""
    b = len(layout.micro)
    out = np.zeros((b, max_response_len), packed.dtype)
    for i in range(b):
        p, n = int(layout.prompt_len[i]), int(layout.response_len[i])
        first = int(layout.start[i]) + p - 1
        out[i, :n] = packed[layout.micro[i], layout.slot[i], first:first + n]
    return out


def pack_response(values: np.ndarray, layout: Layout) -> np.ndarray:
    """The inverse of `unpack_response`: [B, R] per-response-token values into [M, Bm, L]."""
    out = np.zeros((layout.max_micro, layout.rows_per_micro, layout.pack_len), np.float32)
    for i in range(len(layout.micro)):
        p, n = int(layout.prompt_len[i]), int(layout.response_len[i])
        first = int(layout.start[i]) + p - 1
        out[layout.micro[i], layout.slot[i], first:first + n] = values[i, :n]
    return out
