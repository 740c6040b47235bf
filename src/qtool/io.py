"""Checkpoint files: write a quantized model as sharded safetensors plus config,
tokenizer and a ``qtool.json`` provenance file, atomically; read one back.

Writing happens in a temporary sibling folder that is renamed into place only when every
file is complete and verified, so the output path never holds a half-written checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from collections.abc import Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qtool import __version__
from qtool.card import CARD_FILE, checkpoint_card
from qtool.errors import FormatError, UnsupportedError, UserInputError
from qtool.models.moe import disk_renamer, model_names
from qtool.models import vlm
from qtool.pack import get_format, layer_params
from qtool.qtensor import QuantizedWeight
from qtool.textfiles import sha256_file

log = logging.getLogger(__name__)

QTOOL_JSON = "qtool.json"
DEFAULT_SHARD_SIZE = "5GB"
# options_from_config's per-layer parameters (the rest are format options for pack/unpack)
LAYER_PARAMS = ("bits", "group_size", "sym", "act_order", "layers")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# quantize_config.json (AutoGPTQ) and quant_config.json (AutoAWQ) describe a source's format,
# which the written checkpoint replaces with its own config.json -> quantization_config
# README.md, the source's model card, is quoted inside the checkpoint's own card (qtool.card)
SKIP_FILES = {"config.json", QTOOL_JSON, "model.safetensors.index.json", "pytorch_model.bin.index.json", "qtool-source.json",
              "quantize_config.json", "quant_config.json", CARD_FILE}


def overlap(path: str | Path, source: str | Path) -> str | None:
    """How ``path`` relates to ``source`` once symlinks are resolved: ``"is"``,
    ``"is inside"``, ``"contains"``, or None when neither holds the other."""
    a, b = Path(path).expanduser().resolve(), Path(source).expanduser().resolve()
    if a == b:
        return "is"
    if b in a.parents:
        return "is inside"
    if a in b.parents:
        return "contains"
    return None


def check_output_path(out: str | Path, force: bool, sources: Iterable[str | Path] = ()) -> Path:
    """Validate the output folder before any work: refuse one that is, is inside or
    contains a source (``sources``: the model's folder or file), even with ``force``; an
    existing one unless ``force``; and an unwritable parent."""
    out = Path(out).expanduser()
    for src in sources:
        relation = overlap(out, src)
        if relation:
            raise UserInputError(f"output {out} {relation} the source model {Path(src).resolve()}: writing there "
                                 "would destroy it, even with --force; choose an -o/--output outside the source")
    if out.exists() and not force:
        raise UserInputError(f"output {out} already exists: choose another -o/--output or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise UserInputError(f"output {out} exists and is not a folder: choose another -o/--output")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise UserInputError(f"the folder {parent} for the output does not exist: create it first")
    if not os.access(parent, os.W_OK):
        raise UserInputError(f"cannot write into {parent}: choose a writable -o/--output")
    return out


def _plain_state_dict(model, quantized: set[str]) -> dict[str, torch.Tensor]:
    """Float tensors of everything not quantized; a tied lm_head is left out (the
    embedding carries it)."""
    state = {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    embed = model.get_input_embeddings().weight
    for key, tensor in model.state_dict().items():
        module = key.rsplit(".", 1)[0]
        if module in quantized:
            continue
        if tied and key.endswith("lm_head.weight") and tensor.data_ptr() == embed.data_ptr():
            continue
        state[key] = tensor.detach().contiguous().clone()
    return state


def _write_shards(state: dict[str, torch.Tensor], folder: Path, max_shard_size: str) -> list[str]:
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size, filename_pattern="model{suffix}.safetensors")
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: state[k] for k in sorted(keys)}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        write_index(folder, split.tensor_to_filename, sum(t.numel() * t.element_size() for t in state.values()))
    return sorted(split.filename_to_tensors)


def write_index(folder: Path, tensor_to_filename: dict[str, str], total_size: int) -> None:
    """``model.safetensors.index.json`` of a sharded checkpoint (``total_size`` in bytes)."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(tensor_to_filename.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def copy_side_files(source_folder: str | None, tokenizer, model, folder: Path) -> None:
    """Tokenizer, chat template and generation config, unchanged from the source."""
    if source_folder is not None:
        for f in sorted(Path(source_folder).iterdir()):
            if f.is_file() and f.name not in SKIP_FILES and not f.name.endswith(WEIGHT_SUFFIXES) and not f.name.startswith("."):
                shutil.copy2(f, folder / f.name)
        return
    tokenizer.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def format_options(fmt_name: str, config) -> dict:
    """The format options a quantize config implies: the GPTQ version; compressed-tensors'
    ``actorder "weight"`` for static act-order (llm-compressor's name for it)."""
    if fmt_name == "gptq":
        return {"version": config.resolved_gptq_version}
    if fmt_name == "compressed-tensors" and config.act_order_kind == "static":
        return {"actorder": "weight"}
    return {}


def save_checkpoint(out: str | Path, model, tokenizer, source_folder: str | None,
                    qweights: dict[str, QuantizedWeight], config, provenance: dict,
                    force: bool = False, max_shard_size: str = DEFAULT_SHARD_SIZE,
                    verify_sample: int = 8) -> dict:
    """Write the checkpoint of an in-memory model and its quantized layers at once and
    return the final ``qtool.json`` content (``qtool quantize`` assembles its output from
    the work folder instead: ``save_from_blocks``, same bytes)."""
    out = check_output_path(out, force)
    options, model_config, quant_config, to_disk, record = checkpoint_meta(model, config, provenance)
    plain = {to_disk(k): v for k, v in _plain_state_dict(model, set(qweights)).items()}
    qweights = {to_disk(name): qw for name, qw in qweights.items()}
    return write_checkpoint(
        out, plain, qweights, config.format, options, model_config, quant_config,
        lambda folder: copy_side_files(source_folder, tokenizer, model, folder), record,
        force=force, max_shard_size=max_shard_size, verify_sample=verify_sample,
        card=lambda folder, rec: checkpoint_card(folder, rec, source_folder))


def checkpoint_meta(model, config, provenance: dict) -> tuple[dict, dict, dict, Callable[[str], str], dict]:
    """What a quantized checkpoint of ``model`` declares, before any tensor: ``(format
    options, config.json's model part, quantization_config, model name -> name on disk,
    the qtool.json record without shards and hashes)``."""
    options = format_options(config.format, config)
    model_config = model.config.to_dict()
    model_config.pop("_name_or_path", None)
    # names on disk: what the serving engines read (Mixtral's experts: block_sparse_moe.experts.{e}.w1, ...)
    # a vision-language model: the names save_pretrained writes (model.language_model.layers -> model.layers,
    # model.visual -> visual), and compressed-tensors told to leave the float vision tower and projector alone
    moe_to_disk, vlm_to_disk = disk_renamer(model, to_disk=True), vlm.disk_renamer(model)
    to_disk = lambda key: vlm_to_disk(moe_to_disk(key))  # noqa: E731
    quant_config = get_format(config.format).quantization_config(
        config.bits, config.group_size, config.symmetric, config.uses_act_order, **options,
        **({"layers": {to_disk(n): b for n, b in config.layer_bits}} if config.layer_bits else {}))
    if config.format == "compressed-tensors" and vlm.is_vlm(model):
        quant_config = {**quant_config, "ignore": [*quant_config["ignore"], *vlm.ignore_patterns(model)]}
    if "layers" in provenance:
        provenance = {**provenance, "layers": {to_disk(name): v for name, v in provenance["layers"].items()}}
    record = {"qtool_version": __version__, "format": config.format, "format_options": options,
              "config": config.to_dict(), **provenance}
    return options, model_config, quant_config, to_disk, record


def layer_packer(config) -> Callable[[str, QuantizedWeight], dict[str, torch.Tensor]]:
    """``pack(name, qweight)``: the layer's tensors in the output format, checked on the
    spot: unpacked again they must give back exactly ``qweight`` (the format holds what
    the method produced), else ``FormatError``; a layer the format cannot hold raises
    ``UnsupportedError`` naming it."""
    fmt = get_format(config.format)
    options = format_options(config.format, config)

    def pack(name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        try:
            packed = {suffix: t.contiguous() for suffix, t in fmt.pack(qw, **options).items()}
        except UnsupportedError as exc:
            raise UnsupportedError(f"{name}: {exc}") from None
        layer = {s: packed[s] for s in fmt.TENSOR_SUFFIXES if s in packed}
        if qw.bias is not None and "bias" in packed:
            layer["bias"] = packed["bias"]
        back = fmt.unpack(layer, bits=qw.bits, group_size=qw.group_size, sym=qw.sym,
                          out_features=qw.shape[0], in_features=qw.shape[1], **options)
        if not torch.equal(back.dequantize(), qw.dequantize()):
            raise FormatError(f"verification failed: {name} packed in {fmt.NAME} does not unpack to the quantized "
                              "result; please report this model and options")
        return packed

    return pack


def plain_keys(model, quantized: set[str]) -> list[str]:
    """Names of the tensors a checkpoint stores unchanged, in the model's order: every
    entry of ``model.state_dict()`` but the quantized linears' (full module names in
    ``quantized``) and a tied lm_head (the embedding carries it). Works on a model whose
    parameters are on the meta device."""
    in_emb = model.get_input_embeddings()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) and out_emb is not None and (
        out_emb.weight is in_emb.weight
        or (not in_emb.weight.is_meta and out_emb.weight.data_ptr() == in_emb.weight.data_ptr()))
    keys = []
    for key in model.state_dict(keep_vars=True):
        if key.rsplit(".", 1)[0] in quantized:
            continue
        if tied and key.endswith("lm_head.weight"):
            continue
        keys.append(key)
    return keys


def save_from_blocks(out: str | Path, model, blocks_prefix: str, work, rest: Callable[[list[str]], dict[str, torch.Tensor]],
                     tokenizer, source_folder: str | None, config, provenance: dict, *, force: bool = False,
                     max_shard_size: str = DEFAULT_SHARD_SIZE) -> dict:
    """Write the checkpoint of a run whose blocks are all committed in ``work``
    (``qtool.resume.WorkDir``): block ``i``'s float parameters and packed layers are copied
    from its block file, the other tensors (embeddings, final norm, head) come from
    ``rest(names)`` (model names -> tensors) and are spilled to the work folder first, one
    at a time. The files are byte for byte those of
    ``save_checkpoint`` with the same layers (same tensor order, shard split and layout);
    every written tensor is read back and compared with its source bytes. Returns the
    ``qtool.json`` content."""
    from qtool.resume import BLOCK_FILE
    from qtool.tensorfiles import Spill, read_header, verify_shards

    out = check_output_path(out, force)
    options, model_config, quant_config, to_disk, record = checkpoint_meta(model, config, provenance)
    layers: dict[str, tuple[int, dict]] = {}
    files: dict[int, dict] = {}
    for index in range(work.next_block):
        names, _ = work.block_meta(index)
        files[index] = read_header(work.block_dir(index) / BLOCK_FILE)
        layers.update({name: (index, info) for name, info in names.items()})
    quantized = set(layers)
    keys = plain_keys(model, quantized)
    block_of = lambda key: int(key[len(blocks_prefix) + 1 :].split(".", 1)[0])  # noqa: E731
    in_block = lambda key: key.startswith(blocks_prefix + ".")  # noqa: E731
    others = [k for k in keys if not in_block(k)]
    spill = Spill(work.path / "rest.bin")  # one tensor in memory at a time
    try:
        rest_entries = {k: spill.add(rest([k])[k]) for k in others}
    finally:
        spill.close()
    entries = {}
    for key in keys:
        if in_block(key):
            index = block_of(key)
            entries[to_disk(key)] = files[index][f"param.{key[len(f'{blocks_prefix}.{index}') + 1 :]}"]
        else:
            entries[to_disk(key)] = rest_entries[key]
    for name in sorted(quantized, key=to_disk):
        index, info = layers[name]
        for suffix in info["suffixes"]:
            entries[f"{to_disk(name)}.{suffix}"] = files[index][f"packed.{name}.{suffix}"]
    tmp = temp_folder(out)
    try:
        shards, _ = _write_entries(entries, tmp, max_shard_size)
        write_config(tmp, model_config, quant_config)
        copy_side_files(source_folder, tokenizer, model, tmp)
        verify_shards(tmp, entries, out)
        return commit_checkpoint(tmp, out, record, shards,
                                 lambda folder, rec: checkpoint_card(folder, rec, source_folder))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_entries(entries, folder: Path, max_shard_size: str):
    """The shards of byte-range ``entries`` (``qtool.tensorfiles.write_shards``)."""
    from qtool.tensorfiles import write_shards

    return write_shards(entries, folder, max_shard_size)


def write_checkpoint(out: str | Path, plain: dict[str, torch.Tensor], qweights: dict[str, QuantizedWeight],
                     fmt_name: str, options: dict, model_config: dict, quant_config: dict,
                     side_files: Callable[[Path], None], record: dict, *, force: bool = False,
                     max_shard_size: str = DEFAULT_SHARD_SIZE, verify_sample: int = 8,
                     card: Callable[[Path, dict], str] | None = None) -> dict:
    """The one writer behind ``save_checkpoint`` and ``convert_checkpoint``.

    Packs every layer of ``qweights`` in ``fmt_name`` (with the format ``options``) before
    touching the disk, so a layer the format cannot hold raises ``UnsupportedError`` naming
    it and nothing is written. Then writes, in a temporary sibling of ``out``: the shards
    (``plain`` tensors unchanged plus the packed ones, keys sorted), ``config.json``
    (``model_config`` with ``quantization_config = quant_config``), the side files
    (``side_files(folder)`` copies them), reads every tensor back and compares it byte for
    byte with the one written (a mismatch raises ``FormatError``), writes the model card
    ``README.md`` (``card(folder, record)``, ``qtool.card``; left out of ``files_sha256``:
    ``eval --write-card`` and people edit it), ``qtool.json`` (``record`` plus ``shards``
    and ``files_sha256``) and renames the folder into place.
    Returns the ``qtool.json`` content.
    """
    out = check_output_path(out, force)
    fmt = get_format(fmt_name)
    state = dict(plain)
    for name in sorted(qweights):
        try:
            packed = fmt.pack(qweights[name], **options)
        except UnsupportedError as exc:
            raise UnsupportedError(f"{name}: {exc}") from None
        for suffix, tensor in packed.items():
            state[f"{name}.{suffix}"] = tensor.contiguous()
    tmp = temp_folder(out)
    try:
        shards = _write_shards(state, tmp, max_shard_size)
        write_config(tmp, model_config, quant_config)
        side_files(tmp)
        _verify(tmp, state, fmt, qweights, options, verify_sample, out)
        del state
        return commit_checkpoint(tmp, out, record, shards, card)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def temp_folder(out: Path) -> Path:
    """A fresh hidden temporary sibling of ``out`` to write a checkpoint into."""
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.resolve().parent))


def write_config(folder: Path, model_config: dict, quant_config: dict) -> None:
    """``config.json``: ``model_config`` with ``quantization_config = quant_config``."""
    cfg = {**model_config, "quantization_config": quant_config}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def commit_checkpoint(tmp: Path, out: Path, record: dict, shards: list[str],
                      card: Callable[[Path, dict], str] | None = None) -> dict:
    """Finish a checkpoint written and verified in ``tmp``: the sha256 of every file (but
    the card), the model card, ``qtool.json`` (``record`` plus ``shards`` and
    ``files_sha256``), permissions, then the atomic rename of ``tmp`` to ``out`` (an
    existing ``out`` is replaced). Returns the ``qtool.json`` content."""
    files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file() and f.name != CARD_FILE}
    record = {**record, "shards": shards, "files_sha256": files}
    if card is not None:
        (tmp / CARD_FILE).write_text(card(tmp, record), encoding="utf-8")
    (tmp / QTOOL_JSON).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    for f in tmp.iterdir():
        os.chmod(f, 0o644)
    os.chmod(tmp, 0o755)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.resolve().parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return record


def _open_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    return tensors


def _shard_tensors(shard: Path):
    """``(name, tensor)`` of every tensor of one safetensors shard."""
    with safe_open(str(shard), framework="pt") as handle:
        for key in handle.keys():
            yield key, handle.get_tensor(key)


def compare_shards(folder: Path, out: Path, expected: dict, read: Callable[[Path], Iterable[tuple[str, object]]],
                   same: Callable[[object, object], bool]) -> None:
    """The read-back check of a written checkpoint: every tensor ``read(shard)`` yields
    from the shards in ``folder`` must be in ``expected`` and ``same`` as it there, and
    none of ``expected`` may be missing; else ``FormatError`` (``out``: the final path)."""
    seen = set()
    for shard in sorted(folder.glob("*.safetensors")):
        for key, value in read(shard):
            if key not in expected or not same(value, expected[key]):
                raise FormatError(f"read-back check failed: {key} in {shard.name} differs from what was written "
                                  f"(a disk or filesystem fault?); nothing was saved to {out}: check the disk and run again")
            seen.add(key)
    missing = sorted(set(expected) - seen)
    if missing:
        raise FormatError(f"read-back check failed: {len(missing)} tensors, e.g. {missing[0]}, are missing from the "
                          f"written shards; nothing was saved to {out}: check the disk and run again")


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


def _verify(folder: Path, state: dict[str, torch.Tensor], fmt, qweights: dict[str, QuantizedWeight], options: dict,
            sample: int, out: Path) -> None:
    """Read the shards in ``folder`` back, one tensor at a time: the keys must be those of
    ``state`` (what was written) and every tensor, each layer's packed ones included, equal
    to its in-memory one byte for byte. Then up to ``sample`` layers (evenly spread) are
    unpacked from ``state`` and must give back exactly their ``qweights`` (the format holds
    what the method produced). A mismatch raises ``FormatError`` naming the tensor."""
    compare_shards(folder, out, state, _shard_tensors, _same_bytes)
    names = sorted(qweights)
    if not names:
        return
    step = max(1, len(names) // max(1, sample))
    picked = names[::step][:sample]
    for name in picked:
        qw = qweights[name]
        layer = {s: state[f"{name}.{s}"] for s in fmt.TENSOR_SUFFIXES if f"{name}.{s}" in state}
        if qw.bias is not None and f"{name}.bias" in state:
            layer["bias"] = state[f"{name}.bias"]
        back = fmt.unpack(layer, bits=qw.bits, group_size=qw.group_size, sym=qw.sym,
                          out_features=qw.shape[0], in_features=qw.shape[1], **options)
        if not torch.equal(back.dequantize(), qw.dequantize()):
            raise FormatError(f"verification failed: {name} read back from the {fmt.NAME} checkpoint differs from the quantized result")


def read_qtool_json(folder: str | Path) -> dict | None:
    path = Path(folder) / QTOOL_JSON
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    major = lambda v: tuple(int(x) for x in str(v).split(".")[:2])  # noqa: E731
    if major(record.get("qtool_version", "0.0")) > major(__version__):
        raise UserInputError(
            f"{folder} was written by qtool {record['qtool_version']}, newer than this qtool {__version__}: upgrade qtool"
        )
    return record


def detect_format(folder: Path) -> tuple[str, dict] | None:
    """The qtool format name and its options of a quantized checkpoint folder, or None
    for a float model."""
    record = read_qtool_json(folder)
    if record is not None:
        return record["format"], dict(record.get("format_options", {}))
    cfg = json.loads((folder / "config.json").read_text())
    qcfg = cfg.get("quantization_config")
    if not qcfg:
        return None
    from qtool.pack import FORMATS

    reasons = []
    for name, fmt in FORMATS.items():
        try:
            opts = fmt.options_from_config(qcfg)
        except (FormatError, UnsupportedError) as exc:  # not this format: try the next one
            reasons.append(str(exc))
            continue
        if opts is not None:
            return name, {k: v for k, v in opts.items() if k not in LAYER_PARAMS}
    raise UserInputError(
        f"{folder}: quantization_config with quant_method '{qcfg.get('quant_method')}' is not a format qtool reads "
        f"({', '.join(FORMATS)}): {'; '.join(reasons)}"
    )


def read_quantized_layers(folder: str | Path) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor], str, dict]:
    """Unpack every quantized linear of a checkpoint into the canonical form.

    Returns ``(qweights by module name, remaining plain tensors, format name, config options)``."""
    folder = Path(folder)
    detected = detect_format(folder)
    if detected is None:
        raise UserInputError(f"{folder} is not a quantized checkpoint (no quantization_config)")
    fmt_name, options = detected
    fmt = get_format(fmt_name)
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    params = fmt.options_from_config(qcfg)
    if params is None:
        raise FormatError(f"{folder}: its quantization_config does not match format {fmt_name}")
    tensors = _open_tensors(folder)
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors if k.rsplit(".", 1)[1] in fmt.TENSOR_SUFFIXES})
    qweights = {}
    for module in modules:
        layer = {s: tensors.pop(f"{module}.{s}") for s in fmt.TENSOR_SUFFIXES if f"{module}.{s}" in tensors}
        if f"{module}.bias" in tensors:
            layer["bias"] = tensors.pop(f"{module}.bias")
        p = layer_params(params, module)  # per-layer widths (--bits-budget) override the config's
        n, k = fmt.layer_shape(layer, **{**p, **options})
        qweights[module] = fmt.unpack(layer, bits=p["bits"], group_size=p["group_size"], sym=p["sym"],
                                      out_features=n, in_features=k,
                                      **{**options, **{kk: vv for kk, vv in p.items() if kk not in LAYER_PARAMS}})
    return qweights, tensors, fmt_name, params


def load_quantized_model(folder: str | Path, dtype: torch.dtype = torch.float32):
    """A transformers model whose quantized linears hold the dequantized weights of the
    checkpoint (the reference reading used on CPU)."""
    from transformers import AutoConfig

    folder = Path(folder)
    qweights, plain, _, _ = read_quantized_layers(folder)
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    torch.manual_seed(0)
    model = vlm.auto_model_class(config).from_config(config, dtype=dtype)
    qweights, plain = vlm.model_names(model, *model_names(model, qweights, plain))
    state = {k: v.to(dtype) for k, v in plain.items()}
    for name, qw in qweights.items():
        state[f"{name}.weight"] = qw.dequantize(torch.float32).to(dtype)
        if qw.bias is not None:
            state[f"{name}.bias"] = qw.bias.to(dtype)
    return _load_state(model, state, config, folder, set(), assign=False)


def _load_state(model, state: dict[str, torch.Tensor], config, folder: Path, packed: set[str], assign: bool):
    """Load the float ``state`` into ``model`` (modules in ``packed`` carry their own
    tensors), tie the embeddings, and refuse a checkpoint that does not fill the model."""
    missing, unexpected = model.load_state_dict(state, strict=False, assign=assign)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [m for m in missing if not (m.endswith("lm_head.weight") and tied) and m.rsplit(".", 1)[0] not in packed]
    if missing or unexpected:
        raise FormatError(f"{folder}: checkpoint does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise FormatError(f"{folder}: no tensor for {leftover[:3]} in the checkpoint")
    return model.eval()


def kernel_layers(qweights: dict[str, QuantizedWeight], fmt_name: str) -> tuple[str, dict[str, tuple[dict, dict]]]:
    """The layers packed in the layout a dequant-matmul kernel reads: GPTQ and Marlin
    checkpoints keep theirs, AWQ and compressed-tensors are repacked to GPTQ (as serving
    engines do at load time). Returns ``(layout, {name: (tensors, meta)})`` with meta
    ``bits``, ``version`` (GPTQ zero storage) and ``group_size``."""
    layout = fmt_name if fmt_name in ("gptq", "marlin") else "gptq"
    packer = get_format(layout)
    layers = {}
    for name, qw in qweights.items():
        version = 1 if qw.sym else 2
        layers[name] = (packer.pack(qw, version=version), {"bits": qw.bits, "version": version, "group_size": qw.group_size})
    return layout, layers


def load_packed_model(folder: str | Path, dtype: torch.dtype = torch.float32, kernel: str = "auto"):
    """A transformers model whose quantized linears stay packed (``PackedLinear``): their
    forward runs the dequant-matmul kernel (Triton on CUDA, the torch reference on CPU)
    straight from the packed tensors, so no float copy of the quantized weights exists.

    GPTQ and Marlin checkpoints keep their layout; AWQ and compressed-tensors layers are
    repacked to the GPTQ layout, as serving engines do at load time."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from qtool.kernels import PackedLinear

    folder = Path(folder)
    qweights, plain, fmt_name, _ = read_quantized_layers(folder)
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):  # parameters on meta: nothing allocated
        model = vlm.auto_model_class(config).from_config(config, dtype=dtype)
    qweights, plain = vlm.model_names(model, *model_names(model, qweights, plain))
    layout, layers = kernel_layers(qweights, fmt_name)
    for name, (tensors, meta) in layers.items():
        extra = {"bits": meta["bits"], "version": meta["version"]} if layout == "gptq" else {}
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child,
                PackedLinear(layout, tensors, kernel=kernel, group_size=meta["group_size"], **extra))
    return _load_state(model, {k: v.to(dtype) for k, v in plain.items()}, config, folder, set(qweights), assign=True)
