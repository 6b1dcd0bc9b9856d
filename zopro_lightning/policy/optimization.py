"""The optimizer of a ``ZOPrOModule``: its settings, and the pieces a fit's optimizer is built
from.

Each policy update is one ``optimizer.step()``: a zeroth-order step
(:class:`~zopro_lightning.zo.optim.ZerothOrderOptimizer`, SPSA on the clipped surrogate,
evaluated without autograd) or, to compare on the same rollouts, one AdamW step on the same loss
by back-propagation. Either way the learning rate follows a ``transformers`` schedule stepped
once per update, so ``global_step``, ``max_steps``, checkpoints and loggers count updates.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch
from torch import Tensor, nn

from zopro_lightning.zo.optim import SPSASettings, ZerothOrderOptimizer

if TYPE_CHECKING:
    from zopro_lightning.policy.module import ZOPrOModule
    from zopro_lightning.rl.rollout import RolloutSettings

T = TypeVar("T")
OptimizerName = Literal["zeroth_order", "first_order"]
OPTIMIZER_NAMES: tuple[OptimizerName, ...] = ("zeroth_order", "first_order")


@dataclass
class OptimizerSettings:
    """How the policy is updated, checked once, on construction.

    ``ZOPrOModule(..., optimizer=OptimizerSettings(...))``; ``zopro-train``:
    ``policy.optimizer.*`` (the name and ``lr`` are set for each phase from ``loop``).

    Attributes:
        name: ``"zeroth_order"`` (SPSA, forward passes only) or ``"first_order"`` (AdamW,
            back-propagation).
        lr: the learning rate, ``>= 0``, before the schedule.
        lr_schedule: a ``transformers.get_scheduler`` name (``"constant"``, ``"linear"``,
            ``"cosine"``, ...), stepped once per policy update over the fit's updates.
        warmup_steps: warm-up updates of the schedule, ``>= 0``.
        weight_decay: ``lambda >= 0``, on matrices only (not biases or norm weights).
        accumulate_batches: dataloader batches (rollouts) per policy update, ``>= 1``; the
            module's own, since Lightning's ``accumulate_grad_batches`` does not apply to
            manual optimisation.

    Raises:
        ValueError: on construction, naming the option, its value and the valid range.
    """

    name: OptimizerName = "zeroth_order"
    lr: float = 1e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    accumulate_batches: int = 1

    def __post_init__(self) -> None:
        for option, ok, valid in self._checks():
            if not ok:
                raise ValueError(
                    f"optimizer.{option}={getattr(self, option)!r}: must be {valid}"
                )

    def _checks(self) -> Iterator[tuple[str, bool, str]]:
        """``(option, ok, what is valid)`` of each option, checked lazily in order."""
        yield "name", self.name in OPTIMIZER_NAMES, "'zeroth_order' or 'first_order'"
        yield "lr", _number(self.lr) and self.lr >= 0, "a finite number >= 0"
        schedules = lr_schedule_names()
        yield "lr_schedule", self.lr_schedule in schedules, f"one of {', '.join(schedules)}"
        yield "warmup_steps", _integer(self.warmup_steps, 0), "an integer >= 0"
        yield "weight_decay", _number(self.weight_decay) and self.weight_decay >= 0, (
            "a finite number >= 0"
        )
        yield "accumulate_batches", _integer(self.accumulate_batches, 1), "an integer >= 1"


def given(value: T | None, cls: type[T], option: str) -> T:
    """``value`` when it is a ``cls`` (settings are passed whole), ``cls()`` for ``None``.

    Raises:
        TypeError: anything else (a dict, a string), with the call to make instead.
    """
    if value is None:
        return cls()
    if not isinstance(value, cls):
        raise TypeError(
            f"ZOPrOModule({option}=...) takes a {cls.__name__}, got {type(value).__name__}: "
            f"pass {option}={cls.__name__}(...) (zopro-train builds it from policy.{option}, "
            "whose _target_ names the class)."
        )
    return value


def flat_settings(
    optimizer: OptimizerSettings, rollout: RolloutSettings, spsa: SPSASettings, seed: int
) -> dict[str, Any]:
    """The settings as one flat dict of plain values (a module's ``hparams``: the loggers'
    config, the checkpoint's ``hyper_parameters``): ``optimizer`` (its name), every other field
    of the three by its name, and ``seed``."""
    fields = dataclasses.asdict(optimizer)
    return {
        "optimizer": fields.pop("name"),
        **fields,
        **dataclasses.asdict(rollout),
        **dataclasses.asdict(spsa),
        "seed": seed,
    }


def changed_settings(
    optimizer: OptimizerSettings,
    spsa: SPSASettings,
    name: OptimizerName,
    lr: float | None,
    changes: dict[str, Any],
) -> tuple[OptimizerSettings, SPSASettings]:
    """``optimizer`` with ``name`` (and ``lr`` unless ``None``), both with ``changes`` to their
    fields by name; new objects, checked as on construction.

    Raises:
        ValueError: a name that is a field of neither, or a value out of range.
    """
    own = [f.name for f in dataclasses.fields(OptimizerSettings) if f.name not in ("name", "lr")]
    theirs = [f.name for f in dataclasses.fields(SPSASettings)]
    unknown = sorted(set(changes) - {*own, *theirs})
    if unknown:
        raise ValueError(f"set_optimizer: unknown settings {unknown}; use {own + theirs}")
    mine = {key: value for key, value in changes.items() if key in own}
    mine |= {"name": name} | ({} if lr is None else {"lr": lr})
    return (
        dataclasses.replace(optimizer, **mine),
        dataclasses.replace(spsa, **{k: v for k, v in changes.items() if k in theirs}),
    )


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: object, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def lr_schedule_names() -> tuple[str, ...]:
    """The schedules ``transformers.get_scheduler`` knows by name."""
    from transformers import SchedulerType

    return tuple(schedule.value for schedule in SchedulerType)


def adamw(params: dict[str, Tensor], settings: OptimizerSettings) -> torch.optim.AdamW:
    """AdamW over ``params`` at ``settings.lr``, weight decay on matrices only."""
    decayed = {n for n, p in params.items() if p.ndim >= 2 and not n.endswith("bias")}
    return torch.optim.AdamW(
        [
            {"params": [p for n, p in params.items() if n in decayed],
             "weight_decay": settings.weight_decay},
            {"params": [p for n, p in params.items() if n not in decayed], "weight_decay": 0.0},
        ],
        lr=settings.lr,
    )  # fmt: skip


def lr_scheduler(
    optimizer: torch.optim.Optimizer, settings: OptimizerSettings, total_updates: int
) -> Any:
    """``settings.lr_schedule`` with ``settings.warmup_steps`` over ``total_updates``."""
    from transformers import get_scheduler

    return get_scheduler(
        settings.lr_schedule,
        optimizer,
        num_warmup_steps=settings.warmup_steps,
        num_training_steps=total_updates,
    )


def exact_restore(settings: SPSASettings, policy: nn.Module) -> bool:
    """``settings.exact_restore``; ``None`` is exact (the layer-by-layer swap makes it free
    of a copy where the trainable set is large)."""
    return settings.exact_restore is not False


def layerwise(settings: SPSASettings, policy: nn.Module) -> bool:
    """``settings.layerwise``, or when it is ``None``: swap layer by layer when the trainable
    values are over 10 % of the model's (full-parameter: a copy would double the weights),
    copy otherwise (LoRA: the copy is small)."""
    if settings.layerwise is not None:
        return bool(settings.layerwise)
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    total = sum(p.numel() for p in policy.parameters())
    return trainable > 0.1 * total


def zeroth_order_parameters(
    trainable: dict[str, Tensor], pattern: str | None, exact: bool
) -> dict[str, Tensor]:
    """The trainable tensors the zeroth-order steps move: those whose names match ``pattern``
    (``None``: all).

    Raises:
        ValueError: the pattern matches none; or the arithmetic restore (``exact`` false) would
            run on 16-bit weights (``theta`` drifts by rounding every step).
    """
    params = trainable
    if pattern:
        params = {n: p for n, p in trainable.items() if re.search(pattern, n)}
        if not params:
            raise ValueError(
                f"spsa.trainable={pattern!r} matches no trainable tensor of the policy; names "
                f"look like {next(iter(trainable), '(none)')!r}."
            )
    low_precision = sorted(
        {str(p.dtype) for p in params.values() if p.dtype in (torch.float16, torch.bfloat16)}
    )
    if low_precision and not exact:
        raise ValueError(
            f"zeroth-order steps with the arithmetic restore (exact_restore=False) on "
            f"{', '.join(low_precision)} trainable weights drift by rounding at every step "
            "(about 4% rms in 100 steps). Fix: keep the trainable weights in float32 (e.g. "
            "LoRA adapters in float32, model.dtype for the base only) or pass "
            "exact_restore=True."
        )
    return params


def optimizer_direction(
    optimizer: torch.optim.Optimizer | None, trainable: dict[str, Tensor]
) -> dict[str, Tensor]:
    """Minus the running mean of gradient estimates ``optimizer`` holds (AdamW's or ZO-Adam's
    ``exp_avg``, the ZO momentum buffer), by trainable tensor name, as float32 CPU copies;
    empty when it keeps none (zeroth-order SGD) or there is no optimizer."""
    if optimizer is None:
        return {}
    by_id = {id(p): n for n, p in trainable.items()}
    direction = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            moment = state.get("exp_avg", state.get("momentum_buffer"))
            if moment is not None and id(param) in by_id:
                direction[by_id[id(param)]] = -moment.detach().float().cpu().clone()
    return direction


def configure(module: ZOPrOModule) -> dict[str, Any]:
    """``configure_optimizers`` of a ``ZOPrOModule``: AdamW, or a
    :class:`~zopro_lightning.zo.optim.ZerothOrderOptimizer` over
    ``module.zeroth_order_parameters()`` with its restore resolved and, under DDP, the
    cross-rank mean of the step scalars; the LR schedule over this fit's updates, stepped per
    update. The sampler learns the horizon (its decay schedule's length)."""
    settings = module.optimizer_settings
    if settings.name == "first_order":
        optimizer = adamw(module.trainable_parameters, settings)
    else:
        multi_process = module._trainer is not None and module.trainer.world_size > 1
        optimizer = ZerothOrderOptimizer(
            module.zeroth_order_parameters().items(),
            module.sampler,
            dataclasses.replace(
                module.spsa_settings,
                exact_restore=module._exact_restore(),
                layerwise=layerwise(module.spsa_settings, module.policy),
            ),
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            reduce_fn=module._cross_rank_mean if multi_process else None,
            model=module.policy,
        )
    total = module.total_policy_updates()
    module.sampler.set_horizon(total)
    scheduler = lr_scheduler(optimizer, settings, total)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
