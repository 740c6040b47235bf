"""Resumable quantization: a work folder beside the output that holds every finished
block and the activations needed to continue, committed one block at a time.

Layout of ``<output>.qtool-work/``:
- ``fingerprint.json``: what the run depends on (qtool version, work-folder layout, model
  files, calibration tokens, options); ``--resume`` refuses a folder whose fingerprint
  differs.
- ``block-NNNN/``: finished block N, complete or absent:
  - ``block.safetensors``: every linear of the block packed in the output format, plus
    the block's other parameters (norms that AWQ rescaled), with stats as metadata: the
    output checkpoint is assembled from these files at the end (``qtool.io.save_from_blocks``);
  - ``inputs.safetensors``: the inputs of block N+1 (float chunks), kept only in the
    newest block's folder; absent after the last block and for methods without
    calibration.

Commit protocol. Each block's files are written into a temporary folder, flushed to disk,
and the folder is renamed to ``block-NNNN``: that rename is the only commit point. The state
is derived from what is committed (the finished blocks are ``block-0000`` up to the first
missing one; there is no separate state file to fall out of step), so a kill at any moment
leaves either the state before a commit or the one after it; temporary folders left by a
kill are never read and are discarded when their name is next used. The work folder itself
is created with its fingerprint and removed the same way, by one rename each.

Resuming and writing as you go are one mechanism: a finished block is committed once, in
its final packed form, and is never held in memory again; the output shards are copied
from the block files (and the model's other tensors) one tensor at a time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qtool import __version__
from qtool.errors import UserInputError
from qtool.io import overlap
from qtool.qtensor import QuantizedWeight
from qtool.tensorfiles import ByteRange, write_safetensors
from qtool.textfiles import sha256_file

LAYOUT = 3  # work-folder layout (1: block files + inputs + state.json; 2: no state file; 3: packed tensors), fingerprinted
FINGERPRINT = "fingerprint.json"
BLOCK_FILE = "block.safetensors"
INPUTS = "inputs.safetensors"
_BLOCK_DIR = re.compile(r"block-(\d{4,})")


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
    """What a resumed run must share with the interrupted one, in its JSON form (tuples
    become lists), so that it compares equal to the copy read back from the work folder."""
    fp = {"qtool_version": __version__, "work_layout": LAYOUT, "model_files": model_files,
          "calibration_tokens_sha256": calib_sha256, "config": config}
    return json.loads(json.dumps(fp, sort_keys=True))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_folder(target: Path, write: Callable[[Path], None]) -> None:
    """Create the folder ``target`` all at once.

    ``write(tmp)`` fills the temporary sibling ``.NAME.tmp`` (one left by a killed run is
    discarded first); its files are flushed to disk and one rename makes it ``target``, so a
    reader finds ``target`` absent or complete, after a kill or a power cut alike.
    ``target`` must not exist."""
    assert not target.exists(), f"{target} is already committed"
    tmp = target.with_name(f".{target.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    if os.name == "posix":  # durable before visible; directories cannot be opened on Windows
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
    os.rename(tmp, target)
    if os.name == "posix":
        _fsync(target.parent)


def discard_folder(path: Path) -> None:
    """Remove the folder ``path`` all at once: one rename to ``.NAME.trash``, so no reader
    sees it half deleted, then delete the trash (a leftover one goes with the next)."""
    trash = path.with_name(f".{path.name}.trash")
    if trash.exists():
        shutil.rmtree(trash)
    if path.exists():
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)  # never read again: a leftover is harmless


def check_work_dir(output: str | Path, resume: bool, restart: bool, sources: Iterable[Path] = ()) -> Path:
    """The work folder of ``output``, checked before any work: it must lie outside the
    source model (``sources``); an existing one needs ``resume`` (continue it) or
    ``restart`` (discard it), and ``resume`` needs one."""
    path = work_dir_for(output)
    if resume and restart:
        raise UserInputError("--resume continues the interrupted run and --restart discards it: pass only one of them")
    for src in sources:
        relation = overlap(path, src)
        if relation:
            raise UserInputError(f"the work folder {path} {relation} the source model {Path(src).resolve()}: "
                                 "choose an -o/--output outside the source")
    if path.exists() and not (resume or restart):
        raise UserInputError(f"{path} holds an interrupted run for this output: pass --resume to continue it "
                             "or --restart to discard it and start over")
    if resume and not path.exists():
        raise UserInputError(f"nothing to resume: {path} does not exist; run without --resume")
    return path


class WorkDir:
    """The work folder of one quantization run."""

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def start(cls, output: str | Path, fp: dict, restart: bool = False) -> "WorkDir":
        """A fresh work folder; an existing one is refused unless ``restart`` (then discarded)."""
        path = check_work_dir(output, resume=False, restart=restart)
        discard_folder(path)
        commit_folder(path, lambda tmp: (tmp / FINGERPRINT).write_text(json.dumps(fp, indent=2, sort_keys=True) + "\n"))
        return cls(path)

    @classmethod
    def resume(cls, output: str | Path, fp: dict, defaults: dict | None = None) -> "WorkDir":
        """The existing work folder, after checking it belongs to this exact run. An option in
        ``defaults`` (name -> default) that the saved fingerprint lacks was added to qtool after
        the run started (the qtool version is fingerprinted too, so only within one version):
        it matches when this run leaves it at that default."""
        path = check_work_dir(output, resume=True, restart=False)
        if not (path / FINGERPRINT).is_file():
            raise UserInputError(f"cannot resume from {path}: it has no {FINGERPRINT}, so it is not a qtool work "
                                 "folder; rerun with --restart to discard it and start over")
        saved = json.loads((path / FINGERPRINT).read_text())
        if defaults and isinstance(saved.get("config"), dict):  # the saved options win; defaults fill the gaps
            saved["config"] = {**{k: v for k, v in defaults.items() if fp["config"].get(k) == v}, **saved["config"]}
        if saved != fp:
            diff = sorted(k for k in set(saved) | set(fp) if saved.get(k) != fp.get(k))
            if "config" in diff:
                a, b = saved.get("config", {}), fp["config"]
                diff = [f"option {k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)] + [d for d in diff if d != "config"]
            raise UserInputError(
                f"cannot resume from {path}: {', '.join(diff)} differ from the interrupted run; rerun with the "
                "same model, calibration and options, or with --restart instead of --resume to start over"
            )
        work = cls(path)
        work.next_block  # refuses a damaged folder now, before any work
        return work

    def block_dir(self, index: int) -> Path:
        return self.path / f"block-{index:04d}"

    @property
    def next_block(self) -> int:
        """The number of finished blocks: the committed folders ``block-0000`` onward."""
        indices = sorted(int(m.group(1)) for p in self.path.iterdir()
                         if p.is_dir() and (m := _BLOCK_DIR.fullmatch(p.name)))
        count = 0
        while count < len(indices) and indices[count] == count:
            count += 1
        if count < len(indices):
            raise UserInputError(f"work folder {self.path} is damaged: block-{indices[count]:04d} exists without "
                                 f"block-{count:04d}; rerun with --restart to discard it and start over")
        return count

    def commit_block(self, index: int, files: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]) -> None:
        """Commit block ``index`` (the next one): every ``files[name] = (tensors,
        metadata)`` becomes the safetensors file ``block-NNNN/name``, all visible at once.
        Then the inputs kept by older blocks are deleted: only the newest are ever read."""
        assert index == self.next_block, f"block {index} committed out of order"
        target = self.block_dir(index)

        def write(tmp: Path) -> None:
            for name, (tensors, metadata) in files.items():
                if tensors and all(isinstance(v, ByteRange) for v in tensors.values()):  # spilled activations: copied, not loaded
                    write_safetensors(tmp / name, tensors, metadata)
                else:
                    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / name), metadata=metadata)

        commit_folder(target, write)
        for stale in self.path.glob(f"block-*/{INPUTS}"):
            if stale.parent != target:
                stale.unlink()

    def save_block(self, index: int, block: torch.nn.Module, prefix: str, results: dict,
                   next_inputs: list[torch.Tensor] | None,
                   pack: Callable[[str, QuantizedWeight], dict[str, torch.Tensor]], extra: dict | None = None) -> None:
        """Record finished block ``index`` (``results``: full name -> LayerResult) with the
        inputs of the next block, in one commit.

        The block file holds what the checkpoint will hold: the block's float parameters
        (``param.NAME``, relative names) and every layer packed in the output format
        (``pack(name, qweight)`` -> tensors by suffix, ``packed.NAME.SUFFIX``; the suffix
        order is kept in the metadata), so the output is assembled from these files
        (``qtool.io.save_from_blocks``) and nothing of a finished block stays in memory."""
        tensors: dict[str, torch.Tensor] = {}
        quantized = {name[len(prefix) + 1 :] for name in results}
        for pname, param in block.state_dict().items():
            module = pname.rsplit(".", 1)[0]
            if module not in quantized:
                tensors[f"param.{pname}"] = param.detach().to("cpu").clone()
        layers = {}
        for name, res in results.items():
            qw: QuantizedWeight = res.qweight
            info = {"bits": qw.bits, "group_size": qw.group_size, "sym": qw.sym, "shape": list(qw.shape),
                    "stats": res.stats}
            packed = pack(name, qw)
            for suffix, t in packed.items():
                tensors[f"packed.{name}.{suffix}"] = t
            info["suffixes"] = list(packed)
            layers[name] = info
        meta = {"layers": json.dumps(layers, sort_keys=True), "extra": json.dumps(extra or {}, sort_keys=True)}
        files = {BLOCK_FILE: (tensors, meta)}
        if next_inputs is not None:  # spilled to disk (qtool.activations): their bytes are copied one at a time
            ranges = getattr(next_inputs, "byte_ranges", lambda: None)()
            chunks = ranges if ranges is not None else [h.to("cpu") for h in next_inputs]
            files[INPUTS] = ({f"hidden.{i}": h for i, h in enumerate(chunks)}, {})
        self.commit_block(index, files)

    def block_meta(self, index: int) -> tuple[dict, dict]:
        """``(layers, extra)`` of finished block ``index``: per layer its bits, group
        size, symmetry, shape, stats and packed suffixes; the method's saved state."""
        from safetensors import safe_open

        with safe_open(str(self.block_dir(index) / BLOCK_FILE), framework="pt") as handle:
            meta = handle.metadata()
        return json.loads(meta["layers"]), json.loads(meta["extra"])

    def load_results(self) -> tuple[dict, dict]:
        """``(results by full name, extra by block index)`` of the finished blocks, from
        their metadata alone: each ``LayerResult`` has the layer's stats and no weights
        (the packed tensors stay on disk until the output is assembled)."""
        from qtool.pipeline import LayerResult

        results, extras = {}, {}
        for index in range(self.next_block):
            layers, extras[index] = self.block_meta(index)
            for name, info in layers.items():
                results[name] = LayerResult(None, info["stats"])
        return results, extras

    def load_inputs(self) -> list[torch.Tensor]:
        """The inputs of the next block, kept by the newest finished block."""
        path = self.block_dir(self.next_block - 1) / INPUTS
        if not path.is_file():
            raise UserInputError(f"work folder {self.path} is damaged: {path} is missing; rerun with --restart "
                                 "to discard it and start over")
        tensors = load_file(str(path))
        return [tensors[f"hidden.{i}"] for i in range(len(tensors))]

    def remove(self) -> None:
        discard_folder(self.path)
