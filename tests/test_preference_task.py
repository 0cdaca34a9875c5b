"""task=preference: a user's pairs in TRL's formats (standard, conversational with a chat template, implicit
prompt), a column mapping, CSV, the held-out split, bad rows named by file, row and column, and stage=align on
the tiny local Llama without an SFT stage."""
import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from isdpo.config import ConfigError, validate
from isdpo.data.rows import DataError, holdout_split
from isdpo.data.trl_formats import preference_pairs, read_preference_rows
from isdpo.stages import run_stage
from isdpo.tasks.preference import PreferenceRuntime
from tests.fixtures_text import WORDS, build_tiny_llama, build_tokenizer, write_jsonl
from tests.hydra_utils import ROOT, compose_cfg

# A small chat template in the style of real ones: the generation prompt opens the assistant's turn, the
# turn ends with the EOS token.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
COLUMNS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "chosen_logp": "chosen_logp",
           "rejected_logp": "rejected_logp"}


def words(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


def chat_rows(n: int) -> list[dict]:
    """Conversational pairs (explicit prompt); every third one has a system message and two user turns."""
    rows = []
    for i in range(n):
        prompt = [{"role": "user", "content": words(i, 5) + "?"}]
        if i % 3 == 0:
            prompt = [{"role": "system", "content": "be brief"}, *prompt,
                      {"role": "assistant", "content": words(i + 1, 3)}, {"role": "user", "content": "and then?"}]
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": words(i + 2, 4)}],
                     "rejected": [{"role": "assistant", "content": words(i + 3, 6)}]})
    return rows


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The tiny Llama with a tokenizer that has a chat template (saved beside it)."""
    root = tmp_path_factory.mktemp("chat_model")
    tok = build_tokenizer([" ".join(WORDS), "<|user|> <|assistant|> <|system|> be brief and then?"] * 4)
    tok.chat_template = TEMPLATE
    return build_tiny_llama(tok, root / "model")


def runtime(model_dir: Path, tmp_path: Path, extra=()) -> PreferenceRuntime:
    cfg = compose_cfg(["task=preference", "model=tiny_llama_local", f"model.pretrained='{model_dir}'",
                       "task.max_length=160", "task.max_prompt_length=128", "task.train.global_batch_size=4",
                       "hardware.per_device_batch_size=4", *extra], tmp_path)
    validate(cfg)
    return PreferenceRuntime(cfg.task, cfg.model, cfg.paths.cache_dir)


def test_conversational_pairs_are_rendered_with_the_chat_template(model_dir, tmp_path):
    rows = chat_rows(12)
    train = write_jsonl(tmp_path / "chat.jsonl", rows)
    rt = runtime(model_dir, tmp_path, [f"task.data_files.train='{train}'", "task.eval.holdout_fraction=0.25"])
    tok = rt.tokenizer
    assert tok.chat_template == TEMPLATE
    examples = rt.preference_examples(None, None)
    held = rt.eval_pairs(None, {"n_pairs": 100, "seed": 0})
    assert len(examples) == 9 and len(held) == 3  # a quarter held out
    # each pair, in file order: the kept rows are the ones not held out
    kept, _ = holdout_split(12, 0.25, 0)
    for e, i in zip(examples, kept):
        prompt = tok.apply_chat_template(rows[i]["prompt"], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(rows[i]["prompt"] + rows[i]["chosen"], tokenize=False)
        assert prompt.endswith("<|assistant|>") and full == prompt + rows[i]["chosen"][0]["content"] + "<eos>"
        # the template writes the BOS: none is added on top; the response ends with one EOS
        assert e["prompt_ids"] == tok(prompt, add_special_tokens=False)["input_ids"]
        assert e["prompt_ids"].count(tok.bos_token_id) == 1
        assert e["chosen_ids"][-1] == tok.eos_token_id and e["chosen_ids"].count(tok.eos_token_id) == 1
        assert tok.decode(e["prompt_ids"] + e["chosen_ids"]) == full
        assert "chosen_behavior_logp" not in e  # the file has no log-prob columns


def test_standard_format_with_a_column_mapping_from_csv(model_dir, tmp_path):
    path = tmp_path / "pairs.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "question", "good", "bad", "lp_good", "lp_bad"])
        for i in range(6):
            w.writerow([i, words(i, 4) + ",\nplease", " " + words(i + 1, 3), " " + words(i + 2, 5), -1.5 - i, -2.0])
    rt = runtime(model_dir, tmp_path, [f"task.data_files.train='{path}'", "task.columns.prompt=question",
                                       "task.columns.chosen=good", "task.columns.rejected=bad",
                                       "task.columns.chosen_logp=lp_good", "task.columns.rejected_logp=lp_bad",
                                       "task.eval.holdout_fraction=0.2"])
    tok = rt.tokenizer
    examples = rt.preference_examples(None, None)
    assert len(examples) == 5
    kept, _ = holdout_split(6, 0.2, 0)
    for e, i in zip(examples, kept):
        # a plain-text prompt gets the tokenizer's own special tokens (BOS), as on the text tasks
        assert e["prompt_ids"][0] == tok.bos_token_id
        assert tok.decode(e["prompt_ids"], skip_special_tokens=True) == words(i, 4) + ",\nplease"
        assert tok.decode(e["chosen_ids"], skip_special_tokens=True) == " " + words(i + 1, 3)
        assert (e["chosen_behavior_logp"], e["rejected_behavior_logp"]) == (-1.5 - i, -2.0)


def test_implicit_prompt_is_the_shared_prefix(model_dir, tmp_path):
    convs = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in chat_rows(4)]
    texts = [{"chosen": "Q: why? A: because", "rejected": "Q: why? A: no idea"},
             {"chosen": "Q: how? A: so", "rejected": "Q: how? A: like this"}]
    rows, locate, used = read_preference_rows(None, str(write_jsonl(tmp_path / "c.jsonl", convs)), "train", COLUMNS)
    assert used["prompt"] is None and used["chosen_logp"] is None  # absent from the data: implicit, no mu
    rt = runtime(model_dir, tmp_path, [f"task.data_files.train='{tmp_path / 'c.jsonl'}'"])
    pairs, counts, fmt = preference_pairs(rows, locate, used, tokenizer=rt.tokenizer)
    assert fmt == "conversational" and counts["read"] == 4 and len(pairs) == 4
    explicit, _, _ = preference_pairs(*read_preference_rows(
        None, str(write_jsonl(tmp_path / "e.jsonl", chat_rows(4))), "train", COLUMNS), tokenizer=rt.tokenizer)
    assert pairs == explicit  # the same pairs as with the prompt given
    rows, locate, used = read_preference_rows(None, str(write_jsonl(tmp_path / "t.jsonl", texts)), "train", COLUMNS)
    pairs, _, fmt = preference_pairs(rows, locate, used)
    assert fmt == "standard"
    assert pairs == [{"prompt": "Q: why? A:", "chosen": " because", "rejected": " no idea"},
                     {"prompt": "Q: how? A:", "chosen": " so", "rejected": " like this"}]


def bad_chat(kind: str) -> list[dict]:
    rows = chat_rows(4)
    r = rows[2]  # the third line of the file
    if kind == "missing column":
        del r["rejected"]
    elif kind == "empty message list":
        r["chosen"] = []
    elif kind == "last message not the assistant's":
        r["chosen"] = [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]
    elif kind == "roles do not alternate":
        r["prompt"] = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    elif kind == "prompt ends with the assistant":
        r["prompt"] = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        r["rejected"] = [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    elif kind == "not a message":
        r["rejected"] = ["just text"]
    elif kind == "text in a conversational file":
        r["chosen"] = "just text"
    elif kind == "no shared prefix":
        for row in rows:
            row["chosen"], row["rejected"] = row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]
            del row["prompt"]
        r["rejected"] = [{"role": "user", "content": "other"}, {"role": "assistant", "content": "x"}]
    elif kind == "bad log-prob":
        for row in rows:
            row["chosen_logp"], row["rejected_logp"] = -1.0, -2.0
        r["chosen_logp"] = "n/a"
    elif kind == "one log-prob column":
        for row in rows:
            row["chosen_logp"] = -1.0
    return rows


BAD = [
    ("missing column", r":3: column 'rejected' is missing"),
    ("empty message list", r":3: column 'chosen': the message list is empty"),
    ("last message not the assistant's", r":3: column 'chosen': the last message is 'user', not 'assistant'"),
    ("roles do not alternate", r":3: column 'prompt', message 1: role 'user' where 'assistant' belongs"),
    ("prompt ends with the assistant", r":3: column 'prompt': the prompt's last message is 'assistant'"),
    ("not a message", r":3: column 'rejected', message 0: expected \{\"role\": \.\.\., \"content\": \.\.\.\}"),
    ("text in a conversational file", r":3: column 'chosen': expected a list of \{role, content\} messages"),
    ("no shared prefix", r":3: columns 'chosen' and 'rejected' share no prefix: .*task\.columns\.prompt"),
    ("bad log-prob", r":3: column 'chosen_logp': 'n/a' is not a finite log-probability"),
    ("one log-prob column", r":1: has the behaviour log-prob column 'chosen_logp' but not 'rejected_logp'"),
]


@pytest.mark.parametrize("kind,message", BAD, ids=[b[0] for b in BAD])
def test_bad_rows_name_file_row_and_column(kind, message, model_dir, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", bad_chat(kind))
    rt = runtime(model_dir, tmp_path, [f"task.data_files.train='{path}'", "task.data_files.eval='" + str(
        write_jsonl(tmp_path / "ok.jsonl", chat_rows(2))) + "'"])
    with pytest.raises(DataError, match=re.escape(str(path)) + message):
        rt.preference_examples(None, None)


def test_conversational_data_without_a_chat_template_says_what_to_set(tmp_path):
    tok = build_tokenizer([" ".join(WORDS)])
    rows, locate, used = read_preference_rows(None, str(write_jsonl(tmp_path / "c.jsonl", chat_rows(2))), "train",
                                              COLUMNS)
    with pytest.raises(DataError, match=r"c\.jsonl:1: conversational data needs a chat template .*task\.chat_template"):
        preference_pairs(rows, locate, used, tokenizer=tok)


def test_the_held_out_split_is_a_seeded_carve_or_the_given_file(model_dir, tmp_path):
    kept, held = holdout_split(100, 0.05, 0)
    assert len(held) == 5 and sorted(kept + held) == list(range(100)) and holdout_split(100, 0.05, 0) == (kept, held)
    assert holdout_split(100, 0.05, 1)[1] != held
    assert len(holdout_split(3, 0.01, 0)[1]) == 1 and len(holdout_split(3, 0.99, 0)[1]) == 2  # never none, never all
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    evalf = write_jsonl(tmp_path / "eval.jsonl", chat_rows(3))
    rt = runtime(model_dir, tmp_path, [f"task.data_files.train='{train}'", f"task.data_files.eval='{evalf}'"])
    assert len(rt.preference_examples(None, None)) == 8 and len(rt.eval_pairs(None, {"n_pairs": 2, "seed": 0})) == 2


def test_config_errors(model_dir, tmp_path):
    cfg = compose_cfg(["task=preference", "model=tiny_llama_local", f"model.pretrained='{model_dir}'",
                       "task.dataset=null"], tmp_path)
    with pytest.raises(ConfigError, match=r"task.dataset and task.data_files.train are both null: .*"
                                          r"task.data_files.train=my_pairs.jsonl"):
        validate(cfg)
    cfg = compose_cfg(["task=preference", "model=tiny"], tmp_path)
    with pytest.raises(ConfigError, match=r"task=preference needs a pretrained model"):
        validate(cfg)
    cfg = compose_cfg(["task=preference", "model=tiny_llama_local", f"model.pretrained='{model_dir}'",
                       "task.eval.holdout_fraction=1.0"], tmp_path)
    with pytest.raises(ConfigError, match=r"task.eval.holdout_fraction must be in \(0, 1\) \(got 1.0\)"):
        validate(cfg)


def test_align_trains_on_the_pairs_without_sft(model_dir, tmp_path):
    """The README's command: stage=align on a user's JSONL with model.pretrained as the reference: no SFT entry, the pair metrics are
    the curve (at step 0 the policy is the reference: loss log 2, IS weights 1), result.json's peak is by
    held-out accuracy, and policy/ loads with the tokenizer's chat template."""
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(24))
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "launch.py"), "task=preference", f"task.data_files.train='{train}'",
           f"model.pretrained='{model_dir}'", "loss=isdpo", "stage=align", "logger=none",
           "task.max_length=64", "task.max_prompt_length=40", "task.train.global_batch_size=8",
           "hardware.per_device_batch_size=4", "task.train.lr=1e-3", "task.train.epochs=2",
           "task.eval.every_n_steps=2", "task.eval.holdout_fraction=0.25", f"hydra.run.dir={out}",
           f"paths.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "no SFT stage (task.sft.enabled=false): the reference is model.pretrained" in proc.stdout
    assert re.search(r"isdpo-b0\.1-s0: final held-out accuracy \d\.\d{3}, loss \d\.\d{4} \(step 4\), peak accuracy",
                     proc.stdout), proc.stdout[-2000:]
    result = json.loads((out / "result.json").read_text())
    assert not (tmp_path / "cache" / "sft").exists()  # SFT skipped
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4]  # 18 pairs / 8 = 2 steps per epoch, 2 epochs
    first = rows[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5) and first["n_pairs"] == 6
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5) and first["is/weight_mean"] == pytest.approx(1.0)
    for r in rows:
        assert {"logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                "is/ess_frac"} <= set(r) and "win_rate" not in r
    assert rows[-1]["loss"] != first["loss"]
    assert result["final"] == rows[-1] and result["peak_by"] == "rewards/accuracies"
    assert result["peak"]["rewards/accuracies"] == max(r["rewards/accuracies"] for r in rows)
    assert result["reference_dir"] == str(model_dir)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "policy")
    policy = AutoModelForCausalLM.from_pretrained(out / "policy")
    assert tok.chat_template == TEMPLATE
    ids = tok.apply_chat_template([{"role": "user", "content": "why?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    assert torch.isfinite(policy(ids).logits).all()


def test_pipeline_with_sft_enabled_and_the_evaluate_stage(model_dir, tmp_path):
    """task.sft.enabled=true: the reference is the SFT of model.pretrained on the chosen responses; stage=evaluate
    gives the pair metrics of policy/ (the task has no golden reward), those of the last evaluation point."""
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(20))
    cfg = compose_cfg(["task=preference", f"model.pretrained='{model_dir}'", f"task.data_files.train='{train}'",
                       "stage=pipeline", "loss=dpo", "logger=none", "task.sft.enabled=true", "task.sft.batch_size=4",
                       "task.sft.lr=1e-3", "task.train.global_batch_size=4", "hardware.per_device_batch_size=4",
                       "task.train.max_steps=3", "task.train.lr=1e-3", "task.eval.holdout_fraction=0.2"], tmp_path)
    validate(cfg)
    result = run_stage(cfg)
    sft = list((tmp_path / "cache" / "sft").glob("*/model"))
    assert len(sft) == 1 and result["reference_dir"] == str(sft[0].parent)
    assert result["final"]["step"] == 3 and "win_rate" not in result["final"]
    evaluation = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert evaluation["policy"] == str(tmp_path / "run" / "policy") and evaluation["n_pairs"] == 4
    assert evaluation["loss"] == pytest.approx(result["final"]["loss"], rel=1e-5)
    assert evaluation["rewards/accuracies"] == result["final"]["rewards/accuracies"]


def test_a_hub_data_set_with_its_own_eval_split(model_dir, tmp_path, monkeypatch):
    """A hub data set in the shape of trl-lib/ultrafeedback_binarized (implicit prompt, conversational, extra
    columns), through datasets.load_dataset (replaced by an in-memory stand-in: no hub here)."""
    import datasets

    def rows(n, seed):
        return [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"], "score_chosen": 8.0,
                 "score_rejected": 3.0} for r in chat_rows(n + seed)[seed:]]

    splits = {"train": rows(10, 0), "test": rows(4, 10)}
    asked = []

    def load_dataset(name, split):
        asked.append((name, split))
        return datasets.Dataset.from_list(splits[split])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    rt = runtime(model_dir, tmp_path, ["task.dataset=someone/prefs"])
    assert len(rt.preference_examples(None, None)) == 10 and len(rt.eval_pairs(None, {"n_pairs": 9, "seed": 0})) == 4
    assert asked == [("someone/prefs", "train"), ("someone/prefs", "test")]
    rt = runtime(model_dir, tmp_path, ["task.dataset=someone/prefs", "task.splits.eval=null"])
    assert len(rt.preference_examples(None, None)) == 9  # one of the 10 train rows held out


def test_every_bad_row_is_reported_at_once(model_dir, tmp_path):
    """Bad rows of any kind, anywhere in the file (both sides of the held-out carve), in one error, each with its
    line and column; past MAX_BAD_ROWS they are counted."""
    rows = chat_rows(30)
    rows[2]["chosen"] = []
    rows[7]["prompt"] = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    rows[11]["rejected"] = "just text"
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    rt = runtime(model_dir, tmp_path, [f"task.data_files.train='{path}'", "task.eval.holdout_fraction=0.5"])
    with pytest.raises(DataError) as err:
        rt.preference_examples(None, None)
    lines = str(err.value).splitlines()
    assert lines[0] == "3 rows do not fit:"
    assert sorted(lines[1:], key=lambda line: int(line.split(":")[1])) == [
        f"  {path}:3: column 'chosen': the message list is empty; fix or remove the row",
        f"  {path}:8: column 'prompt', message 1: role 'user' where 'assistant' belongs (roles must alternate "
        "user/assistant after an optional system message, the prompt ending with the user's turn and the response "
        "with the assistant's; fix or remove the row)",
        f"  {path}:12: column 'rejected': expected a list of {{role, content}} messages (the conversational format of "
        "most rows), got str"]
    held = set(holdout_split(30, 0.5, 0)[1])
    assert {2, 7, 11} & held and {2, 7, 11} - held  # bad rows on both sides of the carve
    for r in rows[:25]:
        r["chosen"] = []
    path = write_jsonl(tmp_path / "worse.jsonl", rows)
    rt = runtime(model_dir, tmp_path, [f"task.data_files.train='{path}'", f"task.data_files.eval='{path}'"])
    with pytest.raises(DataError, match=r"^25 rows do not fit \(the first 20 shown\):\n  .*worse\.jsonl:1: ") as err:
        rt.preference_examples(None, None)
    assert len(str(err.value).splitlines()) == 22 and str(err.value).endswith("\n  ... and 5 more")
    for r in rows[3:5]:
        r["chosen"] = None
    path = write_jsonl(tmp_path / "nulls.jsonl", rows)
    with pytest.raises(DataError, match=r"^2 rows do not fit:\n  .*nulls\.jsonl:4: column 'chosen' is null; fix or "
                                        r"remove the row\n  .*nulls\.jsonl:5: column 'chosen' is null"):
        read_preference_rows(None, str(path), "train", COLUMNS)


def test_a_bad_row_is_judged_by_the_format_of_the_whole_file(model_dir, tmp_path):
    """A 2-row conversational file whose only good row is held out: the other row's error names the conversational
    format (it was judged standard, from the training split's first row, with the wrong message)."""
    good, bad = chat_rows(2)
    bad["chosen"] = "just text"
    (held,) = holdout_split(2, 0.5, 0)[1]
    rows = [good, bad] if held == 0 else [bad, good]
    path = write_jsonl(tmp_path / "two.jsonl", rows)
    rt = runtime(model_dir, tmp_path, [f"task.data_files.train='{path}'", "task.eval.holdout_fraction=0.5"])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:{2 - held}: column 'chosen': expected a list of "
                                        r"\{role, content\} messages \(the conversational format of most rows\), got str$"):
        rt.preference_examples(None, None)
    rt = runtime(model_dir, tmp_path, [f"task.data_files.train='{path}'", "task.eval.holdout_fraction=0.5",
                                       "task.format=standard"])
    with pytest.raises(DataError, match=r"column 'prompt': expected text \(task\.format=standard\), got list"):
        rt.preference_examples(None, None)


def test_a_tiny_held_out_split_is_named_with_what_to_change(model_dir, tmp_path, capsys):
    path = write_jsonl(tmp_path / "pairs.jsonl", chat_rows(45))
    rt = runtime(model_dir, tmp_path, [f"task.data_files.train='{path}'"])  # holdout_fraction 0.05: 2 of 45 rows
    assert len(rt.eval_pairs(None, {"n_pairs": 256, "seed": 0})) == 2
    out = capsys.readouterr().out
    assert ("[isdpo] WARNING: task.eval.holdout_fraction=0.05 of 45 rows holds out 2 pair(s): their metrics "
            "(eval/loss, eval/rewards/accuracies, ...) are noise at this size (an accuracy moves in steps of 0.5); "
            "raise task.eval.holdout_fraction to 0.45 (20 rows) or give task.data_files.eval") in out
    rt = runtime(model_dir, tmp_path, [f"task.data_files.train='{path}'", "task.eval.holdout_fraction=0.45"])
    rt.eval_pairs(None, {"n_pairs": 256, "seed": 0})
    assert "WARNING" not in capsys.readouterr().out
