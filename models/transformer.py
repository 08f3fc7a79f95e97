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
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh

from medssr_jax.sharding import constrain
from models import layers
from models.config import ModelConfig

Weights = dict[str, jax.Array]
# Activations a block names with `checkpoint_name`, for the "names" remat policy: the
# rotated q/k, v, the attention context and the two residual-stream projections. Saving
# these (as MaxText's save_qkv_proj / save_out_proj policies do) spares the backward
# pass the attention recomputation while the MLP's wide intermediates are recomputed.
SAVED_ACTIVATION_NAMES = ("query", "key", "value", "attn_context", "attn_out", "mlp_out")
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "names": jax.checkpoint_policies.save_only_these_names(*SAVED_ACTIVATION_NAMES),
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
    q, k, v = (checkpoint_name(q, "query"), checkpoint_name(k, "key"), checkpoint_name(v, "value"))
    attn, collected = attend(q, k, v)
    attn = checkpoint_name(attn, "attn_context")
    x = x + checkpoint_name(jnp.einsum("BTNH,NHD->BTD", attn, w["o_nhd"]), "attn_out")
    h = layers.rms_norm(x, w["mlp_norm"], cfg.rms_norm_eps)
    x = x + checkpoint_name(layers.swiglu(h, w["gate_df"], w["up_df"], w["down_fd"]), "mlp_out")
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


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, T, T]: causal within a packed segment; segment id 0 is padding and attends nowhere."""
    t = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal[None] & same & (segment_ids > 0)[:, None, :]


def segment_bounds(segment_ids: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
    """cuDNN's packed layout from contiguous segment ids 1..m (0 = trailing padding):
    lengths [B, M] and offsets [B, M + 1], entries past a row's last segment set to -1."""
    ids = jnp.arange(1, max_segments + 1, dtype=segment_ids.dtype)
    lengths = jnp.sum(segment_ids[:, None, :] == ids[None, :, None], axis=-1).astype(jnp.int32)
    count = jnp.sum(lengths > 0, axis=-1, keepdims=True)
    offsets = jnp.concatenate([jnp.zeros_like(lengths[:, :1]), jnp.cumsum(lengths, axis=-1)], axis=-1)
    offsets = jnp.where(jnp.arange(max_segments + 1)[None] <= count, offsets, -1)
    return jnp.where(lengths > 0, lengths, -1), offsets


def _cudnn_packed_attention(q, k, v, segment_ids, max_segments: int):
    """cuDNN fused attention over packed rows: causal within each segment, padding ignored.

    One segment per row is a right-padded sequence: the public kernel with causal
    masking and sequence lengths. Several use cuDNN's packed layout (segment offsets
    and lengths), reached through jax's cuDNN module; where that module is missing
    the kernel takes the explicit segment mask instead.
    """
    if max_segments == 1:
        lengths = jnp.sum((segment_ids > 0).astype(jnp.int32), axis=-1)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
                                            key_value_seq_lengths=lengths, implementation="cudnn")
    try:
        from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention
    except ImportError:
        mask = segment_mask(segment_ids)[:, None]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    lengths, offsets = segment_bounds(segment_ids, max_segments)
    return dot_product_attention(q, k, v, None, None, lengths, lengths, offsets, offsets,
                                 scale=q.shape[-1] ** -0.5, mask_type=MaskType.PADDING_CAUSAL)


def training_attention(impl: str, attention_mask: jax.Array | None, segment_ids: jax.Array | None,
                       max_segments: int = 1) -> AttendFn:
    """Full-sequence attention for training and scoring.

    "xla": the einsum reference (fp32 softmax) with an explicit [B, T, T] mask.
    "cudnn": the fused kernel; packed rows (segment_ids) go through
    `_cudnn_packed_attention`, rows of one left-padded sequence pass their mask.
    """
    if impl == "cudnn":
        if segment_ids is not None:
            return lambda q, k, v: (_cudnn_packed_attention(q, k, v, segment_ids, max_segments), None)
        mask = causal_mask(attention_mask)
        return lambda q, k, v: (jax.nn.dot_product_attention(q, k, v, mask=mask[:, None],
                                                             implementation="cudnn"), None)
    mask = segment_mask(segment_ids) if segment_ids is not None else causal_mask(attention_mask)
    return lambda q, k, v: (layers.attention(q, k, v, mask), None)


def forward_hidden(model: Transformer, tokens: jax.Array, attention_mask: jax.Array | None = None,
                   positions: jax.Array | None = None, *, segment_ids: jax.Array | None = None,
                   max_segments: int = 1, remat: str | None = None) -> jax.Array:
    """Final-norm hidden states [B, T, D] of a full-sequence forward.

    Rows are either one sequence each (`attention_mask`, left or right padding),
    or packed: `segment_ids` [B, T] numbers the sequences of a row 1..m in order
    (0 = padding after the last, m <= max_segments), `positions` restart at 0 in
    each, and attention stays within a segment. `remat` overrides the config's policy.
    """
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, time], got shape {tokens.shape}")
    cfg = model.config
    remat = cfg.remat if remat is None else remat
    if remat != "none" and remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be none or one of {sorted(REMAT_POLICIES)}, got {remat!r}")
    if segment_ids is not None:
        if positions is None:
            raise ValueError("packed rows (segment_ids) need their per-segment positions")
        attend = training_attention(cfg.attention_impl, None, segment_ids, max_segments)
    else:
        if attention_mask is None:
            attention_mask = jnp.ones(tokens.shape, bool)
        if positions is None:
            positions = positions_from_mask(attention_mask)
        attend = training_attention(cfg.attention_impl, attention_mask, None)
    hidden, _ = run_layers(model, tokens, positions, lambda i: attend, remat=remat)
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
