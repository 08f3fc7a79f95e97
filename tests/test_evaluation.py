"""Benchmark evaluation: the legacy protocol's scoring, recovery and reporting on scripted
generations, and the MedSSR protocol against the harness's transcription, including
agreement with transformers (+ the harness's logit bias) on real SmolLM2 weights."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import models
from medssr_jax.evaluation import (
    ANSWER_SUFFIX,
    build_prompt,
    encode_prompt,
    evaluate,
    evaluate_medssr,
    greedy_predictions,
    option_letter_ids,
    recovery_context,
    restricted_argmax,
    write_results,
)
from medssr_jax.sampler import Completion
from medssr_jax.tokenizers import byte_tokenizer

EOS = 1  # byte_tokenizer's <|im_end|>


@dataclasses.dataclass
class Rec:
    id: str
    question: str
    options: dict
    answer: str
    source: str = "test"


def rec(i, n_options=4, answer="A", stem=None):
    letters = "ABCDE"[:n_options]
    return Rec(f"q{i}", stem or f"Question number {i}: which option is right?",
               {x: f"option {x.lower()} of {i}" for x in letters}, answer)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def tiny():
    cfg = models.preset("tiny", tie_word_embeddings=False, max_position_embeddings=1024)
    return models.init_model(cfg, seed=3)


class Scripted:
    """A generate_fn answering each prompt with scripted texts (found by the record id in
    the prompt), recording the sampling arguments it was called with."""

    def __init__(self, tok, script: dict[str, list[str]], eos_every=2):
        self.tok, self.script, self.calls, self.eos_every = tok, script, [], eos_every

    def __call__(self, model, prompts, *, n, **kw):
        self.calls.append(dict(n=n, num_prompts=len(prompts), **kw))
        out = []
        for p in prompts:
            text = self.tok.decode(p)
            key = next(k for k in self.script if f"Question number {k}:" in text)
            texts = self.script[key]
            assert len(texts) == n
            group = []
            for g, t in enumerate(texts):
                ids = self.tok(t, add_special_tokens=False)["input_ids"]
                if g % self.eos_every == 0:
                    group.append(Completion(ids + [EOS], [0.0] * (len(ids) + 1), "eos"))
                else:
                    group.append(Completion(ids, [0.0] * len(ids), "length"))
            out.append(group)
        return out


# --- prompts and letter tokens ----------------------------------------------------------

def test_build_prompt_forms():
    r = rec(1, 3)
    raw = build_prompt(r, "raw")
    assert raw.startswith("Answer the following multiple-choice question.")
    assert '"The answer is X"' in raw and raw.endswith("\n\nAnswer:")
    assert "Question number 1: which option is right?\n\nA. option a of 1\nB. option b of 1\nC. option c of 1" in raw
    chat = build_prompt(r, "qwen3", instruction="Solve it; end with The answer is X.")
    assert chat.startswith("<|im_start|>user\nSolve it; end with The answer is X.\n\nQuestion number 1")
    assert chat.endswith("C. option c of 1<|im_end|>\n<|im_start|>assistant\n")
    assert build_prompt(r, "smollm2").startswith("<|im_start|>system\nYou are a helpful AI assistant")


def test_byte_tokenizer_letter_ids(tok):
    lt = option_letter_ids(tok, "ABCDE")
    assert lt.ids == {x: ord(x) for x in "ABCDE"} and not lt.merged_space
    assert tok.decode(lt.suffix_ids) == ANSWER_SUFFIX
    ctx = recovery_context([5, 6], [7, 8, 9, EOS], lt.suffix_ids, max_len=2 + 2 + len(lt.suffix_ids), eos_ids=[EOS])
    assert ctx == [5, 6, 7, 8] + lt.suffix_ids  # EOS dropped, completion cut from its end
    with pytest.raises(ValueError, match="does not fit"):
        recovery_context([5] * 10, [], lt.suffix_ids, max_len=12)


# --- scoring with scripted generations ----------------------------------------------------

SCRIPT = {
    # gold A: phrase; last phrase wins; boxed; bracket (wrong)
    "1": ["Thinking... The answer is A.", "The answer is B. On reflection, the answer is A",
          "so $\\boxed{A}$", "I pick [C]"],
    # gold B: phrase with parentheses; boxed after an earlier bracket; phrase then bracket (wrong)
    "2": ["The answer is B", "The answer is: (B).", "maybe [A] but finally $\\boxed{B}$",
          "The answer is B, no wait [C]"],
    # gold C: one generation states nothing; one names a letter that is not an option
    "3": ["The answer is C", "I am not sure.", "**The answer is C**", "The answer is E"],
}


def test_scripted_accuracy_exact(tiny, tok):
    records = {"bench": [rec(1, 4, "A"), rec(2, 4, "B"), rec(3, 4, "C")],
               "yesno": [rec(4, 2, "B"), rec(5, 2, "A")]}
    script = dict(SCRIPT, **{"4": ["The answer is B"] * 4,
                             "5": ["The answer is A", "The answer is B", "[A]", "[B]"]})
    fake = Scripted(tok, script)
    res = evaluate(tiny, tok, records, template="raw", generate_fn=fake, recover=False, batch_size=2,
                   max_new_tokens=64, seed=7)
    # the protocol's sampling parameters reach the sampler; prompts go in batches of 2
    assert [c["num_prompts"] for c in fake.calls] == [2, 2, 1]
    for c in fake.calls:
        assert (c["n"], c["temperature"], c["top_p"], c["top_k"], c["max_new_tokens"]) == (4, 0.6, 0.95, 20, 64)
        assert c["eos_ids"] == [EOS]
    assert len({c["seed"] for c in fake.calls}) == 3

    b = res["benchmarks"]["bench"]
    preds = {it["id"]: it["predictions"] for it in b["items"]}
    assert preds == {"q1": ["A", "A", "A", "C"], "q2": ["B", "B", "B", "C"], "q3": ["C", None, "C", None]}
    per_gen = [1.0, 2 / 3, 1.0, 0.0]
    assert b["accuracy_per_generation"] == pytest.approx(per_gen)
    assert b["accuracy_mean"] == pytest.approx(np.mean(per_gen)) == pytest.approx(2 / 3)
    assert b["accuracy_std"] == pytest.approx(np.std(per_gen))
    assert (b["n"], b["unreadable"], b["recovered"]) == (3, 2, 0)
    assert b["unreadable_rate"] == pytest.approx(2 / 12)
    assert b["letters"] == "ABCD"
    assert [it["correct"] for it in b["items"]][0] == [True, True, True, False]
    assert b["items"][0]["lengths"][0] == len("Thinking... The answer is A.") + 1  # + EOS
    assert b["items"][0]["finish_reasons"] == ["eos", "length", "eos", "length"]

    y = res["benchmarks"]["yesno"]
    assert y["accuracy_per_generation"] == pytest.approx([1.0, 0.5, 1.0, 0.5])
    assert (y["accuracy_mean"], y["accuracy_std"], y["unreadable_rate"]) == pytest.approx((0.75, 0.25, 0.0))
    assert y["letters"] == "AB"
    json.dumps(res)  # plain JSON types throughout


def test_scripted_with_recovery(tiny, tok):
    """Unreadable generations are filled by the recovery pass; the rate is counted before it."""
    records = {"bench": [rec(1, 4, "A"), rec(2, 4, "B"), rec(3, 4, "C")]}
    res = evaluate(tiny, tok, records, template="raw", generate_fn=Scripted(tok, SCRIPT), max_new_tokens=64,
                   keep_texts=True)
    b = res["benchmarks"]["bench"]
    q3 = b["items"][2]
    assert q3["recovered"] == [False, True, False, True]
    assert q3["predictions"][1] in "ABCD" and q3["predictions"][3] in "ABCD"
    assert q3["texts"][1] == "I am not sure."
    assert (b["unreadable"], b["recovered"]) == (2, 2) and b["unreadable_rate"] == pytest.approx(2 / 12)
    assert b["recovered_correct"] == sum(p == "C" for p in (q3["predictions"][1], q3["predictions"][3]))
    correct = np.array([[p == it["gold"] for p in it["predictions"]] for it in b["items"]])
    assert b["accuracy_per_generation"] == pytest.approx(correct.mean(0).tolist())
    assert res["config"]["letter_tokens"]["ids"] == {x: ord(x) for x in "ABCD"}


# --- the recovery pass on the tiny model --------------------------------------------------

def _reference_last_logits(model, contexts):
    """Next-token logits after each context from one plain `forward` over a right-padded
    batch (the evaluation code left-pads), read at each context's last real position."""
    t = max(map(len, contexts))
    tokens = np.zeros((len(contexts), t), np.int32)
    mask = np.zeros((len(contexts), t), bool)
    for i, c in enumerate(contexts):
        tokens[i, :len(c)], mask[i, :len(c)] = c, True
    logits = np.asarray(models.forward(model, jnp.asarray(tokens), jnp.asarray(mask)))
    return [logits[i, len(c) - 1] for i, c in enumerate(contexts)]


@pytest.mark.parametrize("truncate", [False, True])
def test_recovery_matches_independent_forward(tiny, tok, truncate):
    """2-, 4- and 5-option benchmarks, unreadable generations of varied lengths (with
    `truncate`, some longer than the recovery context allows): each prediction is the argmax of the
    option-letter logits that `forward` gives on the same text, and one of the letters."""
    records = {"two": [rec(i, 2, "A") for i in range(3)],
               "four": [rec(i, 4, "B") for i in range(3, 6)],
               "five": [rec(i, 5, "E") for i in range(6, 9)]}
    rng = np.random.default_rng(0)
    words = ["fever", "cough", "renal", "hepatic", "dose", "acute", "chronic", "sign"]
    script = {str(i): [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) for _ in range(2)]
              for i in range(9)}
    longest = max(len(encode_prompt(tok, build_prompt(r, "raw"))) for rs in records.values() for r in rs)
    max_len = longest + len(ANSWER_SUFFIX) + 30 if truncate else None
    res = evaluate(tiny, tok, records, template="raw", num_generations=2, generate_fn=Scripted(tok, script),
                   max_new_tokens=256, recovery_max_len=max_len, recovery_batch_size=4, keep_texts=True)
    checked, cases = 0, []
    for name, letters in (("two", "AB"), ("four", "ABCD"), ("five", "ABCDE")):
        b = res["benchmarks"][name]
        assert b["letters"] == letters and b["unreadable_rate"] == 1.0
        for r, it in zip(records[name], b["items"]):
            prompt = encode_prompt(tok, build_prompt(r, "raw"))
            for g in range(2):
                text = it["texts"][g]
                context = prompt + list(text.encode()) + list(ANSWER_SUFFIX.encode())
                if max_len is not None and len(context) > max_len:
                    cut = len(context) - max_len
                    context = prompt + list(text.encode())[:-cut] + list(ANSWER_SUFFIX.encode())
                    assert len(context) == max_len
                    checked += 1
                cases.append((context, letters, it["predictions"][g], it["recovered"][g]))
    assert len(cases) == 18
    if max_len is not None:
        assert checked > 0  # truncation really happened
    for (context, letters, pred, recovered), logits in zip(
            cases, _reference_last_logits(tiny, [c[0] for c in cases])):
        scores = logits[[ord(x) for x in letters]]
        top2 = np.sort(scores)[-2:]
        assert top2[1] - top2[0] > 1e-5  # a clear winner: numerics cannot flip it
        assert recovered and pred in letters and pred == letters[int(np.argmax(scores))]


def test_restricted_argmax_logits(tiny):
    """The batched, left-padded, bucketed last-position logits equal an unpadded forward."""
    rng = np.random.default_rng(1)
    contexts = [rng.integers(3, 256, size=int(k)).tolist() for k in (5, 70, 33, 1, 129)]
    letter_ids = [[65, 66], [65, 66, 67, 68], [65, 66, 67, 68, 69], [70, 71], [65, 66, 67]]
    choice, scores = restricted_argmax(tiny, contexts, letter_ids, batch_size=2)
    for ids, j, s, logits in zip(letter_ids, choice, scores, _reference_last_logits(tiny, contexts)):
        ref = logits[ids]
        np.testing.assert_allclose(s, ref, rtol=1e-5, atol=1e-6)
        assert j == int(np.argmax(ref))


def test_evaluate_with_real_sampler(tiny, tok):
    """End to end with the real sampler: a random model states no answer, so every
    prediction comes from the recovery pass and is one of the benchmark's letters."""
    records = {"two": [rec(0, 2, "A"), rec(1, 2, "B")], "five": [rec(2, 5, "C")]}
    res = evaluate(tiny, tok, records, template="smollm2", max_new_tokens=6, batch_size=2)
    for name, b in res["benchmarks"].items():
        assert b["n"] == len(records[name]) and len(b["accuracy_per_generation"]) == 4
        for it in b["items"]:
            assert len(it["predictions"]) == 4
            assert all(p in b["letters"] for p in it["predictions"])
            assert all(1 <= n <= 6 for n in it["lengths"])
    greedy = greedy_predictions(tiny, tok, records["five"], template="smollm2", max_new_tokens=6)
    again = greedy_predictions(tiny, tok, records["five"], template="smollm2", max_new_tokens=6)
    assert len(greedy) == 1 and greedy[0]["predictions"] == again[0]["predictions"]
    assert greedy[0]["texts"] == again[0]["texts"]


# --- reporting ------------------------------------------------------------------------------

def test_write_results(tiny, tok, tmp_path):
    records = {"bench": [rec(1, 4, "A"), rec(2, 4, "B"), rec(3, 4, "C")],
               "yesno": [rec(4, 2, "B")]}
    script = dict(SCRIPT, **{"4": ["The answer is B"] * 4})
    res = evaluate(tiny, tok, records, template="raw", generate_fn=Scripted(tok, script), recover=False)
    paths = write_results(res, tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"results.json", "results.md", "accuracy.png"}
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["plot"].stat().st_size > 1000
    loaded = json.loads(paths["json"].read_text())
    assert loaded["benchmarks"]["bench"]["accuracy_mean"] == pytest.approx(2 / 3)
    rows = [line for line in paths["markdown"].read_text().splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| benchmark |")
    body = rows[1:]
    assert len(body) == 2
    assert body[0] == f"| bench | 3 | 66.67 ± {100 * np.std([1, 2 / 3, 1, 0]):.2f} | 16.67 | 0 |"
    assert body[1] == "| yesno | 1 | 100.00 ± 0.00 | 0.00 | 0 |"


def _eval_dir() -> Path:
    d = Path(os.environ.get("MEDSSR_EVAL_DIR") or Path(__file__).resolve().parents[1] / "../shared/data/medssr-eval")
    if not (d / "medqa.json").is_file():
        pytest.fail(f"MedSSR evaluation data not found: {d / 'medqa.json'} does not exist; "
                    "set MEDSSR_EVAL_DIR to the folder holding medqa.json")
    return d


# --- the MedSSR protocol: evaluate_medssr against the harness's transcription --------------

def _bench_file(name, records):
    from medssr_jax.data import BenchmarkFile
    from medssr_jax.protocol import allowed_letters
    return BenchmarkFile(name=name, path=Path(f"{name}.json"), records=records, letters=allowed_letters(records))


class ScriptedById:
    """A generate_fn that answers each prompt with the texts scripted for the record whose
    question text the prompt holds."""

    def __init__(self, tok, records, script):
        self.tok, self.by_question, self.script = tok, {r["question"]: r["id"] for r in records}, script

    def __call__(self, model, prompts, *, n, **kw):
        out = []
        for p in prompts:
            text = self.tok.decode(p)
            rid = next(i for q, i in self.by_question.items() if q in text)
            group = []
            for g, t in enumerate(self.script[rid][:n]):
                ids = self.tok(t, add_special_tokens=False)["input_ids"]
                group.append(Completion(ids + [EOS] * (g % 2 == 0), [0.0] * (len(ids) + (g % 2 == 0)), "eos"))
            out.append(group)
        return out


def test_evaluate_medssr_equals_the_harness_bookkeeping(tiny, tok, tmp_path):
    """Scripted generations through evaluate_medssr give the harness's per-generation files,
    order, predictions, recovery prompts and log entry (tests/harness_oracle.py), the
    recovery decode included (one biased greedy token of the tiny model, Qwen rule)."""
    from medssr_jax.protocol import Prompter
    from tests import harness_oracle as oracle

    records = [{"id": f"q{i}", "question": f"Question {i}?\nA. a{i}\nB. b{i}\nC. c{i}\nD. d{i}",
                "gold": "ABCD"[i % 4], "name": "toy", "long": False} for i in range(5)]
    records[4]["gold"] = "b"  # the harness upper-cases gold letters
    script = {
        "q0": ["The answer is A", "so the answer is b", "nothing here"],
        "q1": ["The answer is $\\boxed{B}$", "The answer is [C]", "The answer is Amoxicillin"],
        "q2": ["I cannot tell.", "The answer is (C).", "The answer is C."],
        "q3": ["The answer is Z", "  The answer is D  ", "THE ANSWER IS d"],
        "q4": ["", "The answer is B", "the answer is c"],
    }
    prompter = Prompter(tok, "raw", "qwen3")
    res = evaluate_medssr(tiny, prompter, [_bench_file("toy", records)], num_generations=3, temperature=0.6,
                          max_new_tokens=32, eos_ids=[EOS], model_name="models/tiny-base",
                          generate_fn=ScriptedById(tok, records, script))
    b = res["benchmarks"]["toy"]

    biased = prompter.biased_ids(oracle.allowed_letters(records))

    def recover(item, answer):  # the harness's constrained decode, with a plain forward pass
        ctx = tok.encode(oracle.build_recovery_prompt(item, answer, tok, True))
        logits = np.asarray(tiny(jnp.asarray([ctx], jnp.int32)))[0, -1].astype(np.float32)
        logits[biased] += 100.0
        logits[EOS] = -np.inf  # min_tokens=1
        return tok.decode([int(np.argmax(logits))], skip_special_tokens=True)

    texts = [script[r["id"]] for r in records]
    params = dict(temperature=0.6, top_p=0.95, top_k=20, max_tokens=32, num_generations=3, seed=0)
    groups, log = oracle.run(records, texts, recover, "models/tiny-base", params)
    assert [len(g) for g in b["generations"]] == [len(g) for g in groups] == [5, 5, 5]
    for g, (mine, theirs) in enumerate(zip(b["generations"], groups)):
        for row, expected in zip(mine, theirs):
            assert row == expected, g
    assert b["log_entry"] == log
    assert b["per_generation"] == log["per_generation"] and b["average_accuracy"] == log["average_accuracy"]
    assert b["recovered"] == sum(row["recovery_used"] for g in groups for row in g) == 4
    theirs = {(row["id"], row["generation_idx"]): oracle.generation_scores([row]) and
              (row["pred"] or "UNKNOWN").strip().rstrip(".").upper() for g in groups for row in g}
    assert [it["predictions"] for it in b["items"]] == [[theirs[r["id"], g] for g in range(3)] for r in records]
    assert [it["predictions"][1] for it in b["items"]][:2] == ["B", "C"] and b["items"][3]["predictions"][0] == "Z"
    paths = write_results(res, tmp_path)
    assert [json.loads((tmp_path / f"toy_gen{g}.json").read_text()) for g in range(3)] == groups
    assert json.loads((tmp_path / "toy.eval.log").read_text()) == log
    assert "generations" not in json.loads(paths["json"].read_text())["benchmarks"]["toy"]


@pytest.mark.real_assets
def test_smollm2_medssr_eval_agrees_with_transformers_and_the_logit_bias():
    """The eval protocol's per-item predictions on SmolLM2 (greedy, CPU) equal those of
    transformers' generate on the harness's prompts, with the harness's +100 logits-bias
    processor in the recovery pass (Llama rule: two tokens, "X." ids biased)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("gguf")
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    from medssr_jax import assets
    from medssr_jax.data import read_benchmark_file
    from medssr_jax.protocol import Prompter
    from models.gguf import tokenizer_from_gguf
    from tests import harness_oracle as oracle
    from tests.test_smollm2 import load_transformers

    class LogitBias(LogitsProcessor):  # the harness's utils/logits_bias.py processor
        def __init__(self, ids, scale=100.0):
            self.ids, self.scale = ids, scale

        def __call__(self, input_ids, scores):
            scores[:, self.ids] += self.scale
            return scores

    new_tokens = 40
    benchmarks = ("medqa", "medmcqa", "mmlu", "pubmedqa", "bioasq", "medbullets")
    files = []
    for b in benchmarks:
        bf = read_benchmark_file(_eval_dir() / f"{b}.json")
        bf.records = bf.records[:2]  # the allowed letters stay those of the whole file
        files.append(bf)
    path = assets.smollm2_gguf()
    tok = tokenizer_from_gguf(path)
    ours, cfg = models.from_pretrained(path, dtype="float32")
    prompter = Prompter(tok, "smollm2", cfg.family)
    eos = [2, 0]
    res = evaluate_medssr(ours, prompter, files, num_generations=1, temperature=0.0, top_p=1.0, top_k=0,
                          max_new_tokens=new_tokens, eos_ids=eos)

    hf = load_transformers(path)

    def hf_generate(ids, **kw):
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              generation_config=GenerationConfig(do_sample=False, pad_token_id=2, eos_token_id=eos,
                                                                 **kw))
        return out[0, len(ids):].tolist()

    agree = recovered = 0
    for bf in files:
        biased = oracle.biased_token_ids(tok, bf.letters, "meta-llama/SmolLM2-135M-Instruct")
        for item, ours_item in zip(bf.records, res["benchmarks"][bf.name]["items"]):
            ids = oracle.vllm_prompt_ids(tok, oracle.build_prompt(item, tok, False))
            gen = hf_generate(ids, max_new_tokens=new_tokens)
            answer = tok.decode([t for t in gen if t not in eos], skip_special_tokens=True).strip()
            pred = oracle.extract_option(answer, "SmolLM2-135M-Instruct")
            if not pred:
                rctx = oracle.vllm_prompt_ids(tok, oracle.build_recovery_prompt(item, answer, tok, False))
                with torch.no_grad():
                    out = hf.generate(torch.tensor([rctx]), attention_mask=torch.ones(1, len(rctx), dtype=torch.long),
                                      logits_processor=LogitsProcessorList([LogitBias(biased)]),
                                      generation_config=GenerationConfig(
                                          do_sample=False, max_new_tokens=oracle.recovery_max_tokens("Llama"),
                                          min_new_tokens=1, pad_token_id=2, eos_token_id=eos))
                pred = tok.decode(out[0, len(rctx):].tolist(), skip_special_tokens=True).strip()
                recovered += 1
            expected = (pred or "UNKNOWN").strip().rstrip(".").upper()
            assert ours_item["predictions"][0] == expected, (item["id"], answer, pred)
            agree += 1
    assert agree == 12
    print(f"\nSmolLM2 medssr protocol: {agree}/12 predictions equal transformers + logit bias; "
          f"{recovered} recovered")
