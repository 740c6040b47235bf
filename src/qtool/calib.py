"""Calibration data: text -> token tensor ``[nsamples, seqlen]``, seeded and offline.

Sources:
- omitted: the bundled ``calib_data/*.txt`` (text this project wrote; see its README);
- a ``.txt`` file, a ``.jsonl`` file (``text`` field per line, or pre-tokenized
  ``input_ids`` used exactly as given) or a ``.parquet`` file with a ``text`` column;
- ``c4`` or ``pile-val`` (alias ``pileval``): the calibration documents of that set in the
  local data folder (``qtool.textsets``: C4 documents 0-499, pile-val 0-255), which
  ``qtool eval`` never evaluates on;
- ``wikitext2``: the hub's train split through ``datasets``.

Text is joined with "\\n\\n", tokenized once, and ``nsamples`` windows of ``seqlen`` tokens
start at positions drawn by ``torch.Generator().manual_seed(seed)`` (the GPTQ recipe).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from qtool.errors import UserInputError
from qtool.hub_datasets import load_hub_dataset
from qtool.textfiles import read_rows, sha256_file
from qtool.textsets import DATA_ENV, TEXT_SETS, canonical, read_documents

DATASETS = {
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "train", "text"),
}


@dataclass(frozen=True)
class Calibration:
    """Token windows plus where they came from. ``input_ids`` is int64 ``[nsamples, seqlen]``;
    ``file_sha256`` is the sha256 of the file read (None for the bundled text and the hub)."""

    input_ids: torch.Tensor
    source: str
    sha256: str
    file_sha256: str | None = None

    def provenance(self) -> dict:
        n, L = self.input_ids.shape
        out = {"source": self.source, "nsamples": n, "seqlen": L, "tokens_sha256": self.sha256}
        return out if self.file_sha256 is None else {**out, "file_sha256": self.file_sha256}


def bundled_calib_dir() -> Path:
    """The folder of the bundled calibration text: ``qtool/calib_data`` inside an installed
    wheel (setup.py maps the repository's ``calib_data/`` there), else the repository's own
    ``calib_data/`` next to ``src/`` (editable installs and source checkouts)."""
    here = Path(__file__).resolve()
    for candidate in (here.parent / "calib_data", here.parents[2] / "calib_data"):
        if any(candidate.glob("*.txt")):
            return candidate
    raise UserInputError("the bundled calib_data/ folder is missing: reinstall qtool or pass --calib FILE")


def _dataset_texts(name: str) -> list[str]:
    repo, config, split, column = DATASETS[name]
    ds = load_hub_dataset(repo, config, split, f"dataset '{name}' ({repo})",
                          "when offline pass a local file with --calib PATH (.txt, .jsonl or .parquet)")
    return [t for t in ds[column][:5000] if t]


def load_calibration(calib: str | None, tokenizer, nsamples: int, seqlen: int, seed: int) -> Calibration:
    """Deterministic calibration windows for ``tokenizer``."""
    file_sha = None
    named = None if calib is None else canonical(calib)
    if calib is None:
        folder = bundled_calib_dir()
        texts = [p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))]
        source = "bundled:calib_data"
    elif named is not None and TEXT_SETS[named].calib_docs is not None:
        docs = read_documents(named, "calib", fix=f"set {DATA_ENV}=DIR")
        texts, file_sha = docs.rows, docs.sha256
        source = f"dataset:{named}[{docs.span[0]}:{docs.span[1]}]"
    elif calib in DATASETS:
        texts, source = _dataset_texts(calib), f"dataset:{calib}"
    else:
        path = Path(calib).expanduser()
        if not path.is_file():
            raise UserInputError(
                f"calibration file {calib} does not exist: pass a .txt/.jsonl/.parquet file or one of "
                f"{', '.join(['c4', 'pile-val', *DATASETS])}"
            )
        texts, source = read_rows(path, "calibration file", token_ids=True), f"file:{os.path.abspath(path)}"
        file_sha = sha256_file(path)

    if texts and isinstance(texts[0], list):
        rows = [r for r in texts if r]
        if len(rows) < nsamples:
            raise UserInputError(f"{calib} has {len(rows)} pre-tokenized rows, fewer than --nsamples {nsamples}")
        short = [i for i, r in enumerate(rows[:nsamples]) if len(r) < seqlen]
        if short:
            raise UserInputError(
                f"{calib}: row {short[0] + 1} has {len(rows[short[0]])} tokens, fewer than --seqlen {seqlen}"
            )
        ids = torch.tensor([r[:seqlen] for r in rows[:nsamples]], dtype=torch.long)
    else:
        text = "\n\n".join(t for t in texts if t)
        if not text.strip():
            raise UserInputError(f"calibration source {calib or 'calib_data'} is empty: give text to calibrate on")
        tokens = tokenizer(text, return_tensors="pt").input_ids[0]
        if tokens.numel() < seqlen + 1:
            raise UserInputError(
                f"calibration text has {tokens.numel()} tokens, too short for one window of --seqlen {seqlen}: "
                "give more text or lower --seqlen"
            )
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, tokens.numel() - seqlen, (nsamples,), generator=gen)
        ids = torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])
    digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    return Calibration(input_ids=ids, source=source, sha256=digest, file_sha256=file_sha)
