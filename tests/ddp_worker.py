"""Two-process DDP worker for ``tests/test_ddp.py`` (not collected: no ``test_`` prefix).

Run as ``python tests/ddp_worker.py OUT_DIR``: Lightning's ``strategy="ddp"`` launcher re-runs
this script for rank 1, exactly as it would a user's training script. Each rank runs, in one
process group:

1. a zeroth-order ``ZOPrOModule`` fit (each rank given a *different* seed and a different LoRA
   start, so agreement can only come from the set-up broadcast and DDP's initial sync), under
   ``"ddp"``, ``"ddp_find_unused_parameters_true"`` and :class:`ZerothOrderDDPStrategy`;
2. the same fit with ``optimizer="first_order"`` (AdamW, ``manual_backward``);
3. a ``RewardModelModule`` fit on pairs shared with :func:`gather_objects`;
4. :func:`gather_objects` on rank-dependent lists;
5. a zeroth-order fit stopped at a checkpoint and resumed, beside the uninterrupted fit;
6. one :class:`ZerothOrderOptimizer` update on a sharded global batch, reduced with the
   module's cross-rank mean, beside the same update on one process over the whole batch;

and saves what the test compares to ``OUT_DIR/rank{r}.pt``: the trainable tensors after each
fit, the prompts each rank trained on, and the collectives (profiler op names) issued inside
every training batch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `tests.*`

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import Strategy  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from tests.conftest import tiny_reward_model  # noqa: E402
from zopro_lightning import ZOPrOModule  # noqa: E402
from zopro_lightning.data.resumable import ResumableDataLoader  # noqa: E402
from zopro_lightning.data.sentiment import build_sentiment_task  # noqa: E402
from zopro_lightning.models.loading import add_lora, build_tiny_causal_lm  # noqa: E402
from zopro_lightning.models.tokenizer import build_word_tokenizer  # noqa: E402
from zopro_lightning.policy.optimization import OptimizerSettings  # noqa: E402
from zopro_lightning.reward.training import PairCollator, RewardModelModule  # noqa: E402
from zopro_lightning.rl.rollout import RolloutSettings  # noqa: E402
from zopro_lightning.utils.distributed import ZerothOrderDDPStrategy, gather_objects  # noqa: E402
from zopro_lightning.zo.optim import SPSASettings, ZerothOrderOptimizer  # noqa: E402
from zopro_lightning.zo.samplers import GaussianSampler  # noqa: E402

STEPS = 3


class BatchRecorder(L.Callback):
    """Records each training batch's prompts and the collectives issued while it ran."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.collectives: list[list[str]] = []
        self._profiler: profile | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if isinstance(batch, list) and all(isinstance(p, str) for p in batch):
            self.prompts += batch
        self._profiler = profile(activities=[ProfilerActivity.CPU])
        self._profiler.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        assert self._profiler is not None
        self._profiler.__exit__(None, None, None)
        names = [e.name for e in self._profiler.events() if e.name.startswith("c10d::")]
        self.collectives.append(names)
        self._profiler = None


def trainer(callbacks=(), strategy: str | Strategy = "ddp", **kwargs) -> L.Trainer:
    options = {
        "accelerator": "cpu",
        "devices": 2,
        "strategy": strategy,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": list(callbacks),
    }
    return L.Trainer(**(options | kwargs))


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def count_great(prompts: list[str], completions: list[str]) -> torch.Tensor:
    return torch.tensor([c.split().count("great") for c in completions], dtype=torch.float32)


def lora_policy(tokenizer, rank: int) -> torch.nn.Module:
    model = build_tiny_causal_lm(
        tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64
    )
    policy = add_lora(model, r=4, alpha=8)
    generator = torch.Generator().manual_seed(100 + rank)  # a different start on every rank
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return policy


def policy_fit(
    tokenizer,
    prompts,
    optimizer: str,
    rank: int,
    strategy: str | Strategy = "ddp",
    steps: int = STEPS,
) -> tuple[dict, L.Trainer]:
    policy = lora_policy(tokenizer, rank)
    before = trainable(policy)
    module = ZOPrOModule(
        policy,
        tokenizer,
        count_great,
        optimizer=OptimizerSettings(name=optimizer, lr=1e-2),
        rollout=RolloutSettings(k=2, max_new_tokens=4),
        seed=1234 + rank,  # rank 0's seed must win (agreed at fit start)
    )
    recorder = BatchRecorder()
    fit_trainer = trainer([recorder], max_steps=steps, strategy=strategy)
    fit_trainer.fit(module, DataLoader(prompts, batch_size=2, collate_fn=list))
    return {
        "before": before,
        "after": trainable(policy),
        "prompts": recorder.prompts,
        "collectives": recorder.collectives,
        "policy_updates": module.policy_updates,
        "grads_allocated": any(p.grad is not None for p in policy.parameters()),
    }, fit_trainer


def resume_parity(tokenizer, prompts, rank: int, out_dir: Path) -> dict:
    """The same 4-update zeroth-order fit on shuffled prompts, once uninterrupted (checkpoints
    after updates 2 and 4) and once started again from the checkpoint of update 2."""
    checkpoints = out_dir / "resume_checkpoints"

    def fit(ckpt_path: Path | None) -> tuple[dict, int]:
        module = ZOPrOModule(
            lora_policy(tokenizer, rank),
            tokenizer,
            count_great,
            optimizer=OptimizerSettings(lr=1e-2),
            rollout=RolloutSettings(k=2, max_new_tokens=4),
        )
        loader = ResumableDataLoader(
            prompts, batch_size=2, shuffle=True, collate_fn=list,
            generator=torch.Generator().manual_seed(7),
        )  # fmt: skip
        saves = ModelCheckpoint(
            dirpath=checkpoints, filename="{step}", every_n_train_steps=2, save_top_k=-1
        )
        fit_trainer = trainer(
            [saves] if ckpt_path is None else [],
            strategy=ZerothOrderDDPStrategy(),
            max_steps=4,
            enable_checkpointing=ckpt_path is None,
        )
        fit_trainer.fit(module, loader, ckpt_path=ckpt_path)
        return trainable(module.policy), module.policy_updates

    uninterrupted, updates = fit(None)
    resumed, resumed_updates = fit(checkpoints / "step=2.ckpt")
    return {
        "uninterrupted": uninterrupted,
        "resumed": resumed,
        "updates": (updates, resumed_updates),
    }


def reward_fit(tokenizer, task, rank: int, fitted: L.Trainer) -> dict:
    reward = tiny_reward_model(tokenizer, seed=rank)  # a different start on every rank
    # each rank "judged" its own pairs; every rank trains on all of them
    mine = list(task.train_pairs[rank::2])[:8]
    pairs = gather_objects(mine, fitted)
    before = trainable(reward.model)
    module = RewardModelModule(reward, lr=1e-2)
    fit_trainer = trainer(max_epochs=1)
    fit_trainer.fit(module, DataLoader(pairs, batch_size=4, collate_fn=PairCollator(reward)))
    return {"before": before, "after": trainable(reward.model), "pairs": len(pairs)}


def data_parallel_step(fitted: L.Trainer, rank: int) -> dict:
    """One update (q = 2, two SPSA steps) of a small regression on a global batch of 8 rows:
    each rank evaluates its 4 rows and the step scalars go through the reduce a
    ``ZOPrOModule`` gives its optimizer (``_cross_rank_mean``); then the same update on this
    process alone over all 8 rows. A mean over ranks of equal shards equals the global mean,
    so the two must agree up to rounding (a sum would make an N-times step)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, generator=g, dtype=torch.float64)
    y = torch.randn(8, generator=g, dtype=torch.float64)
    theta = {
        "w": torch.randn(5, 3, generator=g, dtype=torch.float64),
        "bias": torch.randn(3, generator=g, dtype=torch.float64),
    }

    def update(rows: slice, reduce_fn) -> dict:
        params = {n: t.clone() for n, t in theta.items()}

        def loss() -> torch.Tensor:
            prediction = torch.tanh(x[rows] @ params["w"] + params["bias"]).sum(-1)
            return (prediction - y[rows]).pow(2).mean()

        optimizer = ZerothOrderOptimizer(
            params.items(), GaussianSampler(),
            SPSASettings(eps=1e-4, num_perturbations=2, steps_per_update=2),
            lr=0.1, reduce_fn=reduce_fn,
        )  # fmt: skip
        result = optimizer.step(loss_fn=loss, seed=99)
        return {
            "theta": params,
            "projected_grads": result.projected_grads,
            "loss_plus": result.loss_plus,
            "loss_minus": result.loss_minus,
        }

    shard = slice(4 * rank, 4 * rank + 4)
    return {
        "distributed": update(shard, fitted.lightning_module._cross_rank_mean),
        "single": update(slice(0, 8), None),
        "theta0": theta,
    }


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    task = build_sentiment_task(
        seed=0, n_train_prompts=16, n_eval_prompts=2, n_sft=8, n_train_pairs=16, n_eval_pairs=2
    )
    tokenizer = build_word_tokenizer(task.corpus())
    prompts = list(task.train_prompts[: 4 * STEPS])
    rank = int(os.environ.get("LOCAL_RANK", 0))  # set for rank 1 by the launcher; 0: none
    results: dict = {"rank": rank}
    results["zeroth_order"], _ = policy_fit(tokenizer, prompts, "zeroth_order", rank)
    assert torch.distributed.get_rank() == rank
    results["zeroth_order_find_unused"], _ = policy_fit(
        tokenizer, prompts, "zeroth_order", rank, "ddp_find_unused_parameters_true", steps=2
    )
    results["zeroth_order_lean"], _ = policy_fit(
        tokenizer, prompts, "zeroth_order", rank, ZerothOrderDDPStrategy(), steps=2
    )
    results["resume"] = resume_parity(tokenizer, prompts, rank, Path(out_dir))
    results["first_order"], fitted = policy_fit(tokenizer, prompts, "first_order", rank)
    results["reward_model"] = reward_fit(tokenizer, task, rank, fitted)
    results["data_parallel_step"] = data_parallel_step(fitted, rank)
    # a fitted trainer's strategy still holds the process group
    results["gathered"] = gather_objects([f"rank{rank}-item{i}" for i in range(rank + 1)], fitted)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    # leave the process group before the interpreter exits: gloo's threads torn down at exit
    # can abort the process ("terminate called without an active exception")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
