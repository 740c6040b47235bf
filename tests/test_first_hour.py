"""The first hour with qtool (issue 14): help text that reads at 80 columns, `--version`
and `--help` without torch, progress lines with rate and ETA in logs, no library bars or
retry storms, an eval table with a baseline row and a legend, a relative layer error with
one meaning and a unit, an inspect summary with layers in natural order, and README
checkpoints that git ignores."""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, WIKITEXT_TEST, make_mini_model
from helpers import run_cli

EVAL = ["--dataset", WIKITEXT_TEST, "--seqlen", "32", "--max-windows", "2"]


def help_text(*args: str) -> str:
    from typer.testing import CliRunner

    from qtool.cli import app

    res = CliRunner().invoke(app, [*args, "--help"], terminal_width=80, env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    return res.output


def option_block(text: str, flag: str) -> str:
    """The help entry of ``flag``: its line and the wrapped lines under it, as one line."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if re.match(rf"\s+(-\w, )?{re.escape(flag)}\b", ln))
    block = [lines[start]]
    for ln in lines[start + 1:]:
        if re.match(r"\s{2,}-", ln) or not ln.strip():
            break
        block.append(ln)
    return " ".join(" ".join(block).split())


# ---- help text and start-up ----

@pytest.mark.parametrize("command", [(), ("quantize",), ("eval",), ("convert",), ("inspect",), ("check",)])
def test_help_reads_at_80_columns(command):
    text = help_text(*command)
    assert "<bool>" not in text and "…" not in text
    assert not [ln for ln in text.splitlines() if ln.endswith("...") and "Usage:" not in ln], text  # cut short help
    assert max(len(ln) for ln in text.splitlines()) <= 80, text


def test_auto_defaults_and_choices_in_quantize_help():
    text = help_text("quantize")
    for flag in ("--group-size", "--gptq-version"):
        block = option_block(text, flag)
        assert "[default: auto" in block and "[default: 0]" not in block, block
    assert "pileval|c4|wikitext2" in option_block(text, "--calib")
    assert "--act-order / --no-act-order" in text
    assert "[default: auto" in option_block(help_text("convert"), "--gptq-version")


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["quantize", "--help"], ["eval", "--help"]])
def test_version_and_help_do_not_import_torch(args):
    code = ("import sys\nfrom qtool.cli import main\nsys.argv = ['qtool', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\nassert not heavy, heavy\n")
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    if args == ["--version"]:
        from qtool import __version__

        assert res.stdout.strip() == f"qtool {__version__}"


# ---- progress and third-party noise ----

def test_plain_progress_one_line_per_window_with_rate_and_eta():
    from qtool.progress import PlainReporter

    out = io.StringIO()
    rep = PlainReporter(out, min_interval=0.0)
    rep("eval", name="evaluating 1 model(s)", total=4, unit="window")
    for i in range(4):
        rep("window", index=i, total=4)
    lines = [ln for ln in out.getvalue().splitlines() if " window " in ln]
    assert len(lines) == 4
    assert all(re.search(r"window \d/4 \(\d+%\), [\d.]+ (windows/s|s/window), eta \d+", ln) for ln in lines), lines

    throttled = io.StringIO()
    rep = PlainReporter(throttled, min_interval=3600.0)
    rep("eval", name="evaluating", total=50)
    for i in range(50):
        rep("window", index=i, total=50)
    shown = [ln for ln in throttled.getvalue().splitlines() if " window " in ln]
    assert [s.split(" window ")[1].split(" ")[0] for s in shown] == ["1/50", "50/50"]


def test_block_line_names_the_error_and_its_unit():
    from qtool.progress import PlainReporter

    out = io.StringIO()
    rep = PlainReporter(out)
    rep("blocks", total=2, start=0)
    rep("block", index=0, total=2, seconds=1.0,
        layers={"b.0.q": {"rel_weight_error_pct": 9.5, "rel_output_error_pct": 2.5, "loss": 1160.0},
                "b.0.k": {"rel_weight_error_pct": 8.0, "rel_output_error_pct": 3.25}})
    rep("block", index=1, total=2, seconds=1.0, layers={"b.1.q": {"rel_weight_error_pct": 7.0}})
    first, second = out.getvalue().splitlines()
    assert "worst relative output error 3.25% (b.0.k)" in first and "1160" not in first
    assert "worst relative weight error 7.00% (b.1.q)" in second and "eta" in second


def test_eval_progress_in_logs(capsys, deep):
    res = run_cli(capsys, "eval", deep[0], *EVAL)
    assert res.code == 0, res.err
    assert re.search(r"window 2/2 \(100%\), .*eta 0s", res.err), res.err
    assert "\r" not in res.err and "it/s" not in res.err


def test_offline_dataset_fails_fast_without_retry_warnings(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # the discard port: nothing listens, a stand-in for no network
    env["HF_HOME"] = str(tmp_path / "hf")
    env["QTOOL_DATA"] = str(tmp_path)  # no local WikiText-2 file: the hub is asked
    res = subprocess.run([sys.executable, "-m", "qtool", "eval", str(tmp_path), "--dataset", "wikitext2"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 1, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("qtool: error:")]
    assert len(errors) == 1 and "--dataset PATH" in errors[0], res.stderr
    assert "Retry" not in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_library_progress_bars_are_off_after_cli_setup():
    """transformers' GGUF conversion uses a plain tqdm bar; it must not reach the logs."""
    code = ("import io, sys\nfrom qtool.cli import main\nsys.argv = ['qtool', 'inspect', sys.argv[1]]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "from tqdm.auto import tqdm\nbuf = io.StringIO()\nfor _ in tqdm(range(3), file=buf):\n    pass\n"
            "assert buf.getvalue() == '', repr(buf.getvalue())\n")
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    res = subprocess.run([sys.executable, "-c", code, "/nonexistent-checkpoint"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert res.returncode == 0, res.stderr


# ---- shared checkpoints: an 11-block mini model (layers 2 and 10 exist) and its RTN form ----

@pytest.fixture(scope="module")
def deep(tmp_path_factory, default_model_dir):
    """(float model folder, its RTN checkpoint), written once for this module."""
    from qtool.api import quantize
    from qtool.config import QuantizeConfig

    root = tmp_path_factory.mktemp("deep")
    model = make_mini_model(root / "model", "llama", default_model_dir, num_hidden_layers=11, hidden_size=64,
                            intermediate_size=128, num_attention_heads=2, num_key_value_heads=1)
    quantize(str(model), root / "rtn", QuantizeConfig(method="rtn"))
    return model, root / "rtn"


def independent_weight_errors(model_dir, ckpt) -> dict[str, float]:
    """100 * ||W - Q|| / ||W|| per quantized linear, from the float safetensors and the
    independent GPTQ-layout reader of test_foundation."""
    from safetensors.torch import load_file

    from test_foundation import independent_gptq_dequant

    float_w = load_file(str(model_dir / "model.safetensors"))
    names = json.loads((ckpt / "qtool.json").read_text())["layers"]
    return {n: 100 * float((float_w[f"{n}.weight"] - independent_gptq_dequant(ckpt, n)).norm() / float_w[f"{n}.weight"].norm())
            for n in names}


# ---- the eval table ----

def test_eval_table_has_baseline_row_and_legend(capsys, deep):
    model, ckpt = deep
    res = run_cli(capsys, "eval", model, ckpt, "--baseline", model, *EVAL)
    assert res.code == 0, res.err
    lines = res.out.splitlines()
    assert max(len(ln) for ln in lines) <= 80, res.out
    header = next(i for i, ln in enumerate(lines) if ln.startswith("model"))
    base_row, float_row, rtn_row = lines[header + 2:header + 5]
    assert "(baseline)" in base_row and "+0.000" in base_row and "100.00%" in base_row
    # the baseline row is the baseline's own pass; the same model evaluated as a model agrees
    assert base_row.split("(baseline)")[1].split()[0] == float_row.split()[1]
    assert "+0.000" in float_row and "100.00%" in float_row
    assert "+0.000" not in rtn_row and "100.00%" not in rtn_row
    legend = " ".join(lines[header + 6:])
    for term in ("ppl:", "d ppl:", "KL:", "nats", "top1:", "size MB:", "time s:"):
        assert term in legend, legend


def test_builtin_baseline_has_its_real_name(capsys, deep):
    """`--baseline default` is the built-in SmolLM2, named as such, with what its float
    weights are (the mini models share its tokenizer)."""
    res = run_cli(capsys, "eval", deep[1], "--baseline", "default", *EVAL)
    assert res.code == 0, res.err
    rows = [ln for ln in res.out.splitlines() if "(baseline)" in ln]
    assert len(rows) == 1 and rows[0].startswith("SmolLM2-135M-Instruct (baseline)"), res.out
    assert "Q4_1 GGUF" in res.out


# ---- relative layer error and inspect ----

def test_relative_errors_match_their_definitions():
    from qtool.layer_error import rel_output_error_pct, rel_weight_error_pct
    from qtool.rtn import rtn_quantize

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=gen)
    x = torch.randn(500, 64, generator=gen) * torch.linspace(0.1, 3.0, 64)  # uneven channel scales
    q = rtn_quantize(w, 4, 32, True).dequantize()
    by_hand = 100 * math.sqrt(float(((x @ (w - q).T) ** 2).sum()) / float(((x @ w.T) ** 2).sum()))
    assert rel_output_error_pct(w, q, x.T @ x) == pytest.approx(by_hand, rel=1e-4)
    # any positive multiple of X^T X (GPTQ's 2/N X^T X) gives the same number
    assert rel_output_error_pct(w, q, 2 / 500 * (x.T @ x)) == pytest.approx(by_hand, rel=1e-4)
    assert rel_weight_error_pct(w, q) == pytest.approx(100 * float((w - q).norm() / w.norm()), rel=1e-5)


def test_inspect_summary_first_and_layers_in_natural_order(capsys, deep):
    from transformers import AutoConfig

    model, ckpt = deep
    res = run_cli(capsys, "inspect", ckpt, "--layers")
    assert res.code == 0, res.err
    lines = res.out.splitlines()
    cfg = AutoConfig.from_pretrained(model)
    n_linears = cfg.num_hidden_layers * 7 + 1  # q k v o gate up down per block, and lm_head
    summary = "\n".join(lines[:8])
    assert "rtn 4-bit" in lines[0]
    # the run's coverage record: every block linear; the embedding (with the tied lm_head) stays float
    assert f"coverage: quantized {n_linears - 1} of {n_linears} weights (" in summary
    assert "kept in float: embeddings (1 tensor" in summary and "lm_head (tied to the embeddings" in summary
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 1e6
    assert f"size on disk: {size:.1f} MB" in summary
    errs = independent_weight_errors(model, ckpt)
    info = run_cli(capsys, "--json", "inspect", ckpt).json()
    assert {n: s["rel_weight_error_pct"] for n, s in info["layers"].items()} == pytest.approx(errs, rel=1e-3)
    err = info["summary"]["error"]
    assert err["key"] == "rel_weight_error_pct" and "relative weight error" in summary  # RTN has no inputs
    assert err["worst"] == pytest.approx(max(errs.values()), rel=1e-3)
    assert err["mean"] == pytest.approx(sum(errs.values()) / len(errs), rel=1e-3)
    assert f"worst {err['worst']:.2f}%" in summary and f"mean {err['mean']:.2f}%" in summary
    # every layer, blocks in numeric order: 0, 1, 2, ..., 10 (not 0, 1, 10, 2)
    shown = [ln.split()[0] for ln in lines if ln.startswith("  model.layers.")]
    assert len(shown) == n_linears - 1
    blocks = [int(n.split(".")[2]) for n in shown]
    assert blocks == sorted(blocks) and blocks[-1] == 10
    compact = run_cli(capsys, "inspect", ckpt).out.splitlines()
    worst = [ln.split()[0] for ln in compact if ln.startswith("  model.layers.")]
    assert worst == sorted(errs, key=lambda n: -errs[n])[:5]


def test_gptq_records_output_and_weight_error(tmp_path, mini_llama, calib_txt):
    from qtool.api import inspect_checkpoint, quantize
    from qtool.config import QuantizeConfig

    out = tmp_path / "gptq"
    quantize(str(mini_llama), out, QuantizeConfig(method="gptq", calib=str(calib_txt), nsamples=2, seqlen=32))
    info = inspect_checkpoint(out)
    errs = independent_weight_errors(mini_llama, out)
    assert {n: s["rel_weight_error_pct"] for n, s in info["layers"].items()} == pytest.approx(errs, rel=1e-3)
    outputs = [s["rel_output_error_pct"] for s in info["layers"].values()]
    assert all(0 < v < 100 for v in outputs)
    assert info["summary"]["error"]["key"] == "rel_output_error_pct"
    assert info["summary"]["error"]["worst"] == max(outputs)


# ---- the README's checkpoints stay out of git ----

def test_readme_checkpoints_are_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    readme = (ROOT / "README.md").read_text()
    outputs = set(re.findall(r"(?:-o|--output) ([\w./-]+)", "\n".join(re.findall(r"```bash\n(.*?)```", readme, re.S))))
    outputs = {o for o in outputs if not o.startswith(("/", "..", "~", "$"))}
    assert "smollm2-gptq" in outputs
    for name in sorted(outputs):
        res = subprocess.run(["git", "check-ignore", "-q", "--no-index", f"{name}/model.safetensors"], cwd=ROOT)
        assert res.returncode == 0, f"{name} (a README example's output) is not ignored by git"
