"""How a training run is put together from plain values: the model's memory and speed switches, the
loaders with their collators, and the preference module. stage=sft, stage=reward, stage=align and
bench/ build their runs here, so a switch means the same thing everywhere."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from isdpo.data.batching import LengthGroupedLoader, PackedPreferenceCollator
from isdpo.data.collate import PreferenceCollator, SFTCollator
from isdpo.data.loader import ResumableLoader
from isdpo.logprobs import compile_decoder
from isdpo.losses import DAALoss
from isdpo.models import add_lora
from isdpo.module import PreferenceModule
from isdpo.online import OnlinePairs, PromptCollator


def prepare_model(model, *, activation_checkpointing: bool = False, strategy: str = "auto", compile: bool = False,
                  lora: Mapping[str, Any] | None = None, seed: int = 0, trainable: Sequence[str] = ()):
    """Apply ``lora`` (the adapters of ``peft=lora`` or ``task.reward.lora``, drawn from ``seed``; ``trainable``:
    modules that train in full beside them), ``hardware.activation_checkpointing`` (FSDP does it through its
    strategy instead) and ``task.train.compile`` to a model about to be trained; returns it."""
    if lora is not None:  # first: the adapters are part of what is checkpointed and compiled
        model = add_lora(model, lora, seed=seed, trainable=trainable)
    if activation_checkpointing and strategy != "fsdp":
        model.gradient_checkpointing_enable()
    if compile:
        compile_decoder(model)
    return model


def pair_collator(pad_id: int, *, packing: bool = False, share_prompt: bool = True):
    """Chosen and rejected stacked in one padded batch, or packed padding-free rows (``packing``)."""
    return PackedPreferenceCollator(pad_id, share_prompt=share_prompt) if packing else PreferenceCollator(pad_id)


def pair_loader(pairs: Sequence[dict], *, batch_size: int, seed: int, pad_id: int, num_workers: int = 0,
                shuffle: bool = True, length_grouped: bool = False, group_batches: int = 64, packing: bool = False,
                share_prompt: bool = True, prompts_only: bool = False, accumulate: int = 1):
    """A seeded, rank-sharded, resumable loader of preference pairs (length-grouped when asked); with
    ``prompts_only`` (online training) the same order of the pairs' prompts alone. Each epoch holds whole
    optimizer steps of ``accumulate`` micro-batches."""
    collate = PromptCollator() if prompts_only else pair_collator(pad_id, packing=packing, share_prompt=share_prompt)
    if length_grouped:
        return LengthGroupedLoader(pairs, batch_size=batch_size, seed=seed, shuffle=shuffle, collate_fn=collate,
                                   num_workers=num_workers, group_batches=group_batches, accumulate=accumulate)
    return ResumableLoader(pairs, batch_size=batch_size, seed=seed, shuffle=shuffle, collate_fn=collate,
                           num_workers=num_workers, accumulate=accumulate)


def sft_loader(examples: Sequence[dict], *, batch_size: int, seed: int, pad_id: int, num_workers: int = 0,
               accumulate: int = 1):
    """A seeded, rank-sharded, resumable loader of (prompt, response) examples (whole optimizer steps per epoch)."""
    return ResumableLoader(examples, batch_size=batch_size, seed=seed, collate_fn=SFTCollator(pad_id),
                           num_workers=num_workers, accumulate=accumulate)


def preference_module(policy, reference, loss_fn: DAALoss, *, lr: float, weight_decay: float = 0.0,
                      warmup_steps: int = 0, schedule: str = "constant", response_only: bool = True,
                      concatenated: bool = True, fused_adamw: bool = False, strategy: str = "auto",
                      online: OnlinePairs | None = None) -> PreferenceModule:
    """The preference module (``online``: each step samples its pairs, isdpo.online); the fused AdamW kernel is
    not used under FSDP (it needs whole parameters)."""
    return PreferenceModule(policy, reference, loss_fn, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                            schedule=schedule, response_only=response_only, concatenated=concatenated,
                            fused_adamw=fused_adamw and strategy != "fsdp", online=online)
