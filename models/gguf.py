"""GGUF checkpoints: llama.cpp's ``gguf`` package reads and dequantises, this module maps to
Hugging Face names, layouts and config.

:class:`GGUFFile` is a thin layer over ``gguf.GGUFReader`` (memory-mapped) and
``gguf.quants.dequantize`` that keeps errors naming the file and the tensor or metadata key
at fault, range-checks every tensor against the file size, and dequantises one tensor at a
time to float32 (see :func:`iter_hf_tensors`), so converting a model holds at most one
dequantised tensor. The ``gguf`` package is imported only when a file is opened.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = [
    "GGUFFile",
    "TensorInfo",
    "hf_config_from_gguf",
    "iter_hf_tensors",
    "tokenizer_from_gguf",
]

# Plain numeric types gguf.quants.dequantize leaves to the caller; the reader already views
# their bytes with the right numpy dtype.
_PLAIN_TYPES = {"F64", "I8", "I16", "I32", "I64"}
# Bounds on metadata that sizes loops and arrays, so a corrupt value fails before any work.
_MAX_LAYERS = 4096
_MAX_HEADS = 1 << 16


def _gguf_package(path: Path):
    try:
        import gguf
    except ImportError:
        raise ImportError(f"{path}: reading GGUF files needs the gguf package (pip install gguf)") from None
    return gguf


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: reversed ggml `ne`
    ggml_type: int
    type_name: str
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    """A memory-mapped GGUF file: metadata, tensor infos, and tensors dequantised on demand.

    ``metadata`` maps each key to a Python value (int, float, bool, str, or a list for arrays);
    ``metadata_types`` maps it to its GGUF value type name ("UINT32", "STRING", "ARRAY", ...).
    ``tensors`` maps each tensor name to a :class:`TensorInfo`, in file order.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such GGUF file")
        gguf = _gguf_package(self.path)
        size = self.path.stat().st_size
        if size < 8:
            raise ValueError(f"{self.path}: not a GGUF file ({size} bytes)")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ValueError(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        try:
            reader = gguf.GGUFReader(self.path)
        except ValueError as e:
            if "version" in str(e):
                raise ValueError(f"{self.path}: unsupported GGUF file: {e}") from None
            if "reshape" in str(e):  # a tensor's data view came out short
                raise ValueError(f"{self.path}: corrupt or truncated GGUF file: tensor data runs "
                                 f"past the end of the file ({size} bytes): {e}") from None
            raise ValueError(f"{self.path}: corrupt or truncated GGUF file: {e}") from None
        except (IndexError, KeyError, OverflowError, TypeError, MemoryError) as e:
            raise ValueError(f"{self.path}: corrupt or truncated GGUF file: "
                             f"{type(e).__name__}: {e}") from None
        self._reader = reader
        self.version = int(reader.fields["GGUF.version"].parts[0][0])
        self.alignment = int(reader.alignment)
        self.data_offset = int(reader.data_offset)
        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, str] = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                nested = len(field.types) > 2 and field.types[1].name == "ARRAY"
                self.metadata[key] = _field_value(field) if nested else field.contents()
            except UnicodeDecodeError:
                self.metadata[key] = _field_value(field)  # undecodable strings kept as bytes
            except (ValueError, IndexError) as e:
                raise ValueError(f"{self.path}: metadata key {key!r} cannot be read: {e}") from None
            self.metadata_types[key] = field.types[0].name if field.types else "?"
        self.tensors: dict[str, TensorInfo] = {}
        self._data: dict[str, Any] = {}
        for t in reader.tensors:
            qtype = gguf.GGMLQuantizationType(int(t.tensor_type))
            info = TensorInfo(t.name, tuple(int(x) for x in reversed(t.shape.tolist())), int(qtype),
                              qtype.name, int(t.data_offset), int(t.n_bytes))
            if info.offset + info.nbytes > size or t.data.nbytes != info.nbytes:
                raise ValueError(
                    f"{self.path}: corrupt or truncated GGUF file: tensor {t.name!r} ({qtype.name}, "
                    f"{info.nbytes} bytes at offset {info.offset}) runs past the end of the file "
                    f"({size} bytes)")
            self.tensors[t.name] = info
            self._data[t.name] = t

    def tensor(self, name: str) -> np.ndarray:
        """Tensor `name` dequantised to a new float32 array in numpy shape order."""
        import gguf

        info = self._info(name)
        t = self._data[name]
        try:
            if info.type_name in _PLAIN_TYPES:
                out = np.asarray(t.data, np.float32)
            else:
                out = gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType(info.ggml_type))
        except (NotImplementedError, ValueError) as e:
            raise ValueError(f"{self.path}: tensor {name!r} has type {info.type_name}, which cannot "
                             f"be dequantized: {e}") from None
        return np.asarray(out, np.float32).reshape(info.shape)

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def close(self) -> None:
        self._reader = None
        self._data = {}  # the map is released once no returned view refers to it

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        arch = self.metadata.get("general.architecture", "?")
        return f"GGUFFile({str(self.path)!r}, v{self.version}, arch={arch}, {len(self.tensors)} tensors)"


def _field_value(field) -> Any:
    """A metadata value rebuilt from the reader's parts, for what ``ReaderField.contents()``
    does not return as written: arrays of arrays (it flattens them) and strings that are not
    UTF-8 (kept as bytes rather than altered)."""
    parts, pos = field.parts, 3  # after the key's length, the key and the value type

    def walk(vtype: int):
        nonlocal pos
        name = _VALUE_TYPES[vtype]
        if name == "STRING":  # (length, bytes)
            raw = parts[pos + 1].tobytes()
            pos += 2
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                return raw
        if name == "ARRAY":  # (element type, count, elements...)
            etype, count = int(parts[pos][0]), int(parts[pos + 1][0])
            pos += 2
            return [walk(etype) for _ in range(count)]
        value = parts[pos].tolist()[0]
        pos += 1
        return value

    return walk(int(field.types[0]))


_VALUE_TYPES = {0: "UINT8", 1: "INT8", 2: "UINT16", 3: "INT16", 4: "UINT32", 5: "INT32",
                6: "FLOAT32", 7: "BOOL", 8: "STRING", 9: "ARRAY", 10: "UINT64", 11: "INT64",
                12: "FLOAT64"}


# ---------------------------------------------------------------------------------------------
# Hugging Face config and tensor names
# ---------------------------------------------------------------------------------------------

# GGUF architecture -> (HF class, model_type, q/k rows permuted by llama.cpp's converter)
_ARCHS = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", False),
}

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


_MISSING = object()


def _meta(gguf: GGUFFile, key: str, kind: type, default: Any = _MISSING, *, positive: bool = False,
          maximum: int | None = None):
    """Metadata value `key` checked for type and range; errors name the file and the key."""
    md = gguf.metadata
    if key not in md:
        if default is _MISSING:
            raise ValueError(f"{gguf.path}: metadata key {key!r} is missing")
        return default
    v = md[key]
    if kind is int:
        ok = isinstance(v, (int, np.integer)) and not isinstance(v, bool)
    elif kind is float:
        ok = isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and np.isfinite(v)
    else:
        ok = isinstance(v, kind)
    if not ok:
        shown = repr(v) if len(repr(v)) < 60 else repr(v)[:57] + "..."
        raise ValueError(f"{gguf.path}: metadata key {key!r} must be {'an integer' if kind is int else 'a ' + kind.__name__}, "
                         f"got {gguf.metadata_types.get(key, type(v).__name__)} {shown}")
    if positive and v <= 0:
        raise ValueError(f"{gguf.path}: metadata key {key!r} must be positive, got {v}")
    if maximum is not None and v > maximum:
        raise ValueError(f"{gguf.path}: metadata key {key!r} is {v}, more than {maximum}; the file "
                         "is corrupt")
    return kind(v)


def _arch(gguf: GGUFFile) -> str:
    arch = gguf.metadata.get("general.architecture")
    if not isinstance(arch, str) or arch not in _ARCHS:
        raise ValueError(
            f"{gguf.path}: GGUF architecture {arch!r} (general.architecture) is not supported "
            f"(supported: {', '.join(sorted(_ARCHS))})"
        )
    return arch


def _rope_scaling(gguf: GGUFFile, arch: str) -> dict[str, Any] | None:
    md = gguf.metadata
    p = f"{arch}.rope.scaling."
    rtype = _meta(gguf, p + "type", str, None)
    factor = _meta(gguf, p + "factor", float, None)
    if rtype is None and f"{arch}.rope.scale_linear" in md:  # older files
        rtype, factor = "linear", _meta(gguf, f"{arch}.rope.scale_linear", float)
    if rtype in (None, "none"):
        return None
    out: dict[str, Any] = {"rope_type": rtype}
    if factor is not None:
        out["factor"] = float(factor)
    for gguf_key, hf_key, kind in (
        ("original_context_length", "original_max_position_embeddings", int),
        ("attn_factor", "attention_factor", float),
        ("yarn_beta_fast", "beta_fast", float),
        ("yarn_beta_slow", "beta_slow", float),
    ):
        if p + gguf_key in md:
            out[hf_key] = _meta(gguf, p + gguf_key, kind)
    return out


def hf_config_from_gguf(gguf: GGUFFile) -> dict[str, Any]:
    """A Hugging Face ``config.json``-style dict for a llama / qwen2 / qwen3 GGUF."""
    arch = _arch(gguf)
    hf_class, model_type, _ = _ARCHS[arch]
    md = gguf.metadata

    def req(key: str, kind: type = int, **kw):
        return _meta(gguf, f"{arch}.{key}", kind, **kw)

    hidden = req("embedding_length", positive=True)
    n_heads = req("attention.head_count", positive=True, maximum=_MAX_HEADS)
    if isinstance(md.get(f"{arch}.attention.head_count_kv"), list):
        raise ValueError(f"{gguf.path}: per-layer {arch}.attention.head_count_kv is not supported")
    n_kv = req("attention.head_count_kv", default=n_heads, positive=True, maximum=_MAX_HEADS)
    head_dim = (req("attention.key_length", default=None, positive=True)
                or req("rope.dimension_count", default=None, positive=True) or hidden // n_heads)
    if head_dim <= 0:
        raise ValueError(f"{gguf.path}: metadata key {arch}.embedding_length={hidden} is smaller "
                         f"than {arch}.attention.head_count={n_heads}")

    if "token_embd.weight" in gguf.tensors:
        vocab = gguf.tensors["token_embd.weight"].shape[0]
    elif f"{arch}.vocab_size" in md:
        vocab = req("vocab_size", positive=True)
    elif "tokenizer.ggml.tokens" in md:
        vocab = len(md["tokenizer.ggml.tokens"])
    else:
        raise ValueError(f"{gguf.path}: cannot tell the vocabulary size")

    config: dict[str, Any] = {
        "architectures": [hf_class],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": req("feed_forward_length", positive=True),
        "num_hidden_layers": req("block_count", positive=True, maximum=_MAX_LAYERS),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": req("attention.layer_norm_rms_epsilon", float, positive=True),
        "rope_theta": req("rope.freq_base", float, default=10000.0, positive=True),
        "max_position_embeddings": req("context_length", positive=True),
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
    }
    for hf_key, gguf_key in (
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ):
        if gguf_key in md:
            config[hf_key] = _meta(gguf, gguf_key, int)
    scaling = _rope_scaling(gguf, arch)
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


def _hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if len(parts) == 2 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}" if parts[1] in ("weight", "bias") else None
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        if parts[3] in ("weight", "bias"):
            return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute``: rotary pairs (interleaved) back to HF's rotate-half order.

    The converter maps HF rows ``reshape(n_head, 2, d/2, ...).swapaxes(1, 2)``; this is its inverse.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot unpermute {rows} rows over {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_hf_tensors(gguf: GGUFFile) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, float32 array)`` one tensor at a time, in HF names and layouts.

    Linear weights come out as ``[out_features, in_features]``, as in HF checkpoints. With tied
    embeddings (no ``output.weight``), no ``lm_head.weight`` is yielded. Every name is checked
    before the first tensor is read, so an unknown tensor fails fast.
    """
    arch = _arch(gguf)
    permuted = _ARCHS[arch][2]
    names = []
    for name in gguf.tensors:
        hf = _hf_name(name)
        if hf is None:
            hint = ""
            if name.startswith("rope_freqs"):
                hint = " (precomputed Llama-3 rope frequency factors; no HF config field can express them)"
            raise ValueError(f"{gguf.path}: tensor {name!r} has no Hugging Face {arch} equivalent{hint}")
        names.append((name, hf))
    config = hf_config_from_gguf(gguf) if permuted else None
    for name, hf in names:
        w = gguf.tensor(name)
        try:
            if permuted and ".attn_q." in name:
                w = _unpermute(w, config["num_attention_heads"])
            elif permuted and ".attn_k." in name:
                w = _unpermute(w, config["num_key_value_heads"])
        except ValueError as e:
            raise ValueError(f"{gguf.path}: tensor {name!r} of shape {w.shape}: {e}") from None
        yield hf, w


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

# llama.cpp's token types (``llama_token_type``): CONTROL tokens (``<|im_end|>``) are special;
# USER_DEFINED ones (``<think>``) are matched whole in text but are ordinary text when decoding.
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# Split regexes of the byte-level BPE pre-tokenizers, as in llama.cpp's ``llama-vocab.cpp`` and the
# models' own ``tokenizer.json`` (transformers' ``integrations/gguf`` keeps the same table).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ``tokenizer.ggml.pre`` -> (kind, ignore_merges, add_bos default). Kinds:
#   "gpt2":   the GPT-2 split (tokenizers' ``ByteLevel(use_regex=True)``). Also used for a file with
#             no ``tokenizer.ggml.pre``, as transformers does (llama.cpp's legacy "default" split
#             there is a guess it warns about);
#   "digits": every digit on its own first, then the GPT-2 split -- llama.cpp's ``\p{N}`` split for
#             these types, ``Digits(individual_digits=True)`` in their tokenizer.json;
#   a regex:  ``Split(regex, isolated)`` then ``ByteLevel(use_regex=False)``.
# The Llama-3 family uses whole-word vocabulary hits before merges and adds BOS unless the file says
# otherwise (llama.cpp sets ``ignore_merges`` and ``add_bos`` for exactly these names).
_PRE_TOKENIZERS: dict[str, tuple[str, bool, bool]] = {
    **{name: ("gpt2", False, False) for name in ("default", "gpt2", "mpt", "olmo", "jais", "trillion")},
    **{
        name: ("digits", False, False)
        for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
    },
    **{
        name: (_LLAMA3_SPLIT, True, True)
        for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")
    },
    **{name: (_QWEN2_SPLIT, False, False) for name in ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez")},
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level vocabularies are spelled in."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:  # unprintable bytes map to 256, 257, ... in byte order
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer_from_gguf(path: str | os.PathLike):
    """A ``transformers.PreTrainedTokenizerFast`` built from the file's ``tokenizer.*`` metadata.

    Only the ``tokenizers`` library and the ``gguf`` package's reader are used: torch is not
    needed (transformers' own ``from_pretrained(..., gguf_file=...)`` needs it).
    Byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) are supported, with the
    pre-tokenizer picked from ``tokenizer.ggml.pre`` as llama.cpp picks it. CONTROL tokens become
    special added tokens and USER_DEFINED ones plain added tokens, so neither is ever split;
    bos/eos/unk/pad come from the ``tokenizer.ggml.*_token_id`` keys, ``add_bos_token`` /
    ``add_eos_token`` from the file, and ``chat_template`` from ``tokenizer.chat_template``.

    For SmolLM2 ("smollm") this follows llama.cpp and the model's own tokenizer.json in splitting
    digits one by one before the GPT-2 split. transformers (5.x) drops that digit split, so where a
    run of two or more spaces/newlines comes right before a digit its ids differ from these.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    with GGUFFile(path) as f:
        md = dict(f.metadata)

    model = md.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(
            f"{path}: tokenizer.ggml.model {model!r} is not supported; only byte-level BPE (\"gpt2\") "
            "vocabularies can be built from GGUF metadata here"
        )
    tokens = md.get("tokenizer.ggml.tokens")
    merges = md.get("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not tokens:
        raise ValueError(f"{path}: tokenizer.ggml.tokens is missing or empty")
    if not isinstance(merges, list):
        raise ValueError(f"{path}: tokenizer.ggml.merges is missing (needed for a BPE vocabulary)")
    types = md.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{path}: {len(types)} token types for {len(tokens)} tokens")
    pre = md.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"{path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported "
            f"(supported: {', '.join(sorted(_PRE_TOKENIZERS))})"
        )
    split, ignore_merges, add_bos_default = _PRE_TOKENIZERS[pre]

    # Byte-level vocabularies spell every token in GPT-2's byte alphabet. A normal token that does
    # not is respelled byte by byte (as transformers does); added tokens keep their text, since they
    # are matched in the raw input and their id is found by that text.
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    control, user_defined = [], []
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        if not isinstance(tok, str):
            raise ValueError(f"{path}: token {i} is not valid UTF-8 ({tok!r})")
        if kind == _TOKEN_CONTROL:
            control.append(AddedToken(tok, special=True, normalized=False))
        elif kind == _TOKEN_USER_DEFINED:
            user_defined.append(AddedToken(tok, special=False, normalized=False))
        elif not set(tok) <= alphabet:
            tok = "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab[tok] = i
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep or not left or not right:
            raise ValueError(f"{path}: malformed merge {m!r} in tokenizer.ggml.merges")
        pairs.append((left, right))

    tk = Tokenizer(
        models.BPE(
            vocab, pairs, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
            byte_fallback=False, ignore_merges=ignore_merges,
        )
    )
    if split == "gpt2":
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "digits":
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(control)
    tk.add_tokens(user_defined)

    special: dict[str, str] = {}
    special_ids: dict[str, int] = {}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        tid = md.get(f"tokenizer.ggml.{key}_token_id")
        if tid is None:
            continue
        if not isinstance(tid, int) or not 0 <= tid < len(tokens):
            raise ValueError(
                f"{path}: tokenizer.ggml.{key}_token_id = {tid!r} is outside the {len(tokens)}-token vocabulary"
            )
        special[name], special_ids[name] = tokens[tid], tid
    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", add_bos_default)) and "bos" in special
    add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False)) and "eos" in special
    # Also set by transformers 5 from add_bos/eos_token; done here for versions that ignore those.
    bos = [special["bos"]] if add_bos else []
    eos = [special["eos"]] if add_eos else []
    single = [f"{t}:0" for t in bos] + ["$A:0"] + [f"{t}:0" for t in eos]
    pair = single + [f"{t}:1" for t in bos] + ["$B:1"] + [f"{t}:1" for t in eos]
    tk.post_processor = processors.TemplateProcessing(
        single=single,
        pair=pair,
        special_tokens=[(special[n], special_ids[n]) for n, on in (("bos", add_bos), ("eos", add_eos)) if on],
    )

    kwargs: dict[str, Any] = {f"{n}_token": t for n, t in special.items()}
    if isinstance(md.get("tokenizer.chat_template"), str):
        kwargs["chat_template"] = md["tokenizer.chat_template"]
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        clean_up_tokenization_spaces=False,
        name_or_path=str(path),
        **kwargs,
    )
