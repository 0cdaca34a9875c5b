"""The OpenAI judge's on-disk answer cache (sqlite): a rerun sends no request twice."""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path


class AnswerCache:
    """Answer cache in one sqlite file: every insert is its own committed transaction,
    so a crash mid-evaluation leaves only whole entries and a rerun resumes."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        # One connection shared by the worker threads, serialised by the lock;
        # the sqlite timeout covers other processes writing the same file.
        self._conn = sqlite3.connect(str(path), timeout=30.0, check_same_thread=False)
        with self._lock, self._conn:
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS answers ("
                " key TEXT PRIMARY KEY, model TEXT, content TEXT,"
                " prompt_tokens INTEGER, completion_tokens INTEGER, created REAL)"
            )

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT content FROM answers WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: str, model: str, content: str, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock, self._conn:
            self._conn.execute(
                "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?)",
                (key, model, content, prompt_tokens, completion_tokens, time.time()),
            )

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

