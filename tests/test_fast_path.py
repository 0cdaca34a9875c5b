"""The fast path of preference training gives the same loss and gradients as the plain path.

Plain path: right-padded batch (PreferenceCollator), one concatenated forward, online reference,
response-only head. Each switch is checked against it, alone:
(a) reference log-probs precomputed by isdpo.ref_cache instead of an online reference forward;
(b) separate chosen/rejected forwards instead of one concatenated forward (the slow variant);
(c) full-vocabulary logits instead of the response-only LM head (the slow variant);
(d) packed rows (prompt shared by chosen and rejected, or not) instead of padding; length-grouped
    batches (a deterministic, resumable, rank-sharded order that only regroups pairs);
(e) gradient checkpointing and torch.compile.
Plus isdpo.flops (MFU arithmetic, the device table, the throughput callback).
"""
import copy
import random
import time

import lightning as L
import pytest
import torch

from isdpo.data.batching import (LengthGroupedLoader, LengthGroupedSampler, PackedPreferenceCollator,
                                 pair_length)
from isdpo.data.collate import PreferenceCollator
from isdpo.flops import PerfMonitor, matmul_params, peak_flops, step_flops
from isdpo.logprobs import batch_logps, batch_token_counts, compile_decoder
from isdpo.losses import PairLogps, build_loss
from isdpo.models import add_lora
from isdpo.module import PreferenceModule
from isdpo.online import OnlinePairs, PromptCollator

V = 23


def make_pairs(n=6, seed=0, max_prompt=7):
    rng = random.Random(seed)
    tok = lambda k: [rng.randrange(1, V) for _ in range(k)]  # noqa: E731
    pairs = [{"prompt_ids": tok(rng.randint(1, max_prompt)), "chosen_ids": tok(rng.randint(1, 6)),
              "rejected_ids": tok(rng.randint(1, 6))} for _ in range(n)]
    pairs[0]["prompt_ids"] = []  # no prompt: the first response token is not scored, on every path
    return pairs


@pytest.fixture
def models(tiny_lm):
    """A policy and a reference that differ (so online vs precomputed reference is a real check)."""
    policy = tiny_lm.train()
    reference = copy.deepcopy(tiny_lm).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for p in reference.parameters():
        p.requires_grad_(False)
    return policy, reference


def loss_and_grads(policy, reference, batch, **opts):
    """DPO loss of a batch and the policy's gradient, through isdpo.logprobs.batch_logps."""
    policy.zero_grad(set_to_none=True)
    logps, n_tok = batch_logps(policy, batch, **opts)
    n = logps.shape[0] // 2
    if "chosen_ref_logp" in batch:
        ref_c, ref_r = batch["chosen_ref_logp"], batch["rejected_ref_logp"]
    else:
        with torch.no_grad():
            ref, _ = batch_logps(reference, batch, **opts)
        ref_c, ref_r = ref[:n], ref[n:]
    out = build_loss("dpo", 0.5)(PairLogps(logps[:n], logps[n:], ref_c, ref_r, n_tok[:n], n_tok[n:]))
    out.loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in policy.named_parameters()}
    return out.loss.detach(), out.losses.detach(), logps.detach(), n_tok, grads


def assert_same(a, b, atol=1e-5, rtol=1e-4):
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=rtol)  # loss
    torch.testing.assert_close(a[2], b[2], atol=atol, rtol=rtol)  # per-row log-probs
    assert torch.equal(a[3], b[3])  # scored tokens per row
    assert a[4].keys() == b[4].keys()
    for k in a[4]:
        torch.testing.assert_close(a[4][k], b[4][k], atol=atol, rtol=rtol, msg=k)
    assert any(g.abs().sum() > 0 for g in a[4].values())


def test_a_precomputed_reference_logps_equal_online(models, tmp_path):
    from isdpo.ref_cache import add_reference_logps

    policy, reference = models
    pairs = make_pairs()
    plain = loss_and_grads(policy, reference, PreferenceCollator(0)(pairs))
    with_ref, _, hit = add_reference_logps(pairs, reference, pad_id=0, cache_dir=tmp_path, batch_size=4)
    assert not hit
    batch = PreferenceCollator(0)(with_ref)
    assert "chosen_ref_logp" in batch
    assert_same(loss_and_grads(policy, None, batch), plain)
    # ... and through the training module, whose reference may then be None
    module = PreferenceModule(policy, None, build_loss("dpo", 0.5), lr=1e-3)
    online = PreferenceModule(policy, reference, build_loss("dpo", 0.5), lr=1e-3)
    torch.testing.assert_close(module.training_step(batch, 0), online.training_step(PreferenceCollator(0)(pairs), 0),
                               atol=1e-5, rtol=1e-4)


def test_b_separate_forwards_equal_concatenated(models):
    policy, reference = models
    batch = PreferenceCollator(0)(make_pairs())
    assert_same(loss_and_grads(policy, reference, batch, concatenated=False), loss_and_grads(policy, reference, batch))


def test_c_full_logits_equal_response_only_head(models):
    policy, reference = models
    batch = PreferenceCollator(0)(make_pairs())
    assert_same(loss_and_grads(policy, reference, batch, response_only=False), loss_and_grads(policy, reference, batch))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("share_prompt", [True, False])
@pytest.mark.parametrize("row_capacity", [None, 40])
@pytest.mark.parametrize("response_only", [True, False])
def test_d_packed_batch_equals_padded(models, attn, share_prompt, row_capacity, response_only):
    policy, reference = models
    for m in (policy, reference):
        m.config._attn_implementation = attn
    pairs = make_pairs(n=7, seed=1)
    packed = PackedPreferenceCollator(0, share_prompt=share_prompt, row_capacity=row_capacity)(pairs)
    padded = PreferenceCollator(0)(pairs)
    if row_capacity:
        assert packed["input_ids"].shape[0] < len(pairs)  # several segments share a row
    assert_same(loss_and_grads(policy, reference, packed, response_only=response_only),
                loss_and_grads(policy, reference, padded, response_only=response_only))
    # fewer slots than the padded batch, and the same sequence-token count
    seq_p, comp_p = batch_token_counts(packed)
    seq_d, comp_d = batch_token_counts(padded)
    assert seq_p == seq_d == comp_d
    assert comp_p == seq_d - share_prompt * sum(len(p["prompt_ids"]) for p in pairs)


def test_d_packed_batch_through_the_module_with_precomputed_reference(models, tmp_path):
    """The training module reads a packed batch (reference log-probs carried along) like a padded one."""
    from isdpo.ref_cache import add_reference_logps

    policy, reference = models

    class Module(PreferenceModule):  # what the module's logps becomes when the fast path is wired in
        def logps(self, model, batch):
            return batch_logps(model, batch, response_only=self.response_only)

    pairs, _, _ = add_reference_logps(make_pairs(), reference, pad_id=0, cache_dir=tmp_path)
    m = Module(policy, None, build_loss("dpo", 0.5, importance_sampling={"log_clip": 1.0}), lr=1e-3)
    a = m.pair_logps(PackedPreferenceCollator(0)(pairs))
    b = m.pair_logps(PreferenceCollator(0)(pairs))
    for f in ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected", "chosen_lengths", "rejected_lengths"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), atol=1e-5, rtol=1e-5)


def test_d_packing_rejects_attention_without_4d_masks(models):
    policy, _ = models
    policy.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa or eager"):
        batch_logps(policy, PackedPreferenceCollator(0)(make_pairs()))


def test_d_length_grouped_batches_give_each_pair_the_same_loss(models):
    """Grouping changes which pairs share a batch, never a pair's own loss (padding is exact)."""
    policy, reference = models
    pairs = make_pairs(n=12, seed=3, max_prompt=12)
    loss = build_loss("dpo", 0.5)

    def per_pair(batch_pairs):
        b = PreferenceCollator(0)(batch_pairs)
        with torch.no_grad():
            lp, n = batch_logps(policy, b)
            ref, _ = batch_logps(reference, b)
        k = len(batch_pairs)
        return loss(PairLogps(lp[:k], lp[k:], ref[:k], ref[k:], n[:k], n[k:])).losses

    everything = per_pair(pairs)
    order = LengthGroupedSampler([pair_length(p) for p in pairs], 3, seed=0).indices()
    grouped = torch.empty(len(pairs))
    for i in range(0, len(order), 3):
        idx = order[i:i + 3]
        grouped[idx] = per_pair([pairs[j] for j in idx])
    torch.testing.assert_close(grouped, everything, atol=1e-5, rtol=1e-5)


def _padded_slots(lengths, order, bs):
    return sum(bs * max(lengths[j] for j in order[i:i + bs]) for i in range(0, len(order) - bs + 1, bs))


def test_d_length_grouped_sampler_is_a_seeded_permutation_with_less_padding():
    rng = random.Random(0)
    lengths = [rng.randint(100, 600) for _ in range(203)]
    s = LengthGroupedSampler(lengths, 8, seed=5, group_batches=8)
    a = s.indices()
    assert sorted(a) == list(range(203))
    assert a == LengthGroupedSampler(lengths, 8, seed=5, group_batches=8).indices()  # deterministic by seed
    assert a != LengthGroupedSampler(lengths, 8, seed=6, group_batches=8).indices()
    s.epoch = 1
    assert s.indices() != a  # a new order every epoch
    random_order = list(range(203))
    random.Random(1).shuffle(random_order)
    assert _padded_slots(lengths, a, 8) < 0.8 * _padded_slots(lengths, random_order, 8)
    # within a global batch the lengths are close: each batch is a slice of a sorted mega-batch
    batches = [a[i:i + 8] for i in range(0, 200, 8)]
    spread = [max(lengths[j] for j in b) - min(lengths[j] for j in b) for b in batches]
    assert statistics_median(spread) < 60
    # one group per batch = a plain shuffle of the same size
    assert sorted(LengthGroupedSampler(lengths, 8, seed=5, group_batches=1).indices()) == list(range(203))


def statistics_median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def test_d_length_grouped_sampler_shards_global_batches_by_rank(monkeypatch):
    import isdpo.data.batching as batching

    lengths = [random.Random(i).randint(10, 500) for i in range(50)]
    monkeypatch.setattr(batching, "rank_world", lambda launcher=False: (0, 1))
    full = LengthGroupedSampler(lengths, 4, seed=2).indices()
    shards = []
    for rank in range(2):
        monkeypatch.setattr(batching, "rank_world", lambda launcher=False, rank=rank: (rank, 2))
        shards.append(LengthGroupedSampler(lengths, 4, seed=2).indices())
    assert len(shards[0]) == len(shards[1]) == 25
    assert not set(shards[0]) & set(shards[1])
    # micro-batch j of every rank is a slice of the same global batch of 8 similar lengths
    g0 = LengthGroupedSampler(lengths, 4, seed=2)
    monkeypatch.setattr(batching, "rank_world", lambda launcher=False: (0, 1))
    g0.batch_size = 8
    glob = g0.indices()
    for j in range(3):
        assert set(shards[0][4 * j:4 * j + 4]) | set(shards[1][4 * j:4 * j + 4]) == set(glob[8 * j:8 * j + 8])
    assert sorted(full) == list(range(50))


def test_d_length_grouped_loader_resumes_mid_epoch():
    pairs = make_pairs(n=20, seed=4, max_prompt=15)
    mk = lambda: LengthGroupedLoader(pairs, batch_size=3, seed=1, collate_fn=lambda b: [pair_length(e) for e in b])  # noqa: E731
    full = list(mk())
    assert len(full) == 6
    resumed = mk()
    resumed.load_state_dict({"epoch": 0, "consumed": 2})
    assert list(resumed) == full[2:]
    assert max(max(b) - min(b) for b in full) < max(pair_length(p) for p in pairs) - min(pair_length(p) for p in pairs)


def test_e_gradient_checkpointing_gives_the_same_loss_and_gradients(models):
    policy, reference = models
    batch = PreferenceCollator(0)(make_pairs())
    plain = loss_and_grads(policy, reference, batch)
    policy.gradient_checkpointing_enable()
    try:
        assert policy.model.gradient_checkpointing and policy.training
        assert_same(loss_and_grads(policy, reference, batch), plain)
        assert_same(loss_and_grads(policy, reference, PackedPreferenceCollator(0)(make_pairs())), plain)
    finally:
        policy.gradient_checkpointing_disable()


@pytest.mark.slow  # compiling forward + backward takes minutes on these CPUs (185 s measured under load)
def test_e_torch_compile_gives_the_same_loss_and_gradients(models):
    policy, reference = models
    batch = PreferenceCollator(0)(make_pairs())
    plain = loss_and_grads(policy, reference, batch)
    compiled = compile_decoder(copy.deepcopy(policy))
    try:
        assert_same(loss_and_grads(compiled, reference, batch), plain, atol=1e-4, rtol=1e-3)
        # another length: dynamic shapes, no failure
        other = PreferenceCollator(0)(make_pairs(n=3, seed=9, max_prompt=12))
        assert_same(loss_and_grads(compiled, reference, other), loss_and_grads(policy, reference, other),
                    atol=1e-4, rtol=1e-3)
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# isdpo.flops
# ---------------------------------------------------------------------------------------------


def test_flops_table_and_parameter_count(tiny_lm):
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16-mixed") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA H100 PCIe", "bf16-true") == pytest.approx(756.5e12)
    assert peak_flops("NVIDIA H200", "bf16-mixed") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA A100-SXM4-80GB", "32-true", tf32=True) == pytest.approx(156e12)
    assert peak_flops("NVIDIA A100-SXM4-80GB", "32-true", tf32=False) == pytest.approx(19.5e12)
    assert peak_flops("Some CPU", "32-true") is None
    total = sum(p.numel() for p in tiny_lm.parameters())
    emb = tiny_lm.get_input_embeddings().weight.numel()
    assert matmul_params(tiny_lm) == total - emb  # untied head: counted once, as a parameter
    tied = copy.deepcopy(tiny_lm)
    tied.lm_head.weight = tied.model.embed_tokens.weight
    assert matmul_params(tied) == total - emb  # tied: the head matmul still costs its parameters
    assert step_flops(10, 3, 10, 3) == 6 * 30 + 2 * 30


def test_throughput_monitor_logs_tokens_and_mfu(models, tmp_path):
    policy, reference = models
    pairs = make_pairs(n=12, seed=5)
    loader = torch.utils.data.DataLoader(pairs, batch_size=3, collate_fn=PreferenceCollator(0))
    module = PreferenceModule(policy, reference, build_loss("dpo", 0.5), lr=1e-3)
    mon = PerfMonitor(peak_flops=1e12, log_every_n_steps=1)
    auto = PerfMonitor(log_every_n_steps=3)  # CPU: tokens/s only

    class SlowEval(L.Callback):  # stands for EvalCallback: slow work after the batch, not training time
        def on_train_batch_end(self, *a):
            time.sleep(0.5)

    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[mon, auto, SlowEval()],
                        default_root_dir=str(tmp_path))
    trainer.fit(module, loader)
    assert [h["step"] for h in mon.history] == [2, 3, 4]  # the first batch (set-up) is not timed
    assert all(h["perf/step_s"] < 0.5 for h in mon.history)  # the evaluation after the batch is not counted
    n = matmul_params(policy)
    for h, first in zip(mon.history, range(3, 12, 3)):
        b = PreferenceCollator(0)(pairs[first:first + 3])
        tokens = int(b["attention_mask"].sum())
        sec = h["perf/step_s"]
        assert h["perf/tokens_per_s"] == pytest.approx(tokens / sec, rel=1e-6)
        assert h["perf/pairs_per_s"] == pytest.approx(3 / sec, rel=1e-6)
        assert h["perf/mfu"] == pytest.approx((6 * n * tokens + 2 * n * tokens) / sec / 1e12, rel=1e-6)
    assert len(auto.history) == 1 and "perf/mfu" not in auto.history[0] and auto.history[0]["perf/tokens_per_s"] > 0


def test_online_steps_count_the_tokens_of_the_pairs_they_sampled(models, tmp_path):
    """Online training: the loader holds prompts only; throughput and MFU count the pairs each step sampled and
    trained on (the sampling's own forwards are in the step's time, not in its FLOPs)."""
    policy, reference = models
    prompts = [{"prompt_ids": p["prompt_ids"] or [1]} for p in make_pairs(n=12, seed=5)]
    score = lambda prompts, responses: torch.tensor([float(sum(r)) for r in responses])  # noqa: E731
    online = OnlinePairs(score, PreferenceCollator(0), pad_id=0, eos_id=None, max_new_tokens=3, seed=0)
    module = PreferenceModule(policy, reference, build_loss("dpo", 0.5), lr=1e-3, online=online)
    mon = PerfMonitor(peak_flops=1e12, log_every_n_steps=1)
    sampled = []

    class Sampled(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *a):
            sampled.append(pl_module.sampled_batch)

    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[mon, Sampled()],
                        default_root_dir=str(tmp_path))
    trainer.fit(module, torch.utils.data.DataLoader(prompts, batch_size=3, collate_fn=PromptCollator()))
    assert [h["step"] for h in mon.history] == [2, 3, 4]
    n = matmul_params(policy)
    for h, batch in zip(mon.history, sampled[1:]):
        tokens, sec = int(batch["attention_mask"].sum()), h["perf/step_s"]
        assert tokens > 0 and h["perf/tokens_per_s"] == pytest.approx(tokens / sec, rel=1e-6)
        assert h["perf/pairs_per_s"] == pytest.approx(3 / sec, rel=1e-6)
        assert h["perf/mfu"] == pytest.approx((6 * n * tokens + 2 * n * tokens) / sec / 1e12, rel=1e-6)


def test_a_lora_step_counts_no_weight_gradients_for_the_frozen_base(tiny_lm):
    """Under LoRA a trained token costs 4N + 2N_trained FLOPs (forward, input gradients everywhere, weight
    gradients of the adapters only), not 6N."""
    adapted = add_lora(copy.deepcopy(tiny_lm), {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"})
    adapters = sum(p.numel() for name, p in adapted.named_parameters() if "lora_" in name)
    n, n_trained = matmul_params(adapted), matmul_params(adapted, trained_only=True)
    assert adapters > 0 and n_trained == adapters and n == matmul_params(tiny_lm) + adapters
    assert step_flops(n, 5, n_trained=n_trained) == (4 * n + 2 * adapters) * 5 < 0.75 * step_flops(n, 5)
    assert step_flops(n, 5) == 6 * n * 5  # every weight trained: the 6N rule
    mon = PerfMonitor()
    mon.setup(None, PreferenceModule(adapted, tiny_lm, build_loss("dpo", 0.5), lr=1e-3), "fit")
    assert (mon.n_policy, mon.n_trained) == (n, adapters)
