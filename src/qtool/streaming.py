"""Streaming: the model's module tree without its weights, each decoder block's tensors
read from the source's safetensors shards only while that block is worked on.

``Weights`` is what the pipeline asks for a block's parameters: ``InMemory`` (the model
was loaded whole: nothing to do) or ``Streamed`` (a skeleton whose parameters are on the
meta device; ``load`` reads a block's tensors, ``release`` puts them back on meta). With
streaming, the float weights in memory at any moment are the embeddings (the model's
other non-block tensors are read only when the output is written) and one block, so peak
memory does not grow with the number of blocks; the output is assembled from the work
folder's block files (``qtool.io.save_from_blocks``).

When is it used (``check``): a safetensors source (a local folder, a hub snapshot,
the built-in model's cached folder) whose tensor names are exactly the model's, whose
float tensors all have the dtype the model loads in, and whose family keeps no module in
float32 of its own and has no vision tower: then every tensor a block gets is the one
``from_pretrained`` would give it, bit for bit (``tests/test_streaming.py``), and the
checkpoint is byte-identical to the in-memory path's. Otherwise the model is loaded
whole, and ``qtool.json`` says why.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from qtool.errors import NumericsError, UserInputError
from qtool.tensorfiles import ByteRange, source_tensors

log = logging.getLogger(__name__)


class InMemory:
    """The model's weights are all loaded: loading and releasing a block do nothing."""

    streamed = False

    def load(self, module: nn.Module, prefix: str) -> None:
        pass

    def release(self, module: nn.Module) -> None:
        pass

    @contextmanager
    def loaded(self, module: nn.Module, prefix: str):
        yield module

    def rest(self, model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
        state = model.state_dict()
        return {n: state[n] for n in names}


class Streamed:
    """Parameters of a meta-device skeleton, read on demand from safetensors shards.

    ``entries``: every source tensor by name (``qtool.tensorfiles.source_tensors``);
    ``dtype``: the dtype floats are loaded in (what ``from_pretrained`` would give)."""

    streamed = True

    def __init__(self, entries: dict[str, ByteRange], dtype: torch.dtype):
        self.entries, self.dtype = entries, dtype

    def tensor(self, name: str) -> torch.Tensor:
        """Source tensor ``name``, in the load dtype when it is a float."""
        from safetensors import safe_open

        entry = self.entries[name]
        with safe_open(str(entry.path), framework="pt") as handle:
            t = handle.get_tensor(name)
        if t.is_floating_point() and t.dtype != self.dtype:
            t = t.to(self.dtype)
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NumericsError(f"{name} has NaN or inf weights: the model is corrupt or overflowed; check the "
                                "source weights")
        return t

    def load(self, module: nn.Module, prefix: str) -> None:
        """Give every parameter (and persistent buffer) of ``module``, named ``prefix.NAME``
        in the source, its tensor."""
        for name, _ in list(module.named_parameters()):
            owner, leaf = _owner(module, name)
            owner._parameters[leaf] = nn.Parameter(self.tensor(f"{prefix}.{name}"), requires_grad=False)
        for name in list(module.state_dict(keep_vars=True)):  # persistent buffers: the source's values
            owner, leaf = _owner(module, name)
            if leaf in owner._buffers and owner._buffers[leaf] is not None and f"{prefix}.{name}" in self.entries:
                buf = self.tensor(f"{prefix}.{name}")
                owner._buffers[leaf] = buf.to(owner._buffers[leaf].dtype) if buf.is_floating_point() else buf

    def release(self, module: nn.Module) -> None:
        """Put every parameter of ``module`` back on the meta device (its memory is freed)."""
        for name, param in list(module.named_parameters()):
            owner, leaf = _owner(module, name)
            owner._parameters[leaf] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"),
                                                   requires_grad=False)
        trim_memory()

    @contextmanager
    def loaded(self, module: nn.Module, prefix: str):
        self.load(module, prefix)
        try:
            yield module
        finally:
            self.release(module)

    def rest(self, model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
        return {n: self.tensor(n) for n in names}


_LIBC = None


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD = 16 << 20


def _libc():
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim, _LIBC.mallopt
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def steady_allocator() -> None:
    """Allocations of 16 MiB or more get their own memory map, returned to the OS when
    freed (glibc's ``mallopt(M_MMAP_THRESHOLD)``; elsewhere nothing). glibc otherwise
    raises that threshold to the largest block freed so far (up to 32 MiB), so a block's
    large tensors land in the heap, whose freed parts linger: the peak of a block then
    varies by ~150 MB from block to block, and a deeper model's peak is the max of more
    draws. Measured with RTN on 16- and 64-block 1024-wide Llamas: peak 0.93 / 1.05 GB
    without this, 0.97 / 0.98 GB with it at 15% more time; a 1 MiB threshold also held the
    peak but took 2.4x the time (a fresh map for every tensor). GPTQ keeps many 1-16 MiB
    tensors (Hessians, chunk caches) whose heap fragments still grow its peak (+69 MiB from
    16 to 64 blocks at width 1024); a 1 MiB threshold held that to +10 MiB and lowered the
    default model's GPTQ peak from 1.90 to 1.53 GiB, but took 1.33x the time there
    (366 s vs 276 s), so every method keeps 16 MiB."""
    libc = _libc()
    if libc:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def trim_memory() -> None:
    """Give freed heap memory back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    Each block frees tens to hundreds of MB of tensors; without this glibc keeps the
    fragmented heap and the peak RSS grows by a few MB per block (measured on the
    default model: about 7 MB per block, 200 MB over its 30), which breaks "memory does
    not grow with depth"."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def build_skeleton(folder: str, dtype: str):
    """``(model, Streamed)``: the model of ``folder`` with its parameters on the meta
    device (buffers such as rotary tables are computed as usual) and the tensors outside
    its blocks loaded (all but the output head, read when the checkpoint is written).
    Raises ``NotStreamable`` when the result could differ from ``from_pretrained``'s."""
    model, entries, target = _checked_skeleton(folder, dtype)
    return model, _load_outside_blocks(model, Streamed(entries, target))


def check(folder: str | None, dtype: str) -> tuple[str | None, torch.dtype | None]:
    """``(why the source in folder cannot be streamed or None when it can, the dtype its
    floats load in or None)``, from its config and shard headers alone (no tensor is read)."""
    try:
        _, _, target = _checked_skeleton(folder, dtype)
    except NotStreamable as exc:
        return str(exc), exc.dtype
    except (ValueError, KeyError, OSError):  # loading the model whole names the problem
        return "transformers could not build the model from its config", None
    return None, target


def _checked_skeleton(folder: str | None, dtype: str):
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from qtool.model_free import _config_dtype
    from qtool.models import spec_for
    from qtool.models.vlm import auto_model_class

    if folder is None:
        raise NotStreamable("the source is a GGUF file")
    folder_path = Path(folder)
    if not list(folder_path.glob("*.safetensors")):
        raise NotStreamable("the source has no safetensors shards")
    entries = source_tensors(folder_path)
    target = _config_dtype(json.loads((folder_path / "config.json").read_text()), entries, dtype)
    if target is None:
        raise NotStreamable("the source mixes float dtypes and its config names none")
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        model = auto_model_class(config).from_config(config, dtype=target)
    model.eval()
    spec = spec_for(model)
    if getattr(spec, "float_modules", ()):
        raise NotStreamable("the model has a vision tower (loaded whole)", target)
    if getattr(model, "_keep_in_fp32_modules", None) or getattr(model, "_keep_in_fp32_modules_strict", None):
        raise NotStreamable("the family keeps modules in float32 on load", target)
    if any(e.dtype.is_floating_point and e.dtype != target for e in entries.values()):
        raise NotStreamable(f"some source tensors are not {target} (transformers would cast them on load)", target)
    keys = set(model.state_dict())
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    on_disk = set(entries) - ({"lm_head.weight"} if tied else set())
    expected = keys - ({"lm_head.weight"} if tied else set())
    if expected != on_disk:
        odd = sorted(expected ^ on_disk)
        raise NotStreamable(f"the source's tensor names differ from the model's (e.g. {odd[0]})", target)
    return model, entries, target


def _load_outside_blocks(model, weights: "Streamed") -> "Streamed":
    from qtool.models import get_blocks, spec_for

    spec = spec_for(model)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    # what runs before the first block (embeddings, a VLM-free model's other non-block
    # modules) is loaded now; the blocks when they are worked on; the head at the end
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = {id(m) for m in get_blocks(model, spec)} | ({id(head)} if head is not None else set())
    for name, module in model.named_modules():
        if id(module) in skip or any(id(m) in skip for m in _ancestors(model, name)):
            continue
        for pname, _ in list(module.named_parameters(recurse=False)):
            owner, leaf = module, pname
            owner._parameters[leaf] = nn.Parameter(weights.tensor(f"{name}.{pname}" if name else pname),
                                                   requires_grad=False)
    if tied:
        head.weight = model.get_input_embeddings().weight
    elif head is not None:  # read once now so a NaN there is refused before any work
        weights.tensor(next(n for n, m in model.named_modules() if m is head) + ".weight")
    return weights


def _ancestors(model: nn.Module, name: str):
    parts = name.split(".")
    for i in range(1, len(parts)):
        yield model.get_submodule(".".join(parts[:i]))


class NotStreamable(UserInputError):
    """Streaming would not give the in-memory path's result (the message says why);
    ``dtype``: the dtype the source's floats load in, when it is known."""

    def __init__(self, message: str, dtype: torch.dtype | None = None):
        super().__init__(message)
        self.dtype = dtype
