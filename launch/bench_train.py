"""GRPO train-step throughput and MFU on random-weight Qwen3 shapes, and one whole GRPO step.

    python -m launch.bench_train --models=qwen3_0p6b,qwen3_1p7b
    python -m launch.bench_train --models=qwen3_1p7b --grpo_step --remat=names --attention=cudnn

Train step (default): 32,768 tokens per step = 32 rows x 1024 tokens (prompt 8 +
response 1016) in the packed layout the GRPO loop uses (one sequence per pack
row here), 8 rows per micro-batch (4 accumulation steps), fp32 master weights
and AdamW state, bf16 compute, KL to a reference (reference logprobs
precomputed, as in the loop). Timed after a warm-up step, and only if the timed
steps compiled nothing new. MFU = 6 * N * tokens / time / peak, with N every
parameter (tied embeddings counted once) and the peak measured with a bf16
8192^3 matmul unless --peak_flops is given. Peak memory is the device's
peak_bytes_in_use. One JSON line per configuration, then the best per model.

--grpo_step: one whole GRPO step (sampling, reference pass, update) through
rl.loop.run_grpo, 16 prompts x 8 rollouts x 1,024 new tokens (EOS disabled, so
every rollout runs to full length) with random 64-token prompts; the second
step is timed (the first compiles) and its split printed as one JSON line.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from absl import app, flags

from launch import benchmarking

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["qwen3_0p6b", "qwen3_1p7b"], "Model presets (random weights).")
flags.DEFINE_integer("rows", 32, "Rows per mini-batch (one optimizer update).")
flags.DEFINE_integer("micro_batch", 8, "Rows per micro-batch.")
flags.DEFINE_integer("seq_len", 1024, "Tokens per row.")
flags.DEFINE_integer("prompt_len", 8, "Prompt part of each row; the rest is response.")
flags.DEFINE_list("remat", ["names", "full"], "Remat policies to try (none, full, dots, names); the fastest is reported.")
flags.DEFINE_list("attention", ["cudnn"], "Attention implementations to try (cudnn, xla).")
flags.DEFINE_float("peak_flops", 0.0, "bf16 peak FLOP/s for MFU; 0 measures it.")
flags.DEFINE_integer("steps", 3, "Timed steps after the warm-up.")
flags.DEFINE_string("profile_dir", None, "Trace one extra step into this directory and print the "
                    "device ops that took the most time.")
flags.DEFINE_bool("grpo_step", False, "Time one whole GRPO step instead of the train step alone.")
flags.DEFINE_integer("grpo_prompts", 16, "--grpo_step: prompts per step.")
flags.DEFINE_integer("grpo_generations", 8, "--grpo_step: rollouts per prompt.")
flags.DEFINE_integer("grpo_new_tokens", 1024, "--grpo_step: tokens per rollout.")
flags.DEFINE_integer("grpo_prompt_len", 64, "--grpo_step: tokens per prompt.")
flags.DEFINE_float("device_memory_gb", 0.0, "--grpo_step: device memory for the plan; 0 asks the backend.")


def _peak_memory_gb() -> float:
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 1e9


def packed_full_rows(rows: int, length: int, prompt_len: int, micro: int, vocab: int, seed: int = 0):
    """A PackedBatch of `rows` full-length sequences, one per pack row (what the loop builds
    for rollouts that all run to max_new_tokens)."""
    import jax.numpy as jnp
    import numpy as np

    from rl.packing import PackedBatch, pack

    rng = np.random.default_rng(seed)
    r = length - prompt_len
    prompts = [rng.integers(0, vocab, prompt_len).tolist() for _ in range(rows)]
    responses = [rng.integers(0, vocab, r).tolist() for _ in range(rows)]
    old = [np.full(r, -11.0, np.float32) for _ in range(rows)]
    fields, layout = pack(prompts, responses, old, rng.normal(size=rows).astype(np.float32),
                          pack_len=length, rows_per_micro=micro, max_micro=-(-rows // micro), max_segments=1,
                          agg="token-mean", max_response_len=r)
    batch = PackedBatch(**{k: jnp.asarray(v) for k, v in fields.items()}, ref_logp=None)
    return batch._replace(ref_logp=jnp.asarray(fields["old_logp"])), layout


def run_one(name: str, remat: str, attention: str, peak: float) -> dict:
    import jax

    import models
    from rl.train_step import LossConfig, OptimConfig, init_train_state, make_optimizer, train_step

    cfg = models.preset(name, dtype="bfloat16", param_dtype="float32", remat=remat,
                        attention_impl=attention)
    model = models.init_model(cfg, seed=0)
    tx = make_optimizer(OptimConfig(total_steps=100))
    graphdef, state = init_train_state(model, tx)
    del model
    rows, length = FLAGS.rows, FLAGS.seq_len
    batch, layout = packed_full_rows(rows, length, FLAGS.prompt_len, FLAGS.micro_batch,
                                     min(150_000, cfg.vocab_size))
    loss_cfg = LossConfig(max_segments=1)
    t = time.perf_counter()
    state, metrics = train_step(graphdef, state, batch, tx=tx, cfg=loss_cfg)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t
    compiled = train_step._cache_size()
    t = time.perf_counter()
    for _ in range(FLAGS.steps):
        state, metrics = train_step(graphdef, state, batch, tx=tx, cfg=loss_cfg)
    jax.block_until_ready(metrics)
    dt = (time.perf_counter() - t) / FLAGS.steps
    recompiled = train_step._cache_size() != compiled
    if FLAGS.profile_dir:
        trace_dir = os.path.join(FLAGS.profile_dir, f"{name}-{remat}-{attention}")
        jax.profiler.start_trace(trace_dir)
        state, metrics = train_step(graphdef, state, batch, tx=tx, cfg=loss_cfg)
        jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
        benchmarking.summarize_trace(trace_dir, 30)
    tokens = rows * length
    n = cfg.num_params()
    row = dict(kind="medssr_jax_train_step", model=name, device=str(jax.devices()[0]), jax=jax.__version__,
               remat=remat, attention=attention, params=n, tokens=tokens, rows=rows,
               micro_batch=FLAGS.micro_batch, micro_batches=layout.num_micro, seconds=dt,
               tokens_per_s=tokens / dt, mfu=6 * n * tokens / dt / peak, peak_flops=peak,
               first_step_seconds=compile_s, recompiled=recompiled, loss=float(metrics["loss"]),
               finite=bool(metrics["finite"]), peak_mem_gb=_peak_memory_gb())
    if recompiled:
        row = dict(row, kind="error", error="the timed steps compiled the train step again")
    return row


class _Stop(Exception):
    pass


def run_grpo_step(name: str, remat: str, attention: str) -> dict:
    import jax
    import numpy as np

    import models
    from rl.loop import RLConfig, RLItem, run_grpo
    from rl.train_step import LossConfig, OptimConfig

    cfg = models.preset(name, dtype="bfloat16", param_dtype="float32", remat=remat, attention_impl=attention)
    policy, ref = models.init_model(cfg, seed=0), models.init_model(cfg, seed=0)
    rng = np.random.default_rng(0)
    vocab = min(150_000, cfg.vocab_size)
    items = [RLItem(str(i), tuple(rng.integers(0, vocab, FLAGS.grpo_prompt_len).tolist()), None)
             for i in range(FLAGS.grpo_prompts * 2)]
    rc = RLConfig(steps=3, prompts_per_step=FLAGS.grpo_prompts, num_generations=FLAGS.grpo_generations,
                  max_new_tokens=FLAGS.grpo_new_tokens, max_prompt_len=FLAGS.grpo_prompt_len,
                  checkpoint_every=1_000_000, sampler_chunk=256,
                  device_memory_gb=FLAGS.device_memory_gb or None,
                  loss=LossConfig(), optim=OptimConfig(total_steps=100))
    rows: list[dict] = []

    def on_step_end(step, row):
        rows.append(row)
        if step == 2:
            raise _Stop  # before the last step's forced checkpoint

    with tempfile.TemporaryDirectory() as workdir:
        try:
            run_grpo(policy, items, lambda item, c: float(rng.random() < 0.5), rc, workdir, ref_model=ref,
                     eos_ids=[], on_step_end=on_step_end)
        except _Stop:
            pass
        plan = json.loads(open(os.path.join(workdir, "plan.json")).read())
    last = rows[-1]
    keys = ("time_sample", "time_ref_logprobs", "time_update", "time_step", "sample_tokens_per_s",
            "train_tokens_per_s", "generate_calls", "micro_batches", "packing_efficiency")
    return dict(kind="medssr_jax_grpo_step", model=name, device=str(jax.devices()[0]), jax=jax.__version__,
                remat=remat, attention=attention, prompts=FLAGS.grpo_prompts,
                rollouts=FLAGS.grpo_generations, new_tokens=FLAGS.grpo_new_tokens,
                first_step_seconds=rows[0]["time_step"], peak_mem_gb=_peak_memory_gb(),
                plan=dict(prompts_per_call=plan["prompts_per_call"], rows_per_micro=plan["rows_per_micro"],
                          pack_len=plan["pack_len"]),
                **{k: last[k] for k in keys})


def main(argv):
    del argv
    import jax
    if FLAGS.grpo_step:
        results = []
        for name in FLAGS.models:
            try:
                row = run_grpo_step(name, FLAGS.remat[0], FLAGS.attention[0])
            except Exception as e:  # report and go on with the next model
                row = dict(kind="error", model=name, error=repr(e)[:400])
            print(json.dumps(row), flush=True)
            results.append(row)
        benchmarking.write_results("grpo_step_bench.jsonl", results)
        return
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
