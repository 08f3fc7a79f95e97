"""The decoder shared by Qwen3 and Llama, as a Flax NNX module plus free functions.

The module only holds parameters (each `nnx.Param` carries its logical axes
in `.axes`); the computation lives in free functions over plain arrays so the
same code serves the full forward (parity, training), the sampler's prefill
and its decode step, and `jax.checkpoint` (remat) without NNX lifting.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from medssr_jax.sharding import constrain
from models import layers
from models.config import ModelConfig

Weights = dict[str, jax.Array]
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, n, k, h, f = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         cfg.intermediate_size)
        pd = cfg.jnp_param_dtype
        normal = nnx.initializers.normal(0.02)

        def param(shape, axes):
            return nnx.Param(normal(rngs.params(), shape, pd), axes=axes)

        def ones(size, axes=("norm",)):
            return nnx.Param(jnp.ones((size,), pd), axes=axes)

        self.attn_norm = ones(d)
        self.q_dnh = param((d, n, h), ("embed", "q_heads", "head_dim"))
        self.k_dkh = param((d, k, h), ("embed", "kv_heads", "head_dim"))
        self.v_dkh = param((d, k, h), ("embed", "kv_heads", "head_dim"))
        self.o_nhd = param((n, h, d), ("q_heads", "head_dim", "embed"))
        if cfg.qk_norm:
            self.q_norm = ones(h)
            self.k_norm = ones(h)
        self.mlp_norm = ones(d)
        self.gate_df = param((d, f), ("embed", "mlp"))
        self.up_df = param((d, f), ("embed", "mlp"))
        self.down_fd = param((f, d), ("mlp", "embed"))


class Transformer(nnx.Module):
    """Qwen3 / Llama decoder. `model(tokens, attention_mask)` -> fp32 logits [B, T, V]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, mesh: Mesh | None = None):
        self.config = cfg
        self.mesh = mesh
        pd = cfg.jnp_param_dtype
        normal = nnx.initializers.normal(0.02)
        self.embed_vd = nnx.Param(normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), pd),
                                  axes=("vocab", "embed"))
        self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = nnx.Param(jnp.ones((cfg.hidden_size,), pd), axes=("norm",))
        if not cfg.tie_word_embeddings:
            self.lm_head_dv = nnx.Param(normal(rngs.params(), (cfg.hidden_size, cfg.vocab_size), pd),
                                        axes=("embed", "vocab"))

    def __call__(self, tokens: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        return forward(self, tokens, attention_mask, positions)


# --- weights as plain arrays ------------------------------------------------

def layer_weights(block: Block, dtype) -> Weights:
    """The block's parameters as arrays in the compute dtype (norms keep theirs)."""
    out = {}
    for name, var in vars(block).items():
        if isinstance(var, nnx.Param):
            v = var[...]
            out[name] = v if name.endswith("norm") else v.astype(dtype)
    return out


def unembed_weights(model: Transformer) -> jax.Array:
    """[D, V] output projection (the transposed embedding when tied)."""
    if model.config.tie_word_embeddings:
        return model.embed_vd[...].T
    return model.lm_head_dv[...]


# --- the computation --------------------------------------------------------

# attend(q [B,T,N,H], k [B,T,K,H], v) -> (out [B,T,N,H], anything to collect per layer)
AttendFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, object]]


def block_forward(w: Weights, x: jax.Array, cos: jax.Array, sin: jax.Array, cfg: ModelConfig,
                  attend: AttendFn, mesh: Mesh | None = None):
    b, t, _ = x.shape
    h = layers.rms_norm(x, w["attn_norm"], cfg.rms_norm_eps)
    q = jnp.einsum("BTD,DNH->BTNH", h, w["q_dnh"])
    k = jnp.einsum("BTD,DKH->BTKH", h, w["k_dkh"])
    v = jnp.einsum("BTD,DKH->BTKH", h, w["v_dkh"])
    if cfg.qk_norm:
        q = layers.rms_norm(q, w["q_norm"], cfg.rms_norm_eps)
        k = layers.rms_norm(k, w["k_norm"], cfg.rms_norm_eps)
    q = constrain(layers.apply_rope(q, cos, sin), ("batch", None, "q_heads", None), mesh)
    k = constrain(layers.apply_rope(k, cos, sin), ("batch", None, "kv_heads", None), mesh)
    v = constrain(v, ("batch", None, "kv_heads", None), mesh)
    attn, collected = attend(q, k, v)
    x = x + jnp.einsum("BTNH,NHD->BTD", attn, w["o_nhd"])
    h = layers.rms_norm(x, w["mlp_norm"], cfg.rms_norm_eps)
    x = x + layers.swiglu(h, w["gate_df"], w["up_df"], w["down_fd"])
    return constrain(x, ("batch", None, None), mesh), collected


def run_layers(model: Transformer, tokens: jax.Array, positions: jax.Array,
               attend_for_layer: Callable[[int], AttendFn], remat: str = "none"):
    """Embed, run every block, final norm. Returns (hidden [B,T,D], collected per layer).

    remat recomputes each block in the backward pass; only for attend functions
    without side effects (the full forward), never for the decode step.
    """
    cfg, mesh = model.config, model.mesh
    dtype = cfg.jnp_dtype
    x = jnp.take(model.embed_vd[...], tokens, axis=0).astype(dtype)
    x = constrain(x, ("batch", None, None), mesh)
    cos, sin = layers.rope_cos_sin(positions, cfg)
    collected = []
    for i, block in enumerate(model.layers):
        fn = lambda w, x, cos, sin, attend=attend_for_layer(i): block_forward(  # noqa: E731
            w, x, cos, sin, cfg, attend, mesh)
        if remat != "none":
            fn = jax.checkpoint(fn, policy=REMAT_POLICIES[remat])
        x, c = fn(layer_weights(block, dtype), x, cos, sin)
        collected.append(c)
    x = layers.rms_norm(x, model.final_norm[...], cfg.rms_norm_eps)
    return x, collected


def logits_from_hidden(model: Transformer, hidden: jax.Array) -> jax.Array:
    """fp32 logits; the matmul runs in the compute dtype with fp32 accumulation."""
    w = unembed_weights(model).astype(model.config.jnp_dtype)
    return jnp.einsum("...D,DV->...V", hidden, w, preferred_element_type=jnp.float32)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Positions that skip left padding (what HF `generate` uses)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def causal_mask(attention_mask: jax.Array) -> jax.Array:
    """[B, T, T]: causal and not attending to padding."""
    t = attention_mask.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    return causal[None] & attention_mask.astype(bool)[:, None, :]


def forward_hidden(model: Transformer, tokens: jax.Array, attention_mask: jax.Array | None = None,
                   positions: jax.Array | None = None) -> jax.Array:
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, time], got shape {tokens.shape}")
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, bool)
    if positions is None:
        positions = positions_from_mask(attention_mask)
    mask = causal_mask(attention_mask)
    if model.config.attention_impl == "cudnn":
        def attend(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn"), None
    else:
        def attend(q, k, v):
            return layers.attention(q, k, v, mask), None
    hidden, _ = run_layers(model, tokens, positions, lambda i: attend, remat=model.config.remat)
    return hidden


def forward(model: Transformer, tokens: jax.Array, attention_mask: jax.Array | None = None,
            positions: jax.Array | None = None) -> jax.Array:
    """Full-sequence forward: fp32 logits [B, T, V]."""
    return logits_from_hidden(model, forward_hidden(model, tokens, attention_mask, positions))


# --- sampler entry points ---------------------------------------------------

class PrefixKV(NamedTuple):
    """The prompts' KV, computed once and shared by the n samples of each prompt."""
    k: tuple[jax.Array, ...]  # per layer [P, K, Sp, H]
    v: tuple[jax.Array, ...]
    mask: jax.Array           # [P, Sp] True where a real (non-padding) token


class ChunkKV(NamedTuple):
    """The samples' own KV for one chunk of C decode steps: [P, n, K, C, H] per layer.

    Generated KV lives in fixed-size chunks, each its own buffer: a decode step
    reads the finished chunks and the current one, so it never reads the empty
    tail of a full-length cache and never copies a slice of it.
    """
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]


def prefill(model: Transformer, tokens: jax.Array, attention_mask: jax.Array
            ) -> tuple[jax.Array, PrefixKV]:
    """Run left-padded prompts [P, Sp]; returns last-position fp32 logits [P, V] and the KV."""
    positions = positions_from_mask(attention_mask)
    mask = causal_mask(attention_mask)
    dtype = model.config.jnp_dtype
    hidden, kv = run_layers(
        model, tokens, positions,
        lambda i: lambda q, k, v: (layers.attention(q, k, v, mask),
                                   (k.astype(dtype).transpose(0, 2, 1, 3), v.astype(dtype).transpose(0, 2, 1, 3))))
    logits = logits_from_hidden(model, hidden[:, -1])
    return logits, PrefixKV(tuple(k for k, _ in kv), tuple(v for _, v in kv),
                            attention_mask.astype(bool))


def empty_chunk(cfg: ModelConfig, num_prompts: int, n: int, length: int, dtype=None) -> ChunkKV:
    dtype = dtype or cfg.jnp_dtype
    shape = (num_prompts, n, cfg.num_kv_heads, length, cfg.head_dim)
    return ChunkKV(tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                   tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)))


def decode_step(model: Transformer, tokens: jax.Array, positions: jax.Array, prefix: PrefixKV,
                finished: tuple[ChunkKV, ...], current: ChunkKV, slot: jax.Array
                ) -> tuple[jax.Array, ChunkKV]:
    """One token for every sample: tokens/positions [P*n]; writes its KV at `slot` of `current`.

    Returns fp32 logits [P*n, V] and the updated current chunk.
    """
    p, n, _, c = current.k[0].shape[:4]
    new_k, new_v = list(current.k), list(current.v)
    current_mask = (jnp.arange(c) <= slot)[None, None, None, :]  # [1, 1, T=1, C]

    def attend_for_layer(i):
        def attend(q, k, v):
            # [P*n, 1, K, H] -> [P, n, K, 1, H]: a pure reshape since T == 1
            k = k.reshape(p, n, k.shape[2], 1, k.shape[3]).astype(current.k[i].dtype)
            v = v.reshape(p, n, v.shape[2], 1, v.shape[3]).astype(current.v[i].dtype)
            new_k[i] = jax.lax.dynamic_update_slice_in_dim(current.k[i], k, slot, axis=3)
            new_v[i] = jax.lax.dynamic_update_slice_in_dim(current.v[i], v, slot, axis=3)
            own = [(ch.k[i], ch.v[i], None) for ch in finished] + [(new_k[i], new_v[i], current_mask)]
            out = layers.multi_source_attention(
                q.reshape(p, n, 1, *q.shape[2:]), [(prefix.k[i], prefix.v[i], prefix.mask)], own)
            return out.reshape(p * n, 1, *q.shape[2:]), None
        return attend

    hidden, _ = run_layers(model, tokens[:, None], positions[:, None], attend_for_layer)
    logits = logits_from_hidden(model, hidden[:, 0])
    return logits, ChunkKV(tuple(new_k), tuple(new_v))
