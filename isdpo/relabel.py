"""Relabelling (stage=relabel): the golden reward model scores the preference pairs and the higher-scoring response
becomes *chosen*, as every label is in the paper's setting (arXiv 2506.08681, section 5).

``relabel.source=dataset`` (:func:`relabel_pairs`) re-orders the data set's own pairs; their behaviour policy is
unknown, so IS uses mu = pi_ref. ``generate`` (:func:`generate_pairs`) samples ``k`` responses per prompt from the SFT
policy, pairs them ``best_worst`` or ``all`` (:func:`pair_up`) and keeps each response's log-probability under the
distribution it was sampled from, IS's mu. Pairs with equal scores are dropped. The files: :func:`write_rows`.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from isdpo.data.tokenization import encode_prompts, fit_lengths
from isdpo.logprobs import response_logps
from isdpo.sampling import sample_responses
from isdpo.schema import RELABEL_PAIRINGS



def write_rows(rows: list[dict], path: Path) -> None:
    """The relabelled pairs at ``path`` (``pairs.jsonl`` or ``pairs.parquet`` in ``task.relabel.path`` or
    ``<cache_dir>/relabel/<hash>``, beside ``meta.json`` with the counts): prompt, chosen, rejected, chosen_score,
    rejected_score, plus ``flipped`` (dataset source: the RM disagrees with the data set's label) or prompt_ids /
    chosen_ids / rejected_ids and ``chosen_behavior_logp`` / ``rejected_behavior_logp`` (generate source: the exact
    sampled tokens, never re-tokenized)."""
    if path.suffix == ".parquet":
        import pyarrow as pa  # optional: only for task.relabel.format=parquet
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
    raise ValueError(f"relabel.pairing={pairing!r} is not known; allowed: {', '.join(RELABEL_PAIRINGS)}")


def generate_pairs(policy, tokenizer, prompts: list[str], rm, rl: Mapping[str, Any], *, max_length: int,
                   max_prompt_length: int) -> tuple[list[dict], dict]:
    """k samples per prompt from ``policy``, scored by ``rm``, paired; with behaviour log-probs."""
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
        logps.append(response_logps(policy, ids, resp, pad_id=pad, temperature=float(rl["temperature"]),
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


