"""Model configuration: one frozen dataclass for the Qwen3 and Llama families.

Both families share one decoder (pre-norm, GQA attention with rotary, SwiGLU
MLP); they differ only in data: Qwen3 normalises q and k per head, Llama 3.1+
rescales rotary frequencies. `from_hf` / `to_hf` translate HF `config.json`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from medssr_jax.chat import template_name

SUPPORTED_ARCHITECTURES = {
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 frequency rescaling (HF `rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str  # "qwen3" | "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 40_960
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    chat_template: str = "raw"  # medssr_jax.chat template name
    # Numerics: weights stored in param_dtype, matmuls in dtype, norms/softmax/logits in fp32.
    dtype: str = "float32"
    param_dtype: str = "float32"
    # Backward-pass recomputation per layer: "none", "full" (save only layer inputs),
    # "dots" (save matmul outputs, recompute the rest) or "names" (save q/k/v, the
    # attention context and the residual-stream projections; recompute the MLP).
    remat: str = "none"
    # Full-sequence attention: "xla" (einsum + fp32 softmax, the parity reference) or
    # "cudnn" (jax.nn.dot_product_attention's fused kernel, GPU only).
    attention_impl: str = "xla"

    def __post_init__(self):
        if self.family not in ("qwen3", "llama"):
            raise ValueError(f"model family {self.family!r} not supported (qwen3, llama)")
        if self.remat not in ("none", "full", "dots", "names"):
            raise ValueError(f"remat must be none, full, dots or names, got {self.remat!r}")
        if self.attention_impl not in ("xla", "cudnn"):
            raise ValueError(f"attention_impl must be xla or cudnn, got {self.attention_impl!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")

    @property
    def qk_norm(self) -> bool:
        return self.family == "qwen3"

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def num_params(self) -> int:
        d, h = self.hidden_size, self.head_dim
        attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        norms = 2 * d + (2 * h if self.qk_norm else 0)
        mlp = 3 * d * self.intermediate_size
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp + norms) + emb + d

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return self.num_layers * self.num_kv_heads * self.head_dim * 2 * dtype_bytes

    # --- HF config.json -------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, source: str = "config.json", chat_template_text: str | None = None,
                **overrides) -> "ModelConfig":
        """``chat_template_text``: the checkpoint's own jinja chat template, if any; it
        decides the built-in template name (see :func:`medssr_jax.chat.template_name`)."""
        archs = hf.get("architectures") or []
        family = None
        for a in archs:
            family = SUPPORTED_ARCHITECTURES.get(a, family)
        if family is None:
            family = {"qwen3": "qwen3", "llama": "llama"}.get(hf.get("model_type", ""))
        if family is None:
            raise ValueError(
                f"{source}: architecture {archs or hf.get('model_type')!r} not supported; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)}")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ValueError(f"{source}: attention_bias/mlp_bias=True is not supported")
        try:
            heads = hf["num_attention_heads"]
            d = hf["hidden_size"]
            rope_params = hf.get("rope_parameters") or {}
            rs = hf.get("rope_scaling") or (rope_params if rope_params.get("rope_type") not in (None, "default") else None)
            scaling = None
            if rs:
                kind = rs.get("rope_type", rs.get("type"))
                if kind != "llama3":
                    raise ValueError(f"{source}: rope_scaling type {kind!r} not supported (llama3)")
                scaling = RopeScaling(float(rs["factor"]), float(rs["low_freq_factor"]),
                                      float(rs["high_freq_factor"]),
                                      int(rs["original_max_position_embeddings"]))
            theta = hf.get("rope_theta", rope_params.get("rope_theta", 10_000.0))
            eos = hf.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
            cfg = dict(
                family=family,
                vocab_size=hf["vocab_size"],
                hidden_size=d,
                intermediate_size=hf["intermediate_size"],
                num_layers=hf["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=hf.get("num_key_value_heads") or heads,
                head_dim=hf.get("head_dim") or d // heads,
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                rope_scaling=scaling,
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                max_position_embeddings=int(hf.get("max_position_embeddings", 40_960)),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=eos_ids,
                chat_template=template_name(chat_template_text, family=family, vocab_size=hf["vocab_size"]),
            )
        except KeyError as e:
            raise ValueError(f"{source}: missing field {e.args[0]!r}") from None
        cfg.update(overrides)
        return cls(**cfg)

    def to_hf(self) -> dict[str, Any]:
        arch = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}[self.family]
        out: dict[str, Any] = dict(
            architectures=[arch],
            model_type=self.family,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            attention_bias=False,
            attention_dropout=0.0,
            torch_dtype=self.param_dtype,
        )
        if self.family == "llama":
            out["mlp_bias"] = False
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            out["rope_scaling"] = dict(
                rope_type="llama3", factor=rs.factor, low_freq_factor=rs.low_freq_factor,
                high_freq_factor=rs.high_freq_factor,
                original_max_position_embeddings=rs.original_max_position_embeddings)
        if self.bos_token_id is not None:
            out["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            out["eos_token_id"] = (list(self.eos_token_ids) if len(self.eos_token_ids) > 1
                                   else self.eos_token_ids[0])
        return out


# --- presets -------------------------------------------------------------

def _qwen3(layers, d, ff, heads, tied, **kw):
    return ModelConfig(family="qwen3", vocab_size=151_936, hidden_size=d, intermediate_size=ff,
                       num_layers=layers, num_heads=heads, num_kv_heads=8, head_dim=128,
                       rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=tied,
                       max_position_embeddings=40_960, bos_token_id=None,
                       eos_token_ids=(151_645, 151_643), chat_template="qwen3", **kw)


_LLAMA31_SCALING = RopeScaling(8.0, 1.0, 4.0, 8192)
_LLAMA32_SCALING = RopeScaling(32.0, 1.0, 4.0, 8192)


def _llama3(layers, d, ff, heads, head_dim, tied, scaling):
    return ModelConfig(family="llama", vocab_size=128_256, hidden_size=d, intermediate_size=ff,
                       num_layers=layers, num_heads=heads, num_kv_heads=8, head_dim=head_dim,
                       rms_norm_eps=1e-5, rope_theta=500_000.0, rope_scaling=scaling,
                       tie_word_embeddings=tied, max_position_embeddings=131_072,
                       bos_token_id=128_000, eos_token_ids=(128_001, 128_008, 128_009),
                       chat_template="llama3")


def _smollm2(layers, d, ff, heads, kv, theta):
    return ModelConfig(family="llama", vocab_size=49_152, hidden_size=d, intermediate_size=ff,
                       num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=64,
                       rms_norm_eps=1e-5, rope_theta=theta, tie_word_embeddings=True,
                       max_position_embeddings=8192, bos_token_id=1, eos_token_ids=(2,),
                       chat_template="smollm2")


PRESETS: dict[str, ModelConfig] = {
    "qwen3_0p6b": _qwen3(28, 1024, 3072, 16, True),
    "qwen3_1p7b": _qwen3(28, 2048, 6144, 16, True),
    "qwen3_4b": _qwen3(36, 2560, 9728, 32, True),
    "qwen3_8b": _qwen3(36, 4096, 12288, 32, False),
    "qwen3_14b": _qwen3(40, 5120, 17408, 40, False),
    "qwen3_32b": _qwen3(64, 5120, 25600, 64, False),
    "llama31_8b": _llama3(32, 4096, 14336, 32, 128, False, _LLAMA31_SCALING),
    "llama32_1b": _llama3(16, 2048, 8192, 32, 64, True, _LLAMA32_SCALING),
    "llama32_3b": _llama3(28, 3072, 8192, 24, 128, True, _LLAMA32_SCALING),
    "smollm2_135m": _smollm2(30, 576, 1536, 9, 3, 100_000.0),
    "smollm2_360m": _smollm2(32, 960, 2560, 15, 5, 100_000.0),
    "smollm2_1p7b": _smollm2(24, 2048, 8192, 32, 32, 130_000.0),
    # Small random model for tests and the CPU smoke path.
    "tiny": ModelConfig(family="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128,
                        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                        rope_theta=10_000.0, tie_word_embeddings=True,
                        max_position_embeddings=2048, eos_token_ids=(1,)),
}
# Base checkpoints share the architecture; only the prompt format differs.
for _name in ("qwen3_0p6b", "qwen3_1p7b", "qwen3_4b", "qwen3_8b", "qwen3_14b"):
    PRESETS[_name + "_base"] = PRESETS[_name].replace(chat_template="raw", eos_token_ids=(151_643,))
PRESETS["llama31_8b_instruct"] = PRESETS["llama31_8b"]
PRESETS["smollm2_135m_instruct"] = PRESETS["smollm2_135m"]


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
