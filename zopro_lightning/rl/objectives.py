"""RLOO advantages, the sequence-level KL penalty and the clipped surrogate
(docs/algorithm.md §2.1–2.2).

Completions are laid out prompt-major: for ``B`` prompts and ``k`` completions each, row
``b * k + j`` is completion ``j`` of prompt ``b`` (``N = B * k`` rows in all).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from zopro_lightning.rl.rollout import RolloutSettings


def sequence_kl(old_logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``KL_i = sum_t (log pi_old(y_t) - log pi_ref(y_t))``, from ``[N]`` sequence sums."""
    return old_logprobs - ref_logprobs


def rlhf_rewards(rewards: Tensor, kl: Tensor, beta: float) -> Tensor:
    """``rho_i = r_i - beta * KL_i`` (``[N]``)."""
    return rewards - beta * kl


def rloo_advantages(rewards: Tensor, k: int) -> Tensor:
    """REINFORCE-leave-one-out advantages.

    For each prompt's group of ``k`` rewards ``rho_1..rho_k``:
    ``b_i = (sum_j rho_j - rho_i) / (k - 1)`` and ``A_i = rho_i - b_i``.

    Non-finite rewards (NaN, +inf or -inf) are left out: the baseline averages the finite
    rewards of the other members, the left-out completion gets advantage 0 (it does not move
    the policy), and a group with fewer than two finite rewards gets advantages 0. The module
    counts them and warns (:class:`zopro_lightning.reward.callables.NonFiniteRewards`).

    Why ±inf is left out rather than clamped: an infinite score has no magnitude to keep, so
    any finite stand-in (the batch's largest reward, a constant) is invented. Clamped to the
    top of the group, a +inf completion would tie with or beat the best real one; clamped to a
    large constant, its advantage would dominate the batch (the more so after scaling to unit
    std) and every update would push the policy towards whatever broke the reward (an
    overflowing logit, a division by zero): reward hacking of a bug. Left out, it is neutral,
    as a NaN is, and the other members keep a finite baseline.

    Args:
        rewards: ``[B * k]`` prompt-major.
        k: completions per prompt, ``>= 2``.

    Returns:
        ``[B * k]`` advantages.
    """
    if k < 2:
        raise ValueError(f"rloo_advantages: k must be >= 2 for a leave-one-out baseline, got {k}.")
    if rewards.numel() % k:
        raise ValueError(
            f"rloo_advantages: {rewards.numel()} rewards are not a whole number of groups of {k}."
        )
    grouped = rewards.reshape(-1, k).double()
    finite = torch.isfinite(grouped)
    values = torch.where(finite, grouped, torch.zeros_like(grouped))
    count = finite.sum(dim=1, keepdim=True)
    others = (count - finite.long()).clamp(min=1)
    baseline = (values.sum(dim=1, keepdim=True) - values) / others
    advantages = torch.where(finite & (count >= 2), values - baseline, torch.zeros_like(values))
    return advantages.reshape(-1).to(rewards.dtype)


def scale_to_unit_std(advantages: Tensor, floor: float = 1e-8) -> Tensor:
    """``A / std(A)`` over the batch (``[N]``).

    The reward model's scale drifts as it is refined; without this, the size of every
    zeroth-order step (``lr * g * z`` with ``g`` proportional to ``A``) drifts with it. Zeros
    (left-out completions) stay zero.
    """
    return advantages / (advantages.std() + floor) if advantages.numel() > 1 else advantages


def shaped_advantages(
    scores: Tensor, eos: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor, config: RolloutSettings
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A rollout's rewards and advantages from the reward callable's ``scores``, each ``[N]``.

    ``r_i = scores_i - missing_eos_penalty * [no EOS in completion i]`` (no penalty when
    ``None``); ``KL_i = log pi_old(y_i) - log pi_ref(y_i)``; ``rho_i = r_i - beta KL_i``;
    ``A`` the RLOO advantages of ``rho`` over each prompt's ``k`` rows, divided by ``std(A)``
    with ``normalize_advantages``.

    Returns:
        ``(r, KL, rho, A)``.
    """
    rewards = scores
    if config.missing_eos_penalty is not None:
        rewards = torch.where(eos, scores, scores - config.missing_eos_penalty)
    kl = sequence_kl(old_logprobs, ref_logprobs)
    rho = rlhf_rewards(rewards, kl, config.beta)
    advantages = rloo_advantages(rho, config.k)
    if config.normalize_advantages:
        advantages = scale_to_unit_std(advantages)
    return rewards, kl, rho, advantages


def clipped_surrogate(
    new_logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, clip_range: float
) -> Tensor:
    """Per-sequence clipped surrogate loss.

    ``ratio_i = exp(log pi_theta(y_i) - log pi_old(y_i))`` (sequence level) and
    ``l_i = max(-A_i ratio_i, -A_i clip(ratio_i, 1 - c, 1 + c))``. The loss of
    docs/algorithm.md §2.2 is the mean of ``l_i`` over all completions.

    Args:
        new_logprobs, old_logprobs, advantages: ``[n]``.
        clip_range: ``c``.

    Returns:
        ``[n]`` per-sequence losses.
    """
    ratio = torch.exp(new_logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(-advantages * ratio, -advantages * clipped)
