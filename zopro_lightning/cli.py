"""Hydra entry point: ``zopro-train [overrides]``.

Composes ``conf/`` (defaults: the embedded sentiment task on one CPU) and runs the loop of
:mod:`zopro_lightning.pipeline`. The entry point holds no logic of its own.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from zopro_lightning.gather import COLUMNS as SUMMARY_COLUMNS

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def print_summary(summary: dict, run_dir: Path) -> None:
    print("\n== zopro-train summary ==")
    for key in SUMMARY_COLUMNS:
        if key in summary:
            value = summary[key]
            print(f"{key:>32}: {value:.4f}" if isinstance(value, float) else f"{key:>32}: {value}")
    print(f"{'run directory':>32}: {run_dir}")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def train(cfg: DictConfig) -> float:
    from zopro_lightning.pipeline import run_pipeline

    # resume=RUN_DIR goes on in that directory (this invocation's Hydra directory keeps its log)
    run_dir = Path(cfg.resume) if cfg.get("resume") else Path(HydraConfig.get().runtime.output_dir)
    summary = run_pipeline(cfg, run_dir)
    print_summary(summary, run_dir)
    print(json.dumps({"summary": str(run_dir / "summary.json")}))
    # the sweep objective: the gold reward, or the reward model's score where there is no gold
    final = summary.get("gold_reward_final", math.nan)
    return float(final if math.isfinite(final) else summary.get("policy_reward_final", math.nan))


if __name__ == "__main__":
    train()
