"""Held-out measurements of the pipeline: mean gold reward of the policy's samples on held-out
prompts, and the reward model's pairwise accuracy on held-out pairs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from zopro_lightning.rewards import RewardFn, score_completions
from zopro_lightning.rollout import RolloutConfig, decode_completions, generate_completions


@torch.no_grad()
def mean_gold_reward(
    policy: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    gold_reward: RewardFn,
    config: RolloutConfig,
    seed: int = 1234,
    batch_size: int = 64,
) -> float:
    """Mean gold reward of ``config.k`` sampled completions per held-out prompt.

    Sampling uses the training temperature and a fixed seed (on a forked RNG, so training's
    random stream is untouched): before/after numbers differ by the policy alone.
    """
    policy.eval()
    scores = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            ids, _, mask, _ = generate_completions(policy, tokenizer, chunk, config)
            completions = decode_completions(tokenizer, ids, mask)
            repeated = [p for p in chunk for _ in range(config.k)]
            scores.append(score_completions(gold_reward, repeated, completions))
    rewards = torch.cat(scores)
    return float(rewards[torch.isfinite(rewards)].mean())


@torch.no_grad()
def pairwise_accuracy(reward_fn: RewardFn, pairs: Sequence[dict[str, str]]) -> float:
    """Fraction of pairs whose chosen completion scores above the rejected one."""
    prompts = [p["prompt"] for p in pairs]
    chosen = score_completions(reward_fn, prompts, [p["chosen"] for p in pairs])
    rejected = score_completions(reward_fn, prompts, [p["rejected"] for p in pairs])
    return float((chosen > rejected).float().mean())
