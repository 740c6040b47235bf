"""A checkpoint explains itself: the model card every save writes (read back by
huggingface_hub's own parser, for every format, after ``convert`` and after ``eval
--write-card``), the figures of ``inspect --plot`` and ``eval --plot`` (their lines hold
exactly the numbers of ``qtool.json`` and of the eval result) and the self-contained HTML
report of ``eval --report`` (checked with an HTML parser, and in a headless Chromium when
one is installed)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import shlex
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path
from xml.etree import ElementTree

import pytest
from conftest import ROOT, WIKITEXT_TEST, make_mini_model
from helpers import run_cli

SOURCE_CARD = "---\nlicense: mit\nlanguage:\n- en\n---\n# Mini llama\n\nA random-init model for the tests.\n"
# format -> the quantize options that give it (RTN: no calibration; awq and this
# compressed-tensors checkpoint asymmetric), one GPTQ checkpoint for both error kinds
FORMATS = {
    "gptq": ["--method", "gptq", "--nsamples", "4", "--seqlen", "32", "--batch-size", "4", "-g", "64"],
    "awq": ["--method", "rtn", "--asym", "--format", "awq", "-g", "64"],
    "marlin": ["--method", "rtn", "--format", "marlin", "-g", "128"],  # vLLM's symmetric Marlin: 128 or -1
    "compressed-tensors": ["--method", "rtn", "--asym", "--format", "compressed-tensors", "-g", "64"],
}
EVAL = ["--dataset", WIKITEXT_TEST, "--seqlen", "64"]
PNG = b"\x89PNG\r\n\x1a\n"


def cli(*args) -> tuple[int, str]:
    """Run the CLI in-process (module fixtures cannot use capsys): exit code, stdout."""
    from qtool.cli import main

    old, out = sys.argv, io.StringIO()
    sys.argv = ["qtool", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out):
            main()
    except SystemExit as exc:
        return exc.code, out.getvalue()
    finally:
        sys.argv = old
    return 0, out.getvalue()


@pytest.fixture(scope="module")
def source(tmp_path_factory, default_model_dir) -> Path:
    """A two-block mini llama (k = 128, 256: every format holds it) with its own card."""
    folder = make_mini_model(tmp_path_factory.mktemp("card") / "mini", "llama", default_model_dir)
    (folder / "README.md").write_text(SOURCE_CARD)
    return folder


@pytest.fixture(scope="module")
def ckpts(source, tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
    """format -> (checkpoint, the command line that made it), quantized through the CLI."""
    root = tmp_path_factory.mktemp("ckpts")
    calib = root / "calib.txt"
    calib.write_text("\n".join(f"Line {i}: the quick brown fox {i * 7 % 13} jumps over {i} lazy dogs." for i in range(200)))
    out = {}
    for fmt, options in FORMATS.items():
        args = ["-q", "quantize", str(source), *options, "-o", str(root / fmt)]
        if "gptq" in options:
            args += ["--calib", str(calib)]
        code, _ = cli(*args)
        assert code == 0, fmt
        out[fmt] = (root / fmt, args)
    return out


def load_card(folder: Path):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard import metadata_load

    card = ModelCard.load(folder / "README.md")
    assert metadata_load(folder / "README.md") == card.data.to_dict()
    return card


def record_of(folder: Path) -> dict:
    return json.loads((folder / "qtool.json").read_text())


def float_linears(source: Path) -> list[str]:
    """Names of every nn.Linear of the float model (lm_head included)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_writes_a_card_the_hub_parser_reads(ckpts, source, fmt):
    folder, args = ckpts[fmt]
    card, record = load_card(folder), record_of(folder)
    data = card.data
    assert data.base_model == str(source) and data.base_model_relation == "quantized"
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    method = FORMATS[fmt][1]
    assert {method, fmt, "4-bit", "qtool"} <= set(data.tags)
    assert data.license == "mit" and data.language == ["en"]  # carried from the source's card
    text = card.text
    assert shlex.join(["qtool", *args]) in text  # the exact command line
    cfg = record["config"]
    assert f"| group size | {cfg['group_size']} |" in text and f"| bits | {cfg['bits']} " in text
    assert ("symmetric (no zero points)" if cfg["sym"] else "asymmetric (zero points)") in text
    assert f"| act-order | {cfg['act_order_kind']}" in text
    if method == "gptq":
        cal = record["calibration"]
        assert f"{cal['nsamples']} samples x {cal['seqlen']} tokens" in text and cal["tokens_sha256"] in text
    # coverage, against the float model's own linears
    linears = float_linears(source)
    kept = sorted(set(linears) - set(record["layers"]))
    assert kept == ["lm_head"]
    assert f"{len(record['layers'])} of {len(linears)} linears quantized" in text and "kept in float: `lm_head`" in text
    before = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    after = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert f"{before / 1e6:.1f} MB of source weights -> {after / 1e6:.1f} MB" in text
    loading = {"gptq": "vllm serve", "awq": "vllm serve", "marlin": "load_packed_model",
               "compressed-tensors": "CompressedTensorsConfig(dequantize=True)"}[fmt]
    assert loading in text
    # the source's own card, quoted line by line
    assert "> # Mini llama" in text and "> A random-init model for the tests." in text
    # the card is not in files_sha256, so people and --write-card may edit it
    assert "README.md" not in record["files_sha256"]


def test_card_edits_do_not_fail_verify(capsys, ckpts, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(ckpts["marlin"][0], copy)
    with open(copy / "README.md", "a") as f:
        f.write("\nEdited before publishing.\n")
    res = run_cli(capsys, "--json", "inspect", copy, "--verify")
    assert res.code == 0 and res.json()["verified"], res.out


def test_api_card_names_an_equivalent_command(capsys, source, tmp_path):
    """A Python API run records the command line that does the same: running it gives
    the same weights, byte for byte."""
    from qtool.api import quantize
    from qtool.config import QuantizeConfig

    quantize(str(source), tmp_path / "api", QuantizeConfig(method="rtn", sym=False, group_size=32,
                                                           format="compressed-tensors", bits=8), device="cpu")
    command = record_of(tmp_path / "api")["command"]
    assert command["via"] == "api" and command["line"] in load_card(tmp_path / "api").text
    argv = shlex.split(command["line"])
    argv[argv.index("-o") + 1] = str(tmp_path / "cli")
    assert run_cli(capsys, "-q", *argv[1:]).code == 0
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "api" / f).read_bytes() == (tmp_path / "cli" / f).read_bytes()


def test_default_model_facts(default_model_dir):
    from qtool.card import DEFAULT_HUB_ID, source_facts
    from qtool.loading import default_gguf_path

    facts = source_facts("default", str(default_gguf_path()), str(default_model_dir))
    assert facts["hub_id"] == DEFAULT_HUB_ID
    assert facts["license"] == "apache-2.0"  # the GGUF's general.license
    assert facts["size_bytes"] == (default_model_dir / "model.safetensors").stat().st_size


def test_gguf_string_reads_what_gguf_writes(tmp_path):
    import gguf
    import numpy as np

    from qtool.card import gguf_string

    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("general.count", 7)
    writer.add_array("tokenizer.ggml.tokens", ["a", "bc", "ünï"])
    writer.add_array("tokenizer.ggml.scores", [0.5, 1.5])
    writer.add_float64("general.x", 2.5)
    writer.add_bool("general.flag", True)
    writer.add_string("general.license", "other-license")
    writer.add_tensor("w", np.zeros((2, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_string(path, "general.license") == "other-license"
    assert gguf_string(path, "general.architecture") == "llama"
    assert gguf_string(path, "general.count") is None and gguf_string(path, "missing") is None


@pytest.fixture(scope="module")
def evaluated(ckpts, source, tmp_path_factory) -> dict:
    """``qtool eval --json`` of the gptq and awq checkpoints against the float model, with
    --write-card, --plot and --report."""
    root = tmp_path_factory.mktemp("eval")
    code, out = cli("--json", "eval", ckpts["gptq"][0], ckpts["awq"][0], "--baseline", source, *EVAL,
                    "--max-windows", "4", "--write-card", "--plot", root / "eval.png", "--report", root / "report.html")
    assert code == 0
    return {"result": json.loads(out), "root": root}


def test_write_card_adds_results_in_model_index_and_table(evaluated, ckpts):
    result = evaluated["result"]
    folders = [ckpts["gptq"][0], ckpts["awq"][0]]
    assert sorted(result["files_written"]) == sorted(
        [str(f / "README.md") for f in folders] + [str(evaluated["root"] / "eval.png"), str(evaluated["root"] / "report.html")])
    for folder, row in zip(folders, result["results"]):
        card = load_card(folder)
        metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
        assert metrics == {"perplexity": row["ppl"], "perplexity_delta": row["delta_ppl"],
                           "kl_divergence": row["kl_mean"], "top1_agreement": row["top1_agreement"]}
        assert all(r.dataset_name == result["protocol"]["dataset"] for r in card.data.eval_results)
        section = card.text.split("<!-- qtool:results -->")[1].split("<!-- /qtool:results -->")[0]
        assert f"| **{row['model']} (this checkpoint)** | {row['ppl']:.3f} | {row['delta_ppl']:+.3f} |" in section
        assert f"| {result['baseline']['model']} (baseline) | {result['baseline']['ppl']:.3f} |" in section
        assert card.data.license == "mit" and card.data.base_model_relation == "quantized"


def test_write_card_replaces_and_convert_carries(capsys, ckpts, evaluated, source, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(ckpts["gptq"][0], folder)  # its card holds the results of `evaluated` (4 windows)
    res = run_cli(capsys, "--json", "eval", folder, "--baseline", source, *EVAL, "--max-windows", "2", "--write-card")
    assert res.code == 0, res.err
    row = res.json()["results"][0]
    assert row["ppl"] != evaluated["result"]["results"][0]["ppl"]
    text = (folder / "README.md").read_text()
    assert text.count("<!-- qtool:results -->") == 1 and text.count("## Evaluation") == 1
    assert run_cli(capsys, "inspect", folder, "--verify").code == 0
    conv = run_cli(capsys, "--json", "convert", folder, "--to", "marlin", "-o", tmp_path / "marlin")
    assert conv.code == 0, conv.err
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(conv.json(), json.loads((ROOT / "schemas" / "qtool-output.schema.json").read_text()))
    written = conv.json()["files_written"]
    assert str(tmp_path / "marlin" / "README.md") in written and str(tmp_path / "marlin" / "model.safetensors") in written
    assert sorted(written) == sorted(str(f) for f in (tmp_path / "marlin").iterdir())
    card = load_card(tmp_path / "marlin")
    assert "marlin" in card.data.tags and "gptq" in card.data.tags  # method gptq, format marlin
    assert card.data.license == "mit" and card.data.base_model == str(source)
    assert {r.metric_type: r.metric_value for r in card.data.eval_results}["perplexity"] == row["ppl"]
    assert f"{row['ppl']:.3f}" in card.text and "> # Mini llama" in card.text
    assert "- from `gptq` (version 1)" in card.text and "`qtool --json convert" in card.text
    assert "load_packed_model" in card.text and "vllm serve" not in card.text
    back = run_cli(capsys, "convert", tmp_path / "marlin", "--to", "gptq", "-o", tmp_path / "gptq")
    assert back.code == 0, back.err
    again = load_card(tmp_path / "gptq")
    assert again.data.tags[-1] == "gptq" and again.data.eval_results == card.data.eval_results
    assert again.text.count("> # Mini llama") == 1 and "- from `marlin`" in again.text


def lines_of(ax) -> list[tuple[str, list[float], list[float]]]:
    return [(line.get_label(), list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()]


def test_layer_error_plot_holds_the_qtool_json_numbers(capsys, ckpts, tmp_path):
    from qtool.plots import layer_error_figure

    folder = ckpts["gptq"][0]
    record = record_of(folder)
    fig = layer_error_figure(record)
    axes = fig.get_axes()
    assert len(axes) == 2  # GPTQ records both errors
    for ax, key in zip(axes, ("rel_output_error_pct", "rel_weight_error_pct")):
        series = lines_of(ax)
        assert len(series) == 7  # the linears of a llama block
        for linear, blocks, values in series:
            assert blocks == [0, 1]
            assert values == [record["layers"][f"model.layers.{b}.{linear}"][key] for b in blocks]
    rtn = layer_error_figure(record_of(ckpts["marlin"][0]))
    assert len(rtn.get_axes()) == 1 and len(lines_of(rtn.get_axes()[0])) == 7  # RTN: the weight error only
    res = run_cli(capsys, "--json", "inspect", folder, "--plot", tmp_path / "layers.svg")
    assert res.code == 0, res.err
    assert res.json()["files_written"] == [str(tmp_path / "layers.svg")]
    assert ElementTree.parse(tmp_path / "layers.svg").getroot().tag.endswith("svg")
    assert run_cli(capsys, "inspect", folder, "--plot", tmp_path / "layers.png").code == 0
    assert (tmp_path / "layers.png").read_bytes().startswith(PNG)


def test_eval_plot_holds_the_per_window_numbers(evaluated):
    from qtool.plots import eval_figure

    result = evaluated["result"]
    rows, base = result["results"], result["baseline"]
    n = result["protocol"]["windows"]
    assert n == 4
    for r in rows:  # equal windows: the geometric mean of the window ppl is the ppl, the mean KL the KL
        assert len(r["window_ppl"]) == len(r["window_kl"]) == n
        assert math.exp(sum(math.log(p) for p in r["window_ppl"]) / n) == pytest.approx(r["ppl"], rel=1e-9)
        assert sum(r["window_kl"]) / n == pytest.approx(r["kl_mean"], rel=1e-9)
    assert math.exp(sum(math.log(p) for p in base["window_ppl"]) / n) == pytest.approx(base["ppl"], rel=1e-9)
    ppl_ax, kl_ax = eval_figure(result).get_axes()
    ppl_lines, kl_lines = lines_of(ppl_ax), lines_of(kl_ax)
    assert len(ppl_lines) == 1 + len(rows) and len(kl_lines) == len(rows)
    assert ppl_lines[0][0].endswith("(baseline)") and ppl_lines[0][2] == base["window_ppl"]
    for r, (_, x, y), (_, kx, ky) in zip(rows, ppl_lines[1:], kl_lines):
        assert x == kx == list(range(n)) and y == r["window_ppl"] and ky == r["window_kl"]
    assert (evaluated["root"] / "eval.png").read_bytes().startswith(PNG)


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links, self.rows = [], [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag in ("script", "link") or attrs.get("href"):
            self.links.append(tag)
        if tag == "tr":
            self.rows += 1


def test_report_is_one_self_contained_page(evaluated):
    from PIL import Image

    page = _Page()
    page.feed((evaluated["root"] / "report.html").read_text())
    result = evaluated["result"]
    assert page.rows == 1 + 1 + len(result["results"])  # header, baseline, the models
    assert page.links == []  # nothing fetched, no script
    # the eval figure, then the per-layer figure of each of the two checkpoints
    assert len(page.images) == 3
    for src in page.images:
        head, _, payload = src.partition(",")
        assert head == "data:image/png;base64"
        data = base64.b64decode(payload, validate=True)
        assert data.startswith(PNG)
        with Image.open(io.BytesIO(data)) as image:
            image.verify()


def _chromium() -> str | None:
    import os

    for name in (os.environ.get("QTOOL_CHROMIUM"), "chromium-headless-shell", "chromium", "chromium-browser",
                 "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def test_report_renders_in_headless_chromium(evaluated):
    """Skipped where Playwright or a Chromium is missing (the suite does not install a
    browser); on Debian: ``apt-get install chromium-headless-shell`` and ``pip install
    playwright``."""
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = _chromium()
    if executable is None:
        pytest.skip("no Chromium executable (chromium-headless-shell, chromium) on PATH")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto((evaluated["root"] / "report.html").as_uri())
            page.wait_for_load_state("load")
            sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
            rows = page.eval_on_selector_all("tbody tr", "rows => rows.length")
        finally:
            browser.close()
    assert len(sizes) == 3 and all(done and w > 100 and h > 100 for done, w, h in sizes), sizes
    assert rows == 1 + len(evaluated["result"]["results"])


@pytest.mark.parametrize("args,expected", [
    (["--plot", "out.jpg"], "--plot out.jpg: the file must end in .png or .svg"),
    (["--report", "out.pdf"], "--report out.pdf: the file must end in .html or .htm"),
    (["--write-card"], "none of the models is one"),
])
def test_eval_output_options_refused_before_work(capsys, source, tmp_path, args, expected):
    res = run_cli(capsys, "eval", source, *EVAL, "--max-windows", "1", *args)
    assert res.code == 1 and expected in res.err and len(res.err.strip().splitlines()) == 1, res.err
    assert "ppl" not in res.out  # refused before evaluating
