"""Zeroth-order data parallelism under Lightning's DDP, two CPU processes (gloo).

``tests/ddp_worker.py`` runs as a user's script would: ``Trainer(strategy="ddp", devices=2)``
re-launches it for rank 1. Every rank saves what it ended with; these tests compare the ranks.
The single-process behaviour of :mod:`zopro_lightning.utils.distributed` is tested here too.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from zopro_lightning import ZOPrOModule
from zopro_lightning.rl.rollout import RolloutSettings
from zopro_lightning.utils.distributed import agree_on_seed, cross_rank_mean, gather_objects
from zopro_lightning.zo.spsa import derive_seed

from .conftest import count_words_reward, launch_two_ranks

WORKER = Path(__file__).parent / "ddp_worker.py"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the two ranks saved (index = rank)."""
    out = tmp_path_factory.mktemp("ddp")
    launch_two_ranks(WORKER, out)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def all_moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    return all(not torch.equal(before[n], after[n]) for n in before)


def assert_policy_fit_agrees(ranks: list[dict], mode: str) -> None:
    zero, one = ranks[0][mode], ranks[1][mode]
    assert zero["policy_updates"] == one["policy_updates"] > 0
    # each rank started from its own LoRA values and its own seed: DDP's initial broadcast and
    # the fit-start seed agreement are all that make them end bit-identical
    assert not bit_identical(zero["before"], one["before"])
    assert bit_identical(zero["after"], one["after"])
    assert all_moved(zero["before"], zero["after"])
    # the distributed sampler sharded the prompts: each rank trained on its own
    assert zero["prompts"] and one["prompts"]
    assert not set(zero["prompts"]) & set(one["prompts"])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["zeroth_order", "zeroth_order_find_unused", "zeroth_order_lean"])
def test_zeroth_order_ranks_agree_with_one_all_reduce_per_update(ranks, mode):
    assert_policy_fit_agrees(ranks, mode)
    for rank in ranks:
        # the whole traffic of an update: the all-reduce of the step scalars
        assert rank[mode]["collectives"] == [["c10d::allreduce_"]] * rank[mode]["policy_updates"]
        assert not rank[mode]["grads_allocated"]


@pytest.mark.slow
def test_first_order_syncs_gradients(ranks):
    assert_policy_fit_agrees(ranks, "first_order")
    for rank in ranks:  # DDP's gradient all-reduce ran in every update
        assert all("c10d::allreduce_" in names for names in rank["first_order"]["collectives"])


@pytest.mark.slow
def test_reward_model_fit_leaves_equal_parameters(ranks):
    zero, one = ranks[0]["reward_model"], ranks[1]["reward_model"]
    assert zero["pairs"] == one["pairs"] == 16  # 8 judged pairs a rank, gathered
    assert bit_identical(zero["after"], one["after"])
    assert all_moved(zero["before"], zero["after"])


@pytest.mark.slow
def test_resume_under_ddp_is_bit_identical_to_an_uninterrupted_run(ranks):
    """Stopped after 2 of 4 updates and resumed with ``ckpt_path``: the sampler, step seed,
    update count and each rank's place in its shard come back, so both ranks end exactly where
    the uninterrupted fit ended."""
    for rank in ranks:
        assert rank["resume"]["updates"] == (4, 4)
        assert bit_identical(rank["resume"]["uninterrupted"], rank["resume"]["resumed"])
    assert bit_identical(ranks[0]["resume"]["resumed"], ranks[1]["resume"]["resumed"])


@pytest.mark.slow
def test_two_ranks_take_the_step_of_one_process_on_the_global_batch(ranks):
    """Each rank's ``g`` (and ``L+``, ``L-``) is its shard's; averaged across the 2 ranks they
    are the global batch's, so the update equals one process's on all rows (not twice it)."""
    for rank in ranks:
        step = rank["data_parallel_step"]
        distributed, single = step["distributed"], step["single"]
        for key in ("projected_grads", "loss_plus", "loss_minus"):
            assert torch.allclose(distributed[key], single[key], rtol=1e-9, atol=0), key
        for name, tensor in single["theta"].items():
            assert not torch.equal(tensor, step["theta0"][name])  # the update moved it
            assert torch.allclose(distributed["theta"][name], tensor, rtol=1e-9, atol=1e-12)
    zero, one = (r["data_parallel_step"]["distributed"] for r in ranks)
    assert bit_identical(zero["theta"], one["theta"])


@pytest.mark.slow
def test_gather_objects_concatenates_in_rank_order(ranks):
    expected = ["rank0-item0", "rank1-item0", "rank1-item1"]
    assert ranks[0]["gathered"] == ranks[1]["gathered"] == expected


def test_helpers_are_the_identity_on_one_process():
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    items = [{"prompt": "a"}, {"prompt": "b"}]
    gathered = gather_objects(items, trainer)
    assert gathered == items and gathered is not items
    assert agree_on_seed(7, trainer) == 7
    values = torch.arange(6, dtype=torch.float64).reshape(3, 2)
    assert cross_rank_mean(values, trainer.strategy) is values


def test_step_seed_follows_the_base_seed_agreed_at_fit_start(lora_policy, tokenizer, small_task):
    module = ZOPrOModule(
        lora_policy,
        tokenizer,
        count_words_reward,
        rollout=RolloutSettings(k=2, max_new_tokens=3),
        seed=5,
    )
    assert module.step_seed() == derive_seed(5, 0)  # before any fit: the module's own seed
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(small_task.train_prompts[:2], batch_size=2, collate_fn=list))
    assert module._base_seed == 5
    assert module.step_seed() == derive_seed(5, 1)
