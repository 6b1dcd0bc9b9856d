"""Read a local data file into memory, with errors that name the file, the line and the fix.

::

    rows = read_local_rows("pairs.jsonl.gz", split="train[:1000]")
    rows.rows[0]        # {"prompt": ..., "chosen": ..., "rejected": ...}
    rows.lines[0]       # 1: the file line each row came from (None for Parquet)

Formats: ``.jsonl``/``.json`` (optionally ``.gz``): UTF-8 JSON Lines, one object a line, or
(``.json``) one array of objects; ``.parquet`` through ``pyarrow``. The file *is* the split:
a slice such as ``"train[:100]"`` or ``"train[10%:]"`` selects rows of it (Hugging Face's
split syntax), and ``[:N]`` stops reading after N rows.

Nothing is written: ``datasets.load_dataset("json", data_files=...)`` keeps an Arrow copy of
every local file in the user's cache (``HF_DATASETS_CACHE``, ``~/.cache/huggingface``), where
private data would outlive the run. Reading here keeps the rows in this process only.

Damaged input raises :class:`DataFileError` (a ``ValueError``) naming the file, the line, the
problem and the fix: text that is not UTF-8 (Latin-1, UTF-16), a truncated or fake ``.gz``,
a line that is not JSON, a line that is not an object, a key twice in one object.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["LOCAL_FORMATS", "DataFileError", "LocalRows", "local_format", "read_local_rows"]

LOCAL_FORMATS: dict[str, str] = {
    ".jsonl": "json",
    ".jsonl.gz": "json",
    ".json": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
}
"""The local file suffixes every dataset schema reads, each with its reader (``builder``)."""

_SIMPLE_HEAD = re.compile(r"^[^\[]*\[:(\d+)\]$")  # "train[:100]": stop after 100 rows
_CONVERT = "iconv -f {encoding} -t UTF-8 {path} > {stem}.utf8{suffix}"


def local_format(path: str) -> str | None:
    """The reader (``"json"`` or ``"parquet"``) for a local file name, or ``None`` when the
    name has none of the :data:`LOCAL_FORMATS` suffixes (then it is a hub dataset name)."""
    name = path.lower()
    for suffix in sorted(LOCAL_FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return LOCAL_FORMATS[suffix]
    return None


class DataFileError(ValueError):
    """A local data file cannot be read; the message names the file, the place and the fix."""


@dataclass(frozen=True)
class LocalRows:
    """The rows of a local file: ``rows[i]`` came from file line ``lines[i]`` (``lines`` is
    ``None`` for Parquet); ``columns`` is every key seen, in first-seen order."""

    rows: list[dict[str, Any]]
    columns: list[str]
    lines: list[int] | None


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` refusing a key twice (``json`` would silently keep the last)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _open_binary(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _unzipped_suffix(path: Path) -> str:
    name = path.name.lower()
    return ".jsonl" if ".jsonl" in name else ".json"


def _binary_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw bytes)`` of the file, with gzip trouble reported by line."""
    number = 0
    try:
        with _open_binary(path) as handle:
            for number, raw in enumerate(handle, start=1):  # noqa: B007 (read after the loop)
                yield number, raw
    except gzip.BadGzipFile as err:
        raise DataFileError(
            f"{path}: the name ends in .gz but the file is not gzip-compressed ({err}). Fix: "
            f"rename it to {path.name[:-3]} (plain text), or compress it with gzip."
        ) from err
    except (EOFError, zlib.error) as err:
        raise DataFileError(
            f"{path}: the gzip stream is truncated or damaged after line {number} ({err}); the "
            f"file was probably cut short while being written or copied. Fix: copy or download "
            f"it again (`gzip -t {path}` checks a file)."
        ) from err


def _text(path: Path, number: int, raw: bytes) -> str:
    """One line decoded as UTF-8, or an error saying which encoding it looks like."""
    if number == 1 and (raw.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in raw[:64]):
        raise DataFileError(
            f"{path}: line 1 is UTF-16 text (byte-order mark or NUL bytes), not UTF-8. Fix: "
            "save it as UTF-8, e.g. `"
            + _CONVERT.format(
                encoding="UTF-16", path=path, stem=path.stem, suffix=_unzipped_suffix(path)
            )
            + "`."
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = raw[err.start : err.start + 1].hex()
        raise DataFileError(
            f"{path}, line {number}: not valid UTF-8 (byte 0x{bad} at column {err.start + 1}); "
            "the file looks Latin-1 / Windows-1252 encoded. Fix: save it as UTF-8, e.g. `"
            + _CONVERT.format(
                encoding="LATIN1", path=path, stem=path.stem, suffix=_unzipped_suffix(path)
            )
            + "`."
        ) from err
    return text.removeprefix("\ufeff") if number == 1 else text  # a UTF-8 BOM is harmless


def _parse(path: Path, number: int, text: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as err:
        raise DataFileError(
            f"{path}, line {number}: duplicate key {err.key!r} in one JSON object (JSON keeps "
            "only the last of them, so the row is ambiguous). Fix: keep one "
            f"{err.key!r} entry on that line."
        ) from None
    except json.JSONDecodeError as err:
        where = f"line {number + err.lineno - 1}, column {err.colno}"
        excerpt = text.strip()[:60]
        raise DataFileError(
            f"{path}, {where}: not valid JSON ({err.msg}): {excerpt!r}. Fix that line (each "
            "line must be one complete JSON object) or delete it."
        ) from None


def _json_lines(path: Path, limit: int | None) -> LocalRows:
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    columns: dict[str, None] = {}
    for number, raw in _binary_lines(path):
        if limit is not None and len(rows) >= limit:
            break
        text = _text(path, number, raw)
        if not text.strip():
            continue
        if (
            number == 1
            and text.lstrip().startswith("[")
            and path.name.lower().endswith((".json", ".json.gz"))
        ):
            return _json_array(path, limit)
        row = _parse(path, number, text.rstrip("\r\n"))
        if not isinstance(row, dict):
            raise DataFileError(
                f"{path}, line {number}: a JSON {type(row).__name__}, not an object. Fix: "
                "write one object with the task's columns a line (JSON Lines)."
            )
        rows.append(row)
        lines.append(number)
        columns.update(dict.fromkeys(row))
    return LocalRows(rows, list(columns), lines)


def _json_array(path: Path, limit: int | None) -> LocalRows:
    """A ``.json`` file holding one array of objects (line numbers: where each object ends is
    not tracked, so every row reports line 1)."""
    chunks = [_text(path, number, raw) for number, raw in _binary_lines(path)]
    data = _parse(path, 1, "".join(chunks))
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise DataFileError(
            f"{path}: a JSON array whose items are not all objects. Fix: a list of objects "
            "with the task's columns, or JSON Lines (one object a line)."
        )
    rows = data if limit is None else data[:limit]
    columns = dict.fromkeys(key for row in rows for key in row)
    return LocalRows(rows, list(columns), None)


def _parquet(path: Path) -> LocalRows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise DataFileError(
            f"{path}: not a readable Parquet file ({err}); it is truncated, damaged or not "
            "Parquet. Fix: export or copy it again."
        ) from err
    return LocalRows(table.to_pylist(), list(table.schema.names), None)


def _select(rows: LocalRows, split: str, path: Path) -> LocalRows:
    """The rows a split slice such as ``"train[10%:50%]"`` names (the whole file for a plain
    split name)."""
    if "[" not in split:
        return rows
    from datasets import ReadInstruction

    name = split.split("[", 1)[0]
    try:
        (instruction,) = ReadInstruction.from_spec(split).to_absolute({name: len(rows.rows)})
    except (ValueError, KeyError, AssertionError) as err:
        raise DataFileError(
            f"{path}: cannot take split {split!r} of one file ({err}). Fix: a slice such as "
            f"'{name}[:1000]' or '{name}[10%:]'."
        ) from err
    cut = slice(instruction.from_, instruction.to)
    return LocalRows(rows.rows[cut], rows.columns, rows.lines[cut] if rows.lines else None)


def read_local_rows(path: str | Path, builder: str, split: str = "train") -> LocalRows:
    """Every row of a local file, in memory (see the module docstring).

    Args:
        path: an existing ``.jsonl``/``.json`` (``.gz`` allowed) or ``.parquet`` file.
        builder: ``"json"`` or ``"parquet"``.
        split: the split name the file stands for, optionally sliced (``"train[:100]"``).

    Raises:
        DataFileError: undecodable, truncated or malformed content (file, line, fix).
    """
    path = Path(path)
    head = _SIMPLE_HEAD.match(split)
    if builder == "parquet":
        return _select(_parquet(path), split, path)
    if head:
        return _json_lines(path, int(head.group(1)))
    return _select(_json_lines(path, None), split, path)
