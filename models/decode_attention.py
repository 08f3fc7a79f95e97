"""Decode attention of n samples per prompt: shared prompt KV + each sample's own KV, one softmax.

    decode_attention(q, prompt_k, prompt_v, prompt_start, own_kv, own_len, impl=...)

q [P, n, N, H] is one new token per sample (n samples of each of P prompts).
The prompt's KV [P, K, S, H] is left-padded: positions >= prompt_start[p] are
real. Each sample's own KV is one buffer [P, n, K, 2, L, H] (keys at index 0
of the fourth axis, values at 1, so a decode step writes a token's K and V
with one update), valid in slots < own_len[p, j].
Both key sets enter one softmax: the scores of the two are merged by
log-sum-exp (an online softmax over the prompt blocks, then the own blocks).

Three implementations with one contract:
- "xla": einsums over the whole buffers with masks; the reference.
- "blocked": the same einsums over the prompt KV, then the own KV in blocks
  of up to 512 slots, only as many blocks as the longest row needs (a
  while-loop with an online softmax): the path where Pallas is not used
  (CPU, TPU, sharded meshes) once the buffer is longer than one block, so
  the empty tail of the preallocated buffer is not read there either.
- "pallas": a Pallas (Triton) kernel for GPUs. One program per (prompt, KV
  head) holds the n*G query rows of that group, reads the prompt KV once for
  the n samples, and reads each sample's own KV only up to its length (empty
  slots of the preallocated buffer are never loaded). "interpret" runs the
  same kernel in Pallas interpret mode (any backend; what the CPU tests use).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from models.layers import MASK_VALUE

try:
    from jax.experimental import pallas as pl
except ImportError:  # a jaxlib without Pallas still has the XLA path
    pl = None

IMPLS = ("auto", "xla", "blocked", "pallas", "interpret")
_MIN_ROWS = 16  # Triton's smallest dot operand
OWN_BLOCK = 512  # own-KV slots per block of the "blocked" path (see own_block)


def _check(q, prompt_k, prompt_v, prompt_start, own_kv, own_len):
    if q.ndim != 4:
        raise ValueError(f"decode_attention: q must be [P, n, N, H], got shape {q.shape}")
    p, n, heads, h = q.shape
    if prompt_k.ndim != 4 or prompt_k.shape != prompt_v.shape or prompt_k.shape[0] != p \
            or prompt_k.shape[3] != h:
        raise ValueError(f"decode_attention: prompt k/v must be [P={p}, K, S, H={h}], got "
                         f"{prompt_k.shape} and {prompt_v.shape}")
    kv = prompt_k.shape[1]
    if heads % kv:
        raise ValueError(f"decode_attention: {heads} query heads are not a multiple of {kv} KV heads")
    if own_kv.ndim != 6 or own_kv.shape[:4] != (p, n, kv, 2) or own_kv.shape[5] != h:
        raise ValueError(f"decode_attention: own kv must be [P={p}, n={n}, K={kv}, 2, L, H={h}], got "
                         f"{own_kv.shape}")
    if prompt_start.shape != (p,) or own_len.shape != (p, n):
        raise ValueError(f"decode_attention: prompt_start must be [P={p}] and own_len [P, n]=[{p}, {n}],"
                         f" got {prompt_start.shape} and {own_len.shape}")


def _prompt_scores(qg, prompt_k, prompt_start, scale):
    """Scores [P, n, K, G, S] (fp32) of the grouped queries over the prompt KV, left padding masked."""
    shared = jnp.einsum("PNKGH,PKSH->PNKGS", qg, prompt_k, preferred_element_type=jnp.float32) * scale
    shared_ok = jnp.arange(prompt_k.shape[2])[None, :] >= prompt_start[:, None]  # [P, S]
    return jnp.where(shared_ok[:, None, None, None, :], shared, MASK_VALUE)


def _narrow_on_cpu(dtype) -> bool:
    """A sub-fp32 dtype on XLA:CPU, which widens some of its dots and loops to fp32."""
    return jnp.dtype(dtype).itemsize < 4 and jax.default_backend() == "cpu"


def decode_attention_reference(q, prompt_k, prompt_v, prompt_start, own_kv, own_len):
    """The XLA path: scores in fp32 over both key sets with masks, one softmax."""
    p, n, heads, h = q.shape
    kv = prompt_k.shape[1]
    length = own_kv.shape[4]
    own_k, own_v = own_kv[:, :, :, 0], own_kv[:, :, :, 1]
    qg = q.reshape(p, n, kv, heads // kv, h)
    scale = h ** -0.5
    shared = _prompt_scores(qg, prompt_k, prompt_start, scale)
    own = jnp.einsum("PNKGH,PNKLH->PNKGL", qg, own_k, preferred_element_type=jnp.float32) * scale
    own_ok = jnp.arange(length)[None, None, :] < own_len[:, :, None]  # [P, n, L]
    own = jnp.where(own_ok[:, :, None, None, :], own, MASK_VALUE)
    # one softmax over both key sets, merged by log-sum-exp: no concatenated score array
    top = jax.lax.stop_gradient(jnp.maximum(shared.max(-1, keepdims=True), own.max(-1, keepdims=True)))
    e_shared, e_own = jnp.exp(shared - top), jnp.exp(own - top)
    total = e_shared.sum(-1, keepdims=True) + e_own.sum(-1, keepdims=True)
    out = (jnp.einsum("PNKGS,PKSH->PNKGH", (e_shared / total).astype(prompt_v.dtype), prompt_v)
           + jnp.einsum("PNKGL,PNKLH->PNKGH", (e_own / total).astype(own_v.dtype), own_v))
    return out.reshape(p, n, heads, h).astype(q.dtype)


def own_block(length: int, cap: int = OWN_BLOCK) -> int:
    """The "blocked" path's block: the largest power of two <= cap (a power of two) dividing
    length and >= 16, else the whole length in one block."""
    return _block(length, cap) or length


def own_blocks_read(own_len, block: int):
    """How many own-KV blocks the "blocked" path reads: enough for the longest row."""
    return (jnp.max(own_len) + block - 1) // block


def decode_attention_blocked(q, prompt_k, prompt_v, prompt_start, own_kv, own_len,
                             block: int | None = None):
    """The XLA path without reading empty slots: the prompt KV as in the reference, then the
    own KV in blocks up to the longest row's length, merged by an online softmax (fp32)."""
    p, n, heads, h = q.shape
    kv = prompt_k.shape[1]
    length = own_kv.shape[4]
    block = own_block(length) if block is None else block
    if block < 1 or length % block:
        raise ValueError(f"decode_attention: block {block} does not divide the own length {length}")
    # XLA:CPU cannot run every fused bf16 x bf16 -> f32 dot ("Unsupported element type for
    # DotThunk"). There the operands go to fp32 after their rounding to the input dtype:
    # products of bf16/fp16 numbers are exact in fp32, so only the summation order differs.
    up = (lambda x: x.astype(jnp.float32)) if _narrow_on_cpu(own_kv.dtype) else (lambda x: x)
    qg = up(q.reshape(p, n, kv, heads // kv, h))
    scale = h ** -0.5
    shared = _prompt_scores(qg, up(prompt_k), prompt_start, scale)
    m = jax.lax.stop_gradient(shared.max(-1))  # [P, n, K, G]: every prompt has a real token
    e = jnp.exp(shared - m[..., None])
    init = (jnp.einsum("PNKGS,PKSH->PNKGH", up(e.astype(prompt_v.dtype)), up(prompt_v),
                       preferred_element_type=jnp.float32), m, e.sum(-1))
    slots = jnp.arange(block)

    def body(b, carry):
        o, m, l = carry
        own = jax.lax.dynamic_slice_in_dim(own_kv, b * block, block, axis=4)  # [P, n, K, 2, blk, H]
        ok = (b * block + slots)[None, None, :] < own_len[:, :, None]  # [P, n, blk]
        k, v = own[:, :, :, 0], jnp.where(ok[:, :, None, :, None], own[:, :, :, 1], 0)
        scores = jnp.einsum("PNKGH,PNKLH->PNKGL", qg, up(k), preferred_element_type=jnp.float32) * scale
        scores = jnp.where(ok[:, :, None, None, :], scores, MASK_VALUE)
        m_next = jnp.maximum(m, scores.max(-1))
        corr = jnp.exp(m - m_next)
        e = jnp.exp(scores - m_next[..., None])
        o = corr[..., None] * o + jnp.einsum("PNKGL,PNKLH->PNKGH", up(e.astype(v.dtype)), up(v),
                                             preferred_element_type=jnp.float32)
        return o, m_next, corr * l + e.sum(-1)

    o, _, l = jax.lax.fori_loop(0, own_blocks_read(own_len, block), body, init)
    return (o / l[..., None]).reshape(p, n, heads, h).astype(q.dtype)


def _block(size: int, cap: int) -> int | None:
    """The largest power of two <= cap that divides size and is >= 16 (Triton's minimum)."""
    b = cap
    while b >= 16:
        if size % b == 0:
            return b
        b //= 2
    return None


def pallas_supported(q_shape, prompt_shape, own_shape) -> bool:
    """Whether the Pallas kernel takes these shapes (else the XLA path is used)."""
    p, n, heads, h = q_shape
    kv, s = prompt_shape[1], prompt_shape[2]
    length = own_shape[4]
    pow2 = lambda x: x > 0 and x & (x - 1) == 0  # noqa: E731
    return (pow2(n) and pow2(heads // kv) and pow2(h) and h >= 16
            and _block(s, 64) is not None and _block(length, 64) is not None)


def _kernel(start_ref, len_ref, q_ref, pk_ref, pv_ref, own_ref, o_ref, *,
            n, group, rows, block_s, block_l, prompt_len, scale, dot_dtype):
    # q_ref [n, G, H] (or [R, H]: R = n*G padded to >= 16), pk/pv [S, H], own [n, 2, L, H],
    # len [n], start [1]; o_ref like q_ref
    h = q_ref.shape[-1]
    q = q_ref[...].reshape(rows, h) if q_ref.ndim == 3 else q_ref[...]
    q = (q.astype(jnp.float32) * scale).astype(dot_dtype or q_ref.dtype)
    sample_of_row = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // group
    cols_s = jax.lax.broadcasted_iota(jnp.int32, (1, block_s), 1)
    cols_l = jax.lax.broadcasted_iota(jnp.int32, (1, block_l), 1)
    # the value rows of masked slots are zeroed too: whatever an unused slot holds stays out
    slots_s = jax.lax.broadcasted_iota(jnp.int32, (block_s, 1), 0)
    slots_l = jax.lax.broadcasted_iota(jnp.int32, (block_l, 1), 0)

    def update(carry, scores, v):
        o, m, l = carry
        m_next = jnp.maximum(m, scores.max(axis=-1))
        corr = jnp.exp(m - m_next)
        e = jnp.exp(scores - m_next[:, None])
        l_next = corr * l + e.sum(axis=-1)
        v = v.astype(dot_dtype or v.dtype)
        o_next = corr[:, None] * o + jax.lax.dot(e.astype(v.dtype), v,
                                                 preferred_element_type=jnp.float32)
        return o_next, m_next, l_next

    # Prompt blocks from the one holding the first real token: read once for the n samples.
    start = start_ref[0]

    def prompt_body(b, carry):
        k = pk_ref[pl.ds(b * block_s, block_s), :].astype(q.dtype)
        v = pv_ref[pl.ds(b * block_s, block_s), :]
        v = jnp.where(b * block_s + slots_s >= start, v, jnp.zeros_like(v))
        scores = jax.lax.dot(q, k.T, preferred_element_type=jnp.float32)
        scores = jnp.where(b * block_s + cols_s >= start, scores, MASK_VALUE)
        return update(carry, scores, v)

    init = (jnp.zeros((rows, h), jnp.float32), jnp.full((rows,), MASK_VALUE, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    carry = jax.lax.fori_loop(start // block_s, prompt_len // block_s, prompt_body, init)

    # Each sample's own blocks up to its length; the other samples' rows are masked out.
    for j in range(n):
        length = len_ref[j]

        def own_body(b, carry, j=j, length=length):
            k = own_ref[j, 0, pl.ds(b * block_l, block_l), :].astype(q.dtype)
            v = own_ref[j, 1, pl.ds(b * block_l, block_l), :]
            v = jnp.where(b * block_l + slots_l < length, v, jnp.zeros_like(v))
            scores = jax.lax.dot(q, k.T, preferred_element_type=jnp.float32)
            ok = (sample_of_row == j) & (b * block_l + cols_l < length)
            return update(carry, jnp.where(ok, scores, MASK_VALUE), v)

        carry = jax.lax.fori_loop(0, (length + block_l - 1) // block_l, own_body, carry)
    o, _, l = carry
    o_ref[...] = (o / l[:, None]).astype(o_ref.dtype).reshape(o_ref.shape)


def _pallas(q, prompt_k, prompt_v, prompt_start, own_kv, own_len, *, interpret: bool):
    p, n, heads, h = q.shape
    kv, s = prompt_k.shape[1], prompt_k.shape[2]
    length = own_kv.shape[4]
    group = heads // kv
    rows = max(n * group, _MIN_ROWS)
    direct = n * group >= _MIN_ROWS
    if direct:  # the kernel reads its [n, G, H] block of q in place: no copy
        qk = q.reshape(p, n, kv, group, h)
        q_spec = pl.BlockSpec((None, n, None, group, h), lambda i, k: (i, 0, k, 0, 0))
    else:  # too few rows for a dot: gather the group's rows and pad them to 16 (a small copy)
        qk = q.reshape(p, n, kv, group, h).transpose(0, 2, 1, 3, 4).reshape(p, kv, n * group, h)
        qk = jnp.pad(qk, ((0, 0), (0, 0), (0, rows - n * group), (0, 0)))
        q_spec = pl.BlockSpec((None, None, rows, h), lambda i, k: (i, k, 0, 0))
    kernel = functools.partial(
        _kernel, n=n, group=group, rows=rows, block_s=_block(s, 64), block_l=_block(length, 64),
        prompt_len=s, scale=h ** -0.5,
        # interpret mode runs on the host, whose dots take no bf16 x bf16 -> f32: widen there
        dot_dtype=jnp.float32 if interpret else None)
    kwargs = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu
        params = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams", None)
        if params is not None:  # the name moved between jax versions
            kwargs["compiler_params"] = params(num_warps=4, num_stages=2)
    out = pl.pallas_call(
        kernel,
        grid=(p, kv),
        in_specs=[
            pl.BlockSpec((None, 1), lambda i, k: (i, 0)),
            pl.BlockSpec((None, n), lambda i, k: (i, 0)),
            q_spec,
            pl.BlockSpec((None, None, s, h), lambda i, k: (i, k, 0, 0)),
            pl.BlockSpec((None, None, s, h), lambda i, k: (i, k, 0, 0)),
            pl.BlockSpec((None, n, None, 2, length, h), lambda i, k: (i, 0, k, 0, 0, 0)),
        ],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(qk.shape, q.dtype),
        interpret=interpret,
        **kwargs,
    )(prompt_start.astype(jnp.int32)[:, None], own_len.astype(jnp.int32), qk, prompt_k, prompt_v,
      own_kv)
    if not direct:
        out = out[:, :, :n * group].reshape(p, kv, n, group, h).transpose(0, 2, 1, 3, 4)
    return out.reshape(p, n, heads, h)


def xla_impl(own_length: int, dtype=jnp.float32) -> str:
    """The XLA path for an own buffer of this length: "blocked" past one block, else "xla".
    On CPU a bf16/fp16 buffer stays on "xla": XLA:CPU widens a narrow buffer that a loop reads
    to fp32 as a whole, which costs more than the blocks save."""
    return "blocked" if own_length > OWN_BLOCK and not _narrow_on_cpu(dtype) else "xla"


def resolve_impl(impl: str, q_shape, prompt_shape, own_shape, sharded: bool = False,
                 dtype=jnp.float32) -> str:
    """"auto" -> "pallas" on a GPU for supported shapes without a mesh; elsewhere `xla_impl`
    ("blocked" when the own buffer is longer than OWN_BLOCK slots, else "xla")."""
    if impl not in IMPLS:
        raise ValueError(f"decode attention impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    xla = xla_impl(own_shape[4], dtype)
    if sharded or pl is None or jax.default_backend() != "gpu" or not pallas_supported(q_shape, prompt_shape, own_shape):
        return xla
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except Exception:  # a jaxlib without the Triton backend
        return xla
    return "pallas"


def decode_attention(q, prompt_k, prompt_v, prompt_start, own_kv, own_len, *,
                     impl: str = "xla") -> jax.Array:
    """Attention of one new token per sample over (shared prompt KV, own KV); [P, n, N, H]."""
    _check(q, prompt_k, prompt_v, prompt_start, own_kv, own_len)
    impl = resolve_impl(impl, q.shape, prompt_k.shape, own_kv.shape, dtype=own_kv.dtype)
    if impl == "xla":
        return decode_attention_reference(q, prompt_k, prompt_v, prompt_start, own_kv, own_len)
    if impl == "blocked":
        return decode_attention_blocked(q, prompt_k, prompt_v, prompt_start, own_kv, own_len)
    if not pallas_supported(q.shape, prompt_k.shape, own_kv.shape):
        raise ValueError(
            f"decode_attention: the Pallas kernel needs power-of-two n, N/K and H and prompt/own "
            f"lengths divisible by 16; got q {q.shape}, prompt {prompt_k.shape}, own {own_kv.shape}")
    return _pallas(q, prompt_k, prompt_v, prompt_start, own_kv, own_len,
                   interpret=impl == "interpret")
