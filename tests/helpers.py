"""Test helpers: run the CLI in-process and capture exit code, stdout and stderr."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import pytest


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> CliResult:
    from qtool.cli import main

    capsys.readouterr()
    old = sys.argv
    sys.argv = ["qtool", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


RUN_DEPENDENT = ("timings_s", "resumed_from_block", "command", "memory")  # memory: what was available, the peak measured


def file_digests(folder) -> dict[str, str]:
    """sha256 of every file of a checkpoint folder; qtool.json without its run-dependent
    entries (timings, the block a run resumed from, the command line) and the model card
    without its command line."""
    import hashlib

    from qtool.card import CARD_FILE, without_run_dependent

    out = {}
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        if f.name == "qtool.json":
            record = json.loads(data)
            for key in RUN_DEPENDENT:
                record.pop(key, None)
            for stats in record["layers"].values():
                stats.pop("seconds", None)
            data = json.dumps(record, sort_keys=True).encode()
        if f.name == CARD_FILE:
            data = without_run_dependent(data.decode()).encode()
        out[f.name] = hashlib.sha256(data).hexdigest()
    return out


def assert_same_projection_weights(folder_a, folder_b, count: int) -> None:
    """The ``*_proj`` linears of two checkpoints (``qtool.api.load_any``) hold equal
    weights, and there are ``count`` of them: two formats of one quantization."""
    import torch

    from qtool.api import load_any

    a, _, _ = load_any(str(folder_a))
    b, _, _ = load_any(str(folder_b))
    names = [n for n, _ in a.named_modules() if n.endswith("_proj")]
    assert len(names) == count
    for name in names:
        assert torch.equal(a.get_submodule(name).weight.float(), b.get_submodule(name).weight.float()), name
