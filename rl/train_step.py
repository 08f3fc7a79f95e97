"""The jitted GRPO update: remat forward, fused response logprobs, loss, accumulated grads, AdamW.

Two batch layouts:

- `Batch`: unpacked rows of prompt (left-padded to Sp) + response (right-padded
  to R), L = Sp + R; fixed micro-batches of `micro_batch_size` rows in a
  `lax.scan`.
- `PackedBatch` (rl/packing.py, what the GRPO loop uses): sequences packed by
  length into rows of `pack_len` tokens with segment ids; a `fori_loop` over
  the batch's `num_micro` micro-batches (a traced count: no recompilation when
  it changes between steps).

Either way each micro-batch contributes numerator_k / D with D the loss
denominator of the whole mini-batch, so the summed gradient is exactly that of
the one big batch.

Precision: master weights and optimizer state in `param_dtype` (fp32 by
default); the matrices are cast to the model's compute dtype once per step,
before the micro-batch loop (`compute_params`); logits, log-softmax and the loss
in fp32, through the fused LM head (rl/logprobs.py) that never holds [B, T, V]
logits. A step whose loss or gradient norm is not finite skips the optimizer
update through `lax.cond` (the state passes through untouched, no select over
every leaf). Parameters and optimizer state keep the model's logical-axis
sharding (FSDP over "fsdp", heads/MLP over "tensor"); the batch is sharded over
("data", "fsdp").
"""


import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from models.transformer import Transformer, forward_hidden, unembed_weights
from rl import grpo
from rl.logprobs import token_logprobs
from rl.packing import PackedBatch


# The configs are plain (settable) dataclasses so that ml_collections' config flags can set
# nested fields from the command line; they hash by value because the jitted step takes the
# LossConfig as a static argument. Code never changes one after parsing (dataclasses.replace).
@dataclasses.dataclass(unsafe_hash=True)
class OptimConfig:
    learning_rate: float = 3e-6
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    warmup_ratio: float = 0.1
    total_steps: int | None = None  # schedule length; None: the stage's steps (RLConfig.resolved)
    grad_clip: float = 1.0
    schedule: str = "cosine"  # "cosine" (linear warmup, cosine to 0) or "constant" (warmup, then flat)


@dataclasses.dataclass(unsafe_hash=True)
class LossConfig:
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = 3.0
    kl_coef: float = 0.005
    kl_estimator: str = "low_var_kl"
    agg: str = "token-mean"
    # logits are divided by the rollout temperature, as in verl; None: the rollout temperature
    # (RLConfig.resolved), 1.0 where the step is used on its own
    temperature: float | None = None
    micro_batch_size: int = 8
    logprob_chunk: int = 256  # response tokens per logits chunk (the [*, V] logits never exist whole)
    max_segments: int = 32    # sequences per packed row at most (static shape of cuDNN's packed layout)

    @property
    def logit_temperature(self) -> float:
        return 1.0 if self.temperature is None else self.temperature


class Batch(NamedTuple):
    tokens: jax.Array          # [B, Sp + R] int32: left-padded prompt, then response
    attention_mask: jax.Array  # [B, Sp + R] bool
    response_mask: jax.Array   # [B, R] float: 1 on real response tokens
    old_logp: jax.Array        # [B, R]
    ref_logp: jax.Array | None  # [B, R] or None when kl_coef == 0
    advantages: jax.Array      # [B]


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    if cfg.schedule not in ("cosine", "constant"):
        raise ValueError(f"unknown lr schedule {cfg.schedule!r} (cosine, constant)")
    if cfg.total_steps is None or cfg.total_steps < 1:
        raise ValueError(f"OptimConfig.total_steps must be >= 1, got {cfg.total_steps} "
                         "(RLConfig.resolved() sets it from the stage's steps)")
    warmup = int(cfg.warmup_ratio * cfg.total_steps)
    if cfg.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, max(warmup, 0),
                                                max(cfg.total_steps, warmup + 1), 0.0)
    elif cfg.schedule == "constant":
        lr = (optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup),
                                    optax.constant_schedule(cfg.learning_rate)], [warmup])
              if warmup > 0 else optax.constant_schedule(cfg.learning_rate))
    else:
        raise ValueError(f"unknown lr schedule {cfg.schedule!r} (cosine, constant)")
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


def compute_params(graphdef, params):
    """The parameters as the forward uses them: matrices cast to the compute dtype once
    (outside any micro-batch loop), norms and the embedding table kept in their own
    precision (the embedding's scatter-add gradient then sums in fp32)."""
    dtype = nnx.merge(graphdef, params).config.jnp_dtype

    def cast(path, x):
        keep = x.ndim < 2 or "embed_vd" in jax.tree_util.keystr(path)
        return x if keep else x.astype(dtype)
    return jax.tree_util.tree_map_with_path(cast, params)


def response_logprobs(model: Transformer, tokens: jax.Array, attention_mask: jax.Array,
                      response_len: int, temperature: float, chunk: int,
                      with_entropy: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """Per-token logprobs [B, R] of the response part of unpacked rows (fp32).

    The unembedding + log-softmax is fused (rl.logprobs.token_logprobs): chunks of
    `chunk` tokens, its own VJP, no [B, R, V] logits in either pass.
    """
    hidden = forward_hidden(model, tokens, attention_mask)
    b, total = tokens.shape
    sp = total - response_len
    h = hidden[:, sp - 1:total - 1]          # positions that predict the response tokens
    targets = tokens[:, sp:]
    w = unembed_weights(model).astype(model.config.jnp_dtype)
    lp, ent = token_logprobs(h, w, targets, temperature, chunk)
    return lp, (ent if with_entropy else None)


def packed_logprobs(model: Transformer, tokens, positions, segment_ids, targets, temperature: float,
                    chunk: int, max_segments: int) -> tuple[jax.Array, jax.Array]:
    """(logprob of targets, entropy), both [Bm, L] fp32, for packed rows (rl.packing)."""
    hidden = forward_hidden(model, tokens, positions=positions, segment_ids=segment_ids,
                            max_segments=max_segments)
    w = unembed_weights(model).astype(model.config.jnp_dtype)
    return token_logprobs(hidden, w, targets, temperature, chunk)


def _split_micro(x, num_micro: int):
    return None if x is None else x.reshape(num_micro, x.shape[0] // num_micro, *x.shape[1:])


def loss_and_grads(graphdef, params, batch: Batch, cfg: LossConfig):
    """Sum of micro-batch gradients of numerator_k / D, and the finalized metrics."""
    b, r = batch.response_mask.shape
    mb = min(cfg.micro_batch_size, b)
    if b % mb:
        raise ValueError(f"mini-batch of {b} rows is not a multiple of micro_batch_size={mb}")
    num_micro = b // mb
    denominator = grpo.loss_denominator(batch.response_mask, cfg.agg)
    if cfg.kl_coef != 0 and batch.ref_logp is None:
        raise ValueError(f"kl_coef={cfg.kl_coef} needs reference logprobs (Batch.ref_logp is None)")
    use_ref = cfg.kl_coef != 0

    def micro_loss(p, micro: Batch):
        model = nnx.merge(graphdef, p)  # p: compute_params, cast once per step
        logp, ent = response_logprobs(model, micro.tokens, micro.attention_mask, r,
                                      cfg.logit_temperature, cfg.logprob_chunk, with_entropy=True)
        num, _, sums = grpo.policy_loss_terms(
            logp, micro.old_logp, micro.ref_logp if use_ref else None, micro.advantages,
            micro.response_mask, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
            dual_clip=cfg.dual_clip, kl_coef=cfg.kl_coef if use_ref else 0.0,
            kl_estimator=cfg.kl_estimator, agg=cfg.agg)
        m = micro.response_mask.astype(jnp.float32)
        sums["entropy"] = jnp.sum(ent * m)
        sums["logp_diff_abs"] = jnp.sum(jnp.where(m > 0, jnp.abs(logp - micro.old_logp), 0.0))
        return num / jnp.maximum(denominator, 1e-9), sums

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    micro_batches = Batch(*(_split_micro(x, num_micro) for x in batch))
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)
    cparams = compute_params(graphdef, params)

    def body(carry, micro):
        grads_acc, sums_acc = carry
        (_, sums), grads = grad_fn(cparams, micro)
        grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
        sums_acc = grpo.accumulate_metric_sums(sums_acc, sums)
        return (grads_acc, sums_acc), None

    first = jax.tree.map(lambda x: x[0], micro_batches)
    sums0 = _initial_sums(jax.eval_shape(grad_fn, cparams, first)[0][1])
    (grads, sums), _ = jax.lax.scan(body, (zeros, sums0), micro_batches)
    metrics = grpo.finalize_metrics(sums)
    metrics["entropy"] = sums["entropy"] / jnp.maximum(sums["n_tokens"], 1.0)
    metrics["logp_diff_abs"] = sums["logp_diff_abs"] / jnp.maximum(sums["n_tokens"], 1.0)
    return grads, metrics


def _initial_sums(shapes) -> dict:
    return {k: jnp.full(v.shape, jnp.inf if k == "ratio_min" else -jnp.inf if k == "ratio_max" else 0.0,
                        v.dtype) for k, v in shapes.items()}


def packed_loss_and_grads(graphdef, params, batch: PackedBatch, cfg: LossConfig):
    """`loss_and_grads` over packed micro-batches (rl.packing): a loop over the
    batch's `num_micro` micro-batches (a dynamic count, so no recompilation when it
    changes), each contributing (sum of weight * per-token loss) / D to the loss."""
    if cfg.kl_coef != 0 and batch.ref_logp is None:
        raise ValueError(f"kl_coef={cfg.kl_coef} needs reference logprobs (PackedBatch.ref_logp is None)")
    use_ref = cfg.kl_coef != 0
    denominator = batch.denominator
    weighted_only = cfg.agg != "token-mean"  # token-mean weights are the response mask itself

    def micro_loss(p, micro: PackedBatch):
        model = nnx.merge(graphdef, p)
        logp, ent = packed_logprobs(model, micro.tokens, micro.positions, micro.segment_ids,
                                    micro.targets, cfg.logit_temperature, cfg.logprob_chunk, cfg.max_segments)
        ref = micro.ref_logp if use_ref else None
        terms = functools.partial(
            grpo.policy_loss_terms, logp, micro.old_logp, ref, micro.advantages,
            clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip,
            kl_coef=cfg.kl_coef if use_ref else 0.0, kl_estimator=cfg.kl_estimator, agg="token-mean")
        num, _, weighted = terms(micro.loss_weight)
        sums = terms(micro.response_mask)[2] if weighted_only else dict(weighted)
        for k in ("loss", "pg_loss", "kl"):
            sums[k] = weighted[k]
        sums["denominator"] = jnp.zeros((), jnp.float32)
        m = micro.response_mask
        sums["entropy"] = jnp.sum(ent * m)
        sums["logp_diff_abs"] = jnp.sum(jnp.where(m > 0, jnp.abs(logp - micro.old_logp), 0.0))
        return num / jnp.maximum(denominator, 1e-9), sums

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    cparams = compute_params(graphdef, params)
    fields = batch._replace(num_micro=None, denominator=None)

    def micro_at(i):
        return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False), fields)

    def body(i, carry):
        grads_acc, sums_acc = carry
        (_, sums), grads = grad_fn(cparams, micro_at(i))
        grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
        return grads_acc, grpo.accumulate_metric_sums(sums_acc, sums)

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)
    sums0 = _initial_sums(jax.eval_shape(grad_fn, cparams, jax.eval_shape(micro_at, 0))[0][1])
    grads, sums = jax.lax.fori_loop(0, batch.num_micro, body, (zeros, sums0))
    sums["denominator"] = denominator
    metrics = grpo.finalize_metrics(sums)
    metrics["entropy"] = sums["entropy"] / jnp.maximum(sums["n_tokens"], 1.0)
    metrics["logp_diff_abs"] = sums["logp_diff_abs"] / jnp.maximum(sums["n_tokens"], 1.0)
    return grads, metrics


class TrainState(NamedTuple):
    params: Any      # nnx.State of the policy's parameters (master precision)
    opt_state: Any
    step: jax.Array


def _replicated_like(params) -> jax.sharding.Sharding:
    for x in jax.tree.leaves(params):
        if isinstance(x.sharding, NamedSharding):
            return NamedSharding(x.sharding.mesh, PartitionSpec())
    return jax.tree.leaves(params)[0].sharding


def init_train_state(model: Transformer, tx: optax.GradientTransformation) -> tuple[Any, TrainState]:
    """Split the policy's parameters and build the optimizer state next to them.

    Optimizer moments take their parameter's sharding, scalars (Adam's count, the
    step) are replicated. Every leaf is committed, like train_step's outputs: an
    uncommitted or differently placed input would make the second step compile again.
    """
    graphdef, params = nnx.split(model, nnx.Param)
    whole = _replicated_like(params)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    opt_shardings = optax.tree_utils.tree_map_params(
        tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, params), param_shardings,
        transform_non_params=lambda _: whole)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    # created on the devices, so a mesh that spans several processes needs no host transfer
    step = jax.jit(lambda: jnp.zeros((), jnp.int32), out_shardings=whole)()
    return graphdef, TrainState(params, opt_state, step)


def train_step(graphdef, state: TrainState, batch: Batch | PackedBatch, *,
               tx: optax.GradientTransformation, cfg: LossConfig) -> tuple[TrainState, dict]:
    """One GRPO update (jitted; the state is donated and comes back in the same shardings).

    `batch` is either unpacked rows (Batch, fixed micro-batches of cfg.micro_batch_size
    rows) or packed micro-batches (PackedBatch, see rl.packing).
    """
    shardings = tuple(x.sharding for x in jax.tree.leaves(state))
    return _train_step(graphdef, state, batch, tx=tx, cfg=cfg, state_shardings=shardings)


@functools.partial(jax.jit, static_argnames=("graphdef", "tx", "cfg", "state_shardings"),
                   donate_argnames=("state",))
def _train_step(graphdef, state: TrainState, batch, *, tx: optax.GradientTransformation,
                cfg: LossConfig, state_shardings: tuple) -> tuple[TrainState, dict]:
    if isinstance(batch, PackedBatch):
        grads, metrics = packed_loss_and_grads(graphdef, state.params, batch, cfg)
    else:
        grads, metrics = loss_and_grads(graphdef, state.params, batch, cfg)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["finite"] = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    keep = metrics["finite"]

    # A non-finite step leaves the state untouched (the loop stops on metrics["finite"]).
    # The branch not taken is not run, and the state's donated buffers pass through it.
    def update(operand):
        params, opt_state = operand
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = jax.lax.cond(keep, update, lambda operand: operand,
                                     (state.params, state.opt_state))
    new_state = TrainState(params, opt_state, state.step + keep.astype(jnp.int32))
    if any(isinstance(sh, NamedSharding) for sh in state_shardings):
        # Pin every output to its input's sharding: left to propagation, XLA may
        # re-shard replicated leaves (e.g. norm weights), and the next step recompiles.
        leaves, treedef = jax.tree.flatten(new_state)
        new_state = jax.tree.unflatten(treedef, [jax.lax.with_sharding_constraint(x, sh)
                                                 for x, sh in zip(leaves, state_shardings)])
    return new_state, metrics


train_step._cache_size = _train_step._cache_size  # compiled variants, for tests and debugging


@functools.partial(jax.jit, static_argnames=("graphdef", "response_len", "temperature", "chunk"))
def sequence_logprobs(graphdef, params, tokens, attention_mask, *, response_len: int,
                      temperature: float = 1.0, chunk: int = 256) -> jax.Array:
    """Response logprobs without gradients: reference model, or old logprobs off-policy."""
    model = nnx.merge(graphdef, compute_params(graphdef, params))
    return response_logprobs(model, tokens, attention_mask, response_len, temperature, chunk)[0]


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "chunk", "max_segments"))
def packed_sequence_logprobs(graphdef, params, batch: PackedBatch, *, temperature: float = 1.0,
                             chunk: int = 256, max_segments: int = 32) -> jax.Array:
    """Logprobs of `batch.targets` [M, Bm, L] without gradients, micro-batch by micro-batch
    in the packing of the update (the reference pass); entries past num_micro are 0."""
    model = nnx.merge(graphdef, compute_params(graphdef, params))

    def body(i, out):
        take = lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False)  # noqa: E731
        lp, _ = packed_logprobs(model, take(batch.tokens), take(batch.positions), take(batch.segment_ids),
                                take(batch.targets), temperature, chunk, max_segments)
        return jax.lax.dynamic_update_index_in_dim(out, lp, i, 0)

    out = jnp.zeros(batch.tokens.shape, jnp.float32)
    return jax.lax.fori_loop(0, batch.num_micro, body, out)
