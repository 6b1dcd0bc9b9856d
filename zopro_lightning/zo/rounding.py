"""Stochastic rounding of float32 values to 16-bit floats (docs/algorithm.md §2.3).

A zeroth-order update ``lr * g * z`` is far smaller than one step of bfloat16's grid (8 bits
of mantissa: neighbours about 0.4 % apart), so rounding ``theta - lr g z`` to the nearest
bfloat16 gives back ``theta`` for nearly every weight and the update is lost without a word.
Rounding up or down at random, with the probability of each neighbour proportional to how
close ``x`` is to it, makes the rounded value unbiased: ``E[round(x)] = x``. Many small updates
then move a weight on average as float32 would, at no memory cost (MeZO-style steps keep no
float32 master copy; a compensated remainder would cost 2 bytes a weight more).

- bfloat16 is the upper half of a float32: adding 16 uniform random bits to the lower half and
  truncating rounds the magnitude up with probability ``(lower half) / 2^16``, exactly the
  distance to the lower neighbour over the gap.
- float16 (and any other dtype): the nearest value ``n`` and its neighbour ``m`` on the other
  side of ``x`` (``nextafter``); ``m`` is taken with probability ``|x - n| / |m - n|``.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: dtypes whose updates are rounded stochastically
LOW_PRECISION = (torch.bfloat16, torch.float16)


def round_stochastically(value: Tensor, dtype: torch.dtype, generator: torch.Generator) -> Tensor:
    """``value`` (float32, any shape) rounded to ``dtype`` at random, unbiased: each element goes
    to one of its two neighbours in ``dtype``, the farther with probability ``distance to the
    nearer / gap``. A value ``dtype`` holds exactly is returned unchanged; float32 and wider
    dtypes round to nearest (``value.to(dtype)``).

    Args:
        value: ``[*shape]`` float32.
        dtype: the target dtype (``torch.bfloat16`` or ``torch.float16`` round at random).
        generator: draws the random bits (on ``value``'s device).
    Returns:
        ``[*shape]`` in ``dtype``.
    """
    if dtype not in LOW_PRECISION:
        return value.to(dtype)
    if dtype == torch.bfloat16:
        return _bfloat16(value.float(), generator)
    return _by_neighbours(value.float(), dtype, generator)


def _bfloat16(value: Tensor, generator: torch.Generator) -> Tensor:
    bits = value.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device,
                          generator=generator)  # fmt: skip
    # + noise in the lower half, then truncate: the magnitude rounds up with the lower half's
    # share of the gap; inf stays inf (its lower half is 0 and its mantissa's upper half too)
    finite = torch.isfinite(value)
    rounded = (bits + noise).bitwise_and_(-(1 << 16)).view(torch.float32)
    return torch.where(finite, rounded, value).to(torch.bfloat16)


def _by_neighbours(value: Tensor, dtype: torch.dtype, generator: torch.Generator) -> Tensor:
    nearest = value.to(dtype)
    error = value - nearest.float()  # (*shape) the part the nearest value loses
    toward = torch.where(error > 0, torch.inf, -torch.inf).to(dtype)
    other = torch.nextafter(nearest, toward)  # the neighbour on the other side of ``value``
    gap = (other.float() - nearest.float()).abs()
    chance = torch.where(gap > 0, error.abs() / gap, torch.zeros_like(gap))
    uniform = torch.rand(value.shape, device=value.device, generator=generator)
    take_other = (uniform < chance) & torch.isfinite(other)
    return torch.where(take_other, other, nearest)
