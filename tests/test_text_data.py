"""TL;DR / HH data: schemas, the truncation policy, the pooled SFT set, error messages, the configs."""
import json
import re

import pytest

from isdpo.data.records import load_pairs, load_sft
from isdpo.data.rows import DataError, read_table
from isdpo.data.tokenization import TruncationStats, fit_lengths, tokenize_pairs, tokenize_sft
from isdpo.tasks.text import TextRuntime
from tests.fixtures_text import build_standins, build_tokenizer, hh_rows, text_overrides, write_jsonl
from tests.hydra_utils import CONF, compose_cfg


@pytest.fixture(scope="session")
def standins(tmp_path_factory):
    return build_standins(tmp_path_factory.mktemp("text_standins"))


@pytest.fixture
def cfg_of(standins, tmp_path):
    def make(task="tldr", extra=()):
        return compose_cfg(text_overrides(standins, task) + list(extra), tmp_path)
    return make


def test_tldr_schema_is_read_and_tokenized(cfg_of):
    cfg = cfg_of("tldr")
    rt = TextRuntime(cfg.task, cfg.model, cfg.paths.cache_dir)
    pairs, counts = load_pairs(rt._spec(), "train")
    assert counts == {"read": 48, "dropped_identical_text": 0, "dropped_empty_text": 0} and len(pairs) == 48
    p = pairs[0]
    assert p["prompt"].startswith("SUBREDDIT: r/") and p["prompt"].endswith("TL;DR:")
    assert p["chosen"].startswith(" ") and "<|endoftext|>" not in p["chosen"] + p["rejected"]
    tok = rt.tokenizer
    ex, stats = tokenize_pairs(pairs, tok, max_length=96, max_prompt_length=64)
    assert stats.kept == len(ex) == 48 and stats.prompts_truncated > 0 and stats.responses_truncated > 0
    for e in ex:
        assert e["prompt_ids"][0] == tok.bos_token_id and len(e["prompt_ids"]) <= 64
        assert len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) <= 96
    short = [e for e, p in zip(ex, pairs) if len(tok(p["chosen"], add_special_tokens=False)["input_ids"]) < 20]
    assert short and all(e["chosen_ids"][-1] == tok.eos_token_id for e in short)  # untruncated responses end in EOS
    # the text round-trips through the tokenizer (byte-level BPE)
    assert tok.decode(ex[1]["chosen_ids"], skip_special_tokens=True) == pairs[1]["chosen"]


def test_truncation_policy_keeps_the_prompt_end_and_bos():
    stats = TruncationStats()
    prompt, (c, r) = fit_lengths([1, 10, 11, 12, 13, 14], [[20, 21, 22], [30]], max_length=7, max_prompt_length=4,
                                 bos_id=1, stats=stats)
    assert prompt == [1, 12, 13, 14]  # BOS kept, then the END of the prompt
    assert c == [20, 21, 22] and r == [30]
    prompt, (c, r) = fit_lengths([10, 11, 12], [[20, 21, 22, 23, 24, 25], [30]], max_length=5, max_prompt_length=3,
                                 bos_id=1, stats=stats)
    assert prompt == [10, 11, 12] and c == [20, 21] and r == [30]  # response cut to the room left
    assert fit_lengths([10, 11, 12], [[20, 21, 22]], max_length=5, max_prompt_length=3, bos_id=None,
                       truncate_responses=False, stats=stats) is None  # drop instead of truncating
    assert fit_lengths([10], [[]], max_length=5, max_prompt_length=3, bos_id=None, stats=stats) is None
    assert (stats.prompts_truncated, stats.responses_truncated, stats.dropped_too_long, stats.dropped_empty) == (1, 1, 1, 1)
    with pytest.raises(ValueError, match="max_prompt_length"):
        fit_lengths([1], [[2]], max_length=4, max_prompt_length=4, bos_id=None)


def test_hh_pairs_with_chosen_equal_rejected_are_dropped(cfg_of, capsys):
    cfg = cfg_of("hh", ["task.train.preferences=dataset", "task.train.precompute_ref_logps=false"])
    rt = TextRuntime(cfg.task, cfg.model, cfg.paths.cache_dir)
    n_identical = sum(r["chosen"] == r["rejected"] for r in hh_rows(48, 4))
    assert n_identical == 8
    examples = rt.preference_examples(None, cfg.paths.cache_dir)
    assert len(examples) == 48 - n_identical
    assert all(e["chosen_ids"] != e["rejected_ids"] for e in examples)
    assert f"{n_identical} chosen == rejected" in capsys.readouterr().out  # counts are logged


def test_pooled_sft_set_is_tldr_sft_plus_hh_chosen_and_shared_by_both_tasks(cfg_of):
    tldr, hh = cfg_of("tldr"), cfg_of("hh")
    rt = TextRuntime(tldr.task, tldr.model, tldr.paths.cache_dir)
    sft = rt.sft_examples()
    assert len(sft) == 48 + 48
    hh_chosen = {r["chosen"] for r in hh_rows(48, 4)}
    decoded = {rt.tokenizer.decode(e["response_ids"], skip_special_tokens=True) for e in sft}
    assert hh_chosen <= decoded  # every HH chosen response is an SFT target
    assert all(e["response_ids"][-1] == rt.tokenizer.eos_token_id for e in sft)
    # same key + same sft block => stages.run_sft builds ONE reference for both tasks
    assert rt.sft_key() == TextRuntime(hh.task, hh.model, hh.paths.cache_dir).sft_key()
    assert tldr.task.sft == hh.task.sft and tldr.task.reward == hh.task.reward


def test_missing_column_names_the_column_and_the_file(tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"query": "q", "chosen": " a"}])
    with pytest.raises(DataError, match=r"no column 'rejected'.*columns: chosen, query") as err:
        load_pairs({"dataset": None, "data_files": str(f), "columns": {"prompt": "query", "chosen": "chosen",
                                                                       "rejected": "rejected"}}, "train")
    assert "bad.jsonl" in str(err.value)


def test_empty_data_set_and_missing_split_messages(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl.*split 'train'.*is empty"):
        read_table(None, str(f), "train", ["prompt"])
    with pytest.raises(DataError, match=r"data_files has no file for split 'test' \(it has: train\)"):
        read_table(None, {"train": str(f)}, "test", ["prompt"])
    with pytest.raises(DataError, match="does not exist"):
        read_table(None, str(tmp_path / "nope.jsonl"), "train", ["prompt"])


def test_a_set_emptied_by_filtering_says_so(cfg_of, tmp_path):
    f = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "\n\nHuman: hi\n\nAssistant:", "response": " x",
                                              "chosen": " x", "rejected": " x"}] * 3)
    cfg = cfg_of("hh", [f"task.data_files='{f}'", "task.train.preferences=dataset"])
    rt = TextRuntime(cfg.task, cfg.model, cfg.paths.cache_dir)
    with pytest.raises(DataError, match="the hh preference set is empty after filtering"):
        rt.preference_examples(None, tmp_path)


def test_parquet_files_read_like_jsonl(standins, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in open(standins["hh_train"])]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "hh.parquet")
    spec = {"dataset": None, "columns": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"},
            "drop_identical": True}
    a, _ = load_pairs({**spec, "data_files": standins["hh_train"]}, "train")
    b, _ = load_pairs({**spec, "data_files": str(tmp_path / "hh.parquet")}, "train")
    assert a == b


PAIR_COLS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}


@pytest.fixture(scope="module")
def small_tok():
    """A tokenizer trained on a few HH rows in well under a second (no model needed)."""
    return build_tokenizer([v for r in hh_rows(16, 0) for v in r.values()])


def test_empty_responses_are_dropped_and_counted_not_trained_as_a_bare_eos(small_tok, tmp_path, capsys):
    good = {"prompt": "\n\nHuman: hi?\n\nAssistant:", "chosen": " the cat sat.", "rejected": " a dog ran."}
    rows = [good, {**good, "chosen": ""}, {**good, "rejected": "  \n"}, {**good, "chosen": "<|endoftext|>"},
            {**good, "chosen": "", "rejected": ""}, {**good, "prompt": " "}]
    f = write_jsonl(tmp_path / "empty.jsonl", rows)
    pairs, counts = load_pairs({"data_files": str(f), "columns": PAIR_COLS, "strip_suffix": "<|endoftext|>"}, "train")
    assert pairs == [good] and counts == {"read": 6, "dropped_identical_text": 0, "dropped_empty_text": 5}
    ex, stats = tokenize_pairs(pairs, small_tok, max_length=64, max_prompt_length=32, pre_counts=counts)
    assert (stats.read, stats.dropped_empty, stats.kept) == (6, 5, 1) and "not in the sampled subset" not in stats.extra
    assert "5 empty -> 1 kept" in capsys.readouterr().out
    # pairs handed over directly (e.g. a relabelled file) are checked on their text too, before EOS is appended
    ex, stats = tokenize_pairs(rows[:3], small_tok, max_length=64, max_prompt_length=32, log=False)
    assert (stats.dropped_empty, stats.kept) == (2, 1)
    assert all(len(e["chosen_ids"]) > 1 and len(e["rejected_ids"]) > 1 for e in ex)
    sft, stats = tokenize_sft([{"prompt": good["prompt"], "response": r} for r in (" the cat.", "", " \t")], small_tok,
                              max_length=64, max_prompt_length=32, log=False)
    assert (stats.read, stats.dropped_empty, stats.kept) == (3, 2, 1) and sft[0]["response_ids"] != [small_tok.eos_token_id]


def test_null_cells_are_rejected_naming_file_row_and_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = {"prompt": "p", "chosen": " a", "rejected": " b", "response": " a"}
    f = tmp_path / "nulls.jsonl"
    f.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "chosen": None}) + "\n")  # line 3 (a blank line 2)
    with pytest.raises(DataError, match=r"nulls\.jsonl:3: column 'chosen' is null; fix or remove the row"):
        load_pairs({"data_files": str(f), "columns": PAIR_COLS}, "train")
    f.write_text(json.dumps(good) + "\n" + '{"prompt": "p", "chosen": " a", "rejected": NaN, "response": " a"}\n')
    with pytest.raises(DataError, match=r"nulls\.jsonl:2: column 'rejected' is null"):
        load_pairs({"data_files": str(f), "columns": PAIR_COLS}, "train")
    f.write_text(json.dumps({**good, "response": None}) + "\n")
    with pytest.raises(DataError, match=r"nulls\.jsonl:1: column 'response' is null"):
        load_sft({"data_files": str(f), "split": "train", "columns": {"prompt": "prompt", "response": "response"}})
    pq.write_table(pa.Table.from_pylist([good, {**good, "prompt": None}]), tmp_path / "nulls.parquet")
    with pytest.raises(DataError, match=r"nulls\.parquet: row 2: column 'prompt' is null"):
        load_pairs({"data_files": str(tmp_path / "nulls.parquet"), "columns": PAIR_COLS}, "train")
    pq.write_table(pa.table({"prompt": ["p", "q"], "chosen": [" a", " c"], "rejected": [1.0, float("nan")]}),
                   tmp_path / "nan.parquet")
    with pytest.raises(DataError, match=r"nan\.parquet: row 2: column 'rejected' is null"):
        load_pairs({"data_files": str(tmp_path / "nan.parquet"), "columns": PAIR_COLS}, "train")


def test_undecodable_lines_name_file_and_line(tmp_path):
    line = json.dumps({"prompt": "p", "chosen": " a", "rejected": " b"}).encode() + b"\n"
    f = tmp_path / "bad.jsonl"
    f.write_bytes(line * 4 + b'{"prompt": "p" "chosen": " a"}\n' + line)
    with pytest.raises(DataError, match=r"bad\.jsonl:5: not valid JSON \(Expecting ',' delimiter: line 1 column 16\)"):
        read_table(None, str(f), "train", ["prompt"])
    f.write_bytes(line * 8 + b'{"\xff": 1}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:9: not UTF-8 \(byte 0xff at position 3\)"):
        read_table(None, str(f), "train", ["prompt"])
    f.write_bytes(line + b'["p", " a", " b"]\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not a JSON object \(got list\)"):
        read_table(None, str(f), "train", ["prompt"])
    g = tmp_path / "bad.json"
    g.write_bytes(b"[\n" + line.rstrip() + b",\n" + line.rstrip() + b"\n" + line + b"]\n")  # no ',' after line 3
    with pytest.raises(DataError, match=r"bad\.json:4: not valid JSON \(Expecting ',' delimiter: line 4 column 1\)"):
        read_table(None, str(g), "train", ["prompt"])


def test_eval_set_has_distinct_prompts_and_the_chosen_reference(cfg_of):
    cfg = cfg_of("tldr", ["task.eval.n_prompts=100"])
    rt = TextRuntime(cfg.task, cfg.model, cfg.paths.cache_dir)
    examples, prompts, refs = rt.eval_set(cfg.task.eval)
    assert len(prompts) == len(set(prompts)) == 16  # all distinct prompts of the validation file
    chosen = {r["query"]: r["chosen"].removesuffix("<|endoftext|>") for r in map(json.loads, open(rt.cfg.data_files.validation))}
    assert all(chosen[p] == r for p, r in zip(prompts, refs))


MODEL_KEYS = {"name", "pretrained", "gguf_file", "tokenizer", "dtype", "attn_implementation", "config"}
MODELS = ["smollm2_135m", "llama32_3b", "llama31_8b_rm", "pythia_1b", "pythia_2_8b", "tiny_llama_local"]


@pytest.mark.parametrize("task", ["tldr", "hh"])
def test_text_task_configs_compose_with_every_model(task, tmp_path):
    synthetic = compose_cfg(["task=synthetic"], tmp_path).task
    for model in MODELS:
        cfg = compose_cfg([f"task={task}", f"model={model}"], tmp_path)
        assert set(cfg.model) == MODEL_KEYS, model
        assert set(cfg.task.reward.model) == MODEL_KEYS
        for block in ("sft", "train", "eval"):  # the stages read the same keys as on the synthetic task
            assert set(synthetic[block]) - {"max_new_tokens"} <= set(cfg.task[block]), block
        assert cfg.task.eval.n_prompts == 512 and cfg.task.eval.samples_per_prompt == 2
        assert (cfg.task.eval.temperature, cfg.task.eval.top_p, cfg.task.eval.max_new_tokens) == (0.7, 0.95, 128)
        assert (cfg.task.train.global_batch_size, cfg.task.train.lr, cfg.task.train.warmup_steps) == (64, 1e-6, 100)
        assert (cfg.task.max_length, cfg.task.max_prompt_length) == (640, 512)
        assert (cfg.task.reward.global_batch_size, cfg.task.reward.lr, cfg.task.reward.epochs) == (128, 5e-6, 1)
    assert compose_cfg([f"task={task}"], tmp_path).task.reward.model.pretrained == "meta-llama/Llama-3.1-8B"


@pytest.mark.parametrize("path", sorted([f"model/{m}.yaml" for m in MODELS] + ["task/tldr.yaml", "task/hh.yaml",
                                                                                "task/_text.yaml"]))
def test_every_config_key_has_a_comment(path):
    for line in (CONF / path).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith(("#", "- ")) and re.match(r"\s*[\w@/]+:", line):
            assert "#" in line or line.rstrip().endswith(":"), line  # block headers may go without
