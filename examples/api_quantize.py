#!/usr/bin/env python3
"""The Python API from a script: RTN and GPTQ of the same model, then their perplexity.

usage: api_quantize.py MODEL OUT_DIR DATASET [--nsamples N] [--seqlen L] [--calib FILE]
"""

import argparse
import json
from pathlib import Path

from qtool.api import load_any, quantize
from qtool.config import QuantizeConfig
from qtool.eval import load_eval_rows, perplexity, tokenize_rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out_dir")
    ap.add_argument("dataset")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--calib")
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=40)
    a = ap.parse_args()
    out = Path(a.out_dir)
    rows, _, _ = load_eval_rows(a.dataset)
    report = {}
    for method in ("rtn", "gptq"):
        config = QuantizeConfig(method=method, calib=a.calib, nsamples=a.nsamples, seqlen=a.seqlen)
        record = quantize(a.model, out / method, config, force=True)
        model, tokenizer, _ = load_any(str(out / method))
        ids = tokenize_rows(rows, tokenizer)
        result = perplexity(model, ids, a.eval_seqlen, max_windows=a.windows)
        report[method] = {"ppl": result["ppl"], "group_size": record["config"]["group_size"]}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
