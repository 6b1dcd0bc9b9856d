"""What ``ZOPrOModule`` asks of the Lightning ``Trainer`` it runs in: options it cannot honour
are refused with the module's own, and the DDP wrapper is kept quiet in zeroth-order mode."""

from __future__ import annotations

from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException

from zopro_lightning.utils.distributed import ddp_wrapper


def check_trainer_options(trainer: Any) -> None:
    """Refuse ``Trainer(accumulate_grad_batches=...)`` and ``Trainer(gradient_clip_val=...)``.

    Under manual optimisation Lightning neither accumulates nor clips: each ``training_step``
    makes its own update. The module accumulates rollouts itself
    (``OptimizerSettings.accumulate_batches``) and bounds zeroth-order steps by clamping each
    projected gradient (``SPSASettings.max_abs_grad``).

    Raises:
        MisconfigurationException: either option is set, with the module's option to use.
    """
    accumulate = trainer.accumulate_grad_batches
    if accumulate != 1:
        raise MisconfigurationException(
            f"Trainer(accumulate_grad_batches={accumulate}) does not apply to ZOPrOModule, "
            "which optimises manually (one policy update per training_step that completes "
            "one). Fix: leave the Trainer's at 1 and pass ZOPrOModule(..., "
            f"optimizer=OptimizerSettings(accumulate_batches={accumulate})): that many rollout "
            "batches make one update (zopro-train: loop.batch_size is the prompts of one "
            "update, policy.rollout.micro_batch_size bounds the memory of its forwards)."
        )
    clip = trainer.gradient_clip_val
    if clip is not None and clip > 0:
        raise MisconfigurationException(
            f"Trainer(gradient_clip_val={clip}) does not apply to ZOPrOModule, which "
            "optimises manually; zeroth-order steps have no gradient tensor to clip. Fix: "
            "drop it from the Trainer and bound each projected gradient of a zeroth-order "
            f"step with ZOPrOModule(..., spsa=SPSASettings(max_abs_grad={clip})) (zopro-train: "
            f"policy.spsa.max_abs_grad={clip}); clamped values are logged as "
            "policy/clipped_grads."
        )


def quiet_ddp_wrapper(trainer: Any) -> None:
    """Zeroth-order mode under ``strategy="ddp"``: stop the DDP wrapper's only per-step
    traffic, the broadcast of module buffers before a forward.

    Nothing else is needed, so ``strategy="ddp"`` works as is. ``DistributedDataParallel``
    broadcast rank 0's parameters and buffers when it was built, so the ranks start equal. No
    backward ever runs, so its reducer is never armed (under manual optimisation Lightning
    prepares it only in ``manual_backward``): no gradient all-reduce and no "expected to have
    finished reduction" error, with or without ``find_unused_parameters``. A causal LM's
    buffers (rotary frequencies) never change, so re-broadcasting them is pure traffic;
    without it the step's only collective is the all-reduce of the step scalars. The reducer
    still holds its gradient buckets (the size of the trainable set): negligible with LoRA; for
    full-parameter training use
    :class:`~zopro_lightning.utils.distributed.ZerothOrderDDPStrategy`, which builds no wrapper.
    """
    ddp = ddp_wrapper(trainer)
    if ddp is not None:
        ddp.broadcast_buffers = False
