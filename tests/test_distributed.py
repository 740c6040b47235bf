"""Quantization by several processes (``qtool.distributed``): ``torchrun --nproc-per-node 2
-m qtool quantize`` (run as ``python -m torch.distributed.run``, torchrun's own entry
point; gloo on CPU, ``OMP_NUM_THREADS=1`` per process) against one process with one
thread, on mini models.

* GPTQ (mini Llama: the true-sequential replay path) and AWQ (scale search scored on the
  attention/MLP replays and in closed form, clip search) give the single process's
  checkpoint within the tolerance below; only rank 0 prints (stdout is one JSON object)
  and rank 1 says one line on stderr;
* a failure on rank 1 stops both processes with one line each, at once (not after the
  collective timeout); the work folder rank 0 committed holds every chunk of the next
  block's inputs, and one process resumes it to the single process's checkpoint. The
  model is a mini Mixtral (GPTQ's staged path, per-expert Hessians), so the routed
  token counts summed over the processes are checked against one process's too.

Tolerance, and why. Each chunk's activations are the single process's (the same samples,
batched the same way); only the order of the sums over chunks differs (per-process
partial sums; GPTQ's running-mean Hessians combined as ``sum_r N_r H_r / N``), which moves
the statistics by float32 rounding, about 1e-7 relative. A code changes only when its
value lies that close to a rounding boundary (expected: well under one per layer here),
and a changed code can move a few later ones through GPTQ's error updates. So at most
``MAX_CHANGED`` = 1e-3 of the codes, and separately of the float16 scales, zeros and
g_idx entries (a scale moves by whole float16 ulps or not at all), may differ; the other
float tensors (norms, which carry AWQ's folded scales) agree to rtol 1e-5. Real faults
give far more: without the Hessian all-reduce 30% of the codes differ, without the AWQ
loss all-reduce 8% (measured on these models when this test was written).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed
from helpers import run_cli

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                       reason="this torch has no torch.distributed with gloo"),
]

HERE = Path(__file__).resolve().parent
MAX_CHANGED = 1e-3
CALIB = ("--nsamples", "8", "--seqlen", "64", "--batch-size", "2")  # 4 chunks: 2 per process


def _torchrun(*args, monitor_interval: float = 0.1) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 ARGS`` with one thread per process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--monitor-interval", str(monitor_interval), *map(str, args)]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, check=False,
                          timeout=600)


@contextmanager
def _one_thread():
    """The single-process reference runs with one thread, as each torchrun process does
    (CPU kernels may sum in another order with another thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _assert_close(one: Path, two: Path) -> None:
    """The checkpoints of one and of two processes agree within the module's tolerance."""
    from qtool.io import read_quantized_layers

    layers_one, rest_one, fmt_one, _ = read_quantized_layers(one)
    layers_two, rest_two, fmt_two, _ = read_quantized_layers(two)
    assert fmt_one == fmt_two and layers_one.keys() == layers_two.keys() and rest_one.keys() == rest_two.keys()
    for field in ("codes", "scales", "zeros", "g_idx"):
        changed = total = 0
        for name, a in layers_one.items():
            ta, tb = getattr(a, field), getattr(layers_two[name], field)
            assert (ta is None) == (tb is None), (name, field)
            if ta is not None:
                assert ta.shape == tb.shape and ta.dtype == tb.dtype, (name, field)
                changed += int((ta != tb).sum())
                total += ta.numel()
        assert changed <= MAX_CHANGED * total, f"{changed} of {total} {field} differ"
    for name, t in rest_one.items():
        if t.is_floating_point():
            torch.testing.assert_close(rest_two[name], t, rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(rest_two[name], t), name


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_two_processes_give_the_one_process_checkpoint(capsys, tmp_path, mini_llama, calib_txt, method):
    args = ("quantize", mini_llama, "--method", method, "--calib", calib_txt, *CALIB)
    with _one_thread():
        assert run_cli(capsys, "-q", *args, "-o", tmp_path / "one").code == 0
    proc = _torchrun("-m", "qtool", "--json", *args, "-o", tmp_path / "two")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["output"] == str(tmp_path / "two")  # one JSON object: rank 0's
    assert f"qtool: rank 1/2 done; rank 0 wrote {tmp_path / 'two'}" in proc.stderr
    record = json.loads((tmp_path / "two" / "qtool.json").read_text())
    assert record["distributed"] == {"processes": 2}
    assert "distributed" not in json.loads((tmp_path / "one" / "qtool.json").read_text())
    assert not (tmp_path / "two.qtool-work").exists()
    _assert_close(tmp_path / "one", tmp_path / "two")


def test_a_failed_process_stops_the_run_and_one_process_resumes_it(capsys, tmp_path, calib_txt, default_model_dir):
    from test_moe import mini_model
    from transformers import AutoTokenizer

    from qtool.resume import WorkDir, work_dir_for

    src = tmp_path / "mixtral"
    mini_model("mixtral").save_pretrained(src, safe_serialization=True)
    AutoTokenizer.from_pretrained(default_model_dir).save_pretrained(src)
    args = ("quantize", src, "--method", "gptq", "--calib", calib_txt, *CALIB)
    two = tmp_path / "two"
    t0 = time.monotonic()
    # torchrun would also stop rank 0 when rank 1 fails: polling every 2 s, it leaves rank 0
    # the time to stop by itself, as it does on several machines
    proc = _torchrun(HERE / "torchrun_failing_rank.py", *args, "-o", two, monitor_interval=2)
    seconds = time.monotonic() - t0
    assert proc.returncode != 0
    assert "qtool: error: injected failure on rank 1 at block 1" in proc.stderr
    assert "qtool: error: another process of this distributed run failed" in proc.stderr, proc.stderr[-3000:]
    assert "internal error" not in proc.stderr
    assert seconds < 300  # the collective timeout (30 min) was not waited for
    work = WorkDir(work_dir_for(two))
    assert work.next_block == 1  # rank 0 committed block 0
    hidden = work.load_inputs()
    assert len(hidden) == 4 and all(h.shape[:2] == (2, 64) for h in hidden)  # every process's chunks

    with _one_thread():
        assert run_cli(capsys, "-q", *args, "-o", two, "--resume").code == 0
        assert run_cli(capsys, "-q", *args, "-o", tmp_path / "one").code == 0
    _assert_close(tmp_path / "one", two)
    resumed = json.loads((two / "qtool.json").read_text())
    single = json.loads((tmp_path / "one" / "qtool.json").read_text())
    assert resumed["resumed_from_block"] == 1
    tokens = {n: s["expert_tokens"] for n, s in single["layers"].items() if "expert_tokens" in s}
    assert len(tokens) == 2 * 4 * 3  # blocks x experts x linears
    assert {n: s.get("expert_tokens") for n, s in resumed["layers"].items() if n in tokens} == tokens
