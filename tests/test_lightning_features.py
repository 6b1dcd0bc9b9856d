"""What a Lightning user tries next with ``ZOPrOModule`` (and ``ZOPrOIterations``): bf16
precision with LoRA, ``LearningRateMonitor``, ``ModelCheckpoint`` and ``EarlyStopping`` on
``val/reward``, a ``LightningDataModule`` of prompts, ``trainer.validate`` and
``trainer.predict`` after a fit. Tiny models on CPU; DDP is in ``tests/test_ddp_callback.py``."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from zopro_lightning import ZOPrOModule
from zopro_lightning.policy.optimization import OptimizerSettings
from zopro_lightning.rl.rollout import RolloutSettings
from zopro_lightning.zo.samplers import ZOPrOSampler

from .conftest import count_words_reward
from .test_module import trainable


def module_of(policy, tokenizer, optimizer="zeroth_order", **settings) -> ZOPrOModule:
    return ZOPrOModule(
        policy,
        tokenizer,
        count_words_reward,
        ZOPrOSampler(),
        optimizer=OptimizerSettings(optimizer, lr=1e-2, **settings),
        rollout=RolloutSettings(k=2, max_new_tokens=4),
    )


def trainer_of(root, **options) -> L.Trainer:
    defaults = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": root,
    }
    return L.Trainer(**(defaults | options))


@pytest.mark.parametrize("optimizer", ["zeroth_order", "first_order"])
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_precision_with_lora_trains(
    lora_policy, tokenizer, small_task, tmp_path, precision, optimizer
):
    module = module_of(lora_policy, tokenizer, optimizer)
    before = trainable(lora_policy)
    trainer = trainer_of(tmp_path, max_steps=2, precision=precision)
    trainer.fit(module, DataLoader(small_task.train_prompts[:4], batch_size=2))
    assert module.policy_updates == 2
    after = trainable(lora_policy)
    assert all(torch.isfinite(t).all() for t in after.values())
    assert any(not torch.equal(before[n], after[n].to(before[n].dtype)) for n in before)


def test_learning_rate_monitor_logs_the_schedule(lora_policy, tokenizer, small_task, tmp_path):
    module = module_of(lora_policy, tokenizer, lr_schedule="linear")
    trainer = trainer_of(
        tmp_path,
        max_steps=3,
        logger=CSVLogger(tmp_path, name="", version=""),
        log_every_n_steps=1,
        callbacks=[LearningRateMonitor(logging_interval="step")],
    )
    trainer.fit(module, DataLoader(small_task.train_prompts[:6], batch_size=2))
    with open(tmp_path / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row.get("lr-ZerothOrderOptimizer")]
    rates = [float(row["lr-ZerothOrderOptimizer"]) for row in rows]
    assert rates == pytest.approx([1e-2, 1e-2 * 2 / 3, 1e-2 / 3])  # linear over the 3 updates


def test_checkpoint_and_early_stopping_on_val_reward(lora_policy, tokenizer, small_task, tmp_path):
    module = module_of(lora_policy, tokenizer)
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/reward", mode="max")
    stop = EarlyStopping(monitor="val/reward", mode="max", patience=1, min_delta=1e9)
    trainer = trainer_of(
        tmp_path,
        max_steps=8,
        val_check_interval=2,
        enable_checkpointing=True,
        callbacks=[best, stop],
    )
    held_out = DataLoader(small_task.eval_prompts[:2], batch_size=2)
    trainer.fit(module, DataLoader(small_task.train_prompts[:16], batch_size=2), held_out)
    # no validation improves by min_delta: stopped after the second validation (patience 1)
    assert trainer.should_stop and stop.stopped_epoch == 0 and module.policy_updates == 4
    assert best.best_model_path and torch.isfinite(best.best_model_score)
    restored = torch.load(best.best_model_path, weights_only=False)
    assert restored["zopro"]["policy_updates"] == 2  # the best one: the first validation


class PromptData(L.LightningDataModule):
    """A user's data module: prompts for training, validation and prediction."""

    def __init__(self, train: list[str], held_out: list[str]) -> None:
        super().__init__()
        self.train, self.held_out = train, held_out

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=2, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.held_out, batch_size=2)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.held_out, batch_size=2)


def test_a_datamodule_then_validate_and_predict_the_trained_module(
    lora_policy, tokenizer, small_task, tmp_path
):
    data = PromptData(small_task.train_prompts[:8], small_task.eval_prompts[:4])
    module = module_of(lora_policy, tokenizer)
    before = trainable(lora_policy)
    trainer = trainer_of(tmp_path, max_epochs=1, limit_val_batches=1)
    trainer.fit(module, datamodule=data)
    assert module.policy_updates == 4
    assert any(not torch.equal(before[n], p) for n, p in trainable(lora_policy).items())
    validated = trainer.validate(module, datamodule=data, verbose=False)
    assert set(validated[0]) == {"val/reward", "val/kl"}
    assert validated == trainer.validate(module, datamodule=data, verbose=False)  # seeded
    completions = [c for batch in trainer.predict(module, datamodule=data) for c in batch]
    assert len(completions) == 4 and all(isinstance(c, str) for c in completions)


def test_learning_rate_monitor_follows_the_callbacks_optimizer_switch(
    tokenizer, small_task, tmp_path
):
    """With ``ZOPrOIterations`` the optimizer changes at each boundary (AdamW, then the
    zeroth-order one): the monitor logs the one each update used."""
    from .test_zopro_callback_resume import SCHEDULE, fresh_fit

    monitor = LearningRateMonitor(logging_interval="step")
    logger = CSVLogger(tmp_path, name="", version="")
    trainer, fit = fresh_fit(
        tokenizer, small_task.train_prompts[:16], tmp_path, [monitor], logger=logger,
        log_every_n_steps=1,
    )  # fmt: skip
    fit()
    with open(tmp_path / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    first = [r["step"] for r in rows if r.get("lr-AdamW/pg1")]
    zeroth = [r["step"] for r in rows if r.get("lr-ZerothOrderOptimizer")]
    updates_0 = SCHEDULE.updates_of(0)
    assert first == [str(s) for s in range(updates_0)]
    assert zeroth == [str(s) for s in range(updates_0, trainer.global_step)]
