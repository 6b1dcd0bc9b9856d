"""Reward callables: ``reward_fn(prompts, completions) -> Tensor[B]``.

Any callable of that shape works as the policy's reward. Provided here:

- :class:`HFRewardModel`: any ``AutoModelForSequenceClassification`` with its own tokenizer
  (the reward model may use another tokenizer than the policy).
- :class:`VaderSentimentReward`: the gold reward of the embedded task, VADER's compound
  sentiment score of the completion, in ``[-1, 1]``.

:func:`score_completions` is the boundary every reward goes through: it turns a reward that
raises, returns the wrong shape or returns only non-finite values into an error that names the
reward and what it returned. Some non-finite values among finite ones pass (they are left out
of the advantages, :func:`~zopro_lightning.rl.objectives.rloo_advantages`);
:class:`NonFiniteRewards` counts them and warns, rate-limited.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

RewardFn = Callable[[list[str], list[str]], Tensor]

log = logging.getLogger(__name__)


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


class NonFiniteRewards:
    """Counts the non-finite rewards of each policy update and warns about them, rate-limited.

    :meth:`record` is called once per update with that update's rewards. An update with
    non-finite rewards warns at most once, and only the 1st, 2nd, 4th, 8th, ... such update
    warns (each message gives the running totals), so a reward that keeps returning ``inf``
    is reported without flooding the log.

    Attributes:
        total: non-finite rewards so far.
        updates: updates that had at least one.
    """

    def __init__(self) -> None:
        self.total = 0
        self.updates = 0

    def record(self, rewards: Iterable[Tensor], update: int) -> int:
        """Count the non-finite values of one update's ``rewards`` (``[N]`` tensors); return how
        many there were."""
        values = torch.cat([r.detach().reshape(-1).cpu() for r in rewards])
        bad = ~torch.isfinite(values)
        count = int(bad.sum())
        if count == 0:
            return 0
        self.total += count
        self.updates += 1
        if self.updates & (self.updates - 1) == 0:  # a power of two: 1, 2, 4, 8, ...
            nan = int(torch.isnan(values).sum())
            pos = int((values == float("inf")).sum())
            log.warning(
                "update %d: %d of %d rewards were not finite (%d NaN, %d +inf, %d -inf) and were "
                "left out of the advantages (advantage 0); %d in %d updates so far (this "
                "warning repeats at the 1st, 2nd, 4th, 8th, ... such update). Check the reward "
                "function: a non-finite score is usually an overflow or a division by zero.",
                update, count, values.numel(), nan, pos, count - nan - pos,
                self.total, self.updates,
            )  # fmt: skip
        return count


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
