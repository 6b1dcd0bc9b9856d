"""FSDP2 (``trainer=fsdp``): zeroth-order and first-order updates on sharded parameters, with
2 gloo processes on CPU (``tests/fsdp_worker.py``)."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

from tests.conftest import launch_two_ranks
from zopro_lightning.data.sentiment import build_sentiment_task
from zopro_lightning.models.loading import build_tiny_causal_lm
from zopro_lightning.models.tokenizer import build_word_tokenizer

WORKER = Path(__file__).with_name("fsdp_worker.py")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp")
    launch_two_ranks(WORKER, out)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_sharded_zeroth_order_updates_equal_ddps_bit_for_bit(ranks):
    """Each rank perturbs the gathered block and updates its own rows with z drawn for the
    whole tensor, so the weights do not depend on the sharding: bit-identical to DDP's (which
    equals one process on the global batch: tests/test_ddp.py), and the ranks agree."""
    zero = ranks[0]
    # the per-step losses first: a difference there names the update where the runs parted
    assert zero["fsdp"]["step_losses"] == zero["ddp"]["step_losses"]
    assert equal(zero["fsdp"]["weights"], zero["ddp"]["weights"])
    assert equal(ranks[0]["fsdp"]["weights"], ranks[1]["fsdp"]["weights"])
    assert zero["fsdp"]["updates"] == 3 and not zero["fsdp"]["grads"]
    task = build_sentiment_task(seed=0, n_train_prompts=16, n_eval_prompts=4, n_sft=16,
                                n_train_pairs=8, n_eval_pairs=4)  # fmt: skip
    start = build_tiny_causal_lm(
        build_word_tokenizer(task.corpus()), hidden_size=32, num_layers=4, num_heads=2,
        intermediate_size=64,
    )  # fmt: skip
    moved = [
        n for n, p in start.named_parameters() if not torch.equal(p, zero["fsdp"]["weights"][n])
    ]
    assert len(moved) == len(zero["fsdp"]["weights"])


def test_one_all_reduce_per_zeroth_order_update(ranks):
    """Inside a step: FSDP's all-gathers of each block for the two evaluations, and one
    all-reduce (the step's scalars); nothing else."""
    for step in ranks[0]["fsdp"]["step_collectives"]:
        counts = collections.Counter(step)
        assert counts["c10d::allreduce_"] == 1
        assert set(counts) == {"c10d::allreduce_", "c10d::_allgather_base_"}


def test_each_rank_holds_half_the_parameters_of_ddp(ranks):
    for rank in ranks:
        sharded = sum(rank["fsdp"]["held_parameter_bytes"].values())
        replicated = sum(rank["ddp"]["held_parameter_bytes"].values())
        assert sharded <= 0.6 * replicated, (sharded, replicated)


def test_a_stopped_fsdp_run_resumes_bit_identically(ranks):
    assert ranks[0]["resumed"]["updates"] == 3
    losses = [step for step in ranks[0]["resumed"]["step_losses"] if step != ([], [])]
    assert losses == ranks[0]["fsdp"]["step_losses"][2:]  # ([], []): checkpoint loading's no-op
    assert equal(ranks[0]["resumed"]["weights"], ranks[0]["fsdp"]["weights"])


def test_first_order_updates_run_on_sharded_parameters(ranks):
    first = ranks[0]["first_order"]
    assert first["updates"] == 3
    assert equal(ranks[0]["first_order"]["weights"], ranks[1]["first_order"]["weights"])
    assert not equal(first["weights"], ranks[0]["fsdp"]["weights"])
