"""A model larger than this machine's memory, quantized here.

Writes a random-init bf16 Llama of about ``--gib`` GiB of weights (default 30) straight to
safetensors shards in a temporary folder (``benchmarks/memory_scaling.py``'s writer: one
few-block shard at a time), quantizes it with each of ``--methods`` (RTN: the default,
model-free path; GPTQ: streamed, few samples) in a child process recording wall time and
peak RSS, and checks the result: the checkpoint's first ``--check-blocks`` blocks must be
byte-identical to those of the same quantization of a small model made of the big one's
embeddings, first blocks and final norm, loaded whole in memory (``--no-stream``); and
the checkpoint must load (``qtool inspect --verify``: every layer unpacks). Everything
generated is deleted at the end (``--keep`` keeps it).

    python benchmarks/big_model.py WORKDIR [--gib 30] [--hidden 2048] [--methods rtn,gptq] [--resume]

``--resume`` continues an interrupted run: the model (and the small reference) already in
WORKDIR are kept, or written again when gone (the writer is seeded, so the files are
byte-identical, which the work folder's fingerprint checks by sha256), and ``qtool quantize
--resume`` continues from the work folder (the row records ``resumed_from_block``; its wall
time is this part's). To interrupt a run so that it can be resumed, stop this script first
(SIGKILL: its cleanup would delete the model) and then the ``qtool quantize`` child (SIGINT:
it saves its progress). When a method fails, the model is kept for a ``--resume``.

Appends one JSON line per method to benchmarks/results/big_model.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_scaling import block_shapes, llama_config, run, write_model  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "big_model.jsonl"
METHODS = {
    "rtn": ["--method", "rtn"],
    "gptq": ["--method", "gptq", "--nsamples", "4", "--seqlen", "256", "--batch-size", "4"],
}


def small_reference(big: Path, small: Path, blocks: int) -> None:
    """A model of ``big``'s embeddings, first ``blocks`` blocks and final norm (same tensors)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg = json.loads((big / "config.json").read_text())
    small.mkdir(parents=True)
    (small / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": blocks}, indent=2))
    for f in big.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy(f, small / f.name)
    index = json.loads((big / "model.safetensors.index.json").read_text())["weight_map"]
    keep = [k for k in index if not k.startswith("model.layers.") or int(k.split(".")[2]) < blocks]
    tensors = {}
    for k in keep:
        with safe_open(str(big / index[k]), framework="pt") as h:
            tensors[k] = h.get_tensor(k)
    save_file(tensors, str(small / "model.safetensors"), metadata={"format": "pt"})


def first_blocks_equal(big_out: Path, small_out: Path, blocks: int) -> tuple[int, list[str]]:
    """(tensors compared, names that differ) over the first ``blocks`` blocks."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, tuple[Path, str]]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                out.update({k: (f, k) for k in h.keys()
                            if k.startswith("model.layers.") and int(k.split(".")[2]) < blocks})
        return out

    a, b = tensors(big_out), tensors(small_out)
    differ = sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        with safe_open(str(a[k][0]), framework="pt") as ha, safe_open(str(b[k][0]), framework="pt") as hb:
            x, y = ha.get_tensor(k), hb.get_tensor(k)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8)):
            differ.append(k)
    return len(set(a) & set(b)), differ


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--gib", type=float, default=30.0)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--check-blocks", type=int, default=2)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run on the model already in WORKDIR")
    args = ap.parse_args()
    from qtool.loading import default_model_folder

    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cfg1 = llama_config(1, args.hidden)
    per_block = sum(torch.Size(s).numel() for s in block_shapes(cfg1).values()) * 2
    depth = max(1, int(args.gib * (1 << 30) - cfg1["vocab_size"] * args.hidden * 2) // per_block + 1)
    args.workdir.mkdir(parents=True, exist_ok=True)
    big = args.workdir / f"llama-h{args.hidden}-d{depth}"
    small = args.workdir / "small-ref"
    if args.resume and (big / "model.safetensors.index.json").is_file() and (small / "config.json").is_file():
        weight_bytes = json.loads((big / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        print(f"resuming on {big} ({weight_bytes / (1 << 30):.1f} GiB)", flush=True)
    else:
        if args.resume:
            if not any(args.workdir.glob("out-*.qtool-work")):
                raise SystemExit(f"--resume: no interrupted run (out-METHOD.qtool-work) in {args.workdir} to resume")
            print(f"--resume: {big} is gone; writing it again (seeded: the same bytes)", flush=True)
        shutil.rmtree(big, ignore_errors=True)
        t0 = time.perf_counter()
        weight_bytes = write_model(big, depth, args.hidden, default_model_folder(), blocks_per_shard=8)
        print(f"wrote {big}: {depth} blocks, {weight_bytes / (1 << 30):.1f} GiB of bf16 weights in "
              f"{time.perf_counter() - t0:.0f}s (RAM: {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / (1 << 30):.1f} GiB)",
              flush=True)
        shutil.rmtree(small, ignore_errors=True)
        small_reference(big, small, args.check_blocks)
    failed = False
    try:
        for method in args.methods.split(","):
            out, ref = args.workdir / f"out-{method}", args.workdir / f"ref-{method}"
            for p in ((ref,) if args.resume else (out, ref)):
                shutil.rmtree(p, ignore_errors=True)
            cmd = [sys.executable, "-m", "qtool", "quantize", str(big), "-o", str(out), "--group-size", "128",
                   *METHODS[method], *(["--resume"] if args.resume else [])]
            load = os.getloadavg()[0]
            code, wall, rss, last = run(cmd, env)
            row = {"method": method, "depth": depth, "hidden": args.hidden, "weights_bytes": weight_bytes,
                   "peak_rss_bytes": rss, "wall_s": round(wall, 1), "exit_code": code, "last_line": last,
                   "load_1min_at_start": round(load, 2), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
            if code == 0:
                record = json.loads((out / "qtool.json").read_text())
                row["path"] = ("model-free" if record.get("model_free", {}).get("used") else
                               "streamed" if record.get("streamed", {}).get("used") else "whole")
                row["plan_peak_cpu_bytes"] = (record.get("memory") or {}).get("plan", {}).get("peak_cpu_bytes")
                row["resumed_from_block"] = record.get("resumed_from_block", 0)
                ref_cmd = [sys.executable, "-m", "qtool", "quantize", str(small), "-o", str(ref), "--group-size", "128",
                           *METHODS[method], *(["--no-model-free"] if method == "rtn" else []), "--no-stream"]
                rcode, _, _, rlast = run(ref_cmd, env)
                compared, differ = first_blocks_equal(out, ref, args.check_blocks) if rcode == 0 else (0, [rlast])
                row["first_blocks_compared_tensors"], row["first_blocks_differ"] = compared, differ[:5]
                insp = subprocess.run([sys.executable, "-m", "qtool", "inspect", str(out), "--verify", "--json"],
                                      env=env, capture_output=True, text=True)
                row["inspect_verify_exit_code"] = insp.returncode
                out_bytes = sum(f.stat().st_size for f in out.iterdir())
                row["output_bytes"] = out_bytes
            failed = failed or code != 0
            print(json.dumps(row), flush=True)
            with open(RESULTS, "a") as f:
                f.write(json.dumps(row) + "\n")
            for p in (out, ref):
                shutil.rmtree(p, ignore_errors=True)
    finally:
        if failed:
            print(f"kept {big} and {small} for a --resume", flush=True)
        elif not args.keep:
            shutil.rmtree(big, ignore_errors=True)
            shutil.rmtree(small, ignore_errors=True)


if __name__ == "__main__":
    main()
