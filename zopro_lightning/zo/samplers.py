"""Perturbation samplers for the SPSA step (DESIGN.md §2.3–2.4).

A sampler draws the direction ``z`` for one trainable tensor from a seeded generator. It is
called once per tensor per use (perturb, un-perturb, update), always with a generator seeded
from ``(step seed, tensor name)``, so the same ``z`` is regenerated each time and never stored.

- :class:`GaussianSampler`: ``z ~ N(0, I)``, the isotropic direction of MeZO.
- :class:`RademacherSampler`: ``z`` uniform on ``{-1, +1}``.
- :class:`ZOPrOSampler`: the targeted direction of ZOPrO, built from the previous policy update
  ``mu`` and the reward model's update ``v`` (see its docstring).

Every sampler follows :class:`PerturbationSampler`: ``sample``, ``step`` (once per policy
update), ``set_horizon`` (the updates of the coming phase), ``set_directions`` (the previous
iteration's policy and reward-model updates; isotropic samplers ignore them), ``metrics`` (the
values the coming step uses, for logging), ``state_dict`` and ``load_state_dict``. Callers use
the protocol and never ask for a sampler's class. A sampler whose coordinates are i.i.d.
standard draws may also carry ``fill(out, generator)`` (Gaussian and Rademacher do): the SPSA
step then adds ``alpha * z`` chunk by chunk on all CPU threads without holding ``z`` whole
(:mod:`zopro_lightning.zo.draws`); ``sample`` must then equal
``draws.draw(param, generator, fill)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from zopro_lightning.zo import draws

DecaySchedule = Literal["linear", "exp", "constant"]

_ADAPTER_SEGMENT = re.compile(r"\.(lora_[A-Za-z_]+|modules_to_save)\.[^.]+\.")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_forward_module.")


def canonical_name(name: str) -> str:
    """Name of a parameter with wrapper prefixes and adapter names removed.

    ``base_model.model.model.layers.0.q_proj.lora_A.default.weight`` becomes
    ``model.layers.0.q_proj.lora_A.weight`` for a PEFT causal LM and for a PEFT
    sequence classifier built from the same base alike, so policy and reward-model tensors of
    the same layer share a name (DESIGN.md §2.4).
    """
    changed = True
    while changed:
        changed = False
        for prefix in (*_WRAPPER_PREFIXES, "base_model.model."):
            if name.startswith(prefix):
                name = name[len(prefix) :]
                changed = True
    return _ADAPTER_SEGMENT.sub(lambda m: f".{m.group(1)}.", name)


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


def isotropic_factor(mu: Mapping[str, Tensor]) -> float:
    """``sqrt(sum_n numel_n) / sqrt(sum_n ||mu_n||^2)`` over the usable (finite, non-zero)
    ``mu_n``: the one factor that gives the targeted direction a Gaussian draw's norm."""
    squared = {n: float(t.double().pow(2).sum()) for n, t in mu.items()}
    usable = [n for n, sq in squared.items() if math.isfinite(sq) and sq > 0]
    if not usable:
        return 1.0
    return math.sqrt(sum(mu[n].numel() for n in usable) / sum(squared[n] for n in usable))


def smoothed_directions(
    previous: Mapping[str, Tensor], new: Mapping[str, Tensor], smoothing: float
) -> dict[str, Tensor]:
    """``(s prev/|prev| + (1 - s) new/|new|) |new|``, norms over all (finite) tensors: the blend
    of two directions whatever their scales; tensors without a same-shaped predecessor keep
    ``(1 - s) new``."""

    def norm(tensors: Mapping[str, Tensor]) -> float:
        total = sum(float(t.double().pow(2).sum()) for t in tensors.values())
        return math.sqrt(total) if math.isfinite(total) and total > 0 else 0.0

    old_norm, new_norm = norm(previous), norm(new)
    if old_norm == 0 or new_norm == 0:
        return dict(new)
    blended = {}
    for name, flat in new.items():
        mixed = (1 - smoothing) * flat / new_norm
        before = previous.get(name)
        if before is not None and before.shape == flat.shape:
            mixed = mixed + smoothing * before / old_norm
        blended[name] = mixed * new_norm
    return blended


class GaussianSampler:
    """Isotropic Gaussian directions, ``z ~ N(0, I)`` (MeZO). Stateless."""

    #: i.i.d. coordinates: the SPSA step may draw ``z`` chunk by chunk with this fill
    #: (:func:`zopro_lightning.zo.draws.add_draw_tasks`) instead of calling ``sample``.
    fill = staticmethod(draws.normal_fill)

    def sample(self, name: str, param: Tensor, generator: torch.Generator) -> Tensor:
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


class ZOPrOSampler:
    r"""ZOPrO's targeted sampler (DESIGN.md §2.4).

    For trainable tensor ``n`` with previous policy update :math:`\mu_n` and reward-model update
    :math:`v_n` (all flattened per tensor):

    .. math::
        \hat v = v_n / \lVert v_n \rVert, \quad \xi \sim N(0, I), \quad
        \xi_\perp = \xi - (\hat v \cdot \xi)\,\hat v, \quad
        \tilde\xi = \xi_\perp \, \lVert \mu_n \rVert / (\lVert \xi_\perp \rVert + 10^{-8}),

    .. math::
        z_n = d_t\, \mu_n + \sqrt{1 - d_t^2}\, \tilde\xi .

    Hence ``z - d mu`` is orthogonal to ``v`` and has norm ``sqrt(1 - d^2) * ||mu||``.

    Scale (``scale`` argument): DESIGN.md ties the size of ``z`` to the previous update,
    ``||z_n|| ~ ||mu_n||`` (``scale="previous_update"``, exactly the formula above). Then the
    effective perturbation is ``eps * ||mu||`` and the effective step ``lr * ||mu||^2``: both
    shrink with the previous update, and once an iteration moves little, ``eps z`` falls under
    float resolution and ``g`` becomes exactly 0 (seen on the embedded task).
    ``scale="isotropic"`` (the default) multiplies every tensor's ``z_n`` by one factor,
    ``c = sqrt(sum_n numel_n) / ||mu||`` (over the tensors that have a ``mu_n``), so the whole
    direction has about the norm a Gaussian draw has, ``sqrt(numel)``: ``eps`` and ``lr`` then
    mean what they mean for MeZO, and samplers compare at equal settings. One factor for all
    tensors keeps the direction itself, across tensors too (at ``d = 1``, ``z`` is parallel to
    ``mu``), and every orthogonality property.

    Fallbacks, so the direction is never zero: no reward counterpart (or ``v_n = 0``): no
    projection; no ``mu_n`` (first iteration) or ``mu_n = 0``: plain ``xi`` (MeZO).

    The decay ``d_t`` starts at ``initial_decay`` and moves once per :meth:`step`:
    ``"linear"``: ``d -= 1 / total_steps`` (floored at 0); ``"exp"``:
    ``d_t = d_0 exp(-rate * t)``; ``"constant"``: ``d_t = d_0``. It restarts at ``d_0`` with
    ``t = 0`` whenever :meth:`set_directions` gives new directions (each zeroth-order iteration
    starts along its fresh ``mu``, as the authors build a new decay schedule per iteration),
    and ``total_steps`` is then the horizon of that phase (:meth:`set_horizon`) unless fixed.
    Updates taken before any direction is set (the isotropic iteration 0 of a fully
    zeroth-order run) do not advance it.

    Tensors are matched to their directions by canonical name *and shape*.

    Args:
        decay: the schedule of ``d_t``.
        total_steps: policy updates over which the linear schedule reaches 0. ``None``: the
            updates of the current phase, set by :meth:`set_horizon` (``ZOPrOModule`` calls it
            at the start of every ``fit`` with that fit's updates).
        initial_decay: ``d_0`` in ``[0, 1]``.
        exp_rate: the rate of the exponential schedule (1.0 as in DESIGN.md).
        smoothing: ``s`` in ``mu <- (s mu_prev/|mu_prev| + (1 - s) mu_new/|mu_new|) |mu_new|``
            at each :meth:`set_directions` (norms over all tensors; tensors of the same name
            and shape): a noisy iteration then steers the next one less. 0 (the default): the
            previous iteration's update alone, as published.
        coefficients: ``"shared"`` (as published): ``z_n = d_t mu_n + ...`` for every tensor, a
            line search along ``mu`` while ``d_t`` is near 1. ``"per_tensor"``:
            ``z_n = a_n d_t mu_n + sqrt(1 - d_t^2) xi_tilde_n`` with ``a_n ~ N(0, 1)`` drawn per
            tensor (from its own generator, after ``xi``): the targeted part explores the
            subspace spanned by the per-tensor blocks of ``mu`` (one dimension per tensor)
            instead of one line, so each layer's step along its block adapts separately.
        scale: ``"isotropic"`` (default) or ``"previous_update"`` (DESIGN.md's literal
            formula; its ``g`` collapses to 0 once ``mu`` is small, see above).
    """

    def __init__(
        self,
        decay: DecaySchedule = "linear",
        total_steps: int | None = None,
        initial_decay: float = 1.0 - 1e-3,
        exp_rate: float = 1.0,
        smoothing: float = 0.0,
        coefficients: Literal["shared", "per_tensor"] = "shared",
        scale: Literal["previous_update", "isotropic"] = "isotropic",
    ) -> None:
        if scale not in ("previous_update", "isotropic"):
            raise ValueError(
                f"ZOPrOSampler: unknown scale {scale!r}; use 'previous_update' or 'isotropic'."
            )
        self.scale = scale
        if decay not in ("linear", "exp", "constant"):
            raise ValueError(
                f"ZOPrOSampler: unknown decay {decay!r}; use 'linear', 'exp' or 'constant'."
            )
        if not 0.0 <= initial_decay <= 1.0:
            raise ValueError(
                f"ZOPrOSampler: initial_decay must lie in [0, 1], got {initial_decay}."
            )
        if total_steps is not None and total_steps <= 0:
            raise ValueError(f"ZOPrOSampler: total_steps must be positive, got {total_steps}.")
        self.decay_schedule: DecaySchedule = decay
        self.fixed_total_steps = total_steps
        self.total_steps = total_steps
        self.initial_decay = float(initial_decay)
        self.exp_rate = float(exp_rate)
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"ZOPrOSampler: smoothing must lie in [0, 1), got {smoothing}.")
        self.smoothing = float(smoothing)
        if coefficients not in ("shared", "per_tensor"):
            raise ValueError(
                f"ZOPrOSampler: coefficients must be shared or per_tensor, got {coefficients!r}."
            )
        self.coefficients = coefficients
        self.decay = float(initial_decay)
        self.num_steps = 0
        self._mu: dict[str, Tensor] = {}  # flattened, by canonical name
        self._mu_shapes: dict[str, tuple[int, ...]] = {}
        self._v_hat: dict[str, Tensor] = {}
        self._global_scale = 1.0
        self.matched_tensors = 0

    # -- directions ---------------------------------------------------------------------------
    def set_directions(
        self,
        policy_update: Mapping[str, Tensor] | None,
        reward_update: Mapping[str, Tensor] | None = None,
    ) -> int:
        """Store ``mu`` (keyed by policy parameter name) and ``v`` (keyed by reward-model
        parameter name). Names are matched after :func:`canonical_name`.

        Returns:
            how many policy tensors found a reward counterpart of the same shape.

        Raises:
            ValueError: a reward tensor matches a policy tensor by name but not by shape.
        """
        updates = {canonical_name(n): t.detach() for n, t in (policy_update or {}).items()}
        mu = {name: t.float().flatten().clone() for name, t in updates.items()}
        if self.smoothing and self._mu:
            mu = smoothed_directions(self._mu, mu, self.smoothing)
        shapes = {name: tuple(t.shape) for name, t in updates.items()}
        v_hat: dict[str, Tensor] = {}
        for raw_name, tensor in (reward_update or {}).items():
            name = canonical_name(raw_name)
            if name in shapes and tuple(tensor.shape) != shapes[name]:
                raise ValueError(
                    f"ZOPrOSampler: reward update {raw_name!r} has shape {tuple(tensor.shape)} but "
                    f"the policy update of the same name has {shapes[name]}. Policy and reward "
                    "model must share the LoRA layout (same base, rank and target modules) for "
                    "their tensors to be matched; otherwise rename or drop the reward tensors."
                )
            flat = tensor.detach().float().flatten()
            norm = flat.norm()
            if torch.isfinite(norm) and norm > 0:
                v_hat[name] = flat / norm
        self._mu, self._mu_shapes, self._v_hat = mu, shapes, v_hat
        self._global_scale = isotropic_factor(mu)
        self.matched_tensors = sum(1 for n in mu if n in v_hat)
        self.restart()
        return self.matched_tensors

    @property
    def fill(self):
        """Before any direction is set every ``z`` is plain ``xi``: the SPSA step may then draw
        it chunk by chunk like the Gaussian sampler (the same numbers); ``None`` afterwards."""
        return None if self._mu else draws.normal_fill

    def sample(self, name: str, param: Tensor, generator: torch.Generator) -> Tensor:
        xi = draws.draw(param, generator, draws.normal_fill).flatten()
        key = canonical_name(name)
        mu = self._mu.get(key)
        if mu is not None and self._mu_shapes.get(key, tuple(param.shape)) != tuple(param.shape):
            raise ValueError(
                f"ZOPrOSampler: the stored policy update for {name!r} has shape "
                f"{self._mu_shapes[key]} but the parameter has {tuple(param.shape)}; the "
                "directions belong to another model (set_directions with this model's updates)."
            )
        mu_norm = mu.norm() if mu is not None else None
        if mu is None or not torch.isfinite(mu_norm) or mu_norm == 0:
            return xi.view_as(param).to(param.dtype)
        mu = mu.to(xi.device)
        v_hat = self._v_hat.get(key)
        if v_hat is not None:
            v_hat = v_hat.to(xi.device)
            xi = xi - torch.dot(v_hat, xi) * v_hat
        xi_tilde = xi * (mu_norm.to(xi.device) / (xi.norm() + 1e-8))
        d = self.decay
        if self.coefficients == "per_tensor":  # a_n ~ N(0, 1), this tensor's own draw
            d = d * float(torch.randn((), generator=generator, device=generator.device))
        z = d * mu + math.sqrt(max(0.0, 1.0 - self.decay**2)) * xi_tilde
        if self.scale == "isotropic":
            z = z * self._global_scale
        return z.view_as(param).to(param.dtype)

    # -- schedule -----------------------------------------------------------------------------
    def restart(self) -> None:
        """``d = d_0``, ``t = 0``: the start of a new decay schedule (new directions)."""
        self.decay = self.initial_decay
        self.num_steps = 0

    def set_horizon(self, steps: int) -> None:
        """The linear schedule's length for the coming phase (unless ``total_steps`` was fixed)."""
        if self.fixed_total_steps is None:
            self.total_steps = max(1, int(steps))

    def metrics(self) -> dict[str, float]:
        """``decay``: the ``d_t`` the coming step draws with."""
        return {"decay": self.decay}

    def step(self) -> None:
        """Advance ``d_t`` by one policy update (not before any direction is set)."""
        if not self._mu:
            return
        self.num_steps += 1
        if self.decay_schedule == "linear":
            if self.total_steps is None:
                raise ValueError(
                    "ZOPrOSampler(decay='linear') needs total_steps (the number of policy updates "
                    "over which d decays to 0); pass it, call set_horizon, or use decay='exp' or "
                    "'constant'."
                )
            self.decay = max(0.0, self.decay - 1.0 / self.total_steps)
        elif self.decay_schedule == "exp":
            self.decay = self.initial_decay * math.exp(-self.exp_rate * self.num_steps)

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "num_steps": self.num_steps,
            "total_steps": self.total_steps,
            "mu": {n: t.cpu() for n, t in self._mu.items()},
            "mu_shapes": {n: list(shape) for n, shape in self._mu_shapes.items()},
            "v_hat": {n: t.cpu() for n, t in self._v_hat.items()},
            "matched_tensors": self.matched_tensors,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.num_steps = int(state["num_steps"])
        self.total_steps = state["total_steps"]
        self._mu = {n: t.clone() for n, t in state["mu"].items()}
        shapes = state.get("mu_shapes") or {n: [t.numel()] for n, t in self._mu.items()}
        self._mu_shapes = {n: tuple(shape) for n, shape in shapes.items()}
        self._v_hat = {n: t.clone() for n, t in state["v_hat"].items()}
        self._global_scale = isotropic_factor(self._mu)
        self.matched_tensors = int(state["matched_tensors"])

    def __repr__(self) -> str:
        return (
            f"ZOPrOSampler(decay={self.decay_schedule!r}, d={self.decay:.4f}, "
            f"scale={self.scale!r}, total_steps={self.total_steps}, matched={self.matched_tensors})"
        )
