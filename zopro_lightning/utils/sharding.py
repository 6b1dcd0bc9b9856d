"""Sharded parameters (FSDP2, ``fully_shard``) for the policy and for the SPSA step.

Under Lightning's ``ModelParallelStrategy`` each transformer block of the policy (the module
classes a Hugging Face model lists in ``_no_split_modules``) and then the whole model are
wrapped with ``fully_shard`` over the data-parallel mesh: each rank keeps ``1 / world`` of
every parameter (rows of dim 0) and a block's whole parameters exist only while it runs.

The zeroth-order step works with that layout as follows (docs/algorithm.md §2.3):

- the two evaluations swap each module's tensors for ``theta +- eps z`` inside the block's
  forward, after FSDP gathered them (:mod:`zopro_lightning.zo.layerwise`): ``z`` is drawn for
  the whole tensor from the step's seed, the same on every rank and whatever the sharding;
- the update moves each rank's own rows: ``z`` of the whole tensor is drawn once more (one
  tensor at a time) and the rank's rows of it, :func:`local_rows`, are added to its shard;
- the only collective of a step is the all-reduce of its ``[3, q]`` scalars.
"""

from __future__ import annotations

from torch import Tensor, nn


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a sharded parameter)."""
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "to_local")


def local_rows(param: Tensor) -> tuple[Tensor, slice]:
    """``(local, rows)``: this rank's part of ``param`` (a view that in-place writes reach)
    and the rows of the whole tensor it holds; ``(param, slice(None))`` for a plain tensor."""
    if not is_sharded(param):
        return param, slice(None)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements
    )
    if any(offset[1:]):
        raise ValueError("local_rows: only row-wise sharding (Shard(0), FSDP2's) is supported")
    return param.to_local(), slice(offset[0], offset[0] + shape[0]) if shape else slice(None)


def shard_policy(policy: nn.Module, mesh: object) -> int:
    """``fully_shard`` each block of ``policy`` (``policy._no_split_modules`` classes), then
    ``policy`` itself, over ``mesh``; returns how many blocks. A policy already sharded is left
    as it is (``configure_model`` runs at every fit).

    Raises:
        ValueError: the policy names no block classes to shard.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(policy, FSDPModule):
        return 0
    block_names = set(getattr(policy, "_no_split_modules", None) or [])
    blocks = [m for m in policy.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ValueError(
            f"shard_policy: {type(policy).__name__} lists no transformer block classes in "
            "_no_split_modules, so there is nothing to shard by. Fix: use a Hugging Face "
            "causal LM, or trainer=ddp."
        )
    for block in blocks:
        fully_shard(block, mesh=mesh)
    # the root keeps its gathered weights after a forward by default (for the backward that
    # follows); a forward-only step has none, so it reshards too, or the embeddings stay whole
    fully_shard(policy, mesh=mesh, reshard_after_forward=True)
    return len(blocks)


def shard_under_model_parallel(lightning_module: object, model: nn.Module) -> None:
    """``configure_model`` of the package's LightningModules: shard ``model`` with
    :func:`shard_policy` over the data-parallel mesh when the strategy set one
    (``trainer=fsdp``); nothing under any other strategy."""
    mesh = getattr(lightning_module, "_device_mesh", None)
    if mesh is not None:
        shard_policy(model, mesh["data_parallel"])


def fsdp_strategy(**kwargs: object) -> object:
    """Lightning's ``ModelParallelStrategy`` as pure FSDP2 data parallelism: every rank of every
    node in one data-parallel mesh (no tensor parallelism), so ``ZOPrOModule.configure_model``
    shards the policy ``1 / world`` per rank. ``kwargs`` go to the strategy
    (``save_distributed_checkpoint``, ``process_group_backend``, ``timeout``)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    class FSDPDataParallelStrategy(ModelParallelStrategy):
        def setup_environment(self) -> None:
            processes = len(self.parallel_devices or ())
            self._data_parallel_size = self.num_nodes * processes
            self._tensor_parallel_size = 1
            super().setup_environment()

    return FSDPDataParallelStrategy(**kwargs)
