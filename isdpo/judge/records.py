"""The per-item judge records, written as JSON lines."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable


def save_records_jsonl(records: Iterable[dict] | dict, path: str | os.PathLike) -> Path:
    """Write per-item records (or a ``judge_win_rate`` result's ``records``) as JSONL,
    atomically (temp file + ``os.replace``)."""
    if isinstance(records, dict):
        records = records["records"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
