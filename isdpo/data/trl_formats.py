"""A user's preference data in TRL's formats (task=preference) -> text pairs.

Standard (texts), conversational (``{role, content}`` message lists rendered with the tokenizer's chat template;
such prompts are tokenized without adding special tokens, the template writes them) and implicit prompt (the
shared prefix of chosen and rejected), from JSONL, JSON, Parquet or CSV files or the hub; optional behaviour
log-prob columns (log mu) for the IS losses. Every malformed row is named with its column.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

from isdpo.data.rows import PAIR_FIELDS, BadRows, DataError, as_plain, blank, check_cells, read_rows


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
    check_cells(rows, [c for c in used.values() if c is not None], locate)
    return rows, locate, used



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
    return all(blank(m["content"]) for m in messages)


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
                                        else any(blank(x) for x in (p, c, rj))):
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


