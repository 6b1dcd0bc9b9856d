"""ZOPrO's outer loop as a Lightning callback: the whole algorithm inside any ``Trainer.fit``.

:class:`ZOPrOIterations` turns a fit of a :class:`~zopro_lightning.policy.module.ZOPrOModule`
into ZOPrO's iterations (docs/algorithm.md §2). It records one completion a prompt of every
rollout and, at each iteration boundary (every :class:`IterationSchedule` ``updates`` policy
updates):

1. takes ``mu_t``: the iteration's update ``theta_t - theta_{t-1}`` (``direction="update"``, as
   published) or minus the optimizer's running gradient mean (``direction="gradient"``);
2. refines the reward model on judged pairs of the recorded completions (any
   ``refinement(reward, module, records, trainer)``, e.g.
   :class:`~zopro_lightning.reward.refinement.RewardRefinement`: judge, Bradley–Terry, keep-close
   merge);
3. takes ``v_t = phi_{t+1} - phi_t`` and hands ``(mu_t, v_t)`` to the module's sampler;
4. switches to the schedule's optimizer for the next iteration (first-order iteration 0, then
   zeroth-order, by default).

Its state (the iteration, ``theta`` at the iteration's start, the records not yet judged) is
part of the checkpoint, so ``fit(ckpt_path=...)`` goes on exactly. ``zopro-train`` uses the same
callback with one ``fit`` an iteration (``boundaries_inside_fit=False``) and calls
:meth:`ZOPrOIterations.end_iteration` itself between fits, after its held-out evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
from lightning import Callback, LightningModule, Trainer
from torch import Tensor

from zopro_lightning.callbacks.rollout_recorder import RolloutRecorder
from zopro_lightning.models.loading import state_difference, trainable_state
from zopro_lightning.policy.protocol import PolicyLearner, as_policy_learner
from zopro_lightning.zo.spsa import derive_seed

SCHEDULES = ("first_order_then_zeroth_order", "first_order", "zeroth_order")

Refinement = Callable[[Any, Any, list[tuple[str, str]], Any], dict[str, int]]


@dataclass(frozen=True)
class IterationSchedule:
    """How many policy updates each iteration makes and with which optimizer.

    Attributes:
        iterations: ``T``, iterations of policy learning then reward refinement.
        updates: policy updates per iteration.
        schedule: ``first_order_then_zeroth_order`` (as published: first-order RLOO in
            iteration 0, ZOPrO after), ``first_order`` (every iteration, the baseline) or
            ``zeroth_order`` (every iteration; iteration 0 draws isotropic directions).
        first_order_updates: updates of a first-order iteration 0 (``None``: ``updates``).
        first_order_lr: AdamW's learning rate in first-order iterations.
        zeroth_order_lr: the SPSA learning rate in zeroth-order iterations.
        zeroth_order_eps: the SPSA ``eps`` there (``None``: the module's own).
        lr_schedule: ``transformers.get_scheduler`` name of the first-order iterations.
        zeroth_order_lr_schedule: that of the zeroth-order ones (``None``: ``lr_schedule``).
    """

    iterations: int = 4
    updates: int = 50
    schedule: str = "first_order_then_zeroth_order"
    first_order_updates: int | None = None
    first_order_lr: float = 1e-2
    zeroth_order_lr: float = 5e-3
    zeroth_order_eps: float | None = None
    lr_schedule: str = "constant"
    zeroth_order_lr_schedule: str | None = None

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"loop.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        counts = {"iterations": self.iterations, "updates": self.updates}
        counts["first_order_updates"] = self.first_order_updates or 1
        for name, value in counts.items():
            if value < 1:
                raise ValueError(f"IterationSchedule.{name} must be >= 1, got {value}")
        rates = {"first_order_lr": self.first_order_lr, "zeroth_order_lr": self.zeroth_order_lr}
        if self.zeroth_order_eps is not None:
            rates["zeroth_order_eps"] = self.zeroth_order_eps
        for name, value in rates.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"IterationSchedule.{name} must be finite and > 0, got {value}")

    def optimizer(self, t: int) -> str:
        """``"first_order"`` or ``"zeroth_order"``: how iteration ``t`` learns."""
        first = self.schedule == "first_order" or (
            self.schedule == "first_order_then_zeroth_order" and t == 0
        )
        return "first_order" if first else "zeroth_order"

    def updates_of(self, t: int) -> int:
        """Policy updates of iteration ``t``."""
        if t == 0 and self.optimizer(0) == "first_order" and self.first_order_updates:
            return int(self.first_order_updates)
        return int(self.updates)

    def end_of(self, t: int) -> int:
        """Policy updates of the whole run once iteration ``t`` has ended."""
        return sum(self.updates_of(s) for s in range(t + 1))

    @property
    def total_updates(self) -> int:
        return self.end_of(self.iterations - 1)

    def optimizer_settings(self, t: int) -> tuple[str, dict[str, Any]]:
        """``(optimizer, settings)`` of iteration ``t`` for ``ZOPrOModule.set_optimizer``."""
        if self.optimizer(t) == "first_order":
            return "first_order", {"lr": self.first_order_lr, "lr_schedule": self.lr_schedule}
        settings: dict[str, Any] = {
            "lr": self.zeroth_order_lr,
            "lr_schedule": self.zeroth_order_lr_schedule or self.lr_schedule,
        }
        if self.zeroth_order_eps is not None:
            settings["eps"] = self.zeroth_order_eps
        return "zeroth_order", settings


@dataclass
class IterationResult:
    """What one iteration boundary did: the refinement's counts, how many policy tensors the
    sampler matched with reward tensors, and the candidate directions (``update``,
    ``gradient`` when the optimizer keeps a gradient mean, and the reward's ``v``)."""

    iteration: int
    refinement: dict[str, int]
    matched: int
    directions: dict[str, dict[str, Tensor]]


class ZOPrOIterations(Callback):
    """ZOPrO's iterations inside a ``Trainer.fit`` of a ``ZOPrOModule`` (see the module doc).

    Args:
        reward_model: the reward callable the module scores with; its ``.model`` (an
            ``nn.Module``) is refined and its update is ``v``.
        refinement: ``refinement(reward_model, module, records, trainer) -> counts``.
        schedule: updates per iteration and each iteration's optimizer. A fit with
            ``max_steps=schedule.total_updates`` runs the whole loop.
        direction: ``"update"`` or ``"gradient"``: what the sampler gets as ``mu``.
        seed: when set, the refinement of iteration ``t`` runs with the global RNGs seeded from
            ``(seed, "refinement", t)``, as ``zopro-train`` seeds it.
        boundaries_inside_fit: end iterations inside the fit (default); ``False`` leaves it to
            the caller (:meth:`end_iteration` after each fit of one iteration).

    The module is read through :class:`~zopro_lightning.policy.protocol.PolicyLearner` (the
    members in :attr:`needs`; a ``ZOPrOModule`` has them) and handed on to ``refinement``.

    Raises:
        TypeError: at ``setup`` (or any hook or boundary), on a module that lacks a member of
            :attr:`needs`, naming those it lacks.
    """

    #: what it reads and sets of the module (a
    #: :class:`~zopro_lightning.policy.protocol.PolicyLearner`'s members), its recorder's too
    needs: tuple[str, ...] = (
        "policy",
        "policy_updates",
        "sampler",
        "iteration",
        "phase",
        "phase_horizon",
        "set_optimizer",
        "optimizer_direction",
        *RolloutRecorder.needs,
    )

    def __init__(
        self,
        reward_model: Any,
        refinement: Refinement,
        schedule: IterationSchedule,
        direction: str = "update",
        seed: int | None = None,
        boundaries_inside_fit: bool = True,
    ) -> None:
        if direction not in ("update", "gradient"):
            raise ValueError(f"direction must be 'update' or 'gradient', got {direction!r}")
        self.reward_model = reward_model
        self.refinement = refinement
        self.schedule = schedule
        self.direction = direction
        self.seed = seed
        self.boundaries_inside_fit = boundaries_inside_fit
        self.iteration = 0
        self.recorder = RolloutRecorder()
        self._theta_start: dict[str, Tensor] | None = None
        self._applied: tuple[int, int] | None = None  # (iteration, horizon) of the optimizer
        self.last: IterationResult | None = None

    # -- Lightning hooks ----------------------------------------------------------------------
    def _learner(self, module: LightningModule) -> PolicyLearner:
        return as_policy_learner(module, type(self).__name__, self.needs)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.recorder.setup(trainer, pl_module, stage)
        if stage == "fit":
            self.apply_schedule(pl_module)  # before Lightning builds the optimizer

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """The optimizer of the iteration the checkpoint was written in, before Lightning loads
        the checkpoint's optimizer state into it.

        ``fit(ckpt_path=...)`` runs ``setup`` (iteration 0's optimizer settings, as a fresh fit
        does), restores the module and the callbacks, and only then builds the optimizer
        (``strategy.setup``) and loads ``optimizer_states`` into it (``restore_training_state``,
        Lightning 2.x). So the checkpoint's iteration decides here which optimizer is built,
        and over which horizon (the one its LR schedule and sampler decay were sized for): a
        zeroth-order checkpoint gets the zeroth-order optimizer, not iteration 0's AdamW.
        Strategies that restore after building the optimizer (FSDP, DeepSpeed) get it rebuilt.
        """
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is None:  # a checkpoint of a fit without this callback: the fresh schedule
            return
        t, horizon = self._applied_of(state)
        self._apply(pl_module, t, horizon)
        if trainer.strategy.restore_checkpoint_after_setup and trainer.optimizers:
            trainer.strategy.setup_optimizers(trainer)

    def _applied_of(self, state: dict[str, Any]) -> tuple[int, int]:
        """``(t, horizon)`` of the optimizer live when ``state`` was saved; a checkpoint
        written before they were saved: the saved iteration's (the last one's once all
        ended), over its whole length."""
        if "optimizer_iteration" in state:
            return int(state["optimizer_iteration"]), int(state["optimizer_horizon"])
        t = min(int(state["iteration"]), self.schedule.iterations - 1)
        return t, self.schedule.updates_of(t)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        module = self._learner(pl_module)
        if self._theta_start is None:
            self._theta_start = trainable_state(module.policy)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        module = self._learner(pl_module)
        self.recorder.on_train_batch_end(trainer, pl_module, outputs, batch, idx)
        ended = module.policy_updates >= self.schedule.end_of(self.iteration)
        if self.boundaries_inside_fit and ended and self.iteration < self.schedule.iterations:
            self.end_iteration(trainer, pl_module)
            if self.iteration < self.schedule.iterations:
                self.apply_schedule(pl_module)
                trainer.strategy.setup_optimizers(trainer)  # the next iteration's optimizer

    # -- the iteration boundary ---------------------------------------------------------------
    def apply_schedule(self, module: LightningModule) -> None:
        """The current iteration's optimizer and horizon on ``module`` (takes effect when
        Lightning next builds the optimizer); the horizon is the updates left in the
        iteration, ``end_of(t) - policy_updates``."""
        end = self.schedule.end_of(self.iteration)
        horizon = end - self._learner(module).policy_updates
        self._apply(module, self.iteration, horizon)

    def _apply(self, module: LightningModule, t: int, horizon: int) -> None:
        """Iteration ``t``'s optimizer settings, with the LR schedule and the sampler's decay
        over ``horizon`` updates, on ``module``; remembered for the checkpoint."""
        learner = self._learner(module)
        optimizer, settings = self.schedule.optimizer_settings(t)
        learner.set_optimizer(optimizer, **settings)
        learner.iteration, learner.phase = t, "policy_learning"
        learner.phase_horizon = horizon
        self._applied = (t, horizon)

    def end_iteration(self, trainer: Trainer, module: LightningModule) -> IterationResult:
        """``mu``, refinement, ``v``, the sampler's new directions; the next iteration."""
        learner = self._learner(module)
        t = self.iteration
        optimizers = trainer.optimizers
        gradient = learner.optimizer_direction(optimizers[0] if optimizers else None)
        start = self._theta_start or trainable_state(learner.policy)
        update = state_difference(trainable_state(learner.policy), start)
        candidates = {"update": update, "gradient": gradient} if gradient else {"update": update}
        mu = candidates.get(self.direction) or candidates["update"]
        if self.seed is not None:
            L.seed_everything(derive_seed(self.seed, "refinement", t) % 2**32, verbose=False)
        learner.phase = "refinement"
        phi_before = trainable_state(self.reward_model.model)
        counts = self.refinement(self.reward_model, module, self.recorder.pop(), trainer)
        v = state_difference(trainable_state(self.reward_model.model), phi_before)
        matched = learner.sampler.set_directions(mu, v)
        self.last = IterationResult(t, counts, matched, candidates | {"reward": v})
        self.iteration = t + 1
        self._theta_start = trainable_state(learner.policy)
        return self.last

    # -- checkpoint state ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The iteration, ``theta`` at its start, the iteration and horizon the live optimizer
        was built for, and the records not yet judged (every rank's, gathered:
        :class:`RolloutRecorder`); tensors, numbers and strings only."""
        applied = {}
        if self._applied is not None:
            t, horizon = self._applied
            applied = {"optimizer_iteration": t, "optimizer_horizon": horizon}
        return {
            "iteration": self.iteration,
            "theta_start": self._theta_start,
            **applied,
            **self.recorder.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.iteration = int(state_dict["iteration"])
        self._theta_start = state_dict.get("theta_start")
        if "optimizer_iteration" in state_dict:
            self._applied = self._applied_of(state_dict)
        self.recorder.load_state_dict(state_dict)
