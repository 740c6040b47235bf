#!/usr/bin/env bash
# The README's "Model card, plots and report" example, made from the built-in model
# (SmolLM2-135M-Instruct): quantize with the defaults (GPTQ, 4-bit, act-order), evaluate
# against the float model on the quick protocol (first 40 WikiText-2 test windows) with
# --write-card, --plot and --report, draw the per-layer errors, and cut the card excerpt
# the README shows. Heavy on a 2-core CPU (about 4 min to quantize, 8 min to evaluate):
# run it alone, from anywhere: bash benchmarks/make_card_example.sh
#
# Writes: $OUT/ (the checkpoint, git-ignored, its README.md is the card),
# $OUT/eval-report.html, docs/images/eval-windows.png, docs/images/layer-errors.png and
# docs/card-example.md (front matter, "Quantization" and "Evaluation" of the card).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-smollm2-gptq}
DATA=${DATA:-../shared/data/wikitext-2-raw-v1/test.jsonl}
mkdir -p docs/images
qtool quantize -o "$OUT" --force
qtool eval "$OUT" --baseline default --dataset "$DATA" --max-windows 40 --write-card \
    --plot docs/images/eval-windows.png --report "$OUT/eval-report.html"
qtool inspect "$OUT" --plot docs/images/layer-errors.png
python3 - "$OUT/README.md" docs/card-example.md <<'PY'
import re, sys

card = open(sys.argv[1], encoding="utf-8").read()
front = re.match(r"^---\n.*?\n---\n", card, re.S).group(0)
done = card.split("## Quantization", 1)[1].split("## How to load", 1)[0]
results = card.split("## Evaluation", 1)[1].split("\n## ", 1)[0]
open(sys.argv[2], "w", encoding="utf-8").write(
    f"{front}\n## Quantization{done}[...]\n\n## Evaluation{results.rstrip()}\n")
PY
echo "wrote docs/card-example.md, docs/images/eval-windows.png, docs/images/layer-errors.png, $OUT/eval-report.html"
