"""Perturbations confined to a low-dimensional subspace per tensor (issue #19, H1 and H2).

One SPSA estimate ``g z`` with ``z ~ N(0, I_D)`` has expected cosine about ``1 / sqrt(D)`` with
the gradient (``bench/snr.py``: 0.003 at ``D = 17,408``). Drawing ``z`` inside a ``K``-dim
subspace that holds a fraction ``f = ||P G|| / ||G||`` of the gradient raises that to about
``f / sqrt(K)``: a win where ``f`` stays above ``sqrt(K / D)`` (a random subspace holds
exactly that much on average, so only its per-step alignment changes, not the expected
progress per unit of noise; see :class:`SubspaceSampler`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from zopro_lightning.zo.directions import canonical_name
from zopro_lightning.zo.draws import derive_seed

__all__ = ["SubspaceSampler", "orthonormal_rows"]

Basis = Literal["random", "lowrank", "directions", "gradients"]
Scale = Literal["isotropic", "unit"]


def orthonormal_rows(rows: Tensor, tol: float = 1e-6) -> Tensor:
    """``[m', D]`` orthonormal rows spanning ``rows`` (``[m, D]``, any scale), ``m' <= m``:
    QR of ``rows^T``, keeping the columns whose ``|R_ii|`` exceeds ``tol * max |R_ii|`` (a row
    that adds nothing new is dropped). Zero rows in, ``[0, D]`` out."""
    rows = rows.detach().double().reshape(rows.shape[0], -1)
    if rows.shape[0] == 0 or not torch.isfinite(rows).all():
        return rows.new_zeros((0, rows.shape[-1])).float()
    q, r = torch.linalg.qr(rows.T)  # q [D, m], r [m, m]
    diag = r.diagonal().abs()
    keep = diag > tol * float(diag.max()) if float(diag.max()) > 0 else diag > 1.0
    return q[:, keep].T.contiguous().float()


class SubspaceSampler:
    r"""``z`` drawn inside a low-dimensional subspace of each trainable tensor.

    For tensor ``n`` (flattened, ``D_n`` values) with an orthonormal basis
    ``B_n`` (``[D_n, K_n]``, ``B_n^T B_n = I``) and ``w ~ N(0, I_{K_n})`` drawn from the step's
    seeded generator:

    .. math::
        z_n = c_n B_n w, \qquad \mathbb E[z_n z_n^T] = c_n^2 P_n, \quad P_n = B_n B_n^T,

    with ``c_n = sqrt(D_n / K_n)`` (``scale="isotropic"``: ``E ||z_n||^2 = D_n`` as for a
    Gaussian draw, so ``eps`` keeps its meaning) or ``c_n = 1`` (``scale="unit"``). The SPSA
    estimate ``g z`` then has mean ``c^2 P grad L`` (plus the finite-difference error): the
    gradient's component inside the subspace. Only ``w`` comes from the generator, so the same
    seed gives the same ``z`` at every use (perturb, restore, update) while the basis is kept.

    Bases (``basis``):

    - ``"random"`` (intrinsic dimension / SubZero style): ``B_n`` = QR of a ``[D_n, K_n]``
      Gaussian matrix drawn from ``(seed, refresh count, name)``, ``K_n = min(rank, D_n)``.
    - ``"lowrank"`` (LOZO): for a matrix ``[m, n]``, ``z = c U V^T`` with a kept orthonormal
      ``V`` (``[n, r]``, ``r = min(rank, n)``) and ``U ~ N(0, I_{m x r})`` drawn each step: the
      subspace ``{U V^T}`` of dimension ``K = m r``, ``c = sqrt(n / r)`` when isotropic.
      Tensors that are not matrices use the random basis.
    - ``"directions"``: the span of directions given by :meth:`set_basis` (e.g. first-order
      gradients, the policy's past updates), orthonormalised; a tensor without given
      directions uses the random basis.
    - ``"gradients"``: the span of the last ``rank`` first-order batch gradients the module
      handed to :meth:`observe_gradients` (its first-order updates do, before each optimizer
      step), taken at each :meth:`set_directions` (each iteration's end). In the published
      schedule the zeroth-order iterations search the span of first-order iteration 0's last
      gradients (``bench/snr.py``: it holds 0.41-0.48 of the next iteration's population
      gradient in ``K = 8`` dimensions a tensor). It keeps ``rank`` float32 copies of the
      trainable tensors on the CPU: meant for LoRA. A zeroth-order step before any gradient
      was observed raises.

    Random parts (``B_n`` of ``"random"``, ``V`` of ``"lowrank"``) are redrawn every
    ``refresh_every`` policy updates (``None``: never by count) and, when
    ``refresh_on_directions``, at each :meth:`set_directions` (each iteration's end). They
    are a function of ``(seed, refresh count, name)``, so the state is that count.

    Args:
        rank: ``k``: the subspace's dimension per tensor (``"lowrank"``: columns of ``V``).
        basis: ``"random"``, ``"lowrank"`` or ``"directions"``.
        refresh_every: policy updates between redraws of the random parts (``None``: never).
        refresh_on_directions: also redraw at each :meth:`set_directions`.
        seed: seeds the random parts (not ``w``, which the step's generator draws).
        scale: ``"isotropic"`` or ``"unit"`` (above).
    """

    def __init__(
        self,
        rank: int = 64,
        basis: Basis = "random",
        refresh_every: int | None = None,
        refresh_on_directions: bool = True,
        seed: int = 0,
        scale: Scale = "isotropic",
    ) -> None:
        if int(rank) < 1:
            raise ValueError(f"SubspaceSampler: rank must be >= 1, got {rank}.")
        if basis not in ("random", "lowrank", "directions", "gradients"):
            raise ValueError(
                f"SubspaceSampler: unknown basis {basis!r}; use 'random', 'lowrank', "
                "'directions' or 'gradients'."
            )
        if refresh_every is not None and int(refresh_every) < 1:
            raise ValueError(
                f"SubspaceSampler: refresh_every must be >= 1 or null, got {refresh_every}."
            )
        if scale not in ("isotropic", "unit"):
            raise ValueError(
                f"SubspaceSampler: unknown scale {scale!r}; use 'isotropic' or 'unit'."
            )
        self.rank = int(rank)
        self.basis = basis
        self.refresh_every = None if refresh_every is None else int(refresh_every)
        self.refresh_on_directions = bool(refresh_on_directions)
        self.seed = int(seed)
        self.scale = scale
        self.num_steps = 0
        self.refreshes = 0
        self._given: dict[str, Tensor] = {}  # "directions": [K_n, D_n] orthonormal rows
        self._recent: dict[str, Tensor] = {}  # "gradients": [m_n <= rank, D_n], newest first
        self._cache: dict[str, Tensor] = {}  # random parts of the current refresh

    # -- bases --------------------------------------------------------------------------------
    def set_basis(self, directions: Mapping[str, Tensor]) -> dict[str, int]:
        """The directions each tensor's subspace spans (``basis="directions"``): per name a
        ``[m, *shape]`` (or ``[m, D_n]``) stack, orthonormalised (at most ``rank`` kept, the
        first ones first). Replaces earlier ones; returns the dimension kept per tensor."""
        given = {}
        for raw, rows in directions.items():
            rows = rows.detach().reshape(rows.shape[0], -1)[: self.rank]
            basis = orthonormal_rows(rows)
            if basis.shape[0]:
                given[canonical_name(raw)] = basis
        self._given = given
        return {name: int(b.shape[0]) for name, b in given.items()}

    def observe_gradients(self, gradients: Mapping[str, Tensor]) -> None:
        """One first-order update's batch gradient, by trainable tensor name (``basis=
        "gradients"``; other bases ignore it): kept, newest first, with the ``rank - 1``
        before it, as float32 on the CPU. A sharded (``DTensor``) gradient is gathered."""
        if self.basis != "gradients":
            return
        for raw, grad in gradients.items():
            if grad is None:
                continue
            if hasattr(grad, "full_tensor"):  # FSDP2 shard: the whole tensor's gradient
                grad = grad.full_tensor()
            row = grad.detach().reshape(1, -1).to(device="cpu", dtype=torch.float32)
            key = canonical_name(raw)
            kept = self._recent.get(key)
            stack = row if kept is None else torch.cat([row, kept[: self.rank - 1]])
            self._recent[key] = stack

    def _random(self, key: str, rows: int, cols: int) -> Tensor:
        """``[rows, cols]`` orthonormal columns (``cols <= rows``), a function of
        ``(seed, refreshes, key)``."""
        cached = self._cache.get(key)
        if cached is None:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, self.refreshes, key))
            gaussian = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
            cached = torch.linalg.qr(gaussian)[0].float()  # [rows, cols]
            self._cache[key] = cached
        return cached

    def dimension(self, name: str, shape: tuple[int, ...]) -> int:
        """``K_n``: the subspace's dimension for tensor ``name`` of ``shape``."""
        numel = math.prod(shape)
        key = canonical_name(name)
        if self.basis in ("directions", "gradients") and key in self._given:
            return int(self._given[key].shape[0])
        if self.basis == "lowrank" and len(shape) == 2:
            return shape[0] * min(self.rank, shape[1])
        return min(self.rank, numel)

    def sample(self, name: str, param: Tensor, generator: torch.Generator) -> Tensor:
        r"""``z_n = c_n B_n w`` shaped and typed like ``param``; ``w`` (``[K_n]``, or ``U``
        ``[m, r]`` for ``"lowrank"``) from ``generator``.

        Raises:
            ValueError: a given basis has another number of values than ``param``; or
                ``basis="gradients"`` before any first-order gradient was taken into a basis.
        """
        key = canonical_name(name)
        if self.basis == "gradients" and not self._given:
            raise ValueError(
                "SubspaceSampler(basis='gradients') has no gradients to span: its subspace is "
                "built from first-order updates' gradients at an iteration's end. Run a "
                "first-order phase first (loop.schedule=first_order_then_zeroth_order) or use "
                "basis='random'."
            )
        numel, device = param.numel(), generator.device
        if self.basis == "lowrank" and param.ndim == 2:
            m, n = param.shape
            r = min(self.rank, n)
            v = self._random(key, n, r).to(device)  # [n, r]
            u = torch.randn(m, r, generator=generator, device=device)  # [m, r]
            z = (u @ v.T) * (math.sqrt(n / r) if self.scale == "isotropic" else 1.0)  # [m, n]
            return z.to(device=param.device, dtype=param.dtype)
        if self.basis in ("directions", "gradients") and key in self._given:
            rows = self._given[key]  # [K, D]
            if rows.shape[1] != numel:
                raise ValueError(
                    f"SubspaceSampler: the basis set for {name!r} has {rows.shape[1]} values a "
                    f"direction but the parameter has {numel}; set_basis with this model's "
                    "tensors."
                )
            basis = rows.T.to(device)  # [D, K]
        else:
            basis = self._random(key, numel, min(self.rank, numel)).to(device)  # [D, K]
        k = basis.shape[1]
        w = torch.randn(k, generator=generator, device=device)  # [K]
        z = basis @ w * (math.sqrt(numel / k) if self.scale == "isotropic" else 1.0)  # [D]
        return z.view_as(param).to(dtype=param.dtype)

    def refresh(self) -> None:
        """Draw new random parts (the next refresh count)."""
        self.refreshes += 1
        self._cache.clear()

    # -- protocol -----------------------------------------------------------------------------
    def step(self) -> None:
        """One policy update; a refresh every ``refresh_every`` of them."""
        self.num_steps += 1
        if self.refresh_every is not None and self.num_steps % self.refresh_every == 0:
            self.refresh()

    def set_horizon(self, steps: int) -> None:
        return None

    def set_directions(
        self,
        policy_update: Mapping[str, Tensor] | None,
        reward_update: Mapping[str, Tensor] | None = None,
    ) -> int:
        """An iteration ended: a refresh when ``refresh_on_directions``; with ``basis=
        "gradients"``, the span of the gradients observed last becomes the basis (kept while
        none arrive, as in zeroth-order iterations). The updates are not used
        (:meth:`set_basis` sets a basis from directions); nothing is matched."""
        if self.refresh_on_directions:
            self.refresh()
        if self.basis == "gradients" and self._recent:
            self.set_basis(self._recent)
        return 0

    def metrics(self) -> dict[str, float]:
        """``subspace_refreshes``: how many times the random parts were redrawn; with
        ``basis="gradients"``, ``subspace_dimension``: the basis's total ``sum_n K_n``."""
        out = {"subspace_refreshes": float(self.refreshes)}
        if self.basis == "gradients":
            out["subspace_dimension"] = float(sum(b.shape[0] for b in self._given.values()))
        return out

    def state_dict(self) -> dict[str, Any]:
        """The counts (random parts are redrawn from them), the given bases and the observed
        gradients, on the CPU."""
        return {
            "num_steps": self.num_steps,
            "refreshes": self.refreshes,
            "given": {n: t.cpu() for n, t in self._given.items()},
            "recent": {n: t.cpu() for n, t in self._recent.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.num_steps = int(state["num_steps"])
        self.refreshes = int(state["refreshes"])
        self._given = {n: t.clone() for n, t in state.get("given", {}).items()}
        self._recent = {n: t[: self.rank].clone() for n, t in state.get("recent", {}).items()}
        self._cache.clear()

    def __repr__(self) -> str:
        return (
            f"SubspaceSampler(rank={self.rank}, basis={self.basis!r}, "
            f"refresh_every={self.refresh_every}, scale={self.scale!r})"
        )
