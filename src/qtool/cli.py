"""The ``qtool`` command line: thin Typer commands that parse, build a config, call
``qtool.api`` and print the result (a table, or JSON with ``--json``).

Exit codes: 0 ok; 1 user error (one line naming the problem and the fix); 2 usage error;
3 internal error (traceback with ``--debug``); 130 interrupted.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Optional

import typer

try:  # typer >= 0.26 vendors its own click
    from typer import _click as click
except ImportError:  # older typer uses the click package
    import click

from qtool import __version__
from qtool.errors import QtoolError

EXIT_OK, EXIT_USER, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

# plain click help (rich_markup_mode=None): at 80 columns rich's boxed layout cuts choices
# and shows a <bool> metavar on every flag
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Offline LLM weight quantization: AWQ, GPTQ and RTN to GPTQ, AWQ, Marlin and compressed-tensors checkpoints.")


class State:
    json = False
    quiet = False
    debug = False


STATE = State()


def _version(value: bool) -> None:
    if value:
        print(f"qtool {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    json_out: bool = typer.Option(False, "--json", help="Print a machine-readable JSON result on stdout (no progress)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    from qtool.distributed import env_world

    follower = not env_world().leader  # another process of a torchrun run: rank 0 reports
    STATE.json, STATE.quiet, STATE.debug = json_out and not follower, quiet or follower, debug
    _quiet_library_bars()
    logging.basicConfig(level=logging.DEBUG if debug else logging.ERROR if follower else
                        logging.WARNING if (quiet or json_out) else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _quiet_library_bars() -> None:
    """qtool owns the progress display: the libraries' own bars stay off. Environment
    only (read when those libraries are imported), so `--help` imports nothing heavy;
    tqdm reads TQDM_DISABLE on import, which covers bars that bypass the HF switches
    (transformers' GGUF conversion)."""
    import os

    for var in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
        os.environ.setdefault(var, "1")


def _silence_libraries() -> None:
    """The libraries' info logs and bars off, also when they were imported already."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _emit(result: dict, human: str) -> None:
    if STATE.json:
        sys.stdout.write(json.dumps(result, sort_keys=True, default=str) + "\n")
    elif human:
        print(human)


def _run_with_progress(fn, *args, **kwargs) -> Any:
    from qtool.progress import make_reporter

    _silence_libraries()
    reporter = make_reporter(STATE.json, STATE.quiet)
    try:
        return fn(*args, progress=reporter or (lambda *a, **k: None), **kwargs)
    finally:
        if reporter is not None:
            reporter.close()


def _command_line() -> str:
    """The command line as typed, for the model card."""
    import shlex

    return shlex.join(["qtool", *sys.argv[1:]])


def _files_in(folder) -> list[str]:
    """The paths of the files of a checkpoint folder just written (all of them are new)."""
    from pathlib import Path

    return sorted(str(f) for f in Path(folder).iterdir() if f.is_file())


SWITCH_VALUES = ("true", "false", "yes", "no", "on", "off", "1", "0")


def _not_a_switch_value(ctx: typer.Context, value: Optional[str]) -> Optional[str]:
    """On/off options take no value, so in ``qtool quantize --sym false`` the word "false"
    lands in the positional MODEL/CHECKPOINT: refuse it as a usage error (unless such a
    path really exists), naming this command's switches."""
    import os

    if value is None or value.lower() not in SWITCH_VALUES or os.path.exists(value):
        return value
    switches = ["/".join(p.opts + p.secondary_opts) for p in ctx.command.params
                if getattr(p, "is_flag", False) and not getattr(p, "hidden", False)]
    raise typer.BadParameter(f"'{value}' is not a path: on/off options take no value, write just the switch "
                             f"({', '.join(switches[:3])})")


QUANTIZE_HELP = """Quantize MODEL (a local HF folder, a .gguf file or a hub id; omitted: the built-in
SmolLM2-135M-Instruct) block by block and save a safetensors checkpoint.

\b
Formats and what they accept:
  gptq       (default) any method; sym -> v1, asym -> v2 (gptq_v2);
             act-order via g_idx.
  awq        AutoAWQ GEMM: asymmetric (zero points), 4-bit, no act-order.
  marlin     Marlin tiles: k % 16, n % 64 (vLLM kernels need k % 128);
             act-order via perm.
  compressed-tensors
             pack-quantized, as llm-compressor writes (vLLM's choice).

GPTQ act-order (on by default) has two kinds: --dynamic-groups forms groups in
act-order (a non-monotone g_idx), --static-groups fixes them first (no g_idx;
compressed-tensors' actorder "weight"). Default: dynamic for gptq and marlin,
static for awq and compressed-tensors, which cannot store or no longer read a
non-monotone g_idx.
"""


@app.command(help=QUANTIZE_HELP, short_help="Quantize a model (AWQ, GPTQ, RTN) into a checkpoint.")
def quantize(
    model: Optional[str] = typer.Argument(None, help="Model folder, .gguf file or hub id (default: built-in SmolLM2-135M-Instruct).",
                                          callback=_not_a_switch_value),
    output: str = typer.Option(..., "-o", "--output", help="Output checkpoint folder (must not exist unless --force)."),
    method: str = typer.Option("gptq", "--method", "-m", help="rtn | gptq | awq | awq-gptq (AWQ's scales, then GPTQ) | signround (sign-gradient rounding, AutoRound's SignRound)"),
    bits: int = typer.Option(4, "--bits", help="4 or 8."),
    group_size: int = typer.Option(0, "--group-size", "-g", show_default=False, help="32, 64, 128 or -1 (per channel).  [default: auto = the largest of 128/64/32 dividing every layer]"),
    sym: Optional[bool] = typer.Option(None, "--sym/--asym", help="Symmetric or asymmetric (default: sym for rtn/gptq, asym for awq/awq-gptq)."),
    fmt: str = typer.Option("gptq", "--format", "-f", help="gptq | awq | marlin | compressed-tensors"),
    gptq_version: int = typer.Option(0, "--gptq-version", show_default=False, help="GPTQ checkpoint_format 1 (gptq) or 2 (gptq_v2).  [default: auto = 1 if sym else 2]"),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration .txt/.jsonl/.parquet file or pileval|c4|wikitext2 (pileval/pile-val, c4: the halves of the data folder that qtool eval never evaluates; wikitext2: the hub's train split; default: bundled calib_data); for a vision-language model, a .jsonl of {\"image\": path, \"text\": ...} rows runs through its processor."),
    nsamples: int = typer.Option(128, "--nsamples", help="Calibration samples."),
    seqlen: int = typer.Option(512, "--seqlen", help="Tokens per calibration sample."),
    seed: int = typer.Option(0, "--seed", help="Seed for calibration sampling."),
    batch_size: int = typer.Option(8, "--batch-size", help="Calibration samples per forward chunk."),
    act_order: bool = typer.Option(True, "--act-order/--no-act-order", help="GPTQ: process columns by decreasing Hessian diagonal."),
    static_groups: Optional[bool] = typer.Option(None, "--static-groups/--dynamic-groups", help="GPTQ act-order kind: groups fixed before reordering (no g_idx) or formed in act-order (non-monotone g_idx); default: dynamic for gptq and marlin, static for awq and compressed-tensors."),
    true_sequential: bool = typer.Option(True, "--true-sequential/--no-true-sequential", help="GPTQ: later linears see quantized earlier ones."),
    damp: float = typer.Option(0.01, "--damp", help="GPTQ: dampening, fraction of the mean Hessian diagonal."),
    block_size: int = typer.Option(128, "--block-size", help="GPTQ: lazy-update block width."),
    scale_search: str = typer.Option("minmax", "--scale-search", help="GPTQ/AWQ-GPTQ group ranges: minmax | mse (the shrink of the min-max range, on the grid below, that reproduces each group best; with GPTQ it took WikiText-2 ppl from 24.93 to 23.26 on the built-in model)."),
    scale_grid: int = typer.Option(25, "--scale-grid", help="--scale-search mse: ratios tried after 1.0, evenly down to 1 - --scale-max-shrink."),
    scale_max_shrink: float = typer.Option(0.25, "--scale-max-shrink", help="--scale-search mse: the largest fraction of a group's range that may be cut."),
    awq_grid: int = typer.Option(20, "--awq-grid", help="AWQ: grid points for the scale exponent."),
    awq_clip: bool = typer.Option(True, "--awq-clip/--no-awq-clip", help="AWQ: search weight clipping."),
    awq_search_tokens: int = typer.Option(0, "--awq-search-tokens", show_default=False, help="AWQ: calibration tokens that score the scale and clip searches (whole samples).  [default: auto = max(4096, 2 x largest in_features)]"),
    save_search: Optional[str] = typer.Option(None, "--save-search", help="AWQ: also write the search results (scales, clip bounds) to this file."),
    rounding_steps: int = typer.Option(200, "--rounding-steps", help="signround: signed-gradient steps per block (one --batch-size chunk each)."),
    moe_min_tokens: int = typer.Option(32, "--moe-min-tokens", help="MoE: an expert routed fewer calibration tokens than this gets --moe-low-tokens."),
    moe_low_tokens: str = typer.Option("all-experts", "--moe-low-tokens", help="MoE: all-experts (statistics from every calibration token run through the expert) | rtn (round-to-nearest, with a warning)."),
    load_search: Optional[str] = typer.Option(None, "--load-search", help="AWQ: apply search results from --save-search instead of searching (no calibration)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float16 | bfloat16 | float32 (load dtype)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda (compute device; weights stay on CPU)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its work folder (same model, data and options)."),
    restart: bool = typer.Option(False, "--restart", help="Discard an interrupted run's work folder and start over."),
    bits_budget: float = typer.Option(0.0, "--bits-budget", show_default=False, help="Mixed precision (formats gptq and compressed-tensors): average bits per weight, scales and zeros included (e.g. 4.5); each layer group's sensitivity (KL when only it is at --bits) is measured and the least sensitive stay at --bits, the rest go to 8 bits.  [default: off]"),
    exclude: Optional[list[str]] = typer.Option(None, "--exclude", metavar="PATTERN", help="Keep linears in float whose full module name matches this fnmatch pattern (repeatable), e.g. '*.down_proj'."),
    model_free: Optional[bool] = typer.Option(None, "--model-free/--no-model-free", show_default=False, help="RTN: quantize tensor by tensor from the safetensors shards without building the model (memory of one tensor).  [default: auto = when the files are the same as the in-model path's]"),
    include: Optional[list[str]] = typer.Option(None, "--include", metavar="PATTERN", help="Model-free RTN: quantize the 2-D weights whose full tensor name matches this fnmatch pattern (repeatable), e.g. 'model.layers.*'; for architectures without a qtool family file."),
    stream: Optional[bool] = typer.Option(None, "--stream/--no-stream", show_default=False, help="Read each block's weights from the safetensors shards only while it is quantized (memory of one block).  [default: auto = when the files are the same as loading the model whole]"),
    activations: str = typer.Option("auto", "--activations", help="Where the calibration activations live: device | cpu | disk (a spill folder next to the output; memory of one chunk).  [default: auto = the first that the memory plan fits]"),
) -> None:
    from qtool.api import budget_line, quantize as run_quantize

    if resume and restart:
        raise click.exceptions.UsageError("--resume continues the interrupted run and --restart discards it: pass only one of them")

    config = _quantize_config(locals())
    result = _run_with_progress(run_quantize, model, output, config, dtype=dtype, device=device, force=force,
                                resume=resume, restart=restart, command=_command_line(), model_free=model_free,
                                include=tuple(include or ()), stream=stream, activations=activations)
    if "rank" in result:  # not rank 0 of a torchrun run: rank 0 prints the result
        print(f"qtool: rank {result['rank']}/{result['world_size']} done; rank 0 wrote {result['output']}",
              file=sys.stderr)
        return
    result["files_written"] = _files_in(result["output"])
    cfg = result["config"]
    _emit(result, f"wrote {result['output']}: {cfg['method']} {cfg['bits']}-bit group {cfg['group_size']} "
                  f"{'sym' if cfg['sym'] else 'asym'}, format {result['format']}, "
                  f"{len(result['layers'])} layers in {result['timings_s']['total']:.1f}s\n{result['coverage']['line']}"
                  + (f"\nbits budget: {budget_line(result['bits_budget'])}" if result.get("bits_budget") else ""))


def _quantize_config(kw: dict):
    """The ``QuantizeConfig`` of ``quantize``'s (or ``plan``'s) parsed options."""
    from qtool.config import QuantizeConfig

    kw = {**kw, "exclude": tuple(kw.get("exclude") or ())}
    names = dict(fmt="format", save_search="awq_save_search", load_search="awq_load_search")
    fields = set(QuantizeConfig.__dataclass_fields__)
    return QuantizeConfig(**{names.get(k, k): v for k, v in kw.items() if names.get(k, k) in fields})


PLAN_HELP = """Estimate the peak CPU (and GPU) memory of a `qtool quantize` run with the same
MODEL and options, without loading the weights, and compare it with the memory
available now. Exit code 1 (with the options that would fit) when it does not fit.
"""


def plan(**kw) -> None:
    from qtool.api import memory_plan

    result = _run_with_progress(memory_plan, kw["model"], _quantize_config(kw), dtype=kw["dtype"], device=kw["device"],
                                stream=kw["stream"], model_free=kw["model_free"], include=tuple(kw["include"] or ()),
                                activations=kw["activations"])
    _emit(result, result["line"] + "".join(f"\n  {k:<18} {v / 2**30:6.2f} GiB" for k, v in result["parts_bytes"].items()))


def _plan_signature() -> None:
    """``plan`` takes ``quantize``'s options but the output and its handling."""
    import inspect

    drop = {"output", "force", "resume", "restart"}
    sig = inspect.signature(quantize)
    plan.__signature__ = sig.replace(parameters=[p for n, p in sig.parameters.items() if n not in drop])
    plan.__annotations__ = {n: a for n, a in quantize.__annotations__.items() if n not in drop}


_plan_signature()
app.command(name="plan", help=PLAN_HELP, short_help="Estimate a quantize run's peak memory, loading nothing.")(plan)


@app.command(short_help="Repack a checkpoint in another format, exactly.")
def convert(
    checkpoint: str = typer.Argument(..., help="A quantized checkpoint folder (gptq, awq, marlin or compressed-tensors).",
                                     callback=_not_a_switch_value),
    to: str = typer.Option(..., "--to", "-t", help="gptq | awq | marlin | compressed-tensors"),
    output: str = typer.Option(..., "-o", "--output", help="Output checkpoint folder (must not exist unless --force)."),
    gptq_version: int = typer.Option(0, "--gptq-version", show_default=False, help="--to gptq: checkpoint_format 1 (gptq) or 2 (gptq_v2).  [default: auto = 1 if sym else 2]"),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
) -> None:
    """Repack CHECKPOINT in another format, exactly (same codes, scales, zeros, g_idx);
    a conversion that would change any weight is refused before anything is written."""
    from qtool.convert import convert_checkpoint

    result = _run_with_progress(convert_checkpoint, checkpoint, to, output, gptq_version=gptq_version or None, force=force,
                                command=_command_line())
    source = result["converted_from"][-1]
    _emit({"output": output, **result, "files_written": _files_in(output)},
          f"wrote {output}: {source['format']} -> {result['format']}, read back and verified")


@app.command(name="eval", short_help="Perplexity, KL and top-1 agreement, side by side.")
def eval_cmd(
    models: list[str] = typer.Argument(None, help="Models or checkpoints to evaluate side by side (default: the built-in model)."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Float model for KL and top-1 agreement ('default' = built-in)."),
    dataset: Optional[list[str]] = typer.Option(None, "--dataset", help="wikitext2 | c4 | pile-val | a .txt/.jsonl/.parquet file; repeat it or give a comma list for several, side by side (default: wikitext2)."),
    suite: bool = typer.Option(False, "--suite", help="The standard set wikitext2,c4,pile-val on the first --windows N windows of each (default 40)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Folder of the named datasets' files (default: $QTOOL_DATA, else ../shared/data beside the source checkout)."),
    seqlen: int = typer.Option(2048, "--seqlen", help="Tokens per window."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Window stride (default: seqlen, non-overlapping)."),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", "--windows", help="Evaluate only the first N windows of each dataset."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    kernel: str = typer.Option("auto", "--kernel", help="Dequant-matmul for quantized checkpoints: auto (Triton on CUDA, torch reference on CPU) | triton | torch."),
    write_card: bool = typer.Option(False, "--write-card", help="Add (or replace) the results in the model card (README.md) of every qtool checkpoint evaluated."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Draw per-window perplexity (and KL with --baseline) of every model to FILE.png or FILE.svg."),
    report: Optional[str] = typer.Option(None, "--report", help="Write one self-contained HTML page (table and plots) to FILE.html."),
) -> None:
    """Perplexity (protocol printed with the result) and divergence from a float baseline."""
    from qtool.evaluate import evaluate, render_table
    from qtool.errors import UserInputError
    from qtool.publish import check_eval_outputs, write_eval_outputs
    from qtool.textsets import SUITE, SUITE_WINDOWS

    models = models or [None]
    if suite and dataset:
        raise UserInputError("--suite is the datasets wikitext2,c4,pile-val: drop --dataset, or drop --suite")
    if suite and max_windows is None:
        max_windows = SUITE_WINDOWS
    check_eval_outputs(models, write_card=write_card, plot=plot, report=report)
    result = _run_with_progress(evaluate, models, dataset=list(SUITE) if suite else dataset or "wikitext2",
                                seqlen=seqlen, stride=stride, max_windows=max_windows, baseline=baseline,
                                device=device, kernel=kernel, data_dir=data_dir)
    written = write_eval_outputs(result, models, write_card=write_card, plot=plot, report=report)
    if written:
        result["files_written"] = written
    _emit(result, render_table(result) + "".join(f"\nwrote {path}" for path in written))


@app.command(short_help="What a checkpoint holds: summary, errors, provenance.")
def inspect(
    checkpoint: str = typer.Argument(..., help="A checkpoint folder written by qtool (or any quantized HF folder).",
                                     callback=_not_a_switch_value),
    verify: bool = typer.Option(False, "--verify", help="Recompute the sha256 of every file against qtool.json (all but the model card README.md, which people and eval --write-card edit)."),
    layers: bool = typer.Option(False, "--layers", help="List every layer with all its stats, in layer order (default: the 5 worst)."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Draw the relative error of every layer, by block and linear, to FILE.png or FILE.svg."),
) -> None:
    """A summary first (method, bits, group size, format, size on disk, worst and mean
    layer error, how many linears are quantized), calibration provenance, then the
    worst layers (all of them with --layers)."""
    from qtool.api import inspect_checkpoint
    from qtool.summary import render_inspect

    if plot is not None:
        from qtool.plots import check_plot_path

        check_plot_path(plot)
    info = inspect_checkpoint(checkpoint, verify=verify)
    if plot is not None:
        from qtool.publish import write_layer_plot

        info["files_written"] = [write_layer_plot(checkpoint, plot)]
    if info.get("qtool") is None and "method" not in info:
        _emit(info, f"{checkpoint}: not written by qtool; quantization_config = {json.dumps(info['quantization_config'])}")
        return
    lines = [render_inspect(checkpoint, info, all_layers=layers)] + [f"wrote {p}" for p in info.get("files_written", [])]
    if verify:
        lines.append("files: all sha256 match" if info["verified"] else f"files: MISMATCH {info['mismatched_files']}")
    _emit(info, "\n".join(lines))
    if verify and not info["verified"]:
        raise QtoolError(f"{len(info['mismatched_files'])} file(s) differ from qtool.json: the checkpoint was modified or is corrupt")


GLOBAL_FLAGS = ("--json", "--quiet", "-q", "--debug")


def _hoist_global_flags(argv: list[str]) -> list[str]:
    """Let the global flags stand anywhere (``qtool quantize ... --json``), as users type them."""
    if "--" in argv:
        return argv
    flags = [a for a in argv if a in GLOBAL_FLAGS]
    return flags + [a for a in argv if a not in GLOBAL_FLAGS]


@app.command(short_help="Run layers through the dequant-matmul kernels.")
def check(
    checkpoint: str = typer.Argument(..., help="A quantized checkpoint folder."),
    sample: Optional[int] = typer.Option(None, "--sample", help="Check this many layers, drawn with --seed (default: all on GPU, 16 on CPU)."),
    kernel: str = typer.Option("auto", "--kernel", help="auto | triton | torch (auto: Triton on CUDA, the Triton interpreter on CPU)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the layer sample and the random inputs."),
) -> None:
    """Run quantized layers through the Triton dequant-matmul kernel and the torch reference; exit 1 on a mismatch."""
    import os

    import torch

    if kernel not in ("auto", "triton", "torch"):
        raise typer.BadParameter("use auto, triton or torch", param_hint="--kernel")
    on_gpu = torch.cuda.is_available()
    if not on_gpu and kernel != "torch":
        # no GPU: Triton's interpreter runs the same kernels on CPU (set before triton is imported)
        os.environ.setdefault("TRITON_INTERPRET", "1")
        if sample is None:
            sample = 16
    from qtool.api import check_checkpoint
    from qtool.kernels import available_kernels

    if kernel == "auto":
        kernel = "triton" if "triton" in available_kernels() else "torch"
    result = _run_with_progress(check_checkpoint, checkpoint, sample=sample, kernel=kernel, seed=seed)
    bad = [r for r in result["layers"] if not r["ok"]]
    lines = [f"{checkpoint}: {result['layers_checked']} of {result['layers_total']} layers through the {kernel} kernel "
             f"({result['kernel_layout']} layout) in {result['seconds']:.1f}s"]
    for r in result["layers"]:
        lines.append(f"  {'ok ' if r['ok'] else 'BAD'} {r['layer']}: worst relative error {r['worst_rel_error']:.3g}"
                     + (f" ({r['error']})" if r["error"] else ""))
    _emit(result, "\n".join(lines))
    if bad:
        raise QtoolError(f"{len(bad)} layer(s) differ from the reference beyond tolerance, e.g. {bad[0]['layer']}")


def main() -> None:
    STATE.json = STATE.quiet = STATE.debug = False
    try:
        rv = app(args=_hoist_global_flags(sys.argv[1:]), prog_name="qtool", standalone_mode=False)
        code = rv if isinstance(rv, int) else EXIT_OK
    except typer.Exit as exc:
        code = exc.exit_code
    except click.exceptions.UsageError as exc:
        exc.show()
        code = EXIT_USAGE
    except (KeyboardInterrupt, typer.Abort):
        print("qtool: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except QtoolError as exc:
        if STATE.debug:
            raise
        print(f"qtool: error: {exc}", file=sys.stderr)
        code = exc.exit_code
        if STATE.json:
            _emit({"error": {"message": str(exc), "type": type(exc).__name__, "exit_code": code}}, "")
    except click.exceptions.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except Exception as exc:  # the last line of defence: one line plus how to see more
        if STATE.debug:
            raise
        print(f"qtool: internal error: {type(exc).__name__}: {exc} (run with --debug for a traceback)", file=sys.stderr)
        code = EXIT_INTERNAL
    from qtool.distributed import shutdown

    shutdown()  # a torchrun process group this run opened: closing it lets the peers of a failed run stop at once
    sys.exit(code)


if __name__ == "__main__":
    main()
