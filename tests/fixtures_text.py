"""Offline stand-ins for the real text tasks: data files in the TL;DR and HH schemas, a tokenizer
trained on the spot, a tiny Llama saved with save_pretrained, and the Hydra overrides that point
conf/task/{tldr,hh}.yaml at them.

    python tests/fixtures_text.py models/tiny_llama   # builds the stand-ins there (for CLI smoke runs)

The schemas are those of the real hub data sets (see isdpo/data/records.py): TL;DR preferences
(``query``, ``chosen``, ``rejected`` with a leading space and a literal ``<|endoftext|>``), the
TL;DR SFT split (``query``, ``reference_response``), Anthropic-HH (``prompt``, ``response``,
``chosen``, ``rejected``, with a few chosen == rejected pairs as the real set has).
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

WORDS = ("the cat dog bird sat ran on a mat house tree park friend job money car home work day night good bad "
         "happy sad help need want know think feel tell ask about with from very really just then my your "
         "we they he she it is was are were have had do did will would can could should summary post").split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def tldr_rows(n: int, seed: int, long_every: int = 5) -> list[dict]:
    """Rows in the schema of vwxyzjn/summarize_from_feedback_oai_preprocessing_1706381144 (columns used + a few others)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        post = _sentence(rng, 60 if i % long_every == 0 else rng.randint(8, 20))  # some posts exceed max_prompt_length
        query = f"SUBREDDIT: r/{rng.choice(['relationships', 'advice', 'jobs'])}\n\nTITLE: {_sentence(rng, 5)}\n\nPOST: {post}\n\nTL;DR:"
        a, b = _sentence(rng, rng.randint(3, 10)), _sentence(rng, 40 if i % 7 == 0 else rng.randint(3, 10))
        rows.append({"info": {"id": f"t3_{seed}_{i}"}, "query": query, "chosen": f" {a}<|endoftext|>",
                     "rejected": f" {b}<|endoftext|>", "batch": "batch3", "split": "train",
                     "query_token": [0, 1, 2], "chosen_policy": "sup2", "rejected_policy": "ref"})
    return rows


def tldr_sft_rows(n: int, seed: int) -> list[dict]:
    """Rows in the schema of vwxyzjn/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1706381144."""
    rng = random.Random(seed)
    return [{"id": f"s{i}", "subreddit": "advice", "title": _sentence(rng, 4), "post": _sentence(rng, 12),
             "query": f"SUBREDDIT: r/advice\n\nTITLE: {_sentence(rng, 4)}\n\nPOST: {_sentence(rng, 12)}\n\nTL;DR:",
             "reference_response": f" {_sentence(rng, 6)}<|endoftext|>"} for i in range(n)]


def hh_rows(n: int, seed: int, identical_every: int = 6) -> list[dict]:
    """Rows in the schema of Dahoas/full-hh-rlhf; every ``identical_every``-th pair has chosen == rejected."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = f"\n\nHuman: {_sentence(rng, rng.randint(4, 12))}?\n\nAssistant:"
        chosen = f" {_sentence(rng, rng.randint(3, 12))}."
        rejected = chosen if i % identical_every == 0 else f" {_sentence(rng, rng.randint(3, 12))}."
        rows.append({"prompt": prompt, "response": chosen, "chosen": chosen, "rejected": rejected})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_tokenizer(texts: list[str], out_dir: Path | None = None):
    """A byte-level BPE trained on ``texts``, wrapped as a fast tokenizer that adds BOS to prompts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    bos = tk.token_to_id("<bos>")
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    if out_dir is not None:
        tok.save_pretrained(out_dir)
    return tok


def build_tiny_llama(tokenizer, out_dir: Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_standins(root: Path, *, n_train: int = 48, n_eval: int = 16) -> dict[str, str]:
    """Data files (TL;DR preferences + SFT, HH) and the tiny model + tokenizer under ``root``."""
    root = Path(root)
    files = {
        "tldr_train": write_jsonl(root / "tldr" / "train.jsonl", tldr_rows(n_train, 1)),
        "tldr_validation": write_jsonl(root / "tldr" / "validation.jsonl", tldr_rows(n_eval, 2)),
        "tldr_sft": write_jsonl(root / "tldr_sft" / "train.jsonl", tldr_sft_rows(n_train, 3)),
        "hh_train": write_jsonl(root / "hh" / "train.jsonl", hh_rows(n_train, 4)),
        "hh_test": write_jsonl(root / "hh" / "test.jsonl", hh_rows(n_eval, 5)),
    }
    texts = []
    for f in files.values():
        for line in f.read_text().splitlines():
            texts.extend(v for v in json.loads(line).values() if isinstance(v, str))
    tok = build_tokenizer(texts)
    model = build_tiny_llama(tok, root / "model")
    return {**{k: str(v) for k, v in files.items()}, "model": str(model), "root": str(root)}


def _q(path: str) -> str:
    return "'" + str(path) + "'"


def text_overrides(paths: dict[str, str], task: str = "tldr", *, model: str = "tiny_llama_local",
                   model_dir: str | None = None, small: bool = True) -> list[str]:
    """Hydra overrides: task=<task> on the stand-in data files, ``model`` (from ``model_dir``, default the
    stand-in tiny Llama) as policy and golden-RM base, reduced sizes when ``small``."""
    p = paths
    model_dir = model_dir or p["model"]
    task_files = ({"train": p["tldr_train"], "validation": p["tldr_validation"]} if task == "tldr"
                  else {"train": p["hh_train"], "test": p["hh_test"]})
    ov = [
        f"task={task}", f"model={model}", f"model.pretrained={_q(model_dir)}",
        f"model@task.reward.model={model}", f"task.reward.model.pretrained={_q(model_dir)}",
        "task.data_files={" + ",".join(f"{k}:{_q(v)}" for k, v in task_files.items()) + "}",
        f"task.sft.sources.tldr_sft.data_files={_q(p['tldr_sft'])}",
        f"task.sft.sources.hh_chosen.data_files={_q(p['hh_train'])}",
        f"task.reward.sources.tldr.data_files={{train:{_q(p['tldr_train'])},validation:{_q(p['tldr_validation'])}}}",
        f"task.reward.sources.hh.data_files={{train:{_q(p['hh_train'])},test:{_q(p['hh_test'])}}}",
        "logger=none",
    ]
    if small:
        ov += [
            "task.max_length=96", "task.max_prompt_length=64", "hardware.per_device_batch_size=4",
            "task.sft.batch_size=8", "task.sft.warmup_steps=0", "task.sft.lr=1e-3",
            "task.reward.global_batch_size=8", "task.reward.warmup_steps=0", "task.reward.max_val_pairs=8",
            "task.reward.score_batch_size=16", "task.reward.score_dtype=float32", "task.reward.val_check_interval=1.0",
            "task.relabel.max_new_tokens=16", "task.relabel.batch_size=16",
            "task.train.global_batch_size=8", "task.train.max_steps=2", "task.train.warmup_steps=0",
            "task.train.lr=1e-3", "task.train.ref_logps_batch_size=16", "task.train.checkpoint_every_n_steps=0",
            "task.eval.every_n_steps=1", "task.eval.n_prompts=4", "task.eval.samples_per_prompt=2",
            "task.eval.max_new_tokens=8", "task.eval.batch_size=8", "task.eval.kl_exact_sampling=false",
        ]
    return ov


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "models/tiny_llama")
    paths = build_standins(out)
    print(json.dumps(paths, indent=2))
    print("overrides:\n  " + " \\\n  ".join(text_overrides(paths, small=True)))
