"""Small data-parallel helpers for zeroth-order training under Lightning's DDP.

Zeroth-order data parallelism (docs/algorithm.md §2.3) needs only three things from the process
group:

- a **base seed agreed at set-up** (:func:`agree_on_seed`): rank 0's value, broadcast once at
  fit start, so that the step seed ``s_t = derive(base, t)`` and hence every direction ``z`` is
  the same on every rank even if the ranks were given different seeds;
- **one all-reduce per update** of the ``[3, q]`` step scalars ``(g, L+, L-)``
  (:func:`cross_rank_mean`), after which every rank applies the same update;
- a way to **share Python objects** (:func:`gather_objects`), e.g. the judged preference pairs
  of reward refinement, so that every rank trains its reward model on the same data set (which
  Lightning's distributed sampler then shards); :func:`gather_per_rank` keeps them by rank
  (every rank's rollout records in rank 0's checkpoint).

Each helper takes a Lightning ``Trainer`` or ``Strategy`` and is the identity on one process.

``Trainer(strategy="ddp")`` works for zeroth-order training as is (see
``zopro_lightning.policy.trainer_options.quiet_ddp_wrapper``). :class:`ZerothOrderDDPStrategy`
is the lean variant for full-parameter zeroth-order training: it skips the
``DistributedDataParallel`` wrapper, whose gradient buckets would hold one more copy of the
trainable set (the memory that SPSA saves).
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn

from zopro_lightning.policy.protocol import optimizer_name

T = TypeVar("T")


def _strategy(strategy_or_trainer: Any) -> Any:
    """The Lightning strategy of a ``Trainer``, or the argument itself."""
    return getattr(strategy_or_trainer, "strategy", strategy_or_trainer)


def is_multi_process(strategy_or_trainer: Any) -> bool:
    """Whether the strategy runs more than one process with an initialised process group."""
    strategy = _strategy(strategy_or_trainer)
    world = int(getattr(strategy, "world_size", 1))
    return world > 1 and dist.is_available() and dist.is_initialized()


def gather_objects(items: list[T], strategy_or_trainer: Any) -> list[T]:
    """Concatenation of every rank's ``items`` in rank order, returned on every rank.

    ``[*items_rank0, *items_rank1, ...]``; the lists may differ in length. Items must be
    picklable. One ``all_gather_object`` (two collectives: sizes, then payloads). On one
    process: a copy of ``items``.
    """
    if not is_multi_process(strategy_or_trainer):
        return list(items)
    world = dist.get_world_size()
    gathered: list[list[T] | None] = [None] * world
    dist.all_gather_object(gathered, list(items))
    return [item for rank_items in gathered for item in (rank_items or [])]


def gather_per_rank(items: list[T], strategy_or_trainer: Any) -> list[list[T]]:
    """Every rank's ``items``, as one list per rank in rank order, returned on every rank (one
    ``all_gather_object``). On one process: ``[list(items)]``."""
    if not is_multi_process(strategy_or_trainer):
        return [list(items)]
    gathered: list[list[T] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(items))
    return [list(rank_items or []) for rank_items in gathered]


def agree_on_seed(seed: int, strategy_or_trainer: Any) -> int:
    """Rank 0's ``seed``, broadcast to every rank (``seed`` itself on one process)."""
    if not is_multi_process(strategy_or_trainer):
        return int(seed)
    return int(_strategy(strategy_or_trainer).broadcast(int(seed), src=0))


def cross_rank_mean(values: Tensor, strategy_or_trainer: Any) -> Tensor:
    """Element-wise mean of ``values`` over ranks, in one all-reduce (sum, then / world).

    ``values`` keeps its shape and dtype (e.g. the ``[3, q]`` float64 step scalars); the
    collective runs on the strategy's root device and the result comes back on ``values``'
    device. On one process: ``values`` unchanged.
    """
    if not is_multi_process(strategy_or_trainer):
        return values
    strategy = _strategy(strategy_or_trainer)
    buffer = values.detach().to(strategy.root_device, copy=True)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return (buffer / dist.get_world_size()).to(values.device)


def ddp_wrapper(strategy_or_trainer: Any) -> torch.nn.parallel.DistributedDataParallel | None:
    """The ``DistributedDataParallel`` wrapper the strategy built around the module, if any."""
    model = getattr(_strategy(strategy_or_trainer), "model", None)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model
    return None


@torch.no_grad()
def broadcast_module_state(module: nn.Module, src: int = 0) -> None:
    """Overwrite every parameter and buffer with rank ``src``'s values (one broadcast each)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=src)


class ZerothOrderDDPStrategy(DDPStrategy):
    """``DDPStrategy`` without the ``DistributedDataParallel`` wrapper in zeroth-order mode.

    A zeroth-order module never runs a backward, so the wrapper has nothing to do but its
    reducer still allocates gradient buckets as large as the trainable set. This strategy
    instead broadcasts rank 0's parameters and buffers once at set-up (what the wrapper's
    constructor does) and leaves the module unwrapped: memory stays at inference level and an
    update's only traffic is the all-reduce of the step scalars. Processes, the distributed
    sampler, ``reduce``/``broadcast`` and checkpointing are plain DDP's. A module whose
    ``hparams.optimizer`` is not ``"zeroth_order"`` (first-order ``ZOPrOModule``, reward model)
    is wrapped as usual.

    Use: ``Trainer(strategy=ZerothOrderDDPStrategy(), accelerator=..., devices=N)``.
    """

    def configure_ddp(self) -> None:
        module = self.model
        if optimizer_name(module) != "zeroth_order":  # policy/protocol.py: None for others
            super().configure_ddp()
            return
        broadcast_module_state(module)
