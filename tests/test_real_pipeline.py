"""The real-task stages on offline stand-ins (tiny Llama, tokenizer trained on the spot, TL;DR/HH-schema files):
every stage under fast_dev_run, the chained pipeline sft -> reward -> relabel -> align -> evaluate, the golden
RM, relabelling (dataset pairs and generated ones with behaviour log-probs), cached reference log-probs."""
import copy
import json
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from transformers import AutoTokenizer

from isdpo.data.collate import PreferenceCollator
from isdpo.losses import build_loss
from isdpo.module import PreferenceModule
from isdpo.relabel import pair_up
from isdpo.artifacts import reward_dir
from isdpo.golden_rm import GoldenRM, bradley_terry_loss, sequence_rewards
from isdpo.logprobs import response_logps
from isdpo.module import RewardModule
from isdpo.stages.relabel import run_relabel
from isdpo.stages.reward import run_reward
from isdpo.tasks.text import TextRuntime
from tests.fixtures_text import build_standins, text_overrides
from tests.hydra_utils import compose_cfg


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    return build_standins(tmp_path_factory.mktemp("standins"))


def _cfg(standins, tmp: Path, task: str, extra=(), cache: Path | None = None):
    cfg = compose_cfg(text_overrides(standins, task) + list(extra), tmp)
    if cache is not None:
        with open_dict(cfg):
            cfg.paths.cache_dir = str(cache)
    return cfg


def _stages(cfg, fast_dev_run: bool) -> dict:
    from isdpo import stages

    out = {"sft": stages.run_sft(cfg, fast_dev_run=fast_dev_run)}
    out["reward"] = run_reward(cfg, fast_dev_run=fast_dev_run)
    out["relabel"] = run_relabel(cfg, fast_dev_run=fast_dev_run)
    out["align"] = stages.run_align(cfg, ref_dir=out["sft"], fast_dev_run=fast_dev_run)
    out["evaluate"] = stages.run_evaluate(cfg, ref_dir=out["sft"])
    out["rm_meta"] = json.loads((out["reward"] / "meta.json").read_text())
    return out


@pytest.fixture(scope="module")
def chain(standins, tmp_path_factory):
    """TL;DR with fast_dev_run, then HH for real (tiny sizes), sharing one cache (one SFT set, one golden RM)."""
    tmp = tmp_path_factory.mktemp("chain")
    cache = tmp / "cache"
    fdr_cfg = _cfg(standins, tmp / "fdr", "tldr", cache=cache)
    fdr = _stages(fdr_cfg, fast_dev_run=True)
    real_cfg = _cfg(standins, tmp / "real", "hh", ["task.eval.every_n_steps=1"], cache=cache)
    real = _stages(real_cfg, fast_dev_run=False)
    return {"fdr": fdr, "fdr_cfg": fdr_cfg, "real": real, "real_cfg": real_cfg, "cache": cache}


def test_every_stage_runs_with_fast_dev_run(chain):
    out, cfg = chain["fdr"], chain["fdr_cfg"]
    assert (out["sft"] / "model" / "config.json").exists()
    assert out["rm_meta"]["fast_dev_run"] is True and out["rm_meta"]["steps"] == 1
    assert (out["relabel"] / "pairs.jsonl").exists()
    assert out["align"]["status"] == "completed" and out["align"]["task"] == "tldr"
    run = Path(cfg.paths.output_dir)
    assert (run / "policy" / "config.json").exists() and (run / "evaluation.json").exists()
    assert 0.0 <= out["evaluate"]["win_rate"] <= 1.0 and out["evaluate"]["kl"] >= 0.0


def test_chained_pipeline_end_to_end(chain):
    out, cfg = chain["real"], chain["real_cfg"]
    # the fast_dev_run stub of the golden RM (same config => same directory) was replaced by a real one
    assert out["reward"] == chain["fdr"]["reward"] and out["rm_meta"]["fast_dev_run"] is False
    assert out["rm_meta"]["steps"] > 1 and 0.0 <= out["rm_meta"]["val_accuracy"] <= 1.0
    assert out["sft"] != chain["fdr"]["sft"]  # SFT keys include fast_dev_run
    run = Path(cfg.paths.output_dir)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at step 0
    assert all(0.0 <= r["win_rate"] <= 1.0 and r["kl"] >= 0.0 for r in rows)
    n = cfg.task.eval.n_prompts * cfg.task.eval.samples_per_prompt
    assert len((run / "samples.jsonl").read_text().splitlines()) == n
    # completions as text, one file per evaluation (3 during training + 1 by stage=evaluate)
    files = sorted((run / "completions").glob("eval_*.jsonl"))
    assert len(files) == 4 and (run / "completions" / "prompts.jsonl").exists()
    last = [json.loads(line) for line in files[-1].read_text().splitlines()]
    assert len(last) == n and {"completion", "golden_reward", "reference_score", "win"} <= set(last[0])
    assert sum(r["win"] for r in last) / n == pytest.approx(out["evaluate"]["win_rate"])
    # policy/ is a complete HF folder: the tokenizer that trained it loads from it too
    tok = AutoTokenizer.from_pretrained(run / "policy")
    assert tok.encode("a summary") == AutoTokenizer.from_pretrained(out["sft"] / "model").encode("a summary")


def test_relabelled_chosen_responses_have_the_higher_golden_score(chain):
    out = chain["real"]
    rows = [json.loads(line) for line in (out["relabel"] / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 40  # 48 HH train pairs, 8 with chosen == rejected dropped, no ties
    rm = GoldenRM(out["reward"], max_length=96, max_prompt_length=64)
    s_c = rm([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    s_r = rm([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert bool((s_c > s_r).all())
    assert s_c.tolist() == pytest.approx([r["chosen_score"] for r in rows], abs=1e-5)
    assert any(r["flipped"] for r in rows) or all(not r["flipped"] for r in rows)


def test_relabel_generate_keeps_behavior_logps(chain, standins, tmp_path):
    extra = ["task.relabel.source=generate", "task.relabel.k=3", "task.relabel.pairing=all",
             "task.relabel.temperature=0.7", "task.relabel.top_p=0.9", "task.relabel.max_prompts=6"]
    cfg = _cfg(standins, tmp_path, "hh", extra, cache=chain["cache"])
    path = run_relabel(cfg)
    rt = TextRuntime(cfg.task, cfg.model, cfg.paths.cache_dir)
    from isdpo import stages

    ref_dir = stages.run_sft(cfg)
    assert ref_dir == chain["real"]["sft"]  # the same SFT policy generated the responses
    rows = [json.loads(line) for line in (path / "pairs.jsonl").read_text().splitlines()]
    assert 0 < len(rows) <= 6 * 3
    for r in rows:
        assert r["chosen_score"] > r["rejected_score"]
        assert r["chosen_ids"] != r["rejected_ids"] and r["chosen_ids"] and r["prompt_ids"]
    from isdpo.models import load_causal_lm

    policy = load_causal_lm(cfg.model, path=str(ref_dir / "model")).eval()
    lp = response_logps(policy, [r["prompt_ids"] for r in rows], [r["chosen_ids"] for r in rows], pad_id=rt.pad_id,
                        temperature=0.7, top_p=0.9)
    assert lp.tolist() == pytest.approx([r["chosen_behavior_logp"] for r in rows], abs=1e-4)
    # align reads them: the exact generated ids, with mu's log-probs, reach the collated batch
    examples = rt.preference_examples(policy, ref_dir)
    assert [e["chosen_ids"] for e in examples] == [r["chosen_ids"] for r in rows]
    batch = PreferenceCollator(rt.pad_id)(examples[:4])
    assert {"chosen_behavior_logp", "rejected_behavior_logp", "chosen_ref_logp", "rejected_ref_logp"} <= set(batch)


def test_behavior_logps_are_those_of_the_sampling_distribution(standins):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(standins["model"]).eval()
    prompts = torch.tensor([[1, 40, 41, 42, 43], [1, 50, 51, 52, 53]])
    for temperature, top_p in ((0.7, 0.9), (1.0, 1.0)):
        torch.manual_seed(0)
        gen = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=temperature,
                             top_p=top_p, top_k=0, max_new_tokens=6, min_new_tokens=6, pad_token_id=0,
                             eos_token_id=None, output_scores=True, return_dict_in_generate=True)
        new = gen.sequences[:, prompts.shape[1]:]
        expected = sum(torch.log_softmax(s.float(), -1).gather(-1, new[:, t : t + 1]).squeeze(-1)
                       for t, s in enumerate(gen.scores))
        got = response_logps(model, prompts.tolist(), new.tolist(), pad_id=0, temperature=temperature, top_p=top_p)
        assert got.tolist() == pytest.approx(expected.tolist(), abs=1e-4)
    # temperature 1, top-p 1: mu is the model itself
    assert got.tolist() == pytest.approx(response_logps(model, prompts.tolist(), new.tolist(), pad_id=0).tolist(), abs=1e-4)


def test_pair_up():
    assert pair_up([0.1, 0.5, 0.3], "best_worst") == [(1, 0)]
    assert pair_up([0.1, 0.5, 0.3], "all") == [(1, 0), (2, 0), (1, 2)]
    assert pair_up([0.2, 0.2], "best_worst") == [] and pair_up([0.2, 0.2, 0.1], "all") == [(0, 2), (1, 2)]


def test_cached_and_online_reference_logps_give_the_same_loss(standins, tmp_path, capsys):
    from isdpo.models import load_causal_lm

    cfg = _cfg(standins, tmp_path, "tldr", ["task.train.preferences=dataset"])
    rt = TextRuntime(cfg.task, cfg.model, cfg.paths.cache_dir)
    reference = load_causal_lm(cfg.model).eval()
    cached = rt.preference_examples(reference, tmp_path)
    assert "precomputed" in capsys.readouterr().out
    assert rt.preference_examples(reference, tmp_path) == cached and "reused from cache" in capsys.readouterr().out
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss_fn = build_loss("dpo", 0.1, {}, {"enabled": True, "log_clip": 2.0})
    collate = PreferenceCollator(rt.pad_id)
    online = PreferenceModule(policy, reference, loss_fn, lr=1e-3)
    offline = PreferenceModule(policy, None, loss_fn, lr=1e-3)
    for i in range(0, len(cached), 16):
        batch = collate(cached[i : i + 16])
        assert "chosen_ref_logp" in batch
        plain = {k: v for k, v in batch.items() if not k.endswith("_ref_logp")}
        lo, lc = online.pair_logps(plain), offline.pair_logps(batch)
        assert lc.ref_chosen.tolist() == pytest.approx(lo.ref_chosen.tolist(), abs=1e-4)
        assert loss_fn(lc).loss.item() == pytest.approx(loss_fn(lo).loss.item(), abs=1e-5)
    # the key includes the weights: another reference gets its own entry
    rt.preference_examples(policy, tmp_path)
    assert "precomputed" in capsys.readouterr().out
    assert len(list((Path(cfg.paths.cache_dir) / "ref_logps").glob("[0-9a-f]*"))) == 2


def test_golden_rm_pools_the_last_real_token_and_trains_bradley_terry(standins):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from isdpo.data.collate import pad_sequences

    tok = AutoTokenizer.from_pretrained(standins["model"])
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(standins["model"], num_labels=1)
    b = pad_sequences([[1, 5, 6], [1, 7]], [[8, 9, 2], [10, 2]], tok.pad_token_id)
    ours = sequence_rewards(model, b["input_ids"], b["attention_mask"])
    theirs = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.squeeze(-1)
    assert ours.tolist() == pytest.approx(theirs.tolist(), abs=1e-5)  # pad (0) != EOS (2): HF pools the same token
    module = RewardModule(model, lr=1e-3)
    pairs = PreferenceCollator(tok.pad_token_id)([{"prompt_ids": [1, 5], "chosen_ids": [6, 2], "rejected_ids": [7, 8, 2]},
                                                  {"prompt_ids": [1, 9], "chosen_ids": [10, 2], "rejected_ids": [11, 2]}])
    module.log = lambda *a, **k: None
    r = sequence_rewards(model, pairs["input_ids"], pairs["attention_mask"])
    loss = module.training_step(pairs, 0)
    assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(r[:2] - r[2:]).mean().item(), abs=1e-6)
    assert bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))[1].item() == 0.5


def test_missing_upstream_outputs_say_which_stage_to_run(standins, tmp_path):
    cfg = _cfg(standins, tmp_path, "tldr")
    rt = TextRuntime(cfg.task, cfg.model, cfg.paths.cache_dir)
    with pytest.raises(FileNotFoundError, match="no golden reward model at .* run stage=reward first"):
        rt.score([[1, 5]], [[6, 2]])
    with pytest.raises(FileNotFoundError, match="run stage=reward first"):
        rt.preference_examples(None, tmp_path)  # relabelled preferences need the RM's identity
    assert reward_dir(cfg.task, cfg.paths.cache_dir).parent == Path(cfg.paths.cache_dir) / "reward"


def test_an_rm_trained_elsewhere_can_be_the_golden_rm(standins, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm_dir = tmp_path / "external_rm"
    AutoModelForSequenceClassification.from_pretrained(standins["model"], num_labels=1).save_pretrained(rm_dir)
    AutoTokenizer.from_pretrained(standins["model"]).save_pretrained(rm_dir)
    cfg = _cfg(standins, tmp_path, "tldr", [f"task.reward.path='{rm_dir}'"])
    assert run_reward(cfg) == rm_dir and not (rm_dir / "meta.json").exists()  # reused, never overwritten
    rt = TextRuntime(cfg.task, cfg.model, cfg.paths.cache_dir)
    scores = rt.score([[1, 40, 41], [1, 50]], [[60, 2], [61, 62, 2]])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
