"""Loading Hugging Face models and tokenizers from a ``model`` config.

One code path for toy and real models: a model config either names a
checkpoint (``pretrained``: hub id or local directory, optionally with a
``gguf_file`` inside it) or gives ``config`` kwargs for a randomly initialised
``LlamaForCausalLM`` (the synthetic task's tiny model). Either way the result is
a plain ``transformers`` causal LM.

LoRA (``peft=lora``): :func:`add_lora` wraps a model's target layers with PEFT's adapters in place (the model
stays the ``transformers`` class, so every log-prob and sampling path runs it as before); :func:`shared_copy`
gives the policy its own module tree over the reference's very weights, so the reference is the policy
without its adapters and only one copy of the weights is in memory. ``peft`` is imported only here, on
first use.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import save_file
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


# --------------------------------------------------------------------------------------------
# LoRA adapters (peft)
# --------------------------------------------------------------------------------------------

ADAPTER_CONFIG = "adapter_config.json"  # what marks a folder as a LoRA adapter (PEFT's format)
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def peft_package():
    """The ``peft`` package, imported on first use (runs without LoRA never need it)."""
    try:
        import peft
    except ImportError as err:
        raise ImportError("peft.backend=lora needs the peft package: pip install isdpo[lora] (or pip install peft)") \
            from err
    return peft


def shared_copy(model: torch.nn.Module, _memo: dict | None = None) -> torch.nn.Module:
    """A second module tree over the SAME parameter and buffer tensors (no weight is copied).

    Every module object is new, with its own children, hooks and train/eval mode; the parameter and buffer
    dicts are shared, so a move or cast of one tree is one of both. Adapters injected into the copy leave
    ``model`` as it was: ``model`` stays the exact base of the adapted copy.
    """
    memo = {} if _memo is None else _memo
    if id(model) in memo:  # a module used twice stays one module
        return memo[id(model)]
    clone = copy.copy(model)
    memo[id(model)] = clone
    for key, value in vars(model).items():
        if key not in ("_parameters", "_buffers") and isinstance(value, (dict, list, set)):
            clone.__dict__[key] = copy.copy(value)  # hooks registered on one tree later stay on it
    clone.__dict__["_modules"] = {name: None if child is None else shared_copy(child, memo)
                                  for name, child in model._modules.items()}
    # torch.compile binds the compiled call to the original module: the copy must run its own.
    clone.__dict__.pop("_compiled_call_impl", None)
    return clone


def add_lora(model, lora: Mapping[str, Any], *, seed: int = 0, trainable: Sequence[str] = ()):
    """``model`` with LoRA adapters on ``lora.target_modules`` (``peft.get_peft_model``, in place); returns the
    same ``transformers`` model, its target layers wrapped. Only the adapters train (and the modules named in
    ``trainable``, e.g. a reward model's new score head, which get no adapter). The adapters' random half is
    drawn from ``seed`` (the global random state is untouched); the other half is zero, so the adapted model
    computes exactly what ``model`` did until the first update."""
    peft = peft_package()
    targets = lora["target_modules"]
    config = peft.LoraConfig(
        r=int(lora["r"]), lora_alpha=float(lora["alpha"]), lora_dropout=float(lora["dropout"]),
        target_modules=targets if isinstance(targets, str) else list(targets),
        **({"exclude_modules": list(trainable)} if trainable else {}),  # (peft >= 0.14) all-linear would adapt them
        # recorded in adapter_config.json: AutoPeftModelForCausalLM reads it
        task_type="CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)
        # peft 0.21 reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        adapted = peft.get_peft_model(model, config).get_base_model()
    for name in trainable:
        adapted.get_submodule(name).requires_grad_(True)
    return adapted


def has_adapters(model) -> bool:
    """Whether ``model`` carries LoRA adapters (from :func:`add_lora` or :func:`load_adapter`)."""
    return bool(getattr(model, "peft_config", None))


def save_adapter(model, path: str | Path) -> None:
    """The adapters of ``model`` as PEFT writes them (``adapter_config.json`` + ``adapter_model.safetensors``):
    ``PeftModel.from_pretrained(base, path)`` or ``AutoPeftModelForCausalLM.from_pretrained(path)`` loads them."""
    peft = peft_package()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = copy.copy(model.peft_config["default"])
    config.inference_mode = True
    config.save_pretrained(str(path))
    # PeftModel's names: its wrapper adds "base_model.model." before the transformers model's own names.
    state = {f"base_model.model.{k}": v.detach().contiguous().cpu()
             for k, v in peft.get_peft_model_state_dict(model).items()}
    save_file(state, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def is_adapter_dir(path: str | Path | None) -> bool:
    return path is not None and (Path(path) / ADAPTER_CONFIG).is_file()


def load_adapter(model, path: str | Path):
    """``model`` with the adapters saved at ``path`` (by :func:`save_adapter`), in place; returns the same
    ``transformers`` model, its adapted layers wrapped."""
    peft = peft_package()
    return peft.PeftModel.from_pretrained(model, str(path)).get_base_model()


def merge_adapters(model):
    """A plain ``transformers`` model computing what ``model`` with its adapters computes: a copy whose adapted
    layers have their adapters' update merged into their weights; ``model`` itself is unchanged. A model without
    adapters is returned as it is."""
    if not has_adapters(model):
        return model
    tuner = peft_package().tuners.tuners_utils.BaseTunerLayer
    merged = copy.deepcopy(model)
    for name, module in list(merged.named_modules()):
        if isinstance(module, tuner):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent), child, module.get_base_layer())
    del merged.peft_config
    return merged
