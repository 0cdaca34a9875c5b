"""What keeps a run folder honest: one writer at a time, resume only what was started with the same
config, and an interruption that never passes for success."""
from __future__ import annotations

import fcntl
import os
import shutil
import socket
import time
import zipfile
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Mapping

from lightning.pytorch.utilities.exceptions import SIGTERMException

from isdpo.artifacts import (CHECKPOINT, HYDRA_PENDING, HYDRA_RECORD, RESULT, RUN_CONFIG, RUN_LOCK, WriteFailed,
                             config_hash, first_write_error, read_json, write_json)
from isdpo.distributed import rank_world
from isdpo.schema import default_of, flatten

# Keys that say where and how a run is written or watched, not what it computes: they may change between
# a run and its resume.
NOT_IDENTITY = ("logger", "stage", "paths", "experiment", "run_name", "judge", "hydra",
                "task.train.resume", "task.train.checkpoint_every_n_steps", "task.train.keep_checkpoints",
                "hardware.num_workers", "hardware.torch_threads")
EXIT_INTERRUPTED = 143  # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM


class RunFolderBusy(RuntimeError):
    """Another live process holds the run folder."""


class ConfigMismatch(RuntimeError):
    """The run folder holds a run started with another config."""


class CheckpointUnreadable(RuntimeError):
    """last.ckpt exists but cannot be read (truncated or corrupt)."""


class RunIncomplete(RuntimeError):
    """Training ended without its planned steps or without the final evaluation: never reported as completed."""


def check_steps(step: int, planned: int | None) -> None:
    """Raise :class:`RunIncomplete` unless training ran ``planned`` optimizer steps (None: at least one)."""
    if step == 0 or (planned is not None and step != planned):
        raise RunIncomplete(
            f"training ended at optimizer step {step} of {planned if planned is not None else 'at least 1'} without "
            f"an error: {'nothing was trained' if step == 0 else 'the run is not whole'}, so no policy/ and no "
            f"result.json are written. See the messages above (an empty loader, a callback that stopped the run).")


def check_final_point(curve: Path, rows: list[dict], step: int) -> None:
    """Raise :class:`RunIncomplete` unless the curve's last point is the evaluation at the last step ``step``."""
    last = rows[-1]["step"] if rows else None
    if last != step:
        raise RunIncomplete(
            f"{curve} has no evaluation at the last step, {step} (its last point: "
            f"{'none' if last is None else f'step {last}'}): the result would not be the trained policy's. Rerun "
            f"the same command: it resumes and evaluates the missing point.")


class Interrupted(SystemExit):
    """Training stopped by SIGTERM: exits 143 so schedulers and CI record a failure, not a success."""

    def __init__(self, step: int):
        super().__init__(EXIT_INTERRUPTED)
        self.step = step


def identity(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened resolved config less the keys in NOT_IDENTITY."""
    return {k: v for k, v in flatten(cfg).items()
            if not any(k == n or k.startswith(n + ".") for n in NOT_IDENTITY)}


def diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` of each key that differs. A key the old record lacks is no difference when its new
    value is the key's schema default: the key was added after that run, and its default keeps what the run did."""
    changes = []
    for k in sorted(set(old) | set(new)):
        if k in old and k in new:
            if old[k] != new[k]:
                changes.append(f"{k}: {old[k]!r} -> {new[k]!r}")
        elif k in new:
            found, default = default_of(k)
            if not (found and new[k] == default):
                note = f" (added after that run; its default is {default!r})" if found else ""
                changes.append(f"{k}: <absent>{note} -> {new[k]!r}")
        else:
            changes.append(f"{k}: {old[k]!r} -> <absent>")
    return changes


def check_identity(out: Path, cfg: Mapping[str, Any], *, resuming: bool, replace: bool = False) -> str:
    """Compare the config with the one the folder's run was started with; returns the config hash.

    A mismatch is an error when something would be reused or left beside this run's files (a checkpoint
    to resume, a result), unless ``replace`` (retrain in place) is asked for; the record is then this run's.
    """
    ident = identity(cfg)
    digest = config_hash(ident)
    record = out / RUN_CONFIG
    if record.exists() and not replace:
        old = read_json(record, "rerun with task.train.resume=false to retrain in place (its checkpoint and results "
                                "are replaced), or move it away to resume without checking the config")
        changes = [] if old["hash"] == digest else diff(old["config"], ident)
        if changes and (resuming or (out / RESULT).exists()):
            shown = "\n  ".join(changes[:25]) + (f"\n  ... {len(changes) - 25} more" if len(changes) > 25 else "")
            raise ConfigMismatch(
                f"{out} holds a run started with another config ({len(changes)} keys differ, old -> new):\n  "
                f"{shown}\nWays forward: rerun with the original settings to resume it; or give this run its own "
                f"folder (hydra.run.dir=<new dir>, or experiment=<new name>); or retrain in place from scratch "
                f"with task.train.resume=false (its checkpoint and results are replaced).")
    write_json(record, {"hash": digest, "config": ident}, sort_keys=True, default=str)
    adopt_hydra_record(out)
    return digest


def adopt_hydra_record(out: Path) -> None:
    """Move Hydra's record of this launch (``.hydra/pending/*.yaml``, written before any check of ours) up to
    ``.hydra/``: called once the folder is this run's (its lock held, its config accepted), so a refused rerun
    (another config, a busy folder) never relabels the run that is there."""
    pending = out / HYDRA_PENDING
    if not pending.is_dir():
        return
    for f in sorted(pending.glob("*.yaml")):
        with suppress(FileNotFoundError):  # moved meanwhile by another process of this run
            os.replace(f, out / HYDRA_RECORD / f.name)
    with suppress(OSError):
        pending.rmdir()


def check_checkpoint(path: Path) -> None:
    """A checkpoint is a zip archive whose members carry CRC-32s: every byte is read and checked (a truncated
    file has no central directory; a corrupt one fails a CRC), about the cost of loading it once more."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
        problem = None if bad is None else f"its member {bad} fails its CRC check"
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        problem = str(err)
    if problem:
        raise CheckpointUnreadable(
            f"{path} cannot be read ({problem}): it is truncated or corrupt. Move it away to restart this run "
            f"from step 0 (mv {path} {path}.bad), or restore it from a copy, then rerun the same command.")


def clean_unfinished_writes(out: Path) -> list[Path]:
    """Remove the temporary files and folders left in the run folder and ``checkpoints/`` by writes that were
    killed (isdpo.artifacts.atomic_path's ``.<name>.tmp-*``/``.old-*``, older ``*.tmp``); only called under the lock."""
    removed = []
    for folder in (out, (out / CHECKPOINT).parent):
        for p in [*folder.glob(".*.tmp-*"), *folder.glob(".*.old-*"), *folder.glob("*.tmp")]:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        print(f"[isdpo] removed {len(removed)} unfinished write(s) of an earlier, killed run: "
              + ", ".join(p.name for p in removed))
    return removed


@contextmanager
def run_folder_lock(out: Path):
    """Held for the whole run by global rank zero; a second process on the same folder stops at once.

    flock is released by the kernel when the holder dies (kill -9 included), so a lock is never stale.
    """
    if rank_world()[0] != 0:  # the other ranks of this run's own job
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    path = out / RUN_LOCK
    while True:
        fh = open(path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise RunFolderBusy(
                f"another process is running in {out} ({holder}). Wait for it to finish (rerunning the same command "
                f"afterwards resumes or reuses its result), stop it, or give this run its own folder "
                f"(hydra.run.dir=<new dir>).") from None
        # The holder before us removes the file as it ends: a lock on a removed file locks nothing, so retry.
        with suppress(FileNotFoundError):
            if os.fstat(fh.fileno()).st_ino == os.stat(path).st_ino:
                break
        fh.close()
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        fh.flush()
        clean_unfinished_writes(out)
        yield
    finally:
        path.unlink(missing_ok=True)  # before unlocking: a folder without a lock file has no live run
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def fit(trainer, module, loader, val_loader=None, *, ckpt_path: str | None = None) -> None:
    """``trainer.fit`` where a SIGTERM ends the process with :class:`Interrupted` (exit 143), not exit 0.

    A submitit requeue exits from its own signal handler (``sys.exit(-1)``), which passes through unchanged.
    """
    try:
        trainer.fit(module, loader, val_loader, ckpt_path=ckpt_path)
    except SIGTERMException:
        step = trainer.global_step
        print(f"[isdpo] interrupted at step {step}; rerun the same command to resume", flush=True)
        raise Interrupted(step) from None
    except Exception as err:
        # A failed write (a checkpoint on a full or read-only disk) is often followed by more failed writes as the
        # run stops (the loggers flush their files): the last line of the traceback must name the first one.
        first = first_write_error(err)
        if first is None or first is err:
            raise
        again = WriteFailed(str(first))
        again.errno = first.errno
        raise again from err
