#!/usr/bin/env bash
# GPTQ 4-bit, act-order, GPTQ checkpoint format, then a quick perplexity check.
#   examples/quantize_gptq.sh [MODEL] OUT [extra qtool quantize options]
# MODEL may be omitted ("") for the built-in SmolLM2-135M-Instruct.
set -euo pipefail
model=${1:-}; out=$2; shift 2
qtool quantize ${model:+"$model"} --method gptq --act-order -o "$out" "$@"
qtool inspect "$out"
