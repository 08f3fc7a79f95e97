"""The GRPO loop: sample G responses per prompt, reward, advantages, update; checkpoint, resume.

Both MedSSR stages run through `run_grpo`: stage 1 with rewards against the
majority-vote pseudo-label, stage 2 against the gold answer. Everything a
step consumes is a function of (seed, step): the data order is a per-epoch
permutation drawn from the seed, the sampling key folds in the step, so a
resumed run needs only the parameters, the optimizer state and the step to
continue exactly where an uninterrupted run would be.

Devices and processes: the policy trains on one mesh (see `run_grpo`). In a
run of several processes every process calls `run_grpo` with the same
arguments; sampling is one global computation whose completions every
process receives, each process then scores and packs only the rows of the
batch that its own devices hold (host-local data sharding) and contributes
them to the global batch; checkpoints are written by all processes together
(orbax), metrics and log lines by process 0 only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from medssr_jax import multihost
from medssr_jax.metrics import MetricsWriter
from medssr_jax.sampler import Completion, generate
from medssr_jax.sharding import make_mesh
from models.checkpoint import shard_model
from models.transformer import Transformer
from rl import grpo
from rl.train_step import (Batch, LossConfig, OptimConfig, TrainState, init_train_state,
                           make_optimizer, sequence_logprobs, train_step)


@dataclasses.dataclass(frozen=True)
class RLConfig:
    steps: int = 10
    prompts_per_step: int = 128
    num_generations: int = 8
    max_new_tokens: int = 3072
    max_prompt_len: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    scale_by_std: bool = True
    seed: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    sampler_chunk: int = 128
    peak_flops: float | None = None  # for MFU; None leaves MFU out
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()


@dataclasses.dataclass(frozen=True)
class RLItem:
    """One prompt of the RL data: its token ids and the label its reward checks."""
    id: str
    prompt_tokens: tuple[int, ...]
    label: Any


RewardFn = Callable[[RLItem, Completion], float]


class NonFiniteError(RuntimeError):
    pass


def batch_indices(num_items: int, step: int, per_step: int, seed: int) -> np.ndarray:
    """Items of `step`: consecutive slices of per-epoch permutations drawn from the seed."""
    out = []
    start = step * per_step
    while len(out) < per_step:
        epoch, offset = divmod(start + len(out), num_items)
        order = np.random.default_rng([seed, epoch]).permutation(num_items)
        out.extend(order[offset:offset + per_step - len(out)].tolist())
    return np.asarray(out)


def pack_rollouts(items: Sequence[RLItem], groups: Sequence[Sequence[Completion]], max_prompt_len: int,
                  max_new_tokens: int, pad_id: int) -> dict[str, np.ndarray]:
    """Rows of left-padded prompt + right-padded response with static shapes."""
    return pack_rows([(item, c) for item, g in zip(items, groups) for c in g], max_prompt_len,
                     max_new_tokens, pad_id)


def pack_rows(rows: Sequence[tuple[RLItem, Completion]], max_prompt_len: int, max_new_tokens: int,
              pad_id: int) -> dict[str, np.ndarray]:
    """`pack_rollouts` for given (item, completion) rows, e.g. this process's share of a batch."""
    b = len(rows)
    tokens = np.full((b, max_prompt_len + max_new_tokens), pad_id, np.int32)
    attn = np.zeros_like(tokens, dtype=bool)
    resp_mask = np.zeros((b, max_new_tokens), np.float32)
    old = np.zeros((b, max_new_tokens), np.float32)
    for i, (item, c) in enumerate(rows):
        p = list(item.prompt_tokens)
        if len(p) > max_prompt_len:
            raise ValueError(f"item {item.id!r}: prompt has {len(p)} tokens > max_prompt_len={max_prompt_len}")
        tokens[i, max_prompt_len - len(p):max_prompt_len] = p
        attn[i, max_prompt_len - len(p):max_prompt_len] = True
        n = len(c.tokens)
        tokens[i, max_prompt_len:max_prompt_len + n] = c.tokens
        attn[i, max_prompt_len:max_prompt_len + n] = True
        resp_mask[i, :n] = 1.0
        old[i, :n] = c.logprobs
    return dict(tokens=tokens, attention_mask=attn, response_mask=resp_mask, old_logp=old)


class Checkpointer:
    """Orbax CheckpointManager over the train state's leaves (async where supported)."""

    def __init__(self, directory: str | os.PathLike, every: int, keep: int):
        import orbax.checkpoint as ocp
        self._ocp = ocp
        self.every = every
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1,
                                                 enable_async_checkpointing=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, force: bool = False) -> None:
        if force or step % self.every == 0:
            leaves = {str(i): x for i, x in enumerate(jax.tree.leaves(state))}
            self.manager.save(step, args=self._ocp.args.StandardSave(leaves), force=True)

    def restore(self, step: int, like: TrainState) -> TrainState:
        leaves, treedef = jax.tree.flatten(like)
        abstract = {str(i): jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                    for i, x in enumerate(leaves)}
        restored = self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract))
        return jax.tree.unflatten(treedef, [restored[str(i)] for i in range(len(leaves))])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def training_mesh(model: Transformer, mesh: Mesh | None = None) -> Mesh | None:
    """The mesh GRPO trains on: `mesh`, else the model's own, else (more than one device
    visible, as in any run of several processes) an FSDP mesh (1, all, 1) over every
    device; None for a single device."""
    if mesh is not None:
        return mesh
    if getattr(model, "mesh", None) is not None:
        return model.mesh
    return make_mesh(1, -1, 1) if jax.device_count() > 1 else None


class _RowPlacement:
    """Where the rows of a training batch live: sharded over the mesh's data axes when they
    divide the rows, else replicated; `rows` are the ones this process builds."""

    def __init__(self, mesh: Mesh | None, num_rows: int):
        self.num_rows = num_rows
        if mesh is None:
            self.sharding = None
            self.rows = np.arange(num_rows)
            return
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        spec = PartitionSpec(("data", "fsdp")) if num_rows % shards == 0 else PartitionSpec()
        self.sharding = NamedSharding(mesh, spec)
        self.rows = multihost.local_rows(self.sharding, (num_rows,))

    def put(self, local: np.ndarray) -> jax.Array:
        """The global [num_rows, ...] array of which `local` holds this process's rows."""
        if self.sharding is None:
            return jnp.asarray(local)
        return multihost.global_from_local_rows(local, self.sharding, (self.num_rows, *local.shape[1:]))


def run_grpo(model: Transformer, items: Sequence[RLItem], reward_fn: RewardFn, cfg: RLConfig,
             workdir: str | os.PathLike, *, ref_model: Transformer | None = None,
             eos_ids: Sequence[int] | None = None, pad_id: int = 0, mesh: Mesh | None = None,
             on_step_end: Callable[[int, dict], None] | None = None,
             log: Callable[[str], None] | None = None) -> tuple[Transformer, list[dict]]:
    """Train `model` with GRPO for cfg.steps steps, resuming from `workdir` if it holds checkpoints.

    Returns the trained model (same graph, new parameters) and the per-step metrics.
    A step whose loss or gradient is not finite raises NonFiniteError; the
    checkpoints already written are left as they were.

    The policy trains on `training_mesh(model, mesh)`; parameters not yet on it
    (the policy's and the reference model's) are moved there in place. With
    several processes every process calls this with the same arguments; `log`
    and the metrics files are used by process 0 only.
    """
    if not items:
        raise ValueError("no RL items")
    if cfg.prompts_per_step < 1 or cfg.num_generations < 1:
        raise ValueError("prompts_per_step and num_generations must be >= 1")
    use_ref = cfg.loss.kl_coef != 0
    if use_ref and ref_model is None:
        raise ValueError("kl_coef != 0 needs a reference model")
    for item in items:  # checked up front: a process must not fail alone on its share of a batch
        if len(item.prompt_tokens) > cfg.max_prompt_len:
            raise ValueError(f"item {item.id!r}: prompt has {len(item.prompt_tokens)} tokens > "
                             f"max_prompt_len={cfg.max_prompt_len}")
    main = jax.process_index() == 0
    log = (log or (lambda s: print(s, file=sys.stderr, flush=True))) if main else (lambda s: None)
    workdir = Path(workdir)
    mesh = training_mesh(model, mesh)
    for m in (model, ref_model):
        if m is not None and mesh is not None and m.mesh != mesh:
            shard_model(m, mesh)
    placement = _RowPlacement(mesh, cfg.prompts_per_step * cfg.num_generations)
    tx = make_optimizer(cfg.optim)
    graphdef, state = init_train_state(model, tx)
    ref = nnx.split(ref_model, nnx.Param) if use_ref else None
    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint_every, cfg.keep_checkpoints)
    start = ckpt.latest_step() or 0
    if start:
        state = ckpt.restore(start, state)
        log(f"resumed from step {start} in {workdir / 'checkpoints'}")
    writer = MetricsWriter(workdir / "metrics")
    # a resumed run returns the whole history: steps up to the checkpoint from the metrics file
    history: list[dict] = earlier_history(workdir / "metrics" / "metrics.jsonl", start) if start else []
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            idx = batch_indices(len(items), step, cfg.prompts_per_step, cfg.seed)
            batch_items = [items[i] for i in idx]
            policy = nnx.merge(graphdef, state.params)
            gen = generate(policy, [it.prompt_tokens for it in batch_items], n=cfg.num_generations,
                           max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                           top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed * 1_000_003 + step,
                           eos_ids=eos_ids, pad_id=pad_id, chunk_size=cfg.sampler_chunk, progress=False)
            t_sample = time.perf_counter() - t0
            # every process holds all completions; it scores and packs only its own rows
            rows = [(it, c) for it, g in zip(batch_items, gen) for c in g]
            mine = [rows[r] for r in placement.rows]
            local_rewards = np.asarray([reward_fn(it, c) for it, c in mine], np.float32)
            rewards = multihost.host_array(placement.put(local_rewards))
            adv = np.asarray(grpo.compute_advantages(jnp.asarray(rewards), cfg.num_generations,
                                                     scale_by_std=cfg.scale_by_std))
            packed = pack_rows(mine, cfg.max_prompt_len, cfg.max_new_tokens, pad_id)
            tokens, attention_mask = placement.put(packed["tokens"]), placement.put(packed["attention_mask"])
            t1 = time.perf_counter()
            ref_logp = None
            if use_ref:
                ref_logp = sequence_logprobs(ref[0], ref[1], tokens, attention_mask,
                                             response_len=cfg.max_new_tokens,
                                             temperature=cfg.loss.temperature,
                                             chunk=cfg.loss.logprob_chunk)
            t_ref = time.perf_counter() - t1
            batch = Batch(tokens, attention_mask, placement.put(packed["response_mask"]),
                          placement.put(packed["old_logp"]), ref_logp, placement.put(adv[placement.rows]))
            t2 = time.perf_counter()
            state, metrics = train_step(graphdef, state, batch, tx=tx, cfg=cfg.loss)
            metrics = {k: float(multihost.host_array(v)) for k, v in metrics.items()}
            t_update = time.perf_counter() - t2
            if not metrics.pop("finite"):
                raise NonFiniteError(
                    f"step {step}: loss={metrics['loss']} grad_norm={metrics['grad_norm']} is not finite; "
                    f"stopped before updating. Last checkpoint: step {ckpt.latest_step()} in "
                    f"{workdir / 'checkpoints'}")
            grouped = rewards.reshape(-1, cfg.num_generations)
            lengths = np.asarray([len(c.tokens) for _, c in rows], np.float32)
            train_tokens = float(sum(len(it.prompt_tokens) + len(c.tokens) for it, c in rows))
            row = dict(
                reward_mean=float(rewards.mean()), reward_std=float(rewards.std()),
                accuracy=float((rewards > 0).mean()),
                zero_variance_groups=float((grouped.max(1) == grouped.min(1)).mean()),
                response_length=float(lengths.mean()),
                sample_tokens_per_s=float(lengths.sum() / max(t_sample, 1e-9)),
                train_tokens_per_s=train_tokens / max(t_update, 1e-9),
                time_sample=t_sample, time_ref_logprobs=t_ref, time_update=t_update,
                time_step=time.perf_counter() - t0, **metrics)
            if cfg.peak_flops:
                row["mfu"] = 6 * n_params * train_tokens / max(t_update, 1e-9) / cfg.peak_flops
            writer.write(step + 1, row)
            history.append(dict(step=step + 1, **row))
            log(f"step {step + 1}/{cfg.steps}  reward {row['reward_mean']:.3f}  kl {row.get('kl', 0):.4f}  "
                f"clip {row['pg_clipfrac']:.3f}  len {row['response_length']:.0f}  "
                f"{row['time_step']:.1f}s (sample {t_sample:.1f}s, update {t_update:.1f}s)")
            ckpt.save(step + 1, state, force=step + 1 == cfg.steps)
            if on_step_end is not None:
                on_step_end(step + 1, row)
    finally:
        ckpt.close()
        writer.close()
    return nnx.merge(graphdef, state.params), history


def earlier_history(path: str | os.PathLike, upto: int) -> list[dict]:
    """The metric rows of steps 1..`upto` recorded by earlier runs (the last record of each
    step, in step order); a line cut short by a kill is ignored."""
    rows: dict[int, dict] = {}
    path = Path(path)
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and 1 <= int(row.get("step", 0)) <= upto:
                rows[int(row["step"])] = row
    return [rows[s] for s in sorted(rows)]


def option_letter_reward(decode: Callable[[Sequence[int]], str], options: str = "ABCDE") -> RewardFn:
    """1.0 when the extracted option letter of the decoded response equals item.label."""
    from medssr_jax.answers import option_reward

    def reward(item: RLItem, completion: Completion) -> float:
        return option_reward(decode(completion.tokens), item.label, options)
    return reward

