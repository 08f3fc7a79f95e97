"""Parity of the Flax BERT encoder with transformers' BertModel (real MiniLM and a tiny random model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import bert

TOL = 1e-4


def _hf_embeddings(hf, ids, mask, pooling, normalize):
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state
    if pooling == "cls":
        emb = out[:, 0]
    else:  # sentence_transformers.models.Pooling, mean mode
        m = torch.tensor(mask, dtype=torch.float32)[..., None]
        emb = (out * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if normalize:
        emb = torch.nn.functional.normalize(emb, p=2, dim=1)
    return out.numpy(), emb.numpy()


def _masked_hidden_close(ours, ref, mask):
    keep = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[keep], ref[keep], rtol=TOL, atol=TOL)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=96, max_position_embeddings=40, type_vocab_size=2)
    hf = BertModel(cfg, add_pooling_layer=True).eval()
    with torch.no_grad():  # non-trivial LayerNorm parameters and biases
        for name, p in hf.named_parameters():
            if "LayerNorm.weight" in name:
                p.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    d = tmp_path_factory.mktemp("tiny_bert")
    hf.save_pretrained(d)
    return d, hf


def _batch(vocab, lengths, t, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (len(lengths), t)).astype(np.int32)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    return ids, mask


@pytest.mark.parametrize("pooling,normalize", [("cls", False), ("mean", False), ("mean", True)])
def test_tiny_random_bert_matches_transformers(tiny_dir, pooling, normalize):
    d, hf = tiny_dir
    model, cfg = bert.from_pretrained(d)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads) == (3, 48, 4)
    ids, mask = _batch(cfg.vocab_size, [17, 5, 1], 17)
    ref_h, ref_e = _hf_embeddings(hf, ids, mask, pooling, normalize)
    _masked_hidden_close(bert.hidden_states(model, ids, mask), ref_h, mask)
    ours = bert.encode(model, ids, mask, pooling=pooling, normalize=normalize)
    assert ours.shape == (3, 48)
    np.testing.assert_allclose(np.asarray(ours), ref_e, rtol=TOL, atol=TOL)


def test_token_type_ids_match_transformers(tiny_dir):
    d, hf = tiny_dir
    model, _ = bert.from_pretrained(d)
    ids, mask = _batch(120, [9, 9], 9, seed=3)
    tt = np.zeros_like(ids)
    tt[:, 5:] = 1  # a text pair, as MedCPT's article encoder takes (title, abstract)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                 token_type_ids=torch.tensor(tt, dtype=torch.long)).last_hidden_state.numpy()
    ours = bert.encode(model, ids, mask, pooling="cls", token_type_ids=tt)
    np.testing.assert_allclose(np.asarray(ours), ref[:, 0], rtol=TOL, atol=TOL)


def test_padding_does_not_change_embeddings(tiny_dir):
    model, _ = bert.from_pretrained(tiny_dir[0])
    ids, mask = _batch(120, [6], 6, seed=4)
    padded = np.pad(ids, ((0, 0), (0, 10)))
    pmask = np.pad(mask, ((0, 0), (0, 10)))
    for pooling in bert.POOLINGS:
        np.testing.assert_allclose(np.asarray(bert.encode(model, padded, pmask, pooling=pooling)),
                                   np.asarray(bert.encode(model, ids, mask, pooling=pooling)),
                                   rtol=1e-5, atol=1e-5)


def test_load_errors_name_the_problem(tmp_path, tiny_dir):
    from models.safetensors_io import SafetensorsFile, write_sharded
    d, _ = tiny_dir
    st = SafetensorsFile(d / "model.safetensors")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((d / "config.json").read_text())
    keep = [k for k in st.keys() if "encoder.layer.2.output.dense.weight" not in k]
    write_sharded(bad, [(k, st.shape(k), st.tensor(k).dtype) for k in keep], st.tensor)
    with pytest.raises(ValueError, match="missing tensors.*encoder.layer.2.output.dense.weight"):
        bert.from_pretrained(bad)
    with pytest.raises(ValueError, match="pooling must be one of"):
        model, _ = bert.from_pretrained(d)
        bert.encode(model, np.ones((1, 3), np.int32), pooling="max")


@pytest.mark.real_assets
def test_minilm_matches_transformers_and_sentence_transformers_pooling():
    from tokenizers import Tokenizer
    from transformers import BertModel
    from medssr_jax.assets import minilm_dir
    d = minilm_dir()
    settings = bert.sentence_transformers_pooling(d)
    assert settings == {"pooling": "mean", "normalize": True, "max_len": 256}
    model, cfg = bert.from_pretrained(d)
    assert (cfg.num_layers, cfg.hidden_size) == (6, 384)
    hf = BertModel.from_pretrained(d).eval()
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    texts = ["Marfan syndrome is a disorder of connective tissue.",
             "Arachnodactyly, ectopia lentis and aortic root dilatation.",
             "fever"]
    enc = tok.encode_batch(texts)
    ids = np.array([e.ids for e in enc], np.int32)
    mask = np.array([e.attention_mask for e in enc], np.int32)
    ref_h, _ = _hf_embeddings(hf, ids, mask, "cls", False)
    _masked_hidden_close(bert.hidden_states(model, ids, mask), ref_h, mask)
    for pooling, normalize in [("cls", False), ("mean", True)]:
        _, ref_e = _hf_embeddings(hf, ids, mask, pooling, normalize)
        ours = np.asarray(bert.encode(model, ids, mask, pooling=pooling, normalize=normalize))
        np.testing.assert_allclose(ours, ref_e, rtol=TOL, atol=TOL)
    emb = np.asarray(bert.encode(model, ids, mask, pooling="mean", normalize=True))
    sims = emb @ emb.T  # the two Marfan sentences are closer to each other than to "fever"
    assert sims[0, 1] > sims[0, 2] and sims[0, 1] > sims[1, 2]


class _IdTokenizer:
    """Texts of space-separated ids, framed by ids 1 and 2 the way [CLS] ... [SEP] frame BERT input."""

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[1] + [int(t) for t in s.split()] + [2] for s in texts]}


def test_embedding_sharded_over_8_devices_equals_one_device(tiny_dir):
    import jax

    from medssr_jax.sharding import make_mesh
    from synth.retrieval import embed_texts
    assert jax.device_count() == 8
    model, _ = bert.from_pretrained(tiny_dir[0])
    rng = np.random.default_rng(3)
    texts = [" ".join(map(str, rng.integers(3, 120, rng.integers(2, 30)))) for _ in range(21)]
    plain = embed_texts(model, _IdTokenizer(), texts, batch_size=8, max_len=40, pooling="mean")
    sharded = embed_texts(model, _IdTokenizer(), texts, batch_size=8, max_len=40, pooling="mean",
                          mesh=make_mesh(data=4, fsdp=2, tensor=1))
    assert plain.shape == (21, 48) and np.abs(plain).max() > 0.1
    np.testing.assert_allclose(sharded, plain, rtol=1e-5, atol=1e-5)
