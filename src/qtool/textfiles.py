"""Reading user-supplied text files (calibration sets, evaluation datasets) and hashing
files. One reader so that `qtool quantize --calib` and `qtool eval --dataset` accept the
same formats and fail with the same kind of message.

Formats: ``.txt`` (the whole file is one text), ``.jsonl`` (one JSON object per line with a
``text`` string, or, where allowed, an ``input_ids`` list of token ids), ``.parquet`` (a
``text`` column).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from qtool.errors import UserInputError


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_rows(path: Path, what: str, token_ids: bool = False) -> list[str] | list[list[int]]:
    """The rows of a text file.

    Args:
        path: a ``.txt``, ``.jsonl`` or ``.parquet`` file.
        what: how the user knows the file, for messages ("calibration file", "dataset file").
        token_ids: accept a ``.jsonl`` whose every line has ``input_ids`` (returned as
            lists of ints, used exactly as given).

    Returns:
        Texts (``None`` parquet cells dropped), or token-id lists.

    Raises:
        UserInputError: unknown suffix, invalid JSON (naming the line), rows without the
            expected field, a file that is not UTF-8.
    """
    try:
        if path.suffix == ".txt":
            return [path.read_text(encoding="utf-8")]
        if path.suffix == ".jsonl":
            return _jsonl_rows(path, what, token_ids)
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if "text" not in table.column_names:
                raise UserInputError(f"{what} {path} has no 'text' column (columns: {', '.join(table.column_names)})")
            return [t for t in table.column("text").to_pylist() if isinstance(t, str)]
    except UnicodeDecodeError as exc:
        raise UserInputError(f"{what} {path} is not UTF-8 text: convert it to UTF-8") from exc
    raise UserInputError(f"{what} {path} must end in .txt, .jsonl or .parquet")


def _jsonl_rows(path: Path, what: str, token_ids: bool) -> list[str] | list[list[int]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserInputError(f"{path}:{lineno} is not valid JSON ({exc.msg}): fix that line") from exc
    if token_ids and rows and all(isinstance(r, dict) and "input_ids" in r for r in rows):
        return [list(map(int, r["input_ids"])) for r in rows]
    bad = next((i for i, r in enumerate(rows) if not (isinstance(r, dict) and isinstance(r.get("text"), str))), None)
    if bad is not None:
        wanted = "a 'text' string or an 'input_ids' list" if token_ids else "a 'text' string"
        raise UserInputError(f"{what} {path}: every line must be a JSON object with {wanted} (line {bad + 1} is not)")
    return [r["text"] for r in rows]
