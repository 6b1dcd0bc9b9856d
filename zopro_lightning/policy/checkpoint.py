"""ZOPrO's part of a checkpoint (``checkpoint["zopro"]``): what an exact resume needs beyond
Lightning's own state (weights, optimizer, LR schedule, loop counters, callback and dataloader
states).

Only tensors and plain types, so a checkpoint loads with ``weights_only=True``:

- ``fingerprint``: the policy's class and trainable tensor names and shapes;
- ``seed``: the base of the step seeds; ``max_steps`` of the run (a resume with another one
  resizes nothing and is warned about);
- ``policy_updates``, ``skipped_steps``; the sampler's class (``sampler_class``) and state
  (``sampler``: decay schedule, directions); ``iteration`` and ``phase``;
- ``reward_model``: the trainable weights of ``reward_fn.model`` when it is an ``nn.Module`` (a
  refined reward model is not part of the module's ``state_dict``);
- ``pending``: the rollouts of an update still accumulating, each a dict of its fields.

The data position is in Lightning's part: the loop counters and, for a
:class:`~zopro_lightning.data.resumable.ResumableDataLoader`, the loader's state
(``checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]``), written by saves made
during ``fit`` (as ``ModelCheckpoint``'s are).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from zopro_lightning.rl.rollout import Rollout
from zopro_lightning.utils.checkpointing import (
    fingerprint_differences,
    model_class_name,
    model_fingerprint,
)

if TYPE_CHECKING:
    from zopro_lightning.policy.module import ZOPrOModule

log = logging.getLogger(__name__)


def checkpoint_state(module: ZOPrOModule) -> dict[str, Any]:
    """``checkpoint["zopro"]`` of ``module`` (the module docstring lists its keys)."""
    state: dict[str, Any] = {
        "fingerprint": model_fingerprint(module.policy),
        "seed": int(module.seed),
        "policy_updates": module.policy_updates,
        "skipped_steps": module.skipped_steps,
        "sampler_class": type(module.sampler).__name__,
        "sampler": module.sampler.state_dict(),
        "iteration": int(module.iteration),
        "phase": str(module.phase),
        "pending": [
            {f.name: _to_cpu(getattr(r, f.name)) for f in dataclasses.fields(r)}
            for r in module._pending
        ],
    }
    if module._trainer is not None:
        state["max_steps"] = int(module.trainer.max_steps)
    reward_model = reward_model_of(module.reward_fn)
    if reward_model is not None:
        trainable = [(n, p) for n, p in reward_model.named_parameters() if p.requires_grad]
        state["reward_model"] = {n: p.detach().cpu().clone() for n, p in trainable}
    return state


def load_checkpoint_state(module: ZOPrOModule, checkpoint: Mapping[str, Any]) -> None:
    """Restore :func:`checkpoint_state` into ``module``. Every check runs before anything is
    changed, so a refused checkpoint leaves the module as it was.

    Raises:
        ValueError: the checkpoint was not written by a ``ZOPrOModule``, or for another policy
            (class, trainable names or shapes), another sampler class, or a reward model with
            other trainable tensors.
    """
    source = checkpoint_source(module)
    state = checked_state(module, checkpoint, source)
    reward_weights = checked_reward_weights(module, state.get("reward_model"), source)
    # -- all checks passed: restore -----------------------------------------------------------
    if int(state.get("seed", module.seed)) != int(module.seed):
        log.warning(
            "resuming with the checkpoint's base seed %s instead of seed=%s, so the run "
            "continues the directions it started with",
            state["seed"],
            module.seed,
        )
        module.set_seed(int(state["seed"]))
    _warn_of_another_max_steps(module, state)
    module.policy_updates = int(state["policy_updates"])
    module.skipped_steps = int(state["skipped_steps"])
    module.sampler.load_state_dict(state["sampler"])
    module.iteration = int(state.get("iteration", 0))
    module.phase = str(state.get("phase", type(module).phase))
    module._pending = [Rollout(**fields) for fields in state.get("pending", [])]
    if reward_weights:
        reward_model = reward_model_of(module.reward_fn)
        assert reward_model is not None
        parameters = dict(reward_model.named_parameters())
        with torch.no_grad():
            for name, tensor in reward_weights.items():
                parameters[name].copy_(tensor)


def checked_state(
    module: ZOPrOModule, checkpoint: Mapping[str, Any], source: str
) -> Mapping[str, Any]:
    """``checkpoint["zopro"]`` once it is known to be a ``ZOPrOModule``'s, for this policy
    (fingerprint) and sampler class. An older checkpoint without a fingerprint is warned about."""
    state = checkpoint.get("zopro")
    if state is None:
        raise ValueError(
            f"Checkpoint {source} was not written by ZOPrOModule (it has no 'zopro' section; "
            f"top-level keys: {sorted(checkpoint)}). Fix: resume from a checkpoint of a "
            "ZOPrOModule run, or start without ckpt_path."
        )
    if "fingerprint" in state:
        differences = fingerprint_differences(
            state["fingerprint"], model_fingerprint(module.policy)
        )
        if differences:
            raise ValueError(
                f"Checkpoint {source} belongs to another model than this module's policy: "
                + "; ".join(differences)
                + ". Fix: build the policy the checkpoint was trained with (same base model, "
                "LoRA rank and target modules), or start a new run without ckpt_path (or in "
                "another output directory)."
            )
    else:
        log.warning("checkpoint %s has no model fingerprint (older format): not checked", source)
    sampler = type(module.sampler).__name__
    saved_sampler = state.get("sampler_class", sampler)
    if saved_sampler != sampler:
        raise ValueError(
            f"Checkpoint {source} was written with a {saved_sampler}, this module has a "
            f"{sampler}. Fix: build the module with a {saved_sampler} to resume this run."
        )
    return state


def _warn_of_another_max_steps(module: ZOPrOModule, state: Mapping[str, Any]) -> None:
    max_steps = module.trainer.max_steps if module._trainer is not None else None
    if max_steps is not None and state.get("max_steps", max_steps) != max_steps:
        log.warning(
            "resuming with max_steps=%s from a run started with max_steps=%s: the LR schedule "
            "and a ZOPrO sampler's linear decay were sized for %s updates, so this is neither "
            "run continued exactly; resume with the max_steps of the interrupted run",
            max_steps,
            state["max_steps"],
            state["max_steps"],
        )


def checked_reward_weights(
    module: ZOPrOModule, weights: Mapping[str, Tensor] | None, source: str
) -> Mapping[str, Tensor] | None:
    """The checkpoint's reward-model weights, after checking they fit ``reward_fn.model``
    (``None`` when there are none, or nothing to put them in: warned about)."""
    reward_model = reward_model_of(module.reward_fn)
    if weights is None:
        return None
    if reward_model is None:
        log.warning(
            "checkpoint %s holds reward-model weights but this module's reward_fn has no "
            "`.model`: they are not restored",
            source,
        )
        return None
    current = {n: list(p.shape) for n, p in reward_model.named_parameters() if p.requires_grad}
    saved = {"model_class": model_class_name(reward_model)}
    differences = fingerprint_differences(
        saved | {"trainable": {n: list(t.shape) for n, t in weights.items()}},
        saved | {"trainable": current},
    )
    if differences:
        raise ValueError(
            f"Checkpoint {source} holds a reward model that does not fit this module's "
            f"reward_fn.model: " + "; ".join(differences) + ". Fix: build the reward model "
            "the run was started with (same backbone and LoRA layout)."
        )
    return weights


def reward_model_of(reward_fn: Any) -> nn.Module | None:
    """``reward_fn.model`` when it is an ``nn.Module`` (trained outside the module's tree)."""
    model = getattr(reward_fn, "model", None)
    return model if isinstance(model, nn.Module) else None


def checkpoint_source(module: ZOPrOModule) -> str:
    """The path of the checkpoint being loaded, for messages."""
    trainer = module._trainer
    path = getattr(trainer, "ckpt_path", None) if trainer is not None else None
    return str(path) if path else "(path unknown)"


def rollouts_to(rollouts: list[Rollout], device: torch.device) -> list[Rollout]:
    """``rollouts`` with their tensors on ``device`` (restored ones were saved on the CPU)."""
    return [
        dataclasses.replace(
            r,
            **{
                f.name: getattr(r, f.name).to(device)
                for f in dataclasses.fields(r)
                if isinstance(getattr(r, f.name), Tensor)
            },
        )
        for r in rollouts
    ]


def _to_cpu(value: Any) -> Any:
    return value.detach().cpu() if isinstance(value, Tensor) else value
