"""Run by tests/test_distributed.py under torchrun: the ``qtool`` command line, with rank 1
failing as GPTQ starts block 1 (after block 0 is committed), to check that the other
processes stop with one line instead of hanging."""

import os
import sys

from qtool.errors import NumericsError
from qtool.gptq.method import GPTQMethod

_quantize_block = GPTQMethod.quantize_block


def _failing(self, ctx):
    if os.environ["RANK"] == "1" and ctx.index == 1:
        raise NumericsError("injected failure on rank 1 at block 1")
    return _quantize_block(self, ctx)


GPTQMethod.quantize_block = _failing

if __name__ == "__main__":
    from qtool.cli import main

    sys.argv[0] = "qtool"
    main()
