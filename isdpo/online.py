"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", arXiv 2402.04792):
each step's pairs are two fresh samples of the CURRENT policy per prompt, labelled by Bradley-Terry on the golden
reward, P(y1 beats y2) = sigmoid(r(y1) - r(y2)). It is the objective IS-DPO estimates without bias (IS-DAA paper,
arXiv 2506.08681, Theorem 1; docs/method.md). ``loss.online=true`` trains any base loss this way
(isdpo.module.PreferenceModule calls :class:`OnlinePairs` on the prompts of each micro-batch).
"""
from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import torch

from isdpo.sampling import SampleSpec, sample_each


class PromptCollator:
    """Preference examples -> ``{"prompt_ids": [...]}``: the prompts an online step samples its pairs for."""

    def __call__(self, examples: list[dict]) -> dict[str, list[list[int]]]:
        return {"prompt_ids": [list(e["prompt_ids"]) for e in examples]}


class OnlinePairs:
    """Builds a step's pair batch from the policy: two samples per prompt (temperature 1, top-p 1: samples of
    the policy itself), labelled by Bradley-Terry on ``score`` (the task's golden reward), stacked by ``collate``
    (the offline path's collator).

    The samples and labels depend only on (``seed``, ``step``, the prompts): they are drawn from generators seeded
    by a hash of the three, never from the global random state, so a resumed run draws what an uninterrupted one
    would, and two micro-batches of one optimizer step (other prompts) draw apart.
    """

    def __init__(self, score: Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], torch.Tensor],
                 collate: Callable[[list[dict]], dict], *, pad_id: int, eos_id: int | None, max_new_tokens: int,
                 seed: int):
        self.score, self.collate = score, collate
        self.pad_id, self.eos_id, self.max_new_tokens, self.seed = pad_id, eos_id, int(max_new_tokens), int(seed)

    def seeds(self, step: int, prompts: Sequence[Sequence[int]]) -> tuple[int, int, int]:
        """Seeds of the first samples, the second samples and the labels of ``prompts`` at ``step``."""
        h = hashlib.blake2b(digest_size=24)
        h.update(f"{self.seed}:{int(step)}:{len(prompts)}".encode())
        for p in prompts:
            h.update(b"|" + ",".join(map(str, p)).encode())
        d = h.digest()
        return tuple(int.from_bytes(d[i:i + 8], "little") >> 1 for i in (0, 8, 16))  # 63 bits: any torch seed

    def pairs(self, policy, prompts: Sequence[Sequence[int]], step: int) -> list[dict]:
        """The labelled pairs ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` of ``prompts`` at ``step``."""
        prompts = [list(p) for p in prompts]
        s1, s2, s_label = self.seeds(step, prompts)
        # One pass for both samples (one forward per token); each has its own stream (isdpo.sampling).
        first, second = sample_each(policy, prompts, [SampleSpec(1.0, 1.0, s1), SampleSpec(1.0, 1.0, s2)],
                                    max_new_tokens=self.max_new_tokens, pad_id=self.pad_id, eos_id=self.eos_id,
                                    batch_size=max(1, len(prompts)))
        r = torch.as_tensor(self.score(prompts + prompts, first + second), dtype=torch.float64).cpu()
        r1, r2 = r[: len(prompts)], r[len(prompts):]
        u = torch.rand(len(prompts), generator=torch.Generator().manual_seed(s_label), dtype=torch.float64)
        first_wins = (u < torch.sigmoid(r1 - r2)).tolist()
        return [{"prompt_ids": p, "chosen_ids": a if w else b, "rejected_ids": b if w else a}
                for p, a, b, w in zip(prompts, first, second, first_wins)]

    def __call__(self, policy, prompts: Sequence[Sequence[int]], step: int) -> dict:
        """The collated batch of :meth:`pairs` (on the CPU)."""
        return self.collate(self.pairs(policy, prompts, step))
