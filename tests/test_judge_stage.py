"""stage=judge: a run's final completions judged through a real chat-completions server on 127.0.0.1."""
import json
import sys

import pytest
from omegaconf import open_dict

from isdpo.config import ConfigError, validate
from isdpo.stages.judge import run_judge
from tests.hydra_utils import compose_cfg
from tests.test_judge import FakeChatServer, split_prompt


def write_completions(out, n=10):
    comp = out / "completions"
    comp.mkdir(parents=True)
    with (comp / "prompts.jsonl").open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"prompt_index": i, "prompt": f"Human: q{i}?", "reference": f"ref {i}",
                                 "reference_score": 0.0}) + "\n")
    for k, prefix in enumerate(["early", "final answer, much longer than the reference"]):
        with (comp / f"eval_{k:04d}.jsonl").open("w") as fh:
            for i in range(n):
                for s in range(2):
                    fh.write(json.dumps({"prompt_index": i, "sample": s, "completion": f"{prefix} {i}.{s}"}) + "\n")
    (out / "result.json").write_text(json.dumps({"status": "completed", "loss": "isdpo"}))


def test_judge_stage_judges_the_final_completions_and_updates_result(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    # a judge that prefers the longer response: the final completions are longer, so they always win
    with FakeChatServer(lambda prompt: "Comparison: x\nMore helpful: " + (
            "A" if len(split_prompt(prompt)[0]) > len(split_prompt(prompt)[1]) else "B")) as server:
        cfg = compose_cfg(["task=hh", "model=llama32_3b", "judge=openai", "stage=judge", "judge.n_prompts=8",
                           f"judge.base_url={server.base_url}"], tmp_path)
        validate(cfg)
        write_completions(tmp_path / "run")
        summary = run_judge(cfg)
    assert summary["n"] == 8 and summary["win_rate"] == 1.0
    assert len(server.requests) == 8
    sent = [split_prompt(r["body"]["messages"][0]["content"]) for r in server.requests]
    assert all(any(s.startswith("final answer") for s in pair) for pair in sent)  # the newest evaluation
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["judge"]["win_rate"] == 1.0 and result["loss"] == "isdpo"
    assert len((tmp_path / "run" / "judge.jsonl").read_text().splitlines()) == 8


def test_judge_needs_completions(tmp_path):
    cfg = compose_cfg(["task=hh", "model=llama32_3b", "judge=openai", "stage=judge"], tmp_path)
    with pytest.raises(FileNotFoundError, match="stage=judge needs the completions"):
        run_judge(cfg, judge=object())


@pytest.mark.parametrize("overrides,message", [
    (["judge=openai"], "the synthetic task has no text to judge"),
    (["stage=judge", "task=hh", "model=llama32_3b"], "stage=judge needs judge=openai or judge=hf"),
])
def test_judge_config_errors(overrides, message, tmp_path):
    cfg = compose_cfg(overrides, tmp_path)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_openai_backend_without_the_package_stops_at_validation(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openai", None)  # as if the optional extra were not installed
    cfg = compose_cfg(["task=hh", "model=llama32_3b", "judge=openai", "stage=judge"], tmp_path)
    with pytest.raises(ConfigError, match=r"judge.backend=openai needs the openai package: pip install isdpo\[judge\]"):
        validate(cfg)
