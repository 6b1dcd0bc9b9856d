"""Rollouts: sample ``k`` completions per prompt, score them, and compute log-probabilities and
the sequence-level KL to the reference policy (docs/algorithm.md §2.1).

Log-probabilities are those of the *tempered* sampling distribution (logits divided by the
temperature ``tau``), for ``pi_old``, ``pi_ref`` and ``pi_theta`` alike, so the ratio and the KL
compare the distributions the samples actually came from.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from zopro_lightning.reward.callables import RewardFn, score_completions
from zopro_lightning.rl.objectives import shaped_advantages


@dataclass
class Rollout:
    """One batch of sampled completions and everything the loss needs, prompt-major.

    Shapes: ``N = B * k`` rows; ``S = P + T`` tokens (``P`` left-padded prompt tokens, ``T``
    completion tokens).
    """

    prompts: list[str]  # [N] each prompt repeated k times
    completions: list[str]  # [N]
    input_ids: Tensor  # [N, S]
    attention_mask: Tensor  # [N, S]
    completion_mask: Tensor  # [N, T] 1 on real completion tokens (through EOS)
    old_logprobs: Tensor  # [N] sum over completion tokens under pi_old
    ref_logprobs: Tensor  # [N] under pi_ref
    rewards: Tensor  # [N] reward callable's scores (after the missing-EOS penalty)
    kl: Tensor  # [N]
    rlhf_reward: Tensor  # [N] rewards - beta * kl
    advantages: Tensor  # [N] RLOO
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def prompt_length(self) -> int:
        return self.input_ids.shape[1] - self.completion_mask.shape[1]

    def __len__(self) -> int:
        return len(self.completions)

    def micro_batches(self, size: int | None) -> Iterator[slice]:
        """Row slices of at most ``size`` rows (all rows when ``size`` is None)."""
        step = size or len(self)
        for start in range(0, len(self), step):
            yield slice(start, min(start + step, len(self)))


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as generation computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """``sum_t log pi(y_t | x, y_<t)`` over the completion tokens, tempered by ``temperature``.

    Args:
        input_ids, attention_mask: ``[n, P + T]``.
        completion_mask: ``[n, T]``.

    Returns:
        ``[n]`` float32 sequence log-probabilities.
    """
    completion_len = completion_mask.shape[1]
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids_from_mask(attention_mask),
        "use_cache": False,
    }
    try:  # the LM head over the last T + 1 positions only (transformers' logits_to_keep)
        logits = model(**inputs, logits_to_keep=completion_len + 1).logits
    except TypeError as error:  # a model whose forward does not take it
        if "logits_to_keep" not in str(error):
            raise
        logits = model(**inputs).logits
    # the logits at position t predict token t+1: keep those predicting the completion
    logits = logits[:, -completion_len - 1 : -1].float() / temperature
    targets = input_ids[:, -completion_len:]
    token_logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return (token_logprobs * completion_mask).sum(-1)


def batched_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    temperature: float,
    micro_batch_size: int | None,
) -> Tensor:
    """:func:`completion_logprobs` over micro-batches of rows (``[N]``)."""
    step = micro_batch_size or input_ids.shape[0]
    return torch.cat(
        [
            completion_logprobs(
                model,
                input_ids[i : i + step],
                attention_mask[i : i + step],
                completion_mask[i : i + step],
                temperature,
            )
            for i in range(0, input_ids.shape[0], step)
        ]
    )


@dataclass
class RolloutSettings:
    """How a rollout is sampled, scored and turned into advantages, and the clip of the
    surrogate evaluated on it (docs/algorithm.md §2.1-2.2). Checked once, on construction.

    ``ZOPrOModule(..., rollout=RolloutSettings(...))``; ``zopro-train``: ``policy.rollout.*``.

    Attributes:
        k: completions sampled per prompt, ``>= 2`` (RLOO's baseline for completion ``i`` is
            the mean reward of the prompt's ``k - 1`` others).
        temperature: ``tau > 0``: samples and every log-probability use ``logits / tau``.
        max_new_tokens: ``T``, completion tokens at most (``>= 1``).
        beta: ``>= 0``, the KL coefficient of ``rho_i = r_i - beta KL_i``; 0 needs no
            reference policy.
        missing_eos_penalty: subtracted from the reward of a completion without EOS within
            ``max_new_tokens`` (``None``: no penalty).
        normalize_advantages: ``A / std(A)`` over the batch, so the step size does not follow
            the reward model's drifting scale.
        micro_batch_size: rows a forward at most (log-probs and loss; ``None``: all ``B k``).
        clip_range: ``c > 0`` of the clipped surrogate ``max(-A r, -A clip(r, 1-c, 1+c))``.

    Raises:
        ValueError: on construction, naming the option, its value and the valid range.
    """

    k: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 16
    beta: float = 0.05
    missing_eos_penalty: float | None = None
    micro_batch_size: int | None = None
    normalize_advantages: bool = False
    clip_range: float = 0.2

    def __post_init__(self) -> None:
        micro = self.micro_batch_size
        _check(
            "rollout",
            self,
            ("k", _is_int(self.k) and self.k >= 2, "an integer >= 2 (RLOO's baseline)"),
            ("temperature", _positive(self.temperature), "a finite number > 0"),
            ("max_new_tokens", _is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
             "an integer >= 1"),
            ("beta", _is_number(self.beta) and self.beta >= 0, "a finite number >= 0"),
            ("missing_eos_penalty", self.missing_eos_penalty is None
             or _is_number(self.missing_eos_penalty), "null or a finite number"),
            ("micro_batch_size", micro is None or (_is_int(micro) and micro >= 1),
             "null or an integer >= 1"),
            ("normalize_advantages", isinstance(self.normalize_advantages, bool),
             "true or false"),
            ("clip_range", _positive(self.clip_range), "a finite number > 0"),
        )  # fmt: skip


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value: object) -> bool:
    return _is_number(value) and value > 0


def _check(group: str, settings: object, *checks: tuple[str, bool, str]) -> None:
    """Raise ``ValueError("<group>.<option>=<value>: must be <valid>")`` for the first failed
    ``(option, ok, valid)``."""
    for option, ok, valid in checks:
        if not ok:
            raise ValueError(f"{group}.{option}={getattr(settings, option)!r}: must be {valid}")


def context_length(model: nn.Module) -> int | None:
    """The model's context, ``config.max_position_embeddings`` (``None`` when the config has
    none: relative-position models without a bound)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) else None


def check_context_length(
    model: nn.Module, attention_mask: Tensor, max_new_tokens: int, rows_per_prompt: int = 1
) -> None:
    """Refuse prompts whose tokens plus ``max_new_tokens`` exceed the model's context.

    Args:
        attention_mask: ``[N, P]`` of the (left-padded) prompts, each prompt on
            ``rows_per_prompt`` consecutive rows.

    Raises:
        ValueError: naming the longest prompt's length, the limit and the fixes.
    """
    limit = context_length(model)
    if limit is None or attention_mask.numel() == 0:
        return
    lengths = attention_mask.sum(-1)
    longest = int(lengths.max())
    if longest + max_new_tokens <= limit:
        return
    too_long = int((lengths + max_new_tokens > limit).sum()) // rows_per_prompt
    prompts = len(lengths) // rows_per_prompt
    raise ValueError(
        f"rollout: {too_long} of {prompts} prompts do not fit the model's context: the "
        f"longest prompt is {longest} tokens, and {longest} + max_new_tokens {max_new_tokens} "
        f"= {longest + max_new_tokens} > {limit} (config.max_position_embeddings). Truncate "
        f"the prompts to at most {max(limit - max_new_tokens, 0)} tokens "
        "(dataset.task.max_prompt_tokens with prompt_length_mode=truncate or drop), or lower "
        "max_new_tokens (policy.rollout.max_new_tokens)."
    )


@torch.no_grad()
def generate_completions(
    policy: nn.Module,
    tokenizer,
    prompts: list[str],
    config: RolloutSettings,
    do_sample: bool = True,
    num_samples: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Sample ``num_samples`` (default ``config.k``) completions per prompt, prompt-major, at
    ``config.temperature`` (no top-k or top-p) and at most ``config.max_new_tokens`` tokens;
    with ``do_sample=False`` one greedy completion per prompt.

    Returns:
        ``(input_ids [N, P+T], attention_mask [N, P+T], completion_mask [N, T], P)`` where the
        completion mask covers real tokens up to and including the first EOS.

    Raises:
        ValueError: a prompt's tokens plus ``max_new_tokens`` exceed the model's context
            (:func:`check_context_length`), before anything is generated.
    """
    rows_per_prompt = (config.k if num_samples is None else num_samples) if do_sample else 1
    repeated = [p for p in prompts for _ in range(rows_per_prompt)]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        encoded = tokenizer(repeated, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    check_context_length(policy, encoded["attention_mask"], config.max_new_tokens, rows_per_prompt)
    device = next(policy.parameters()).device
    encoded = {key: value.to(device) for key, value in encoded.items()}
    prompt_len = encoded["input_ids"].shape[1]
    sampling = {"do_sample": True, "temperature": config.temperature, "top_k": 0, "top_p": 1.0}
    output = policy.generate(
        input_ids=encoded["input_ids"],
        attention_mask=encoded["attention_mask"],
        max_new_tokens=config.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **(sampling if do_sample else {"do_sample": False}),
    )
    completion = output[:, prompt_len:]
    is_eos = completion == tokenizer.eos_token_id
    # real tokens: those up to and including the first EOS
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    completion_mask = (~after_eos).long()
    attention_mask = torch.cat([encoded["attention_mask"], completion_mask], dim=1)
    return output, attention_mask, completion_mask, prompt_len


def decode_completions(tokenizer, input_ids: Tensor, completion_mask: Tensor) -> list[str]:
    """Completion texts, with the whitespace that joins them to their prompt.

    Decoding the completion tokens alone loses a leading space with many tokenizers (word-level
    and SentencePiece ones), and ``prompt + completion`` then glues two words together for the
    reward model. So each row is decoded whole and the decoded prompt is cut off its front;
    where the prompt's text is not a prefix of the whole (a merge across the boundary), the
    completion is decoded alone.
    """
    completion_len = completion_mask.shape[1]
    texts = []
    for row, mask in zip(input_ids, completion_mask, strict=True):
        prompt_ids = row[:-completion_len]
        whole_ids = torch.cat([prompt_ids, row[-completion_len:][mask.bool()]])
        prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True)
        whole = tokenizer.decode(whole_ids, skip_special_tokens=True)
        if whole.startswith(prompt):
            texts.append(whole[len(prompt) :])
        else:
            texts.append(
                tokenizer.decode(row[-completion_len:][mask.bool()], skip_special_tokens=True)
            )
    return texts


def has_eos(tokenizer, input_ids: Tensor, completion_mask: Tensor) -> Tensor:
    """``[N]`` whether each completion ended with EOS within ``max_new_tokens``."""
    completion = input_ids[:, -completion_mask.shape[1] :]
    return ((completion == tokenizer.eos_token_id) & completion_mask.bool()).any(-1)


@torch.no_grad()
def collect_rollout(
    policy: nn.Module,
    tokenizer,
    prompts: list[str],
    reward_fn: RewardFn,
    config: RolloutSettings,
    reference: Callable[[], AbstractContextManager[nn.Module]] | None,
) -> Rollout:
    """One rollout of the ``B`` prompts, ``N = B k`` rows prompt-major (docs/algorithm.md §2.1):
    ``k`` sampled completions a prompt, their rewards ``r`` (minus ``missing_eos_penalty``
    without EOS), sequence log-probs under ``pi_old`` and ``pi_ref``, ``KL = log pi_old -
    log pi_ref``, ``rho = r - beta KL`` and the RLOO advantages of ``rho`` (``A / std(A)``
    with ``normalize_advantages``), each ``[N]``.

    Args:
        reference: a context manager factory yielding the reference policy (e.g. the same
            LoRA network with the adapter switched off); ``None`` when ``beta == 0``.
    """
    start = time.perf_counter()
    input_ids, attention_mask, completion_mask, _ = generate_completions(
        policy, tokenizer, prompts, config
    )
    generation_seconds = time.perf_counter() - start
    completions = decode_completions(tokenizer, input_ids, completion_mask)
    repeated = [p for p in prompts for _ in range(config.k)]

    def logprobs(model: nn.Module) -> Tensor:
        tempered = (config.temperature, config.micro_batch_size)
        return batched_logprobs(model, input_ids, attention_mask, completion_mask, *tempered)

    old_logprobs = logprobs(policy)
    if reference is not None:
        with reference() as reference_policy:
            ref_logprobs = logprobs(reference_policy)
    else:
        ref_logprobs = old_logprobs.clone()
    scores = score_completions(reward_fn, repeated, completions).to(old_logprobs.device)
    eos = has_eos(tokenizer, input_ids, completion_mask)
    shaped = shaped_advantages(scores, eos, old_logprobs, ref_logprobs, config)
    rewards, kl, rho, advantages = shaped
    metrics = rollout_metrics(rewards, kl, rho, advantages, eos, completion_mask)
    metrics["generated_tokens_per_second"] = int(completion_mask.sum()) / max(
        generation_seconds, 1e-9
    )
    return Rollout(
        prompts=repeated,
        completions=completions,
        input_ids=input_ids,
        attention_mask=attention_mask,
        completion_mask=completion_mask.to(old_logprobs.dtype),
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        rewards=rewards,
        kl=kl,
        rlhf_reward=rho,
        advantages=advantages,
        metrics=metrics,
    )


def rollout_metrics(
    rewards: Tensor, kl: Tensor, rho: Tensor, advantages: Tensor, eos: Tensor, completion_mask
) -> dict[str, float]:
    """The logged means of a rollout (``[N]`` tensors, ``completion_mask [N, T]``): rewards,
    ``rho`` and their spread over the finite rewards only, non-finite ones counted."""
    finite = torch.isfinite(rewards)
    return {
        "reward_mean": float(rewards[finite].mean()),
        "reward_std": float(rewards[finite].std()) if finite.sum() > 1 else 0.0,
        "kl": float(kl.mean()),
        "rlhf_reward": float(rho[finite].mean()),
        "advantage_std": float(advantages.std()),
        "nonfinite_rewards": float((~finite).sum()),
        "eos_fraction": float(eos.float().mean()),
        "completion_tokens": float(int(completion_mask.sum())) / len(rewards),
    }
