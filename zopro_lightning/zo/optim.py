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

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

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
UPDATE_RULES = ("sgd", "momentum", "adam")


def inner_seed(seed: int, i: int) -> int:
    """Seed of the ``i``-th SPSA step of an update: the update's seed for ``i = 0`` (so one step
    per update draws what it always drew), derived from it otherwise."""
    return seed if i == 0 else derive_seed(seed, "inner", i)


class ZerothOrderOptimizer(torch.optim.Optimizer):
    """Forward-only SPSA optimizer over named parameters.

    ``step(loss_fn=..., seed=...)`` runs ``steps_per_update`` times
    :func:`zopro_lightning.zo.spsa.spsa_step` with the group's current ``lr``, ``eps`` and
    ``weight_decay`` and the update ``rule``. The ``closure`` argument that Lightning passes is
    called once (it runs Lightning's hooks), never differentiated.

    Args:
        named_params: ``(name, parameter)`` pairs; names seed the directions.
        sampler: the direction sampler (``ZOPrOModule`` checkpoints its state); stepped once per
            update.
        lr, eps, weight_decay, num_perturbations, exact_restore, cache_directions: see
            :func:`~zopro_lightning.zo.spsa.spsa_step`.
        reduce_fn: cross-rank mean of the step's scalars (``None`` on one process).
        rule: ``"sgd"``, ``"momentum"`` or ``"adam"`` (module docstring).
        betas: momentum ``beta`` (first value) or Adam's ``(b1, b2)``.
        adam_eps: Adam's denominator guard.
        steps_per_update: SPSA steps per ``step`` call, each with its own directions.
        max_abs_grad: bound on each ``|g_j|`` (``None``: off); see
            :func:`~zopro_lightning.zo.spsa.spsa_step`.
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, Tensor]],
        sampler: PerturbationSampler,
        lr: float = 1e-4,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        num_perturbations: int = 1,
        exact_restore: bool = True,
        cache_directions: bool = False,
        reduce_fn: ReduceFn | None = None,
        rule: UpdateRule = "sgd",
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        steps_per_update: int = 1,
        max_abs_grad: float | None = None,
    ) -> None:
        named = list(named_params)
        if not named:
            raise ValueError(
                "ZerothOrderOptimizer got no trainable parameters: mark some requires_grad=True "
                "(e.g. wrap the policy with a LoRA adapter)."
            )
        if eps <= 0:
            raise ValueError(f"eps must be > 0 (perturbation scale), got {eps}.")
        if num_perturbations < 1:
            raise ValueError(f"num_perturbations (q) must be >= 1, got {num_perturbations}.")
        if rule not in UPDATE_RULES:
            raise ValueError(f"rule must be one of {UPDATE_RULES}, got {rule!r}.")
        if steps_per_update < 1:
            raise ValueError(f"steps_per_update must be >= 1, got {steps_per_update}.")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {tuple(betas)}.")
        if max_abs_grad is not None and not max_abs_grad > 0:
            raise ValueError(f"max_abs_grad must be > 0 or None (off), got {max_abs_grad}.")
        self.names = [name for name, _ in named]
        defaults = {"lr": lr, "eps": eps, "weight_decay": weight_decay}
        super().__init__([param for _, param in named], defaults)
        self.sampler = sampler
        self.num_perturbations = num_perturbations
        self.exact_restore = exact_restore
        self.cache_directions = cache_directions
        self.reduce_fn = reduce_fn
        self.rule: UpdateRule = rule
        self.betas = (float(betas[0]), float(betas[1]))
        self.adam_eps = float(adam_eps)
        self.steps_per_update = int(steps_per_update)
        self.max_abs_grad = None if max_abs_grad is None else float(max_abs_grad)
        self.skipped_steps = 0

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
        if loss_fn is None or seed is None:
            raise ValueError(
                "ZerothOrderOptimizer.step needs loss_fn= (the loss at the current parameters, "
                "evaluated without autograd) and seed= (the step seed, equal on every rank)."
            )
        group = self.param_groups[0]
        results = []
        for i in range(self.steps_per_update):
            result = spsa_step(
                self.named_parameters,
                loss_fn,
                self.sampler,
                seed=inner_seed(seed, i),
                eps=group["eps"],
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                num_perturbations=self.num_perturbations,
                exact_restore=self.exact_restore,
                cache_directions=self.cache_directions,
                reduce_fn=self.reduce_fn,
                update_fn=None if self.rule == "sgd" else self._apply_rule,
                max_abs_grad=self.max_abs_grad,
            )
            self.skipped_steps += int(result.skipped)
            results.append(result)
        self.sampler.step()
        return SPSAResult.concatenate(results)

    def _apply_rule(self, params: Mapping[str, Tensor], gradient: GradientFn) -> bool:
        """Momentum or Adam on the estimate ``g_hat`` of each tensor (module docstring).

        Returns ``False`` if a weight or moment came out non-finite; the moments are then put
        back as they were (from copies taken with ``exact_restore=True``, where ``theta`` is
        undone too), and the SPSA step undoes ``theta``.
        """
        group = self.param_groups[0]
        lr, weight_decay = group["lr"], group["weight_decay"]
        beta1, beta2 = self.betas
        saved: dict[Tensor, dict[str, Tensor]] = {}
        for name, param in params.items():
            g_hat = gradient(name, param)
            decay = weight_decay if applies_weight_decay(name, param) else 0.0
            state = self.state[param]
            if self.exact_restore:
                saved[param] = {key: value.clone() for key, value in state.items()}
            if self.rule == "momentum":
                if decay:
                    g_hat.add_(param, alpha=decay)
                buffer = state.get("momentum_buffer")
                if buffer is None:
                    buffer = state["momentum_buffer"] = torch.zeros_like(param)
                buffer.mul_(beta1).add_(g_hat)
                param.add_(buffer, alpha=-lr)
                continue
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float64)
                state["exp_avg"] = torch.zeros_like(param)
                state["exp_avg_sq"] = torch.zeros_like(param)
            state["step"] += 1
            t = float(state["step"])
            state["exp_avg"].mul_(beta1).add_(g_hat, alpha=1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(g_hat, g_hat, value=1 - beta2)
            denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(self.adam_eps)
            if decay:
                param.mul_(1 - lr * decay)
            param.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**t))
        finite = all(
            all_finite(t) for param in params.values() for t in (param, *self.state[param].values())
        )
        if not finite:
            for param, state in saved.items():
                self.state[param] = state  # {} for a tensor that had no moments yet
        return finite

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


def zeroth_order_state_bytes_per_value(rule: UpdateRule) -> int:
    """Bytes per fp32 trainable value the rule keeps between steps (half for 16-bit weights)."""
    return {"sgd": 0, "momentum": 4, "adam": 8}[rule]
