"""The text tasks' data sets (TL;DR summarisation, Anthropic-HH dialogue) as text records: a source spec
(hub name or local files, split, column names) -> ``{"prompt", "chosen", "rejected"}`` pairs or
``{"prompt", "response"}`` SFT examples, then ``tokenization.tokenize_pairs`` / ``tokenize_sft``.

Schemas (the columns read; everything else is ignored):

- TL;DR preferences, ``vwxyzjn/summarize_from_feedback_oai_preprocessing_1706381144``
  (splits ``train``, ``validation``, ``validation_cnndm``): ``query`` (the formatted post,
  "SUBREDDIT: r/...\\n\\nTITLE: ...\\n\\nPOST: ...\\n\\nTL;DR:"), ``chosen``, ``rejected``
  (summaries with a leading space and Pythia's literal ``<|endoftext|>`` appended).
- TL;DR SFT, ``vwxyzjn/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1706381144``
  (splits ``train``, ``validation``, ``test``): ``query``, ``reference_response`` (same conventions).
- Anthropic-HH, ``Dahoas/full-hh-rlhf`` (splits ``train``, ``test``): ``prompt`` (the dialogue,
  "\\n\\nHuman: ...\\n\\nAssistant:"), ``response``, ``chosen``, ``rejected``.

Texts are used raw (no chat template), as in the paper, whose policies are base models.
"""
from __future__ import annotations

from typing import Any, Mapping

from isdpo.data.rows import PAIR_FIELDS, SFT_FIELDS, as_plain, blank, read_table


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
        if any(blank(p[f]) for f in PAIR_FIELDS):
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


def data_spec(task_cfg: Mapping[str, Any]) -> dict:
    """A text task's own preference data as a :func:`load_pairs` spec."""
    return {k: as_plain(task_cfg[k]) for k in ("dataset", "data_files", "columns", "strip_suffix", "drop_identical")}
