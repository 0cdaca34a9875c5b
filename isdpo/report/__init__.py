"""Report of a sweep: tables (Markdown, CSV), statistics with bootstrap intervals, paired claims, figures (PNG
and SVG) and a list of failed runs.

    python -m isdpo.report <sweep dir> [--out DIR] [--instance-key KEY] [--wandb-project ENTITY/PROJECT] [--seeds]

A run is any folder under the sweep directory holding ``result.json``,
``metrics.jsonl`` or ``.hydra/config.yaml`` (what ``isdpo.stages`` and Hydra
write). Its loss, beta, seed and task come from ``result.json`` or else from
``.hydra/config.yaml`` (then ``.hydra/overrides.yaml``).

Runs are told apart by their whole config (``.hydra/config.yaml``), not only by
task/loss/beta/seed: the seeds of one configuration are averaged, and every
setting that varies across the sweep (bookkeeping such as ``paths.*`` aside)
becomes a table column and a legend label, e.g. ``loss.importance_sampling.log_clip``.
A run without a readable config is identified by ``result.json`` alone (said in
``report.md``). Of two completed runs with the same config and seed, the newer
counts and the older is listed as a duplicate.

Statistics (``isdpo.report.stats`` has the formulas): per configuration and task instance (``--instance-key``,
default ``task.chain_seed``) the mean and 95% bootstrap interval over seeds of the final and peak win rate, their
difference, the final KL and the largest KL of the curve; pooled over instances, the mean of the instance means
with a stratified interval. Claims: paired differences (instance, seed, beta and the other settings) of each
importance-sampled loss against its base loss and of each online loss against its offline and importance-sampled
counterparts, per instance and pooled, each with a sentence saying whether its interval excludes zero.

Only completed runs (``result.json`` with status "completed" and a non-empty
``metrics.jsonl``) enter tables, statistics and figures (a figure only for the runs that have its metric: a task
without a golden reward, such as task=preference, has held-out pair metrics and no win rate); every other run is
listed in ``report.md`` with the reason (no result.json, status != completed, empty
metrics, unreadable files, duplicate of another run). A NaN value is left out of means and intervals.

Writes into ``--out`` (default ``<sweep dir>/report``): ``report.md``,
``summary.csv`` (one row per configuration: task x loss x beta x any other
swept setting), ``runs.csv`` (one row per run, failed ones included), ``stats.csv``, ``claims.csv`` and per task
the figures of ``plots.FIGURES`` (``<stem>_<task>.png`` and ``.svg``; with several task instances also
``<stem>_<task>_per_instance`` for ``plots.PER_INSTANCE_FIGURES``), every file listed in report.md.

One module per concept: ``runs`` (discovery, reading a run folder, variants), ``tables`` (per-run quantities,
summary and statistics tables, CSV), ``stats`` (intervals, pairing, claim sentences), ``claims`` (what is compared,
paired differences), ``plots`` (figures), ``wandb`` (the optional W&B section), ``build`` (report.md and its
files) and ``__main__`` (the command line).
"""
from isdpo.report.build import build_report
from isdpo.report.runs import load_sweep

__all__ = ["build_report", "load_sweep"]
