"""Where a run is, logged with every row of metrics: one step counter across all its Trainers.

A ``zopro-train`` run fits one Lightning ``Trainer`` a phase (SFT, the reward model r_0, then
policy learning and refinement in every iteration), and each ``Trainer`` counts its
``global_step`` from 0. :class:`RunProgress` keeps the updates of the fits before the current
one and logs, with the metrics of every update (and of every validation run):

- ``step``: optimizer updates of the whole run so far, this one included (Lightning takes a
  logged ``step`` as the row's step: the ``step`` column of ``metrics.csv``, W&B's
  ``trainer/global_step``, the x-axis of its charts), so curves of later phases follow those
  of earlier ones instead of drawing over them;
- ``iteration``: the ZOPrO iteration ``t`` (0 for SFT and r_0, which come before the first);
- ``phase``: the index of the phase in :data:`PHASES` (Lightning logs numbers only).
"""

from __future__ import annotations

from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf

#: the phases of a run, in the order they come; ``phase`` is logged as an index into this
PHASES = ("sft", "reward_model", "policy_learning", "refinement")


class RunProgress(Callback):
    """The run-wide ``step``, ``iteration`` and ``phase`` beside every logged row.

    The owner of the run calls :meth:`enter` before each phase's ``fit`` and passes the same
    instance to every ``Trainer``. :attr:`completed` (updates of the finished fits) is part of
    the callback's checkpoint state; a run resumed from its own state files sets it back.
    """

    def __init__(self) -> None:
        self.completed = 0
        self.iteration = 0
        self.phase = PHASES[0]
        self._last_logged: int | None = None

    def enter(self, phase: str, iteration: int = 0) -> None:
        """The next fits belong to ``phase`` of ``iteration``."""
        if phase not in PHASES:
            raise ValueError(f"RunProgress: phase must be one of {PHASES}, got {phase!r}")
        self.phase, self.iteration = phase, int(iteration)

    def describe(self, iterations: int | None = None) -> str:
        """Where the run is, for a progress bar: ``[sft]``, ``[reward model r_0]``,
        ``[iteration 2/4] policy learning`` (``iterations``: the run's ``T``)."""
        if self.phase == "sft":
            return "[sft]"
        if self.phase == "reward_model":
            return "[reward model r_0]"
        of = f"/{iterations}" if iterations else ""
        return f"[iteration {self.iteration + 1}{of}] {self.phase.replace('_', ' ')}"

    def step(self, trainer: Trainer) -> int:
        """Updates of the whole run so far: the finished fits' and this fit's."""
        return self.completed + int(trainer.global_step)

    def position(self, trainer: Trainer) -> dict[str, float]:
        return {
            "step": float(self.step(trainer)),
            "iteration": float(self.iteration),
            "phase": float(PHASES.index(self.phase)),
        }

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_logged = self.step(trainer)  # (a resumed fit starts past its first updates)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # once per update: a batch that only accumulates (ZOPrOModule's accumulate_batches)
        # adds nothing (Lightning still writes the previous update's cached values again)
        step = self.step(trainer)
        if step == self._last_logged:
            return
        self._last_logged = step
        pl_module.log_dict(self.position(trainer), on_step=True, on_epoch=False, batch_size=1)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        pl_module.log_dict(self.position(trainer), on_step=False, on_epoch=True, batch_size=1)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.completed += int(trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"completed": self.completed, "iteration": self.iteration, "phase": self.phase}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.completed = int(state_dict["completed"])
        self.enter(str(state_dict["phase"]), int(state_dict["iteration"]))


class PhaseProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, described by where the run is instead of by the epoch (a policy
    phase runs to ``max_steps`` with ``max_epochs=-1``): ``[iteration 2/4] policy learning``,
    with ``epoch 3/6`` after it for a phase of several epochs.

    The bar is drawn with that description from its first frame: Lightning's own bar first
    draws ``Training`` (when it is built) and ``Epoch N`` (at each epoch start), which flashed
    before every phase's bar."""

    def __init__(self, progress: RunProgress, iterations: int | None = None) -> None:
        super().__init__()
        self.progress = progress
        self.iterations = iterations

    @property
    def train_description(self) -> str:
        description = self.progress.describe(self.iterations)
        trainer = self._trainer
        if trainer is not None and trainer.max_epochs is not None and trainer.max_epochs > 1:
            description += f" epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"
        return description

    def on_train_epoch_start(self, trainer: Trainer, *args: Any) -> None:
        """Lightning's epoch start (a fresh or reset bar over the epoch's batches) with the
        phase's description set before the bar is redrawn, never ``Epoch N``."""
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        bar = self.train_progress_bar
        bar.set_description(self.train_description, refresh=False)
        bar.reset(total=convert_inf(self.total_train_batches))
        bar.initial = 0
