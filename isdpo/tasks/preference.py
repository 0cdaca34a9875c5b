"""Your own preference data (task=preference): pairs in TRL's formats, trained on directly.

- Data: a hub data set (``dataset`` + ``splits``) or local files (``data_files``: JSONL, JSON, Parquet,
  CSV) in the standard, conversational or implicit-prompt format, with ``columns`` naming the columns;
  conversations are rendered with the tokenizer's chat template (or ``chat_template``). Loading, checking
  and rendering: :func:`isdpo.data.trl_formats.preference_pairs`; the truncation policy is the text tasks'.
- Held-out pairs: the given eval file or split, else a seeded ``eval.holdout_fraction`` of the training
  rows (carved before anything is dropped, so the split depends on the file and the seed only).
- Behaviour log-probs in the data (``columns.chosen_logp``/``rejected_logp``) become the pairs'
  ``*_behavior_logp``: importance sampling then uses them as mu.
- Reference: ``model.pretrained`` itself (``sft.enabled=false``, the default) or its SFT on the prompts
  and chosen responses of the training pairs. No golden reward: no upstream stage, no win rate; the curve
  is the pair metrics (isdpo.callbacks.PairEvaluator).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from isdpo.artifacts import data_key
from isdpo.data.rows import BadRows, DataError, as_plain, holdout_split, require_nonempty, subsample
from isdpo.data.tokenization import get_tokenizer, tokenize_pairs, tokenizer_source
from isdpo.data.trl_formats import preference_pairs, read_preference_rows
from isdpo.models import load_tokenizer
from isdpo.ref_cache import add_reference_logps
from isdpo.tasks.base import register


MIN_HELD_OUT = 20  # held-out rows below which the pair metrics (eval/*) are mostly noise: a warning names it


def small_holdout_warning(held: int, rows: int, fraction: float) -> str:
    """What to change when ``fraction`` of ``rows`` holds out only ``held`` (< MIN_HELD_OUT) rows."""
    need = math.ceil(100 * MIN_HELD_OUT / rows) / 100
    fix = (f"raise task.eval.holdout_fraction to {need:g} ({MIN_HELD_OUT} rows) or give task.data_files.eval"
           if need < 0.5 else f"{rows} rows are too few to hold out {MIN_HELD_OUT}: give task.data_files.eval")
    return (f"[isdpo] WARNING: task.eval.holdout_fraction={fraction:g} of {rows} rows holds out {held} pair(s): "
            f"their metrics (eval/loss, eval/rewards/accuracies, ...) are noise at this size (an accuracy moves in "
            f"steps of {1 / held:.2g}); {fix}")


def _template(value: str) -> str:
    """An inline Jinja template, or the text of the file it names."""
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise DataError(f"task.chat_template={value!r} is neither a Jinja template nor an existing file")
    return path.read_text()


@register("preference")
class PreferenceRuntime:
    """Everything the stages need from a user's preference data set (isdpo.tasks.base.Task)."""

    def __init__(self, task_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any], cache_dir: str | Path,
                 output_dir: str | Path | None = None):
        self.cfg, self.model_cfg = task_cfg, model_cfg
        self.cache_dir = Path(cache_dir)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        if task_cfg.get("chat_template"):
            # Its own copy: the shared, memoised tokenizer of the model must keep its own template.
            self.tokenizer = load_tokenizer(dict(model_cfg))
            self.tokenizer.chat_template = _template(str(task_cfg["chat_template"]))
        else:
            self.tokenizer = get_tokenizer(model_cfg)
        self.pad_id, self.eos_id = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        self.vocab_size = None  # pretrained checkpoints own their vocabulary
        self._loaded: dict[str, tuple[list[dict], dict, bool]] | None = None

    @property
    def lengths(self) -> dict:
        c = self.cfg
        return {"max_length": int(c["max_length"]), "max_prompt_length": int(c["max_prompt_length"]),
                "truncate_responses": bool(c["truncate_responses"])}

    def upstream_stages(self) -> tuple[str, ...]:
        return ()  # no golden reward model, no relabelling

    def reference_source(self) -> str:
        return "sft" if self.cfg["sft"]["enabled"] else "pretrained"

    # -- data --------------------------------------------------------------------------------

    def _sources(self) -> tuple[tuple, tuple | None]:
        """(dataset, data_files, split) of the training rows and of the held-out rows (None: carve)."""
        c, files = self.cfg, self.cfg["data_files"]
        train = (None, files["train"], "train") if files["train"] else (c["dataset"], None, c["splits"]["train"])
        if files["eval"]:
            held = (None, files["eval"], "eval")
        elif not files["train"] and c["splits"]["eval"]:
            held = (c["dataset"], None, c["splits"]["eval"])
        else:
            held = None
        return train, held

    def _pairs(self, rows, locate, columns, name: str, format_rows=None) -> tuple[list[dict], dict, bool]:
        """(text pairs, counts, whether a chat template rendered them); ``format_rows``: the rows whose format
        ``task.format=auto`` takes (default ``rows``)."""
        pairs, counts, fmt = preference_pairs(rows, locate, columns, fmt=self.cfg["format"], tokenizer=self.tokenizer,
                                              drop_identical=bool(self.cfg["drop_identical"]), format_rows=format_rows)
        mu = f", behaviour log-probs from {columns['chosen_logp']!r}/{columns['rejected_logp']!r}" \
            if columns["chosen_logp"] else ""
        prompt = f"prompt column {columns['prompt']!r}" if columns["prompt"] else "implicit prompt (shared prefix)"
        print(f"[isdpo] {name}: {len(rows)} rows, {fmt} format, {prompt}{mu}")
        return pairs, counts, fmt == "conversational"

    def _load(self) -> dict[str, tuple[list[dict], dict, bool]]:
        """{"train": ..., "eval": ...} as returned by :meth:`_pairs`, read once."""
        if self._loaded is None:
            (ds, files, split), held = self._sources()
            cols = as_plain(self.cfg["columns"])
            rows, locate, used = read_preference_rows(ds, files, split, cols)
            if held is None:
                ev = self.cfg["eval"]
                keep, out = holdout_split(len(rows), float(ev["holdout_fraction"]), int(ev["seed"]))
                print(f"[isdpo] held out {len(out)} of {len(rows)} training rows (task.eval.holdout_fraction="
                      f"{ev['holdout_fraction']}, seed {ev['seed']})")
                if ev["n_pairs"] and len(out) < MIN_HELD_OUT:
                    print(small_holdout_warning(len(out), len(rows), float(ev["holdout_fraction"])))
                # The format of the whole file (a split may hold only its bad rows), and the bad rows of both splits
                # in one error.
                loaded, bad = {}, BadRows()
                for split_name, idx in (("train", keep), ("eval", out)):
                    try:
                        loaded[split_name] = self._pairs([rows[i] for i in idx], lambda j, idx=idx: locate(idx[j]), used,
                                                         f"preference/{split_name}", format_rows=rows)
                    except DataError as err:
                        if not getattr(err, "rows", None):  # not about rows (no chat template): as it is
                            raise
                        bad.add(err)
                bad.check()
                self._loaded = loaded
            else:
                train = self._pairs(rows, locate, used, "preference/train")
                e_rows, e_locate, e_used = read_preference_rows(*held, cols)
                self._loaded = {"train": train, "eval": self._pairs(e_rows, e_locate, e_used, "preference/eval")}
        return self._loaded

    def _tokenize(self, pairs: list[dict], counts: dict, rendered: bool, name: str) -> list[dict]:
        # A prompt rendered by a chat template carries the model's special tokens already.
        examples, stats = tokenize_pairs(pairs, self.tokenizer, name=name, pre_counts=counts,
                                         prompt_special_tokens=not rendered, **self.lengths)
        if stats.responses_truncated and any("chosen_behavior_logp" in e for e in examples):
            print(f"[isdpo] WARNING: {name}: {stats.responses_truncated} responses were truncated but their behaviour "
                  f"log-probs are those of the whole response; raise task.max_length, or set "
                  f"task.truncate_responses=false to drop such pairs")
        return examples

    # -- SFT ---------------------------------------------------------------------------------

    def sft_key(self) -> dict:
        (ds, files, split), held = self._sources()
        c = self.cfg
        return {"kind": "preference", "tokenizer": tokenizer_source(self.model_cfg), **self.lengths,
                "content": data_key({"dataset": ds, "data_files": files}, [split]),
                "holdout": None if held else {k: c["eval"][k] for k in ("holdout_fraction", "seed")},
                **{k: as_plain(c[k]) for k in ("format", "columns", "chat_template", "drop_identical")}}

    def sft_examples(self) -> list[dict]:
        """The prompts and chosen responses of the training pairs."""
        pairs, counts, rendered = self._load()["train"]
        examples = self._tokenize(pairs, counts, rendered, "preference/sft (chosen responses)")
        require_nonempty(examples, "the SFT set (the chosen responses of the training pairs)")
        return [{"prompt_ids": e["prompt_ids"], "response_ids": e["chosen_ids"]} for e in examples]

    # -- preference pairs --------------------------------------------------------------------

    def preference_examples(self, reference, reference_dir: Path | None, precision: str | None = None) -> list[dict]:
        tr = self.cfg["train"]
        pairs, counts, rendered = self._load()["train"]
        pairs = subsample(pairs, tr.get("max_pairs"), 0)
        examples = self._tokenize(pairs, counts, rendered, "preference/train")
        require_nonempty(examples, "the preference training set")  # the steps they give: stage=align's plan_steps
        if tr["precompute_ref_logps"] and reference is not None:
            examples, _, _ = add_reference_logps(
                examples, reference, pad_id=self.pad_id, cache_dir=self.cache_dir,
                tokenizer_key=tokenizer_source(self.model_cfg), lengths=self.lengths,
                batch_size=int(tr["ref_logps_batch_size"]), precision=precision)
        return examples

    def eval_pairs(self, reference, eval_cfg: Mapping[str, Any]) -> list[dict]:
        """``eval_cfg.n_pairs`` held-out pairs (a seeded subset), tokenized like the training pairs."""
        n = int(eval_cfg.get("n_pairs") or 0)
        if n == 0:
            return []
        pairs, counts, rendered = self._load()["eval"]
        return self._tokenize(subsample(pairs, n, int(eval_cfg["seed"])), counts, rendered, "preference/eval")

    # -- no golden reward --------------------------------------------------------------------

    def score(self, prompts, responses):
        raise RuntimeError("task=preference has no golden reward: its evaluation is the held-out pair metrics")

    def evaluator(self, reference, eval_cfg: Mapping[str, Any]) -> None:
        return None  # no golden reward, no win rate: the pair metrics are the curve
