"""Format conversion of a quantized checkpoint: every quantized linear is unpacked to the
canonical ``QuantizedWeight`` and packed again in the target format; plain tensors
(embeddings, norms, an untied lm_head), tokenizer and side files are carried unchanged.

A conversion is exact or refused: the target must hold every layer's integer codes, scales,
zeros and ``g_idx`` as they are (same bits, group size, symmetry, act-order), so the
dequantized weights are identical bit for bit. Everything that can be checked is checked
before any file is written: the options the target accepts, every layer's shape, and the
data-dependent corner of GPTQ v1 (an asymmetric zero of 0 has no v1 field).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qtool import __version__
from qtool.card import carried_card, read_source_card
from qtool.config import MIXED_FORMATS
from qtool.errors import UnsupportedError, UserInputError
from qtool.io import (
    DEFAULT_SHARD_SIZE,
    check_output_path,
    copy_side_files,
    read_qtool_json,
    read_quantized_layers,
    sha256_file,
    write_checkpoint,
)
from qtool.pack import FORMATS, get_format
from qtool.pack.gptq import resolve_version
from qtool.qtensor import QuantizedWeight


def _quiet(event: str, **info: Any) -> None:
    pass


def target_options(to: str, sym: bool, gptq_version: int | None) -> dict:
    """The format options of the written checkpoint: ``{"version": 1|2}`` for gptq (given,
    else 1 for symmetric and 2 for asymmetric weights, as ``qtool quantize`` does), ``{}``
    otherwise.

    Raises:
        UserInputError: ``gptq_version`` given for another target, or not 1/2.
    """
    if to != "gptq":
        if gptq_version:
            raise UserInputError(f"--gptq-version only applies to --to gptq, not --to {to}: drop it")
        return {}
    if gptq_version not in (None, 0, 1, 2):
        raise UserInputError(f"--gptq-version {gptq_version} is not supported: use 1 or 2")
    return {"version": resolve_version(sym, gptq_version or None)}


def _first_problem(fmt, qweights: dict[str, QuantizedWeight], act_order: bool, options: dict) -> tuple[str, str, int] | None:
    """``(layer, reason, number of failing layers)`` for the first layer whose shape or
    options ``fmt`` cannot hold, or ``None``. ``act_order`` is the checkpoint-level flag (a
    layer whose ``g_idx`` happens to be contiguous still belongs to an act-order checkpoint)."""
    problems = {}
    for name in sorted(qweights):
        qw = qweights[name]
        n, k = qw.shape
        reason = fmt.check_layer(n, k, qw.bits, qw.group_size, qw.sym, act_order, **options)
        if reason:
            problems[name] = reason
    if not problems:
        return None
    name = next(iter(problems))
    return name, problems[name], len(problems)


def _hint(qweights: dict[str, QuantizedWeight], act_order: bool, sym: bool, to: str) -> str:
    """The fix to name in a refusal, in ``qtool convert``'s own options: the other
    ``--to`` formats whose options and shapes hold every layer (default options)."""
    holders = [f"--to {name}" for name, fmt in sorted(FORMATS.items())
               if name != to and _first_problem(fmt, qweights, act_order, target_options(name, sym, None)) is None]
    if not holders:
        return "; no other format holds these weights exactly"
    return f"; these weights convert exactly with {' or '.join(holders)}"


def _requantize(qweights: dict[str, QuantizedWeight], src_record: dict | None, params: dict, to: str) -> str:
    """Whether quantizing the model again could reach ``to`` (the fix is then a ``qtool
    quantize`` command), or why no quantization of layers of these shapes can."""
    from qtool.config import METHODS
    from qtool.fixes import requantize_note

    method = ((src_record or {}).get("config") or {}).get("method")
    shapes = {name: qw.shape for name, qw in qweights.items()}
    note = requantize_note(to, method if method in METHODS else "rtn", params["bits"], params["group_size"],
                           params["sym"], params["act_order"], shapes)
    return f"; {note}" if note else ""


def _describe(params: dict, fmt_name: str, options: dict) -> str:
    version = f" v{options['version']}" if "version" in options else ""
    group = "per-channel" if params["group_size"] == -1 else f"group {params['group_size']}"
    kind = "sym" if params["sym"] else "asym"
    act = ", act-order" if params["act_order"] else ""
    return f"{fmt_name}{version}, {params['bits']}-bit {group} {kind}{act}"


def convert_checkpoint(checkpoint: str | Path, to: str, output: str | Path, *, gptq_version: int | None = None,
                       force: bool = False, max_shard_size: str = DEFAULT_SHARD_SIZE, command: str | None = None,
                       progress: Callable[..., None] = _quiet) -> dict:
    """Convert the quantized ``checkpoint`` folder (any format qtool reads) to format ``to``
    in the new folder ``output``. Returns the new ``qtool.json`` record.

    The record keeps the source's provenance (model, calibration, method config, per-layer
    statistics) with ``format`` / ``format_options`` / ``config.format`` updated, and appends
    ``{"format", "format_options", "path", "qtool_version", "files_sha256"}`` of the source
    (and ``command``, the command line that converted it, when given) to the list
    ``converted_from``. The model card is carried and updated (``card.carried_card``): the
    new format, its loading snippets, the same results and source card.

    Raises:
        UserInputError: missing or unquantized source, output = source, existing output
            without ``force``, unknown target, ``gptq_version`` for a non-gptq target.
        UnsupportedError: a conversion that would not be exact (the target cannot hold the
            options, a layer's shape, or its data), before anything is written.
        FormatError: the source does not match its config, or the read-back check fails.
    """
    source = Path(checkpoint).expanduser()
    if not (source / "config.json").is_file():
        raise UserInputError(f"{source} is not a checkpoint folder (no config.json): pass a quantized checkpoint folder")
    fmt = get_format(to)
    out = check_output_path(output, force, [source])

    progress("stage", name="read", detail=str(source))
    qweights, plain, src_fmt, params = read_quantized_layers(source)
    src_record = read_qtool_json(source)
    src_options = dict(src_record.get("format_options", {})) if src_record else (
        {"version": params["version"]} if "version" in params else {})
    if not qweights:
        raise UserInputError(f"{source}: no quantized layers found for format {src_fmt}")
    act_order = bool(params["act_order"]) or any(qw.g_idx is not None for qw in qweights.values())
    params = {**params, "act_order": act_order}
    options = target_options(to, params["sym"], gptq_version)

    what = f"cannot convert {source} ({_describe(params, src_fmt, src_options)}) to {to}"
    # per-layer widths (--bits-budget) carry over to a format whose config states them
    layers = {name: qw.bits for name, qw in qweights.items() if qw.bits != params["bits"]}
    if layers and to not in MIXED_FORMATS:
        raise UnsupportedError(f"{what}: {len(layers)} of {len(qweights)} layers are not {params['bits']}-bit "
                               f"(per-layer widths, e.g. {min(layers)}) and {to}'s config cannot state them: "
                               f"convert to {' or '.join(MIXED_FORMATS)}")
    reason = fmt.check_options(params["bits"], params["group_size"], params["sym"], act_order, **options)
    problem = None if reason else _first_problem(fmt, qweights, act_order, options)
    if reason or problem:
        if problem:
            name, why, count = problem
            reason = f"{count} of {len(qweights)} layers do not fit, e.g. {name}: {why}"
        raise UnsupportedError(f"{what}: {reason}{_hint(qweights, act_order, params['sym'], to)}"
                               f"{_requantize(qweights, src_record, params, to)}")

    model_config = json.loads((source / "config.json").read_text())
    model_config.pop("quantization_config", None)
    quant_config = fmt.quantization_config(params["bits"], params["group_size"], params["sym"], act_order, **options,
                                           **({"layers": layers} if layers else {}))
    if to == "compressed-tensors":  # a vision-language model: its float vision tower and projector stay unquantized
        from qtool.models.vlm import folder_ignore_patterns

        quant_config = {**quant_config, "ignore": [*quant_config["ignore"], *folder_ignore_patterns(source)]}
    record = _record(source, src_record, src_fmt, src_options, params, to, options)
    if command:
        record["converted_from"][-1]["command"] = command
    progress("stage", name="write", detail=f"{to} -> {out}")
    try:
        return write_checkpoint(
            out, plain, qweights, to, options, model_config, quant_config,
            lambda folder: copy_side_files(str(source), None, None, folder), record,
            force=force, max_shard_size=max_shard_size,
            card=lambda folder, rec: carried_card(folder, rec, read_source_card(source)))
    except UnsupportedError as exc:
        # data the target cannot hold (GPTQ v1 and a zero of 0), found while packing: the
        # writer packs every layer before it creates any file
        raise UnsupportedError(f"{what}: {exc}{_hint(qweights, act_order, params['sym'], to)}") from None


def _record(source: Path, src_record: dict | None, src_fmt: str, src_options: dict, params: dict,
            to: str, options: dict) -> dict:
    """The new ``qtool.json`` content (without ``shards`` / ``files_sha256``, which the
    writer adds)."""
    record = dict(src_record or {})
    record.pop("shards", None)
    record.pop("files_sha256", None)
    config = dict(record.get("config") or {
        "method": "unknown", "bits": params["bits"], "group_size": params["group_size"], "sym": params["sym"]})
    config["format"] = to
    if "version" in options:
        config["gptq_version"] = options["version"]
    files = {f.name: sha256_file(f) for f in sorted(source.iterdir()) if f.is_file()}
    entry = {"format": src_fmt, "format_options": src_options, "path": str(source.resolve()),
             "qtool_version": None if src_record is None else src_record.get("qtool_version"),
             "files_sha256": files}
    record.update({"qtool_version": __version__, "format": to, "format_options": options, "config": config,
                   "converted_from": [*record.get("converted_from", []), entry]})
    return record
