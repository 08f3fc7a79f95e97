"""The memory plan of a GRPO stage: what fits on the devices, decided before the first step.

    plan = plan_grpo(model_cfg, rl_cfg, mesh_shape=(1, 8, 1), device_bytes=80e9)
    print(plan.describe())

From the model config, the mesh and each device's memory the plan fixes:

- **resident state** per device: master parameters and AdamW moments in
  `param_dtype`, the fp32 gradient accumulator, the compute-dtype copy of the
  weights made once per step, the frozen reference model (compute dtype when
  kl_coef != 0); all sharded over fsdp x tensor;
- **sampling**: prompts per `generate` call (whole groups of n rollouts), from
  the KV budget left after the resident state: a group holds its prompt's KV
  once and each rollout's own KV, (Sp + n * R) * kv_bytes_per_token, over the
  tensor axis; prompts are sharded over the data axes;
- **update**: rows packed into pack rows of `pack_len` tokens (rl.packing);
  pack rows per micro-batch from the activation budget, per token and layer
  following the remat policy, plus the fused LM head's chunk of logits;
- **reference pass**: the same packing, micro-batch by micro-batch, forward
  only (it needs less than the update). Old logprobs come from the sampler
  (one update per rollout batch), so no old-logprob pass runs.

Byte model (documented so tests and the README can check it): with d = hidden,
f = MLP width, q = heads * head_dim, k = kv_heads * head_dim and b the
compute-dtype bytes, one layer's activations per token are

    full forward  A = b * (6 d + 3 q + 4 k + 3 f)   (norm in/out, q/k/v before and
                                                     after rotary, context, o-proj,
                                                     gate, up, silu * up)
    saved for backward: none -> A, full -> b * d, dots -> b * (q + 2 k + 2 d + 2 f),
                        names -> b * (2 q + 2 k + 2 d)

An update micro-batch of t tokens per device holds L * saved * t + 2 A t (the
layer being differentiated: its activations and their cotangents) + the
hidden stream in fp32 (8 d t: value and cotangent) + the LM-head chunk
(3 * 4 * V * t * chunk / pack_len: logits, probabilities and their cotangent
for `chunk` positions of every row). With attention_impl="xla" the
[heads, T, T] fp32 scores of one layer add 3 * 4 * heads * pack_len per token
(scores, probabilities, their cotangent), of every layer with remat="none";
cuDNN's fused kernel keeps O(T) statistics only. Beside the fp32 accumulator, one micro-batch's gradient
(compute dtype) is resident while it is added.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from models.config import ModelConfig

GiB = 1 << 30

# bf16 dense peak and HBM bandwidth of the documented hardware (vendor figures; the
# H100/H200 rows are the measured ceilings of BENCHMARKS.md).
HARDWARE = {
    "h100-80gb": dict(device_bytes=80e9, peak_flops=807e12, hbm_bytes_per_s=2.95e12),
    "h200": dict(device_bytes=141e9, peak_flops=790e12, hbm_bytes_per_s=4.3e12),
    "a100-80gb": dict(device_bytes=80e9, peak_flops=312e12, hbm_bytes_per_s=2.0e12),
    "v5p": dict(device_bytes=95e9, peak_flops=459e12, hbm_bytes_per_s=2.76e12),
}


def _dtype_bytes(name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[name]


def _bucket_ok(p: int) -> bool:
    """Prompt counts the sampler compiles for without padding: 1, 2, 4, 8, multiples of 8."""
    return p in (1, 2, 4) or p % 8 == 0


@dataclasses.dataclass(frozen=True)
class GRPOPlan:
    model: str
    devices: int
    mesh: tuple[int, int, int]            # (data, fsdp, tensor)
    device_bytes: int
    usable_bytes: int                     # device_bytes * memory_fraction
    resident_bytes: int                   # per device: weights, optimizer, gradients, reference
    resident_parts: dict                  # per device, by part
    prompts_per_step: int
    num_generations: int
    prompts_per_call: int                 # prompt groups per generate call
    generate_calls: int
    sampling_bytes: int                   # per device, the KV of one call at full length
    pack_len: int
    rows_per_micro: int                   # pack rows per micro-batch (all devices)
    max_micro: int                        # micro-batches if no two rows shared a pack row
    micro_tokens_per_device: int
    update_bytes: int                     # per device, activations of one update micro-batch
    reference_bytes: int                  # per device, one reference micro-batch (forward only)
    remat: str
    attention_impl: str
    logprob_chunk: int
    notes: tuple[str, ...] = ()

    @property
    def data_shards(self) -> int:
        return self.mesh[0] * self.mesh[1]

    @property
    def peak_bytes(self) -> int:
        return self.resident_bytes + max(self.sampling_bytes, self.update_bytes, self.reference_bytes)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["peak_bytes"] = self.peak_bytes
        return d

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=1, sort_keys=True)

    def describe(self) -> str:
        g = lambda x: f"{x / GiB:.1f} GiB"  # noqa: E731
        parts = ", ".join(f"{k} {g(v)}" for k, v in self.resident_parts.items())
        rows = self.prompts_per_step * self.num_generations
        lines = [
            f"GRPO plan: {self.model} on {self.devices} device(s) of {g(self.device_bytes)} "
            f"(mesh data={self.mesh[0]} fsdp={self.mesh[1]} tensor={self.mesh[2]}; "
            f"{g(self.usable_bytes)} usable)",
            f"  resident per device  {g(self.resident_bytes)} ({parts})",
            f"  sampling             {self.prompts_per_call} prompts x {self.num_generations} rollouts per "
            f"generate call, {self.generate_calls} call(s) per step; KV {g(self.sampling_bytes)} per device",
            f"  update               {rows} rows packed into rows of {self.pack_len} tokens, "
            f"{self.rows_per_micro} per micro-batch ({self.micro_tokens_per_device:,} tokens per device), "
            f"at most {self.max_micro} micro-batches; activations {g(self.update_bytes)} per device "
            f"(remat={self.remat}, attention={self.attention_impl}, logprob chunk {self.logprob_chunk})",
            f"  reference pass       same packing, forward only: {g(self.reference_bytes)} per device",
            f"  old logprobs         from the sampler (one update per rollout batch)",
            f"  peak per device      {g(self.peak_bytes)} of {g(self.usable_bytes)}",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


class PlanError(ValueError):
    pass


def layer_activation_bytes(cfg: ModelConfig, remat: str) -> tuple[int, int]:
    """(full forward activations, saved for the backward) of one layer, bytes per token."""
    b = _dtype_bytes(cfg.dtype)
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, k = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    full = b * (6 * d + 3 * q + 4 * k + 3 * f)
    saved = {"none": full, "full": b * d, "dots": b * (q + 2 * k + 2 * d + 2 * f),
             "names": b * (2 * q + 2 * k + 2 * d)}
    if remat not in saved:
        raise PlanError(f"remat={remat!r} is not one of {sorted(saved)} (the model config's remat)")
    return full, saved[remat]


def resident_parts(cfg: ModelConfig, shards: int, with_reference: bool) -> dict[str, int]:
    """Per-device bytes of what stays on the devices for the whole stage."""
    n = cfg.num_params()
    pb, cb = _dtype_bytes(cfg.param_dtype), _dtype_bytes(cfg.dtype)
    emb = cfg.vocab_size * cfg.hidden_size
    parts = {
        "params": n * pb,
        "adam": 2 * n * pb,
        "grads": 4 * n,
        "micro_grads": n * cb,  # one micro-batch's gradient before it joins the accumulator
        # matrices cast to the compute dtype once per step; the embedding table stays
        "compute_copy": (n - emb) * cb if cb != pb else 0,
    }
    if with_reference:
        parts["reference"] = n * cb
    return {k: -(-v // shards) for k, v in parts.items()}


def update_bytes_per_token(cfg: ModelConfig, remat: str, attention_impl: str, pack_len: int,
                           chunk: int) -> int:
    full, saved = layer_activation_bytes(cfg, remat)
    per_token = cfg.num_layers * saved + 2 * full + 8 * cfg.hidden_size
    per_token += math.ceil(12 * cfg.vocab_size * min(chunk, pack_len) / pack_len)
    if attention_impl == "xla":
        # without remat every layer keeps its scores and probabilities for the backward
        layers_holding_scores = cfg.num_layers if remat == "none" else 1
        per_token += 12 * cfg.num_heads * pack_len * layers_holding_scores
    return per_token


def reference_bytes_per_token(cfg: ModelConfig, attention_impl: str, pack_len: int, chunk: int) -> int:
    full, _ = layer_activation_bytes(cfg, "none")
    per_token = full + 8 * cfg.hidden_size + math.ceil(8 * cfg.vocab_size * min(chunk, pack_len) / pack_len)
    if attention_impl == "xla":
        per_token += 8 * cfg.num_heads * pack_len
    return per_token


def _largest_fitting_prompts(limit: int, prompts_per_step: int, data_shards: int) -> int:
    """Largest prompt count <= limit that divides prompts_per_step, is a multiple of the
    data shards and is a sampler bucket (so no call pads its prompts); else the largest
    multiple of the shards; else the largest divisor of prompts_per_step; 0 if none."""
    for p in range(min(limit, prompts_per_step), 0, -1):
        if prompts_per_step % p == 0 and p % data_shards == 0 and _bucket_ok(p):
            return p
    for p in range(min(limit, prompts_per_step), 0, -1):
        if p % data_shards == 0:
            return p
    # fewer prompts per step than data shards (small runs on many devices): the sampler
    # pads the prompt batch to its bucket, so any divisor of the step will do
    for p in range(min(limit, prompts_per_step), 0, -1):
        if prompts_per_step % p == 0:
            return p
    return 0


def plan_grpo(cfg: ModelConfig, *, prompts_per_step: int, num_generations: int, max_prompt_len: int,
              max_new_tokens: int, mesh_shape: tuple[int, int, int], device_bytes: float,
              kl_coef: float = 0.005, logprob_chunk: int = 256, memory_fraction: float = 0.9,
              pack_len: int | None = None, rows_per_micro: int | None = None,
              prompts_per_call: int | None = None, micro_token_cap: int = 32_768,
              model_name: str | None = None) -> GRPOPlan:
    """Plan a GRPO stage; raises PlanError (one line naming the setting) when nothing fits.

    `rows_per_micro` / `prompts_per_call` force those choices (checked against the budget).
    `micro_token_cap` bounds the tokens per device of one micro-batch: past a few tens of
    thousands the matmuls are already large, and the rest of the memory stays headroom.
    """
    data, fsdp, tensor = (int(x) for x in mesh_shape)
    if min(data, fsdp, tensor) < 1:
        raise PlanError(f"mesh {mesh_shape} must have positive (data, fsdp, tensor) sizes (the config's mesh)")
    devices = data * fsdp * tensor
    shards = data * fsdp
    if device_bytes <= 0:
        raise PlanError(f"device memory {device_bytes} must be positive (RLConfig.device_memory_gb)")
    usable = int(device_bytes * memory_fraction)
    name = model_name or f"{cfg.family} {cfg.num_params() / 1e9:.2f}B"
    parts = resident_parts(cfg, fsdp * tensor, kl_coef != 0)
    resident = sum(parts.values())
    if resident >= usable:
        raise PlanError(
            f"GRPO plan: {name} needs {resident / GiB:.1f} GiB per device for weights, gradients and AdamW "
            f"state but a device has {usable / GiB:.1f} GiB usable; shard over more devices (the mesh's "
            f"fsdp axis) or use param_dtype=bfloat16")
    free = usable - resident
    notes = []

    # sampling: whole prompt groups, their KV at full length (prompt once, n rollouts)
    kv_token = cfg.kv_bytes_per_token(_dtype_bytes(cfg.dtype))
    group_kv = (max_prompt_len + num_generations * (max_prompt_len + max_new_tokens)) * kv_token
    # logits of the decode step (fp32, a few copies) per rollout
    group_bytes = math.ceil(group_kv / tensor) + num_generations * 3 * 4 * cfg.vocab_size
    fit_groups_per_device = free // group_bytes
    if prompts_per_call is None:
        prompts_per_call = _largest_fitting_prompts(fit_groups_per_device * shards, prompts_per_step, shards)
    if prompts_per_call < 1 or prompts_per_call * group_bytes > free * shards:
        raise PlanError(
            f"GRPO plan: one group of {num_generations} rollouts needs {group_bytes / GiB:.2f} GiB of KV per "
            f"device and {free / GiB:.2f} GiB are left after the weights; lower max_new_tokens or "
            f"num_generations, or use more devices")
    calls = -(-prompts_per_step // prompts_per_call)
    sampling = -(-prompts_per_call // shards) * group_bytes

    # update: packed rows
    if pack_len is None:
        pack_len = -(-(max_prompt_len + max_new_tokens) // 128) * 128
    if pack_len < max_prompt_len + max_new_tokens:
        raise PlanError(f"pack_len={pack_len} < max_prompt_len + max_new_tokens = "
                        f"{max_prompt_len + max_new_tokens}; raise RLConfig.pack_len")
    per_token = update_bytes_per_token(cfg, cfg.remat, cfg.attention_impl, pack_len, logprob_chunk)
    rows_fit = free // (per_token * pack_len)  # pack rows per device
    rows = prompts_per_step * num_generations
    max_rows_per_device = -(-rows // shards)
    if rows_per_micro is None:
        if rows_fit < 1:
            raise PlanError(
                f"GRPO plan: one packed row of {pack_len} tokens needs {per_token * pack_len / GiB:.2f} GiB of "
                f"activations per device (remat={cfg.remat}) and {free / GiB:.2f} GiB are left; set the "
                f"config's remat to 'full', lower max_new_tokens, or use more devices")
        cap = max(1, micro_token_cap // pack_len)
        rows_per_micro = int(min(rows_fit, max_rows_per_device, cap)) * shards
    if rows_per_micro % shards:
        raise PlanError(f"rows_per_micro={rows_per_micro} must be a multiple of the {shards} data shards "
                        f"(RLConfig.rows_per_micro)")
    tokens_dev = rows_per_micro // shards * pack_len
    update = per_token * tokens_dev
    if update > free:
        raise PlanError(f"GRPO plan: rows_per_micro={rows_per_micro} needs {update / GiB:.1f} GiB of "
                        f"activations per device, {free / GiB:.1f} GiB are left; lower RLConfig.rows_per_micro")
    reference = reference_bytes_per_token(cfg, cfg.attention_impl, pack_len, logprob_chunk) * tokens_dev
    if cfg.attention_impl == "xla" and pack_len >= 2048:
        notes.append("attention_impl=xla materialises [heads, T, T] scores; cudnn (GPU) does not")
    return GRPOPlan(
        model=name, devices=devices, mesh=(data, fsdp, tensor), device_bytes=int(device_bytes),
        usable_bytes=usable, resident_bytes=resident, resident_parts=parts,
        prompts_per_step=prompts_per_step, num_generations=num_generations,
        prompts_per_call=prompts_per_call, generate_calls=calls, sampling_bytes=sampling,
        pack_len=pack_len, rows_per_micro=rows_per_micro, max_micro=-(-rows // rows_per_micro),
        micro_tokens_per_device=tokens_dev, update_bytes=update, reference_bytes=reference,
        remat=cfg.remat, attention_impl=cfg.attention_impl, logprob_chunk=logprob_chunk,
        notes=tuple(notes))


def device_memory_bytes(device=None) -> int | None:
    """The backend's figure for one device's memory (bytes_limit), None where it has none (CPU)."""
    import jax
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # backends without memory stats
        return None
    return stats.get("bytes_limit")


def estimate_step_seconds(plan: GRPOPlan, cfg: ModelConfig, *, mean_response: float, mean_prompt: float,
                          peak_flops: float, hbm_bytes_per_s: float, mfu: float = 0.4,
                          sampler_bandwidth_fraction: float = 0.6,
                          packing_efficiency: float = 1.0) -> dict[str, float]:
    """Rough time per step on `plan.devices` devices (the arithmetic the README quotes).

    update: (6 + 2 if remat recomputes the forward) * N * tokens / (devices * peak * mfu);
    reference: 2 * N * tokens / (devices * peak * mfu); sampling: per decode step every
    device reads its share of the compute-dtype weights and the KV so far, at
    `sampler_bandwidth_fraction` of the HBM bandwidth, for mean_response steps per call
    (the longest rollout sets the call's length; mean_response is the planning figure).
    The update and the reference pass compute whole pack rows: real tokens /
    packing_efficiency positions.
    """
    n = cfg.num_params()
    rows = plan.prompts_per_step * plan.num_generations
    tokens = rows * (mean_prompt + mean_response)
    flops_per_token = (8 if plan.remat != "none" else 6) * n
    computed = tokens / packing_efficiency
    update = flops_per_token * computed / (plan.devices * peak_flops * mfu)
    reference = 2 * n * computed / (plan.devices * peak_flops * mfu)
    cb = _dtype_bytes(cfg.dtype)
    weights_dev = n * cb / plan.mesh[2]  # FSDP gathers every weight for each decode step
    batch_dev = plan.prompts_per_call * plan.num_generations / plan.data_shards
    kv_token = cfg.kv_bytes_per_token(cb) / plan.mesh[2]
    avg_kv = batch_dev * (mean_prompt / plan.num_generations + mean_response / 2) * kv_token
    step_bytes = weights_dev + avg_kv
    sampling = plan.generate_calls * mean_response * step_bytes / (hbm_bytes_per_s * sampler_bandwidth_fraction)
    return dict(sampling=sampling, reference=reference, update=update,
                total=sampling + reference + update, tokens=tokens)
