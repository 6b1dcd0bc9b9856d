"""The run's Lightning loggers: the ``logger`` config group, built into the run directory.

- **Where.** A logger whose ``save_dir`` is ``null`` (``conf/logger/*``) writes into the run
  directory, and so does a run resumed with ``resume=RUN_DIR``: its ``metrics.csv`` keeps the
  interrupted run's rows (Lightning's CSV writer would delete them) and, with W&B, it goes on
  in the same W&B run (the id kept in ``RUN_DIR/wandb_run_id``, ``resume="allow"``).
- **The config.** The composed Hydra config, resolved, is logged once to every logger
  (:func:`log_run_config`: ``hparams.yaml`` of the CSV logger, the W&B run's config). The
  phases' Trainers do not log their modules' arguments (``enable_autolog_hparams=False``):
  three modules with an ``lr`` each would overwrite each other.
- **W&B.** ``trainer/global_step``, the run-wide ``step`` of
  :class:`~zopro_lightning.callbacks.run_progress.RunProgress`, is the step metric of every
  other metric; a multirun job is grouped by its sweep directory and named by its overrides
  (``hydra.job.override_dirname``); the summary's figures go into the run's summary
  (:func:`log_summary`).

The ``logger`` group is one logger (a node with ``_target_``) or several, one named entry a
logger (lightning-hydra-template style; an entry set to null is switched off).
"""

from __future__ import annotations

import csv
import uuid
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

WANDB_ID_FILE = "wandb_run_id"
#: the key ``WandbLogger`` logs a row's step under (the run-wide step in a pipeline run)
STEP_METRIC = "trainer/global_step"


def logger_nodes(cfg: DictConfig | None) -> list[DictConfig]:
    """The logger configs of the ``logger`` group: the node itself when it has a
    ``_target_``, otherwise its entries that are not null."""
    if not cfg:
        return []
    if "_target_" in cfg:
        return [cfg]
    nodes = [node for node in cfg.values() if node is not None]
    for name, node in cfg.items():
        if node is not None and (not isinstance(node, Mapping) or "_target_" not in node):
            raise ValueError(
                f"logger.{name} has no _target_: the logger group is one logger (a _target_ "
                "and its arguments) or named entries that are each one (or null, to switch it off)"
            )
    return nodes


def is_wandb(node: DictConfig) -> bool:
    return issubclass(get_class(node._target_), WandbLogger)


def instantiate_loggers(cfg: DictConfig | None, run_dir: Path, write: bool = True) -> list[Logger]:
    """The loggers of ``cfg`` (the ``logger`` group), writing into ``run_dir`` unless they set
    a ``save_dir`` of their own. ``write``: whether this process may write the run directory
    (rank 0), where a new W&B run keeps its id."""
    loggers: list[Logger] = []
    for node in logger_nodes(cfg):
        options: dict[str, Any] = {}
        if node.get("save_dir") is None:
            options["save_dir"] = str(run_dir)
        if is_wandb(node):
            options |= wandb_options(node, run_dir, write)
        loggers.append(instantiate(node, **options))
    return loggers


def wandb_options(node: DictConfig, run_dir: Path, write: bool) -> dict[str, Any]:
    """``id`` (the run directory's W&B run: a resume goes on in it) and, for a multirun job,
    ``group`` (the sweep directory) and ``name`` (the job's overrides); what the config sets
    itself is kept."""
    options: dict[str, Any] = {}
    if not (node.get("id") or node.get("version")):
        options["id"] = wandb_run_id(run_dir, write)
    job = multirun_job()
    if job is not None:
        group, name = job
        if node.get("group") is None:
            options["group"] = group
        if node.get("name") is None:
            options["name"] = name
    return options


def wandb_run_id(run_dir: Path, write: bool = True) -> str:
    """The W&B run id of ``run_dir``: the one in ``RUN_DIR/wandb_run_id``, or a new one
    written there."""
    path = Path(run_dir) / WANDB_ID_FILE
    if path.exists():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    return run_id


def multirun_job() -> tuple[str, str] | None:
    """``(sweep directory, overrides)`` of a Hydra multirun job; ``None`` outside one."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        return None
    return str(hydra.sweep.dir), hydra.job.override_dirname or f"job_{hydra.job.num}"


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The composed config as plain, resolved data (without Hydra's own node)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("hydra", None)
    return data


@rank_zero_only
def start_loggers(loggers: Sequence[Logger], cfg: DictConfig, resuming: bool) -> None:
    """Open every logger: the CSV writers (keeping a resumed run's rows), the W&B run (its
    step metric), and the composed config logged to each, once."""
    for logger in loggers:
        if isinstance(logger, CSVLogger):
            open_csv(logger, keep_rows=resuming)
        if isinstance(logger, WandbLogger):
            logger.experiment.define_metric(STEP_METRIC)
            logger.experiment.define_metric("*", step_metric=STEP_METRIC, step_sync=True)
    params = run_config(cfg)
    for logger in loggers:
        logger.log_hyperparams(params)
        logger.save()


def open_csv(logger: CSVLogger, keep_rows: bool) -> None:
    """Create the logger's writer (which deletes the ``metrics.csv`` it finds) and, with
    ``keep_rows``, write the rows that file held back first."""
    path = Path(logger.log_dir) / "metrics.csv"
    rows: list[dict[str, str]] = []
    if keep_rows and path.exists():
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    with warnings.catch_warnings():  # "... Previous log files ... will be deleted": kept here
        warnings.filterwarnings("ignore", message="Experiment logs directory")
        writer = logger.experiment
    for row in rows:
        step = row.pop("step", "")
        values = {key: value for key, value in row.items() if value != ""}
        writer.log_metrics(values, int(float(step)) if step else None)
    writer.save()


@rank_zero_only
def log_summary(loggers: Sequence[Logger], summary: Mapping[str, Any]) -> None:
    """The summary's figures (``None``: not a number, left out) into each W&B run's summary."""
    figures = {key: value for key, value in summary.items() if value is not None}
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(figures)


@rank_zero_only
def finish_loggers(loggers: Sequence[Logger], failed: bool = False) -> None:
    """Finalize every logger and finish the W&B run (exit code 1 when the run ``failed``), so
    the next run in this process starts a run of its own."""
    for logger in loggers:
        logger.finalize("failed" if failed else "success")
        if isinstance(logger, WandbLogger):
            logger.experiment.finish(exit_code=1 if failed else 0)
