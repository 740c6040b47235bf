"""Where the calibration activations live: ``--activations auto|device|cpu|disk``.

The calibration hidden states of the current block (its inputs, its outputs, and GPTQ's
per-stage caches of the attention and MLP) are one tensor per calibration chunk. They
are kept in a ``Chunks`` list whose ``Store`` decides where its tensors live:

- ``device``: on the compute device, in the compute dtype (fastest; on a CPU run this is
  the same as ``cpu``);
- ``cpu``: in CPU memory (pinned when the compute device is a GPU, so copies overlap);
- ``disk``: appended to a spill file per list (``qtool.tensorfiles.Spill``) in a spill
  folder next to the output, read back one chunk at a time: the memory of the
  activations is then one chunk's, whatever the number of samples.

``auto`` (the default) is chosen by the memory plan (``qtool.memplan``): the device when
they fit there, else CPU memory when they fit, else disk. Where the activations live
never changes a result: every placement gives the same checkpoint bytes (tested).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from qtool.tensorfiles import ByteRange, Spill, read_tensor

PLACES = ("auto", "device", "cpu", "disk")


class Store:
    """Makes ``Chunks`` lists that keep their tensors in ``place`` and hand them out on
    ``device``. ``folder``: where ``disk`` spill files go (a temporary folder made in it,
    removed by ``close``)."""

    def __init__(self, place: str, device: torch.device, folder: Path | None = None):
        if place not in PLACES[1:]:
            raise ValueError(f"activations place {place!r} is not one of {PLACES[1:]}")
        self.place, self.device = place, device
        self._folder: Path | None = None
        self._parent = folder
        self._count = 0

    @property
    def folder(self) -> Path:
        if self._folder is None:
            parent = self._parent if self._parent is not None else Path(tempfile.gettempdir())
            parent.mkdir(parents=True, exist_ok=True)
            self._folder = Path(tempfile.mkdtemp(prefix=".qtool-activations-", dir=parent))
        return self._folder

    def new(self, items: Iterable[torch.Tensor] = ()) -> Chunks:
        chunks = Chunks(self)
        for t in items:
            chunks.append(t)
        return chunks

    def _spill(self) -> Spill:
        self._count += 1
        return Spill(self.folder / f"{self._count:06d}.bin")

    def close(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


class Chunks(Sequence):
    """A list of per-chunk tensors kept where the store says; ``chunks[i]`` is on the
    compute device."""

    def __init__(self, store: Store):
        self.store = store
        self._items: list = []
        self._spill: Spill | None = None
        self._unflushed = False

    def _flush(self) -> None:
        if self._unflushed:
            self._spill.file.flush()
            self._unflushed = False

    def append(self, tensor: torch.Tensor) -> None:
        place, device = self.store.place, self.store.device
        if place == "device":
            self._items.append(tensor.to(device))
        elif place == "cpu":
            t = tensor.to("cpu")
            if device.type == "cuda":
                t = t.pin_memory()
            self._items.append(t)
        else:
            if self._spill is None:
                self._spill = self.store._spill()
            self._items.append(self._spill.add(tensor))
            self._unflushed = True

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        item = self._items[index]
        if isinstance(item, ByteRange):
            self._flush()
            return read_tensor(item).to(self.store.device)
        return item.to(self.store.device, non_blocking=True)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self[i]

    def byte_ranges(self) -> list[ByteRange] | None:
        """Where a ``disk`` list's tensors are (flushed), to copy them without loading them
        all; None for the other places."""
        if self.store.place != "disk":
            return None
        self._flush()
        return list(self._items)

    def clear(self) -> None:
        self._items.clear()
        self._unflushed = False
        if self._spill is not None:
            self._spill.close()
            self._spill.path.unlink(missing_ok=True)
            self._spill = None

    def __del__(self):
        try:
            self.clear()
        except Exception:  # interpreter shutdown: the store's folder is removed by close()
            pass
