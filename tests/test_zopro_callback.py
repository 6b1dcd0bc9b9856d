"""ZOPrO as a callback: the whole algorithm in a plain ``Trainer.fit`` (zopro_lightning/callbacks/
zopro.py) ends with the policy and reward weights of ``zopro-train`` for the same seed and
settings; the iteration schedule and the callback's checkpoint state."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

from zopro_lightning.callbacks.zopro import IterationSchedule, ZOPrOIterations
from zopro_lightning.models.loading import load_causal_lm, trainable_state
from zopro_lightning.reward.refinement import RefinementSettings, RewardRefinement
from zopro_lightning.run.phases import load_trainable, prompt_chunks
from zopro_lightning.run.pipeline import Pipeline, run_pipeline
from zopro_lightning.run.state import load_state
from zopro_lightning.zo.spsa import derive_seed

from .test_cli import SMALL

CONF = Path(__file__).resolve().parents[1] / "conf"


def config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                "~logger",
                *SMALL,
                "loop.iterations=2",
                "loop.steps_per_iteration=3",
                "loop.refine.keep_close_alpha=0.5",
                "interplay.snapshots=false",
                "num_threads=1",
                *overrides,
            ],
        )


def test_the_schedule_says_each_iterations_optimizer_and_length():
    schedule = IterationSchedule(iterations=3, updates=5, first_order_updates=8)
    assert [schedule.optimizer(t) for t in range(3)] == [
        "first_order",
        "zeroth_order",
        "zeroth_order",
    ]
    assert [schedule.end_of(t) for t in range(3)] == [8, 13, 18]
    assert schedule.total_updates == 18
    fully = IterationSchedule(2, 5, schedule="zeroth_order", first_order_updates=8)
    assert fully.updates_of(0) == 5  # first_order_updates counts for a first-order iteration 0
    assert fully.optimizer_settings(0) == ("zeroth_order", {"lr": 5e-3, "lr_schedule": "constant"})
    with pytest.raises(ValueError, match="loop.schedule must be one of"):
        IterationSchedule(schedule="zeroth")
    with pytest.raises(ValueError, match="zeroth_order_lr must be finite and > 0"):
        IterationSchedule(zeroth_order_lr=float("nan"))


@pytest.mark.slow
def test_a_plain_trainer_fit_with_the_callback_reproduces_zopro_train(tmp_path):
    """One ``Trainer.fit`` over both iterations (first-order, then ZOPrO with the directions the
    callback set) against ``run_pipeline``'s fit per phase: the same weights, bit for bit."""
    cfg = config()
    run = tmp_path / "run"
    run_pipeline(cfg, run)
    after = load_state(run, "iteration_1")

    # the objects zopro-train starts policy learning with: SFT policy, r_0, the task's prompts
    pipeline = Pipeline(cfg, run)
    reward = pipeline.build_reward_model()
    load_trainable(reward.model, load_state(run, "start")["reward"])
    L.seed_everything(derive_seed(cfg.seed, "policy", 0) % 2**32, verbose=False)
    policy = pipeline.model_spec.with_lora(load_causal_lm(run / "sft"))
    module = pipeline.policy_module_for(policy, reward)
    schedule = IterationSchedule(
        iterations=2,
        updates=cfg.loop.steps_per_iteration,
        first_order_lr=cfg.loop.first_order_lr,
        zeroth_order_lr=cfg.loop.zeroth_order_lr,
    )
    settings = RefinementSettings(
        epochs=cfg.loop.refine.epochs,
        lr=cfg.loop.refine.lr,
        batch_size=cfg.reward_model.batch_size,
        keep_close_alpha=cfg.loop.refine.keep_close_alpha,
    )
    refinement = RewardRefinement(pipeline.build_judge(reward), settings, seed=cfg.seed)
    zopro = ZOPrOIterations(reward, refinement, schedule, seed=cfg.seed)
    # the prompts in zopro-train's order: each iteration's chunk, shuffled by its loader
    sizes = [schedule.updates_of(t) * cfg.loop.batch_size for t in range(2)]
    chunks = prompt_chunks(pipeline.task.train_prompts, sizes)
    loaders = [pipeline.ctx.loader(chunk, cfg.loop.batch_size) for chunk in chunks]
    batches = [batch for loader in loaders for batch in loader]

    trainer = L.Trainer(
        max_steps=schedule.total_updates,
        callbacks=[zopro],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(module, DataLoader(batches, batch_size=None))

    assert zopro.iteration == 2 and module.policy_updates == 6
    assert zopro.last.refinement["pairs"] > 0 and zopro.last.matched > 0  # refined, targeted
    r_0 = load_state(run, "start")["reward"]
    assert any(not torch.equal(r_0[k], v) for k, v in trainable_state(reward.model).items())
    assert module.hparams.optimizer == "zeroth_order"  # switched after iteration 0
    ours = {"policy": trainable_state(policy), "reward": trainable_state(reward.model)}
    for name, tensors in ours.items():
        assert tensors.keys() == after[name].keys()
        for key, value in tensors.items():
            assert torch.equal(value, after[name][key]), f"{name}: {key}"


def test_the_callback_state_round_trips_through_a_checkpoint_dict():
    zopro = ZOPrOIterations(object(), lambda *a: {}, IterationSchedule(iterations=2, updates=1))
    zopro.iteration = 1
    zopro._theta_start = {"w": torch.ones(2)}
    zopro.recorder.records = [("p", "c")]
    zopro._applied = (1, 1)  # the optimizer of iteration 1, over 1 update
    restored = ZOPrOIterations(object(), lambda *a: {}, IterationSchedule(iterations=2, updates=1))
    restored.load_state_dict(zopro.state_dict())
    assert restored.iteration == 1 and restored.recorder.records == [("p", "c")]
    assert restored._applied == (1, 1)
    # a checkpoint written before the optimizer's iteration was saved: the saved iteration's,
    # or the last one's once every iteration has ended
    assert restored._applied_of({"iteration": 2}) == (1, 1)
    assert torch.equal(restored._theta_start["w"], torch.ones(2))
    with pytest.raises(ValueError, match="direction must be"):
        ZOPrOIterations(object(), lambda *a: {}, IterationSchedule(), direction="grad")
