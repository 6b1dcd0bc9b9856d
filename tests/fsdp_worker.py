"""Two-process FSDP2 worker for ``tests/test_fsdp.py`` (not collected: no ``test_`` prefix).

Run as ``python tests/fsdp_worker.py OUT_DIR``: Lightning's ``ModelParallelStrategy`` launcher
re-runs this script for rank 1, as it would a user's script. Each rank runs, with gloo on CPU:

1. a full-parameter zeroth-order fit (reference policy on, beta > 0) under DDP;
2. the same fit under FSDP2 (``ModelParallelStrategy``, data-parallel size 2): each rank holds
   half of every parameter;
3. the FSDP2 fit stopped after update 2 (a checkpoint every update) and resumed from it;
4. a first-order (AdamW) fit under FSDP2;

and saves to ``OUT_DIR/rank{r}.pt`` the whole weights after each fit (gathered), the bytes of
parameters each rank holds, the collectives of each training batch and the updates made.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `tests.*`

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from tests.ddp_worker import BatchRecorder  # noqa: E402
from zopro_lightning import ZOPrOModule  # noqa: E402
from zopro_lightning.data.resumable import ResumableDataLoader  # noqa: E402
from zopro_lightning.data.sentiment import build_sentiment_task  # noqa: E402
from zopro_lightning.models.loading import build_tiny_causal_lm  # noqa: E402
from zopro_lightning.models.tokenizer import build_word_tokenizer  # noqa: E402
from zopro_lightning.policy.optimization import OptimizerSettings  # noqa: E402
from zopro_lightning.rl.rollout import RolloutSettings  # noqa: E402
from zopro_lightning.utils.sharding import fsdp_strategy, local_rows  # noqa: E402
from zopro_lightning.zo.optim import ZerothOrderOptimizer  # noqa: E402

STEPS = 3
LEARNING_RATES = {"zeroth_order": 1e-3, "first_order": 1e-3}


def completion_length(prompts: list[str], completions: list[str]) -> torch.Tensor:
    """A reward that differs between completions of a random tiny model (so g is not 0)."""
    return torch.tensor([float(len(c)) for c in completions])


def fsdp():
    return fsdp_strategy(save_distributed_checkpoint=True)  # as conf/trainer/fsdp.yaml builds it


class StepCollectives:
    """Records the collectives issued inside each ``ZerothOrderOptimizer.step``, and its
    losses."""

    def __init__(self) -> None:
        self.steps: list[list[str]] = []
        self.losses: list[tuple[list[float], list[float]]] = []  # (L+, L-) of each step
        self._step = ZerothOrderOptimizer.step
        recorder = self

        def step(optimizer, *args, **kwargs):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                result = recorder._step(optimizer, *args, **kwargs)
            recorder.steps.append([e.name for e in prof.events() if e.name.startswith("c10d::")])
            recorder.losses.append((result.loss_plus.tolist(), result.loss_minus.tolist()))
            return result

        ZerothOrderOptimizer.step = step


def whole_weights(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole (gathered from the shards under FSDP), on the CPU."""
    out = {}
    for name, param in policy.named_parameters():
        tensor = param.full_tensor() if hasattr(param, "full_tensor") else param
        out[name] = tensor.detach().cpu().clone()
    return out


def held_parameter_bytes(policy: torch.nn.Module) -> dict[str, int]:
    """Bytes of each parameter this rank holds (its shard under FSDP)."""
    return {
        n: local_rows(p)[0].numel() * p.element_size() for n, p in policy.named_parameters()
    }


def fit(tokenizer, prompts, strategy, optimizer="zeroth_order", steps=STEPS, callbacks=(),
        ckpt_path=None):  # fmt: skip
    """One fit of a fresh 4-block policy (the same start on every rank and every fit)."""
    policy = build_tiny_causal_lm(
        tokenizer, hidden_size=32, num_layers=4, num_heads=2, intermediate_size=64
    )
    module = ZOPrOModule(
        policy, tokenizer, completion_length,
        optimizer=OptimizerSettings(name=optimizer, lr=LEARNING_RATES[optimizer]),
        rollout=RolloutSettings(k=2, max_new_tokens=4, beta=0.05),
    )  # fmt: skip
    recorder = BatchRecorder()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=steps, logger=False,
        enable_checkpointing=bool(callbacks), enable_progress_bar=False,
        enable_model_summary=False, callbacks=[recorder, *callbacks],
    )  # fmt: skip
    # a loader whose position the checkpoint holds: a resume goes on with the next batch
    loader = ResumableDataLoader(prompts, batch_size=2, collate_fn=list)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return {
        "weights": whole_weights(module.policy),
        "held_parameter_bytes": held_parameter_bytes(module.policy),
        "collectives": recorder.collectives,
        "updates": module.policy_updates,
        "grads": any(p.grad is not None for p in module.policy.parameters()),
    }, trainer


def saves(out_dir: Path) -> ModelCheckpoint:
    """A checkpoint after every update (FSDP2: one folder a checkpoint, one file a rank)."""
    return ModelCheckpoint(
        dirpath=out_dir / "checkpoints", filename="{step}", every_n_train_steps=1, save_top_k=-1
    )


def main(out_dir: Path) -> None:
    task = build_sentiment_task(seed=0, n_train_prompts=16, n_eval_prompts=4, n_sft=16,
                                n_train_pairs=8, n_eval_pairs=4)  # fmt: skip
    tokenizer = build_word_tokenizer(task.corpus())
    prompts = list(task.train_prompts)[:12]
    results = {}
    steps = StepCollectives()
    runs = [
        ("ddp", {"strategy": "ddp"}),
        ("fsdp", {"strategy": fsdp()}),
        ("stopped", {"strategy": fsdp(), "steps": 2, "callbacks": [saves(out_dir)]}),
        ("resumed", {"strategy": fsdp(), "ckpt_path": out_dir / "checkpoints" / "step=2.ckpt"}),
        ("first_order", {"strategy": fsdp(), "optimizer": "first_order"}),
    ]
    for name, options in runs:
        before = len(steps.steps)
        results[name], trainer = fit(tokenizer, prompts, **options)
        results[name]["step_collectives"] = steps.steps[before:]
        results[name]["step_losses"] = steps.losses[before:]
    torch.save(results, out_dir / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
