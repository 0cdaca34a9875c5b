"""Real text tasks (TL;DR summarisation, Anthropic-HH dialogue): loading, formatting, tokenizing.

Everything here is plain functions over plain values (no Hydra, no Lightning) so it is testable
on small local files. The data path is::

    source spec (hub name or local files, split, column names)
      -> load_records()          list of {"prompt", "chosen", "rejected"} (or {"prompt", "response"})
      -> tokenize_pairs() / tokenize_sft()   token ids, truncated by one documented policy

Schemas (the columns this module reads, everything else is ignored):

- TL;DR preferences, ``vwxyzjn/summarize_from_feedback_oai_preprocessing_1706381144``
  (splits ``train``, ``validation``, ``validation_cnndm``): ``query`` (the formatted post,
  "SUBREDDIT: r/...\\n\\nTITLE: ...\\n\\nPOST: ...\\n\\nTL;DR:"), ``chosen``, ``rejected``
  (summaries with a leading space and Pythia's literal ``<|endoftext|>`` appended).
- TL;DR SFT, ``vwxyzjn/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1706381144``
  (splits ``train``, ``validation``, ``test``): ``query``, ``reference_response`` (same conventions).
- Anthropic-HH, ``Dahoas/full-hh-rlhf`` (splits ``train``, ``test``): ``prompt`` (the dialogue,
  "\\n\\nHuman: ...\\n\\nAssistant:"), ``response``, ``chosen``, ``rejected``.

Texts are used raw (no chat template), as in the paper, whose policies are base models.

Truncation policy (one place, :func:`fit_lengths`), with counts logged for every data set:

1. a prompt longer than ``max_prompt_length`` keeps its END (the question / "TL;DR:" cue that
   the response continues); a leading BOS token is kept in front;
2. each response is cut to the ``max_length - len(prompt)`` tokens left (it then has no EOS),
   or, with ``truncate_responses=False``, the pair is dropped instead;
3. pairs whose chosen and rejected responses are identical (as text before tokenization, as
   Dahoas/full-hh-rlhf has some, or as token ids after truncation) are dropped: they carry no
   preference;
4. empty or whitespace-only responses (or prompts) are dropped, judged on the text before the
   EOS is appended (so an empty response never trains as a bare EOS).

Bad input is never kept silently: a null cell (JSON null, NaN, a parquet null) in a column read, a
malformed JSON line or non-UTF-8 bytes raise :class:`DataError` naming the file, the row and the column.
"""
from __future__ import annotations

import codecs
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from isdpo.models import load_tokenizer

PAIR_FIELDS = ("prompt", "chosen", "rejected")
SFT_FIELDS = ("prompt", "response")


class DataError(ValueError):
    """A data set is missing, empty, or lacks a column; the message names which."""


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


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
    raise DataError(f"data file {str(p)!r}: unsupported format (use .jsonl, .json or .parquet)")


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _check_cells(rows: list[dict], columns: Sequence[str], where: Any) -> None:
    """Raise naming the row (``where(i)``) and the column on the first null or missing cell of ``columns``."""
    for i, r in enumerate(rows):
        for c in columns:
            if c not in r:
                raise DataError(f"{where(i)}: column {c!r} is missing; fix or remove the row")
            if _is_null(r[c]):
                raise DataError(f"{where(i)}: column {c!r} is null; fix or remove the row")


def read_table(dataset: str | None, data_files: Any, split: str, columns: Sequence[str]) -> list[dict]:
    """Rows of one split with (at least) ``columns``, from local files if given, else the hub.

    Local files are read directly (JSON lines, JSON array or parquet); hub data sets go through
    ``datasets.load_dataset(dataset, split=split)``. A missing column, an empty split, a null cell in
    ``columns`` or an undecodable line raises :class:`DataError` naming the data set or file, the
    split or row, and the column.
    """
    local = _local_file(data_files, split)
    where = f"{local!r}" if local else f"data set {dataset!r}"
    if local:
        rows, row_where = _read_local(local)
        locate = row_where.__getitem__
        available = sorted(rows[0]) if rows else []
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
        rows = ds.select_columns(list(columns)).to_list()

        def locate(i: int) -> str:
            return f"{where} (split {split!r}) row {i + 1}"
    if not rows:
        raise DataError(f"{where} (split {split!r}) is empty")
    missing = [c for c in columns if c not in available]
    if missing:
        raise DataError(f"{where} (split {split!r}) has no column {missing[0]!r}; columns: {', '.join(available)}")
    _check_cells(rows, columns, locate)
    return rows


def _blank(text: Any) -> bool:
    """Empty or whitespace-only: such a prompt or response carries nothing to learn from."""
    return not str(text).strip()


def _clean_response(text: str, strip_suffix: str | None) -> str:
    if strip_suffix and text.endswith(strip_suffix):
        text = text[: -len(strip_suffix)]
    return text


def load_pairs(spec: Mapping[str, Any], split: str, *, limit: int | None = None) -> tuple[list[dict], dict]:
    """Preference pairs ``{"prompt", "chosen", "rejected"}`` (text) of one split of a source.

    ``spec`` keys: ``dataset``, ``data_files``, ``columns`` ({prompt, chosen, rejected} -> column
    names), ``strip_suffix`` (a literal removed from the end of responses, e.g. Pythia's
    ``<|endoftext|>`` baked into the TL;DR texts; the tokenizer's own EOS is appended later) and
    ``drop_identical`` (drop pairs with chosen == rejected). Pairs with an empty (or whitespace-only)
    prompt, chosen or rejected text are dropped. Returns ``(pairs, counts)``.
    """
    cols = as_plain(spec["columns"])
    rows = read_table(spec.get("dataset"), spec.get("data_files"), split, [cols[f] for f in PAIR_FIELDS])
    suffix = spec.get("strip_suffix")
    pairs, identical, empty = [], 0, 0
    for r in rows:
        p = {"prompt": str(r[cols["prompt"]]).lstrip(" "),
             "chosen": _clean_response(str(r[cols["chosen"]]), suffix),
             "rejected": _clean_response(str(r[cols["rejected"]]), suffix)}
        if any(_blank(p[f]) for f in PAIR_FIELDS):
            empty += 1
            continue
        if spec.get("drop_identical", True) and p["chosen"] == p["rejected"]:
            identical += 1
            continue
        pairs.append(p)
        if limit is not None and len(pairs) >= limit:
            break
    return pairs, {"read": len(rows), "dropped_identical_text": identical, "dropped_empty_text": empty}


def load_sft(spec: Mapping[str, Any], *, limit: int | None = None) -> list[dict]:
    """SFT examples ``{"prompt", "response"}`` (text) of one source (its own ``split`` and ``columns``)."""
    cols = as_plain(spec["columns"])
    rows = read_table(spec.get("dataset"), spec.get("data_files"), spec["split"], [cols[f] for f in SFT_FIELDS])
    suffix = spec.get("strip_suffix")
    out = [{"prompt": str(r[cols["prompt"]]).lstrip(" "), "response": _clean_response(str(r[cols["response"]]), suffix)}
           for r in rows]
    return out[:limit] if limit is not None else out


def subsample(items: list, n: int | None, seed: int) -> list:
    """A seeded random subset of ``n`` items (all of them, in order, when n is None or >= len)."""
    if n is None or n >= len(items):
        return list(items)
    idx = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in idx]


# --------------------------------------------------------------------------------------------
# Tokenizing and the truncation policy
# --------------------------------------------------------------------------------------------


@dataclass
class TruncationStats:
    """Counts of what the truncation policy did to one data set (logged, and kept in the cache)."""

    name: str = ""
    read: int = 0
    prompts_truncated: int = 0
    responses_truncated: int = 0
    dropped_too_long: int = 0
    dropped_identical: int = 0
    dropped_empty: int = 0
    kept: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d.update(self.extra)
        return d

    def log(self) -> None:
        print(f"[isdpo] {self.name}: {self.read} read; {self.prompts_truncated} prompts truncated (kept the end), "
              f"{self.responses_truncated} responses truncated; dropped: {self.dropped_too_long} too long, "
              f"{self.dropped_identical} chosen == rejected, {self.dropped_empty} empty"
              + "".join(f", {v} {k}" for k, v in self.extra.items())
              + f" -> {self.kept} kept")


def fit_lengths(
    prompt: list[int],
    responses: Sequence[list[int]],
    *,
    max_length: int,
    max_prompt_length: int,
    bos_id: int | None,
    truncate_responses: bool = True,
    stats: TruncationStats | None = None,
) -> tuple[list[int], list[list[int]]] | None:
    """Apply the truncation policy (module docstring) to one prompt and its responses.

    Returns ``(prompt, responses)`` cut to fit, or None when the example is dropped.
    """
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length})")
    stats = stats if stats is not None else TruncationStats()
    if not prompt or any(len(r) == 0 for r in responses):
        stats.dropped_empty += 1
        return None
    if len(prompt) > max_prompt_length:
        stats.prompts_truncated += 1
        if bos_id is not None and prompt[0] == bos_id:
            prompt = [bos_id] + prompt[len(prompt) - (max_prompt_length - 1):]
        else:
            prompt = prompt[len(prompt) - max_prompt_length:]
    budget = max_length - len(prompt)
    out = []
    for r in responses:
        if len(r) > budget:
            if not truncate_responses:
                stats.dropped_too_long += 1
                return None
            stats.responses_truncated += 1
            r = r[:budget]
        out.append(list(r))
    return list(prompt), out


def _encode(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=special)["input_ids"]


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Prompt ids with the tokenizer's own special tokens (BOS where the model expects one)."""
    return [list(p) for p in _encode(tokenizer, prompts, True)]


def encode_responses(tokenizer, responses: list[str]) -> list[list[int]]:
    """Response ids, no special tokens, the tokenizer's EOS appended (the model learns to stop)."""
    eos = tokenizer.eos_token_id
    return [list(r) + ([eos] if eos is not None else []) for r in _encode(tokenizer, responses, False)]


def tokenize_pairs(
    pairs: list[dict],
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    truncate_responses: bool = True,
    name: str = "pairs",
    keep_text: bool = False,
    pre_counts: Mapping[str, int] | None = None,
    log: bool = True,
) -> tuple[list[dict], TruncationStats]:
    """Text pairs -> ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` under the truncation policy.

    Extra numeric fields of a pair (``chosen_behavior_logp``, ...) are carried over; pairs that
    already carry token ids (``prompt_ids``/``chosen_ids``/``rejected_ids``, e.g. generated by the
    relabel stage) are not re-tokenized; text pairs with an empty prompt or response are dropped (and
    counted) before the EOS is appended. With ``keep_text`` the texts are kept too.
    """
    pre = dict(pre_counts or {})
    identical_text = int(pre.get("dropped_identical_text", 0))
    empty_text = int(pre.get("dropped_empty_text", 0))
    stats = TruncationStats(name=name, read=int(pre.get("read", len(pairs) + identical_text + empty_text)))
    stats.dropped_identical += identical_text
    stats.dropped_empty += empty_text
    if stats.read - identical_text - empty_text > len(pairs):  # a subset was taken before tokenizing
        stats.extra["not in the sampled subset"] = stats.read - identical_text - empty_text - len(pairs)
    text = [i for i, p in enumerate(pairs) if "prompt_ids" not in p]
    blank = {i for i in text if any(_blank(pairs[i][f]) for f in PAIR_FIELDS)}
    need = [i for i in text if i not in blank]
    enc_p = encode_prompts(tokenizer, [pairs[i]["prompt"] for i in need])
    enc_c = encode_responses(tokenizer, [pairs[i]["chosen"] for i in need])
    enc_r = encode_responses(tokenizer, [pairs[i]["rejected"] for i in need])
    ids = {i: (p, c, r) for i, p, c, r in zip(need, enc_p, enc_c, enc_r)}
    out = []
    for i, pair in enumerate(pairs):
        if i in blank:
            stats.dropped_empty += 1
            continue
        p, c, r = ids[i] if i in ids else (pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"])
        fitted = fit_lengths(p, [c, r], max_length=max_length, max_prompt_length=max_prompt_length,
                             bos_id=tokenizer.bos_token_id, truncate_responses=truncate_responses, stats=stats)
        if fitted is None:
            continue
        p, (c, r) = fitted
        if c == r:
            stats.dropped_identical += 1
            continue
        ex = {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
        for k, v in pair.items():
            if k.endswith("_logp") or k.endswith("_score"):
                ex[k] = v
        if keep_text:
            ex.update({k: pair[k] for k in PAIR_FIELDS if k in pair})
        out.append(ex)
    stats.kept = len(out)
    if log:
        stats.log()
    return out, stats


def tokenize_sft(
    examples: list[dict],
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    truncate_responses: bool = True,
    name: str = "sft",
    log: bool = True,
) -> tuple[list[dict], TruncationStats]:
    """Text ``{"prompt", "response"}`` -> ``{"prompt_ids", "response_ids"}`` under the same policy."""
    stats = TruncationStats(name=name, read=len(examples))
    kept = [e for e in examples if not (_blank(e["prompt"]) or _blank(e["response"]))]
    stats.dropped_empty += len(examples) - len(kept)
    examples = kept
    enc_p = encode_prompts(tokenizer, [e["prompt"] for e in examples])
    enc_r = encode_responses(tokenizer, [e["response"] for e in examples])
    out = []
    for p, r in zip(enc_p, enc_r):
        fitted = fit_lengths(p, [r], max_length=max_length, max_prompt_length=max_prompt_length,
                             bos_id=tokenizer.bos_token_id, truncate_responses=truncate_responses, stats=stats)
        if fitted is not None:
            out.append({"prompt_ids": fitted[0], "response_ids": fitted[1][0]})
    stats.kept = len(out)
    if log:
        stats.log()
    return out, stats


def require_nonempty(items: Iterable, what: str) -> None:
    if not list(items):
        raise DataError(f"{what} is empty after filtering (see the counts logged above)")


# --------------------------------------------------------------------------------------------
# Tokenizers (loaded once per process: a GGUF tokenizer takes ~20 s to build)
# --------------------------------------------------------------------------------------------

_TOKENIZERS: dict[str, Any] = {}


def tokenizer_source(model_cfg: Mapping[str, Any]) -> dict:
    """What identifies a model config's tokenizer (cache keys)."""
    return {"tokenizer": model_cfg.get("tokenizer") or model_cfg.get("pretrained"),
            "gguf_file": None if model_cfg.get("tokenizer") else model_cfg.get("gguf_file")}


def data_spec(task_cfg: Mapping[str, Any]) -> dict:
    """A text task's own preference data as a :func:`load_pairs` spec."""
    return {k: as_plain(task_cfg[k]) for k in ("dataset", "data_files", "columns", "strip_suffix", "drop_identical")}


def get_tokenizer(model_cfg: Mapping[str, Any]):
    """isdpo.models.load_tokenizer, memoised per source."""
    src = tokenizer_source(model_cfg)
    if not src["tokenizer"]:
        raise DataError(f"model {model_cfg.get('name')!r} has neither `pretrained` nor `tokenizer`: "
                        f"text tasks need a tokenizer")
    key = json.dumps(src, sort_keys=True)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load_tokenizer(dict(model_cfg))
    return _TOKENIZERS[key]
