"""MCQ record type, source readers and atomic JSONL writing."""

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from medssr_jax.data import (MCQ, read_headqa, read_mcq_jsonl, read_medmcqa, read_medqa,
                             read_medssr_eval, read_pseudo_labelled_jsonl, read_synthetic_jsonl,
                             write_jsonl)

REPO = Path(__file__).resolve().parents[1]
EVAL_DIR = Path(os.environ.get("MEDSSR_EVAL_DIR", REPO.parent / "shared" / "data" / "medssr-eval"))
EVAL_COUNTS = {"medqa": 1273, "medmcqa": 1200, "mmlu": 1089, "pubmedqa": 500, "bioasq": 782, "medbullets": 308}


def _jsonl(path, rows):
    with open(path, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode())
    return path


# --- MCQ ---------------------------------------------------------------------------

def test_mcq_prompt_letters_and_validation():
    m = MCQ(id="q1", question="Which?", options={"A": "x", "B": "y", "C": "z"}, answer="B", source="s")
    assert m.letters == "ABC"
    assert m.prompt_text() == "Which?\nA. x\nB. y\nC. z"
    assert MCQ.from_dict(m.to_dict()) == m
    assert len({m, MCQ.from_dict(m.to_dict())}) == 1
    with pytest.raises(ValueError, match="not one of"):
        MCQ(id="q", question="Q", options={"A": "x", "B": "y"}, answer="C")
    with pytest.raises(ValueError, match="consecutive"):
        MCQ(id="q", question="Q", options={"A": "x", "C": "y"})
    with pytest.raises(ValueError, match="2 to 10"):
        MCQ(id="q", question="Q", options={"A": "x"})
    with pytest.raises(ValueError, match="2 to 10"):
        MCQ(id="q", question="Q", options={k: k for k in "ABCDEFGHIJK"})
    ten = MCQ(id="q", question="Q", options={k: k for k in "ABCDEFGHIJ"}, answer="J")  # MedXpertQA has A..J
    assert ten.letters == "ABCDEFGHIJ"


# --- MedSSR evaluation format --------------------------------------------------------

def _eval_rec(i, n_opts=4, gold="A", **extra):
    opts = "\n".join(f"{'ABCDE'[j]}. option {j}" for j in range(n_opts))
    return {"id": f"t-{i}", "question": f"Stem {i}?\n{opts}", "gold": gold, "name": "toy", "long": False, **extra}


def test_medssr_eval_two_to_five_options_and_extra(tmp_path):
    recs = [_eval_rec(n, n_opts=n) for n in range(2, 6)]
    recs[0]["adversarial_trace_0"] = "kept"
    (tmp_path / "toy.json").write_text(json.dumps(recs))
    r = read_medssr_eval(tmp_path / "toy.json")
    out = r.load()
    assert [len(m.options) for m in out] == [2, 3, 4, 5]
    assert out[0].extra == {"long": False, "adversarial_trace_0": "kept"}
    assert out[3].question == "Stem 5?" and out[3].letters == "ABCDE" and out[3].source == "toy"
    assert r.stats.read == 4 and r.stats.n_skipped == 0


def test_medssr_eval_trailing_quote_line_is_repaired_and_reported(tmp_path):
    rec = _eval_rec(1)
    rec["question"] += '\n"'
    (tmp_path / "toy.json").write_text(json.dumps([rec]))
    r = read_medssr_eval(tmp_path / "toy.json", on_error="raise")
    (m,) = r.load()
    assert m.options["D"] == "option 3" and m.answer == "A"
    assert r.stats.repaired == {"trailing_junk": 1}
    assert "toy.json:record 1 (id t-1)" in r.stats.warnings[0]


@pytest.mark.parametrize("mutate, reason", [
    (lambda r: r.pop("gold"), "missing_field"),
    (lambda r: r.pop("id"), "missing_field"),
    (lambda r: r.update(question="   "), "missing_field"),
    (lambda r: r.update(gold="E"), "bad_answer"),
    (lambda r: r.update(question="Stem without options"), "no_options"),
    (lambda r: r.update(question="Stem\nA. x\nC. y"), "bad_options"),
    (lambda r: r.update(question="Stem\nA. x\nB. y\nfree text after"), "bad_options"),
    (lambda r: r.update(question=["not", "text"]), "bad_record"),
])
def test_medssr_eval_malformed(tmp_path, mutate, reason):
    bad = _eval_rec(2)
    mutate(bad)
    f = tmp_path / "toy.json"
    f.write_text(json.dumps([_eval_rec(1), bad, _eval_rec(3)]))
    r = read_medssr_eval(f)
    assert [m.id for m in r.load()] == ["t-1", "t-3"]
    assert r.stats.skipped == {reason: 1}
    assert r.stats.errors[0].startswith(f"{f}:record 2")
    with pytest.raises(ValueError, match=rf"toy.json:record 2.*{reason}"):
        read_medssr_eval(f, on_error="raise").load()


def test_medssr_eval_bad_utf8_and_bad_json(tmp_path):
    good = json.dumps(_eval_rec(1)).encode()
    bad = json.dumps(_eval_rec(2)).encode().replace(b"Stem 2", b"Stem \xff2")
    f = tmp_path / "toy.json"
    f.write_bytes(b"[" + good + b"," + bad + b"]")
    r = read_medssr_eval(f)
    assert [m.id for m in r.load()] == ["t-1"] and r.stats.skipped == {"bad_utf8": 1}
    f.write_text("[{")
    r = read_medssr_eval(f)
    assert r.load() == [] and r.stats.skipped == {"bad_json": 1}
    with pytest.raises(ValueError, match="bad_json"):
        read_medssr_eval(f, on_error="raise").load()


def test_medssr_eval_directory_and_names(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.json").write_text(json.dumps([{**_eval_rec(1), "name": name}]))
    assert [m.source for m in read_medssr_eval(tmp_path)] == ["a", "b"]
    assert [m.source for m in read_medssr_eval(tmp_path, names=["b"])] == ["b"]
    with pytest.raises(FileNotFoundError):
        read_medssr_eval(tmp_path, names=["c"])


def test_real_medssr_eval_files_all_read():
    assert EVAL_DIR.is_dir(), (
        f"MedSSR evaluation data not found: looked in {EVAL_DIR} (set MEDSSR_EVAL_DIR to the directory "
        "holding medqa.json, medmcqa.json, mmlu.json, pubmedqa.json, bioasq.json, medbullets.json)")
    r = read_medssr_eval(EVAL_DIR, names=list(EVAL_COUNTS))
    recs = r.load()
    assert Counter(m.source for m in recs) == EVAL_COUNTS
    assert r.stats.n_skipped == 0, r.stats.errors[:5]
    assert len({m.id for m in recs}) == len(recs)
    by_source = {}
    for m in recs:
        by_source.setdefault(m.source, Counter())[m.letters] += 1
    assert set(by_source["pubmedqa"]) == {"ABC"} and set(by_source["bioasq"]) == {"AB"}
    assert set(by_source["medbullets"]) == {"ABCDE"} and set(by_source["medqa"]) == {"ABCD"}
    m153 = next(m for m in recs if m.id == "medqa-000153")
    assert m153.options["D"] == "Age" and m153.answer == "A"
    assert any("medqa-000153" in w and "trailing_junk" in w for w in r.stats.warnings)
    assert all(w.split(":record")[0].endswith("medqa.json") for w in r.stats.warnings)
    mb = next(m for m in recs if m.source == "medbullets")
    assert {"answer_content", "reasoning_prob", "adversarial_trace_0"} <= set(mb.extra)


# --- MedQA -----------------------------------------------------------------------------

def _medqa(q="A 30-year-old man ...?", **kw):
    d = {"question": q, "answer": "Aspirin", "options": {"A": "Aspirin", "B": "Heparin", "C": "Warfarin",
                                                          "D": "Clopidogrel", "E": "Alteplase"},
         "meta_info": "step1", "answer_idx": "A", "metamap_phrases": ["man"]}
    d.update(kw)
    return d


def test_read_medqa(tmp_path):
    four = _medqa(options={"A": "Aspirin", "B": "Heparin", "C": "Warfarin", "D": "Clopidogrel"})
    f = _jsonl(tmp_path / "US_test.jsonl", [_medqa(), four, _medqa(answer="Heparin")])
    r = read_medqa(f, on_error="raise")
    a, b, c = r.load()
    assert a.id == "US_test-1" and a.letters == "ABCDE" and a.answer == "A" and a.source == "medqa"
    assert a.extra == {"answer": "Aspirin", "meta_info": "step1", "metamap_phrases": ["man"]}
    assert b.letters == "ABCD"
    assert r.stats.repaired == {"answer_text_mismatch": 1} and "line 3" in r.stats.warnings[0]


@pytest.mark.parametrize("row, reason", [
    (_medqa(answer_idx="F"), "bad_answer"),
    ({k: v for k, v in _medqa().items() if k != "question"}, "missing_field"),
    ({k: v for k, v in _medqa().items() if k != "options"}, "no_options"),
    (_medqa(options={}), "no_options"),
    (_medqa(options={"A": "x", "B": ""}), "bad_options"),
    (_medqa(options={"A": "x"}, answer_idx="A"), "bad_options"),
    (b"{not json\n", "bad_json"),
    (b'{"question": "\xc3\x28"}\n', "bad_utf8"),
    ([1, 2], "bad_record"),
])
def test_read_medqa_malformed(tmp_path, row, reason):
    f = _jsonl(tmp_path / "m.jsonl", [_medqa(), row, _medqa()])
    r = read_medqa(f)
    assert len(r.load()) == 2 and r.stats.skipped == {reason: 1}
    assert r.stats.errors[0].startswith(f"{f}:line 2: {reason}")
    with pytest.raises(ValueError, match=rf"m.jsonl:line 2: {reason}"):
        read_medqa(f, on_error="raise").load()


# --- MedMCQA -----------------------------------------------------------------------------

def _medmcqa(i, cop, **kw):
    d = {"id": f"mm{i}", "question": f"Q{i}?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": cop,
         "choice_type": "single", "exp": "because", "subject_name": "Anatomy", "topic_name": None}
    d.update(kw)
    return d


def test_read_medmcqa_one_based_official(tmp_path):
    f = _jsonl(tmp_path / "dev.json", [_medmcqa(1, 1), _medmcqa(2, 4)])
    r = read_medmcqa(f, on_error="raise")
    a, b = r.load()
    assert (a.answer, b.answer) == ("A", "D") and a.letters == "ABCD"
    assert a.extra["subject_name"] == "Anatomy" and a.extra["cop"] == 1 and a.extra["exp"] == "because"
    assert r.stats.warnings == []


def test_read_medmcqa_zero_based_detected(tmp_path):
    f = _jsonl(tmp_path / "hf.jsonl", [_medmcqa(1, 0), _medmcqa(2, 3)])
    assert [m.answer for m in read_medmcqa(f)] == ["A", "D"]
    assert [m.answer for m in read_medmcqa(f, cop_base=1)] == ["C"]  # cop 0 is invalid 1-based


def test_read_medmcqa_ambiguous_and_unlabelled(tmp_path):
    f = _jsonl(tmp_path / "t.jsonl", [_medmcqa(1, 2), _medmcqa(2, -1),
                                      {k: v for k, v in _medmcqa(3, 1).items() if k != "cop"}])
    r = read_medmcqa(f)
    assert [m.answer for m in r.load()] == ["B", None, None]
    assert r.stats.repaired == {"cop_base_assumed": 1}
    assert [m.answer for m in read_medmcqa(f, cop_base=0)] == ["C", None, None]
    f2 = _jsonl(tmp_path / "both.jsonl", [_medmcqa(1, 0), _medmcqa(2, 4)])
    with pytest.raises(ValueError, match="cop_base"):
        read_medmcqa(f2).load()


@pytest.mark.parametrize("row, reason", [
    (_medmcqa(9, 7), "bad_answer"),
    ({k: v for k, v in _medmcqa(9, 1).items() if k != "opd"}, "missing_field"),
    ({k: v for k, v in _medmcqa(9, 1).items() if k not in ("opa", "opb", "opc", "opd")}, "no_options"),
    (_medmcqa(9, 1, opc=""), "bad_options"),
    (_medmcqa(9, 1, id=None), "missing_field"),
])
def test_read_medmcqa_malformed(tmp_path, row, reason):
    f = _jsonl(tmp_path / "m.jsonl", [_medmcqa(1, 4), row])
    r = read_medmcqa(f)
    assert len(r.load()) == 1 and r.stats.skipped == {reason: 1}
    assert r.stats.errors[0].startswith(f"{f}:line 2: {reason}")


# --- HEAD-QA ------------------------------------------------------------------------------

def _hq(qid, n=4, ra=2, **kw):
    d = {"qid": qid, "qtext": f"Question {qid}?", "ra": ra, "image": "",
         "answers": [{"aid": j, "atext": f"ans {j}"} for j in range(n, 0, -1)]}  # unsorted aids
    d.update(kw)
    return d


def test_read_headqa_layouts(tmp_path):
    single = tmp_path / "exam.json"
    single.write_text(json.dumps({"name": "Cuaderno_2013_1_B", "category": "biology", "year": "2013",
                                  "data": [_hq(1), _hq(2, n=5, ra=5)]}))
    r = read_headqa(single, on_error="raise")
    a, b = r.load()
    assert a.id == "Cuaderno_2013_1_B-1" and a.options == {"A": "ans 1", "B": "ans 2", "C": "ans 3", "D": "ans 4"}
    assert a.answer == "B" and b.answer == "E" and b.letters == "ABCDE"
    assert a.extra["category"] == "biology" and a.extra["ra"] == 2 and a.extra["image"] == ""
    full = tmp_path / "HEAD_EN.json"
    full.write_text(json.dumps({"version": "1.0", "language": "en", "exams": {
        "Cuaderno_2014_1_M": {"name": "Cuaderno_2014_1_M", "category": "medicine", "data": [_hq(7, ra=1)]}}}))
    (m,) = read_headqa(full, on_error="raise")
    assert m.id == "Cuaderno_2014_1_M-7" and m.answer == "A" and m.extra["category"] == "medicine"
    lst = tmp_path / "list.json"
    lst.write_text(json.dumps([{"name": "e1", "data": [_hq(1)]}, {"name": "e2", "data": [_hq(1)]}]))
    assert [m.id for m in read_headqa(lst)] == ["e1-1", "e2-1"]


@pytest.mark.parametrize("q, reason", [
    (_hq(3, ra=9), "bad_answer"),
    (_hq(3, answers=[]), "no_options"),
    (_hq(3, n=11), "bad_options"),
    (_hq(3, qtext=""), "missing_field"),
    (_hq(3, answers=[{"aid": 1}]), "bad_options"),
])
def test_read_headqa_malformed(tmp_path, q, reason):
    f = tmp_path / "exam.json"
    f.write_text(json.dumps({"data": [_hq(1), q]}))
    r = read_headqa(f)
    assert [m.id for m in r.load()] == ["1"] and r.stats.skipped == {reason: 1}
    assert r.stats.errors[0].startswith(f"{f}:record 2")


# --- our own outputs ----------------------------------------------------------------------

def test_read_synthetic_and_pseudo_labelled(tmp_path):
    from synth.synthesize import SynthItem
    item = SynthItem(key="k1", question="Stem?", options={"A": "a", "B": "b", "C": "c", "D": "d"},
                     intended_answer="C", provenance={"entity": "Fabry disease", "model": "m"})
    f = _jsonl(tmp_path / "synthetic.jsonl", [item.to_dict(), {**item.to_dict(), "key": "k2", "options": {"A": "a"}}])
    r = read_synthetic_jsonl(f)
    (m,) = r.load()
    assert m.id == "k1" and m.answer is None and m.source == "synthetic"
    assert m.extra == {"intended_answer": "C", "provenance": {"entity": "Fabry disease", "model": "m"}}
    assert r.stats.skipped == {"bad_options": 1}

    from synth.pseudo_label import LabelledItem
    li = LabelledItem(id="k1", question="Stem?", options=dict(item.options), label="B", confidence=0.75,
                      counts={"B": 6, "A": 2}, n=8, n_unparseable=0, unparseable_share=0.0, kept=True,
                      answers=["B"] * 6 + ["A"] * 2, intended_answer="C")
    d = li.to_dict()
    d.pop("kept")
    f = _jsonl(tmp_path / "pseudo_labelled.jsonl", [d, {**d, "id": "k2", "label": "E"}])
    r = read_pseudo_labelled_jsonl(f)
    (m,) = r.load()
    assert m.answer == "B" and m.extra["label"] == "B" and m.extra["confidence"] == 0.75
    assert m.extra["counts"] == {"B": 6, "A": 2} and m.extra["intended_answer"] == "C"
    assert r.stats.skipped == {"bad_answer": 1}


def test_write_jsonl_atomic_roundtrip(tmp_path):
    recs = [MCQ(id=f"q{i}", question="Stem é?", options={"A": "x", "B": "y"}, answer="B" if i else None,
                source="s", extra={"k": [i]}) for i in range(3)]
    out = tmp_path / "sub" / "out.jsonl"
    assert write_jsonl(recs, out) == 3
    assert read_mcq_jsonl(out, on_error="raise").load() == recs

    def boom():
        yield recs[0]
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl(boom(), out)
    assert read_mcq_jsonl(out).load() == recs  # the earlier file is untouched
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.jsonl"]  # no temp file left
