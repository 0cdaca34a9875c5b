"""The synthetic task wired for the stages: SFT data, cached preference set, evaluator."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from isdpo.artifacts import cached_dir
from isdpo.data.synthetic import SyntheticTask
from isdpo.evaluate import Evaluator
from isdpo.ref_cache import add_reference_logps
from isdpo.sampling import SampleSpec, sample_each, sample_responses
from isdpo.tasks.base import register

# Offsets keep the task's random streams disjoint: SFT data, preference prompts/samples/labels, eval prompts,
# held-out pairs.
_SFT_STREAM, _PREF_STREAM, _EVAL_STREAM, _HELDOUT_STREAM = 1, 2, 3, 4


@register("synthetic")
class SyntheticRuntime:
    """Everything the stages need from the synthetic task (isdpo.tasks.base.Task)."""

    tokenizer = None  # token-level task: no text

    def __init__(self, task_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any] | None, cache_dir: str | Path,
                 output_dir: str | Path | None = None):
        self.cfg = task_cfg
        self.cache_dir = Path(cache_dir)
        self.task = SyntheticTask(
            n_states=task_cfg["n_states"], n_successors=task_cfg["n_successors"],
            prompt_length=task_cfg["prompt_length"], response_length=task_cfg["response_length"],
            dirichlet_alpha=task_cfg["dirichlet_alpha"], good_tokens=tuple(task_cfg["good_tokens"]),
            unsupported_penalty=task_cfg["unsupported_penalty"], seed=task_cfg["chain_seed"],
        )
        self.pad_id, self.eos_id, self.vocab_size = self.task.pad_id, None, self.task.vocab_size

    def upstream_stages(self) -> tuple[str, ...]:
        return ()  # the golden reward is an exact function

    def reference_source(self) -> str:
        return "sft"

    def _gen(self, stream: int, seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed * 1000 + stream)

    def sft_key(self) -> dict:
        keys = ("name", "chain_seed", "n_states", "n_successors", "dirichlet_alpha", "prompt_length",
                "response_length", "n_sft_sequences")
        return {k: self.cfg[k] for k in keys}

    def sft_examples(self) -> list[dict]:
        return self.task.sft_examples(self.cfg["n_sft_sequences"], self._gen(_SFT_STREAM, self.cfg["sft"]["seed"]))

    def score(self, prompts, responses) -> torch.Tensor:
        return self.task.golden_reward(torch.as_tensor(prompts), torch.as_tensor(responses))

    def preference_examples(self, reference, reference_dir: Path, precision: str | None = None) -> list[dict]:
        """Pairs of reference samples labelled by Bradley-Terry on the golden reward (cached; with several
        data-parallel ranks, rank 0 samples them and the others wait for the entry), with the reference's
        log-probs of both responses when ``task.train.precompute_ref_logps`` (cached too: isdpo.ref_cache)."""
        seed = int(self.cfg["data_seed"])
        key = {"reference": str(reference_dir.name), "n_pref_prompts": self.cfg["n_pref_prompts"],
               "pref_temperature": self.cfg["pref_temperature"], "data_seed": seed,
               "good_tokens": list(self.cfg["good_tokens"]), "unsupported_penalty": self.cfg["unsupported_penalty"]}

        def build(tmp: Path) -> None:
            g = self._gen(_PREF_STREAM, seed)
            prompts = self.task.sample_prompts(self.cfg["n_pref_prompts"], g)
            temp = self.cfg["pref_temperature"]
            two = [torch.tensor(r) for r in sample_each(
                reference, prompts.tolist(), [SampleSpec(temp, 1.0, seed * 1000 + k) for k in range(2)],
                max_new_tokens=self.task.response_length, pad_id=self.pad_id, batch_size=2048,
            )]
            torch.save(self.task.label_pairs(prompts, two[0], two[1], g), tmp / "pairs.pt")

        path, _ = cached_dir(self.cache_dir, "preferences", key, build)
        pairs = torch.load(path / "pairs.pt")
        tr = self.cfg["train"]
        if tr.get("precompute_ref_logps") and reference is not None:
            # One reference pass for all the runs of a sweep on these pairs, instead of a reference forward per step.
            pairs, _, _ = add_reference_logps(pairs, reference, pad_id=self.pad_id, cache_dir=self.cache_dir,
                                              batch_size=int(tr.get("ref_logps_batch_size", 1000)),
                                              precision=precision)
        return pairs

    def eval_pairs(self, reference, eval_cfg: Mapping[str, Any]) -> list[dict]:
        """Held-out pairs made as the training pairs are (two reference samples per prompt, Bradley-Terry labels)
        from held-out prompts; the same for every seed of a sweep."""
        n = int(eval_cfg.get("n_pairs") or 0)
        if n == 0:
            return []
        g = self._gen(_HELDOUT_STREAM, 0)
        prompts = self.task.sample_prompts(n, g)
        temp = self.cfg["pref_temperature"]
        two = [torch.tensor(r) for r in sample_each(
            reference, prompts.tolist(), [SampleSpec(temp, 1.0, _HELDOUT_STREAM * 1000 + k) for k in range(2)],
            max_new_tokens=self.task.response_length, pad_id=self.pad_id, batch_size=2048,
        )]
        return self.task.label_pairs(prompts, two[0], two[1], g)

    def evaluator(self, reference, eval_cfg: Mapping[str, Any]) -> Evaluator:
        """Held-out prompts (a stream disjoint from training) and one reference completion each."""
        prompts = self.task.sample_prompts(eval_cfg["n_prompts"], self._gen(_EVAL_STREAM, 0)).tolist()
        ref_resp = sample_responses(
            reference, prompts, max_new_tokens=self.task.response_length, pad_id=self.pad_id,
            temperature=eval_cfg["temperature"], top_p=eval_cfg["top_p"], seed=eval_cfg["seed"] + 7,
            batch_size=eval_cfg["batch_size"],
        )
        return Evaluator(
            prompts=prompts, reference_responses=ref_resp, score_fn=self.score, reference=reference,
            pad_id=self.pad_id, eos_id=None, max_new_tokens=eval_cfg["max_new_tokens"],
            temperature=eval_cfg["temperature"], top_p=eval_cfg["top_p"],
            samples_per_prompt=eval_cfg["samples_per_prompt"], kl_exact_sampling=eval_cfg["kl_exact_sampling"],
            seed=eval_cfg["seed"], batch_size=eval_cfg["batch_size"], score_batch_size=eval_cfg.get("score_batch_size"),
        )
