"""Every shipped config composes (Hydra's own checks, through ``zopro-train --cfg``), without
building anything; the Optuna search and the SLURM launcher compose into working plugins."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from zopro_lightning.run.cli import train

from .test_cli import SMALL

CONF = Path(__file__).resolve().parents[1] / "conf"


def default_groups() -> set[str]:
    """The groups of config.yaml's defaults list (others are appended with ``+group=``)."""
    defaults = yaml.safe_load((CONF / "config.yaml").read_text())["defaults"]
    return {next(iter(entry)) for entry in defaults if isinstance(entry, dict)}


def option_override(path: Path) -> str:
    group = path.parent.relative_to(CONF).as_posix()
    listed = group in default_groups() or group.startswith("hydra/")
    return f"{'' if listed else '+'}{group}={path.stem}"


# every option of every group, nested ones included (hydra/launcher=slurm)
OPTIONS = sorted(option_override(path) for path in CONF.rglob("*.yaml") if path.parent != CONF)


def zopro_train_cfg(monkeypatch, capsys, *args: str) -> str:
    """``zopro-train ARGS`` in this process (``--cfg`` only prints); its stdout."""
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["zopro-train", *args])
    try:
        train()
    except SystemExit as error:  # Hydra reports a composition error and exits 1
        pytest.fail(f"zopro-train {' '.join(args)} exited {error.code}:\n{capsys.readouterr().err}")
    finally:
        GlobalHydra.instance().clear()
    return capsys.readouterr().out


def test_every_group_option_is_found():
    assert "hparams_search=zopro_optuna" in OPTIONS
    assert "hydra/launcher=slurm" in OPTIONS
    assert "trainer=ddp" in OPTIONS
    assert any(option.endswith("callbacks=default") for option in OPTIONS)


@pytest.mark.parametrize("override", OPTIONS)
def test_config_composes_and_resolves(override, monkeypatch, capsys):
    """``zopro-train OPTION --cfg job --resolve``: composes, and every interpolation resolves."""
    cfg = yaml.safe_load(
        zopro_train_cfg(monkeypatch, capsys, override, "--cfg", "job", "--resolve")
    )
    assert cfg["model"] is not None and cfg["dataset"]["name"]
    assert cfg["trainer"]["_target_"] == "lightning.Trainer"


def test_unknown_group_option_is_refused():
    from hydra.errors import MissingConfigException

    with (
        initialize_config_dir(config_dir=str(CONF), version_base="1.3"),
        pytest.raises(MissingConfigException),
    ):
        compose("config", overrides=["sampler=does_not_exist"])


def test_completion_table_callback_config_instantiates():
    from zopro_lightning.callbacks.completion_table import CompletionTable

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["callbacks.completion_table.every_n_updates=5"])
    callback = instantiate(cfg.callbacks.completion_table)
    assert isinstance(callback, CompletionTable) and callback.every_n_updates == 5


@pytest.mark.parametrize(
    "experiment", [None, *sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))]
)
def test_policy_groups_build_the_modules_settings(experiment):
    """``policy.optimizer``, ``policy.rollout``, ``policy.spsa``: each builds its settings
    object (checked on construction), as ``ZOPrOModule`` takes them."""
    from zopro_lightning.policy.optimization import OptimizerSettings
    from zopro_lightning.rl.rollout import RolloutSettings
    from zopro_lightning.zo.optim import SPSASettings

    overrides = [] if experiment is None else [f"experiment={experiment}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    settings = {group: instantiate(node) for group, node in cfg.policy.items()}
    assert {group: type(value) for group, value in settings.items()} == {
        "optimizer": OptimizerSettings,
        "rollout": RolloutSettings,
        "spsa": SPSASettings,
    }
    assert settings["rollout"].k == cfg.policy.rollout.k
    assert settings["spsa"].eps == cfg.policy.spsa.eps


def test_ddp_trainer_is_multi_gpu_data_parallel(monkeypatch, capsys):
    out = zopro_train_cfg(monkeypatch, capsys, "trainer=ddp", "--cfg", "job", "-p", "trainer")
    trainer = yaml.safe_load(out)
    assert trainer["accelerator"] == "gpu" and trainer["strategy"] == "ddp"
    assert {"devices", "num_nodes"} <= set(trainer)


# -- Optuna ------------------------------------------------------------------------------------
def test_optuna_search_composes(monkeypatch, capsys):
    out = zopro_train_cfg(
        monkeypatch, capsys, "hparams_search=zopro_optuna", "--cfg", "hydra", "-p", "hydra.sweeper"
    )
    sweeper = yaml.safe_load(out)
    assert sweeper["_target_"].endswith("OptunaSweeper")
    assert sweeper["direction"] == "maximize"
    assert sweeper["sampler"]["_target_"] == "optuna.samplers.TPESampler"
    assert sweeper["sampler"]["seed"] is not None
    assert set(sweeper["params"]) == {
        "policy.spsa.eps",
        "loop.zeroth_order_lr",
        "sampler.sampler.decay",
        "sampler.sampler.initial_decay",
        "policy.spsa.num_perturbations",
    }


@pytest.mark.slow
def test_optuna_search_runs_two_trials(tmp_path):
    """A real 2-trial study on the tiny task (about 15 s): each trial writes its run
    directory, and the best value is the best trial's gold_reward_final."""
    sweep = tmp_path / "sweep"
    command = [
        sys.executable,
        "-m",
        "zopro_lightning.run.cli",
        "hparams_search=zopro_optuna",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={sweep}",
        "num_threads=1",
        "interplay.snapshots=false",
        *SMALL,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = sorted(sweep.glob("trial_*/summary.json"))
    assert len(summaries) == 2
    finals = [json.loads(path.read_text())["gold_reward_final"] for path in summaries]
    overrides = [
        (path.parent / ".hydra" / "overrides.yaml").read_text().splitlines()[:5]
        for path in summaries
    ]
    assert overrides[0] != overrides[1]  # two sampled points of the search space
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(max(finals))
    assert "policy.spsa.eps" in results["best_params"]


# -- SLURM launcher ----------------------------------------------------------------------------
class Submitted(Exception):
    """Raised in place of submitting: carries the executor the launcher built."""


def test_slurm_launcher_builds_the_sbatch_script(tmp_path, monkeypatch):
    """The launcher config instantiates submitit's SLURM launcher, whose sbatch script asks
    for the trainer's nodes and one task per GPU (nothing is submitted)."""
    import submitit

    fake_bin = tmp_path / "bin"  # submitit looks for srun before it builds a SLURM executor
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{Path(sys.executable).parent}:/usr/bin:/bin")

    def capture(self, *args, **kwargs):
        raise Submitted(self)

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    overrides = [
        "hydra/launcher=slurm",
        "trainer=ddp",
        "trainer.devices=8",
        "trainer.num_nodes=2",
        "hydra.launcher.partition=gpu",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    with pytest.raises(Submitted) as submitted:
        launcher.launch([["seed=1"]], initial_job_idx=0)
    executor = submitted.value.args[0]
    script = executor._executor._make_submission_file_text("python -m zopro_lightning.run.cli", "0")
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=1440",
    ):
        assert line in script, script
