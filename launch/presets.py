"""Pipeline presets: dataclasses; the command line selects one and overrides any field.

`--config=NAME` picks a preset and `--config.FIELD=VALUE` sets any of its fields,
nested ones included (`--config.rl_sup.loss.kl_coef=0.01`,
`--config.rl_self.optim.learning_rate=1e-6`, `--config.mesh=(1,8,1)`), through
ml_collections' config flags (launch/main.py).

`tiny` (a random tiny model, for tests), `smollm2` (the embedded default on a
CPU), and the paper's settings `qwen3_8b_base` / `llama31_8b_instruct` with the
verl GRPO defaults the MedSSR authors used (see ARCHITECTURE.md): 128 prompts x
8 rollouts per step, prompt <= 512 and response <= 3072 tokens, AdamW lr 3e-6
(wd 0.01), cosine with 10% warmup, grad clip 1.0, one update per rollout batch,
rollout temperature 1.0, low_var_kl at 0.005, token-mean aggregation.
"""

import copy
import dataclasses
import json
from typing import Any

from rl.loop import RLConfig
from rl.train_step import LossConfig, OptimConfig


@dataclasses.dataclass(unsafe_hash=True)  # settable for config flags, hashed by value (see OptimConfig)
class PipelineConfig:
    name: str
    model: str | None            # HF dir / .gguf / "asset:smollm2"; None: --model is required
    model_preset: str | None     # models.preset name for random weights (tests)
    dtype: str = "float32"            # computation
    param_dtype: str | None = None    # stored parameters and optimizer state; None: dtype
    remat: str = "none"               # none | full | dots (training activations)
    chat_template: str | None = None  # None: the checkpoint's; "raw" for base models
    mesh: tuple[int, int, int] = (1, -1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
    # synthesis
    alpha: float = 0.3
    num_questions: int = 43_000
    synth_model: str = "gpt-4.1"
    openai_base_url: str | None = None      # the LLM endpoint of API synthesis
    synth_generator: str = "auto"           # auto: api with an endpoint, else offline (small presets only)
    allow_offline_synthesis: bool = True    # False (paper presets): offline only when asked for explicitly
    retrieval_k: int = 3
    retriever: str = "minilm"               # minilm (built in) | medcpt (retriever_path)
    retriever_path: str | None = None       # MedCPT directory with query/ and article/ encoders
    corpus: str | None = None               # JSONL of literature passages beside the HPO profiles
    corpus_max_docs: int | None = None      # None: every HPO disease profile
    index_method: str = "auto"              # ScaNN: brute force below 20k documents, tree-AH above
    # seed questions and stage-2 questions held out of a benchmark file when --seeds /
    # --real_data are not given (evaluation then leaves them out); None: both flags needed
    holdout_benchmark: str | None = None
    holdout_seeds: int = 16
    holdout_real: int = 32
    # pseudo-labelling
    num_votes: int = 8
    label_threshold: float = 0.75
    label_keep: str = "gt"            # gt: keep confidence > threshold (the paper); ge: >=
    label_max_new_tokens: int = 3072
    label_recover: bool = False    # read unreadable votes by the evaluation's restricted letter decode
    label_batch_per_device: int = 16  # questions per sampler call, per device of the mesh
    lenient_answers: bool = False     # labels and GRPO rewards also read a leading "X." answer
    # GRPO (both stages)
    rl_self: RLConfig = RLConfig()
    rl_sup: RLConfig = RLConfig()
    rl_mode: str = "two_stage"        # two_stage (the paper) | mixed: one GRPO stage over both sets
    mix_ratio: float | None = None    # mixed: share of real questions in the pool (None: all of both)
    real_cap: int | None = None       # at most this many questions per --real_data source
    skip_stages: tuple[str, ...] = ()  # e.g. ("rl_self",): stage 2 starts from the base policy
    # evaluation
    eval_protocol: str = "medssr"     # medssr (the authors' harness) | legacy (not the paper's)
    eval_policies: tuple[str, ...] = ("base", "latest")  # base, rl_self, rl_sup, rl_mixed, latest
    eval_filter: str | None = None    # e.g. "is_reasoning": only records whose field is true
    eval_allow_partial: bool = False  # a benchmark file that lost records still counts (recorded)
    eval_generations: int = 4
    eval_temperature: float = 0.6
    eval_top_p: float = 0.95
    eval_top_k: int = 20
    eval_max_new_tokens: int = 2048
    eval_items_per_benchmark: int | None = None  # None: every item
    eval_batch_per_device: int = 32
    seed: int = 0

    def replace(self, **kw) -> "PipelineConfig":
        return dataclasses.replace(self, **kw)

    def resolved(self) -> "PipelineConfig":
        """With the GRPO settings that follow others filled in (RLConfig.resolved)."""
        return self.replace(rl_self=self.rl_self.resolved(), rl_sup=self.rl_sup.resolved())

    def to_dict(self) -> dict[str, Any]:
        """Every field as run (resolved), nested configs as dicts, JSON-ready (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self.resolved())))

    def describe(self) -> str:
        """The resolved configuration, one `path = value` line per field (nested fields dotted),
        in the form the command line takes (`--config.PATH=VALUE`)."""
        lines = [f"config {self.name}:"]

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                lines.append(f"  {prefix} = {value!r}")
        walk("", self.to_dict())
        return "\n".join(lines)

    def validate(self) -> "PipelineConfig":
        """Raise ValueError naming the first setting out of range."""
        checks = [
            (0.0 <= self.alpha <= 1.0, f"alpha must be in [0, 1], got {self.alpha}"),
            (self.num_questions >= 1, f"num_questions must be >= 1, got {self.num_questions}"),
            (self.num_votes >= 1, f"num_votes must be >= 1, got {self.num_votes}"),
            (0.0 <= self.label_threshold <= 1.0, f"label_threshold must be in [0, 1], got {self.label_threshold}"),
            (self.label_max_new_tokens >= 1, f"label_max_new_tokens must be >= 1, got {self.label_max_new_tokens}"),
            (self.retrieval_k >= 1, f"retrieval_k must be >= 1, got {self.retrieval_k}"),
            (self.eval_generations >= 1, f"eval_generations must be >= 1, got {self.eval_generations}"),
            (self.eval_temperature >= 0, f"eval_temperature must be >= 0 (0: greedy), got {self.eval_temperature}"),
            (0 < self.eval_top_p <= 1, f"eval_top_p must be in (0, 1], got {self.eval_top_p}"),
            (self.eval_top_k >= 0, f"eval_top_k must be >= 0 (0: off), got {self.eval_top_k}"),
            (self.eval_max_new_tokens >= 1, f"eval_max_new_tokens must be >= 1, got {self.eval_max_new_tokens}"),
            (self.eval_items_per_benchmark is None or self.eval_items_per_benchmark >= 1,
             f"eval_items_per_benchmark must be >= 1, got {self.eval_items_per_benchmark}"),
            (self.eval_protocol in ("medssr", "legacy"),
             f"eval_protocol must be medssr or legacy, got {self.eval_protocol!r}"),
            (self.label_keep in ("gt", "ge"), f"label_keep must be gt or ge, got {self.label_keep!r}"),
            (self.synth_generator in ("auto", "api", "offline"),
             f"synth_generator must be auto, api or offline, got {self.synth_generator!r}"),
            (self.synth_generator != "api" or bool(self.openai_base_url),
             "synth_generator=api needs --config.openai_base_url"),
            (self.retriever in ("minilm", "medcpt"), f"retriever must be minilm or medcpt, got {self.retriever!r}"),
            (self.retriever != "medcpt" or bool(self.retriever_path),
             "retriever=medcpt needs --config.retriever_path (a directory with the MedCPT query and article encoders)"),
            (self.rl_mode in ("two_stage", "mixed"), f"rl_mode must be two_stage or mixed, got {self.rl_mode!r}"),
            (self.mix_ratio is None or 0 < self.mix_ratio < 1, f"mix_ratio must be in (0, 1), got {self.mix_ratio}"),
            (self.mix_ratio is None or self.rl_mode == "mixed", "mix_ratio needs rl_mode=mixed"),
            (self.real_cap is None or self.real_cap >= 1, f"real_cap must be >= 1, got {self.real_cap}"),
            (set(self.skip_stages) <= {"rl_self", "rl_sup", "export"},
             f"skip_stages takes rl_self, rl_sup and export, got {','.join(self.skip_stages)}"),
            (self.rl_mode != "mixed" or not self.skip_stages or set(self.skip_stages) <= {"export"},
             "rl_mode=mixed runs one GRPO stage (rl_mixed); skip_stages can only drop export then"),
            (bool(self.eval_policies) and set(self.eval_policies) <= {"base", "rl_self", "rl_sup", "rl_mixed", "latest"},
             f"eval_policies takes base, rl_self, rl_sup, rl_mixed and latest, got {','.join(self.eval_policies)}"),
        ]
        for name in ("rl_self", "rl_sup"):
            rl = getattr(self, name)
            checks += [
                (rl.steps >= 1, f"{name}.steps must be >= 1, got {rl.steps}"),
                (rl.num_generations >= 1, f"{name}.num_generations must be >= 1, got {rl.num_generations}"),
                (rl.max_new_tokens >= 1, f"{name}.max_new_tokens must be >= 1, got {rl.max_new_tokens}"),
                (rl.temperature > 0, f"{name}.temperature must be > 0, got {rl.temperature}"),
                (rl.loss.temperature is None or rl.loss.temperature == rl.temperature,
                 f"{name}: the loss temperature {rl.loss.temperature} differs from the rollout temperature "
                 f"{rl.temperature}, so GRPO's ratio would be off-policy (leave {name}.loss.temperature "
                 f"unset to follow {name}.temperature)"),
                (rl.optim.total_steps is None or rl.optim.total_steps >= 1,
                 f"{name}.optim.total_steps must be >= 1 (or unset: the stage's steps), got {rl.optim.total_steps}"),
            ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        return self


def _paper_rl(steps: int) -> RLConfig:
    return RLConfig(steps=steps, prompts_per_step=128, num_generations=8, max_new_tokens=3072,
                    max_prompt_len=512, temperature=1.0, checkpoint_every=50, keep_checkpoints=3,
                    loss=LossConfig(clip_low=0.2, clip_high=0.2, dual_clip=3.0, kl_coef=0.005,
                                    kl_estimator="low_var_kl", agg="token-mean", micro_batch_size=8),
                    optim=OptimConfig(learning_rate=3e-6, weight_decay=0.01, warmup_ratio=0.1,
                                      grad_clip=1.0, schedule="cosine"))


def _small_rl(steps: int, prompts: int, gens: int, new_tokens: int, prompt_len: int) -> RLConfig:
    return RLConfig(steps=steps, prompts_per_step=prompts, num_generations=gens,
                    max_new_tokens=new_tokens, max_prompt_len=prompt_len, temperature=1.0,
                    checkpoint_every=1, keep_checkpoints=2, sampler_chunk=32,
                    loss=LossConfig(kl_coef=0.0, micro_batch_size=gens),
                    optim=OptimConfig(learning_rate=1e-5, warmup_ratio=0.0))


PRESETS: dict[str, PipelineConfig] = {
    "tiny": PipelineConfig(
        name="tiny", model=None, model_preset="tiny", num_questions=8, num_votes=4,
        corpus_max_docs=300, holdout_benchmark="medqa", holdout_seeds=8, holdout_real=8,
        label_threshold=0.25, label_max_new_tokens=16, label_recover=True, lenient_answers=True,
        rl_self=_small_rl(2, 2, 4, 16, 1024), rl_sup=_small_rl(2, 2, 4, 16, 1024),
        eval_generations=2, eval_max_new_tokens=16, eval_items_per_benchmark=4),
    "smollm2": PipelineConfig(
        name="smollm2", model="asset:smollm2", model_preset=None, num_questions=32, num_votes=4,
        remat="full",  # with CPU XLA's memory-first scheduler (launch.distributed): update temporaries 0.6 GB, not 3.6
        corpus_max_docs=1000,  # embedding 1,000 profiles at 256 tokens takes minutes on 2 cores, all 4,281 far longer
        holdout_benchmark="medqa", holdout_seeds=16, holdout_real=32,
        label_threshold=0.25, label_max_new_tokens=96, label_recover=True, lenient_answers=True,
        rl_self=_small_rl(4, 2, 4, 96, 512), rl_sup=_small_rl(4, 2, 4, 96, 512),
        eval_generations=2, eval_max_new_tokens=96, eval_items_per_benchmark=8),
    "qwen3_8b_base": PipelineConfig(
        name="qwen3_8b_base", model=None, model_preset=None, dtype="bfloat16", param_dtype="float32",
        remat="full", chat_template="raw", mesh=(1, -1, 1), allow_offline_synthesis=False,
        rl_self=_paper_rl(300), rl_sup=_paper_rl(300)),
    "llama31_8b_instruct": PipelineConfig(
        name="llama31_8b_instruct", model=None, model_preset=None, dtype="bfloat16", param_dtype="float32",
        remat="full", chat_template="llama3", mesh=(1, -1, 1), allow_offline_synthesis=False,
        rl_self=_paper_rl(300), rl_sup=_paper_rl(300)),
}


def pipeline_preset(name: str, **overrides) -> PipelineConfig:
    """A fresh copy of the preset `name` (nothing shared with PRESETS or other copies, so
    the command line's overrides can set its fields), with `overrides` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown --config {name!r}; known: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name]).replace(**overrides)
