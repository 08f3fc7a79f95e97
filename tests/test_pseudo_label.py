"""Pseudo-labelling by majority vote: exact votes with a fake sampler, and one
real run of the sampler on the tiny random model."""

import json

import pytest

from medssr_jax.sampler import Completion
from synth.pseudo_label import pseudo_label

EOS = 1


def encode(text):
    return [ord(c) % 254 + 2 for c in text]


def decode(tokens):
    return "".join(chr(t) for t in tokens)


def fake_sampler(script):
    """A generate() stand-in: prompt i of the whole run gets script[i] (texts)."""
    calls = []

    def generate(model, prompts, *, n, seed, eos_ids, **kw):
        start = sum(len(c) for c in calls)
        calls.append(prompts)
        out = []
        for i in range(len(prompts)):
            texts = script[start + i]
            assert len(texts) == n
            out.append([Completion([ord(c) for c in t] + [EOS], [0.0] * (len(t) + 1), "eos")
                        for t in texts])
        return out

    generate.calls = calls
    return generate


def item(i, n_opts=4, intended=None):
    return {"id": f"q{i}", "question": f"Question {i}?",
            "options": {k: f"opt {k}{i}" for k in "ABCDE"[:n_opts]}, "intended_answer": intended}


A, B, C, D, E = (f"so the answer is {x}" for x in "ABCDE")
BAD = "I am not sure."


def test_exact_labels_ties_unparseable_threshold_and_summary(tmp_path):
    script = [
        [A, A, A, B],            # A, 0.75 -> kept at threshold 0.75 (>=)
        [B, C, C, B],            # tie B/C 2-2: B first in sample order -> B, 0.5, dropped
        [BAD, BAD, BAD, BAD],    # all unparseable -> None, dropped
        [D, D, D, D],            # D, 1.0 -> kept
        [E, C, C, C],            # E is not an option of a 4-option item: unparseable; C 0.75
        ["[A] then The answer is B", BAD, "\\boxed{B}", "B"],  # last candidate wins: B, B; 'B' alone no
    ]
    items = [item(0, intended="A"), item(1), item(2), item(3, intended="A"), item(4), item(5, 5)]
    gen = fake_sampler(script)
    records, summary = pseudo_label(None, (encode, decode), items, n=4, threshold=0.75, keep="ge",
                                    protocol="legacy", template="raw", eos_ids=[EOS], batch_size=4,
                                    out_dir=tmp_path, generate_fn=gen)
    got = [(r.label, r.confidence, r.n_unparseable, r.kept) for r in records]
    assert got == [
        ("A", 0.75, 0, True),
        ("B", 0.5, 0, False),
        (None, 0.0, 4, False),
        ("D", 1.0, 0, True),
        ("C", 0.75, 1, True),
        ("B", 0.5, 2, False),
    ]
    assert records[0].counts == {"A": 3, "B": 1, "C": 0, "D": 0}
    assert records[4].answers == [None, "C", "C", "C"]
    assert records[5].counts == {"A": 0, "B": 2, "C": 0, "D": 0, "E": 0}
    assert records[2].unparseable_share == 1.0
    # batches of 4 prompts, seeds seed + b
    assert [len(p) for p in gen.calls] == [4, 2]
    assert summary == {
        "items": 6, "kept": 3, "dropped": 3, "dropped_no_label": 1, "threshold": 0.75, "keep": "ge", "n": 4,
        "label_distribution": {"A": 1, "C": 1, "D": 1},
        "mean_confidence": pytest.approx((0.75 + 0.5 + 0 + 1 + 0.75 + 0.5) / 6),
        "unparseable_share": pytest.approx(7 / 24),
        "recovered_share": 0.0,
        "agreement_with_intended": 0.5,
    }
    kept = [json.loads(x) for x in (tmp_path / "pseudo_labelled.jsonl").read_text().splitlines()]
    assert [k["id"] for k in kept] == ["q0", "q3", "q4"]
    assert [k["label"] for k in kept] == ["A", "D", "C"]
    votes = (tmp_path / "pseudo_label_votes.jsonl").read_text().splitlines()
    assert len(votes) == 6
    assert json.loads((tmp_path / "label_summary.json").read_text())["kept"] == 3


@pytest.mark.parametrize("keep,threshold,kept", [
    ("ge", 0.0, 5), ("ge", 0.25, 5), ("ge", 0.5, 4), ("ge", 0.51, 3), ("ge", 1.0, 1),
    ("gt", 0.0, 5), ("gt", 0.25, 4), ("gt", 0.5, 3), ("gt", 0.75, 1), ("gt", 1.0, 0)])
def test_threshold(keep, threshold, kept):
    # confidences: A 0.75, B 0.5, none, D 1.0, C 0.75, A 0.25
    script = [[A, A, A, B], [B, C, C, B], [BAD] * 4, [D] * 4, [E, C, C, C], [A, B, BAD, BAD]]
    items = [item(i) for i in range(6)]
    _, summary = pseudo_label(None, (encode, decode), items, n=4, threshold=threshold, keep=keep,
                              template="raw", eos_ids=[EOS], generate_fn=fake_sampler(script))
    assert summary["keep"] == keep
    # the all-unparseable item is dropped even at threshold 0
    assert summary["kept"] == kept
    assert summary["kept"] + summary["dropped"] == 6


def test_prompt_uses_template_and_options():
    seen = []

    def gen(model, prompts, *, n, **kw):
        seen.extend(prompts)
        return [[Completion([ord("x")], [0.0], "length")] * n for _ in prompts]

    pseudo_label(None, (encode, decode), [item(0)], n=2, template="qwen3", generate_fn=gen,
                 eos_ids=[EOS])
    text = "".join(chr((t - 2) % 254) for t in seen[0])
    # the evaluation harness's chat prompt: its system message, the question as the user turn
    from medssr_jax.protocol import SYSTEM_MESSAGE
    assert text == (f"<|im_start|>system\n{SYSTEM_MESSAGE}<|im_end|>\n<|im_start|>user\nQuestion 0?\n"
                    "A. opt A0\nB. opt B0\nC. opt C0\nD. opt D0<|im_end|>\n<|im_start|>assistant\n")
    seen.clear()
    pseudo_label(None, (encode, decode), [item(0)], n=2, template="raw", generate_fn=gen, eos_ids=[EOS])
    from medssr_jax.protocol import BASE_TEMPLATE
    assert "".join(chr((t - 2) % 254) for t in seen[0]) == BASE_TEMPLATE.format(
        question="Question 0?\nA. opt A0\nB. opt B0\nC. opt C0\nD. opt D0")


def test_real_sampler_on_tiny_model(tmp_path):
    import models

    model = models.init_model(models.preset("tiny", max_position_embeddings=256))
    items = [item(i, n_opts=4 + i % 2) for i in range(3)]
    enc = lambda s: [b % 250 + 2 for b in s.encode()][-100:]  # noqa: E731  keep prompts short
    dec = lambda t: bytes(x for x in t if x < 256).decode("latin-1")  # noqa: E731
    records, summary = pseudo_label(model, (enc, dec), items, n=3, threshold=0.5, template="raw",
                                    max_new_tokens=8, temperature=1.0, seed=0, out_dir=tmp_path)
    assert len(records) == 3
    for r, it in zip(records, items):
        assert r.n == 3 and len(r.answers) == 3
        assert sum(r.counts.values()) + r.n_unparseable == 3
        assert list(r.counts) == list(it["options"])
        assert r.kept == (r.label is not None and r.confidence > 0.5)
    assert summary["items"] == 3 and summary["kept"] + summary["dropped"] == 3
    kept_lines = (tmp_path / "pseudo_labelled.jsonl").read_text().splitlines()
    assert len(kept_lines) == summary["kept"]
    # deterministic given the seed
    again, _ = pseudo_label(model, (enc, dec), items, n=3, threshold=0.5, template="raw",
                            max_new_tokens=8, temperature=1.0, seed=0)
    assert [r.answers for r in again] == [r.answers for r in records]


def test_recovery_reads_unreadable_votes_like_the_evaluation(tmp_path):
    """recover=True: each unreadable vote becomes the restricted greedy letter after
    prompt + completion + "The answer is ", computed here independently."""
    import numpy as np

    import models
    from medssr_jax.evaluation import legacy_prompt, option_letter_ids, restricted_argmax
    from medssr_jax.tokenizers import byte_tokenizer

    tok = byte_tokenizer()
    model = models.init_model(models.preset("tiny", max_position_embeddings=512))
    items = [item(0), item(1, n_opts=5), item(2, n_opts=3)]
    script = [[A, BAD, BAD, "The answer is C"], [BAD, BAD, BAD, BAD], [B, B, "nothing", B]]
    records, summary = pseudo_label(model, tok, items, n=4, threshold=0.5, template="raw", protocol="legacy",
                                    generate_fn=fake_sampler(script), recover=True, eos_ids=[EOS])
    letters = option_letter_ids(tok, "ABCDE")
    for r, it, texts in zip(records, items, script):
        opts = "".join(it["options"])
        prompt = tok.encode(legacy_prompt(it["question"], it["options"], "raw"), add_special_tokens=False)
        for text, got in zip(texts, r.answers):
            if "answer is" in text:
                continue  # read directly
            ctx = prompt + [ord(c) for c in text] + letters.suffix_ids
            j, _ = restricted_argmax(model, [ctx], [[letters.ids[x] for x in opts]])
            assert got == opts[j[0]]
    assert [r.n_recovered for r in records] == [2, 4, 1]
    assert all(r.label is not None for r in records) and records[1].confidence >= 0.25
    assert summary["recovered_share"] == pytest.approx(7 / 12)
    assert np.isclose(summary["unparseable_share"], 0.0)  # every vote was read
    with pytest.raises(ValueError, match="tokenizer object"):
        pseudo_label(model, (encode, decode), items, n=4, generate_fn=fake_sampler(script), recover=True)


def test_medssr_recovery_is_the_harness_biased_decode():
    """recover=True under the medssr protocol: an unreadable vote is the greedy
    token after the harness's recovery prompt with +100 on the item's option
    letters (Qwen rule: one token), computed here with a plain forward pass."""
    import numpy as np

    import models
    from medssr_jax.protocol import Prompter
    from medssr_jax.tokenizers import byte_tokenizer

    tok = byte_tokenizer()
    model = models.init_model(models.preset("tiny", max_position_embeddings=1024), seed=1)
    items = [item(0), item(1, n_opts=3)]
    script = [[A, BAD, "The answer is C", "no idea"], [BAD, B, BAD, B]]
    records, summary = pseudo_label(model, tok, items, n=4, threshold=0.25, template="raw",
                                    generate_fn=fake_sampler(script), recover=True, eos_ids=[EOS])
    p = Prompter(tok, "raw", "qwen3")
    for r, it, texts in zip(records, items, script):
        letters = "".join(it["options"])
        q = "Question %s?\n" % it["id"][1:] + "\n".join(f"{k}. {v}" for k, v in it["options"].items())
        for text, got in zip(texts, r.answers):
            if "answer is" in text:
                continue
            ctx = tok.encode(p.recovery_text(q, text))
            logits = np.asarray(model(np.asarray([ctx], np.int32)))[0, -1].astype(np.float32)
            logits[[tok.encode(x)[0] for x in letters]] += 100.0
            logits[EOS] = -np.inf
            expect = tok.decode([int(np.argmax(logits))]).strip().rstrip(".").upper()
            assert got == (expect if expect in letters else None)
    assert [r.n_recovered for r in records] == [sum(a is not None for a in records[0].answers[1::2]),
                                                 sum(a is not None for a in records[1].answers[0::2])]
    assert summary["keep"] == "gt"
