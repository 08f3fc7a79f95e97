"""Tiny random transformers models, built and saved in the test, for parity checks."""

from __future__ import annotations

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=32)


def make_hf_model(family: str, *, heads: int = 4, kv_heads: int = 2, tied: bool = False,
                  rope_scaling: dict | None = None, layers: int = 2, vocab: int = 160,
                  hidden: int = 64, head_dim: int = 16, seed: int = 0):
    """A random model whose weights are large enough that errors would show.

    Default init (std 0.02) makes every logit ~0 and hides bugs; matrices get
    std 0.15 and norm weights 1 +- 0.2 instead.
    """
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden - 16,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  head_dim=head_dim, tie_word_embeddings=tied, rope_theta=10_000.0,
                  max_position_embeddings=512, rms_norm_eps=1e-6, attn_implementation="eager")
    if family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, rope_scaling=rope_scaling))
    else:
        raise ValueError(family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
            else:
                p.normal_(1.0, 0.2)
    return model.eval()


def hf_logits(model, tokens: np.ndarray, attention_mask: np.ndarray | None = None,
              position_ids: np.ndarray | None = None) -> np.ndarray:
    kw = {}
    if attention_mask is not None:
        kw["attention_mask"] = torch.tensor(attention_mask)
    if position_ids is not None:
        kw["position_ids"] = torch.tensor(position_ids)
    with torch.no_grad():
        return model(torch.tensor(tokens), **kw).logits.float().numpy()


def max_rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """Max abs error relative to the logit scale (max |ref|)."""
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / max(np.abs(ref).max(), 1e-6))
