"""``weightcond sweep``: rank any set of design-space cells on a real task, with intervals.

A sweep trains every variant of a space (:mod:`weightcond.sweep.space`) once per seed on the
task of ``weightcond compare`` (MiniLM on Rotten Tomatoes, through the same
:func:`weightcond.compare.train_run`), as Optuna trials in a study that several processes or
machines can share (:mod:`weightcond.sweep.engine`), and reports each variant's mean accuracy
with its confidence interval over seeds, paired comparisons with a baseline, and a ranking
that says which differences are resolved (:mod:`weightcond.sweep.report`,
:mod:`weightcond.sweep.stats`). Optuna is imported only when a sweep runs
(``pip install "weightcond[sweep]"``).
"""

from .engine import (
    DATABASE,
    DEFAULT_STUDY,
    QUICK_SCHEDULE,
    Progress,
    Sweep,
    collect,
    describe,
    load,
    open_storage,
    prepare,
    progress,
    run,
    work,
)
from .report import format_report, results, summarize, write_report
from .space import (
    SCHEDULE_FIELDS,
    SPACES,
    Space,
    Variant,
    load_space,
    parse_space,
    resolved_options,
)
from .stats import Interval, Paired, holm, mean_interval, paired_test, t_cdf, t_quantile

__all__ = [
    "DATABASE",
    "DEFAULT_STUDY",
    "QUICK_SCHEDULE",
    "SCHEDULE_FIELDS",
    "SPACES",
    "Interval",
    "Paired",
    "Progress",
    "Space",
    "Sweep",
    "Variant",
    "collect",
    "describe",
    "format_report",
    "holm",
    "load",
    "load_space",
    "mean_interval",
    "open_storage",
    "paired_test",
    "parse_space",
    "prepare",
    "progress",
    "resolved_options",
    "results",
    "run",
    "summarize",
    "t_cdf",
    "t_quantile",
    "work",
    "write_report",
]
