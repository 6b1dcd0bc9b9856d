"""Held-out evaluation and generation of a ``ZOPrOModule`` (``trainer.validate``,
``trainer.predict``), and the prompts of a batch.

Both sample with a seed of (seed, stage, batch, rank) only, never the global RNG's history:
every validation samples the same way, so two of them compare the policies alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zopro_lightning.rl.rollout import decode_completions, generate_completions
from zopro_lightning.zo.spsa import derive_seed


def prompts_of(batch: Any) -> list[str]:
    """The prompt strings of a batch: a list of strings, or a dict with a ``"prompt"`` key."""
    if isinstance(batch, Mapping):
        if "prompt" not in batch:
            raise KeyError(
                f"ZOPrOModule: a dict batch needs a 'prompt' key; got keys {sorted(batch)}."
            )
        batch = batch["prompt"]
    if isinstance(batch, str):
        batch = [batch]
    prompts = list(batch)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(
            "ZOPrOModule: batches must be non-empty lists of prompt strings (or dicts with a "
            f"'prompt' list); got {type(batch).__name__}."
        )
    return prompts



class HeldOutEvaluation:
    """``validation_step`` and ``predict_step`` of
    :class:`~zopro_lightning.policy.module.ZOPrOModule` (a mixin: it uses the module's
    ``policy``, ``tokenizer``, ``rollout``, ``rollout_settings``, ``seed`` and ``_seeded``)."""

    def evaluation_seed(self, stage: str, batch_idx: int) -> int:
        """Seed of a validation or prediction batch: by (seed, stage, batch, rank) only, so
        every validation samples the same way and two of them compare the policies alone."""
        rank = self.global_rank if self._trainer is not None else 0
        return derive_seed(self.seed, stage, batch_idx, rank)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Held-out reward and KL of the current policy on a batch of validation prompts:
        ``k`` sampled completions a prompt, scored by ``reward_fn``. Logs ``val/reward`` (mean
        reward of the finite ones) and ``val/kl`` (mean sequence KL to the reference policy),
        averaged over the validation set (and over ranks)."""
        prompts = prompts_of(batch)
        rollout = self.rollout(prompts, seed=self.evaluation_seed("validation", batch_idx))
        self.log_dict(
            {"val/reward": rollout.metrics["reward_mean"], "val/kl": rollout.metrics["kl"]},
            on_step=False,
            on_epoch=True,
            batch_size=len(prompts),
            sync_dist=True,
        )

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> list[str]:
        """One completion for each prompt of the batch, in order: sampled at the rollouts'
        ``temperature`` and ``max_new_tokens``, seeded by (seed, batch, rank)."""
        prompts = prompts_of(batch)
        self.policy.eval()
        with self._seeded(self.evaluation_seed("predict", batch_idx)):
            input_ids, _, completion_mask, _ = generate_completions(
                self.policy, self.tokenizer, prompts, self.rollout_settings, num_samples=1
            )
        return decode_completions(self.tokenizer, input_ids, completion_mask)
