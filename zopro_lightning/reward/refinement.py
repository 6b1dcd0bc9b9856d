"""Reward refinement after a policy-learning chunk (DESIGN.md §2.5).

For each prompt of the chunk the stored rollout completion meets one fresh completion of the
current policy; the judge says which is better, and the judged pairs train the reward model
(first-order). Optionally the refined adapter is pulled back toward the previous one:
``phi <- alpha * phi_prev + (1 - alpha) * phi_new`` (keep-close merge).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from zopro_lightning.rl.rollout import decode_completions, generate_completions
from zopro_lightning.utils.progress import progress_bar

Judge = Callable[[list[str], list[str], list[str]], Tensor]


def fresh_completions(
    module, prompts: Sequence[str], batch_size: int = 64, progress: str | None = None
) -> list[str]:
    """One new sampled completion per prompt from the module's current policy (``progress``:
    the description of a progress bar, ``None`` for none)."""
    config = module.rollout_config
    config.k = 1
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


def judged_pairs(
    module, judge: Judge, records: Sequence[tuple[str, str]], progress: bool = False
) -> list[dict[str, str]]:
    """Pairs ``{prompt, chosen, rejected}`` from stored vs fresh completions, as judged
    (``progress``: bars for the fresh completions and the judging).

    The judge returns 1 where the first (stored) completion is better, 0 where the second is,
    NaN where it cannot tell; undecided pairs and identical completions are dropped.
    """
    if not records:
        return []
    prompts = [prompt for prompt, _ in records]
    stored = [completion for _, completion in records]
    fresh = fresh_completions(module, prompts, progress="fresh completions" if progress else None)
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
