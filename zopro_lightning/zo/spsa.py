"""The two-point SPSA step, seeded and in place (docs/algorithm.md §2.3).

For step seed ``s`` and each of ``q`` perturbations ``j``::

    z_j    = sampler.sample(name, p, generator seeded from (s, j, name))   for every tensor p
    L+     = L(theta + eps z_j) ;  L- = L(theta - eps z_j)                  (no autograd)
    g_j    = (L+ - L-) / (2 eps)                                            (one scalar)
    theta <- theta - lr (mean_j g_j z_j + weight_decay * theta)

``z`` is never stored: it is regenerated from its seed whenever needed (MeZO's trick), so the
step needs the memory of inference. For samplers with i.i.d. coordinates it is not even held
whole for one tensor: it is drawn and added chunk by chunk, on all CPU threads
(:mod:`zopro_lightning.zo.draws`). The loss function evaluates every micro-batch at the same
perturbed point, so ``g`` is the average over micro-batches that share ``z``.

Guards (each one counts the step as skipped, ``SPSAResult.skipped``):

- **non-finite g**: if *any* ``g_j`` is NaN or infinite (after the cross-rank mean), the update
  is skipped: one bad direction poisons ``mean_j g_j z_j`` whatever the others are.
- **non-finite update**: if ``lr``, ``lr g_j / q`` or ``lr weight_decay`` is not finite in the
  weights' dtype (for example ``lr=nan`` from a broken schedule), the update is skipped before
  it touches
  ``theta``; if the update was applied and left a NaN or infinite weight (an overflow, or an
  update rule's state that overflowed), it is undone from the step's copy of ``theta``.
  ``SPSAResult.non_finite_update`` tells these from a non-finite ``g``. With
  ``exact_restore=False`` there is no copy to undo from: an applied update that leaves a
  non-finite weight raises :class:`FloatingPointError` (non-finite scalars are still caught
  before the update).
- **bound on |g|** (``max_abs_grad``, off by default): each ``g_j`` is clamped to
  ``[-max_abs_grad, max_abs_grad]`` after the cross-rank mean (so every rank clamps the same
  numbers); ``SPSAResult.num_clipped`` counts them. One outlier batch (a reward spike, a
  loss at a clip boundary) then moves ``theta`` by at most ``lr * max_abs_grad * |z|``.

``theta`` is bit-identical after a skipped step with ``exact_restore=True``; within rounding
with ``exact_restore=False`` (as after any step of that mode).

Restoration after the two evaluations:

- ``layerwise`` given (``ZOPrOModule``'s default for full-parameter training): the
  evaluations never write ``theta``; each module sees ``theta_n +- eps z_n`` only during its own
  forward (:mod:`zopro_lightning.zo.layerwise`). Bit-exact in every dtype, and no copy: one
  module's tensors exist twice at a time.
- ``exact_restore=True`` without ``layerwise``: a copy of the trainable tensors is kept during
  the step and copied back, so ``theta`` returns bit for bit. The copy costs the size of the
  *trainable* set, negligible with LoRA.
- ``exact_restore=False``: MeZO's arithmetic ``+eps z, -2 eps z, +eps z`` with no copy.
  ``theta`` then returns to within float rounding (a few ulp), not bit for bit. The last
  ``+eps z`` is fused into the update (``theta += (eps - lr g / q) z``, after the weight
  decay), so a step draws each ``z`` three times, not four.

16-bit tensors take the SGD update in float32 and one stochastic rounding
(:mod:`zopro_lightning.zo.rounding`), so updates below half of bfloat16's gap are not lost.
Sharded (FSDP2) tensors: each rank adds its rows of ``z`` drawn for the whole tensor
(:mod:`zopro_lightning.utils.sharding`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from zopro_lightning.utils.sharding import is_sharded, local_rows
from zopro_lightning.zo import draws
from zopro_lightning.zo.draws import derive_seed
from zopro_lightning.zo.layerwise import LayerwiseSubstitution
from zopro_lightning.zo.rounding import LOW_PRECISION, round_stochastically
from zopro_lightning.zo.samplers import PerturbationSampler

if TYPE_CHECKING:
    from zopro_lightning.zo.optim import SPSASettings

LossFn = Callable[[], Tensor]
ReduceFn = Callable[[Tensor], Tensor]
#: ``gradient(name, param) -> Tensor``: the step's estimate ``mean_j g_j z_j`` for one tensor
GradientFn = Callable[[str, Tensor], Tensor]
#: ``apply(params, gradient)``: an update rule (momentum, Adam moments) in place of plain SGD;
#: returns ``False`` when it left a non-finite value (its state restored), so the step undoes it
UpdateFn = Callable[[Mapping[str, Tensor], GradientFn], "bool | None"]


def tensor_generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    """The generator that draws ``z`` for tensor ``name`` at seed ``seed``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, name))
    return generator


def applies_weight_decay(name: str, param: Tensor) -> bool:
    """Weight decay applies to matrices only: not to biases, norm weights or other vectors."""
    return param.ndim >= 2 and not name.endswith("bias")


@dataclass
class SPSAResult:
    """What one SPSA step measured.

    Attributes:
        projected_grads: ``[q]`` the scalars ``g_j`` (averaged across ranks when reduced).
        loss_plus: ``[q]`` losses at ``theta + eps z_j``.
        loss_minus: ``[q]`` losses at ``theta - eps z_j``.
        skipped: the update was skipped (some ``g_j`` or the update was not finite).
        num_skipped: how many SPSA steps were skipped (an update may take several).
        non_finite_update: skipped because the update itself was not finite (``lr`` or
            ``lr g_j`` not finite, or a weight left NaN/infinite and undone).
        num_clipped: how many ``g_j`` the bound ``max_abs_grad`` clamped (``projected_grads``
            holds the clamped values, those the update used).
    """

    projected_grads: Tensor
    loss_plus: Tensor
    loss_minus: Tensor
    skipped: bool
    num_skipped: int = -1  # SPSA steps skipped (several per update); -1: from ``skipped``
    non_finite_update: bool = False
    num_clipped: int = 0

    @classmethod
    def concatenate(cls, results: list[SPSAResult]) -> SPSAResult:
        """Several steps' results as one (``[n q]`` values; skipped if any was; none: an empty
        result that skipped nothing)."""
        if not results:
            empty = torch.zeros(0, dtype=torch.float64)
            return cls(empty, empty, empty, skipped=False)
        if len(results) == 1:
            return results[0]
        return cls(
            torch.cat([r.projected_grads for r in results]),
            torch.cat([r.loss_plus for r in results]),
            torch.cat([r.loss_minus for r in results]),
            any(r.skipped for r in results),
            sum(r.num_skipped for r in results),
            any(r.non_finite_update for r in results),
            sum(r.num_clipped for r in results),
        )

    def __post_init__(self) -> None:
        if self.num_skipped < 0:
            self.num_skipped = int(self.skipped)

    @property
    def projected_grad(self) -> float:
        return float(self.projected_grads.mean())

    @property
    def loss(self) -> float:
        """Two-point estimate of the loss at ``theta``: mean of ``L+`` and ``L-``."""
        return float((self.loss_plus + self.loss_minus).mean() / 2)


class _Directions:
    """Regenerates (or, with ``cache=True``, remembers) the directions of one step."""

    def __init__(self, sampler: PerturbationSampler, seed: int, cache: bool) -> None:
        self.sampler, self.seed, self.cache = sampler, seed, cache
        self._cached: dict[tuple[int, str], Tensor] = {}

    def generator(self, j: int, name: str, param: Tensor) -> torch.Generator:
        return tensor_generator(derive_seed(self.seed, j), name, param.device)

    def __call__(self, j: int, name: str, param: Tensor) -> Tensor:
        key = (j, name)
        if key in self._cached:
            return self._cached[key]
        z = self.sampler.sample(name, param, self.generator(j, name, param))
        if self.cache:
            self._cached[key] = z
        return z

    def add_tasks(self, j: int, name: str, param: Tensor, alpha: float) -> list[draws.Task]:
        """Tasks doing ``param += alpha * z_j``: chunked draws when the sampler has i.i.d.
        coordinates (a ``fill``) and nothing is cached, else one task with ``z`` whole."""
        fill = getattr(self.sampler, "fill", None)
        if is_sharded(param):  # z of the whole tensor, this rank's rows of it
            local, rows = local_rows(param)
            return [lambda: local.add_(self.whole(j, name, param)[rows], alpha=alpha)]
        if fill is None or self.cache:
            return [lambda: param.add_(self(j, name, param), alpha=alpha)]
        return draws.add_draw_tasks(param, self.generator(j, name, param), fill, alpha)

    def whole(self, j: int, name: str, param: Tensor, float32: bool = False) -> Tensor:
        """``z_j`` of the whole tensor ``name`` (also of a sharded one), in ``param``'s dtype
        (``float32``: as drawn), the numbers :meth:`add_tasks` adds."""
        fill = getattr(self.sampler, "fill", None)
        if fill is None or self.cache:
            return self(j, name, param).float() if float32 else self(j, name, param)
        z = draws.draw(param, self.generator(j, name, param), fill)
        return z if float32 else z.to(param.dtype)

    def perturbed(self, j: int, scale: float) -> Callable[[str, Tensor], Tensor]:
        """``make(name, param) = param + scale * z_j``, a new tensor (``param`` unchanged), with
        the arithmetic of :meth:`add_tasks` (so the same numbers as perturbing in place)."""

        def make(name: str, param: Tensor) -> Tensor:
            out = torch.empty_like(param)
            fill = getattr(self.sampler, "fill", None)
            if fill is None or self.cache:
                torch.add(param, self(j, name, param), alpha=scale, out=out)
            else:
                generator = self.generator(j, name, param)
                tasks = draws.perturbed_copy_tasks(param, out, generator, fill, scale)
                draws.run_tasks(tasks, parallel=param.device.type == "cpu")
            return out

        return make

    def rounded_update_tasks(
        self, name: str, param: Tensor, alphas: list[float], decay: float
    ) -> list[draws.Task]:
        """Tasks doing ``param = round(decay * param + sum_j alphas[j] z_j)``, the sum in float32
        and one stochastic rounding to ``param``'s 16-bit dtype (:mod:`~.rounding`), its random
        bits seeded from ``(step seed, "round", name)``."""
        rounding = tensor_generator(derive_seed(self.seed, "round"), name, param.device)
        fill = getattr(self.sampler, "fill", None)
        if is_sharded(param):  # each rank rounds its rows with bits of its own (documented)
            local, rows = local_rows(param)
            rounding.manual_seed(derive_seed(rounding.initial_seed(), rows.start or 0))

            def sharded() -> None:
                total = local.to(torch.float32, copy=True).mul_(decay)
                for j, alpha in enumerate(alphas):
                    total.add_(self.whole(j, name, param, float32=True)[rows], alpha=alpha)
                local.copy_(round_stochastically(total, local.dtype, rounding))

            return [sharded]
        if fill is not None and not self.cache:
            generators = [self.generator(j, name, param) for j in range(len(alphas))]
            return draws.rounded_update_tasks(
                param, generators, fill, alphas, decay, rounding, round_stochastically
            )

        def whole() -> None:
            total = param.to(torch.float32, copy=True).mul_(decay)
            for j, alpha in enumerate(alphas):
                total.add_(self(j, name, param).float(), alpha=alpha)
            param.copy_(round_stochastically(total, param.dtype, rounding))

        return [whole]


def all_finite(tensor: Tensor) -> bool:
    """Whether every value of ``tensor`` is finite: a finite sum proves it (NaN and inf
    propagate) without a ``[numel]`` mask; only a non-finite sum (or an overflowing one) is
    checked value by value. Of a sharded tensor, this rank's rows (no collective)."""
    tensor = local_rows(tensor)[0]
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _on_cpu(params: Mapping[str, Tensor]) -> bool:
    return all(p.device.type == "cpu" for p in params.values())


@torch.no_grad()
def perturb_(
    params: Mapping[str, Tensor],
    directions: _Directions,
    j: int,
    scale: float | Mapping[str, float],
) -> None:
    """``p += scale * z_j`` for every tensor (``scale`` one number, or one a tensor name), in
    place; the tensors side by side on a CPU (their tasks never overlap)."""
    scales = scale if isinstance(scale, Mapping) else dict.fromkeys(params, scale)
    tasks = [t for n, p in params.items() for t in directions.add_tasks(j, n, p, scales[n])]
    draws.run_tasks(tasks, parallel=_on_cpu(params))


@torch.no_grad()
def spsa_step(
    params: Mapping[str, Tensor],
    loss_fn: LossFn,
    sampler: PerturbationSampler,
    settings: SPSASettings,
    *,
    seed: int,
    lr: float,
    weight_decay: float = 0.0,
    reduce_fn: ReduceFn | None = None,
    update_fn: UpdateFn | None = None,
    layerwise: LayerwiseSubstitution | None = None,
) -> SPSAResult:
    """One forward-only update of ``params`` (the module docstring has the math and guards).

    Args:
        params, sampler: the trainable tensors by name (changed in place); draws the ``z_j``.
        loss_fn: the loss at the current ``params``; called ``2 q`` times.
        settings: ``eps``, ``q = num_perturbations``, ``max_abs_grad``, ``exact_restore``
            (``None`` counts as exact here) and ``cache_directions``.
        seed: the step seed, the same on every rank.
        lr, weight_decay: ``lr`` and ``lambda`` of this step (decay on matrices only).
        reduce_fn: the mean of the ``[3, q]`` tensor of ``(g, L+, L-)`` over data-parallel
            ranks (one all-reduce); ``None`` on one process.
        update_fn: ``None``: SGD, ``theta -= lr (mean_j g_j z_j + lambda theta)`` with ``z``
            regenerated, never held whole. Else, once ``theta`` is restored,
            ``update_fn(params, gradient)`` applies a rule owning ``lr`` and the decay, with
            ``gradient(name, param) = mean_j g_j z_j`` one tensor at a time; ``False`` from it
            (a non-finite value, its own state restored) undoes ``theta`` too.
        layerwise: the swaps of ``params`` in the model ``loss_fn`` runs; with an exact
            restore, the evaluations then see ``theta +- eps z`` module by module and
            ``theta`` is never written (no copy); ``None``: perturb in place.

    Raises:
        FloatingPointError: an update left a non-finite weight with no copy to undo it from.
        ValueError: ``layerwise`` missed a tensor the loss reads outside its module.
    """
    directions = _Directions(sampler, seed, settings.cache_directions)
    exact = settings.restores_exactly
    layerwise = layerwise if exact else None
    # a copy: to restore theta after in-place evaluations, or to undo a rule's non-finite step
    keep_copy = exact and (layerwise is None or update_fn is not None)
    backup = {n: p.detach().clone() for n, p in params.items()} if keep_copy else None
    if layerwise is not None:
        stats = _layerwise_losses(loss_fn, directions, settings, layerwise)
    else:
        stats = _two_point_losses(params, loss_fn, directions, settings, backup)
    if reduce_fn is not None:
        stats = reduce_fn(stats)
    skipped = not bool(torch.isfinite(stats[0]).all())  # any non-finite g_j, not all
    grads, num_clipped = (stats[0], 0) if skipped else _clamped(stats[0], settings.max_abs_grad)
    non_finite_update = not skipped and not _finite_scalars(params, grads, lr, weight_decay)
    skipped = skipped or non_finite_update

    pending_restore = 0.0 if exact else settings.eps  # theta - eps z_last: + eps z_last
    if skipped:
        if pending_restore:
            perturb_(params, directions, len(grads) - 1, pending_restore)
    elif not _update(params, directions, grads, lr, weight_decay, pending_restore, update_fn):
        if backup is None:
            raise FloatingPointError(
                "spsa_step: the update left non-finite weights (an overflow: lr * g too large) "
                "and exact_restore=False keeps no copy to undo it from. Fix: lower lr, bound "
                "|g| with max_abs_grad, or pass exact_restore=True."
            )
        _copy_back(params, backup)
        skipped = non_finite_update = True
    return SPSAResult(
        grads, stats[1], stats[2], skipped, non_finite_update=non_finite_update,
        num_clipped=num_clipped,
    )  # fmt: skip


def _update(
    params: Mapping[str, Tensor],
    directions: _Directions,
    grads: Tensor,
    lr: float,
    weight_decay: float,
    pending_restore: float,
    update_fn: UpdateFn | None,
) -> bool:
    """Apply the step (SGD, or ``update_fn`` once ``theta`` is back); whether every weight is
    finite after it and the rule reported no non-finite value."""
    if update_fn is not None:
        if pending_restore:
            perturb_(params, directions, len(grads) - 1, pending_restore)
        finite = update_fn(params, _gradient_estimate(directions, grads)) is not False
    else:  # the pending restore is fused into the update
        _sgd_update(params, directions, grads, lr, weight_decay, pending_restore)
        finite = True
    return finite and all(all_finite(p) for p in params.values())


def _copy_back(params: Mapping[str, Tensor], backup: Mapping[str, Tensor]) -> None:
    for name, param in params.items():
        param.copy_(backup[name])


def _two_point_losses(
    params: Mapping[str, Tensor],
    loss_fn: LossFn,
    directions: _Directions,
    settings: SPSASettings,
    backup: Mapping[str, Tensor] | None,
) -> Tensor:
    """``[3, q]``: ``(g_j, L+_j, L-_j)`` for each of the ``q`` directions, ``g_j = (L+ - L-) /
    2 eps``. ``theta`` is restored after each pair, from ``backup`` (bit for bit) or by
    arithmetic, where the last ``+ eps z`` is left to the update (it fuses it)."""
    eps, q = settings.eps, settings.num_perturbations
    stats = torch.zeros(3, q, dtype=torch.float64)
    for j in range(q):
        perturb_(params, directions, j, eps)  # theta + eps z
        loss_plus = float(loss_fn())
        if backup is not None:  # theta - eps z, from the copy
            _copy_back(params, backup)
            perturb_(params, directions, j, -eps)
        else:  # theta - eps z, by arithmetic (one pass fewer)
            perturb_(params, directions, j, -2 * eps)
        loss_minus = float(loss_fn())
        if backup is not None:
            _copy_back(params, backup)
        elif j < q - 1:  # the last restore is fused into the update
            perturb_(params, directions, j, eps)
        stats[:, j] = torch.tensor(
            [(loss_plus - loss_minus) / (2 * eps), loss_plus, loss_minus], dtype=torch.float64
        )
    return stats


def _layerwise_losses(
    loss_fn: LossFn,
    directions: _Directions,
    settings: SPSASettings,
    layerwise: LayerwiseSubstitution,
) -> Tensor:
    """``[3, q]``: ``(g_j, L+_j, L-_j)`` as :func:`_two_point_losses`, each loss evaluated with
    the trainable tensors swapped for ``theta +- eps z_j`` module by module
    (:class:`~zopro_lightning.zo.layerwise.LayerwiseSubstitution`): ``theta`` is not written."""
    eps, q = settings.eps, settings.num_perturbations
    stats = torch.zeros(3, q, dtype=torch.float64)
    for j in range(q):
        losses = []
        for sign in (1.0, -1.0):
            with layerwise.substituted(directions.perturbed(j, sign * eps)) as touched:
                losses.append(float(loss_fn()))
            layerwise.check_covered(touched)
        loss_plus, loss_minus = losses
        stats[:, j] = torch.tensor(
            [(loss_plus - loss_minus) / (2 * eps), loss_plus, loss_minus], dtype=torch.float64
        )
    return stats


def _clamped(grads: Tensor, max_abs_grad: float | None) -> tuple[Tensor, int]:
    """``grads`` (``[q]``, finite) clamped to ``[-max_abs_grad, max_abs_grad]`` and how many
    were (none without a bound)."""
    if max_abs_grad is None:
        return grads, 0
    return grads.clamp(-max_abs_grad, max_abs_grad), int((grads.abs() > max_abs_grad).sum())


def _finite_scalars(
    params: Mapping[str, Tensor], grads: Tensor, lr: float, weight_decay: float
) -> bool:
    """Whether ``lr``, ``lr lambda`` and every ``lr g_j / q`` is finite in every tensor's dtype
    (torch refuses a float32 tensor's ``add_`` with ``alpha > 3.4e38``); NaN is not."""
    q = len(grads)
    scalars = [lr, lr * weight_decay, *(lr * float(g) / q for g in grads)]
    limit = min((torch.finfo(p.dtype).max for p in params.values()), default=math.inf)
    return all(abs(c) <= limit for c in scalars)


def _sgd_update(
    params: Mapping[str, Tensor],
    directions: _Directions,
    grads: Tensor,
    lr: float,
    weight_decay: float,
    pending_restore: float,
) -> None:
    """``theta <- (1 - lr lambda) theta - lr mean_j g_j z_j`` (decay on matrices only), one
    pass over each ``z_j``; the pending ``+ eps z_last`` of the arithmetic restore is fused
    into the last pass (scaled by the decay, as the decay already applied to it).

    16-bit tensors take the whole update in float32 and one stochastic rounding
    (:mod:`~zopro_lightning.zo.rounding`): rounded to nearest, an update below half of
    bfloat16's gap (about 0.4 % of the weight) would be lost."""
    decays = {
        name: 1.0 - lr * weight_decay
        if weight_decay and applies_weight_decay(name, param)
        else 1
        for name, param in params.items()
    }
    q, last = len(grads), len(grads) - 1
    alphas = [-lr * float(grads[j]) / q for j in range(q)]
    low = {n: p for n, p in params.items() if p.dtype in LOW_PRECISION}
    full = {n: p for n, p in params.items() if n not in low}
    tasks = []
    for name, param in low.items():
        coefficients = alphas[:last] + [alphas[last] + decays[name] * pending_restore]
        tasks += directions.rounded_update_tasks(name, param, coefficients, decays[name])
    draws.run_tasks(tasks, parallel=_on_cpu(low))
    for name, param in full.items():
        if decays[name] != 1:
            local_rows(param)[0].mul_(decays[name])
    for j in range(q):
        restore = pending_restore if j == last else 0.0
        perturb_(full, directions, j, {n: alphas[j] + decays[n] * restore for n in full})


def _gradient_estimate(directions: _Directions, grads: Tensor) -> GradientFn:
    """``gradient(name, param) = mean_j g_j z_j`` for one tensor (``z_j`` regenerated)."""
    q = len(grads)

    def gradient(name: str, param: Tensor) -> Tensor:
        total = torch.zeros_like(param)
        for j in range(q):
            total.add_(directions(j, name, param), alpha=float(grads[j]) / q)
        return total

    return gradient
