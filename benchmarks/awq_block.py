"""Where AWQ's time goes, per block, relative to one float forward of the same block
over every calibration token (the unit the pipeline itself pays twice per block: once
for AWQ's statistics, once to re-run the quantized block for the next one).

For the first ``--blocks`` blocks of the default model (or MODEL) with the reference
calibration windows it times, in one run: the float block forward (baseline), the
statistics pass, the scale search per group, the clip search and the final RTN, and
prints each as seconds and as a ratio to the baseline. Wall time and process CPU time
are both shown, since the machine may be shared.

Usage::

    python benchmarks/awq_block.py [MODEL] --calib FILE [--blocks 2] [--search-tokens 4096]
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager

import torch


@contextmanager
def timed(table: dict, key: str):
    w, c = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        wall, cpu = table.get(key, (0.0, 0.0))
        table[key] = (wall + time.perf_counter() - w, cpu + time.process_time() - c)


def main() -> None:
    from qtool.awq import method as awq_method
    from qtool.calib import load_calibration
    from qtool.config import AWQ_MIN_SEARCH_TOKENS, QuantizeConfig
    from qtool.loading import load_model, resolve
    from qtool.models import get_blocks, spec_for
    from qtool.pipeline import BlockContext, BlockInputs, capture_inputs

    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--calib", default=None)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--search-tokens", type=int, default=AWQ_MIN_SEARCH_TOKENS)
    ap.add_argument("--group-size", type=int, default=64)
    args = ap.parse_args()

    model, tok, _ = load_model(resolve(args.model), "float32")
    spec = spec_for(model)
    config = QuantizeConfig(method="awq", group_size=args.group_size, calib=args.calib)
    calib = load_calibration(config.calib, tok, config.nsamples, config.seqlen, config.seed)
    dev = torch.device("cpu")
    inputs = capture_inputs(model, spec, calib.input_ids, config.batch_size, dev, torch.float32)
    table: dict[str, tuple[float, float]] = {}
    steps = {"collect_block_stats": "statistics pass", "search_module_scale": "scale search (module)",
             "search_linear_scale": "scale search (linear, Gram)", "search_clip": "clip search",
             "rtn_quantize": "final RTN", "layer_errors": "error report"}
    for attr, label in steps.items():
        fn = getattr(awq_method, attr)

        def wrapper(*a, _fn=fn, _label=label, **k):
            with timed(table, _label):
                return _fn(*a, **k)

        setattr(awq_method, attr, wrapper)
    method = awq_method.AWQMethod(search_tokens=args.search_tokens)
    blocks = get_blocks(model, spec)
    for i in range(args.blocks):
        ctx = BlockContext(blocks[i], i, spec, config, inputs, dev, torch.float32, f"{spec.blocks}.{i}")
        with timed(table, "baseline: float block forward"):
            ctx.run(collect_outputs=True)
        with timed(table, "AWQ quantize_block (all steps)"):
            results = method.quantize_block(ctx)
        for name, res in results.items():
            ctx.write_back(name, res.qweight)
        inputs = BlockInputs(ctx.run(collect_outputs=True), inputs.kwargs)
    base_wall, base_cpu = table["baseline: float block forward"]
    print(f"{args.blocks} block(s), {inputs.num_tokens} calibration tokens, search subsample "
          f"{args.search_tokens} tokens, torch threads {torch.get_num_threads()}")
    print(f"{'step':36s} {'wall s':>8s} {'x fwd':>6s} {'cpu s':>8s} {'x fwd':>6s}")
    for key, (wall, cpu) in table.items():
        print(f"{key:36s} {wall:8.2f} {wall / base_wall:6.2f} {cpu:8.2f} {cpu / base_cpu:6.2f}")


if __name__ == "__main__":
    main()
