#!/usr/bin/env bash
# ScratchLM's GPU benchmark in one bounded command (<= ~5.5 min on one H100/H200); see benchmarks/gpu_bench.py.
#   bash benchmarks/gpu.sh            -> benchmarks/results/gpu_<device>.{md,json}, flash_tiles_<device>.json,
#                                        and the same files plus logs/ under $OUT when OUT is set
#   bash benchmarks/gpu.sh --cpu --budget 600   # plumbing check without a GPU (tiny model; report in $TMPDIR)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
exec "$PY" benchmarks/gpu_bench.py all "$@"
