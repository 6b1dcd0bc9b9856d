"""Hydra entry point: ``zopro-train [overrides]``.

Composes the configs (defaults: the embedded sentiment task on one CPU) and runs the loop of
:mod:`zopro_lightning.run.pipeline`. The entry point holds no logic of its own.

The configs are the repository's ``conf/``, shipped inside the package as
``zopro_lightning.conf``: Hydra reads them as ``pkg://zopro_lightning.conf`` whether the
package is a wheel install or an editable one (which maps the package to the repository's
``conf/``). :data:`CONFIG_DIR` is the same directory on disk, for ``initialize_config_dir``.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from zopro_lightning.run.gather import COLUMNS as SUMMARY_COLUMNS

CONFIG_PACKAGE = "zopro_lightning.conf"


def config_dir() -> str:
    """The configs' directory on disk: the repository's ``conf/`` in an editable install, the
    installed package's copy in a wheel install."""
    try:
        return str(resources.files(CONFIG_PACKAGE))
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"{CONFIG_PACKAGE} (the Hydra configs) is not installed: this install predates "
            "the configs shipping inside the package; run `pip install -e .` again"
        ) from error


CONFIG_DIR = config_dir()


def run_dir_of(resume: str | None, fresh: str) -> str:
    """``hydra.run.dir``: ``fresh`` (``outputs/<dataset>/<date>``) for a new run; for
    ``resume=RUN_DIR`` of an existing directory, ``RUN_DIR/resumes/<date>``, so a resume's own
    ``.hydra/`` and log stay inside the run it continues. (A ``resume=`` that names no directory
    keeps ``fresh``: the run is refused before anything is created there.)"""
    if resume and Path(str(resume)).expanduser().is_dir():
        return str(Path(str(resume)) / "resumes" / Path(fresh).name)
    return fresh


OmegaConf.register_new_resolver("zopro_run_dir", run_dir_of, replace=True)


def print_summary(summary: dict, run_dir: Path) -> None:
    print("\n== zopro-train summary ==")
    for key in SUMMARY_COLUMNS:
        if key in summary:
            value = summary[key]
            print(f"{key:>32}: {value:.4f}" if isinstance(value, float) else f"{key:>32}: {value}")
    print(f"{'run directory':>32}: {run_dir}")
    if (run_dir / "policy" / "config.json").exists():
        print(f'{"policy":>32}: {run_dir / "policy"} (zopro-generate {run_dir} "a prompt")')


def leave_process_group() -> None:
    """Under DDP, leave the process group once the run is done: gloo's threads torn down at
    interpreter exit can otherwise abort a rank ("terminate called without an active
    exception") after a run that succeeded."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_PACKAGE}", config_name="config")
def train(cfg: DictConfig) -> float:
    from zopro_lightning.run.console import quiet_console
    from zopro_lightning.run.export import check_export_config

    check_export_config(cfg)  # before any work: a push without a repository fails now
    quiet_console()
    from zopro_lightning.run.pipeline import run_pipeline

    # resume=RUN_DIR goes on in that directory, with its config when no other override is given
    # (this invocation's Hydra directory keeps its own log)
    if cfg.get("resume"):
        from zopro_lightning.run.state import config_to_resume

        cfg = config_to_resume(cfg, HydraConfig.get().overrides.task)
    run_dir = Path(cfg.resume) if cfg.get("resume") else Path(HydraConfig.get().runtime.output_dir)
    summary = run_pipeline(cfg, run_dir)
    leave_process_group()
    print_summary(summary, run_dir)
    print(json.dumps({"summary": str(run_dir / "summary.json")}))
    # the sweep objective: the gold reward, or the reward model's score where there is no gold
    final = summary.get("gold_reward_final", math.nan)
    return float(final if math.isfinite(final) else summary.get("policy_reward_final", math.nan))


if __name__ == "__main__":
    train()
