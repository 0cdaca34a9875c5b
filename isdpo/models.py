"""Loading Hugging Face models and tokenizers from a ``model`` config.

One code path for toy and real models: a model config either names a
checkpoint (``pretrained``: hub id or local directory, optionally with a
``gguf_file`` inside it) or gives ``config`` kwargs for a randomly initialised
``LlamaForCausalLM`` (the synthetic task's tiny model). Either way the result is
a plain ``transformers`` causal LM.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r} is not supported; allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


def load_causal_lm(cfg: Mapping[str, Any], *, vocab_size: int | None = None, path: str | None = None):
    """A causal LM from ``path`` (a saved checkpoint), ``cfg.pretrained``, or ``cfg.config`` (random init).

    ``vocab_size`` is required for random init (the task owns the vocabulary).
    """
    dtype = torch_dtype(cfg.get("dtype", "float32"))
    source = path or cfg.get("pretrained")
    if source:
        kwargs: dict[str, Any] = {"dtype": dtype}
        if cfg.get("gguf_file") and path is None:
            kwargs["gguf_file"] = cfg["gguf_file"]
        if cfg.get("attn_implementation"):
            kwargs["attn_implementation"] = cfg["attn_implementation"]
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        if "gguf_file" in kwargs:  # de-quantized floats, but a GGUF marker blocks save_pretrained
            release_gguf_quantizer(model)
    else:
        if vocab_size is None:
            raise ValueError("model.pretrained is null, so the task must provide vocab_size for a random init")
        arch = dict(cfg.get("config") or {})
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **arch)).to(dtype)
    return model


def load_tokenizer(cfg: Mapping[str, Any], path: str | None = None):
    """Tokenizer with a pad token and the padding side set (right for training; generation pads left itself)."""
    source = path or cfg.get("tokenizer") or cfg.get("pretrained")
    kwargs: dict[str, Any] = {}
    if cfg.get("gguf_file") and path is None and not cfg.get("tokenizer"):
        kwargs["gguf_file"] = cfg["gguf_file"]
    tok = AutoTokenizer.from_pretrained(source, **kwargs)
    if tok.pad_token is None:
        # EOS as pad is safe because padding is masked out of every loss and attention.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "right"
    return tok


def release_gguf_quantizer(model):
    """Make a model loaded from a GGUF file saveable: its weights are already de-quantized floats, but
    transformers keeps a GGUF "quantizer" marker that makes ``save_pretrained`` refuse (and GGUF has no
    ``dequantize()``). Dropping the marker saves the same weights (exact round trip). No-op otherwise."""
    q = getattr(model, "hf_quantizer", None)
    if q is not None and "gguf" in type(q).__name__.lower():
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def freeze(model):
    """Eval mode, no grads: the frozen reference policy."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
