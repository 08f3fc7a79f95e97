"""Parity of the Flax Qwen3/Llama ports with PyTorch transformers, per component and end to end."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import models
from medssr_jax.sharding import make_mesh
from models import layers
from models.checkpoint import param_items
from models.transformer import block_forward, causal_mask, layer_weights
from tests.hf_models import LLAMA3_SCALING, hf_logits, make_hf_model, max_rel_err

TOL = 1e-4


def _load(tmp_path, hf_model, **kw):
    d = tmp_path / "hf"
    hf_model.save_pretrained(d)
    return models.from_pretrained(d, **kw)


def _tokens(shape, vocab=160, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


# --- components --------------------------------------------------------------

def test_rms_norm_matches_hf():
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
    norm = Qwen3RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    x = np.random.default_rng(1).normal(size=(3, 5, 48)).astype(np.float32) * 4
    with torch.no_grad():
        ref = norm(torch.tensor(x)).numpy()
    ours = layers.rms_norm(jnp.asarray(x), jnp.asarray(norm.weight.detach().numpy()), 1e-6)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,scaling", [("qwen3", None), ("llama", LLAMA3_SCALING)])
def test_rotary_matches_hf_beyond_original_context(tmp_path, family, scaling):
    hf = make_hf_model(family, rope_scaling=scaling)
    _, cfg = _load(tmp_path, hf)
    if scaling:
        assert cfg.rope_scaling is not None and cfg.rope_scaling.original_max_position_embeddings == 32
    # positions far beyond original_max_position_embeddings (32) exercise all three frequency bands
    pos = np.array([[0, 1, 7, 31, 32, 100, 257, 511]], np.int64)
    x = torch.zeros(1, pos.shape[1], cfg.head_dim)
    with torch.no_grad():
        cos_ref, sin_ref = hf.model.rotary_emb(x, torch.tensor(pos))
    cos, sin = layers.rope_cos_sin(jnp.asarray(pos), cfg)
    np.testing.assert_allclose(cos, cos_ref.numpy(), atol=1e-5)
    np.testing.assert_allclose(sin, sin_ref.numpy(), atol=1e-5)
    if scaling:  # the scaled frequencies really differ from the unscaled ones
        plain = layers.rope_inv_freq(cfg.head_dim, cfg.rope_theta, None)
        assert not np.allclose(layers.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), plain)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_attention_and_layer_match_hf(tmp_path, family):
    hf = make_hf_model(family, heads=4, kv_heads=2)
    model, cfg = _load(tmp_path, hf)
    b, t = 2, 9
    x = np.random.default_rng(2).normal(size=(b, t, cfg.hidden_size)).astype(np.float32)
    pos = np.tile(np.arange(t), (b, 1))
    causal = np.triu(np.full((t, t), -np.inf, np.float32), 1)[None, None].repeat(b, 0)
    with torch.no_grad():
        pe = hf.model.rotary_emb(torch.tensor(x), torch.tensor(pos))
        hf_layer = hf.model.layers[0]
        h = hf_layer.input_layernorm(torch.tensor(x))
        attn_ref = hf_layer.self_attn(h, pe, torch.tensor(causal))[0].numpy()
        layer_ref = hf_layer(torch.tensor(x), attention_mask=torch.tensor(causal),
                             position_ids=torch.tensor(pos), position_embeddings=pe)
        layer_ref = (layer_ref[0] if isinstance(layer_ref, tuple) else layer_ref).numpy()

    w = layer_weights(model.layers[0], jnp.float32)
    cos, sin = layers.rope_cos_sin(jnp.asarray(pos), cfg)
    mask = causal_mask(jnp.ones((b, t), bool))
    captured = {}

    def attend(q, k, v):
        out = layers.attention(q, k, v, mask)
        captured["attn"] = jnp.einsum("BTNH,NHD->BTD", out, w["o_nhd"])
        return out, None

    layer_out, _ = block_forward(w, jnp.asarray(x), cos, sin, cfg, attend)
    np.testing.assert_allclose(captured["attn"], attn_ref, atol=TOL * np.abs(attn_ref).max())
    np.testing.assert_allclose(layer_out, layer_ref, atol=TOL * np.abs(layer_ref).max())


# --- whole models -------------------------------------------------------------

@pytest.mark.parametrize("family,heads,kv_heads,tied", [
    ("qwen3", 4, 4, False),   # GQA ratio 1
    ("qwen3", 4, 2, True),    # ratio 2, tied
    ("qwen3", 8, 2, False),   # ratio 4
    ("llama", 4, 1, True),    # ratio 4, tied
    ("llama", 4, 2, False),
])
def test_logits_match_hf(tmp_path, family, heads, kv_heads, tied):
    hf = make_hf_model(family, heads=heads, kv_heads=kv_heads, tied=tied)
    model, cfg = _load(tmp_path, hf)
    assert (cfg.family, cfg.num_heads, cfg.num_kv_heads, cfg.tie_word_embeddings) == (
        family, heads, kv_heads, tied)
    tokens = _tokens((2, 24))
    ours = jax.jit(lambda m, t: m(t))(model, jnp.asarray(tokens))
    ref = hf_logits(hf, tokens)
    assert ours.dtype == jnp.float32 and ours.shape == ref.shape
    assert max_rel_err(ours, ref) < TOL


def test_llama31_rope_scaling_long_sequence(tmp_path):
    """Positions run past original_max_position_embeddings (32) up to 300."""
    hf = make_hf_model("llama", rope_scaling=LLAMA3_SCALING, kv_heads=2)
    model, cfg = _load(tmp_path, hf)
    tokens = _tokens((1, 300), seed=3)
    ours = jax.jit(lambda m, t: m(t))(model, jnp.asarray(tokens))
    assert max_rel_err(ours, hf_logits(hf, tokens)) < TOL


def test_left_padded_batch_matches_hf(tmp_path):
    hf = make_hf_model("qwen3")
    model, _ = _load(tmp_path, hf)
    tokens = _tokens((3, 16), seed=4)
    mask = np.ones((3, 16), np.int64)
    mask[1, :5] = 0
    mask[2, :11] = 0
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    ours = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)))
    ref = hf_logits(hf, tokens, mask, positions)
    valid = mask.astype(bool)
    assert np.isfinite(ours).all()  # fully padded query rows give no NaN
    assert max_rel_err(ours[valid], ref[valid]) < TOL
    # the valid part of a padded row equals the same prompt run alone
    alone = np.asarray(model(jnp.asarray(tokens[2:3, 11:])))
    assert max_rel_err(ours[2, 11:], alone[0]) < TOL


def test_export_round_trip(tmp_path):
    hf = make_hf_model("llama", rope_scaling=LLAMA3_SCALING, tied=False)
    model, cfg = _load(tmp_path, hf)
    out = models.save_pretrained(model, cfg, tmp_path / "export")
    # transformers loads what we wrote and gives the same logits
    from transformers import AutoModelForCausalLM
    reloaded_hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    tokens = _tokens((2, 40), seed=5)
    assert max_rel_err(hf_logits(reloaded_hf, tokens), hf_logits(hf, tokens)) < 1e-6
    # import -> export -> import is exact
    again, cfg2 = models.from_pretrained(out)
    assert cfg2 == cfg
    for (p1, v1), (p2, v2) in zip(param_items(model), param_items(again)):
        assert p1 == p2
        np.testing.assert_array_equal(np.asarray(v1[...]), np.asarray(v2[...]))
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["rope_scaling"]["rope_type"] == "llama3"


def test_export_shards_with_index(tmp_path):
    hf = make_hf_model("qwen3", tied=False)
    model, cfg = _load(tmp_path, hf)
    out = models.save_pretrained(model, cfg, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    again, _ = models.from_pretrained(out)
    tokens = jnp.asarray(_tokens((1, 8)))
    np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(again(tokens)))


def test_bf16_forward_close_to_fp32(tmp_path):
    hf = make_hf_model("qwen3")
    hf.save_pretrained(tmp_path / "hf")
    m32, _ = models.from_pretrained(tmp_path / "hf")
    m16, cfg16 = models.from_pretrained(tmp_path / "hf", dtype="bfloat16")
    assert m16.layers[0].q_dnh[...].dtype == jnp.bfloat16
    tokens = jnp.asarray(_tokens((2, 16)))
    l32, l16 = np.asarray(m32(tokens)), np.asarray(m16(tokens))
    assert l16.dtype == np.float32  # logits stay fp32
    assert max_rel_err(l16, l32) < 0.05
    assert (l16.argmax(-1) == l32.argmax(-1)).mean() > 0.9


def test_dtype_objects_load_and_save(tmp_path):
    hf = make_hf_model("qwen3", tied=False)
    hf.save_pretrained(tmp_path / "hf")
    m16, cfg16 = models.from_pretrained(tmp_path / "hf", dtype=jnp.bfloat16)
    assert cfg16.dtype == cfg16.param_dtype == "bfloat16"
    assert m16.layers[0].q_dnh[...].dtype == jnp.bfloat16
    out = models.save_pretrained(m16, cfg16, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again, cfg_again = models.from_pretrained(out, dtype=np.dtype("bfloat16"), param_dtype=np.float32)
    assert cfg_again.param_dtype == "float32" and again.layers[0].q_dnh[...].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(again.layers[0].q_dnh[...]),
                                  np.asarray(m16.layers[0].q_dnh[...]).astype(np.float32))
    models.save_pretrained(again, cfg_again, tmp_path / "out16", dtype=jnp.bfloat16)
    assert json.loads((tmp_path / "out16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match=r"param_dtype=.*int32.* not a floating-point dtype"):
        models.from_pretrained(out, param_dtype=jnp.int32)


def test_sharded_forward_equals_unsharded(tmp_path):
    assert jax.device_count() == 8
    hf = make_hf_model("qwen3", heads=4, kv_heads=2, tied=False, vocab=128)
    hf.save_pretrained(tmp_path / "hf")
    ref_model, _ = models.from_pretrained(tmp_path / "hf")
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    model, _ = models.from_pretrained(tmp_path / "hf", mesh=mesh)
    q = model.layers[0].q_dnh[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (32, 2, 16)
    tokens = _tokens((4, 16), vocab=128)
    sharded = jax.jit(lambda m, t: m(t))(model, jax.device_put(
        jnp.asarray(tokens), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))))
    plain = ref_model(jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(plain), rtol=1e-5, atol=1e-5)


def test_presets_have_published_sizes():
    sizes = {name: models.preset(name).num_params() / 1e9 for name in
             ("qwen3_0p6b", "qwen3_8b", "llama31_8b", "llama32_1b", "smollm2_135m")}
    assert 0.59 < sizes["qwen3_0p6b"] < 0.61
    assert 8.1 < sizes["qwen3_8b"] < 8.3
    assert 8.0 < sizes["llama31_8b"] < 8.1
    assert 1.23 < sizes["llama32_1b"] < 1.25
    assert 0.134 < sizes["smollm2_135m"] < 0.136
    assert models.preset("qwen3_8b_base").chat_template == "raw"


# --- bad input ----------------------------------------------------------------

def _saved(tmp_path, **kw):
    hf = make_hf_model("qwen3", **kw)
    d = tmp_path / "hf"
    hf.save_pretrained(d)
    return d


def _rewrite(d, fn):
    from models.safetensors_io import SafetensorsFile, write_sharded
    f = d / "model.safetensors"
    st = SafetensorsFile(f)
    tensors = {k: np.array(st.tensor(k)) for k in st.keys()}
    tensors = fn(tensors)
    f.unlink()
    write_sharded(d, [(k, v.shape, v.dtype) for k, v in tensors.items()], tensors.__getitem__)


def test_missing_tensor_is_named(tmp_path):
    d = _saved(tmp_path)
    _rewrite(d, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(ValueError, match=r"missing tensors.*model\.layers\.1\.mlp\.up_proj\.weight"):
        models.from_pretrained(d)


def test_extra_tensor_is_named(tmp_path):
    d = _saved(tmp_path)
    _rewrite(d, lambda t: {**t, "model.layers.7.mlp.up_proj.weight": t["model.layers.0.mlp.up_proj.weight"]})
    with pytest.raises(ValueError, match=r"model\.safetensors.*unexpected tensor 'model\.layers\.7"):
        models.from_pretrained(d)


def test_shape_mismatch_is_named(tmp_path):
    d = _saved(tmp_path)
    _rewrite(d, lambda t: {**t, "model.layers.0.self_attn.k_proj.weight":
                           t["model.layers.0.self_attn.k_proj.weight"][:-1]})
    with pytest.raises(ValueError, match=r"k_proj\.weight' has shape \(31, 64\)"):
        models.from_pretrained(d)


def test_unsupported_architecture(tmp_path):
    d = _saved(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["MistralForCausalLM"], "mistral"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: architecture .*Mistral.* not supported"):
        models.from_pretrained(d)


def test_corrupt_file_is_named(tmp_path):
    d = _saved(tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor .* truncated"):
        models.from_pretrained(d)
    f.write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match=r"model\.safetensors: not a safetensors file"):
        models.from_pretrained(d)


def test_missing_checkpoint_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        models.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json: missing"):
        models.from_pretrained(tmp_path / "empty")


def test_bad_tokens_shape():
    model = models.init_model(models.preset("tiny"))
    with pytest.raises(ValueError, match=r"tokens must be \[batch, time\]"):
        model(jnp.zeros((4,), jnp.int32))


def test_safetensors_offsets_are_range_checked(tmp_path):
    d = _saved(tmp_path)
    f = d / "model.safetensors"
    raw = f.read_bytes()
    (n,) = np.frombuffer(raw[:8], "<u8")
    header = json.loads(raw[8:8 + n])
    name = "model.norm.weight"
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [-100, end - begin - 100]  # would read the JSON header as weights
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    f.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.norm\.weight' has invalid "
                                         r"data_offsets \[-100"):
        models.from_pretrained(d)


def test_index_cannot_leave_the_directory_or_name_a_fifo(tmp_path):
    import os

    hf = make_hf_model("qwen3", tied=False)
    model, cfg = _load(tmp_path, hf)
    out = models.save_pretrained(model, cfg, tmp_path / "sharded", max_shard_bytes=40_000)
    index_file = out / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = next(iter(index["weight_map"].values()))
    (tmp_path / "outside.safetensors").write_bytes((out / shard).read_bytes())
    for bad in ("../outside.safetensors", str(tmp_path / "outside.safetensors")):
        wm = {k: (bad if v == shard else v) for k, v in index["weight_map"].items()}
        index_file.write_text(json.dumps({**index, "weight_map": wm}))
        with pytest.raises(ValueError, match=r"index\.json: shard .*outside\.safetensors.* outside "
                                             r"the checkpoint directory"):
            models.from_pretrained(out)
    os.mkfifo(out / "pipe.safetensors")
    wm = {k: ("pipe.safetensors" if v == shard else v) for k, v in index["weight_map"].items()}
    index_file.write_text(json.dumps({**index, "weight_map": wm}))
    with pytest.raises(ValueError, match=r"pipe\.safetensors: not a regular file"):
        models.from_pretrained(out)


def test_absurd_layer_count_fails_fast(tmp_path):
    import time

    d = _saved(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 10**9
    (d / "config.json").write_text(json.dumps(cfg))
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"config\.json: num_hidden_layers=1000000000, but the "
                                         r"checkpoint .* holds tensors for 2 layers"):
        models.from_pretrained(d)
    assert time.monotonic() - t0 < 5
    cfg["num_hidden_layers"] = "2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: num_hidden_layers must be a positive integer"):
        models.from_pretrained(d)


def test_sharded_load_reads_each_device_part(tmp_path, monkeypatch):
    """On a mesh, a parameter is read one device shard at a time (safetensors get_slice), and
    the result equals the unsharded load."""
    from models import safetensors_io

    assert jax.device_count() == 8
    hf = make_hf_model("qwen3", heads=4, kv_heads=2, tied=False, vocab=128)
    hf.save_pretrained(tmp_path / "hf")
    ref, _ = models.from_pretrained(tmp_path / "hf")
    reads = []
    orig = safetensors_io.SafetensorsFile.read

    def spy(self, name, index=()):
        out = orig(self, name, index)
        reads.append((name, out.shape, self.shape(name)))
        return out

    monkeypatch.setattr(safetensors_io.SafetensorsFile, "read", spy)
    model, _ = models.from_pretrained(tmp_path / "hf", mesh=make_mesh(data=2, fsdp=2, tensor=2))
    for (path, a), (_, b) in zip(param_items(ref), param_items(model)):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
    partial = {n for n, got, full in reads if got != full}
    for kind in ("q_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "embed_tokens", "lm_head"):
        assert any(kind in n for n in partial), kind
