"""What a pipeline run keeps between its phases, so ``zopro-train resume=RUN_DIR`` can go on.

A run directory holds, besides its outputs:

- ``run_config.yaml``: the composed config the run started with. ``resume=RUN_DIR`` alone
  runs with it (:func:`config_to_resume`); a resume given other overrides must compose the same
  config (apart from ``resume``, ``num_threads`` and ``memory_check``): :func:`check_same_config`
  names any difference.
- ``sft/``: the merged SFT policy, moved into place in one rename once complete.
- ``state/start.pt``: the trained reward model r_0 and the summary so far.
- ``state/iteration_<t>.pt``: after iteration ``t`` (policy learning and refinement): the
  trainable tensors of policy and reward model, the sampler's state, the update counters, the
  judge's counters and the summary so far.
- ``checkpoints/iteration_<t>/last.ckpt``: the Lightning checkpoint inside iteration ``t``
  (written every ``loop.checkpoint_every`` updates, removed once ``iteration_<t>.pt`` exists).

Every file is written to a temporary name, fsynced and renamed, so a crash leaves the previous
state whole. Everything loads with ``torch.load(weights_only=True)``: tensors, numbers, strings.
A state file that is damaged all the same (cut short by a copy) is verified before use and set
aside as ``<name>.pt.damaged`` with a warning naming it; the resume goes on from the last state
that verifies (an earlier iteration, or the phase is redone), so it still ends where an
uninterrupted run ends.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from zopro_lightning.utils.atomic import atomic_torch_save, atomic_write_text
from zopro_lightning.utils.checkpointing import checkpoint_problem, set_aside

STATE_DIR = "state"
RUN_CONFIG = "run_config.yaml"
IGNORED_KEYS = ("resume", "num_threads", "memory_check")  # may differ between a run and its resume


def state_path(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / STATE_DIR / f"{name}.pt"


def save_state(run_dir: Path, name: str, payload: dict[str, Any]) -> Path:
    """``payload`` to ``state/<name>.pt``, atomically (temporary file, fsync, rename)."""
    return atomic_torch_save(state_path(run_dir, name), payload)


def verified_state(run_dir: Path, name: str) -> Path | None:
    """``state/<name>.pt`` when it exists and verifies; a damaged one is set aside (warning
    naming it) and ``None`` returned, as for a state never written."""
    path = state_path(run_dir, name)
    if not path.exists():
        return None
    problem = checkpoint_problem(path)
    if problem is None:
        return path
    set_aside(path, problem, "Resuming from the last state before it; that phase is redone.")
    return None


def load_state(run_dir: Path, name: str) -> dict[str, Any] | None:
    """``state/<name>.pt`` (``weights_only=True``), or ``None`` when it was never written or is
    damaged (:func:`verified_state`)."""
    path = verified_state(run_dir, name)
    if path is None:
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def last_finished_iteration(run_dir: Path) -> int | None:
    """The highest ``t`` whose ``state/iteration_<t>.pt`` verifies (damaged ones are set aside
    on the way down), or ``None``."""
    directory = Path(run_dir) / STATE_DIR
    found = [
        int(match.group(1))
        for path in directory.glob("iteration_*.pt")
        if (match := re.fullmatch(r"iteration_(\d+)\.pt", path.name))
    ]
    for t in sorted(found, reverse=True):
        if verified_state(run_dir, f"iteration_{t}") is not None:
            return t
    return None


def comparable(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain data, without the keys a resume may change."""
    data = OmegaConf.to_container(cfg, resolve=False)
    for key in IGNORED_KEYS:
        data.pop(key, None)
    data.pop("hydra", None)
    return data


def save_run_config(run_dir: Path, cfg: DictConfig) -> None:
    text = OmegaConf.to_yaml(OmegaConf.create(comparable(cfg)))
    atomic_write_text(Path(run_dir) / RUN_CONFIG, text)


def override_key(override: str) -> str:
    """The dotted key of a Hydra command-line override (``+a.b=1``, ``~a``, ``a=1``)."""
    return override.split("=", 1)[0].lstrip("+~")


def config_to_resume(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """The config a ``resume=RUN_DIR`` invocation runs with.

    With no override but those of :data:`IGNORED_KEYS`: the run's own ``run_config.yaml`` (with
    this invocation's values of them), so the run's overrides need not be repeated. With others
    (or no ``run_config.yaml``): ``cfg`` as composed, which :func:`check_same_config` then
    compares with the run's.
    """
    path = Path(cfg.resume) / RUN_CONFIG
    if any(override_key(o) not in IGNORED_KEYS for o in overrides) or not path.exists():
        return cfg
    saved = OmegaConf.load(path)
    with open_dict(saved):
        for key in IGNORED_KEYS:
            saved[key] = cfg.get(key)
    return saved


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys where ``old`` and ``new`` differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        found: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                found.append(
                    f"{path}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}"
                )
            else:
                found += differences(old[key], new[key], path)
        return found
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def check_same_config(run_dir: Path, cfg: DictConfig) -> None:
    """Refuse to resume ``run_dir`` with a config other than the one it started with.

    Raises:
        FileNotFoundError: ``run_dir`` is not a zopro-train run directory.
        ValueError: the configs differ (the keys and both values are listed).
    """
    path = Path(run_dir) / RUN_CONFIG
    if not path.exists():
        raise FileNotFoundError(
            f"resume={run_dir}: no {RUN_CONFIG} there, so it is not a zopro-train run directory "
            "(or it stopped before its first phase). Pass the directory a run printed as its "
            "run directory, or drop resume= to start afresh."
        )
    old = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    changed = differences(old, comparable(cfg))
    if changed:
        raise ValueError(
            f"resume={run_dir}: the config differs from the one the run started with, so the "
            "resumed run would not continue it:\n  "
            + "\n  ".join(changed[:20])
            + "\nResume with the same overrides (only resume=, num_threads= and memory_check= may "
            "change), or start a new run."
        )


def iteration_state(
    t: int, module: Any, reward: Any, judge: Any, directions: dict[str, dict]
) -> dict[str, Any]:
    """What ``state/iteration_<t>.pt`` keeps of the loop's objects after iteration ``t``: the
    trainable tensors of policy and reward model, the sampler's state, the update and skip
    counters, the judge's counters and the candidate directions (each ``mu`` and ``v``, which
    let a run branched from this state set its own sampler's directions)."""
    from zopro_lightning.models.loading import trainable_state
    from zopro_lightning.reward.refinement import judge_counts

    return {
        "iteration": t,
        "policy": trainable_state(module.policy),
        "reward": trainable_state(reward.model),
        "sampler": module.sampler.state_dict(),
        "policy_updates": module.policy_updates,
        "skipped_steps": module.skipped_steps,
        "judge": judge_counts(judge),
        "directions": directions,
    }


def restore_iteration_state(state: dict[str, Any], module: Any, reward: Any) -> None:
    """Put the loop's objects back as :func:`iteration_state` saved them."""
    from zopro_lightning.run.phases import load_trainable

    load_trainable(module.policy, state["policy"])
    load_trainable(reward.model, state["reward"])
    module.sampler.load_state_dict(state["sampler"])
    module.policy_updates = int(state["policy_updates"])
    module.skipped_steps = int(state["skipped_steps"])
