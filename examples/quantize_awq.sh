#!/usr/bin/env bash
# AWQ 4-bit asymmetric into AutoAWQ's GEMM format (vLLM `awq` / `awq_marlin`).
#   examples/quantize_awq.sh [MODEL] OUT [extra qtool quantize options]
set -euo pipefail
model=${1:-}; out=$2; shift 2
qtool quantize ${model:+"$model"} --method awq --format awq -o "$out" "$@"
qtool inspect "$out"
