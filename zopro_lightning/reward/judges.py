"""Pairwise judges: which of two completions of the same prompt is better (docs/algorithm.md §2.5).

Every judge follows one protocol
(:class:`~zopro_lightning.reward.judge_protocol.PairwiseJudge`)::

    labels = judge.judge(prompts, first, second)    # float tensor of shape [B]

``labels[i]`` is 1.0 where ``first[i]`` is better, 0.0 where ``second[i]`` is better and
NaN where the judge could not decide; the caller (reward refinement) drops the NaN pairs
and trains the reward model with Bradley–Terry on the rest.

- :class:`RewardJudge`: compares the scores of a reward callable (a gold reward, or a
  reward model used as judge).
- :class:`LLMJudge`: asks an instruction-tuned causal LM "A or B", in both orders
  (:mod:`zopro_lightning.reward.llm_judge`, importable from here too).
- :class:`FileJudge`: looks labels up in a human-labelled JSONL file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from zopro_lightning.reward.judge_protocol import pair_batch_size
from zopro_lightning.reward.llm_judge import LLMJudge

__all__ = ["FileJudge", "LLMJudge", "RewardJudge"]

RewardFn = Callable[[list[str], list[str]], Any]


# --------------------------------------------------------------------------- reward


class RewardJudge:
    """Judge by comparing the scores of a reward callable.

    ``reward_fn(prompts, completions) -> Tensor[B]`` is called once on the ``2B``
    concatenated completions (``first`` then ``second``), so batch-wise normalisation
    inside it treats both sides alike. Label = 1 if ``r(first) - r(second) > tol``,
    0 if ``< -tol``, NaN if ``|difference| <= tol`` (a tie) or a score is not finite.

    Args:
        reward_fn: any reward callable (gold function or reward model).
        tie_tolerance: scores closer than this count as a tie (>= 0).
    """

    def __init__(self, reward_fn: RewardFn, tie_tolerance: float = 0.0) -> None:
        if tie_tolerance < 0:
            raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance}")
        self.reward_fn = reward_fn
        self.tie_tolerance = float(tie_tolerance)

    def judge(
        self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]
    ) -> torch.Tensor:
        """Labels ``[B]``: 1.0 first better, 0.0 second better, NaN tie or invalid score."""
        b = pair_batch_size(prompts, first, second)
        if b == 0:
            return torch.empty(0)
        raw = self.reward_fn(list(prompts) + list(prompts), list(first) + list(second))
        scores = torch.as_tensor(raw).detach().to("cpu", torch.float64).reshape(-1)
        if scores.numel() != 2 * b:
            raise ValueError(
                f"reward_fn returned {tuple(torch.as_tensor(raw).shape)} for {2 * b} "
                f"completions; it must return one score per completion, shape [{2 * b}]"
            )
        diff = scores[:b] - scores[b:]
        valid = scores[:b].isfinite() & scores[b:].isfinite()
        labels = torch.full((b,), math.nan)
        labels[valid & (diff > self.tie_tolerance)] = 1.0
        labels[valid & (diff < -self.tie_tolerance)] = 0.0
        return labels

    __call__ = judge


# --------------------------------------------------------------------------- file

_LABELS = {1: 1.0, 0: 0.0, "first": 1.0, "second": 0.0, "1": 1.0, "0": 0.0}


class FileJudge:
    """Labels from a JSONL file of ``{"prompt", "first", "second", "label"}`` rows.

    ``label`` is 1 / ``"first"`` (first better) or 0 / ``"second"``. Lookup is by the exact
    strings ``(prompt, first, second)``; a pair stored in the other order,
    ``(prompt, second, first)``, is found too and its label flipped. Pairs not in the file
    get NaN and are counted in ``n_missing``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line that is not JSON, lacks a field, has an unknown label, or
            contradicts an earlier line (the message gives the line number).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no judge label file at {str(self.path)!r}")
        self.labels: dict[tuple[str, str, str], float] = {}
        self.n_missing = 0
        with self.path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    self._add(number, line)

    def _add(self, number: int, line: str) -> None:
        where = f"{self.path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg})") from err
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object {{prompt, first, second, label}}")
        for field in ("prompt", "first", "second"):
            if not isinstance(row.get(field), str):
                raise ValueError(f"{where}: field {field!r} is missing or not a string")
        raw = row.get("label")
        key = raw.lower().strip() if isinstance(raw, str) else raw
        if isinstance(key, bool) or key not in _LABELS:
            raise ValueError(f"{where}: label {raw!r} is not 1, 0, 'first' or 'second'")
        label = _LABELS[key]
        pair = (row["prompt"], row["first"], row["second"])
        known = self._lookup(*pair)
        if known is not None and known != label:
            raise ValueError(f"{where}: label contradicts an earlier line for the same pair")
        self.labels[pair] = label

    def _lookup(self, prompt: str, first: str, second: str) -> float | None:
        label = self.labels.get((prompt, first, second))
        if label is None:
            swapped = self.labels.get((prompt, second, first))
            label = None if swapped is None else 1.0 - swapped
        return label

    def __len__(self) -> int:
        return len(self.labels)

    def judge(
        self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]
    ) -> torch.Tensor:
        """Labels ``[B]`` from the file; NaN (and ``n_missing`` += 1) for unknown pairs."""
        b = pair_batch_size(prompts, first, second)
        labels = torch.full((b,), math.nan)
        for i in range(b):
            label = self._lookup(prompts[i], first[i], second[i])
            if label is None:
                self.n_missing += 1
            else:
                labels[i] = label
        return labels

    __call__ = judge
