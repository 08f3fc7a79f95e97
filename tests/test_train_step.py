"""The jitted GRPO update in rl/train_step.py on a tiny random Qwen3.

References: teacher-forced log_softmax(forward(tokens) / T) for the chunked response
logprobs, jax.grad of rl.grpo.policy_loss on those logprobs for the accumulated
gradient, optax's schedules written out by hand for the optimizer, and the same step
on one device for the 8-device (data=2, fsdp=2, tensor=2) mesh.

Rows are packed like the trainer packs them: a left-padded prompt of SP tokens, then a
right-padded response of R tokens. R = 10 is not a multiple of the logprob chunk (4),
and two rows have an empty response, so with micro-batches of 2 one micro-batch holds
no response token at all.

Compilation dominates the run time (several seconds per gradient program on a 2-core
CPU), so the tests share one loss config (LOSS), one optimizer (TX) and fixed shapes:
jit's cache then serves most calls without compiling again.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import models
from medssr_jax.sharding import make_mesh
from rl import grpo
from rl.train_step import (Batch, LossConfig, OptimConfig, TrainState, init_train_state,
                           loss_and_grads, make_optimizer, response_logprobs, sequence_logprobs,
                           train_step)

CFG = models.preset("tiny")  # qwen3, 2 layers, vocab 256, d 64, 4 heads / 2 KV heads, tied
SEED = 0
SP, R, CHUNK = 6, 10, 4
PROMPT_LENS = (6, 3, 5, 1, 4, 6, 2, 5)
RESP_LENS = (10, 7, 0, 0, 3, 10, 1, 8)  # rows 2 and 3 have an empty response
B = len(PROMPT_LENS)
PAD = 0
TEMP = 0.7

# Non-default clip_high, KL and temperature so that each of them is exercised.
LOSS = LossConfig(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.1,
                  kl_estimator="low_var_kl", agg="token-mean", temperature=TEMP,
                  micro_batch_size=2, logprob_chunk=CHUNK)
# warmup 0: the very first step already moves the weights by ~lr. eps 1e-4 instead of 1e-8:
# Adam's first step is lr * g / (|g| + eps), which for |g| ~ eps turns the float32 noise of
# near-cancelling gradients (a token absent from the batch gets ~1e-7 +- 4e-10 through the
# tied unembedding) into update differences of 1e-3 lr; with eps = 1e-4 the amplification is at
# most lr / eps, and comparisons of weights across reduction orders skip the |g| < eps elements.
TX = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_ratio=0.0, total_steps=100, eps=1e-4))

# The tests' own gradient programs skip LLVM's optimisation passes: it halves their compile
# time and changes no float operation (XLA's HLO passes still run).
lg_jit = jax.jit(loss_and_grads, static_argnums=(0, 3),
                 compiler_options={"xla_backend_optimization_level": 0})


def loss_cfg(**kw) -> LossConfig:
    return dataclasses.replace(LOSS, **kw)


# --- helpers ---------------------------------------------------------------------

def make_rows(seed: int = 0):
    """tokens [B, SP + R] (left-padded prompt, right-padded response), masks, as numpy."""
    rng = np.random.default_rng(seed)
    tokens = np.full((B, SP + R), PAD, np.int32)
    attn = np.zeros((B, SP + R), bool)
    resp = np.zeros((B, R), np.float32)
    for i, (p, n) in enumerate(zip(PROMPT_LENS, RESP_LENS)):
        tokens[i, SP - p:SP] = rng.integers(2, CFG.vocab_size, p)
        tokens[i, SP:SP + n] = rng.integers(2, CFG.vocab_size, n)
        attn[i, SP - p:SP + n] = True
        resp[i, :n] = 1.0
    return tokens, attn, resp


def split(model):
    return nnx.split(model, nnx.Param)


def model_logprobs(graphdef, params, tokens, attn, temperature=TEMP):
    return sequence_logprobs(graphdef, params, jnp.asarray(tokens), jnp.asarray(attn),
                             response_len=R, temperature=temperature, chunk=CHUNK)


def make_batch(graphdef, params, *, seed=0, old_noise=0.0, ref_noise=0.3, with_ref=True,
               advantages=None) -> Batch:
    """A batch whose old/ref logprobs are the model's own (at TEMP) plus Gaussian noise."""
    tokens, attn, resp = make_rows(seed)
    rng = np.random.default_rng(seed + 100)
    logp = np.asarray(model_logprobs(graphdef, params, tokens, attn))
    old = logp + old_noise * rng.normal(size=logp.shape).astype(np.float32)
    ref = logp + ref_noise * rng.normal(size=logp.shape).astype(np.float32)
    if advantages is None:
        advantages = rng.normal(size=B).astype(np.float32)
    return Batch(tokens=jnp.asarray(tokens), attention_mask=jnp.asarray(attn),
                 response_mask=jnp.asarray(resp), old_logp=jnp.asarray(old, jnp.float32),
                 ref_logp=jnp.asarray(ref, jnp.float32) if with_ref else None,
                 advantages=jnp.asarray(advantages, jnp.float32))


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def leaves_tree(tree):
    """The same tree with host arrays for leaves (nnx.Param wrappers unwrapped)."""
    return jax.tree.map(np.asarray, tree)


def max_abs_diff(a, b) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(leaves(a), leaves(b)))


def assert_trees_close(got, want, rel, what="grads", per_leaf=False):
    """Every leaf of `got` within rel * max |want| (over the whole tree, or per leaf).

    Gradients use the whole tree's max: float32 sums in another order (micro-batches,
    remat, chunking) err by ~3e-7 of the largest gradient, which is more than 1e-6 of
    a leaf whose own gradients are 20x smaller."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    whole = max(float(np.abs(w).max()) for w in leaves(want))
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        scale = np.abs(w).max() if per_leaf else whole
        assert np.abs(w).max() > 0, f"{what} {jax.tree_util.keystr(path)} is all zero"
        err = np.abs(g - w).max()
        assert err <= rel * scale, (
            f"{what} {jax.tree_util.keystr(path)}: max err {err:.3g} > {rel} * {scale:.3g}")


def reference_logprobs(model, tokens, attn, temperature):
    """Teacher forcing with the full [B, L, V] logits: position t predicts token t + 1."""
    logits = models.forward(model, tokens, attn)[:, SP - 1:-1] / temperature
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, tokens[:, SP:, None], axis=-1)[..., 0], logits


@pytest.fixture(scope="module")
def tiny():
    return split(models.init_model(CFG, seed=SEED))


# --- 1. response logprobs ----------------------------------------------------------

def test_response_logprobs_match_teacher_forced_forward(tiny):
    graphdef, params = tiny
    tokens, attn, _ = map(jnp.asarray, make_rows())

    @jax.jit
    def run(p, temperature):  # temperature traced: one compilation for both values
        model = nnx.merge(graphdef, p)
        lp, ent = response_logprobs(model, tokens, attn, R, temperature, CHUNK, with_entropy=True)
        # A chunk longer than the response is cut down to it; no entropy -> None.
        lp_whole, none = response_logprobs(model, tokens, attn, R, temperature, 64)
        ref, logits = reference_logprobs(model, tokens, attn, temperature)
        assert none is None
        return lp, ent, lp_whole, ref, grpo.entropy_from_logits(logits)

    results = {}
    for temperature in (1.0, TEMP):
        lp, ent, lp_whole, ref, ref_ent = run(params, temperature)
        assert lp.shape == ent.shape == (B, R) and lp.dtype == jnp.float32
        # Every position, padding included: the chunk padding (10 -> 12) is cut off exactly.
        np.testing.assert_allclose(lp, ref, rtol=0, atol=1e-5)
        np.testing.assert_allclose(lp_whole, ref, rtol=0, atol=1e-5)
        np.testing.assert_allclose(ent, ref_ent, rtol=0, atol=1e-5)
        # The jitted no-grad entry point (static temperature) computes the same.
        np.testing.assert_allclose(model_logprobs(graphdef, params, tokens, attn, temperature), ref,
                                   rtol=0, atol=1e-5)
        results[temperature] = np.asarray(ref)
    assert np.abs(results[1.0] - results[TEMP]).max() > 1e-2  # the temperature is applied


# --- 2. gradient accumulation --------------------------------------------------------

@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batch_accumulation_equals_one_big_batch(tiny, agg):
    graphdef, params = tiny
    batch = make_batch(graphdef, params, old_noise=0.7, seed=1)
    g_full, m_full = lg_jit(graphdef, params, batch, loss_cfg(agg=agg, micro_batch_size=B))
    g_micro, m_micro = lg_jit(graphdef, params, batch, loss_cfg(agg=agg, micro_batch_size=B // 4))
    # Rows 2, 3 (micro-batch 1 of 4) have no token: its numerator is 0 and ratio_min/max
    # stay at their +-inf identity, so neither the gradient nor the metrics see it.
    assert_trees_close(g_micro, g_full, 1e-6)
    assert set(m_full) == set(m_micro)
    for k in m_full:
        np.testing.assert_allclose(m_micro[k], m_full[k], rtol=1e-6, atol=1e-7, err_msg=k)
        assert np.isfinite(m_full[k]), k
    assert float(m_full["n_tokens"]) == sum(RESP_LENS)
    assert 0.0 < float(m_full["ratio_min"]) < 1.0 < float(m_full["ratio_max"])


def test_micro_batch_size_must_divide_the_batch(tiny):
    graphdef, params = tiny
    batch = make_batch(graphdef, params)
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        loss_and_grads(graphdef, params, batch, loss_cfg(micro_batch_size=3))


# --- 3. the gradient is that of the GRPO loss -----------------------------------------

@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_gradient_is_grad_of_grpo_policy_loss(tiny, agg):
    graphdef, params = tiny
    # Noisy old logprobs: some ratios leave [0.8, 1.28] and some exceed the dual clip (3).
    batch = make_batch(graphdef, params, old_noise=0.7, seed=1)
    cfg = loss_cfg(agg=agg, micro_batch_size=B)  # one micro-batch

    @jax.jit
    def direct(p):
        def loss(p):
            logp, logits = reference_logprobs(nnx.merge(graphdef, p), batch.tokens,
                                              batch.attention_mask, cfg.temperature)
            return grpo.policy_loss(logp, batch.old_logp, batch.ref_logp, batch.advantages,
                                    batch.response_mask, clip_low=cfg.clip_low,
                                    clip_high=cfg.clip_high, dual_clip=cfg.dual_clip,
                                    kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator, agg=agg,
                                    logits=logits)
        return jax.value_and_grad(loss, has_aux=True)(p)

    (loss, want), g_want = direct(params)
    g, metrics = lg_jit(graphdef, params, batch, cfg)
    assert_trees_close(g, g_want, 1e-6)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    for k in want:
        np.testing.assert_allclose(metrics[k], want[k], rtol=1e-5, atol=1e-7, err_msg=k)
    np.testing.assert_allclose(metrics["loss"], metrics["pg_loss"] + cfg.kl_coef * metrics["kl"],
                               rtol=1e-6)
    # The data exercise every branch of the clipped objective and the KL term.
    assert float(metrics["pg_clipfrac"]) > 0 and float(metrics["pg_clipfrac_lower"]) > 0
    assert float(metrics["kl"]) > 0


# --- 4. on-policy first step -----------------------------------------------------------

def test_on_policy_ratios_are_one(tiny):
    graphdef, params = tiny
    # old = ref = the model's own logprobs at the loss temperature (no noise).
    batch = make_batch(graphdef, params, old_noise=0.0)
    batch = batch._replace(ref_logp=batch.old_logp)
    _, m = lg_jit(graphdef, params, batch, LOSS)
    for k in ("ratio_mean", "ratio_min", "ratio_max"):
        assert abs(float(m[k]) - 1.0) <= 1e-6, (k, float(m[k]))
    assert float(m["pg_clipfrac"]) == 0.0 and float(m["pg_clipfrac_lower"]) == 0.0
    assert abs(float(m["ppo_kl"])) <= 1e-6 and float(m["logp_diff_abs"]) <= 1e-6
    assert abs(float(m["kl"])) <= 1e-6
    # On policy every ratio is 1, so the loss is -mean(A) over the response tokens.
    mask = np.asarray(batch.response_mask)
    want = -(np.asarray(batch.advantages)[:, None] * mask).sum() / mask.sum()
    np.testing.assert_allclose(m["loss"], want, rtol=1e-5)


# --- 5. no reference model ----------------------------------------------------------------

def test_kl_coef_zero_needs_no_reference(tiny):
    graphdef, params = tiny
    with_ref = make_batch(graphdef, params, old_noise=0.3, ref_noise=0.5)
    no_ref = with_ref._replace(ref_logp=None)
    g0, m0 = lg_jit(graphdef, params, no_ref, loss_cfg(kl_coef=0.0))
    g1, m1 = lg_jit(graphdef, params, with_ref, loss_cfg(kl_coef=0.0))
    for a, b in zip(leaves(g0), leaves(g1)):
        np.testing.assert_array_equal(a, b)
    assert set(m0) == set(m1)
    for k in m0:
        np.testing.assert_array_equal(m0[k], m1[k], err_msg=k)
    np.testing.assert_array_equal(m0["loss"], m0["pg_loss"])
    # With a non-zero coefficient the same reference does change the loss and the gradient.
    g2, m2 = lg_jit(graphdef, params, with_ref, LOSS)
    assert float(m2["kl"]) > 0
    np.testing.assert_allclose(m2["loss"], m2["pg_loss"] + LOSS.kl_coef * m2["kl"], rtol=1e-6)
    np.testing.assert_allclose(m2["pg_loss"], m0["pg_loss"], rtol=1e-6)
    assert max_abs_diff(g2, g0) > 1e-4


# --- padding garbage -----------------------------------------------------------------------

def _dirty(batch: Batch) -> Batch:
    pad = np.asarray(batch.response_mask) == 0
    return batch._replace(old_logp=jnp.where(pad, -jnp.inf, batch.old_logp),
                          ref_logp=jnp.where(pad, jnp.nan, batch.ref_logp))


def test_non_finite_logprobs_on_padding_are_ignored(tiny):
    """Padding positions of old/ref logprobs may hold garbage (inf, NaN): the loss, its
    gradient and the loss metrics ignore them (grpo.policy_loss_terms zeroes them)."""
    graphdef, params = tiny
    batch = make_batch(graphdef, params, old_noise=0.3)
    clean_g, clean_m = lg_jit(graphdef, params, batch, LOSS)
    g, m = lg_jit(graphdef, params, _dirty(batch), LOSS)
    for a, b in zip(leaves(g), leaves(clean_g)):
        np.testing.assert_array_equal(a, b)
    for k in ("loss", "pg_loss", "kl", "ratio_mean", "ratio_min", "ratio_max", "pg_clipfrac",
              "pg_clipfrac_lower", "ppo_kl", "entropy"):
        np.testing.assert_array_equal(m[k], clean_m[k], err_msg=k)


def test_logp_diff_metric_ignores_padding_garbage(tiny):
    graphdef, params = tiny
    batch = make_batch(graphdef, params, old_noise=0.3)
    clean = lg_jit(graphdef, params, batch, LOSS)[1]
    m = lg_jit(graphdef, params, _dirty(batch), LOSS)[1]
    np.testing.assert_array_equal(m["logp_diff_abs"], clean["logp_diff_abs"])


# --- 6. sharded step == single-device step ---------------------------------------------------

def _intended_shardings(state: TrainState, mesh) -> TrainState:
    """Parameters in their logical-axis sharding (as init_model placed them), Adam's moments
    like their parameters, the scalars (Adam's count, the step) replicated on the mesh."""
    whole = NamedSharding(mesh, P())
    params = jax.tree.map(lambda x: x.sharding, state.params)
    opt = optax.tree_utils.tree_map_params(TX, lambda _, sh: sh, state.opt_state, params,
                                           transform_non_params=lambda _: whole)
    return TrainState(params, opt, whole)


def _sharded_setup():
    """Mesh, graphdef, a train state placed in its intended shardings by hand (the work-around
    for the init_train_state bug below) and those shardings."""
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    graphdef, state = init_train_state(models.init_model(CFG, seed=SEED, mesh=mesh), TX)
    want = _intended_shardings(state, mesh)
    assert state.params["embed_vd"][...].sharding.spec == P("tensor", "fsdp")
    assert state.params["layers"][0]["q_dnh"][...].sharding.spec == P("fsdp", "tensor")
    return mesh, graphdef, jax.tree.map(jax.device_put, state, want), want


def _shard_batch(batch: Batch, mesh) -> Batch:
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp")))), batch)


def _sharding_mismatches(state, want) -> list[str]:
    spec = lambda sh: getattr(sh, "spec", sh)  # noqa: E731
    return [f"{jax.tree_util.keystr(path)}: {spec(x.sharding)} != {spec(sh)}"
            for (path, x), sh in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(want))
            if not x.sharding.is_equivalent_to(sh, x.ndim)]


def test_init_train_state_places_optimizer_state_like_the_parameters():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    _, state = init_train_state(models.init_model(CFG, seed=SEED, mesh=mesh), TX)
    assert _sharding_mismatches(state, _intended_shardings(state, mesh)) == []


def test_sharded_train_step_matches_single_device():
    mesh, g8, s8, _ = _sharded_setup()
    g1, s1 = init_train_state(models.init_model(CFG, seed=SEED), TX)
    for a, b in zip(leaves(s1), leaves(s8)):
        np.testing.assert_array_equal(a, b)  # same seed, same weights, whatever the placement
    batch = make_batch(g1, s1.params, old_noise=0.3)
    before = leaves(s1.params)

    s1, m1 = train_step(g1, s1, batch, tx=TX, cfg=LOSS)
    s8, m8 = train_step(g8, s8, _shard_batch(batch, mesh), tx=TX, cfg=LOSS)
    assert bool(m1["finite"]) and bool(m8["finite"]) and int(s8.step) == int(s1.step) == 1
    for k in m1:
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-7, err_msg=k)
    # The gradients: after one step Adam's first moment is (1 - b1) g and its second (1 - b2) g^2.
    assert_trees_close(s8.opt_state, s1.opt_state, 1e-5, what="optimizer state", per_leaf=True)
    # The weights, where Adam's first step p - lr * g / (|g| + eps) is well conditioned: where
    # |g| < eps it multiplies the float32 noise of g by up to lr / eps (100x here), and that noise
    # depends on the reduction order the CPU's vector width gives (a near-cancelling gradient of a
    # tied-embedding row, 3e-6 +- 2e-8, moves the weight by 3.23e-4 or 3.21e-4); those elements are
    # held to the first-moment comparison above instead.
    grads = jax.tree.map(lambda mu: np.abs(np.asarray(mu)) / (1 - 0.9), optax.tree_utils.tree_get(s1.opt_state, "mu"))
    conditioned = jax.tree.map(lambda g: g >= 1e-4, grads)
    assert 0.5 < np.mean(np.concatenate([c.ravel() for c in jax.tree.leaves(conditioned)])) < 1
    assert_trees_close(jax.tree.map(lambda p, c: np.where(c, p, 0), leaves_tree(s8.params), conditioned),
                       jax.tree.map(lambda p, c: np.where(c, p, 0), leaves_tree(s1.params), conditioned),
                       1e-5, what="params", per_leaf=True)
    # The step really moved the weights (by ~lr), so the comparison above is not vacuous.
    assert max_abs_diff(s1.params, before) > 5e-3


def test_sharded_train_step_keeps_shardings_and_compiles_once():
    mesh, graphdef, state, want = _sharded_setup()
    batch = _shard_batch(make_batch(graphdef, state.params, old_noise=0.3), mesh)
    state, _ = train_step(graphdef, state, batch, tx=TX, cfg=LOSS)  # cached by the test above
    n = train_step._cache_size()
    assert _sharding_mismatches(state, want) == []
    state, m = train_step(graphdef, state, batch, tx=TX, cfg=LOSS)
    assert bool(m["finite"]) and int(state.step) == 2
    assert train_step._cache_size() == n


# --- 7. non-finite steps are skipped ----------------------------------------------------------

def test_non_finite_step_leaves_state_untouched():
    graphdef, state = init_train_state(models.init_model(CFG, seed=SEED), TX)
    good = make_batch(graphdef, state.params, old_noise=0.3)
    adv = np.asarray(good.advantages).copy()
    adv[1] = np.nan  # row 1 has 7 response tokens
    bad = good._replace(advantages=jnp.asarray(adv))

    snapshot = leaves(state)  # host copies: train_step donates its state
    state, m = train_step(graphdef, state, bad, tx=TX, cfg=LOSS)
    assert not bool(m["finite"]) and not np.isfinite(float(m["loss"]))
    after = leaves(state)
    assert len(after) == len(snapshot)
    for a, b in zip(after, snapshot):  # bitwise: params, Adam moments and count, step
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    assert int(state.step) == 0

    state, m = train_step(graphdef, state, good, tx=TX, cfg=LOSS)
    assert bool(m["finite"]) and int(state.step) == 1
    old_params = jax.tree.unflatten(jax.tree.structure(state), snapshot).params
    assert max_abs_diff(state.params, old_params) > 5e-3


# --- 8. optimizer -------------------------------------------------------------------------

def _lrs(cfg: OptimConfig, steps: int) -> np.ndarray:
    """The learning rate per step, read off AdamW on a scalar with a gradient of 1.

    With b1 = b2 = 0 the moments are m = g = 1 and v = g^2 = 1 (no fp32 bias-correction
    round-off), so with eps = weight_decay = 0 the update is exactly -lr(t).
    """
    tx = make_optimizer(dataclasses.replace(cfg, b1=0.0, b2=0.0, weight_decay=0.0, eps=0.0,
                                            grad_clip=0.0))

    @jax.jit
    def run(p):
        def body(carry, _):
            p, s = carry
            u, s = tx.update(jnp.ones_like(p), s, p)
            return (optax.apply_updates(p, u), s), u
        return jax.lax.scan(body, (p, tx.init(p)), None, length=steps)[1]

    return -np.asarray(run(jnp.zeros((), jnp.float32)), np.float64)


def test_cosine_schedule_warmup_then_cosine_to_zero():
    lr = _lrs(OptimConfig(learning_rate=1.0, warmup_ratio=0.1, total_steps=100), 120)
    t = np.arange(120)
    want = np.where(t < 10, t / 10, 0.5 * (1 + np.cos(np.pi * np.clip(t - 10, 0, 90) / 90)))
    np.testing.assert_allclose(lr, want, rtol=0, atol=1e-6)
    assert lr[0] == 0.0 and np.all(lr[100:] == 0.0)
    # No warmup: the cosine starts at the peak on the first step.
    lr = _lrs(OptimConfig(learning_rate=2.0, warmup_ratio=0.0, total_steps=10), 12)
    np.testing.assert_allclose(lr, np.where(t[:12] < 10, 1 + np.cos(np.pi * t[:12] / 10), 0.0),
                               rtol=0, atol=2e-6)


def test_constant_schedule_warmup_then_flat():
    lr = _lrs(OptimConfig(learning_rate=0.5, warmup_ratio=0.2, total_steps=50, schedule="constant"),
              60)
    t = np.arange(60)
    np.testing.assert_allclose(lr, np.where(t < 10, 0.5 * t / 10, 0.5), rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        make_optimizer(OptimConfig(schedule="linear"))


def test_constant_schedule_without_warmup_starts_at_peak():
    lr = _lrs(OptimConfig(learning_rate=1.0, warmup_ratio=0.0, total_steps=10, schedule="constant"), 3)
    np.testing.assert_allclose(lr, 1.0, rtol=0, atol=1e-7)


def test_grad_clip_and_weight_decay():
    """AdamW with b1 = b2 = 0: m = g, v = g^2, so the update is -lr * g / (|g| + eps) per
    element (+ decoupled decay -lr * wd * p). A large eps makes it depend on g's scale, so
    the clipped gradient g * min(1, c / ||g||) shows in the update."""
    g = {"a": jnp.array([30.0, 0.0], jnp.float32), "b": jnp.array([[40.0]], jnp.float32)}  # ||g|| 50
    p = {"a": jnp.array([1.0, -2.0], jnp.float32), "b": jnp.array([[0.5]], jnp.float32)}
    lr, eps, wd = 0.1, 10.0, 0.01

    def first_update(**kw):
        tx = make_optimizer(OptimConfig(learning_rate=lr, warmup_ratio=0.0, total_steps=1000,
                                        b1=0.0, b2=0.0, eps=eps, **kw))
        return tx.update(g, tx.init(p), p)[0]

    for kw, scale, decay in [(dict(grad_clip=1.0, weight_decay=0.0), 1 / 50, 0.0),
                             (dict(grad_clip=100.0, weight_decay=0.0), 1.0, 0.0),  # under the clip
                             (dict(grad_clip=0.0, weight_decay=0.0), 1.0, 0.0),    # no clipping
                             (dict(grad_clip=1.0, weight_decay=wd), 1 / 50, wd)]:
        u = first_update(**kw)
        for k in g:
            want = -lr * (g[k] * scale / (jnp.abs(g[k]) * scale + eps) + decay * p[k])
            np.testing.assert_allclose(u[k], want, rtol=1e-6, atol=1e-9, err_msg=f"{kw} {k}")


# --- 9. remat ---------------------------------------------------------------------------

def test_remat_policies_give_identical_gradients(tiny):
    graphdef, params = tiny
    batch = make_batch(graphdef, params, old_noise=0.5, seed=3)
    base_g, base_m = lg_jit(graphdef, params, batch, LOSS)
    for remat in ("none", "full", "dots", "names"):
        gd, p = split(models.init_model(CFG.replace(remat=remat), seed=SEED))
        # The policy is really applied: one remat per layer; the logprobs go through the
        # fused LM head's custom VJP, which needs no remat of its own.
        jaxpr = str(jax.make_jaxpr(lambda p: loss_and_grads(gd, p, batch, LOSS))(p))
        assert jaxpr.count("remat2[") == (CFG.num_layers if remat != "none" else 0), remat
        if remat == "none":
            continue
        for a, b in zip(leaves(p), leaves(params)):
            np.testing.assert_array_equal(a, b)
        g, m = lg_jit(gd, p, batch, LOSS)
        assert_trees_close(g, base_g, 1e-6)
        for k in m:
            np.testing.assert_allclose(m[k], base_m[k], rtol=1e-6, atol=1e-7, err_msg=f"{remat} {k}")


# --- 10. one compilation; the grad-norm metric ------------------------------------------------

def test_second_step_does_not_recompile_and_reports_grad_norm():
    graphdef, state = init_train_state(models.init_model(CFG, seed=SEED), TX)
    b1 = make_batch(graphdef, state.params, old_noise=0.3, seed=4)
    b2 = make_batch(graphdef, state.params, old_noise=0.3, seed=5)
    grads, _ = lg_jit(graphdef, state.params, b1, LOSS)

    state, m = train_step(graphdef, state, b1, tx=TX, cfg=LOSS)
    n = train_step._cache_size()
    assert n >= 1
    # grad_norm is the global norm of the accumulated (pre-clip) gradient.
    np.testing.assert_allclose(m["grad_norm"], optax.global_norm(grads), rtol=1e-6)
    state, _ = train_step(graphdef, state, b2, tx=TX, cfg=LOSS)  # new batch values, same shapes
    state, m = train_step(graphdef, state, b1, tx=TX, cfg=LOSS)
    assert train_step._cache_size() == n
    assert bool(m["finite"]) and int(state.step) == 3


# --- 11. it learns --------------------------------------------------------------------------

def test_steps_raise_positive_and_lower_negative_rows():
    graphdef, state = init_train_state(models.init_model(CFG, seed=SEED), TX)
    adv = np.zeros(B, np.float32)
    adv[0], adv[5] = 1.0, -1.0  # two rows with 10 response tokens each
    batch = make_batch(graphdef, state.params, advantages=adv)  # on policy at step 0
    mask = np.asarray(batch.response_mask)

    def row_means(params):
        lp = np.asarray(model_logprobs(graphdef, params, batch.tokens, batch.attention_mask))
        return (lp * mask).sum(-1) / np.maximum(mask.sum(-1), 1)

    start = row_means(state.params)
    pg_losses = []
    for _ in range(4):  # lr 1e-2
        state, m = train_step(graphdef, state, batch, tx=TX, cfg=LOSS)
        assert bool(m["finite"])
        pg_losses.append(float(m["pg_loss"]))
    end = row_means(state.params)
    assert end[0] > start[0] + 0.1, (start[0], end[0])
    assert end[5] < start[5] - 0.1, (start[5], end[5])
    # The clipped surrogate starts at -mean(A) = 0 on policy (the two rows are equally long)
    # and drops as the ratios move with the advantages (ending near the clip range 0.8/1.28).
    assert abs(pg_losses[0]) < 1e-6 and min(pg_losses[1:]) < -0.05, pg_losses
