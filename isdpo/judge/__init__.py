"""LLM-judge evaluation: the win rate of policy responses against reference responses, as the paper judges its
dialogue task (arXiv 2506.08681, section 5 and Table 2; docs/method.md has the protocol).

A judge is any object with ``judge(prompts) -> list[str]`` (raw answers, parsed by ``parse_verdict``) and
optionally ``stats() -> dict`` (cumulative counters: tokens, cost). Read next: ``prompt`` (the Table 2 prompt,
parsing), ``win_rate`` (the evaluation loop), then a backend: ``client`` (OpenAI-compatible HTTP, with ``cache``
and ``errors``) or ``hf`` (a local model); ``records`` writes the per-item records.
"""
from isdpo.judge.client import OpenAIJudge
from isdpo.judge.errors import JudgeError, JudgeHTTPError, JudgeResponseError, JudgeRetryError
from isdpo.judge.hf import HFJudge
from isdpo.judge.prompt import JUDGE_PROMPT, format_judge_prompt, parse_verdict
from isdpo.judge.records import save_records_jsonl
from isdpo.judge.win_rate import judge_win_rate

__all__ = [
    "JUDGE_PROMPT",
    "format_judge_prompt",
    "parse_verdict",
    "JudgeError",
    "JudgeHTTPError",
    "JudgeRetryError",
    "JudgeResponseError",
    "OpenAIJudge",
    "HFJudge",
    "judge_win_rate",
    "save_records_jsonl",
]
