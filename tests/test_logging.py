"""Logs that hang together: one run-wide step over every phase's Trainer, with ``iteration``
and ``phase``, in ``metrics.csv`` and W&B; the composed config logged once; the summary in
W&B; a resumed run logging into its own directory and W&B run; a finished run left alone."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import CSVLogger
from omegaconf import open_dict
from torch.utils.data import DataLoader

from zopro_lightning.callbacks.run_progress import PHASES, RunProgress
from zopro_lightning.policy.module import ZOPrOModule
from zopro_lightning.rl.rollout import RolloutSettings
from zopro_lightning.run.loggers import STEP_METRIC, instantiate_loggers, logger_nodes
from zopro_lightning.run.pipeline import run_pipeline

from .conftest import count_words_reward
from .test_cli import SMALL, zopro_train
from .test_wandb import (  # noqa: F401  (offline_wandb is a fixture)
    history_and_config,
    offline_wandb,
    summary_metrics_and_run,
)

CONF = Path(__file__).resolve().parents[1] / "conf"
TINY = [
    *SMALL,
    "interplay.snapshots=false",
    "loop.checkpoint_every=1",
    "num_threads=1",
    "loop.zeroth_order_lr=0.0123",  # a value no module default has
]


def config(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "config", overrides=["logger=many", *TINY, *overrides], return_hydra_config=hydra
        )


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def position(row: dict[str, str]) -> tuple[int, int, int]:
    """``(step, iteration, phase)`` of a metrics.csv row."""
    return int(float(row["step"])), int(float(row["iteration"])), int(float(row["phase"]))


def wandb_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def assert_run_order(steps_iterations_phases: list[tuple[int, int, int]]) -> None:
    """The step never goes back, nor (iteration, phase) against the run's order."""
    steps = [s for s, _, _ in steps_iterations_phases]
    assert steps == sorted(steps), steps
    order = [(t, p) for _, t, p in steps_iterations_phases]
    assert order == sorted(order), order


@pytest.mark.slow
@pytest.mark.usefixtures("offline_wandb")
def test_one_step_over_every_phase_config_and_summary_in_csv_and_wandb(tmp_path):
    run_dir = tmp_path / "run"
    summary = run_pipeline(config(), run_dir)

    # metrics.csv: every row has the run-wide step, its iteration and phase
    rows = csv_rows(run_dir)
    positions = [position(row) for row in rows]
    assert_run_order(positions)
    assert {(t, PHASES[p]) for _, t, p in positions} == {
        (0, "sft"),
        (0, "reward_model"),
        *((t, phase) for t in (0, 1) for phase in ("policy_learning", "refinement")),
    }
    policy_steps = [
        s for (s, _, _), row in zip(positions, rows, strict=True) if row.get("policy/reward_mean")
    ]
    assert len(policy_steps) == summary["policy_steps"] == 4
    assert len(set(policy_steps)) == 4  # one row an update, each at its own step
    # hparams.yaml: the composed config, not a phase module's arguments
    hparams = yaml.safe_load((run_dir / "hparams.yaml").read_text())
    assert hparams["sampler"]["name"] == "zopro"
    assert hparams["loop"]["zeroth_order_lr"] == 0.0123
    assert "lr" not in hparams and "eps" not in hparams

    # W&B: the same rows, the same config, the summary's figures
    (wandb_run,) = wandb_runs(run_dir)
    history, wandb_config = history_and_config(wandb_run)
    rows_with_step = [row for row in history if STEP_METRIC in row and "phase" in row]
    assert_run_order([(row[STEP_METRIC], row["iteration"], row["phase"]) for row in rows_with_step])
    assert [row[STEP_METRIC] for row in rows_with_step] == [s for s, _, _ in positions]
    assert wandb_config["sampler"]["name"] == "zopro"
    assert wandb_config["loop"]["zeroth_order_lr"] == 0.0123
    assert wandb_config["policy"]["rollout"]["k"] == 2
    assert "lr" not in wandb_config and "eps" not in wandb_config
    wandb_summary, metrics, _run = summary_metrics_and_run(wandb_run)
    assert wandb_summary["gold_reward_final"] == pytest.approx(summary["gold_reward_final"])
    assert wandb_summary["policy_steps"] == 4
    assert any(m.glob_name == "*" and m.step_metric == STEP_METRIC for m in metrics)


class Killed(RuntimeError):
    """Stands for the job being killed."""


@pytest.mark.slow
@pytest.mark.usefixtures("offline_wandb")
def test_resumed_run_logs_into_its_own_directory_and_wandb_run(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    original = ZOPrOModule.training_step

    def killed_at_update_3(self, batch, batch_idx):  # iteration 1, after one of its updates
        if self.policy_updates == 3:
            raise Killed("killed")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(ZOPrOModule, "training_step", killed_at_update_3)
    with pytest.raises(Killed):
        run_pipeline(config(), run_dir)
    killed_rows = csv_rows(run_dir)
    monkeypatch.setattr(ZOPrOModule, "training_step", original)
    run_pipeline(config(f"resume={run_dir}"), run_dir)

    # metrics.csv: the interrupted run's rows, then the resumed run's, in the same file
    rows = csv_rows(run_dir)
    assert [position(row) for row in rows[: len(killed_rows)]] == [
        position(row) for row in killed_rows
    ]
    resumed = [position(row) for row in rows[len(killed_rows) :]]
    assert resumed and resumed[0][1:] == (1, PHASES.index("policy_learning"))
    assert_run_order(resumed)
    # the resumed run goes on from its checkpoint's step (update 3 of the run is redone)
    last_kept = max(s for s, t, p in map(position, killed_rows) if PHASES[p] == "refinement")
    assert resumed[0][0] > last_kept
    assert resumed[0][0] == position(killed_rows[-1])[0] + 1  # the update the kill stopped
    assert (resumed[-1][1], PHASES[resumed[-1][2]]) == (1, "refinement")
    assert sorted(p.name for p in tmp_path.rglob("metrics.csv")) == ["metrics.csv"]

    # W&B: both invocations in the run directory, as one W&B run
    runs = wandb_runs(run_dir)
    assert len(runs) == 2
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    # (the run ids in the transaction logs, not W&B's directory names, say which run it is)
    _summary, _metrics, first = summary_metrics_and_run(runs[0])
    _summary, _metrics, second = summary_metrics_and_run(runs[1])
    assert first.run_id == second.run_id == run_id
    history, _config = history_and_config(runs[1])
    steps = [row[STEP_METRIC] for row in history if "phase" in row]
    assert steps[0] == resumed[0][0] and steps == sorted(steps)


@pytest.mark.slow
@pytest.mark.usefixtures("offline_wandb")
def test_finished_run_resumed_is_left_as_it_is(tmp_path):
    run_dir = tmp_path / "run"
    first = run_pipeline(config("loop.iterations=1"), run_dir)
    files = ("summary.json", "metrics.csv", "hparams.yaml")
    before = {name: (run_dir / name).read_bytes() for name in files}
    again = run_pipeline(config("loop.iterations=1", f"resume={run_dir}"), run_dir)
    assert {name: (run_dir / name).read_bytes() for name in files} == before
    assert len(wandb_runs(run_dir)) == 1  # no W&B run opened for it
    assert again["gold_reward_final"] == first["gold_reward_final"]
    assert again["kl_final"] == first["kl_final"]
    assert json.loads(before["summary.json"])["wall_seconds"] == first["wall_seconds"]


@pytest.mark.slow
def test_zopro_train_resume_logs_into_the_run_directory(tmp_path):
    """The command: ``resume=RUN_DIR`` writes its metrics there, not into the new Hydra
    directory of the resuming invocation (which keeps only that invocation's own log)."""
    first, second = tmp_path / "first", tmp_path / "second"
    tiny = ["loop.iterations=1", "interplay.snapshots=false"]
    assert zopro_train(first, *tiny).returncode == 0
    # as if killed after r_0: the iteration and the end are redone
    (first / "summary.json").unlink()
    (first / "state" / "iteration_0.pt").unlink()
    rows_before = csv_rows(first)
    result = zopro_train(second, *tiny, f"resume={first}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (second / "metrics.csv").exists()
    rows = csv_rows(first)
    assert rows[: len(rows_before)] == rows_before
    resumed = [position(row) for row in rows[len(rows_before) :]]
    r_0 = [s for s, _, p in map(position, rows_before) if PHASES[p] == "reward_model"]
    assert resumed[0] == (r_0[-1] + 1, 0, PHASES.index("policy_learning"))  # on from r_0
    assert (first / "summary.json").exists()


def test_run_progress_counts_updates_over_fits(lora_policy, tokenizer, small_task, tmp_path):
    """A plain Trainer a phase, as the pipeline makes them: the step goes on, one row an
    update, with the iteration and phase entered."""
    torch.set_num_threads(1)
    progress = RunProgress()
    logger = CSVLogger(tmp_path, name="", version="")
    module = ZOPrOModule(
        lora_policy, tokenizer, count_words_reward, rollout=RolloutSettings(k=2, max_new_tokens=3)
    )
    prompts = DataLoader(small_task.train_prompts[:8], batch_size=2, collate_fn=lambda b: b)
    for t in (0, 1):
        progress.enter("policy_learning", t)
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=2,
            logger=logger,
            callbacks=[progress],
            log_every_n_steps=1,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, prompts)
        assert trainer.global_step == 2
    assert progress.completed == 4
    rows = csv_rows(tmp_path)
    assert [position(row) for row in rows] == [
        (1, 0, 2),
        (2, 0, 2),
        (3, 1, 2),
        (4, 1, 2),
    ]
    assert all(row["policy/reward_mean"] for row in rows)
    restored = RunProgress()
    restored.load_state_dict(progress.state_dict())
    assert (restored.completed, restored.iteration, restored.phase) == (4, 1, "policy_learning")
    with pytest.raises(ValueError, match="phase must be one of"):
        progress.enter("warmup")


def test_multirun_job_is_grouped_by_sweep_and_named_by_overrides(tmp_path):
    cfg = config("seed=3", "sampler=gaussian", hydra=True)
    with open_dict(cfg):
        cfg.hydra.mode = "MULTIRUN"
        cfg.hydra.sweep.dir = str(tmp_path / "sweep")
        cfg.hydra.job.override_dirname = "sampler=gaussian,seed=3"
    hydra = HydraConfig.instance()
    previous = hydra.cfg
    hydra.set_config(cfg)
    try:
        (csv_logger, wandb_logger) = instantiate_loggers(cfg.logger, tmp_path / "run")
    finally:
        hydra.cfg = previous
    assert Path(csv_logger.log_dir) == tmp_path / "run"
    init = wandb_logger._wandb_init  # what wandb.init will get
    assert init["group"] == str(tmp_path / "sweep")
    assert init["name"] == "sampler=gaussian,seed=3"
    assert init["dir"] == str(tmp_path / "run")
    assert init["id"] == (tmp_path / "run" / "wandb_run_id").read_text().strip()
    assert init["resume"] == "allow"


def test_logger_group_entries_need_a_target():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["logger=many", "logger.wandb=null"])
    assert [node._target_ for node in logger_nodes(cfg.logger)] == [
        "lightning.pytorch.loggers.CSVLogger"
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["logger=many", "+logger.extra.save_dir=x"])
    with pytest.raises(ValueError, match="logger.extra has no _target_"):
        logger_nodes(cfg.logger)


def test_the_progress_bar_says_where_the_run_is():
    progress = RunProgress()
    assert progress.describe(4) == "[sft]"
    progress.enter("reward_model")
    assert progress.describe(4) == "[reward model r_0]"
    progress.enter("policy_learning", 1)
    assert progress.describe(4) == "[iteration 2/4] policy learning"
    progress.enter("refinement", 3)
    assert progress.describe() == "[iteration 4] refinement"


@pytest.mark.parametrize("epochs", [1, 2])
def test_the_phase_bar_is_the_only_bar_drawn(capsys, epochs):
    """Every frame of a fit's bar says where the run is: no ``Training`` frame when the bar is
    built, no ``Epoch N`` frame at an epoch start."""
    from lightning.pytorch.demos.boring_classes import BoringModel

    from zopro_lightning.callbacks.run_progress import PhaseProgressBar

    progress = RunProgress()
    progress.enter("refinement", 1)
    trainer = L.Trainer(
        max_epochs=epochs,
        limit_train_batches=2,
        limit_val_batches=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[PhaseProgressBar(progress, iterations=4)],
    )
    trainer.fit(BoringModel())
    frames = [f for f in capsys.readouterr().out.split("\r") if "it/s" in f or "s/it" in f]
    assert frames and all(f.lstrip().startswith("[iteration 2/4] refinement") for f in frames), [
        f for f in frames if not f.lstrip().startswith("[iteration")
    ]
    if epochs > 1:
        assert any("epoch 2/2" in f for f in frames)
