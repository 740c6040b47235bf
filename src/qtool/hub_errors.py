"""The real cause of a failed download from the Hugging Face hub, in one line.

A model (``huggingface_hub``) or a dataset (``datasets``) can fail to arrive for many
reasons: no connection, offline mode, a gated or missing repository, a server error, a
cache folder that is not writable or a full disk. Each gets its own message with the
exception's text, the HTTP status or the path, and only a connection failure (offline
mode, no network, not in the cache) gets the caller's "use a local copy" advice.

Everything else (a bug, a ``ValueError`` from a library) is not caught here and reaches
the CLI's internal-error line with its type and message.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass


@dataclass(frozen=True)
class FetchFailure:
    """``cause``: what went wrong, with its evidence. ``fix``: what to do ("" when the
    caller's offline advice is the fix). ``offline``: a connection problem, offline mode
    or a file missing from the cache, where a local copy is the way forward."""

    cause: str
    fix: str
    offline: bool


def fetch_errors() -> tuple[type[BaseException], ...]:
    """The exception types :func:`explain` classifies: ``OSError`` (which covers
    huggingface_hub's HTTP errors, cache misses, offline mode and requests' errors), httpx's
    transport errors and ``datasets``' own errors."""
    kinds: list[type[BaseException]] = [OSError]
    try:
        from huggingface_hub.errors import HFValidationError

        kinds.append(HFValidationError)
    except ImportError:
        pass
    kinds += _transport_errors()
    try:
        from datasets.exceptions import DatasetsError

        kinds.append(DatasetsError)
    except ImportError:
        pass
    return tuple(kinds)


def _transport_errors() -> list[type[BaseException]]:
    """httpx's (and its fork httpx2's) connection and timeout errors; huggingface_hub >= 1
    talks HTTP through one of them. Their ``HTTPError`` base also covers the hub's status
    errors, so only ``TransportError`` counts as "could not connect"."""
    found = []
    for name in ("httpx2", "httpx"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        found.append(module.TransportError)
    return found


def _text(exc: BaseException, limit: int = 200) -> str:
    """The exception's message on one line, shortened."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    try:
        import requests

        if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return True
    except ImportError:
        pass
    return isinstance(exc, tuple(_transport_errors()))


def explain(exc: BaseException, what: str) -> FetchFailure:
    """Classify ``exc`` (one of :func:`fetch_errors`) raised while fetching ``what`` (e.g.
    ``"'org/name'"``)."""
    from huggingface_hub import errors as hub

    text = _text(exc)
    status = _status(exc)
    http = f"HTTP {status}" if status else type(exc).__name__
    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(exc, hub.OfflineModeIsEnabled):
        return FetchFailure(f"offline mode is on (HF_HUB_OFFLINE=1) and {what} is not in the local cache", "", True)
    if isinstance(exc, hub.GatedRepoError):
        return FetchFailure(f"{what} is a gated repository ({http}: {text})",
                            f"accept its conditions on its huggingface.co page, then {login}", False)
    if isinstance(exc, hub.RepositoryNotFoundError):
        return FetchFailure(f"{what} was not found on the hub ({http}: {text})",
                            f"check the name; if the repository is private, {login}", False)
    if isinstance(exc, hub.RevisionNotFoundError):
        return FetchFailure(f"the revision asked for does not exist in {what} ({http}: {text})",
                            "check the revision name", False)
    if isinstance(exc, hub.LocalEntryNotFoundError):
        return FetchFailure(f"{what} is not in the local cache and the hub could not be reached ({text})", "", True)
    if isinstance(exc, hub.EntryNotFoundError):
        return FetchFailure(f"a file of {what} is missing on the hub ({http}: {text})",
                            "check that the repository holds a model", False)
    if isinstance(exc, hub.HfHubHTTPError):
        if status in (401, 403):
            return FetchFailure(f"the hub refused access to {what} ({http}: {text})", login, False)
        if status is not None and status >= 500:
            return FetchFailure(f"the hub had a server error for {what} ({http}: {text})", "try again later", False)
        return FetchFailure(f"the hub answered {http} for {what} ({text})", "check the name and your access", False)
    if isinstance(exc, hub.HFValidationError):
        return FetchFailure(f"{what} is not a valid hub repository id ({text})", "pass org/name or a local path", False)
    if _is_connection_error(exc):
        return FetchFailure(f"the hub could not be reached for {what} ({type(exc).__name__}: {text})", "", True)
    try:
        from datasets.exceptions import DatasetNotFoundError, DatasetsError
    except ImportError:
        DatasetNotFoundError = DatasetsError = ()  # type: ignore[assignment,misc]
    if isinstance(exc, DatasetNotFoundError):  # datasets' own sentence names the dataset (gated, missing, private)
        return FetchFailure(text.rstrip("."), f"check the name; a gated dataset needs its conditions accepted and {login}",
                            False)
    if isinstance(exc, OSError) and exc.errno is not None:
        where = exc.filename or "the download cache"
        if exc.errno == errno.ENOSPC:
            return FetchFailure(f"no space left on the device while writing {where} ({text})",
                                "free disk space, or set HF_HOME to a folder on a larger disk", False)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return FetchFailure(f"permission denied on {where} ({text})",
                                "make it writable, or set HF_HOME to a writable folder", False)
        return FetchFailure(f"{exc.strerror or text} ({where})", "", False)
    if isinstance(exc, DatasetsError):
        return FetchFailure(f"{what}: datasets reported {type(exc).__name__}: {text}", "", False)
    return FetchFailure(f"{type(exc).__name__}: {text}", "", False)


def failure_message(action: str, exc: BaseException, what: str, offline_advice: str) -> str:
    """``"{action}: {cause}; {fix}"``, with ``offline_advice`` as the fix only when the
    failure is a connection problem."""
    failure = explain(exc, what)
    fix = offline_advice if failure.offline else failure.fix
    return f"{action}: {failure.cause}" + (f"; {fix}" if fix else "")
