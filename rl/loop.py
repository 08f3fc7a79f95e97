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

from medssr_jax import hostmem, multihost
from medssr_jax.multihost import global_from_host
from medssr_jax.metrics import MetricsWriter
from medssr_jax.sampler import Completion, generate
from medssr_jax.sharding import make_mesh
from models.checkpoint import shard_model
from models.transformer import Transformer
from rl import grpo
from rl.packing import PackedBatch, pack
from rl.plan import GRPOPlan, device_memory_bytes, plan_grpo
from rl.train_step import (LossConfig, OptimConfig, TrainState, compute_params, init_train_state,
                           make_optimizer, packed_sequence_logprobs, train_step)


@dataclasses.dataclass(unsafe_hash=True)  # settable for config flags, hashed by value (see OptimConfig)
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
    # memory plan (rl/plan.py): None lets the plan choose
    device_memory_gb: float | None = None   # per device; None: the backend's figure (host RAM on CPU)
    memory_fraction: float = 0.9            # share of device memory the plan may use
    prompts_per_call: int | None = None     # prompt groups per generate call
    rows_per_micro: int | None = None       # packed rows per update micro-batch (all devices)
    pack_len: int | None = None             # tokens per packed row; None: prompt + response, rounded up to 128
    # tokens per device of one update micro-batch at most; None: 32,768 on GPU/TPU, 1,024 on
    # CPU (CPU matmuls are efficient at that size and host memory is shared with everything else)
    micro_tokens_per_device: int | None = None
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()

    def resolved(self) -> "RLConfig":
        """The settings that follow others filled in: the loss's logit temperature is the
        rollout temperature and the lr schedule spans the stage's steps, unless set."""
        loss, optim = self.loss, self.optim
        if loss.temperature is None:
            loss = dataclasses.replace(loss, temperature=self.temperature)
        if optim.total_steps is None:
            optim = dataclasses.replace(optim, total_steps=self.steps)
        return dataclasses.replace(self, loss=loss, optim=optim)


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


def _leaf_names(path) -> list[str]:
    """The names along a leaf's path (DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey),
    without nnx's trailing `.value`."""
    names = [str(next((getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a)), k)) for k in path]
    if len(names) > 1 and names[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
        names = names[:-1]
    return names


def named_tree(tree) -> dict:
    """`tree` as nested dicts keyed by the names on its paths (parameter names, optax state
    fields such as mu / nu / count, tuple positions), without nnx's `.value` wrappers: the
    layout a checkpoint can be read in without the code that wrote it."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = _leaf_names(path)
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"checkpoint layout: {'/'.join(keys)} lies under a leaf")
        if keys[-1] in node:
            raise ValueError(f"checkpoint layout: two leaves named {'/'.join(keys)}")
        node[keys[-1]] = leaf
    return out


def _from_named(named: dict, like):
    """The inverse of named_tree: `named`'s leaves put back into `like`'s structure."""
    leaves = []
    for path, _ in jax.tree_util.tree_flatten_with_path(like)[0]:
        keys = _leaf_names(path)
        node = named
        for k in keys:
            node = node[k]
        leaves.append(node)
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


class Checkpointer:
    """Orbax CheckpointManager of the train state (async where supported), one composite
    per step with three named items: `params` (nested by parameter name), `opt_state` (by
    optax state field: mu, nu, count, ...) and `step`, so that a checkpoint reads with
    orbax alone, e.g. `ocp.StandardCheckpointer().restore(<dir>/<step>/params)`."""

    def __init__(self, directory: str | os.PathLike, every: int, keep: int):
        import orbax.checkpoint as ocp
        self._ocp = ocp
        self.every = every
        self.directory = Path(directory).absolute()
        # A run directory of an earlier version holds one unnamed item of numbered leaves per
        # step; it keeps that layout to its end (orbax's manager takes one layout per directory).
        self.numbered = self.directory.is_dir() and any(
            (d / "default").is_dir() for d in self.directory.iterdir() if d.name.isdigit())
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1,
                                                 enable_async_checkpointing=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    @staticmethod
    def _items(state: TrainState) -> dict:
        return {"params": named_tree(state.params), "opt_state": named_tree(state.opt_state),
                "step": {"step": state.step}}

    def save(self, step: int, state: TrainState, force: bool = False) -> None:
        if not (force or step % self.every == 0):
            return
        if self.numbered:
            args = self._ocp.args.StandardSave({str(i): x for i, x in enumerate(jax.tree.leaves(state))})
        else:
            args = self._ocp.args.Composite(**{k: self._ocp.args.StandardSave(v)
                                               for k, v in self._items(state).items()})
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, like: TrainState) -> TrainState:
        abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)  # noqa: E731
        if self.numbered:
            leaves, treedef = jax.tree.flatten(like)
            got = self.manager.restore(step, args=self._ocp.args.StandardRestore(
                {str(i): abstract(x) for i, x in enumerate(leaves)}))
            return jax.tree.unflatten(treedef, [got[str(i)] for i in range(len(leaves))])
        items = {k: jax.tree.map(abstract, v) for k, v in self._items(like).items()}
        got = self.manager.restore(step, args=self._ocp.args.Composite(
            **{k: self._ocp.args.StandardRestore(v) for k, v in items.items()}))
        return TrainState(params=_from_named(got["params"], like.params),
                          opt_state=_from_named(got["opt_state"], like.opt_state), step=got["step"]["step"])

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


def _host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def make_plan(model_cfg, cfg: RLConfig, mesh: Mesh | None, *, with_reference: bool,
              model_name: str | None = None) -> GRPOPlan:
    """The memory plan of a GRPO stage on `mesh` (rl/plan.py). Device memory: the
    config's device_memory_gb, else the backend's bytes_limit, else (CPU) host RAM
    divided over the local devices."""
    shape = (1, 1, 1) if mesh is None else (mesh.shape["data"], mesh.shape["fsdp"], mesh.shape["tensor"])
    if cfg.device_memory_gb is not None:
        device_bytes = cfg.device_memory_gb * 1e9
    else:
        device_bytes = device_memory_bytes() or _host_memory_bytes() // max(jax.local_device_count(), 1)
    cap = cfg.micro_tokens_per_device or (1024 if jax.default_backend() == "cpu" else 32_768)
    return plan_grpo(model_cfg, prompts_per_step=cfg.prompts_per_step, num_generations=cfg.num_generations,
                     max_prompt_len=cfg.max_prompt_len, max_new_tokens=cfg.max_new_tokens, mesh_shape=shape,
                     device_bytes=device_bytes, kl_coef=cfg.loss.kl_coef if with_reference else 0.0,
                     logprob_chunk=cfg.loss.logprob_chunk, memory_fraction=cfg.memory_fraction,
                     pack_len=cfg.pack_len, rows_per_micro=cfg.rows_per_micro,
                     prompts_per_call=cfg.prompts_per_call, micro_token_cap=cap, model_name=model_name)


def call_seed(step_seed: int, call: int) -> int:
    """The sampler seed of generate call `call` of a step: the step's own seed for the first
    call (a plan with one call per step samples exactly what one big call did), a seed
    derived from (step seed, call) for the others.

    The sampler draws every decode step's tokens from one key over its whole batch, so
    a row's random stream depends on which rows share its call: a step sampled in
    several calls is another draw from the same distribution than one big call, not
    the same tokens. It is reproducible from (seed, step, prompts_per_call), which is
    what resuming needs; tests/test_rl_loop.py checks both properties."""
    if call == 0:
        return step_seed
    return int(np.random.SeedSequence([step_seed, call]).generate_state(1)[0] & 0x7FFFFFFF)


def sample_in_calls(policy: Transformer, prompts: Sequence[Sequence[int]], *, prompts_per_call: int,
                    step_seed: int, **generate_kw) -> tuple[list, dict]:
    """Rollouts of `prompts` in generate calls of `prompts_per_call` prompts (whole groups).

    Call k samples exactly what `generate(prompts[k*P:(k+1)*P], seed=call_seed(step_seed, k))`
    does; with a single call this is `generate(prompts, seed=step_seed)`. A long rollout
    holds only its own call, and the KV of one call is what the plan budgeted.
    """
    groups: list = []
    stats = dict(seconds=0.0, generated_tokens=0, calls=0)
    for k, start in enumerate(range(0, len(prompts), prompts_per_call)):
        gen = generate(policy, prompts[start:start + prompts_per_call], seed=call_seed(step_seed, k),
                       **generate_kw)
        groups.extend(gen)
        for key in ("seconds", "generated_tokens"):
            stats[key] += gen.stats[key]
        stats["calls"] += 1
    return groups, stats


def run_grpo(model: Transformer, items: Sequence[RLItem], reward_fn: RewardFn, cfg: RLConfig,
             workdir: str | os.PathLike, *, ref_model: Transformer | None = None,
             eos_ids: Sequence[int] | None = None, pad_id: int = 0, mesh: Mesh | None = None,
             on_step_end: Callable[[int, dict], None] | None = None,
             log: Callable[[str], None] | None = None) -> tuple[Transformer, list[dict]]:
    """Train `model` with GRPO for cfg.steps steps, resuming from `workdir` if it holds checkpoints.

    Returns the trained model (same graph, new parameters) and the per-step metrics.
    A step whose loss or gradient is not finite raises NonFiniteError; the
    checkpoints already written are left as they were.

    Before the first step the stage is planned (rl/plan.py, `make_plan`): the plan
    is logged as one block and written to `workdir / "plan.json"`; a plan that
    cannot fit raises PlanError with one line naming the setting to change. Each
    step samples in `plan.generate_calls` generate calls, packs the rollouts into
    micro-batches of `plan.rows_per_micro` rows of `plan.pack_len` tokens, and runs
    the reference pass and the update in that packing.

    The policy trains on `training_mesh(model, mesh)`; parameters not yet on it
    (the policy's and the reference model's) are moved there in place. With
    several processes every process calls this with the same arguments; `log`
    and the metrics files are used by process 0 only.
    """
    if not items:
        raise ValueError("no RL items")
    cfg = cfg.resolved()
    if cfg.prompts_per_step < 1 or cfg.num_generations < 1:
        raise ValueError("prompts_per_step and num_generations must be >= 1")
    use_ref = cfg.loss.kl_coef != 0
    if use_ref and ref_model is None:
        raise ValueError("kl_coef != 0 needs a reference model")
    for item in items:  # checked up front: a process must not fail alone on its share of a batch
        if len(item.prompt_tokens) > cfg.max_prompt_len:
            raise ValueError(f"item {item.id!r}: prompt has {len(item.prompt_tokens)} tokens > "
                             f"max_prompt_len={cfg.max_prompt_len}")
        if not item.prompt_tokens:
            raise ValueError(f"item {item.id!r}: empty prompt")
    main = jax.process_index() == 0
    log = (log or (lambda s: print(s, file=sys.stderr, flush=True))) if main else (lambda s: None)
    workdir = Path(workdir)
    mesh = training_mesh(model, mesh)
    plan = make_plan(model.config, cfg, mesh, with_reference=use_ref)
    log(plan.describe())
    if main:
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = workdir / "plan.json.tmp"
        tmp.write_text(plan.to_json())
        os.replace(tmp, workdir / "plan.json")
    for m in (model, ref_model):
        if m is not None and mesh is not None and m.mesh != mesh:
            shard_model(m, mesh)
    rows_total = cfg.prompts_per_step * cfg.num_generations
    placement = _RowPlacement(mesh, rows_total)
    packed_sharding = (None if mesh is None else
                       NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"))))
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

    def put_packed(x):
        x = np.asarray(x)
        if packed_sharding is None:
            return jnp.asarray(x)
        if x.ndim < 2:  # num_micro, denominator: replicated
            return global_from_host(x, NamedSharding(mesh, PartitionSpec()))
        return global_from_host(x, packed_sharding)

    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            idx = batch_indices(len(items), step, cfg.prompts_per_step, cfg.seed)
            batch_items = [items[i] for i in idx]
            # the sampler reads the matrices in the compute dtype, cast once per step (eagerly,
            # leaf by leaf: what keeps its dtype is not copied)
            policy = nnx.merge(graphdef, compute_params(graphdef, state.params))
            gen, gen_stats = sample_in_calls(
                policy, [it.prompt_tokens for it in batch_items], prompts_per_call=plan.prompts_per_call,
                step_seed=cfg.seed * 1_000_003 + step, n=cfg.num_generations,
                max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                top_k=cfg.top_k, eos_ids=eos_ids, pad_id=pad_id, chunk_size=cfg.sampler_chunk,
                progress=False)
            del policy
            t_sample = time.perf_counter() - t0
            # every process holds all completions; it scores only its own rows
            rows = [(it, c) for it, g in zip(batch_items, gen) for c in g]
            mine = [rows[r] for r in placement.rows]
            local_rewards = np.asarray([reward_fn(it, c) for it, c in mine], np.float32)
            rewards = multihost.host_array(placement.put(local_rewards))
            adv = np.asarray(grpo.compute_advantages(jnp.asarray(rewards), cfg.num_generations,
                                                     scale_by_std=cfg.scale_by_std))
            # every process packs the whole batch the same way and places its shards
            fields, layout = pack([it.prompt_tokens for it, _ in rows], [c.tokens for _, c in rows],
                                  [c.logprobs for _, c in rows], adv, pack_len=plan.pack_len,
                                  rows_per_micro=plan.rows_per_micro, max_micro=plan.max_micro,
                                  max_segments=cfg.loss.max_segments, agg=cfg.loss.agg,
                                  max_response_len=cfg.max_new_tokens, shards=plan.data_shards, pad_id=pad_id)
            batch = PackedBatch(**{k: put_packed(v) for k, v in fields.items()}, ref_logp=None)
            t1 = time.perf_counter()
            if use_ref:
                ref_logp = packed_sequence_logprobs(ref[0], ref[1], batch, temperature=cfg.loss.temperature,
                                                    chunk=cfg.loss.logprob_chunk,
                                                    max_segments=cfg.loss.max_segments)
                batch = batch._replace(ref_logp=jax.block_until_ready(ref_logp))
            t_ref = time.perf_counter() - t1
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
            train_tokens = float(layout.real_tokens)
            row = dict(
                reward_mean=float(rewards.mean()), reward_std=float(rewards.std()),
                accuracy=float((rewards > 0).mean()),
                zero_variance_groups=float((grouped.max(1) == grouped.min(1)).mean()),
                response_length=float(lengths.mean()),
                sample_tokens_per_s=float(lengths.sum() / max(t_sample, 1e-9)),
                train_tokens_per_s=train_tokens / max(t_update, 1e-9),
                generate_calls=float(gen_stats["calls"]), micro_batches=float(layout.num_micro),
                packing_efficiency=train_tokens / max(layout.padded_tokens, 1),
                time_sample=t_sample, time_ref_logprobs=t_ref, time_update=t_update,
                time_step=time.perf_counter() - t0, **metrics)
            if cfg.peak_flops:
                row["mfu"] = 6 * n_params * train_tokens / max(t_update, 1e-9) / cfg.peak_flops
            writer.write(step + 1, row)
            history.append(dict(step=step + 1, **row))
            log(f"step {step + 1}/{cfg.steps}  reward {row['reward_mean']:.3f}  kl {row.get('kl', 0):.4f}  "
                f"clip {row['pg_clipfrac']:.3f}  len {row['response_length']:.0f}  "
                f"{row['time_step']:.1f}s (sample {t_sample:.1f}s, ref {t_ref:.1f}s, update {t_update:.1f}s)")
            ckpt.save(step + 1, state, force=step + 1 == cfg.steps)
            if jax.default_backend() == "cpu":  # the step's freed temporaries back to the system
                hostmem.release_free_memory()
            if on_step_end is not None:
                on_step_end(step + 1, row)
    finally:
        ckpt.close()
        writer.close()
    return nnx.merge(graphdef, state.params), history


def read_plan(workdir: str | os.PathLike) -> dict | None:
    """The plan a GRPO stage recorded in `workdir / "plan.json"` (None before it ran)."""
    path = Path(workdir) / "plan.json"
    return json.loads(path.read_text()) if path.exists() else None


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

