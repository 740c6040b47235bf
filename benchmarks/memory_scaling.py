"""Peak memory against model depth: does quantizing a deeper model need more memory?

Writes random-init Llama checkpoints of one width and several depths straight to
safetensors shards (one block's tensors at a time: the model is never materialised), then
quantizes each with ``qtool quantize`` in a child process and records the child's peak
RSS (``os.wait4``) and wall time, with:

- ``rtn-stream``: RTN on the in-model path (``--no-model-free``), blocks streamed;
- ``rtn-whole``: the same with the model loaded whole (``--no-stream``), the old path;
- ``gptq-stream``: GPTQ (few samples), streamed;
- ``rtn-model-free``: the default RTN path (tensor by tensor, no model).

With ``--plan`` each row also records the memory plan's estimate (``qtool plan``) and its
ratio to the measured peak. Claims checked at the end and printed: across the depths,
the streamed peaks grow by less than one block's float weights, and the deepest model's
streamed peak is below the size of its weights.

    python benchmarks/memory_scaling.py WORKDIR [--depths 6,12,24] [--hidden 2048]
        [--modes rtn-stream,rtn-whole,gptq-stream,rtn-model-free] [--plan]

Appends one JSON line per run to benchmarks/results/memory_scaling.jsonl.
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

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "memory_scaling.jsonl"
MODES = {
    "rtn-stream": ["--method", "rtn", "--no-model-free", "--stream"],
    "rtn-whole": ["--method", "rtn", "--no-model-free", "--no-stream"],
    "gptq-stream": ["--method", "gptq", "--nsamples", "8", "--seqlen", "256", "--stream"],
    "rtn-model-free": ["--method", "rtn", "--model-free"],
}


def llama_config(depth: int, hidden: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
        "hidden_size": hidden, "intermediate_size": int(hidden * 2.75) // 128 * 128,
        "num_hidden_layers": depth, "num_attention_heads": hidden // 128, "num_key_value_heads": max(1, hidden // 512),
        "head_dim": 128, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": True, "hidden_act": "silu", "dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
    }


def block_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    return {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, q), "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h),
            "mlp.down_proj.weight": (h, i)}


def write_model(folder: Path, depth: int, hidden: int, tokenizer_from: Path, blocks_per_shard: int = 4) -> int:
    """A random-init bf16 Llama in ``folder``, written shard by shard; returns its weight bytes."""
    from safetensors.torch import save_file

    cfg = llama_config(depth, hidden)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in tokenizer_from.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy(f, folder / f.name)
    gen = torch.Generator().manual_seed(depth)
    groups = [None] + [list(range(b, min(b + blocks_per_shard, depth))) for b in range(0, depth, blocks_per_shard)]
    weight_map, total = {}, 0
    for k, group in enumerate(groups):  # one shard's tensors in memory at a time
        if group is None:
            tensors = {"model.embed_tokens.weight": _rand((cfg["vocab_size"], hidden), gen),
                       "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
        else:
            tensors = {f"model.layers.{b}.{name}": torch.ones(shape, dtype=torch.bfloat16) if len(shape) == 1
                       else _rand(shape, gen) for b in group for name, shape in block_shapes(cfg).items()}
        name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}, indent=2))
    return total


def _rand(shape, gen) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)


def run(cmd: list[str], env: dict) -> tuple[int, float, int, str]:
    """(exit code, wall seconds, peak RSS bytes of the child, last output line)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss * 1024, out.strip().splitlines()[-1] if out.strip() else ""


def plan_estimate(model: Path, mode: list[str], env: dict) -> dict | None:
    cmd = [sys.executable, "-m", "qtool", "plan", str(model), *mode, "--json"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    return json.loads(res.stdout) if res.returncode == 0 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--depths", default="6,12,24")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--plan", action="store_true", help="also record qtool plan's estimate")
    ap.add_argument("--keep", action="store_true", help="keep the generated models")
    args = ap.parse_args()
    from qtool.loading import default_model_folder

    depths = [int(d) for d in args.depths.split(",")]
    modes = args.modes.split(",")
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args.workdir.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    rows = []
    for depth in depths:
        model = args.workdir / f"llama-h{args.hidden}-d{depth}"
        if model.exists():
            shutil.rmtree(model)
        weight_bytes = write_model(model, depth, args.hidden, default_model_folder())
        cfg = llama_config(depth, args.hidden)
        block_bytes = sum(torch.Size(s).numel() for s in block_shapes(cfg).values()) * 2
        for mode in modes:
            out = args.workdir / f"out-{depth}-{mode}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "qtool", "quantize", str(model), "-o", str(out), "--group-size", "128",
                   "--force", *MODES[mode]]
            code, wall, rss, last = run(cmd, env)
            row = {"depth": depth, "hidden": args.hidden, "mode": mode, "weights_bytes": weight_bytes,
                   "block_bytes": block_bytes, "peak_rss_bytes": rss, "wall_s": round(wall, 1), "exit_code": code,
                   "load_1min_at_start": round(load, 2), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "torch_threads": torch.get_num_threads()}
            if code != 0:
                row["error"] = last
            if args.plan:
                est = plan_estimate(model, MODES[mode], env)
                if est is not None:
                    row["plan_peak_cpu_bytes"] = est["peak_cpu_bytes"]
                    row["plan_over_measured"] = round(est["peak_cpu_bytes"] / rss, 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(RESULTS, "a") as f:
                f.write(json.dumps(row) + "\n")
            shutil.rmtree(out, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(model)
    gib = 1 << 30
    print(f"\n{'mode':<16}" + "".join(f"{'depth ' + str(d):>14}" for d in depths) + f"{'growth':>10}{'1 block':>10}")
    for mode in modes:
        peaks = [next(r["peak_rss_bytes"] for r in rows if r["mode"] == mode and r["depth"] == d) for d in depths]
        growth = peaks[-1] - peaks[0]
        block = rows[0]["block_bytes"]
        print(f"{mode:<16}" + "".join(f"{p / gib:>13.2f}G" for p in peaks) + f"{growth / gib:>9.2f}G{block / gib:>9.2f}G")
        if mode.endswith("stream") and mode != "rtn-whole":
            deepest = next(r for r in rows if r["mode"] == mode and r["depth"] == depths[-1])
            print(f"  {mode}: growth {'<' if growth < block else '>='} one block's float weights; deepest peak "
                  f"{deepest['peak_rss_bytes'] / gib:.2f}G {'<' if deepest['peak_rss_bytes'] < deepest['weights_bytes'] else '>='}"
                  f" its weights {deepest['weights_bytes'] / gib:.2f}G")


if __name__ == "__main__":
    main()
