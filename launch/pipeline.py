"""The MedSSR pipeline stages over one run directory.

    synthesize -> label -> rl_self -> rl_sup -> eval -> export

Each stage reads what earlier stages wrote into the run directory, records a
manifest (launch.rundir) and writes its outputs atomically, so `all` skips
finished stages and resumes an interrupted one (GRPO stages from their
orbax checkpoints, synthesis from its append-only output).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from launch.distributed import is_main
from launch.presets import PipelineConfig
from launch.rundir import RunDir, file_digest, write_json_atomic
from medssr_jax import hostmem, multihost
from medssr_jax.redact import redact_text

STAGES = ("synthesize", "label", "rl_self", "rl_sup", "rl_mixed", "eval", "export")
HOST_STAGES = ("synthesize", "export")  # no JAX collectives: process 0 alone runs them
TRAINED = ("export", "rl_sup", "rl_mixed", "rl_self")  # where a run directory keeps its policy, newest first
GRPO_STAGES = ("rl_self", "rl_sup", "rl_mixed")


def stages_for(cfg: PipelineConfig) -> tuple[str, ...]:
    """The stages `--stage=all` runs: the paper's two GRPO stages (or the mixed
    single stage) in order, less the ones the preset skips."""
    grpo = ("rl_mixed",) if cfg.rl_mode == "mixed" else ("rl_self", "rl_sup")
    return tuple(s for s in ("synthesize", "label", *grpo, "eval", "export") if s not in cfg.skip_stages)


class StageError(RuntimeError):
    """A stage stopped before finishing; rerunning the same command resumes it."""


def resolve_model(path: str) -> str:
    """An HF directory or .gguf file as given; a run directory: its latest trained policy."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such model (--model takes an HF directory, a .gguf file or a "
                                f"run directory)")
    if p.is_dir() and not (p / "config.json").exists():
        for stage in TRAINED:
            manifest = p / stage / "manifest.json"
            if (p / stage / "model" / "config.json").exists() and manifest.exists() and \
                    RunDir(p).manifest(stage)["status"] == "done":  # a damaged manifest is named
                return str(p / stage / "model")
        raise FileNotFoundError(f"{p}: neither an HF checkpoint (config.json) nor a run directory with a "
                                f"trained policy ({', '.join(s + '/model' for s in TRAINED)})")
    return str(p)


@dataclasses.dataclass
class Inputs:
    model: str | None = None       # HF dir / .gguf; None: the preset's source
    seeds: str | None = None       # seed questions for API synthesis (MedSSR JSON / JSONL)
    real_data: tuple[str, ...] = ()  # human-labelled question sources for stage 2 ("path" or "path@cap")
    benchmarks: str | None = None  # directory (or one file) of MedSSR-format JSON

    def __post_init__(self):
        if isinstance(self.real_data, str):
            self.real_data = (self.real_data,)
        self.real_data = tuple(x.strip() for entry in (self.real_data or ()) for x in str(entry).split(",")
                               if x.strip())


def real_source(spec: str) -> tuple[str, int | None]:
    """``path`` or ``path@cap`` -> (path, cap)."""
    path, sep, cap = spec.rpartition("@")
    if not sep or not path:
        return spec, None
    if not cap.isdigit() or int(cap) < 1:
        raise ValueError(f"--real_data {spec!r}: the cap after @ must be a positive integer")
    return path, int(cap)


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
    if p.endswith(".jsonl"):
        # the format is that of the first line that parses: a broken first line is the
        # reader's to report (file and line), not a reason to misjudge the file
        with open(p, encoding="utf-8", errors="replace") as f:
            for line in itertools.islice(f, 1000):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and "answer_idx" in rec:
                    return data.read_medqa(p)
                if isinstance(rec, dict) and "cop" in rec:
                    return data.read_medmcqa(p)
                break
        raise ValueError(f"{p}: JSONL of neither MedQA (answer_idx) nor MedMCQA (cop) records")
    with open(p, encoding="utf-8", errors="replace") as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):
        return data.read_medssr_eval(p)
    if head.startswith("{"):
        return data.read_headqa(p)
    raise ValueError(f"{p}: not a supported question file (MedSSR JSON, MedQA/MedMCQA JSONL, HeadQA JSON)")


def log(msg: str) -> None:
    """Progress on stderr, from process 0 only."""
    if is_main():
        print(redact_text(msg), file=sys.stderr, flush=True)


class Pipeline:
    def __init__(self, cfg: PipelineConfig, workdir: str | os.PathLike, inputs: Inputs):
        self.cfg, self.inputs = cfg, inputs
        self.run = RunDir(workdir)
        self._tokenizer = None
        self._mesh = None
        self._model_input = None
        self._holdout = None
        self._benchmark_files = None

    # --- models ---------------------------------------------------------------
    def check_inputs(self, stages=STAGES) -> None:
        """Fail fast, naming the flag, when an input the given stages read does not exist."""
        from medssr_jax.data import eval_dir
        self.model_source()
        sources = [("--seeds", self.inputs.seeds)] + [("--real_data", real_source(x)[0]) for x in self.inputs.real_data]
        if "synthesize" in stages:
            sources += [("--config.corpus", self.cfg.corpus), ("--config.retriever_path", self.cfg.retriever_path)]
        for flag, value in sources:
            if value and not Path(value).exists():
                raise FileNotFoundError(f"{value}: no such file or directory ({flag})")
        if "eval" in stages and not eval_dir(self.inputs.benchmarks).exists():
            raise FileNotFoundError(f"{eval_dir(self.inputs.benchmarks)}: no benchmark files; pass --benchmarks="
                                    f"<directory or file of MedSSR JSON> or set MEDSSR_EVAL_DIR")
        if self.uses_holdout() and {"synthesize", "rl_sup", "rl_mixed"} & set(stages) \
                and not self.holdout_path().is_file():
            raise FileNotFoundError(f"{self.holdout_path()}: the {self.cfg.name} preset holds its seed and stage-2 "
                                    f"questions out of this file; pass --benchmarks=<directory holding it>, or "
                                    f"--seeds and --real_data")
        if "synthesize" in stages:
            self.generator()

    def generator(self) -> str:
        """The question generator of the synthesis stage: ``api`` or ``offline``."""
        cfg = self.cfg
        if cfg.synth_generator == "api" or (cfg.synth_generator == "auto" and cfg.openai_base_url):
            return "api"
        if cfg.synth_generator == "auto" and not cfg.allow_offline_synthesis:
            raise ValueError(f"the {cfg.name} preset synthesizes with an LLM endpoint: pass --config.openai_base_url "
                             f"(key from OPENAI_API_KEY), or --config.synth_generator=offline for the offline HPO "
                             f"generator (not the paper's)")
        return "offline"

    def model_source(self) -> str:
        if self.inputs.model:
            return resolve_model(self.inputs.model)
        if self.cfg.model_preset:
            return f"random:{self.cfg.model_preset}"
        if self.cfg.model == "asset:smollm2":
            from medssr_jax import assets
            return str(assets.smollm2_gguf())
        if self.cfg.model:
            return resolve_model(self.cfg.model)
        raise ValueError(f"the {self.cfg.name} preset needs --model (an HF checkpoint directory of the "
                         f"policy, e.g. a local copy of the paper's model)")

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

    def mesh(self):
        if self._mesh is None:
            from medssr_jax.sharding import make_mesh
            self._mesh = make_mesh(*self.cfg.mesh)
        return self._mesh

    def load_policy(self, after_stage: str | None = None):
        """The base policy, or the one a finished GRPO stage saved, sharded on the preset's mesh.

        Parameters are stored in ``param_dtype`` (float32 master weights for
        the optimizer) and computed in ``dtype``; the preset's chat template
        (raw for base models) and rematerialisation apply."""
        import models
        cfg = self.cfg
        over = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype or cfg.dtype, remat=cfg.remat)
        if cfg.chat_template:
            over["chat_template"] = cfg.chat_template
        if after_stage is not None:
            return models.from_pretrained(self.run.root / after_stage / "model", mesh=self.mesh(), **over)
        src = self.model_source()
        if src.startswith("random:"):
            mcfg = models.preset(src.split(":", 1)[1], tie_word_embeddings=False,
                                 max_position_embeddings=4096, **over)
            return models.init_model(mcfg, seed=cfg.seed, mesh=self.mesh()), mcfg
        return models.from_pretrained(src, mesh=self.mesh(), **over)

    def codec(self) -> tuple[Callable[[str], list[int]], Callable[[Any], str]]:
        tok = self.tokenizer()
        return (lambda s: tok.encode(s, add_special_tokens=False),
                lambda ids: tok.decode(list(ids), skip_special_tokens=True))

    # --- data -----------------------------------------------------------------
    def holdout_path(self) -> Path:
        """The benchmark file the small presets hold seeds and stage-2 questions out
        of: ``<holdout_benchmark>.json`` in --benchmarks (a directory) or beside it (a file)."""
        from medssr_jax.data import eval_dir
        d = eval_dir(self.inputs.benchmarks)
        return (d if d.is_dir() or not d.suffix else d.parent) / f"{self.cfg.holdout_benchmark}.json"

    def holdout(self) -> tuple[list, list, set[str]]:
        """(seed questions, human-labelled questions, their ids) held out of the
        preset's benchmark when --seeds / --real_data are not given: a seeded
        permutation of :meth:`holdout_path` gives the first ``holdout_seeds``
        records as seeds and the next ``holdout_real`` as stage-2 data;
        evaluation of that file leaves all of them out."""
        cfg = self.cfg
        if not cfg.holdout_benchmark:
            return [], [], set()
        if self._holdout is not None:
            return self._holdout
        from medssr_jax.data import read_medssr_eval
        path = self.holdout_path()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the {cfg.name} preset holds its seed and stage-2 questions out "
                                    f"of this file; pass --benchmarks, or --seeds and --real_data")
        records = read_medssr_eval(path).load()
        order = np.random.default_rng(cfg.seed).permutation(len(records))
        seeds = [records[i] for i in order[:cfg.holdout_seeds]]
        real = [records[i] for i in order[cfg.holdout_seeds:cfg.holdout_seeds + cfg.holdout_real]]
        self._holdout = seeds, real, {r.id for r in seeds + real}
        return self._holdout

    def uses_holdout(self) -> bool:
        return bool(self.cfg.holdout_benchmark) and not (self.inputs.seeds and self.inputs.real_data)

    def seed_questions(self) -> list:
        from synth.synthesize import SeedQuestion
        if self.inputs.seeds:
            data = read_real_data(self.inputs.seeds)
            rows = data.load()
            if data.stats.n_skipped:
                log(f"synthesize: skipped malformed seed records in {self.inputs.seeds}: "
                    f"{dict(data.stats.skipped)}")
        elif self.cfg.holdout_benchmark:
            rows = self.holdout()[0]
        else:
            raise ValueError("stage synthesize needs --seeds (seed questions to pair)")
        return [SeedQuestion(id=r.id, question=r.question, options=dict(r.options), answer=r.answer)
                for r in rows]

    def encoders(self) -> dict:
        """The retrieval encoders: ``query`` and ``article`` as (encoder, tokenizer), their
        pooling, normalisation and token lengths (each encoder's real length), and a name.

        ``minilm``: all-MiniLM-L6-v2 from the asset cache for both sides (mean pooling,
        L2-normalised, 256 tokens as its sentence-transformers config says). ``medcpt``:
        the MedCPT query and article encoders from config.retriever_path (sub-directories
        ``query`` and ``article``, or ``MedCPT-Query-Encoder`` / ``MedCPT-Article-Encoder``),
        [CLS] pooling, inner product, 64 query and 512 article tokens."""
        from tokenizers import Tokenizer

        from medssr_jax import assets
        from models import bert

        def load(d: Path):
            if not (d / "tokenizer.json").is_file():
                raise FileNotFoundError(f"{d}: no tokenizer.json beside the encoder (--config.retriever_path)")
            encoder, bcfg = bert.from_pretrained(d)
            tok = Tokenizer.from_file(str(d / "tokenizer.json"))
            tok.no_padding()
            tok.no_truncation()
            return encoder, tok, int(bcfg.max_position_embeddings)

        if self.cfg.retriever == "medcpt":
            root = Path(self.cfg.retriever_path)
            sides = {}
            for side, names in (("query", ("query", "MedCPT-Query-Encoder")),
                                ("article", ("article", "MedCPT-Article-Encoder"))):
                d = next((root / n for n in names if (root / n / "config.json").is_file()), None)
                if d is None:
                    raise FileNotFoundError(f"{root}: no MedCPT {side} encoder (expected {names[0]}/ or "
                                            f"{names[1]}/ with config.json, model.safetensors, tokenizer.json)")
                sides[side] = load(d)
            (qe, qt, qmax), (ae, at, amax) = sides["query"], sides["article"]
            return dict(query=(qe, qt), article=(ae, at), pooling="cls", normalize=False,
                        query_len=min(64, qmax), doc_len=min(512, amax), name="medcpt")
        d = assets.minilm_dir()
        encoder, tok, pos = load(d)
        st = bert.sentence_transformers_pooling(d)
        length = min(int(st["max_len"] or pos), pos)
        return dict(query=(encoder, tok), article=(encoder, tok), pooling=st["pooling"], normalize=st["normalize"],
                    query_len=length, doc_len=length, name="minilm")

    def knowledge(self):
        """The HPO rare diseases, the documents retrieval reads (their profiles, plus the
        passages of config.corpus) and a retriever over them (encoders: :meth:`encoders`; index: ScaNN).

        Documents are embedded at the article encoder's real length, once, into the
        asset cache (resumable shards, one cache per encoder, length and corpus) and
        reused by later runs."""
        import hashlib

        from medssr_jax import assets
        from synth import knowledge as kn
        from synth import retrieval as rt
        terms = kn.load_obo()
        diseases = kn.load_diseases(obo_terms=terms)
        if self.cfg.corpus_max_docs is not None:
            diseases = sorted(diseases, key=lambda d: d.id)[:self.cfg.corpus_max_docs]
        docs = list(kn.build_corpus(diseases, terms))
        key = f"hpo{len(docs)}"
        if self.cfg.corpus:
            extra = list(kn.read_corpus_jsonl(self.cfg.corpus))
            clash = {d["id"] for d in docs} & {str(d["id"]) for d in extra}
            if clash:
                raise ValueError(f"{self.cfg.corpus}: document ids also used by the HPO profiles: {sorted(clash)[:3]}")
            docs += extra
            key += f"-{Path(self.cfg.corpus).stem}{len(extra)}-{file_digest(self.cfg.corpus)[:12]}"
        enc = self.encoders()
        if enc["name"] == "medcpt":
            key += "-" + hashlib.sha256(str(Path(self.cfg.retriever_path).resolve()).encode()).hexdigest()[:8]
        (q_encoder, q_tok), (a_encoder, a_tok) = enc["query"], enc["article"]
        emb, ids = rt.embed_corpus(a_encoder, a_tok, docs, batch_size=64, max_len=enc["doc_len"],
                                   pooling=enc["pooling"], normalize=enc["normalize"],
                                   out_dir=assets.cache_dir() / "embeddings" / f"{enc['name']}-{enc['doc_len']}-{key}")
        index = rt.Index.build(emb, ids, method=self.cfg.index_method)
        log(f"synthesize: {len(docs)} documents indexed ({len(diseases)} HPO profiles"
            + (f", {len(docs) - len(diseases)} passages of {self.cfg.corpus}" if self.cfg.corpus else "")
            + f"; {enc['name']} at {enc['doc_len']} tokens; {index.backend}, {index.method})")
        return diseases, docs, rt.Retriever(q_encoder, q_tok, index, docs, query_pooling=enc["pooling"],
                                            normalize=enc["normalize"], max_len=enc["query_len"])

    # --- stages ---------------------------------------------------------------
    def synthesize(self) -> dict:
        from synth.synthesize import plan_prompts, rare_ratio
        cfg, out = self.cfg, self.run.stage_dir("synthesize")
        seeds = self.seed_questions()
        diseases, _, retriever = self.knowledge()
        entities = sorted({d.name for d in diseases})
        if self.generator() == "api":
            from synth.synthesize import synthesize
            report = synthesize(seeds, out, n_prompts=cfg.num_questions, alpha=cfg.alpha, entities=entities,
                                retriever=retriever, k_docs=cfg.retrieval_k, seed=cfg.seed,
                                model=cfg.synth_model, base_url=cfg.openai_base_url)
            if report.failed or report.not_started:
                raise StageError(f"{report.failed} prompts failed and {report.not_started} were not sent "
                                   f"(see the log above); rerun the same command to retry them")
            summary = {"items": self._count_lines(out / "synthetic.jsonl"),
                       "rejected": self._count_lines(out / "rejected.jsonl"),
                       "rejected_by_reason_this_call": report.rejected_by_reason,
                       "rare_ratio": report.rare_ratio, "generator": cfg.synth_model,
                       "cost_usd": report.cost_usd}
            return dict(outputs={"synthetic": "synthetic.jsonl"}, summary=summary)
        from synth.offline import generate_for_plan, write_offline
        specs = plan_prompts(seeds, cfg.num_questions, alpha=cfg.alpha, entities=entities, seed=cfg.seed)
        items = generate_for_plan(specs, diseases, retriever, k_docs=cfg.retrieval_k, seeds=seeds)
        write_offline(items, out / "synthetic.jsonl")  # atomically: a unique temporary file, renamed
        return dict(outputs={"synthetic": "synthetic.jsonl"},
                    summary={"items": len(items), "seeds": len(seeds), "rare_ratio": rare_ratio(specs),
                             "alpha": cfg.alpha, "generator": "offline-hpo"})

    @staticmethod
    def _count_lines(path) -> int:
        return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.exists() else 0

    def prompter(self, mcfg):
        """The question protocol of this run for the policy ``mcfg``: prompts, answer
        reading and recovery shared by labelling, both GRPO stages and evaluation."""
        from medssr_jax.protocol import Prompter
        return Prompter(self.tokenizer(), mcfg.chat_template, family=mcfg.family,
                        protocol=self.cfg.eval_protocol, lenient=self.cfg.lenient_answers)

    def label(self) -> dict:
        from synth.pseudo_label import pseudo_label
        from synth.synthesize import SynthItem
        cfg, out = self.cfg, self.run.stage_dir("label")
        src = self.run.root / "synthesize" / "synthetic.jsonl"
        items = [SynthItem.from_dict(json.loads(line)) for line in src.read_text().splitlines() if line]
        model, mcfg = self.load_policy()
        _, summary = pseudo_label(model, self.tokenizer(), items, n=cfg.num_votes, threshold=cfg.label_threshold,
                                  keep=cfg.label_keep, prompter=self.prompter(mcfg),
                                  max_new_tokens=cfg.label_max_new_tokens,
                                  temperature=1.0, seed=cfg.seed, out_dir=out if is_main() else None,
                                  recover=cfg.label_recover,
                                  batch_size=cfg.label_batch_per_device * self.mesh().size)
        return dict(outputs={"pseudo_labelled": "pseudo_labelled.jsonl"}, summary=summary)

    def start_policy(self, stage: str) -> str | None:
        """The finished stage whose policy a GRPO stage starts from (None: the base model)."""
        if stage == "rl_sup" and "rl_self" not in self.cfg.skip_stages:
            return "rl_self"
        return None

    def _rl(self, stage: str, rl_cfg, records: list[tuple[str, str, dict, str]], start_from: str | None,
            summary: dict | None = None) -> dict:
        import models
        from rl.loop import RLItem, run_grpo
        out = self.run.stage_dir(stage)
        if not records:
            raise ValueError(f"stage {stage}: no training items (all pseudo-labels dropped or no real data)")
        model, mcfg = self.load_policy(start_from)
        _, decode = self.codec()
        prompter = self.prompter(mcfg)
        items = [RLItem(rid, tuple(prompter.prompt_ids(q, opts)), label) for rid, q, opts, label in records]
        # verl drops prompts over max_prompt_len; rows are padded to the longest prompt left,
        # rounded up to 64 tokens, rather than to the limit
        over = [it for it in items if len(it.prompt_tokens) > rl_cfg.max_prompt_len]
        if over:
            log(f"{stage}: {len(over)} of {len(items)} prompts are longer than {rl_cfg.max_prompt_len} "
                f"tokens and are left out")
            items = [it for it in items if len(it.prompt_tokens) <= rl_cfg.max_prompt_len]
            if not items:
                raise ValueError(f"stage {stage}: every prompt is longer than max_prompt_len "
                                 f"{rl_cfg.max_prompt_len}")
        longest = max(len(it.prompt_tokens) for it in items)
        rl_cfg = dataclasses.replace(rl_cfg, max_prompt_len=min(rl_cfg.max_prompt_len, -(-longest // 64) * 64),
                                     seed=self.cfg.seed)
        ref = None
        if rl_cfg.loss.kl_coef != 0:
            ref, _ = self.load_policy(start_from)
        letters_of = {rid: "".join(opts) for rid, _, opts, _ in records}

        def reward(item, completion) -> float:  # 1 when the protocol reads the item's label
            return 1.0 if prompter.read(decode(completion.tokens), letters_of[item.id]) == item.label else 0.0
        tok = self.tokenizer()
        trained, history = run_grpo(model, items, reward, rl_cfg, out,
                                    ref_model=ref, eos_ids=list(mcfg.eos_token_ids),
                                    pad_id=tok.pad_token_id or 0)
        models.save_pretrained(trained, mcfg, out / "model")
        if is_main():
            write_json_atomic(out / "history.json", history)
        from rl.loop import read_plan
        return dict(outputs={"model": "model", "history": "history.json"},
                    summary={"steps": len(history), "items": len(items), "dropped_long_prompts": len(over),
                             "plan": read_plan(out),
                             "start_policy": start_from or "base",
                             "reward_first": history[0]["reward_mean"] if history else None,
                             "reward_last": history[-1]["reward_mean"] if history else None, **(summary or {})})

    def synthetic_records(self) -> list[tuple[str, str, dict, str]]:
        path = self.run.root / "label" / "pseudo_labelled.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line]
        return [(r["id"], r["question"], r["options"], r["label"]) for r in rows]  # kept labels only

    def real_records(self, stage: str) -> tuple[list[tuple[str, str, dict, str]], dict]:
        """Stage-2 questions of every --real_data source (each capped by ``@cap`` or
        the preset's ``real_cap``, a seeded sample), and the counts per source."""
        counts: dict[str, dict] = {}
        if self.inputs.real_data:
            records = []
            for k, spec in enumerate(self.inputs.real_data):
                path, cap = real_source(spec)
                cap = cap or self.cfg.real_cap
                data = read_real_data(path)
                rows = [r for r in data.load() if r.answer is not None]
                if data.stats.n_skipped:
                    log(f"{stage}: skipped malformed records in {path}: {dict(data.stats.skipped)}")
                if not rows:
                    raise ValueError(f"{path}: no labelled questions (--real_data)")
                read = len(rows)
                if cap is not None and len(rows) > cap:
                    pick = np.random.default_rng([self.cfg.seed, k]).permutation(len(rows))[:cap]
                    rows = [rows[i] for i in sorted(pick)]
                counts[Path(path).name] = {"read": read, "used": len(rows), "cap": cap,
                                           "skipped": data.stats.n_skipped}
                records += [(f"{Path(path).stem}:{r.id}", r.question, r.options, r.answer) for r in rows]
            return records, counts
        if self.cfg.holdout_benchmark:
            rows = self.holdout()[1]
            counts[f"holdout of {self.holdout_path().name}"] = {"read": len(rows), "used": len(rows), "cap": None,
                                                                 "skipped": 0}
            return [(r.id, r.question, r.options, r.answer) for r in rows if r.answer is not None], counts
        raise ValueError(f"stage {stage} needs --real_data (human-labelled questions)")

    def rl_self(self) -> dict:
        return self._rl("rl_self", self.cfg.rl_self, self.synthetic_records(), start_from=None)

    def rl_sup(self) -> dict:
        records, counts = self.real_records("rl_sup")
        return self._rl("rl_sup", self.cfg.rl_sup, records, start_from=self.start_policy("rl_sup"),
                        summary={"sources": counts})

    def rl_mixed(self) -> dict:
        """One GRPO stage over the kept synthetic items and the real questions together
        (the paper's single-stage ablation); ``mix_ratio`` sets the real share of the pool."""
        synthetic = self.synthetic_records()
        real, counts = self.real_records("rl_mixed")
        ratio = self.cfg.mix_ratio
        if ratio is not None and synthetic and real:
            # the largest pool with the asked share: all of the scarcer side, a seeded sample of the other
            n_real = min(len(real), int(round(len(synthetic) * ratio / (1 - ratio))))
            n_syn = min(len(synthetic), int(round(n_real * (1 - ratio) / ratio)))
            rng = np.random.default_rng(self.cfg.seed)
            real = [real[i] for i in sorted(rng.permutation(len(real))[:max(n_real, 1)])]
            synthetic = [synthetic[i] for i in sorted(rng.permutation(len(synthetic))[:max(n_syn, 1)])]
        pool = synthetic + real
        return self._rl("rl_mixed", self.cfg.rl_sup, pool, start_from=None,
                        summary={"sources": counts, "synthetic_items": len(synthetic), "real_items": len(real),
                                 "mix_ratio": ratio})

    def _trained_stage(self) -> str | None:
        """The latest finished GRPO stage, or None for the base model."""
        for stage in ("rl_sup", "rl_mixed", "rl_self"):
            m = self.run.manifest(stage)
            if m is not None and m.get("status") == "done":
                return stage
        return None

    def eval_policies(self) -> list[tuple[str, str | None]]:
        """(name, finished stage or None for the base) of each policy to evaluate, in order;
        ``latest`` names the latest finished GRPO stage (left out when that is the base)."""
        out: list[tuple[str, str | None]] = []
        for p in self.cfg.eval_policies:
            stage = self._trained_stage() if p == "latest" else (None if p == "base" else p)
            if p == "latest" and stage is None and "base" in self.cfg.eval_policies:
                continue
            if stage is not None:
                m = self.run.manifest(stage)
                if m is None or m.get("status") != "done":
                    raise ValueError(f"eval_policies names {p}, but stage {stage} has not finished in "
                                     f"{self.run.root}")
            name = stage or "base"
            if name not in [n for n, _ in out]:
                out.append((name, stage))
        return out

    def benchmark_files(self):
        """The benchmark files of --benchmarks as the harness reads them, each
        filtered and sampled as the preset says; the held-out seed and stage-2
        questions are left out of the file they came from. Read once per run, whatever the
        number of policies evaluated."""
        if self._benchmark_files is not None:
            return self._benchmark_files
        from medssr_jax.data import benchmark_files, eval_dir, read_benchmark_file
        cfg = self.cfg
        held_out, holdout_file = set(), None
        if self.uses_holdout():
            holdout_file = self.holdout_path().resolve()
        files = []
        for path in benchmark_files(eval_dir(self.inputs.benchmarks)):
            bf = read_benchmark_file(path)
            if not bf.records:
                raise ValueError(f"{path}: no readable records ({dict(bf.skipped) or 'empty file'})")
            if bf.skipped and not cfg.eval_allow_partial:
                raise ValueError(f"{path}: {sum(bf.skipped.values())} records could not be read "
                                 f"({bf.errors[0]}{' ...' if len(bf.errors) > 1 else ''}); fix the file or "
                                 f"pass --config.eval_allow_partial")
            if holdout_file is not None and path.resolve() == holdout_file:
                held_out = self.holdout()[2]
                bf.records = [r for r in bf.records if r["id"] not in held_out]
            if cfg.eval_filter:
                if not any(cfg.eval_filter in r for r in bf.records):
                    log(f"eval: {path.name} has no {cfg.eval_filter!r} field; left out by config.eval_filter")
                    continue
                bf.records = [r for r in bf.records if r.get(cfg.eval_filter) is True]
            k = cfg.eval_items_per_benchmark
            if k is not None and len(bf.records) > k:  # a seeded sample of each file
                pick = np.random.default_rng(cfg.seed).permutation(len(bf.records))[:k]
                bf.records = [bf.records[i] for i in sorted(pick)]
            if bf.duplicate_ids:
                log(f"eval: {path.name} holds duplicate ids: {', '.join(bf.duplicate_ids[:10])}")
            files.append(bf)
        if not files:
            raise ValueError(f"no benchmark file has records with {cfg.eval_filter!r} set")
        self._benchmark_files = files
        return files

    def benchmark_records(self) -> dict[str, list]:
        """The legacy protocol's records: options parsed, grouped by benchmark file."""
        from medssr_jax.data import MCQ
        from medssr_jax.answers import parse_options
        by_bench = {}
        for bf in self.benchmark_files():
            rows = []
            for r in bf.records:
                stem, options = parse_options(r["question"])
                rows.append(MCQ(id=r["id"], question=stem, options=options, answer=r["gold"].upper(),
                                source=bf.name))
            by_bench[bf.name] = rows
        return by_bench

    def eval(self) -> dict:
        from medssr_jax.evaluation import evaluate, evaluate_medssr, write_results
        cfg, out = self.cfg, self.run.stage_dir("eval")
        summary, tables = {}, {}
        for name, stage in self.eval_policies():
            target = out / name
            if (target / "results.json").is_file():  # finished before an interruption
                results = json.loads((target / "results.json").read_text())
            else:
                model, mcfg = self.load_policy(stage)
                kw = dict(num_generations=cfg.eval_generations, temperature=cfg.eval_temperature,
                          top_p=cfg.eval_top_p, top_k=cfg.eval_top_k, max_new_tokens=cfg.eval_max_new_tokens,
                          seed=cfg.seed, batch_size=cfg.eval_batch_per_device * self.mesh().size)
                log(f"eval: policy {name}")
                if cfg.eval_protocol == "medssr":
                    model_name = Path(self.model_source()).name if stage is None else f"{stage}/model"
                    results = evaluate_medssr(model, self.prompter(mcfg), self.benchmark_files(),
                                              model_name=model_name, **kw)
                else:
                    results = evaluate(model, self.tokenizer(), self.benchmark_records(),
                                       template=mcfg.chat_template, **kw)
                results["config"]["policy"] = name
                if is_main():
                    write_results(results, target)
            summary[name] = {b: round(r["accuracy_mean"], 4) for b, r in results["benchmarks"].items()}
            tables[name] = {b: r.get("skipped", {}) for b, r in results["benchmarks"].items()}
        partial = {p: t for p, t in tables.items() if any(t.values())}
        return dict(outputs={name: f"{name}/results.json" for name in summary},
                    summary=dict(accuracy=summary, policies=list(summary), protocol=cfg.eval_protocol,
                                 **({"partial": partial} if partial else {})))

    def export(self) -> dict:
        stage = self._trained_stage()
        if stage is None:
            raise ValueError("stage export needs a finished GRPO stage (rl_self, rl_sup or rl_mixed)")
        src = self.run.root / stage / "model"
        dst = self.run.stage_dir("export") / "model"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
        return dict(outputs={"model": "model"}, summary={"from": src.parent.name})

    # --- orchestration --------------------------------------------------------
    def stage_inputs(self, stage: str) -> dict[str, str]:
        inputs = {"model": self.model_input()}
        upstream = {"label": ["synthesize"], "rl_self": ["label"], "rl_mixed": ["label"],
                    "rl_sup": [self.start_policy("rl_sup")] if self.start_policy("rl_sup") else []}.get(stage, [])
        if stage == "eval":
            upstream = [st for _, st in self.eval_policies() if st]
        elif stage == "export":
            upstream = [self._trained_stage() or ("rl_mixed" if self.cfg.rl_mode == "mixed" else "rl_self")]
        for up in upstream:  # an unfinished one is refused, naming it
            inputs[f"stage:{up}"] = self.run.manifest_hash(up)
        if stage == "synthesize":
            inputs["seeds"] = file_digest(self.inputs.seeds) if self.inputs.seeds else self._holdout_input()
            if self.cfg.corpus:
                inputs["corpus"] = file_digest(self.cfg.corpus)
        if stage in ("rl_sup", "rl_mixed"):
            inputs["real_data"] = ([f"{spec} {file_digest(real_source(spec)[0])}" for spec in self.inputs.real_data]
                                   if self.inputs.real_data else self._holdout_input())
        if stage == "eval":
            from medssr_jax.data import benchmark_files, eval_dir
            inputs["benchmarks"] = {f.name: file_digest(f) for f in benchmark_files(eval_dir(self.inputs.benchmarks))}
            if self.uses_holdout():
                inputs["held_out"] = self._holdout_input()
        return inputs

    def model_input(self) -> str:
        """The base policy as a manifest input: the file name and its SHA-256 (hashed once per run)."""
        if self._model_input is None:
            src = self.model_source()
            self._model_input = src if src.startswith("random:") else f"{Path(src).name} sha256:{file_digest(src)}"
        return self._model_input

    def stage_config(self, stage: str) -> dict:
        """The settings that shape a stage's outputs (upstream settings reach it through the
        upstream manifest hashes), so changing a later stage's settings does not refuse an
        earlier finished stage. Batch sizes of sampled stages are effective (per device x
        devices), since the sampling seeds follow the batches."""
        cfg = dataclasses.asdict(self.cfg.resolved())  # as run: loss temperature and lr schedule filled in
        policy = ["name", "model", "model_preset", "dtype", "param_dtype", "remat", "chat_template", "mesh",
                  "seed", "eval_protocol"]
        holdout = ["holdout_benchmark", "holdout_seeds", "holdout_real"]
        fields = {
            "synthesize": ["name", "seed", "alpha", "num_questions", "synth_model", "openai_base_url", "retrieval_k",
                           "corpus_max_docs", "index_method", "synth_generator", "retriever", "retriever_path",
                           "corpus"] + holdout,
            "label": policy + ["num_votes", "label_threshold", "label_keep", "label_max_new_tokens", "label_recover",
                               "lenient_answers"],
            "rl_self": policy + ["rl_self", "lenient_answers"],
            "rl_sup": policy + ["rl_sup", "lenient_answers", "real_cap", "skip_stages"] + holdout,
            "rl_mixed": policy + ["rl_sup", "lenient_answers", "real_cap", "mix_ratio"] + holdout,
            "eval": policy + [k for k in cfg if k.startswith("eval_")] + holdout,
            "export": ["name"],
        }[stage]
        out = {k: cfg[k] for k in fields}
        if stage == "label":
            out["label_batch"] = self.cfg.label_batch_per_device * self.mesh().size
        if stage == "eval":
            out["eval_batch"] = self.cfg.eval_batch_per_device * self.mesh().size
        return out

    def _holdout_input(self) -> str | None:
        if not self.cfg.holdout_benchmark:
            return None
        path = self.holdout_path()
        return f"holdout of {path.name} " + (file_digest(path) if path.is_file() else "(missing)")

    def run_stage(self, stage: str) -> dict | None:
        """Run one stage unless it finished earlier with the same inputs and configuration.

        With several processes, every process takes part in the stages that
        use the sharded policy; process 0 alone writes manifests and files, and
        runs the host-side synthesis stage, and all processes meet at a barrier
        before and after each stage."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}, all")
        config = self.stage_config(stage)
        inputs = self.stage_inputs(stage)
        main = is_main()
        status = self.run.begin(stage, inputs, config, write=main, record={"run_config": self.cfg.to_dict()})
        multihost.barrier(f"begin:{stage}")
        if status == "skip":
            log(f"{stage}: finished earlier, skipped")
            return None
        log(f"{stage}: {'resuming' if status == 'resume' else 'starting'}")
        if stage in HOST_STAGES:
            result, error = None, None
            if main:
                try:
                    result = getattr(self, stage)()
                except Exception as e:  # noqa: BLE001  re-raised below, after telling the others
                    error = e
            if not multihost.broadcast_from_main(np.int32(error is None)):  # process 0's failure, everywhere
                if error is not None:
                    raise error
                raise StageError(f"stage {stage} failed on process 0 (see its log)")
        else:
            result = getattr(self, stage)()
        if main:
            self.run.finish(stage, result["outputs"], result.get("summary"))
            log(f"{stage}: done {result.get('summary', {})}")
        multihost.barrier(f"finish:{stage}")
        if jax.default_backend() == "cpu":  # what the stage freed, back to the system before the next
            hostmem.release_free_memory()
        return result
