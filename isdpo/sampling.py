"""Batched sampling from a causal LM with a KV cache and left padding."""
from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from isdpo.data.collate import pad_sequences
from isdpo.logprobs import inference


def sample_responses(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pad_id: int,
    eos_id: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
) -> list[list[int]]:
    """One sampled response per prompt (token ids, without the prompt, cut after EOS).

    Sampling runs inside ``torch.random.fork_rng`` seeded with ``seed``: the same
    seed gives the same samples, and the caller's RNG stream (training!) is left
    untouched, which keeps resumed runs identical to uninterrupted ones.
    Without ``eos_id`` every response has exactly ``max_new_tokens`` tokens.
    """
    out: list[list[int]] = []
    with inference(model) as device, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc="sampling", disable=not progress, leave=False):
            chunk = prompts[start : start + batch_size]
            batch = pad_sequences(chunk, [[] for _ in chunk], pad_id, left=True)
            gen = model.generate(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                max_new_tokens=max_new_tokens,
                min_new_tokens=None if eos_id is not None else max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
                use_cache=True,
            )
            new = gen[:, batch["input_ids"].shape[1] :].tolist()
            for row in new:
                if eos_id is not None and eos_id in row:
                    row = row[: row.index(eos_id) + 1]
                out.append(row)
    return out
