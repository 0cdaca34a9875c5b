"""Training-loop details: attention dropout off in the policy, learning rate and gradient norm logged,
a progress bar that counts optimizer steps."""
import copy
import math
import random

import lightning as L
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from isdpo.data.collate import PreferenceCollator, SFTCollator
from isdpo.losses import build_loss
from isdpo.module import PreferenceModule, SFTModule
from isdpo.optim import warmup_schedule
from isdpo.trainer import build_trainer

HW = {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "precision": "32-true", "strategy": "auto"}
IS = {"enabled": True, "log_clip": 0.0, "weight": "sequence", "lower_log_clip": None, "self_normalize": False}
V = 23


def pairs(n=8, seed=0):
    rng = random.Random(seed)
    tok = lambda k: [rng.randrange(1, V) for _ in range(k)]  # noqa: E731
    return [{"prompt_ids": tok(3), "chosen_ids": tok(5), "rejected_ids": tok(4)} for _ in range(n)]


def frozen_copy(model):
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_dropout_is_off_in_the_policy(attn):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.3,
                      attn_implementation=attn)
    policy = LlamaForCausalLM(cfg)
    reference = frozen_copy(policy)
    module = PreferenceModule(policy, reference, build_loss("dpo", 0.1, importance_sampling=IS), lr=1e-3)
    assert module.policy.training
    batch = PreferenceCollator(0)(pairs(8))
    torch.manual_seed(1)
    out = module.loss_fn(module.pair_logps(batch))
    assert torch.equal(out.weights, torch.ones(8))  # rho = 0 and log w = 0 exactly, as without dropout
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert reference.config.attention_dropout == 0.3  # the reference is left as it is (eval mode anyway)


class Record(L.Callback):
    """The gradient norm (before clipping) and the learning rate each optimizer step, as computed here."""

    def __init__(self):
        self.norms, self.lrs, self.logged = [], [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.policy.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, *args):
        m = trainer.callback_metrics
        self.logged.append({k: float(m[k]) for k in ("train/grad_norm", "train/learning_rate") if k in m})


def test_preference_training_logs_lr_and_the_unclipped_grad_norm(tiny_lm, tmp_path):
    policy = tiny_lm.train()
    reference = frozen_copy(tiny_lm)
    with torch.no_grad():  # a reference that differs, so the gradient is not tiny
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    module = PreferenceModule(policy, reference, build_loss("dpo", 0.5), lr=1e-2, warmup_steps=2,
                              schedule="cosine")
    rec = Record()
    loader = torch.utils.data.DataLoader(pairs(8), batch_size=2, collate_fn=PreferenceCollator(0))
    # log_every_n_steps=1: the module logs only on the steps the loggers take (every 10 by default)
    trainer = build_trainer(HW, max_steps=3, accumulate=2, run_dir=tmp_path, logger=False, callbacks=[rec],
                            gradient_clip_val=1e-4, progress=False, log_every_n_steps=1)
    trainer.fit(module, loader)
    steps = [d for d in rec.logged[1::2]]  # the metrics after each optimizer step (2 micro-batches each)
    assert len(steps) == len(rec.norms) == 3
    for d, norm, lr, s in zip(steps, rec.norms, rec.lrs, range(3)):
        assert norm > 1e-3  # far above the clip value: the logged norm is the one before clipping
        assert d["train/grad_norm"] == pytest.approx(norm, rel=1e-5)
        assert lr == pytest.approx(1e-2 * warmup_schedule(s, warmup_steps=2, total_steps=3, schedule="cosine"))
        assert d["train/learning_rate"] == pytest.approx(lr, rel=1e-6)


def test_sft_logs_the_learning_rate(tiny_lm, tmp_path):
    rng = random.Random(0)
    data = [{"prompt_ids": [1, 2], "response_ids": [rng.randrange(1, V) for _ in range(5)]} for _ in range(6)]
    module = SFTModule(tiny_lm.train(), lr=1e-3, warmup_steps=3, schedule="constant")
    rec = Record()
    trainer = build_trainer(HW, max_steps=-1, max_epochs=1, accumulate=1, run_dir=tmp_path, logger=False,
                            callbacks=[rec], progress=False, log_every_n_steps=1)  # every step (default: every 10)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2, collate_fn=SFTCollator(0)))
    assert [d["train/learning_rate"] for d in rec.logged] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])


def test_progress_bar_counts_optimizer_steps(tiny_lm, tmp_path, capsys):
    module = PreferenceModule(tiny_lm.train(), frozen_copy(tiny_lm), build_loss("dpo", 0.5), lr=1e-3)
    loader = torch.utils.data.DataLoader(pairs(16), batch_size=2, collate_fn=PreferenceCollator(0))
    trainer = build_trainer(HW, max_steps=3, accumulate=2, run_dir=tmp_path, logger=False, callbacks=[],
                            progress=True)
    trainer.fit(module, loader)
    out = capsys.readouterr().out
    assert "step 3/3" in out, out[-2000:]
    assert "step 4/" not in out and "Epoch" not in out, out[-2000:]



class Rows(L.pytorch.loggers.Logger):
    """What a logger receives: (step, metrics) rows."""

    name, version = "rows", "0"

    def __init__(self):
        super().__init__()
        self.rows = []

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, *args, **kwargs):
        pass


def test_metrics_are_logged_only_on_the_steps_the_loggers_take(tiny_lm, tmp_path):
    """self.log runs on the optimizer steps whose metrics the loggers take (every ``log_every_n_steps``), not on
    every micro-batch (there it only fed the progress bar); the loggers get the same rows as when it ran always."""

    def fit(every_step: bool):
        torch.manual_seed(0)
        module = PreferenceModule(copy.deepcopy(tiny_lm).train(), frozen_copy(tiny_lm), build_loss("dpo", 0.5), lr=1e-3)
        calls, log = [], module.log
        module.log = lambda name, *a, **k: (calls.append(module.trainer.global_step), log(name, *a, **k))
        if every_step:  # the behaviour before: self.log on every micro-batch
            module.logging_step = lambda: True
        logger = Rows()
        loader = torch.utils.data.DataLoader(pairs(40), batch_size=2, collate_fn=PreferenceCollator(0))
        trainer = build_trainer(HW, max_steps=10, accumulate=2, run_dir=tmp_path / str(every_step), logger=logger,
                                callbacks=[], progress=False, log_every_n_steps=4)
        trainer.fit(module, loader)
        return sorted(set(calls)), logger.rows

    calls, rows = fit(every_step=False)
    calls_before, rows_before = fit(every_step=True)
    assert calls_before == list(range(10))
    assert calls == [3, 7]  # optimizer steps 4 and 8 (global_step 3 and 7 while they run)
    assert [s for s, _ in rows] == [3, 7]
    assert {"train/loss", "train/grad_norm", "train/learning_rate", "train/rewards/margins"} <= set(rows[0][1])
    assert rows == rows_before


@pytest.mark.parametrize("loss", ["isdpo", "dpo"])
def test_is_losses_log_the_weighted_loss_and_the_base_loss_beside_it(loss, tiny_lm, tmp_path, capsys):
    """train/loss is mean(w f), what is optimised; with importance sampling train/base_loss is mean(f), on the
    progress bar too; without it there is no base_loss (train/loss is f itself)."""
    reference = frozen_copy(tiny_lm)
    with torch.no_grad():  # a reference that differs from the policy: the weights are not 1
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    is_cfg = {**IS, "log_clip": 2.0} if loss == "isdpo" else None
    module = PreferenceModule(copy.deepcopy(tiny_lm).train(), reference,
                              build_loss("dpo", 0.5, importance_sampling=is_cfg), lr=1e-3)
    batch = PreferenceCollator(0)(pairs(4))
    with torch.no_grad():
        out = module.loss_fn(module.pair_logps(batch))
    expected_f = build_loss("dpo", 0.5).__call__(module.pair_logps(batch)).losses.detach()
    logger = Rows()
    trainer = build_trainer(HW, max_steps=1, accumulate=1, run_dir=tmp_path, logger=logger, callbacks=[],
                            progress=True, log_every_n_steps=1)
    trainer.fit(module, torch.utils.data.DataLoader(pairs(4), batch_size=4, collate_fn=PreferenceCollator(0)))
    (_, row), = [r for r in logger.rows if "train/loss" in r[1]]
    bar = capsys.readouterr().out
    if loss == "dpo":
        assert out.base_losses is None and "train/base_loss" not in row and "base_loss" not in bar
        return
    assert torch.allclose(out.base_losses, expected_f) and torch.allclose(out.losses, out.weights * expected_f)
    assert not torch.allclose(out.weights, torch.ones(4))
    assert row["train/base_loss"] == pytest.approx(float(expected_f.mean()), rel=1e-5)
    assert row["train/loss"] == pytest.approx(float(out.loss), rel=1e-5) != row["train/base_loss"]
    assert "train/loss" in bar and "train/base_loss" in bar, bar[-2000:]
