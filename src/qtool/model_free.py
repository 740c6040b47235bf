"""Model-free RTN: quantize a safetensors checkpoint shard to shard, without building a
transformers model (the peers' "model-free" mode).

Round-to-nearest needs no forward pass, so nothing but the weights is needed: every tensor
is read on its own from the source shards (safetensors' mmap), each weight that the run
quantizes is RTN-quantized and packed in the chosen format, and the packed tensors are
appended to a spill file; plain tensors are not even loaded twice, their bytes are copied
from the source. The output shards are then written from those byte ranges.

**Memory**: one source tensor (in float32 for the RTN math) plus its codes and packed
tensors at a time, whatever the size of the model; no model, no state dict. **Disk**: the
packed tensors are spilled once beside the output before the shards are written (about
the size of the quantized weights), and removed afterwards.

Which weights are quantized:

- a family qtool has a file for (``qtool.models``): the same weights as the in-model path,
  planned on the model's skeleton on the meta device (no weights allocated), with the
  same coverage record and ``--exclude`` patterns;
- ``include`` patterns (``--include``, fnmatch on full tensor names such as
  ``model.layers.*.weight``): every 2-D float weight they match, minus ``--exclude``; this
  is how an architecture without a qtool file (or one transformers does not know) is
  quantized.

When is it used (``choose``): ``--method rtn`` on a safetensors source (a local folder, a
hub snapshot, the built-in model's cached folder) runs model-free automatically when its
result is byte-identical to the in-model path's: the source's tensor names are exactly the
model's, every float tensor has the dtype the model would load in, and the family keeps no
module in float32 of its own. Otherwise it falls back to the in-model path (saying why);
``--model-free`` forces it (and refuses a source it cannot read), ``--no-model-free``
forbids it. GGUF sources, AWQ and GPTQ always use the in-model path. ``qtool.json`` records
which path ran under ``model_free``.

Output files are the in-model path's byte for byte: the same shard split
(``huggingface_hub.split_torch_state_dict_into_shards`` on the same tensor order), the same
safetensors layout as ``safetensors.torch.save_file`` (its tensor order and header, checked
in ``tests/test_model_free.py``), the same ``config.json`` and side files; the shards are
read back and compared byte for byte with what was meant to be written.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from qtool.errors import FormatError, UnsupportedError, UserInputError
from qtool.tensorfiles import (  # noqa: F401  (the byte-range writer, shared with the in-model path)
    ByteRange, Spill as _Spill, read_header, same_bytes as _same_bytes, source_tensors, verify_shards,
    write_safetensors, write_shards)

log = logging.getLogger(__name__)

UNKNOWN = "neither transformers nor qtool knows this architecture"


def _load(entry: ByteRange, name: str) -> torch.Tensor:
    with safe_open(str(entry.path), framework="pt") as handle:
        return handle.get_tensor(name)


@dataclass
class Plan:
    """What a model-free run does, decided before any tensor is read.

    Attributes:
        quantized: full module names of the linears to quantize (names on disk), in order.
        plain: names of the tensors stored unchanged (or cast to ``dtype``), in the order the
            in-model path writes them.
        dtype: the float dtype every float tensor is cast to (None: each keeps its own).
        coverage: the ``coverage`` record of ``qtool.json``.
        architecture: the family name, or ``"patterns"`` for ``--include`` runs.
        reason: why this path (for ``qtool.json`` and the log).
    """

    quantized: list[str]
    plain: list[str]
    dtype: torch.dtype | None
    coverage: dict
    architecture: str
    reason: str
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    # bytes of the largest float tensor passed through, read whole with its finiteness
    # check (bool per element): the memory plan's other candidate for the peak
    largest_plain: int = 0


class NotIdentical(Exception):
    """The model-free result would differ from the in-model one (the message says why)."""


def _skeleton(folder: Path):
    """(config, meta-device model) from ``folder``'s ``config.json``, or (None, None) when
    transformers does not know the architecture."""
    from transformers import AutoConfig

    from qtool.models.vlm import auto_model_class  # the family's class (a VLM keeps its vision tower)

    try:
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            return config, auto_model_class(config).from_config(config)
    except (ValueError, KeyError, OSError) as exc:
        log.debug("no skeleton of %s: %s", folder, exc)
        return None, None


def _config_dtype(config: dict, tensors: dict[str, ByteRange], explicit: str) -> torch.dtype | None:
    from qtool.loading import DTYPES

    if explicit != "auto":
        return DTYPES[explicit]
    named = config.get("dtype") or config.get("torch_dtype")
    if named in DTYPES:
        return DTYPES[named]
    floats = {e.dtype for e in tensors.values() if e.dtype.is_floating_point}
    return floats.pop() if len(floats) == 1 else None


def plan_family(folder: Path, config, tensors: dict[str, ByteRange], dtype: str, explicit: bool) -> Plan:
    """The plan of a family qtool has a file for, on the model's meta skeleton: the same
    weights, coverage and tensor order as the in-model path.

    Raises:
        NotIdentical: the files would differ from the in-model path's (tensor names,
            dtypes, float32-kept modules); with ``explicit`` only when a planned weight is
            missing from the source.
    """
    from qtool.api import layer_shapes
    from qtool.coverage import plan_coverage
    from qtool.models import is_registered, spec_for
    from qtool.models.moe import disk_renamer

    _, skeleton = _skeleton(folder)
    if skeleton is None:
        raise NotIdentical(UNKNOWN)
    spec = spec_for(skeleton)
    if not explicit and not is_registered(spec):
        raise NotIdentical(f"{spec.name} has no family file: the in-model path checks its layout on the real model")
    coverage = plan_coverage(skeleton, spec, config.exclude)
    to_disk = disk_renamer(skeleton, to_disk=True)
    quantized = [to_disk(n) for n in coverage.quantized]
    qset = set(coverage.quantized)
    shapes = {to_disk(n): s for n, s in layer_shapes(skeleton, spec).items() if n in qset}
    plain = []
    for key in skeleton.state_dict():
        if key.rsplit(".", 1)[0] in qset:
            continue
        if coverage.tied_lm_head and key.endswith("lm_head.weight"):
            continue
        plain.append(to_disk(key))
    raw = json.loads((folder / "config.json").read_text())
    target = _config_dtype(raw, tensors, dtype)
    missing = [f"{n}.weight" for n in quantized if f"{n}.weight" not in tensors]
    if missing:
        raise NotIdentical(f"{len(missing)} weight(s) the '{spec.name}' file quantizes are not in the source under "
                           f"their model names, e.g. {missing[0]}")
    if not explicit:
        expected = set(plain) | {f"{n}.weight" for n in quantized} | {f"{n}.bias" for n in quantized if f"{n}.bias" in tensors}
        on_disk = set(tensors) - ({"lm_head.weight"} if coverage.tied_lm_head else set())
        if expected != on_disk:
            odd = sorted(expected ^ on_disk)
            raise NotIdentical(f"the source's tensor names differ from the model's (e.g. {odd[0]})")
        if target is None:
            raise NotIdentical("the source mixes float dtypes and its config names none")
        if any(e.dtype.is_floating_point and e.dtype != target for e in tensors.values()):
            raise NotIdentical(f"some source tensors are not {target} (transformers would cast them on load)")
        if getattr(skeleton, "_keep_in_fp32_modules", None) or getattr(skeleton, "_keep_in_fp32_modules_strict", None):
            raise NotIdentical("the family keeps modules in float32 on load")
    plain = [k for k in plain if k in tensors] + sorted(set(tensors) - set(plain) - {f"{n}.weight" for n in quantized}
                                                        - {f"{n}.bias" for n in quantized}
                                                        - ({"lm_head.weight"} if coverage.tied_lm_head else set()))
    return Plan(quantized, plain, target, coverage.to_json(), spec.name, "family file", shapes)


def plan_patterns(folder: Path, tensors: dict[str, ByteRange], include: tuple[str, ...], exclude: tuple[str, ...],
                  dtype: str) -> Plan:
    """The plan of an ``--include`` run: every 2-D float ``*.weight`` matching an include
    pattern and no exclude pattern is quantized; everything else is stored unchanged
    (cast to ``--dtype`` when given)."""
    raw = json.loads((folder / "config.json").read_text())
    target = None if dtype == "auto" else _config_dtype(raw, tensors, dtype)
    used = {p: False for p in (*include, *exclude)}

    def hit(name: str, patterns: tuple[str, ...]) -> bool:
        found = [p for p in patterns if fnmatch.fnmatchcase(name, p)]
        for p in found:
            used[p] = True
        return bool(found)

    quantized, kept = [], []
    for name, e in tensors.items():
        matrix = name.endswith(".weight") and len(e.shape) == 2 and e.dtype.is_floating_point
        if matrix and hit(name, include) and not hit(name, exclude):
            quantized.append(name[: -len(".weight")])
        else:
            kept.append(name)
    unused = [p for p, u in used.items() if not u]
    if unused:
        raise UserInputError(f"--include/--exclude {unused[0]} matches no 2-D weight of {folder.name}; check it against "
                             f"full tensor names such as {next(iter(tensors))}")
    qbias = {f"{n}.bias" for n in quantized}
    plain = sorted(k for k in kept if k not in qbias)
    q_params = sum(tensors[f"{n}.weight"].shape[0] * tensors[f"{n}.weight"].shape[1] for n in quantized)
    total = sum(int(torch.Size(e.shape).numel()) for e in tensors.values())
    weights = sum(1 for e in tensors.values() if len(e.shape) >= 2)
    line = (f"quantized {len(quantized)} of {weights} weights ({100.0 * q_params / max(total, 1):.1f}% of parameters) "
            f"by --include {' '.join(include)}; kept in float: every other tensor")
    coverage = {"quantized": len(quantized), "weights": weights, "quantized_params": q_params, "total_params": total,
                "percent_params": round(100.0 * q_params / max(total, 1), 3), "tied_lm_head": False,
                "include": list(include), "exclude": list(exclude), "kept_in_float": {}, "line": line}
    shapes = {n: tuple(tensors[f"{n}.weight"].shape) for n in quantized}
    return Plan(sorted(quantized), plain, target, coverage, "patterns", "--include patterns", shapes)


def quantize_tensors(folder: Path, tensors: dict[str, ByteRange], plan: Plan, config, spill: _Spill,
                     progress: Callable[..., None], verify_sample: int = 8) -> tuple[dict[str, ByteRange], dict]:
    """Stream every tensor: quantize and pack the planned weights, cast or pass through the
    rest. Returns ``(byte ranges by output tensor name, in the in-model write order;
    per-layer stats)``. Sampled layers are unpacked again right away and must give back
    their codes exactly (the read-back later checks the disk against the packed bytes)."""
    from qtool.io import format_options
    from qtool.layer_error import layer_errors
    from qtool.pack import get_format
    from qtool.pipeline import check_finite
    from qtool.rtn import config_ratios, rtn_quantize, weight_error

    fmt = get_format(config.format)
    options = format_options(config.format, config)
    step = max(1, len(plan.quantized) // max(1, verify_sample))
    checked = set(sorted(plan.quantized)[::step][:verify_sample])
    out: dict[str, ByteRange] = {}
    for name in plan.plain:
        e = tensors[name]
        if e.dtype.is_floating_point:
            t = _load(e, name)
            check_finite(name, t)
            if plan.dtype is not None and t.dtype != plan.dtype:
                out[name] = spill.add(t.to(plan.dtype))
                continue
        out[name] = e
    stats, packed_all = {}, {}
    progress("eval", name="model-free RTN", total=len(plan.quantized), unit="weight")
    for i, name in enumerate(sorted(plan.quantized)):
        weight = _load(tensors[f"{name}.weight"], f"{name}.weight")
        if plan.dtype is not None:
            weight = weight.to(plan.dtype)
        check_finite(f"{name}.weight", weight)
        bias = None
        if f"{name}.bias" in tensors:
            bias = _load(tensors[f"{name}.bias"], f"{name}.bias")
            bias = bias.to(plan.dtype) if plan.dtype is not None else bias
        qw = rtn_quantize(weight, config.bits, config.group_size, config.symmetric, bias, ratios=config_ratios(config))
        deq = qw.dequantize()
        try:
            packed = fmt.pack(qw, **options)
        except UnsupportedError as exc:
            raise UnsupportedError(f"{name}: {exc}") from None
        if name in checked:
            layer = {s: packed[s] for s in fmt.TENSOR_SUFFIXES if s in packed}
            if "bias" in packed:
                layer["bias"] = packed["bias"]
            back = fmt.unpack(layer, bits=qw.bits, group_size=qw.group_size, sym=qw.sym,
                              out_features=qw.shape[0], in_features=qw.shape[1], **options)
            if not torch.equal(back.dequantize(), deq):
                raise FormatError(f"verification failed: {name} unpacked from its {fmt.NAME} tensors differs from "
                                  "the quantized result")
        packed_all[name] = {f"{name}.{suffix}": spill.add(t) for suffix, t in packed.items()}
        stats[name] = {"shape": list(plan.shapes.get(name, qw.shape)), "weight_rel_err": weight_error(weight, deq),
                       **layer_errors(weight, deq)}
        del weight, qw, deq, packed
        progress("window", index=i, total=len(plan.quantized))
    for name in sorted(packed_all):  # the in-model writer's order: plain first, then layers by name
        out.update(packed_all[name])
    return out, stats


def model_config_dict(folder: Path) -> dict:
    """What the in-model path writes as ``config.json`` (before ``quantization_config``):
    transformers' ``to_dict`` of the config, or the raw file for an architecture
    transformers does not know."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(folder).to_dict()
    except (ValueError, KeyError, OSError):
        cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("_name_or_path", None)
    cfg.pop("quantization_config", None)
    return cfg


def make_plan(folder: Path, config, dtype: str, include: tuple[str, ...], explicit: bool) -> Plan:
    """The ``Plan`` for ``folder``: ``include`` patterns when given, else the family file.

    Raises:
        NotIdentical: (auto mode) the in-model path must run instead.
        UnsupportedError: (``explicit``) the source cannot be quantized model-free.
    """
    from qtool.loading import _check_weights

    _check_weights(folder)  # a corrupt or truncated shard: one clear line, as for the in-model path
    tensors = source_tensors(folder)
    plan = _make_plan(folder, config, tensors, dtype, include, explicit)
    plan.largest_plain = max((e.nbytes + e.nbytes // e.dtype.itemsize for n, e in tensors.items()
                              if n in plan.plain and e.dtype.is_floating_point), default=0)
    return plan


def _make_plan(folder: Path, config, tensors: dict[str, ByteRange], dtype: str, include: tuple[str, ...],
               explicit: bool) -> Plan:
    if include:
        return plan_patterns(folder, tensors, include, tuple(config.exclude), dtype)
    hint = "name the weights to quantize with --include PATTERN (e.g. --include 'model.layers.*')"
    try:
        return plan_family(folder, config, tensors, dtype, explicit)
    except NotIdentical as exc:
        if explicit or UNKNOWN in str(exc):
            model_type = json.loads((folder / "config.json").read_text()).get("model_type")
            raise UnsupportedError(f"{'--model-free cannot plan' if explicit else 'unsupported architecture in'} "
                                   f"{folder.name} (model_type '{model_type}'): {exc}; {hint}"
                                   f"{' or drop --model-free' if explicit else ''}") from None
        raise
    except UnsupportedError as exc:
        if "unsupported architecture" in str(exc):  # RTN can still run model-free on named weights
            raise UnsupportedError(f"{exc}; or, for RTN, {hint}") from None
        raise


def run(folder: Path, output: Path, config, plan: Plan, *, record: dict, force: bool = False,
        max_shard_size: str | None = None, progress: Callable[..., None] = lambda *a, **k: None) -> dict:
    """Quantize ``folder`` model-free into ``output`` following ``plan`` (see the module
    docstring); ``config`` has its group size resolved. ``record``: the ``qtool.json``
    entries of the caller (model, command, ...), to which ``layers``, ``coverage`` and the
    format are added. Returns the ``qtool.json`` content."""
    from qtool import __version__
    from qtool.card import checkpoint_card
    from qtool.io import (DEFAULT_SHARD_SIZE, check_output_path, commit_checkpoint, copy_side_files, format_options,
                          temp_folder, write_config)
    from qtool.pack import get_format

    output = check_output_path(output, force)
    options = format_options(config.format, config)
    quant_config = get_format(config.format).quantization_config(
        config.bits, config.group_size, config.symmetric, config.uses_act_order, **options)
    tensors = source_tensors(folder)
    tmp = temp_folder(output)
    spill_dir = Path(tempfile.mkdtemp(prefix=f".{output.name}.spill-", dir=output.resolve().parent))
    spill = _Spill(spill_dir / "packed.bin")
    try:
        t0 = time.perf_counter()
        entries, stats = quantize_tensors(folder, tensors, plan, config, spill, progress)
        spill.close()
        t_quant = time.perf_counter()
        progress("stage", name="save", detail=str(output))
        shards, _ = write_shards(entries, tmp, max_shard_size or DEFAULT_SHARD_SIZE)
        write_config(tmp, model_config_dict(folder), quant_config)
        copy_side_files(str(folder), None, None, tmp)
        verify_shards(tmp, entries, output)
        full = {"qtool_version": __version__, "format": config.format, "format_options": options,
                "config": config.to_dict(), **record, "layers": stats, "coverage": plan.coverage}
        full["model"] = {**full.get("model", {}), "architecture": plan.architecture}
        full["timings_s"] = {**full.get("timings_s", {}), "quantize": round(t_quant - t0, 2)}
        if "memory" in full:  # the peak RSS so far: every tensor was quantized, the shards are written
            import resource

            full["memory"] = {**full["memory"], "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        full["model_free"] = {"used": True, "reason": plan.reason,
                              "dtype": None if plan.dtype is None else str(plan.dtype).split(".")[-1]}
        return commit_checkpoint(tmp, output, full, shards, lambda f, rec: checkpoint_card(f, rec, str(folder)))
    finally:
        spill.close()
        shutil.rmtree(spill_dir, ignore_errors=True)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
