"""The real text tasks (TL;DR, Anthropic-HH) wired for the stages, like SyntheticRuntime.

- ``sft_examples()``: the pooled SFT set (paper: TL;DR SFT split + HH chosen responses).
- ``preference_examples(reference, reference_dir)``: the golden-RM-labelled pairs written by
  stage=relabel (``task.train.preferences=relabelled``, the paper) or the data set's own pairs
  (``dataset``), tokenized under the truncation policy of isdpo.data.tokenization, with the reference
  log-probs precomputed and cached (isdpo.ref_cache) when ``task.train.precompute_ref_logps``.
- ``evaluator(reference, eval_cfg)``: N distinct prompts of the eval split x k policy samples,
  each compared by golden-RM score with the data set's reference completion (the chosen
  response of the prompt's first pair), KL by k3 (isdpo.evaluate.Evaluator); the completions
  of every evaluation are written as JSON lines under ``<output_dir>/completions/``.
- ``score(prompts, responses)``: the golden RM (stage=reward's output) on token ids, decoded to
  text with the policy's tokenizer and re-tokenized by the RM's own.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from isdpo.artifacts import atomic_path, check_complete, pairs_file, relabel_dir, reward_dir, sft_data_key
from isdpo.data.records import data_spec, load_pairs, load_sft
from isdpo.data.rows import as_plain, read_table, require_nonempty, subsample
from isdpo.data.tokenization import get_tokenizer, tokenize_pairs, tokenize_sft, tokenizer_source
from isdpo.evaluate import Evaluator
from isdpo.golden_rm import GoldenRM
from isdpo.schema import PREFERENCES, REFERENCES
from isdpo.ref_cache import add_reference_logps
from isdpo.tasks.base import register



@dataclass
class TextEvaluator(Evaluator):
    """Evaluator that also writes each evaluation's completions (text + golden scores) to disk."""

    decode: Any = None                      # token ids -> text
    completions_dir: Path | None = None     # where eval_<n>.jsonl files go (None = nothing written)
    prompt_texts: list = field(default_factory=list)
    reference_texts: list = field(default_factory=list)

    def __call__(self, policy) -> dict:
        res = super().__call__(policy)
        if self.completions_dir is not None:
            self._write(res)
        return res

    def _write(self, res: dict) -> None:
        d = Path(self.completions_dir)
        d.mkdir(parents=True, exist_ok=True)
        if not (d / "prompts.jsonl").exists():  # written whole or not at all: a crash leaves no half file kept forever
            with atomic_path(d / "prompts.jsonl") as tmp, tmp.open("w") as fh:
                for i, (p, r, s) in enumerate(zip(self.prompt_texts, self.reference_texts,
                                                  self.reference_scores.tolist())):
                    fh.write(json.dumps({"prompt_index": i, "prompt": p, "reference": r, "reference_score": s}) + "\n")
        n = len(list(d.glob("eval_*.jsonl")))
        _, responses, scores = res["samples"]
        ref = self.reference_scores.repeat_interleave(self.samples_per_prompt).tolist()
        with atomic_path(d / f"eval_{n:04d}.jsonl") as tmp, tmp.open("w") as fh:
            for i, (resp, s, rs) in enumerate(zip(responses, scores.tolist(), ref)):
                fh.write(json.dumps({"prompt_index": i // self.samples_per_prompt, "sample": i % self.samples_per_prompt,
                                     "completion": self.decode(resp), "golden_reward": s, "reference_score": rs,
                                     "win": 1.0 if s > rs else 0.5 if s == rs else 0.0}) + "\n")


@register("tldr", "hh")
class TextRuntime:
    """Everything the stages need from a real text task in the golden-RM setting (isdpo.tasks.base.Task)."""

    def __init__(self, task_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any], cache_dir: str | Path,
                 output_dir: str | Path | None = None):
        self.cfg, self.model_cfg = task_cfg, model_cfg
        self.cache_dir = Path(cache_dir)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.tokenizer = get_tokenizer(model_cfg)
        self.pad_id, self.eos_id = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        self.vocab_size = None  # pretrained checkpoints own their vocabulary
        self._golden = None
        self._prompt_text: dict[tuple, str] = {}
        tr = task_cfg["train"]
        if tr["preferences"] not in PREFERENCES:
            raise ValueError(f"task.train.preferences={tr['preferences']!r} is not known; allowed: {', '.join(PREFERENCES)}")

    # -- shared settings ---------------------------------------------------------------------

    @property
    def lengths(self) -> dict:
        c = self.cfg
        return {"max_length": int(c["max_length"]), "max_prompt_length": int(c["max_prompt_length"]),
                "truncate_responses": bool(c["truncate_responses"])}

    def _spec(self) -> dict:
        return data_spec(self.cfg)

    def upstream_stages(self) -> tuple[str, ...]:
        """The golden RM labels the pairs (when training on relabelled preferences) and judges every evaluation."""
        return ("reward", "relabel") if self.cfg["train"]["preferences"] == "relabelled" else ("reward",)

    def reference_source(self) -> str:
        return "sft"

    # -- SFT ---------------------------------------------------------------------------------

    def sft_key(self) -> dict:
        """No task name: TL;DR and HH share one SFT reference when their sft blocks agree (the paper pools them)."""
        return {"kind": "text", "tokenizer": tokenizer_source(self.model_cfg), **self.lengths,
                "content": sft_data_key(self.cfg["sft"])}

    def sft_examples(self) -> list[dict]:
        sft = self.cfg["sft"]
        out: list[dict] = []
        for name, spec in as_plain(sft["sources"]).items():
            rows = load_sft(spec, limit=sft.get("max_examples_per_source"))
            toks, _ = tokenize_sft(rows, self.tokenizer, name=f"sft/{name}", **self.lengths)
            out.extend(toks)
        require_nonempty(out, "the pooled SFT set")
        print(f"[isdpo] pooled SFT set: {len(out)} examples")
        return out

    # -- preference pairs --------------------------------------------------------------------

    def _relabelled_pairs(self, reference_dir: Path) -> tuple[list[dict], dict]:
        d = relabel_dir(self.cfg, self.model_cfg, self.cache_dir, reference_dir)
        check_complete(d, "relabelled preference set", "stage=relabel")
        f = pairs_file(d)
        rows = read_table(None, str(f), "train", ["prompt", "chosen", "rejected"])
        print(f"[isdpo] training on the golden-RM-labelled pairs of {f}")
        return rows, {}

    def preference_examples(self, reference, reference_dir: Path, precision: str | None = None) -> list[dict]:
        c, tr = self.cfg, self.cfg["train"]
        if tr["preferences"] == "relabelled":
            pairs, counts = self._relabelled_pairs(Path(reference_dir))
        else:
            pairs, counts = load_pairs(self._spec(), c["splits"]["train"])
        pairs = subsample(pairs, tr.get("max_pairs"), 0)
        examples, _ = tokenize_pairs(pairs, self.tokenizer, name=f"{c['name']}/train ({tr['preferences']})",
                                     pre_counts=counts, **self.lengths)
        require_nonempty(examples, f"the {c['name']} preference set")
        self._check_steps(len(examples))
        if tr.get("precompute_ref_logps") and reference is not None:
            examples, _, _ = add_reference_logps(
                examples, reference, pad_id=self.pad_id, cache_dir=self.cache_dir,
                tokenizer_key=tokenizer_source(self.model_cfg), lengths=self.lengths,
                batch_size=int(tr.get("ref_logps_batch_size", 32)), precision=precision)
        return examples

    def _check_steps(self, n: int) -> None:
        tr = self.cfg["train"]
        per_epoch = n // int(tr["global_batch_size"])
        want = per_epoch * int(tr.get("epochs", 1))
        msg = (f"[isdpo] {n} training pairs = {per_epoch} steps per epoch at global batch {tr['global_batch_size']}; "
               f"task.train.epochs={tr.get('epochs')} -> {want} steps; task.train.max_steps={tr['max_steps']}")
        print(msg)
        if want and abs(int(tr["max_steps"]) - want) > 0.1 * want:
            print(f"[isdpo] WARNING: task.train.max_steps={tr['max_steps']} is not ~{tr.get('epochs')} epochs "
                  f"({want} steps); set task.train.max_steps={want} to train {tr.get('epochs')} epochs")

    # -- golden reward -----------------------------------------------------------------------

    @property
    def golden(self):
        if self._golden is None:
            self._golden = GoldenRM(reward_dir(self.cfg, self.cache_dir),
                                    batch_size=int(self.cfg["reward"]["score_batch_size"]),
                                    max_length=int(self.cfg["max_length"]),
                                    max_prompt_length=int(self.cfg["max_prompt_length"]),
                                    dtype=self.cfg["reward"].get("score_dtype"))
        return self._golden

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _prompt(self, ids: Sequence[int]) -> str:
        key = tuple(ids)
        if key not in self._prompt_text:
            self._prompt_text[key] = self.decode(ids)
        return self._prompt_text[key]

    def score(self, prompts, responses) -> torch.Tensor:
        """Golden-RM scores of token-id prompts/responses (texts of known prompts are used as they were)."""
        return self.golden([self._prompt(p) for p in prompts], [self.decode(r) for r in responses])

    # -- evaluation --------------------------------------------------------------------------

    def eval_set(self, eval_cfg: Mapping[str, Any]) -> tuple[list[dict], list[str], list[str]]:
        """``n_prompts`` distinct prompts of the eval split (seeded subset) with their reference completion."""
        which = eval_cfg.get("reference", "chosen")
        if which not in REFERENCES:
            raise ValueError(f"task.eval.reference={which!r} is not known; allowed: {', '.join(REFERENCES)}")
        pairs, counts = load_pairs(self._spec(), self.cfg["splits"]["eval"])
        first: dict[str, dict] = {}
        for p in pairs:
            first.setdefault(p["prompt"], p)
        chosen = subsample(list(first.values()), int(eval_cfg["n_prompts"]), int(eval_cfg["seed"]))
        toks, _ = tokenize_pairs(chosen, self.tokenizer, name=f"{self.cfg['name']}/eval", keep_text=True,
                                 **self.lengths)
        require_nonempty(toks, f"the {self.cfg['name']} evaluation set")
        examples = [{"prompt_ids": t["prompt_ids"], "response_ids": t[f"{which}_ids"]} for t in toks]
        return examples, [t["prompt"] for t in toks], [t[which] for t in toks]

    def eval_pairs(self, reference, eval_cfg: Mapping[str, Any]) -> list[dict]:
        """``n_pairs`` pairs of the eval split with the data set's own labels (seeded subset), tokenized like the
        training pairs."""
        n = int(eval_cfg.get("n_pairs") or 0)
        if n == 0:
            return []
        pairs, counts = load_pairs(self._spec(), self.cfg["splits"]["eval"])
        examples, _ = tokenize_pairs(subsample(pairs, n, int(eval_cfg["seed"])), self.tokenizer,
                                     name=f"{self.cfg['name']}/eval pairs", pre_counts=counts, **self.lengths)
        return examples

    def evaluator(self, reference, eval_cfg: Mapping[str, Any]) -> TextEvaluator:
        examples, prompt_texts, ref_texts = self.eval_set(eval_cfg)
        prompts = [e["prompt_ids"] for e in examples]
        for ids, text in zip(prompts, prompt_texts):
            self._prompt_text[tuple(ids)] = text
        save = eval_cfg.get("save_completions") and self.output_dir is not None
        return TextEvaluator(
            prompts=prompts, reference_responses=[e["response_ids"] for e in examples], score_fn=self.score,
            reference=reference, pad_id=self.pad_id, eos_id=self.eos_id, max_new_tokens=int(eval_cfg["max_new_tokens"]),
            temperature=float(eval_cfg["temperature"]), top_p=float(eval_cfg["top_p"]),
            samples_per_prompt=int(eval_cfg["samples_per_prompt"]), kl_exact_sampling=bool(eval_cfg["kl_exact_sampling"]),
            seed=int(eval_cfg["seed"]), batch_size=int(eval_cfg["batch_size"]),
            decode=self.decode, completions_dir=(self.output_dir / "completions") if save else None,
            prompt_texts=prompt_texts, reference_texts=ref_texts,
        )
