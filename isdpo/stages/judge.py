"""stage=judge: LLM-judge win rate of a run's final completions against the reference completions.

Reads ``<output_dir>/completions/`` (written by the text tasks' evaluator: ``prompts.jsonl`` and one
``eval_NNNN.jsonl`` per evaluation; the newest is the final policy's), judges the first sample of
the first ``judge.n_prompts`` prompts with isdpo.judge (paper: 256 prompts, 1 completion each, A/B
swapped at random), writes ``judge.jsonl`` (one record per item) and ``judge.json`` (the summary),
and adds ``judge`` to ``result.json`` so the sweep report shows it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from isdpo.artifacts import COMPLETIONS, RESULT, read_json, read_jsonl, write_json
from isdpo.judge import HFJudge, OpenAIJudge, judge_win_rate, save_records_jsonl
from isdpo.models import load_causal_lm, load_tokenizer

def build_judge(judge_cfg):
    backend = judge_cfg.backend
    if backend == "openai":
        Path(judge_cfg.cache_path).parent.mkdir(parents=True, exist_ok=True)
        return OpenAIJudge(
            judge_cfg.base_url, judge_cfg.model, api_key_env=judge_cfg.api_key_env,
            max_concurrency=judge_cfg.max_concurrency, max_retries=judge_cfg.max_retries,
            timeout_s=judge_cfg.timeout_s, cache_path=judge_cfg.cache_path,
            price_per_1k_input=judge_cfg.price_per_1k_input, price_per_1k_output=judge_cfg.price_per_1k_output,
        )
    if backend == "hf":
        return HFJudge(load_causal_lm(judge_cfg.model), load_tokenizer(judge_cfg.model),
                       batch_size=judge_cfg.batch_size)
    raise ValueError(f"judge.backend={backend!r} cannot judge; allowed: openai, hf (none = no judge)")


def final_completions(out: Path, n_prompts: int) -> tuple[list[str], list[str], list[str]]:
    """(prompts, policy completions, references) of the newest evaluation, first sample per prompt."""
    comp = out / COMPLETIONS
    evals = sorted(comp.glob("eval_*.jsonl"))
    if not (comp / "prompts.jsonl").exists() or not evals:
        raise FileNotFoundError(
            f"stage=judge needs the completions of a text task's evaluation in {comp} "
            "(run stage=evaluate with task=tldr|hh and task.eval.save_completions=true first)"
        )
    prompts = {r["prompt_index"]: r for r in read_jsonl(comp / "prompts.jsonl")}
    rows = [r for r in read_jsonl(evals[-1]) if r["sample"] == 0][:n_prompts]
    return ([prompts[r["prompt_index"]]["prompt"] for r in rows], [r["completion"] for r in rows],
            [prompts[r["prompt_index"]]["reference"] for r in rows])


def run_judge(cfg, judge=None, add_to_result: bool = True) -> dict[str, Any]:
    """Judge the run's final completions; writes judge.jsonl and judge.json and, with ``add_to_result`` (stage=judge
    on a finished run; stage=pipeline adds it to the result it writes), the summary into result.json."""
    out = Path(cfg.paths.output_dir)
    prompts, policy, reference = final_completions(out, cfg.judge.n_prompts)
    judge = judge or build_judge(cfg.judge)
    res = judge_win_rate(judge, prompts, policy, reference, seed=cfg.judge.seed)
    save_records_jsonl(res, out / "judge.jsonl")
    summary = {k: v for k, v in res.items() if k != "records"}
    summary["backend"] = cfg.judge.backend
    summary["model"] = cfg.judge.model if cfg.judge.backend == "openai" else cfg.judge.model.name
    write_json(out / "judge.json", summary)
    result_path = out / RESULT
    if add_to_result and result_path.exists():
        result = read_json(result_path, "rerun the run's stage=align or stage=pipeline to write it again")
        result["judge"] = summary
        write_json(result_path, result)
    print(f"[isdpo] judge win rate {summary['win_rate']:.3f} over {summary['n']} prompts "
          f"({summary['n_unparseable']} unparseable): {out / 'judge.json'}")
    return summary
