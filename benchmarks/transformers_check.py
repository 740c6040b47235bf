"""transformers' default loading of a qtool compressed-tensors checkpoint against qtool's own
reading: every quantized module's width (mixed ``--bits-budget`` checkpoints) and the
logits on the first WikiText-2 test tokens.

    python benchmarks/transformers_check.py CKPT [--tokens 512]

Prints one JSON line (modules, count per width, widths_match, max_abs_logit_diff,
top1_equal); exits 1 when a width or a logit differs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikitext-2-raw-v1" / "test.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--tokens", type=int, default=512)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtool.io import load_quantized_model, read_quantized_layers

    qweights, _, _, _ = read_quantized_layers(args.ckpt)
    theirs = AutoModelForCausalLM.from_pretrained(args.ckpt, dtype=torch.float32).eval()
    widths_match = all(theirs.get_submodule(n).quantization_scheme.weights.num_bits == qw.bits
                       for n, qw in qweights.items())
    rows = [json.loads(line)["text"] for line in DATA.open()][:200]
    ids = AutoTokenizer.from_pretrained(args.ckpt)("\n\n".join(rows), return_tensors="pt").input_ids[:, :args.tokens]
    with torch.inference_mode():
        a = theirs(ids, use_cache=False).logits.float()
        b = load_quantized_model(args.ckpt)(ids, use_cache=False).logits.float()
    diff = (a - b).abs().max().item()
    widths = sorted({q.bits for q in qweights.values()})
    print(json.dumps({"checkpoint": args.ckpt, "modules": len(qweights),
                      "widths": {w: sum(q.bits == w for q in qweights.values()) for w in widths},
                      "widths_match": widths_match, "tokens": ids.shape[1], "max_abs_logit_diff": diff,
                      "top1_equal": (a.argmax(-1) == b.argmax(-1)).float().mean().item()}))
    raise SystemExit(0 if widths_match and diff == 0.0 else 1)


if __name__ == "__main__":
    main()
