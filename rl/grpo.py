"""GRPO math: group-relative advantages, the clipped policy loss with a KL penalty.

The formulas follow verl (``verl/trainer/ppo/core_algos.py``): the GRPO outcome
advantage, the vanilla PPO policy loss with dual clip, ``kl_penalty`` and
``agg_loss``. Everything here is a pure function of arrays, written without Python
control flow on traced values, so it can be used under ``jax.jit``, ``jax.grad``,
``jax.vmap`` and ``jax.lax.scan``. String and integer options (aggregation mode,
KL estimator, group size, response length) are static Python values.

Micro-batching. A loss is ``numerator / denominator`` where both are sums over the
rows of the batch (see :func:`aggregate_terms`). For a mini-batch split into
micro-batches ``k``, ``sum_k numerator_k / D == loss(full mini-batch)`` where
``D = loss_denominator(full_mask, agg) == sum_k denominator_k``. A train step
therefore computes ``D`` once for the whole mini-batch, uses ``numerator_k / D`` as
the loss of micro-batch ``k`` and sums the gradients; the result is the gradient of
the one-big-batch loss (up to float summation order).

Shapes: ``B`` responses, ``T`` response tokens per row (right padded), ``V`` vocab.
"""

from __future__ import annotations

from typing import Literal, Mapping

import jax
import jax.numpy as jnp

__all__ = [
    "AggMode",
    "KLEstimator",
    "AGG_MODES",
    "KL_ESTIMATORS",
    "compute_advantages",
    "broadcast_to_tokens",
    "token_logprobs",
    "entropy_from_logits",
    "kl_penalty",
    "aggregate_terms",
    "aggregate",
    "loss_denominator",
    "policy_loss_terms",
    "accumulate_metric_sums",
    "finalize_metrics",
    "policy_loss",
]

AggMode = Literal[
    "token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"
]
KLEstimator = Literal["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"]

AGG_MODES: tuple[str, ...] = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
KL_ESTIMATORS: tuple[str, ...] = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")

# verl clamps the log-ratio before exp() and the k3 estimate afterwards.
_LOG_RATIO_CLAMP = 20.0
_LOW_VAR_KL_CLAMP = 10.0

# Metrics reduced with min / max instead of a sum when micro-batches are combined.
_MIN_KEYS = ("ratio_min",)
_MAX_KEYS = ("ratio_max",)


# --------------------------------------------------------------------------- advantages


def compute_advantages(
    rewards: jax.Array,
    group_size: int,
    *,
    eps: float = 1e-6,
    scale_by_std: bool = True,
) -> jax.Array:
    """GRPO outcome advantages, one scalar per response.

    ``rewards`` has shape ``[N * G]`` in group-major order: group ``i`` is rows
    ``i*G .. i*G + G - 1`` (``G = group_size``). Per group, with ``mean`` and the
    unbiased standard deviation ``std = sqrt(sum_j (r_j - mean)^2 / (G - 1))``
    (``torch.std`` / ``ddof=1``)::

        A_j = (r_j - mean) / (std + eps)      if scale_by_std      (GRPO)
        A_j =  r_j - mean                     otherwise            (Dr.GRPO)

    Singleton groups (``group_size == 1``): as in verl, ``mean = 0`` and ``std = 1``,
    so ``A_j = r_j / (1 + eps)`` (or ``r_j`` without scaling).

    Groups whose rewards are all equal get ``A_j = 0`` exactly. (verl computes
    ``r_j - mean`` in floating point, where ``mean`` of identical values can be off by
    an ulp and is then divided by ``0 + eps``; here such groups are detected with
    ``max == min`` and set to zero.)

    Returns float32 ``[N * G]``; use :func:`broadcast_to_tokens` for a ``[B, T]`` view.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    r = jnp.asarray(rewards, jnp.float32)
    if r.ndim != 1 or r.shape[0] % group_size:
        raise ValueError(f"rewards must be [N*{group_size}], got shape {r.shape}")
    if group_size == 1:
        return r / (1.0 + eps) if scale_by_std else r

    g = r.reshape(-1, group_size)
    mean = jnp.mean(g, axis=1, keepdims=True)
    constant = jnp.max(g, axis=1, keepdims=True) == jnp.min(g, axis=1, keepdims=True)
    centred = jnp.where(constant, 0.0, g - mean)
    if scale_by_std:
        std = jnp.sqrt(jnp.sum(centred * centred, axis=1, keepdims=True) / (group_size - 1))
        centred = centred / (std + eps)
    return centred.reshape(-1)


def broadcast_to_tokens(advantages: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-token advantages ``A[b, t] = advantages[b] * mask[b, t]``, float32 ``[B, T]``."""
    adv = jnp.asarray(advantages, jnp.float32)
    return adv[:, None] * jnp.asarray(mask, jnp.float32)


# --------------------------------------------------------------------------- log-probs


def token_logprobs(
    logits: jax.Array, tokens: jax.Array, temperature: float = 1.0
) -> jax.Array:
    """Log-probability of each token: ``log_softmax(logits / temperature)[..., tokens]``.

    ``logits`` ``[..., V]``, ``tokens`` integer ``[...]``. Computed in float32 as
    ``z[tok] - logsumexp(z)`` with ``z = logits / temperature``, which gathers one entry
    instead of materialising the full log-softmax. Returns float32 ``[...]``.
    """
    z = jnp.asarray(logits).astype(jnp.float32) / temperature
    picked = jnp.take_along_axis(z, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(z, axis=-1)


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    """Categorical entropy ``H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v``.

    ``logits`` ``[..., V]`` (already divided by the sampling temperature, if any);
    returns float32 ``[...]``.
    """
    z = jnp.asarray(logits).astype(jnp.float32)
    p = jax.nn.softmax(z, axis=-1)
    return jax.nn.logsumexp(z, axis=-1) - jnp.sum(p * z, axis=-1)


# --------------------------------------------------------------------------- KL


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, estimator: str = "low_var_kl") -> jax.Array:
    """Per-token KL(pi || pi_ref) estimate from sampled-token log-probs (verl ``kl_penalty``).

    With ``kl = logp - ref_logp``:

    * ``"kl"`` / ``"k1"``: ``kl``
    * ``"abs"``: ``|kl|``
    * ``"mse"`` / ``"k2"``: ``0.5 * kl^2``
    * ``"low_var_kl"`` / ``"k3"``: ``k = clip(ref_logp - logp, -20, 20)``,
      ``clip(exp(k) - k - 1, -10, 10)``
    """
    logp = jnp.asarray(logp, jnp.float32)
    ref_logp = jnp.asarray(ref_logp, jnp.float32)
    if estimator in ("kl", "k1"):
        return logp - ref_logp
    if estimator == "abs":
        return jnp.abs(logp - ref_logp)
    if estimator in ("mse", "k2"):
        return 0.5 * jnp.square(logp - ref_logp)
    if estimator in ("low_var_kl", "k3"):
        k = jnp.clip(ref_logp - logp, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        kld = jnp.exp(k) - k - 1.0
        return jnp.clip(kld, -_LOW_VAR_KL_CLAMP, _LOW_VAR_KL_CLAMP)
    raise ValueError(f"unknown kl estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


# --------------------------------------------------------------------------- aggregation


def _check_agg(agg: str) -> None:
    if agg not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation {agg!r}; expected one of {AGG_MODES}")


def loss_denominator(mask: jax.Array, agg: str = "token-mean") -> jax.Array:
    """Denominator ``D`` of an aggregation over ``mask`` ``[B, T]``, float32 scalar.

    ``token-mean``: ``D = sum_{b,t} m[b,t]`` (token count). Sequence modes:
    ``D = #{b : sum_t m[b,t] > 0}`` (number of non-empty rows). Compute it on the full
    mini-batch and divide every micro-batch numerator by it.
    """
    _check_agg(agg)
    m = jnp.asarray(mask, jnp.float32)
    if agg == "token-mean":
        return jnp.sum(m)
    return jnp.sum((jnp.sum(m, axis=-1) > 0).astype(jnp.float32))


def aggregate_terms(
    values: jax.Array,
    mask: jax.Array,
    agg: str = "token-mean",
    *,
    max_response_len: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Sum form ``(numerator, denominator)`` of verl ``agg_loss``; ``loss = num / den``.

    ``values``, ``mask`` are ``[B, T]``; ``n_b = sum_t m[b,t]``, ``s_b = sum_t m[b,t] x[b,t]``,
    ``S = {b : n_b > 0}`` (rows with an empty mask are left out of every sequence mean)
    and ``L = max_response_len`` (default ``T``):

    * ``token-mean``: ``num = sum_b s_b``, ``den = sum_b n_b``
    * ``seq-mean-token-sum``: ``num = sum_{b in S} s_b``, ``den = |S|``
    * ``seq-mean-token-mean``: ``num = sum_{b in S} s_b / n_b``, ``den = |S|``
    * ``seq-mean-token-sum-norm`` (Dr.GRPO): ``num = sum_{b in S} s_b / L``, ``den = |S|``,
      i.e. the mean over sequences of ``s_b / L`` (current verl divides by the global
      batch size and ``loss_scale_factor``; older verl omitted the batch-size division).

    Both parts are sums over rows, so summing them over micro-batches gives the
    full-batch values. Values at masked-out positions are ignored (even NaN / inf).
    """
    _check_agg(agg)
    m = jnp.asarray(mask, jnp.float32)
    x = jnp.where(m != 0, jnp.asarray(values, jnp.float32), 0.0)
    masked = x * m
    if agg == "token-mean":
        return jnp.sum(masked), jnp.sum(m)
    seq_sum = jnp.sum(masked, axis=-1)
    seq_cnt = jnp.sum(m, axis=-1)
    nonempty = seq_cnt > 0
    if agg == "seq-mean-token-sum":
        per_seq = seq_sum
    elif agg == "seq-mean-token-mean":
        per_seq = seq_sum / jnp.where(nonempty, seq_cnt, 1.0)
    else:  # seq-mean-token-sum-norm
        length = m.shape[-1] if max_response_len is None else max_response_len
        if length <= 0:
            raise ValueError(f"max_response_len must be positive, got {length}")
        per_seq = seq_sum / float(length)
    num = jnp.sum(jnp.where(nonempty, per_seq, 0.0))
    den = jnp.sum(nonempty.astype(jnp.float32))
    return num, den


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den`` where ``den > 0``, else 0 (an empty batch contributes no loss)."""
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def aggregate(
    values: jax.Array,
    mask: jax.Array,
    agg: str = "token-mean",
    *,
    max_response_len: int | None = None,
) -> jax.Array:
    """verl ``agg_loss``: ``num / den`` from :func:`aggregate_terms`, 0 when ``den == 0``."""
    num, den = aggregate_terms(values, mask, agg, max_response_len=max_response_len)
    return _safe_div(num, den)


# --------------------------------------------------------------------------- policy loss


def policy_loss_terms(
    logp: jax.Array,
    old_logp: jax.Array,
    ref_logp: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
    kl_coef: float | jax.Array = 0.005,
    kl_estimator: str = "low_var_kl",
    agg: str = "token-mean",
    logits: jax.Array | None = None,
    max_response_len: int | None = None,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Sum form of the GRPO loss: ``(numerator, denominator, metric_sums)``.

    ``logp``, ``old_logp``, ``ref_logp``, ``mask``: ``[B, T]`` (mask float or bool);
    ``advantages``: ``[B]`` (one per response) or ``[B, T]``. Per token (verl vanilla
    PPO loss with dual clip)::

        ratio = exp(clip(logp - old_logp, -20, 20))
        pg1   = -A * ratio
        pg2   = -A * clip(ratio, 1 - clip_low, 1 + clip_high)
        clip_pg  = max(pg1, pg2)
        pg3   = -A * dual_clip
        clip_pg2 = min(pg3, clip_pg)
        pg    = where(A < 0, clip_pg2, clip_pg)        (pg = clip_pg if dual_clip is None)
        loss  = agg(pg) + kl_coef * agg(kl_penalty(logp, ref_logp, kl_estimator))

    with ``agg`` from :func:`aggregate_terms`. The KL term is left out (and ``ref_logp``
    may be ``None``) when ``ref_logp is None`` or ``kl_coef`` is the Python number 0.
    Since both terms share the denominator, ``numerator = num(pg) + kl_coef * num(kl)``
    and ``loss = numerator / denominator``.

    ``metric_sums`` holds row sums that :func:`accumulate_metric_sums` combines over
    micro-batches and :func:`finalize_metrics` turns into the metrics of
    :func:`policy_loss`. ``logits`` ``[B, T, V]`` (temperature-scaled) adds the entropy.
    """
    _check_agg(agg)
    if clip_low < 0 or clip_high < 0:
        raise ValueError("clip_low and clip_high must be >= 0")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1.0 (verl clip_ratio_c), got {dual_clip}")

    m = jnp.asarray(mask, jnp.float32)
    valid = m != 0
    # Masked-out positions may hold padding garbage (inf / NaN); zero them before any
    # arithmetic so neither the loss nor its gradient can pick them up.
    logp = jnp.where(valid, jnp.asarray(logp, jnp.float32), 0.0)
    old_logp = jnp.where(valid, jnp.asarray(old_logp, jnp.float32), 0.0)
    adv = jnp.asarray(advantages, jnp.float32)
    if adv.ndim == 1:
        adv = adv[:, None]
    adv = jnp.where(valid, jnp.broadcast_to(adv, m.shape), 0.0)

    neg_approx_kl = jnp.clip(logp - old_logp, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = jnp.exp(neg_approx_kl)
    pg1 = -adv * ratio
    pg2 = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    clip_pg = jnp.maximum(pg1, pg2)
    negative = adv < 0
    if dual_clip is None:
        pg = clip_pg
        lower = jnp.zeros_like(clip_pg)
    else:
        pg3 = -adv * dual_clip
        pg = jnp.where(negative, jnp.minimum(pg3, clip_pg), clip_pg)
        lower = ((clip_pg > pg3) & negative).astype(jnp.float32)

    pg_num, den = aggregate_terms(pg, m, agg, max_response_len=max_response_len)
    numerator = pg_num

    use_kl = ref_logp is not None and not (
        isinstance(kl_coef, (int, float)) and float(kl_coef) == 0.0
    )
    if ref_logp is not None:
        ref = jnp.where(valid, jnp.asarray(ref_logp, jnp.float32), 0.0)
        kl_tok = kl_penalty(logp, ref, kl_estimator)
        kl_num, _ = aggregate_terms(kl_tok, m, agg, max_response_len=max_response_len)
        if use_kl:
            numerator = numerator + kl_coef * kl_num
    else:
        kl_num = jnp.zeros((), jnp.float32)

    def tok_sum(x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.where(valid, x * m, 0.0))

    sums: dict[str, jax.Array] = {
        "loss": numerator,
        "pg_loss": pg_num,
        "kl": kl_num,
        "denominator": den,
        "n_tokens": jnp.sum(m),
        "pg_clipfrac": tok_sum((pg2 > pg1).astype(jnp.float32)),
        "pg_clipfrac_lower": tok_sum(lower),
        "ppo_kl": tok_sum(-neg_approx_kl),
        "ratio_mean": tok_sum(ratio),
        "ratio_min": jnp.min(jnp.where(valid, ratio, jnp.inf)),
        "ratio_max": jnp.max(jnp.where(valid, ratio, -jnp.inf)),
    }
    if logits is not None:
        # A metric only: no gradient flows through it.
        sums["entropy"] = tok_sum(jax.lax.stop_gradient(entropy_from_logits(logits)))
    return numerator, den, sums


def accumulate_metric_sums(
    acc: Mapping[str, jax.Array], new: Mapping[str, jax.Array]
) -> dict[str, jax.Array]:
    """Combine two ``metric_sums`` dicts: ``ratio_min`` by min, ``ratio_max`` by max, rest by +."""
    out: dict[str, jax.Array] = {}
    for k, v in acc.items():
        if k in _MIN_KEYS:
            out[k] = jnp.minimum(v, new[k])
        elif k in _MAX_KEYS:
            out[k] = jnp.maximum(v, new[k])
        else:
            out[k] = v + new[k]
    return out


def finalize_metrics(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Scalar metrics from (accumulated) ``metric_sums``.

    ``loss``, ``pg_loss``, ``kl``: aggregated like the loss (``sum / denominator``; ``kl``
    is the un-weighted KL term, reported whenever ``ref_logp`` was given). Token metrics
    are masked means (``sum / n_tokens``): ``pg_clipfrac = mean(pg2 > pg1)``,
    ``pg_clipfrac_lower = mean((clip_pg > pg3) & (A < 0))``, ``ppo_kl = mean(old_logp -
    logp)``, ``ratio_mean``, ``entropy``; plus masked ``ratio_min`` / ``ratio_max``.
    Every metric is 0 when there is no valid token (never NaN or inf).
    """
    den = sums["denominator"]
    n = sums["n_tokens"]
    out: dict[str, jax.Array] = {}
    for k, v in sums.items():
        if k in ("denominator", "n_tokens"):
            continue
        if k in ("loss", "pg_loss", "kl"):
            out[k] = _safe_div(v, den)
        elif k in _MIN_KEYS or k in _MAX_KEYS:
            out[k] = jnp.where(n > 0, v, 0.0)
        else:
            out[k] = _safe_div(v, n)
    out["n_tokens"] = n
    return out


def policy_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    ref_logp: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
    kl_coef: float | jax.Array = 0.005,
    kl_estimator: str = "low_var_kl",
    agg: str = "token-mean",
    logits: jax.Array | None = None,
    max_response_len: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO loss ``numerator / denominator`` (0 for an all-empty mask) and its metrics.

    See :func:`policy_loss_terms` for the formula and :func:`finalize_metrics` for the
    metrics. Returns ``(loss, metrics)``, all float32 scalars.
    """
    num, den, sums = policy_loss_terms(
        logp,
        old_logp,
        ref_logp,
        advantages,
        mask,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        agg=agg,
        logits=logits,
        max_response_len=max_response_len,
    )
    return _safe_div(num, den), finalize_metrics(sums)
