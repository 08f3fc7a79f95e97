"""GRPO math in rl/grpo.py against an independent NumPy transcription of verl's formulas.

The reference below is written with explicit loops over groups, sequences and tokens
in float64 (``compute_grpo_outcome_advantage``, ``compute_policy_loss`` with dual clip,
``kl_penalty`` and ``agg_loss`` from verl ``core_algos.py``); the code under test is
vectorised JAX in float32.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl import grpo

AGGS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
ESTIMATORS = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")
RTOL = 2e-5
# One [B, T, V] shape for (almost) every test: eager JAX compiles each op once per shape.
B0, T0, V0 = 6, 9, 11
ATOL = 1e-6


# ============================================================================ reference


def ref_advantages(rewards, group_size, eps=1e-6, scale_by_std=True):
    r = [float(x) for x in rewards]
    out = [0.0] * len(r)
    for start in range(0, len(r), group_size):
        group = r[start : start + group_size]
        if group_size == 1:
            mean, std = 0.0, 1.0
        else:
            mean = sum(group) / group_size
            std = math.sqrt(sum((x - mean) ** 2 for x in group) / (group_size - 1))
        for j, x in enumerate(group):
            if group_size > 1 and max(group) == min(group):
                out[start + j] = 0.0  # identical rewards: no signal
            elif scale_by_std:
                out[start + j] = (x - mean) / (std + eps)
            else:
                out[start + j] = x - mean
    return np.array(out)


def ref_kl_token(lp, rlp, est):
    d = lp - rlp
    if est in ("kl", "k1"):
        return d
    if est == "abs":
        return abs(d)
    if est in ("mse", "k2"):
        return 0.5 * d * d
    k = min(max(rlp - lp, -20.0), 20.0)
    return min(max(math.exp(k) - k - 1.0, -10.0), 10.0)


def ref_pg_token(lp, olp, a, cl, ch, dual):
    """Returns (loss, clipped_flag(pg2 > pg1), lower_flag, ratio)."""
    r = math.exp(min(max(lp - olp, -20.0), 20.0))
    pg1 = -a * r
    pg2 = -a * min(max(r, 1.0 - cl), 1.0 + ch)
    clip_pg = max(pg1, pg2)
    if dual is None:
        return clip_pg, pg2 > pg1, False, r
    pg3 = -a * dual
    if a < 0:
        return min(pg3, clip_pg), pg2 > pg1, clip_pg > pg3, r
    return clip_pg, pg2 > pg1, False, r


def ref_agg(x, m, mode, L=None):
    B, T = x.shape
    L = T if L is None else L
    if mode == "token-mean":
        s = n = 0.0
        for b in range(B):
            for t in range(T):
                s += x[b, t] * m[b, t]
                n += m[b, t]
        return s / n if n > 0 else 0.0
    seqs = []
    for b in range(B):
        n_b = sum(m[b, t] for t in range(T))
        if n_b == 0:
            continue
        s_b = sum(x[b, t] * m[b, t] for t in range(T))
        if mode == "seq-mean-token-sum":
            seqs.append(s_b)
        elif mode == "seq-mean-token-mean":
            seqs.append(s_b / n_b)
        else:
            seqs.append(s_b / L)
    return sum(seqs) / len(seqs) if seqs else 0.0


def ref_entropy(logits_row):
    z = np.asarray(logits_row, np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    return float(-sum(pi * math.log(pi) for pi in p if pi > 0))


def ref_policy_loss(
    logp, old, ref, adv, mask, *, clip_low=0.2, clip_high=0.2, dual_clip=3.0, kl_coef=0.005,
    kl_estimator="low_var_kl", agg="token-mean", logits=None, max_response_len=None,
):
    logp, old, mask = (np.asarray(a, np.float64) for a in (logp, old, mask))
    B, T = logp.shape
    adv = np.asarray(adv, np.float64)
    pg = np.zeros((B, T))
    kl = np.zeros((B, T))
    clipped = lower = ratio_sum = ppo_kl = ent = n = 0.0
    rmin, rmax = math.inf, -math.inf
    for b in range(B):
        for t in range(T):
            if mask[b, t] == 0:
                continue
            a = adv[b] if adv.ndim == 1 else adv[b, t]
            loss, c, lo, r = ref_pg_token(logp[b, t], old[b, t], a, clip_low, clip_high, dual_clip)
            pg[b, t] = loss
            if ref is not None:
                kl[b, t] = ref_kl_token(logp[b, t], float(ref[b, t]), kl_estimator)
            w = mask[b, t]
            n += w
            clipped += w * c
            lower += w * lo
            ratio_sum += w * r
            ppo_kl += w * -min(max(logp[b, t] - old[b, t], -20.0), 20.0)
            rmin, rmax = min(rmin, r), max(rmax, r)
            if logits is not None:
                ent += w * ref_entropy(logits[b, t])
    pg_loss = ref_agg(pg, mask, agg, max_response_len)
    kl_loss = ref_agg(kl, mask, agg, max_response_len) if ref is not None else 0.0
    loss = pg_loss + (kl_coef * kl_loss if ref is not None else 0.0)
    metrics = {
        "loss": loss,
        "pg_loss": pg_loss,
        "kl": kl_loss,
        "pg_clipfrac": clipped / n if n else 0.0,
        "pg_clipfrac_lower": lower / n if n else 0.0,
        "ratio_mean": ratio_sum / n if n else 0.0,
        "ratio_min": rmin if n else 0.0,
        "ratio_max": rmax if n else 0.0,
        "ppo_kl": ppo_kl / n if n else 0.0,
    }
    if logits is not None:
        metrics["entropy"] = ent / n if n else 0.0
    return loss, metrics


def ref_pg_grad_token(lp, olp, a, cl, ch, dual):
    """d pg_token / d logp by case analysis of which branch of the clipped objective is live."""
    d = lp - olp
    if abs(d) > 20.0 or a == 0:
        return 0.0
    r = math.exp(d)
    if a > 0:
        # max(-a r, -a clip(r)): the clipped constant wins once r > 1 + ch.
        return 0.0 if r > 1.0 + ch else -a * r
    # a < 0: the clipped constant wins once r < 1 - cl; dual clip caps the loss at -a*dual.
    if r < 1.0 - cl:
        return 0.0
    if dual is not None and r > dual:
        return 0.0
    return -a * r


# ============================================================================ fixtures


def make_batch(seed, B=B0, T=T0, V=V0, *, empty_rows=(2,), spread=0.6, extreme=True):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, size=B)
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    for b in empty_rows:
        mask[b] = 0.0
    logp = -rng.uniform(0.05, 3.0, size=(B, T)).astype(np.float32)
    old = (logp + rng.normal(0.0, spread, size=(B, T))).astype(np.float32)
    ref = (logp + rng.normal(0.0, spread, size=(B, T))).astype(np.float32)
    if extreme:  # log-ratios beyond the +-20 clamp and ratios far outside the clip range
        old[0, 0] = logp[0, 0] - 30.0
        old[1, 0] = logp[1, 0] + 30.0
        ref[0, 0] = logp[0, 0] + 25.0
        ref[1, 0] = logp[1, 0] - 25.0
    adv = rng.normal(0.0, 1.5, size=B).astype(np.float32)
    adv[0], adv[1] = -1.3, 0.9
    logits = rng.normal(0.0, 2.0, size=(B, T, V)).astype(np.float32)
    # Garbage outside the mask must not matter.
    logp = np.where(mask > 0, logp, np.float32(-np.inf))
    return dict(logp=logp, old=old, ref=ref, adv=adv, mask=mask, logits=logits)


def assert_close(actual, expected, rtol=RTOL, atol=ATOL, what=""):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol, err_msg=what)


def assert_metrics(metrics, ref_metrics):
    for k, v in ref_metrics.items():
        assert k in metrics, k
        assert np.isfinite(np.asarray(metrics[k])).all(), k
        assert_close(metrics[k], v, what=k)


# ============================================================================ advantages


@pytest.mark.parametrize("group_size", [1, 2, 8])
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_advantages_match_reference(group_size, scale_by_std):
    rng = np.random.default_rng(group_size)
    rewards = rng.normal(size=5 * group_size).astype(np.float32)
    if group_size > 1:
        rewards[:group_size] = np.round(rewards[:group_size])  # some ties inside a group
    got = grpo.compute_advantages(jnp.asarray(rewards), group_size, scale_by_std=scale_by_std)
    assert got.shape == (5 * group_size,) and got.dtype == jnp.float32
    want = ref_advantages(rewards, group_size, scale_by_std=scale_by_std)
    assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_advantages_unbiased_std_like_torch():
    r = np.array([0.0, 1.0, 1.0, 1.0], np.float32)  # mean 0.75, std(ddof=1) = 0.5
    got = np.asarray(grpo.compute_advantages(jnp.asarray(r), 4, eps=0.0))
    np.testing.assert_allclose(got, [-1.5, 0.5, 0.5, 0.5], rtol=1e-6)
    np.testing.assert_allclose(got, (r - r.mean()) / r.std(ddof=1), rtol=1e-6)


def test_advantages_singleton_groups_follow_verl():
    r = np.array([0.3, -1.0, 2.0], np.float32)
    got = grpo.compute_advantages(jnp.asarray(r), 1, eps=1e-6)
    np.testing.assert_allclose(np.asarray(got), r / (1.0 + 1e-6), rtol=1e-7)
    np.testing.assert_array_equal(np.asarray(grpo.compute_advantages(jnp.asarray(r), 1, scale_by_std=False)), r)


@pytest.mark.parametrize("scale_by_std", [True, False])
@pytest.mark.parametrize("group_size", [2, 3, 8])
def test_advantages_identical_rewards_are_exactly_zero(group_size, scale_by_std):
    # 0.1 and 1/3 are not exactly representable, so a naive mean could be an ulp off.
    values = [0.1, 1.0 / 3.0, 0.0, 1.0, -7.7]
    rewards = np.repeat(np.array(values, np.float32), group_size)
    rewards = np.concatenate([rewards, np.arange(group_size, dtype=np.float32)])  # one varied group
    got = np.asarray(
        jax.jit(grpo.compute_advantages, static_argnums=1, static_argnames="scale_by_std")(
            jnp.asarray(rewards), group_size, scale_by_std=scale_by_std
        )
    )
    assert np.isfinite(got).all()
    assert (got[: len(values) * group_size] == 0.0).all()
    assert np.abs(got[len(values) * group_size :]).max() > 0


def test_advantages_rejects_bad_shapes():
    with pytest.raises(ValueError):
        grpo.compute_advantages(jnp.zeros(7), 2)
    with pytest.raises(ValueError):
        grpo.compute_advantages(jnp.zeros(4), 0)


def test_broadcast_to_tokens():
    adv = jnp.array([1.5, -2.0, 0.0])
    mask = jnp.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]], bool)
    got = np.asarray(grpo.broadcast_to_tokens(adv, mask))
    np.testing.assert_array_equal(got, [[1.5, 1.5, 0], [-2.0, 0, 0], [0, 0, 0]])
    assert got.dtype == np.float32


# ============================================================================ log-probs, entropy, KL


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs(temperature):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(B0, T0, V0)).astype(np.float32)
    tokens = rng.integers(0, V0, size=(B0, T0))
    got = grpo.token_logprobs(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(tokens), temperature)
    assert got.dtype == jnp.float32
    bf = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), np.float64)
    for b in range(B0):
        for t in range(T0):
            z = bf[b, t] / temperature
            lse = math.log(sum(math.exp(v) for v in z))
            assert_close(got[b, t], z[tokens[b, t]] - lse, rtol=1e-5, atol=1e-5)


def test_entropy_from_logits():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, size=(B0, T0, V0)).astype(np.float32)
    logits[0, 0, 0] = 60.0  # nearly one-hot
    got = grpo.entropy_from_logits(jnp.asarray(logits))
    for b in range(B0):
        for t in range(T0):
            assert_close(got[b, t], ref_entropy(logits[b, t]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_penalty_each_estimator(estimator):
    rng = np.random.default_rng(2)
    lp = -rng.uniform(0, 4, size=(B0, T0)).astype(np.float32)
    rlp = (lp + rng.normal(0, 1.5, size=(B0, T0))).astype(np.float32)
    rlp[0, 0], rlp[0, 1] = lp[0, 0] + 30.0, lp[0, 1] - 30.0  # k3 clamps (exp side and linear side)
    rlp[0, 2] = lp[0, 2] + 5.0  # k3 = e^5 - 6 > 10: clamped to 10
    got = np.asarray(grpo.kl_penalty(jnp.asarray(lp), jnp.asarray(rlp), estimator))
    want = np.array([[ref_kl_token(float(a), float(b), estimator) for a, b in zip(ra, rb)] for ra, rb in zip(lp, rlp)])
    assert_close(got, want, rtol=1e-5, atol=1e-5)
    if estimator in ("low_var_kl", "k3"):
        assert got[0, 0] == 10.0 and got[0, 2] == 10.0 and got.max() <= 10.0


def test_kl_penalty_unknown_estimator():
    with pytest.raises(ValueError):
        grpo.kl_penalty(jnp.zeros(2), jnp.zeros(2), "full")


# ============================================================================ aggregation


@pytest.mark.parametrize("agg", AGGS)
def test_aggregate_matches_reference_with_empty_rows(agg):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(B0, T0)).astype(np.float32)
    mask = (rng.uniform(size=(B0, T0)) < 0.6).astype(np.float32)
    mask[1] = 0.0
    mask[3] = 0.0
    mask[0, 0] = 1.0
    x[1] = np.nan  # masked-out garbage
    for L in (None, 10):
        got = grpo.aggregate(jnp.asarray(x), jnp.asarray(mask), agg, max_response_len=L)
        assert_close(got, ref_agg(np.nan_to_num(x), mask, agg, L), what=f"{agg} L={L}")
    num, den = grpo.aggregate_terms(jnp.asarray(x), jnp.asarray(mask), agg)
    assert float(den) == float(grpo.loss_denominator(jnp.asarray(mask), agg))
    assert float(den) == (mask.sum() if agg == "token-mean" else float((mask.sum(1) > 0).sum()))


@pytest.mark.parametrize("agg", AGGS)
def test_aggregate_all_empty_is_zero(agg):
    got = grpo.aggregate(jnp.ones((B0, T0)), jnp.zeros((B0, T0)), agg)
    assert float(got) == 0.0


def test_aggregate_unknown_mode():
    with pytest.raises(ValueError):
        grpo.aggregate(jnp.ones((1, 1)), jnp.ones((1, 1)), "sum")


# ============================================================================ policy loss


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_policy_loss_matches_reference(agg, estimator):
    d = make_batch(seed=10 * AGGS.index(agg) + ESTIMATORS.index(estimator))
    kw = dict(kl_coef=0.1, kl_estimator=estimator, agg=agg, clip_low=0.2, clip_high=0.28)
    loss, metrics = grpo.policy_loss(
        jnp.asarray(d["logp"]), jnp.asarray(d["old"]), jnp.asarray(d["ref"]), jnp.asarray(d["adv"]),
        jnp.asarray(d["mask"]), logits=jnp.asarray(d["logits"]), **kw,
    )
    want, want_metrics = ref_policy_loss(
        np.where(d["mask"] > 0, d["logp"], 0.0), d["old"], d["ref"], d["adv"], d["mask"],
        logits=d["logits"], **kw,
    )
    assert_close(loss, want, what="loss")
    assert_metrics(metrics, want_metrics)


@pytest.mark.parametrize("agg", AGGS)
def test_policy_loss_token_level_advantages_bool_mask(agg):
    d = make_batch(seed=11, empty_rows=(3, 4))
    rng = np.random.default_rng(12)
    adv_tok = rng.normal(size=d["mask"].shape).astype(np.float32)
    loss, metrics = grpo.policy_loss(
        jnp.asarray(d["logp"]), jnp.asarray(d["old"]), jnp.asarray(d["ref"]), jnp.asarray(adv_tok),
        jnp.asarray(d["mask"] > 0), agg=agg, kl_coef=0.02, kl_estimator="k2", dual_clip=None,
        max_response_len=16,
    )
    want, want_metrics = ref_policy_loss(
        np.where(d["mask"] > 0, d["logp"], 0.0), d["old"], d["ref"], adv_tok, d["mask"], agg=agg,
        kl_coef=0.02, kl_estimator="k2", dual_clip=None, max_response_len=16,
    )
    assert_close(loss, want)
    assert_metrics(metrics, want_metrics)


def test_policy_loss_advantage_rows_equal_token_broadcast():
    d = make_batch(seed=5)
    args = (jnp.asarray(d["logp"]), jnp.asarray(d["old"]), jnp.asarray(d["ref"]))
    m = jnp.asarray(d["mask"])
    a, _ = grpo.policy_loss(*args, jnp.asarray(d["adv"]), m)
    b, _ = grpo.policy_loss(*args, grpo.broadcast_to_tokens(jnp.asarray(d["adv"]), m), m)
    assert float(a) == pytest.approx(float(b), rel=1e-6)


def _single_token_loss(lr, a, **kw):
    """Per-token loss for log-ratio ``lr`` and advantage ``a`` (no KL): every token the same."""
    logp = jnp.full((B0, T0), -1.0)
    loss, metrics = grpo.policy_loss(
        logp, logp - lr, None, jnp.full((B0,), a), jnp.ones((B0, T0)), kl_coef=0.0, **kw
    )
    return float(loss), {k: float(v) for k, v in metrics.items()}


def test_ratios_far_outside_clip_range_both_sides():
    e20 = math.exp(20.0)
    # A > 0, ratio huge (log-ratio 30 clamps to 20): clipped at 1 + clip_high.
    loss, m = _single_token_loss(30.0, 2.0, clip_high=0.28)
    assert loss == pytest.approx(-2.0 * 1.28, rel=1e-6) and m["pg_clipfrac"] == 1.0
    assert m["ratio_max"] == pytest.approx(e20, rel=1e-5)
    # A > 0, ratio tiny: the pessimistic max keeps the unclipped term -A * e^-20.
    loss, m = _single_token_loss(-30.0, 2.0)
    assert loss == pytest.approx(-2.0 * math.exp(-20.0), rel=1e-5) and m["pg_clipfrac"] == 0.0
    # A < 0, ratio tiny: clipped at 1 - clip_low.
    loss, m = _single_token_loss(-30.0, -2.0, clip_low=0.2)
    assert loss == pytest.approx(2.0 * 0.8, rel=1e-6) and m["pg_clipfrac"] == 1.0
    assert m["pg_clipfrac_lower"] == 0.0
    # A < 0, ratio huge: the dual clip caps the loss at -A * dual_clip.
    loss, m = _single_token_loss(30.0, -2.0, dual_clip=3.0)
    assert loss == pytest.approx(2.0 * 3.0, rel=1e-6)
    assert m["pg_clipfrac_lower"] == 1.0
    # Without dual clip the same token is unbounded.
    loss, m = _single_token_loss(30.0, -2.0, dual_clip=None)
    assert loss == pytest.approx(2.0 * e20, rel=1e-5) and m["pg_clipfrac_lower"] == 0.0


def test_ratio_extremes_ignore_masked_tokens():
    rng = np.random.default_rng(15)
    lr = rng.uniform(0.1, 0.3, size=(B0, T0)).astype(np.float32)
    mask = np.ones((B0, T0), np.float32)
    mask[:, -3:] = 0.0
    lr[:, -3:] = [-5.0, 0.0, 5.0]  # masked out: must not reach ratio_min / ratio_max
    logp = jnp.full((B0, T0), -1.0)
    _, m = grpo.policy_loss(logp, logp - lr, None, jnp.ones(B0), jnp.asarray(mask), kl_coef=0.0)
    valid = lr[:, :-3]
    assert float(m["ratio_min"]) == pytest.approx(math.exp(valid.min()), rel=1e-6)
    assert float(m["ratio_max"]) == pytest.approx(math.exp(valid.max()), rel=1e-6)
    assert float(m["ratio_mean"]) == pytest.approx(np.exp(valid.astype(np.float64)).mean(), rel=1e-6)


def test_dual_clip_hits_in_a_batch():
    B, T = B0, T0
    logp = jnp.full((B, T), -1.0)
    lr = np.zeros((B, T), np.float32)
    lr[0, :2] = math.log(5.0)  # ratio 5 > dual_clip on a negative-advantage row
    lr[1, :] = math.log(5.0)  # ratio 5 on a positive-advantage row: ordinary clip
    old = logp - jnp.asarray(lr)
    adv = jnp.array([-0.7, 0.7, -0.7, 0.0, 0.2, -0.1])
    mask = jnp.ones((B, T))
    loss, m = grpo.policy_loss(logp, old, None, adv, mask, kl_coef=0.0, agg="seq-mean-token-sum")
    assert float(m["pg_clipfrac_lower"]) == pytest.approx(2 / (B * T))
    assert float(m["pg_clipfrac_lower"]) > 0
    want, want_m = ref_policy_loss(
        np.asarray(logp), np.asarray(old), None, np.asarray(adv), np.asarray(mask),
        kl_coef=0.0, agg="seq-mean-token-sum",
    )
    assert_close(loss, want)
    assert_metrics(m, want_m)
    # Row 0 alone: two dual-clipped tokens at -A*3 plus T-2 tokens at ratio 1 (-A*1).
    row0, _ = grpo.policy_loss(logp[:1], old[:1], None, adv[:1], mask[:1], kl_coef=0.0, agg="seq-mean-token-sum")
    assert float(row0) == pytest.approx(2 * 0.7 * 3.0 + (T - 2) * 0.7, rel=1e-6)


def test_no_kl_term_without_ref_or_coef():
    d = make_batch(seed=7)
    args = (jnp.asarray(d["logp"]), jnp.asarray(d["old"]))
    rest = (jnp.asarray(d["adv"]), jnp.asarray(d["mask"]))
    no_ref, m0 = grpo.policy_loss(*args, None, *rest, kl_coef=0.5)
    zero_coef, m1 = grpo.policy_loss(*args, jnp.asarray(d["ref"]), *rest, kl_coef=0.0)
    with_kl, m2 = grpo.policy_loss(*args, jnp.asarray(d["ref"]), *rest, kl_coef=0.5)
    assert float(no_ref) == float(zero_coef) == pytest.approx(float(m2["pg_loss"]), rel=1e-6)
    assert float(m0["kl"]) == 0.0 and float(m1["kl"]) > 0.0
    assert float(with_kl) == pytest.approx(float(m2["pg_loss"]) + 0.5 * float(m2["kl"]), rel=1e-6)


@pytest.mark.parametrize("agg", AGGS)
def test_all_empty_mask_gives_zero_no_nan(agg):
    d = make_batch(seed=8)
    zero = jnp.zeros_like(jnp.asarray(d["mask"]))

    def f(logp):
        return grpo.policy_loss(
            logp, jnp.asarray(d["old"]), jnp.asarray(d["ref"]), jnp.asarray(d["adv"]), zero,
            agg=agg, logits=jnp.asarray(d["logits"]),
        )

    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(d["logp"]))
    assert float(loss) == 0.0
    assert all(np.isfinite(np.asarray(v)) and float(v) == 0.0 for v in metrics.values())
    assert np.isfinite(np.asarray(grad)).all() and not np.asarray(grad).any()


def test_policy_loss_validation():
    x = jnp.zeros((B0, T0))
    a, m = jnp.zeros(B0), jnp.ones((B0, T0))
    with pytest.raises(ValueError):
        grpo.policy_loss(x, x, x, a, m, dual_clip=1.0)
    with pytest.raises(ValueError):
        grpo.policy_loss(x, x, x, a, m, agg="token-sum")
    with pytest.raises(ValueError):
        grpo.policy_loss(x, x, x, a, m, kl_estimator="full")


# ============================================================================ micro-batching


@pytest.mark.parametrize("agg", AGGS)
def test_micro_batch_sum_equals_full_batch(agg):
    d = make_batch(seed=9, empty_rows=(2, 3))
    kw = dict(agg=agg, kl_coef=0.05, kl_estimator="low_var_kl", max_response_len=12)
    arrays = {k: jnp.asarray(v) for k, v in d.items()}

    def terms(logp, sl):
        return grpo.policy_loss_terms(
            logp, arrays["old"][sl], arrays["ref"][sl], arrays["adv"][sl], arrays["mask"][sl],
            logits=arrays["logits"][sl], **kw,
        )

    full_logp = jnp.where(arrays["mask"] > 0, arrays["logp"], 0.0)
    full_loss, full_metrics = grpo.policy_loss(
        full_logp, arrays["old"], arrays["ref"], arrays["adv"], arrays["mask"], logits=arrays["logits"], **kw
    )
    full_grad = jax.grad(lambda lp: grpo.policy_loss(
        lp, arrays["old"], arrays["ref"], arrays["adv"], arrays["mask"], **kw)[0])(full_logp)

    D = grpo.loss_denominator(arrays["mask"], agg)
    # Equal-size chunks (eager ops compile once per shape); rows 2, 3 form an all-empty chunk.
    total, dens, acc, grads = 0.0, 0.0, None, []
    for s in range(0, B0, 2):
        sl = slice(s, s + 2)
        num, den, sums = terms(full_logp[sl], sl)
        total += float(num) / float(D)
        dens += float(den)
        acc = sums if acc is None else grpo.accumulate_metric_sums(acc, sums)
        grads.append(jax.grad(lambda lp, sl=sl: terms(lp, sl)[0] / D)(full_logp[sl]))
    assert dens == float(D)
    assert total == pytest.approx(float(full_loss), rel=1e-6, abs=1e-7)
    for k, v in grpo.finalize_metrics(acc).items():
        assert_close(v, float(full_metrics[k]), rtol=1e-6, atol=1e-7, what=k)
    np.testing.assert_allclose(np.concatenate(grads), np.asarray(full_grad), rtol=1e-6, atol=1e-8)


# ============================================================================ jit


@pytest.mark.parametrize("agg", AGGS)
def test_jit_equals_eager(agg):
    d = make_batch(seed=10)
    f = functools.partial(grpo.policy_loss, agg=agg, kl_estimator="k3", kl_coef=0.01, max_response_len=20)
    args = tuple(jnp.asarray(d[k]) for k in ("logp", "old", "ref", "adv", "mask"))
    eager_loss, eager_m = f(*args, logits=jnp.asarray(d["logits"]))
    jit_loss, jit_m = jax.jit(f)(*args, logits=jnp.asarray(d["logits"]))
    assert_close(jit_loss, float(eager_loss), rtol=1e-6, atol=1e-7)
    for k in eager_m:
        assert_close(jit_m[k], float(eager_m[k]), rtol=1e-6, atol=1e-7, what=k)


def test_jit_traced_kl_coef_and_advantages():
    d = make_batch(seed=10)
    args = tuple(jnp.asarray(d[k]) for k in ("logp", "old", "ref", "adv", "mask"))
    eager_loss, _ = grpo.policy_loss(*args, kl_estimator="k2", kl_coef=0.01)
    g = jax.jit(lambda c: grpo.policy_loss(*args, kl_estimator="k2", kl_coef=c)[0])
    assert_close(g(jnp.float32(0.01)), float(eager_loss), rtol=1e-6, atol=1e-7)
    rewards = jnp.asarray(np.random.default_rng(0).normal(size=4 * 8), jnp.float32)
    adv_jit = jax.jit(grpo.compute_advantages, static_argnums=1)(rewards, 8)
    assert_close(adv_jit, np.asarray(grpo.compute_advantages(rewards, 8)), rtol=1e-6, atol=1e-7)


# ============================================================================ gradients


def _grad_case():
    # Log-ratios covering every branch of the clipped objective, for both advantage signs.
    ratios = [0.5, 0.9, 1.0, 1.1, 1.5, 2.0, 5.0]
    lrs = np.array([-25.0] + [math.log(r) for r in ratios] + [25.0], np.float32)
    assert len(lrs) == T0
    logp = np.full((B0, T0), -1.2, np.float32) + np.linspace(0, 0.5, T0, dtype=np.float32)[None]
    old = logp - lrs[None, :]
    adv = np.array([1.3, -0.8, 0.0, 0.4, -2.0, 0.7], np.float32)
    mask = np.ones((B0, T0), np.float32)
    mask[2, -2:] = 0.0
    mask[5] = 0.0
    return logp, old, adv, mask


# Token columns of _grad_case with a live (non-zero) policy gradient.
_LIVE_POS = [1, 2, 3, 4]  # A > 0: ratio 0.5 .. 1.1 (ratio < 1 - eps is NOT clipped for A > 0)
_LIVE_NEG = [2, 3, 4, 5, 6]  # A < 0: ratio 0.9 .. 2.0 (ratio 1.5, 2.0 are NOT clipped for A < 0)


@pytest.mark.parametrize("agg", AGGS)
def test_policy_gradient_matches_analytic(agg):
    logp, old, adv, mask = _grad_case()
    B, T = logp.shape
    grad = jax.grad(lambda lp: grpo.policy_loss(
        lp, jnp.asarray(old), None, jnp.asarray(adv), jnp.asarray(mask), agg=agg, kl_coef=0.0)[0])(jnp.asarray(logp))
    g_tok = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            g_tok[b, t] = ref_pg_grad_token(float(logp[b, t]), float(old[b, t]), float(adv[b]), 0.2, 0.2, 3.0)
    # d agg / d x[b,t] for each mode, from the reference aggregation (linear in x).
    weights = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            e = np.zeros((B, T))
            e[b, t] = 1.0
            weights[b, t] = ref_agg(e, mask, agg)
    want = weights * g_tok * mask
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-5, atol=1e-7)
    # Clipped tokens get exactly zero gradient: A>0 with ratio > 1.2, A<0 with ratio < 0.8,
    # A<0 with ratio > dual_clip, |log-ratio| beyond the clamp; also A == 0 and masked rows.
    g = np.asarray(grad)
    for b in (0, 1, 3, 4):
        live = _LIVE_POS if adv[b] > 0 else _LIVE_NEG
        dead = [t for t in range(T) if t not in live]
        assert (g[b, live] != 0).all() and (g[b, dead] == 0).all(), (b, g[b])
    assert (g[2] == 0).all() and (g[5] == 0).all()


@pytest.mark.parametrize("estimator", ["low_var_kl", "k1", "k2", "abs"])
def test_kl_gradient_matches_analytic(estimator):
    rng = np.random.default_rng(13)
    B, T = B0, T0
    logp = -rng.uniform(0.2, 2.0, size=(B, T)).astype(np.float32)
    ref = (logp + rng.normal(0, 0.7, size=(B, T))).astype(np.float32)
    mask = np.ones((B, T), np.float32)
    mask[1, 3:] = 0.0
    coef = 0.3
    # Zero advantages isolate the KL term's gradient.
    grad = jax.grad(lambda lp: grpo.policy_loss(
        lp, jnp.asarray(logp), jnp.asarray(ref), jnp.zeros(B), jnp.asarray(mask),
        kl_coef=coef, kl_estimator=estimator)[0])(jnp.asarray(logp))
    d = logp.astype(np.float64) - ref
    dkl = {"low_var_kl": 1.0 - np.exp(-d), "k1": np.ones_like(d), "k2": d, "abs": np.sign(d)}[estimator]
    want = coef * dkl * mask / mask.sum()
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-5, atol=1e-7)


def test_gradient_finite_differences():
    rng = np.random.default_rng(14)
    B, T = B0, T0
    logp = -rng.uniform(0.5, 1.5, size=(B, T))
    old = logp + rng.normal(0, 0.05, size=(B, T))  # stay inside the clip range (smooth)
    ref = logp + rng.normal(0, 0.3, size=(B, T))
    adv = np.array([0.9, -1.1, 0.4, 0.0, -0.3, 2.0])
    mask = np.ones((B, T))
    mask[2, 2:] = 0
    mask[4] = 0

    def f64(lp):
        return ref_policy_loss(lp, old, ref, adv, mask, kl_coef=0.2, kl_estimator="k3", agg="seq-mean-token-mean")[0]

    grad = np.asarray(jax.grad(lambda lp: grpo.policy_loss(
        lp, jnp.asarray(old, jnp.float32), jnp.asarray(ref, jnp.float32), jnp.asarray(adv, jnp.float32),
        jnp.asarray(mask, jnp.float32), kl_coef=0.2, kl_estimator="k3", agg="seq-mean-token-mean")[0])(
        jnp.asarray(logp, jnp.float32)))
    h = 1e-5
    fd = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            e = np.zeros((B, T))
            e[b, t] = h
            fd[b, t] = (f64(logp + e) - f64(logp - e)) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-6)
