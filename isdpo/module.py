"""LightningModules: preference training (any DAA, IS variants included) and SFT.

Both wrap any Hugging Face causal LM. The preference module holds the trainable
policy and a frozen reference (or reads precomputed reference log-probs from
the batch); the loss itself lives in isdpo.losses, this module only wires it.
"""
from __future__ import annotations

import lightning as L
import torch

from isdpo.logprobs import batch_logps
from isdpo.losses import DAALoss, PairLogps
from isdpo.models import freeze
from isdpo.optim import build_optimizer


class _LMModule(L.LightningModule):
    """Shared optimisation plumbing; the policy is the only thing checkpointed."""

    def __init__(self, policy, *, lr: float, weight_decay: float = 0.0, warmup_steps: int = 0,
                 schedule: str = "cosine", response_only: bool = True, concatenated: bool = True,
                 fused_adamw: bool = False):
        super().__init__()
        self.policy = policy.train()  # from_pretrained returns eval mode; Lightning keeps modes as they are
        self.lr, self.weight_decay, self.warmup_steps, self.schedule = lr, weight_decay, warmup_steps, schedule
        self.response_only, self.concatenated, self.fused_adamw = response_only, concatenated, fused_adamw
        # The frozen reference is rebuilt from its own checkpoint: keep it out of ours.
        self.strict_loading = False

    def logps(self, model, batch):
        return batch_logps(model, batch, response_only=self.response_only, concatenated=self.concatenated)

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

    def on_save_checkpoint(self, checkpoint):
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("policy.")}


class PreferenceModule(_LMModule):
    """Preference training of ``policy`` against a frozen ``reference`` with ``loss_fn``.

    Chosen and rejected rows arrive stacked in one batch (isdpo.data.collate), so
    each model runs ONE forward per step. When the batch carries
    ``chosen_ref_logp``/``rejected_ref_logp`` (precomputed), ``reference`` may be None.
    """

    def __init__(self, policy, reference, loss_fn: DAALoss, **kw):
        super().__init__(policy, **kw)
        self.reference = freeze(reference) if reference is not None else None
        self.loss_fn = loss_fn
        # As TRL's DPOTrainer (disable_dropout=True): with dropout the policy's log-probs at step 0 would
        # differ from the reference's, so rho != 0 and the IS weight != 1 before any training.
        for module in self.policy.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0

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

    def training_step(self, batch, batch_idx):
        out = self.loss_fn(self.pair_logps(batch))
        n = out.losses.shape[0]  # pairs (a packed batch has fewer rows than 2B)
        self.log("train/loss", out.loss.detach(), prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in out.metrics.items()}, batch_size=n)
        return out.loss


class SFTModule(_LMModule):
    """Supervised fine-tuning: mean token NLL of the response (the reference policy of the pipeline)."""

    def training_step(self, batch, batch_idx):
        logps, n_tokens = self.logps(self.policy, batch)
        loss = -logps.sum() / n_tokens.sum().clamp(min=1)
        self.log("train/sft_loss", loss.detach(), prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss
