"""AWQ search results as plain data in a safetensors file, so a search can be saved,
inspected and applied later without calibration.

In memory the results are a dict::

    {"scales":   {"<block prefix>.<prev>": float32 [k]},    # e.g. model.layers.0.input_layernorm
     "clip_max": {"<linear name>": float32 [n, G]},          # e.g. model.layers.0.mlp.down_proj
     "alpha":    {"<block prefix>.<prev>": float}}           # informational

On disk each tensor is stored under ``scales/<key>`` or ``clip_max/<name>``; the alphas
and a format version live in the safetensors metadata. Float32 tensors round-trip
exactly, so applying a loaded search reproduces the searched checkpoint bit for bit.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from qtool.errors import UserInputError

SEARCH_FORMAT = "qtool-awq-search"
SEARCH_VERSION = 1
_KINDS = ("scales", "clip_max")


def empty_search() -> dict:
    return {"scales": {}, "clip_max": {}, "alpha": {}}


def save_search(path: str | Path, results: dict) -> None:
    """Write ``results`` (the dict above) to ``path`` atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {f"{kind}/{key}": t.detach().to("cpu", torch.float32).contiguous()
               for kind in _KINDS for key, t in sorted(results.get(kind, {}).items())}
    metadata = {"format": SEARCH_FORMAT, "version": str(SEARCH_VERSION),
                "alpha": json.dumps(results.get("alpha", {}), sort_keys=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_search(path: str | Path) -> dict:
    """Read a file written by ``save_search``.

    Raises:
        UserInputError: the file is missing or is not an AWQ search file.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"AWQ search file {path} does not exist: pass a file written by --save-search")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except (SafetensorError, OSError) as exc:
        raise UserInputError(f"{path} is not a readable safetensors file ({exc}): pass a file written by --save-search") from None
    if metadata.get("format") != SEARCH_FORMAT:
        raise UserInputError(f"{path} is not an AWQ search file (no '{SEARCH_FORMAT}' metadata): pass a file written by --save-search")
    if int(metadata.get("version", "0")) > SEARCH_VERSION:
        raise UserInputError(f"{path} has search format version {metadata['version']}; this qtool reads up to {SEARCH_VERSION}: upgrade qtool")
    results = empty_search()
    for key, tensor in tensors.items():
        kind, _, name = key.partition("/")
        if kind not in _KINDS or not name:
            raise UserInputError(f"{path}: unexpected tensor {key!r}; the file is not an AWQ search file")
        results[kind][name] = tensor
    results["alpha"] = json.loads(metadata.get("alpha", "{}"))
    return results


def search_to_json(results: dict, prefix: str | None = None) -> dict:
    """The entries of ``results`` under module prefix ``prefix`` (all if None) as JSON
    types. float32 values survive ``json`` exactly (each is a double with a round-trip
    repr), so ``search_from_json`` restores the same tensors bit for bit."""

    def keep(key: str) -> bool:
        return prefix is None or key.startswith(prefix + ".")

    return {
        "scales": {k: t.float().tolist() for k, t in results["scales"].items() if keep(k)},
        "clip_max": {k: t.float().tolist() for k, t in results["clip_max"].items() if keep(k)},
        "alpha": {k: a for k, a in results.get("alpha", {}).items() if keep(k)},
    }


def search_from_json(data: dict) -> dict:
    """Inverse of ``search_to_json``."""
    return {
        "scales": {k: torch.tensor(v, dtype=torch.float32) for k, v in data.get("scales", {}).items()},
        "clip_max": {k: torch.tensor(v, dtype=torch.float32) for k, v in data.get("clip_max", {}).items()},
        "alpha": dict(data.get("alpha", {})),
    }
