"""ZOPrO's targeted perturbation sampler (docs/algorithm.md §2.4).

:class:`ZOPrOSampler` builds the direction ``z`` of each trainable tensor from the previous
policy update ``mu`` and the reward model's update ``v``; the name matching, blending and
scaling helpers it uses are in :mod:`zopro_lightning.zo.directions`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from zopro_lightning.zo import draws
from zopro_lightning.zo.directions import canonical_name, isotropic_factor, smoothed_directions

__all__ = ["DecaySchedule", "ZOPrOSampler"]

DecaySchedule = Literal["linear", "exp", "constant"]
Coefficients = Literal["shared", "per_tensor"]
Scale = Literal["previous_update", "isotropic"]


def _check_settings(
    decay: str,
    total_steps: int | None,
    initial_decay: float,
    smoothing: float,
    coefficients: str,
    scale: str,
) -> None:
    """Raise ``ValueError`` on the first setting of :class:`ZOPrOSampler` out of its range."""
    if scale not in ("previous_update", "isotropic"):
        raise ValueError(
            f"ZOPrOSampler: unknown scale {scale!r}; use 'previous_update' or 'isotropic'."
        )
    if decay not in ("linear", "exp", "constant"):
        raise ValueError(
            f"ZOPrOSampler: unknown decay {decay!r}; use 'linear', 'exp' or 'constant'."
        )
    if not 0.0 <= initial_decay <= 1.0:
        raise ValueError(f"ZOPrOSampler: initial_decay must lie in [0, 1], got {initial_decay}.")
    if total_steps is not None and total_steps <= 0:
        raise ValueError(f"ZOPrOSampler: total_steps must be positive, got {total_steps}.")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"ZOPrOSampler: smoothing must lie in [0, 1), got {smoothing}.")
    if coefficients not in ("shared", "per_tensor"):
        raise ValueError(
            f"ZOPrOSampler: coefficients must be shared or per_tensor, got {coefficients!r}."
        )


def unit_reward_directions(
    reward_update: Mapping[str, Tensor] | None, policy_shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, Tensor]:
    r"""``v_hat_n = v_n / ||v_n||`` (flattened, float32) by canonical name, for every reward
    tensor whose norm is finite and non-zero.

    Raises:
        ValueError: a reward tensor matches a policy tensor by name but not by shape.
    """
    v_hat: dict[str, Tensor] = {}
    for raw_name, tensor in (reward_update or {}).items():
        name = canonical_name(raw_name)
        if name in policy_shapes and tuple(tensor.shape) != policy_shapes[name]:
            raise ValueError(
                f"ZOPrOSampler: reward update {raw_name!r} has shape {tuple(tensor.shape)} but "
                f"the policy update of the same name has {policy_shapes[name]}. Policy and reward "
                "model must share the LoRA layout (same base, rank and target modules) for "
                "their tensors to be matched; otherwise rename or drop the reward tensors."
            )
        flat = tensor.detach().float().flatten()
        norm = flat.norm()
        if torch.isfinite(norm) and norm > 0:
            v_hat[name] = flat / norm
    return v_hat


class ZOPrOSampler:
    r"""ZOPrO's targeted sampler (docs/algorithm.md §2.4).

    For trainable tensor ``n`` with previous policy update :math:`\mu_n` and reward-model update
    :math:`v_n` (all flattened per tensor):

    .. math::
        \hat v = v_n / \lVert v_n \rVert, \quad \xi \sim N(0, I), \quad
        \xi_\perp = \xi - (\hat v \cdot \xi)\,\hat v, \quad
        \tilde\xi = \xi_\perp \, \lVert \mu_n \rVert / (\lVert \xi_\perp \rVert + 10^{-8}),

    .. math::
        z_n = d_t\, \mu_n + \sqrt{1 - d_t^2}\, \tilde\xi .

    Hence ``z - d mu`` is orthogonal to ``v`` and has norm ``sqrt(1 - d^2) * ||mu||``.

    Scale (``scale`` argument): the published formula ties the size of ``z`` to the previous
    update, ``||z_n|| ~ ||mu_n||`` (``scale="previous_update"``, exactly the formula above).
    Then the effective perturbation is ``eps * ||mu||`` and the effective step
    ``lr * ||mu||^2``: both shrink with the previous update, and once an iteration moves
    little, ``eps z`` falls under float resolution and ``g`` becomes exactly 0 (seen on the
    embedded task). ``scale="isotropic"`` (the default) multiplies every tensor's ``z_n`` by one
    factor, ``c = sqrt(sum_n numel_n) / ||mu||`` (over the tensors that have a ``mu_n``), so
    the whole direction has about the norm a Gaussian draw has, ``sqrt(numel)``: ``eps`` and
    ``lr`` then mean what they mean for MeZO, and samplers compare at equal settings. One factor
    for all tensors keeps the direction itself, across tensors too (at ``d = 1``, ``z`` is
    parallel to ``mu``), and every orthogonality property.

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
        exp_rate: the rate of the exponential schedule (default 1.0).
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
        scale: ``"isotropic"`` (default) or ``"previous_update"`` (the published formula as it
            is; its ``g`` collapses to 0 once ``mu`` is small, see above).
    """

    def __init__(
        self,
        decay: DecaySchedule = "linear",
        total_steps: int | None = None,
        initial_decay: float = 1.0 - 1e-3,
        exp_rate: float = 1.0,
        smoothing: float = 0.0,
        coefficients: Coefficients = "shared",
        scale: Scale = "isotropic",
    ) -> None:
        _check_settings(decay, total_steps, initial_decay, smoothing, coefficients, scale)
        self.scale = scale
        self.decay_schedule: DecaySchedule = decay
        self.fixed_total_steps = total_steps
        self.total_steps = total_steps
        self.initial_decay = float(initial_decay)
        self.exp_rate = float(exp_rate)
        self.smoothing = float(smoothing)
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
        v_hat = unit_reward_directions(reward_update, shapes)
        self._mu, self._mu_shapes, self._v_hat = mu, shapes, v_hat
        self._global_scale = isotropic_factor(mu)
        self.matched_tensors = sum(1 for n in mu if n in v_hat)
        self.restart()
        return self.matched_tensors

    @property
    def fill(self) -> Callable[..., Any] | None:
        """Before any direction is set every ``z`` is plain ``xi``: the SPSA step may then draw
        it chunk by chunk like the Gaussian sampler (the same numbers); ``None`` afterwards."""
        return None if self._mu else draws.normal_fill

    def sample(self, name: str, param: Tensor, generator: torch.Generator) -> Tensor:
        r"""``z_n`` for tensor ``name``, shaped and typed like ``param``: ``xi ~ N(0, I)`` drawn
        from ``generator``, then steered by the stored ``mu_n`` and ``v_hat_n`` (plain ``xi``
        when there is no usable ``mu_n``).

        Raises:
            ValueError: the stored ``mu_n`` has another shape than ``param``.
        """
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
        z = self._targeted(xi, mu.to(xi.device), mu_norm, self._v_hat.get(key), generator)
        return z.view_as(param).to(param.dtype)

    def _targeted(
        self,
        xi: Tensor,
        mu: Tensor,
        mu_norm: Tensor,
        v_hat: Tensor | None,
        generator: torch.Generator,
    ) -> Tensor:
        r"""``z = a d mu + sqrt(1 - d^2) xi_tilde`` (times ``c`` when isotropic), with
        ``xi_tilde = xi_perp ||mu|| / (||xi_perp|| + 1e-8)``, ``xi_perp`` = ``xi`` without its
        component along ``v_hat``; ``a = 1`` (shared) or ``a ~ N(0, 1)`` from ``generator``
        (per_tensor)."""
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
        return z

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
        """Advance ``d_t`` by one policy update (not before any direction is set):
        ``linear``: ``d <- max(0, d - 1/T)``; ``exp``: ``d = d_0 exp(-rate t)``; ``constant``:
        ``d = d_0``."""
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
        """``d``, ``t``, the horizon, ``mu`` (with shapes) and ``v_hat``, on the CPU."""
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
        """Restore :meth:`state_dict`'s values (``mu_shapes`` defaults to the flat shapes)."""
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
