"""The two-point SPSA step, seeded and in place (DESIGN.md §2.3).

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

- ``exact_restore=True``: a copy of the trainable tensors is kept during the step and copied
  back, so ``theta`` returns bit for bit. The copy costs the size of the *trainable* set,
  negligible with LoRA.
- ``exact_restore=False``: MeZO's arithmetic ``+eps z, -2 eps z, +eps z`` with no copy: for
  full-parameter training of large models, where a copy would double the weights' memory.
  ``theta`` then returns to within float rounding (a few ulp), not bit for bit. The last
  ``+eps z`` is fused into the update (``theta += (eps - lr g / q) z``, after the weight
  decay), so a step draws each ``z`` three times, not four.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from zopro_lightning.zo import draws
from zopro_lightning.zo.draws import derive_seed
from zopro_lightning.zo.samplers import PerturbationSampler

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
        """Several steps' results as one (``[n q]`` values; skipped if any was)."""
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
        if fill is None or self.cache:
            return [lambda: param.add_(self(j, name, param), alpha=alpha)]
        return draws.add_draw_tasks(param, self.generator(j, name, param), fill, alpha)


def all_finite(tensor: Tensor) -> bool:
    """Whether every value of ``tensor`` is finite: a finite sum proves it (NaN and inf
    propagate) without a ``[numel]`` mask; only a non-finite sum (or an overflowing one) is
    checked value by value."""
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
    *,
    seed: int,
    eps: float,
    lr: float,
    weight_decay: float = 0.0,
    num_perturbations: int = 1,
    exact_restore: bool = True,
    cache_directions: bool = False,
    reduce_fn: ReduceFn | None = None,
    update_fn: UpdateFn | None = None,
    max_abs_grad: float | None = None,
) -> SPSAResult:
    """One forward-only update of ``params`` (see the module docstring for the math).

    Args:
        params: the trainable tensors by name (changed in place).
        loss_fn: evaluates the loss at the current ``params``; called ``2 * q`` times.
        sampler: draws the directions.
        seed: the step seed, the same on every rank.
        eps: perturbation scale, > 0.
        lr: learning rate of this step.
        weight_decay: decoupled-into-the-step L2 coefficient ``lambda`` (matrices only).
        num_perturbations: ``q``, directions averaged per update.
        exact_restore: restore ``theta`` from a copy (bit-exact) or by arithmetic (no copy).
        cache_directions: keep each ``z`` after its first draw instead of regenerating it
            (same numbers; for small trainable sets).
        reduce_fn: averages the ``[3, q]`` tensor of ``(g, L+, L-)`` across data-parallel
            ranks (one all-reduce per step); ``None`` on one process.
        update_fn: ``None``: plain SGD, ``theta -= lr (mean_j g_j z_j + lambda theta)``, with
            ``z`` regenerated and never held whole. Otherwise called once ``theta`` is restored,
            as ``update_fn(params, gradient)`` where ``gradient(name, param)`` returns that
            tensor's estimate ``mean_j g_j z_j`` (materialised one tensor at a time); the rule
            then owns ``lr`` and weight decay (:mod:`zopro_lightning.zo.optim`). It returns
            ``False`` if it left a non-finite value (having restored its own state); the step
            then undoes ``theta`` as for a non-finite weight.
        max_abs_grad: bound on each ``|g_j|``, applied after the cross-rank mean (``None``: no
            bound, the default). See the module docstring.

    Raises:
        FloatingPointError: with ``exact_restore=False`` only, an applied update left a
            non-finite weight and there is no copy to undo it from.
    """
    if eps <= 0 or not math.isfinite(eps):
        raise ValueError(f"spsa_step: eps must be a positive finite number, got {eps}.")
    if num_perturbations < 1:
        raise ValueError(f"spsa_step: num_perturbations must be >= 1, got {num_perturbations}.")
    if max_abs_grad is not None and not max_abs_grad > 0:
        raise ValueError(f"spsa_step: max_abs_grad must be > 0 or None, got {max_abs_grad}.")
    directions = _Directions(sampler, seed, cache_directions)
    backup = {n: p.detach().clone() for n, p in params.items()} if exact_restore else None

    def restore_theta() -> None:
        for name, param in params.items():
            param.copy_(backup[name])

    stats = torch.zeros(3, num_perturbations, dtype=torch.float64)
    for j in range(num_perturbations):
        perturb_(params, directions, j, eps)  # theta + eps z
        loss_plus = float(loss_fn())
        if backup is not None:  # theta - eps z, from the copy
            restore_theta()
            perturb_(params, directions, j, -eps)
        else:  # theta - eps z, by arithmetic (one pass fewer)
            perturb_(params, directions, j, -2 * eps)
        loss_minus = float(loss_fn())
        if backup is not None:
            restore_theta()
        elif j < num_perturbations - 1:  # the last restore is fused into the update below
            perturb_(params, directions, j, eps)
        stats[:, j] = torch.tensor(
            [(loss_plus - loss_minus) / (2 * eps), loss_plus, loss_minus], dtype=torch.float64
        )
    if reduce_fn is not None:
        stats = reduce_fn(stats)
    grads, loss_plus_all, loss_minus_all = stats[0], stats[1], stats[2]
    q, last = num_perturbations, num_perturbations - 1
    skipped = not bool(torch.isfinite(grads).all())  # any non-finite g_j, not all
    num_clipped = 0
    if not skipped and max_abs_grad is not None:
        num_clipped = int((grads.abs() > max_abs_grad).sum())
        grads = grads.clamp(-max_abs_grad, max_abs_grad)
    scalars = [lr, lr * weight_decay, *(lr * float(g) / q for g in grads)]
    # finite in every tensor's dtype: torch refuses a float32 tensor's add_ with alpha > 3.4e38
    limit = min((torch.finfo(p.dtype).max for p in params.values()), default=math.inf)
    non_finite_update = not skipped and not all(abs(c) <= limit for c in scalars)  # nan too
    skipped = skipped or non_finite_update

    def result() -> SPSAResult:
        return SPSAResult(
            grads,
            loss_plus_all,
            loss_minus_all,
            skipped,
            non_finite_update=non_finite_update,
            num_clipped=num_clipped,
        )

    pending_restore = eps if backup is None else 0.0  # theta - eps z_last awaits its + eps z_last
    if skipped or update_fn is not None:
        if pending_restore:
            perturb_(params, directions, last, pending_restore)
        if skipped:
            return result()
        finite = update_fn(params, _gradient_estimate(directions, grads)) is not False
    else:
        decays = {
            name: 1.0 - lr * weight_decay
            if weight_decay and applies_weight_decay(name, param)
            else 1
            for name, param in params.items()
        }
        for name, param in params.items():
            if decays[name] != 1:
                param.mul_(decays[name])
        for j in range(q):
            alpha = -lr * float(grads[j]) / q
            # the restore of the last z is fused into its update: one pass over z_last, not two
            restore = pending_restore if j == last else 0.0
            perturb_(params, directions, j, {n: alpha + decays[n] * restore for n in params})
        finite = True
    if not (finite and all(all_finite(p) for p in params.values())):
        if backup is None:
            raise FloatingPointError(
                "spsa_step: the update left non-finite weights (an overflow: lr * g too large) "
                "and exact_restore=False keeps no copy to undo it from. Fix: lower lr, bound "
                "|g| with max_abs_grad, or pass exact_restore=True."
            )
        restore_theta()
        skipped = non_finite_update = True
    return result()


def _gradient_estimate(directions: _Directions, grads: Tensor) -> GradientFn:
    """``gradient(name, param) = mean_j g_j z_j`` for one tensor (``z_j`` regenerated)."""
    q = len(grads)

    def gradient(name: str, param: Tensor) -> Tensor:
        total = torch.zeros_like(param)
        for j in range(q):
            total.add_(directions(j, name, param), alpha=float(grads[j]) / q)
        return total

    return gradient
