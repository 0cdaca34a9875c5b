"""stage=relabel: the golden RM labels the preference set (isdpo.relabel), published at
``task.relabel.path`` or its cache entry."""
from __future__ import annotations

from pathlib import Path

import torch

from isdpo.artifacts import publish, relabel_dir, reward_dir
from isdpo.data.records import data_spec, load_pairs
from isdpo.data.rows import as_plain, subsample
from isdpo.data.tokenization import get_tokenizer
from isdpo.golden_rm import GoldenRM
from isdpo.models import freeze, load_causal_lm
from isdpo.relabel import generate_pairs, relabel_pairs, write_rows
from isdpo.stages.sft import run_sft

def run_relabel(cfg, fast_dev_run: bool = False) -> Path:
    """Write the golden-RM-labelled preference set; returns its directory."""
    task = cfg.task
    rl = as_plain(task.relabel)
    rm_path = reward_dir(task, cfg.paths.cache_dir)
    ref_dir = run_sft(cfg, fast_dev_run=fast_dev_run) if rl["source"] == "generate" else None
    out = relabel_dir(task, cfg.model, cfg.paths.cache_dir, ref_dir)

    def build(tmp: Path) -> dict:
        rm = GoldenRM(rm_path, batch_size=int(task.reward.score_batch_size), max_length=int(task.max_length),
                      max_prompt_length=int(task.max_prompt_length), dtype=task.reward.get("score_dtype"))
        pairs, counts = load_pairs(data_spec(task), task.splits.train)
        limit = rl["max_prompts"]
        if rl["source"] == "dataset":
            pairs = subsample(pairs, limit, int(rl["seed"]))
            if fast_dev_run:
                pairs = pairs[: int(rl["batch_size"])]
            rows, stats = relabel_pairs(pairs, rm)
        else:
            prompts = list(dict.fromkeys(p["prompt"] for p in pairs))  # distinct, in order
            prompts = subsample(prompts, limit, int(rl["seed"]))
            if fast_dev_run:
                prompts = prompts[: int(rl["batch_size"])]
            tok = get_tokenizer(cfg.model)
            policy = freeze(load_causal_lm(cfg.model, path=str(ref_dir / "model")))
            if torch.cuda.is_available():
                policy.cuda()
            rows, stats = generate_pairs(policy, tok, prompts, rm, rl, max_length=int(task.max_length),
                                         max_prompt_length=int(task.max_prompt_length))
        if not rows:
            raise RuntimeError("the relabelled set is empty (every pair was a tie?)")
        write_rows(rows, tmp / f"pairs.{rl['format']}")
        stats.update({"source": rl["source"], "dataset_counts": counts, "reward_model": str(rm_path),
                      "reward_model_build": rm.meta.get("build_id")})
        print(f"[isdpo] relabel ({rl['source']}): " + ", ".join(f"{k}={v}" for k, v in stats.items()
                                                              if isinstance(v, (int, float))))
        return stats

    path, reused = publish(out, build, fast_dev_run=fast_dev_run, what="relabelled preferences", collective=False)
    print(f"[isdpo] relabelled preferences {'reused' if reused else 'written'}: {path}")
    return path
