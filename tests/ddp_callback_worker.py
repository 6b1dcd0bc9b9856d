"""Two-process DDP worker for ``tests/test_ddp_callback.py`` (not collected: no ``test_``).

Run as ``python tests/ddp_callback_worker.py OUT_DIR``: a user's script with
``Trainer(strategy="ddp", devices=2)`` (Lightning re-runs it for rank 1) fitting a
``ZOPrOModule`` with :class:`ZOPrOIterations`: a first-order iteration, a boundary (each rank
judges its own records, the reward model trains on every rank's pairs), a zeroth-order
iteration. Every rank saves what it ended with to ``OUT_DIR/rank{r}.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `tests.*`

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from tests.conftest import tiny_reward_model  # noqa: E402
from tests.ddp_worker import lora_policy, trainable  # noqa: E402
from zopro_lightning import ZOPrOModule  # noqa: E402
from zopro_lightning.callbacks.zopro import IterationSchedule, ZOPrOIterations  # noqa: E402
from zopro_lightning.data.sentiment import build_sentiment_task  # noqa: E402
from zopro_lightning.models.tokenizer import build_word_tokenizer  # noqa: E402
from zopro_lightning.reward.judges import RewardJudge  # noqa: E402
from zopro_lightning.reward.refinement import RefinementSettings, RewardRefinement  # noqa: E402
from zopro_lightning.rl.rollout import RolloutSettings  # noqa: E402
from zopro_lightning.zo.zopro_sampler import ZOPrOSampler  # noqa: E402

SCHEDULE = IterationSchedule(iterations=2, updates=2, first_order_updates=2)


def characters(prompts: list[str], completions: list[str]) -> torch.Tensor:
    """The gold reward the judge compares: a completion's length in characters (few ties)."""
    return torch.tensor([float(len(c)) for c in completions])


def main(out: Path) -> None:
    torch.set_num_threads(1)
    task = build_sentiment_task(
        seed=0, n_train_prompts=16, n_eval_prompts=4, n_sft=32, n_train_pairs=8, n_eval_pairs=4
    )
    tokenizer = build_word_tokenizer(task.corpus())
    rank = int(__import__("os").environ.get("LOCAL_RANK", 0))
    policy = lora_policy(tokenizer, rank)  # a different start on every rank: DDP broadcasts
    reward = tiny_reward_model(tokenizer, seed=1)  # built the same on every rank
    reward_before = trainable(reward.model)
    module = ZOPrOModule(
        policy,
        tokenizer,
        reward,
        ZOPrOSampler(),
        rollout=RolloutSettings(k=2, max_new_tokens=4),
        seed=3,
    )
    refinement = RewardRefinement(
        RewardJudge(characters), RefinementSettings(epochs=1, batch_size=4), seed=0
    )
    zopro = ZOPrOIterations(reward, refinement, SCHEDULE, seed=0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=SCHEDULE.total_updates,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[zopro],
    )
    trainer.fit(module, DataLoader(task.train_prompts[:16], batch_size=2, collate_fn=list))
    torch.save(
        {
            "policy": trainable(module.policy),
            "reward": trainable(reward.model),
            "reward_before": reward_before,
            "iteration": zopro.iteration,
            "policy_updates": module.policy_updates,
            "optimizer": module.optimizer_settings.name,
            "pairs": zopro.last.refinement["pairs"] if zopro.last else 0,
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
