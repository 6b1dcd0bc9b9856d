"""Zeroth-order preference optimisation (ZOPrO) of language models as a Lightning plug-in."""

from zopro_lightning.module import ZOPrOModule
from zopro_lightning.optim import ZerothOrderOptimizer
from zopro_lightning.rewards import HFRewardModel, VaderSentimentReward
from zopro_lightning.samplers import GaussianSampler, RademacherSampler, ZOPrOSampler

__all__ = [
    "GaussianSampler",
    "HFRewardModel",
    "RademacherSampler",
    "VaderSentimentReward",
    "ZOPrOModule",
    "ZOPrOSampler",
    "ZerothOrderOptimizer",
]
__version__ = "0.1.0"
