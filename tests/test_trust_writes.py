"""What qtool writes can be trusted: a kill at any write of the work folder resumes to the
same checkpoint (or a clear refusal), an earlier run's work folder is never silently
deleted, the source model is never an output, and the read-back covers every tensor."""

from __future__ import annotations

import copy
import os
import shutil
import struct
import sys
import json
from pathlib import Path

import pytest

from conftest import make_mini_model
from helpers import file_digests, run_cli

WRITE_EVENTS = {"open", "os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.truncate", "os.chmod", "os.link",
                "os.symlink"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class Killed(BaseException):
    """A simulated SIGKILL: not an Exception, so no handler in qtool catches it; once
    raised, every later write of the work folder is refused too (the process is dead)."""


class WriteWatch:
    """Sees every write of the work folder through Python's audit events (``open`` for
    writing, rename, remove, mkdir, the removals inside ``shutil.rmtree``), whatever the
    code under test calls them through, and kills the run at write number ``kill_at``.

    The audited operation is aborted, as if the process died just before it. Files that
    safetensors writes (in Rust, not audited) only ever land in folders that a later
    audited rename commits, so a kill before that rename covers a torn file too."""

    def __init__(self, kill_at: int | None = None):
        self.kill_at, self.writes, self.dead, self._in_rmtree = kill_at, [], False, False

    def __call__(self, event: str, args: tuple) -> None:
        if event == "shutil.rmtree":
            self._in_rmtree = "qtool-work" in str(args[0])
            return
        if event not in WRITE_EVENTS:
            return
        if event == "open":
            path, mode, flags = args
            if not ((isinstance(mode, str) and any(c in mode for c in "wax+")) or (mode is None and flags & WRITE_FLAGS)):
                return
        relative = event in ("os.remove", "os.rmdir") and args[1] not in (None, -1)  # rmtree's per-entry removals
        if not (("qtool-work" in str(args[0])) or (relative and self._in_rmtree)):
            return
        if self.dead:
            raise Killed("after the kill")
        self.writes.append(f"{event} {args[0]}" + (f" -> {args[1]}" if event == "os.rename" else ""))
        if len(self.writes) == self.kill_at:
            self.dead = True
            raise Killed(self.writes[-1])


_ACTIVE: list[WriteWatch] = []


def _audit(event: str, args: tuple) -> None:
    if _ACTIVE:
        _ACTIVE[-1](event, args)


sys.addaudithook(_audit)  # audit hooks cannot be removed: this one only acts while a watch is active


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors here are tiny: one thread avoids the cost of waking others, many times over
    on a loaded machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_model_dir):
    """A random-init Llama, narrow so that each of the many runs takes about a second, with
    3 blocks: a middle block is the one whose commit also holds the next block's inputs."""
    return make_mini_model(tmp_path_factory.mktemp("tiny") / "m", "llama", default_model_dir, hidden_size=64,
                           intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=3)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("cal") / "c.txt"
    path.write_text("\n".join(f"Line {i}: numbers {i * 31 % 97} and words about item {i}." for i in range(300)))
    return path


@pytest.fixture(scope="module")
def cached_loading(tiny):
    """The model and tokenizer loaded once; each run gets its own copy of the model (the
    pipeline changes it in place). Loading is not what these tests are about."""
    import qtool.api
    from qtool.loading import load_model, resolve

    loaded = load_model(resolve(str(tiny)), "auto")
    mp = pytest.MonkeyPatch()
    mp.setattr(qtool.api, "load_model", lambda source, dtype: (copy.deepcopy(loaded[0]), *loaded[1:]))
    yield
    mp.undo()


def _config(method: str, calib: Path):
    from qtool.config import QuantizeConfig

    return QuantizeConfig(method=method, calib=str(calib), nsamples=4, seqlen=32, batch_size=2)


def _run(tiny, out, method, calib, watch: WriteWatch | None = None, **kwargs):
    from qtool.api import quantize

    _ACTIVE.append(watch or WriteWatch())
    try:
        # the in-model path, whose work folder these tests kill (RTN would otherwise run model-free)
        return quantize(str(tiny), out, _config(method, calib), model_free=False, **kwargs)
    finally:
        _ACTIVE.pop()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_kill_at_every_work_folder_write_then_resume(tmp_path, tiny, calib, cached_loading, method):
    """Kill the run at write 1, 2, ... N of its work folder (every one, from creating the
    folder to deleting it after the save); ``--resume`` must then give the uninterrupted
    run's files byte for byte, or refuse in one line, never a different checkpoint."""
    from qtool.errors import UserInputError

    reference, counted = tmp_path / "reference", WriteWatch()
    _run(tiny, reference, method, calib, counted)
    expected = file_digests(reference)
    assert len(counted.writes) >= 8, counted.writes  # create, 3 block commits, removal at least
    outcomes = []
    for n, write in enumerate(counted.writes, start=1):
        out = tmp_path / f"out{n}"
        with pytest.raises(Killed):
            _run(tiny, out, method, calib, WriteWatch(kill_at=n))
        work = tmp_path / f"out{n}.qtool-work"
        try:
            _run(tiny, out, method, calib, resume=True)
            outcomes.append("resumed")
            assert not work.exists()
        except UserInputError as exc:
            message = str(exc)
            if out.exists():  # killed after the checkpoint was committed, while the work folder was deleted
                assert "already exists" in message and "--force" in message, (n, write, message)
                outcomes.append("done")
            else:  # killed before the work folder was committed
                assert "nothing to resume" in message, (n, write, message)
                outcomes.append("fresh")
                _run(tiny, out, method, calib)
        assert file_digests(out) == expected, f"kill at write {n} ({write}) gave a different checkpoint"
    assert "resumed" in outcomes and "fresh" in outcomes and "done" in outcomes, outcomes


def _interrupted_work_folder(tiny, out, calib, monkeypatch):
    """Leave the work folder of a run stopped after its first block (as Ctrl-C would)."""
    import qtool.resume

    real = qtool.resume.WorkDir.save_block

    def save_then_stop(self, index, *args, **kwargs):
        real(self, index, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(qtool.resume.WorkDir, "save_block", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny, out, "gptq", calib)
    monkeypatch.setattr(qtool.resume.WorkDir, "save_block", real)
    work = out.parent / f"{out.name}.qtool-work"
    assert (work / "block-0000").is_dir()
    return work


def test_existing_work_folder_needs_resume_or_restart(capsys, tmp_path, tiny, calib, cached_loading, monkeypatch):
    out = tmp_path / "out"
    work = _interrupted_work_folder(tiny, out, calib, monkeypatch)
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    args = ["quantize", tiny, "--method", "gptq", "--calib", calib, "--nsamples", "4", "--seqlen", "32",
            "--batch-size", "2", "-o", out]
    res = run_cli(capsys, *args)
    assert res.code == 1 and "Traceback" not in res.err, res.err
    assert "--resume to continue" in res.err and "--restart to discard" in res.err, res.err
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == before  # nothing deleted
    both = run_cli(capsys, *args, "--resume", "--restart")
    assert both.code == 2 and "--restart" in both.err, both.err
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == before
    restarted = run_cli(capsys, "--json", *args, "--restart")
    assert restarted.code == 0, restarted.err
    assert restarted.json()["resumed_from_block"] == 0 and not work.exists()
    _run(tiny, tmp_path / "fresh", "gptq", calib)
    assert file_digests(out) == file_digests(tmp_path / "fresh")


def test_resume_refuses_a_damaged_work_folder(capsys, tmp_path, tiny, calib, cached_loading, monkeypatch):
    out = tmp_path / "out"
    work = _interrupted_work_folder(tiny, out, calib, monkeypatch)
    (work / "block-0000").rename(work / "block-0001")  # a gap: block 1 without block 0
    res = run_cli(capsys, "quantize", tiny, "--method", "gptq", "--calib", calib, "--nsamples", "4", "--seqlen", "32",
                  "--batch-size", "2", "-o", out, "--resume")
    assert res.code == 1 and "damaged" in res.err and "--restart" in res.err, res.err
    assert not out.exists()


@pytest.fixture()
def source_copy(tmp_path, tiny):
    folder = tmp_path / "models" / "src"
    shutil.copytree(tiny, folder)
    return folder


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["equal", "inside", "containing", "symlink"])
def test_output_overlapping_the_source_is_refused_even_with_force(capsys, tmp_path, source_copy, where):
    if where == "symlink":
        (tmp_path / "link").symlink_to(source_copy)
    out = {"equal": source_copy, "inside": source_copy / "q", "containing": source_copy.parent,
           "symlink": tmp_path / "link"}[where]
    before = _tree(source_copy.parent)
    res = run_cli(capsys, "quantize", source_copy, "--method", "rtn", "-o", out, "--force")
    assert res.code == 1 and "Traceback" not in res.err, res.err
    line = res.err.strip().splitlines()[-1]
    assert line.startswith("qtool: error:") and "source model" in line and "-o/--output outside" in line, line
    assert _tree(source_copy.parent) == before  # nothing written, nothing deleted
    assert not list(tmp_path.rglob("*.qtool-work"))


def test_output_containing_a_gguf_source_is_refused(capsys, tmp_path):
    gguf = tmp_path / "models" / "m.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF not really")  # refused before anything reads it
    for out in (gguf, gguf.parent):
        res = run_cli(capsys, "quantize", gguf, "--method", "rtn", "-o", out, "--force")
        assert res.code == 1 and "source model" in res.err, res.err
    assert gguf.read_bytes() == b"GGUF not really"


def _corrupt_tensor(shard: Path, key: str) -> None:
    """Flip one byte of tensor ``key`` inside a safetensors file."""
    data = bytearray(shard.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    start, end = json.loads(data[8 : 8 + header_len])[key]["data_offsets"]
    data[8 + header_len + (start + end) // 2] ^= 0x01
    shard.write_bytes(bytes(data))


def test_read_back_catches_a_corrupt_layer_anywhere(capsys, tmp_path, tiny, monkeypatch):
    """One byte of the last layer's packed weights changes on its way to disk (the earlier
    read-back checked 8 evenly spread layers of 21, not this one): the save fails in one
    line naming the tensor and nothing is left at the output path."""
    import qtool.io

    real = qtool.io._write_entries
    corrupted = []

    def write_then_corrupt(entries, folder, size):
        shards, written = real(entries, folder, size)
        key = sorted(k for k in entries if k.endswith(".qweight"))[-1]
        _corrupt_tensor(folder / shards[0], key)
        corrupted.append(key)
        return shards, written

    monkeypatch.setattr(qtool.io, "_write_entries", write_then_corrupt)
    out = tmp_path / "out"
    res = run_cli(capsys, "quantize", tiny, "--method", "rtn", "--no-model-free", "--format", "gptq", "-o", out)
    assert corrupted == ["model.layers.2.self_attn.v_proj.qweight"]
    assert res.code == 1 and "Traceback" not in res.err, res.err
    line = res.err.strip().splitlines()[-1]
    assert line.startswith("qtool: error: read-back check failed") and corrupted[0] in line, line
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
