"""LightningModules: preference training (any DAA, IS variants included), SFT, and the golden RM's
Bradley-Terry training.

They wrap any Hugging Face model. The preference module holds the trainable
policy and a frozen reference (or reads precomputed reference log-probs from
the batch); the loss itself lives in isdpo.losses, this module only wires it.
All stop with :class:`NonFiniteError` at the first non-finite loss or gradient
norm, before the optimizer step applies it.
"""
from __future__ import annotations

import math
from typing import Mapping

import lightning as L
import torch
from torch import Tensor
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import move_data_to_device

from isdpo.golden_rm import bradley_terry_loss, sequence_rewards
from isdpo.logprobs import batch_logps
from isdpo.losses import DAALoss, PairLogps
from isdpo.models import freeze
from isdpo.online import OnlinePairs
from isdpo.optim import build_optimizer


class NonFiniteError(RuntimeError):
    """Training produced a NaN/inf loss, gradient or parameter; the run stops instead of saving it."""


def nonfinite_tensors(named: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``named`` holding a NaN or inf."""
    return [k for k, v in named.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def check_finite_parameters(named: Mapping[str, torch.Tensor], action: str, block: str = "task.train") -> None:
    """Raise :class:`NonFiniteError` naming the parameters if any holds a NaN/inf.

    ``action``: what is refused; ``block``: the config block whose ``lr`` the message says to lower.
    """
    bad = nonfinite_tensors(named)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteError(
            f"refusing to {action}: {len(bad)} parameter tensor(s) hold non-finite values (NaN/inf): {shown}. "
            f"The weights diverged; lower {block}.lr"
            + (f" and/or set {block}.gradient_clip_val" if block == "task.train" else "")
            + ", then rerun (resuming from an earlier checkpoint with the same settings diverges again)."
        )


RNG_KEY = "isdpo_rng_state"  # a checkpoint's random state (LMModule.on_save_checkpoint)


def _fmt(x: float) -> str:
    return f"{x:.4g}"


class LMModule(L.LightningModule):
    """Shared optimisation plumbing; the policy is the only thing checkpointed."""

    # Config block of the stage's optimisation settings, named in error messages.
    config_block = "task.train"

    def __init__(self, policy, *, lr: float, weight_decay: float = 0.0, warmup_steps: int = 0,
                 schedule: str = "cosine", response_only: bool = True, concatenated: bool = True,
                 fused_adamw: bool = False):
        super().__init__()
        self.policy = policy.train()  # from_pretrained returns eval mode; Lightning keeps modes as they are
        self.lr, self.weight_decay, self.warmup_steps, self.schedule = lr, weight_decay, warmup_steps, schedule
        self.response_only, self.concatenated, self.fused_adamw = response_only, concatenated, fused_adamw
        # The frozen reference (and the frozen base under LoRA adapters) is rebuilt from its own checkpoint: keep it
        # out of ours.
        self.strict_loading = False
        # Detached per-micro-batch scalars of the current accumulation window ("loss" first), checked
        # once per optimizer step: one host sync per step instead of one per micro-batch.
        self._window: list[dict[str, torch.Tensor]] = []
        self._resumed_rng: dict | None = None  # the checkpoint's random state, until the first batch after resume

    def logps(self, model, batch):
        return batch_logps(model, batch, response_only=self.response_only, concatenated=self.concatenated)

    def logging_step(self) -> bool:
        """Whether the loggers take this optimizer step's metrics (every ``Trainer(log_every_n_steps)`` steps, as
        Lightning decides): ``self.log`` is skipped on the other steps, where it only fed the progress bar and
        cost ~0.3 ms a call (bench/README.md). Outside a Trainer (a direct ``training_step`` call): always."""
        trainer = self._trainer
        if trainer is None:
            return True
        every = trainer.log_every_n_steps
        return bool(trainer.fast_dev_run) or (every > 0 and (trainer.global_step + 1) % every == 0)

    def configure_optimizers(self):
        return build_optimizer(self.policy.parameters(), lr=self.lr, weight_decay=self.weight_decay,
                               warmup_steps=self.warmup_steps,
                               total_steps=int(self.trainer.estimated_stepping_batches), schedule=self.schedule,
                               fused=self.fused_adamw)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Lightning clears gradients only before the next backward, so a full copy of them would sit
        # in memory through every forward (measured: +12% peak on SmolLM2, bench/README.md).
        optimizer.zero_grad(set_to_none=True)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if gradient_clip_val and isinstance(self.trainer.strategy, FSDPStrategy):
            # Lightning's FSDP precision refuses norm clipping; FSDP's own clips by the norm over every shard.
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        plugin = self.trainer.precision_plugin
        if (gradient_clip_val and isinstance(plugin, MixedPrecision) and plugin.scaler is None
                and getattr(optimizer, "_step_supports_amp_scaling", False)):
            # Lightning's mixed precision refuses to clip for a fused optimizer (under fp16 it unscales the
            # gradients itself, after clipping); bf16 has no loss scaler, so the gradients are plain here.
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def record(self, loss: torch.Tensor, **diagnostics: torch.Tensor) -> None:
        """Keep this micro-batch's loss (and what explains it) for the check before the optimizer step."""
        self._window.append({"loss": loss.detach(), **{k: v.detach() for k, v in diagnostics.items()}})

    def on_before_optimizer_step(self, optimizer):
        # Called after the last backward of the accumulation window and before gradient clipping and
        # the optimizer step (under fp16 also after unscaling).
        grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
        # float32 throughout: MPS has no float64.
        norm = (torch.nn.utils.get_total_norm(grads).float() if grads
                else torch.zeros((), dtype=torch.float32, device=self.device))
        window, self._window = self._window, []
        losses = torch.stack([d["loss"].to(norm.device, torch.float32) for d in window]) if window else norm[None] * 0
        bad = (~torch.isfinite(losses)).sum().float()
        # fp16's loss scaler makes inf gradients on purpose and skips those steps itself.
        grads_matter = getattr(self.trainer.precision_plugin, "scaler", None) is None
        others_bad = torch.zeros_like(bad)
        if self.trainer.world_size > 1:
            # Each rank raises on the same step, so none waits in a collective for a rank that stopped.
            sharded = isinstance(self.trainer.strategy, FSDPStrategy)  # each rank holds a shard of the grads
            stats = torch.stack([norm.square() if sharded else torch.zeros_like(norm), bad])
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
            norm = stats[0].sqrt() if sharded else norm
            others_bad = stats[1] - bad
        lr = optimizer.param_groups[0]["lr"]
        if self.logging_step():
            self.log("train/learning_rate", lr, on_step=True, on_epoch=False, batch_size=1)
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False, batch_size=1)
        norm_v, bad_v, others_v = torch.stack([norm, bad, others_bad]).tolist()
        if bad_v or others_v or (grads_matter and not math.isfinite(norm_v)):
            raise NonFiniteError(self._nonfinite_message(window, lr, norm_v, others_v > 0))

    def _nonfinite_message(self, window: list[dict[str, torch.Tensor]], lr: float, norm: float,
                           other_rank: bool) -> str:
        trainer, block = self.trainer, self.config_block
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        where = f"optimizer step {trainer.global_step + 1}" + (f" of {total}" if math.isfinite(total) else "")
        if trainer.world_size > 1:
            where += f" on rank {trainer.global_rank}"
        rows = [{k: float(v) for k, v in d.items()} for d in window]
        first_bad = next((i for i, r in enumerate(rows) if not math.isfinite(r["loss"])), None)
        i = first_bad if first_bad is not None else len(rows) - 1
        lines = [f"non-finite training at {where} (lr={lr:.4g}): "
                 + (f"loss={_fmt(rows[i]['loss'])} in micro-batch {i + 1} of {len(rows)}"
                    if first_bad is not None else f"loss finite in all {len(rows)} micro-batch(es)")
                 + f", grad norm={_fmt(norm)} (before clipping)"
                 + ("; another data-parallel rank had a non-finite loss" if other_rank else "")
                 + ". The optimizer step was not applied."]
        row = rows[i] if rows else {}
        if "logps/policy_chosen" in row:
            ref = (f", reference chosen/rejected={_fmt(row['logps/ref_chosen'])}/{_fmt(row['logps/ref_rejected'])}"
                   if "logps/ref_chosen" in row else "")
            lines.append(f"  mean log-probs of micro-batch {i + 1}: policy chosen/rejected="
                         f"{_fmt(row['logps/policy_chosen'])}/{_fmt(row['logps/policy_rejected'])}{ref}")
        is_stats = {k: v for k, v in row.items() if k.startswith("is/")}
        if is_stats:
            lines.append("  importance weights: " + ", ".join(f"{k}={_fmt(v)}" for k, v in is_stats.items()))
        clip = trainer.gradient_clip_val
        lines.append(
            f"What to do: lower {block}.lr"
            + (f", set {block}.gradient_clip_val (e.g. 1.0; now {'off' if not clip else clip})"
               if block == "task.train" else "")
            + ", and check the data"
            + (" (NaN/inf precomputed or behaviour log-probs, empty responses)." if block == "task.train" else ".")
        )
        return "\n".join(lines)

    def on_save_checkpoint(self, checkpoint):
        # What training changes: a frozen parameter of the policy (the base weights under LoRA adapters) is
        # rebuilt from its own checkpoint, as the reference is, and is not copied into every checkpoint.
        frozen = {f"policy.{n}" for n, p in self.policy.named_parameters(remove_duplicate=False) if not p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k.startswith("policy.") and k not in frozen}
        # Every data-parallel rank builds the checkpoint (only rank zero writes it), so all stop together.
        check_finite_parameters(checkpoint["state_dict"], f"checkpoint step {self.trainer.global_step}",
                                self.config_block)
        # The random state, so a resumed run draws what an uninterrupted one would (the LoRA adapters' dropout).
        checkpoint[RNG_KEY] = {"cpu": torch.get_rng_state(),
                               "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None}

    def on_load_checkpoint(self, checkpoint):
        # Set at the first batch: between here and there Lightning draws from it (a data loader's iterator).
        self._resumed_rng = checkpoint.get(RNG_KEY)

    def on_train_batch_start(self, batch, batch_idx):
        state, self._resumed_rng = self._resumed_rng, None
        if state is not None:
            torch.set_rng_state(state["cpu"])
            if state["cuda"] is not None and torch.cuda.is_initialized():
                torch.cuda.set_rng_state(state["cuda"])


class PreferenceModule(LMModule):
    """Preference training of ``policy`` against a frozen ``reference`` with ``loss_fn``.

    Chosen and rejected rows arrive stacked in one batch (isdpo.data.collate), so
    each model runs ONE forward per step. When the batch carries
    ``chosen_ref_logp``/``rejected_ref_logp`` (precomputed), ``reference`` may be None.
    With ``online`` (online DPO, isdpo.online), batches carry prompts only and each training step first samples
    and labels its pairs from the current policy; the rest of the step is the same.
    """

    def __init__(self, policy, reference, loss_fn: DAALoss, *, online: OnlinePairs | None = None, **kw):
        super().__init__(policy, **kw)
        self.reference = freeze(reference) if reference is not None else None
        self.loss_fn = loss_fn
        self.online = online
        self.sampled_batch: dict | None = None  # online: the pairs the current step samples (online_batch)
        # As TRL's DPOTrainer (disable_dropout=True): with dropout the policy's log-probs at step 0 would
        # differ from the reference's, so rho != 0 and the IS weight != 1 before any training.
        # Attention dropout is no module but a float that HF attention layers (and some read it from the
        # config at forward time) pass to the attention kernel.
        # LoRA adapters' own dropout (peft.dropout) is a setting and stays: it acts on the adapters' input only,
        # and PEFT starts them with B = 0, so at step 0 the policy is still the reference exactly.
        for name, module in self.policy.named_modules():
            if isinstance(module, torch.nn.Dropout) and ".lora_dropout." not in f".{name}.":
                module.p = 0.0
            for obj in (module, getattr(module, "config", None)):
                for key, value in list(vars(obj).items()) if obj is not None else ():
                    if "dropout" in key and isinstance(value, float):
                        setattr(obj, key, 0.0)

    def pair_logps(self, batch) -> PairLogps:
        logps, lengths = self.logps(self.policy, batch)
        n = logps.shape[0] // 2
        if "chosen_ref_logp" in batch:
            ref_c, ref_r = batch["chosen_ref_logp"], batch["rejected_ref_logp"]
        elif self.reference is not None:
            with torch.no_grad():
                ref, _ = self.logps(self.reference, batch)
            ref_c, ref_r = ref[:n], ref[n:]
        else:
            ref_c = ref_r = None
        return PairLogps(
            policy_chosen=logps[:n], policy_rejected=logps[n:], ref_chosen=ref_c, ref_rejected=ref_r,
            chosen_lengths=lengths[:n], rejected_lengths=lengths[n:],
            behavior_chosen=batch.get("chosen_behavior_logp"), behavior_rejected=batch.get("rejected_behavior_logp"),
        )

    def online_batch(self, batch) -> dict:
        """This step's pair batch for the prompts of ``batch`` (``online``), on the module's device; also kept as
        ``sampled_batch`` until the next one (isdpo.flops.PerfMonitor counts the tokens the step trained on)."""
        self.sampled_batch = move_data_to_device(self.online(self.policy, batch["prompt_ids"], self.global_step),
                                                 self.device)
        return self.sampled_batch

    def training_step(self, batch, batch_idx):
        if self.online is not None:
            batch = self.online_batch(batch)
        lp = self.pair_logps(batch)
        out = self.loss_fn(lp)
        refs = {} if lp.ref_chosen is None else {"logps/ref_chosen": lp.ref_chosen.float().mean(),
                                                 "logps/ref_rejected": lp.ref_rejected.float().mean()}
        self.record(out.loss, **{"logps/policy_chosen": lp.policy_chosen.float().mean(),
                                 "logps/policy_rejected": lp.policy_rejected.float().mean()}, **refs,
                    **{k: v for k, v in out.metrics.items() if k.startswith("is/")})
        if self.logging_step():
            n = out.losses.shape[0]  # pairs (a packed batch has fewer rows than 2B)
            self.log("train/loss", out.loss.detach(), prog_bar=True, batch_size=n)
            if out.base_losses is not None:  # IS: train/loss is mean(w f), what is optimised; f alone beside it
                self.log("train/base_loss", out.base_losses.mean(), prog_bar=True, batch_size=n)
            self.log_dict({f"train/{k}": v for k, v in out.metrics.items()}, batch_size=n)
        return out.loss


class SFTModule(LMModule):
    """Supervised fine-tuning: mean token NLL of the response (the reference policy of the pipeline)."""

    config_block = "task.sft"

    def training_step(self, batch, batch_idx):
        logps, n_tokens = self.logps(self.policy, batch)
        loss = -logps.sum() / n_tokens.sum().clamp(min=1)
        self.record(loss)
        if self.logging_step():
            self.log("train/sft_loss", loss.detach(), prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss


class RewardModule(LMModule):
    """Bradley-Terry training of a sequence-classification model on stacked chosen/rejected batches."""

    config_block = "task.reward"

    def _pair_rewards(self, batch) -> tuple[Tensor, Tensor]:
        r = sequence_rewards(self.policy, batch["input_ids"], batch["attention_mask"])
        n = r.shape[0] // 2
        return r[:n], r[n:]

    def training_step(self, batch, batch_idx):
        rc, rr = self._pair_rewards(batch)
        loss, acc = bradley_terry_loss(rc, rr)
        n = rc.shape[0]
        self.record(loss)
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
