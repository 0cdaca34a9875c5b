"""Collators: token-id examples -> padded tensors.

A preference example is a dict with ``prompt_ids``, ``chosen_ids`` and
``rejected_ids`` (lists of ints, responses without the prompt) and optionally
``chosen_behavior_logp`` / ``rejected_behavior_logp`` (log mu of each response,
for importance sampling with mu != pi_ref) and ``chosen_ref_logp`` /
``rejected_ref_logp`` (precomputed reference log-probs). The collator stacks
chosen rows first and rejected rows second, so one forward serves both.
"""
from __future__ import annotations

from typing import Sequence

import torch

OPTIONAL_FLOATS = ("chosen_behavior_logp", "rejected_behavior_logp", "chosen_ref_logp", "rejected_ref_logp")


def pad_sequences(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    *,
    left: bool = False,
    multiple_of: int = 1,
) -> dict[str, torch.Tensor]:
    """Concatenate prompt+response per row and pad; ``loss_mask`` marks response tokens."""
    rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
    length = max(len(r) for r in rows)
    length = -(-length // multiple_of) * multiple_of
    n = len(rows)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    loss_mask = torch.zeros((n, length), dtype=torch.long)
    for i, (p, row) in enumerate(zip(prompts, rows)):
        start = length - len(row) if left else 0
        input_ids[i, start : start + len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, start : start + len(row)] = 1
        loss_mask[i, start + len(p) : start + len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


class PreferenceCollator:
    """Pairs -> one [2B, T] batch (chosen rows 0..B-1, rejected rows B..2B-1), right-padded."""

    def __init__(self, pad_id: int, multiple_of: int = 1):
        self.pad_id = pad_id
        self.multiple_of = multiple_of

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        prompts = [e["prompt_ids"] for e in examples] * 2
        responses = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        batch = pad_sequences(prompts, responses, self.pad_id, multiple_of=self.multiple_of)
        for key in OPTIONAL_FLOATS:
            if all(key in e and e[key] is not None for e in examples):
                batch[key] = torch.tensor([float(e[key]) for e in examples], dtype=torch.float32)
        return batch


class SFTCollator:
    """Prompt/response examples (``prompt_ids``, ``response_ids``) -> a right-padded batch."""

    def __init__(self, pad_id: int, multiple_of: int = 1):
        self.pad_id = pad_id
        self.multiple_of = multiple_of

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return pad_sequences(
            [e["prompt_ids"] for e in examples],
            [e["response_ids"] for e in examples],
            self.pad_id,
            multiple_of=self.multiple_of,
        )
