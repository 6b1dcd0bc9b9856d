"""Zeroth-order preference optimisation (ZOPrO) of language models as a Lightning plug-in.

The public names load lazily, so light entry points (``zopro-viz``) do not import Lightning
and transformers before they need them.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ZOPrOModule": "zopro_lightning.policy.module",
    "ZerothOrderOptimizer": "zopro_lightning.zo.optim",
    "HFRewardModel": "zopro_lightning.reward.callables",
    "VaderSentimentReward": "zopro_lightning.reward.callables",
    "GaussianSampler": "zopro_lightning.zo.samplers",
    "RademacherSampler": "zopro_lightning.zo.samplers",
    "ZOPrOSampler": "zopro_lightning.zo.samplers",
    "ZOPrOIterations": "zopro_lightning.callbacks.zopro",
    "IterationSchedule": "zopro_lightning.callbacks.zopro",
    "RewardRefinement": "zopro_lightning.reward.refinement",
    "RefinementSettings": "zopro_lightning.reward.refinement",
    "OptimizerSettings": "zopro_lightning.policy.optimization",
    "RolloutSettings": "zopro_lightning.rl.rollout",
    "SPSASettings": "zopro_lightning.zo.optim",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'zopro_lightning' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
