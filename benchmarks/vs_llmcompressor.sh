#!/usr/bin/env bash
# qtool vs llm-compressor on the comparison protocol of ../shared/baselines/README.md, run
# one after the other in the same session (same machine load), with /usr/bin/time -v.
#   benchmarks/vs_llmcompressor.sh WORKDIR gptq|awq|rtn [--peer-args "..."] [--qtool-args "..."] [--skip-peer]
#                                  [--peer-timeout SECONDS]
# e.g. benchmarks/vs_llmcompressor.sh /work/peer gptq --peer-args "--sym --actorder static --batch-size 8" --qtool-args "--sym"
#      benchmarks/vs_llmcompressor.sh /work/peer awq --peer-args "--asym --batch-size 8 --n-samples 8" --qtool-args "--nsamples 8"
# Prints one JSON line per tool (wall seconds, peak RSS, quick-protocol ppl) and the time
# ratio, and appends them to benchmarks/results/vs_llmcompressor.jsonl.
# --peer-timeout S stops a peer run that is still going after S seconds (llm-compressor's
# AWQ on all 128 samples takes about an hour here); its line then says "timed_out" with
# wall_s = S as a lower bound and the last progress line it printed, and no perplexity.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
shared=$here/../../shared/baselines
work=$1; method=$2; shift 2
peer_args=""; qtool_args=""; skip_peer=0; peer_timeout=0
while [ $# -gt 0 ]; do
  case $1 in
    --peer-args) peer_args=$2; shift 2;;
    --qtool-args) qtool_args=$2; shift 2;;
    --skip-peer) skip_peer=1; shift;;
    --peer-timeout) peer_timeout=$2; shift 2;;
    *) echo "unknown argument $1" >&2; exit 2;;
  esac
done
calib=$shared/calib-wikitext2-validation-128x512.smollm2.jsonl
dataset=$shared/../data/wikitext-2-raw-v1/test.jsonl
mkdir -p "$work" "$here/results"
stamp=$(date +%s)
measure() {  # name, time file, checkpoint, ppl json
  local wall rss
  wall=$(grep "Elapsed (wall clock)" "$2" | awk '{print $NF}' | awk -F: '{ if (NF==3) print $1*3600+$2*60+$3; else print $1*60+$2 }')
  rss=$(grep "Maximum resident" "$2" | awk '{print $NF}')
  python3 -c "import json,sys; p=json.loads(sys.argv[5]); print(json.dumps({'tool': sys.argv[1], 'method': sys.argv[6], 'args': sys.argv[7], 'wall_s': float(sys.argv[2]), 'peak_rss_mb': round(int(sys.argv[3])/1024), 'checkpoint': sys.argv[4], 'ppl_40_windows': p['ppl'], 'host_load': open('/proc/loadavg').read().split()[0]}))" \
    "$1" "$wall" "$rss" "$3" "$4" "$method" "$5"
}
if [ $skip_peer = 0 ]; then
  py=$work/venv/bin/python
  [ -x "$py" ] || { python3 -m venv "$work/venv"; "$work/venv/bin/pip" install -q torch==2.13.0 llmcompressor==0.14.0.1 gguf accelerate; }
  [ -f "$work/smollm2-f32/model.safetensors" ] || "$py" "$shared/make_smollm2_hf.py" "$work/smollm2-f32"
  peer_out=$work/peer-$method-$stamp
  # shellcheck disable=SC2086
  limit=()
  [ "$peer_timeout" -gt 0 ] && limit=(timeout "$peer_timeout")
  rc=0
  "${limit[@]}" /usr/bin/time -v -o "$peer_out.time" "$py" "$shared/quant_llmcompressor.py" "$method" \
    "$work/smollm2-f32" "$peer_out" --calib "$calib" --group-size 64 $peer_args 2> "$peer_out.log" > /dev/null || rc=$?
  if [ $rc = 124 ]; then
    last=$(tr '\r' '\n' < "$peer_out.log" | grep -v '^\s*$' | tail -1 | cut -c1-160 || true)
    peer_line=$(python3 -c "import json,sys; print(json.dumps({'tool': 'llm-compressor', 'method': sys.argv[1], 'args': sys.argv[2], 'timed_out': True, 'wall_s': float(sys.argv[3]), 'last_progress': sys.argv[4], 'host_load': open('/proc/loadavg').read().split()[0]}))" \
      "$method" "$peer_args" "$peer_timeout" "$last")
    echo "$peer_line" | tee -a "$here/results/vs_llmcompressor.jsonl"
  elif [ $rc != 0 ]; then
    echo "llm-compressor failed (exit $rc); see $peer_out.log" >&2; exit 1
  else
    peer_ppl=$("$py" "$shared/ppl.py" "$peer_out" --windows 40)
    peer_line=$(measure llm-compressor "$peer_out.time" "$peer_out" "$peer_ppl" "$peer_args")
    echo "$peer_line" | tee -a "$here/results/vs_llmcompressor.jsonl"
  fi
fi
ours=$work/qtool-$method-$stamp
# shellcheck disable=SC2086
/usr/bin/time -v qtool -q quantize "$work/smollm2-f32" --method "$method" --group-size 64 --calib "$calib" \
  -o "$ours" $qtool_args 2> "$ours.time"
our_ppl=$(qtool --json eval "$ours" --dataset "$dataset" --max-windows 40 | python3 -c "import json,sys; print(json.dumps(json.load(sys.stdin)['results'][0]))")
our_line=$(measure qtool "$ours.time" "$ours" "$our_ppl" "$qtool_args")
echo "$our_line" | tee -a "$here/results/vs_llmcompressor.jsonl"
if [ $skip_peer = 0 ]; then
  # a timed-out peer gives an upper bound on the ratio ("<") and no peer perplexity
  python3 -c "import json,sys; a=json.loads(sys.argv[1]); b=json.loads(sys.argv[2]); r=round(b['wall_s']/a['wall_s'],3); print(json.dumps({'time_ratio_qtool_over_peer': ('< %s' % r) if a.get('timed_out') else r, 'ppl_peer': a.get('ppl_40_windows'), 'ppl_qtool': b['ppl_40_windows']}))" "$peer_line" "$our_line" | tee -a "$here/results/vs_llmcompressor.jsonl"
fi
