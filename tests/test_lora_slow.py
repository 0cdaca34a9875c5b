"""LoRA on a real chat model: SmolLM2-135M-Instruct (the GGUF of scripts/get_smollm2.sh) trains IS-DPO adapters on a
small conversational set rendered with its own chat template (task=preference, peft=lora); policy/ reloads onto the
base to the merged model's log-probs. A minute or two on CPU, hence slow."""
import json
import math
from pathlib import Path

import pytest
import torch

from isdpo.config import validate
from isdpo.logprobs import response_logps
from isdpo.models import load_causal_lm, load_tokenizer
from isdpo.stages import run_stage
from tests.fixtures_text import write_jsonl
from tests.hydra_utils import ROOT, compose_cfg
from tests.test_preference_task import chat_rows

GGUF = ROOT / "models" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not GGUF.exists(), reason=f"{GGUF.relative_to(ROOT)} is absent: run scripts/get_smollm2.sh"),
]


def test_smollm2_lora_isdpo_on_chat_pairs(tmp_path):
    from peft import PeftModel

    train = write_jsonl(tmp_path / "chat.jsonl", chat_rows(20))
    cfg = compose_cfg(["task=preference", "model=smollm2_135m", f"model.pretrained='{GGUF.parent}'",
                       f"task.data_files.train='{train}'", "peft=lora", "peft.r=8", "peft.merge_on_save=true",
                       "loss=isdpo", "stage=align", "logger=none", "task.max_length=128", "task.max_prompt_length=96",
                       "task.train.global_batch_size=4", "hardware.per_device_batch_size=2", "task.train.max_steps=2",
                       "task.train.lr=1e-3", "task.eval.holdout_fraction=0.2", "task.eval.every_n_steps=0"], tmp_path)
    validate(cfg)
    result = run_stage(cfg)
    out = Path(cfg.paths.output_dir)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and rows[0]["is/weight_mean"] == pytest.approx(1.0)
    assert math.isfinite(result["final"]["loss"]) and result["final"]["loss"] != rows[0]["loss"]
    policy = out / "policy"
    assert json.loads((policy / "adapter_config.json").read_text())["r"] == 8
    tok = load_tokenizer({}, path=str(policy))
    assert tok.chat_template == load_tokenizer(cfg.model).chat_template and "<|im_start|>" in tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "Name a colour."}], add_generation_prompt=True,
                                   tokenize=False)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    response = tok(" Blue.<|im_end|>", add_special_tokens=False)["input_ids"]
    base = load_causal_lm(cfg.model)  # the GGUF base, de-quantised
    base_lp = response_logps(base, [prompt], [response], pad_id=tok.pad_token_id)
    adapted = PeftModel.from_pretrained(base, str(policy)).get_base_model()
    lp = response_logps(adapted, [prompt], [response], pad_id=tok.pad_token_id)
    merged = load_causal_lm(cfg.model, path=str(policy / "merged"))
    torch.testing.assert_close(response_logps(merged, [prompt], [response], pad_id=tok.pad_token_id), lp,
                               rtol=0, atol=1e-3)
    assert not torch.equal(lp, base_lp)  # the adapters moved the policy
