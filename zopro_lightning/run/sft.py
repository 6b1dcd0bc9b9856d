"""Supervised fine-tuning (first-order, typically LoRA): the start of the pipeline
(docs/algorithm.md §2).

The loss is the causal-LM cross-entropy on the completion tokens only (prompt tokens and padding
are masked with ``-100``), each completion followed by EOS so the policy learns to stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning import LightningModule
from torch import Tensor, nn

from zopro_lightning.utils.sharding import shard_under_model_parallel


class SFTCollator:
    """Turns ``(prompt, completion)`` pairs into right-padded ``input_ids``, ``attention_mask``
    and ``labels`` (``-100`` on the prompt and padding)."""

    def __init__(self, tokenizer: Any, max_length: int = 128) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, examples: Sequence[tuple[str, str]]) -> dict[str, Tensor]:
        rows, labels = [], []
        for prompt, completion in examples:
            prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            completion_ids = self.tokenizer(completion, add_special_tokens=False)["input_ids"]
            ids = (prompt_ids + completion_ids + [self.tokenizer.eos_token_id])[: self.max_length]
            rows.append(ids)
            labels.append(([-100] * len(prompt_ids) + ids[len(prompt_ids) :])[: self.max_length])
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        return {
            "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            "labels": torch.tensor([r + [-100] * (width - len(r)) for r in labels]),
        }


class SFTModule(LightningModule):
    """Causal-LM fine-tuning of ``model``'s trainable parameters with AdamW."""

    def __init__(self, model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model

    def configure_model(self) -> None:
        """``trainer=fsdp``: shard the model's blocks (FSDP2); other strategies: nothing."""
        shard_under_model_parallel(self, self.model)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.model(**batch).loss
        self.log("sft/loss", loss, prog_bar=True, on_step=True, batch_size=len(batch["input_ids"]))
        return loss

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
