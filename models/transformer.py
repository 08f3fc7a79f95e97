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
from models.decode_attention import decode_attention
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
    start: jax.Array          # [P] int32: prompts are left-padded, real tokens from here on


class SampleKV(NamedTuple):
    """The samples' own KV: one preallocated buffer per layer, [P, n, K, 2, L, H].

    Keys and values share the buffer (index 0 and 1 of its fourth axis), so a
    decode step writes a token's K and V with one update per layer. Allocated
    once per `generate` call for the whole completion length L and donated
    through the decode loop; step s writes slot s, and each row reads only its
    first `lengths[row]` slots.
    """
    kv: tuple[jax.Array, ...]


class DecodeWeights(NamedTuple):
    """The weights a decode step reads, in the compute dtype, with fused projections.

    Built once per `generate` call (`decode_weights`), so fp32 master weights are
    cast once, not at every step, and each layer-step runs one QKV matmul and one
    gate|up matmul.
    """
    embed: jax.Array                 # [V, D]
    layers: tuple[dict, ...]         # qkv [D, K, G+2, H], o [N, H, D], gate_up [D, 2, F], down [F, D], norms
    final_norm: jax.Array            # [D]
    unembed: jax.Array | None        # [D, V]; None when tied to the embedding


_DECODE_AXES = {
    "qkv": ("embed", "kv_heads", None, "head_dim"),
    "o": ("q_heads", "head_dim", "embed"),
    "gate_up": ("embed", None, "mlp"),
    "down": ("mlp", "embed"),
}


def decode_weights(model: Transformer) -> DecodeWeights:
    """Fuse and cast the model's weights for decoding (call inside jit; sharded like the model)."""
    cfg, mesh = model.config, model.mesh
    dtype = cfg.jnp_dtype
    d, k, g, h = cfg.hidden_size, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    layers_out = []
    for block in model.layers:
        w = layer_weights(block, dtype)
        fused = dict(
            qkv=jnp.concatenate([w["q_dnh"].reshape(d, k, g, h), w["k_dkh"][:, :, None],
                                 w["v_dkh"][:, :, None]], axis=2),
            o=w["o_nhd"],
            gate_up=jnp.stack([w["gate_df"], w["up_df"]], axis=1),
            down=w["down_fd"],
        )
        fused = {name: constrain(x, _DECODE_AXES[name], mesh) for name, x in fused.items()}
        for name in ("attn_norm", "mlp_norm", "q_norm", "k_norm"):
            if name in w:  # rms_norm casts its weight to the activations' dtype: do it once here
                fused[name] = w[name].astype(dtype)
        layers_out.append(fused)
    embed = constrain(model.embed_vd[...].astype(dtype), ("vocab", "embed"), mesh)
    unembed = None
    if not cfg.tie_word_embeddings:
        unembed = constrain(model.lm_head_dv[...].astype(dtype), ("embed", "vocab"), mesh)
    return DecodeWeights(embed, tuple(layers_out), model.final_norm[...].astype(dtype), unembed)


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
    start = (tokens.shape[1] - attention_mask.astype(jnp.int32).sum(-1)).astype(jnp.int32)
    return logits, PrefixKV(tuple(k for k, _ in kv), tuple(v for _, v in kv), start)


def empty_sample_kv(cfg: ModelConfig, num_prompts: int, n: int, length: int, dtype=None) -> SampleKV:
    dtype = dtype or cfg.jnp_dtype
    shape = (num_prompts, n, cfg.num_kv_heads, 2, length, cfg.head_dim)
    return SampleKV(tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)))


def _rope_tables(positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """[B, 2, H/2] tables (cos, cos) and (-sin, sin) for `_rope_pairs`, once per step for all layers."""
    inv = layers.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    freqs = positions.astype(jnp.float32)[:, None] * inv  # [B, H/2]
    cos, sin = jnp.cos(freqs), jnp.sin(freqs)
    return jnp.stack([cos, cos], axis=1), jnp.stack([-sin, sin], axis=1)


def _rope_pairs(x: jax.Array, cos2: jax.Array, sin2: jax.Array) -> jax.Array:
    """Rotate-half rotary on x [B, ..., H] without a concatenation: the halves as an axis of 2,
    swapped by a reverse. Same arithmetic as HF: x1*c - x2*s and x2*c + x1*s."""
    half = x.shape[-1] // 2
    shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (2, half)
    c, s = cos2.reshape(shape).astype(x.dtype), sin2.reshape(shape).astype(x.dtype)
    pairs = x.reshape(*x.shape[:-1], 2, half)
    return (pairs * c + jnp.flip(pairs, axis=-2) * s).reshape(x.shape)


def _decode_layer(w: dict, x, cos, sin, prefix_k, prefix_v, start, cache, slot, lengths,
                  cfg: ModelConfig, attention_impl: str, mesh):
    """One layer for one new token per sample: x [B=P*n, D]; writes this token's K and V at
    `slot` of the layer's buffer `cache` [P, n, K, 2, L, H] with one update."""
    p, n = cache.shape[:2]
    b = x.shape[0]
    k_heads, g, hd = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    eps = cfg.rms_norm_eps
    h = layers.rms_norm(x, w["attn_norm"], eps)
    qkv = jnp.einsum("BD,DKJH->BKJH", h, w["qkv"])
    q, k, v = qkv[:, :, :g], qkv[:, :, g], qkv[:, :, g + 1]
    if cfg.qk_norm:
        q = layers.rms_norm(q, w["q_norm"], eps)
        k = layers.rms_norm(k, w["k_norm"], eps)
    q, k = _rope_pairs(q, cos, sin), _rope_pairs(k, cos, sin)
    # [P*n, K, 2, H] -> [P, n, K, 2, 1, H]: a pure reshape; K and V written in place together
    kv = jnp.stack([k, v], axis=2).reshape(p, n, k_heads, 2, 1, hd).astype(cache.dtype)
    cache = jax.lax.dynamic_update_slice_in_dim(cache, kv, slot, axis=4)
    q = constrain(q.reshape(p, n, k_heads * g, hd), ("batch", None, "q_heads", None), mesh)
    attn = decode_attention(q, prefix_k, prefix_v, start, cache, lengths.reshape(p, n),
                            impl=attention_impl)
    x = x + jnp.einsum("BNH,NHD->BD", attn.reshape(b, k_heads * g, hd), w["o"])
    h = layers.rms_norm(x, w["mlp_norm"], eps)
    gu = jnp.einsum("BD,DTF->BTF", h, w["gate_up"])
    x = x + jnp.einsum("BF,FD->BD", jax.nn.silu(gu[:, 0]) * gu[:, 1], w["down"])
    return constrain(x, ("batch", None), mesh), cache


def decode_step(weights: DecodeWeights, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array,
                prefix: PrefixKV, cache: SampleKV, slot: jax.Array, lengths: jax.Array, *,
                attention_impl: str = "xla", mesh: Mesh | None = None
                ) -> tuple[jax.Array, SampleKV]:
    """One token for every sample: tokens/positions [P*n]; writes its KV at `slot` of `cache`.

    lengths [P*n]: how many of each row's own slots attention reads (this step's
    slot included for running rows). Returns fp32 logits [P*n, V] and the cache.
    """
    dtype = cfg.jnp_dtype
    x = constrain(jnp.take(weights.embed, tokens, axis=0).astype(dtype), ("batch", None), mesh)
    cos, sin = _rope_tables(positions, cfg)
    new_kv = []
    for i, w in enumerate(weights.layers):
        x, kv = _decode_layer(w, x, cos, sin, prefix.k[i], prefix.v[i], prefix.start,
                              cache.kv[i], slot, lengths, cfg, attention_impl, mesh)
        new_kv.append(kv)
    x = layers.rms_norm(x, weights.final_norm, cfg.rms_norm_eps)
    if weights.unembed is None:
        logits = jnp.einsum("BD,VD->BV", x, weights.embed, preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("BD,DV->BV", x, weights.unembed, preferred_element_type=jnp.float32)
    return logits, SampleKV(tuple(new_kv))
