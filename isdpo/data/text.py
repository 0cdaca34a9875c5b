"""Text data (TL;DR summarisation, Anthropic-HH dialogue, a user's pairs in TRL's formats): loading,
formatting, tokenizing.

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

task=preference reads TRL's preference formats (:func:`read_preference_rows`, :func:`preference_pairs`):
standard (texts), conversational (``{role, content}`` message lists rendered with the tokenizer's chat
template; such prompts are tokenized without adding special tokens, the template writes them) and implicit
prompt (the shared prefix of chosen and rejected), from JSONL, JSON, Parquet or CSV files or the hub.

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
import csv
import io
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from isdpo.models import load_tokenizer

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


def _check_cells(rows: list[dict], columns: Sequence[str], where: Any) -> None:
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
    _check_cells(rows, columns, locate)
    return rows, locate, available


def read_table(dataset: str | None, data_files: Any, split: str, columns: Sequence[str]) -> list[dict]:
    """The rows of :func:`read_rows`."""
    return read_rows(dataset, data_files, split, columns)[0]


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
# Preference data in TRL's formats (task=preference)
# --------------------------------------------------------------------------------------------

ROLES = ("system", "user", "assistant")


def read_preference_rows(dataset: str | None, data_files: Any, split: str, columns: Mapping[str, str | None]
                         ) -> tuple[list[dict], Callable[[int], str], dict]:
    """Rows of a preference data set, where each row is, and the columns actually read.

    ``columns``: ``prompt`` (None, or a name the data does not have: the implicit prompt, i.e. the shared
    prefix of chosen and rejected), ``chosen``, ``rejected``, and ``chosen_logp``/``rejected_logp`` (the
    behaviour policy's log-probs; None or absent from the data: not read). A column read must be in every row.
    """
    cols = dict(as_plain(columns))
    optional = [cols[k] for k in ("prompt", "chosen_logp", "rejected_logp") if cols.get(k)]
    rows, locate, available = read_rows(dataset, data_files, split, [cols["chosen"], cols["rejected"]], optional)
    used = {k: (cols.get(k) if cols.get(k) in available else None) for k in ("prompt", "chosen_logp", "rejected_logp")}
    used.update(chosen=cols["chosen"], rejected=cols["rejected"])
    if (used["chosen_logp"] is None) != (used["rejected_logp"] is None):
        has, lacks = ("chosen_logp", "rejected_logp") if used["chosen_logp"] else ("rejected_logp", "chosen_logp")
        raise DataError(f"{locate(0)}: has the behaviour log-prob column {used[has]!r} but not {cols[lacks]!r}; "
                        f"give both (log mu of the chosen and of the rejected response) or neither")
    _check_cells(rows, [c for c in used.values() if c is not None], locate)
    return rows, locate, used


def holdout_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held out): a seeded ``fraction`` of ``range(n)`` held out, at least one row and never all."""
    if n < 2:
        raise DataError(f"cannot hold out pairs from {n} row(s): give a held-out file or more data")
    k = min(max(1, round(fraction * n)), n - 1)
    held = set(random.Random(seed).sample(range(n), k))
    return [i for i in range(n) if i not in held], sorted(held)


def _messages(value: Any, where: str, column: str, source: str = "task.format=conversational") -> list[dict]:
    """``value`` checked as a non-empty list of ``{"role", "content"}`` text messages (``source``: why this format)."""
    if not isinstance(value, list):
        raise DataError(f"{where}: column {column!r}: expected a list of {{role, content}} messages ({source}), "
                        f"got {type(value).__name__}")
    if not value:
        raise DataError(f"{where}: column {column!r}: the message list is empty; fix or remove the row")
    for j, m in enumerate(value):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: column {column!r}, message {j}: expected {{\"role\": ..., \"content\": ...}}, "
                            f"got {str(m)[:80]!r}")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: column {column!r}, message {j}: role {m['role']!r} is not supported; "
                            f"allowed: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: column {column!r}, message {j}: content must be text "
                            f"(got {type(m['content']).__name__})")
    return list(value)


def _check_turns(prompt: list[dict], response: list[dict], where: str, prompt_column: str, column: str) -> None:
    """An optional system message, then user and assistant turns alternating from a user turn; the prompt ends
    with a user turn and the response (the assistant's turn(s)) with an assistant turn."""
    rule = ("roles must alternate user/assistant after an optional system message, the prompt ending with the "
            "user's turn and the response with the assistant's; fix or remove the row")
    if prompt[-1]["role"] != "user":
        raise DataError(f"{where}: column {prompt_column!r}: the prompt's last message is {prompt[-1]['role']!r}, "
                        f"not 'user' ({rule})")
    offset = 1 if prompt[0]["role"] == "system" else 0
    for j, m in enumerate(prompt + response):
        expected = "system" if j < offset else ("user", "assistant")[(j - offset) % 2]
        if m["role"] != expected:
            col, k = (prompt_column, j) if j < len(prompt) else (column, j - len(prompt))
            raise DataError(f"{where}: column {col!r}, message {k}: role {m['role']!r} where {expected!r} "
                            f"belongs ({rule})")
    if response[-1]["role"] != "assistant":
        raise DataError(f"{where}: column {column!r}: the last message is {response[-1]['role']!r}, not "
                        f"'assistant' ({rule})")


def shared_prefix(a: Sequence, b: Sequence) -> int:
    """Length of the longest common prefix of two strings or two message lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _implicit_prompt(chosen: Any, rejected: Any, where: str, columns: Mapping[str, str]) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) of an implicit-prompt pair: the prompt is the shared prefix (of messages, up
    to the last shared user turn; of text, as TRL's ``extract_prompt``: a space before the split stays with
    the responses)."""
    n = shared_prefix(chosen, rejected)
    if isinstance(chosen, list):
        while n > 0 and chosen[n - 1]["role"] != "user":
            n -= 1
    elif 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
        n -= 1
    if n == 0 and chosen != rejected:
        raise DataError(f"{where}: columns {columns['chosen']!r} and {columns['rejected']!r} share no prefix: "
                        f"without a prompt column the prompt is their shared prefix (implicit prompt). Name the "
                        f"data's prompt column in task.columns.prompt, or fix the row")
    return chosen[:n], chosen[n:], rejected[n:]


def _strip_eos(text: str, eos: str | None) -> str:
    """A chat-rendered response without the EOS the template wrote at its end (and what follows it): the EOS
    token is appended to every response when it is tokenized."""
    end = text.rstrip()
    return end[: -len(eos)] if eos and end.endswith(eos) else text


def _logp(value: Any, where: str, column: str) -> float:
    try:
        x = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        x = math.nan
    if not math.isfinite(x):
        raise DataError(f"{where}: column {column!r}: {value!r} is not a finite log-probability; fix or remove the row")
    return x


def _blank_messages(messages: list[dict]) -> bool:
    return all(_blank(m["content"]) for m in messages)


def detect_format(rows: Sequence[Mapping], columns: Mapping[str, str | None]) -> str:
    """The TRL format of most ``rows``: conversational where a row's prompt, chosen or rejected is a list of
    messages, else standard (a tie: the first row's)."""
    cols = [columns[k] for k in PAIR_FIELDS if columns.get(k)]
    chat = [any(isinstance(r.get(c), list) for c in cols) for r in rows]
    n = sum(chat)
    if 2 * n == len(chat):
        return "conversational" if chat and chat[0] else "standard"
    return "conversational" if 2 * n > len(chat) else "standard"


def preference_pairs(rows: list[dict], locate: Callable[[int], str], columns: Mapping[str, str | None], *,
                     fmt: str = "auto", tokenizer=None, drop_identical: bool = True,
                     format_rows: Sequence[Mapping] | None = None) -> tuple[list[dict], dict, str]:
    """Rows in one of TRL's preference formats -> text pairs ``{"prompt", "chosen", "rejected"}`` (plus
    ``chosen_behavior_logp``/``rejected_behavior_logp`` when ``columns`` names them); returns
    ``(pairs, counts, format)``.

    Formats: *standard* (texts) and *conversational* (lists of ``{role, content}`` messages, rendered with
    the tokenizer's chat template: the prompt with the generation prompt added, each response as the rest of
    the rendering of prompt + response, which must start with the rendered prompt); ``fmt="auto"`` takes the
    format of most rows of ``format_rows`` (default ``rows``; the whole file when ``rows`` are a split of it).
    Without a prompt column (``columns["prompt"]`` None) the prompt is the shared prefix of chosen and rejected
    (implicit prompt). Pairs with chosen == rejected (with ``drop_identical``) or an empty prompt or response are
    dropped and counted; malformed rows raise one :class:`DataError` naming each row (up to
    :data:`MAX_BAD_ROWS`) and its column.
    """
    cols = dict(columns)
    named = fmt != "auto"
    if not named:
        fmt = detect_format(rows if format_rows is None else format_rows, cols)
    source = f"task.format={fmt}" if named else f"the {fmt} format of most rows"
    chat = fmt == "conversational"
    if chat and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{locate(0)}: conversational data needs a chat template and the tokenizer has none: set "
                        f"task.chat_template (a Jinja template, or the path of a .jinja file)")
    pcol = cols["prompt"] or cols["chosen"]  # where a bad prompt comes from
    pairs, identical, empty, bad = [], 0, 0, BadRows()
    for i, r in enumerate(rows):
        where = locate(i)
        try:
            if chat:
                c = _messages(r[cols["chosen"]], where, cols["chosen"], source)
                rj = _messages(r[cols["rejected"]], where, cols["rejected"], source)
                p = _messages(r[cols["prompt"]], where, cols["prompt"], source) if cols["prompt"] else None
            else:
                for col in (cols["prompt"], cols["chosen"], cols["rejected"]):
                    if col and isinstance(r[col], (list, dict)):
                        raise DataError(f"{where}: column {col!r}: expected text ({source}), got "
                                        f"{type(r[col]).__name__}")
                c, rj = str(r[cols["chosen"]]), str(r[cols["rejected"]])
                p = str(r[cols["prompt"]]) if cols["prompt"] else None
            if p is None:
                p, c, rj = _implicit_prompt(c, rj, where, cols)
            if drop_identical and c == rj:
                identical += 1
                continue
            if not (p and c and rj) or (any(_blank_messages(x) for x in (p, c, rj)) if chat
                                        else any(_blank(x) for x in (p, c, rj))):
                empty += 1
                continue
            if chat:
                _check_turns(p, c, where, pcol, cols["chosen"])
                _check_turns(p, rj, where, pcol, cols["rejected"])
                pair = {"prompt": tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)}
                for key, msgs in (("chosen", c), ("rejected", rj)):
                    full = tokenizer.apply_chat_template(p + msgs, tokenize=False)
                    if not full.startswith(pair["prompt"]):
                        n = shared_prefix(full, pair["prompt"])
                        raise DataError(f"{where}: column {cols[key]!r}: the chat template does not render the "
                                        f"prompt as the start of prompt + response (they differ from character {n}: "
                                        f"{pair['prompt'][n:n + 40]!r} vs {full[n:n + 40]!r}); set "
                                        f"task.chat_template to a template that does")
                    pair[key] = _strip_eos(full[len(pair["prompt"]):], tokenizer.eos_token)
            else:
                pair = {"prompt": p, "chosen": c, "rejected": rj}
            if cols.get("chosen_logp"):
                pair["chosen_behavior_logp"] = _logp(r[cols["chosen_logp"]], where, cols["chosen_logp"])
                pair["rejected_behavior_logp"] = _logp(r[cols["rejected_logp"]], where, cols["rejected_logp"])
        except DataError as err:  # the next rows are checked too: every bad row is reported at once
            bad.add(err)
            continue
        pairs.append(pair)
    bad.check()
    return pairs, {"read": len(rows), "dropped_identical_text": identical, "dropped_empty_text": empty}, fmt


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


def encode_prompts(tokenizer, prompts: list[str], special: bool = True) -> list[list[int]]:
    """Prompt ids with the tokenizer's own special tokens (BOS where the model expects one); ``special=False``
    for prompts rendered by a chat template, which writes the model's special tokens itself."""
    return [list(p) for p in _encode(tokenizer, prompts, special)]


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
    prompt_special_tokens: bool = True,
) -> tuple[list[dict], TruncationStats]:
    """Text pairs -> ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` under the truncation policy.

    Extra numeric fields of a pair (``chosen_behavior_logp``, ...) are carried over; pairs that
    already carry token ids (``prompt_ids``/``chosen_ids``/``rejected_ids``, e.g. generated by the
    relabel stage) are not re-tokenized; text pairs with an empty prompt or response are dropped (and
    counted) before the EOS is appended. With ``keep_text`` the texts are kept too.
    ``prompt_special_tokens=False`` for prompts rendered by a chat template (:func:`encode_prompts`).
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
    enc_p = encode_prompts(tokenizer, [pairs[i]["prompt"] for i in need], prompt_special_tokens)
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
