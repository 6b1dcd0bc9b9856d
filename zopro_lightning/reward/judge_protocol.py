"""The pairwise-judge protocol shared by every judge (docs/algorithm.md §2.5).

A judge answers ``judge(prompts, first, second) -> Tensor[B]``: ``labels[i]`` is 1.0 where
``first[i]`` is better, 0.0 where ``second[i]`` is better and NaN where it could not decide.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

__all__ = ["PairwiseJudge", "pair_batch_size"]


@runtime_checkable
class PairwiseJudge(Protocol):
    """Anything with ``judge(prompts, first, second) -> Tensor[B]`` (1 / 0 / NaN)."""

    def judge(
        self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]
    ) -> torch.Tensor: ...


def pair_batch_size(prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> int:
    """``B = len(prompts)``, after checking that ``first`` and ``second`` have ``B`` entries too.

    Raises:
        ValueError: the three lengths differ.
    """
    if not len(prompts) == len(first) == len(second):
        raise ValueError(
            f"prompts, first and second must have the same length, got "
            f"{len(prompts)}, {len(first)} and {len(second)}"
        )
    return len(prompts)
