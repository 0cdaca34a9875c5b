"""The per-item judge records, written as JSON lines."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from isdpo.artifacts import atomic_path


def save_records_jsonl(records: Iterable[dict] | dict, path: str | os.PathLike) -> Path:
    """Write per-item records (or a ``judge_win_rate`` result's ``records``) as JSONL, whole or not at all
    (isdpo.artifacts.atomic_path)."""
    if isinstance(records, dict):
        records = records["records"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
