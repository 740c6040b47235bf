"""The quality table: each method's checkpoint of one model, made by the same commands and
evaluated side by side against the float model on the quality suite.

For each row, ``qtool quantize MODEL -o WORKDIR/ROW <the row's options>`` runs in a child
process (wall time and peak RSS from ``os.wait4``; the comparison protocol's options ``-g
64 --calib <the protocol's 128 x 512 tokens>`` unless ``--calib bundled``, except the
``default`` row, which passes nothing but ``-o``). Then one ``qtool eval ... --baseline
MODEL`` runs every checkpoint on WikiText-2 test (``--wikitext-windows``, default 40: the
quick protocol) and one on C4 and pile-val (``--suite-windows``, default 40, the first
windows of their evaluation halves); the float model's perplexity is the baseline's.

    python benchmarks/quality_suite.py WORKDIR [--model PATH] [--rows rtn,gptq,awq,...]
        [--calib FILE|bundled] [--wikitext-windows 40] [--suite-windows 40] [--seqlen 2048] [--reuse]

``--reuse`` keeps a row's checkpoint from an earlier run in WORKDIR (its time and RSS are
read from WORKDIR/ROW.run.json) instead of quantizing again. All rows take about 3 h here
(signround alone, 200 steps per block: about 84 min); ``--rows`` picks some. Appends one JSON line per row
to benchmarks/results/quality.jsonl and prints the table in the README's form.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_scaling import run  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "quality.jsonl"
PROTOCOL_CALIB = HERE.parent.parent / "shared" / "baselines" / "calib-wikitext2-validation-128x512.smollm2.jsonl"
ROWS = {
    "rtn": ["--method", "rtn"],
    "rtn-asym": ["--method", "rtn", "--asym"],
    "gptq": ["--method", "gptq"],
    "gptq-mse": ["--method", "gptq", "--scale-search", "mse"],
    "gptq-asym-mse": ["--method", "gptq", "--asym", "--scale-search", "mse"],
    "awq": ["--method", "awq"],
    "awq-gptq": ["--method", "awq-gptq"],
    "awq-gptq-mse": ["--method", "awq-gptq", "--scale-search", "mse"],
    "signround": ["--method", "signround"],
    "budget-4.5": ["--method", "gptq", "--scale-search", "mse", "--bits-budget", "4.5", "-f", "compressed-tensors"],
    "default": [],
}


def quantize(model: str, row: str, out: Path, calib: str, env: dict, reuse: bool) -> dict:
    record = out.with_name(f"{out.name}.run.json")
    if reuse and (out / "qtool.json").is_file() and record.is_file():
        return json.loads(record.read_text())
    opts = ROWS[row] if row == "default" else ["-g", "64", *([] if calib == "bundled" else ["--calib", calib]), *ROWS[row]]
    cmd = [sys.executable, "-m", "qtool", "quantize", model, "-o", str(out), "--force", *opts]
    load = os.getloadavg()[0]
    code, wall, rss, last = run(cmd, env)
    if code != 0:
        raise SystemExit(f"{row}: qtool quantize exited {code}: {last}")
    info = {"row": row, "options": opts, "quantize_s": round(wall, 1), "peak_rss_bytes": rss,
            "load_1min_at_start": round(load, 2),
            "size_bytes": sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")}
    record.write_text(json.dumps(info) + "\n")
    return info


def evaluate(model: str, ckpts: list[Path], datasets: str, windows: int, seqlen: int, env: dict) -> dict:
    cmd = [sys.executable, "-m", "qtool", "--json", "eval", *map(str, ckpts), "--baseline", model,
           "--dataset", datasets, "--max-windows", str(windows), "--seqlen", str(seqlen)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"qtool eval exited {res.returncode}: {res.stderr.strip().splitlines()[-1:]}")
    return json.loads(res.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--model", help="float model folder (default: the built-in model's float32 folder)")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--calib", default=str(PROTOCOL_CALIB), help="calibration file, or 'bundled'")
    ap.add_argument("--wikitext-windows", type=int, default=40)
    ap.add_argument("--suite-windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=2048, help="evaluation window (the protocol: 2048)")
    ap.add_argument("--reuse", action="store_true")
    args = ap.parse_args()
    from qtool.loading import default_model_folder

    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    model = args.model or str(default_model_folder())
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    made = {r: quantize(model, r, args.workdir / r, args.calib, env, args.reuse) for r in rows}
    ckpts = [args.workdir / r for r in rows]
    t0 = time.perf_counter()
    results = [evaluate(model, ckpts, "wikitext2", args.wikitext_windows, args.seqlen, env)]
    results.append(evaluate(model, ckpts, "c4,pile-val", args.suite_windows, args.seqlen, env))
    eval_s = time.perf_counter() - t0
    blocks = [b for r in results for b in r["datasets"]]
    float_ppl = {b["name"]: b["baseline"]["ppl"] for b in blocks}
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print("| row | " + " | ".join(f"{b['name']} ppl (KL)" for b in blocks) + " | quantize time | peak RSS | size |")
    print("|---|" + "---|" * (len(blocks) + 3))
    print("| float | " + " | ".join(f"{float_ppl[b['name']]:.3f}" for b in blocks) + " | – | – | – |")
    for i, r in enumerate(rows):
        per = {b["name"]: {k: b["results"][i][k] for k in ("ppl", "kl_mean", "top1_agreement")} for b in blocks}
        line = {**made[r], "datasets": per, "windows": {"wikitext2": args.wikitext_windows, "c4": args.suite_windows,
                                                          "pile-val": args.suite_windows},
                "float_ppl": float_ppl, "calib": args.calib, "model": model, "date": stamp, "eval_s_all_rows": round(eval_s)}
        with open(RESULTS, "a") as f:
            f.write(json.dumps(line) + "\n")
        print(f"| {r} | " + " | ".join(f"{per[n]['ppl']:.3f} ({per[n]['kl_mean']:.4f})" for n in per)
              + f" | {made[r]['quantize_s']:.0f} s | {made[r]['peak_rss_bytes'] / 2**30:.2f} GiB"
              + f" | {made[r]['size_bytes'] / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main()
