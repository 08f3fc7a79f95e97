"""GRPO train-step throughput and MFU on random-weight Qwen3 shapes.

    python -m launch.bench_train --models=qwen3_0p6b,qwen3_1p7b

Default workload: 32,768 tokens per step = mini-batch 32 rows x 1024 tokens
(prompt 8 + response 1016), micro-batch 8 (4 accumulation steps), fp32 master
weights and AdamW state, bf16 compute, remat per layer, KL to a reference
(reference logprobs precomputed, as in the RL loop). MFU = 6 * N * tokens /
time / peak, with N every parameter (tied embeddings counted once) and the
peak measured with a bf16 8192^3 matmul unless --peak_flops is given.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

from launch import benchmarking

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["qwen3_0p6b", "qwen3_1p7b"], "Model presets (random weights).")
flags.DEFINE_integer("rows", 32, "Rows per mini-batch (one optimizer update).")
flags.DEFINE_integer("micro_batch", 8, "Rows per micro-batch.")
flags.DEFINE_integer("seq_len", 1024, "Tokens per row.")
flags.DEFINE_integer("prompt_len", 8, "Prompt part of each row; the rest is response.")
flags.DEFINE_list("remat", ["dots", "full"], "Remat policies to try; the fastest is reported.")
flags.DEFINE_list("attention", ["cudnn", "xla"], "Attention implementations to try.")
flags.DEFINE_float("peak_flops", 0.0, "bf16 peak FLOP/s for MFU; 0 measures it.")
flags.DEFINE_integer("steps", 3, "Timed steps after the warm-up.")
flags.DEFINE_string("profile_dir", None, "Trace one extra step into this directory and print the "
                    "device ops that took the most time.")


def run_one(name: str, remat: str, attention: str, peak: float) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import models
    from rl.train_step import Batch, LossConfig, OptimConfig, init_train_state, make_optimizer, train_step

    cfg = models.preset(name, dtype="bfloat16", param_dtype="float32", remat=remat,
                        attention_impl=attention)
    model = models.init_model(cfg, seed=0)
    tx = make_optimizer(OptimConfig(total_steps=100))
    graphdef, state = init_train_state(model, tx)
    del model
    rows, length, sp = FLAGS.rows, FLAGS.seq_len, FLAGS.prompt_len
    r = length - sp
    rng = np.random.default_rng(0)
    batch = Batch(
        tokens=jnp.asarray(rng.integers(0, min(150_000, cfg.vocab_size), (rows, length)), jnp.int32),
        attention_mask=jnp.ones((rows, length), bool),
        response_mask=jnp.ones((rows, r), jnp.float32),
        old_logp=jnp.full((rows, r), -11.0, jnp.float32),
        ref_logp=jnp.full((rows, r), -11.0, jnp.float32),
        advantages=jnp.asarray(rng.normal(size=rows), jnp.float32))
    loss_cfg = LossConfig(micro_batch_size=FLAGS.micro_batch)
    t = time.perf_counter()
    state, metrics = train_step(graphdef, state, batch, tx=tx, cfg=loss_cfg)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(FLAGS.steps):
        state, metrics = train_step(graphdef, state, batch, tx=tx, cfg=loss_cfg)
    jax.block_until_ready(metrics)
    dt = (time.perf_counter() - t) / FLAGS.steps
    if FLAGS.profile_dir:
        trace_dir = os.path.join(FLAGS.profile_dir, f"{name}-{remat}-{attention}")
        jax.profiler.start_trace(trace_dir)
        state, metrics = train_step(graphdef, state, batch, tx=tx, cfg=loss_cfg)
        jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
        benchmarking.summarize_trace(trace_dir, 30)
    tokens = rows * length
    n = cfg.num_params()
    stats = jax.devices()[0].memory_stats() or {}
    return dict(kind="medssr_jax_train_step", model=name, device=str(jax.devices()[0]), jax=jax.__version__,
                remat=remat, attention=attention, params=n, tokens=tokens, rows=rows,
                micro_batch=FLAGS.micro_batch, seconds=dt, tokens_per_s=tokens / dt,
                mfu=6 * n * tokens / dt / peak, peak_flops=peak, first_step_seconds=compile_s,
                loss=float(metrics["loss"]), finite=bool(metrics["finite"]),
                peak_mem_gb=stats.get("peak_bytes_in_use", 0) / 1e9)


def main(argv):
    del argv
    import jax
    peak = FLAGS.peak_flops or (benchmarking.measure_peak_flops() if jax.default_backend() != "cpu" else 1e12)
    results = []
    for name in FLAGS.models:
        best = None
        for remat in FLAGS.remat:
            for attention in FLAGS.attention:
                try:
                    row = run_one(name, remat, attention, peak)
                except Exception as e:  # report and try the next configuration
                    row = dict(kind="error", model=name, remat=remat, attention=attention,
                               error=repr(e)[:400])
                print(json.dumps(row), flush=True)
                results.append(row)
                if row["kind"] != "error" and (best is None or row["tokens_per_s"] > best["tokens_per_s"]):
                    best = row
        if best:
            print(json.dumps(dict(best, kind="medssr_jax_train_step_best")), flush=True)
    benchmarking.write_results("train_bench.jsonl", results)


if __name__ == "__main__":
    app.run(main)
