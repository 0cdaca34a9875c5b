"""Reading what an offline W&B run wrote: its ``run-<id>.wandb`` file, a LevelDB-style log of protobuf records
(wandb >= 0.2x has no public reader for it, and writes no wandb-summary.json offline)."""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024  # the log's block size: a record never straddles two blocks
HEADER = 7  # a record's checksum (4 bytes), length (2) and type (1); the file starts with a header of this size
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[pb.Record]:
    """Every record of a ``.wandb`` file, in the order written."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", data[:8]
    out, pos, parts = [], HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if pos + HEADER + length > len(data):  # still being written
            break
        chunk, pos = data[pos + HEADER:pos + HEADER + length], pos + HEADER + length
        if kind in (FULL, FIRST):
            parts = chunk
        elif kind in (MIDDLE, LAST):
            parts += chunk
        else:  # zeros: the rest of the block is padding
            pos += left - HEADER
            continue
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(parts)
            out.append(record)
    return out


def _set(tree: dict, item, value) -> None:
    keys = list(item.nested_key) or [item.key]
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


class OfflineRun:
    """The run, metric definitions, summary and history rows of one offline run folder's ``.wandb`` file."""

    def __init__(self, path: Path):
        self.records = records(path)
        self.run = next(r.run for r in self.records if r.WhichOneof("record_type") == "run")
        self.metrics = {}  # name or glob -> MetricRecord
        self.summary: dict = {}
        self.history: list[dict] = []
        for r in self.records:
            kind = r.WhichOneof("record_type")
            if kind == "metric":
                self.metrics[r.metric.name or r.metric.glob_name] = r.metric
            elif kind == "summary":
                for item in r.summary.update:
                    _set(self.summary, item, json.loads(item.value_json))
            elif kind == "history":
                row: dict = {}
                for item in r.history.item:
                    _set(row, item, json.loads(item.value_json))
                self.history.append(row)

    def rows_with(self, key: str) -> list[dict]:
        return [r for r in self.history if key in r]


def offline_run(run_dir: Path, run_id: str, timeout_s: float = 30.0) -> OfflineRun:
    """The latest offline folder of ``run_id`` under ``run_dir/wandb`` (a resume writes a folder of its own), once
    its file ends with the exit record: W&B's service may still be writing it when ``wandb.finish()`` returns."""
    paths = sorted((Path(run_dir) / "wandb").glob(f"offline-run-*/run-{run_id}.wandb"), key=lambda p: p.stat().st_mtime)
    assert paths, f"no offline run {run_id} under {run_dir}"
    deadline = time.monotonic() + timeout_s
    while not any(r.WhichOneof("record_type") == "exit" for r in records(paths[-1])):
        assert time.monotonic() < deadline, f"{paths[-1]} has no exit record after {timeout_s} s"
        time.sleep(0.1)
    return OfflineRun(paths[-1])
