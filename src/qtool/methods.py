"""Method registry: one line per method; each entry builds the method from the config."""

from __future__ import annotations

from qtool.config import QuantizeConfig
from qtool.errors import UserInputError


def get_method(config: QuantizeConfig):
    if config.method == "rtn":
        from qtool.rtn import RTNMethod

        return RTNMethod()
    if config.method == "gptq":
        from qtool.gptq.method import GPTQMethod

        return GPTQMethod()
    if config.method == "awq":
        from qtool.awq.method import AWQMethod

        return AWQMethod()
    raise UserInputError(f"unknown method {config.method}")
