"""Resumable quantization: a work folder beside the output that holds every finished
block and the activations needed to continue, written atomically after each block.

Layout of ``<output>.qtool-work/``:
- ``fingerprint.json``: what the run depends on (qtool version, model files, calibration
  tokens, options); ``--resume`` refuses a folder whose fingerprint differs.
- ``block-NNNN.safetensors``: the canonical quantized tensors of every linear of block N
  plus the block's other parameters (norms that AWQ rescaled), with stats as metadata.
- ``inputs.safetensors``: the inputs of the next block (float32 chunks).
- ``state.json``: ``{"next_block": N}``, replaced last, so it is the commit point: a kill
  at any moment leaves a folder describing a consistent prefix of finished blocks.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qtool import __version__
from qtool.errors import UserInputError
from qtool.qtensor import QuantizedWeight
from qtool.textfiles import sha256_file

STATE = "state.json"
FINGERPRINT = "fingerprint.json"
INPUTS = "inputs.safetensors"


def work_dir_for(output: str | Path) -> Path:
    out = Path(output).expanduser()
    return out.parent / f"{out.name}.qtool-work"


def model_fingerprint(folder: str | None, gguf: str | None) -> dict:
    """sha256 of the files that define the model's weights and architecture."""
    if folder is None:
        return {Path(gguf).name: sha256_file(Path(gguf))}
    files = sorted(p for p in Path(folder).iterdir()
                   if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name == "config.json"))
    return {p.name: sha256_file(p) for p in files}


def fingerprint(model_files: dict, calib_sha256: str | None, config: dict) -> dict:
    return {"qtool_version": __version__, "model_files": model_files, "calibration_tokens_sha256": calib_sha256,
            "config": config}


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


class WorkDir:
    """The work folder of one quantization run."""

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def start(cls, output: str | Path, fp: dict) -> "WorkDir":
        """A fresh work folder (an old one is replaced: the user did not ask to resume)."""
        path = work_dir_for(output)
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        _atomic_write_text(path / FINGERPRINT, json.dumps(fp, indent=2, sort_keys=True) + "\n")
        return cls(path)

    @classmethod
    def resume(cls, output: str | Path, fp: dict) -> "WorkDir":
        """The existing work folder, after checking it belongs to this exact run."""
        path = work_dir_for(output)
        if not (path / FINGERPRINT).is_file():
            raise UserInputError(f"nothing to resume: {path} does not exist; run without --resume")
        saved = json.loads((path / FINGERPRINT).read_text())
        if saved != fp:
            diff = sorted(k for k in set(saved) | set(fp) if saved.get(k) != fp.get(k))
            if "config" in diff:
                a, b = saved.get("config", {}), fp["config"]
                diff = [f"option {k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)] + [d for d in diff if d != "config"]
            raise UserInputError(
                f"cannot resume from {path}: {', '.join(diff)} differ from the interrupted run; "
                "rerun with the same model, calibration and options, or without --resume to start over"
            )
        return cls(path)

    @property
    def next_block(self) -> int:
        state = self.path / STATE
        return json.loads(state.read_text())["next_block"] if state.is_file() else 0

    def save_block(self, index: int, block: torch.nn.Module, prefix: str, results: dict,
                   next_inputs: list[torch.Tensor] | None, extra: dict | None = None) -> None:
        """Record finished block ``index`` (``results``: full name -> LayerResult)."""
        tensors: dict[str, torch.Tensor] = {}
        quantized = {name[len(prefix) + 1 :] for name in results}
        for pname, param in block.state_dict().items():
            module = pname.rsplit(".", 1)[0]
            if module not in quantized:
                tensors[f"param.{pname}"] = param.detach().to("cpu").clone()
        layers = {}
        for name, res in results.items():
            qw: QuantizedWeight = res.qweight
            for key, t in qw.tensors().items():
                tensors[f"q.{name}.{key}"] = t
            layers[name] = {"bits": qw.bits, "group_size": qw.group_size, "sym": qw.sym, "stats": res.stats}
        meta = {"layers": json.dumps(layers, sort_keys=True), "extra": json.dumps(extra or {}, sort_keys=True)}
        _atomic_save(tensors, self.path / f"block-{index:04d}.safetensors", meta)
        if next_inputs is not None:
            _atomic_save({f"hidden.{i}": h for i, h in enumerate(next_inputs)}, self.path / INPUTS, {})
        _atomic_write_text(self.path / STATE, json.dumps({"next_block": index + 1}) + "\n")

    def load_blocks(self, blocks: torch.nn.ModuleList, spec_blocks: str) -> tuple[dict, dict]:
        """Restore every finished block into ``blocks`` (parameters and dequantized
        weights) and return ``(results by full name, extra by block index)``."""
        from safetensors import safe_open

        from qtool.pipeline import LayerResult

        results, extras = {}, {}
        for index in range(self.next_block):
            path = self.path / f"block-{index:04d}.safetensors"
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata()
            tensors = load_file(str(path))
            layers = json.loads(meta["layers"])
            extras[index] = json.loads(meta["extra"])
            block = blocks[index]
            params = {k[len("param.") :]: v for k, v in tensors.items() if k.startswith("param.")}
            block.load_state_dict(params, strict=False)
            for name, info in layers.items():
                fields = {key: tensors.get(f"q.{name}.{key}") for key in ("codes", "scales", "zeros", "g_idx", "bias")}
                qw = QuantizedWeight(bits=info["bits"], group_size=info["group_size"], sym=info["sym"], **fields)
                lin = block.get_submodule(name[len(f"{spec_blocks}.{index}") + 1 :])
                lin.weight.data = qw.dequantize(torch.float32).to(lin.weight.dtype)
                results[name] = LayerResult(qw, info["stats"])
        return results, extras

    def load_inputs(self) -> list[torch.Tensor]:
        tensors = load_file(str(self.path / INPUTS))
        return [tensors[f"hidden.{i}"] for i in range(len(tensors))]

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
