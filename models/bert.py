"""A Flax NNX BERT encoder that loads HF `BertModel` safetensors, for dense retrieval.

The module only holds parameters; `forward` and `encode` are free functions
(jitted over the split graph), in the style of `models.transformer`.

Supported checkpoints are BERT-architecture encoders with absolute position
embeddings and post-LayerNorm blocks, e.g.

* sentence-transformers/all-MiniLM-L6-v2 (mean pooling + L2 normalisation;
  `sentence_transformers_pooling` reads this from the directory), and
* MedCPT (ncbi/MedCPT-Query-Encoder, ncbi/MedCPT-Article-Encoder): BERT-base
  encoders whose embedding is the [CLS] hidden state without the pooler layer
  and without normalisation, i.e. `encode(..., pooling="cls", normalize=False)`,
  scored by inner product. The query encoder takes up to 64 tokens, the
  article encoder 512 tokens of "title [SEP] abstract" (a text pair).

Tensor names may carry a `bert.` prefix (as in `BertForMaskedLM` checkpoints);
the pooler, MLM/NSP heads and the `position_ids` buffer are ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import safetensors_io

ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}
POOLINGS = ("cls", "mean")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    dtype: str = "float32"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config", **overrides) -> "BertConfig":
        model_type = hf.get("model_type", "bert")
        if model_type != "bert":
            raise ValueError(f"{source}: model_type {model_type!r} is not a BERT encoder")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{source}: only absolute position embeddings are supported, "
                             f"not {hf['position_embedding_type']!r}")
        act = hf.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise ValueError(f"{source}: unsupported hidden_act {act!r} (known: {sorted(ACTIVATIONS)})")
        try:
            cfg = cls(
                vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
                intermediate_size=hf["intermediate_size"],
                max_position_embeddings=hf.get("max_position_embeddings", 512),
                type_vocab_size=hf.get("type_vocab_size", 2),
                layer_norm_eps=hf.get("layer_norm_eps", 1e-12), hidden_act=act,
                pad_token_id=hf.get("pad_token_id", 0) or 0, **overrides)
        except KeyError as e:
            raise ValueError(f"{source}: missing BERT config field {e.args[0]!r}") from None
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"{source}: hidden_size {cfg.hidden_size} is not divisible by "
                             f"num_attention_heads {cfg.num_heads}")
        return cfg


class BertLayer(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        dt = jnp.dtype(cfg.dtype)
        normal = nnx.initializers.normal(0.02)

        def w(shape):
            return nnx.Param(normal(rngs.params(), shape, dt))

        def zeros(n):
            return nnx.Param(jnp.zeros((n,), dt))

        self.q_w, self.q_b = w((d, d)), zeros(d)
        self.k_w, self.k_b = w((d, d)), zeros(d)
        self.v_w, self.v_b = w((d, d)), zeros(d)
        self.o_w, self.o_b = w((d, d)), zeros(d)
        self.attn_ln_g, self.attn_ln_b = nnx.Param(jnp.ones((d,), dt)), zeros(d)
        self.up_w, self.up_b = w((d, f)), zeros(f)
        self.down_w, self.down_b = w((f, d)), zeros(d)
        self.out_ln_g, self.out_ln_b = nnx.Param(jnp.ones((d,), dt)), zeros(d)


class BertEncoder(nnx.Module):
    """BERT encoder stack. `model(input_ids, attention_mask)` -> last hidden states [B, T, D]."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        d = cfg.hidden_size
        dt = jnp.dtype(cfg.dtype)
        normal = nnx.initializers.normal(0.02)
        self.word_emb = nnx.Param(normal(rngs.params(), (cfg.vocab_size, d), dt))
        self.pos_emb = nnx.Param(normal(rngs.params(), (cfg.max_position_embeddings, d), dt))
        self.type_emb = nnx.Param(normal(rngs.params(), (cfg.type_vocab_size, d), dt))
        self.emb_ln_g, self.emb_ln_b = nnx.Param(jnp.ones((d,), dt)), nnx.Param(jnp.zeros((d,), dt))
        self.layers = nnx.List([BertLayer(cfg, rngs) for _ in range(cfg.num_layers)])

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
        return forward(self, input_ids, attention_mask, token_type_ids)


# --- computation -------------------------------------------------------------

def _layer_norm(x, g, b, eps):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * g.astype(jnp.float32) + b.astype(jnp.float32)).astype(x.dtype)


def forward(model: BertEncoder, input_ids, attention_mask=None, token_type_ids=None):
    """Last hidden states [B, T, D] in the parameter dtype (LayerNorm/softmax in fp32)."""
    cfg = model.config
    b, t = input_ids.shape
    if t > cfg.max_position_embeddings:
        raise ValueError(f"sequence length {t} exceeds max_position_embeddings {cfg.max_position_embeddings}")
    if attention_mask is None:
        attention_mask = jnp.ones((b, t), jnp.int32)
    if token_type_ids is None:
        token_type_ids = jnp.zeros((b, t), jnp.int32)
    x = (model.word_emb[...][input_ids] + model.pos_emb[...][:t][None]
         + model.type_emb[...][token_type_ids])
    x = _layer_norm(x, model.emb_ln_g[...], model.emb_ln_b[...], cfg.layer_norm_eps)
    # additive mask over keys, as HF does: 0 where attended, dtype-min where padded
    bias = jnp.where(attention_mask[:, None, None, :].astype(bool), 0.0,
                     jnp.finfo(jnp.float32).min).astype(jnp.float32)
    act = ACTIVATIONS[cfg.hidden_act]
    n, h = cfg.num_heads, cfg.head_dim
    scale = 1.0 / np.sqrt(h)
    for layer in model.layers:
        def proj(w, bias_):
            return (x @ w[...] + bias_[...]).reshape(b, t, n, h)
        q, k, v = proj(layer.q_w, layer.q_b), proj(layer.k_w, layer.k_b), proj(layer.v_w, layer.v_b)
        scores = jnp.einsum("bqnh,bknh->bnqk", q, k).astype(jnp.float32) * scale + bias
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        ctx = jnp.einsum("bnqk,bknh->bqnh", probs, v).reshape(b, t, n * h)
        attn = ctx @ layer.o_w[...] + layer.o_b[...]
        x = _layer_norm(attn + x, layer.attn_ln_g[...], layer.attn_ln_b[...], cfg.layer_norm_eps)
        mlp = act(x @ layer.up_w[...] + layer.up_b[...]) @ layer.down_w[...] + layer.down_b[...]
        x = _layer_norm(mlp + x, layer.out_ln_g[...], layer.out_ln_b[...], cfg.layer_norm_eps)
    return x


def pool(hidden, attention_mask, pooling: str = "cls", normalize: bool = False):
    """[B, T, D] hidden states -> [B, D] fp32 embeddings.

    "cls": the first token's state (MedCPT, DPR-style). "mean": the average over
    attended tokens (sentence-transformers). `normalize` L2-normalises each row.
    """
    h = hidden.astype(jnp.float32)
    if pooling == "cls":
        out = h[:, 0]
    elif pooling == "mean":
        m = attention_mask.astype(jnp.float32)[..., None]
        out = (h * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    else:
        raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
    if normalize:  # as sentence_transformers.models.Normalize (F.normalize, eps 1e-12)
        out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return out


@functools.partial(jax.jit, static_argnames=("graphdef", "pooling", "normalize"))
def _encode(graphdef, state, input_ids, attention_mask, token_type_ids, pooling, normalize):
    model = nnx.merge(graphdef, state)
    hidden = forward(model, input_ids, attention_mask, token_type_ids)
    return pool(hidden, attention_mask, pooling, normalize)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _hidden(graphdef, state, input_ids, attention_mask, token_type_ids):
    return forward(nnx.merge(graphdef, state), input_ids, attention_mask, token_type_ids)


def hidden_states(model: BertEncoder, input_ids, attention_mask=None, token_type_ids=None) -> jax.Array:
    """Jitted last hidden states [B, T, D]."""
    ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    tt = jnp.zeros_like(ids) if token_type_ids is None else jnp.asarray(token_type_ids, jnp.int32)
    graphdef, state = nnx.split(model)
    return _hidden(graphdef, state, ids, mask, tt)


def encode(model: BertEncoder, input_ids, attention_mask=None, pooling: str = "cls",
           normalize: bool = False, token_type_ids=None) -> jax.Array:
    """Jitted sentence embeddings [B, D] (fp32). One compilation per (shape, pooling, normalize)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
    ids = jnp.asarray(input_ids, jnp.int32)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
    mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    tt = jnp.zeros_like(ids) if token_type_ids is None else jnp.asarray(token_type_ids, jnp.int32)
    graphdef, state = nnx.split(model)
    return _encode(graphdef, state, ids, mask, tt, pooling, bool(normalize))


# --- loading -----------------------------------------------------------------

_TOP = {
    "embeddings.word_embeddings.weight": ("word_emb", False),
    "embeddings.position_embeddings.weight": ("pos_emb", False),
    "embeddings.token_type_embeddings.weight": ("type_emb", False),
    "embeddings.LayerNorm.weight": ("emb_ln_g", False),
    "embeddings.LayerNorm.bias": ("emb_ln_b", False),
}
_LAYER = {  # HF suffix -> (attribute, transpose from torch's [out, in])
    "attention.self.query.weight": ("q_w", True), "attention.self.query.bias": ("q_b", False),
    "attention.self.key.weight": ("k_w", True), "attention.self.key.bias": ("k_b", False),
    "attention.self.value.weight": ("v_w", True), "attention.self.value.bias": ("v_b", False),
    "attention.output.dense.weight": ("o_w", True), "attention.output.dense.bias": ("o_b", False),
    "attention.output.LayerNorm.weight": ("attn_ln_g", False),
    "attention.output.LayerNorm.bias": ("attn_ln_b", False),
    "intermediate.dense.weight": ("up_w", True), "intermediate.dense.bias": ("up_b", False),
    "output.dense.weight": ("down_w", True), "output.dense.bias": ("down_b", False),
    "output.LayerNorm.weight": ("out_ln_g", False), "output.LayerNorm.bias": ("out_ln_b", False),
}
_IGNORED_PREFIXES = ("pooler.", "cls.", "embeddings.position_ids")


def _canonical(name: str) -> str:
    if name.startswith("bert."):
        name = name[len("bert."):]
    # TF-converted checkpoints name LayerNorm parameters gamma/beta
    return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


def expected_hf_names(cfg: BertConfig) -> list[str]:
    return list(_TOP) + [f"encoder.layer.{i}.{s}" for i in range(cfg.num_layers) for s in _LAYER]


def _target(model: BertEncoder, name: str):
    if name in _TOP:
        attr, tr = _TOP[name]
        return getattr(model, attr), tr
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["encoder", "layer"] and parts[2].isdigit() and parts[3] in _LAYER:
        i = int(parts[2])
        if i < len(model.layers):
            attr, tr = _LAYER[parts[3]]
            return getattr(model.layers[i], attr), tr
    return None


def from_pretrained(path: str | os.PathLike, dtype: str = "float32") -> tuple[BertEncoder, BertConfig]:
    """Load an HF BERT directory (config.json + safetensors); every encoder tensor is checked."""
    path = Path(path)
    hf, config_file = safetensors_io.read_config(path, "the encoder")
    cfg = BertConfig.from_hf(hf, source=str(config_file), dtype=str(jnp.dtype(dtype)))
    model = nnx.eval_shape(lambda: BertEncoder(cfg, rngs=nnx.Rngs(0)))
    expected, seen = set(expected_hf_names(cfg)), set()
    for raw_name, host, where in safetensors_io.iter_tensors(path):
        name = _canonical(raw_name)
        if name.startswith(_IGNORED_PREFIXES):
            continue
        target = _target(model, name)
        if target is None or name not in expected:
            raise ValueError(f"{where}: unexpected tensor {raw_name!r} for a BERT encoder "
                             f"with {cfg.num_layers} layers")
        if name in seen:
            raise ValueError(f"{where}: tensor {raw_name!r} appears twice")
        var, transpose = target
        arr = np.asarray(host)
        if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.name != "bfloat16":
            raise ValueError(f"{where}: tensor {raw_name!r} has non-float dtype {arr.dtype}")
        if transpose:
            arr = arr.T
        if arr.shape != tuple(var.shape):
            raise ValueError(f"{where}: tensor {raw_name!r} has shape {tuple(host.shape)}, which does "
                             f"not fit a parameter of shape {tuple(var.shape)}")
        var.value = jnp.asarray(arr.astype(jnp.dtype(dtype)))
        seen.add(name)
    missing = sorted(expected - seen)
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"{path}: missing tensors {missing[:5]}{more}")
    return model, cfg


def sentence_transformers_pooling(path: str | os.PathLike) -> dict:
    """Pooling settings of a sentence-transformers directory, for `encode` and the tokenizer.

    Returns {"pooling": "mean"|"cls", "normalize": bool, "max_len": int | None}; a plain
    HF directory (no modules.json) gives CLS pooling without normalisation.
    """
    path = Path(path)
    out = {"pooling": "cls", "normalize": False, "max_len": None}
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return out
    for module in json.loads(modules_file.read_text()):
        kind = module.get("type", "")
        if kind.endswith("Pooling"):
            pcfg = json.loads((path / module["path"] / "config.json").read_text())
            if pcfg.get("pooling_mode_mean_tokens"):
                out["pooling"] = "mean"
            elif pcfg.get("pooling_mode_cls_token"):
                out["pooling"] = "cls"
            else:
                raise ValueError(f"{path}: unsupported sentence-transformers pooling {pcfg}")
        elif kind.endswith("Normalize"):
            out["normalize"] = True
    st_cfg = path / "sentence_bert_config.json"
    if st_cfg.is_file():
        out["max_len"] = json.loads(st_cfg.read_text()).get("max_seq_length")
    return out
