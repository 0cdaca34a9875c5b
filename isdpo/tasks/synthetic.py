"""The synthetic task wired for the stages: SFT data, cached preference set, evaluator."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from isdpo.artifacts import cached_dir
from isdpo.data.synthetic import SyntheticTask
from isdpo.evaluate import Evaluator
from isdpo.logprobs import response_logps
from isdpo.ref_cache import add_reference_logps
from isdpo.sampling import SampleSpec, sample_each, sample_responses
from isdpo.tasks.base import register

# Offsets keep the task's random streams disjoint: SFT data, preference prompts/samples/labels, eval prompts,
# held-out pairs (which prompts may appear where is the chain's seeded partition: SyntheticTask.heldout).
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
            heldout_fraction=task_cfg["heldout_prompt_fraction"],
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
                "response_length", "n_sft_sequences", "heldout_prompt_fraction")
        return {k: self.cfg[k] for k in keys}

    def sft_examples(self) -> list[dict]:
        return self.task.sft_examples(self.cfg["n_sft_sequences"], self._gen(_SFT_STREAM, self.cfg["sft"]["seed"]))

    def score(self, prompts, responses) -> torch.Tensor:
        return self.task.golden_reward(torch.as_tensor(prompts), torch.as_tensor(responses))

    def _labelled_pairs(self, reference, prompts: torch.Tensor, seeds: tuple[int, int], g: torch.Generator,
                        precision: str | None = None) -> list[dict]:
        """Two samples of ``reference`` per prompt at ``task.pref_temperature``, labelled by Bradley-Terry on the
        golden reward. Away from temperature 1 the samples are not pi_ref's, so each pair carries the sampling
        distribution's own log-probs (the behaviour policy mu of importance sampling)."""
        temp = float(self.cfg["pref_temperature"])
        two = [torch.tensor(r) for r in sample_each(
            reference, prompts.tolist(), [SampleSpec(temp, 1.0, s) for s in seeds],
            max_new_tokens=self.task.response_length, pad_id=self.pad_id, batch_size=2048,
        )]
        mu = None
        if temp != 1.0:
            mu = tuple(response_logps(reference, prompts.tolist(), r.tolist(), pad_id=self.pad_id, temperature=temp,
                                      batch_size=1000, precision=precision) for r in two)
        return self.task.label_pairs(prompts, two[0], two[1], g, behavior_logps=mu)

    def preference_examples(self, reference, reference_dir: Path, precision: str | None = None) -> list[dict]:
        """Pairs of reference samples of training-part prompts labelled by Bradley-Terry on the golden reward
        (cached; with several data-parallel ranks, rank 0 samples them and the others wait for the entry), with the
        behaviour log-probs when ``task.pref_temperature`` != 1 and the reference's log-probs of both responses
        when ``task.train.precompute_ref_logps`` (cached too: isdpo.ref_cache)."""
        seed = int(self.cfg["data_seed"])
        key = {"reference": str(reference_dir.name), "n_pref_prompts": self.cfg["n_pref_prompts"],
               "pref_temperature": self.cfg["pref_temperature"], "data_seed": seed,
               "good_tokens": list(self.cfg["good_tokens"]), "unsupported_penalty": self.cfg["unsupported_penalty"],
               "heldout_prompt_fraction": self.cfg["heldout_prompt_fraction"]}
        if self.cfg["pref_temperature"] != 1.0:  # behaviour log-probs, computed under the training precision
            key["behavior_logps_precision"] = str(precision)

        def build(tmp: Path) -> None:
            g = self._gen(_PREF_STREAM, seed)
            prompts = self.task.sample_prompts(self.cfg["n_pref_prompts"], g, part="train")
            pairs = self._labelled_pairs(reference, prompts, (seed * 1000, seed * 1000 + 1), g, precision)
            torch.save(pairs, tmp / "pairs.pt")

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
        """Held-out pairs made as the training pairs are, from held-out prompts; the same for every seed of a
        sweep."""
        n = int(eval_cfg.get("n_pairs") or 0)
        if n == 0:
            return []
        g = self._gen(_HELDOUT_STREAM, 0)
        prompts = self.task.sample_prompts(n, g, part=self._eval_part())
        return self._labelled_pairs(reference, prompts, (_HELDOUT_STREAM * 1000, _HELDOUT_STREAM * 1000 + 1), g)

    def _eval_part(self) -> str:
        return "heldout" if self.cfg["heldout_prompt_fraction"] > 0 else "any"

    def evaluator(self, reference, eval_cfg: Mapping[str, Any]) -> Evaluator:
        """Held-out prompts and one reference completion each."""
        prompts = self.task.sample_prompts(eval_cfg["n_prompts"], self._gen(_EVAL_STREAM, 0),
                                           part=self._eval_part()).tolist()
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
