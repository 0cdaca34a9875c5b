"""The golden reward model: a sequence classifier with one output, its Bradley-Terry loss, and scoring.

In the golden-reward setting (Gao et al. 2022, arXiv 2210.10760; arXiv 2506.08681 section 5 and
docs/method.md) a golden RM stands in for human raters: it labels the preference pairs
(stage=relabel) and judges every evaluation of a text task. r(x, y) is the score head on the hidden
state of the LAST real token of prompt + response (found from the attention mask, never from the
pad id, so a pad token equal to EOS is harmless). The RM scores TEXT: prompts and responses are
re-tokenized with its own tokenizer under the tasks' truncation policy, so the policy and the RM may
use different tokenizers. Training it is stage=reward (isdpo.stages.reward); the LightningModule is
isdpo.module.RewardModule.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from isdpo.artifacts import check_complete, model_subdir, read_meta
from isdpo.data.collate import pad_sequences
from isdpo.data.tokenization import encode_prompts, encode_responses, fit_lengths
from isdpo.logprobs import inference, position_ids_from_mask
from isdpo.models import release_gguf_quantizer, torch_dtype


def load_reward_model(model_cfg: Mapping[str, Any], *, path: str | None = None, pad_token_id: int | None = None):
    """``AutoModelForSequenceClassification(num_labels=1)`` from ``path`` or the model config's checkpoint.

    A causal-LM checkpoint (e.g. the SFT model) loads with a freshly initialised score head.
    """
    source = path or model_cfg.get("pretrained")
    if not source:
        raise ValueError(f"reward model {model_cfg.get('name')!r}: `pretrained` is null; a golden RM needs a checkpoint")
    kwargs: dict[str, Any] = {"num_labels": 1, "dtype": torch_dtype(model_cfg.get("dtype", "float32"))}
    if model_cfg.get("gguf_file") and path is None:
        kwargs["gguf_file"] = model_cfg["gguf_file"]
    if model_cfg.get("attn_implementation"):
        kwargs["attn_implementation"] = model_cfg["attn_implementation"]
    model = release_gguf_quantizer(AutoModelForSequenceClassification.from_pretrained(source, **kwargs))
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model


def score_head_names(model) -> tuple[str]:
    """(the attribute name of the model's score head,): what trains in full beside LoRA adapters."""
    for name in ("score", "classifier"):
        if getattr(model, name, None) is not None:
            return (name,)
    raise ValueError(f"{type(model).__name__} has no `score` or `classifier` head")


def _score_head(model):
    return getattr(model, score_head_names(model)[0])


def sequence_rewards(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """r(x, y) per row [N] (float32): the score head on the last attended position (any padding side)."""
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    last = attention_mask.long().cumsum(-1).argmax(-1)  # first index reaching the max = the last real token
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return _score_head(model)(h).squeeze(-1).float()


def bradley_terry_loss(chosen: Tensor, rejected: Tensor) -> tuple[Tensor, Tensor]:
    """(mean -log sigmoid(r_w - r_l), accuracy = mean 1[r_w > r_l])."""
    return -F.logsigmoid(chosen - rejected).mean(), (chosen > rejected).float().mean()


def rm_inputs(tokenizer, prompts: Sequence[str], responses: Sequence[str], *, max_length: int = 640,
              max_prompt_length: int = 512) -> tuple[list[list[int]], list[list[int]]]:
    """The RM's token ids for (prompt, response) texts: the tasks' truncation policy, EOS appended."""
    ps = encode_prompts(tokenizer, list(prompts))
    rs = encode_responses(tokenizer, list(responses))
    out_p, out_r = [], []
    for p, r in zip(ps, rs):
        if not p:  # an empty prompt still needs one position before the response
            p = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
        fitted = fit_lengths(p, [r], max_length=max_length, max_prompt_length=max_prompt_length,
                             bos_id=tokenizer.bos_token_id, truncate_responses=True)
        p, (r,) = fitted
        out_p.append(p)
        out_r.append(r)
    return out_p, out_r


def score(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32, *,
          max_length: int = 640, max_prompt_length: int = 512, device: str | torch.device | None = "auto") -> Tensor:
    """Golden-RM scores [N] (float32, CPU) of (prompt, response) texts.

    Rows are sorted by length into batches (less padding) and returned in the input order. The model
    runs on ``device`` (default: CUDA when available) for the call only (isdpo.logprobs.inference).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        return torch.zeros(0)
    ps, rs = rm_inputs(tokenizer, prompts, responses, max_length=max_length, max_prompt_length=max_prompt_length)
    order = sorted(range(len(ps)), key=lambda i: len(ps[i]) + len(rs[i]))
    out = torch.empty(len(ps))
    with inference(model, device) as dev:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            b = pad_sequences([ps[i] for i in idx], [rs[i] for i in idx], tokenizer.pad_token_id)
            out[idx] = sequence_rewards(model, b["input_ids"].to(dev), b["attention_mask"].to(dev)).float().cpu()
    return out


class GoldenRM:
    """A trained golden RM loaded from its directory: ``rm(prompts, responses) -> scores``.

    ``dtype`` (e.g. "bfloat16") loads a lighter scoring copy; None keeps the saved dtype.
    """

    def __init__(self, directory: str | Path, *, batch_size: int = 32, max_length: int = 640,
                 max_prompt_length: int = 512, dtype: str | None = None):
        self.dir = Path(directory)
        check_complete(self.dir, "golden reward model", "stage=reward")
        self.meta = read_meta(self.dir)
        if self.meta.get("fast_dev_run"):
            print(f"[isdpo] WARNING: the golden RM at {self.dir} is a fast_dev_run stub (one training step)")
        src = model_subdir(self.dir)
        self.tokenizer = AutoTokenizer.from_pretrained(src)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        kwargs = {"dtype": torch_dtype(dtype)} if dtype else {}
        self.model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=1, **kwargs).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.batch_size, self.max_length, self.max_prompt_length = batch_size, max_length, max_prompt_length

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        return score(self.model, self.tokenizer, prompts, responses, self.batch_size,
                     max_length=self.max_length, max_prompt_length=self.max_prompt_length)
