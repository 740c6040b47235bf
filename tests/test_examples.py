"""The examples run as documented, on a mini model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, WIKITEXT_TEST

EXAMPLES = ROOT / "examples"


def test_cli_examples(tmp_path, mini_llama, calib_txt):
    small = ["--nsamples", "4", "--seqlen", "64", "--calib", str(calib_txt)]
    subprocess.run(["bash", EXAMPLES / "quantize_gptq.sh", mini_llama, tmp_path / "g", *small], check=True)
    subprocess.run(["bash", EXAMPLES / "quantize_awq.sh", mini_llama, tmp_path / "a", *small], check=True)
    res = subprocess.run(["bash", EXAMPLES / "compare.sh", mini_llama, WIKITEXT_TEST, tmp_path / "g", tmp_path / "a"],
                         check=True, capture_output=True, text=True, env={**__import__("os").environ, "SEQLEN": "128", "WINDOWS": "2"})
    data = json.loads(res.stdout)
    assert [r["model"] for r in data["results"]] == [str(tmp_path / "g"), str(tmp_path / "a")]


def test_api_example(tmp_path, mini_llama, calib_txt):
    res = subprocess.run([sys.executable, EXAMPLES / "api_quantize.py", mini_llama, tmp_path, WIKITEXT_TEST,
                          "--nsamples", "4", "--seqlen", "64", "--calib", calib_txt, "--eval-seqlen", "128", "--windows", "2"],
                         check=True, capture_output=True, text=True)
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(report) == {"rtn", "gptq"} and all(Path(tmp_path / m / "qtool.json").is_file() for m in report)
