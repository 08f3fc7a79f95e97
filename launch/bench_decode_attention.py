"""One layer of decode attention, timed, as a fraction of the device's memory bandwidth.

    python -m launch.bench_decode_attention --models=qwen3_0p6b,qwen3_8b --impls=pallas,xla

Shapes of the sampler's vote-16x8 workload halfway through decoding: 16 prompts
x 8 samples, a 256-token prompt KV shared per prompt, each sample's own KV
filled to 256 of 512 slots. The bytes that must be read are the prompt KV
once per prompt plus each sample's own KV up to its length (plus q and the
output); fraction_of_bandwidth = those bytes / time / measured copy bandwidth.
max_abs_diff_vs_xla checks each implementation's output against the XLA path.
Prints one JSON line per (model, impl); --smoke uses tiny shapes (CPU).
"""

from __future__ import annotations

import functools
import json
import time

from absl import app, flags

from launch import benchmarking

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["qwen3_0p6b", "qwen3_8b"], "Model presets whose attention shapes are used.")
flags.DEFINE_list("impls", ["pallas", "xla"], "Implementations (auto, xla, blocked, pallas, interpret).")
flags.DEFINE_integer("prompts", 16, "Distinct prompts.")
flags.DEFINE_integer("n", 8, "Samples per prompt.")
flags.DEFINE_integer("prompt_len", 256, "Prompt tokens.")
flags.DEFINE_integer("slots", 512, "Own KV slots per sample (the buffer length).")
flags.DEFINE_integer("filled", 256, "Own slots in use per sample.")
flags.DEFINE_integer("repeats", 50, "Timed calls.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Q/KV dtype (the smoke run uses float32).")
flags.DEFINE_bool("smoke", False, "Tiny shapes, a few repeats (checks that the script runs, e.g. on CPU).")


def bytes_read(p, n, kv, heads, h, s, filled, itemsize=2) -> int:
    prompt = 2 * p * kv * s * h * itemsize
    own = 2 * p * n * kv * filled * h * itemsize
    q_and_out = 2 * p * n * heads * h * itemsize
    return prompt + own + q_and_out


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp

    import models
    from models import decode_attention as da

    smoke = FLAGS.smoke
    bw = benchmarking.measure_bandwidth() if jax.default_backend() != "cpu" else 1e11
    rows = []
    for name in (["tiny"] if smoke else FLAGS.models):
        cfg = models.preset(name)
        p, n = (2, 4) if smoke else (FLAGS.prompts, FLAGS.n)
        s, slots, filled = (32, 32, 16) if smoke else (FLAGS.prompt_len, FLAGS.slots, FLAGS.filled)
        heads, kv, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dtype = jnp.float32 if smoke else jnp.dtype(FLAGS.dtype)
        ks = jax.random.split(jax.random.key(0), 5)
        q = jax.random.normal(ks[0], (p, n, heads, h), dtype)
        pk = jax.random.normal(ks[1], (p, kv, s, h), dtype)
        pv = jax.random.normal(ks[2], (p, kv, s, h), dtype)
        own = jax.random.normal(ks[3], (p, n, kv, 2, slots, h), dtype)
        start = jnp.zeros((p,), jnp.int32)
        lens = jnp.full((p, n), filled, jnp.int32)
        want = bytes_read(p, n, kv, heads, h, s, filled, jnp.dtype(dtype).itemsize)
        reference = jax.jit(functools.partial(da.decode_attention, impl="xla"))(q, pk, pv, start, own, lens)
        for impl in (["xla", "blocked", "interpret"] if smoke else FLAGS.impls):
            row = dict(kind="decode_attention_layer", model=name, impl=impl, device=str(jax.devices()[0]),
                       dtype=jnp.dtype(dtype).name, prompts=p, n=n, prompt_len=s, slots=slots,
                       filled=filled, bytes=want,
                       hbm_bytes_per_s=bw)
            try:
                fn = jax.jit(functools.partial(da.decode_attention, impl=impl))
                out = fn(q, pk, pv, start, own, lens)
                out.block_until_ready()
                repeats = 2 if smoke else FLAGS.repeats
                t = time.perf_counter()
                for _ in range(repeats):
                    out = fn(q, pk, pv, start, own, lens)
                out.block_until_ready()
                dt = (time.perf_counter() - t) / repeats
                diff = float(jnp.max(jnp.abs(out.astype(jnp.float32) - reference.astype(jnp.float32))))
                row.update(seconds=dt, bytes_per_s=want / dt, fraction_of_bandwidth=want / dt / bw,
                           max_abs_diff_vs_xla=diff)
            except Exception as e:  # one implementation failing leaves the others measured
                row.update(kind="error", error=f"{type(e).__name__}: {str(e)[:400]}")
            print(json.dumps(row), flush=True)
            rows.append(row)
    benchmarking.write_results("decode_attention_bench.jsonl", rows)


if __name__ == "__main__":
    app.run(main)
