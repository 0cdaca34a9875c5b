"""A content-addressed cache for artefacts that many runs share (SFT references, preference sets).

Entries live at ``<cache_dir>/<kind>/<hash>/`` where the hash is of the config
that produced them, so the jobs of a sweep reuse one reference instead of
retraining it. Building is guarded by a file lock (parallel SLURM jobs on a
shared file system build once, the others wait) and published by an atomic
rename (a crash never leaves a half-written entry that looks complete).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable


def config_hash(obj: Any, length: int = 12) -> str:
    """Stable hash of a JSON-able object (keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


@contextmanager
def file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# Part of every key: bump it when the code that builds an entry changes what it builds.
CACHE_VERSION = 2


def cached_dir(cache_dir: str | Path, kind: str, key: Any, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """Return ``(path, hit)`` of the entry for ``key``, calling ``build(tmp_dir)`` on a miss.

    ``build`` writes into a fresh temporary directory which is renamed into
    place only after it returns; ``key.json`` beside the files records what the
    hash is of.
    """
    root = Path(cache_dir) / kind
    key = {"cache_version": CACHE_VERSION, "key": key}
    digest = config_hash(key)
    final = root / digest
    if final.exists():
        return final, True
    with file_lock(root / f".{digest}.lock"):
        if final.exists():
            return final, True
        tmp = root / f".tmp-{digest}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            (tmp / "key.json").write_text(json.dumps(key, indent=2, sort_keys=True, default=str))
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final, False
