"""Sampler throughput on random-weight Qwen3 shapes, with its ratio to the bandwidth floor.

    python -m launch.bench_sampler --models=qwen3_0p6b,qwen3_8b

Workload "vote-16x8" by default: 16 prompts x 8 samples, prompt 256 tokens,
512 new tokens forced (no EOS), temperature 1.0, bf16. Prints one JSON line
per model (and writes them to $OUT/sampler_bench.jsonl when OUT is set).
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

from launch import benchmarking

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["qwen3_0p6b", "qwen3_8b"], "Model presets (random weights).")
flags.DEFINE_integer("prompts", 16, "Distinct prompts.")
flags.DEFINE_integer("n", 8, "Samples per prompt.")
flags.DEFINE_integer("prompt_len", 256, "Prompt tokens.")
flags.DEFINE_integer("gen", 512, "New tokens per sample (forced: no EOS).")
flags.DEFINE_integer("chunk_size", 128, "Decode steps per jitted chunk.")
flags.DEFINE_string("dtype", "bfloat16", "Parameter and compute dtype.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
flags.DEFINE_integer("repeats", 2, "Timed runs after the warm-up; the best is reported.")
flags.DEFINE_string("profile_dir", None, "Trace one extra run into this directory and print the "
                    "device ops that took the most time.")
flags.DEFINE_integer("profile_top", 25, "How many device ops to list with --profile_dir.")
flags.DEFINE_string("decode_attention", "auto", "Decode attention: auto, xla, blocked, pallas or interpret.")
flags.DEFINE_string("rng", "threefry2x32", "PRNG for the draws: threefry2x32, rbg or unsafe_rbg.")
flags.DEFINE_bool("smoke", False, "The tiny preset on a small workload in float32 (checks that the "
                  "benchmark runs, e.g. on CPU); the figures mean nothing.")


def floors(cfg, batch: int, prompts: int, prompt_len: int, gen: int, bw: float) -> dict:
    """Decode steps that read every weight once plus the KV so far (prefill excluded)."""
    wbytes = 2 * cfg.num_params()
    kv_tok = cfg.kv_bytes_per_token(2)
    no_share = gen * (wbytes + batch * (prompt_len + gen / 2) * kv_tok) / bw
    shared = gen * (wbytes + (prompts * prompt_len + batch * gen / 2) * kv_tok) / bw
    toks = batch * gen
    return dict(floor_no_sharing_tok_s=toks / no_share, floor_shared_tok_s=toks / shared)


def main(argv):
    del argv
    import jax
    import numpy as np

    import models
    from medssr_jax.sampler import generate

    bw = benchmarking.measure_bandwidth() if jax.default_backend() != "cpu" else 1e11
    if FLAGS.smoke:
        FLAGS.models, FLAGS.prompts, FLAGS.n, FLAGS.prompt_len, FLAGS.gen = ["tiny"], 2, 4, 32, 24
        FLAGS.chunk_size, FLAGS.dtype, FLAGS.repeats = 8, "float32", 1
    results = []
    for name in FLAGS.models:
        cfg = models.preset(name, dtype=FLAGS.dtype, param_dtype=FLAGS.dtype,
                            max_position_embeddings=max(40_960, FLAGS.prompt_len + FLAGS.gen))
        model = models.init_model(cfg, seed=0)
        rng = np.random.default_rng(0)
        prompts = rng.integers(2, cfg.vocab_size // 2, (FLAGS.prompts, FLAGS.prompt_len)).tolist()
        kw = dict(n=FLAGS.n, max_new_tokens=FLAGS.gen, temperature=FLAGS.temperature, eos_ids=[],
                  chunk_size=FLAGS.chunk_size, progress=False, decode_attention=FLAGS.decode_attention,
                  rng=FLAGS.rng)
        t = time.perf_counter()
        generate(model, prompts, seed=1, **kw)  # compile + warm
        compile_s = time.perf_counter() - t
        best = None
        for r in range(FLAGS.repeats):
            out = generate(model, prompts, seed=2 + r, **kw)
            if best is None or out.stats["seconds"] < best["seconds"]:
                best = out.stats
        if FLAGS.profile_dir:
            trace_dir = os.path.join(FLAGS.profile_dir, name)
            jax.profiler.start_trace(trace_dir)
            generate(model, prompts, seed=99, **kw)
            jax.profiler.stop_trace()
            benchmarking.summarize_trace(trace_dir, FLAGS.profile_top)
        batch = FLAGS.prompts * FLAGS.n
        assert best["generated_tokens"] == batch * FLAGS.gen, best
        stats = jax.devices()[0].memory_stats() or {}
        row = dict(kind="medssr_jax_sampler", model=name, device=str(jax.devices()[0]),
                   jax=jax.__version__, batch=batch, prompts=FLAGS.prompts, n=FLAGS.n,
                   prompt_len=FLAGS.prompt_len, gen=FLAGS.gen, chunk_size=FLAGS.chunk_size,
                   decode_attention=FLAGS.decode_attention, rng=FLAGS.rng,
                   decode_attention_used=best["decode_attention"],
                   peak_mem_gb=stats.get("peak_bytes_in_use", 0) / 1e9,
                   seconds=best["seconds"], prefill_seconds=best["prefill_seconds"],
                   tokens_per_s=best["tokens_per_s"], first_call_seconds=compile_s,
                   hbm_bytes_per_s=bw, **floors(cfg, batch, FLAGS.prompts, FLAGS.prompt_len, FLAGS.gen, bw))
        row["fraction_of_shared_floor"] = row["tokens_per_s"] / row["floor_shared_tok_s"]
        print(json.dumps(row), flush=True)
        results.append(row)
        del model
        jax.clear_caches()  # the next model's executables only
    benchmarking.write_results("sampler_bench.jsonl", results)


if __name__ == "__main__":
    app.run(main)
