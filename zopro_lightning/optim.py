"""A ``torch.optim.Optimizer`` face for the SPSA step, so Lightning and torch schedulers treat a
zeroth-order update like any other optimizer step.

Why an optimizer: in Lightning's manual optimisation each ``optimizer.step()`` counts one
``global_step``; ``Trainer(max_steps=N)``, LR schedulers (which write ``param_groups[i]["lr"]``),
checkpoint callbacks and loggers then follow the policy updates exactly as for a first-order
module, and the optimizer's ``state_dict`` carries the zeroth-order state into checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from zopro_lightning.samplers import PerturbationSampler
from zopro_lightning.spsa import LossFn, ReduceFn, SPSAResult, spsa_step


class ZerothOrderOptimizer(torch.optim.Optimizer):
    """Forward-only SPSA optimizer over named parameters.

    ``step(loss_fn=..., seed=...)`` runs :func:`zopro_lightning.spsa.spsa_step` with the group's
    current ``lr``, ``eps`` and ``weight_decay``. The ``closure`` argument that Lightning passes
    is called once (it runs Lightning's hooks), never differentiated.

    Args:
        named_params: ``(name, parameter)`` pairs; names seed the directions.
        sampler: the direction sampler (``ZOPrOModule`` checkpoints its state).
        lr, eps, weight_decay, num_perturbations, exact_restore, cache_directions: see
            :func:`~zopro_lightning.spsa.spsa_step`.
        reduce_fn: cross-rank mean of the step's scalars (``None`` on one process).
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
        self.names = [name for name, _ in named]
        defaults = {"lr": lr, "eps": eps, "weight_decay": weight_decay}
        super().__init__([param for _, param in named], defaults)
        self.sampler = sampler
        self.num_perturbations = num_perturbations
        self.exact_restore = exact_restore
        self.cache_directions = cache_directions
        self.reduce_fn = reduce_fn
        self.skipped_steps = 0
        self.last_result: SPSAResult | None = None

    @property
    def named_parameters(self) -> dict[str, Tensor]:
        params = [p for group in self.param_groups for p in group["params"]]
        return dict(zip(self.names, params, strict=True))

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
        result = spsa_step(
            self.named_parameters,
            loss_fn,
            self.sampler,
            seed=seed,
            eps=group["eps"],
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            num_perturbations=self.num_perturbations,
            exact_restore=self.exact_restore,
            cache_directions=self.cache_directions,
            reduce_fn=self.reduce_fn,
        )
        self.skipped_steps += int(result.skipped)
        self.sampler.step()
        self.last_result = result
        return result

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
