#!/usr/bin/env bash
# The medssr-jax pipeline on one GPU: what fits, and the stages that do.
#
#   launch/single_gpu.sh install                       # venv, jax[cuda12], this package
#   MODEL=/path/to/Qwen3-8B-Base launch/single_gpu.sh plan   # the memory arithmetic only
#   MODEL=/path/to/Qwen3-8B-Base launch/single_gpu.sh run    # the stages that fit
#
# What fits on one 80 GB GPU (H100 / A100-80GB); `plan` redoes this for your
# model and GPU from the checkpoint's config.json and nvidia-smi:
#
# * Qwen3-8B weights in bf16: 8.19e9 params x 2 B = 16.4 GB.
# * label (8 votes, 16 questions per sampler call = 128 sequences, up to 3,072 new
#   tokens): KV is 36 layers x 8 KV heads x 128 x 2 (K, V) x 2 B = 147,456 B per
#   token, so 128 x 3,072 x 147,456 B = 58.0 GB, plus the shared prompt KV
#   (16 x 512 x 147,456 B = 1.2 GB) and the weights: 75.6 GB. An 80 GB H100
#   (85.5e9 B) gives 79.1 GB at XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 less 2 GiB of
#   headroom: it fits, where JAX's default fraction of 0.75 would not. On a smaller
#   card `plan` lowers the label length (--config.label_max_new_tokens) to what fits.
# * eval (32 questions x 4 generations = 128 sequences, up to 2,048 new tokens):
#   38.7 GB of KV + 16.4 GB of weights: fits.
# * GRPO (rl_self, rl_sup) at 8B does NOT fit on one GPU: the train step keeps
#   fp32 master weights, fp32 gradient accumulators and two fp32 AdamW moments,
#   16 B/param = 131 GB, plus the frozen bf16 reference model for the KL term
#   (2 B/param = 16.4 GB). Parameters and AdamW moments held in bf16 (what
#   param_dtype=bfloat16 gives) would still be 2 + 4 + 2 + 2 = 10 B/param = 82 GB.
#   Train an 8B model with FSDP over 8 GPUs or a TPU slice
#   (launch/tpu_pod.sh). On one GPU, `run` does synthesize -> label -> eval for an
#   8B model and leaves out the GRPO stages and export.
# * A smaller model trains on one GPU, e.g. Qwen3-1.7B-Base: 16 B/param x 1.72e9 =
#   27.5 GB + 3.4 GB reference. GRPO samples 128 prompts x 8 rollouts in one call,
#   so the rollout KV (1,024 sequences x 114,688 B per token for Qwen3-1.7B) bounds
#   the response length: `plan` gives rollouts 60% of the memory left after the
#   training state (the rest is for the update's activations) and sets
#   --config.rl_self.max_new_tokens / --config.rl_sup.max_new_tokens from it: 160 tokens on an 80 GB H100, 480
#   on a 141 GB H200, far below the paper's 3,072 (override with
#   RL_MAX_NEW_TOKENS / RL_NUM_GENERATIONS, e.g. 4 generations for longer ones).
#
# Settings (environment): MODEL (HF checkpoint directory, required), CONFIG
# (pipeline preset, default qwen3_8b_base; llama31_8b_instruct for Llama),
# WORKDIR, REAL_DATA (rl_sup), BENCHMARKS, SEEDS, GPU (index, default 0),
# MEM_FRACTION (default 0.95), VENV (default .venv), EXTRAS (default synth),
# LABEL_MAX_NEW_TOKENS, RL_MAX_NEW_TOKENS, RL_NUM_GENERATIONS, TRAIN (auto|yes|no).
# Flags after `run` go to every launch.main call. OPENAI_API_KEY is read by the
# pipeline from the environment when set; this script never prints it.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODEL=${MODEL:-}
CONFIG=${CONFIG:-qwen3_8b_base}
WORKDIR=${WORKDIR:-}
REAL_DATA=${REAL_DATA:-}
BENCHMARKS=${BENCHMARKS:-}
SEEDS=${SEEDS:-}
GPU=${GPU:-0}
MEM_FRACTION=${MEM_FRACTION:-0.95}
VENV=${VENV:-$ROOT/.venv}
EXTRAS=${EXTRAS:-synth}
LABEL_MAX_NEW_TOKENS=${LABEL_MAX_NEW_TOKENS:-}
RL_MAX_NEW_TOKENS=${RL_MAX_NEW_TOKENS:-}
RL_NUM_GENERATIONS=${RL_NUM_GENERATIONS:-}
TRAIN=${TRAIN:-auto}

# One visible GPU: JAX preallocates on every GPU it sees, and the pipeline uses one.
export CUDA_VISIBLE_DEVICES=$GPU
# JAX's default preallocation is 75% of the card; the sampler's KV needs most of it.
export XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-true}
# The package imports from this checkout even before `install`.
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
# Compiled programs are reused across the stages' processes and across reruns.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/jax_compilation}

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

die() { echo "single_gpu.sh: $*" >&2; exit 1; }

python_bin() {
  if [[ -x $VENV/bin/python ]]; then echo "$VENV/bin/python"; else command -v python3; fi
}

cmd_install() {
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "python3 is $(python3 -V 2>&1); medssr-jax needs Python >= 3.11"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  local spec=$ROOT
  if [[ -n $EXTRAS ]]; then spec="${ROOT}[${EXTRAS}]"; fi
  "$VENV/bin/python" -m pip install --quiet --upgrade "jax[cuda12]" -e "$spec"
  "$VENV/bin/python" -c 'import jax; d = jax.devices()[0]; print(f"jax {jax.__version__}: {d.platform} {d.device_kind}")'
}

gpu_memory_bytes() {
  if [[ -n ${GPU_MEMORY_GB:-} ]]; then
    awk -v gb="$GPU_MEMORY_GB" 'BEGIN { printf "%.0f\n", gb * 1e9 }'
    return
  fi
  command -v nvidia-smi >/dev/null || die "nvidia-smi not found; set GPU_MEMORY_GB"
  local mib
  mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i "$GPU" | head -n 1)
  echo $((mib * 1024 * 1024))
}

# Prints the arithmetic to stderr and "TRAIN LABEL_TOKENS RL_TOKENS RL_GENERATIONS" to stdout
# (LABEL_TOKENS 0: the preset's length fits).
plan() {
  [[ -n $MODEL ]] || die "MODEL is not set (an HF checkpoint directory with config.json)"
  [[ -f $MODEL/config.json ]] || die "$MODEL/config.json not found (MODEL must be an HF checkpoint directory)"
  local memory
  memory=$(gpu_memory_bytes)
  JAX_PLATFORMS=cpu MEMORY=$memory MODEL=$MODEL CONFIG=$CONFIG TRAIN=$TRAIN \
    LABEL_MAX_NEW_TOKENS=$LABEL_MAX_NEW_TOKENS RL_MAX_NEW_TOKENS=$RL_MAX_NEW_TOKENS \
    RL_NUM_GENERATIONS=$RL_NUM_GENERATIONS "$(python_bin)" - <<'EOF'
import json, math, os, sys

from launch.presets import pipeline_preset
from models.config import ModelConfig

env = os.environ
model_dir, config = env["MODEL"], env["CONFIG"]
cfg = ModelConfig.from_hf(json.load(open(os.path.join(model_dir, "config.json"))),
                          source=os.path.join(model_dir, "config.json"))
preset = pipeline_preset(config)
rl = preset.rl_self
n = cfg.num_params()
kv = cfg.kv_bytes_per_token(2)
gb = 1e9
memory = int(env["MEMORY"])
fraction = float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"])
budget = memory * fraction - 2 * 2**30  # 2 GiB for XLA scratch and cuDNN workspaces
weights = 2 * n                                            # the pipeline loads bf16
prompt = rl.max_prompt_len                                 # prompt allowance per question (512)


def say(line):
    print(line, file=sys.stderr)


def round_down(x, m):
    return int(x // m * m)


say(f"model {model_dir}: {n / 1e9:.2f}e9 params, KV {kv:,} B/token; GPU {memory / gb:.1f} GB, "
    f"budget {budget / gb:.1f} GB (x{fraction} - 2 GiB)")
say(f"  weights (bf16) 2 B x {n / 1e9:.2f}e9 = {weights / gb:.1f} GB")

# label: pseudo_label samples 16 questions per call, num_votes each, prompt KV shared per question
rows = 16 * preset.num_votes
fixed = weights + 16 * prompt * kv
fit = (budget - fixed) / (rows * kv)
label = preset.label_max_new_tokens
if env.get("LABEL_MAX_NEW_TOKENS"):
    label = int(env["LABEL_MAX_NEW_TOKENS"])
elif fit < label:
    label = round_down(fit, 128)
if label < 128:
    sys.exit(f"single_gpu.sh: {weights / gb:.1f} GB of weights leave too little of the {budget / gb:.1f} GB "
             f"budget to sample {rows} sequences")
need = fixed + rows * label * kv
say(f"  label: {rows} sequences x {label} tokens x {kv:,} B = {rows * label * kv / gb:.1f} GB KV, "
    f"{need / gb:.1f} GB with weights + prompt KV (fits up to {max(fit, 0):.0f} tokens; preset "
    f"{preset.label_max_new_tokens})")

# eval: 32 questions x eval_generations per call, up to eval_max_new_tokens
rows_e = 32 * preset.eval_generations
need_e = weights + 32 * prompt * kv + rows_e * preset.eval_max_new_tokens * kv
say(f"  eval: {rows_e} sequences x {preset.eval_max_new_tokens} tokens: {need_e / gb:.1f} GB"
    + ("" if need_e <= budget else "  ** over the budget: expect out-of-memory **"))

# GRPO: fp32 master weights + fp32 grads + 2 fp32 AdamW moments, + bf16 reference when kl_coef != 0
ref = 2 * n if rl.loss.kl_coef else 0
state = 16 * n + ref
gens = int(env.get("RL_NUM_GENERATIONS") or rl.num_generations)
rollouts = rl.prompts_per_step * gens
left = budget - state
rl_tokens = int(env.get("RL_MAX_NEW_TOKENS") or max(round_down(0.6 * left / (rollouts * kv) - prompt / gens, 32), 0))
say(f"  GRPO state: 16 B x {n / 1e9:.2f}e9 + reference {ref / gb:.1f} GB = {state / gb:.1f} GB; "
    f"left {left / gb:.1f} GB")
train_mode = env.get("TRAIN", "auto")
if train_mode == "no":
    train = False
elif train_mode == "yes":
    train = True
else:
    train = left > 0 and rl_tokens >= 128
if train:
    say(f"  GRPO rollouts: {rl.prompts_per_step} prompts x {gens} = {rollouts} sequences x {rl_tokens} tokens "
        f"= {rollouts * rl_tokens * kv / gb:.1f} GB KV (preset: {rl.max_new_tokens} tokens)")
else:
    say("  GRPO does not fit on this GPU: rl_self, rl_sup and export are left out "
        "(FSDP over several devices: launch/tpu_pod.sh)")
print(int(train), label if label != preset.label_max_new_tokens else 0, rl_tokens, gens)
EOF
}

cmd_plan() {
  plan >/dev/null
}

cmd_run() {
  local planned train label_tokens rl_tokens rl_gens
  planned=$(plan)
  read -r train label_tokens rl_tokens rl_gens <<<"$planned"
  local workdir=${WORKDIR:-runs/$(basename "${MODEL%/}")-1gpu}
  local common=(--config="$CONFIG" --workdir="$workdir" --model="$MODEL")
  if [[ -n $BENCHMARKS ]]; then common+=(--benchmarks="$BENCHMARKS"); fi
  if [[ -n $SEEDS ]]; then common+=(--seeds="$SEEDS"); fi
  if [[ $train == 1 && -z $REAL_DATA ]]; then
    die "REAL_DATA is not set: rl_sup needs human-labelled questions (or TRAIN=no for label/eval only)"
  fi

  # Each stage records its own flags in its manifest; rerunning this script with the
  # same settings skips finished stages and resumes an interrupted one.
  local py stage
  py=$(python_bin)
  local stages=(synthesize label eval)
  if [[ $train == 1 ]]; then stages=(synthesize label rl_self rl_sup eval export); fi
  for stage in "${stages[@]}"; do
    local extra=()
    case $stage in
      label) if [[ $label_tokens != 0 ]]; then extra=(--config.label_max_new_tokens="$label_tokens"); fi ;;
      rl_self) extra=(--config.rl_self.max_new_tokens="$rl_tokens" --config.rl_self.num_generations="$rl_gens") ;;
      rl_sup) extra=(--config.rl_sup.max_new_tokens="$rl_tokens" --config.rl_sup.num_generations="$rl_gens"
                     --real_data="$REAL_DATA") ;;
    esac
    echo "== $stage" >&2
    "$py" -m launch.main --stage="$stage" "${common[@]}" ${extra[@]+"${extra[@]}"} "$@"
  done
  echo "run directory: $workdir" >&2
}

main() {
  local sub=${1:-help}
  if [[ $# -gt 0 ]]; then shift; fi
  case $sub in
    install) cmd_install ;;
    plan) cmd_plan ;;
    run) cmd_run "$@" ;;
    help | -h | --help) usage ;;
    *) usage >&2; exit 2 ;;
  esac
}

main "$@"
