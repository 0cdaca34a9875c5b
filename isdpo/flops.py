"""Throughput and model-FLOPs utilisation (MFU) of training, as a Lightning callback.

Model FLOPs follow the usual rule (Kaplan et al. 2020, "Scaling Laws for Neural Language Models",
section 2.1; the MFU of Chowdhery et al. 2022, "PaLM", appendix B): a forward pass costs 2N FLOPs
per token and a backward pass 4N, N = parameters that take part in matrix multiplies::

    step FLOPs = 6 N_policy * policy tokens + 2 N_ref * reference tokens   (reference: forward only)
    MFU        = step FLOPs / step seconds / peak FLOP/s of one device

The backward's 4N is two products per weight matrix W (y = W x): the gradient of its input, W^T dy (2 FLOPs
per weight per token), which carries the gradient down to the layers below, and the gradient of W itself,
dy x^T (2 more), which only a trained W needs. With frozen weights (LoRA: the base is frozen, the adapters
train) the second product is skipped for them, so a trained token costs::

    2 N (forward) + 2 N (input gradients) + 2 N_trained (weight gradients) = 4 N + 2 N_trained

N counting the adapters' own matrices too (N_trained = the adapters': r (d_in + d_out) per adapted matrix,
~1% of N at r = 16). Full fine-tuning (N_trained = N) gives back 6N; under LoRA it is ~4N, and 6N would
overstate the work by ~50%.

- N (:func:`matmul_params`) = all parameters minus the input embedding (a lookup, no FLOPs), plus
  the LM head when it is tied to the embedding (the head still multiplies).
- Tokens are the non-padding tokens the model actually runs (isdpo.logprobs.batch_token_counts):
  padding is not useful work, and a prompt shared by chosen and rejected (packed batches) counts
  once, because it runs once. Reference tokens count only when the reference runs online (no
  ``chosen_ref_logp`` in the batch).
- Online training (isdpo.online): the tokens are those of the pairs the step sampled and trained on; the
  sampling itself (a forward per generated token) is in the step's time but not in its FLOPs, so an online
  run's MFU counts the training alone.
- Left out, as in the 6N rule: attention's quadratic term (12 * layers * d_model * context per
  token for forward+backward; a few % at 135M parameters and 600-token rows, more for longer rows)
  and the LM head work that the response-only head skips. So MFU is a slight under-estimate of
  the hardware's work, and "tokens/s" (prompt + response tokens of every row without padding, the
  same count for every way of batching the same pairs) is the number to compare across settings.

Peak FLOP/s come from :data:`PEAK_TFLOPS` (dense, no sparsity, vendor data sheets) by device name
and precision; on CPU or an unknown GPU the callback logs throughput only, no MFU (pass
``peak_flops`` explicitly to get one).
"""
from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from isdpo.logprobs import batch_token_counts

#: Dense peak TFLOP/s of one device by math type (vendor data sheets, without 2:4 sparsity).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "tf32": 183.2, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
}


def device_key(name: str) -> str | None:
    """Key of :data:`PEAK_TFLOPS` for a CUDA device name (``torch.cuda.get_device_name()``), or None."""
    n = name.upper()
    for chip in ("H200", "H100"):
        if chip in n:
            if "NVL" in n:
                return f"{chip} NVL"
            if "PCIE" in n and chip == "H100":
                return "H100 PCIe"
            return "H200" if chip == "H200" else "H100 SXM"  # "NVIDIA H100 80GB HBM3" is the SXM part
    if "A100" in n:
        return "A100"
    if "L40S" in n:
        return "L40S"
    if n.endswith(" L4") or n == "L4":
        return "L4"
    return None


def math_type(precision: str | int | None, tf32: bool | None = None) -> str:
    """``bf16``/``fp16``/``tf32``/``fp32`` from a Lightning precision ("bf16-mixed", "32-true", ...)."""
    p = str(precision or "32")
    if p.startswith("bf16"):
        return "bf16"
    if p.startswith("16"):
        return "fp16"
    if tf32 is None:
        tf32 = torch.get_float32_matmul_precision() != "highest" or torch.backends.cuda.matmul.allow_tf32
    return "tf32" if tf32 else "fp32"


def peak_flops(device_name: str, precision: str | int | None = "bf16-mixed", tf32: bool | None = None) -> float | None:
    """Dense peak FLOP/s of one device of that name at that precision, or None when not in the table."""
    key = device_key(device_name)
    return None if key is None else PEAK_TFLOPS[key][math_type(precision, tf32)] * 1e12


def matmul_params(model, trained_only: bool = False) -> int:
    """N of the 6N rule: parameters minus the input embedding, plus the LM head if it is tied to it;
    ``trained_only``: of those, the ones that train (``requires_grad``)."""
    params = [p for p in model.parameters() if p.requires_grad or not trained_only]
    total = sum(p.numel() for p in params)
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    emb = get_in() if get_in else None
    head = get_out() if get_out else None
    if emb is None or not any(p is emb.weight for p in params):
        return total
    n = total - emb.weight.numel()
    if head is not None and head.weight is emb.weight:
        n += head.weight.numel()
    return n


def step_flops(n_policy: int, policy_tokens: int, n_ref: int = 0, ref_tokens: int = 0,
               n_trained: int | None = None) -> float:
    """(4 N + 2 N_trained) per trained token (forward, input and weight gradients; 6 N when every weight trains,
    ``n_trained`` None) + 2 N per reference token (forward)."""
    n_trained = n_policy if n_trained is None else n_trained
    return (4.0 * n_policy + 2.0 * n_trained) * policy_tokens + 2.0 * n_ref * ref_tokens


class PerfMonitor(L.Callback):
    """Logs ``perf/tokens_per_s``, ``perf/pairs_per_s`` (preference batches) and ``perf/mfu`` (when a peak is known).

    peak_flops: FLOP/s of ONE device; ``"auto"`` looks the device up in :data:`PEAK_TFLOPS` with the
        trainer's precision (None on CPU or an unknown GPU: no MFU); a number forces it; None: no MFU.
    log_every_n_steps: optimizer steps per logged window.

    Time is the time inside training batches, from ``on_train_batch_start`` to this callback's
    ``on_train_batch_end`` (forward, backward, optimizer step), summed over the window; data
    loading (overlapped by loader workers) and evaluation are left out, so put this callback
    BEFORE callbacks that do slow work in ``on_train_batch_end`` (isdpo.callbacks.EvalCallback).
    The first batch of a fit (set-up, allocations, compilation) is not counted. On GPU each batch
    is bracketed by ``torch.cuda.synchronize()``.

    Throughput is per process times the world size (every rank is assumed to see the same amount);
    MFU is per device. Values are sent to ``trainer.loggers`` at ``trainer.global_step`` from global
    rank zero and kept in ``history``.
    """

    def __init__(self, peak_flops: float | str | None = "auto", log_every_n_steps: int = 10):
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1 (got {log_every_n_steps})")
        self.peak = peak_flops
        self.every = log_every_n_steps
        self.history: list[dict[str, float]] = []
        self.started = False
        self._reset()

    def _reset(self) -> None:
        self.busy, self.steps, self.tokens, self.pairs, self.flops = 0.0, 0, 0, 0, 0.0
        self._t = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Before the strategy wraps the model: under FSDP each rank then holds a shard of every parameter.
        policy = getattr(pl_module, "policy", pl_module)
        reference = getattr(pl_module, "reference", None)
        self.n_policy = matmul_params(policy)
        self.n_trained = matmul_params(policy, trained_only=True)
        self.n_ref = matmul_params(reference) if reference is not None else 0

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.peak == "auto":
            dev = trainer.strategy.root_device
            self.peak_value = (peak_flops(torch.cuda.get_device_name(dev), trainer.precision)
                               if dev.type == "cuda" else None)
        else:
            self.peak_value = None if self.peak is None else float(self.peak)
        self.started = False
        self._reset()

    @staticmethod
    def _now(trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if self.started:
            self._t = self._now(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        if not self.started:  # the first batch of the fit is set-up: not counted
            self.started = True
            self._last_step = trainer.global_step
            return
        if self._t is None:
            return
        self.busy += self._now(trainer) - self._t
        self._t = None
        # Online training: the loader gives prompts only; the pairs the step trained on were sampled by the module.
        batch = getattr(pl_module, "sampled_batch", None) or batch
        if isinstance(batch, dict) and "input_ids" in batch:
            seq_tokens, computed = batch_token_counts(batch)
            online_ref = bool(self.n_ref) and "chosen_ref_logp" not in batch
            self.tokens += seq_tokens
            self.flops += step_flops(self.n_policy, computed, self.n_ref if online_ref else 0,
                                     computed if online_ref else 0, n_trained=self.n_trained)
            if hasattr(pl_module, "loss_fn"):  # a preference batch: chosen and rejected rows of B pairs
                rows = batch["pack_n_tokens"].shape[0] if "pack_n_tokens" in batch else batch["input_ids"].shape[0]
                self.pairs += rows // 2
        if trainer.global_step != self._last_step:  # an optimizer step happened
            self._last_step = trainer.global_step
            self.steps += 1
            if self.steps >= self.every:
                self._emit(trainer)

    def _emit(self, trainer) -> None:
        dt = max(self.busy, 1e-9)
        world = trainer.world_size
        row = {"perf/tokens_per_s": self.tokens * world / dt, "perf/step_s": dt / self.steps}
        if self.pairs:
            row["perf/pairs_per_s"] = self.pairs * world / dt
        if self.peak_value:
            row["perf/mfu"] = self.flops / dt / self.peak_value
            row["perf/tflops_per_device"] = self.flops / dt / 1e12
        self._reset()
        if trainer.is_global_zero:
            self.history.append({"step": trainer.global_step, **row})
            for logger in trainer.loggers:
                logger.log_metrics(row, step=trainer.global_step)
