"""The previous-update directions the ZOPrO sampler steers by (docs/algorithm.md §2.4).

- :func:`canonical_name`: one name for a policy tensor and its reward-model twin.
- :func:`isotropic_factor`: the factor ``c`` that gives the targeted direction a Gaussian
  draw's norm.
- :func:`smoothed_directions`: the blend of the previous and the new policy update.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from torch import Tensor

__all__ = ["canonical_name", "isotropic_factor", "smoothed_directions"]

_ADAPTER_SEGMENT = re.compile(r"\.(lora_[A-Za-z_]+|modules_to_save)\.[^.]+\.")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_forward_module.")


def canonical_name(name: str) -> str:
    """Name of a parameter with wrapper prefixes and adapter names removed.

    ``base_model.model.model.layers.0.q_proj.lora_A.default.weight`` becomes
    ``model.layers.0.q_proj.lora_A.weight`` for a PEFT causal LM and for a PEFT
    sequence classifier built from the same base alike, so policy and reward-model tensors of
    the same layer share a name (docs/algorithm.md §2.4).
    """
    changed = True
    while changed:
        changed = False
        for prefix in (*_WRAPPER_PREFIXES, "base_model.model."):
            if name.startswith(prefix):
                name = name[len(prefix) :]
                changed = True
    return _ADAPTER_SEGMENT.sub(lambda m: f".{m.group(1)}.", name)


def isotropic_factor(mu: Mapping[str, Tensor]) -> float:
    r"""The one factor that gives the targeted direction a Gaussian draw's norm.

    .. math::
        c = \sqrt{\textstyle\sum_n D_n} \,/\, \sqrt{\textstyle\sum_n \lVert\mu_n\rVert^2}

    over the usable (finite, non-zero) ``mu_n``, ``D_n`` their numbers of elements; 1.0 when
    none is usable.
    """
    squared = {n: float(t.double().pow(2).sum()) for n, t in mu.items()}
    usable = [n for n, sq in squared.items() if math.isfinite(sq) and sq > 0]
    if not usable:
        return 1.0
    return math.sqrt(sum(mu[n].numel() for n in usable) / sum(squared[n] for n in usable))


def _total_norm(tensors: Mapping[str, Tensor]) -> float:
    r"""``sqrt(sum_n ||t_n||^2)`` over all tensors; 0.0 when that is not finite and positive."""
    total = sum(float(t.double().pow(2).sum()) for t in tensors.values())
    return math.sqrt(total) if math.isfinite(total) and total > 0 else 0.0


def smoothed_directions(
    previous: Mapping[str, Tensor], new: Mapping[str, Tensor], smoothing: float
) -> dict[str, Tensor]:
    r"""The blend of two directions whatever their scales.

    .. math::
        \mu_n \leftarrow \Bigl(s\,\frac{\mu^{prev}_n}{\lVert\mu^{prev}\rVert}
        + (1 - s)\,\frac{\mu^{new}_n}{\lVert\mu^{new}\rVert}\Bigr)\,\lVert\mu^{new}\rVert

    with norms over all tensors. A tensor without a same-shaped predecessor keeps
    ``(1 - s) new``; when either total norm is 0 (or not finite), ``new`` is returned as it is.
    """
    old_norm, new_norm = _total_norm(previous), _total_norm(new)
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
