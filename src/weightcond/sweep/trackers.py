"""``--log mlflow|tensorboard``: each trial's recipe and measurements, recorded there too.

The study's records (and ``results.json``) stay the source of truth; a tracker is a view for
the tools people already use. MLflow writes to ``MLFLOW_TRACKING_URI`` if set, else to
``sqlite:///<output>/mlflow.db``, in the experiment named like the study, one run per trial
(``<variant> seed <s>``). TensorBoard writes ``<output>/tensorboard/<variant>/seed-<s>``:
the loss per step, the measurements and the recipe as hyperparameters.
"""

from __future__ import annotations

import importlib.util
import os
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Protocol

from ..errors import OptionError


class Sweep(Protocol):
    """What a tracker reads of a :class:`weightcond.sweep.Sweep` (a protocol, so that this
    module does not import the engine, which imports it)."""

    output: Path
    study: str
    log: str | None

__all__ = ["TRACKERS", "Tracker", "open_tracker"]

#: ``--log`` name → the package it needs.
TRACKERS = {"mlflow": "mlflow", "tensorboard": "tensorboard"}


def check_tracker(name: str | None) -> None:
    """Raise :class:`~weightcond.data.MissingPackageError` if ``name``'s package is not
    installed (nothing is imported)."""
    if name is None:
        return
    if name not in TRACKERS:
        raise OptionError(f"sweep: argument 'log' expected one of "
                          f"{', '.join(map(repr, TRACKERS))}, got {name!r}")
    if importlib.util.find_spec(TRACKERS[name]) is None:
        from ..data import MissingPackageError

        raise MissingPackageError(f"sweep: argument 'log' is {name!r}, which needs the "
                                  f"{TRACKERS[name]} package: pip install {TRACKERS[name]}")


def flatten(recipe: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A recipe as flat ``{"options.map": "cayley", "conditioners.1.transform": ...}``."""
    out: dict[str, Any] = {}
    for key, value in recipe.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list):
            for i, item in enumerate(value, 1):
                out.update(flatten(item, f"{name}.{i}.") if isinstance(item, dict)
                           else {f"{name}.{i}": item})
        else:
            out[name] = value
    return out


def _metrics(record: dict[str, Any]) -> dict[str, float]:
    metrics = {"accuracy": record["accuracy"], "step_time_s": record["step_time_s"],
               "peak_mib": record["peak_bytes"] / 2**20, "trainable": record["trainable"],
               "wall_s": record["wall_s"]}
    if record.get("entropy") is not None:
        metrics["entropy"] = record["entropy"]
    return {k: float(v) for k, v in metrics.items() if v is not None}


class Tracker(ABC):
    """Where trial records are also written."""

    @abstractmethod
    def log(self, record: dict[str, Any]) -> None:
        """Record one trial (a record of :func:`weightcond.sweep.collect`)."""

    @abstractmethod
    def close(self) -> None:
        """Flush and close."""


class _MLflow(Tracker):
    def __init__(self, sweep: Sweep) -> None:
        import mlflow

        self._mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            folder = Path(sweep.output).resolve()
            folder.mkdir(parents=True, exist_ok=True)
            mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
        mlflow.set_experiment(sweep.study)
        self._study = sweep.study

    def log(self, record: dict[str, Any]) -> None:
        mlflow = self._mlflow
        with mlflow.start_run(run_name=f"{record['variant']} seed {record['seed']}"):
            mlflow.set_tags({"weightcond.variant": record["variant"],
                             "weightcond.study": self._study,
                             "weightcond.trial": str(record["trial"])})
            params = {k: "none" if v is None else v for k, v in
                      flatten(record["recipe"]).items()}
            mlflow.log_params({**params, "seed": record["seed"]})
            mlflow.log_metrics(_metrics(record))
            for step, loss in enumerate(record["losses"]):
                mlflow.log_metric("loss", loss, step=step)

    def close(self) -> None:
        pass


class _TensorBoard(Tracker):
    def __init__(self, sweep: Sweep) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter
        self._folder = Path(sweep.output) / "tensorboard"

    def log(self, record: dict[str, Any]) -> None:
        name = re.sub(r"[^A-Za-z0-9_.=+-]+", "_", record["variant"])
        writer = self._writer(log_dir=str(self._folder / name / f"seed-{record['seed']}"))
        try:
            for step, loss in enumerate(record["losses"]):
                writer.add_scalar("loss", loss, step)
            params = {k: "none" if v is None else v for k, v in
                      flatten(record["recipe"]).items()}
            params["seed"] = record["seed"]
            writer.add_hparams(params, {f"sweep/{k}": v for k, v in _metrics(record).items()},
                               run_name=".")
        finally:
            writer.close()

    def close(self) -> None:
        pass


def open_tracker(sweep: Sweep) -> Tracker | None:
    """The tracker ``sweep.log`` names, or ``None``."""
    check_tracker(sweep.log)
    if sweep.log is None:
        return None
    return _MLflow(sweep) if sweep.log == "mlflow" else _TensorBoard(sweep)
