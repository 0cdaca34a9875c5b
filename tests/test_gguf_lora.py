"""Your own GGUF chat model with LoRA on your own pairs (the README's first hour): the run, and policy/ loaded
with the README's snippet for a GGUF base (a tiny GGUF stand-in: tests/fixtures_gguf.py)."""
import re

import torch
from transformers import AutoTokenizer

from isdpo.config import validate
from isdpo.models import load_adapter, load_causal_lm, shared_copy
from isdpo.stages import run_stage
from tests.fixtures_gguf import build_tiny_gguf
from tests.fixtures_text import WORDS, build_tokenizer, write_jsonl
from tests.hydra_utils import ROOT, compose_cfg
from tests.test_preference_task import TEMPLATE, chat_rows


def readme_block(needle: str) -> str:
    """The README's python code block that contains ``needle``."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    (block,) = [b for b in blocks if needle in b]
    return block


def test_lora_on_a_gguf_chat_model_loads_with_the_readmes_snippet(tmp_path, capsys):
    tok = build_tokenizer([" ".join(WORDS), "<|user|> <|assistant|> <|system|> be brief and then?"] * 4)
    gguf = build_tiny_gguf(tok, TEMPLATE, tmp_path / "my_model")
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(24))
    cfg = compose_cfg(["task=preference", f"task.data_files.train='{train}'", "model=smollm2_135m",
                       f"model.pretrained='{gguf.parent}'", f"model.gguf_file={gguf.name}", "peft=lora", "peft.r=4",
                       "loss=isdpo", "stage=align", "logger=none", "task.max_length=64", "task.max_prompt_length=40",
                       "task.train.global_batch_size=8", "hardware.per_device_batch_size=4", "task.train.lr=1e-2",
                       "task.eval.holdout_fraction=0.25"], tmp_path)
    validate(cfg)
    result = run_stage(cfg)
    assert result["final"]["step"] == 2
    policy = tmp_path / "run" / "policy"
    line = f'AutoPeftModelForCausalLM.from_pretrained("{policy}", gguf_file="{gguf.name}")'
    assert line in capsys.readouterr().out  # the run says how to load its adapter
    code = (readme_block('gguf_file="model.Q4_1.gguf"').replace("runs/my_lora_run/policy", str(policy))
            .replace("/path/to/folder", str(gguf.parent)).replace("model.Q4_1.gguf", gguf.name))
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the README's own lines
    auto = scope["AutoPeftModelForCausalLM"].from_pretrained(str(policy), gguf_file=gguf.name)
    # the trained policy as isdpo loads it: the base from the config, the adapters from policy/
    base = load_causal_lm(cfg.model)
    trained = load_adapter(shared_copy(base), policy)
    policy_tok = AutoTokenizer.from_pretrained(policy)  # the GGUF's tokenizer and chat template, saved beside
    assert policy_tok.chat_template == TEMPLATE
    ids = policy_tok.apply_chat_template([{"role": "user", "content": "why?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        want = trained(input_ids=ids).logits
        assert not torch.allclose(want, base(input_ids=ids).logits)  # the adapters trained
        for model in (scope["model"], auto):
            assert torch.allclose(model(input_ids=ids).logits, want, atol=1e-5)
