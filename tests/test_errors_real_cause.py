"""A failed download names its real cause: each kind of failure of the hub (gated, missing,
HTTP status, offline, no connection) or of the machine (permission, full disk) gets its own
line with the status or the path, and the "work offline with a local copy" advice appears
only for a connection failure, offline mode or a cache miss.

The hub and ``datasets`` calls are replaced by functions that raise each exception, so
nothing here touches the network."""

from __future__ import annotations

import errno

import pytest
from helpers import run_cli

from qtool.errors import UserInputError


def _response(status: int):
    """An HTTP response object of the kind huggingface_hub's errors carry."""
    try:
        import httpx2 as httpx
    except ImportError:
        try:
            import httpx
        except ImportError:
            import requests

            resp = requests.Response()
            resp.status_code = status
            return resp
    return httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/api/models/org/name"))


def _hub(name: str, status: int | None = None, message: str = "the server said no"):
    from huggingface_hub import errors

    cls = getattr(errors, name)
    return cls(message, response=_response(status)) if status else cls(message)


def _connect_error():
    for name in ("httpx2", "httpx"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        return module.ConnectError("[Errno -2] Name or service not known")
    import requests

    return requests.exceptions.ConnectionError("Max retries exceeded")


def _requests_connection_error():
    import requests

    return requests.exceptions.ConnectionError("HTTPSConnectionPool(host='huggingface.co'): Max retries exceeded")


# exception factory, words the message must hold, whether the offline advice belongs
CASES = {
    "gated": (lambda: _hub("GatedRepoError", 403, "Access to model org/name is restricted"),
              ["gated", "HTTP 403", "Access to model org/name is restricted", "hf auth login"], False),
    "missing repo": (lambda: _hub("RepositoryNotFoundError", 404, "Repository Not Found for url"),
                     ["not found", "HTTP 404"], False),
    "missing revision": (lambda: _hub("RevisionNotFoundError", 404, "Invalid rev id: v9"),
                         ["revision", "HTTP 404", "Invalid rev id: v9"], False),
    "unauthorized": (lambda: _hub("HfHubHTTPError", 401, "401 Client Error: Unauthorized"),
                     ["refused access", "HTTP 401", "hf auth login"], False),
    "server error": (lambda: _hub("HfHubHTTPError", 503, "503 Server Error: Service Unavailable"),
                     ["server error", "HTTP 503", "try again later"], False),
    "not cached": (lambda: _hub("LocalEntryNotFoundError", None, "Cannot find an appropriate cached snapshot folder"),
                   ["not in the local cache", "Cannot find an appropriate cached snapshot folder"], True),
    "offline mode": (lambda: _hub("OfflineModeIsEnabled", None, "Cannot reach https://huggingface.co: offline mode"),
                     ["offline mode is on"], True),
    "no connection": (_connect_error, ["could not be reached", "ConnectError"], True),
    "requests connection": (_requests_connection_error, ["could not be reached", "Max retries exceeded"], True),
    "permission": (lambda: PermissionError(errno.EACCES, "Permission denied", "/hf/hub/.locks/org--name.lock"),
                   ["permission denied on /hf/hub/.locks/org--name.lock", "HF_HOME"], False),
    "disk full": (lambda: OSError(errno.ENOSPC, "No space left on device", "/hf/hub/blobs/abc123"),
                  ["no space left", "/hf/hub/blobs/abc123"], False),
}


def _raiser(make):
    def fail(*args, **kwargs):
        raise make()

    return fail


@pytest.mark.parametrize("case", list(CASES))
def test_hub_model_errors(monkeypatch, case):
    import huggingface_hub

    from qtool.loading import local_folder, resolve

    make, words, offline = CASES[case]
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _raiser(make))
    with pytest.raises(UserInputError) as info:
        local_folder(resolve("org/name"))
    msg = str(info.value)
    assert msg.startswith("could not get 'org/name' from the Hugging Face hub: ") and "\n" not in msg, msg
    for word in words:
        assert word in msg, (word, msg)
    assert ("hf download org/name --local-dir DIR" in msg) is offline, msg
    assert ("offline" in msg.replace("offline mode is on", "")) is offline, msg


def test_hub_model_error_through_the_cli(capsys, monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", _raiser(CASES["gated"][0]))
    res = run_cli(capsys, "quantize", "org/name", "-o", tmp_path / "out")
    assert res.code == 1
    line = res.err.strip().splitlines()[-1]
    assert line.startswith("qtool: error: could not get 'org/name'") and "gated" in line and "HTTP 403" in line, line
    assert "offline" not in line


def test_unexpected_exceptions_are_not_called_offline(monkeypatch):
    """A bug is not a download failure: it propagates (the CLI shows it as an internal error)."""
    import huggingface_hub

    from qtool.loading import local_folder, resolve

    monkeypatch.setattr(huggingface_hub, "snapshot_download", _raiser(lambda: KeyError("siblings")))
    with pytest.raises(KeyError):
        local_folder(resolve("org/name"))


DATASET_CASES = {
    "gated": (lambda: _dataset_not_found("Dataset 'allenai/c4' is a gated dataset on the Hub. You must be authenticated."),
              ["is a gated dataset on the Hub", "hf auth login"], False),
    "missing": (lambda: _dataset_not_found("Dataset 'allenai/c4' doesn't exist on the Hub or cannot be accessed."),
                ["doesn't exist on the Hub"], False),
    "no connection": (lambda: ConnectionError("Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)"),
                      ["could not be reached", "Couldn't reach 'allenai/c4'"], True),
    "offline mode": CASES["offline mode"],
    "permission": (lambda: PermissionError(errno.EACCES, "Permission denied", "/hf/datasets/allenai___c4"),
                   ["permission denied on /hf/datasets/allenai___c4"], False),
    "disk full": (lambda: OSError(errno.ENOSPC, "No space left on device", "/hf/datasets/downloads/x.incomplete"),
                  ["no space left", "/hf/datasets/downloads/x.incomplete"], False),
    "server error": CASES["server error"],
}


def _dataset_not_found(message: str):
    from datasets.exceptions import DatasetNotFoundError

    return DatasetNotFoundError(message)


@pytest.mark.parametrize("case", list(DATASET_CASES))
@pytest.mark.parametrize("use", ["calibration", "eval"])
def test_dataset_errors(monkeypatch, tmp_path, case, use):
    import datasets

    from qtool.calib import load_calibration
    from qtool.eval import load_eval_rows

    make, words, offline = DATASET_CASES[case]
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # no reachability probe: the patched call is the only one
    monkeypatch.setenv("QTOOL_DATA", str(tmp_path))  # no local WikiText-2 file: the hub is asked
    monkeypatch.delenv("QTOOL_WIKITEXT2", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", _raiser(make))
    with pytest.raises(UserInputError) as info:
        if use == "calibration":
            load_calibration("wikitext2", None, nsamples=2, seqlen=64, seed=0)
        else:
            load_eval_rows("wikitext2")
    msg = str(info.value)
    assert "Salesforce/wikitext" in msg and "\n" not in msg, msg
    for word in words:
        assert word in msg, (word, msg)
    advice = "--calib PATH" if use == "calibration" else "--dataset PATH"
    assert (advice in msg) is offline, msg
