"""Held-out measurements of the pipeline.

- :func:`prompt_mean_rewards` / :func:`mean_gold_reward`: mean reward of the policy's samples
  on each held-out prompt / over all, under a gold reward, or under the reward model itself
  when the task has no gold reward; :func:`paired_difference_stderr`: the standard error of a
  before/after difference on the same prompts and sampling seed.
- :func:`pairwise_accuracy`: the reward model's accuracy on held-out preference pairs.
- :func:`score_correlations`: Pearson and Spearman correlations (torchmetrics) between the
  reward model's scores and held-out quality scores (translation: ``z_mean``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from zopro_lightning.reward.callables import RewardFn, score_completions
from zopro_lightning.rl.rollout import RolloutSettings, decode_completions, generate_completions
from zopro_lightning.utils.progress import progress_bar


@torch.no_grad()
def prompt_mean_rewards(
    policy: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    gold_reward: RewardFn,
    config: RolloutSettings,
    seed: int = 1234,
    batch_size: int = 64,
    progress: str | None = None,
) -> Tensor:
    """``[P]``: the mean gold reward of ``config.k`` sampled completions of each held-out prompt
    (NaN where no completion got a finite score).

    Sampling uses the training temperature and a fixed seed (on a forked RNG, so training's
    random stream is untouched): two evaluations of the same prompts are paired, and their
    difference is the policy's alone (:func:`paired_difference_stderr`). ``progress``: the
    description of a progress bar over the prompts (``None``: no bar).
    """
    policy.eval()
    scores = []
    with torch.random.fork_rng(devices=[]), progress_bar(len(prompts), progress) as bar:
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            ids, _, mask, _ = generate_completions(policy, tokenizer, chunk, config)
            completions = decode_completions(tokenizer, ids, mask)
            repeated = [p for p in chunk for _ in range(config.k)]
            scores.append(score_completions(gold_reward, repeated, completions))
            bar.update(len(chunk))
    rewards = torch.cat(scores).double().view(len(prompts), config.k)  # [P, k]
    return rewards.nanmean(dim=1)


def mean_gold_reward(*args, **kwargs) -> float:
    """Mean gold reward of ``config.k`` sampled completions per held-out prompt: the mean of
    :func:`prompt_mean_rewards` (same arguments) over the prompts with a finite score."""
    means = prompt_mean_rewards(*args, **kwargs)
    return float(means[torch.isfinite(means)].mean())


def paired_difference_stderr(after: Tensor, before: Tensor) -> float:
    """Standard error of the mean of ``after - before`` over prompts (``[P]`` each, paired:
    same prompts, same sampling seed): ``std(d, ddof=1) / sqrt(P)`` over finite ``d``; NaN
    with fewer than two prompts."""
    differences = (after.double() - before.double()).flatten()
    differences = differences[torch.isfinite(differences)]
    if differences.numel() < 2:
        return float("nan")
    return float(differences.std(unbiased=True) / differences.numel() ** 0.5)


@torch.no_grad()
def pairwise_accuracy(reward_fn: RewardFn, pairs: Sequence[dict[str, str]]) -> float:
    """Fraction of pairs whose chosen completion scores above the rejected one."""
    prompts = [p["prompt"] for p in pairs]
    chosen = score_completions(reward_fn, prompts, [p["chosen"] for p in pairs])
    rejected = score_completions(reward_fn, prompts, [p["rejected"] for p in pairs])
    return float((chosen > rejected).float().mean())


@torch.no_grad()
def score_correlations(reward_fn: RewardFn, rows: Sequence[dict]) -> dict[str, float]:
    """Pearson and Spearman correlation of ``reward_fn(prompt, completion)`` with ``score``.

    Args:
        reward_fn: the reward model (any reward callable).
        rows: ``{"prompt", "completion", "score"}`` dicts (the task's held-out scored rows).

    Returns:
        ``{"pearson": r, "spearman": rho}``; NaN when there are fewer than two rows or either
        side is constant (a correlation is undefined there).
    """
    from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

    if len(rows) < 2:
        return {"pearson": float("nan"), "spearman": float("nan")}
    predicted = score_completions(
        reward_fn, [r["prompt"] for r in rows], [r["completion"] for r in rows]
    ).double()
    target = torch.tensor([float(r["score"]) for r in rows], dtype=torch.float64)
    finite = torch.isfinite(predicted)
    predicted, target = predicted[finite], target[finite]
    if len(target) < 2 or predicted.std() == 0 or target.std() == 0:
        return {"pearson": float("nan"), "spearman": float("nan")}
    return {
        "pearson": float(pearson_corrcoef(predicted, target)),
        "spearman": float(spearman_corrcoef(predicted, target)),
    }
