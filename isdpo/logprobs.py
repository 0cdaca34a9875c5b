"""Sequence log-probabilities of responses under a causal LM.

Every DAA in isdpo.losses needs, per sequence, log pi(y|x) = sum over response
tokens of log pi(y_t | x, y_<t). This module computes it for a batch in which
chosen and rejected responses are stacked along the batch axis (see
isdpo.data.collate), so ONE forward per model serves both halves of every pair.

Two paths give the same numbers (tests/test_logprobs.py):
- ``response_only=True`` (default): run the decoder body, keep the hidden states
  at the response positions only and apply the LM head to those. Neither the
  full [N, T, V] logits nor a [N, T, V] log-softmax is ever built; prompt and
  padding positions cost nothing in the head.
- ``response_only=False``: the model's own forward and a selective log-softmax
  (gather minus logsumexp, as TRL's ``selective_log_softmax``) over all positions.
"""
from __future__ import annotations

import torch
from torch import Tensor


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
) -> tuple[Tensor, Tensor]:
    """Summed log-probs of the masked tokens of each row, and the number of such tokens.

    ``loss_mask[i, t] = 1`` marks token ``input_ids[i, t]`` as a response token; it
    is predicted from position ``t - 1``, so ``loss_mask[:, 0]`` must be 0.
    Returns ``(logps [N] float32, n_tokens [N] float32)``.
    """
    position_ids = position_ids_from_mask(attention_mask)
    target_mask = loss_mask[:, 1:].bool()
    targets = input_ids[:, 1:]
    n_tokens = target_mask.sum(-1).float()
    if response_only and _supports_response_only(model):
        hidden = model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state[:, :-1]
        rows = target_mask.nonzero(as_tuple=True)[0]
        logits = model.get_output_embeddings()(hidden[target_mask])  # [M, V], M = response tokens
        token_logps = selective_log_softmax(logits, targets[target_mask])
        sums = torch.zeros(input_ids.shape[0], dtype=token_logps.dtype, device=input_ids.device)
        return sums.index_add(0, rows, token_logps), n_tokens
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).logits[:, :-1]
    token_logps = selective_log_softmax(logits, targets)
    return (token_logps * target_mask).sum(-1), n_tokens
