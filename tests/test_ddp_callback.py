"""``ZOPrOIterations`` in a user's ``Trainer(strategy="ddp", devices=2)`` fit (two CPU
processes, gloo; ``tests/ddp_callback_worker.py``): both ranks go through the first-order
iteration, the boundary's refinement on every rank's judged pairs and the zeroth-order
iteration, and end with the same policy and reward-model weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .conftest import launch_two_ranks

WORKER = Path(__file__).parent / "ddp_callback_worker.py"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_callback_under_ddp_ends_with_equal_ranks(tmp_path):
    launch_two_ranks(WORKER, tmp_path)
    zero, one = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    for rank in (zero, one):
        assert rank["iteration"] == 2 and rank["policy_updates"] == 4
        assert rank["optimizer"] == "zeroth_order"
        assert rank["pairs"] > 0  # the last boundary judged pairs and refined
    for part in ("policy", "reward"):
        assert zero[part].keys() == one[part].keys()
        for name, tensor in zero[part].items():
            assert torch.equal(tensor, one[part][name]), (part, name)
    assert any(not torch.equal(zero["reward_before"][n], t) for n, t in zero["reward"].items())
