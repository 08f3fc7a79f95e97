"""Dense retrieval: exact search, ScaNN indexes (recall, save/load), resumable embedding, Retriever.

The HPO test embeds all ~4,300 Orphanet profiles with MiniLM (max_len 32; about 80 s on
2 busy CPU cores). Its shards are kept under the asset cache, so later runs reuse them.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest

from synth import retrieval as rt

import scann  # noqa: E402,F401  (required: pip install -e ".[test]"; wheels exist for this platform)


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_exact_search_matches_sorting():
    rng = np.random.default_rng(0)
    db, q = _unit(rng, 1000, 24), _unit(rng, 7, 24)
    for metric in rt.METRICS:
        idx, scores = rt.exact_search(db, q, 5, metric=metric, block=300)
        full = q @ db.T if metric == "dot_product" else -((q[:, None] - db[None]) ** 2).sum(-1)
        ref = np.argsort(-full, axis=1)[:, :5]
        np.testing.assert_array_equal(idx, ref)
        np.testing.assert_allclose(scores, np.take_along_axis(full, ref, 1), rtol=1e-5, atol=1e-5)


def test_brute_force_index_is_exact_and_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    db, q = _unit(rng, 500, 16), _unit(rng, 9, 16)
    ids = [f"doc{i}" for i in range(500)]
    index = rt.Index.build(db, ids)
    assert index.method == "brute_force" and index.backend == "scann"
    got, scores = index.search(q, 4)
    ref, ref_scores = rt.exact_search(db, q, 4)
    assert got == [[ids[i] for i in row] for row in ref]
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    loaded = rt.Index.load(index.save(tmp_path / "bf"))
    assert loaded.search(q, 4)[0] == got
    assert index.search(q[0], 600)[1].shape == (1, 500)  # k capped at the index size


def test_index_arguments_are_checked():
    db = _unit(np.random.default_rng(2), 10, 8)
    with pytest.raises(ValueError, match="ids are not unique"):
        rt.Index.build(db, ["a"] * 10)
    with pytest.raises(ValueError, match="3 ids for 10 embeddings"):
        rt.Index.build(db, ["a", "b", "c"])
    with pytest.raises(ValueError, match="unknown index parameters"):
        rt.Index.build(db, list("abcdefghij"), method="tree_ah", leaves=3)
    with pytest.raises(ValueError, match="dimension 4, the index 8"):
        rt.Index.build(db, list("abcdefghij")).search(np.zeros((1, 4)), 1)


def test_tree_ah_params_follow_corpus_size():
    p = rt.tree_ah_params(1_000_000)
    assert (p["num_leaves"], p["num_leaves_to_search"], p["reorder"]) == (1000, 100, 100)
    assert rt.tree_ah_params(4281)["num_leaves"] == 65
    assert rt.tree_ah_params(4281)["num_leaves_to_search"] == 40  # the floor for small corpora
    assert rt.tree_ah_params(900)["num_leaves_to_search"] == 30  # every leaf


def test_load_embeddings(tmp_path):
    emb = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.save(tmp_path / "embeds_chunk_0.npy", emb)
    (tmp_path / "pmids_chunk_0.json").write_text(json.dumps([11, 22, 33, 44]))  # MedCPT's layout
    got, ids = rt.load_embeddings(tmp_path / "embeds_chunk_0.npy", tmp_path / "pmids_chunk_0.json")
    np.testing.assert_array_equal(got, emb)
    assert ids == ["11", "22", "33", "44"]
    (tmp_path / "ids.txt").write_text("a\nb\nc\n")
    with pytest.raises(ValueError, match="3 ids but .* has 4 rows"):
        rt.load_embeddings(tmp_path / "embeds_chunk_0.npy", tmp_path / "ids.txt")


@pytest.fixture(scope="module")
def minilm():
    from tokenizers import Tokenizer
    from medssr_jax.assets import minilm_dir
    from models import bert
    d = minilm_dir()
    encoder, _ = bert.from_pretrained(d)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return encoder, tok


@pytest.mark.real_assets
def test_embed_corpus_resumes_from_shards(tmp_path, minilm, capsys):
    encoder, tok = minilm
    docs = [{"id": f"d{i}", "title": "", "text": f"patient {i} has fever and a rash number {i}"}
            for i in range(10)]
    kw = dict(batch_size=4, max_len=16, pooling="mean", normalize=True, shard_size=4)
    emb, ids = rt.embed_corpus(encoder, tok, docs, out_dir=tmp_path / "emb", **kw)
    assert emb.shape == (10, 384) and ids == [d["id"] for d in docs]
    assert "docs/s" in capsys.readouterr().err
    direct = rt.embed_texts(encoder, tok, [d["text"] for d in docs], batch_size=4, max_len=16,
                            pooling="mean", normalize=True)
    np.testing.assert_allclose(emb, direct, atol=1e-5)
    # a crash after two shards: the last shard is missing, the middle one half-written
    (tmp_path / "emb" / "shard_00002.npy").unlink()
    (tmp_path / "emb" / "shard_00001.ids.json").write_text("{")
    emb2, ids2 = rt.embed_corpus(encoder, tok, iter(docs), out_dir=tmp_path / "emb", **kw)
    err = capsys.readouterr().err
    assert "4 from finished shards" in err and "(10 docs" not in err
    np.testing.assert_allclose(emb2, emb, atol=1e-6)
    assert ids2 == ids
    # changed text invalidates only its shard
    docs[5] = dict(docs[5], text="a different text")
    emb3, _ = rt.embed_corpus(encoder, tok, docs, out_dir=tmp_path / "emb", **kw)
    assert "6 from finished shards" in capsys.readouterr().err
    assert not np.allclose(emb3[5], emb[5]) and np.allclose(emb3[6], emb[6], atol=1e-6)
    all_emb, all_ids = rt.load_embedding_shards(tmp_path / "emb")
    np.testing.assert_allclose(all_emb, emb3, atol=1e-6)


@pytest.fixture(scope="module")
def hpo_index_data(minilm):
    from medssr_jax.assets import cache_dir
    from synth import knowledge as kn
    encoder, tok = minilm
    terms = kn.load_obo()
    diseases = kn.load_diseases(obo_terms=terms)
    docs = list(kn.build_corpus(diseases, terms))
    t0 = time.perf_counter()
    emb, ids = rt.embed_corpus(encoder, tok, docs, batch_size=64, max_len=32, pooling="mean",
                               normalize=True, out_dir=cache_dir() / "embeddings" / f"hpo-minilm-32-{len(docs)}")
    print(f"\nembedded {len(docs)} HPO profiles in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    names = [d.name for d in diseases[::15]]  # ~290 queries: disease names
    queries = rt.embed_texts(encoder, tok, names, batch_size=64, max_len=32, pooling="mean", normalize=True)
    return docs, emb, ids, queries, [d.id for d in diseases[::15]]


@pytest.mark.real_assets
@pytest.mark.slow
def test_tree_ah_recall_speed_and_round_trip(tmp_path, hpo_index_data):
    docs, emb, ids, queries, _ = hpo_index_data
    assert len(ids) > 3_500
    exact, _ = rt.exact_search(emb, queries, 10)
    # This corpus is small and its profiles are alike (cosine ~0.4 between random pairs): 10% of
    # the leaves reaches recall ~0.74; the size-derived floor of 40 of 65 leaves reaches >= 0.95.
    index = rt.Index.build(emb, ids, method="tree_ah")  # parameters from the corpus size
    assert index.params["num_leaves"] == 65 and index.params["reorder"] == 100
    got, scores = index.search(queries, 10)
    ids_arr = np.asarray(ids, object)
    recall = np.mean([len(set(g) & set(ids_arr[e])) / 10 for g, e in zip(got, exact)])
    assert recall >= 0.95, recall
    assert np.all(np.diff(scores, axis=1) <= 1e-6)

    def best_of(fn, reps=5):
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)
    t_ah = best_of(lambda: index.search(queries, 10))
    t_exact = best_of(lambda: rt.exact_search(emb, queries, 10))
    print(f"\nrecall@10 {recall:.3f}; {len(queries)} queries: tree-AH {t_ah * 1e3:.1f} ms, "
          f"numpy exact {t_exact * 1e3:.1f} ms, speed-up {t_exact / t_ah:.1f}x", file=sys.stderr)

    loaded = rt.Index.load(index.save(tmp_path / "idx"))
    (tmp_path / "idx").rename(tmp_path / "moved")  # the saved index does not depend on its path
    loaded = rt.Index.load(tmp_path / "moved")
    got2, scores2 = loaded.search(queries, 10)
    assert got2 == got
    np.testing.assert_array_equal(scores2, scores)


@pytest.mark.real_assets
def test_disease_name_retrieves_its_profile(minilm, hpo_index_data):
    encoder, tok = minilm
    docs, emb, ids, queries, query_ids = hpo_index_data
    index = rt.Index.build(emb, ids)  # auto: brute force below 20k documents
    assert index.method == "brute_force"
    retriever = rt.Retriever(encoder, tok, index, docs, query_pooling="mean", normalize=True, max_len=32)
    for name, did in [("Marfan syndrome", "ORPHA:558"), ("Gaucher disease", "ORPHA:355"),
                      ("Simpson-Golabi-Behmel syndrome", "ORPHA:373")]:
        hits = retriever.retrieve(name, k=3)
        assert hits[0][0]["id"] == did, (name, [(d["id"], d["title"], s) for d, s in hits])
        assert hits[0][1] >= hits[1][1]
    # over the sampled names, the disease's own profile ranks first for the large majority
    top, _ = index.search(queries, 1)
    assert np.mean([t[0] == q for t, q in zip(top, query_ids)]) > 0.9


def test_numpy_fallback_without_scann(tmp_path, monkeypatch):
    monkeypatch.setattr(rt, "have_scann", lambda: False)
    rng = np.random.default_rng(3)
    db, q = _unit(rng, 200, 8), _unit(rng, 3, 8)
    ids = [str(i) for i in range(200)]
    with pytest.warns(UserWarning, match="scann is not installed.*exact numpy search"):
        index = rt.Index.build(db, ids, method="tree_ah")
    assert index.backend == "numpy"
    ref, _ = rt.exact_search(db, q, 5)
    assert index.search(q, 5)[0] == [[str(i) for i in row] for row in ref]
    assert rt.Index.load(index.save(tmp_path / "np")).search(q, 5)[0] == index.search(q, 5)[0]
