"""The MedSSR pipeline stages over one run directory.

    synthesize -> label -> rl_self -> rl_sup -> eval -> export

Each stage reads what earlier stages wrote into the run directory, records a
manifest (launch.rundir) and writes its outputs atomically, so `all` skips
finished stages and resumes an interrupted one (GRPO stages from their
orbax checkpoints, synthesis from its append-only output).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from typing import Any, Callable

from launch.presets import PipelineConfig
from launch.rundir import RunDir, file_digest, write_json_atomic

STAGES = ("synthesize", "label", "rl_self", "rl_sup", "eval", "export")


@dataclasses.dataclass
class Inputs:
    model: str | None = None       # HF dir / .gguf; None: the preset's source
    seeds: str | None = None       # seed questions for API synthesis (MedSSR JSON / JSONL)
    real_data: str | None = None   # human-labelled questions for rl_sup
    benchmarks: str | None = None  # directory (or files) of MedSSR-format JSON


def read_real_data(path: str | os.PathLike):
    """Human-labelled questions, in whichever supported format the path holds.

    A directory or a .json list of {question, gold}: MedSSR evaluation format;
    a .json with "data" / "exams": HeadQA; .jsonl with "answer_idx": MedQA; with
    "cop": MedMCQA; anything else is an error naming the file.
    """
    from medssr_jax import data
    p = os.fspath(path)
    if os.path.isdir(p):
        return data.read_medssr_eval(p)
    if not os.path.exists(p):
        raise FileNotFoundError(f"{p}: no such file (--real_data)")
    with open(p, encoding="utf-8", errors="replace") as f:
        head = f.read(4096).lstrip()
    if p.endswith(".jsonl"):
        first = head.splitlines()[0] if head else ""
        if '"answer_idx"' in first:
            return data.read_medqa(p)
        if '"cop"' in first:
            return data.read_medmcqa(p)
        raise ValueError(f"{p}: JSONL of neither MedQA (answer_idx) nor MedMCQA (cop) records")
    if head.startswith("["):
        return data.read_medssr_eval(p)
    if head.startswith("{"):
        return data.read_headqa(p)
    raise ValueError(f"{p}: not a supported question file (MedSSR JSON, MedQA/MedMCQA JSONL, HeadQA JSON)")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Pipeline:
    def __init__(self, cfg: PipelineConfig, workdir: str | os.PathLike, inputs: Inputs):
        self.cfg, self.inputs = cfg, inputs
        self.run = RunDir(workdir)
        self._tokenizer = None

    # --- models ---------------------------------------------------------------
    def model_source(self) -> str:
        if self.inputs.model:
            return self.inputs.model
        if self.cfg.model_preset:
            return f"random:{self.cfg.model_preset}"
        from medssr_jax import assets
        return str(assets.smollm2_gguf())

    def tokenizer(self):
        if self._tokenizer is None:
            src = self.model_source()
            if src.startswith("random:"):
                from medssr_jax.tokenizers import byte_tokenizer
                self._tokenizer = byte_tokenizer()
            elif src.endswith(".gguf"):
                from models.gguf import tokenizer_from_gguf
                self._tokenizer = tokenizer_from_gguf(src)
            else:
                from medssr_jax.tokenizers import load_tokenizer
                self._tokenizer = load_tokenizer(src)
        return self._tokenizer

    def load_policy(self, after_stage: str | None = None):
        """The base policy, or the one a finished GRPO stage saved."""
        import models
        if after_stage is not None:
            return models.from_pretrained(self.run.root / after_stage / "model", dtype=self.cfg.dtype)
        src = self.model_source()
        if src.startswith("random:"):
            cfg = models.preset(src.split(":", 1)[1], tie_word_embeddings=False,
                                max_position_embeddings=4096, dtype=self.cfg.dtype,
                                param_dtype=self.cfg.dtype)
            return models.init_model(cfg, seed=self.cfg.seed), cfg
        return models.from_pretrained(src, dtype=self.cfg.dtype)

    def codec(self) -> tuple[Callable[[str], list[int]], Callable[[Any], str]]:
        tok = self.tokenizer()
        return (lambda s: tok.encode(s, add_special_tokens=False),
                lambda ids: tok.decode(list(ids), skip_special_tokens=True))

    # --- stages ---------------------------------------------------------------
    def synthesize(self) -> dict:
        cfg, out = self.cfg, self.run.stage_dir("synthesize")
        if cfg.openai_base_url:
            raise NotImplementedError("API synthesis from the pipeline is not wired yet; use "
                                      "synth.synthesize.synthesize directly or leave --openai_base_url unset")
        from synth.offline import generate_offline, write_offline
        items = generate_offline(n_items=cfg.num_questions, seed=cfg.seed)
        write_offline(items, out / "synthetic.jsonl")
        return dict(outputs={"synthetic": "synthetic.jsonl"},
                    summary={"items": len(items), "generator": "offline-hpo"})

    def label(self) -> dict:
        from synth.pseudo_label import pseudo_label
        from synth.synthesize import SynthItem
        cfg, out = self.cfg, self.run.stage_dir("label")
        src = self.run.root / "synthesize" / "synthetic.jsonl"
        items = [SynthItem.from_dict(json.loads(line)) for line in src.read_text().splitlines() if line]
        model, mcfg = self.load_policy()
        _, summary = pseudo_label(model, self.codec(), items, n=cfg.num_votes, threshold=cfg.label_threshold,
                                  template=mcfg.chat_template, max_new_tokens=cfg.label_max_new_tokens,
                                  temperature=1.0, seed=cfg.seed, out_dir=out)
        return dict(outputs={"pseudo_labelled": "pseudo_labelled.jsonl"}, summary=summary)

    def _rl(self, stage: str, rl_cfg, records: list[tuple[str, str, dict, str]], start_from: str | None) -> dict:
        import models
        from rl.loop import RLItem, option_letter_reward, run_grpo
        from synth.pseudo_label import build_prompt
        out = self.run.stage_dir(stage)
        if not records:
            raise ValueError(f"stage {stage}: no training items (all pseudo-labels dropped or no real data)")
        model, mcfg = self.load_policy(start_from)
        encode, decode = self.codec()
        items = [RLItem(rid, tuple(encode(build_prompt(q, opts, mcfg.chat_template))), label)
                 for rid, q, opts, label in records]
        max_prompt = max(len(it.prompt_tokens) for it in items)
        rl_cfg = dataclasses.replace(rl_cfg, max_prompt_len=max(rl_cfg.max_prompt_len, max_prompt),
                                     seed=self.cfg.seed)
        ref = None
        if rl_cfg.loss.kl_coef != 0:
            ref, _ = self.load_policy(start_from)
        letters = "".join(sorted({k for _, _, opts, _ in records for k in opts}))
        tok = self.tokenizer()
        trained, history = run_grpo(model, items, option_letter_reward(decode, letters), rl_cfg, out,
                                    ref_model=ref, eos_ids=list(mcfg.eos_token_ids),
                                    pad_id=tok.pad_token_id or 0)
        models.save_pretrained(trained, mcfg, out / "model")
        write_json_atomic(out / "history.json", history)
        return dict(outputs={"model": "model", "history": "history.json"},
                    summary={"steps": len(history),
                             "reward_first": history[0]["reward_mean"] if history else None,
                             "reward_last": history[-1]["reward_mean"] if history else None})

    def rl_self(self) -> dict:
        path = self.run.root / "label" / "pseudo_labelled.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line]
        records = [(r["id"], r["question"], r["options"], r["label"]) for r in rows if r.get("kept")]
        return self._rl("rl_self", self.cfg.rl_self, records, start_from=None)

    def rl_sup(self) -> dict:
        if not self.inputs.real_data:
            raise ValueError("stage rl_sup needs --real_data (human-labelled questions)")
        data = read_real_data(self.inputs.real_data)
        rows = data.load()
        if data.stats.n_skipped:
            log(f"rl_sup: skipped malformed records in {self.inputs.real_data}: {dict(data.stats.skipped)}")
        records = [(r.id, r.question, r.options, r.answer) for r in rows if r.answer is not None]
        return self._rl("rl_sup", self.cfg.rl_sup, records, start_from="rl_self")

    def _trained_stage(self) -> str | None:
        """The latest finished GRPO stage (rl_sup, else rl_self), or None for the base model."""
        for stage in ("rl_sup", "rl_self"):
            m = self.run.manifest(stage)
            if m is not None and m.get("status") == "done":
                return stage
        return None

    def benchmark_records(self) -> dict[str, list]:
        import numpy as np

        from medssr_jax.data import eval_dir, read_medssr_eval
        src = eval_dir(self.inputs.benchmarks)
        if not src.exists():
            raise FileNotFoundError(f"{src}: no benchmark files (--benchmarks or MEDSSR_EVAL_DIR)")
        by_bench: dict[str, list] = {}
        for r in read_medssr_eval(src).load():
            by_bench.setdefault(r.source, []).append(r)
        k = self.cfg.eval_items_per_benchmark
        if k is not None:  # a seeded sample of each benchmark
            rng = np.random.default_rng(self.cfg.seed)
            by_bench = {b: [rs[i] for i in sorted(rng.permutation(len(rs))[:k])] for b, rs in by_bench.items()}
        return by_bench

    def eval(self) -> dict:
        from medssr_jax.evaluation import evaluate, write_results
        cfg, out = self.cfg, self.run.stage_dir("eval")
        model, mcfg = self.load_policy(self._trained_stage())
        results = evaluate(model, self.tokenizer(), self.benchmark_records(), template=mcfg.chat_template,
                           num_generations=cfg.eval_generations, temperature=cfg.eval_temperature,
                           top_p=cfg.eval_top_p, top_k=cfg.eval_top_k,
                           max_new_tokens=cfg.eval_max_new_tokens, seed=cfg.seed)
        write_results(results, out)
        summary = {b: round(r["accuracy_mean"], 4) for b, r in results["benchmarks"].items()}
        return dict(outputs={"results": "results.json", "table": "results.md", "plot": "accuracy.png"},
                    summary=dict(summary, policy=self._trained_stage() or "base"))

    def export(self) -> dict:
        src = self.run.root / "rl_sup" / "model"
        if not (src / "config.json").exists():
            src = self.run.root / "rl_self" / "model"
        dst = self.run.stage_dir("export") / "model"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
        return dict(outputs={"model": "model"}, summary={"from": src.parent.name})

    # --- orchestration --------------------------------------------------------
    def stage_inputs(self, stage: str) -> dict[str, str]:
        src = self.model_source()
        inputs = {"model": src if src.startswith("random:") else file_digest(src)}
        upstream = {"label": ["synthesize"], "rl_self": ["label"], "rl_sup": ["rl_self"],
                    "export": ["rl_self"]}.get(stage, [])
        if stage == "eval" and self._trained_stage():
            upstream = [self._trained_stage()]
        for up in upstream:
            inputs[f"stage:{up}"] = self.run.manifest_hash(up)
        if stage == "rl_sup" and self.inputs.real_data:
            inputs["real_data"] = file_digest(self.inputs.real_data)
        return inputs

    def run_stage(self, stage: str) -> dict | None:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}, all")
        config = dataclasses.asdict(self.cfg)
        status = self.run.begin(stage, self.stage_inputs(stage), config)
        if status == "skip":
            log(f"{stage}: finished earlier, skipped")
            return None
        log(f"{stage}: {'resuming' if status == 'resume' else 'starting'}")
        result = getattr(self, stage)()
        self.run.finish(stage, result["outputs"], result.get("summary"))
        log(f"{stage}: done {result.get('summary', {})}")
        return result
