"""The MedSSR protocol against a transcription of the authors' evaluation harness
(tests/harness_oracle.py): prompts, token ids, extraction, recovery ids and scores."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from medssr_jax.data import DEFAULT_EVAL_DIR, benchmark_files, eval_dir, read_benchmark_file
from medssr_jax.protocol import (
    Prompter,
    allowed_letters,
    extract_option,
    generation_metrics,
    normalize_prediction,
    question_text,
)
from tests import harness_oracle as oracle

SIX = ("bioasq", "medbullets", "medmcqa", "medqa", "mmlu", "pubmedqa")


def _eval_files():
    d = eval_dir()
    if not all((d / f"{n}.json").is_file() for n in SIX):
        pytest.fail(f"the six MedSSR benchmark files are not in {d}: set MEDSSR_EVAL_DIR to the folder "
                    f"holding them (default {DEFAULT_EVAL_DIR})")
    return {n: json.loads((d / f"{n}.json").read_text()) for n in SIX}


@pytest.fixture(scope="module")
def files():
    return _eval_files()


@pytest.fixture(scope="module")
def smollm2_tok():
    from medssr_jax import assets
    from models.gguf import tokenizer_from_gguf
    return tokenizer_from_gguf(assets.smollm2_gguf())


@pytest.fixture(scope="module")
def qwen3_tok():
    from medssr_jax.tokenizers import qwen3_tokenizer
    return qwen3_tokenizer()


# --- extraction -------------------------------------------------------------------------

ADVERSARIAL = [
    ("The answer is Amoxicillin, given twice daily.", "A"),
    ("so the answer is c", "C"),
    ("The answer is A ... on reflection \\boxed{C}", "A"),
    ("The answer is (B).", None),
    ("The answer is $\\boxed{D}$", "D"),
    ("The answer is [E]", "E"),
    ("The answer is B. Wait, The answer is D.", "D"),     # the last match
    ("The answer is B. Wait, the answer is D.", "B"),     # a case-sensitive match comes first
    ("the answer is b. The answer is [C]", "C"),           # an exact-case pattern beats a caseless one
    ("The answer is $\\boxed{B}$ and The answer is [C]", "B"),  # pattern order, then the last match
    ("THE ANSWER IS d", "D"),
    ("The answer is: C", None),
    ("The answer is **C**", None),                          # the bold form is a Gemma-only rule
    ("The answer is  C", None),                             # two spaces
    ("Answer: C", None),
    ("", None),
    ("   \n", None),
    ("The answer is Z", "Z"),                               # any letter, scored wrong later
    ("The correct answer is B", None),
    ("...so The answer is \n C", None),
]


@pytest.mark.parametrize("text, expected", ADVERSARIAL)
def test_extraction_matches_the_harness(text, expected):
    assert oracle.extract_option(text, "Qwen3-8B-Base") == expected
    assert extract_option(text) == expected


def test_extraction_agrees_on_generated_strings():
    rng = np.random.default_rng(0)
    pieces = ["The answer is ", "the answer is ", "THE ANSWER IS ", "$\\boxed{", "}$", "[", "]", "A", "b", "C",
              "d", ".", " ", "\n", "(", ")", "Amox", "answer", "**"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces, size=rng.integers(1, 12)))
        assert extract_option(text) == oracle.extract_option(text, "Qwen3-8B-Base"), repr(text)


def test_scoring_and_rounding():
    rows = [{"gold": "A", "pred": "A", "recovery_used": False}, {"gold": "b", "pred": "B.", "recovery_used": True},
            {"gold": "C", "pred": None}, {"gold": "C", "pred": " c. "}, {"gold": "D", "pred": "AB"},
            {"gold": "A", "pred": ""}]
    assert generation_metrics(rows) == oracle.generation_scores(rows) == {
        "accuracy": 50.0, "recovery_used": 1, "invalid_answers": 2, "sample_count": 6}
    third = [{"gold": "A", "pred": "A"}, {"gold": "A", "pred": "B"}, {"gold": "A", "pred": "B"}]
    assert generation_metrics(third)["accuracy"] == 33.33
    assert normalize_prediction(None) == "UNKNOWN" and normalize_prediction(" d..") == "D"


# --- prompts on every record of the six files ---------------------------------------------

def test_base_prompts_and_qwen3_token_ids_on_every_record(files, qwen3_tok):
    p = Prompter(qwen3_tok, "raw", "qwen3")
    n = 0
    for name, data in files.items():
        texts = [oracle.build_prompt(item, qwen3_tok, oracle.is_base_model("Qwen3-8B-Base")) for item in data]
        ours = [p.prompt_text(item["question"]) for item in data]
        assert ours == texts, name
        theirs_ids = [oracle.vllm_prompt_ids(qwen3_tok, t) for t in texts]
        assert [p.prompt_ids(item["question"]) for item in data] == theirs_ids, name
        n += len(data)
    assert n == 5152


def test_chat_prompts_and_smollm2_token_ids_on_every_record(files, smollm2_tok):
    assert smollm2_tok.chat_template  # the checkpoint's own template, from the GGUF metadata
    p = Prompter(smollm2_tok, "smollm2", "llama")
    for name, data in files.items():
        texts = [oracle.build_prompt(item, smollm2_tok, False) for item in data]
        assert [p.prompt_text(item["question"]) for item in data] == texts, name
        assert [p.prompt_ids(item["question"]) for item in data] == \
            [oracle.vllm_prompt_ids(smollm2_tok, t) for t in texts], name
    base = Prompter(smollm2_tok, "raw", "llama")
    item = files["medqa"][0]
    assert base.prompt_ids(item["question"]) == \
        oracle.vllm_prompt_ids(smollm2_tok, oracle.build_prompt(item, smollm2_tok, True))


@pytest.mark.parametrize("answer", ["I think the answer might be B", "Option C is right.", "", "  lots of text  \n",
                                    "Hmm.\n\nThe best choice is D"])
def test_recovery_prompts_match_the_harness(files, smollm2_tok, qwen3_tok, answer):
    answer = answer.strip()  # the harness strips the generation before building recovery
    for item in (files["medqa"][3], files["pubmedqa"][0], files["medbullets"][1]):
        base = Prompter(qwen3_tok, "raw", "qwen3")
        assert base.recovery_text(item["question"], answer) == \
            oracle.build_recovery_prompt(item, answer, qwen3_tok, True)
        chat = Prompter(smollm2_tok, "smollm2", "llama")
        text = oracle.build_recovery_prompt(item, answer, smollm2_tok, False)
        assert chat.recovery_text(item["question"], answer) == text
        assert chat.encode(chat.recovery_text(item["question"], answer)) == oracle.vllm_prompt_ids(smollm2_tok, text)


def test_chat_template_without_checkpoint_template_uses_the_builtin_renderer(qwen3_tok):
    from medssr_jax.chat import format_chat
    from medssr_jax.protocol import SYSTEM_MESSAGE
    assert not getattr(qwen3_tok, "chat_template", None)
    p = Prompter(qwen3_tok, "qwen3", "qwen3")
    assert p.prompt_text("Q?\nA. x\nB. y") == format_chat(
        [{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": "Q?\nA. x\nB. y"}], "qwen3")


# --- recovery token ids and the family rules ---------------------------------------------

def test_biased_ids_follow_the_harness(files, smollm2_tok, qwen3_tok):
    for data in files.values():
        letters = allowed_letters(data)
        assert letters == oracle.allowed_letters(data)
        # Qwen rule (one token, letter ids only) and Llama rule (two tokens, "X." ids too)
        assert Prompter(qwen3_tok, "raw", "qwen3").biased_ids(letters) == \
            sorted(oracle.biased_token_ids(qwen3_tok, letters, "Qwen/Qwen3-8B-Base"))
        assert Prompter(smollm2_tok, "smollm2", "llama").biased_ids(letters) == \
            sorted(oracle.biased_token_ids(smollm2_tok, letters, "meta-llama/SmolLM2-135M-Instruct"))
    assert Prompter(qwen3_tok, "raw", "qwen3").recovery_tokens == oracle.recovery_max_tokens("Qwen3-8B-Base") == 1
    assert Prompter(smollm2_tok, "smollm2", "llama").recovery_tokens == \
        oracle.recovery_max_tokens("Llama-3.1-8B-Instruct") == 2
    assert Prompter(smollm2_tok, "smollm2", "llama").biased_ids("AB") == sorted(
        [smollm2_tok.encode("A")[0], smollm2_tok.encode("B")[0], smollm2_tok.encode(".")[0]])


def test_question_text_layout_and_bad_settings():
    assert question_text(" Which? \n", {"A": "x", "B": "y"}) == "Which?\nA. x\nB. y"
    with pytest.raises(ValueError, match="unknown protocol"):
        Prompter(None, "raw", protocol="vllm")
    with pytest.raises(ValueError, match="family"):
        Prompter(None, "raw", family="gpt2")


# --- the benchmark reader ----------------------------------------------------------------

def test_benchmark_reader_counts_what_it_skips(tmp_path):
    f = tmp_path / "bench.json"
    f.write_text(json.dumps([
        {"id": "a", "question": "Q1\nA. x\nB. y", "gold": "B", "name": "b"},
        {"id": "a", "question": "Q2\nA. x\nB. y", "gold": "A", "name": "b"},
        {"id": "c", "question": "", "gold": "A"},
        {"id": "d", "question": "Q4", "gold": "AB"},
        "not an object",
        {"id": "e", "question": "Q5\nA. x\nF. y", "gold": "f", "name": "b", "extra": [1]},
    ]))
    bf = read_benchmark_file(f)
    assert [r["id"] for r in bf.records] == ["a", "a", "e"]
    assert bf.skipped == {"missing_field": 1, "bad_answer": 1, "bad_record": 1}
    assert bf.duplicate_ids == ["a"] and bf.letters == ["A", "B", "F"] and bf.name == "bench"
    assert len(bf.errors) == 3 and "record 3" in bf.errors[0]
    (tmp_path / "broken.json").write_text('[{"id": "x",')
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        read_benchmark_file(tmp_path / "broken.json")
    (tmp_path / "obj.json").write_text('{"id": "x"}')
    with pytest.raises(ValueError, match="obj.json: expected a JSON list"):
        read_benchmark_file(tmp_path / "obj.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no benchmark files"):
        benchmark_files(empty)
    assert math.isnan(generation_metrics([])["accuracy"])
