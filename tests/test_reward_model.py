"""RewardModelModule: Bradley–Terry training separates chosen from rejected; the warm-up
schedule; bad options refused."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from zopro_lightning.reward.callables import HFRewardModel
from zopro_lightning.reward.training import PairCollator, RewardModelModule
from zopro_lightning.run.evaluation import pairwise_accuracy

from .conftest import tiny_reward_model


def fit(reward: HFRewardModel, pairs, lr: float, warmup: float, epochs: int) -> L.Trainer:
    torch.set_num_threads(1)
    module = RewardModelModule(reward, lr=lr, warmup_fraction=warmup)
    loader = DataLoader(pairs, batch_size=8, shuffle=False, collate_fn=PairCollator(reward))
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    return trainer


def test_bradley_terry_training_separates_the_training_pairs(tokenizer, small_task):
    reward = tiny_reward_model(tokenizer)
    pairs = small_task.train_pairs
    before = pairwise_accuracy(reward, pairs)
    fit(reward, pairs, lr=3e-3, warmup=0.1, epochs=8)
    after = pairwise_accuracy(reward, pairs)
    assert after > max(before, 0.8), (before, after)


def test_warmup_raises_the_learning_rate_linearly_then_holds(tokenizer, small_task):
    reward = tiny_reward_model(tokenizer)
    trainer = fit(reward, small_task.train_pairs, lr=1e-3, warmup=0.5, epochs=2)  # 8 steps
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-3)  # after warm-up: the full rate
    factors = [scheduler.lr_lambdas[0](step) for step in range(6)]
    assert factors == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])


@pytest.mark.parametrize(
    "kwargs, message",
    [({"loss": "hinge"}, "bradley_terry"), ({"warmup_fraction": 1.0}, "warmup_fraction")],
)
def test_bad_options_are_refused(tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        RewardModelModule(tiny_reward_model(tokenizer), **kwargs)
