"""A pipeline run killed inside an iteration, or stopped by a real signal at any of its saved
states (after SFT, after r_0, after a policy phase, after a refinement), and resumed with
``resume=RUN_DIR`` ends exactly where the uninterrupted run ends; a resume with another
config, or an unwritable output directory, is refused before any training."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from zopro_lightning.policy.module import ZOPrOModule
from zopro_lightning.run.pipeline import Pipeline, run_pipeline
from zopro_lightning.run.state import load_state
from zopro_lightning.utils.checkpointing import CheckpointIOError

from .test_cli import SMALL
from .test_ddp_pipeline import assert_same_weights, launch, launch_and_stop, saved_ranks

CONF = Path(__file__).resolve().parents[1] / "conf"
RESUMABLE = [
    *SMALL,
    "loop.iterations=3",
    "loop.steps_per_iteration=4",
    "loop.checkpoint_every=1",
    "interplay.snapshots=false",
    "num_threads=1",
]


def config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["~logger", *RESUMABLE, *overrides])


class Killed(RuntimeError):
    """Stands for the job being killed."""


@pytest.mark.slow
def test_run_killed_mid_iteration_resumes_to_bit_identical_weights(tmp_path, monkeypatch):
    uninterrupted = run_pipeline(config(), tmp_path / "a")

    original = ZOPrOModule.training_step

    def killed_at_update_6(self, batch, batch_idx):  # iteration 1, after two of its updates
        if self.policy_updates == 6:
            raise Killed("killed")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(ZOPrOModule, "training_step", killed_at_update_6)
    with pytest.raises(Killed):
        run_pipeline(config(), tmp_path / "b")
    assert (tmp_path / "b/checkpoints/iteration_1/last.ckpt").exists()
    assert not (tmp_path / "b/state/iteration_1.pt").exists()

    updates_made = []

    def counted(self, batch, batch_idx):
        updates_made.append(self.policy_updates)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(ZOPrOModule, "training_step", counted)
    resumed = run_pipeline(config(f"resume={tmp_path / 'b'}"), tmp_path / "b")
    # from the checkpoint inside iteration 1: updates 6..11 only (SFT, r_0, iteration 0 and
    # the first half of iteration 1 are not redone)
    assert updates_made == list(range(6, 12))

    final_a = load_state(tmp_path / "a", "iteration_2")
    final_b = load_state(tmp_path / "b", "iteration_2")
    for part in ("policy", "reward"):
        assert final_a[part].keys() == final_b[part].keys()
        for name, tensor in final_a[part].items():
            assert torch.equal(tensor, final_b[part][name]), (part, name)
    assert final_a["sampler"]["decay"] == final_b["sampler"]["decay"]
    assert final_b["policy_updates"] == final_a["policy_updates"] == 12
    for key in ("gold_reward_initial", "gold_reward_per_iteration", "refinement_pairs"):
        assert resumed[key] == uninterrupted[key], key
    assert resumed["resumed"] is True
    assert not (tmp_path / "b/checkpoints/iteration_1").exists()  # superseded by the state
    summary = json.loads((tmp_path / "b/summary.json").read_text())
    assert summary["gold_reward_final"] == uninterrupted["gold_reward_final"]


@pytest.mark.slow
def test_resume_with_another_config_is_refused_before_training(tmp_path):
    run_pipeline(config("loop.iterations=1", "loop.steps_per_iteration=1"), tmp_path / "run")
    with pytest.raises(ValueError, match=r"loop.zeroth_order_lr: 0.005 -> 0.1"):
        Pipeline(
            config(
                "loop.iterations=1",
                "loop.steps_per_iteration=1",
                "loop.zeroth_order_lr=0.1",
                f"resume={tmp_path / 'run'}",
            ),
            tmp_path / "run",
        )


def test_resume_of_a_directory_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a zopro-train run directory"):
        Pipeline(config(f"resume={tmp_path}"), tmp_path)


def test_pipeline_with_an_unwritable_run_directory_fails_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointIOError, match="not writable"):
        Pipeline(config(), blocker / "run")


@pytest.mark.slow
def test_first_order_iteration_can_have_its_own_length(tmp_path):
    summary = run_pipeline(
        config("loop.iterations=2", "loop.first_order_steps=3", "loop.checkpoint_every=null"),
        tmp_path / "run",
    )
    assert summary["policy_steps"] == 3 + 4  # iteration 0 first-order: 3; iteration 1: 4
    assert summary["optimizer_per_iteration"] == ["first_order", "zeroth_order"]
    assert load_state(tmp_path / "run", "iteration_1")["policy_updates"] == 7


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> dict:
    """What an uninterrupted one-process run of ``tests/ddp_pipeline_worker.py`` saved."""
    out = tmp_path_factory.mktemp("one_process")
    launch(out, "--devices", "1")
    return saved_ranks(out, world_size=1)[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "sig", "saved"),
    [
        ("sft", signal.SIGINT, ["sft"]),  # the merged SFT policy, state/sft.pt
        ("start", signal.SIGTERM, ["sft", "start"]),  # r_0
        # iteration 0's policy phase done (its last update checkpointed), refinement not begun
        ("policy_0", signal.SIGINT, ["sft", "start"]),
        ("iteration_0", signal.SIGTERM, ["sft", "start", "iteration_0"]),  # refinement 0 done
    ],
)
def test_run_stopped_by_a_signal_at_a_saved_state_resumes_to_bit_identical_weights(
    one_process_run, tmp_path, point, sig, saved
):
    out = tmp_path / "stopped"
    launch_and_stop(out, point, sig, "--devices", "1", ranks=1)
    assert sorted(p.stem for p in (out / "run/state").glob("*.pt")) == sorted(saved)
    if point == "policy_0":
        assert (out / "run/checkpoints/iteration_0/last.ckpt").exists()
    launch(out, "--devices", "1", "--resume")
    resumed = saved_ranks(out, world_size=1)[0]
    redone = len(resumed["refinements"])
    assert redone == (1 if point == "iteration_0" else 2)
    for again, before in zip(
        resumed["refinements"], one_process_run["refinements"][-redone:], strict=True
    ):
        assert again["prompts"] == before["prompts"]
        assert again["trained_on"] == before["trained_on"]
    assert_same_weights([resumed], [one_process_run])


@pytest.mark.slow
def test_resume_alone_goes_on_with_the_runs_own_config(tmp_path):
    """``zopro-train resume=RUN_DIR`` with none of the run's overrides takes its config."""
    import subprocess
    import sys

    from .test_cli import zopro_train

    run = tmp_path / "run"
    first = zopro_train(run, "loop.iterations=1", "interplay.snapshots=false")
    assert first.returncode == 0, first.stderr[-3000:]
    finished = json.loads((run / "summary.json").read_text())
    for path in (run / "summary.json", run / "state" / "iteration_0.pt"):
        path.unlink()  # as if stopped after r_0: iteration 0 is redone
    elsewhere = tmp_path / "elsewhere"  # the directory the resume is started from
    elsewhere.mkdir()
    resumed = subprocess.run(
        [sys.executable, "-m", "zopro_lightning.run.cli", f"resume={run}"],
        capture_output=True, text=True, timeout=600, cwd=elsewhere,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["policy_steps"] == finished["policy_steps"] == 2  # SMALL's, not the default
    assert summary["gold_reward_final"] == finished["gold_reward_final"]
    assert summary["resumed"] is True
    # the resume's own Hydra files and log are inside the run it continues, nothing elsewhere
    assert list(elsewhere.iterdir()) == []
    (own,) = (run / "resumes").iterdir()
    assert (own / ".hydra" / "overrides.yaml").exists() and (own / "cli.log").exists()
    assert "resume: SFT policy from" in (own / "cli.log").read_text()
