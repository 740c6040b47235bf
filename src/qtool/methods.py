"""Method registry: one line per method; each entry builds the method from the config."""

from __future__ import annotations

from qtool.config import AWQ_MIN_SEARCH_TOKENS, QuantizeConfig
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
        from qtool.awq.search_io import load_search

        return AWQMethod(load_search=load_search(config.awq_load_search) if config.awq_load_search else None,
                         search_tokens=config.awq_search_tokens or AWQ_MIN_SEARCH_TOKENS)
    if config.method == "awq-gptq":
        from qtool.awq_gptq import AWQGPTQMethod

        return AWQGPTQMethod(search_tokens=config.awq_search_tokens or AWQ_MIN_SEARCH_TOKENS)
    if config.method == "signround":
        from qtool.signround import SignRoundMethod

        return SignRoundMethod(steps=config.rounding_steps)
    raise UserInputError(f"unknown method {config.method}")
