"""The named text sets that ``qtool eval --dataset`` and ``qtool quantize --calib`` read
from a local data folder, each with a fixed split of its documents: a calibration part
and an evaluation part that never overlap. Also the check that a checkpoint is not
evaluated on the documents it was calibrated on.

| name | file under the data folder | evaluation documents | calibration documents |
|---|---|---|---|
| ``wikitext2`` | ``wikitext-2-raw-v1/test.jsonl`` | all 4,358 rows (the test split) | none here (the hub's train split) |
| ``c4`` | ``c4/c4-train.00000-of-01024.first1000.jsonl`` | 500-999 | 0-499 |
| ``pile-val`` (alias ``pileval``) | ``pile-val/val-seed42-first512.jsonl`` | 256-511 | 0-255 |

A document is one JSON Lines row (its ``text``), numbered from 0 in file order; ranges are
half-open ``(start, stop)`` in code and inclusive ("500-999") in messages. The data folder
is ``--data-dir``, else ``$QTOOL_DATA``, else ``shared/data`` beside the source checkout
(the project's ``../shared/data``); nothing is copied from it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from qtool.errors import UserInputError
from qtool.textfiles import read_rows, sha256_file

log = logging.getLogger(__name__)

DATA_ENV = "QTOOL_DATA"
Range = tuple[int, int]


@dataclass(frozen=True)
class TextSet:
    """One named set: its file, the rows it must hold, and its two document ranges."""

    name: str
    file: str  # relative to the data folder
    origin: str  # what the file is, for the protocol line
    repo: str  # the hub dataset it comes from (for model cards)
    config: str | None
    documents: int  # rows the file holds
    sha256: str  # of the file the protocol names
    eval_docs: Range
    calib_docs: Range | None  # None: no calibration part in this file

    def span(self, part: str) -> Range:
        docs = self.eval_docs if part == "eval" else self.calib_docs
        assert docs is not None, (self.name, part)
        return docs


TEXT_SETS = {
    "wikitext2": TextSet("wikitext2", "wikitext-2-raw-v1/test.jsonl", "WikiText-2 raw test", "Salesforce/wikitext",
                         "wikitext-2-raw-v1", 4358,
                         "a26bd387e6f1d19e45ddbd7fe6fd5aef3f97f457863f0973e3327e68ac6daee8", (0, 4358), None),
    "c4": TextSet("c4", "c4/c4-train.00000-of-01024.first1000.jsonl", "C4 en train shard 0, first 1000 documents",
                  "allenai/c4", "en", 1000, "cdd5b754119131d2934e3e799a059a9d64f53a6aac9e7e2ef79b43120bb01a32",
                  (500, 1000), (0, 500)),
    "pile-val": TextSet("pile-val", "pile-val/val-seed42-first512.jsonl",
                        "Pile validation, first 512 documents in AWQ's shuffle(seed=42) order",
                        "mit-han-lab/pile-val-backup", None, 512,
                        "92f7c307a4c0d1116ef7a76b539592a35fbcd0955704dc4396ebd40eb48f52bf", (256, 512), (0, 256)),
}
ALIASES = {"pileval": "pile-val"}
SUITE = ("wikitext2", "c4", "pile-val")
SUITE_WINDOWS = 40  # qtool eval --suite: the quick protocol of ../shared/baselines (first 40 windows)


def canonical(name: str) -> str | None:
    """The set's name for ``name`` or an alias of it; None for anything else (a file)."""
    name = ALIASES.get(name, name)
    return name if name in TEXT_SETS else None


def docs_label(docs: Range) -> str:
    return f"{docs[0]}-{docs[1] - 1}"


def data_dir(override: str | Path | None = None) -> Path | None:
    """The data folder: ``override`` (``--data-dir``), else ``$QTOOL_DATA``, else
    ``shared/data`` beside a source checkout of qtool when that folder exists; else None."""
    if override is not None:
        return Path(override).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    repo = Path(__file__).resolve().parents[2]
    sibling = repo.parent / "shared" / "data"
    return sibling if (repo / "pyproject.toml").is_file() and sibling.is_dir() else None


def set_file(name: str, override: str | Path | None = None) -> Path | None:
    """The file of set ``name`` in the data folder, or None when it is not there."""
    folder = data_dir(override)
    path = None if folder is None else folder / TEXT_SETS[name].file
    return path if path is not None and path.is_file() else None


@dataclass(frozen=True)
class Documents:
    """Documents read from one set: ``rows`` are ``TEXT_SETS[name]`` rows ``span``."""

    name: str
    rows: list[str]
    path: Path
    sha256: str
    span: Range

    def description(self) -> str:
        ts = TEXT_SETS[self.name]
        return f"{self.name} ({ts.origin}; file {self.path})"

    def split(self) -> str:
        ts = TEXT_SETS[self.name]
        if self.span == (0, ts.documents):
            return f"all {ts.documents} rows"
        other = ts.calib_docs if ts.eval_docs == self.span else ts.eval_docs
        role = "calibration" if ts.eval_docs == self.span else "evaluation"
        return (f"documents {docs_label(self.span)} of {ts.documents}"
                + (f"; {docs_label(other)} are for {role}" if other else ""))


def read_documents(name: str, part: str, override: str | Path | None = None, fix: str = "") -> Documents:
    """The ``part`` ('eval' or 'calib') documents of set ``name``, in file order, unchanged.

    Raises:
        UserInputError: the data folder or the file is missing (``fix`` says how to point
            at it), or the file holds fewer rows than the set needs.
    """
    ts = TEXT_SETS[name]
    path = set_file(name, override)
    if path is None:
        folder = data_dir(override)
        where = "no data folder was found" if folder is None else f"{folder / ts.file} does not exist"
        raise UserInputError(f"{name} reads {ts.file} from the data folder (the project's ../shared/data) and {where}: "
                             f"{fix or f'set {DATA_ENV}=DIR'} to the folder that holds it")
    rows = read_rows(path, f"{name} file")
    start, stop = ts.span(part)
    if len(rows) < stop:
        raise UserInputError(f"{path} has {len(rows)} rows and {name} needs {ts.documents}: "
                             f"point the data folder at the files of ../shared/data (see its SHA256SUMS)")
    digest = sha256_file(path)
    if digest != ts.sha256:
        log.warning("%s differs from the file the %s protocol names (sha256 %s, expected %s): results are not "
                    "comparable with other runs", path, name, digest[:12], ts.sha256[:12])
    return Documents(name, rows[start:stop], path, digest, (start, stop))


# ---- calibration/evaluation overlap ----

@dataclass(frozen=True)
class Source:
    """Where some documents came from, for the overlap check: identities of the file
    (``set:NAME``, ``path:REALPATH``, ``sha:HEX``; any shared one means the same file) and
    the half-open row range (None: every row)."""

    keys: frozenset[str]
    span: Range | None
    label: str


def overlaps(a: Source, b: Source) -> bool:
    if not a.keys & b.keys:
        return False
    if a.span is None or b.span is None:
        return True
    return a.span[0] < b.span[1] and b.span[0] < a.span[1]


def file_source(path: Path, sha256: str | None, label: str) -> Source:
    keys = {f"path:{os.path.realpath(path)}"} | ({f"sha:{sha256}"} if sha256 else set())
    return Source(frozenset(keys), None, label)


def set_source(docs: Documents) -> Source:
    keys = {f"set:{docs.name}", f"sha:{docs.sha256}", f"path:{os.path.realpath(docs.path)}"}
    return Source(frozenset(keys), docs.span,
                  f"{docs.name} documents {docs_label(docs.span)}")


def calibration_source(calibration: dict | None) -> tuple[Source | None, str | None]:
    """The documents a checkpoint's ``qtool.json`` ``calibration`` record drew from, and a
    warning when they cannot be told apart from evaluation documents. Sources: the
    ``dataset:NAME[START:STOP]`` halves of this module, ``file:PATH`` (with ``file_sha256``
    when recorded), older hub ``dataset:`` names and the bundled text (no overlap)."""
    if not calibration:
        return None, None
    src, sha = calibration.get("source", ""), calibration.get("file_sha256")
    if src.startswith("file:"):
        return file_source(Path(src[5:]), sha, f"the file {src[5:]}"), None
    if src.startswith("dataset:") and src.endswith("]") and "[" in src:
        name, span = src[8:-1].split("[")
        start, stop = (int(x) for x in span.split(":"))
        keys = {f"set:{name}"} | ({f"sha:{sha}"} if sha else set())
        return Source(frozenset(keys), (start, stop), f"{name} documents {docs_label((start, stop))}"), None
    if src == "dataset:pileval":
        return None, ("was calibrated on the first 5000 Pile validation documents of the hub (file order), and the "
                      "pile-val evaluation documents (a seeded shuffle of the same split) may include some of them")
    return None, None


def check_no_overlap(checkpoints: dict[str, dict | None], evaluated: dict[str, Source | None]) -> list[str]:
    """Refuse evaluating a checkpoint on documents it was calibrated on; return warnings.

    Args:
        checkpoints: model name -> its ``qtool.json`` ``calibration`` record (None: none).
        evaluated: dataset name -> the documents it evaluates (None: not checkable, e.g. the hub).

    Raises:
        UserInputError: naming the checkpoint, both document ranges and the datasets to keep.
    """
    warnings = []
    for model, calibration in checkpoints.items():
        cal, warning = calibration_source(calibration)
        if warning and "pile-val" in evaluated:
            warnings.append(f"{model} {warning}")
        if cal is None:
            continue
        clash = [name for name, ev in evaluated.items() if ev is not None and overlaps(cal, ev)]
        if clash:
            keep = [n for n in evaluated if n not in clash]
            fix = (f"evaluate it with --dataset {','.join(keep)} only" if keep else
                   "evaluate it on another dataset (e.g. --dataset c4)")
            raise UserInputError(
                f"{model} was calibrated on {cal.label}, which overlaps the {clash[0]} evaluation documents "
                f"({evaluated[clash[0]].label}): {fix}, or re-quantize it with --calib c4 or --calib pile-val "
                "(their calibration halves)")
    return warnings
