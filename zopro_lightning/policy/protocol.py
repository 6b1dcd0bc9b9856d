"""What the callbacks read of the ``LightningModule`` they are attached to: :class:`PolicyLearner`.

The callbacks of :mod:`zopro_lightning.callbacks` (``RolloutRecorder``, ``ZOPrOIterations``,
``CompletionTable``, ``InterplaySnapshots``, ``UpdateCosines``) and
:class:`~zopro_lightning.utils.distributed.ZerothOrderDDPStrategy` work with the module through
this contract and nothing else. :class:`~zopro_lightning.policy.module.ZOPrOModule` satisfies it;
a module of one's own that has the same members works with the same callbacks.

Each callback asks for the members it uses, once per hook, with :func:`as_policy_learner`, which
names the callback and the missing members in its ``TypeError``; then it reads them as plain
attributes. Each callback lists its members in its ``needs`` class attribute.

Some callbacks deliberately work with other modules too. Their fallbacks live here, each in one
documented function, instead of in ``getattr`` probes inside the callbacks:

- :func:`learner_or_none`: callbacks that do nothing on other modules (``CompletionTable``
  outside policy learning: SFT, the reward model; ``UpdateCosines`` without a sampler);
- :func:`updates_of` and :func:`planned_updates`: the update counter and a fit's planned updates,
  ``trainer.global_step`` and ``max_steps`` for other modules (``InterplaySnapshots``);
- :func:`policy_of` and :func:`ends_with_update`: the module itself as the network, and "every
  batch updates", for other modules (``UpdateCosines``);
- :func:`optimizer_name`: ``None`` for modules without ``hparams["optimizer"]``
  (``ZerothOrderDDPStrategy`` wraps those in DDP as usual).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

if TYPE_CHECKING:
    import torch
    from lightning.fabric.utilities.data import AttributeDict
    from torch import Tensor, nn

    from zopro_lightning.policy.optimization import OptimizerName
    from zopro_lightning.rl.rollout import Rollout
    from zopro_lightning.zo.samplers import PerturbationSampler

__all__ = [
    "MEMBERS",
    "PolicyLearner",
    "as_policy_learner",
    "ends_with_update",
    "learner_or_none",
    "missing_members",
    "optimizer_name",
    "planned_updates",
    "policy_of",
    "updates_of",
]

#: every member of :class:`PolicyLearner`; ``hparams.<key>`` is a key of ``hparams``
MEMBERS: tuple[str, ...] = (
    "policy",
    "sampler",
    "last_rollout",
    "policy_updates",
    "iteration",
    "phase",
    "phase_horizon",
    "will_update",
    "hparams.k",
    "hparams.optimizer",
    "total_policy_updates",
    "optimizer_direction",
    "set_optimizer",
)


class _MembersMeta(type(Protocol)):  # type: ignore[misc]
    """``isinstance(x, PolicyLearner)`` is ``not missing_members(x)``: ``hasattr`` on each
    member. From Python 3.12 a runtime-checkable protocol looks members up with
    ``inspect.getattr_static``, which does not see the submodules an ``nn.Module`` keeps in
    ``_modules`` (``policy``), so a ``ZOPrOModule`` would not pass the stock check."""

    def __instancecheck__(cls, instance: object) -> bool:
        return not missing_members(instance)


@runtime_checkable
class PolicyLearner(Protocol, metaclass=_MembersMeta):
    """What the callbacks read (and set) of the ``LightningModule`` they are attached to.

    Besides the ``LightningModule``'s own API (``log``, ``trainer``, ...). A
    :class:`~zopro_lightning.policy.module.ZOPrOModule` has every member. ``isinstance(module,
    PolicyLearner)`` checks that each member is there (:data:`MEMBERS`, with the two ``hparams``
    keys), not its type.

    Who reads what: ``RolloutRecorder``: ``last_rollout``, ``hparams.k``. ``CompletionTable``:
    ``last_rollout``, ``policy_updates``. ``InterplaySnapshots``: ``policy`` (and, when the
    module has them, ``policy_updates`` and ``total_policy_updates``). ``UpdateCosines``:
    ``sampler``, ``policy_updates`` (and, when there, ``will_update`` and ``policy``).
    ``ZOPrOIterations``: ``policy``, ``policy_updates``, ``sampler``, ``optimizer_direction``,
    ``set_optimizer``; it sets ``iteration``, ``phase`` and ``phase_horizon``, and its
    ``RolloutRecorder`` reads ``last_rollout`` and ``hparams.k``; it hands the module on to its
    ``refinement``, whose needs are its own (``RewardRefinement``: ``policy``, ``tokenizer``,
    ``rollout_config``).
    ``ZerothOrderDDPStrategy``: ``hparams.optimizer``.
    """

    #: The trained causal LM (a Hugging Face model, optionally PEFT-wrapped); its parameters
    #: with ``requires_grad=True`` are the ones trained.
    policy: nn.Module
    #: The perturbation sampler of the zeroth-order steps
    #: (:class:`~zopro_lightning.zo.samplers.PerturbationSampler`); ``ZOPrOIterations`` hands it
    #: each iteration's directions, ``UpdateCosines`` reads them from its ``state_dict()``.
    sampler: PerturbationSampler
    #: The rollout of the latest training batch (prompts, ``k`` completions a prompt, rewards,
    #: ...); ``None`` before the first one.
    last_rollout: Rollout | None
    #: Policy updates made so far: the run's update counter, across fits (checkpointed).
    policy_updates: int
    #: The ZOPrO iteration ``t`` the module is in; ``ZOPrOIterations`` sets it (checkpointed).
    iteration: int
    #: Where the run is: ``"policy_learning"`` or ``"refinement"``; ``ZOPrOIterations`` sets it
    #: (checkpointed).
    phase: str
    #: Policy updates of the coming phase, which :meth:`total_policy_updates` returns when set
    #: (the sampler's decay and the LR schedule run over it); ``ZOPrOIterations`` sets it to the
    #: updates left in the current iteration. ``None``: not set.
    phase_horizon: int | None

    @property
    def will_update(self) -> bool:
        """Whether the next training batch completes a policy update (with
        ``accumulate_batches > 1`` the others only collect rollouts)."""
        ...

    @property
    def hparams(self) -> AttributeDict:
        """The flat settings (``save_hyperparameters``); the callbacks read ``hparams.k``
        (completions per prompt of a rollout) and ``hparams.optimizer`` (``"zeroth_order"`` or
        ``"first_order"``)."""
        ...

    def total_policy_updates(self) -> int:
        """Policy updates of the coming phase: ``phase_horizon`` when set, else those the
        current ``fit`` will make (``max_steps`` when set)."""
        ...

    def optimizer_direction(self, optimizer: torch.optim.Optimizer | None) -> dict[str, Tensor]:
        """Minus the running mean of gradient estimates ``optimizer`` keeps, by trainable tensor
        name; empty when it keeps none or ``optimizer`` is ``None``."""
        ...

    def set_optimizer(
        self, optimizer: OptimizerName, lr: float | None = None, **settings: Any
    ) -> None:
        """Switch to ``optimizer`` (``"zeroth_order"`` or ``"first_order"``) at ``lr`` when
        given, with other optimizer or SPSA ``settings`` by name; built at the next ``fit`` (or
        ``trainer.strategy.setup_optimizers``)."""
        ...


def _has(obj: object, member: str) -> bool:
    """Whether ``obj`` has ``member``; ``"hparams.k"``: ``obj.hparams`` has the key (or
    attribute) ``k``."""
    head, _, key = member.partition(".")
    if not hasattr(obj, head):
        return False
    if not key:
        return True
    holder = getattr(obj, head)
    return key in holder if isinstance(holder, Mapping) else hasattr(holder, key)


def missing_members(obj: object, needs: Sequence[str] = MEMBERS) -> list[str]:
    """The members of ``needs`` (names of :data:`MEMBERS`) that ``obj`` lacks, in order."""
    return [member for member in needs if not _has(obj, member)]


def as_policy_learner(pl_module: object, who: str, needs: Sequence[str] = MEMBERS) -> PolicyLearner:
    """``pl_module`` as a :class:`PolicyLearner`, once it has the members ``who`` uses.

    Args:
        pl_module: the module the callback is attached to.
        who: the callback (or other user) asking, for the message.
        needs: the members it uses (default: all of :data:`MEMBERS`).

    Raises:
        TypeError: naming ``who``, what it needs and what ``pl_module`` lacks.
    """
    missing = missing_members(pl_module, needs)
    if missing:
        raise TypeError(
            f"{who} needs a LightningModule with {', '.join(needs)} (a ZOPrOModule has them; "
            "see zopro_lightning.policy.protocol.PolicyLearner); "
            f"{type(pl_module).__name__} lacks: {', '.join(missing)}"
        )
    return cast("PolicyLearner", pl_module)


def learner_or_none(pl_module: object, needs: Sequence[str] = MEMBERS) -> PolicyLearner | None:
    """``pl_module`` as a :class:`PolicyLearner` when it has ``needs``, else ``None``: for
    callbacks documented to do nothing on other modules (``CompletionTable`` on SFT or the
    reward model, ``UpdateCosines`` on a module without a sampler)."""
    return None if missing_members(pl_module, needs) else cast("PolicyLearner", pl_module)


def updates_of(pl_module: object, trainer: Any) -> int:
    """Policy updates so far: ``policy_updates`` of a module that has it (run-wide, across
    fits); otherwise ``trainer.global_step`` (this fit's optimizer steps, each an update)."""
    if _has(pl_module, "policy_updates"):
        return int(cast("PolicyLearner", pl_module).policy_updates)
    return int(trainer.global_step)


def planned_updates(pl_module: object, trainer: Any) -> int:
    """Policy updates the current fit will make, at least 1: ``total_policy_updates()`` of a
    module that has it; otherwise ``trainer.max_steps`` when set, else
    ``trainer.estimated_stepping_batches``."""
    if callable(getattr(pl_module, "total_policy_updates", None)):
        return max(1, int(cast("PolicyLearner", pl_module).total_policy_updates()))
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    return max(1, int(trainer.estimated_stepping_batches))


def policy_of(pl_module: nn.Module) -> nn.Module:
    """The trained network: ``policy`` of a module that has it, otherwise the module itself."""
    if _has(pl_module, "policy"):
        return cast("PolicyLearner", pl_module).policy
    return pl_module


def ends_with_update(pl_module: object) -> bool:
    """Whether the next training batch completes an update: ``will_update`` of a module that
    has it; otherwise ``True`` (every batch is one optimizer step)."""
    if _has(pl_module, "will_update"):
        return bool(cast("PolicyLearner", pl_module).will_update)
    return True


def optimizer_name(module: object) -> str | None:
    """``hparams["optimizer"]`` of ``module`` (``"zeroth_order"`` or ``"first_order"`` for a
    :class:`PolicyLearner`); ``None`` for a module without it (SFT, a reward model, a plain
    ``nn.Module`` without ``hparams``)."""
    hparams = getattr(module, "hparams", None)
    return hparams.get("optimizer") if isinstance(hparams, Mapping) else None
