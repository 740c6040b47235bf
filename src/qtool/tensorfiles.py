"""Tensors as byte ranges of safetensors files: read a file's header without loading its
tensors, write a safetensors file (laid out exactly as ``safetensors.torch.save_file``)
and a sharded checkpoint from byte ranges one tensor at a time, spill tensors to an
append-only file, and compare written bytes with their sources.

Shared by model-free RTN (``qtool.model_free``) and the in-model writer, which assembles
the output from the finished blocks of the work folder (``qtool.resume``), so neither holds
more than one tensor's bytes at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import _TYPES as SAFETENSORS_DTYPES
from safetensors.torch import save as safetensors_save

from qtool.errors import FormatError, UnsupportedError

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
COPY_CHUNK = 64 << 20  # bytes per read when copying or comparing tensor bytes


@dataclass(frozen=True)
class ByteRange:
    """One tensor's raw bytes in a file: ``nbytes`` bytes at ``offset`` of ``path``."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    path: Path
    offset: int
    nbytes: int


def read_header(path: Path) -> dict[str, ByteRange]:
    """The tensors of one safetensors file as byte ranges (the header alone is read)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise UnsupportedError(f"{path.name}: tensor {name} has dtype {info['dtype']}, which qtool cannot read; "
                                   "use the in-model path (--no-model-free)")
        start, stop = info["data_offsets"]
        out[name] = ByteRange(SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), path, 8 + n + start, stop - start)
    return out


def source_tensors(folder: Path) -> dict[str, ByteRange]:
    """Every tensor of the ``*.safetensors`` shards of ``folder``, by name."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UnsupportedError(f"{folder} has no *.safetensors shards: model-free RTN reads safetensors only; "
                               "use the in-model path (--no-model-free)")
    tensors: dict[str, ByteRange] = {}
    for f in files:
        tensors.update(read_header(f))
    return tensors


def copy_bytes(entry: ByteRange, out) -> None:
    with open(entry.path, "rb") as f:
        f.seek(entry.offset)
        left = entry.nbytes
        while left:
            chunk = f.read(min(COPY_CHUNK, left))
            if not chunk:
                raise FormatError(f"{entry.path} is shorter than its header says (truncated): re-copy it")
            out.write(chunk)
            left -= len(chunk)


def read_tensor(entry: ByteRange) -> torch.Tensor:
    """The tensor whose bytes ``entry`` points at, read with one file read (no mmap)."""
    if not entry.nbytes:
        return torch.empty(entry.shape, dtype=entry.dtype)
    buf = bytearray(entry.nbytes)
    with open(entry.path, "rb") as f:
        f.seek(entry.offset)
        f.readinto(buf)
    return torch.frombuffer(buf, dtype=torch.uint8).view(entry.dtype).reshape(entry.shape)


def same_bytes(a: ByteRange, b: ByteRange) -> bool:
    if a.nbytes != b.nbytes:
        return False
    with open(a.path, "rb") as fa, open(b.path, "rb") as fb:
        fa.seek(a.offset)
        fb.seek(b.offset)
        left = a.nbytes
        while left:
            step = min(COPY_CHUNK, left)
            if fa.read(step) != fb.read(step):
                return False
            left -= step
    return True


def write_safetensors(path: Path, tensors: dict[str, ByteRange], metadata: dict[str, str]) -> dict[str, ByteRange]:
    """Write one safetensors file from byte ranges, laid out exactly as
    ``safetensors.torch.save_file`` lays out the same tensors (its tensor order, compact
    header padded with spaces to 8 bytes), one tensor's bytes at a time. Returns where each
    tensor landed."""
    # the order save_file uses (dtype, then name) is taken from save_file itself on 1-element stand-ins
    probe = safetensors_save({k: torch.zeros(1, dtype=e.dtype) for k, e in tensors.items()}, metadata=metadata)
    n = int.from_bytes(probe[:8], "little")
    order = [k for k in json.loads(probe[8:8 + n]) if k != "__metadata__"]
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for k in order:
        e = tensors[k]
        header[k] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    written = {}
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        start = 8 + len(text)
        for k in order:
            e = tensors[k]
            written[k] = ByteRange(e.dtype, e.shape, path, start + header[k]["data_offsets"][0], e.nbytes)
            copy_bytes(e, f)
    return written


class Spill:
    """An append-only file of tensors' raw bytes, handing out their ``ByteRange``."""

    def __init__(self, path: Path):
        self.path, self.size = path, 0
        self.file = open(path, "wb")

    def add(self, tensor: torch.Tensor) -> ByteRange:
        t = tensor.detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if nbytes:
            self.file.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # no copy of the bytes
        entry = ByteRange(t.dtype, tuple(t.shape), self.path, self.size, nbytes)
        self.size += nbytes
        return entry

    def close(self) -> None:
        self.file.close()


def write_shards(entries: dict[str, ByteRange], folder: Path, max_shard_size: str) -> tuple[list[str], dict[str, ByteRange]]:
    """The shards of ``entries`` in ``folder``, split and named as ``qtool.io`` splits an
    in-memory state dict of the same tensors in the same order (plus the index when
    sharded). Returns the shard names and where every tensor was written."""
    from huggingface_hub import split_torch_state_dict_into_shards

    from qtool.io import write_index

    meta = {k: torch.empty(e.shape, dtype=e.dtype, device="meta") for k, e in entries.items()}
    split = split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_size, filename_pattern="model{suffix}.safetensors")
    written: dict[str, ByteRange] = {}
    for filename, keys in split.filename_to_tensors.items():
        written.update(write_safetensors(folder / filename, {k: entries[k] for k in sorted(keys)}, {"format": "pt"}))
    if split.is_sharded:
        write_index(folder, split.tensor_to_filename, sum(e.nbytes for e in entries.values()))
    return sorted(split.filename_to_tensors), written


def verify_shards(folder: Path, entries: dict[str, ByteRange], out: Path) -> None:
    """Read the written shards' headers back and compare every tensor's bytes with its
    source bytes; a difference raises ``FormatError``."""
    from qtool.io import compare_shards

    compare_shards(folder, out, entries, lambda shard: read_header(shard).items(),
                   lambda e, x: e.dtype == x.dtype and e.shape == x.shape and same_bytes(e, x))
