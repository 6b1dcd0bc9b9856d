"""Keeps one completion per prompt from each rollout, for reward refinement (DESIGN.md §2.5)."""

from __future__ import annotations

from typing import Any

from lightning import Callback, LightningModule, Trainer


class RolloutRecorder(Callback):
    """After each training batch, stores ``(prompt, first completion)`` of every prompt in the
    module's ``last_rollout``. ``pop()`` hands them over and starts afresh. The records are part
    of the callback's checkpoint state."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str]] = []

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        rollout = getattr(pl_module, "last_rollout", None)
        if rollout is None:
            return
        k = pl_module.hparams.k
        for row in range(0, len(rollout), k):
            self.records.append((rollout.prompts[row], rollout.completions[row]))

    def pop(self) -> list[tuple[str, str]]:
        records, self.records = self.records, []
        return records

    def state_dict(self) -> dict[str, Any]:
        """The records not yet handed over (Lightning stores it under ``checkpoint["callbacks"]``,
        so recorded completions survive a resume). Plain lists of strings: loads with
        ``weights_only=True``."""
        return {"records": [[prompt, completion] for prompt, completion in self.records]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = [
            (str(prompt), str(completion)) for prompt, completion in state_dict["records"]
        ]
