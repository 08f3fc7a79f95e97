"""Ops per layer-step of the sampler's decode loop, from the lowered and the compiled program.

    python -m launch.decode_ops --model=qwen3_0p6b [--attention=xla]

Lowers the jitted decode chunk for abstract inputs (nothing is allocated) at
1 and 2 layers of the model's shapes; the difference is what one more layer
adds to each decode step. Counts StableHLO ops of the lowered module, and the
instructions of the compiled while-loop body that launch work (fusions,
dots, custom calls, copies, dynamic-update-slices...) on this backend. Prints
one JSON line.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "qwen3_0p6b", "Model preset whose shapes are used.")
flags.DEFINE_integer("prompts", 16, "Distinct prompts.")
flags.DEFINE_integer("n", 8, "Samples per prompt.")
flags.DEFINE_integer("prompt_len", 256, "Prompt tokens.")
flags.DEFINE_integer("gen", 512, "New tokens.")
flags.DEFINE_string("dtype", "bfloat16", "Compute dtype.")
flags.DEFINE_string("param_dtype", "bfloat16", "Parameter dtype (float32: the RL loop's master weights).")
flags.DEFINE_string("attention", "xla", "Decode attention implementation (xla, pallas, interpret).")

# opcodes that do no device work of their own
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all",
         "partition-id", "replica-id", "opt-barrier"}


# the ops that cost a kernel or a copy of their own on a GPU, or a cast of data
KEY_OPS = ("dot_general", "custom_call", "reduce", "convert", "concatenate", "transpose",
           "dynamic_update_slice", "pad")


def stablehlo_op_counts(text: str) -> collections.Counter:
    return collections.Counter(re.findall(r"=\s*(?:\"?)(stablehlo\.[a-z_]+|tt\.[a-z_]+)", text))


def while_body_kernels(hlo_text: str) -> collections.Counter:
    """Opcodes of the instructions in the largest while body of an optimized HLO module."""
    bodies = {}
    for name in re.findall(r"body=%?([\w.\-]+)", hlo_text):
        m = re.search(r"\n%?" + re.escape(name) + r" [^\n]*\{\n(.*?)\n\}", hlo_text, re.S)
        if m:
            bodies[name] = m.group(1)
    if not bodies:
        return collections.Counter()
    body = max(bodies.values(), key=len)
    ops = collections.Counter()
    for line in body.splitlines():
        m = re.search(r"=\s*[^\s]+(?:\s*\{[^}]*\})?\s+([a-z\-]+)\(", line)
        if m and m.group(1) not in _FREE:
            ops[m.group(1)] += 1
    return ops


def lower_decode_chunk(cfg, prompts: int, n: int, prompt_len: int, gen: int, attention: str,
                       platform: str | None = None):
    """The sampler's decode chunk lowered for abstract inputs of these shapes (for `platform`)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import models
    from medssr_jax import sampler
    from models.transformer import PrefixKV, empty_sample_kv

    abstract_model = nnx.eval_shape(lambda: models.init_model(cfg, seed=0))
    graphdef, state = nnx.split(abstract_model)
    weights = jax.eval_shape(lambda s: sampler._decode_weights(graphdef, s), state)
    dtype = cfg.jnp_dtype
    length = sampler._length_bucket(gen - 1)
    kv = jax.ShapeDtypeStruct((prompts, cfg.num_kv_heads, prompt_len, cfg.head_dim), dtype)
    prefix = PrefixKV((kv,) * cfg.num_layers, (kv,) * cfg.num_layers,
                      jax.ShapeDtypeStruct((prompts,), jnp.int32))
    cache = jax.eval_shape(lambda: empty_sample_kv(cfg, prompts, n, length))
    batch = prompts * n
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    key = jax.eval_shape(lambda: jax.random.key(0))
    params = sampler.SamplingParams(1.0)
    traced = sampler._decode_chunk.trace(
        weights, prefix, cache, i32(batch), i32(batch), i32(batch),
        jax.ShapeDtypeStruct((batch,), jnp.bool_), key, i32(), i32(), i32(1), i32(),
        cfg=cfg, mesh=None, params=params, chunk=min(128, length), attention_impl=attention)
    return traced.lower(lowering_platforms=(platform,)) if platform else traced.lower()


def per_layer(lower_fn, cfg, compile: bool = True) -> dict:
    """What one more layer adds: counts at 2 layers minus counts at 1 layer."""
    counts = {}
    for layers in (1, 2):
        lowered = lower_fn(dataclasses.replace(cfg, num_layers=layers))
        shlo = stablehlo_op_counts(lowered.as_text())
        kernels = while_body_kernels(lowered.compile().as_text()) if compile else collections.Counter()
        counts[layers] = (shlo, kernels)
    shlo = counts[2][0] - counts[1][0]
    kernels = counts[2][1] - counts[1][1]
    key = {op: shlo.get("stablehlo." + op, 0) for op in KEY_OPS}
    return dict(stablehlo_ops_per_layer=sum(shlo.values()), stablehlo_key_ops=key,
                compiled_kernels_per_layer=sum(kernels.values()),
                stablehlo_by_op=dict(shlo.most_common()), compiled_by_op=dict(kernels.most_common()))


def main(argv):
    del argv
    import jax

    import models
    cfg = models.preset(FLAGS.model, dtype=FLAGS.dtype, param_dtype=FLAGS.param_dtype)
    # the Pallas kernel lowers for CUDA only: on another backend count its CUDA lowering, uncompiled
    platform = "cuda" if FLAGS.attention == "pallas" and jax.default_backend() != "gpu" else None
    row = per_layer(lambda c: lower_decode_chunk(
        c, FLAGS.prompts, FLAGS.n, FLAGS.prompt_len, FLAGS.gen, FLAGS.attention, platform),
        cfg, compile=platform is None)
    row = dict(kind="decode_ops_per_layer_step", model=FLAGS.model, attention=FLAGS.attention,
               dtype=FLAGS.dtype, param_dtype=FLAGS.param_dtype,
               backend=platform or jax.default_backend(), **row)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    app.run(main)
