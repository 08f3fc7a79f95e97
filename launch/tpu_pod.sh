#!/usr/bin/env bash
# shellcheck disable=SC2016  # remote scripts are single-quoted on purpose: they expand on the workers
# Run the medssr-jax pipeline on a Cloud TPU VM slice (one process per TPU host).
#
#   launch/tpu_pod.sh create   # gcloud compute tpus tpu-vm create
#   launch/tpu_pod.sh setup    # repo + Python env (+ gcsfuse, data copies) on every worker
#   launch/tpu_pod.sh run      # python -m launch.main on every worker
#   launch/tpu_pod.sh logs     # tail worker 0's log of a DETACH=1 run
#   launch/tpu_pod.sh stop     # stop a DETACH=1 run on every worker
#   launch/tpu_pod.sh delete   # delete the slice
#
# Settings come from environment variables (see `launch/tpu_pod.sh help`); the
# command line after the subcommand of `run` is passed on to launch.main, e.g.
#   MODEL=gs://my-bucket/Qwen3-8B-Base REAL_DATA=gs://my-bucket/medqa_train.jsonl \
#   BENCHMARKS=gs://my-bucket/medssr-eval GCS_BUCKET=my-bucket \
#   launch/tpu_pod.sh run --config.alpha=0.3
#
# Multi-host: every worker runs the same command. With DISTRIBUTED=explicit (the
# default on slices of more than one host) the script passes launch.main
# --coordinator_address=<worker 0's internal IP>:8476, --num_processes=<hosts> and
# --process_id=<this worker's index from the TPU VM metadata>; DISTRIBUTED=auto
# passes none of them and leaves detection on the TPU VM to launch.main / JAX.
#
# Run directories are plain POSIX paths (launch/rundir.py), and orbax writes every
# host's checkpoint shards into the same directory, so on a multi-host slice the
# workdir must be shared: set GCS_BUCKET and the bucket is mounted with gcsfuse at
# /mnt/$GCS_BUCKET on every worker (WORKDIR then defaults to a folder in it).
#
# Secrets: OPENAI_API_KEY, when set in the caller's environment, is copied to
# every worker as a mode-600 file and exported from it inside the run; it is
# never printed nor put on a command line. Nothing else secret is read.
set -euo pipefail

TPU_NAME=${TPU_NAME:-medssr-v5p}
ZONE=${ZONE:-us-east5-a}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5p-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-v2-alpha-tpuv5}
PROJECT=${PROJECT:-}
SPOT=${SPOT:-0}
RESERVED=${RESERVED:-0}
SCOPES=${SCOPES:-https://www.googleapis.com/auth/cloud-platform}

REPO_URL=${REPO_URL:-}
REPO_REF=${REPO_REF:-main}
REMOTE_DIR=${REMOTE_DIR:-medssr-jax}
VENV=${VENV:-medssr-venv}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
EXTRAS=${EXTRAS:-synth}

GCS_BUCKET=${GCS_BUCKET:-}
MODEL=${MODEL:-}
REAL_DATA=${REAL_DATA:-}
BENCHMARKS=${BENCHMARKS:-}
SEEDS=${SEEDS:-}

STAGE=${STAGE:-all}
CONFIG=${CONFIG:-qwen3_8b_base}
RUN_NAME=${RUN_NAME:-${CONFIG}}
WORKDIR=${WORKDIR:-}
DISTRIBUTED=${DISTRIBUTED:-}
COORDINATOR_PORT=${COORDINATOR_PORT:-8476}
DETACH=${DETACH:-0}
YES=${YES:-0}

# Folders under the workers' home that setup replaces: never empty, absolute or with "..".
for dir in "$REMOTE_DIR" "$VENV"; do
  if [[ -z $dir || $dir == /* || $dir == *..* ]]; then
    echo "tpu_pod.sh: REMOTE_DIR and VENV must be relative folder names under the workers' home" >&2
    exit 2
  fi
done

usage() {
  cat <<EOF
usage: launch/tpu_pod.sh {create|setup|run|logs|stop|delete|help} [launch.main flags for run]

  create  create the TPU VM slice
  setup   copy the repo to every worker, make a Python $PYTHON_VERSION venv, pip install
          -e ".[${EXTRAS}]" and jax[tpu]; mount GCS_BUCKET; copy gs:// MODEL /
          REAL_DATA / BENCHMARKS / SEEDS to local disk on every worker
  run     python -m launch.main --stage=\$STAGE --config=\$CONFIG --workdir=\$WORKDIR
          --model=... [--real_data=...] [--benchmarks=...] [--seeds=...] [your flags]
          on all workers (foreground; DETACH=1 starts it in the background)
  logs    tail worker 0's log of the current run
  stop    stop a DETACH=1 run on every worker
  delete  delete the slice

slice (current values)
  TPU_NAME=$TPU_NAME  ZONE=$ZONE  ACCELERATOR_TYPE=$ACCELERATOR_TYPE
  RUNTIME_VERSION=$RUNTIME_VERSION (v5p: v2-alpha-tpuv5, v5e: v2-alpha-tpuv5-lite,
  v6e: v2-alpha-tpuv6e, v4: tpu-ubuntu2204-base)  PROJECT=${PROJECT:-<gcloud default>}
  SPOT=$SPOT  RESERVED=$RESERVED  SCOPES=$SCOPES (read gs:// data, write the gcsfuse mount)
code
  REPO_URL=${REPO_URL:-<unset: ship HEAD of this checkout with git archive>}  REPO_REF=$REPO_REF
  REMOTE_DIR=~/$REMOTE_DIR  VENV=~/$VENV  EXTRAS=$EXTRAS
data (a path that exists on every worker, or a gs:// URI copied there by setup)
  MODEL=${MODEL:-<unset>}  (HF directory of Qwen3-8B-Base / Llama-3.1-8B-Instruct; required by run)
  REAL_DATA=${REAL_DATA:-<unset>}  (human-labelled questions for rl_sup)
  BENCHMARKS=${BENCHMARKS:-<unset>}  (MedSSR evaluation JSON directory)
  SEEDS=${SEEDS:-<unset>}  GCS_BUCKET=${GCS_BUCKET:-<unset>}
run
  STAGE=$STAGE  CONFIG=$CONFIG  RUN_NAME=$RUN_NAME  WORKDIR=${WORKDIR:-<from GCS_BUCKET or ~/medssr_runs>}
  DISTRIBUTED=${DISTRIBUTED:-<explicit on multi-host slices, else auto>}  DETACH=$DETACH
  OPENAI_API_KEY: copied to the workers (mode 600) only when set; never printed

Multi-worker ssh needs your key in ssh-agent first (ssh-add ~/.ssh/google_compute_engine).
EOF
}

die() { echo "tpu_pod.sh: $*" >&2; exit 1; }

tmp_files=()  # local temporary files (run script, key copy, repo archive), removed on exit
trap 'rm -f ${tmp_files[@]+"${tmp_files[@]}"}' EXIT

gcloud_tpu() {
  local flags=(--zone="$ZONE")
  if [[ -n $PROJECT ]]; then flags+=(--project="$PROJECT"); fi
  gcloud compute tpus tpu-vm "$@" "${flags[@]}"
}

# Run a bash script (read from the arguments) on every worker.
on_all_workers() {
  gcloud_tpu ssh "$TPU_NAME" --worker=all --command="$1"
}

# `export NAME=<quoted value>;` for each NAME, to prefix a remote script.
remote_env() {
  local name out=""
  for name in "$@"; do
    out+="export $name=$(printf '%q' "${!name}"); "
  done
  printf '%s' "$out"
}

# Where a MODEL / REAL_DATA / ... value lives on the workers ($2: the workers' home).
worker_path() {
  local value=$1 home=$2
  if [[ $value == gs://* ]]; then
    printf '%s/medssr_assets/%s' "$home" "$(basename "${value%/}")"
  else
    printf '%s' "$value"
  fi
}

num_workers() {
  gcloud_tpu describe "$TPU_NAME" --format='value(networkEndpoints.len())'
}

cmd_create() {
  local flags=(--accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
  if [[ $SPOT == 1 ]]; then flags+=(--spot); fi
  if [[ $RESERVED == 1 ]]; then flags+=(--reserved); fi
  if [[ -n $SCOPES ]]; then flags+=(--scopes="$SCOPES"); fi
  gcloud_tpu create "$TPU_NAME" "${flags[@]}"
}

ship_repo() {
  local root archive
  root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
  if [[ -n $(git -C "$root" status --porcelain --untracked-files=no) ]]; then
    echo "tpu_pod.sh: uncommitted changes are not shipped (git archive HEAD)" >&2
  fi
  archive=$(mktemp)
  tmp_files+=("$archive")
  git -C "$root" archive --format=tar.gz -o "$archive" HEAD
  gcloud_tpu scp "$archive" "$TPU_NAME":medssr-jax.tar.gz --worker=all
  on_all_workers "$(remote_env REMOTE_DIR)"'set -euo pipefail
    rm -rf ~/"$REMOTE_DIR" && mkdir -p ~/"$REMOTE_DIR"
    tar -xzf ~/medssr-jax.tar.gz -C ~/"$REMOTE_DIR" && rm -f ~/medssr-jax.tar.gz'
}

cmd_setup() {
  if [[ -n $REPO_URL ]]; then
    on_all_workers "$(remote_env REPO_URL REPO_REF REMOTE_DIR)"'set -euo pipefail
      if [ -d ~/"$REMOTE_DIR"/.git ]; then git -C ~/"$REMOTE_DIR" fetch --quiet origin
      else git clone --quiet "$REPO_URL" ~/"$REMOTE_DIR"; fi
      git -C ~/"$REMOTE_DIR" checkout --quiet "$REPO_REF"
      git -C ~/"$REMOTE_DIR" pull --quiet --ff-only || true'
  else
    ship_repo
  fi

  # Python >= 3.11 (pyproject) whatever the image ships: uv fetches a managed CPython.
  on_all_workers "$(remote_env REMOTE_DIR VENV PYTHON_VERSION EXTRAS)"'set -euo pipefail
    python3 -m pip install --quiet --user --upgrade uv ||
      python3 -m pip install --quiet --user --upgrade --break-system-packages uv
    ~/.local/bin/uv venv --seed --allow-existing --python "$PYTHON_VERSION" ~/"$VENV"
    spec=~/"$REMOTE_DIR"
    if [ -n "$EXTRAS" ]; then spec="$spec[$EXTRAS]"; fi
    ~/"$VENV"/bin/python -m pip install --quiet --upgrade pip
    ~/"$VENV"/bin/python -m pip install --quiet -e "$spec" "jax[tpu]"
    # every host joins the TPU runtime at once, so this runs on all workers together
    timeout 600 ~/"$VENV"/bin/python -c "import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count(), jax.devices()[0].device_kind)"'

  if [[ -n $GCS_BUCKET ]]; then
    on_all_workers "$(remote_env GCS_BUCKET)"'set -euo pipefail
      if ! command -v gcsfuse >/dev/null; then
        repo="gcsfuse-$(lsb_release -c -s)"
        curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg |
          sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
        echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt $repo main" |
          sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
        sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
      fi
      sudo mkdir -p /mnt/"$GCS_BUCKET" && sudo chown "$(id -u):$(id -g)" /mnt/"$GCS_BUCKET"
      mountpoint -q /mnt/"$GCS_BUCKET" || gcsfuse --implicit-dirs --metadata-cache-ttl-secs=0 "$GCS_BUCKET" /mnt/"$GCS_BUCKET"'
  fi

  local name uri
  for name in MODEL REAL_DATA BENCHMARKS SEEDS; do
    uri=${!name}
    if [[ $uri == gs://* ]]; then
      echo "copying $name ($uri) to every worker" >&2
      on_all_workers "$(remote_env uri)"'set -euo pipefail
        mkdir -p ~/medssr_assets && gcloud storage cp --recursive "${uri%/}" ~/medssr_assets/'
    fi
  done
}

cmd_run() {
  [[ -n $MODEL ]] || die "MODEL is not set (an HF checkpoint directory or gs:// URI); see: $0 help"
  local workers home workdir distributed
  workers=$(num_workers)
  [[ $workers =~ ^[0-9]+$ && $workers -ge 1 ]] || die "could not read the worker count of $TPU_NAME"
  home=$(gcloud_tpu ssh "$TPU_NAME" --worker=0 --command='printf %s "$HOME"')
  [[ $home == /* ]] || die "could not read the home directory on worker 0 of $TPU_NAME"
  if [[ -n $WORKDIR ]]; then workdir=$WORKDIR
  elif [[ -n $GCS_BUCKET ]]; then workdir=/mnt/$GCS_BUCKET/medssr_runs/$RUN_NAME
  else workdir=$home/medssr_runs/$RUN_NAME
  fi
  if [[ $workers -gt 1 && -z $GCS_BUCKET && -z $WORKDIR ]]; then
    echo "tpu_pod.sh: $workers hosts, each with its own local WORKDIR; orbax checkpoints need a" \
         "shared one (set GCS_BUCKET, or WORKDIR on a shared mount)" >&2
  fi
  if [[ -n $DISTRIBUTED ]]; then distributed=$DISTRIBUTED
  elif [[ $workers -gt 1 ]]; then distributed=explicit
  else distributed=auto
  fi
  [[ $distributed == explicit || $distributed == auto ]] || die "DISTRIBUTED must be explicit or auto"

  local args=(--stage="$STAGE" --config="$CONFIG" --workdir="$workdir" --model="$(worker_path "$MODEL" "$home")")
  if [[ -n $REAL_DATA ]]; then args+=(--real_data="$(worker_path "$REAL_DATA" "$home")"); fi
  if [[ -n $BENCHMARKS ]]; then args+=(--benchmarks="$(worker_path "$BENCHMARKS" "$home")"); fi
  if [[ -n $SEEDS ]]; then args+=(--seeds="$(worker_path "$SEEDS" "$home")"); fi
  local with_process_id=0
  if [[ $distributed == explicit && $workers -gt 1 ]]; then
    local coordinator
    coordinator=$(gcloud_tpu describe "$TPU_NAME" --format='value(networkEndpoints[0].ipAddress)')
    [[ -n $coordinator ]] || die "could not read worker 0's internal IP of $TPU_NAME"
    args+=(--coordinator_address="$coordinator:$COORDINATOR_PORT" --num_processes="$workers")
    # shellcheck disable=SC2034  # read by remote_env through ${!name}
    with_process_id=1
  fi
  args+=("$@")

  # One run script for every worker; each reads its process index from the VM's metadata.
  local quoted_args="" a
  for a in "${args[@]}"; do quoted_args+=" $(printf '%q' "$a")"; done
  local script
  script=$(mktemp)
  tmp_files+=("$script")
  {
    echo '#!/usr/bin/env bash'
    echo 'set -euo pipefail'
    remote_env REMOTE_DIR VENV with_process_id
    echo
    echo "set --${quoted_args}"
    cat <<'EOF'
cd ~/"$REMOTE_DIR"
source ~/"$VENV"/bin/activate
export JAX_COMPILATION_CACHE_DIR=~/.cache/jax_compilation
if [ -f ~/.medssr/openai_key ]; then
  OPENAI_API_KEY=$(cat ~/.medssr/openai_key)
  export OPENAI_API_KEY
fi
if [ "$with_process_id" = 1 ]; then
  id=$(curl -fsS -H "Metadata-Flavor: Google" \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)
  set -- "$@" --process_id="$id"
fi
echo "worker $(hostname): python -m launch.main $*" >&2
exec python -m launch.main "$@"
EOF
  } >"$script"
  gcloud_tpu scp "$script" "$TPU_NAME":medssr_run.sh --worker=all

  if [[ -n ${OPENAI_API_KEY:-} ]]; then
    local keyfile
    keyfile=$(mktemp)  # created mode 600
    tmp_files+=("$keyfile")
    printf '%s' "$OPENAI_API_KEY" >"$keyfile"
    on_all_workers 'mkdir -p ~/.medssr && chmod 700 ~/.medssr'
    gcloud_tpu scp "$keyfile" "$TPU_NAME":.medssr/openai_key --worker=all
    on_all_workers 'chmod 600 ~/.medssr/openai_key'
  else
    on_all_workers 'rm -f ~/.medssr/openai_key'
  fi

  echo "running on $workers worker(s): python -m launch.main${quoted_args}" >&2
  if [[ $DETACH == 1 ]]; then
    on_all_workers 'mkdir -p ~/medssr_logs
      setsid nohup bash ~/medssr_run.sh >~/medssr_logs/run.log 2>&1 </dev/null &
      echo $! >~/medssr_logs/run.pid'
    echo "started in the background: '$0 logs' follows worker 0, '$0 stop' stops it" >&2
  else
    on_all_workers 'set -o pipefail; mkdir -p ~/medssr_logs && bash ~/medssr_run.sh 2>&1 | tee ~/medssr_logs/run.log'
  fi
}

cmd_logs() {
  gcloud_tpu ssh "$TPU_NAME" --worker=0 --command='tail -n 200 -f ~/medssr_logs/run.log'
}

cmd_stop() {
  # The run was started with setsid, so its process group id is the recorded pid.
  on_all_workers 'if [ -f ~/medssr_logs/run.pid ]; then
      kill -- -"$(cat ~/medssr_logs/run.pid)" 2>/dev/null || true; rm -f ~/medssr_logs/run.pid; fi'
}

cmd_delete() {
  local flags=()
  if [[ $YES == 1 ]]; then flags+=(--quiet); fi
  gcloud_tpu delete "$TPU_NAME" ${flags[@]+"${flags[@]}"}
}

main() {
  local sub=${1:-help}
  if [[ $# -gt 0 ]]; then shift; fi
  case $sub in
    create) cmd_create ;;
    setup) cmd_setup ;;
    run) cmd_run "$@" ;;
    logs) cmd_logs ;;
    stop) cmd_stop ;;
    delete) cmd_delete ;;
    help | -h | --help) usage ;;
    *) usage >&2; exit 2 ;;
  esac
}

main "$@"
