#!/usr/bin/env bash
# Side-by-side evaluation of checkpoints against their float model, as JSON for CI.
#   examples/compare.sh BASELINE DATASET CHECKPOINT... (DATASET: wikitext2 or a file)
set -euo pipefail
baseline=$1; dataset=$2; shift 2
qtool --json eval "$@" --baseline "$baseline" --dataset "$dataset" --seqlen "${SEQLEN:-2048}" --max-windows "${WINDOWS:-40}"
