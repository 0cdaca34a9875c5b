"""The win rate of a policy's responses against the reference's by a judge: seeded position swapping, undoing
the swap, the rate over parsed answers and the conservative rate, per-item records."""
from __future__ import annotations

import math
import random
from typing import Any, Sequence

from isdpo.judge.errors import JudgeError
from isdpo.judge.prompt import format_judge_prompt, parse_verdict


def _positions(n: int, seed: int, balanced: bool) -> list[str]:
    """Seeded position of the policy response ("A" or "B") for each of n items."""
    rng = random.Random(seed)
    if not balanced:
        return [rng.choice("AB") for _ in range(n)]
    # Exactly half the items at each position (the odd one by a coin), in a random
    # order: still a random swap per item, but the judge's position bias cancels
    # exactly instead of only in expectation.
    positions = ["A"] * (n // 2) + ["B"] * (n // 2)
    if n % 2:
        positions.append(rng.choice("AB"))
    rng.shuffle(positions)
    return positions


def judge_win_rate(
    judge,
    prompts: Sequence[str],
    policy_responses: Sequence[str],
    reference_responses: Sequence[str],
    seed: int = 0,
    balanced: bool = True,
) -> dict[str, Any]:
    """Win rate of the policy's responses against the reference's, by an LLM judge.

    Paper protocol (section 5, dialogue task): one policy completion per prompt
    against the reference completion, the positions randomly swapped. Here a seeded
    random position is drawn per item (``balanced=True``: a random arrangement with
    exactly half the items at each position; ``balanced=False``: independent fair
    coins, the paper's wording), the judge answers, and the swap is undone.

    Returns a dict with:
        win_rate: n_wins / (n_wins + n_losses), over parsed answers (the paper's
            rate); nan if nothing parsed.
        win_rate_conservative: n_wins / n (unparseable answers count as losses).
        win_rate_se: binomial standard error of win_rate.
        n, n_wins, n_losses, n_unparseable, n_policy_at_a, swap_fraction (fraction
            of items with the policy at position B), verdict_a_fraction (parsed
            verdicts naming A: the judge's position bias).
        records: per item {index, prompt, policy, reference, policy_position, raw,
            verdict, policy_won} (policy_won None when unparseable), for JSONL.
        the judge's counters for this call (``stats()`` difference), e.g.
            prompt_tokens, completion_tokens, cost_usd, n_requests, n_cached.
    """
    n = len(prompts)
    if not (len(policy_responses) == n and len(reference_responses) == n):
        raise ValueError(
            f"prompts ({n}), policy_responses ({len(policy_responses)}) and "
            f"reference_responses ({len(reference_responses)}) must have the same length"
        )
    if n == 0:
        raise ValueError("nothing to judge: no prompts")
    positions = _positions(n, seed, balanced)
    judge_prompts = [
        format_judge_prompt(x, y, r) if pos == "A" else format_judge_prompt(x, r, y)
        for x, y, r, pos in zip(prompts, policy_responses, reference_responses, positions)
    ]
    before = judge.stats() if hasattr(judge, "stats") else {}
    raw_answers = judge.judge(judge_prompts)
    after = judge.stats() if hasattr(judge, "stats") else {}
    if len(raw_answers) != n:
        raise JudgeError(f"judge returned {len(raw_answers)} answers for {n} prompts")

    records = []
    n_wins = n_losses = n_a = 0
    for i, (x, y, r, pos, raw) in enumerate(zip(prompts, policy_responses, reference_responses, positions, raw_answers)):
        verdict = parse_verdict(raw)
        won = None if verdict is None else verdict == pos
        n_wins += won is True
        n_losses += won is False
        n_a += verdict == "A"
        records.append(
            dict(index=i, prompt=x, policy=y, reference=r, policy_position=pos, raw=raw, verdict=verdict, policy_won=won)
        )
    parsed = n_wins + n_losses
    win_rate = n_wins / parsed if parsed else float("nan")
    result: dict[str, Any] = dict(
        win_rate=win_rate,
        win_rate_conservative=n_wins / n,
        win_rate_se=math.sqrt(win_rate * (1 - win_rate) / parsed) if parsed else float("nan"),
        n=n,
        n_wins=n_wins,
        n_losses=n_losses,
        n_unparseable=n - parsed,
        n_policy_at_a=positions.count("A"),
        swap_fraction=positions.count("B") / n,
        verdict_a_fraction=n_a / parsed if parsed else float("nan"),
        seed=seed,
        balanced=balanced,
    )
    for k, v in after.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            result[k] = v - before.get(k, 0)
    result["records"] = records
    return result
