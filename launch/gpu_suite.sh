#!/usr/bin/env bash
# The one-call GPU suite (launch/gpu_suite.py). Two steps:
#
#   bash launch/gpu_suite.sh prepare     # here, once: anchors + Tunix wheel into the ignored .anchors
#   bash launch/gpu_suite.sh [flags]     # on the GPU machine (carry .anchors): writes $OUT/gpu_suite.{json,md,log}
#
# prepare copies ../shared/bench/*.py (or $ANCHORS_SRC) and downloads the Tunix 0.1.7 wheel for
# the GPU image's Python 3.12, as ../shared/BENCHMARKS.md describes.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "prepare" ]; then
  src="${ANCHORS_SRC:-../shared/bench}"
  exclude="$(git rev-parse --git-path info/exclude)"
  mkdir -p "$(dirname "$exclude")" && { grep -qx '/.anchors/' "$exclude" 2>/dev/null || echo /.anchors/ >> "$exclude"; }
  mkdir -p .anchors && cp "$src"/*.py .anchors/ || exit 1
  ls .anchors/google_tunix-*.whl >/dev/null 2>&1 || python3 -m pip download --no-deps --only-binary=:all: \
      --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 -d .anchors google-tunix==0.1.7
  ls -la .anchors
  exit 0
fi

export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" || true
exec python3 -m launch.gpu_suite "$@"
