"""The decode-attention kernel (Pallas, interpret mode on CPU) against the XLA reference.

The reference itself is checked against plain softmax attention over the concatenated keys
(prompt then own) written with numpy, so both paths answer to an independent formula.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from models import decode_attention as da


def _inputs(p, n, heads, kv, h, s, length, seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (p, n, heads, h), dtype)
    pk = jax.random.normal(ks[1], (p, kv, s, h), dtype)
    pv = jax.random.normal(ks[2], (p, kv, s, h), dtype)
    own = jnp.stack([jax.random.normal(ks[3], (p, n, kv, length, h), dtype),
                     jax.random.normal(ks[4], (p, n, kv, length, h), dtype)], axis=3)
    rng = np.random.default_rng(seed)
    start = rng.integers(0, s, p).astype(np.int32)  # at least one real prompt token
    lens = rng.integers(0, length + 1, (p, n)).astype(np.int32)
    lens.flat[0], lens.flat[-1] = 0, length  # an empty row and a full one
    return q, pk, pv, jnp.asarray(start), own, jnp.asarray(lens)


def _numpy_attention(q, pk, pv, start, own, lens):
    q, pk, pv, own = (np.asarray(x, np.float64) for x in (q, pk, pv, own))
    ok, ov = own[:, :, :, 0], own[:, :, :, 1]
    p, n, heads, h = q.shape
    kv = pk.shape[1]
    out = np.zeros_like(q)
    for i in range(p):
        for j in range(n):
            for head in range(heads):
                c = head // (heads // kv)
                keys = np.concatenate([pk[i, c, start[i]:], ok[i, j, c, :lens[i, j]]])
                vals = np.concatenate([pv[i, c, start[i]:], ov[i, j, c, :lens[i, j]]])
                sc = keys @ q[i, j, head] / np.sqrt(h)
                w = np.exp(sc - sc.max())
                out[i, j, head] = w @ vals / w.sum()
    return out


SHAPES = {  # P, n, N, K, H, S, L (interpret mode compiles slowly: few, small shapes)
    "gqa2-n4": (2, 4, 8, 4, 16, 128, 48),  # 2 prompt blocks of 64, 3 own blocks of 16
    "gqa4-n8-mha": (1, 8, 8, 2, 16, 32, 32),
}
_reference = jax.jit(functools.partial(da.decode_attention, impl="xla"))
_interpret = jax.jit(functools.partial(da.decode_attention, impl="interpret"))


@pytest.mark.parametrize("shape", list(SHAPES))
def test_kernel_in_interpret_mode_equals_reference(shape):
    args = _inputs(*SHAPES[shape])
    ref = _reference(*args)
    np.testing.assert_allclose(np.asarray(ref), _numpy_attention(*args), rtol=0, atol=1e-5)
    got = _interpret(*args)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=1e-5)


@pytest.mark.parametrize("block", [16, 48])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_blocked_xla_path_equals_reference(shape, block):
    """The XLA path that reads the own KV in blocks up to the longest row (3 blocks of 16, or
    one of 48) gives the reference's output; with every row empty it reads no own block."""
    args = _inputs(*SHAPES[shape])
    length = args[4].shape[4]
    if length % block:
        block = length
    blocked = jax.jit(functools.partial(da.decode_attention_blocked, block=block))
    np.testing.assert_allclose(np.asarray(blocked(*args)), np.asarray(_reference(*args)),
                               rtol=0, atol=1e-5)
    q, pk, pv, start, own, lens = args
    empty = (q, pk, pv, start, jnp.full_like(own, jnp.nan), jnp.zeros_like(lens))
    np.testing.assert_allclose(np.asarray(blocked(*empty)), _numpy_attention(*args[:4], own, 0 * lens),
                               rtol=0, atol=1e-5)


def test_blocked_path_reads_only_the_blocks_of_the_longest_row():
    """The loop runs ceil(longest / block) times; NaN past each row's length changes nothing
    (masked scores, zeroed values), though the last block read holds some of it."""
    q, pk, pv, start, own, lens = _inputs(*SHAPES["gqa2-n4"], seed=5)
    lens = jnp.minimum(lens, 20)  # the longest row ends in the second block of 16
    slot = jnp.arange(own.shape[4])[None, None, None, None, :, None]
    dirty = jnp.where(slot >= lens[:, :, None, None, None, None], jnp.nan, own)
    blocked = jax.jit(functools.partial(da.decode_attention_blocked, block=16))
    got = blocked(q, pk, pv, start, dirty, lens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(_reference(q, pk, pv, start, own, lens)),
                               rtol=0, atol=1e-5)
    assert int(da.own_blocks_read(lens, 16)) == 2
    assert [int(da.own_blocks_read(jnp.array([[x, 1]]), 16)) for x in (0, 1, 16, 17, 48)] == [1, 1, 1, 2, 3]
    assert int(da.own_blocks_read(jnp.zeros((2, 2), jnp.int32), 16)) == 0
    lowered = blocked.lower(q, pk, pv, start, dirty, lens).as_text()
    assert "stablehlo.while" in lowered and "dynamic_slice" in lowered
    with pytest.raises(ValueError, match="does not divide"):
        da.decode_attention_blocked(q, pk, pv, start, own, lens, block=32)


@pytest.mark.parametrize("impl", ["interpret", "blocked"])
def test_bf16_close_to_reference(impl):
    """bf16 in and out (on CPU the blocked path widens its dots' operands: XLA:CPU rejects some
    fused bf16 x bf16 -> fp32 dots)."""
    args = _inputs(*SHAPES["gqa2-n4"], dtype=jnp.bfloat16)
    ref = _reference(*args)
    got = _interpret(*args) if impl == "interpret" else jax.jit(
        functools.partial(da.decode_attention_blocked, block=16))(*args)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32),
                               rtol=0, atol=3e-2)


def test_slots_past_each_length_are_never_used():
    """Garbage (even NaN) in the empty tail of the own buffer and in the prompt padding changes nothing."""
    q, pk, pv, start, own, lens = _inputs(*SHAPES["gqa2-n4"], seed=3)
    slot = jnp.arange(own.shape[4])[None, None, None, None, :, None]
    tail = slot >= lens[:, :, None, None, None, None]
    pad = jnp.arange(pk.shape[2])[None, None, :, None] < start[:, None, None, None]
    dirty = (q, jnp.where(pad, jnp.nan, pk), jnp.where(pad, jnp.nan, pv), start,
             jnp.where(tail, jnp.nan, own), lens)
    clean = _reference(q, pk, pv, start, own, lens)
    got = _interpret(*dirty)
    np.testing.assert_allclose(np.asarray(got), np.asarray(clean), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [
    (16, 8, 16, 8, 128, 256, 512),  # Qwen3-0.6B, vote-16x8: q read in place (n*G = 16 rows)
    (4, 2, 8, 4, 64, 32, 48),       # n*G = 4 rows: gathered and padded to 16
])
def test_kernel_lowers_for_gpu(shape):
    """The Triton lowering runs on a CPU-only host (jax.export for the cuda platform)."""
    p, n, heads, kv, h, s, length = shape
    shapes = [((p, n, heads, h), jnp.bfloat16), ((p, kv, s, h), jnp.bfloat16),
              ((p, kv, s, h), jnp.bfloat16), ((p,), jnp.int32), ((p, n, kv, 2, length, h), jnp.bfloat16),
              ((p, n), jnp.int32)]
    fn = jax.jit(lambda *a: da.decode_attention(*a, impl="pallas"))
    exported = jax.export.export(
        fn, platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*[jax.ShapeDtypeStruct(sh, dt) for sh, dt in shapes])
    assert "__gpu$xla.gpu.triton" in exported.mlir_module()


def test_auto_uses_xla_where_pallas_is_not_used():
    q, pk, pv, start, own, lens = _inputs(*SHAPES["gqa2-n4"])
    assert jax.default_backend() == "cpu"
    assert da.resolve_impl("auto", q.shape, pk.shape, own.shape) == "xla"  # 48 slots: within one block
    long = own.shape[:4] + (1024,) + own.shape[5:]
    assert da.resolve_impl("auto", q.shape, pk.shape, long) == "blocked"  # two blocks of 512
    assert da.resolve_impl("auto", q.shape, pk.shape, long, sharded=True) == "blocked"
    # XLA:CPU widens a bf16 buffer read in a loop to fp32 whole: there the reference is faster
    assert da.resolve_impl("auto", q.shape, pk.shape, long, dtype=jnp.bfloat16) == "xla"
    assert da.xla_impl(1024, jnp.float16) == "xla" and da.xla_impl(1024) == "blocked"
    assert [da.own_block(x) for x in (16, 48, 512, 1024, 3072)] == [16, 16, 512, 512, 512]
    auto = jax.jit(functools.partial(da.decode_attention, impl="auto"))
    np.testing.assert_array_equal(np.asarray(auto(q, pk, pv, start, own, lens)),
                                  np.asarray(_reference(q, pk, pv, start, own, lens)))
    assert da.pallas_supported((2, 4, 8, 16), (2, 4, 32, 16), (2, 4, 4, 2, 48, 16))
    assert not da.pallas_supported((2, 3, 8, 16), (2, 4, 32, 16), (2, 3, 4, 2, 48, 16))  # n = 3
    assert not da.pallas_supported((2, 4, 8, 16), (2, 4, 24, 16), (2, 4, 4, 2, 48, 16))  # S = 24
    assert not da.pallas_supported((2, 4, 8, 16), (2, 4, 32, 16), (2, 4, 4, 2, 40, 16))  # L = 40


def test_bad_input_is_rejected():
    q, pk, pv, start, own, lens = _inputs(*SHAPES["gqa2-n4"])
    with pytest.raises(ValueError, match="impl must be one of"):
        da.decode_attention(q, pk, pv, start, own, lens, impl="cuda")
    with pytest.raises(ValueError, match=r"q must be \[P, n, N, H\]"):
        da.decode_attention(q[0], pk, pv, start, own, lens)
    with pytest.raises(ValueError, match="own kv must be"):
        da.decode_attention(q, pk, pv, start, own[:, :1], lens)
    with pytest.raises(ValueError, match="own kv must be"):  # separate K and V are not taken
        da.decode_attention(q, pk, pv, start, own[:, :, :, 0], lens)
    with pytest.raises(ValueError, match="own_len"):
        da.decode_attention(q, pk, pv, start, own, lens[:, :1])
    with pytest.raises(ValueError, match="Pallas kernel needs"):
        da.decode_attention(q[:, :3], pk, pv, start, own[:, :3], lens[:, :3], impl="interpret")
