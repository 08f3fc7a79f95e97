"""HF checkpoint key mapping for the Qwen3/Llama decoder.

One table: HF tensor name pattern -> module path, with the layout change in
each direction. Both the safetensors and the GGUF loaders apply it.
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np

from models.config import ModelConfig

Path = tuple  # ("layers", 3, "q_dnh")
Transform = Callable[[np.ndarray, ModelConfig], np.ndarray]
# read(hf_index) -> that part of the HF tensor; see read_part.
Reader = Callable[[tuple], np.ndarray]


class _HeadsIn:
    """HF [heads*H, D] -> ours [D, heads, H]."""

    def __init__(self, heads_attr: str):
        self.heads_attr = heads_attr

    def __call__(self, w: np.ndarray, c: ModelConfig) -> np.ndarray:
        return w.reshape(getattr(c, self.heads_attr), c.head_dim, c.hidden_size).transpose(2, 0, 1)


_heads_in = _HeadsIn


def _heads_out(w: np.ndarray, c: ModelConfig) -> np.ndarray:
    d, n, h = w.shape
    return w.transpose(1, 2, 0).reshape(n * h, d)


def _o_in(w, c):  # HF [D, N*H] -> [N, H, D]
    return w.reshape(c.hidden_size, c.num_heads, c.head_dim).transpose(1, 2, 0)


def _o_out(w, c):
    n, h, d = w.shape
    return w.transpose(2, 0, 1).reshape(d, n * h)


def _t(w, c):
    return w.T


def _id(w, c):
    return w


# (HF pattern, our path template, to ours, to HF); "{i}" is the layer index.
RULES: list[tuple[str, tuple, Transform, Transform]] = [
    (r"model\.embed_tokens\.weight", ("embed_vd",), _id, _id),
    (r"model\.norm\.weight", ("final_norm",), _id, _id),
    (r"lm_head\.weight", ("lm_head_dv",), _t, _t),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", ("layers", "{i}", "attn_norm"), _id, _id),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", ("layers", "{i}", "mlp_norm"), _id, _id),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", ("layers", "{i}", "q_dnh"), _heads_in("num_heads"), _heads_out),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", ("layers", "{i}", "k_dkh"), _heads_in("num_kv_heads"), _heads_out),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", ("layers", "{i}", "v_dkh"), _heads_in("num_kv_heads"), _heads_out),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", ("layers", "{i}", "o_nhd"), _o_in, _o_out),
    (r"model\.layers\.(\d+)\.self_attn\.q_norm\.weight", ("layers", "{i}", "q_norm"), _id, _id),
    (r"model\.layers\.(\d+)\.self_attn\.k_norm\.weight", ("layers", "{i}", "k_norm"), _id, _id),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", ("layers", "{i}", "gate_df"), _t, _t),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", ("layers", "{i}", "up_df"), _t, _t),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", ("layers", "{i}", "down_fd"), _t, _t),
]
_COMPILED = [(re.compile(p + r"\Z"), path, fwd, back) for p, path, fwd, back in RULES]


def _whole(index: tuple, shape: tuple) -> tuple:
    return tuple(slice(*s.indices(n)) for s, n in zip(index, shape))


def read_part(transform: Transform, read: Reader, index: tuple, ours_shape: tuple,
              cfg: ModelConfig) -> np.ndarray:
    """(transform(hf tensor))[index], reading only the HF rows/columns it needs: a device's
    shard of a parameter straight from a sharded-read-capable file (safetensors get_slice).
    index: a tuple of step-1 slices over our layout (as jax.make_array_from_callback gives)."""
    idx = _whole(index, ours_shape)
    if transform is _id:
        return read(idx)
    if transform is _t:
        return read(idx[::-1]).T
    if isinstance(transform, _HeadsIn):  # ours [D, n, H] <- HF [n*H, D]
        d, n, h = idx
        rows = slice(n.start * cfg.head_dim, n.stop * cfg.head_dim)
        part = read((rows, d))
        return part.reshape(n.stop - n.start, cfg.head_dim, -1).transpose(2, 0, 1)[:, :, h]
    if transform is _o_in:  # ours [N, H, D] <- HF [D, N*H]
        n, h, d = idx
        cols = slice(n.start * cfg.head_dim, n.stop * cfg.head_dim)
        part = read((d, cols))
        return part.reshape(-1, n.stop - n.start, cfg.head_dim).transpose(1, 2, 0)[:, h, :]
    return transform(read(()), cfg)[idx]


def hf_to_path(name: str) -> tuple[Path, Transform] | None:
    """Our module path and the layout transform for an HF tensor name (None if unknown)."""
    for pattern, template, fwd, _ in _COMPILED:
        m = pattern.match(name)
        if m:
            path = tuple(int(m.group(1)) if part == "{i}" else part for part in template)
            return path, fwd
    return None


def path_to_hf(path: Path) -> tuple[str, Transform]:
    """Inverse of hf_to_path, for export."""
    for pattern, template, _, back in RULES:
        if len(template) != len(path):
            continue
        if all(t == p or (t == "{i}" and isinstance(p, int)) for t, p in zip(template, path)):
            name = pattern.replace(r"(\d+)", str(path[1]) if len(path) > 1 else "").replace("\\.", ".")
            return name, back
    raise KeyError(f"no HF name for parameter {'/'.join(map(str, path))}")


def expected_hf_names(cfg: ModelConfig) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    per_layer = ["input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                 "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    if cfg.qk_norm:
        per_layer += ["self_attn.q_norm", "self_attn.k_norm"]
    for i in range(cfg.num_layers):
        names += [f"model.layers.{i}.{p}.weight" for p in per_layer]
    return names
