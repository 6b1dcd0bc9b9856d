"""Reward callables: ``reward_fn(prompts, completions) -> Tensor[B]``.

Any callable of that shape works as the policy's reward. Provided here:

- :class:`HFRewardModel`: any ``AutoModelForSequenceClassification`` with its own tokenizer
  (the reward model may use another tokenizer than the policy).
- :class:`VaderSentimentReward`: the gold reward of the embedded task, VADER's compound
  sentiment score of the completion, in ``[-1, 1]``.

:func:`score_completions` is the boundary every reward goes through: it turns a reward that
raises, returns the wrong shape or returns only non-finite values into an error that names the
reward and what it returned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

RewardFn = Callable[[list[str], list[str]], Tensor]


class RewardError(ValueError):
    """A reward callable misbehaved (raised, wrong shape, no finite value)."""


def reward_name(reward_fn: object) -> str:
    return getattr(reward_fn, "__qualname__", None) or type(reward_fn).__name__


def score_completions(reward_fn: RewardFn, prompts: list[str], completions: list[str]) -> Tensor:
    """Call ``reward_fn`` and check its output.

    Returns:
        ``[B]`` float32 rewards on the CPU; some may be NaN (the caller leaves those out).

    Raises:
        RewardError: the reward raised, returned something that is not ``B`` numbers, or
            returned no finite value.
    """
    name = reward_name(reward_fn)
    try:
        raw = reward_fn(prompts, completions)
    except Exception as error:  # noqa: BLE001 - re-raised with the reward's name
        raise RewardError(
            f"reward {name} raised {type(error).__name__}: {error} "
            f"(called on {len(completions)} completions)"
        ) from error
    try:
        rewards = torch.as_tensor(raw, dtype=torch.float32).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as error:
        raise RewardError(
            f"reward {name} returned {type(raw).__name__}, not numbers; it must return a "
            f"Tensor of shape [{len(completions)}]"
        ) from error
    if rewards.ndim == 2 and rewards.shape[1] == 1:
        rewards = rewards[:, 0]
    if tuple(rewards.shape) != (len(completions),):
        raise RewardError(
            f"reward {name} returned shape {tuple(rewards.shape)} for {len(completions)} "
            f"completions; it must return one score per completion, shape [{len(completions)}]"
        )
    if not torch.isfinite(rewards).any():
        raise RewardError(
            f"reward {name} returned no finite value (e.g. {rewards[:4].tolist()}); "
            "check the reward model's inputs and dtype"
        )
    return rewards


class VaderSentimentReward:
    """VADER compound sentiment of each completion, in ``[-1, 1]`` (the prompt is ignored)."""

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> Tensor:
        return torch.tensor(
            [self._analyzer.polarity_scores(text)["compound"] for text in completions],
            dtype=torch.float32,
        )

    def __repr__(self) -> str:
        return "VaderSentimentReward()"


class HFRewardModel:
    """Scores ``prompt + completion`` with a sequence classifier's first logit.

    Args:
        model: an ``AutoModelForSequenceClassification`` (``num_labels=1``), possibly PEFT.
        tokenizer: the reward model's own tokenizer.
        batch_size: texts per forward.
        max_length: texts are truncated from the left to this many tokens (the completion,
            at the end, is what matters).
    """

    def __init__(
        self, model: nn.Module, tokenizer, batch_size: int = 32, max_length: int = 512
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **kwargs) -> HFRewardModel:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
        model = AutoModelForSequenceClassification.from_pretrained(str(name_or_path), num_labels=1)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
        return cls(model.eval(), tokenizer, **kwargs)

    def encode(self, prompts: Sequence[str], completions: Sequence[str]) -> dict[str, Tensor]:
        """Tokenise ``prompt + completion`` pairs for the classifier: right padding (positions
        start at 0 for every text), truncation from the left."""
        sides = self.tokenizer.truncation_side, self.tokenizer.padding_side
        self.tokenizer.truncation_side, self.tokenizer.padding_side = "left", "right"
        try:
            return self.tokenizer(
                [p + c for p, c in zip(prompts, completions, strict=True)],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
                add_special_tokens=False,
            )
        finally:
            self.tokenizer.truncation_side, self.tokenizer.padding_side = sides

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> Tensor:
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        scores = []
        with torch.no_grad():
            for start in range(0, len(completions), self.batch_size):
                batch = self.encode(
                    prompts[start : start + self.batch_size],
                    completions[start : start + self.batch_size],
                )
                batch = {key: value.to(device) for key, value in batch.items()}
                scores.append(self.model(**batch).logits[:, 0].float().cpu())
        self.model.train(was_training)
        return torch.cat(scores)

    def __repr__(self) -> str:
        return f"HFRewardModel({type(self.model).__name__})"
