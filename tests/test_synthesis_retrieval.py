"""Retrieval for synthesis as the paper does it: MedCPT query/article encoders from a local
directory, a user corpus beside the HPO profiles, documents embedded at the encoder's real
length, and the injected passages recorded per item."""

from __future__ import annotations

import json
import shutil

import pytest

from launch.pipeline import Inputs, Pipeline
from launch.presets import pipeline_preset


def _random_bert(path, seed):
    torch = pytest.importorskip("torch")
    from transformers import BertConfig, BertModel

    from medssr_jax import assets
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(path, safe_serialization=True)
    shutil.copy(assets.minilm_dir() / "tokenizer.json", path / "tokenizer.json")


@pytest.fixture(scope="module")
def medcpt_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("medcpt")
    _random_bert(root / "MedCPT-Query-Encoder", 0)
    _random_bert(root / "MedCPT-Article-Encoder", 1)
    return root


def test_medcpt_retriever_and_a_user_corpus(medcpt_dir, tmp_path, monkeypatch):
    from synth import retrieval as rt

    corpus = tmp_path / "pubmed.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"PMID:{i}", "title": f"Case report {i}",
                                          "text": "A rare syndrome with seizures and ataxia. " * (40 + i)}) + "\n"
                              for i in range(3)))
    seen = {}
    real = rt.embed_corpus

    def recording(encoder, tokenizer, docs, **kw):
        seen.update(kw, n=len(docs), hidden=encoder.config.hidden_size)
        return real(encoder, tokenizer, docs, **kw)
    monkeypatch.setattr(rt, "embed_corpus", recording)
    cfg = pipeline_preset("tiny", retriever="medcpt", retriever_path=str(medcpt_dir), corpus=str(corpus),
                          corpus_max_docs=20, alpha=1.0, num_questions=4)
    pipe = Pipeline(cfg, tmp_path / "run", Inputs())
    pipe.check_inputs(("synthesize",))
    diseases, docs, retriever = pipe.knowledge()
    assert len(diseases) == 20 and len(docs) == 23 and {d["id"] for d in docs[-3:]} == {"PMID:0", "PMID:1", "PMID:2"}
    assert seen["max_len"] == 512 and seen["pooling"] == "cls" and not seen["normalize"] and seen["n"] == 23
    assert retriever.max_len == 64 and retriever.query_pooling == "cls" and not retriever.normalize
    hits = retriever.retrieve("seizures and ataxia", k=23)
    assert {d["id"] for d, _ in hits} == {d["id"] for d in docs}  # every document is indexed
    result = pipe.run_stage("synthesize")
    items = [json.loads(x) for x in (tmp_path / "run" / "synthesize" / "synthetic.jsonl").read_text().splitlines()]
    assert result["summary"]["rare_ratio"] == 1.0
    for it in items:  # which passages were injected, with their scores
        prov = it["provenance"]
        assert len(prov["retrieved_doc_ids"]) == cfg.retrieval_k == len(prov["retrieved_scores"])
        assert set(prov["retrieved_doc_ids"]) <= {d["id"] for d in docs}
    manifest = json.loads((tmp_path / "run" / "synthesize" / "manifest.json").read_text())
    assert manifest["config"]["retriever"] == "medcpt" and manifest["inputs"]["corpus"]
    # the embeddings went to a cache of their own (encoder, length, corpus, encoder path); drop it
    assert seen["out_dir"].name.startswith("medcpt-512-hpo20-pubmed3-")
    shutil.rmtree(seen["out_dir"])


def test_minilm_documents_are_embedded_at_its_real_length(tmp_path):
    enc = Pipeline(pipeline_preset("tiny"), tmp_path, Inputs()).encoders()
    assert (enc["name"], enc["doc_len"], enc["query_len"], enc["pooling"], enc["normalize"]) == \
        ("minilm", 256, 256, "mean", True)


def test_retrieval_settings_fail_loudly(tmp_path):
    with pytest.raises(ValueError, match="retriever=medcpt needs --config.retriever_path"):
        pipeline_preset("tiny", retriever="medcpt").validate()
    cfg = pipeline_preset("tiny", retriever="medcpt", retriever_path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no MedCPT query encoder"):
        Pipeline(cfg, tmp_path / "run", Inputs()).encoders()
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl: no such file or directory \(--config\.corpus\)"):
        Pipeline(pipeline_preset("tiny", corpus=str(tmp_path / "missing.jsonl")), tmp_path / "r2",
                 Inputs()).check_inputs(("synthesize",))
