"""peft=lora: only the adapters train; the reference is the policy without its adapters (the same weight
tensors, one copy in memory), so at step 0 the two are equal exactly; policy/ holds the adapter (reloads to the
trained policy's log-probs) and, with merge_on_save, the merged model; checkpoints hold the adapters only and
resume to the same numbers; the SFT stage and the golden RM train with adapters and publish plain models."""
import json
import math
from pathlib import Path

import pytest
import torch

from isdpo.artifacts import reward_key
from isdpo.config import ConfigError, validate
from isdpo.data.collate import PreferenceCollator
from isdpo.losses import build_loss
from isdpo.logprobs import response_logps
from isdpo.models import add_lora, freeze, has_adapters, load_causal_lm, merge_adapters, shared_copy
from isdpo.module import PreferenceModule
from isdpo.recipe import prepare_model
from isdpo.ref_cache import weights_fingerprint
from isdpo.stages import run_stage
from isdpo.stages.common import task_of
from tests.fixtures_text import WORDS, build_tiny_llama, build_tokenizer, write_jsonl
from tests.hydra_utils import SMALL, compose_cfg
from tests.resume_harness import resume_after_crash

peft = pytest.importorskip("peft")

LORA = {"r": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": "all-linear"}
LINEAR_PER_LAYER = 7  # q, k, v, o, gate, up, down


def pairs(n: int, vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(3, vocab, (k,), generator=g).tolist()  # noqa: E731
    return [{"prompt_ids": ids(5), "chosen_ids": ids(4 + i % 3), "rejected_ids": ids(3 + i % 2)} for i in range(n)]


def lora_pair(model, lora=LORA, seed=0):
    reference = freeze(model)
    return prepare_model(shared_copy(reference), lora=lora, seed=seed), reference


def test_only_the_adapters_train_and_the_reference_is_the_base_exactly(tiny_lm):
    original = weights_fingerprint(tiny_lm)
    policy, reference = lora_pair(tiny_lm)
    loss_fn = build_loss("dpo", 0.1, {}, {"enabled": True})
    module = PreferenceModule(policy, reference, loss_fn, lr=1e-2)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * LINEAR_PER_LAYER * 2 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # One copy of the weights: every reference tensor is the policy's own base weight.
    policy_storage = {p.data_ptr() for p in policy.parameters()}
    assert all(p.data_ptr() in policy_storage for p in reference.parameters())
    assert weights_fingerprint(reference) == original  # the reference is the model as loaded (ref-logp cache key)
    # The adapters' dropout is a setting of peft=lora, not the policy dropout the module switches off.
    drops = [m.p for n, m in policy.named_modules() if isinstance(m, torch.nn.Dropout) and "lora_dropout" in n]
    assert drops and set(drops) == {0.1}
    assert module.policy.training and not module.reference.training
    batch = PreferenceCollator(0)(pairs(6, 23))
    lp = module.pair_logps(batch)  # train mode, dropout 0.1 on the adapters' input: B = 0 still adds nothing
    assert torch.equal(lp.policy_chosen, lp.ref_chosen) and torch.equal(lp.policy_rejected, lp.ref_rejected)
    out = loss_fn(lp)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-7) and out.metrics["is/weight_mean"].item() == 1.0
    out.loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in module.parameters())
    torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1.0).step()
    after = module.pair_logps(batch)
    assert torch.equal(after.ref_chosen, lp.ref_chosen) and not torch.equal(after.policy_chosen, lp.policy_chosen)
    assert weights_fingerprint(reference) == original


def test_adapters_train_under_activation_checkpointing(tiny_lm):
    policy, _ = lora_pair(tiny_lm)
    policy = prepare_model(policy, activation_checkpointing=True)
    policy.train()
    ids = torch.randint(0, 23, (2, 9))
    policy(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in policy.named_parameters() if "lora_B" in n]  # A's is 0 while B = 0
    assert grads and all(g is not None and bool(g.abs().sum() > 0) for g in grads)


def test_adapter_init_is_seeded_and_leaves_the_global_random_state_alone(tiny_lm):
    state = torch.random.get_rng_state()
    a, _ = lora_pair(tiny_lm, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    b, _ = lora_pair(tiny_lm, seed=3)
    c, _ = lora_pair(tiny_lm, seed=4)
    key = "model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert not torch.equal(a.state_dict()[key], c.state_dict()[key])


# ---------------------------------------------------------------------------------------------------------
# the stages: synthetic task, tiny model
# ---------------------------------------------------------------------------------------------------------

LORA_RUN = SMALL + ["peft=lora", "peft.r=4", "peft.dropout=0.1", "task.train.lr=1e-3"]


@pytest.fixture(scope="module")
def lora_pipeline(tmp_path_factory):
    """stage=pipeline with peft=lora and merge_on_save; the trained policy object is kept (as align saves it)."""
    from isdpo.stages import align

    tmp = tmp_path_factory.mktemp("lora")
    cfg = compose_cfg(LORA_RUN + ["peft.merge_on_save=true"], tmp)
    validate(cfg)
    trained = {}
    real_save = align.save_model

    def keep(model, task, path, **kw):
        trained["policy"] = model
        return real_save(model, task, path, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(align, "save_model", keep)
        result = run_stage(cfg)
    return cfg, result, tmp / "run", trained["policy"]


def test_users_chat_data_with_adapters(tmp_path):
    """The README's command with peft=lora: task=preference on a conversational JSONL, model.pretrained as the
    reference (no SFT); policy/ holds the adapter and the tokenizer with its chat template, and loads with
    AutoPeftModelForCausalLM (its base: model.pretrained)."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    from tests.test_preference_task import TEMPLATE, chat_rows

    tok = build_tokenizer([" ".join(WORDS), "<|user|> <|assistant|> <|system|> be brief and then?"] * 4)
    tok.chat_template = TEMPLATE
    model_dir = build_tiny_llama(tok, tmp_path / "model")
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(24))
    cfg = compose_cfg(["task=preference", f"task.data_files.train='{train}'", f"model.pretrained='{model_dir}'",
                       "peft=lora", "peft.r=4", "loss=isdpo", "stage=align", "logger=none", "task.max_length=64",
                       "task.max_prompt_length=40", "task.train.global_batch_size=8",
                       "hardware.per_device_batch_size=4",
                       "task.train.lr=1e-2", "task.eval.holdout_fraction=0.25"], tmp_path)
    validate(cfg)
    result = run_stage(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and rows[0]["is/weight_mean"] == 1.0
    assert result["final"]["step"] == 2 and result["final"]["loss"] != rows[0]["loss"]
    policy = tmp_path / "run" / "policy"
    assert AutoTokenizer.from_pretrained(policy).chat_template == TEMPLATE
    assert json.loads((policy / "adapter_config.json").read_text())["base_model_name_or_path"] == str(model_dir)
    model = AutoPeftModelForCausalLM.from_pretrained(policy)
    ids = tok.apply_chat_template([{"role": "user", "content": "why?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    assert torch.isfinite(model(input_ids=ids).logits).all()


def sft_model(cfg):
    return next((Path(cfg.paths.cache_dir) / "sft").glob("*/model"))


def test_policy_folder_holds_the_adapter_that_reloads_to_the_trained_policy(lora_pipeline):
    from peft import AutoPeftModelForCausalLM, PeftModel

    cfg, result, out, trained = lora_pipeline
    assert has_adapters(trained)
    assert {"adapter_config.json", "adapter_model.safetensors", "merged"} <= {p.name for p in
                                                                             (out / "policy").iterdir()}
    assert not (out / "policy" / "config.json").exists()  # an adapter, not a model
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # KL 0 to float rounding: the policy's log-probs come from the KV-cached sampling pass, the reference's from a
    # full forward (isdpo.evaluate)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-9) and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["is/weight_mean"] == 1.0 and rows[-1]["kl"] > 0  # the policy moved away from the reference
    data = pairs(8, task_of(cfg).vocab_size, seed=1)
    prompts, responses = [p["prompt_ids"] for p in data], [p["chosen_ids"] for p in data]

    def logps(model):
        return response_logps(model, prompts, responses, pad_id=0)

    expected = logps(trained)
    reloaded = PeftModel.from_pretrained(load_causal_lm(cfg.model, path=str(sft_model(cfg))), str(out / "policy"))
    assert torch.equal(logps(reloaded.get_base_model()), expected)
    auto = AutoPeftModelForCausalLM.from_pretrained(str(out / "policy"))  # base: adapter_config.json's SFT folder
    assert torch.equal(logps(auto.get_base_model()), expected)
    merged = load_causal_lm(cfg.model, path=str(out / "policy" / "merged"))  # a plain model: no peft needed
    assert not has_adapters(merged)
    torch.testing.assert_close(logps(merged), expected, rtol=0, atol=1e-4)
    assert not torch.equal(logps(load_causal_lm(cfg.model, path=str(sft_model(cfg)))), expected)


def test_evaluate_stage_puts_the_adapter_on_the_reference(lora_pipeline):
    cfg, result, out, _ = lora_pipeline
    evaluation = run_stage(compose_cfg(LORA_RUN + ["peft.merge_on_save=true", "stage=evaluate"], out.parent))
    assert evaluation["policy"] == str(out / "policy")
    for key in ("win_rate", "kl", "policy_logp"):  # the final point of the curve: same policy, same seeded samples
        assert evaluation[key] == pytest.approx(result["final"][key], rel=1e-6)


def test_checkpoint_holds_the_adapters_not_the_frozen_base(lora_pipeline):
    _, _, out, trained = lora_pipeline
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    adapters = {f"policy.{n}" for n, p in trained.named_parameters() if p.requires_grad}
    assert set(state) == adapters


def test_merge_adapters_leaves_the_policy_as_it_is(tiny_lm):
    policy, reference = lora_pair(tiny_lm)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_()
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    merged = merge_adapters(policy)
    assert not has_adapters(merged) and set(merged.state_dict()) == set(reference.state_dict())
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())
    ids = torch.randint(0, 23, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(ids).logits, policy.eval()(ids).logits, rtol=0, atol=1e-5)
    assert merge_adapters(reference) is reference


def test_resume_with_adapters_gives_the_same_numbers_as_no_interruption(tmp_path, monkeypatch):
    """As tests/test_stages.py's resume test, with peft=lora: uninterrupted 8 steps vs. killed at step 6
    (checkpoint at step 4, the adapters only) and restarted."""
    run = resume_after_crash(LORA_RUN + ["task.train.checkpoint_every_n_steps=4", "task.train.warmup_steps=2"],
                             tmp_path, monkeypatch, crash_at_step=6)
    a, b = run.metrics(run.a), run.metrics(run.b)
    assert [r["step"] for r in b] == [r["step"] for r in a] == [0, 4, 8]
    for ra, rb in zip(a, b):
        for key in ("win_rate", "kl", "golden_reward", "loss"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    assert a[-1]["kl"] > 0
    pa, pb = run.checkpoint(run.a), run.checkpoint(run.b)
    assert set(pa) == set(pb) and pa and all(".lora_" in k for k in pa)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-5, atol=1e-6)
    assert run.resumed["final"]["kl"] == pytest.approx(run.expected["final"]["kl"], rel=1e-5, abs=1e-6)


def test_sft_with_adapters_publishes_a_merged_plain_model(tmp_path):
    import lightning as L

    cfg = compose_cfg(LORA_RUN + ["peft.stages=[sft,align]", "task.sft.lr=1e-2", "stage=sft"], tmp_path)
    validate(cfg)
    entry = run_stage(cfg)
    full = run_stage(compose_cfg(SMALL + ["stage=sft"], tmp_path))
    assert entry != full  # the adapters are part of the SFT entry's key
    model_dir = Path(entry) / "model"
    assert (model_dir / "config.json").exists() and not (model_dir / "adapter_config.json").exists()
    sft = load_causal_lm(cfg.model, path=str(model_dir)).state_dict()
    L.seed_everything(cfg.task.sft.seed, workers=True, verbose=False)  # the SFT's own start
    init = load_causal_lm(cfg.model, vocab_size=task_of(cfg).vocab_size).state_dict()
    assert set(sft) == set(init)
    assert torch.equal(sft["model.embed_tokens.weight"], init["model.embed_tokens.weight"])  # no adapter there
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(sft[q], init[q])


# ---------------------------------------------------------------------------------------------------------
# the golden RM, the config
# ---------------------------------------------------------------------------------------------------------


def test_reward_model_trains_adapters_and_its_new_head(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from isdpo.golden_rm import load_reward_model, score_head_names, sequence_rewards

    tok = build_tokenizer([" ".join(WORDS)] * 4)
    path = build_tiny_llama(tok, tmp_path / "base")
    model = load_reward_model({"name": "tiny", "pretrained": str(path), "dtype": "float32"},
                              pad_token_id=tok.pad_token_id)
    model = prepare_model(model, lora=LORA, trainable=score_head_names(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable and all(".lora_" in n for n in trainable - {"score.weight"})
    assert not any(n.startswith("score.") and ".lora_" in n for n in trainable)  # the head gets no adapter
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or n == "score.weight":
                p.normal_()
    merge_adapters(model).save_pretrained(tmp_path / "rm")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", num_labels=1)
    ids, mask = torch.randint(3, 50, (3, 8)), torch.ones(3, 8, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(sequence_rewards(plain.eval(), ids, mask), sequence_rewards(model.eval(), ids, mask),
                                   rtol=0, atol=1e-5)


def test_reward_key_changes_only_when_the_rm_has_adapters(tmp_path):
    full = reward_key(compose_cfg(["task=tldr", "task.reward.lora.r=4"], run=False).task)
    assert "lora" not in full  # the key of an RM trained in full is the one it had before LoRA existed
    cfg = compose_cfg(["task=tldr", "model=pythia_1b", "task.reward.lora.enabled=true", "task.reward.lora.r=4"],
                      tmp_path)
    validate(cfg)
    assert reward_key(cfg.task)["lora"]["r"] == 4


def test_config_checks(tmp_path, monkeypatch):
    for override, message in [("peft.r=0", r"peft.r must be >= 1 \(got 0\)"),
                              ("peft.alpha=0", r"peft.alpha must be > 0"),
                              ("peft.dropout=1.0", r"peft.dropout must be in \[0, 1\) \(got 1.0\)"),
                              ("peft.target_modules=[]", r"peft.target_modules must be all-linear or a non-empty list"),
                              ("peft.stages=[reward]", r"peft.stages: reward is not known; allowed: sft, align"),
                              ("hardware=cpu_fsdp2",
                               r"peft.backend=lora with hardware.strategy=fsdp is not supported")]:
        with pytest.raises(ConfigError, match=message):
            validate(compose_cfg(SMALL + ["peft=lora", override], tmp_path))
    validate(compose_cfg(SMALL + ["peft=lora", "peft.target_modules=[q_proj,v_proj]"], tmp_path))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    validate(compose_cfg(SMALL, tmp_path))  # peft=none never needs the package
    with pytest.raises(ConfigError, match=r"peft.backend=lora needs the peft package: pip install isdpo\[lora\]"):
        validate(compose_cfg(SMALL + ["peft=lora"], tmp_path))


def test_add_lora_targets_named_modules_only(tiny_lm):
    policy = add_lora(shared_copy(freeze(tiny_lm)), {**LORA, "target_modules": ["q_proj", "v_proj"]})
    adapted = {n.rsplit(".", 1)[-1] for n, m in policy.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "v_proj"}


def test_reward_stage_with_adapters_publishes_a_plain_golden_rm(tmp_path):
    from isdpo.golden_rm import GoldenRM
    from isdpo.stages.reward import run_reward
    from tests.fixtures_text import build_standins, text_overrides

    standins = build_standins(tmp_path / "data", n_train=8, n_eval=4)
    cfg = compose_cfg(text_overrides(standins, "hh") + ["task.reward.lora.enabled=true", "task.reward.lora.r=2"],
                      tmp_path)
    validate(cfg)
    rm_dir = run_reward(cfg, fast_dev_run=True)
    model_dir = rm_dir / "model"
    assert (model_dir / "config.json").exists() and not (model_dir / "adapter_config.json").exists()
    sft = list((tmp_path / "cache" / "sft").glob("*/model"))  # the RM's SFT start, with adapters too: merged
    assert len(sft) == 1 and not (sft[0] / "adapter_config.json").exists()
    scores = GoldenRM(rm_dir)(["a question?"], [" an answer."])
    assert scores.shape == (1,) and torch.isfinite(scores).all()


@pytest.mark.ddp
def test_two_process_ddp_trains_the_same_adapters_as_one_process(tmp_path):
    """As tests/test_ddp.py, with peft=lora: DDP averages the adapters' gradients (the frozen base, shared by the
    policy and the reference, takes no part)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from tests.hydra_utils import ROOT
    from tests.test_ddp import COMMON

    def run(name, overrides):
        env = {**os.environ, "ISDPO_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, str(ROOT / "launch.py"), *COMMON, "peft=lora", "task.train.lr=1e-3", *overrides,
               f"hydra.run.dir={tmp_path / name}"]
        proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return load_file(str(tmp_path / name / "policy" / "adapter_model.safetensors"))

    single = run("single", ["hardware=cpu", "hardware.per_device_batch_size=32"])
    ddp = run("ddp", ["hardware=cpu_ddp2", "hardware.per_device_batch_size=16"])
    assert single.keys() == ddp.keys() and all(".lora_" in k for k in single)
    # Adam's normalised steps of lr 1e-3 turn rounding in tiny gradients into ~1e-5 differences.
    for key in single:
        assert (single[key] - ddp[key]).abs().max().item() < 1e-4, key
    assert max(single[k].abs().max().item() for k in single if "lora_B" in k) > 2e-3  # B moved from 0: not vacuous
