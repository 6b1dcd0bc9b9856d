"""Keeps one completion per prompt from each rollout, for reward refinement
(docs/algorithm.md §2.5)."""

from __future__ import annotations

import logging
from typing import Any

from lightning import Callback, LightningModule, Trainer

from zopro_lightning.policy.protocol import as_policy_learner
from zopro_lightning.utils.distributed import gather_per_rank

log = logging.getLogger(__name__)


class RolloutRecorder(Callback):
    """After each training batch, stores ``(prompt, first completion)`` of every prompt in the
    module's ``last_rollout``. ``pop()`` hands them over and starts afresh. The records are part
    of the callback's checkpoint state.

    Under DDP each rank records the completions of its own shard of the prompts, and refinement
    judges each rank's own. Lightning writes rank 0's checkpoint only, so the checkpoint holds
    every rank's records (gathered when it is written, ``records_by_rank``) and each rank takes
    back its own when it resumes.

    The module must have ``last_rollout`` and ``hparams.k``
    (:class:`~zopro_lightning.policy.protocol.PolicyLearner`; a ``ZOPrOModule`` has them); any
    other raises a ``TypeError`` at the first training batch."""

    #: what it reads of the module (:class:`~zopro_lightning.policy.protocol.PolicyLearner`)
    needs: tuple[str, ...] = ("last_rollout", "hparams.k")

    def __init__(self) -> None:
        self.records: list[tuple[str, str]] = []
        self.trainer: Trainer | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.trainer = trainer  # the phase's, for its ranks in state_dict / load_state_dict

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        module = as_policy_learner(pl_module, type(self).__name__, self.needs)
        rollout = module.last_rollout
        if rollout is None:
            return
        k = module.hparams.k
        for row in range(0, len(rollout), k):
            self.records.append((rollout.prompts[row], rollout.completions[row]))

    def pop(self) -> list[tuple[str, str]]:
        records, self.records = self.records, []
        return records

    def state_dict(self) -> dict[str, Any]:
        """The records not yet handed over (Lightning stores it under ``checkpoint["callbacks"]``,
        so recorded completions survive a resume): ``records_by_rank``, every rank's, gathered
        (Lightning builds the checkpoint on every rank, then rank 0 writes it); ``records``, this
        rank's. Plain lists of strings: loads with ``weights_only=True``."""
        mine = [[prompt, completion] for prompt, completion in self.records]
        return {"records": mine, "records_by_rank": gather_per_rank(mine, self.trainer)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """This rank's records: its own entry of ``records_by_rank`` (``records`` in a checkpoint
        from before it). Resumed on another number of ranks, the records of all are dealt out
        round-robin (the distributed sampler shards the prompts otherwise too, so such a resume
        cannot repeat the run exactly)."""
        by_rank = state_dict.get("records_by_rank")
        rank = self.trainer.global_rank if self.trainer is not None else 0
        world = self.trainer.world_size if self.trainer is not None else 1
        if by_rank is None:
            records = state_dict["records"]
        elif len(by_rank) == world:
            records = by_rank[rank]
        else:
            log.warning(
                "resume: the checkpoint's rollout records come from %d processes, this run has "
                "%d; they are shared out anew, so the run will not repeat the original exactly",
                len(by_rank), world,
            )  # fmt: skip
            records = [record for rank_records in by_rank for record in rank_records][rank::world]
        self.records = [(str(prompt), str(completion)) for prompt, completion in records]
