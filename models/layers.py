"""Shared building blocks as free functions: RMSNorm, rotary, attention, SwiGLU.

Dimension letters: B batch, T query length, S key length, D model width,
N query heads, K key/value heads, G = N / K query heads per KV head,
H head dim, F MLP width, V vocabulary.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from models.config import ModelConfig, RopeScaling

# Finite "minus infinity": a fully masked row (left padding) softmaxes to a
# uniform distribution instead of NaN, and masked scores stay exactly zero.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF RMSNorm: normalise in fp32, cast back, then scale by the weight."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * xf.astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> jax.Array:
    """Per-pair inverse frequencies, with Llama-3.1 `llama3` rescaling."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = ((scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def rope_cos_sin(positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, T, H] in fp32 for integer positions [B, T]."""
    inv = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half rotary on x [B, T, heads, H] (the HF convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def swiglu(x: jax.Array, gate_df: jax.Array, up_df: jax.Array, down_fd: jax.Array) -> jax.Array:
    gate = jnp.einsum("BTD,DF->BTF", x, gate_df)
    up = jnp.einsum("BTD,DF->BTF", x, up_df)
    return jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, down_fd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention.

    q [B, T, N, H], k/v [B, S, K, H], mask [B, T, S] (True = may attend).
    Scores and softmax in fp32; returns [B, T, N, H] in q's dtype.
    """
    b, t, n, h = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, n // kv, h)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (h ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(b, t, n, h)


def multi_source_attention(q: jax.Array, shared: list, own: list) -> jax.Array:
    """Decode attention of n samples per prompt over several key sets, one softmax.

    q [P, n, T, N, H]. `shared`: (k, v, mask) with k/v [P, K, S, H] and mask
    [P, S]: the prompt's KV, read once per prompt group rather than once per
    sample. `own`: (k, v, mask) with k/v [P, n, K, S, H] and mask broadcastable
    to [P, n, T, S], or None when every slot is valid. KV is stored with the
    batch-like axes leading and S next to H so each dot reads it in place
    (no per-step transpose of the cache).
    """
    p, ns, t, n, h = q.shape
    kv = (shared or own)[0][0].shape[-3]
    qg = q.reshape(p, ns, t, kv, n // kv, h)
    scale = h ** -0.5
    scores, values = [], []
    for k, v, mask in shared:
        s = jnp.einsum("PNTKGH,PKSH->PNKGTS", qg, k, preferred_element_type=jnp.float32) * scale
        if mask is not None:
            s = jnp.where(mask[:, None, None, None, None, :], s, MASK_VALUE)
        scores.append(s)
        values.append(("PNKGTS,PKSH->PNTKGH", v))
    for k, v, mask in own:
        s = jnp.einsum("PNTKGH,PNKSH->PNKGTS", qg, k, preferred_element_type=jnp.float32) * scale
        if mask is not None:
            s = jnp.where(mask[:, :, None, None, :, :], s, MASK_VALUE)
        scores.append(s)
        values.append(("PNKGTS,PNKSH->PNTKGH", v))
    # One softmax over the concatenated score blocks (scores are small: no KV is copied).
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
    out, start = 0, 0
    for s, (spec, v) in zip(scores, values):
        width = s.shape[-1]
        out = out + jnp.einsum(spec, probs[..., start:start + width].astype(v.dtype), v)
        start += width
    return out.reshape(p, ns, t, n, h)
