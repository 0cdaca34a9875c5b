"""Reading a data set's rows and checking them: local JSON lines / JSON / parquet / CSV files or a hub data set.

Bad input is never kept silently: a missing column, an empty split, a null cell (JSON null, NaN, a parquet null) in
a column read, a malformed JSON line or non-UTF-8 bytes raise :class:`DataError` naming the file, the row and the
column; a data set's bad rows are reported together (:class:`BadRows`). Plain functions over plain values (no Hydra,
no omegaconf), so everything here is testable on small local files. Read next: ``records`` (the text tasks' data
sets), ``trl_formats`` (a user's preference data), ``tokenization`` (ids and the truncation policy).
"""
from __future__ import annotations

import codecs
import csv
import io
import json
import math
import random
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

PAIR_FIELDS = ("prompt", "chosen", "rejected")
SFT_FIELDS = ("prompt", "response")


class DataError(ValueError):
    """A data set is missing, empty, or lacks a column; the message names which."""


MAX_BAD_ROWS = 20  # rows listed in one DataError; the others are counted


class BadRows:
    """The rows of a data set that do not fit, reported together: fixing a file one error at a time takes a run
    per row."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, err: DataError | str) -> None:
        """A bad row's message (or every row of a DataError raised by a BadRows)."""
        self.messages.extend(getattr(err, "rows", None) or [str(err)])

    def error(self, message: str) -> DataError:
        err = DataError(message)
        err.rows = list(self.messages)  # each row's message, so another split's bad rows can join them
        return err

    def check(self) -> None:
        """Raise one DataError naming every bad row (the first :data:`MAX_BAD_ROWS`) if there is one."""
        n = len(self.messages)
        if n == 1:
            raise self.error(self.messages[0])
        if n > 1:
            more = n - MAX_BAD_ROWS
            raise self.error(f"{n} rows do not fit" + (f" (the first {MAX_BAD_ROWS} shown)" if more > 0 else "") + ":\n"
                            + "\n".join(f"  {m}" for m in self.messages[:MAX_BAD_ROWS])
                            + (f"\n  ... and {more} more" if more > 0 else ""))


def as_plain(obj: Any) -> Any:
    """OmegaConf containers (a Mapping / a Sequence) -> plain dicts/lists; this module never imports omegaconf."""
    if isinstance(obj, Mapping):
        return {k: as_plain(v) for k, v in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return [as_plain(v) for v in obj]
    return obj


def _local_file(data_files: Any, split: str) -> str | None:
    """The local file for ``split``: ``data_files`` is a path (any split) or a {split: path} mapping."""
    if data_files is None:
        return None
    if isinstance(data_files, str):
        return data_files
    data_files = as_plain(data_files)
    if split not in data_files or data_files[split] is None:
        raise DataError(f"data_files has no file for split {split!r} (it has: {', '.join(data_files) or 'none'})")
    return str(data_files[split])


def _decode(data: bytes, path: Path, line: int) -> str:
    """UTF-8 text of ``data`` (starting at ``line`` of ``path``); undecodable bytes raise naming path:line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line += data.count(b"\n", 0, err.start)
        col = err.start - data.rfind(b"\n", 0, err.start)  # 1-based within the line
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{data[err.start]:02x} at position {col}); "
                        f"re-save the file as UTF-8") from None


def _json(text: str, path: Path, line: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{line + err.lineno - 1}: not valid JSON "
                        f"({err.msg}: line {err.lineno} column {err.colno})") from None


def _object(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: not a JSON object (got {type(row).__name__}); each row must be one {{...}}")
    return row


def _read_local(path: str) -> tuple[list[dict], list[str]]:
    """Rows of a local file and, for each, where it is (``path:line`` for JSON lines) for error messages."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data file {str(p)!r} does not exist")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(p).to_pylist()
        return rows, [f"{p}: row {i}" for i in range(1, len(rows) + 1)]
    if p.suffix in (".jsonl", ".json"):
        data = p.read_bytes().removeprefix(codecs.BOM_UTF8)
        if p.suffix == ".json" and data.lstrip().startswith(b"["):
            items = _json(_decode(data, p, 1), p, 1)
            where = [f"{p}: item {i}" for i in range(1, len(items) + 1)]
            return [_object(r, w) for r, w in zip(items, where)], where
        rows, where = [], []
        # bytes.splitlines splits on \n, \r\n and \r only (str.splitlines would also split inside strings at U+2028)
        for n, raw in enumerate(data.splitlines(), 1):
            if raw.strip():
                where.append(f"{p}:{n}")
                rows.append(_object(_json(_decode(raw, p, n), p, n), where[-1]))
        return rows, where
    if p.suffix == ".csv":
        text = _decode(p.read_bytes().removeprefix(codecs.BOM_UTF8), p, 1)
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows, where = [], []
        for r in reader:
            # csv counts physical lines, so a quoted cell holding newlines still gives the row's last line
            where.append(f"{p}:{reader.line_num}")
            rows.append(r)
        return rows, where
    raise DataError(f"data file {str(p)!r}: unsupported format (use .jsonl, .json, .parquet or .csv)")


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def check_cells(rows: list[dict], columns: Sequence[str], where: Any) -> None:
    """Raise naming each row (``where(i)``) with a null or missing cell of ``columns``, and the column."""
    bad = BadRows()
    for i, r in enumerate(rows):
        c = next((c for c in columns if c not in r or _is_null(r[c])), None)
        if c is not None:
            bad.add(f"{where(i)}: column {c!r} is {'missing' if c not in r else 'null'}; fix or remove the row")
    bad.check()


def read_rows(dataset: str | None, data_files: Any, split: str, columns: Sequence[str],
              optional: Sequence[str] = ()) -> tuple[list[dict], Callable[[int], str], list[str]]:
    """Rows of one split with (at least) ``columns``, from local files if given, else the hub; also a function
    giving row ``i``'s location for error messages and the columns the data has.

    Local files are read directly (JSON lines, JSON array, parquet or CSV); hub data sets go through
    ``datasets.load_dataset(dataset, split=split)`` (keeping ``columns`` and those of ``optional`` it has). A
    missing column, an empty split, a null cell in ``columns`` or an undecodable line raises
    :class:`DataError` naming the data set or file, the split or row, and the column.
    """
    local = _local_file(data_files, split)
    where = f"{local!r}" if local else f"data set {dataset!r}"
    if local:
        rows, row_where = _read_local(local)
        locate = row_where.__getitem__
        available = list(rows[0]) if rows else []
    else:
        if not dataset:
            raise DataError("neither a data set name nor data_files is set")
        try:
            from datasets import load_dataset  # optional heavy import: only for hub data sets

            ds = load_dataset(dataset, split=split)
        except Exception as err:  # offline, unknown split, ...: say what to do
            raise DataError(
                f"could not load {where} (split {split!r}): {type(err).__name__}: {err}. "
                f"Offline? Point data_files at local JSONL/parquet files with the same columns."
            ) from err
        available = list(ds.column_names)
        missing = [c for c in columns if c not in available]
        if missing:
            raise DataError(f"{where} (split {split!r}) has no column {missing[0]!r}; "
                            f"columns: {', '.join(available)}")
        keep = list(dict.fromkeys([*columns, *(c for c in optional if c in available)]))
        rows = ds.select_columns(keep).to_list()

        def locate(i: int) -> str:
            return f"{where} (split {split!r}) row {i + 1}"
    if not rows:
        raise DataError(f"{where} (split {split!r}) is empty")
    missing = [c for c in columns if c not in available]
    if missing:
        raise DataError(f"{where} (split {split!r}) has no column {missing[0]!r}; "
                        f"columns: {', '.join(sorted(available))}")
    check_cells(rows, columns, locate)
    return rows, locate, available


def read_table(dataset: str | None, data_files: Any, split: str, columns: Sequence[str]) -> list[dict]:
    """The rows of :func:`read_rows`."""
    return read_rows(dataset, data_files, split, columns)[0]


def blank(text: Any) -> bool:
    """Empty or whitespace-only: such a prompt or response carries nothing to learn from."""
    return not str(text).strip()



def subsample(items: list, n: int | None, seed: int) -> list:
    """A seeded random subset of ``n`` items (all of them, in order, when n is None or >= len)."""
    if n is None or n >= len(items):
        return list(items)
    idx = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in idx]




def holdout_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held out): a seeded ``fraction`` of ``range(n)`` held out, at least one row and never all."""
    if n < 2:
        raise DataError(f"cannot hold out pairs from {n} row(s): give a held-out file or more data")
    k = min(max(1, round(fraction * n)), n - 1)
    held = set(random.Random(seed).sample(range(n), k))
    return [i for i in range(n) if i not in held], sorted(held)


def require_nonempty(items: Iterable, what: str) -> None:
    if not list(items):
        raise DataError(f"{what} is empty after filtering (see the counts logged above)")
