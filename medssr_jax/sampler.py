"""One sampler for rollouts, majority voting, evaluation and serving.

    generate(model, prompts, n=8, max_new_tokens=512, temperature=1.0, ...)

- Prompts of any lengths are left-padded into a bucketed shape and prefilled
  once (jitted); the n samples of a prompt share that prompt's KV: during
  decode it is read once per prompt group, and memory holds one copy.
- The samples' own KV lives in one buffer per layer, preallocated once per
  call for the whole completion length (bucketed) and donated through the
  decode loop; each row has its own length (a finished row stops growing),
  and attention reads each row's KV only up to it. Decoding runs in jitted
  chunks of `chunk_size` steps (a `lax.while_loop` that stops early once every
  sequence is done; the host streams tokens between chunks). One executable
  serves every chunk of every call with the same (prompt-count bucket, prompt
  bucket, length bucket): the number of new tokens does not add compilations.
- Decode attention over (shared prompt KV, own KV) is one softmax merged by
  log-sum-exp: a Pallas kernel on GPUs; elsewhere the XLA path, which past
  512 slots reads the own KV in blocks only up to the longest row
  (`decode_attention="auto" | "xla" | "blocked" | "pallas" | "interpret"`;
  "xla", over the whole buffers, is the reference).
- The weights a decode step reads are fused (one QKV and one gate|up matmul
  per layer) and cast to the compute dtype once per call.
- Per-token logprobs are those of the sampled token under the model's
  distribution at the sampling temperature, *before* any top-p / top-k
  truncation: log_softmax(logits / T). This is the "old logprob" convention
  of verl's GRPO, so the importance ratio at the first update is exactly 1.
  With temperature 0 (greedy) the logprobs are log_softmax(logits).
- On a mesh the prompts are sharded over the data axes; in a run of several
  processes every process passes the same prompts and seed, and every process
  gets all the completions back.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from medssr_jax.multihost import global_from_host, host_array
from medssr_jax.sharding import logical_to_sharding
from models.config import ModelConfig
from models import decode_attention as attention_impls
from models.transformer import (DecodeWeights, PrefixKV, SampleKV, Transformer, decode_step,
                                decode_weights, empty_sample_kv, prefill)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k

    def __post_init__(self):
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass
class Completion:
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str  # "eos" (an EOS/stop token, included in tokens) or "length"

    @property
    def length(self) -> int:
        return len(self.tokens)


class Generation(list):
    """Per prompt, a list of n Completions; `.stats` holds timings and throughput."""

    stats: dict


def sample_logits(logits: jax.Array, key: jax.Array, params: SamplingParams
                  ) -> tuple[jax.Array, jax.Array]:
    """Draw one token per row of fp32 logits [B, V]; returns (tokens, logprobs).

    The logprob is the drawn token's log_softmax(logits / T), computed from the
    row's max and log-sum-exp without materialising a [B, V] log-softmax.
    """
    temperature = params.temperature if not params.greedy else 1.0
    scaled = logits / temperature if temperature != 1.0 else logits
    if params.greedy:
        tokens = jnp.argmax(logits, axis=-1)
    else:
        masked = scaled
        if params.top_k or params.top_p < 1:
            k = params.top_k or logits.shape[-1]
            top_vals = jax.lax.top_k(scaled, k)[0]  # sorted, descending
            threshold = top_vals[:, -1:]
            if params.top_p < 1:
                probs = jax.nn.softmax(top_vals, axis=-1)
                before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
                keep = before < params.top_p  # the top token is always kept
                threshold = jnp.min(jnp.where(keep, top_vals, jnp.inf), axis=-1, keepdims=True)
            masked = jnp.where(scaled >= threshold, scaled, -jnp.inf)
        tokens = jax.random.categorical(key, masked, axis=-1)
    tokens = tokens.astype(jnp.int32)
    top = jax.lax.stop_gradient(jnp.max(scaled, axis=-1, keepdims=True))
    log_norm = jnp.log(jnp.sum(jnp.exp(scaled - top), axis=-1))
    picked = jnp.take_along_axis(scaled, tokens[:, None], axis=-1)[:, 0]
    return tokens, (picked - top[:, 0]) - log_norm


# --- jitted pieces ------------------------------------------------------------

RNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


@functools.partial(jax.jit, static_argnames=("graphdef", "params", "n"))
def _prefill_and_first(graphdef, state, tokens, mask, alive, key, eos, *, params, n):
    model = nnx.merge(graphdef, state)
    logits, prefix = prefill(model, tokens, mask)
    logits = jnp.repeat(logits, n, axis=0)
    tok, lp = sample_logits(logits, jax.random.fold_in(key, 0), params)
    done = ~alive | _is_eos(tok, eos)
    return prefix, tok, lp, done


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _decode_weights(graphdef, state) -> DecodeWeights:
    return decode_weights(nnx.merge(graphdef, state))


def _is_eos(tokens, eos):
    return (tokens[:, None] == eos[None, :]).any(-1)


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "params", "chunk", "attention_impl"),
                   donate_argnames=("cache",))
def _decode_chunk(weights: DecodeWeights, prefix: PrefixKV, cache: SampleKV, last, positions,
                  lengths, done, key, step0, max_steps, eos, pad_id, *, cfg, mesh, params, chunk,
                  attention_impl):
    """Up to `max_steps` decode steps from global step `step0`; stops when all are done.

    Step s writes slot s of the cache; a running row then reads s + 1 of its own
    slots, a finished row keeps its length (its slots past it are never read).
    """
    batch = last.shape[0]

    def cond(c):
        i, _, _, _, _, done, _, _ = c
        return (i < max_steps) & ~jnp.all(done)

    def body(c):
        i, cache, last, pos, lengths, done, toks, lps = c
        s = step0 + i
        lengths = jnp.where(done, lengths, s + 1)
        logits, cache = decode_step(weights, cfg, last, pos, prefix, cache, s, lengths,
                                    attention_impl=attention_impl, mesh=mesh)
        tok, lp = sample_logits(logits, jax.random.fold_in(key, s + 1), params)
        tok = jnp.where(done, pad_id, tok)
        lp = jnp.where(done, 0.0, lp)
        toks = jax.lax.dynamic_update_slice_in_dim(toks, tok[:, None], i, axis=1)
        lps = jax.lax.dynamic_update_slice_in_dim(lps, lp[:, None], i, axis=1)
        return i + 1, cache, tok, pos + 1, lengths, done | _is_eos(tok, eos), toks, lps

    init = (jnp.int32(0), cache, last, positions, lengths, done,
            jnp.full((batch, chunk), pad_id, jnp.int32), jnp.zeros((batch, chunk), jnp.float32))
    steps, cache, last, positions, lengths, done, toks, lps = jax.lax.while_loop(cond, body, init)
    return cache, last, positions, lengths, done, toks, lps, steps


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _empty_sample_kv(cfg: ModelConfig, num_prompts: int, n: int, length: int,
                     sharding: NamedSharding | None) -> SampleKV:
    """The zero KV buffer, created in place (on the mesh: prompts over the data axes, KV heads over tensor)."""
    cache = empty_sample_kv(cfg, num_prompts, n, length)
    if sharding is None:
        return cache
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), cache)


# --- the public entry point ---------------------------------------------------

def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _bucket_prompts(p: int, multiple: int) -> int:
    """Prompt-count buckets 1, 2, 4, 8, then multiples of 8 (and of the data shards)."""
    b = 1 << max(p - 1, 0).bit_length() if p <= 8 else _round_up(p, 8)
    return _round_up(b, multiple)


def _length_bucket(steps: int) -> int:
    """KV slots for `steps` decode steps: powers of two from 16 to 512, then multiples of 512."""
    steps = max(steps, 1)
    if steps <= 512:
        return max(16, 1 << (steps - 1).bit_length())
    return _round_up(steps, 512)


def _console_progress(stats: dict) -> None:
    print(f"\rsampling: {stats['generated']:,} tokens, {stats['tokens_per_s']:,.0f} tok/s, "
          f"{stats['running']}/{stats['batch']} running", end="", file=sys.stderr, flush=True)


def generate(model: Transformer, prompts: Sequence[Sequence[int]], *, n: int = 1,
             max_new_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 0, seed: int = 0, eos_ids: Sequence[int] | None = None,
             pad_id: int = 0, chunk_size: int = 128, prompt_bucket: int = 32,
             progress: bool | Callable[[dict], None] | None = None,
             on_tokens: Callable[[np.ndarray], None] | None = None,
             decode_attention: str = "auto", rng: str = "threefry2x32") -> Generation:
    """Sample n completions for each prompt (token-id lists of any lengths).

    eos_ids: tokens that end a sequence (included in its tokens, finish_reason
    "eos"); default the model config's. Greedy when temperature == 0.
    progress: True prints tokens/s to stderr after every chunk, a callable
    receives the stats dict, None prints only for large batches.
    on_tokens: called after the first token and after every decode chunk with
    the tokens so far, int32 [num_prompts * n, t] (row i * n + j is sample j of
    prompt i; finished rows continue with pad_id): what a streaming server sends.
    decode_attention: "auto" (the Pallas kernel on a GPU without a mesh when the
    shapes suit it; else "blocked" for completions longer than 512 tokens and
    "xla" for shorter ones), "xla" (whole buffers, the reference), "blocked"
    (the own KV in blocks up to the longest row), "pallas" or "interpret" (the
    kernel in Pallas interpret mode, for tests).
    rng: the PRNG for the draws: "threefry2x32" (default), or the faster "rbg" /
    "unsafe_rbg" (jax's RngBitGenerator keys); each is reproducible per seed.
    """
    cfg = model.config
    if top_k > cfg.vocab_size:
        top_k = 0  # a top-k wider than the vocabulary keeps every token
    params = SamplingParams(float(temperature), float(top_p), int(top_k))
    for name, value in (("n", n), ("max_new_tokens", max_new_tokens), ("chunk_size", chunk_size),
                        ("prompt_bucket", prompt_bucket), ("pad_id", pad_id)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if not 0 <= pad_id < cfg.vocab_size:
        raise ValueError(f"pad_id={pad_id} is outside the vocabulary [0, {cfg.vocab_size})")
    if prompt_bucket < 1:
        raise ValueError(f"prompt_bucket must be >= 1, got {prompt_bucket}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if decode_attention not in attention_impls.IMPLS:
        raise ValueError(f"decode_attention must be one of {attention_impls.IMPLS}, "
                         f"got {decode_attention!r}")
    if rng not in RNG_IMPLS:
        raise ValueError(f"rng must be one of {RNG_IMPLS}, got {rng!r}")
    if not prompts:
        raise ValueError("no prompts given")
    prompts = [list(map(int, p)) for p in prompts]
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, {cfg.vocab_size})")
        if len(p) + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                f"the model's context of {cfg.max_position_embeddings}")
    eos = list(cfg.eos_token_ids if eos_ids is None else eos_ids)
    eos_arr = jnp.asarray(eos or [-1], jnp.int32)

    mesh = model.mesh
    data_shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    num = len(prompts)
    p_pad = _bucket_prompts(num, data_shards)
    s_pad = _round_up(max(len(p) for p in prompts), prompt_bucket)
    tokens = np.full((p_pad, s_pad), pad_id, np.int32)
    mask = np.zeros((p_pad, s_pad), bool)
    for i, p in enumerate(prompts):
        tokens[i, s_pad - len(p):] = p
        mask[i, s_pad - len(p):] = True
    tokens[num:, -1] = pad_id  # bucket filler: one token, finished from the start
    mask[num:, -1] = True
    lengths = mask.sum(-1)
    batch = p_pad * n
    alive = np.repeat(np.arange(p_pad) < num, n)
    positions = np.repeat(lengths, n).astype(np.int32)

    def put(x):
        if mesh is None:
            return jnp.asarray(x)
        spec = PartitionSpec(("data", "fsdp"), *([None] * (np.ndim(x) - 1)))
        return global_from_host(x, NamedSharding(mesh, spec))

    graphdef, state = nnx.split(model)
    key = jax.random.key(seed, impl=rng)
    show = progress if callable(progress) else (_console_progress if (
        progress or (progress is None and batch * max_new_tokens >= 1 << 16)) else None)

    t0 = time.perf_counter()
    prefix, last, lp0, done = _prefill_and_first(
        graphdef, state, put(tokens), put(mask), put(alive), key, eos_arr, params=params, n=n)
    out_tokens, out_logprobs = [host_array(last)[:, None]], [host_array(lp0)[:, None]]
    all_done = bool(host_array(done).all())
    t_prefill = time.perf_counter() - t0
    if on_tokens is not None:
        on_tokens(out_tokens[0][:num * n])

    generated, step, impl = batch, 0, "none"
    if max_new_tokens > 1 and not all_done:
        length = _length_bucket(max_new_tokens - 1)
        chunk = min(chunk_size, length)
        sharded = mesh is not None and mesh.size > 1
        kv_shape = (p_pad, n, cfg.num_kv_heads, 2, length, cfg.head_dim)
        impl = attention_impls.resolve_impl(
            decode_attention, (p_pad, n, cfg.num_heads, cfg.head_dim),
            (p_pad, cfg.num_kv_heads, s_pad, cfg.head_dim), kv_shape, sharded, cfg.jnp_dtype)
        kv_sharding = None if not sharded else logical_to_sharding(
            ("batch", None, "kv_heads", None, None, "head_dim"), mesh, kv_shape)
        weights = _decode_weights(graphdef, state)
        cache = _empty_sample_kv(cfg, p_pad, n, length, kv_sharding)
        positions = put(positions)
        lengths = put(np.zeros(batch, np.int32))
        if not sharded:  # commit the loop state to the weights' device, as the chunks' outputs are:
            # otherwise the first chunk and the later ones would be two executables
            device = weights.embed.sharding
            cache, last, positions, lengths, done = jax.device_put(
                (cache, last, positions, lengths, done), device)
        while step < max_new_tokens - 1 and not all_done:
            steps_left = min(chunk, max_new_tokens - 1 - step)
            args = (weights, prefix, cache, last, positions, lengths, done, key, jnp.int32(step),
                    jnp.int32(steps_left), eos_arr, jnp.int32(pad_id))
            static = dict(cfg=cfg, mesh=mesh if sharded else None, params=params, chunk=chunk)
            try:
                out = _decode_chunk(*args, attention_impl=impl, **static)
            except Exception as e:  # noqa: BLE001 - only the automatic kernel choice falls back
                if decode_attention != "auto" or impl != "pallas" or step:
                    raise
                print(f"sampler: the Pallas decode-attention kernel failed to build "
                      f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); using the XLA path",
                      file=sys.stderr)
                impl = attention_impls.xla_impl(length, cfg.jnp_dtype)
                out = _decode_chunk(*args, attention_impl=impl, **static)
            cache, last, positions, lengths, done, toks, lps, ran = out
            ran = int(host_array(ran))
            out_tokens.append(host_array(toks)[:, :ran])
            out_logprobs.append(host_array(lps)[:, :ran])
            done_host = host_array(done)
            all_done = bool(done_host.all())
            step += ran
            if on_tokens is not None:
                on_tokens(np.concatenate(out_tokens, axis=1)[:num * n])
            generated += batch * ran
            if show:
                elapsed = time.perf_counter() - t0
                show(dict(generated=generated, tokens_per_s=generated / elapsed,
                          running=int((~done_host).sum()), batch=batch))
        del cache, weights
    elapsed = time.perf_counter() - t0
    if show is _console_progress:
        print(file=sys.stderr)

    all_tokens = np.concatenate(out_tokens, axis=1)
    all_logprobs = np.concatenate(out_logprobs, axis=1)
    eos_set = set(eos)
    result = Generation()
    for i in range(num):
        group = []
        for j in range(n):
            row = i * n + j
            toks = all_tokens[row].tolist()
            end = next((k + 1 for k, t in enumerate(toks) if t in eos_set), None)
            reason = "eos" if end is not None else "length"
            end = end or min(len(toks), max_new_tokens)
            group.append(Completion(toks[:end], all_logprobs[row, :end].tolist(), reason))
        result.append(group)
    useful = sum(c.length for g in result for c in g)
    result.stats = dict(seconds=elapsed, prefill_seconds=t_prefill, generated_tokens=useful,
                        decode_steps=step + 1, batch=batch, tokens_per_s=useful / elapsed,
                        decode_attention=impl)
    return result
