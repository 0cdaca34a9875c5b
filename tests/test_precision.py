"""bf16 mixed precision (``hardware.precision=bf16-mixed``) on the CPU: Lightning runs every forward under
``torch.autocast(bfloat16)`` and keeps the weights, the optimizer and the loss in float32.

What must hold: log-probs come out float32 (isdpo.logprobs.selective_log_softmax upcasts the logits before the
log-softmax), the losses and importance weights are computed in float32 from them (isdpo.losses upcasts), and
they equal float32's within the rounding of bf16's 8-bit mantissa; align, SFT and the golden RM train to the end
with finite losses (the modules stop at the first non-finite one).

Tolerances (tiny Llama, random init, 10-12 response tokens): bf16 rounds every matmul output to ~2^-9 relative,
so each token's log-prob moves by ~1e-3 nats and a response's sum by ~1e-2 (measured: max 0.011 nats for the
policy's, 0.0025 for the reference's; DPO loss 0.0012 apart; IS log-weight 0.016, weight 1.6%). The bounds below
are ~4x those: wide enough for another CPU's kernels, tight enough that one float16-range overflow or a loss
computed in bf16 (0.4% relative on every term, ~0.03 on log w) would fail them. Real models have larger logits
and longer responses: ~0.003 nats per token measured on SmolLM2-135M (0.1 per 40-token response).
"""
from __future__ import annotations

import copy
import json
import math
import random
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from isdpo.data.collate import PreferenceCollator, SFTCollator
from isdpo.golden_rm import bradley_terry_loss, sequence_rewards
from isdpo.losses import build_loss
from isdpo.models import freeze
from isdpo.module import PreferenceModule, SFTModule
from isdpo.stages import run_stage
from isdpo.stages.reward import run_reward
from tests.fixtures_text import build_standins, text_overrides
from tests.hydra_utils import SMALL, compose_cfg

LOGP_TOL = 0.05   # nats per response (measured 0.011)
LOSS_TOL = 5e-3   # DPO loss at beta 0.1 (measured 0.0012)
LOG_W_TOL = 0.06  # IS log-weight of a pair (measured 0.016)


def bf16():
    """The forward context Lightning's ``precision="bf16-mixed"`` gives on the CPU."""
    return MixedPrecision("bf16-mixed", "cpu").forward_context()


@pytest.fixture
def pairs_batch():
    rng = random.Random(0)
    pairs = [{"prompt_ids": [1] + [rng.randrange(2, 23) for _ in range(6)],
              "chosen_ids": [rng.randrange(2, 23) for _ in range(10)],
              "rejected_ids": [rng.randrange(2, 23) for _ in range(12)]} for _ in range(32)]
    return PreferenceCollator(0)(pairs)


def test_bf16_mixed_log_probs_losses_and_is_weights_are_float32_and_close(tiny_lm, pairs_batch):
    reference = freeze(copy.deepcopy(tiny_lm))
    policy = tiny_lm.train()
    with torch.no_grad():  # a policy away from the reference: margins and weights are not trivially 0 and 1
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss_fn = build_loss("dpo", 0.1, {}, {"enabled": True, "log_clip": 2.0})
    module = PreferenceModule(policy, reference, loss_fn, lr=1e-3)

    def run(ctx):
        with ctx:
            lp = module.pair_logps(pairs_batch)
            return lp, loss_fn(lp)

    lp32, out32 = run(nullcontext())
    lp16, out16 = run(bf16())
    for name in ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"):
        t16, t32 = getattr(lp16, name), getattr(lp32, name)
        assert t16.dtype == torch.float32 and bool(torch.isfinite(t16).all()), name
        assert (t16 - t32).abs().max().item() < LOGP_TOL, name
        assert not torch.equal(t16, t32)  # autocast did run the forward in bf16
    assert out16.loss.dtype == out16.weights.dtype == torch.float32
    assert math.isfinite(out16.loss.item())
    assert out16.loss.item() == pytest.approx(out32.loss.item(), abs=LOSS_TOL)
    log_w = (out16.weights.log() - out32.weights.log()).abs().max().item()
    assert 0 < log_w < LOG_W_TOL
    out16.loss.backward()  # gradients reach the float32 weights
    grads = [p.grad for p in policy.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and bool(torch.isfinite(g).all()) for g in grads)


def test_bf16_mixed_sft_loss_is_close_to_float32(tiny_lm):
    rng = random.Random(1)
    data = [{"prompt_ids": [1, 2, 3], "response_ids": [rng.randrange(2, 23) for _ in range(8)]} for _ in range(16)]
    batch = SFTCollator(0)(data)
    module = SFTModule(tiny_lm.train(), lr=1e-3)

    def loss(ctx):
        with ctx:
            logps, n = module.logps(module.policy, batch)
            return -logps.sum() / n.sum()

    l32, l16 = loss(nullcontext()), loss(bf16())
    assert l16.dtype == torch.float32 and math.isfinite(l16.item())
    assert l16.item() == pytest.approx(l32.item(), abs=LOGP_TOL / 8)  # a per-token mean: 8 tokens a row


def test_bf16_mixed_rewards_are_float32_and_close(tiny_lm):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(tiny_lm.config.__class__(**{**tiny_lm.config.to_dict(), "num_labels": 1,
                                                                     "pad_token_id": 0})).eval()
    ids = torch.randint(2, 23, (8, 12))
    mask = torch.ones_like(ids)
    mask[4:, 9:] = 0  # right padding on half the rows
    r32 = sequence_rewards(rm, ids, mask)
    with bf16():
        r16 = sequence_rewards(rm, ids, mask)
    assert r16.dtype == torch.float32 and bool(torch.isfinite(r16).all())
    assert (r16 - r32).abs().max().item() < 0.02 * max(1.0, r32.abs().max().item())
    loss, _ = bradley_terry_loss(r16[:4], r16[4:])
    assert math.isfinite(loss.item())


def test_align_and_sft_train_under_bf16_mixed(tmp_path):
    """stage=align on a cold cache (the SFT reference trains too) with Lightning's bf16-mixed on the CPU."""
    cfg = compose_cfg(SMALL + ["stage=align", "hardware.precision=bf16-mixed", "task.train.max_steps=4",
                               "task.eval.every_n_steps=0", "task.eval.n_pairs=32"], tmp_path)
    result = run_stage(cfg)
    assert result["status"] == "completed"  # every step's loss and gradient norm were finite (NonFiniteError)
    rows = [json.loads(line) for line in (Path(cfg.paths.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 4]
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0
    assert rows[-1]["loss"] != rows[0]["loss"]  # it trained
    # the pairs' reference log-probs were precomputed under the training precision (align passes it down)
    keys = [json.loads(f.read_text())["key"] for f in Path(cfg.paths.cache_dir).glob("ref_logps/*/key.json")]
    assert [k.get("precision") for k in keys] == ["bf16-mixed"]


def test_golden_rm_trains_under_bf16_mixed(tmp_path):
    paths = build_standins(tmp_path / "standins", n_train=24, n_eval=8)
    cfg = compose_cfg(text_overrides(paths, "tldr") + ["hardware.precision=bf16-mixed", "task.reward.epochs=1"],
                      tmp_path)
    meta = json.loads((run_reward(cfg) / "meta.json").read_text())
    assert meta["steps"] > 1 and math.isfinite(meta["val_loss"]) and 0.0 <= meta["val_accuracy"] <= 1.0


def step0_examples(n: int = 16) -> list[dict]:
    rng = random.Random(2)
    return [{"prompt_ids": [1] + [rng.randrange(2, 23) for _ in range(6)],
             "chosen_ids": [rng.randrange(2, 23) for _ in range(10)],
             "rejected_ids": [rng.randrange(2, 23) for _ in range(12)]} for _ in range(n)]


def test_precomputed_reference_matches_the_bf16_policy_at_step_0(tiny_lm, tmp_path):
    """The precompute pass (task.train.precompute_ref_logps) runs under the training precision: at step 0 the
    policy is the reference, so log w = 0 exactly up to batch-composition rounding (in float32 it was 0.003 off)."""
    from isdpo.ref_cache import add_reference_logps

    reference = freeze(copy.deepcopy(tiny_lm))
    examples, _, _ = add_reference_logps(step0_examples(), reference, pad_id=0, cache_dir=tmp_path, device=None,
                                         precision="bf16-mixed")
    module = PreferenceModule(tiny_lm.train(), None, build_loss("dpo", 0.1, {}, {"enabled": True}), lr=1e-3)
    with torch.no_grad(), bf16():
        lp = module.pair_logps(PreferenceCollator(0)(examples))  # the policy is the reference: step 0
    log_w = (lp.policy_chosen - lp.ref_chosen) + (lp.policy_rejected - lp.ref_rejected)
    assert log_w.abs().max().item() < 1e-4


def test_precomputed_reference_cache_is_keyed_by_precision(tiny_lm, tmp_path):
    """A float32 entry is never reused for a bf16-mixed run, nor the reverse; "32" and "32-true" (and the
    default) share the float32 entry, whose key has no precision (entries made before the key had one)."""
    from isdpo.ref_cache import add_reference_logps

    reference = freeze(copy.deepcopy(tiny_lm))

    def run(**kw):
        out, path, hit = add_reference_logps(step0_examples(), reference, pad_id=0, cache_dir=tmp_path, device=None,
                                             **kw)
        return [e["chosen_ref_logp"] for e in out], path, hit

    f32, f32_path, hit = run(precision="32-true")
    assert not hit and "precision" not in json.loads((f32_path / "key.json").read_text())["key"]
    b16, b16_path, hit = run(precision="bf16-mixed")
    assert not hit and b16_path != f32_path  # recomputed, not the float32 numbers
    assert json.loads((b16_path / "key.json").read_text())["key"]["precision"] == "bf16-mixed"
    assert b16 != f32 and max(abs(a - b) for a, b in zip(b16, f32)) < LOGP_TOL
    assert run(precision="bf16") == (b16, b16_path, True)  # Lightning's alias of bf16-mixed
    for kw in ({"precision": "32"}, {"precision": 32}, {}):
        assert run(**kw) == (f32, f32_path, True)
    f16, f16_path, hit = run(precision="16-mixed")
    assert not hit and f16_path not in (f32_path, b16_path)


def test_bf16_mixed_clips_gradients_with_the_fused_adamw(tiny_lm, pairs_batch, tmp_path, monkeypatch):
    """Text tasks train with fused AdamW (task.train.fused_adamw) and clip at 1.0: Lightning's mixed-precision
    plugin refuses to clip for any fused optimizer (it could unscale fp16 gradients itself), though bf16 has no
    loss scaler and its gradients are plain. The module clips them itself then."""
    from isdpo.trainer import build_trainer

    clipped = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        out = real(parameters, max_norm, *args, **kwargs)
        clipped.append((max_norm, torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])))
        return out

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    module = PreferenceModule(tiny_lm.train(), freeze(copy.deepcopy(tiny_lm)), build_loss("dpo", 0.1), lr=1e-3,
                              fused_adamw=True)
    hw = {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "precision": "bf16-mixed", "strategy": "auto"}
    trainer = build_trainer(hw, max_steps=2, accumulate=1, run_dir=tmp_path, logger=False, callbacks=[],
                            gradient_clip_val=1e-4, progress=False)
    trainer.fit(module, torch.utils.data.DataLoader([pairs_batch] * 2, batch_size=None))
    assert trainer.global_step == 2
    assert [m for m, _ in clipped] == [1e-4, 1e-4] and all(n.item() <= 1e-4 * 1.001 for _, n in clipped)
