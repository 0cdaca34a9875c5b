"""Evaluation on held-out pairs (TRL's eval/loss, eval/rewards/*, eval/logps/*, eval/is/*) for every task: the
training loss and log-prob code in eval mode without gradients, no draw from the training RNG, and the report
and result.json of runs whose curve has no win rate."""
import copy
import csv
import json
import math
import random

import pytest
import torch

from isdpo import report
from isdpo.callbacks import PairEvaluator
from isdpo.data.collate import PreferenceCollator
from isdpo.losses import build_loss
from isdpo.module import PreferenceModule
from isdpo.stages import run_stage
from isdpo.tasks.text import TextRuntime
from tests.fixtures_text import build_standins, text_overrides
from tests.hydra_utils import SMALL, compose_cfg

IS = {"enabled": True, "log_clip": 2.0}


def pairs(n=10, seed=0, vocab=23, behaviour=False):
    rng = random.Random(seed)
    tok = lambda k: [rng.randrange(1, vocab) for _ in range(k)]  # noqa: E731
    out = [{"prompt_ids": tok(rng.randint(2, 5)), "chosen_ids": tok(rng.randint(2, 6)),
            "rejected_ids": tok(rng.randint(2, 6))} for _ in range(n)]
    if behaviour:
        for p in out:
            p["chosen_behavior_logp"], p["rejected_behavior_logp"] = -rng.uniform(5, 20), -rng.uniform(5, 20)
    return out


def module_of(tiny_lm, loss, moved=True):
    reference = copy.deepcopy(tiny_lm).eval()
    policy = copy.deepcopy(tiny_lm)
    if moved:  # a policy that has moved away from the reference
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return PreferenceModule(policy, reference, loss, lr=1e-3)


def test_pair_metrics_are_the_training_loss_on_all_pairs_at_once(tiny_lm):
    module = module_of(tiny_lm, build_loss("dpo", 0.1, importance_sampling=IS))
    data = pairs(10, behaviour=True)
    rng = torch.get_rng_state()
    got = PairEvaluator(data, pad_id=0, batch_size=3)(module)  # 4 batches
    assert torch.equal(torch.get_rng_state(), rng)  # no draw from the training stream
    assert module.policy.training and not module.reference.training  # modes restored
    with torch.no_grad():
        module.policy.eval()
        want = module.loss_fn(module.pair_logps(PreferenceCollator(0)(data)))
        module.policy.train()
    assert got["loss"] == pytest.approx(float(want.loss), rel=1e-5) and got["n_pairs"] == 10
    for k, v in want.metrics.items():
        assert got[k] == pytest.approx(float(v), rel=1e-5, abs=1e-6), k
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "is/weight_mean", "is/ess_frac"} <= set(got)
    # IS uses the data's behaviour log-probs as mu, not the reference
    lp = module.pair_logps(PreferenceCollator(0)(data))
    mu = torch.tensor([[p["chosen_behavior_logp"], p["rejected_behavior_logp"]] for p in data])
    log_w = (lp.policy_chosen.detach() - mu[:, 0]) + (lp.policy_rejected.detach() - mu[:, 1])
    assert got["is/log_weight_raw_mean"] == pytest.approx(float(log_w.mean()), rel=1e-5)


def test_reference_logps_are_computed_once_and_kept(tiny_lm):
    module = module_of(tiny_lm, build_loss("dpo", 0.1))
    ev = PairEvaluator(pairs(6), pad_id=0, batch_size=4)
    first = ev(module)
    assert all("chosen_ref_logp" in p and "rejected_ref_logp" in p for p in ev.pairs)
    module.reference = None  # the second evaluation needs no reference forward
    assert ev(module) == pytest.approx(first, rel=1e-6)


def test_at_the_start_the_policy_is_the_reference(tiny_lm):
    got = PairEvaluator(pairs(8), pad_id=0, batch_size=8)(module_of(tiny_lm, build_loss("dpo", 0.1, None, IS), False))
    assert got["loss"] == pytest.approx(math.log(2), abs=1e-6) and got["rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert got["is/weight_mean"] == pytest.approx(1.0) and got["rewards/accuracies"] == 0.0


def test_synthetic_task_adds_pair_metrics_without_changing_training(tmp_path):
    """The default job's numbers stay those of a run without the pair metrics."""
    runs = {}
    for n in (64, 0):
        cfg = compose_cfg(SMALL + ["stage=align", "task.eval.every_n_steps=0", "task.train.max_steps=4",
                                   f"task.eval.n_pairs={n}"], tmp_path)
        cfg.paths.output_dir = str(tmp_path / f"run{n}")
        result = run_stage(cfg)
        rows = [json.loads(line) for line in (tmp_path / f"run{n}" / "metrics.jsonl").read_text().splitlines()]
        runs[n] = (result, rows, torch.load(tmp_path / f"run{n}" / "checkpoints" / "last.ckpt",
                                            weights_only=False)["state_dict"])
    (result, rows, state), (result0, rows0, state0) = runs[64], runs[0]
    assert [r["step"] for r in rows] == [0, 4] and "loss" not in rows0[0]
    assert rows[0]["n_pairs"] == 64 and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[0]["is/weight_mean"] == pytest.approx(1.0)  # loss=isdpo: mu = the reference at step 0
    assert rows[-1]["loss"] != rows[0]["loss"]  # the policy moved
    for r, r0 in zip(rows, rows0):
        assert {k: v for k, v in r.items() if k in r0} == r0  # win rate, KL, ...: identical
    assert state.keys() == state0.keys() and all(torch.equal(state[k], state0[k]) for k in state)
    assert result["peak_by"] == "win_rate" and result["peak"] == max(rows, key=lambda r: r["win_rate"])


def test_text_task_held_out_pairs_are_its_eval_split(tmp_path):
    paths = build_standins(tmp_path / "standins", n_train=8, n_eval=16)
    cfg = compose_cfg(text_overrides(paths, "hh"), tmp_path)
    rt = TextRuntime(cfg.task, cfg.model, cfg.paths.cache_dir)
    got = rt.eval_pairs(None, {"n_pairs": 5, "seed": 0})
    assert len(got) == 5 and rt.eval_pairs(None, {"n_pairs": 0, "seed": 0}) == []
    test_prompts = {json.loads(line)["prompt"] for line in open(paths["hh_test"])}
    for e in got:
        assert rt.tokenizer.decode(e["prompt_ids"], skip_special_tokens=True) in test_prompts
        assert e["chosen_ids"][-1] == rt.tokenizer.eos_token_id


def test_report_of_runs_without_a_win_rate(tmp_path):
    """A task=preference run's curve is the pair metrics: the report lists it as completed with its held-out
    accuracy and loss, and draws no win-rate figure for it."""
    for seed in (0, 1):
        run = tmp_path / f"preference-s{seed}"
        run.mkdir()
        rows = [{"step": s, "epoch": 0, "loss": 0.69 - 0.1 * i - 0.01 * seed, "rewards/accuracies": 0.5 + 0.1 * i,
                 "rewards/margins": 0.1 * i, "n_pairs": 64} for i, s in enumerate((0, 10, 20))]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run / "result.json").write_text(json.dumps({
            "status": "completed", "task": "preference", "loss": "dpo", "beta": 0.1, "seed": seed,
            "final": rows[-1], "peak": rows[-1], "peak_by": "rewards/accuracies"}))
    md = report.build_report(tmp_path, tmp_path / "report").read_text()
    runs = list(csv.DictReader(open(tmp_path / "report" / "runs.csv")))
    assert [r["status"] for r in runs] == ["completed", "completed"]
    assert "| loss | β | step of peak | final held-out accuracy | final held-out loss | n seeds |" in md
    assert "| `dpo` | 0.1 | 20 ± 0 | 0.700 ± 0.000 | 0.485 ± 0.00707 | 2 (0 1) |" in md
    assert not list((tmp_path / "report").glob("win_rate_vs_step_*.png"))
    assert list((tmp_path / "report").glob("eval_loss_vs_step_preference.png"))
