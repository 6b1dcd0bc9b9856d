"""Perturbation samplers for the SPSA step (docs/algorithm.md §2.3–2.4).

A sampler draws the direction ``z`` for one trainable tensor from a seeded generator. It is
called once per tensor per use (perturb, un-perturb, update), always with a generator seeded
from ``(step seed, tensor name)``, so the same ``z`` is regenerated each time and never stored.

- :class:`GaussianSampler`: ``z ~ N(0, I)``, the isotropic direction of MeZO.
- :class:`RademacherSampler`: ``z`` uniform on ``{-1, +1}``.
- :class:`ZOPrOSampler`: the targeted direction of ZOPrO, built from the previous policy update
  ``mu`` and the reward model's update ``v`` (see its docstring); it lives in
  :mod:`zopro_lightning.zo.zopro_sampler` and is importable from here too, as is
  :func:`~zopro_lightning.zo.directions.canonical_name`.

Every sampler follows :class:`PerturbationSampler`: ``sample``, ``step`` (once per policy
update), ``set_horizon`` (the updates of the coming phase), ``set_directions`` (the previous
iteration's policy and reward-model updates; isotropic samplers ignore them), ``metrics`` (the
values the coming step uses, for logging), ``state_dict`` and ``load_state_dict``. Callers use
the protocol and never ask for a sampler's class. A sampler whose coordinates are i.i.d.
standard draws may also carry ``fill(out, generator)`` (Gaussian and Rademacher do): the SPSA
step then adds ``alpha * z`` chunk by chunk on all CPU threads without holding ``z`` whole
(:mod:`zopro_lightning.zo.draws`); ``sample`` must then equal
``draws.draw(param, generator, fill)``. A sampler may also carry
``observe_gradients(gradients)``: the module's first-order updates then hand it each batch
gradient, by trainable tensor name, before the optimizer step
(:class:`~zopro_lightning.zo.subspace_sampler.SubspaceSampler` with ``basis="gradients"``
spans the last ones).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from zopro_lightning.zo import draws
from zopro_lightning.zo.directions import canonical_name
from zopro_lightning.zo.zopro_sampler import ZOPrOSampler

__all__ = [
    "GaussianSampler",
    "PerturbationSampler",
    "RademacherSampler",
    "ZOPrOSampler",
    "canonical_name",
]


@runtime_checkable
class PerturbationSampler(Protocol):
    """What the SPSA step needs from a sampler."""

    def sample(self, name: str, param: Tensor, generator: torch.Generator) -> Tensor:
        """Direction ``z`` for tensor ``name``, shaped and typed like ``param``."""
        ...

    def step(self) -> None:
        """Advance the schedule once per policy update."""
        ...

    def set_horizon(self, steps: int) -> None:
        """The number of policy updates of the phase about to start (a schedule's length)."""
        ...

    def set_directions(
        self,
        policy_update: Mapping[str, Tensor] | None,
        reward_update: Mapping[str, Tensor] | None = None,
    ) -> int:
        """New directions after an iteration; returns how many tensors matched a reward twin."""
        ...

    def metrics(self) -> dict[str, float]:
        """Values of the coming step worth logging (e.g. ``decay``)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class GaussianSampler:
    """Isotropic Gaussian directions, ``z ~ N(0, I)`` (MeZO). Stateless."""

    #: i.i.d. coordinates: the SPSA step may draw ``z`` chunk by chunk with this fill
    #: (:func:`zopro_lightning.zo.draws.add_draw_tasks`) instead of calling ``sample``.
    fill = staticmethod(draws.normal_fill)

    def sample(self, name: str, param: Tensor, generator: torch.Generator) -> Tensor:
        """``z = draws.draw(param, generator, fill)``, in ``param``'s dtype."""
        return draws.draw(param, generator, self.fill).to(param.dtype)

    def step(self) -> None:
        return None

    def set_horizon(self, steps: int) -> None:
        return None

    def set_directions(
        self,
        policy_update: Mapping[str, Tensor] | None,
        reward_update: Mapping[str, Tensor] | None = None,
    ) -> int:
        """Isotropic directions use no previous update: nothing is stored, nothing matched."""
        return 0

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None

    def __repr__(self) -> str:
        return "GaussianSampler()"


class RademacherSampler(GaussianSampler):
    """Rademacher directions: each coordinate ``+1`` or ``-1`` with probability 1/2."""

    fill = staticmethod(draws.rademacher_fill)

    def __repr__(self) -> str:
        return "RademacherSampler()"
