"""Live side of the policy-reward interplay analysis (docs/algorithm.md §3).

- :class:`InterplaySnapshots` writes the policy's trainable tensors during policy learning, and
  (through plain methods the pipeline calls) the reward model's after each refinement, in the
  snapshot format of :mod:`zopro_lightning.interplay.snapshots`. ``zopro-viz RUN_DIR`` and
  :func:`zopro_lightning.interplay.load_run` read them back.
- :class:`UpdateCosines` logs, for every policy update under a :class:`ZOPrOSampler`, the cosine
  of the update with the previous iteration's policy update ``mu`` and with the reward-model
  update ``v`` that the sampler builds its directions from.

Both work with any ``ZOPrOModule`` in a plain ``lightning.Trainer``, and read it through
:class:`~zopro_lightning.policy.protocol.PolicyLearner`. They also take other modules, with the
fallbacks of :mod:`zopro_lightning.policy.protocol`: ``InterplaySnapshots`` needs only a
``policy`` network (it counts ``trainer.global_step`` when the module has no
``policy_updates``), ``UpdateCosines`` logs nothing for a module without a ``sampler``. Tensors
are named with :func:`~zopro_lightning.zo.samplers.canonical_name`, so policy and reward tensors
of the same LoRA layout share names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor, nn

from zopro_lightning.interplay.snapshots import SnapshotWriter
from zopro_lightning.policy.protocol import (
    as_policy_learner,
    ends_with_update,
    learner_or_none,
    planned_updates,
    policy_of,
    updates_of,
)
from zopro_lightning.zo.samplers import canonical_name


def canonical_trainable(model: nn.Module) -> dict[str, Tensor]:
    """The trainable tensors of ``model`` (``requires_grad``), keyed by canonical name, detached
    (not copied). An object that is not a module but holds one as ``.model`` (e.g.
    ``HFRewardModel``) is unwrapped."""
    if not isinstance(model, nn.Module) and isinstance(getattr(model, "model", None), nn.Module):
        model = model.model
    tensors = {
        canonical_name(n): p.detach() for n, p in model.named_parameters() if p.requires_grad
    }
    if not tensors:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (requires_grad=True) to "
            "snapshot; add LoRA adapters or unfreeze the parameters to be trained."
        )
    return tensors


def snapshot_updates(total: int, every_fraction: float) -> set[int]:
    """Update counts ``i`` (1-based, within one fit of ``total`` updates) after which to save:
    ``ceil(j * every_fraction * total)`` for ``j = 1, 2, ...``, plus the first and last."""
    total = max(1, int(total))
    count = math.ceil(1.0 / every_fraction - 1e-9)
    marks = {math.ceil(j * every_fraction * total - 1e-9) for j in range(1, count + 1)}
    return {min(total, max(1, m)) for m in marks} | {1, total}


class InterplaySnapshots(Callback):
    """Snapshots of the policy (during policy learning) and of the reward model (on request).

    During each ``fit`` of a ``ZOPrOModule`` the policy's trainable tensors are saved after the
    updates of :func:`snapshot_updates` (every ``every_fraction`` of the fit's planned updates,
    ``trainer.max_steps`` when set, and at least after the first and the last update; a fit
    that stops early is saved at its end). The very first fit also saves the starting point
    (``fraction=0``) unless the run directory already holds a policy snapshot. Records:
    ``model="policy"``, ``step = pl_module.policy_updates`` (global across fits;
    ``trainer.global_step`` for a module without it:
    :func:`~zopro_lightning.policy.protocol.updates_of`),
    ``iteration = self.iteration`` (set it before each fit), ``phase="policy"``, ``fraction`` =
    progress of this fit in ``[0, 1]``.

    :meth:`save_reward` and :meth:`save_policy` save outside a fit (the pipeline calls them at
    iteration ends). Only global rank 0 writes.

    Args:
        run_dir: the run directory; snapshots go to ``run_dir/interplay/``.
        every_fraction: spacing of the in-fit snapshots, in ``(0, 1]``.
        max_numel: above this many elements a snapshot is count-sketched to this size
            (see :class:`~zopro_lightning.interplay.SnapshotWriter`); ``None`` never.

    Raises:
        TypeError: at fit start, on a module without a ``policy`` network.
    """

    #: what it needs of the module (:class:`~zopro_lightning.policy.protocol.PolicyLearner`);
    #: ``policy_updates`` and ``total_policy_updates`` are used when the module has them
    needs: tuple[str, ...] = ("policy",)

    def __init__(
        self,
        run_dir: Path | str,
        every_fraction: float = 0.05,
        max_numel: int | None = 2_000_000,
    ) -> None:
        if not 0.0 < every_fraction <= 1.0:
            raise ValueError(
                f"InterplaySnapshots: every_fraction must lie in (0, 1], got {every_fraction}."
            )
        self.run_dir = Path(run_dir)
        self.every_fraction = float(every_fraction)
        self.max_numel = max_numel
        self.iteration = 0
        self._writer: SnapshotWriter | None = None
        self._start = 0
        self._total = 1
        self._marks: set[int] = set()
        self._saved_at: int | None = None

    @property
    def writer(self) -> SnapshotWriter:
        """The snapshot writer (created on first use, so only the writing rank creates files)."""
        if self._writer is None:
            self._writer = SnapshotWriter(self.run_dir, max_numel=self.max_numel)
        return self._writer

    # -- plain saving -------------------------------------------------------------------------
    def save_policy(
        self,
        model: nn.Module,
        *,
        step: int,
        iteration: int,
        phase: str = "policy",
        fraction: float = 1.0,
    ) -> Path | None:
        """Save ``model``'s trainable tensors as a policy snapshot; ``None`` off rank 0."""
        return self._save("policy", model, step, iteration, phase, fraction)

    def save_reward(
        self, model: nn.Module, *, step: int, iteration: int, fraction: float = 1.0
    ) -> Path | None:
        """Save ``model``'s trainable tensors as a reward snapshot (phase ``"reward"``);
        ``None`` off rank 0. ``step`` is the policy-update count at the time of saving."""
        return self._save("reward", model, step, iteration, "reward", fraction)

    def _save(
        self, kind: str, model: nn.Module, step: int, iteration: int, phase: str, fraction: float
    ) -> Path | None:
        if rank_zero_only.rank != 0:
            return None
        return self.writer.save(
            kind,
            canonical_trainable(model),
            step=step,
            iteration=iteration,
            phase=phase,
            fraction=fraction,
        )

    # -- during policy learning -------------------------------------------------------------
    def _policy_of(self, pl_module: LightningModule) -> nn.Module:
        policy = as_policy_learner(pl_module, type(self).__name__, self.needs).policy
        if not isinstance(policy, nn.Module):
            raise TypeError(
                f"{type(self).__name__} needs a module with a `policy` network (a ZOPrOModule); "
                f"{type(pl_module).__name__}.policy is a {type(policy).__name__}."
            )
        return policy

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._policy_of(pl_module)  # on every rank: a module without a policy fails here
        self._start = updates_of(pl_module, trainer)
        self._total = planned_updates(pl_module, trainer)
        self._marks = snapshot_updates(self._total, self.every_fraction)
        self._saved_at = None
        if not trainer.is_global_zero:
            return
        if not any(r["model"] == "policy" for r in self.writer.records):
            self._save_during_fit(pl_module, self._start)

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not trainer.is_global_zero:
            return
        step = updates_of(pl_module, trainer)
        if step != self._saved_at and step - self._start in self._marks:
            self._save_during_fit(pl_module, step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        step = updates_of(pl_module, trainer)
        if step != self._saved_at and step > self._start:
            self._save_during_fit(pl_module, step)

    def _save_during_fit(self, pl_module: LightningModule, step: int) -> None:
        fraction = min(1.0, (step - self._start) / self._total)
        self.writer.save(
            "policy",
            canonical_trainable(self._policy_of(pl_module)),
            step=step,
            iteration=self.iteration,
            phase="policy",
            fraction=fraction,
        )
        self._saved_at = step


def _direction(state: Mapping[str, Any], key: str) -> dict[str, Tensor]:
    value = state.get(key) or {}
    return {n: t for n, t in value.items() if t.numel() > 0}


class UpdateCosines(Callback):
    """Logs the cosine of each policy update with ``mu`` and with ``v`` (ZOPrO diagnostics).

    For a ``ZOPrOModule`` whose sampler has directions set (``ZOPrOSampler``):
    on a batch that ends with a policy update, the tensors that have a ``mu`` (or a ``v``) are
    copied at batch start; at batch end the update ``delta = theta_after - theta_before`` gives

    ``interplay/cos_update_mu = <delta, mu> / (||delta|| ||mu||)`` and
    ``interplay/cos_update_v = <delta, v> / (||delta|| ||v||)``,

    each concatenated over the tensors (matched by canonical name) that have the direction.
    Both are read from ``sampler.state_dict()`` (``"mu"``, ``"v_hat"``). The sampler keeps
    only the per-tensor unit vectors ``v_hat_n = v_n / ||v_n||``, so ``v`` here is their
    concatenation: every tensor weighs the same, which is also the geometry the sampler
    projects in (§2.4 is per tensor). With a zeroth-order step ``delta = -lr g z`` (no weight
    decay) and ``z = d mu + (a part orthogonal to every v_n)``, ``|cos(delta, mu)|`` is about
    ``d_t`` and ``cos(delta, v) = sign(-g) d_t <mu, v> / (||z|| ||v||)``, about
    ``±d_t cos(mu, v)``. Nothing is logged when the sampler has no directions, for a skipped
    (non-finite) step, or for other samplers.

    It reads ``sampler`` and ``policy_updates`` of the module
    (:class:`~zopro_lightning.policy.protocol.PolicyLearner`) and logs nothing for a module
    without them (:func:`~zopro_lightning.policy.protocol.learner_or_none`); ``will_update`` and
    ``policy`` when the module has them, else every batch counts as an update and the module
    itself as the network (:func:`~zopro_lightning.policy.protocol.ends_with_update`,
    :func:`~zopro_lightning.policy.protocol.policy_of`).
    """

    #: what it reads of the module (:class:`~zopro_lightning.policy.protocol.PolicyLearner`);
    #: ``will_update`` and ``policy`` are used when the module has them
    needs: tuple[str, ...] = ("sampler", "policy_updates")

    def __init__(self) -> None:
        self._before: dict[str, Tensor] = {}
        self._directions: dict[str, dict[str, Tensor]] = {}
        self._updates = 0

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._before, self._directions = {}, {}
        module = learner_or_none(pl_module, self.needs)
        if module is None or module.sampler is None or not ends_with_update(module):
            return
        # the sampler's state says whether it has directions ("mu", "v_hat"): an isotropic
        # sampler has none, so nothing is logged for it
        state = module.sampler.state_dict()
        directions = {"mu": _direction(state, "mu"), "v": _direction(state, "v_hat")}
        if not directions["mu"] and not directions["v"]:
            return
        wanted = directions["mu"].keys() | directions["v"].keys()
        self._before = {
            name: p.detach().clone()
            for name, p in self._trainable(pl_module).items()
            if name in wanted
        }
        self._directions = directions
        self._updates = int(module.policy_updates)

    @staticmethod
    def _trainable(pl_module: LightningModule) -> dict[str, Tensor]:
        policy = policy_of(pl_module)
        return {canonical_name(n): p for n, p in policy.named_parameters() if p.requires_grad}

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        before, directions = self._before, self._directions
        self._before, self._directions = {}, {}
        if not before:  # no update due, no directions, or not a module with a sampler
            return
        module = as_policy_learner(pl_module, type(self).__name__, self.needs)
        if int(module.policy_updates) == self._updates:
            return
        current = self._trainable(pl_module)
        delta = {n: (current[n].detach() - t).float().flatten() for n, t in before.items()}
        for label, key in (("mu", "mu"), ("v", "v")):
            cosine = _cosine(delta, directions[key])
            if cosine is not None:
                pl_module.log(
                    f"interplay/cos_update_{label}",
                    cosine,
                    on_step=True,
                    on_epoch=False,
                    batch_size=1,
                )


def _cosine(delta: Mapping[str, Tensor], direction: Mapping[str, Tensor]) -> float | None:
    """Cosine of the concatenations of ``delta`` and ``direction`` over their shared names, in
    float64; ``None`` when there are none or either part is zero (or not finite)."""
    names = [n for n in direction if n in delta and direction[n].numel() == delta[n].numel()]
    if not names:
        return None
    device = delta[names[0]].device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # <a, b>, |a|^2, |b|^2
    for name in names:
        a = delta[name].double()
        b = direction[name].to(device=device, dtype=torch.float64).flatten()
        sums += torch.stack((torch.dot(a, b), torch.dot(a, a), torch.dot(b, b)))
    dot, norm_delta, norm_dir = sums.tolist()  # one transfer, not one per tensor
    denominator = math.sqrt(norm_delta * norm_dir)
    if not math.isfinite(dot) or not math.isfinite(denominator) or denominator == 0.0:
        return None
    return max(-1.0, min(1.0, dot / denominator))
