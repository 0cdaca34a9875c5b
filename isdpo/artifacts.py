"""Every artefact isdpo writes, and where: the one content-addressed, multi-rank-safe store, the
locations of its entries, and the file names of a run folder.

Entries live at ``<cache_dir>/<kind>/<hash>/`` where the hash is of the config that produced them
(and the bytes of every local data file read: :func:`data_key`), so the jobs of a sweep reuse one
reference instead of retraining it. One mechanism, :func:`build_once`, builds every entry
(:func:`cached_dir` for keyed entries; :func:`publish` for entries at a fixed path with a
``meta.json``, such as the golden RM and the relabelled set):

- parallel jobs build once: the builder holds a file lock, the others wait on it;
- the ranks of one data-parallel job never wait on that lock for each other (rank 0 may hold it
  while waiting for the others inside ``fit``). A COLLECTIVE build (a training run: every rank
  must enter ``fit``) runs on every rank and rank 0 publishes; a SINGLE-PROCESS build (sampling,
  scoring) runs on rank 0 while the other ranks poll for the published entry
  (``ISDPO_CACHE_WAIT_S``, default 2 h);
- an entry is built in a ``.tmp-*`` sibling and renamed into place (atomic), with a
  ``manifest.json`` of its files' sizes and sha256: a truncated, deleted or overwritten file is found
  when the entry is reused and the entry is rebuilt (a file is hashed again only when its size, times
  or inode changed since it was hashed: any write to it changes them; see :func:`entry_problem`);
- a ``.tmp-*`` left by a killed build is removed by the next build of the same entry: on the same
  host once its builder's process (pid and start time) is gone, whatever its heartbeat (a stopped or
  swapped-out builder is alive); on another host once its heartbeat stopped ``ISDPO_CACHE_ORPHAN_S``
  ago (default 10 min). A builder whose folder was removed all the same fails instead of publishing.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from isdpo.data.records import data_spec
from isdpo.data.rows import as_plain
from isdpo.data.tokenization import tokenizer_source
from isdpo.distributed import rank_world
from isdpo.schema import RELABEL_FORMATS

# Part of every key: bump it when the code that builds an entry changes what it builds.
CACHE_VERSION = 2
MANIFEST = "manifest.json"
META = "meta.json"  # an entry published by :func:`publish`: build id, fast_dev_run, what it holds
BUILDER = ".builder.json"  # inside a .tmp-* directory: who builds it (host, pid), touched as a heartbeat
WAIT_ENV, ORPHAN_ENV = "ISDPO_CACHE_WAIT_S", "ISDPO_CACHE_ORPHAN_S"
HEARTBEAT_S = 30.0
POLL_S = 1.0


def config_hash(obj: Any, length: int = 12) -> str:
    """Stable hash of a JSON-able object (keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


@contextmanager
def file_lock(path: Path, *, blocking: bool = True):
    """Exclusive flock on ``path``; yields whether it is held (always True when ``blocking``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# Writing and reading files: complete or absent, and errors that name the file
# --------------------------------------------------------------------------------------------

# What a failed write's errno means, and what to do about it.
WRITE_CAUSES = {
    errno.ENOSPC: "the disk is full: free some space",
    errno.EDQUOT: "the disk quota is exceeded: free some space or raise the quota",
    errno.EFBIG: "a file size limit was reached (ulimit -f): raise it",
    errno.EROFS: "the file system is read-only: make it writable",
    errno.EACCES: "permission denied: make the folder writable",
    errno.EPERM: "operation not permitted: make the folder writable",
}
_OS_ERROR = re.compile(r"os error (\d+)")  # how Rust libraries (safetensors, tokenizers) report an errno


class WriteFailed(OSError):
    """A file or folder could not be written; the message names it and the cause (disk full, read-only, ...)."""


class CorruptFile(ValueError):
    """A file isdpo wrote cannot be read back (truncated or corrupt); the message names it and what to do."""


def write_error(path: str | Path, err: BaseException) -> WriteFailed | None:
    """The :class:`WriteFailed` for ``err`` raised while writing ``path``; None when ``err`` is no I/O error."""
    if isinstance(err, WriteFailed):
        return err
    if isinstance(err, OSError):
        code = err.errno
    else:
        found = _OS_ERROR.search(str(err))
        code = int(found.group(1)) if found else None
    if code not in WRITE_CAUSES:  # not a failed write (a missing input, a bug): the error as it is
        return None
    cause = WRITE_CAUSES[code]
    failed = WriteFailed(f"cannot write {path}: {cause}; then rerun the same command ({type(err).__name__}: {err})")
    failed.errno = code
    return failed


def first_write_error(err: BaseException | None) -> WriteFailed | None:
    """The first :class:`WriteFailed` in ``err``'s chain: the cause when later errors (a logger flushing its files
    to the same full disk while the run stops) were raised on top of it."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, WriteFailed):
            return err
        err = err.__cause__ or err.__context__
    return None


def temporary_sibling(path: Path, tag: str = "tmp") -> Path:
    """A fresh hidden name beside ``path`` (``.<name>.<tag>-<random>``)."""
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}")


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary sibling of ``path`` to write (a file, or a folder the block creates); when the block ends
    without error it takes ``path``'s place (a folder already there is replaced), else it is removed. A reader, or a
    crash, sees the old content or the new one, never a half; an I/O error raises :class:`WriteFailed` naming
    ``path`` and the cause. The one way isdpo writes a result, a record, a checkpoint or a model folder."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            old = temporary_sibling(path, "old")
            os.replace(path, old)  # a crash from here to the next line leaves no `path`: absent, never half
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as err:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                tmp.unlink()
        failed = write_error(path, err)
        if failed is None or failed is err:
            raise
        raise failed from err


def write_text(path: str | Path, text: str) -> None:
    """``text`` at ``path``, atomically (:func:`atomic_path`), flushed to the disk before it is renamed."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def write_json(path: str | Path, obj: Any, **dumps: Any) -> None:
    """``obj`` as JSON at ``path``, atomically (``dumps``: json.dumps options; indent 2 by default)."""
    write_text(path, json.dumps(obj, **{"indent": 2, **dumps}))


def read_json(path: str | Path, fix: str = "move it away and rerun to rebuild it") -> Any:
    """The JSON in ``path``; a file that does not parse raises :class:`CorruptFile` naming it and saying ``fix``."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CorruptFile(f"{path} is not valid JSON ({err}): it is truncated or corrupt (a write cut short, a full "
                          f"disk, a copy that failed). To go on, {fix} (mv {path} {path}.bad).") from None


def read_jsonl(path: str | Path, *, torn_tail: bool = False) -> list[dict]:
    """The rows of a JSON-lines file ([] when it does not exist). A line that does not parse raises
    :class:`CorruptFile` naming the file and the line; with ``torn_tail`` a last line without its newline (a
    write cut short by a crash) is dropped instead, with a notice."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")  # the last item is "" when the file ends with its newline
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"a {type(row).__name__}, not an object")
            rows.append(row)
        except ValueError as err:
            if torn_tail and i == len(lines):
                print(f"[isdpo] {path}:{i}: dropped a half-written last line (a write cut short by a crash): "
                      f"{line[:60]!r}")
                break
            raise CorruptFile(f"{path}:{i}: not valid JSON ({err}): the file is corrupt. Move it away "
                              f"(mv {path} {path}.bad), or delete the bad line, then rerun.") from None
    return rows


# --------------------------------------------------------------------------------------------
# Keys: data content
# --------------------------------------------------------------------------------------------

_DIGESTS: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, memoised per (path, size, mtime) in this process."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    memo = (str(p), st.st_size, st.st_mtime_ns)
    if memo not in _DIGESTS:
        _DIGESTS[memo] = sha256_file(p)
    return _DIGESTS[memo]


def data_key(spec: Mapping[str, Any], splits: Sequence[str]) -> dict:
    """What a data source's ``splits`` hold, for cache keys: the sha256 of each local file read
    (``data_files``: one path for every split, or a {split: path} mapping), or for a hub data set its
    name and ``revision`` ("unpinned" when none is configured: a new hub revision is then not seen)."""
    files = spec.get("data_files")
    if files is None:
        return {"dataset": spec.get("dataset"), "revision": spec.get("revision") or "unpinned"}
    out = {}
    for split in splits:
        f = files if isinstance(files, (str, os.PathLike)) else files.get(split)
        if f is None:
            raise ValueError(f"data_files has no file for split {split!r} (it has: {', '.join(files) or 'none'})")
        p = Path(f).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"data file {str(p)!r} (split {split!r}) does not exist")
        out[split] = file_digest(p)
    return {"sha256": out}


# --------------------------------------------------------------------------------------------
# Entries: completeness, orphans
# --------------------------------------------------------------------------------------------


def _stamp(st: os.stat_result) -> list[int]:
    """What any write to a file changes: its size, mtime, ctime (which no one can set back) and inode."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def write_manifest(directory: Path) -> None:
    """``manifest.json``: the size, the sha256 and the stat stamp (:func:`_stamp`) of every file of the entry
    (checked by :func:`entry_problem`)."""
    files = {str(p.relative_to(directory)): p for p in sorted(directory.rglob("*"))
             if p.is_file() and p.name not in (MANIFEST, BUILDER)}
    write_json(directory / MANIFEST, {"files": {n: p.stat().st_size for n, p in files.items()},
                                      "sha256": {n: sha256_file(p) for n, p in files.items()},
                                      "stamp": {n: _stamp(p.stat()) for n, p in files.items()}},
               indent=1, sort_keys=True)


def entry_problem(directory: Path) -> str | None:
    """None when the entry is whole; else what is wrong (a file missing, of another size, or whose bytes are not
    those written). A file whose stat stamp is the one recorded has not been written since it was hashed (any write
    changes its ctime) and is not read; another is hashed again (sha256, ~0.7-2 GB/s) and, when it is whole, its
    new stamp recorded (a copied cache is hashed once). An entry without a manifest (written before manifests
    existed, or elsewhere) is taken as whole; one with sizes only (older manifests) is checked by its sizes."""
    directory = Path(directory)
    f = directory / MANIFEST
    if not f.exists():
        return None
    try:
        manifest = json.loads(f.read_text())
        sizes, hashes, stamps = manifest["files"], manifest.get("sha256", {}), manifest.get("stamp", {})
    except (ValueError, KeyError, AttributeError) as err:
        return f"{MANIFEST} unreadable ({err})"
    restamped = {}
    for name, size in sizes.items():
        p = directory / name
        if not p.is_file():
            return f"{name} is missing"
        st = p.stat()
        if st.st_size != size:
            return f"{name} has {st.st_size} bytes, {size} when written"
        if name in hashes and _stamp(st) != stamps.get(name):
            if sha256_file(p) != hashes[name]:
                return f"{name} is corrupt: its bytes changed since it was written (sha256 differs)"
            restamped[name] = _stamp(st)
    if restamped:
        with contextlib.suppress(OSError):  # a read-only cache is hashed again next time
            write_json(f, {**manifest, "stamp": {**stamps, **restamped}}, indent=1, sort_keys=True)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (boot id and clock ticks since boot: a reused pid has another); None when it
    does not exist or this system has no /proc."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"  # field 22, counted after the command name


def _orphan(tmp: Path, max_age: float) -> bool:
    """A temporary build directory whose builder is gone. On this host, by its process: gone, or its pid reused
    (another start time); a live builder is never an orphan, however long it has been stopped (SIGSTOP, swapped out,
    a frozen file system). On another host, by its heartbeat (the builder file's mtime, touched by a thread every
    HEARTBEAT_S whatever the build does; the directory's when there is none): older than ``max_age`` seconds."""
    f = tmp / BUILDER
    try:
        who = json.loads(f.read_text())
        if who.get("host") == socket.gethostname():
            pid, start = int(who["pid"]), who.get("start")
            if not _alive(pid):
                return True
            now = process_start(pid)
            if start is not None and now is not None:
                return now != start
        return time.time() - f.stat().st_mtime > max_age
    except (OSError, ValueError, KeyError, TypeError):
        try:
            return time.time() - tmp.stat().st_mtime > max_age
        except OSError:
            return False


def clean_orphans(final: Path) -> list[Path]:
    """Remove the ``.tmp-<name>-*`` siblings of ``final`` left by killed builds; returns them."""
    max_age = float(os.environ.get(ORPHAN_ENV, 600))
    removed = [t for t in final.parent.glob(f".tmp-{final.name}-*") if t.is_dir() and _orphan(t, max_age)]
    for t in removed:
        shutil.rmtree(t, ignore_errors=True)
    if removed:
        print(f"[isdpo] removed {len(removed)} unfinished build(s) of {final} left by killed runs: "
              + ", ".join(t.name for t in removed))
    return removed


@contextmanager
def _builder(tmp: Path):
    """Record this process as ``tmp``'s builder and touch the record every HEARTBEAT_S while building; raise when
    the record is gone at the end (the folder was removed meanwhile: what it holds is not the build's)."""
    f = tmp / BUILDER
    token = uuid.uuid4().hex
    f.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid()),
                             "since": time.time(), "token": token}))
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(f)

    thread = threading.Thread(target=beat, daemon=True, name="isdpo-cache-heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    try:
        mine = json.loads(f.read_text()).get("token") == token
    except (OSError, ValueError):
        mine = False
    if not mine:
        raise RuntimeError(
            f"the temporary build folder {tmp} was removed while this process built in it (another job took it for "
            f"one left by a killed run: on another host a builder is judged by its heartbeat, {ORPHAN_ENV}); what it "
            f"holds now is not this build's, so nothing is published. Rerun the same command.")


def _install(tmp: Path, final: Path, usable: Callable[[Path], bool]) -> None:
    """Rename ``tmp`` to ``final``, first moving away an unusable entry there (a stub, a broken one);
    a usable one published meanwhile by another job wins and ``tmp`` is dropped."""
    if final.exists():
        if usable(final):
            return
        old = final.parent / f".tmp-{final.name}-old-{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(FileNotFoundError):
            os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:
        if not usable(final):  # not a concurrent publish: a real error
            raise


def wait_for(final: Path, usable: Callable[[Path], bool], what: str) -> None:
    """Poll until rank 0 has published a usable ``final`` (timeout ``ISDPO_CACHE_WAIT_S``, default 7200 s)."""
    timeout = float(os.environ.get(WAIT_ENV, 7200))
    rank = rank_world()[0]
    parent = os.getppid()
    print(f"[isdpo] rank {rank}: waiting for rank 0 to publish the {what} at {final} "
          f"(timeout {timeout:.0f} s, {WAIT_ENV})", flush=True)
    deadline = time.monotonic() + timeout
    while not (final.exists() and usable(final)):
        if os.getppid() != parent:  # Lightning's launcher starts the other ranks as children of rank 0
            raise RuntimeError(f"rank {rank}: the process that started this rank exited while this rank waited "
                               f"for the {what} at {final}; see rank 0's log for its error")
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: the {what} did not appear at {final} within {timeout:.0f} s; rank 0 "
                               f"builds it: see rank 0's log, or raise {WAIT_ENV} (seconds) if it is only slow")
        time.sleep(POLL_S)


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def build_once(final: str | Path, build: Callable[[Path], Any], *, collective: bool, what: str,
               usable: Callable[[Path], bool] | None = None,
               finish: Callable[[Path, Any], None] | None = None) -> tuple[Path, bool]:
    """Return ``(final, hit)``, building the entry if there is no usable one.

    ``build(tmp)`` writes into a fresh temporary directory; on rank 0, ``finish(tmp, result)`` then
    adds its records (key.json, meta.json), a manifest is written and ``tmp`` is renamed to ``final``.
    ``collective``: every rank runs ``build`` (it trains with them); otherwise only rank 0 does and the
    other ranks wait for the entry. ``usable(final)`` (default: complete per its manifest) says whether
    an existing entry is reused.
    """
    final = Path(final)
    rank, world = rank_world()

    def ok(path: Path) -> bool:
        return entry_problem(path) is None and (usable is None or usable(path))

    if rank == 0 and final.parent.is_dir():
        clean_orphans(final)  # only builds whose builder is gone: never a live build of a parallel job
    if final.exists():
        if ok(final):
            return final, True
        problem = entry_problem(final)
        if problem:
            print(f"[isdpo] the {what} at {final} is incomplete ({problem}); rebuilding it")
    if world > 1 and rank != 0 and not collective:
        wait_for(final, ok, what)
        return final, True
    final.parent.mkdir(parents=True, exist_ok=True)
    lock_path = final.parent / f".{final.name}.lock"
    if world == 1:
        lock = file_lock(lock_path)  # parallel jobs build once
    elif rank == 0:
        # The other ranks of this job never take the lock. A collective rank 0 must not block on it
        # either (the others would wait for it inside fit): if another job builds, build a copy.
        lock = file_lock(lock_path, blocking=not collective)
    else:
        lock = contextlib.nullcontext(False)
    with lock as held:
        if held and ok(final):
            return final, True
        tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            with _builder(tmp):
                result = build(tmp)
            if rank == 0:
                (tmp / BUILDER).unlink(missing_ok=True)
                if finish is not None:
                    finish(tmp, result)
                write_manifest(tmp)
                _install(tmp, final, ok)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    if rank != 0:
        wait_for(final, ok, what)
    return final, False


def cached_dir(cache_dir: str | Path, kind: str, key: Any, build: Callable[[Path], None], *,
               collective: bool = False) -> tuple[Path, bool]:
    """Return ``(path, hit)`` of the entry for ``key``, calling ``build(tmp_dir)`` on a miss.

    ``build`` writes into a fresh temporary directory which is renamed into
    place only after it returns; ``key.json`` beside the files records what the
    hash is of. ``collective=True`` for a build that trains on every data-parallel rank.
    """
    key = {"cache_version": CACHE_VERSION, "key": key}
    final = Path(cache_dir) / kind / config_hash(key)

    def usable(path: Path) -> bool:  # key.json is written last: without it the entry is not whole
        return (path / "key.json").is_file()

    def finish(tmp: Path, _result: Any) -> None:
        (tmp / "key.json").write_text(json.dumps(key, indent=2, sort_keys=True, default=str))

    return build_once(final, build, collective=collective, what=f"{kind} cache entry", usable=usable, finish=finish)


# --------------------------------------------------------------------------------------------
# A run folder (deterministic from the overrides: conf/config.yaml's hydra block)
# --------------------------------------------------------------------------------------------

METRICS = "metrics.jsonl"          # the over-optimization curve: one evaluation point per line
RESULT = "result.json"             # the run's final and peak points, written when it completes
POLICY = "policy"                  # the trained policy (HF folder, with the tokenizer of text tasks)
MERGED = "merged"                  # policy/merged/: peft=lora's adapters merged into a plain model (peft.merge_on_save)
CHECKPOINT = "checkpoints/last.ckpt"  # the resume point (atomic writes)
RUN_CONFIG = "run_config.json"     # the resolved config the run was started with (resume checks it)
RUN_LOCK = ".isdpo.lock"           # held by the live process of the run (removed when it ends)
HYDRA_RECORD = ".hydra"            # Hydra's record of the launch (config.yaml, overrides.yaml) the run folder's run is
HYDRA_PENDING = ".hydra/pending"   # where Hydra writes it (conf/config.yaml): moved up once the run's checks pass
EVALUATION = "evaluation.json"     # stage=evaluate's numbers
SAMPLES = "samples.jsonl"          # stage=evaluate's samples (token ids, golden reward)
COMPLETIONS = "completions"        # text tasks: each evaluation's completions as text
JUDGE = "judge"                    # stage=judge's records and numbers


# --------------------------------------------------------------------------------------------
# Where each shared artefact lives
# --------------------------------------------------------------------------------------------


def sft_dir_key(task_key: Mapping[str, Any], model_cfg: Mapping[str, Any], sft_cfg: Mapping[str, Any],
                fast_dev_run: bool) -> dict:
    """What the SFT reference depends on: the task's data (TaskRuntime.sft_key), the model, the sft block."""
    return {"task": task_key, "model": as_plain(model_cfg), "sft": as_plain(sft_cfg), "fast_dev_run": fast_dev_run}


def sft_data_key(sft_cfg: Mapping[str, Any]) -> dict:
    """What the pooled SFT set's sources hold (the bytes of local files), for cache keys."""
    return {name: data_key(spec, [spec["split"]]) for name, spec in sft_cfg["sources"].items()}


def read_meta(path: Path) -> dict | None:
    """The entry's meta.json; for a directory made elsewhere (a saved HF model, or a pairs file, without
    meta.json) a stand-in naming it as external; None when there is nothing."""
    path = Path(path)
    f = path / META
    if f.exists():
        return json.loads(f.read_text())
    if any((path / p).exists() for p in ("config.json", "model/config.json", "pairs.jsonl", "pairs.parquet")):
        return {"build_id": f"external:{path.resolve()}", "external": True, "fast_dev_run": False}
    return None


def model_subdir(path: Path) -> Path:
    """``<dir>/model`` as written by stage=reward, or ``<dir>`` itself for an RM saved elsewhere."""
    path = Path(path)
    return path / "model" if (path / "model" / "config.json").exists() else path


def check_complete(path: Path, what: str, stage: str) -> dict:
    """The entry's meta; raises naming the path and the stage to run when it is absent or incomplete."""
    meta = read_meta(path)
    if meta is None:
        raise FileNotFoundError(f"no {what} at {path}: run {stage} first (or set its `path` in the task config)")
    problem = entry_problem(path)
    if problem:
        raise FileNotFoundError(f"the {what} at {path} is incomplete ({problem}): rerun {stage} to rebuild it")
    return meta


def publish(path: Path, build: Callable[[Path], dict], *, fast_dev_run: bool, what: str,
            collective: bool = True) -> tuple[Path, bool]:
    """Build into a temporary sibling of ``path`` and rename it into place; ``(path, reused)``.

    A complete entry is reused, except a fast_dev_run stub when this run is a real one (then it is
    rebuilt). ``build(tmp)`` returns the metadata written to ``meta.json`` (plus a build id) by rank 0.
    ``collective``: the build trains on every data-parallel rank (the golden RM); otherwise rank 0
    builds and the other ranks wait (:func:`build_once`).
    """
    path = Path(path)
    started: list[float] = []

    def timed(tmp: Path) -> dict:
        started.append(time.time())
        return build(tmp)

    def usable(p: Path) -> bool:
        meta = read_meta(p)
        return meta is not None and (fast_dev_run or not meta.get("fast_dev_run"))

    def finish(tmp: Path, meta: dict | None) -> None:
        meta = dict(meta or {})
        meta.update({"build_id": uuid.uuid4().hex, "fast_dev_run": bool(fast_dev_run),
                     "seconds": round(time.time() - started[0], 1), "what": what})
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str))

    return build_once(path, timed, collective=collective, what=what, usable=usable, finish=finish)


def reward_key(task_cfg: Mapping[str, Any]) -> dict:
    """What the golden RM depends on (no task name: TL;DR and HH share one RM when their blocks agree),
    with the bytes of the local data files it reads (its sources', and the SFT set's when it starts from SFT)."""
    r = as_plain(task_cfg["reward"])
    key = {k: v for k, v in r.items() if k not in ("path", "score_batch_size", "score_dtype", "val_check_interval")
           and not (k == "lora" and not v["enabled"])}  # an RM trained in full keeps the key it had before LoRA existed
    key["lengths"] = [task_cfg["max_length"], task_cfg["max_prompt_length"], task_cfg["truncate_responses"]]
    key["content"] = {name: data_key(spec, [spec["train_split"], spec["val_split"]])
                      for name, spec in r["sources"].items()}
    if r.get("init_from_sft"):
        key["sft"] = as_plain(task_cfg["sft"])
        key["sft_content"] = sft_data_key(task_cfg["sft"])
    return key


def reward_dir(task_cfg: Mapping[str, Any], cache_dir: str | Path) -> Path:
    """``task.reward.path`` or ``<cache_dir>/reward/<hash of reward_key>``."""
    explicit = task_cfg["reward"].get("path")
    return Path(explicit).expanduser() if explicit else Path(cache_dir) / "reward" / config_hash(reward_key(task_cfg))


def relabel_key(task_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any], rm_meta: Mapping[str, Any],
                reference_dir: Path | None) -> dict:
    rl = as_plain(task_cfg["relabel"])
    split = task_cfg["splits"]["train"]
    key = {"data": data_spec(task_cfg), "split": split, "rm": rm_meta.get("build_id"),
           "content": data_key(task_cfg, [split]),  # the bytes of a local file, not only its path
           "relabel": {k: v for k, v in rl.items() if k not in ("path", "batch_size", "format")},
           "lengths": [task_cfg["max_length"], task_cfg["max_prompt_length"], task_cfg["truncate_responses"]]}
    if rl["source"] == "generate":
        key["policy"] = {"reference": str(reference_dir), "tokenizer": tokenizer_source(model_cfg)}
    return key


def relabel_dir(task_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any], cache_dir: str | Path,
                reference_dir: Path | None) -> Path:
    """``task.relabel.path`` or ``<cache_dir>/relabel/<hash>`` (depends on the golden RM's build id)."""
    explicit = task_cfg["relabel"].get("path")
    if explicit:
        return Path(explicit).expanduser()
    rm_meta = check_complete(reward_dir(task_cfg, cache_dir), "golden reward model", "stage=reward")
    return Path(cache_dir) / "relabel" / config_hash(relabel_key(task_cfg, model_cfg, rm_meta, reference_dir))


def pairs_file(directory: Path) -> Path:
    for fmt in RELABEL_FORMATS:
        f = Path(directory) / f"pairs.{fmt}"
        if f.exists():
            return f
    raise FileNotFoundError(f"no pairs.jsonl / pairs.parquet in {directory}")
