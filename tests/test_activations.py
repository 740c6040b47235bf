"""Where the calibration activations live (``--activations``, ``qtool.activations``): CPU
memory or a disk spill folder give the same checkpoint bytes; spilled activations really
are on disk, one file per list, and nothing of them is left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import run_cli


def _files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.name not in ("qtool.json", "README.md")}


def test_chunks_keep_each_tensor_exactly_where_asked(tmp_path):
    from qtool.activations import Store

    gen = torch.Generator().manual_seed(0)
    items = [torch.randn(2, 5, 7, generator=gen).to(dtype) for dtype in (torch.float32, torch.bfloat16, torch.float16)]
    items.append(torch.empty(0, 7))
    for place in ("device", "cpu", "disk"):
        store = Store(place, torch.device("cpu"), tmp_path)
        chunks = store.new(items)
        assert len(chunks) == len(items)
        for got, want in zip(chunks, items):
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), place
        assert [t.shape for t in chunks[1:3]] == [t.shape for t in items[1:3]]
        if place == "disk":
            files = list(store.folder.iterdir())
            assert len(files) == 1 and files[0].stat().st_size == sum(t.numel() * t.element_size() for t in items)
            ranges = chunks.byte_ranges()
            assert [r.shape for r in ranges] == [tuple(t.shape) for t in items]
            chunks.clear()
            assert not list(store.folder.iterdir())  # a cleared list's file is deleted
            folder = store.folder
            store.close()
            assert not folder.exists()
        else:
            assert chunks.byte_ranges() is None


def test_spilled_next_inputs_are_saved_byte_for_byte_as_in_memory(tmp_path):
    """The resume commit copies spilled chunks from their file (never loading them all):
    the inputs file is the one ``save_file`` writes from the tensors."""
    from qtool.activations import Store
    from qtool.resume import INPUTS, WorkDir

    gen = torch.Generator().manual_seed(1)
    hidden = [torch.randn(2, 8, 16, generator=gen) for _ in range(3)]
    block = torch.nn.Linear(4, 4)
    saved = {}
    for place in ("cpu", "disk"):
        (tmp_path / place).mkdir()
        work = WorkDir.start(tmp_path / place / "out", {"fp": 1}, restart=False)
        chunks = Store(place, torch.device("cpu"), tmp_path).new(hidden)
        work.save_block(0, block, "model.layers.0", {}, chunks, lambda name, qw: {})
        saved[place] = (work.block_dir(0) / INPUTS).read_bytes()
        assert all(torch.equal(a, b) for a, b in zip(work.load_inputs(), hidden))
    assert saved["cpu"] == saved["disk"]


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_disk_spilled_activations_give_the_same_checkpoint(capsys, tmp_path, mini_llama, calib_txt, monkeypatch, method):
    from qtool import activations

    appended = {"disk": 0}
    real_append = activations.Chunks.append

    def append(self, tensor):
        if self.store.place == "disk":
            appended["disk"] += 1
        real_append(self, tensor)

    monkeypatch.setattr(activations.Chunks, "append", append)
    args = ["quantize", mini_llama, "--method", method, "--group-size", "32", "--calib", calib_txt,
            "--nsamples", "4", "--seqlen", "32", "--batch-size", "2", "--json"]
    runs = {}
    for place in ("cpu", "disk"):
        appended["disk"] = 0
        res = run_cli(capsys, *args, "--activations", place, "-o", tmp_path / place)
        assert res.code == 0, res.err
        runs[place] = appended["disk"]
        record = json.loads((tmp_path / place / "qtool.json").read_text())
        assert record["memory"]["plan"]["activations"] == ("cpu" if place == "cpu" else "disk")
    assert runs["cpu"] == 0 and runs["disk"] > 0
    assert _files(tmp_path / "cpu") == _files(tmp_path / "disk")
    assert not list(tmp_path.glob(".qtool-activations-*"))  # the spill folder is gone


def test_auto_spills_to_disk_when_memory_is_short(capsys, tmp_path, mini_llama, calib_txt, monkeypatch):
    """With too little memory for the activations in CPU memory, auto plans them on disk
    (and says so); ``--activations cpu`` is then refused naming ``--activations disk``."""
    from qtool import memplan

    args = ["--method", "gptq", "--calib", calib_txt, "--nsamples", "64", "--seqlen", "256", "--batch-size", "8"]
    in_memory = json.loads(run_cli(capsys, "plan", mini_llama, *args, "--json").out)
    assert in_memory["activations"] == "cpu" and in_memory["spill_bytes"] == 0
    monkeypatch.setattr(memplan, "available_cpu", lambda: in_memory["peak_cpu_bytes"] - 1)
    spilled = run_cli(capsys, "plan", mini_llama, *args, "--json")
    assert spilled.code == 0, spilled.err
    plan = spilled.json()
    assert plan["activations"] == "disk" and plan["fits"]
    assert plan["spill_bytes"] == in_memory["parts_bytes"]["activations"]
    # two chunks (8 of the 64 samples each) of each copy in memory instead of all of them
    assert plan["parts_bytes"]["activations"] == in_memory["parts_bytes"]["activations"] * 2 * 8 // 64
    res = run_cli(capsys, "plan", mini_llama, *args)
    assert "activations spilled to disk" in res.out
    res = run_cli(capsys, "plan", mini_llama, *args, "--activations", "cpu")
    assert res.code == 1 and "not enough memory" in res.err and "--activations disk" in res.err
    res = run_cli(capsys, "plan", mini_llama, *args, "--activations", "ram")
    assert res.code != 0 and "--activations ram: expected one of auto, device, cpu, disk" in res.err
