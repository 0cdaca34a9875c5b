"""Batched sampling from a causal LM with a KV cache and left padding: the same samples as Hugging Face's
``generate(do_sample=True, top_k=0)`` for the same seed (tests/test_sampling.py), without its per-call and per-step
overhead; only temperature and top-p shape the distribution, whatever a checkpoint's generation config says.

:func:`sample_each` samples several settings (temperature, top-p, seed) of the same prompts in one pass, each from
its own generator, and optionally returns each sample's log-probability under the model's own distribution (the
evaluation's KL needs no second forward); :func:`sample_responses` is the one-setting form.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from isdpo.data.collate import pad_sequences
from isdpo.logprobs import inference, sampling_warpers


@dataclass(frozen=True)
class SampleSpec:
    """One sampling setting: the temperature and top-p warpers, and the seed of its random stream."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


def _cache_key(model) -> str:
    # transformers 5 names the KV cache argument (and output) `cache`; 4.x `past_key_values`.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def sample_each(
    model,
    prompts: Sequence[Sequence[int]],
    specs: Sequence[SampleSpec],
    *,
    max_new_tokens: int,
    pad_id: int,
    eos_id: int | None = None,
    batch_size: int = 256,
    progress: bool = False,
    logps: bool = False,
):
    """For each of ``specs``, one sampled response per prompt (token ids without the prompt, cut after EOS);
    with ``logps``, ``(responses, log_probs)``: ``log_probs[j]`` [len(prompts)] float32 of log p(y|x) of setting
    j's responses under the unwarped model (the tokens up to and including EOS).

    ``batch_size`` prompts are sampled together (per setting: it decides which draws of the stream go to
    which prompt, as in ``generate``). Each setting's stream is ``torch.Generator`` seeded with its seed and
    continued over the batches; the global random state (training's) is not touched, which keeps resumed
    runs identical to uninterrupted ones. Without ``eos_id`` every response has ``max_new_tokens`` tokens.
    """
    k = len(specs)
    results: list[list[list[int]]] = [[] for _ in specs]
    sums: list[torch.Tensor] = []  # per batch: [k * n] summed log-probs of the drawn tokens
    with inference(model) as device:
        key = _cache_key(model)
        gens = [torch.Generator(device=device).manual_seed(int(s.seed)) for s in specs]
        warps = [sampling_warpers(s.temperature, s.top_p) for s in specs]
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc="sampling", disable=not progress, leave=False):
            chunk = prompts[start : start + batch_size]
            n = len(chunk)
            batch = pad_sequences(chunk, [[] for _ in chunk], pad_id, left=True)
            inputs = batch["input_ids"].to(device).repeat(k, 1)  # setting j's rows: j*n .. (j+1)*n - 1
            mask = batch["attention_mask"].to(device).repeat(k, 1)
            unfinished = torch.ones(k * n, dtype=torch.long, device=device)
            drawing = [True] * k  # a setting whose rows all reached EOS stops drawing, as its own generate would
            tokens, cache = [], None
            total = torch.zeros(k * n, dtype=torch.float32, device=device) if logps else None
            for step in range(max_new_tokens):
                out = model(input_ids=inputs, attention_mask=mask, use_cache=True, return_dict=True,
                            **({key: cache} if cache is not None else {}))
                cache = out[key]
                logits = out.logits[:, -1].to(copy=True, dtype=torch.float32)
                nxt = torch.full((k * n,), pad_id, dtype=torch.long, device=device)
                live = unfinished.clone() if logps else None  # rows drawing a response token (EOS included) now
                for j in range(k):
                    if not drawing[j]:
                        continue
                    rows = slice(j * n, (j + 1) * n)
                    scores = warps[j](logits[rows]) if warps[j] is not None else logits[rows]
                    probs = torch.nn.functional.softmax(scores, dim=-1)
                    drawn = torch.multinomial(probs, num_samples=1, generator=gens[j]).squeeze(1)
                    if eos_id is not None:  # finished rows get padding, as in generate
                        drawn = drawn * unfinished[rows] + pad_id * (1 - unfinished[rows])
                        unfinished[rows] &= (drawn != eos_id).long()
                    nxt[rows] = drawn
                if logps:
                    picked = logits.gather(1, nxt[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
                    total += torch.where(live.bool(), picked, torch.zeros_like(picked))
                tokens.append(nxt)
                if eos_id is not None:
                    done = unfinished.view(k, n).amax(1).eq(0).tolist()  # one host sync per step, as generate's
                    drawing = [d and not f for d, f in zip(drawing, done)]
                    if not any(drawing):
                        break
                if step + 1 < max_new_tokens:
                    inputs = nxt[:, None]
                    mask = torch.cat([mask, mask.new_ones(k * n, 1)], dim=1)
            new = torch.stack(tokens, dim=1).tolist()
            if logps:
                sums.append(total.view(k, n).cpu())
            for j in range(k):
                for row in new[j * n : (j + 1) * n]:
                    if eos_id is not None and eos_id in row:
                        row = row[: row.index(eos_id) + 1]
                    results[j].append(row)
    if logps:
        per_spec = torch.cat(sums, dim=1) if sums else torch.zeros(k, 0)
        return results, [per_spec[j] for j in range(k)]
    return results


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
    """One sampled response per prompt (token ids, without the prompt, cut after EOS): :func:`sample_each` with
    one setting. The same seed gives the same samples; the caller's random state is left untouched."""
    return sample_each(model, prompts, [SampleSpec(temperature, top_p, seed)], max_new_tokens=max_new_tokens,
                       pad_id=pad_id, eos_id=eos_id, batch_size=batch_size, progress=progress)[0]
