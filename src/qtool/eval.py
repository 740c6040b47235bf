"""Perplexity with a stated protocol (the GPTQ/AWQ WikiText-2 recipe by default).

Protocol: the dataset's rows joined with "\\n\\n", tokenized once (the tokenizer's own
BOS handling, as ``tokenizer(text)`` gives it), windows of ``seqlen`` tokens each run on
its own (no context carried over). Non-overlapping by default (``stride == seqlen``,
remainder dropped, every window predicts its ``seqlen - 1`` later tokens); with a smaller
``stride`` each window predicts only its last ``stride`` tokens (the first window all of
its tokens), so every token is counted once. ppl = exp(mean NLL over predicted tokens).

Named datasets (``qtool.textsets``): ``wikitext2`` (all test rows), ``c4`` (documents
500-999) and ``pile-val`` (documents 256-511) from the local data folder; ``wikitext2``
falls back to ``$QTOOL_WIKITEXT2`` and then the hub when no local file is found.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from qtool.errors import UserInputError
from qtool.hub_datasets import load_hub_dataset
from qtool.textfiles import read_rows, sha256_file
from qtool.textsets import TEXT_SETS, Source, canonical, file_source, read_documents, set_file, set_source

EVAL_DATASETS = {
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "QTOOL_WIKITEXT2"),
}
JOIN = "\n\n"


@dataclass(frozen=True)
class Protocol:
    dataset: str
    split: str
    join: str
    tokenizer: str
    seqlen: int
    stride: int
    windows: int
    tokens: int
    bos: str

    def describe(self) -> str:
        return (f"{self.dataset} [{self.split}], rows joined with {json.dumps(self.join)}, tokenized once by "
                f"{self.tokenizer} ({self.bos}); {self.windows} windows of {self.seqlen} tokens, stride {self.stride}, "
                f"{self.tokens} predicted tokens, no context across windows")


def _rows_from_file(path: Path) -> list[str]:
    if not path.is_file():
        raise UserInputError(f"dataset file {path} does not exist: check --dataset")
    return read_rows(path, "dataset file")


@dataclass(frozen=True)
class EvalSource:
    """The rows of one evaluation dataset and where they came from. ``source`` says which
    documents they are, for the calibration-overlap check (None: the hub, not checkable);
    ``info`` is the ``dataset`` block of ``qtool eval --json``."""

    name: str
    rows: list[str]
    description: str
    split: str
    source: Source | None
    info: dict


def resolve_eval_dataset(dataset: str, data_dir: str | Path | None = None) -> EvalSource:
    """The rows of ``dataset``: a named set (``qtool.textsets``, its evaluation documents)
    or a local .txt/.jsonl/.parquet file (every row). ``wikitext2`` without a local file:
    ``$QTOOL_WIKITEXT2``, else the hub's test split. ``data_dir`` overrides the data folder."""
    name = canonical(dataset)
    info = {"arg": str(dataset), "repo": None, "config": None, "name": name or Path(dataset).stem,
            "file": None, "sha256": None, "documents": None}
    if name is not None:
        ts = TEXT_SETS[name]
        info.update(repo=ts.repo, config=ts.config)
        if name in EVAL_DATASETS and data_dir is None:  # wikitext2: its own variable, then the hub
            repo, config, split, env = EVAL_DATASETS[name]
            local = os.environ.get(env)
            if local:
                path = Path(local).expanduser()
                rows = _rows_from_file(path)
                sha = sha256_file(path)
                return EvalSource(name, rows, f"{name} (file {local})", split,
                                  file_source(path, sha, f"every row of {path}"), {**info, "file": str(path), "sha256": sha})
            if set_file(name) is None:
                rows = load_hub_dataset(repo, config, split, f"'{name}' ({repo})",
                                        f"offline, pass the file with --dataset PATH or set {env}=PATH")["text"]
                return EvalSource(name, list(rows), f"{name} ({repo})", split, None, info)
        docs = read_documents(name, "eval", data_dir, "pass --data-dir DIR or set QTOOL_DATA=DIR")
        desc = f"{name} (file {docs.path})" if name == "wikitext2" else docs.description()
        split = "test" if name == "wikitext2" else docs.split()
        return EvalSource(name, docs.rows, desc, split, set_source(docs),
                          {**info, "file": str(docs.path), "sha256": docs.sha256, "documents": list(docs.span)})
    path = Path(dataset).expanduser()
    rows = _rows_from_file(path)
    sha = sha256_file(path)
    return EvalSource(info["name"], rows, f"file {path}", "as given", file_source(path, sha, f"every row of {path}"),
                      {**info, "file": str(path), "sha256": sha})


def load_eval_rows(dataset: str, data_dir: str | Path | None = None) -> tuple[list[str], str, str]:
    """``(rows, dataset description, split)`` for a dataset name or a local file
    (``resolve_eval_dataset``)."""
    src = resolve_eval_dataset(dataset, data_dir)
    return src.rows, src.description, src.split


def tokenize_rows(rows: list[str], tokenizer) -> torch.Tensor:
    """int64 ``[1, T]``: the joined text tokenized once."""
    text = JOIN.join(rows)
    if not text.strip():
        raise UserInputError("the evaluation dataset is empty: give a file with text")
    return tokenizer(text, return_tensors="pt").input_ids


def windows(total: int, seqlen: int, stride: int, max_windows: int | None) -> list[tuple[int, int]]:
    """``(start, first_predicted_offset)`` of every window; targets are positions
    ``start + offset .. start + seqlen - 1`` (predicted from the tokens before them)."""
    if total < seqlen:
        raise UserInputError(
            f"the evaluation text has {total} tokens, fewer than one window of --seqlen {seqlen}: "
            "use a longer dataset or a smaller --seqlen"
        )
    out = []
    for start in range(0, total - seqlen + 1, stride):
        out.append((start, 1 if start == 0 or stride >= seqlen else seqlen - stride))
        if max_windows and len(out) >= max_windows:
            break
    return out


def check_seqlen(model, seqlen: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and seqlen > limit:
        raise UserInputError(f"--seqlen {seqlen} is longer than the model's context ({limit}): use --seqlen {limit} or less")


@torch.inference_mode()
def window_logprobs(model, ids: torch.Tensor, start: int, offset: int, seqlen: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities float32 ``[P, vocab]`` of the predicted positions of one window
    and their targets int64 ``[P]``."""
    x = ids[:, start : start + seqlen].to(device)
    logits = model(x, use_cache=False).logits[0, offset - 1 : -1].float()
    return F.log_softmax(logits, dim=-1), x[0, offset:]


def perplexity(model, ids: torch.Tensor, seqlen: int, stride: int | None = None, max_windows: int | None = None,
               device: str | torch.device = "cpu", progress: Callable[..., None] | None = None) -> dict:
    """NLL sum, token count and ppl of ``model`` over the windows of ``ids`` ``[1, T]``."""
    stride = stride or seqlen
    check_seqlen(model, seqlen)
    wins = windows(ids.shape[1], seqlen, stride, max_windows)
    nll, count, t0 = 0.0, 0, time.perf_counter()
    for i, (start, offset) in enumerate(wins):
        logp, target = window_logprobs(model, ids, start, offset, seqlen, device)
        nll -= logp.gather(1, target[:, None]).sum().item()
        count += target.numel()
        if progress:
            progress("window", index=i, total=len(wins))
    return {"ppl": math.exp(nll / count), "nll": nll, "tokens": count, "windows": len(wins),
            "seconds": round(time.perf_counter() - t0, 2)}


def protocol(dataset_desc: str, split: str, tokenizer, seqlen: int, stride: int | None, n_windows: int, tokens: int) -> Protocol:
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    bos = "BOS prepended by the tokenizer" if getattr(tokenizer, "add_bos_token", False) else "no BOS added"
    return Protocol(dataset_desc, split, JOIN, os.path.basename(str(name).rstrip("/")) or str(name), seqlen,
                    stride or seqlen, n_windows, tokens, bos)


def protocol_dict(p: Protocol) -> dict:
    return {**asdict(p), "description": p.describe()}
