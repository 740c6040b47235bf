#!/usr/bin/env python3
"""Evaluation throughput of `qtool eval`'s perplexity loop against a plain transformers
forward loop over the same windows, on the same float model, in one process.

usage: benchmarks/eval_speed.py [MODEL] [--windows 8] [--seqlen 2048] [--repeats 2] [--dataset PATH]
Prints a JSON line with tokens/s of both and the ratio qtool / plain (target >= 0.9).
The two loops alternate (plain, qtool, plain, qtool, ...) so machine load hits both alike.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw-v1" / "test.jsonl"


def plain_loop(model, ids, seqlen, n):
    nll, count = 0.0, 0
    with torch.inference_mode():
        for i in range(n):
            x = ids[:, i * seqlen:(i + 1) * seqlen]
            logits = model(x, use_cache=False).logits[:, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                     reduction="sum").item()
            count += x.shape[1] - 1
    return math.exp(nll / count), count


def main() -> None:
    from qtool.api import load_any
    from qtool.eval import load_eval_rows, perplexity, tokenize_rows

    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dataset", default=str(DEFAULT_DATASET))
    a = ap.parse_args()
    model, tokenizer, _ = load_any(a.model)
    rows, _, _ = load_eval_rows(a.dataset)
    ids = tokenize_rows(rows, tokenizer)
    plain_s, qtool_s = [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        ppl_plain, tokens = plain_loop(model, ids, a.seqlen, a.windows)
        plain_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        res = perplexity(model, ids, a.seqlen, max_windows=a.windows)
        qtool_s.append(time.perf_counter() - t0)
    plain_tps, qtool_tps = tokens / min(plain_s), tokens / min(qtool_s)
    print(json.dumps({"model": a.model or "default", "windows": a.windows, "tokens": tokens,
                      "ppl_plain": ppl_plain, "ppl_qtool": res["ppl"],
                      "plain_tokens_per_s": round(plain_tps, 1), "qtool_tokens_per_s": round(qtool_tps, 1),
                      "ratio_qtool_over_plain": round(qtool_tps / plain_tps, 3), "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
