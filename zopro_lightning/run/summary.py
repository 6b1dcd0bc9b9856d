"""``summary.json``: what a run says of itself, built as the run goes.

:class:`RunSummary` keeps the header the config gives (task, sampler, schedule, seed), the
figures of each phase, and the per-prompt means of every held-out evaluation: all evaluations
sample the same prompts with the same seed, so two of them are paired and the standard error of
a gain is that of the per-prompt differences (``<key>_gain_stderr_per_iteration`` for each
iteration, ``<key>_stderr`` for the whole run). ``<key>`` is ``gold_reward`` when the task has a
gold reward, else ``policy_reward`` (the current reward model's scores).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from zopro_lightning.run.evaluation import paired_difference_stderr
from zopro_lightning.utils.atomic import atomic_write_text

SUMMARY_FILE = "summary.json"


def finite_or_null(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (strict JSON)."""
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_summary(run_dir: Path) -> dict[str, Any]:
    """``RUN_DIR/summary.json`` as ``run_pipeline`` returns it (``null`` back to NaN)."""
    summary = json.loads((Path(run_dir) / SUMMARY_FILE).read_text())

    def nan_for_null(value: Any) -> Any:
        if isinstance(value, list):
            return [nan_for_null(v) for v in value]
        return math.nan if value is None else value

    return {key: nan_for_null(value) for key, value in summary.items()}


class RunSummary(Mapping[str, Any]):
    """The run's summary: a read-only mapping of its entries, changed through its methods.

    Args:
        header: what the config says of the run; kept over a restored summary (a run branched
            from another's state, as ``bench/schedules.py`` does, says what it ran).
        eval_key: ``"gold_reward"`` or ``"policy_reward"``.
    """

    def __init__(self, header: Mapping[str, Any], eval_key: str) -> None:
        self.header = dict(header)
        self.eval_key = eval_key
        self.values: dict[str, Any] = dict(header)
        self.eval_scores: list[list[float]] = []  # per-prompt means of every evaluation

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)

    # -- changes ------------------------------------------------------------------------------
    def set(self, **entries: Any) -> None:
        self.values.update(entries)

    def append(self, key: str, value: Any) -> None:
        """Add ``value`` to the list ``key`` (one entry an iteration)."""
        self.values.setdefault(key, []).append(value)

    def record_evaluation(self, means: Tensor) -> float:
        """Keep one evaluation's ``[P]`` per-prompt means; the paired standard errors of the
        gain since the previous evaluation and since the first. Returns the mean over the
        prompts with a finite mean."""
        self.eval_scores.append(means.tolist())
        if len(self.eval_scores) > 1:
            key = self.eval_key
            previous, first = self.eval_scores[-2], self.eval_scores[0]
            self.append(
                f"{key}_gain_stderr_per_iteration",
                paired_difference_stderr(means, torch.tensor(previous)),
            )
            self.values[f"{key}_stderr"] = paired_difference_stderr(means, torch.tensor(first))
        return float(means[torch.isfinite(means)].mean())

    def last_gain_stderr(self) -> float:
        gains = self.values.get(f"{self.eval_key}_gain_stderr_per_iteration") or [math.nan]
        return float(gains[-1])

    # -- state and file -----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What a state file keeps of the summary (plain data)."""
        return {"summary": dict(self.values), "eval_scores": list(self.eval_scores)}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Back to a state file's summary, with this run's header over it."""
        self.values = dict(state["summary"]) | self.header
        self.eval_scores = list(state.get("eval_scores", []))

    def as_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def write(self, run_dir: Path) -> Path:
        """``RUN_DIR/summary.json``, atomically; non-finite numbers as ``null``."""
        text = json.dumps(finite_or_null(self.values), indent=2, default=float)
        return atomic_write_text(Path(run_dir) / SUMMARY_FILE, text)
