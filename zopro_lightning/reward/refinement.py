"""Reward refinement after a policy-learning chunk (docs/algorithm.md §2.5).

For each prompt of the chunk the stored rollout completion meets one fresh completion of the
current policy; the judge says which is better, and the judged pairs train the reward model
(first-order). Optionally the refined adapter is pulled back toward the previous one:
``phi <- alpha * phi_prev + (1 - alpha) * phi_new`` (keep-close merge).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from zopro_lightning.rl.rollout import decode_completions, generate_completions
from zopro_lightning.utils.progress import progress_bar

Judge = Callable[[list[str], list[str], list[str]], Tensor]


def fresh_completions(
    module,
    prompts: Sequence[str],
    batch_size: int = 64,
    progress: str | None = None,
    temperature: float | None = None,
) -> list[str]:
    """One new sampled completion per prompt from the module's current policy (``progress``:
    the description of a progress bar, ``None`` for none; ``temperature``: the sampling
    temperature, ``None`` for the rollout's)."""
    config = module.rollout_config
    config.k = 1
    if temperature is not None:
        config.temperature = float(temperature)
    completions: list[str] = []
    module.policy.eval()
    with progress_bar(len(prompts), progress) as bar:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            ids, _, mask, _ = generate_completions(module.policy, module.tokenizer, chunk, config)
            completions += decode_completions(module.tokenizer, ids, mask)
            bar.update(len(chunk))
    return completions


def judge_in_chunks(
    judge: Judge,
    prompts: list[str],
    first: list[str],
    second: list[str],
    chunk_size: int = 64,
    progress: str | None = None,
) -> Tensor:
    """``[N]`` labels of ``judge`` over the pairs, ``chunk_size`` pairs a call (an LLM judge
    generates for a whole call at once), with a progress bar when ``progress`` is set."""
    labels = []
    with progress_bar(len(prompts), progress) as bar:
        for start in range(0, len(prompts), chunk_size):
            end = start + chunk_size
            chunk = judge(prompts[start:end], first[start:end], second[start:end])
            labels.append(torch.as_tensor(chunk, dtype=torch.float32).reshape(-1))
            bar.update(len(labels[-1]))
    return torch.cat(labels)


def least_confident(
    records: Sequence[tuple[str, str]], scores: Tensor, fraction: float
) -> list[tuple[str, str]]:
    r"""The ``ceil(fraction * N)`` records whose reward ``|r_i|`` is smallest, in their order.

    The reward model is least sure of a completion whose score is near 0 (a Bradley–Terry score
    far from 0 says the model already ranks it with confidence), so a judge's answer teaches
    it most there: the ZOPrO authors judge the 60 % least confident (``fraction = 0.6``).
    ``scores`` is ``[N]``; ties keep the earlier record; a non-finite score counts as least
    confident (``|r| = 0``).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"judge_fraction must lie in (0, 1], got {fraction}.")
    scores = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    if scores.numel() != len(records):
        raise ValueError(
            f"least_confident: {scores.numel()} scores for {len(records)} records; the reward "
            "callable must return one score per (prompt, completion)."
        )
    keep = math.ceil(fraction * len(records))
    confidence = torch.nan_to_num(scores.abs(), nan=0.0, posinf=0.0, neginf=0.0)
    order = torch.sort(confidence, stable=True).indices[:keep]  # [keep]
    return [records[i] for i in sorted(order.tolist())]


def judged_pairs(
    module,
    judge: Judge,
    records: Sequence[tuple[str, str]],
    progress: bool = False,
    temperature: float | None = None,
) -> list[dict[str, str]]:
    """Pairs ``{prompt, chosen, rejected}`` from stored vs fresh completions, as judged
    (``progress``: bars for the fresh completions and the judging; ``temperature``: of the
    fresh completions, ``None`` for the rollout's).

    The judge returns 1 where the first (stored) completion is better, 0 where the second is,
    NaN where it cannot tell; undecided pairs and identical completions are dropped.
    """
    if not records:
        return []
    prompts = [prompt for prompt, _ in records]
    stored = [completion for _, completion in records]
    fresh = fresh_completions(
        module,
        prompts,
        progress="fresh completions" if progress else None,
        temperature=temperature,
    )
    labels = judge_in_chunks(
        judge, prompts, stored, fresh, progress="judging" if progress else None
    )
    pairs = []
    for prompt, first, second, label in zip(prompts, stored, fresh, labels.tolist(), strict=True):
        if first == second or label != label:  # identical, or NaN (undecided)
            continue
        chosen, rejected = (first, second) if label >= 0.5 else (second, first)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


class ReadablePromptJudge:
    """Hands ``judge`` readable prompts instead of the policy's formatted ones.

    A chat prompt formatted with the policy's chat template carries its special tokens
    (``<|start_header_id|>``, ``<|eot_id|>``, ...); inside an LLM judge's question they would be
    read as the judge's own control tokens. ``readable`` maps each formatted prompt to its
    template-free text (:attr:`~zopro_lightning.data.tasks.PreferenceTask.readable_prompts`);
    prompts it does not know pass unchanged. The judged pairs keep the formatted prompts.
    """

    def __init__(self, judge: Judge, readable: Mapping[str, str]) -> None:
        self.judge = judge
        self.readable = readable

    def __call__(self, prompts: list[str], first: list[str], second: list[str]) -> Tensor:
        return self.judge([self.readable.get(p, p) for p in prompts], first, second)


@torch.no_grad()
def keep_close_merge(model: nn.Module, previous: Mapping[str, Tensor], alpha: float) -> None:
    """``phi <- alpha * phi_prev + (1 - alpha) * phi`` on the trainable tensors, in place."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"keep_close_alpha must lie in [0, 1], got {alpha}.")
    for name, param in model.named_parameters():
        if param.requires_grad and name in previous:
            param.mul_(1.0 - alpha).add_(previous[name].to(param), alpha=alpha)


#: counters a judge may keep (the LLM judge's unparseable and inconsistent answers, the file
#: judge's missing pairs); refinement keeps them as totals over ranks
JUDGE_COUNTERS = ("n_queries", "n_unparseable", "n_inconsistent", "n_identical", "n_missing")


def judge_counts(judge: Any) -> dict[str, int]:
    """The judge's counters of :data:`JUDGE_COUNTERS` it has, by attribute name."""
    return {
        name: int(getattr(judge, name))
        for name in JUDGE_COUNTERS
        if isinstance(getattr(judge, name, None), int)
    }


@dataclass(frozen=True)
class RefinementSettings:
    """How the reward model is refined on judged pairs (first-order, Bradley–Terry).

    Attributes:
        epochs: passes over the judged pairs.
        lr: AdamW learning rate.
        batch_size: pairs per step.
        keep_close_alpha: ``alpha`` of the keep-close merge
            ``phi <- alpha * phi_prev + (1 - alpha) * phi_new`` (``None``: no merge).
        warmup_fraction: of the steps, the learning rate's linear warm-up.
        judge_fraction: of the chunk's records, those judged: the ``ceil(fraction N)`` the
            reward model is least confident of (smallest ``|r|``, :func:`least_confident`);
            1.0 (the default) judges all, the ZOPrO authors used 0.6.
        temperature: sampling temperature of the fresh completions (``None``: the rollout's;
            the authors sampled at 0.7).
    """

    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 16
    keep_close_alpha: float | None = None
    warmup_fraction: float = 0.0
    judge_fraction: float = 1.0
    temperature: float | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"refinement epochs and batch_size must be >= 1, got {self.epochs} and "
                f"{self.batch_size}."
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"refinement lr must be finite and > 0, got {self.lr}.")
        if self.keep_close_alpha is not None and not 0.0 <= self.keep_close_alpha <= 1.0:
            raise ValueError(f"keep_close_alpha must lie in [0, 1], got {self.keep_close_alpha}.")
        if not 0.0 < self.judge_fraction <= 1.0:
            raise ValueError(f"judge_fraction must lie in (0, 1], got {self.judge_fraction}.")
        if self.temperature is not None and not (
            math.isfinite(self.temperature) and self.temperature > 0
        ):
            raise ValueError(f"refinement temperature must be > 0, got {self.temperature}.")


class RewardRefinement:
    """Refines a reward model on the policy's own judged completions (docs/algorithm.md §2.5).

    ``refinement(reward, module, records, trainer)`` judges each record's stored completion
    against a fresh one of ``module``'s policy, trains ``reward`` on the judged pairs and applies
    the keep-close merge; returns ``{"pairs", "judged", "dropped"}``. Under DDP (``trainer``
    with several processes) each rank judges its own records, every rank trains on every
    rank's pairs, and the judge's counters are totals over ranks.

    Args:
        judge: ``judge(prompts, first, second) -> Tensor[N]`` (1: first better, 0: second,
            NaN: undecided).
        settings: epochs, learning rate, batch size, keep-close ``alpha``.
        trainer_factory: ``factory(max_epochs=...) -> Trainer`` for the reward model's fit
            (default: a quiet CPU/GPU ``Trainer`` without loggers or checkpoints).
        seed: seeds the shuffling of the judged pairs.
        progress: progress bars for the fresh completions and the judging.
    """

    def __init__(
        self,
        judge: Judge,
        settings: RefinementSettings | None = None,
        trainer_factory: Callable[..., Any] | None = None,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        self.judge = judge
        self.settings = settings or RefinementSettings()
        self.trainer_factory = trainer_factory or quiet_trainer
        self.seed = seed
        self.progress = progress

    def __call__(
        self, reward: Any, module: Any, records: Sequence[tuple[str, str]], trainer: Any = None
    ) -> dict[str, int]:
        from zopro_lightning.models.loading import trainable_state
        from zopro_lightning.reward.training import fit_reward_model

        records = self.selected(reward, records)
        pairs, judged = self.judged(module, records, trainer)
        before = trainable_state(reward.model)
        settings = self.settings
        if pairs:
            fit_reward_model(
                reward,
                pairs,
                self.trainer_factory(max_epochs=settings.epochs),
                loss="bradley_terry",
                lr=settings.lr,
                batch_size=settings.batch_size,
                warmup_fraction=settings.warmup_fraction,
                seed=self.seed,
            )
        if settings.keep_close_alpha is not None:
            keep_close_merge(reward.model, before, settings.keep_close_alpha)
        return {"pairs": len(pairs), "judged": judged, "dropped": judged - len(pairs)}

    def selected(
        self, reward: Any, records: Sequence[tuple[str, str]]
    ) -> Sequence[tuple[str, str]]:
        """The records to judge: all, or the least confident ``judge_fraction`` of them under
        ``reward`` (``reward(prompts, completions) -> Tensor[N]``, the model being refined)."""
        fraction = self.settings.judge_fraction
        if fraction >= 1.0 or not records:
            return records
        scores = reward([p for p, _ in records], [c for _, c in records])
        return least_confident(records, scores, fraction)

    def judged(
        self, module: Any, records: Sequence[tuple[str, str]], trainer: Any = None
    ) -> tuple[list[dict[str, str]], int]:
        """``(pairs, judged)``: every rank's judged pairs and how many records were judged."""
        from zopro_lightning.utils.distributed import gather_objects, is_multi_process

        judge = self.judge
        inner = judge.judge if isinstance(judge, ReadablePromptJudge) else judge  # counters
        counts_before = judge_counts(inner)
        pairs = judged_pairs(
            module, judge, records, progress=self.progress, temperature=self.settings.temperature
        )
        if trainer is None or not is_multi_process(trainer):
            return pairs, len(records)
        shares = gather_objects([(len(records), judge_counts(inner))], trainer)
        for name, count in counts_before.items():  # the judge's counters: totals again
            setattr(inner, name, count + sum(c[name] - count for _, c in shares))
        return gather_objects(pairs, trainer), sum(n for n, _ in shares)


def quiet_trainer(**options: Any) -> Any:
    """A ``Trainer`` for a reward-model fit inside another fit: no loggers, checkpoints, model
    summary or progress bar; the accelerator Lightning picks."""
    import lightning as L

    defaults = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "enable_progress_bar": False,
    }
    return L.Trainer(**(defaults | options))
