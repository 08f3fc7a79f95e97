"""Question synthesis against a real local HTTP server with scheduled faults,
through the real ``openai`` client; offline generator; reasoning filter."""

import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("openai")

from synth.filter import classify, parse_label  # noqa: E402
from synth.offline import generate_offline, jaccard, phenotype_ids  # noqa: E402
from synth.synthesize import (Budget, Deduper, SynthesisError, parse_generation,  # noqa: E402
                              plan_prompts, rare_ratio, read_jsonl, synthesize, validate_item)
from tests.fake_openai import (RARE_DISEASES, TEST_KEY, FakeOpenAI, FakeRetriever,  # noqa: E402
                               default_schedule, make_seeds)

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(timeout=0.3, backoff_base=0.01, backoff_cap=0.05)
FAULT_REASON = {"refusal": "refusal", "bad_content": "truncated", "three_options": "option_count",
                "leak": "answer_leaked", "duplicate_options": "duplicate_options",
                "seed_copy": "exact_duplicate"}


def run(srv, out, n_prompts=60, workers=8, **kw):
    args = dict(n_prompts=n_prompts, alpha=0.3, entities=RARE_DISEASES, retriever=FakeRetriever(),
                seed=7, base_url=srv.base_url, api_key=TEST_KEY, workers=workers) | FAST | kw
    return synthesize(make_seeds(), out, **args)


def records(out):
    acc = sorted(read_jsonl(Path(out) / "synthetic.jsonl"), key=lambda r: r["key"])
    rej = sorted(read_jsonl(Path(out) / "rejected.jsonl"), key=lambda r: r["key"])
    return acc, rej


def planned_keys(n_prompts=60):
    return [s.key for s in plan_prompts(make_seeds(), n_prompts, alpha=0.3, entities=RARE_DISEASES, seed=7)]


def test_every_item_recorded_exactly_once_despite_faults(tmp_path):
    with FakeOpenAI() as srv:
        report = run(srv, tmp_path)
    acc, rej = records(tmp_path)
    keys = [r["key"] for r in acc] + [r["key"] for r in rej]
    assert len(keys) == len(set(keys)) and set(keys) == set(planned_keys())
    assert report.accepted == len(acc) and report.rejected == len(rej) and report.failed == 0
    seen_faults = {f for _, _, f in srv.requests}
    assert {"429", "500", "timeout", "truncated_body", "malformed_body"} <= seen_faults
    # each rejection has the reason of the content fault the server injected for that key
    for r in rej:
        fault = default_schedule(r["key"], 0)
        assert r["reason"] == FAULT_REASON[fault], (r, fault)
        assert r["detail"]
    for r in acc:
        assert default_schedule(r["key"], 0) not in FAULT_REASON
        assert set(r["options"]) == set("ABCDE") and r["intended_answer"] in r["options"]
        p = r["provenance"]
        assert p["generator"] == "gpt-4.1" and len(p["seed_ids"]) == 2 and p["prompt_hash"]
        assert (p["entity"] is None) == (p["retrieved_doc_ids"] == []) == (p["rho"] >= 0.3)
    assert sum(report.rejected_by_reason.values()) == len(rej)
    usage = json.loads((tmp_path / "usage.json").read_text())
    # a request on a connection the server had closed never reaches it, but is counted
    assert usage["total"]["requests"] == report.requests >= len(srv.requests)
    assert usage["total"]["prompt_tokens"] > 0 and usage["total"]["cost_usd"] > 0
    # a second run finds everything done and sends nothing
    with FakeOpenAI() as srv2:
        again = run(srv2, tmp_path)
    assert again.already_done == 60 and srv2.requests == [] and records(tmp_path) == (acc, rej)


def _baseline(tmp_path, n_prompts):
    with FakeOpenAI() as srv:
        run(srv, tmp_path / "baseline", n_prompts=n_prompts)
    return records(tmp_path / "baseline")


def test_kill_9_mid_run_and_restart_matches_uninterrupted_run(tmp_path):
    n_prompts = 80
    expected = _baseline(tmp_path, n_prompts)
    out = tmp_path / "killed"
    with FakeOpenAI() as srv:
        code = (f"from tests.fake_openai import run_synthesis_cli; "
                f"run_synthesis_cli({srv.base_url!r}, {str(out)!r}, {n_prompts}, 4)")
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=os.environ | {"PYTHONPATH": str(ROOT)})
        deadline = time.time() + 30
        while len(srv.requests) < 40 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        log_text = proc.communicate()[0].decode(errors="replace")
        assert proc.returncode == -signal.SIGKILL, log_text
        n_before = len(srv.requests)
        done_before = {r["key"] for r in read_jsonl(out / "synthetic.jsonl") + read_jsonl(out / "rejected.jsonl")}
        assert 0 < len(done_before) < n_prompts
        report = run(srv, out, n_prompts=n_prompts, workers=4)
        later = [k for k, kind, _ in srv.requests[n_before:]]
    assert report.already_done == len(done_before)
    runs = json.loads((out / "usage.json").read_text())["runs"]
    assert len(runs) == 2 and runs[0]["requests"] > 0  # the killed run's spending is on record
    assert not done_before & set(later), "a finished key was requested again"
    assert records(out) == expected
    assert TEST_KEY not in log_text


def test_budget_stop_is_clean_and_resume_completes(tmp_path):
    n_prompts = 40
    expected = _baseline(tmp_path, n_prompts)
    out = tmp_path / "budget"
    with FakeOpenAI() as srv:
        first = run(srv, out, n_prompts=n_prompts, budget=Budget(max_requests=15))
        assert first.stopped == "max_requests"
        assert first.requests == 15 >= len(srv.requests)
        assert first.not_started > 0
        done = {r["key"] for part in records(out) for r in part}
        assert len(done) == first.accepted + first.rejected < n_prompts
        n1 = len(srv.requests)
        second = run(srv, out, n_prompts=n_prompts)
        assert second.stopped is None and not done & {k for k, _, _ in srv.requests[n1:]}
    assert records(out) == expected
    usage = json.loads((out / "usage.json").read_text())
    assert [r["stopped"] for r in usage["runs"]] == ["max_requests", None]
    assert usage["total"]["requests"] == first.requests + second.requests >= len(srv.requests)


def test_token_and_dollar_budgets(tmp_path):
    with FakeOpenAI(schedule=None) as srv:
        # the worst case of one request does not fit: nothing is sent
        r = run(srv, tmp_path / "d", n_prompts=10, budget=Budget(max_dollars=0.001))
        assert r.stopped == "max_dollars" and srv.requests == [] and r.not_started == 10
        r = run(srv, tmp_path / "t", n_prompts=10, max_tokens=200, workers=2,
                budget=Budget(max_tokens=2000))
        assert r.stopped == "max_tokens" and 0 < r.requests < 10
        assert r.prompt_tokens + r.completion_tokens <= 2000
        with pytest.raises(SynthesisError, match="no price"):
            run(srv, tmp_path / "m", n_prompts=2, model="my-local-model", budget=Budget(max_dollars=1))


def test_rare_ratio_tracks_alpha():
    seeds = make_seeds()
    for s in range(5):
        specs = plan_prompts(seeds, 200, alpha=0.3, entities=RARE_DISEASES, seed=s)
        bound = 3 * math.sqrt(0.3 * 0.7 / 200)
        assert abs(rare_ratio(specs) - 0.3) <= bound
        assert all((sp.entity is not None) == (sp.rho < 0.3) for sp in specs)
        assert all(sp.seed_ids[0] != sp.seed_ids[1] for sp in specs)
    assert rare_ratio(plan_prompts(seeds, 50, alpha=0.0, seed=1)) == 0.0
    assert rare_ratio(plan_prompts(seeds, 50, alpha=1.0, entities=["x"], seed=1)) == 1.0
    # deterministic and seed dependent
    a = plan_prompts(seeds, 20, alpha=0.3, entities=RARE_DISEASES, seed=3)
    assert a == plan_prompts(seeds, 20, alpha=0.3, entities=RARE_DISEASES, seed=3)
    assert a != plan_prompts(seeds, 20, alpha=0.3, entities=RARE_DISEASES, seed=4)


def test_retrieved_passages_reach_the_prompt(tmp_path):
    prompts = []

    class Spy(FakeOpenAI):
        def _chat(self, h, raw):
            prompts.append(json.loads(raw)["messages"][1]["content"])
            return super()._chat(h, raw)

    with Spy(schedule=None) as srv:
        run(srv, tmp_path, n_prompts=20, alpha=1.0)
    assert len(prompts) == 20
    for p in prompts:
        assert "Background knowledge about the rare disease" in p and "passage 2." in p


def test_progress_bar_on_a_terminal_counts_resumed_prompts(tmp_path, monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    with FakeOpenAI(schedule=None) as srv:
        term = Terminal()
        monkeypatch.setattr(sys, "stderr", term)
        run(srv, tmp_path, n_prompts=6, progress=False)
        assert term.getvalue() == ""  # progress=False: no bar
        run(srv, tmp_path, n_prompts=10)  # 6 done before, 4 requested now
    out = term.getvalue()
    assert "synthesize" in out and "10/10" in out and "accepted=" in out
    assert " 6/10" in out  # the bar starts at the prompts already done
    plain = io.StringIO()
    monkeypatch.setattr(sys, "stderr", plain)
    with FakeOpenAI(schedule=None) as srv:
        run(srv, tmp_path / "log", n_prompts=4)
    assert "synthesize" not in plain.getvalue()  # not a terminal: no bar frames in logs


def test_api_key_never_leaks(tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    with FakeOpenAI(schedule=lambda k, a: "400" if k.startswith(("0", "1", "2", "3")) else
                    default_schedule(k, a)) as srv:
        run(srv, tmp_path, n_prompts=30)
    assert all(h == f"Bearer {TEST_KEY}" for h in srv.auth_headers)  # the key was really used
    rej = read_jsonl(tmp_path / "rejected.jsonl")
    assert any(r["reason"] == "api_bad_request" for r in rej)
    with FakeOpenAI(schedule=lambda k, a: "401") as srv:
        with pytest.raises(SynthesisError) as e:
            run(srv, tmp_path / "auth", n_prompts=5)
    assert TEST_KEY not in str(e.value) and TEST_KEY not in repr(e.value.__context__ or "")
    for f in list(tmp_path.rglob("*")):
        if f.is_file():
            assert TEST_KEY not in f.read_text(errors="replace"), f
    captured = capfd.readouterr()
    assert TEST_KEY not in caplog.text and TEST_KEY not in captured.out + captured.err


def test_cut_off_last_line_is_dropped_and_redone(tmp_path):
    with FakeOpenAI(schedule=None) as srv:
        run(srv, tmp_path, n_prompts=10)
    acc, _ = records(tmp_path)
    path = tmp_path / "synthetic.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])  # a kill in the middle of the last write
    with FakeOpenAI(schedule=None) as srv:
        r = run(srv, tmp_path, n_prompts=10)
        assert r.requests == 1 and r.accepted == 1
    assert records(tmp_path)[0] == acc


# --- validation ---------------------------------------------------------------

OPTS = {"A": "Fabry disease", "B": "Gaucher disease", "C": "Pompe disease", "D": "Wilson disease"}


@pytest.mark.parametrize("question,options,answer,reason", [
    ("", OPTS, "A", "missing_stem"),
    ("  ?? ", OPTS, "A", "missing_stem"),
    ("Which?", {k: OPTS[k] for k in "ABC"}, "A", "option_count"),
    ("Which?", OPTS | {"E": "x", "F": "y"}, "A", "option_count"),
    ("Which?", {"A": "a", "B": "b", "C": "c", "E": "e"}, "A", "option_letters"),
    ("Which?", OPTS | {"C": "  "}, "A", "empty_option"),
    ("Which?", OPTS | {"D": "fabry  DISEASE."}, "A", "duplicate_options"),
    ("Which?", OPTS, "E", "invalid_answer"),
    ("Which?", OPTS, None, "invalid_answer"),
    ("A boy with Wilson disease features. Which diagnosis?", OPTS, "D", "answer_leaked"),
])
def test_validation_rejects_with_reason(question, options, answer, reason):
    assert validate_item(question, options, answer)[0] == reason


def test_validation_accepts_good_items():
    assert validate_item("A boy with angiokeratomas. Which diagnosis?", OPTS, "A") is None
    # a word that merely contains the answer text is no leak
    assert validate_item("Which is not a Wilson diseases-like finding?", OPTS, "D") is None


def test_parse_generation_is_robust():
    obj = {"question": "Q?", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer": "B"}
    text = json.dumps(obj)
    assert parse_generation(text) == ("Q?", obj["options"], "B")
    assert parse_generation(f"Sure! Here it is:\n```json\n{text}\n```\nGood luck.")[2] == "B"
    assert parse_generation("prose " + text + " trailing")[0] == "Q?"
    assert parse_generation(json.dumps(obj | {"options": ["a", "b", "c", "d"], "answer": "(c)"}))[1:] == (
        obj["options"], "C")
    for bad, reason in [("I cannot do that.", "refusal"), ("", "refusal"), (text[:-10], "unparseable"),
                        ('{"question": 3, "options": 4}', "unparseable")]:
        with pytest.raises(ValueError) as e:
            parse_generation(bad)
        assert e.value.reason == reason


def test_deduper_exact_near_and_embedding():
    d = Deduper(jaccard_threshold=0.8)
    d.add("s1", "A 40-year-old man has chest pain radiating to the jaw. Next step?", OPTS)
    assert d.check("a 40 year old man has CHEST pain radiating to the jaw -- next step", OPTS)[0] == "exact_duplicate"
    assert d.check("A 41-year-old man has chest pain radiating to the jaw. Next step?", OPTS)[0] == "near_duplicate"
    assert d.check("A toddler with recurrent fractures and blue sclerae. Diagnosis?", OPTS) is None
    e = Deduper(embed_fn=lambda t: [1.0, float("toddler" in t)], cosine_threshold=0.99)
    e.add("s1", "adult case one", OPTS)
    assert e.check("completely different adult wording", OPTS)[0] == "near_duplicate"
    assert e.check("toddler case", OPTS) is None


def test_within_output_near_duplicates_are_removed(tmp_path):
    from tests.fake_openai import _completion, generated_question

    # every reply is the same question up to one word: only the first is accepted
    class Same(FakeOpenAI):
        def _chat(self, h, raw):
            obj, _ = generated_question("same")
            obj["question"] = obj["question"].replace("Which", f"Case {len(self.requests)}. Which")
            self.requests.append(("same", "chat", None))
            return self._json(h, 200, _completion(json.dumps(obj)))

    with Same(schedule=None) as srv:
        r = run(srv, tmp_path, n_prompts=6, alpha=0.0, workers=1)
    assert r.accepted == 1 and r.rejected_by_reason == {"near_duplicate": 5}


# --- offline generator --------------------------------------------------------

@dataclass(frozen=True)
class Phenotype:
    hpo_id: str
    name: str
    frequency: float | None


@dataclass(frozen=True)
class Disease:
    id: str
    name: str
    phenotypes: tuple
    onset: tuple = ()
    pmids: tuple = ()


def fake_diseases(n=40, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        family = i % 5  # diseases of a family share phenotypes
        pool = list(range(family * 20, family * 20 + 20))
        hp = rng.sample(pool, 6) + rng.sample(range(100, 300), 2)
        out.append(Disease(f"ORPHA:{i}", f"Disease {i}",
                           tuple(Phenotype(f"HP:{j:07d}", f"Finding {j}", rng.choice([None, 0.05, 0.5, 0.95]))
                                 for j in hp), ("Childhood onset",), (str(1000 + i),)))
    return out


def test_offline_generator():
    ds = fake_diseases()
    items = generate_offline(ds, 60, seed=3)
    assert items == generate_offline(ds, 60, seed=3)
    assert items != generate_offline(ds, 60, seed=4)
    assert len({it.key for it in items}) == 60
    by_id = {d.id: d for d in ds}
    rng = random.Random(0)
    hard, rand = [], []
    for it in items:
        assert validate_item(it.question, it.options, it.intended_answer) is None
        assert len(set(it.options.values())) == len(it.options) in (4, 5)
        p = it.provenance
        target = by_id[p["disease_id"]]
        assert it.options[it.intended_answer] == target.name
        assert 3 <= len(p["phenotype_ids"]) <= 6 and set(p["phenotype_ids"]) <= phenotype_ids(target)
        assert p["generator"] == "offline-hpo"
        for did in p["distractor_ids"]:
            hard.append(jaccard(phenotype_ids(target), phenotype_ids(by_id[did])))
        others = [d for d in ds if d.id != target.id]
        rand += [jaccard(phenotype_ids(target), phenotype_ids(d)) for d in rng.sample(others, 4)]
    assert min(hard) > 0 and sum(hard) / len(hard) > 2 * sum(rand) / len(rand)


# --- reasoning / memorization filter -----------------------------------------

def test_parse_label():
    assert parse_label("Let me think... <Reasoning>") == "reasoning"
    assert parse_label("<memorization>") == "memorization"
    assert parse_label("<Reasoning> no wait, <Memorization>") == "memorization"
    assert parse_label("It needs reasoning.") is None and parse_label(None) is None


def test_classify_against_fake_server(tmp_path):
    seeds = make_seeds(20)
    with FakeOpenAI(schedule=lambda k, a: "429" if a == 0 and k.endswith("3") else None) as srv:
        summary = classify(seeds, tmp_path / "labels.jsonl", base_url=srv.base_url, api_key=TEST_KEY,
                           workers=4, **FAST)
        rows = read_jsonl(tmp_path / "labels.jsonl")
        assert sorted(r["id"] for r in rows) == sorted(s.id for s in seeds)
        assert {r["label"] for r in rows} == {"reasoning", "memorization", None}
        for r in rows:
            assert r["label"] == parse_label(r["raw"]) and r["raw"]
        n = len(srv.requests)
        classify(seeds, tmp_path / "labels.jsonl", base_url=srv.base_url, api_key=TEST_KEY, **FAST)
        assert len(srv.requests) == n  # nothing re-requested
    assert sum(summary["counts"].values()) == 20


def test_batch_mode_matches_sync_run_and_is_idempotent(tmp_path):
    from synth.synthesize import synthesize_batch

    expected = _baseline(tmp_path, 30)
    out = tmp_path / "batch"
    kw = dict(n_prompts=30, alpha=0.3, entities=RARE_DISEASES, retriever=FakeRetriever(), seed=7,
              api_key=TEST_KEY, poll_interval=0.01, sleep=lambda s: None)
    with FakeOpenAI(batch_polls_before_done=2) as srv:
        r = synthesize_batch(make_seeds(), out, base_url=srv.base_url, **kw)
        assert r.accepted + r.rejected == 30 and not (out / "batch_state.json").exists()
        n = len(srv.requests)
        again = synthesize_batch(make_seeds(), out, base_url=srv.base_url, **kw)
        assert again.already_done == 30 and len(srv.requests) == n
    acc, rej = records(out)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "raw"} for r in rs]  # noqa: E731
    assert [r["key"] for r in acc] == [r["key"] for r in expected[0]]
    assert strip(rej) == strip(expected[1])
    assert [r["options"] for r in acc] == [r["options"] for r in expected[0]]
    assert TEST_KEY not in (out / "batch_input.jsonl").read_text()


def test_batch_restart_polls_the_submitted_batch(tmp_path):
    from synth.synthesize import synthesize_batch

    kw = dict(n_prompts=10, alpha=0.3, entities=RARE_DISEASES, retriever=FakeRetriever(), seed=7,
              api_key=TEST_KEY, poll_interval=0.01, sleep=lambda s: None)
    with FakeOpenAI(batch_polls_before_done=1000) as srv:
        with pytest.raises(SynthesisError, match="still in_progress"):
            synthesize_batch(make_seeds(), tmp_path, base_url=srv.base_url, max_wait=0.05, **kw)
        assert (tmp_path / "batch_state.json").exists()
        srv.batch_polls_before_done = 0
        r = synthesize_batch(make_seeds(), tmp_path, base_url=srv.base_url, **kw)
    assert [kind for _, kind, _ in srv.requests].count("batch_create") == 1
    assert r.accepted + r.rejected == 10 and not (tmp_path / "batch_state.json").exists()
