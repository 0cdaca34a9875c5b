"""Text records -> token ids under one truncation policy (:func:`fit_lengths`), with counts logged for every data
set; and the tokenizers, loaded once per process (a GGUF tokenizer takes ~20 s to build).

Truncation policy:

1. a prompt longer than ``max_prompt_length`` keeps its END (the question / "TL;DR:" cue that
   the response continues); a leading BOS token is kept in front;
2. each response is cut to the ``max_length - len(prompt)`` tokens left (it then has no EOS),
   or, with ``truncate_responses=False``, the pair is dropped instead;
3. pairs whose chosen and rejected responses are identical (as text before tokenization, as
   Dahoas/full-hh-rlhf has some, or as token ids after truncation) are dropped: they carry no
   preference;
4. empty or whitespace-only responses (or prompts) are dropped, judged on the text before the
   EOS is appended (so an empty response never trains as a bare EOS).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from isdpo.data.rows import PAIR_FIELDS, DataError, blank
from isdpo.models import load_tokenizer


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
    empty_rows = {i for i in text if any(blank(pairs[i][f]) for f in PAIR_FIELDS)}
    need = [i for i in text if i not in empty_rows]
    enc_p = encode_prompts(tokenizer, [pairs[i]["prompt"] for i in need], prompt_special_tokens)
    enc_c = encode_responses(tokenizer, [pairs[i]["chosen"] for i in need])
    enc_r = encode_responses(tokenizer, [pairs[i]["rejected"] for i in need])
    ids = {i: (p, c, r) for i, p, c, r in zip(need, enc_p, enc_c, enc_r)}
    out = []
    for i, pair in enumerate(pairs):
        if i in empty_rows:
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
    kept = [e for e in examples if not (blank(e["prompt"]) or blank(e["response"]))]
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



# --------------------------------------------------------------------------------------------
# Tokenizers (loaded once per process: a GGUF tokenizer takes ~20 s to build)
# --------------------------------------------------------------------------------------------

_TOKENIZERS: dict[str, Any] = {}


def tokenizer_source(model_cfg: Mapping[str, Any]) -> dict:
    """What identifies a model config's tokenizer (cache keys)."""
    return {"tokenizer": model_cfg.get("tokenizer") or model_cfg.get("pretrained"),
            "gguf_file": None if model_cfg.get("tokenizer") else model_cfg.get("gguf_file")}



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
