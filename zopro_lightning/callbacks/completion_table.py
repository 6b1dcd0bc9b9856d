"""A W&B table of sample completions and their rewards, every ``N`` policy updates."""

from __future__ import annotations

import math
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger

from zopro_lightning.callbacks.run_progress import RunProgress
from zopro_lightning.policy.protocol import learner_or_none
from zopro_lightning.rl.rollout import Rollout

COLUMNS = ["step", "prompt", "completion", "reward"]


def completion_rows(rollout: Rollout, step: int, max_rows: int | None) -> list[list[Any]]:
    """``[step, prompt, completion, reward]`` for the first ``max_rows`` rows of ``rollout``
    (all rows when ``None``); a non-finite reward becomes ``None`` (an empty W&B cell)."""
    rows = []
    for prompt, completion, reward in zip(
        rollout.prompts, rollout.completions, rollout.rewards.tolist(), strict=True
    ):
        if max_rows is not None and len(rows) >= max_rows:
            break
        rows.append([step, prompt, completion, reward if math.isfinite(reward) else None])
    return rows


class CompletionTable(Callback):
    """Every ``every_n_updates`` policy updates, logs the module's ``last_rollout`` (a
    :class:`~zopro_lightning.rl.rollout.Rollout`) as a W&B table ``key`` with the columns
    ``step`` (policy updates so far), ``prompt``, ``completion`` and ``reward``, through each
    :class:`~lightning.pytorch.loggers.WandbLogger` of the trainer (``log_table``; rank zero
    only). With no W&B logger, or on a module without ``last_rollout`` and ``policy_updates``
    (:class:`~zopro_lightning.policy.protocol.PolicyLearner`: SFT, the reward model), it does
    nothing (:func:`~zopro_lightning.policy.protocol.learner_or_none`).

    Args:
        every_n_updates: log after policy updates ``N, 2N, ...`` (counted over the whole run,
            across the Trainers of the iterations, by the module's ``policy_updates``).
        max_rows: completions per table (the first rows of the rollout, prompt-major, so
            ``max_rows / k`` prompts with all their samples); ``None``: the whole rollout.
        key: the W&B key of the table.
    """

    #: what it reads of the module (:class:`~zopro_lightning.policy.protocol.PolicyLearner`)
    needs: tuple[str, ...] = ("last_rollout", "policy_updates")

    def __init__(
        self, every_n_updates: int = 50, max_rows: int | None = 16, key: str = "completions"
    ) -> None:
        if every_n_updates < 1:
            raise ValueError(
                f"CompletionTable: every_n_updates must be >= 1, got {every_n_updates}."
            )
        if max_rows is not None and max_rows < 1:
            raise ValueError(
                f"CompletionTable: max_rows must be >= 1 or None (all rows), got {max_rows}."
            )
        self.every_n_updates = every_n_updates
        self.max_rows = max_rows
        self.key = key
        self._last_logged: int | None = None

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        module = learner_or_none(pl_module, self.needs)  # None: SFT, the reward model
        if module is None or module.last_rollout is None:
            return
        rollout, updates = module.last_rollout, module.policy_updates
        # with accumulate_batches > 1 several batches share an update count: log once
        if updates == 0 or updates % self.every_n_updates or updates == self._last_logged:
            return
        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not loggers:
            return
        self._last_logged = updates
        rows = completion_rows(rollout, updates, self.max_rows)
        step = metrics_step(trainer)
        for logger in loggers:
            logger.log_table(self.key, columns=COLUMNS, data=rows, step=step)


def metrics_step(trainer: Trainer) -> int:
    """The step Lightning logs this batch's ``self.log`` metrics at (after the batch-end
    hooks), so the table sits beside the same update's ``policy/*`` metrics in W&B: the
    run-wide step of a :class:`~zopro_lightning.callbacks.run_progress.RunProgress` callback
    when the trainer has one; otherwise Lightning's own,
    ``fit_loop.epoch_loop._batches_that_stepped`` (``global_step`` if that goes)."""
    for callback in trainer.callbacks:
        if isinstance(callback, RunProgress):
            return callback.step(trainer)
    return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))
