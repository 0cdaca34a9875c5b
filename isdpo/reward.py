"""The golden reward model: Bradley-Terry training, scoring, and the ``reward`` stage.

In the paper's synthetic setting (Gao et al. 2022; PAPER.md section 5) a golden reward model
stands in for human raters: it labels every preference pair (isdpo.relabel) and judges every
evaluation (isdpo.data.text_runtime). It is an ``AutoModelForSequenceClassification`` with one
output, initialised from an SFT model (paper: Llama-3.1-8B SFT-trained on the pooled SFT set),
trained one epoch on the combined TL;DR + HH preferences with the Bradley-Terry loss::

    L = -log sigmoid(r(x, y_w) - r(x, y_l))

where r(x, y) is the score head applied to the hidden state of the LAST real token of
prompt + response (padding is found from the attention mask, never from the pad id, so a pad
token equal to EOS is harmless). Validation accuracy = fraction of pairs with r_w > r_l.

The RM scores TEXT (:func:`score`): prompts and responses are (re)tokenized with the RM's own
tokenizer under the tasks' truncation policy, so the policy and the RM may use different
tokenizers.

On disk (``task.reward.path``, or ``<cache_dir>/reward/<hash>`` keyed by the reward block, the
SFT block when ``init_from_sft``, the lengths and the bytes of the local data files): ``model/`` (weights + tokenizer),
``meta.json`` (a build id, whether it was a fast_dev_run stub, validation accuracy, counts),
``manifest.json`` (the file sizes, checked on load: a truncated entry is rebuilt).
A fast_dev_run stub is replaced by the next real run.
"""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from isdpo.cache import build_once, config_hash, data_key, entry_problem
from isdpo.data.collate import PreferenceCollator, pad_sequences
from isdpo.data.text import (as_plain, encode_prompts, encode_responses, fit_lengths, get_tokenizer,
                             load_pairs, require_nonempty, subsample, tokenize_pairs)
from isdpo.data.text_runtime import sft_data_key
from isdpo.logprobs import position_ids_from_mask
from isdpo.models import release_gguf_quantizer, torch_dtype
from isdpo.module import _LMModule

META = "meta.json"


# --------------------------------------------------------------------------------------------
# Model, rewards, loss
# --------------------------------------------------------------------------------------------


def load_reward_model(model_cfg: Mapping[str, Any], *, path: str | None = None, pad_token_id: int | None = None):
    """``AutoModelForSequenceClassification(num_labels=1)`` from ``path`` or the model config's checkpoint.

    A causal-LM checkpoint (e.g. the SFT model) loads with a freshly initialised score head.
    """
    from transformers import AutoModelForSequenceClassification

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
    if model_cfg.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model


def _score_head(model):
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if head is not None:
            return head
    raise ValueError(f"{type(model).__name__} has no `score` or `classifier` head")


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


class RewardModule(_LMModule):
    """Bradley-Terry training of a sequence-classification model on stacked chosen/rejected batches."""

    def _pair_rewards(self, batch) -> tuple[Tensor, Tensor]:
        r = sequence_rewards(self.policy, batch["input_ids"], batch["attention_mask"])
        n = r.shape[0] // 2
        return r[:n], r[n:]

    def training_step(self, batch, batch_idx):
        rc, rr = self._pair_rewards(batch)
        loss, acc = bradley_terry_loss(rc, rr)
        n = rc.shape[0]
        self.log("reward/train_loss", loss.detach(), prog_bar=True, batch_size=n)
        self.log("reward/train_accuracy", acc, batch_size=n)
        self.log("reward/margin", (rc - rr).detach().mean(), batch_size=n)
        return loss

    def validation_step(self, batch, batch_idx):
        rc, rr = self._pair_rewards(batch)
        loss, acc = bradley_terry_loss(rc, rr)
        n = rc.shape[0]
        self.log("reward/val_loss", loss, batch_size=n, on_epoch=True, sync_dist=True)
        self.log("reward/val_accuracy", acc, prog_bar=True, batch_size=n, on_epoch=True, sync_dist=True)


# --------------------------------------------------------------------------------------------
# Scoring text
# --------------------------------------------------------------------------------------------


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


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def score(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32, *,
          max_length: int = 640, max_prompt_length: int = 512, device: str | torch.device | None = None) -> Tensor:
    """Golden-RM scores [N] (float32, CPU) of (prompt, response) texts.

    Rows are sorted by length into batches (less padding) and returned in the input order. With
    ``device`` (default: CUDA when available) the model is moved there for the call and moved
    back afterwards, so a large RM does not hold accelerator memory between evaluations.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        return torch.zeros(0)
    home = _device_of(model)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else home)
    was_training = model.training
    model.eval()
    model.to(device)
    try:
        ps, rs = rm_inputs(tokenizer, prompts, responses, max_length=max_length, max_prompt_length=max_prompt_length)
        order = sorted(range(len(ps)), key=lambda i: len(ps[i]) + len(rs[i]))
        out = torch.empty(len(ps))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            b = pad_sequences([ps[i] for i in idx], [rs[i] for i in idx], tokenizer.pad_token_id)
            r = sequence_rewards(model, b["input_ids"].to(device), b["attention_mask"].to(device))
            out[idx] = r.float().cpu()
    finally:
        model.to(home)
        model.train(was_training)
    return out


class GoldenRM:
    """A trained golden RM loaded from its directory: ``rm(prompts, responses) -> scores``.

    ``dtype`` (e.g. "bfloat16") loads a lighter scoring copy; None keeps the saved dtype.
    """

    def __init__(self, directory: str | Path, *, batch_size: int = 32, max_length: int = 640,
                 max_prompt_length: int = 512, dtype: str | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

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


# --------------------------------------------------------------------------------------------
# Directories: explicit path or content-addressed cache entry, fast_dev_run stubs, atomic publish
# --------------------------------------------------------------------------------------------


def read_meta(path: Path) -> dict | None:
    """The entry's meta.json; for a directory made elsewhere (a saved HF model, or a pairs file, without
    meta.json) a stand-in naming it as external; None when there is nothing."""
    path = Path(path)
    f = path / META
    if f.exists():
        return json.loads(f.read_text())
    if any((path / p).exists() for p in ("config.json", "model/config.json", "pairs.jsonl", "pairs.parquet")):
        return {"build_id": f"external:{path.resolve()}", "external": True, "fast_dev_run": False}
    return None


def model_subdir(path: Path) -> Path:
    """``<dir>/model`` as written by stage=reward, or ``<dir>`` itself for an RM saved elsewhere."""
    path = Path(path)
    return path / "model" if (path / "model" / "config.json").exists() else path


def check_complete(path: Path, what: str, stage: str) -> dict:
    """The entry's meta; raises naming the path and the stage to run when it is absent or incomplete."""
    meta = read_meta(path)
    if meta is None:
        raise FileNotFoundError(f"no {what} at {path}: run {stage} first (or set its `path` in the task config)")
    problem = entry_problem(path)
    if problem:
        raise FileNotFoundError(f"the {what} at {path} is incomplete ({problem}): rerun {stage} to rebuild it")
    return meta


def publish(path: Path, build: Callable[[Path], dict], *, fast_dev_run: bool, what: str,
            collective: bool = True) -> tuple[Path, bool]:
    """Build into a temporary sibling of ``path`` and rename it into place; ``(path, reused)``.

    A complete entry is reused, except a fast_dev_run stub when this run is a real one (then it is
    rebuilt). ``build(tmp)`` returns the metadata written to ``meta.json`` (plus a build id) by rank 0.
    ``collective``: the build trains on every data-parallel rank (the golden RM); otherwise rank 0
    builds and the other ranks wait (isdpo.cache.build_once).
    """
    path = Path(path)
    started: list[float] = []

    def timed(tmp: Path) -> dict:
        started.append(time.time())
        return build(tmp)

    def usable(p: Path) -> bool:
        meta = read_meta(p)
        return meta is not None and (fast_dev_run or not meta.get("fast_dev_run"))

    def finish(tmp: Path, meta: dict | None) -> None:
        meta = dict(meta or {})
        meta.update({"build_id": uuid.uuid4().hex, "fast_dev_run": bool(fast_dev_run),
                     "seconds": round(time.time() - started[0], 1), "what": what})
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str))

    return build_once(path, timed, collective=collective, what=what, usable=usable, finish=finish)


def reward_key(task_cfg: Mapping[str, Any]) -> dict:
    """What the golden RM depends on (no task name: TL;DR and HH share one RM when their blocks agree),
    with the bytes of the local data files it reads (its sources', and the SFT set's when it starts from SFT)."""
    r = as_plain(task_cfg["reward"])
    key = {k: v for k, v in r.items() if k not in ("path", "score_batch_size", "score_dtype", "val_check_interval")}
    key["lengths"] = [task_cfg["max_length"], task_cfg["max_prompt_length"], task_cfg["truncate_responses"]]
    key["content"] = {name: data_key(spec, [spec["train_split"], spec["val_split"]])
                      for name, spec in r["sources"].items()}
    if r.get("init_from_sft"):
        key["sft"] = as_plain(task_cfg["sft"])
        key["sft_content"] = sft_data_key(task_cfg["sft"])
    return key


def reward_dir(task_cfg: Mapping[str, Any], cache_dir: str | Path) -> Path:
    """``task.reward.path`` or ``<cache_dir>/reward/<hash of reward_key>``."""
    explicit = task_cfg["reward"].get("path")
    return Path(explicit).expanduser() if explicit else Path(cache_dir) / "reward" / config_hash(reward_key(task_cfg))


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def reward_pairs(task_cfg: Mapping[str, Any], tokenizer, which: str) -> list[dict]:
    """Tokenized RM pairs of every ``reward.sources`` entry, ``which`` in {"train", "val"}, pooled."""
    r = task_cfg["reward"]
    out: list[dict] = []
    for name, spec in as_plain(r["sources"]).items():
        split = spec[f"{which}_split"]
        pairs, counts = load_pairs(spec, split)
        limit = r.get("max_train_pairs") if which == "train" else r.get("max_val_pairs")
        pairs = subsample(pairs, limit, int(r.get("seed", 0)))
        toks, _ = tokenize_pairs(pairs, tokenizer, max_length=task_cfg["max_length"],
                                 max_prompt_length=task_cfg["max_prompt_length"],
                                 truncate_responses=task_cfg["truncate_responses"],
                                 name=f"reward/{name}/{split}", pre_counts=counts)
        out.extend(toks)
    require_nonempty(out, f"the golden RM's {which} set")
    return out


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def _with_model(cfg, model_cfg):
    """A copy of ``cfg`` whose ``model`` is ``model_cfg`` (the RM base's SFT reuses stages.run_sft)."""
    from omegaconf import OmegaConf, open_dict

    out = cfg.copy()
    with open_dict(out):
        out.model = OmegaConf.create(as_plain(model_cfg))
    return out


def run_reward_stage(cfg, fast_dev_run: bool = False) -> Path:
    """Train the golden RM (or reuse it); returns its directory (``model/`` + ``meta.json``)."""
    from isdpo.data.loader import ResumableLoader
    from isdpo.stages import _finish, _logger, run_dir, run_sft
    from isdpo.trainer import accumulation, build_trainer

    task, hw = cfg.task, cfg.hardware
    r = task.reward
    path = reward_dir(task, cfg.paths.cache_dir)

    def build(tmp: Path) -> dict:
        init = None
        if r.init_from_sft:
            init = str(run_sft(_with_model(cfg, r.model), fast_dev_run=fast_dev_run) / "model")
        L.seed_everything(int(r.seed), workers=True, verbose=False)
        tok = get_tokenizer(r.model)
        model = load_reward_model(r.model, path=init, pad_token_id=tok.pad_token_id).train()  # from_pretrained gives eval mode
        if hw.get("activation_checkpointing") and hw.strategy != "fsdp":  # as stages.run_align does for the policy
            model.gradient_checkpointing_enable()
        train, val = reward_pairs(task, tok, "train"), reward_pairs(task, tok, "val")
        acc = accumulation(r.global_batch_size, hw.per_device_batch_size, hw.devices, hw.num_nodes)
        collate = PreferenceCollator(tok.pad_token_id)
        train_loader = ResumableLoader(train, batch_size=hw.per_device_batch_size, seed=int(r.seed),
                                       collate_fn=collate, num_workers=hw.num_workers)
        val_loader = DataLoader(val, batch_size=hw.per_device_batch_size, shuffle=False, collate_fn=collate,
                                num_workers=hw.num_workers)
        module = RewardModule(model, lr=r.lr, weight_decay=r.weight_decay, warmup_steps=r.warmup_steps,
                              schedule=r.schedule)
        logger = _logger(cfg, "reward")
        try:
            trainer = build_trainer(hw, max_steps=-1, max_epochs=int(r.epochs), accumulate=acc, run_dir=run_dir(cfg),
                                    logger=logger, callbacks=[], gradient_clip_val=r.gradient_clip_val,
                                    fast_dev_run=fast_dev_run, model=model)
            # build_trainer has no val_check_interval argument; Lightning reads this attribute when fit starts.
            vci = r.val_check_interval
            trainer.val_check_interval = 1.0 if isinstance(vci, int) and vci > len(train_loader) else vci
            trainer.fit(module, train_loader, val_loader)
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("reward/")}
        finally:
            _finish(logger)
        if not trainer.is_global_zero:
            return {}
        model.save_pretrained(tmp / "model")
        tok.save_pretrained(tmp / "model")
        print(f"[isdpo] golden RM: validation accuracy {metrics.get('reward/val_accuracy', float('nan')):.3f} "
              f"on {len(val)} pairs after {trainer.global_step} steps")
        return {"val_accuracy": metrics.get("reward/val_accuracy"), "val_loss": metrics.get("reward/val_loss"),
                "metrics": metrics, "n_train": len(train), "n_val": len(val), "steps": trainer.global_step,
                "init": init or r.model.pretrained, "model": as_plain(r.model), "key": reward_key(task)}

    out, reused = publish(path, build, fast_dev_run=fast_dev_run, what="golden reward model")
    print(f"[isdpo] golden RM {'reused' if reused else 'trained'}: {out}")
    return out
