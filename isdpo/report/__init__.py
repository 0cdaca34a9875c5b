"""Report of a sweep: tables (Markdown, CSV), statistics with Student-t intervals, paired claims with Holm's
correction, figures (PNG and SVG) and a list of failed runs.

    python -m isdpo.report <sweep dir> [--out DIR] [--instance-key KEY] [--wandb-project ENTITY/PROJECT] [--seeds]
                           [--wandb [--wandb-group GROUP]]

A run is any folder under the sweep directory holding ``result.json``, ``metrics.jsonl`` or ``.hydra/config.yaml``
(or only ``.hydra/pending/config.yaml``: a job that stopped before its config checks passed, listed as failed).
Its config is what it recorded itself (``run_config.json``), completed by ``.hydra`` (``runs``); runs are told apart
by their whole config, the seeds of one configuration are averaged, and every setting that varies across the
sweep becomes a table column and a legend label. Only completed runs enter tables, statistics and figures; the
others are listed in report.md with the reason. A NaN value is left out of means and intervals.

Statistics (docs/method.md §7): per configuration and task instance (``--instance-key``, default
``task.chain_seed``), the mean and 95% t-interval over seeds of the final and (cross-fitted) peak win rate and
golden reward, the drop and the KL; pooled, the mean of the instance means with a t-interval across them
(instances a random sample). Claims: paired differences of each importance-sampled loss against its base and of
each online loss against its offline and importance-sampled counterparts, per instance and pooled, with p-values
and Holm's correction over all of them.

Writes into ``--out`` (default ``<sweep dir>/report``, each file atomically): ``report.md``, ``summary.csv``,
``runs.csv``, ``stats.csv``, ``claims.csv`` and per task the figures of ``plots.FIGURES`` (``<stem>_<task>.png``
and ``.svg``; with several instances also ``<stem>_<task>_per_instance`` for ``plots.PER_INSTANCE_FIGURES``).
With ``--wandb`` the report is also logged into the sweep's W&B group as a run of job_type ``report`` (the PNGs as
images, the CSV files as W&B Tables; offline under ``<out>/wandb`` without a key).

One module per concept: ``runs`` (discovery, reading a run folder, variants), ``quantities`` (what one run
contributes), ``stats`` (intervals, Holm, cross-fitting, claim sentences), ``tables`` (summary and statistics
tables, CSV), ``claims`` (what is compared, paired differences), ``plots`` (figures), ``files`` (atomic writes),
``wandb`` (the optional W&B section; the report as a W&B run), ``build`` (report.md and its files) and
``__main__`` (the command line).
"""
from isdpo.report.build import build_report
from isdpo.report.runs import load_sweep

__all__ = ["build_report", "load_sweep"]
