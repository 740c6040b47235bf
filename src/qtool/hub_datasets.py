"""Hub datasets (``wikitext2`` when no local file is found; ``c4`` and ``pile-val`` are read
from the local data folder only, ``qtool.textsets``) through ``datasets``, quietly and
without waiting on a network that is not there.

Offline, ``datasets`` asks the hub anyway and ``huggingface_hub`` retries every request
with back-off, logging each retry: about 30 s and two dozen warnings before the error.
Here the hub is asked only when it answers a plain TCP connect within a few seconds (or
when ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` is set, where ``datasets`` reads its
cache without asking); the libraries' loggers and progress bars stay quiet during the
call, and every failure is one ``UserInputError`` that says what to do.
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager
from urllib.parse import urlparse

from qtool.errors import UserInputError
from qtool.hub_errors import failure_message, fetch_errors

NOISY_LOGGERS = ("huggingface_hub", "datasets", "urllib3", "fsspec", "filelock", "httpx")
CONNECT_TIMEOUT_S = 3.0


def offline_mode() -> bool:
    """True when the user asked the HF libraries to stay offline (they then read their caches)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def hub_reachable(timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub endpoint opens within ``timeout`` seconds."""
    url = urlparse(hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


@contextmanager
def quiet_libraries():
    """Raise the HF libraries' loggers to ERROR and switch their progress bars off for
    the duration (the retry warnings and download bars are not qtool's output)."""
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import datasets

        bars_were_on = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
    except (ImportError, AttributeError):
        bars_were_on = False
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bars_were_on:
            import datasets

            datasets.enable_progress_bars()


def load_hub_dataset(repo: str, config: str | None, split: str, what: str, fix: str):
    """``datasets.load_dataset(repo, config, split=split)``, or one ``UserInputError``
    ``could not load {what} ...`` naming the real cause (``qtool.hub_errors``): the offline
    advice ``fix`` when the hub is unreachable, offline mode is on or the data is not cached;
    the HTTP status, the gated or missing dataset, the path of a permission or disk-full
    error otherwise."""
    if not offline_mode() and not hub_reachable():
        raise UserInputError(
            f"could not load {what}: {hub_endpoint()} is unreachable; {fix} "
            "(or set HF_HUB_OFFLINE=1 to use a copy in the `datasets` cache)"
        )
    import datasets

    try:
        with quiet_libraries():
            return datasets.load_dataset(repo, config, split=split)
    except fetch_errors() as exc:
        raise UserInputError(failure_message(f"could not load {what} through `datasets`", exc, f"dataset '{repo}'",
                                             fix)) from exc
