"""The pipeline's ``loop.schedule``, per-sampler learning rates, the zeroth-order settings of a
phase, the paired evaluation, and ``bench/schedules.py``'s branching (one smoke run)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tests.test_cli import SMALL as CLI_SMALL
from zopro_lightning.run.building import iteration_schedule
from zopro_lightning.run.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
#: test_cli's small run, with a first-order iteration 0 of its own length, no checkpoints,
#: two evaluation samples and no snapshots
OWN = {
    "loop.first_order_steps": "3",
    "loop.checkpoint_every": "null",
    "eval.samples_per_prompt": "2",
    "interplay.snapshots": "false",
}
SMALL = [o for o in CLI_SMALL if o.split("=")[0] not in OWN] + [f"{k}={v}" for k, v in OWN.items()]


def config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["~logger", *SMALL, *overrides])


def test_the_iteration_schedule_follows_loop_schedule():
    optimizers = {
        name: [iteration_schedule(config(f"loop.schedule={name}")).optimizer(t) for t in range(3)]
        for name in ("first_order_then_zeroth_order", "first_order", "zeroth_order")
    }
    assert optimizers["first_order_then_zeroth_order"] == [
        "first_order",
        "zeroth_order",
        "zeroth_order",
    ]
    assert set(optimizers["first_order"]) == {"first_order"}
    assert set(optimizers["zeroth_order"]) == {"zeroth_order"}
    with pytest.raises(ValueError, match="loop.schedule must be one of"):
        iteration_schedule(config("loop.schedule=zo_first"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("schedule", "expected", "steps"),
    [
        ("first_order_then_zeroth_order", ["first_order", "zeroth_order"], 3 + 2),
        ("first_order", ["first_order", "first_order"], 3 + 2),
        ("zeroth_order", ["zeroth_order", "zeroth_order"], 2 + 2),
    ],
)
def test_schedule_sets_each_iterations_optimizer(tmp_path, schedule, expected, steps):
    summary = run_pipeline(config(f"loop.schedule={schedule}"), tmp_path)
    assert summary["optimizer"] == schedule
    assert summary["optimizer_per_iteration"] == expected
    assert summary["policy_steps"] == steps
    assert len(summary["policy_seconds_per_iteration"]) == 2
    # paired evaluation: one standard error per iteration's gain, one for the whole run
    assert len(summary["gold_reward_gain_stderr_per_iteration"]) == 2
    assert math.isfinite(summary["gold_reward_stderr"])
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["optimizer"] == schedule


def test_zeroth_order_phase_takes_the_samplers_own_lr_eps_and_schedule():
    cfg = config(
        "sampler.lr=0.02",
        "sampler.eps=0.004",
        "loop.zeroth_order_lr_schedule=linear",
        "policy.optimizer.lr_schedule=constant",
    )
    schedule = iteration_schedule(cfg)
    assert schedule.optimizer_settings(1) == (
        "zeroth_order",
        {"lr": 0.02, "eps": 0.004, "lr_schedule": "linear"},
    )
    assert schedule.optimizer_settings(0) == (
        "first_order",
        {"lr": cfg.loop.first_order_lr, "lr_schedule": "constant"},
    )
    # without its own lr and eps the sampler steps with loop.zeroth_order_lr and the module's eps
    plain = iteration_schedule(config())
    assert plain.optimizer_settings(1)[1]["lr"] == plain.zeroth_order_lr
    assert plain.zeroth_order_lr == config().loop.zeroth_order_lr
    assert "eps" not in plain.optimizer_settings(1)[1]


@pytest.mark.slow
def test_schedules_bench_branches_share_sft_r0_and_iteration_0(tmp_path):
    """The benchmark's branches resume from the base run's state: the first-order-then-ZO
    branch has the base run's SFT, r_0 and iteration 0 bit for bit, then its own iteration 1."""
    sys.path.insert(0, str(ROOT / "bench"))
    import schedules

    common = [arg for o in SMALL for arg in ("--common", o)]
    payload = schedules.main(
        ["--seeds", "0", "--methods", "first_order", "zopro", "subspace_gradients",
         "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "schedules.json"), *common]
    )
    first, zopro = payload["curves"]["first_order"]["0"], payload["curves"]["zopro"]["0"]
    assert zopro["gold"][:2] == first["gold"][:2]  # SFT and iteration 0: the same numbers
    # the gradient-subspace branch spans the base run's last 8 batch gradients of iteration 0
    spanned = payload["curves"]["subspace_gradients"]["0"]
    assert spanned["gold"][:2] == first["gold"][:2] and spanned["gold"][2] != zopro["gold"][2]
    from zopro_lightning.run.state import load_state

    kept = load_state(tmp_path / "w" / "seed_0" / "subspace_gradients", "iteration_0")
    ranks = {t.shape[0] for t in kept["sampler"]["given"].values()}
    assert max(ranks) == 3 and min(ranks) >= 2  # 3 updates < 8 (LoRA A: 0 at the first)
    assert zopro["optimizer_per_iteration"] == ["first_order", "zeroth_order"]
    assert first["optimizer_per_iteration"] == ["first_order", "first_order"]
    assert zopro["updates"] == [0, 3, 5]
    branch = json.loads((tmp_path / "w" / "seed_0" / "zopro" / "summary.json").read_text())
    assert branch["optimizer"] == "first_order_then_zeroth_order" and branch["sampler"] == "zopro"
    assert (tmp_path / "schedules.png").stat().st_size > 0
    assert "zopro_minus_first_order" in payload["paired"]


def test_fully_zeroth_order_comparison_reads_first_order_iteration_0_at_equal_time():
    """bench/schedules.py (issue #19): a fully zeroth-order curve against the first-order
    run's iteration 0 from the same SFT, at equal seconds and at equal updates, and a
    variant against the default fully zeroth-order method, paired over seeds."""
    sys.path.insert(0, str(ROOT / "bench"))
    import schedules

    def run(gold, seconds, updates):
        return {"gold": gold, "seconds": seconds, "updates": updates}

    first = {s: run([0.0, 0.2, 0.3], [0.0, 10.0, 15.0], [0, 100, 150]) for s in (0, 1)}
    zo = {0: run([0.0, 0.01, 0.02], [0.0, 2.5, 5.0], [0, 25, 50]),
          1: run([0.0, 0.01, 0.04], [0.0, 2.5, 5.0], [0, 25, 50])}
    variant = {0: run([0.0, 0.02, 0.03], [0.0, 2.5, 5.0], [0, 25, 50]),
               1: run([0.0, 0.02, 0.06], [0.0, 2.5, 5.0], [0, 25, 50])}
    out = schedules.fully_zeroth_order(
        {"first_order": first, "zeroth_order": zo, "zeroth_order_subspace": variant}
    )
    row = out["zeroth_order"]
    assert row["zo_gain_from_sft"][0] == pytest.approx(0.03)
    # 5 s of the first-order iteration 0 (0.2 in 10 s): 0.1; 50 updates of 100: 0.1
    assert row["equal_seconds"]["first_order_gain"][0] == pytest.approx(0.1)
    assert row["equal_updates"]["first_order_gain"][0] == pytest.approx(0.1)
    assert row["equal_seconds"]["ratio"] == pytest.approx(0.3)
    versus = out["zeroth_order_subspace"]["minus_zeroth_order"]
    assert versus["per_seed"] == pytest.approx([0.01, 0.02])
    assert versus["mean"] == pytest.approx(0.015) and versus["se"] == pytest.approx(0.005)
