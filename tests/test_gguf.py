"""GGUF reader, HF conversion, and the PyPI asset cache.

The `gguf` package (llama.cpp's gguf-py) is the independent reference for writing files and for
(de)quantisation; transformers' own GGUF loading is the reference for names, layouts and config.
"""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402

from medssr_jax import assets  # noqa: E402
from models import gguf as mg  # noqa: E402

RNG = np.random.default_rng(0)

# Offsets of the float16 scale fields inside one block (ggml-common.h), so random blocks get
# finite scales rather than random NaN/inf bit patterns.
# --------------------------------------------------------------------------------------------
# a tiny llama written with gguf-py's GGUFWriter
# --------------------------------------------------------------------------------------------

TINY = dict(vocab=96, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128, layers=2, ctx=256)

EXTRA_METADATA = {  # key -> (value, value type, array element type)
    "test.u8": (200, gguf.GGUFValueType.UINT8, None),
    "test.i8": (-100, gguf.GGUFValueType.INT8, None),
    "test.u16": (60000, gguf.GGUFValueType.UINT16, None),
    "test.i16": (-30000, gguf.GGUFValueType.INT16, None),
    "test.i32": (-(2**31), gguf.GGUFValueType.INT32, None),
    "test.u64": (2**63 + 5, gguf.GGUFValueType.UINT64, None),
    "test.i64": (-(2**62), gguf.GGUFValueType.INT64, None),
    "test.f64": (1 / 3, gguf.GGUFValueType.FLOAT64, None),
    "test.bool": (True, gguf.GGUFValueType.BOOL, None),
    "test.str": ("héllo ✓", gguf.GGUFValueType.STRING, None),
    "test.arr_f32": ([0.5, -1.25], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32),
    "test.arr_bool": ([True, False, True], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.BOOL),
    "test.arr_i64": ([-1, 2**40], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT64),
    "test.arr_str": (["a", "", "ü"], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING),
}
# transformers' GGUF reader cannot read arrays of arrays, so only the metadata test writes this one
NESTED = {"test.nested": ([[1, 2], [3]], gguf.GGUFValueType.ARRAY, None)}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py applies to llama q/k weights (LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def make_hf_weights(tied: bool, c: dict, qk_norm: bool, qkv_bias: bool) -> dict[str, np.ndarray]:
    r = lambda *s: (RNG.standard_normal(s) * 0.1).astype(np.float32)  # noqa: E731
    w = {"model.embed_tokens.weight": r(c["vocab"], c["hidden"]), "model.norm.weight": 1 + r(c["hidden"])}
    if not tied:
        w["lm_head.weight"] = r(c["vocab"], c["hidden"])
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = r(c["heads"] * c["head_dim"], c["hidden"])
        w[p + "self_attn.k_proj.weight"] = r(c["kv_heads"] * c["head_dim"], c["hidden"])
        w[p + "self_attn.v_proj.weight"] = r(c["kv_heads"] * c["head_dim"], c["hidden"])
        w[p + "self_attn.o_proj.weight"] = r(c["hidden"], c["heads"] * c["head_dim"])
        w[p + "mlp.gate_proj.weight"] = r(c["ffn"], c["hidden"])
        w[p + "mlp.up_proj.weight"] = r(c["ffn"], c["hidden"])
        w[p + "mlp.down_proj.weight"] = r(c["hidden"], c["ffn"])
        w[p + "input_layernorm.weight"] = 1 + r(c["hidden"])
        w[p + "post_attention_layernorm.weight"] = 1 + r(c["hidden"])
        if qkv_bias:
            w[p + "self_attn.q_proj.bias"] = r(c["heads"] * c["head_dim"])
            w[p + "self_attn.k_proj.bias"] = r(c["kv_heads"] * c["head_dim"])
            w[p + "self_attn.v_proj.bias"] = r(c["kv_heads"] * c["head_dim"])
        if qk_norm:
            w[p + "self_attn.q_norm.weight"] = 1 + r(c["head_dim"])
            w[p + "self_attn.k_norm.weight"] = 1 + r(c["head_dim"])
    return w


def write_tiny_llama(
    path: Path, *, tied=False, alignment=None, extra_tensors=(), arch="llama", rope_scaling=False,
    metadata=EXTRA_METADATA, dims=TINY,
):
    """Write a 2-layer llama (or qwen2/qwen3) GGUF as llama.cpp would; return the HF weights it encodes."""
    c = dims
    qwen3, qwen2 = arch == "qwen3", arch == "qwen2"
    hf = make_hf_weights(tied, c, qk_norm=qwen3, qkv_bias=qwen2)
    w = gguf.GGUFWriter(str(path), arch)
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_context_length(c["ctx"])
    w.add_embedding_length(c["hidden"])
    w.add_block_count(c["layers"])
    w.add_feed_forward_length(c["ffn"])
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv_heads"])
    w.add_rope_dimension_count(c["head_dim"])
    if qwen3:
        w.add_key_length(c["head_dim"])
        w.add_value_length(c["head_dim"])
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    if rope_scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"tok{i}" for i in range(c["vocab"])])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for key, (value, vtype, sub) in metadata.items():
        w.add_key_value(key, value, vtype, sub_type=sub)

    expected = {}  # hf name -> float32 values the file encodes, in HF layout

    def add(gguf_name, hf_name, arr, qtype):
        stored = arr
        permuted = arch == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name)
        if not permuted:
            pass
        elif ".attn_q." in gguf_name:
            stored = llama_cpp_permute(arr, c["heads"])
        elif ".attn_k." in gguf_name:
            stored = llama_cpp_permute(arr, c["kv_heads"])
        if qtype == QT.F32:
            w.add_tensor(gguf_name, stored)
            expected[hf_name] = arr
        elif qtype == QT.F16:
            w.add_tensor(gguf_name, stored.astype(np.float16))
            expected[hf_name] = arr.astype(np.float16).astype(np.float32)
        else:
            q = gguf.quants.quantize(stored, qtype)
            w.add_tensor(gguf_name, q, raw_dtype=qtype)
            deq = gguf.quants.dequantize(q, qtype).reshape(arr.shape)
            if permuted:
                # stored row r is HF row perm[r]; put each stored row back where it came from
                n = c["heads"] if ".attn_q." in gguf_name else c["kv_heads"]
                perm = llama_cpp_permute(np.arange(arr.shape[0])[:, None], n).ravel()
                unpermuted = np.empty_like(deq)
                unpermuted[perm] = deq
                deq = unpermuted
            expected[hf_name] = deq

    add("token_embd.weight", "model.embed_tokens.weight", hf["model.embed_tokens.weight"], QT.F16)
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight", hf[p + "input_layernorm.weight"], QT.F32)
        add(f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight", hf[p + "self_attn.q_proj.weight"], QT.Q8_0)
        add(f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight", hf[p + "self_attn.k_proj.weight"], QT.Q8_0)
        add(f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight", hf[p + "self_attn.v_proj.weight"], QT.Q4_1)
        add(f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight", hf[p + "self_attn.o_proj.weight"], QT.Q8_0)
        if qwen2:
            for x in "qkv":
                add(f"blk.{i}.attn_{x}.bias", p + f"self_attn.{x}_proj.bias", hf[p + f"self_attn.{x}_proj.bias"], QT.F32)
        if qwen3:
            add(f"blk.{i}.attn_q_norm.weight", p + "self_attn.q_norm.weight", hf[p + "self_attn.q_norm.weight"], QT.F32)
            add(f"blk.{i}.attn_k_norm.weight", p + "self_attn.k_norm.weight", hf[p + "self_attn.k_norm.weight"], QT.F32)
        add(f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight",
            hf[p + "post_attention_layernorm.weight"], QT.F32)
        add(f"blk.{i}.ffn_gate.weight", p + "mlp.gate_proj.weight", hf[p + "mlp.gate_proj.weight"], QT.F16)
        add(f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight", hf[p + "mlp.up_proj.weight"], QT.Q5_0)
        add(f"blk.{i}.ffn_down.weight", p + "mlp.down_proj.weight", hf[p + "mlp.down_proj.weight"], QT.F16)
    add("output_norm.weight", "model.norm.weight", hf["model.norm.weight"], QT.F32)
    if not tied:
        add("output.weight", "lm_head.weight", hf["lm_head.weight"], QT.Q8_0)
    for name, arr, qtype in extra_tensors:
        if qtype in (QT.F32, QT.F16):
            w.add_tensor(name, arr if qtype == QT.F32 else arr.astype(np.float16))
        else:
            w.add_tensor(name, arr, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    expected = write_tiny_llama(path)
    return path, expected


def test_metadata_and_tensor_infos_round_trip(tmp_path):
    path = tmp_path / "meta.gguf"
    write_tiny_llama(path, metadata={**EXTRA_METADATA, **NESTED})
    f = mg.GGUFFile(path)
    ref = gguf.GGUFReader(path)
    assert f.version == 3 and f.alignment == 32 and f.data_offset % 32 == 0
    md = f.metadata
    assert md["general.architecture"] == "llama"
    assert md["llama.block_count"] == 2 and md["llama.rope.freq_base"] == 500000.0
    assert md["tokenizer.ggml.tokens"] == [f"tok{i}" for i in range(TINY["vocab"])]
    for key, (value, vtype, _) in {**EXTRA_METADATA, **NESTED}.items():
        assert md[key] == value, key
    assert set(md) == set(ref.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    assert list(f.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        info = f.tensors[t.name]
        assert info.shape == tuple(int(x) for x in reversed(t.shape.tolist()))
        assert info.ggml_type == int(t.tensor_type)
        assert info.offset == t.data_offset and info.nbytes == t.n_bytes
        np.testing.assert_array_equal(f.tensor(t.name), gguf.quants.dequantize(t.data, t.tensor_type))


def test_hf_config_and_tensors(tiny):
    path, expected = tiny
    f = mg.GGUFFile(path)
    cfg = mg.hf_config_from_gguf(f)
    c = TINY
    assert cfg == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c["vocab"],
        "hidden_size": c["hidden"], "intermediate_size": c["ffn"], "num_hidden_layers": c["layers"],
        "num_attention_heads": c["heads"], "num_key_value_heads": c["kv_heads"], "head_dim": c["head_dim"],
        "hidden_act": "silu", "rms_norm_eps": float(np.float32(1e-5)), "rope_theta": 500000.0,
        "max_position_embeddings": c["ctx"], "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    }
    got = dict(mg.iter_hf_tensors(f))
    assert list(got) == list(expected)
    for name, arr in expected.items():
        assert got[name].dtype == np.float32 and got[name].shape == arr.shape, name
        np.testing.assert_array_equal(got[name], arr, err_msg=name)


def test_tiny_matches_transformers(tiny):
    path, _ = tiny
    f = mg.GGUFFile(path)
    config, state = transformers_gguf_load(path)
    ours = dict(mg.iter_hf_tensors(f))
    assert set(state) - set(ours) == set()
    for name, arr in ours.items():
        np.testing.assert_array_equal(arr, state[name], err_msg=name)
    check_config_against_transformers(mg.hf_config_from_gguf(f), config)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_matches_transformers(tmp_path, arch):
    # transformers' qwen3 GGUF config ignores the key length and keeps Qwen3Config's head_dim of 128,
    # as in every real Qwen3, so the tiny qwen3 uses that too.
    dims = {**TINY, "head_dim": 128} if arch == "qwen3" else TINY
    path = tmp_path / f"tiny-{arch}.gguf"
    expected = write_tiny_llama(path, arch=arch, dims=dims)
    f = mg.GGUFFile(path)
    cfg = mg.hf_config_from_gguf(f)
    assert cfg["architectures"] == [{"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]]
    assert cfg["model_type"] == arch and cfg["head_dim"] == dims["head_dim"]
    ours = dict(mg.iter_hf_tensors(f))
    assert list(ours) == list(expected)
    assert ("model.layers.0.self_attn.q_proj.bias" in ours) == (arch == "qwen2")
    for name, arr in expected.items():  # no q/k permutation for qwen
        np.testing.assert_array_equal(ours[name], arr, err_msg=name)
    config, state = transformers_gguf_load(path)
    assert set(state) == set(ours)
    for name, arr in ours.items():
        np.testing.assert_array_equal(arr, state[name], err_msg=name)
    check_config_against_transformers(cfg, config)


def test_tied_embeddings_rope_scaling_and_alignment(tmp_path):
    path = tmp_path / "tied.gguf"
    expected = write_tiny_llama(path, tied=True, alignment=256, rope_scaling=True)
    f = mg.GGUFFile(path)
    assert f.alignment == 256 and f.data_offset % 256 == 0
    assert all(t.offset % 256 == 0 for t in f.tensors.values())
    cfg = mg.hf_config_from_gguf(f)
    assert cfg["tie_word_embeddings"] is True
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    got = dict(mg.iter_hf_tensors(f))
    assert "lm_head.weight" not in got and list(got) == list(expected)
    for name, arr in expected.items():
        np.testing.assert_array_equal(got[name], arr, err_msg=name)


def test_version_2_is_read_and_version_1_rejected(tiny, tmp_path):
    path, _ = tiny
    data = bytearray(path.read_bytes())
    v2 = tmp_path / "v2.gguf"
    v2.write_bytes(bytes(data[:4]) + (2).to_bytes(4, "little") + bytes(data[8:]))
    f = mg.GGUFFile(v2)
    assert f.version == 2
    np.testing.assert_array_equal(f.tensor("token_embd.weight"), mg.GGUFFile(path).tensor("token_embd.weight"))
    v1 = tmp_path / "v1.gguf"
    v1.write_bytes(bytes(data[:4]) + (1).to_bytes(4, "little") + bytes(data[8:]))
    with pytest.raises(ValueError, match=re.escape(str(v1)) + ".*version 1"):
        mg.GGUFFile(v1)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[:-100], "past the end of the file"),  # last tensor cut short
        (lambda b: b[:200], "truncated"),  # cut inside the metadata
        (lambda b: b[:10], "truncated"),  # cut inside the header
        (lambda b: b"GGML" + b[4:], "not a GGUF file"),
        (lambda b: b"", "not a GGUF file"),
    ],
    ids=["truncated-data", "truncated-metadata", "truncated-header", "bad-magic", "empty"],
)
def test_corrupt_files_name_the_file(tiny, tmp_path, damage, message):
    path, _ = tiny
    bad = tmp_path / "damaged.gguf"
    bad.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message) as err:
        mg.GGUFFile(bad)
    assert str(bad) in str(err.value)


def test_other_quant_types_unknown_tensor_and_arch(tmp_path):
    # IQ4_NL (no hand-written dequantizer ever covered it) reads through gguf.quants;
    # Q8_K has no dequantizer anywhere and fails naming the file, tensor and type.
    iq = RNG.integers(0, 256, size=(4, 18 * 2), dtype=np.uint8)  # IQ4_NL: 4 rows of 64 values
    iq[:, 0:2] = np.array([0.01], np.float16).view(np.uint8)
    iq[:, 18:20] = np.array([0.01], np.float16).view(np.uint8)
    q8k = np.zeros((2, 292), np.uint8)  # Q8_K: 2 rows of 256 values
    path = tmp_path / "odd.gguf"
    write_tiny_llama(path, extra_tensors=[("blk.0.attn_sinks.weight", iq, QT.IQ4_NL),
                                          ("blk.0.odd.weight", q8k, QT.Q8_K)])
    f = mg.GGUFFile(path)
    assert f.tensors["blk.0.attn_sinks.weight"].shape == (4, 64)
    assert f.tensors["blk.0.attn_sinks.weight"].type_name == "IQ4_NL"
    np.testing.assert_array_equal(f.tensor("blk.0.attn_sinks.weight"),
                                  gguf.quants.dequantize(iq, QT.IQ4_NL))
    with pytest.raises(ValueError, match="Q8_K") as err:
        f.tensor("blk.0.odd.weight")
    assert str(path) in str(err.value) and "blk.0.odd.weight" in str(err.value)
    with pytest.raises(ValueError, match="blk.0.attn_sinks.weight") as err:
        next(mg.iter_hf_tensors(f))
    assert str(path) in str(err.value)

    other = tmp_path / "gpt2.gguf"
    write_tiny_llama(other, arch="gpt2")
    with pytest.raises(ValueError, match="'gpt2'"):
        mg.hf_config_from_gguf(mg.GGUFFile(other))
    with pytest.raises(ValueError, match="'gpt2'"):
        next(mg.iter_hf_tensors(mg.GGUFFile(other)))


# --------------------------------------------------------------------------------------------
# transformers as the reference
# --------------------------------------------------------------------------------------------


def transformers_gguf_load(path: Path):
    """(config, state dict as float32 numpy) from transformers' own GGUF loading of `path`."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    d, name = str(path.parent), path.name
    if importlib.util.find_spec("accelerate") is not None:
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
        return model.config, {k: v.numpy() for k, v in model.state_dict().items()}
    # from_pretrained(gguf_file=...) insists on accelerate; without it, run the loader it calls.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(d, gguf_file=name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    state = {k: v.float().numpy() for k, v in tensors.items()}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return config, state


def check_config_against_transformers(ours: dict, theirs) -> None:
    from transformers import AutoConfig

    rebuilt = AutoConfig.for_model(**ours)
    assert type(rebuilt) is type(theirs)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "hidden_act", "model_type"):
        if not hasattr(theirs, key):  # e.g. Qwen2Config has no head_dim: it is always hidden / heads
            assert ours[key] == theirs.hidden_size // theirs.num_attention_heads, key
            continue
        assert getattr(rebuilt, key) == getattr(theirs, key), key
        if key in ours:
            assert ours[key] == getattr(theirs, key), key
    assert rebuilt.rope_parameters == theirs.rope_parameters


# --------------------------------------------------------------------------------------------
# the real SmolLM2 GGUF
# --------------------------------------------------------------------------------------------


def gpt2_bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def reference_bpe(
    text: str, tokens: list[str], merges: list[str], specials: list[str], split_digits: bool = True
) -> list[int]:
    """Byte-level BPE straight from the GGUF vocab and merge ranks (SmolLM pre-tokenizer, as in
    llama.cpp: single digits, then the GPT-2 split), as an independent check of the tokenizers."""
    import regex

    vocab = {t: i for i, t in enumerate(tokens)}
    ranks = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
    byte_map = gpt2_bytes_to_unicode()
    gpt2 = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    ids = []
    for part in regex.split("(" + "|".join(map(regex.escape, specials)) + ")", text):
        if part in specials:
            ids.append(vocab[part])
            continue
        for chunk in regex.split(r"(\p{N})", part) if split_digits else [part]:
            for piece in gpt2.findall(chunk):
                word = [byte_map[b] for b in piece.encode("utf-8")]
                while len(word) > 1:
                    pairs = [(ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(word, word[1:]))]
                    rank, i = min(pairs)
                    if rank == 1 << 30:
                        break
                    merged, j, out = word[i] + word[i + 1], 0, []
                    first = (word[i], word[i + 1])
                    while j < len(word):
                        if j < len(word) - 1 and (word[j], word[j + 1]) == first:
                            out.append(merged)
                            j += 2
                        else:
                            out.append(word[j])
                            j += 1
                    word = out
                ids.extend(vocab[w] for w in word)
    return ids


SENTENCES = [
    "Hello world, the patient has fever.",
    "A 45-year-old woman presents with chest pain radiating to the left arm (BP 150/95 mmHg).",
    "Which enzyme is deficient in phenylketonuria?  Answer: phenylalanine hydroxylase.\n",
    "<|im_start|>user\nWhat causes anaemia?<|im_end|>\n",
    "Naïve café — résumé: 3½ µg/kg 🙂",
]


@pytest.mark.real_assets
def test_smollm2_matches_transformers():
    path = assets.smollm2_gguf()
    f = mg.GGUFFile(path)
    ours_cfg = mg.hf_config_from_gguf(f)
    assert ours_cfg["num_hidden_layers"] == 30 and ours_cfg["tie_word_embeddings"] is True
    config, state = transformers_gguf_load(path)
    check_config_against_transformers(ours_cfg, config)

    seen = set()
    for name, arr in mg.iter_hf_tensors(f):
        ref = state[name]
        assert arr.dtype == np.float32 and arr.shape == ref.shape, name
        np.testing.assert_array_equal(arr, ref, err_msg=name)  # same float32 arithmetic: exact
        seen.add(name)
    assert set(state) - seen == {"lm_head.weight"}  # tied to the embedding

    tok = mg.tokenizer_from_gguf(path)
    md = f.metadata
    specials = [t for t, kind in zip(md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]) if kind == 3]
    for s in SENTENCES:
        ids = tok(s)["input_ids"]
        assert ids == reference_bpe(s, md["tokenizer.ggml.tokens"], md["tokenizer.ggml.merges"], specials), s
        assert tok.decode(ids) == s
    assert tok.convert_tokens_to_ids("<|im_start|>") == 1
    assert tok.eos_token_id == ours_cfg["eos_token_id"] == 2


# --------------------------------------------------------------------------------------------
# tokenizer_from_gguf: built from metadata with `tokenizers` alone
# --------------------------------------------------------------------------------------------

# Texts on which SmolLM2's digit-first split and transformers' plain GPT-2 split agree: none has
# a run of two or more whitespace characters right before a digit (see DIGITS_AFTER_WHITESPACE_RUN).
TOKENIZER_TEXTS = [
    "",
    " ",
    "Hello world, the patient has fever.",
    "A 45-year-old woman presents with chest pain radiating to the left arm (BP 150/95 mmHg).",
    "Which enzyme is deficient in phenylketonuria?  Answer: phenylalanine hydroxylase.\n",
    "12345",
    "3.14159, 2,718,281 and 0.5 mg/kg q12h; 9999999999 and -0.001",
    "HbA1c 7.2%, LDL 130 mg/dL, eGFR 58 mL/min/1.73m², Na⁺ 135 mmol/L, T 38.5°C",
    "Answer: (C) 1200 mL/day. Options: A) 5 mg B) 10 mg C) 20 mg D) 40 mg",
    "Naïve café — résumé: 3½ µg/kg 🙂",
    "Emoji: 🩺💊🧬 👩‍⚕️ 🇬🇧 ❤️",
    "中文医学文本：高血压患者应该低盐饮食。",
    "Ελληνικά, русский, العربية, हिन्दी, 日本語のテキスト",
    "e\u0301 versus \u00e9, zero\u200bwidth, no\u00a0break",
    "tabs\tand\t\tmultiple   spaces    here",
    "   leading and trailing   ",
    "line one\nline two\n\n\nline five\r\nwindows\r\n",
    "\n\n",
    "I'm sure it's the patient's; they've said we'd go, you'll see. DON'T",
    "ALL CAPS ABBREVIATIONS: COPD, CHF, MI, DVT/PE, ECG -> ST elevation",
    "def dose(kg):\n    return kg * 15  # mg\n",
    '{"dose": 250, "unit": "mg", "freq": [1, 2, 3]}',
    "\x00\x01 control \x7f chars",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "<|im_start|>user\nWhat causes anaemia?<|im_end|>\n",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nA 30-year-old man has a Hb of 9 g/dL. Next step?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|><|im_end|><|endoftext|>",
    "text<|im_end|>text <|endoftext|> 42",
    "<|im_start |> and <|im_end are not special",
    "<repo_name>medssr<file_sep>a.py\n<gh_stars>100",
]

# A whitespace run right before a digit: the digit-first split keeps the run whole ("ĠĠ", "ĊĊ"),
# the plain GPT-2 split peels its last character off. llama.cpp and SmolLM2's own tokenizer.json
# split digits first; transformers' GGUF tokenizer (5.23) does not, and gives the other ids here.
DIGITS_AFTER_WHITESPACE_RUN = [
    "a  5",
    "Step 1.\n\n2. Give 40 mg IV",
    "Dose:    250 mg",
    "\t\t3",
    "[  1, 2]",
]


@pytest.fixture(scope="module")
def smollm2_tokenizers():
    """(ours, transformers' own GGUF tokenizer, the file's metadata) for SmolLM2."""
    path = assets.smollm2_gguf()
    pytest.importorskip("torch")  # transformers' GGUF tokenizer reader imports it
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return mg.tokenizer_from_gguf(path), ref, mg.GGUFFile(path).metadata


@pytest.mark.real_assets
@pytest.mark.parametrize("text", TOKENIZER_TEXTS, ids=range(len(TOKENIZER_TEXTS)))
def test_smollm2_tokenizer_matches_transformers(smollm2_tokenizers, text):
    ours, ref, md = smollm2_tokenizers
    specials = [t for t, kind in zip(md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]) if kind == 3]
    ids = ours(text)["input_ids"]
    assert ids == ref(text)["input_ids"]
    bare = ours(text, add_special_tokens=False)["input_ids"]
    assert bare == ref(text, add_special_tokens=False)["input_ids"] == ids  # SmolLM2 adds no BOS
    assert ids == reference_bpe(text, md["tokenizer.ggml.tokens"], md["tokenizer.ggml.merges"], specials)
    assert ours.decode(ids) == ref.decode(ids) == text
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)


@pytest.mark.real_assets
def test_smollm2_tokenizer_specials_template_and_vocab(smollm2_tokenizers):
    ours, ref, md = smollm2_tokenizers
    assert type(ours).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    for name in ("bos", "eos", "pad", "unk"):
        assert getattr(ours, f"{name}_token") == getattr(ref, f"{name}_token"), name
        assert getattr(ours, f"{name}_token_id") == getattr(ref, f"{name}_token_id"), name
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == (1, 2, 2, 0)
    assert ours.bos_token_id == md["tokenizer.ggml.bos_token_id"]
    assert ours.eos_token_id == md["tokenizer.ggml.eos_token_id"]
    assert ours.add_bos_token is False and md["tokenizer.ggml.add_bos_token"] is False
    assert ours.chat_template == ref.chat_template == md["tokenizer.chat_template"]
    assert ours.get_vocab() == ref.get_vocab() and len(ours) == len(ref) == 49152
    assert ours.added_tokens_decoder == ref.added_tokens_decoder
    assert sorted(ours.added_tokens_decoder) == list(range(17))  # the 17 CONTROL tokens
    assert all(t.special for t in ours.added_tokens_decoder.values())
    assert ours.all_special_ids == ref.all_special_ids

    messages = [{"role": "user", "content": "A 30-year-old man has a Hb of 9 g/dL. Next step?"}]
    text = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>assistant\n")

    batch = ["short", "a much longer sentence about 12 patients"]
    ours_b, ref_b = ours(batch, padding=True), ref(batch, padding=True)
    assert ours_b["input_ids"] == ref_b["input_ids"] and ours_b["attention_mask"] == ref_b["attention_mask"]
    assert ours_b["input_ids"][0][-1] == ours.pad_token_id

    # Any id sequence, including ones that cut a UTF-8 character in half, decodes the same way.
    rng = np.random.default_rng(1)
    for _ in range(20):
        ids = rng.integers(0, len(ours), size=50).tolist()
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


@pytest.mark.real_assets
@pytest.mark.parametrize("text", DIGITS_AFTER_WHITESPACE_RUN)
def test_smollm2_tokenizer_splits_digits_first_like_llama_cpp(smollm2_tokenizers, text):
    ours, _, md = smollm2_tokenizers
    tokens, merges = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.merges"]
    ids = ours(text)["input_ids"]
    assert ids == reference_bpe(text, tokens, merges, ["<|im_start|>"])
    assert ids != reference_bpe(text, tokens, merges, ["<|im_start|>"], split_digits=False)  # it matters here
    assert ours.decode(ids) == text


# A tiny byte-level BPE vocabulary written with gguf-py, for what SmolLM2's file does not cover.

BYTE_CHARS = list(gpt2_bytes_to_unicode().values())
TINY_CONTROL = ["<|endoftext|>", "<|bos|>", "<|eos|>"]
TINY_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "Ġ Ġ", "ĠĠ ĠĠ", "Ċ Ċ", "1 2", "12 3", "p a", "Ġ pa"]


def write_tiny_tokenizer(path: Path, *, pre="gpt2", model="gpt2", extra_tokens=(), **flags) -> list[str]:
    """A GGUF holding only a tokenizer: 3 CONTROL tokens, the 256 byte tokens, one token per merge,
    a USER_DEFINED ``<think>``, then `extra_tokens` (NORMAL). Returns the token list."""
    merged = [m.replace(" ", "") for m in TINY_MERGES]
    tokens = [*TINY_CONTROL, *BYTE_CHARS, *merged, "<think>", *extra_tokens]
    types = [3] * len(TINY_CONTROL) + [1] * (len(BYTE_CHARS) + len(merged)) + [4] + [1] * len(extra_tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(TINY_MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(0)
    if "add_bos" in flags:
        w.add_add_bos_token(flags["add_bos"])
    if "add_eos" in flags:
        w.add_add_eos_token(flags["add_eos"])
    if "chat_template" in flags:
        w.add_chat_template(flags["chat_template"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tokens


TINY_TEXTS = [
    "the patient in the theatre; 12345 and 123 12",
    "  the   the\n\n\nthe\r\n",
    "I'm sure it's THE thing they'll see; ünïcödé 🙂 中文",
    "<|bos|>the<|eos|> <think>in</think> <|endoftext|>",
    "mixed123abc 4567890 x1y2",
]


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2"])
def test_tiny_tokenizer_matches_transformers(tmp_path, pre):
    pytest.importorskip("torch")  # for the reference only
    from transformers import AutoTokenizer

    path = tmp_path / f"tok-{pre}.gguf"
    write_tiny_tokenizer(path, pre=pre, add_bos=False, chat_template="{{ messages }}")
    ours = mg.tokenizer_from_gguf(path)
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in TINY_TEXTS:
        assert ours.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text) == \
            ref.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text), text
        ids = ours(text)["input_ids"]
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids) == ref.decode(ids) == text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert ours.get_vocab() == ref.get_vocab()
    specials = (ours.bos_token, ours.eos_token, ours.unk_token, ours.pad_token)
    assert specials == ("<|bos|>", "<|eos|>", "<|endoftext|>", "<|endoftext|>")
    assert ours.chat_template == ref.chat_template == "{{ messages }}"


def test_tiny_tokenizer_added_tokens_and_pre_tokenizers(tmp_path):
    tokens = write_tiny_tokenizer(tmp_path / "gpt2.gguf", pre="gpt2")
    tok = mg.tokenizer_from_gguf(tmp_path / "gpt2.gguf")
    vocab = {t: i for i, t in enumerate(tokens)}
    ids = tok("x<think>the<|eos|>")["input_ids"]
    assert ids == [vocab["x"], vocab["<think>"], vocab["t"], vocab["he"], vocab["<|eos|>"]]
    # CONTROL tokens are special (dropped when skipping specials); USER_DEFINED ones are text.
    assert tok.decode(ids, skip_special_tokens=True) == "x<think>the"
    assert tok.added_tokens_decoder[vocab["<|eos|>"]].special is True
    assert tok.added_tokens_decoder[vocab["<think>"]].special is False
    assert tok.chat_template is None and tok.add_bos_token is False
    # the GPT-2 split keeps a number together, so the digit merges apply
    assert tok.convert_ids_to_tokens(tok("12345")["input_ids"]) == ["123", "4", "5"]

    # "smollm": each digit on its own before the GPT-2 split, so no digit merge applies.
    write_tiny_tokenizer(tmp_path / "smollm.gguf", pre="smollm")
    tok = mg.tokenizer_from_gguf(tmp_path / "smollm.gguf")
    for text in TINY_TEXTS:
        assert tok(text)["input_ids"] == reference_bpe(text, tokens, TINY_MERGES, [*TINY_CONTROL, "<think>"]), text
    assert tok.convert_ids_to_tokens(tok("12345")["input_ids"]) == ["1", "2", "3", "4", "5"]

    # Llama 3: numbers in groups of three, and a word that is in the vocabulary is taken whole even
    # where the merges would not build it (llama.cpp's ignore_merges for this family).
    write_tiny_tokenizer(tmp_path / "llama3.gguf", pre="llama-bpe", extra_tokens=["Ġpatient"])
    tok = mg.tokenizer_from_gguf(tmp_path / "llama3.gguf")
    assert tok.convert_ids_to_tokens(tok("12345 the patient", add_special_tokens=False)["input_ids"]) == \
        ["123", "4", "5", "Ġthe", "Ġpatient"]
    write_tiny_tokenizer(tmp_path / "gpt2-extra.gguf", pre="gpt2", extra_tokens=["Ġpatient"])
    tok = mg.tokenizer_from_gguf(tmp_path / "gpt2-extra.gguf")
    assert tok.convert_ids_to_tokens(tok(" patient")["input_ids"]) == ["Ġpa", "t", "i", "e", "n", "t"]


def test_tiny_tokenizer_bos_eos_flags(tmp_path):
    def encode(name, **kw):
        write_tiny_tokenizer(tmp_path / name, **kw)
        tok = mg.tokenizer_from_gguf(tmp_path / name)
        return tok, tok.convert_ids_to_tokens(tok("the")["input_ids"])

    tok, toks = encode("plain.gguf")
    assert toks == ["t", "he"] and tok.add_bos_token is False and tok.add_eos_token is False
    tok, toks = encode("both.gguf", add_bos=True, add_eos=True)
    assert toks == ["<|bos|>", "t", "he", "<|eos|>"] and tok.add_bos_token is True and tok.add_eos_token is True
    assert tok.convert_ids_to_tokens(tok("the", add_special_tokens=False)["input_ids"]) == ["t", "he"]
    assert tok.decode(tok("the")["input_ids"], skip_special_tokens=True) == "the"
    # Llama 3 files add BOS unless they say otherwise, as llama.cpp does.
    assert encode("llama3.gguf", pre="llama-bpe")[1] == ["<|bos|>", "t", "he"]
    assert encode("llama3-nobos.gguf", pre="llama-bpe", add_bos=False)[1] == ["t", "he"]


def test_tokenizer_from_gguf_errors_name_the_file(tmp_path):
    sp = tmp_path / "sentencepiece.gguf"
    write_tiny_tokenizer(sp, model="llama")
    with pytest.raises(ValueError, match="tokenizer.ggml.model 'llama' is not supported") as err:
        mg.tokenizer_from_gguf(sp)
    assert str(sp) in str(err.value)
    odd = tmp_path / "odd-pre.gguf"
    write_tiny_tokenizer(odd, pre="no-such-pre")
    with pytest.raises(ValueError, match="pre-tokenizer 'no-such-pre'") as err:
        mg.tokenizer_from_gguf(odd)
    assert str(odd) in str(err.value) and "smollm" in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        mg.tokenizer_from_gguf(tmp_path / "missing.gguf")
    # no tokenizer.ggml.pre at all: the GPT-2 split, as in transformers
    write_tiny_tokenizer(tmp_path / "no-pre.gguf", pre=None)
    tok = mg.tokenizer_from_gguf(tmp_path / "no-pre.gguf")
    assert tok.convert_ids_to_tokens(tok("12345")["input_ids"]) == ["123", "4", "5"]


NO_TORCH = """
import json, sys
sys.modules["torch"] = None  # `import torch` now raises ImportError
from models.gguf import tokenizer_from_gguf
tok = tokenizer_from_gguf(sys.argv[1])
assert sys.modules["torch"] is None
print(json.dumps([tok(t)["input_ids"] for t in json.loads(sys.argv[2])]))
"""


@pytest.mark.parametrize(
    "which", ["tiny", pytest.param("smollm2", marks=[pytest.mark.real_assets, pytest.mark.slow])]
)
def test_tokenizer_from_gguf_needs_no_torch(tmp_path, which):
    if which == "tiny":
        path, texts = tmp_path / "tiny.gguf", TINY_TEXTS
        write_tiny_tokenizer(path, pre="smollm")
    else:
        path, texts = assets.smollm2_gguf(), TOKENIZER_TEXTS
    out = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(path), json.dumps(texts)],
        cwd=Path(__file__).parents[1], capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    tok = mg.tokenizer_from_gguf(path)
    assert json.loads(out.stdout.splitlines()[-1]) == [tok(t)["input_ids"] for t in texts]


# --------------------------------------------------------------------------------------------
# the asset cache (pip replaced by a fake, so no network)
# --------------------------------------------------------------------------------------------


class FakePip:
    def __init__(self, rc=0, payload=b"payload"):
        self.rc, self.payload, self.calls = rc, payload, []

    def __call__(self, cmd, **kwargs):
        self.calls.append(cmd)
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "--only-binary=:all:" in cmd
        spec = next(a for a in cmd if "==" in a)
        name, version = spec.split("==")
        if self.rc == 0:
            dest = Path(cmd[cmd.index("-d") + 1])
            dest.mkdir(parents=True, exist_ok=True)
            mod = name.replace("-", "_")
            with zipfile.ZipFile(dest / f"{mod}-{version}-py3-none-any.whl", "w") as zf:
                zf.writestr(f"{mod}/data/file.bin", self.payload)
                zf.writestr(f"{mod}-{version}.dist-info/METADATA", "Name: x\n")
        return subprocess.CompletedProcess(cmd, self.rc)


def test_fetch_pypi_package_caches(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDSSR_JAX_CACHE", str(tmp_path / "cache"))
    fake = FakePip()
    monkeypatch.setattr(assets.subprocess, "run", fake)
    d = assets.fetch_pypi_package("some-pkg", "1.2.3")
    assert d == tmp_path / "cache" / "pypi" / "some-pkg-1.2.3"
    assert (d / "some_pkg" / "data" / "file.bin").read_bytes() == b"payload"
    assert (d / assets.COMPLETE_MARKER).is_file()
    assert f"fetching some-pkg==1.2.3 from PyPI into {d}" in capsys.readouterr().err
    assert assets.fetch_pypi_package("some-pkg", "1.2.3") == d
    assert len(fake.calls) == 1  # second call is a cache hit
    assert sorted(p.name for p in d.parent.iterdir()) == ["some-pkg-1.2.3"]  # no staging left


def test_fetch_pypi_package_failures(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSSR_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(assets.subprocess, "run", FakePip(rc=1))
    with pytest.raises(RuntimeError, match=r"no-such-pkg==0\.1"):
        assets.fetch_pypi_package("no-such-pkg", "0.1")
    monkeypatch.setattr(assets.subprocess, "run", FakePip())
    with pytest.raises(RuntimeError, match="sha256"):
        assets.fetch_pypi_package("some-pkg", "1.0", sha256="0" * 64)
    assert list((tmp_path / "pypi").iterdir()) == []  # nothing half-made left behind
    # an entry without the marker is treated as absent and replaced
    stale = tmp_path / "pypi" / "some-pkg-1.0"
    (stale / "junk").mkdir(parents=True)
    d = assets.fetch_pypi_package("some-pkg", "1.0")
    assert d == stale and not (d / "junk").exists() and (d / assets.COMPLETE_MARKER).is_file()


def test_asset_env_overrides(tmp_path, monkeypatch):
    def no_pip(*a, **k):
        raise AssertionError("pip must not run when an override is set")

    monkeypatch.setattr(assets.subprocess, "run", no_pip)
    g = tmp_path / "model.gguf"
    g.write_bytes(b"GGUF")
    monkeypatch.setenv("MEDSSR_SMOLLM2_GGUF", str(g))
    assert assets.smollm2_gguf() == g
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / f).write_text("{}")
    monkeypatch.setenv("MEDSSR_MINILM_DIR", str(tmp_path))
    assert assets.minilm_dir() == tmp_path
    monkeypatch.setenv("MEDSSR_QWEN_TIKTOKEN", str(g))
    assert assets.qwen_tiktoken() == g
    (tmp_path / "hp.obo").write_text("")
    (tmp_path / "phenotype.hpoa").write_text("")
    monkeypatch.setenv("MEDSSR_HPO_DIR", str(tmp_path))
    assert assets.hpo_files() == {"hp.obo": tmp_path / "hp.obo", "phenotype.hpoa": tmp_path / "phenotype.hpoa"}
    monkeypatch.setenv("MEDSSR_SMOLLM2_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="MEDSSR_SMOLLM2_GGUF"):
        assets.smollm2_gguf()


def test_assets_module_does_not_import_torch():
    code = "import sys; import medssr_jax.assets; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def write_config_only(path: Path, **overrides):
    """A llama GGUF holding only config metadata; overrides: key suffix -> (value, GGUFValueType)."""
    vt = gguf.GGUFValueType
    keys = {"context_length": (256, vt.UINT32), "embedding_length": (64, vt.UINT32),
            "block_count": (2, vt.UINT32), "feed_forward_length": (128, vt.UINT32),
            "attention.head_count": (4, vt.UINT32), "attention.head_count_kv": (2, vt.UINT32),
            "attention.layer_norm_rms_epsilon": (1e-5, vt.FLOAT32), "vocab_size": (96, vt.UINT32)}
    keys.update(overrides)
    w = gguf.GGUFWriter(str(path), "llama")
    for key, (value, vtype) in keys.items():
        w.add_key_value(f"llama.{key}", value, vtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("overrides, message", [
    ({}, None),
    ({"attention.head_count": (0, gguf.GGUFValueType.UINT32)},
     r"'llama\.attention\.head_count' must be positive, got 0"),
    ({"attention.head_count_kv": (0, gguf.GGUFValueType.UINT32)},
     r"'llama\.attention\.head_count_kv' must be positive, got 0"),
    ({"block_count": ("two", gguf.GGUFValueType.STRING)},
     r"'llama\.block_count' must be an integer, got STRING 'two'"),
    ({"attention.layer_norm_rms_epsilon": ("tiny", gguf.GGUFValueType.STRING)},
     r"'llama\.attention\.layer_norm_rms_epsilon' must be a float, got STRING"),
    ({"block_count": (10**9, gguf.GGUFValueType.UINT32)},
     r"'llama\.block_count' is 1000000000, more than 4096; the file is corrupt"),
    ({"embedding_length": (2, gguf.GGUFValueType.UINT32)},
     r"llama\.embedding_length=2 is smaller than llama\.attention\.head_count=4"),
], ids=["valid", "zero-heads", "zero-kv-heads", "string-layers", "string-eps", "absurd-layers",
        "tiny-hidden"])
def test_bad_metadata_names_the_key(tmp_path, overrides, message):
    path = write_config_only(tmp_path / "cfg.gguf", **overrides)
    f = mg.GGUFFile(path)
    if message is None:
        cfg = mg.hf_config_from_gguf(f)
        assert cfg["num_attention_heads"] == 4 and cfg["head_dim"] == 16 and cfg["vocab_size"] == 96
        return
    with pytest.raises(ValueError, match=message) as err:
        mg.hf_config_from_gguf(f)
    assert str(path) in str(err.value)
