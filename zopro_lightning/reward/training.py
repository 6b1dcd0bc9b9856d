"""Reward-model training (first-order): Bradley–Terry on preference pairs, or MSE regression on
scores (docs/algorithm.md §2.5).

- pairs ``{prompt, chosen, rejected}``: ``loss = -log sigmoid(r(x, y+) - r(x, y-))``; the
  held-out metric is pairwise accuracy, the fraction of pairs with ``r(x, y+) > r(x, y-)``.
- scores ``{prompt, completion, score}``: ``loss = (r(x, y) - s)^2``; held-out Pearson and
  Spearman correlations (torchmetrics).

Texts are encoded by :class:`~zopro_lightning.reward.callables.HFRewardModel.encode`, the same
code that scores completions during policy learning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torchmetrics
from lightning import LightningModule
from torch import Tensor

from zopro_lightning.reward.callables import HFRewardModel
from zopro_lightning.utils.sharding import shard_under_model_parallel

RewardLoss = Literal["bradley_terry", "mse"]


class PairCollator:
    """Encodes a list of pair dicts into ``chosen`` and ``rejected`` batches."""

    def __init__(self, reward: HFRewardModel) -> None:
        self.reward = reward

    def __call__(self, pairs: Sequence[dict[str, str]]) -> dict[str, dict[str, Tensor]]:
        prompts = [p["prompt"] for p in pairs]
        return {
            "chosen": self.reward.encode(prompts, [p["chosen"] for p in pairs]),
            "rejected": self.reward.encode(prompts, [p["rejected"] for p in pairs]),
        }


class ScoreCollator:
    """Encodes ``{prompt, completion, score}`` dicts into one batch with ``score``."""

    def __init__(self, reward: HFRewardModel) -> None:
        self.reward = reward

    def __call__(self, rows: Sequence[dict]) -> dict[str, object]:
        return {
            "text": self.reward.encode(
                [r["prompt"] for r in rows], [r["completion"] for r in rows]
            ),
            "score": torch.tensor([float(r["score"]) for r in rows]),
        }


class RewardModelModule(LightningModule):
    """Trains the reward model's trainable parameters (LoRA adapters and score head)."""

    def __init__(
        self,
        reward: HFRewardModel,
        loss: RewardLoss = "bradley_terry",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must lie in [0, 1), got {warmup_fraction}.")
        if loss not in ("bradley_terry", "mse"):
            raise ValueError(f"reward-model loss must be 'bradley_terry' or 'mse', got {loss!r}.")
        self.save_hyperparameters(ignore=["reward"])
        self.reward = reward
        self.model = reward.model
        self.val_accuracy = torchmetrics.MeanMetric()
        self.val_pearson = torchmetrics.PearsonCorrCoef()
        self.val_spearman = torchmetrics.SpearmanCorrCoef()

    def configure_model(self) -> None:
        """``trainer=fsdp``: shard the classifier's blocks (FSDP2); other strategies: nothing."""
        shard_under_model_parallel(self, self.model)

    def on_train_start(self) -> None:
        # checkpoints load in eval mode; train with the model's own dropout
        self.model.train()

    def on_train_end(self) -> None:
        self.model.eval()

    def score(self, encoded: dict[str, Tensor]) -> Tensor:
        return self.model(**encoded).logits[:, 0].float()

    def _pair_margin(self, batch) -> Tensor:
        return self.score(batch["chosen"]) - self.score(batch["rejected"])

    def training_step(self, batch, batch_idx: int) -> Tensor:
        if self.hparams.loss == "bradley_terry":
            margin = self._pair_margin(batch)
            loss = -F.logsigmoid(margin).mean()
            self.log(
                "reward_model/train_accuracy",
                (margin > 0).float().mean(),
                on_step=True,
                batch_size=len(margin),
            )
        else:
            loss = F.mse_loss(self.score(batch["text"]), batch["score"].float())
        self.log(
            "reward_model/loss",
            loss,
            prog_bar=True,
            on_step=True,
            batch_size=self._batch_size(batch),
        )
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        if self.hparams.loss == "bradley_terry":
            self.val_accuracy.update((self._pair_margin(batch) > 0).float())
            self.log(
                "reward_model/val_accuracy",
                self.val_accuracy,
                on_epoch=True,
                batch_size=self._batch_size(batch),
            )
        else:
            predicted, target = self.score(batch["text"]), batch["score"].float()
            self.val_pearson.update(predicted, target)
            self.val_spearman.update(predicted, target)
            self.log("reward_model/val_pearson", self.val_pearson, on_epoch=True)
            self.log("reward_model/val_spearman", self.val_spearman, on_epoch=True)

    @staticmethod
    def _batch_size(batch) -> int:
        first = batch["chosen"] if "chosen" in batch else batch["text"]
        return len(first["input_ids"])

    def configure_optimizers(self):
        """AdamW; with ``warmup_fraction`` the learning rate rises linearly over that share of
        the steps and then stays (a large first step can leave a fresh score head stuck at
        chance, loss log 2)."""
        from transformers import get_scheduler

        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.hparams.warmup_fraction * total)
        scheduler = get_scheduler(
            "constant_with_warmup", optimizer, num_warmup_steps=warmup, num_training_steps=total
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def fit_reward_model(
    reward: HFRewardModel,
    rows: Sequence[dict],
    trainer: Any,
    *,
    loss: RewardLoss = "bradley_terry",
    lr: float = 1e-3,
    batch_size: int = 16,
    warmup_fraction: float = 0.0,
    seed: int = 0,
) -> None:
    """First-order training of ``reward`` on pairs (``bradley_terry``) or scored rows
    (``mse``) with ``trainer`` (its ``max_epochs`` sets the epochs), shuffled by a generator
    seeded with ``seed``; the loader's position is part of any checkpoint."""
    from zopro_lightning.data.resumable import ResumableDataLoader

    module = RewardModelModule(reward, loss=loss, lr=lr, warmup_fraction=warmup_fraction)
    loader = ResumableDataLoader(
        list(rows),
        batch_size=batch_size,
        shuffle=True,
        collate_fn=ScoreCollator(reward) if loss == "mse" else PairCollator(reward),
        generator=torch.Generator().manual_seed(seed),
    )
    trainer.fit(module, loader)
    reward.model.eval()
