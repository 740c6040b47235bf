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
