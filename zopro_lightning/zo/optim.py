"""A ``torch.optim.Optimizer`` face for the SPSA step, so Lightning and torch schedulers treat a
zeroth-order update like any other optimizer step.

Why an optimizer: in Lightning's manual optimisation each ``optimizer.step()`` counts one
``global_step``; ``Trainer(max_steps=N)``, LR schedulers (which write ``param_groups[i]["lr"]``),
checkpoint callbacks and loggers then follow the policy updates exactly as for a first-order
module, and the optimizer's ``state_dict`` carries the zeroth-order state (moments) into
checkpoints.

One ``step`` is one policy update. It takes ``steps_per_update`` SPSA steps on the same loss
(the same rollouts, as PPO epochs or TRL's ``num_iterations``), each with its own directions:
generation, scoring and reference log-probabilities are paid once and shared by several cheap
two-forward estimates. Each SPSA step estimates ``g_hat = mean_j g_j z_j`` and applies a rule:

- ``"sgd"``: ``theta -= lr (g_hat + lambda theta)``; ``z`` regenerated, never held whole; no
  memory beyond inference (MeZO).
- ``"momentum"``: ``b = beta b + g_hat + lambda theta;  theta -= lr b``. One buffer the size of
  the trainable set.
- ``"adam"``: ``m = b1 m + (1-b1) g_hat;  s = b2 s + (1-b2) g_hat^2;
  theta -= lr (m / (1-b1^t)) / (sqrt(s / (1-b2^t)) + adam_eps) + lr lambda theta`` (ZO-Adam, as
  ranked by ZO-Bench). Two buffers the size of the trainable set; ``lr`` is then a step per
  coordinate, as for first-order Adam.

Buffers take the trainable weights' dtype (4 B a value each for fp32 LoRA adapters; 2 B for
bf16 weights, where Adam's second moment is coarse: keep trainable weights in fp32 for it).

Guards (:mod:`zopro_lightning.zo.spsa`): a step with a non-finite ``g_j``, a non-finite ``lr`` or
an update that leaves a non-finite weight or moment is skipped and counted in
``skipped_steps``; ``theta`` and the moments are left as they were (bit for bit with
``exact_restore=True``: the moments of the step are copied first, as ``theta`` is).
``max_abs_grad`` bounds each ``|g_j|`` (off by default).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from zopro_lightning.utils.sharding import is_sharded
from zopro_lightning.zo.layerwise import LayerwiseSubstitution
from zopro_lightning.zo.samplers import PerturbationSampler
from zopro_lightning.zo.spsa import (
    GradientFn,
    LossFn,
    ReduceFn,
    SPSAResult,
    all_finite,
    applies_weight_decay,
    derive_seed,
    spsa_step,
)

UpdateRule = Literal["sgd", "momentum", "adam"]
UPDATE_RULES: tuple[UpdateRule, ...] = ("sgd", "momentum", "adam")


@dataclass
class SPSASettings:
    """The settings of the zeroth-order steps, checked once, on construction.

    ``spsa_step`` reads ``eps``, ``num_perturbations``, ``max_abs_grad``, ``exact_restore`` and
    ``cache_directions``; :class:`~zopro_lightning.zo.optim.ZerothOrderOptimizer` the update
    rule (``rule``, ``betas``, ``adam_eps``) and ``steps_per_update``; ``ZOPrOModule``
    ``trainable`` and ``exact_restore=None``. ``zopro-train``: ``policy.spsa.*``.

    Attributes:
        eps: ``epsilon > 0``, the perturbation scale of ``L(theta +- eps z)``.
        num_perturbations: ``q >= 1`` directions averaged per step.
        rule: ``"sgd"`` (MeZO), ``"momentum"`` or ``"adam"`` on ``g_hat = mean_j g_j z_j``
            (:mod:`zopro_lightning.zo.optim`; momentum keeps one, Adam two trainable-sized
            buffers).
        betas: momentum's ``beta`` (first value) or Adam's ``(b1, b2)``, each in ``[0, 1)``.
        adam_eps: Adam's denominator guard, ``> 0``.
        steps_per_update: SPSA steps per policy update (``>= 1``), each with its own
            directions, all on the update's rollouts.
        max_abs_grad: bound on each ``|g_j|`` after the cross-rank mean (``None``: off).
        trainable: a regular expression; steps perturb and move only the trainable tensors
            whose names match it (``None``: all).
        exact_restore: ``theta`` bit-exact after the two evaluations (``True``, and ``None``)
            or restored by arithmetic, MeZO's ``+eps z, -2 eps z, +eps z`` (``False``: float32
            only, since 16-bit weights drift).
        layerwise: how an exact restore is had. ``True``: the evaluations swap each module's
            trainable tensors for ``theta +- eps z`` during its forward and never write
            ``theta`` (no copy: one layer's tensors at a time;
            :mod:`~zopro_lightning.zo.layerwise`). ``False``: perturb in place and copy
            back from a copy of the trainable tensors. ``None``: ``ZOPrOModule`` swaps layer
            by layer when the trainable set is over 10 % of the model (full-parameter), and
            copies otherwise (LoRA: the copy is small).
        cache_directions: keep each ``z`` after its first draw instead of regenerating it
            (same numbers; for small trainable sets).

    Raises:
        ValueError: on construction, naming the option, its value and the valid range.
    """

    eps: float = 1e-3
    num_perturbations: int = 1
    rule: UpdateRule = "sgd"
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    steps_per_update: int = 1
    max_abs_grad: float | None = None
    trainable: str | None = None
    exact_restore: bool | None = None
    layerwise: bool | None = None
    cache_directions: bool = False

    def __post_init__(self) -> None:
        for option, ok, valid in self._checks():
            if not ok:
                raise ValueError(f"spsa.{option}={getattr(self, option)!r}: must be {valid}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))  # a list, a ListConfig: a tuple

    def _checks(self) -> Iterator[tuple[str, bool, str]]:
        """``(option, ok, what is valid)`` of each option, checked lazily in order."""
        yield "eps", _positive(self.eps), "a finite number > 0"
        yield "num_perturbations", _count(self.num_perturbations), "an integer >= 1"
        yield "rule", self.rule in UPDATE_RULES, f"one of {', '.join(UPDATE_RULES)}"
        yield "betas", _betas(self.betas), "two numbers in [0, 1)"
        yield "adam_eps", _positive(self.adam_eps), "a finite number > 0"
        yield "steps_per_update", _count(self.steps_per_update), "an integer >= 1"
        yield "max_abs_grad", self.max_abs_grad is None or _positive(self.max_abs_grad), (
            "null (off) or a finite number > 0"
        )
        yield "trainable", self.trainable is None or _regex(self.trainable), (
            "null (all) or a regular expression"
        )
        yield "exact_restore", self.exact_restore is None or isinstance(self.exact_restore, bool), (
            "null (by the trainable share), true or false"
        )
        yield "layerwise", self.layerwise is None or isinstance(self.layerwise, bool), (
            "null (by the trainable share), true or false"
        )
        yield "cache_directions", isinstance(self.cache_directions, bool), "true or false"

    @property
    def restores_exactly(self) -> bool:
        """Whether ``theta`` comes back from a copy: ``exact_restore`` is not ``False``."""
        return self.exact_restore is not False


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value: object) -> bool:
    return _number(value) and value > 0


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _betas(betas: object) -> bool:
    pair = list(betas) if isinstance(betas, Sequence) and not isinstance(betas, str) else []
    return len(pair) == 2 and all(_number(b) and 0 <= b < 1 for b in pair)


def _regex(pattern: object) -> bool:
    try:
        re.compile(pattern)  # type: ignore[arg-type]
    except (re.error, TypeError):
        return False
    return True


def inner_seed(seed: int, i: int) -> int:
    """Seed of the ``i``-th SPSA step of an update: the update's seed for ``i = 0`` (so one step
    per update draws what it always drew), derived from it otherwise."""
    return seed if i == 0 else derive_seed(seed, "inner", i)


class ZerothOrderOptimizer(torch.optim.Optimizer):
    """Forward-only SPSA optimizer over named parameters.

    ``step(loss_fn=..., seed=...)`` runs ``settings.steps_per_update`` times
    :func:`zopro_lightning.zo.spsa.spsa_step` with the group's current ``lr`` and
    ``weight_decay`` (what LR schedulers write) and the update ``settings.rule``. The
    ``closure`` argument that Lightning passes is called once (it runs Lightning's hooks), never
    differentiated.

    Args:
        named_params: ``(name, parameter)`` pairs; names seed the directions.
        sampler: the direction sampler (``ZOPrOModule`` checkpoints its state); stepped once per
            update.
        settings: the SPSA settings (:class:`SPSASettings`; default: its defaults).
        lr: learning rate (``param_groups[0]["lr"]``).
        weight_decay: ``lambda``, on matrices only (``param_groups[0]["weight_decay"]``).
        reduce_fn: cross-rank mean of the step's scalars (``None`` on one process).
        model: the network the loss runs; with ``settings.layerwise`` (and an exact restore)
            the evaluations swap its trainable tensors layer by layer instead of writing them.
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, Tensor]],
        sampler: PerturbationSampler,
        settings: SPSASettings | None = None,
        *,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        reduce_fn: ReduceFn | None = None,
        model: torch.nn.Module | None = None,
    ) -> None:
        named = list(named_params)
        if not named:
            raise ValueError(
                "ZerothOrderOptimizer got no trainable parameters: mark some requires_grad=True "
                "(e.g. wrap the policy with a LoRA adapter)."
            )
        self.names = [name for name, _ in named]
        rule = (settings or SPSASettings()).rule
        if rule != "sgd" and any(is_sharded(p) for _, p in named):
            raise ValueError(
                f"spsa.rule={rule!r} on sharded (FSDP) parameters is not supported: its moments "
                "would need sharding too. Fix: spsa.rule=sgd (MeZO's update, no state) under "
                "trainer=fsdp, or trainer=ddp for momentum and Adam."
            )
        super().__init__([param for _, param in named], {"lr": lr, "weight_decay": weight_decay})
        self.sampler = sampler
        self.settings = settings if settings is not None else SPSASettings()
        self.reduce_fn = reduce_fn
        self.skipped_steps = 0
        swap = model is not None and self.settings.layerwise and self.settings.restores_exactly
        self.layerwise = LayerwiseSubstitution(model, dict(named)) if swap else None

    @property
    def named_parameters(self) -> dict[str, Tensor]:
        params = [p for group in self.param_groups for p in group["params"]]
        return dict(zip(self.names, params, strict=True))

    def state_bytes(self) -> int:
        """Bytes the update rule keeps between steps (0 for SGD)."""
        return sum(
            t.numel() * t.element_size()
            for state in self.state.values()
            for t in state.values()
            if isinstance(t, Tensor)
        )

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Any] | None = None,
        *,
        loss_fn: LossFn | None = None,
        seed: int | None = None,
    ) -> SPSAResult:
        if closure is not None:
            closure()
        elif loss_fn is None and seed is None and self._state_initialisation():
            return SPSAResult.concatenate([])  # nothing to initialise: no step
        if loss_fn is None or seed is None:
            raise ValueError(
                "ZerothOrderOptimizer.step needs loss_fn= (the loss at the current parameters, "
                "evaluated without autograd) and seed= (the step seed, equal on every rank)."
            )
        group = self.param_groups[0]
        rule = None if self.settings.rule == "sgd" else self._apply_rule
        results = []
        for i in range(self.settings.steps_per_update):
            result = spsa_step(
                self.named_parameters, loss_fn, self.sampler, self.settings,
                seed=inner_seed(seed, i), lr=group["lr"], weight_decay=group["weight_decay"],
                reduce_fn=self.reduce_fn, update_fn=rule, layerwise=self.layerwise,
            )  # fmt: skip
            self.skipped_steps += int(result.skipped)
            results.append(result)
        self.sampler.step()
        return SPSAResult.concatenate(results)

    def _state_initialisation(self) -> bool:
        """Whether this bare ``step()`` is ``torch.distributed.checkpoint`` initialising the
        optimizer's state before saving or loading it (FSDP2 checkpoints): it gives every
        parameter a zero ``.grad`` and steps once. A zeroth-order optimizer has nothing to
        initialise (SGD keeps no state; the rules create theirs at their first step)."""
        params = [p for group in self.param_groups for p in group["params"]]
        return bool(params) and all(
            p.grad is not None and not p.grad.to_local().any()
            if hasattr(p.grad, "to_local")
            else p.grad is not None and not p.grad.any()
            for p in params
        )

    def _apply_rule(self, params: Mapping[str, Tensor], gradient: GradientFn) -> bool:
        """Momentum or Adam on the estimate ``g_hat`` of each tensor (module docstring).

        Returns ``False`` if a weight or moment came out non-finite; the moments are then put
        back as they were (from copies taken with the exact restore, where ``theta`` is
        undone too), and the SPSA step undoes ``theta``.
        """
        group = self.param_groups[0]
        lr, weight_decay = group["lr"], group["weight_decay"]
        saved: dict[Tensor, dict[str, Tensor]] = {}
        for name, param in params.items():
            g_hat = gradient(name, param)
            decay = weight_decay if applies_weight_decay(name, param) else 0.0
            state = self.state[param]
            if self.settings.restores_exactly:
                saved[param] = {key: value.clone() for key, value in state.items()}
            if self.settings.rule == "momentum":
                self._momentum(param, state, g_hat, lr, decay)
            else:
                self._adam(param, state, g_hat, lr, decay)
        finite = all(
            all_finite(t) for param in params.values() for t in (param, *self.state[param].values())
        )
        if not finite:
            for param, state in saved.items():
                self.state[param] = state  # {} for a tensor that had no moments yet
        return finite

    def _momentum(
        self, param: Tensor, state: dict[str, Tensor], g_hat: Tensor, lr: float, decay: float
    ) -> None:
        """``b = beta b + g_hat + lambda theta;  theta -= lr b`` (``g_hat`` is overwritten)."""
        if decay:
            g_hat.add_(param, alpha=decay)
        buffer = state.get("momentum_buffer")
        if buffer is None:
            buffer = state["momentum_buffer"] = torch.zeros_like(param)
        buffer.mul_(self.settings.betas[0]).add_(g_hat)
        param.add_(buffer, alpha=-lr)

    def _adam(
        self, param: Tensor, state: dict[str, Tensor], g_hat: Tensor, lr: float, decay: float
    ) -> None:
        """Bias-corrected Adam with decoupled weight decay: ``m = b1 m + (1-b1) g_hat;
        s = b2 s + (1-b2) g_hat^2;  theta = (1 - lr lambda) theta - lr m_hat / (sqrt(s_hat) +
        adam_eps)``."""
        beta1, beta2 = self.settings.betas
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float64)
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        state["step"] += 1
        t = float(state["step"])
        state["exp_avg"].mul_(beta1).add_(g_hat, alpha=1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(g_hat, g_hat, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(self.settings.adam_eps)
        if decay:
            param.mul_(1 - lr * decay)
        param.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**t))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        # the sampler's state travels with the module's checkpoint, not here
        state["zeroth_order"] = {"skipped_steps": self.skipped_steps}
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        state = dict(state_dict)
        extra = state.pop("zeroth_order", None)
        super().load_state_dict(state)
        if extra is not None:
            self.skipped_steps = int(extra["skipped_steps"])
