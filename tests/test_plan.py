"""The GRPO memory plan (rl/plan.py) on abstract shapes: no parameter is allocated.

Documented byte budget (the byte model of rl/plan.py): resident state = fp32 master
weights + two fp32 AdamW moments + an fp32 gradient accumulator + a bf16 copy of the
matrices + a bf16 reference model, sharded over fsdp x tensor; sampling holds whole
prompt groups' KV at full length; an update micro-batch holds the remat policy's saved
activations. The plans below are the paper preset: 128 prompts x 8 rollouts, prompt
<= 512, response <= 3,072 tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import models
from rl.plan import GiB, PlanError, plan_grpo
from rl.train_step import OptimConfig, make_optimizer

PAPER = dict(prompts_per_step=128, num_generations=8, max_prompt_len=512, max_new_tokens=3072)


def paper_cfg(name, attention="cudnn", remat="full"):
    return models.preset(name, dtype="bfloat16", param_dtype="float32", remat=remat, attention_impl=attention)


def abstract_state_bytes(cfg):
    """Bytes of the parameters and the AdamW state, from jax.eval_shape (nothing allocated)."""
    model = nnx.eval_shape(lambda: models.Transformer(cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    opt = jax.eval_shape(make_optimizer(OptimConfig(total_steps=100)).init, params)
    size = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))  # noqa: E731
    return size(params), size(opt)


@pytest.mark.parametrize("name,mesh,device_bytes", [
    ("qwen3_8b", (1, 8, 1), 80e9),      # 8 x 80 GB GPUs, FSDP
    ("qwen3_8b", (1, 16, 1), 95e9),     # v5p-32: 16 chips x 95 GB HBM
    ("qwen3_1p7b", (1, 1, 1), 80e9),    # one 80 GB GPU
])
def test_paper_preset_plans_fit_the_documented_budget(name, mesh, device_bytes):
    cfg = paper_cfg(name, attention="xla" if mesh[1] == 16 else "cudnn")
    plan = plan_grpo(cfg, mesh_shape=mesh, device_bytes=device_bytes, model_name=name, **PAPER)
    shards = mesh[1] * mesh[2]
    params_bytes, opt_bytes = abstract_state_bytes(cfg)
    # the plan's resident parts are the abstract state's bytes, sharded
    assert plan.resident_parts["params"] == -(-params_bytes // shards)
    assert abs(plan.resident_parts["adam"] - opt_bytes / shards) < 1024  # + Adam's step counter
    assert plan.resident_parts["grads"] == -(-cfg.num_params() * 4 // shards)
    # every phase fits the usable memory, and the step covers every rollout
    assert plan.peak_bytes <= plan.usable_bytes <= 0.9 * device_bytes
    assert plan.prompts_per_call * plan.generate_calls == 128
    assert 128 % plan.prompts_per_call == 0 and plan.prompts_per_call % plan.data_shards == 0
    assert plan.rows_per_micro % plan.data_shards == 0
    assert plan.max_micro * plan.rows_per_micro >= 1024
    # the KV of one call: whole groups at full length
    kv = cfg.kv_bytes_per_token(2) * (512 + 8 * 3584) * plan.prompts_per_call / plan.data_shards
    assert kv <= plan.sampling_bytes <= 1.1 * kv
    text = plan.describe()
    assert text.startswith("GRPO plan: ") and "per generate call" in text and "micro-batch" in text


def test_expected_figures_of_the_paper_plans():
    eight = plan_grpo(paper_cfg("qwen3_8b"), mesh_shape=(1, 8, 1), device_bytes=80e9, **PAPER)
    assert 20 * GiB < eight.resident_bytes < 22 * GiB  # 8.2 B params x 20.5 bytes / 8
    assert eight.prompts_per_call == 64 and eight.generate_calls == 2  # 1,024 rollouts never in one call
    assert eight.pack_len == 3584
    one = plan_grpo(paper_cfg("qwen3_1p7b"), mesh_shape=(1, 1, 1), device_bytes=80e9, **PAPER)
    assert one.prompts_per_call == 8 and one.generate_calls == 16
    assert one.rows_per_micro == 9  # the 32k-token micro-batch cap: 9 rows of 3,584


def test_too_small_device_fails_with_one_line_naming_the_setting():
    with pytest.raises(PlanError) as e:
        plan_grpo(paper_cfg("qwen3_8b"), mesh_shape=(1, 1, 1), device_bytes=80e9, **PAPER)
    msg = str(e.value)
    assert "\n" not in msg and "fsdp" in msg and "param_dtype" in msg
    with pytest.raises(PlanError, match="max_new_tokens"):
        plan_grpo(paper_cfg("qwen3_1p7b"), mesh_shape=(1, 1, 1), device_bytes=48e9,
                  **dict(PAPER, max_new_tokens=32_000))
    with pytest.raises(PlanError, match="rows_per_micro"):
        plan_grpo(paper_cfg("qwen3_8b"), mesh_shape=(1, 8, 1), device_bytes=80e9, rows_per_micro=12, **PAPER)


def test_remat_policy_sets_the_micro_batch():
    plans = {r: plan_grpo(paper_cfg("qwen3_8b", remat=r, attention="cudnn"), mesh_shape=(1, 8, 1),
                          device_bytes=80e9, **PAPER) for r in ("none", "names", "full")}
    assert plans["none"].rows_per_micro < plans["names"].rows_per_micro <= plans["full"].rows_per_micro
    # without remat the XLA path keeps 36 layers of [32, 3584, 3584] scores: not one row fits
    with pytest.raises(PlanError, match="remat"):
        plan_grpo(paper_cfg("qwen3_8b", remat="none", attention="xla"), mesh_shape=(1, 8, 1),
                  device_bytes=80e9, **PAPER)


def test_activation_model_bounds_the_compiled_step_on_cpu():
    """The plan's update bytes against XLA's memory_analysis of the compiled packed step
    (CPU, abstract inputs): Qwen3-0.6B widths with 2 layers, 2 pack rows of 512 tokens."""
    from rl.packing import PackedBatch
    from rl.plan import update_bytes_per_token
    from rl.train_step import LossConfig, packed_loss_and_grads

    cfg = models.preset("qwen3_0p6b", dtype="float32", param_dtype="float32", remat="full",
                        attention_impl="xla").replace(num_layers=2, vocab_size=4096)
    model = nnx.eval_shape(lambda: models.Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model, nnx.Param)
    m, bm, length = 2, 2, 512
    f = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
    i32, f32 = jnp.int32, jnp.float32
    batch = PackedBatch(f((m, bm, length), i32), f((m, bm, length), i32), f((m, bm, length), i32),
                        f((m, bm, length), i32), f((m, bm, length), f32), f((m, bm, length), f32),
                        f((m, bm, length), f32), f((m, bm, length), f32), f((m, bm, length), f32),
                        f((), i32), f((), f32))
    loss = LossConfig(logprob_chunk=128)
    compiled = jax.jit(packed_loss_and_grads, static_argnums=(0, 3)).lower(graphdef, params, batch, loss).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    # what the plan counts for the micro-batch, plus the gradients it keeps resident
    # (the fp32 accumulator and one micro-batch's gradient)
    planned = update_bytes_per_token(cfg, "full", "xla", length, 128) * bm * length + 8 * cfg.num_params()
    assert temp <= planned, (temp, planned)
    assert temp >= 0.25 * planned, (temp, planned)  # the model is not absurdly pessimistic


def test_activation_model_bounds_the_compiled_step_without_remat():
    """Without remat the XLA attention keeps every layer's scores: the plan counts them
    (SmolLM2-135M widths with 4 layers, 2 pack rows of 384 tokens, fp32, as on CPU)."""
    from rl.packing import PackedBatch
    from rl.plan import update_bytes_per_token
    from rl.train_step import LossConfig, packed_loss_and_grads

    cfg = models.preset("smollm2_135m").replace(num_layers=4, vocab_size=8192)
    model = nnx.eval_shape(lambda: models.Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model, nnx.Param)
    m, bm, length = 2, 2, 384
    f = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
    i32, f32 = jnp.int32, jnp.float32
    batch = PackedBatch(*[f((m, bm, length), i32)] * 4, *[f((m, bm, length), f32)] * 3, None,
                        f((m, bm, length), f32), f((), i32), f((), f32))
    compiled = jax.jit(packed_loss_and_grads, static_argnums=(0, 3)).lower(
        graphdef, params, batch, LossConfig(kl_coef=0.0)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    planned = update_bytes_per_token(cfg, "none", "xla", length, 256) * bm * length + 8 * cfg.num_params()
    assert 0.5 * planned <= temp <= planned, (temp, planned)


_CPU_STEP = """
import json, sys
import jax, jax.numpy as jnp
from flax import nnx
import models
from rl.packing import PackedBatch
from rl.plan import update_bytes_per_token
from rl.train_step import LossConfig, packed_loss_and_grads
from launch.distributed import prefer_memory_on_cpu
prefer_memory_on_cpu()  # what the pipeline does before any device is touched
cfg = models.preset("smollm2_135m").replace(num_layers=8, vocab_size=8192, remat="full")
graphdef, params = nnx.split(nnx.eval_shape(lambda: models.Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
m, bm, length = 2, 2, 512
f = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt)
batch = PackedBatch(*[f((m, bm, length), jnp.int32)] * 4, *[f((m, bm, length), jnp.float32)] * 3, None,
                    f((m, bm, length), jnp.float32), f((), jnp.int32), f((), jnp.float32))
compiled = jax.jit(packed_loss_and_grads, static_argnums=(0, 3)).lower(
    graphdef, params, batch, LossConfig(kl_coef=0.0)).compile()
print(json.dumps({"temp": compiled.memory_analysis().temp_size_in_bytes,
                  "planned": update_bytes_per_token(cfg, "full", "xla", length, 256) * bm * length
                             + 8 * cfg.num_params()}))
"""


def test_the_pipeline_compiles_cpu_steps_within_the_remat_plan():
    """With full remat the plan counts one layer's recomputation at a time; XLA's CPU
    concurrency-optimized scheduler would instead run every layer's recomputed forward early
    and keep all their attention scores live. The pipeline turns it off (launch.distributed.prefer_memory_on_cpu), and
    then the compiled step of SmolLM2 widths (8 layers, 2 rows of 512 tokens) fits the plan."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", _CPU_STEP], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["temp"] <= got["planned"], got
    assert got["temp"] >= 0.25 * got["planned"], got


def test_prefer_memory_on_cpu_keeps_an_explicit_setting(monkeypatch):
    import os

    from launch.distributed import CPU_SCHEDULER_FLAG, prefer_memory_on_cpu
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    prefer_memory_on_cpu()
    assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {CPU_SCHEDULER_FLAG}"
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=true")
    prefer_memory_on_cpu()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_concurrency_optimized_scheduler=true"

