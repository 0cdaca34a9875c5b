"""Sequence log-probabilities of responses under a causal LM: log pi(y|x), summed over the response tokens, for a
batch whose chosen and rejected responses are stacked along the batch axis (isdpo.data.collate), so one forward
per model serves both halves of every pair.

:func:`batch_logps` is the training module's entry point (padded batches, or packed padding-free ones:
:func:`packed_sequence_logps`); with ``response_only=True`` the LM head runs at the response positions only and
the [N, T, V] logits are never built. Every path gives the same numbers (tests/test_logprobs.py,
tests/test_fast_path.py). :func:`response_logps` and :func:`inference` serve evaluation and the reference pass.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Sequence

import torch
from torch import Tensor
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from isdpo.data.collate import pad_sequences


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip padding, so left-padded rows see the same positions as unpadded ones."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_(min=0)


def _supports_response_only(model) -> bool:
    # Models that post-process logits (soft-capping, scaling) must go through their own forward.
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return False
    return getattr(model, "base_model", None) is not model and model.get_output_embeddings() is not None


def selective_log_softmax(logits: Tensor, index: Tensor) -> Tensor:
    """log softmax(logits)[..., index] without materialising the full log-softmax."""
    logits = logits.float()
    picked = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logps(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    loss_mask: Tensor,
    *,
    response_only: bool = True,
    logits_processor: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Summed log-probs of the masked tokens of each row, and the number of such tokens.

    ``loss_mask[i, t] = 1`` marks token ``input_ids[i, t]`` as a response token; it
    is predicted from position ``t - 1``, so ``loss_mask[:, 0]`` must be 0.
    ``logits_processor`` maps [M, V] logits before the softmax (a sampling distribution's warpers).
    Returns ``(logps [N] float32, n_tokens [N] float32)``.
    """
    target_mask = loss_mask[:, 1:].bool()
    targets = input_ids[:, 1:]
    n_tokens = target_mask.sum(-1).float()
    if input_ids.shape[1] > 1:
        # The last position predicts nothing: the forward leaves it out (causal attention: no earlier position
        # sees it). Same log-probs; in training the weight gradients are summed over one position less, which
        # changes only their float rounding (bench/README.md).
        input_ids, attention_mask = input_ids[:, :-1], attention_mask[:, :-1]
    position_ids = position_ids_from_mask(attention_mask)
    if response_only and _supports_response_only(model):
        hidden = model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state[:, : targets.shape[1]]
        rows = target_mask.nonzero(as_tuple=True)[0]
        logits = model.get_output_embeddings()(hidden[target_mask])  # [M, V], M = response tokens
        if logits_processor is not None:
            logits = logits_processor(logits.float())
        token_logps = selective_log_softmax(logits, targets[target_mask])
        sums = torch.zeros(input_ids.shape[0], dtype=token_logps.dtype, device=input_ids.device)
        return sums.index_add(0, rows, token_logps), n_tokens
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).logits[:, : targets.shape[1]]
    if logits_processor is not None:
        logits = logits_processor(logits.float().reshape(-1, logits.shape[-1])).reshape(logits.shape)
    token_logps = selective_log_softmax(logits, targets)
    return (token_logps * target_mask).sum(-1), n_tokens


def _split_logps(model, input_ids, attention_mask, loss_mask, response_only):
    """Two forwards, chosen rows then rejected rows, each trimmed to its own longest row."""
    n = input_ids.shape[0] // 2
    out = []
    for rows in (slice(0, n), slice(n, None)):
        am = attention_mask[rows]
        width = int(am.any(0).nonzero().max()) + 1 if am.any() else am.shape[1]  # right padding: drop pad-only columns
        out.append(sequence_logps(model, input_ids[rows, :width], am[:, :width], loss_mask[rows, :width],
                                  response_only=response_only))
    return torch.cat([out[0][0], out[1][0]]), torch.cat([out[0][1], out[1][1]])


def packed_attention_mask(segment: Tensor, part: Tensor) -> Tensor:
    """[R, 1, C, C] bool mask of a packed batch (True = may attend).

    Slot q attends slot k iff both are in the same segment, k <= q (causal within the row, which
    is causal within the segment because a segment is contiguous), and k is a prompt slot
    (part 0) or of the same part as q; i.e. rejected tokens never see chosen tokens. Every slot
    attends itself, so padding rows of the mask are never empty (an empty softmax row is NaN,
    and a NaN activation would poison the weight gradients even where it is not used).
    """
    C = segment.shape[-1]
    causal = torch.ones(C, C, dtype=torch.bool, device=segment.device).tril_()
    same = segment[:, :, None] == segment[:, None, :]
    part_ok = (part[:, None, :] == 0) | (part[:, None, :] == part[:, :, None])
    eye = torch.eye(C, dtype=torch.bool, device=segment.device)
    return ((same & part_ok & causal) | eye).unsqueeze(1)


def _mask_for(model, mask: Tensor, dtype: torch.dtype) -> Tensor:
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl == "sdpa":
        return mask
    if impl == "eager":  # eager attention adds the mask to the scores
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    raise ValueError(
        f"packed batches need an attention implementation that takes an arbitrary 4D mask (sdpa or eager); "
        f"this model uses {impl!r}. Use padded batches (train.packing=false) or attn_implementation=sdpa"
    )


def packed_sequence_logps(model, batch, *, response_only: bool = True) -> tuple[Tensor, Tensor]:
    """Summed response log-probs of every row of a packed batch (isdpo.data.batching.PackedPreferenceCollator).

    One forward over the packed rows with each token's own position id and the block mask of
    :func:`packed_attention_mask`; the hidden state that predicts each scored token is gathered by
    its flat slot (for the first rejected token that is the last prompt token, not the slot just
    before it) and only those go through the LM head. Returns ``(logps [2B], n_tokens [2B])`` in
    the row order of the padded batch (chosen 0..B-1, rejected B..2B-1).
    """
    input_ids, position_ids = batch["input_ids"], batch["position_ids"]
    dtype = next(model.parameters()).dtype
    mask = _mask_for(model, packed_attention_mask(batch["pack_segment"], batch["pack_part"]), dtype)
    pred, targets, seq = batch["pack_pred_index"], batch["pack_target_ids"], batch["pack_target_seq"]
    n_tokens = batch["pack_n_tokens"]
    if response_only and _supports_response_only(model):
        hidden = model.base_model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                  use_cache=False).last_hidden_state
        logits = model.get_output_embeddings()(hidden.reshape(-1, hidden.shape[-1])[pred])
    else:
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
        logits = logits.reshape(-1, logits.shape[-1])[pred]
    token_logps = selective_log_softmax(logits, targets)
    sums = torch.zeros(n_tokens.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    return sums.index_add(0, seq, token_logps), n_tokens


def is_packed(batch) -> bool:
    return "pack_pred_index" in batch


def batch_logps(model, batch, *, response_only: bool = True, concatenated: bool = True) -> tuple[Tensor, Tensor]:
    """``(logps [2B], n_tokens [2B])`` of a preference batch, padded or packed (see the module docstring).

    ``concatenated=False`` (padded batches only) runs chosen and rejected rows as two forwards, as
    implementations without the concatenated forward do; same numbers, more kernel launches.
    """
    if is_packed(batch):
        return packed_sequence_logps(model, batch, response_only=response_only)
    if concatenated:
        return sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                              response_only=response_only)
    return _split_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], response_only)


def batch_token_counts(batch) -> tuple[int, int]:
    """``(sequence_tokens, computed_tokens)`` of a preference batch.

    sequence_tokens: prompt + response tokens of the 2B rows without padding (what throughput is
    counted in, the same for every batching of the same pairs). computed_tokens: non-padding slots
    the model actually runs (fewer than sequence_tokens when prompts are shared).
    """
    if is_packed(batch):
        return int(batch["pack_seq_lengths"].sum()), int((batch["pack_segment"] >= 0).sum())
    n = int(batch["attention_mask"].sum())
    return n, n


def compile_decoder(model, **kwargs):
    """``torch.compile`` the decoder body in place (``model.base_model``), the part both log-prob paths run.

    The LM head, the gather and the log-softmax stay eager (their shapes change with the number of
    response tokens). ``dynamic=True`` by default: batch lengths vary, and a static compile would
    recompile for every new length.
    """
    kwargs.setdefault("dynamic", True)
    model.base_model.compile(**kwargs)
    return model


@contextmanager
def inference(model, device: str | torch.device | None = None):
    """``model`` in eval mode under ``no_grad`` for the block, on ``device`` ("auto": CUDA when available;
    None: where it is); yields the device. Its device and train mode are restored afterwards, so a large
    frozen model holds accelerator memory only while it is used."""
    home = next(model.parameters()).device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else home
    target = torch.device(device) if device is not None else home
    was_training = model.training
    model.eval()
    if target != home:
        model.to(target)
    try:
        with torch.no_grad():
            yield target
    finally:
        if target != home:
            model.to(home)
        model.train(was_training)


# Lightning's mixed precisions (and their short aliases): every forward runs under torch.autocast to this dtype.
# The other precisions ("32-true", "bf16-true", ...) run the forward in the weights' own dtype.
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16, "16-mixed": torch.float16, "16": torch.float16}


def mixed_precision(precision: str | int | None) -> str | None:
    """``"bf16-mixed"``/``"16-mixed"`` when Lightning's ``precision`` is a mixed one (aliases included), else None."""
    dtype = AUTOCAST_DTYPES.get(str(precision))
    return None if dtype is None else ("bf16-mixed" if dtype == torch.bfloat16 else "16-mixed")


def precision_context(precision: str | int | None, device_type: str):
    """The forward context of Lightning's ``precision`` on ``device_type``, as its MixedPrecision plugin opens it
    (autocast without its weight cache) under a mixed precision; no context otherwise."""
    dtype = AUTOCAST_DTYPES.get(str(precision))
    return nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype, cache_enabled=False)


def sampling_warpers(temperature: float = 1.0, top_p: float = 1.0) -> Callable[[Tensor], Tensor] | None:
    """The logits warpers of ``generate(do_sample=True, temperature, top_p, top_k=0)``, as one function
    (None when they change nothing): the log-probs of the distribution responses were sampled from."""
    warpers = ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []) + (
        [TopPLogitsWarper(top_p)] if top_p < 1.0 else [])
    if not warpers:
        return None

    def apply(logits: Tensor) -> Tensor:
        for w in warpers:
            logits = w(None, logits)
        return logits

    return apply


def response_logps(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *, pad_id: int,
                   batch_size: int = 256, temperature: float = 1.0, top_p: float = 1.0,
                   sort_by_length: bool = False, device: str | torch.device | None = None,
                   precision: str | int | None = None) -> Tensor:
    """log p(y|x) [N] (float32, CPU) of token-id (prompt, response) pairs under a frozen ``model``, in batches.

    With ``temperature``/``top_p`` p is the model's sampling distribution under those warpers (behaviour
    log-probs). ``sort_by_length`` batches rows of similar length (less padding; results in input order).
    ``precision``: Lightning's, the forward runs as training's does (:func:`precision_context`); None: as it is.
    """
    order = (sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i])) if sort_by_length
             else list(range(len(prompts))))
    warp = sampling_warpers(temperature, top_p)
    out = torch.empty(len(order))
    with inference(model, device) as dev, precision_context(precision, dev.type):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            b = pad_sequences([prompts[i] for i in idx], [responses[i] for i in idx], pad_id)
            lp, _ = sequence_logps(model, b["input_ids"].to(dev), b["attention_mask"].to(dev), b["loss_mask"].to(dev),
                                   logits_processor=warp)
            out[idx] = lp.float().cpu()
    return out
