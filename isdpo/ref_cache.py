"""Reference log-probs precomputed once before preference training and cached (TRL's
``precompute_ref_log_probs``): each example then carries ``chosen_ref_logp`` / ``rejected_ref_logp`` and
isdpo.module.PreferenceModule needs no reference forward.

The entry (``<cache_dir>/ref_logps/<hash>``, built once for all the jobs and ranks of a sweep: isdpo.artifacts) is
keyed by the reference's weights themselves, the tokenizer and length settings, every pair's token ids and a mixed
training precision (:func:`add_reference_logps`), so a retrained reference never reuses stale numbers. They are the
online path's up to float rounding (tests/test_real_pipeline.py).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from isdpo.artifacts import cached_dir
from isdpo.logprobs import mixed_precision, response_logps


def weights_fingerprint(model) -> str:
    """sha256 over every state-dict tensor (name, shape, dtype, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data_fingerprint(examples: Sequence[Mapping[str, Any]]) -> str:
    """sha256 over the token ids of every pair, in order."""
    h = hashlib.sha256()
    for e in examples:
        for k in ("prompt_ids", "chosen_ids", "rejected_ids"):
            h.update(np.asarray(e[k], dtype=np.int64).tobytes())
            h.update(b"|")
        h.update(b"\n")
    return h.hexdigest()


def compute_reference_logps(reference, examples: Sequence[Mapping[str, Any]], *, pad_id: int,
                            batch_size: int = 32, device: str | torch.device | None = "auto",
                            precision: str | int | None = None) -> torch.Tensor:
    """[N, 2] float32: log pi_ref(chosen|x), log pi_ref(rejected|x), rows sorted by length into batches, the
    forward under Lightning's ``precision`` (hardware.precision) as in training."""
    prompts = [e["prompt_ids"] for e in examples] * 2
    responses = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    out = response_logps(reference, prompts, responses, pad_id=pad_id, batch_size=batch_size, sort_by_length=True,
                         device=device, precision=precision)
    n = len(examples)
    return torch.stack([out[:n], out[n:]], dim=1)


def add_reference_logps(
    examples: list[dict],
    reference,
    *,
    pad_id: int,
    cache_dir: str | Path,
    tokenizer_key: Any = None,
    lengths: Mapping[str, Any] | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = "auto",
    precision: str | int | None = None,
) -> tuple[list[dict], Path, bool]:
    """Copies of ``examples`` with ``chosen_ref_logp``/``rejected_ref_logp``; ``(examples, entry, hit)``.
    ``precision``: the training's (hardware.precision); None = float32."""
    key = {"weights": weights_fingerprint(reference), "data": data_fingerprint(examples), "n": len(examples),
           "tokenizer": tokenizer_key, "lengths": dict(lengths or {})}
    mixed = mixed_precision(precision)
    if mixed is not None:  # only then: float32's entries keep the key they had before precision was in it
        key["precision"] = mixed

    def build(tmp: Path) -> None:
        torch.save(compute_reference_logps(reference, examples, pad_id=pad_id, batch_size=batch_size, device=device,
                                           precision=mixed), tmp / "ref_logps.pt")

    path, hit = cached_dir(cache_dir, "ref_logps", key, build)
    logps = torch.load(path / "ref_logps.pt")
    if logps.shape != (len(examples), 2):
        raise RuntimeError(f"cached reference log-probs at {path} have shape {tuple(logps.shape)}, "
                           f"expected ({len(examples)}, 2)")
    out = [{**e, "chosen_ref_logp": float(c), "rejected_ref_logp": float(r)} for e, (c, r) in zip(examples, logps.tolist())]
    print(f"[isdpo] reference log-probs of {len(out)} pairs {'reused from cache' if hit else 'precomputed'}: {path}")
    return out, path, hit
