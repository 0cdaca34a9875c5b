"""The ``relabel`` stage: the golden reward model labels the preference set.

In the paper's setting every preference label comes from the golden RM (PAPER.md section 5):
response pairs are scored and the higher-scoring response becomes *chosen*. Two sources:

- ``relabel.source=dataset``: the data set's own pairs (train split), re-ordered by golden score.
  Their behaviour policy is unknown (human-written / other models), so no behaviour log-probs are
  written and IS uses mu = pi_ref.
- ``relabel.source=generate``: ``k`` responses per prompt sampled from the SFT policy (temperature
  / top-p of the block; the released code uses up to 4), all scored, paired ``best_worst`` (one
  pair per prompt: highest vs lowest score) or ``all`` (every pair with different scores). The
  log-probability of each response under the distribution it was SAMPLED from (the SFT policy
  after the temperature and top-p warpers) is kept as ``chosen_behavior_logp`` /
  ``rejected_behavior_logp``, so IS-DAA can use mu != pi_ref. With temperature 1 and top-p 1
  it equals log pi_ref.

Pairs whose two scores are equal carry no label and are dropped (counted).

Output (``task.relabel.path`` or ``<cache_dir>/relabel/<hash>``): ``pairs.jsonl`` (or
``pairs.parquet``) with columns prompt, chosen, rejected, chosen_score, rejected_score, plus
``flipped`` (dataset source: the RM disagrees with the data set's label) or prompt_ids /
chosen_ids / rejected_ids and the behaviour log-probs (generate source: the exact sampled
tokens, never re-tokenized); ``meta.json`` with the counts.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from isdpo.cache import config_hash, data_key
from isdpo.data.collate import pad_sequences
from isdpo.data.text import (as_plain, encode_prompts, fit_lengths, get_tokenizer, load_pairs, subsample,
                             tokenizer_source)
from isdpo.logprobs import position_ids_from_mask
from isdpo.reward import GoldenRM, check_complete, publish, reward_dir

SOURCES = ("dataset", "generate")
PAIRINGS = ("best_worst", "all")
FORMATS = ("jsonl", "parquet")


# --------------------------------------------------------------------------------------------
# Behaviour log-probs
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def behavior_logps(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *, pad_id: int,
                   temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 32) -> torch.Tensor:
    """log mu(y|x) [N] where mu is ``model`` sampled with ``temperature`` and ``top_p`` (HF's warpers).

    The same processing as ``generate(do_sample=True, temperature=..., top_p=..., top_k=0)``:
    logits / temperature, then the nucleus filter, then a softmax; summed over response tokens.
    """
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    warpers = []
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        b = {k: v.to(device) for k, v in pad_sequences(prompts[i : i + batch_size], responses[i : i + batch_size],
                                                        pad_id).items()}
        hidden = model.base_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                  position_ids=position_ids_from_mask(b["attention_mask"]),
                                  use_cache=False).last_hidden_state[:, :-1]
        mask = b["loss_mask"][:, 1:].bool()
        rows = mask.nonzero(as_tuple=True)[0]
        logits = model.get_output_embeddings()(hidden[mask]).float()  # [M, V], response positions only
        for w in warpers:
            logits = w(None, logits)
        tok_lp = torch.log_softmax(logits, -1).gather(-1, b["input_ids"][:, 1:][mask].unsqueeze(-1)).squeeze(-1)
        sums = torch.zeros(b["input_ids"].shape[0], device=device).index_add(0, rows, tok_lp)
        out.append(sums.cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


# --------------------------------------------------------------------------------------------
# Where the relabelled set lives
# --------------------------------------------------------------------------------------------


def data_spec(task_cfg: Mapping[str, Any]) -> dict:
    """The task's own preference data as a load_pairs spec."""
    return {k: as_plain(task_cfg[k]) for k in ("dataset", "data_files", "columns", "strip_suffix", "drop_identical")}


def relabel_key(task_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any], rm_meta: Mapping[str, Any],
                reference_dir: Path | None) -> dict:
    rl = as_plain(task_cfg["relabel"])
    split = task_cfg["splits"]["train"]
    key = {"data": data_spec(task_cfg), "split": split, "rm": rm_meta.get("build_id"),
           "content": data_key(task_cfg, [split]),  # the bytes of a local file, not only its path
           "relabel": {k: v for k, v in rl.items() if k not in ("path", "batch_size", "format")},
           "lengths": [task_cfg["max_length"], task_cfg["max_prompt_length"], task_cfg["truncate_responses"]]}
    if rl["source"] == "generate":
        key["policy"] = {"reference": str(reference_dir), "tokenizer": tokenizer_source(model_cfg)}
    return key


def relabel_dir(task_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any], cache_dir: str | Path,
                reference_dir: Path | None) -> Path:
    """``task.relabel.path`` or ``<cache_dir>/relabel/<hash>`` (depends on the golden RM's build id)."""
    explicit = task_cfg["relabel"].get("path")
    if explicit:
        return Path(explicit).expanduser()
    rm_meta = check_complete(reward_dir(task_cfg, cache_dir), "golden reward model", "stage=reward")
    return Path(cache_dir) / "relabel" / config_hash(relabel_key(task_cfg, model_cfg, rm_meta, reference_dir))


def pairs_file(directory: Path) -> Path:
    for fmt in FORMATS:
        f = Path(directory) / f"pairs.{fmt}"
        if f.exists():
            return f
    raise FileNotFoundError(f"no pairs.jsonl / pairs.parquet in {directory}")


def write_rows(rows: list[dict], path: Path) -> None:
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with path.open("w") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")


# --------------------------------------------------------------------------------------------
# Relabelling
# --------------------------------------------------------------------------------------------


def relabel_pairs(pairs: list[dict], rm) -> tuple[list[dict], dict]:
    """Order each text pair by ``rm`` scores (chosen = higher); ties dropped."""
    s_c = rm([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    s_r = rm([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    rows, ties, flipped = [], 0, 0
    for p, a, b in zip(pairs, s_c.tolist(), s_r.tolist()):
        if a == b:
            ties += 1
            continue
        flip = b > a
        flipped += flip
        c, r = (p["rejected"], p["chosen"]) if flip else (p["chosen"], p["rejected"])
        rows.append({"prompt": p["prompt"], "chosen": c, "rejected": r, "chosen_score": max(a, b),
                     "rejected_score": min(a, b), "flipped": bool(flip)})
    return rows, {"pairs_in": len(pairs), "dropped_ties": ties, "flipped": flipped,
                  "agreement_with_dataset": 1 - flipped / max(1, len(rows)), "pairs_out": len(rows)}


def pair_up(scores: Sequence[float], pairing: str) -> list[tuple[int, int]]:
    """(chosen index, rejected index) pairs among k scored responses; equal scores never pair."""
    k = len(scores)
    if pairing == "best_worst":
        hi = max(range(k), key=lambda i: scores[i])
        lo = min(range(k), key=lambda i: scores[i])
        return [(hi, lo)] if scores[hi] != scores[lo] else []
    if pairing == "all":
        return [(i, j) if scores[i] > scores[j] else (j, i)
                for i, j in itertools.combinations(range(k), 2) if scores[i] != scores[j]]
    raise ValueError(f"relabel.pairing={pairing!r} is not known; allowed: {', '.join(PAIRINGS)}")


def generate_pairs(policy, tokenizer, prompts: list[str], rm, rl: Mapping[str, Any], *, max_length: int,
                   max_prompt_length: int) -> tuple[list[dict], dict]:
    """k samples per prompt from ``policy``, scored by ``rm``, paired; with behaviour log-probs."""
    from isdpo.sampling import sample_responses

    room = max_length - max_prompt_length
    if rl["max_new_tokens"] > room:
        raise ValueError(f"task.relabel.max_new_tokens={rl['max_new_tokens']} exceeds max_length - max_prompt_length "
                         f"= {room}: generated pairs would be truncated and their behaviour log-probs would not match")
    ids = [fit_lengths(p or [tokenizer.eos_token_id], [[0]], max_length=max_length,
                       max_prompt_length=max_prompt_length, bos_id=tokenizer.bos_token_id)[0]
           for p in encode_prompts(tokenizer, prompts)]
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    samples, logps, scores = [], [], []
    for j in range(int(rl["k"])):
        resp = sample_responses(policy, ids, max_new_tokens=int(rl["max_new_tokens"]), pad_id=pad, eos_id=eos,
                                temperature=float(rl["temperature"]), top_p=float(rl["top_p"]),
                                seed=int(rl["seed"]) * 1000 + j, batch_size=int(rl["batch_size"]))
        resp = [r if r else [eos] for r in resp]
        samples.append(resp)
        logps.append(behavior_logps(policy, ids, resp, pad_id=pad, temperature=float(rl["temperature"]),
                                    top_p=float(rl["top_p"]), batch_size=int(rl["batch_size"])).tolist())
        texts = tokenizer.batch_decode(resp, skip_special_tokens=True)
        scores.append(rm(prompts, texts).tolist())
    rows, ties = [], 0
    for i, prompt in enumerate(prompts):
        s = [scores[j][i] for j in range(len(samples))]
        pairs = pair_up(s, rl["pairing"])
        ties += not pairs
        for a, b in pairs:
            ca, cb = samples[a][i], samples[b][i]
            rows.append({
                "prompt": prompt, "chosen": tokenizer.decode(ca, skip_special_tokens=True),
                "rejected": tokenizer.decode(cb, skip_special_tokens=True),
                "prompt_ids": ids[i], "chosen_ids": ca, "rejected_ids": cb,
                "chosen_score": s[a], "rejected_score": s[b],
                "chosen_behavior_logp": logps[a][i], "rejected_behavior_logp": logps[b][i],
            })
    return rows, {"prompts": len(prompts), "k": int(rl["k"]), "prompts_without_pair": ties, "pairs_out": len(rows)}


def run_relabel_stage(cfg, fast_dev_run: bool = False) -> Path:
    """Write the golden-RM-labelled preference set; returns its directory."""
    from isdpo.models import freeze, load_causal_lm
    from isdpo.stages import run_sft

    task = cfg.task
    rl = as_plain(task.relabel)
    if rl["source"] not in SOURCES:
        raise ValueError(f"task.relabel.source={rl['source']!r} is not known; allowed: {', '.join(SOURCES)}")
    if rl["format"] not in FORMATS:
        raise ValueError(f"task.relabel.format={rl['format']!r} is not known; allowed: {', '.join(FORMATS)}")
    if rl["pairing"] not in PAIRINGS:
        raise ValueError(f"task.relabel.pairing={rl['pairing']!r} is not known; allowed: {', '.join(PAIRINGS)}")
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
