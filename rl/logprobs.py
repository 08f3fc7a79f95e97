"""Fused LM head + log-softmax: per-token logprobs of given targets without [B, T, V] logits.

    logp, entropy = token_logprobs(hidden [B, T, D], w [D, V], targets [B, T], temperature, chunk)

The positions are processed `chunk` at a time: each chunk's logits [B, chunk, V] are
made in fp32 (matmul in the weights' dtype, fp32 accumulation), reduced to the
target's logprob, the log-sum-exp and the entropy, and dropped. The custom VJP
keeps nothing beyond its inputs and rebuilds each chunk's logits in the
backward pass (the softmax is renormalised there rather than taken from the
forward's log-sum-exp: XLA may fuse the two passes' matmuls differently, and
probabilities that do not sum to one exactly leak a constant into d hidden):

    d logits = g * (onehot(target) - softmax(logits / T)) / T
    d hidden = d logits @ w^T,   d w = sum over chunks of hidden^T @ d logits

so neither pass ever holds more than one chunk of logits, and the backward does
not save the softmax (what `jax.checkpoint` around a plain log_softmax would
still hold for the chunk being differentiated). The entropy is a metric: no
gradient flows through it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
    """[B, T, ...] -> [T / chunk, B, chunk, ...] (T zero-padded): the batch axis, and with
    it the data sharding, stays inside every chunk."""
    pad = -x.shape[1] % chunk
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(x.shape[0], x.shape[1] // chunk, chunk, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _unchunk(x: jax.Array, length: int) -> jax.Array:
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def _chunk_stats(hc, tc, w, temperature):
    logits = jnp.einsum("BCD,DV->BCV", hc, w, preferred_element_type=jnp.float32) / temperature
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
    probs = jnp.exp(logits - lse[..., None])
    entropy = lse - jnp.sum(probs * logits, axis=-1)
    return target - lse, lse, entropy


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(hidden, w, targets, temperature, chunk):
    return _forward(hidden, w, targets, temperature, chunk)[0]


def _forward(hidden, w, targets, temperature, chunk):
    length = hidden.shape[1]
    hc, tc = _chunks(hidden, chunk), _chunks(targets, chunk)

    def one(_, args):
        return None, _chunk_stats(*args, w, temperature)

    _, (lp, lse, ent) = jax.lax.scan(one, None, (hc, tc))
    lp, lse, ent = (_unchunk(x, length) for x in (lp, lse, ent))
    return (lp, jax.lax.stop_gradient(ent)), lse


def _fused_fwd(hidden, w, targets, temperature, chunk):
    out, _ = _forward(hidden, w, targets, temperature, chunk)
    return out, (hidden, w, targets, temperature)


def _fused_bwd(chunk, res, cotangents):
    hidden, w, targets, temperature = res
    g_lp = cotangents[0]  # the entropy is a metric: its cotangent is ignored
    length = hidden.shape[1]
    hc, tc = _chunks(hidden, chunk), _chunks(targets, chunk)
    gc = _chunks(g_lp.astype(jnp.float32), chunk)
    vocab = w.shape[1]

    def one(dw, args):
        h, t, g = args
        logits = jnp.einsum("BCD,DV->BCV", h, w, preferred_element_type=jnp.float32) / temperature
        probs = jax.nn.softmax(logits, axis=-1)
        onehot = (jnp.arange(vocab) == t[..., None]).astype(jnp.float32)
        dlogits = (g[..., None] * (onehot - probs) / temperature).astype(w.dtype)
        dh = jnp.einsum("BCV,DV->BCD", dlogits, w, preferred_element_type=jnp.float32)
        dw = dw + jnp.einsum("BCD,BCV->DV", h, dlogits, preferred_element_type=jnp.float32)
        return dw, dh.astype(hidden.dtype)

    dw, dh = jax.lax.scan(one, jnp.zeros(w.shape, jnp.float32), (hc, tc, gc))
    return _unchunk(dh, length), dw.astype(w.dtype), None, None  # no gradient for the temperature


_fused.defvjp(_fused_fwd, _fused_bwd)


def token_logprobs(hidden: jax.Array, w: jax.Array, targets: jax.Array, temperature: float = 1.0,
                   chunk: int = 256) -> tuple[jax.Array, jax.Array]:
    """(logprob of each target, entropy) under softmax(hidden @ w / temperature), both fp32 [B, T].

    hidden [B, T, D] and w [D, V] in the compute dtype; targets [B, T] int. Chunks run
    over T (`chunk` positions of every row at a time). Differentiable in hidden and w
    (custom VJP, see the module docstring).
    """
    if hidden.ndim != 3 or w.ndim != 2 or targets.shape != hidden.shape[:2]:
        raise ValueError(f"token_logprobs wants hidden [B, T, D], w [D, V], targets [B, T]; got "
                         f"{hidden.shape}, {w.shape}, {targets.shape}")
    if hidden.shape[2] != w.shape[0]:
        raise ValueError(f"hidden width {hidden.shape[2]} != unembedding rows {w.shape[0]}")
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"temperature must be > 0 for logprobs, got {temperature} (LossConfig.temperature)")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk} (LossConfig.logprob_chunk)")
    chunk = min(int(chunk), max(hidden.shape[1], 1))
    return _fused(hidden, w, targets.astype(jnp.int32), jnp.asarray(temperature, jnp.float32), chunk)
