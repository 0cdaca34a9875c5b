"""A sweep's runs: discovery, reading each run folder (its config, result, metrics), classifying it (completed /
incomplete / failed / duplicate), what its loss is (importance-sampled, online, base) and the variants (the
settings that differ between runs).

A run's config is what the run itself recorded, ``run_config.json`` (written by ``isdpo.run_guard`` when the run
started; a rerun that the guard refuses leaves it alone), completed by ``.hydra/config.yaml`` for the keys the
record leaves out (where and how the run was written); a run without the record is read from ``.hydra`` alone.
Hydra rewrites ``.hydra`` before the project can refuse a rerun, so ``.hydra`` alone could relabel an old run.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml  # PyYAML, a dependency of omegaconf

from isdpo.schema import default_of, flatten

# A run folder's files (``isdpo.artifacts`` has the same names; the report does not import the training stack)
RESULT, METRICS, HYDRA_CONFIG = "result.json", "metrics.jsonl", ".hydra/config.yaml"
#: Where Hydra writes its record of a launch until the run's checks pass (``isdpo.run_guard.adopt_hydra_record``
#: then moves it up to ``.hydra``): a job that stopped before that has only this one.
HYDRA_PENDING = ".hydra/pending"
RUN_CONFIG = "run_config.json"

#: Top-level config keys that say where and under which name a run wrote, not what it computed: they never
#: tell two runs apart.
BOOKKEEPING = ("paths", "run_name", "experiment", "logger", "hydra", "stage")
#: Config keys of the fixed table columns (task is the section); "seed" is what the table averages over.
BASE_KEYS, SEED_KEY = ("task.name", "loss.name", "beta"), "seed"
#: Config key that names the task instance (the synthetic task's chain): statistics are per instance and pooled
#: over instances; a sweep without the key has one instance.
INSTANCE_KEY = "task.chain_seed"


@dataclass
class Run:
    """One job folder: what it was (task, loss, beta, seed), whether it completed, and what it wrote."""

    path: Path
    name: str  # folder relative to the sweep directory
    task: str | None = None
    loss: str | None = None
    beta: float | None = None
    seed: int | None = None
    status: str = "completed"  # completed | incomplete | failed | duplicate
    reason: str = ""
    result: dict | None = None
    metrics: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # The run's config flattened ("a.b.c" -> value): run_config.json completed by .hydra/config.yaml
    # (``merge_config``), or .hydra alone; ``load_sweep`` adds the schema default of a key other runs have and this
    # one lacks (written by code older than the key)
    config: dict[str, Any] | None = None
    # Set by ``assign_variants`` (from the whole sweep): the swept settings shown for this run (key -> value),
    # the values of every varying setting but the seed (what the tables group by), and the legend label.
    variant: dict[str, Any] = field(default_factory=dict)
    group: tuple = ()
    series: str | None = None
    # Also set by ``assign_variants``: every varying setting (key -> hashable value), the task instance ("" when
    # the instance key is in no config; else e.g. "chain_seed=1") and its sort key, and the configuration pooled
    # over instances: ``config_group`` (``group`` without the instance key) and its legend label ``method``.
    settings: dict[str, Any] = field(default_factory=dict)
    instance: str = ""
    instance_order: tuple = ()
    config_group: tuple = ()
    method: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    @property
    def key(self) -> tuple:
        """What the run computed: its config without bookkeeping (seed included); two equal keys are duplicates."""
        if self.config is None:
            return ("result.json", self.task, self.loss, self.beta, self.seed)
        return tuple(sorted((k, _hashable(v)) for k, v in self.config.items() if not is_bookkeeping(k)))

    @property
    def label(self) -> str:
        """Name of the run's configuration in legends: the loss, plus the swept settings when there are some."""
        return self.series or str(self.loss)

    @property
    def variant_order(self) -> tuple:
        return tuple(value_order(v) for v in self.variant.values())


class _Marker:
    """A variant value that is not a config value: the key is absent, or the run has no config at all."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text

    __repr__ = __str__


NOT_SET = _Marker("–")  # the key is not in this run's config
UNKNOWN = _Marker("?")  # the run has no readable config
UNUSED = _Marker("(IS off)")  # an importance-sampling setting of a run whose importance sampling is off


def is_bookkeeping(key: str) -> bool:
    return key.split(".")[0] in BOOKKEEPING


def _hashable(value):
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def format_value(value) -> str:
    """A config value as a table cell / legend text, spelled as in the config (null, true, 0.5)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def value_order(value) -> tuple:
    """Sort key of config values of one setting: numbers ascending, then text, then null, then markers."""
    if isinstance(value, _Marker):
        return 3, 0.0, str(value)
    if value is None:
        return 2, 0.0, ""
    if isinstance(value, (int, float)):
        return 0, float(value), ""
    return 1, 0.0, format_value(value)


_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][\w.\-]*)\}")


def resolve(flat: dict[str, Any], key: str, _depth: int = 0):
    """``flat[key]`` with its ``${other.key}`` interpolations replaced by the config's values where they can be.

    Resolver calls (``${oc.env:...}``, ``${hydra:...}``) and unknown keys stay as written.
    """
    value = flat.get(key)
    if not isinstance(value, str) or "${" not in value or _depth > 10:
        return value
    whole = _INTERPOLATION.fullmatch(value)
    if whole and whole.group(1) in flat:  # "${seed}" takes the referenced value with its type
        return resolve(flat, whole.group(1), _depth + 1)
    return _INTERPOLATION.sub(
        lambda m: format_value(resolve(flat, m.group(1), _depth + 1)) if m.group(1) in flat else m.group(0), value)


def discover(root: Path, exclude: Path | None = None) -> list[Path]:
    """Folders under ``root`` (``root`` included) that hold result.json, metrics.jsonl or Hydra's config.yaml
    (in ``.hydra`` or ``.hydra/pending``: a job that stopped before its checks passed is a failed run too).

    A run folder is not searched further: runs do not nest, and its checkpoints
    and policy folders are large.
    """
    root, found = Path(root), []
    exclude = exclude.resolve() if exclude else None
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if exclude is not None and here.resolve() == exclude:
            dirnames[:] = []
            continue
        if RESULT in filenames or METRICS in filenames or (here / HYDRA_CONFIG).is_file() or \
                (here / HYDRA_PENDING / "config.yaml").is_file():
            found.append(here)
            dirnames[:] = []
        else:
            dirnames[:] = sorted(d for d in dirnames if d != ".hydra")
    return sorted(found)


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """Rows of a metrics.jsonl and the number of lines that did not parse.

    A run still being written can end in a half-written line; such lines are
    skipped (and counted) instead of failing the whole report. A row is an evaluation
    point with a golden win rate and KL, or with held-out pair metrics (``loss``), or both.
    """
    if not path.is_file():
        return [], 0
    rows, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict) and "step" in row and (("win_rate" in row and "kl" in row) or "loss" in row):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def to_float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def to_int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def only_pending(folder: Path) -> bool:
    """Hydra's record of the run is only in ``.hydra/pending``: the job stopped (or is still starting) before its
    config checks passed. Beside anything a run writes once they pass (``.hydra/config.yaml``, run_config.json,
    metrics, result) the pending record is a later, refused launch's, never the run's."""
    return (folder / HYDRA_PENDING / "config.yaml").is_file() and \
        not any((folder / name).is_file() for name in (HYDRA_CONFIG, RUN_CONFIG, METRICS, RESULT))


def hydra_file(folder: Path, name: str) -> Path:
    """``name`` (config.yaml, overrides.yaml) of the run's Hydra record: ``.hydra``, or ``.hydra/pending`` when
    that is all the job left."""
    return folder / (HYDRA_PENDING if only_pending(folder) else ".hydra") / name


def read_config(folder: Path) -> tuple[dict[str, Any] | None, str]:
    """The flattened Hydra config.yaml of a run folder as written (interpolations unresolved), or (None, why)."""
    path = hydra_file(folder, "config.yaml")
    shown = path.relative_to(folder)
    if not path.is_file():
        return None, f"no {shown}"
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        return None, f"{shown} unreadable ({err.__class__.__name__})"
    if not isinstance(cfg, dict):
        return None, f"{shown} is not a mapping"
    return flatten(cfg), ""


def read_run_config(folder: Path) -> dict[str, Any] | None:
    """The flattened resolved config of ``run_config.json`` (``{"hash", "config"}``), or None when absent or
    unreadable."""
    try:
        record = json.loads((folder / RUN_CONFIG).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    config = record.get("config") if isinstance(record, dict) else None
    return flatten(config) if isinstance(config, dict) else None


def _same(a, b) -> bool:
    return a == b or format_value(a) == format_value(b)


def merge_config(recorded: dict[str, Any], written: dict[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """A run's config from its record (``run_config.json``, resolved) and ``.hydra/config.yaml`` (as written):
    the recorded value of every key the record has, the written one of the keys it leaves out (where and how the
    run was written: ``isdpo.run_guard.NOT_IDENTITY``), and the written interpolation where it resolves to the
    recorded value (``task.data_seed: ${seed}`` stays one setting across seeds).

    Returns (config in .hydra's key order, the keys where .hydra says something else than the record).
    """
    written = written or {}
    merged: dict[str, Any] = {}
    differs: list[str] = []
    for key in list(written) + [k for k in recorded if k not in written]:
        if key not in recorded:
            merged[key] = written[key]
            continue
        value = merged[key] = recorded[key]
        if key not in written:
            continue
        text = written[key]
        if isinstance(text, str) and "${" in text:
            resolved = resolve({**written, **recorded, key: text}, key)
            if _same(resolved, value):
                merged[key] = text
            elif not (isinstance(resolved, str) and "${" in resolved):  # a resolver call: cannot tell
                differs.append(key)
        elif not _same(text, value):
            differs.append(key)
    return merged, differs


def _identity_from_hydra(folder: Path, config: dict[str, Any] | None) -> dict:
    """task, loss, beta, seed from the flattened config, filled in from .hydra/overrides.yaml."""
    ident: dict[str, Any] = {}
    if config is not None:
        # Unresolvable interpolations stay strings here; to_float / to_int turn them into None.
        ident = {name: resolve(config, key) for name, key in
                 (("task", "task.name"), ("loss", "loss.name"), ("beta", "beta"), ("seed", SEED_KEY))}
    for key, value in read_overrides(folder):
        current = ident.get(key)
        if key in ("task", "loss", "beta", "seed") and (current in (None, "") or "${" in str(current)):
            ident[key] = value
    return ident


def read_overrides(folder: Path) -> list[tuple[str, str]]:
    """(key, value) of each line of the Hydra record's overrides.yaml (``+``/``~`` prefixes dropped); [] when
    unreadable."""
    try:
        items = yaml.safe_load(hydra_file(folder, "overrides.yaml").read_text()) or []
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(items, list):
        return []
    return [(key, value) for key, _, value in (str(item).lstrip("+~").partition("=") for item in items)]


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def load_run(folder: Path, root: Path) -> Run:
    """Read one job folder into a ``Run`` and classify it (completed / incomplete / failed)."""
    folder = Path(folder)
    name = str(folder.relative_to(root)) if folder != Path(root) else folder.name
    run = Run(path=folder, name=name)
    run.metrics, bad = read_metrics(folder / METRICS)
    if bad:
        run.notes.append(f"{bad} malformed line(s) in metrics.jsonl skipped")

    result, result_error = None, None
    if (folder / RESULT).is_file():
        try:
            result = json.loads((folder / RESULT).read_text())
            if not isinstance(result, dict):
                result, result_error = None, "result.json is not a JSON object"
        except (OSError, json.JSONDecodeError) as err:
            result_error = f"result.json unreadable ({err.__class__.__name__}: {err})"
    run.result = result

    run.config, why = read_config(folder)
    recorded = read_run_config(folder)
    if recorded is not None:
        run.config, differs = merge_config(recorded, run.config)
        if differs:
            run.notes.append(f"{HYDRA_CONFIG} differs from {RUN_CONFIG} in {len(differs)} key(s) "
                             f"({', '.join(differs[:4])}{', ...' if len(differs) > 4 else ''}; a later rerun "
                             f"refused in this folder rewrites .hydra): read from {RUN_CONFIG}, what the run used")
    elif run.config is None and result is not None:
        run.notes.append(f"{why}: identified from result.json (task, loss, beta, seed) only; "
                         "the swept settings it cannot show are ? in the tables")
    if (folder / HYDRA_PENDING).is_dir() and not only_pending(folder):
        run.notes.append(f"a later launch in this folder has not passed its config checks (refused, or still "
                         f"starting): its record in {HYDRA_PENDING} is not read")
    ident = _identity_from_hydra(folder, run.config)
    src = result or {}
    run.task = src.get("task") or ident.get("task")
    run.loss = src.get("loss") or ident.get("loss")
    run.beta = to_float(src.get("beta", ident.get("beta")))
    run.seed = to_int(src.get("seed", ident.get("seed")))

    progress = ""
    if run.metrics:
        age = time.time() - (folder / METRICS).stat().st_mtime
        progress = (f"; {len(run.metrics)} eval points, last step {run.metrics[-1]['step']}, "
                    f"metrics.jsonl last written {_age(age)} ago")

    if result_error:
        run.status, run.reason = "failed", result_error + progress
    elif result is None:
        if run.metrics:
            run.status, run.reason = "incomplete", "no result.json (still running or crashed)" + progress
        elif (folder / METRICS).is_file():
            run.status, run.reason = "failed", "no result.json and empty metrics.jsonl"
        else:
            started, record = "", hydra_file(folder, "config.yaml")
            if record.is_file():
                age = _age(time.time() - record.stat().st_mtime)
                started = f"; {record.parent.relative_to(folder)} written {age} ago (a job that has just started " \
                          "looks the same)"
            run.status = "failed"
            run.reason = ("Hydra's record only in .hydra/pending: the job stopped before its config checks passed "
                          "(refused, or killed while starting)" if only_pending(folder) else
                          "no result.json and no metrics.jsonl (crashed before the first evaluation?)") + started
    elif result.get("status") != "completed":
        detail = result.get("error") or result.get("message")
        run.status = "failed"
        run.reason = f"status = {result.get('status')!r}" + (f": {detail}" if detail else "") + progress
    elif not run.metrics or not result.get("final") or not result.get("peak"):
        run.status = "failed"
        run.reason = "empty metrics (" + ("no final/peak in result.json" if run.metrics
                                          else "metrics.jsonl missing or empty") + ")"
    elif run.loss is None or run.beta is None:
        run.status, run.reason = "failed", "loss or beta unknown (not in result.json nor .hydra)"
    return run


def load_sweep(root: Path, exclude: Path | None = None, instance_key: str = INSTANCE_KEY) -> list[Run]:
    """All runs under ``root``, with their variants assigned; of two completed runs with the same config (seed
    included) the newer is kept and the older marked duplicate, so a rerun is never averaged with itself."""
    root = Path(root)
    runs = [load_run(folder, root) for folder in discover(root, exclude)]
    fill_defaults(runs)
    newest: dict[tuple, Run] = {}
    for run in sorted((r for r in runs if r.ok), key=lambda r: (r.path / RESULT).stat().st_mtime):
        if run.key in newest:
            older = newest[run.key]
            same = "config (seed included)" if run.config is not None else "task/loss/beta/seed"
            older.status, older.reason = "duplicate", f"same {same} as {run.name} (newer, kept)"
        newest[run.key] = run
    assign_variants(runs, instance_key)
    return runs


def fill_defaults(runs: list[Run]) -> None:
    """Give each config the schema default of every key that another run's config has and it lacks: a run of
    code older than the key ran with what the default does, so it is neither a variant nor a new seed group.
    Keys without a schema default stay absent (``NOT_SET``)."""
    configs = [r.config for r in runs if r.config is not None]
    for key in sorted({k for config in configs for k in config}):
        lacking = [config for config in configs if key not in config]
        if not lacking:
            continue
        found, default = default_of(key)
        for config in lacking if found else ():
            config[key] = default


def varying_keys(runs: list[Run]) -> list[str]:
    """Config keys whose value differs between the completed runs that have a config, except the seed,
    bookkeeping and ``BASE_KEYS``: swept keys (overrides.yaml) first, then in config order.

    Values are compared as written, interpolations unresolved: a setting derived from the seed
    (``task.data_seed: ${seed}``) is then the same in every run and does not split the seeds.
    """
    configs = [r.config for r in runs if r.ok and r.config is not None]
    keys: list[str] = []
    for config in configs:
        keys += [k for k in config if k not in keys]
    varying = [k for k in keys if k != SEED_KEY and k not in BASE_KEYS and not is_bookkeeping(k)
               and len({_hashable(c.get(k, NOT_SET)) for c in configs}) > 1]
    swept = []
    for run in runs:
        swept += [k for k, _ in read_overrides(run.path) if k in varying and k not in swept]
    return swept + [k for k in varying if k not in swept]


def _value(run: Run, key: str):
    """The setting as written (not resolved: grouping and display must agree, and ``${seed}`` differs by seed)."""
    if run.config is None:
        return UNKNOWN
    return run.config.get(key, NOT_SET)


def assign_variants(runs: list[Run], instance_key: str = INSTANCE_KEY) -> list[str]:
    """Set each run's ``group``, ``variant``, ``series`` and instance fields from the settings that vary across
    ``runs``.

    ``group`` holds every varying setting (the tables group by it); ``variant`` only those needed to tell the
    groups apart: a setting that follows from task/loss/beta and the settings already shown (the loss's own
    parameters under ``loss=dpo,isdpo``) gets no column. ``instance_key`` names the task instance (``Run.instance``;
    ``Run.config_group`` and ``Run.method`` leave it out). Returns the keys of ``variant``.
    """
    varying = varying_keys(runs)
    done = [r for r in runs if r.ok]
    shown: list[str] = []
    for key in varying:
        seen: dict[tuple, Any] = {}
        for run in done:
            known = (run.task, run.loss, run.beta) + tuple(_hashable(_value(run, k)) for k in shown)
            if seen.setdefault(known, _hashable(_value(run, key))) != _hashable(_value(run, key)):
                shown.append(key)
                break
    names = short_names(shown + [instance_key])
    has_instances = any(r.config is not None and instance_key in r.config for r in runs)
    for run in runs:
        run.settings = {k: _hashable(_value(run, k)) for k in varying}
        run.group = tuple(run.settings.values())
        run.config_group = tuple(v for k, v in run.settings.items() if k != instance_key)
        weighted = loss_traits(run)[0]
        run.variant = {k: UNUSED if not weighted and _is_weighting_setting(k) else _value(run, k) for k in shown}
        labelled = {k: v for k, v in run.variant.items() if v is not UNUSED}
        run.series = ", ".join([str(run.loss)] + [f"{names[k]}={format_value(v)}" for k, v in labelled.items()])
        run.method = ", ".join([str(run.loss)] + [f"{names[k]}={format_value(v)}" for k, v in labelled.items()
                                                  if k != instance_key])
        value = resolve(run.config, instance_key) if run.config is not None and instance_key in run.config \
            else _value(run, instance_key)
        run.instance = f"{names[instance_key]}={format_value(value)}" if has_instances else ""
        run.instance_order = value_order(value)
    return shown


def _is_weighting_setting(key: str) -> bool:
    """A setting of the importance weighting, which does nothing while it is off (its switch aside)."""
    return key.startswith("loss.importance_sampling.") and key != "loss.importance_sampling.enabled"


def loss_traits(run: Run) -> tuple[bool, bool, str]:
    """(importance sampling on, online, base loss) of a run's loss, from its config (loss.importance_sampling.enabled,
    loss.online, loss.base); without them, from the name ("is" prefix: importance-sampled, "online_" prefix: online,
    the rest: the base)."""
    name, cfg = str(run.loss), run.config or {}
    weighted = resolve(cfg, "loss.importance_sampling.enabled") if cfg else None
    online = resolve(cfg, "loss.online") if cfg else None
    base = resolve(cfg, "loss.base") if cfg else None
    weighted = weighted if isinstance(weighted, bool) else name.startswith("is")
    online = online if isinstance(online, bool) else name.startswith("online_")
    if not isinstance(base, str) or "${" in base:
        base = name.removeprefix("online_")
        base = base.removeprefix("is") if weighted else base
    return weighted, online, base


def short_names(keys: list[str]) -> dict[str, str]:
    """Shortest dotted suffix of each key that no other key ends with ("loss.importance_sampling.log_clip" ->
    "log_clip"), for legends."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            name = ".".join(parts[-n:])
            if not any(other != key and (other == name or other.endswith("." + name)) for other in keys):
                break
        names[key] = name
    return names


def by_instance(runs: list[Run]) -> dict[str, list[Run]]:
    """The runs grouped by task instance, instances and seeds in order."""
    out: dict[str, list[Run]] = {}
    for run in sorted(runs, key=lambda r: (r.instance_order, r.seed is None, r.seed)):
        out.setdefault(run.instance, []).append(run)
    return out
