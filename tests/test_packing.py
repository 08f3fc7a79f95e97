"""Packed micro-batches (rl/packing.py), the fused LM-head logprobs (rl/logprobs.py) and
the training attention paths, against the unpacked train step of tests/test_train_step.py.

The packed rows hold the same sequences as the unpacked ones (tests.test_train_step's
eight rows, two with an empty response), so the loss, its metrics and its gradient
must be the unpacked ones up to float32 summation order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import layers
from models.transformer import segment_bounds, segment_mask
from rl import grpo
from rl.logprobs import token_logprobs
from rl.packing import PackedBatch, pack, pack_response, plan_layout, unpack_response
from rl.train_step import (init_train_state, packed_loss_and_grads, packed_sequence_logprobs,
                           sequence_logprobs, train_step)
from tests.test_train_step import (B, CFG, CHUNK, LOSS, PROMPT_LENS, R, RESP_LENS, SEED, SP, TX,
                                   assert_trees_close, lg_jit, loss_cfg, make_batch, split)

plg_jit = jax.jit(packed_loss_and_grads, static_argnums=(0, 3),
                  compiler_options={"xla_backend_optimization_level": 0})
PACK_LEN, ROWS_PER_MICRO = 24, 2


@pytest.fixture(scope="module")
def tiny():
    return split(models.init_model(CFG, seed=SEED))


def to_packed(batch, agg="token-mean", pack_len=PACK_LEN, rows_per_micro=ROWS_PER_MICRO, shards=1):
    tokens = np.asarray(batch.tokens)
    prompts = [tokens[i, SP - p:SP].tolist() for i, p in enumerate(PROMPT_LENS)]
    responses = [tokens[i, SP:SP + n].tolist() for i, n in enumerate(RESP_LENS)]
    old = [np.asarray(batch.old_logp)[i, :n] for i, n in enumerate(RESP_LENS)]
    fields, layout = pack(prompts, responses, old, np.asarray(batch.advantages), pack_len=pack_len,
                          rows_per_micro=rows_per_micro, max_micro=B, max_segments=8, agg=agg,
                          max_response_len=R, shards=shards)
    ref = pack_response(np.asarray(batch.ref_logp), layout) if batch.ref_logp is not None else None
    packed = PackedBatch(**{k: jnp.asarray(v) for k, v in fields.items()}, ref_logp=None)
    return packed._replace(ref_logp=None if ref is None else jnp.asarray(ref)), layout


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_packed_gradient_equals_unpacked(tiny, agg):
    graphdef, params = tiny
    batch = make_batch(graphdef, params, old_noise=0.7, seed=1)
    cfg = loss_cfg(agg=agg)
    g_ref, m_ref = lg_jit(graphdef, params, batch, cfg)
    packed, layout = to_packed(batch, agg)
    # 8 rows of 1..16 tokens in pack rows of 24: fewer micro-batches than rows / rows_per_micro
    assert layout.num_micro < B // ROWS_PER_MICRO
    assert layout.padded_tokens < B * (SP + R)
    g, m = plg_jit(graphdef, params, packed, cfg)
    # Every leaf but the tied embedding agrees to < 2e-7 of the largest gradient. The
    # embedding's unembedding gradient sums ~50 products of size ~1 per entry, over chunks
    # of 4 positions of 24-token pack rows instead of 10-token responses: float32 sums in
    # that other order differ by ~1e-6 of the largest entry (measured 0.9e-6 token-mean,
    # 1.2e-6 seq-mean-token-mean).
    assert_trees_close(g, g_ref, 2e-6)
    whole = max(float(np.abs(x).max()) for x in jax.tree.leaves(g_ref))
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_ref)):
        if "embed_vd" not in jax.tree_util.keystr(path):
            assert np.abs(np.asarray(a) - np.asarray(e)).max() <= 5e-7 * whole, jax.tree_util.keystr(path)
    assert set(m) == set(m_ref)
    for k in m_ref:
        np.testing.assert_allclose(m[k], m_ref[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert float(m["n_tokens"]) == sum(RESP_LENS)


def test_packed_reference_pass_equals_unpacked(tiny):
    graphdef, params = tiny
    batch = make_batch(graphdef, params)
    packed, layout = to_packed(batch)
    want = np.asarray(sequence_logprobs(graphdef, params, batch.tokens, batch.attention_mask,
                                        response_len=R, temperature=LOSS.temperature, chunk=CHUNK))
    got = packed_sequence_logprobs(graphdef, params, packed, temperature=LOSS.temperature, chunk=CHUNK,
                                   max_segments=LOSS.max_segments)
    got = unpack_response(np.asarray(got), layout, R)
    mask = np.asarray(batch.response_mask) > 0
    np.testing.assert_allclose(got[mask], want[mask], rtol=0, atol=1e-5)
    assert np.all(got[~mask] == 0)
    # micro-batches past num_micro are not computed
    assert np.all(np.asarray(packed_sequence_logprobs(
        graphdef, params, packed, temperature=LOSS.temperature, chunk=CHUNK,
        max_segments=LOSS.max_segments))[layout.num_micro:] == 0)


def test_packed_step_changes_micro_count_without_recompiling(tiny):
    graphdef, state = init_train_state(models.init_model(CFG, seed=SEED), TX)
    batch = make_batch(graphdef, state.params, old_noise=0.3)
    packed, layout = to_packed(batch, pack_len=SP + R, rows_per_micro=ROWS_PER_MICRO)
    assert layout.num_micro >= 2
    state, m1 = train_step(graphdef, state, packed, tx=TX, cfg=LOSS)
    n = train_step._cache_size()
    # same shapes, another micro-batch count: only the first micro-batch is used
    fewer = packed._replace(num_micro=jnp.asarray(1, jnp.int32))
    state, m2 = train_step(graphdef, state, fewer, tx=TX, cfg=LOSS)
    assert train_step._cache_size() == n
    assert bool(m1["finite"]) and bool(m2["finite"]) and int(state.step) == 2
    # one micro-batch of the two: fewer tokens were seen
    assert 0 < float(m2["n_tokens"]) < float(m1["n_tokens"]) == sum(RESP_LENS)


def test_layout_places_every_row_once_and_balances_shards():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 400, size=64).tolist()
    bins, num_micro = plan_layout(lengths, pack_len=512, rows_per_micro=4, max_segments=4, shards=2)
    assert sorted(i for b in bins for i in b) == list(range(64))
    assert all(sum(lengths[i] for i in b) <= 512 and len(b) <= 4 for b in bins)
    assert num_micro == -(-len(bins) // 4)
    prompts = [[5] * 10 for _ in lengths]
    responses = [[7] * (n - 10) for n in lengths]
    fields, layout = pack(prompts, responses, [[-1.0] * len(r) for r in responses], np.ones(64),
                          pack_len=512, rows_per_micro=4, max_micro=32, max_segments=4,
                          agg="token-mean", max_response_len=400, shards=2)
    assert fields["num_micro"] == num_micro and fields["denominator"] == sum(len(r) for r in responses)
    real = (fields["segment_ids"] > 0).sum(-1)  # [M, Bm] real tokens per pack row
    shard_load = real.reshape(real.shape[0], 2, 2).sum(-1)[:num_micro].sum(0)
    assert abs(shard_load[0] - shard_load[1]) <= 0.1 * shard_load.mean()
    assert layout.real_tokens == sum(lengths) and layout.padded_tokens < 0.9 * 64 * 512 / 1
    with pytest.raises(ValueError, match="pack_len"):
        plan_layout([600], pack_len=512, rows_per_micro=2, max_segments=4)
    with pytest.raises(ValueError, match="rows_per_micro"):
        plan_layout([6], pack_len=512, rows_per_micro=3, max_segments=4, shards=2)


# --- the fused LM head ---------------------------------------------------------------------

def test_fused_logprobs_match_plain_log_softmax_values_and_gradients():
    k = jax.random.split(jax.random.key(0), 4)
    b, t, d, v, temperature = 3, 13, 16, 50, 0.7
    h = jax.random.normal(k[0], (b, t, d))
    w = jax.random.normal(k[1], (d, v)) * 0.3
    targets = jax.random.randint(k[2], (b, t), 0, v)
    g = jax.random.normal(k[3], (b, t))

    def plain(h, w):
        logits = jnp.einsum("BTD,DV->BTV", h, w) / temperature
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]
        return lp, grpo.entropy_from_logits(logits)

    def fused(h, w):
        return token_logprobs(h, w, targets, temperature, 4)  # 13 positions: chunk padding

    (lp0, e0), (lp1, e1) = jax.jit(plain)(h, w), jax.jit(fused)(h, w)
    np.testing.assert_allclose(lp1, lp0, rtol=0, atol=1e-5)
    np.testing.assert_allclose(e1, e0, rtol=0, atol=1e-5)
    loss = lambda f: lambda h, w: jnp.sum(g * f(h, w)[0])  # noqa: E731
    want = jax.jit(jax.grad(loss(plain), argnums=(0, 1)))(h, w)
    got = jax.jit(jax.grad(loss(fused), argnums=(0, 1)))(h, w)
    for a, e in zip(got, want):
        np.testing.assert_allclose(a, e, rtol=0, atol=1e-5 * float(np.abs(e).max()))
    # no [B, T, V] logits in either pass: the largest fp32 array with V columns is one chunk
    jaxpr = str(jax.make_jaxpr(jax.grad(loss(fused), argnums=(0, 1)))(h, w))
    assert f"f32[{b},{t},{v}]" not in jaxpr and f"f32[{b},4,{v}]" in jaxpr
    with pytest.raises(ValueError, match="logprob_chunk"):
        token_logprobs(h, w, targets, temperature, 0)


# --- attention paths -----------------------------------------------------------------------

def test_cudnn_call_semantics_match_the_reference_attention_on_the_xla_path():
    """The arguments the cuDNN path passes (causal + sequence lengths for right-padded rows)
    computed by jax.nn.dot_product_attention's XLA implementation equal the reference."""
    k = jax.random.split(jax.random.key(1), 3)
    b, t, n, kv, h = 3, 9, 4, 2, 8
    q, key, v = (jax.random.normal(k[i], (b, t, n if i == 0 else kv, h)) for i in range(3))
    lengths = jnp.asarray([9, 5, 1])
    attn = jnp.arange(t)[None] < lengths[:, None]
    want = layers.attention(q, key, v, models.transformer.causal_mask(attn))
    got = jax.nn.dot_product_attention(q, key, v, is_causal=True, query_seq_lengths=lengths,
                                       key_value_seq_lengths=lengths, implementation="xla")
    valid = np.asarray(attn)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], rtol=0, atol=1e-5)


def test_segment_mask_and_cudnn_packed_bounds():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    mask = np.asarray(segment_mask(seg))
    assert mask[0, 4].tolist() == [False, False, False, True, True, False, False, False]
    assert not mask[0, 6].any() and mask[1].sum() == 36
    lengths, offsets = segment_bounds(seg, 4)
    assert lengths.tolist() == [[3, 2, 1, -1], [8, -1, -1, -1]]
    assert offsets.tolist() == [[0, 3, 5, 6, -1], [0, 8, -1, -1, -1]]


def test_cudnn_wiring_on_the_xla_kernel_matches_the_reference_forward(monkeypatch):
    """attention_impl="cudnn" with the kernel swapped for jax's XLA implementation of the same
    call: the arguments the model passes (sequence lengths of packed single-sequence rows, the
    mask of left-padded rows) give the reference forward's hidden states."""
    real = jax.nn.dot_product_attention

    def on_xla(*args, implementation=None, **kw):
        assert implementation == "cudnn"
        return real(*args, implementation="xla", **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", on_xla)
    ref_model = models.init_model(CFG, seed=SEED)
    cudnn_model = models.init_model(CFG.replace(attention_impl="cudnn"), seed=SEED)
    rng = np.random.default_rng(0)
    lengths = np.asarray([12, 7, 1])
    tokens = jnp.asarray(rng.integers(2, CFG.vocab_size, (3, 12)), jnp.int32)
    seg = jnp.asarray((np.arange(12)[None] < lengths[:, None]).astype(np.int32))
    pos = jnp.asarray(np.broadcast_to(np.arange(12), (3, 12)), jnp.int32)
    fwd = jax.jit(lambda m: models.transformer.forward_hidden(m, tokens, positions=pos, segment_ids=seg))
    want, got = np.asarray(fwd(ref_model)), np.asarray(fwd(cudnn_model))
    valid = np.asarray(seg) > 0
    np.testing.assert_allclose(got[valid], want[valid], rtol=0, atol=1e-5)
    # left-padded rows: the kernel gets the explicit mask
    attn = jnp.asarray(np.arange(12)[None] >= 12 - lengths[:, None])
    want = np.asarray(jax.jit(models.transformer.forward_hidden)(ref_model, tokens, attn))
    got = np.asarray(jax.jit(models.transformer.forward_hidden)(cudnn_model, tokens, attn))
    np.testing.assert_allclose(got[np.asarray(attn)], want[np.asarray(attn)], rtol=0, atol=1e-5)


def test_sharded_packed_step_matches_single_device_and_keeps_shardings():
    from jax.sharding import NamedSharding, PartitionSpec as P

    from tests.test_train_step import _sharded_setup, _sharding_mismatches, leaves

    mesh, g8, s8, want = _sharded_setup()
    g1, s1 = init_train_state(models.init_model(CFG, seed=SEED), TX)
    batch = make_batch(g1, s1.params, old_noise=0.3)
    packed, layout = to_packed(batch, pack_len=SP + R, rows_per_micro=4, shards=4)
    assert layout.num_micro >= 2
    place = lambda x: jax.device_put(x, NamedSharding(mesh, P(None, ("data", "fsdp")) if x.ndim else P()))  # noqa: E731
    s1, m1 = train_step(g1, s1, packed, tx=TX, cfg=LOSS)
    s8, m8 = train_step(g8, s8, jax.tree.map(place, packed), tx=TX, cfg=LOSS)
    for k in m1:
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert_trees_close(s8.params, s1.params, 1e-5, what="params", per_leaf=True)
    assert _sharding_mismatches(s8, want) == []
    assert max(float(np.abs(a - b).max()) for a, b in zip(leaves(s1.params), leaves(s8.params))) < 1e-5
