"""The whole pipeline under two-process DDP on the CPU (gloo): every rank ends with the same
policy and reward model, refinement trains on the pairs of every rank, and rank 0 alone writes
the run directory.

``tests/ddp_pipeline_worker.py`` runs ``run_pipeline`` as ``zopro-train`` would with
``trainer.devices=2 +trainer.strategy=ddp``: Lightning's launcher re-runs it for rank 1. Every
rank saves what it ended with; these tests compare the ranks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from .conftest import launch_two_ranks

WORKER = Path(__file__).parent / "ddp_pipeline_worker.py"
ITERATIONS = 2
CHUNK = 2 * 2  # loop.steps_per_iteration * loop.batch_size of the worker: prompts a chunk
SUMMARY_KEYS = (
    "task",
    "sampler",
    "optimizer",
    "policy_steps",
    "gold_reward_initial",
    "gold_reward_per_iteration",
    "gold_reward_after_first_order",
    "gold_reward_final",
    "reward_model_accuracy",
    "refinement_pairs",
    "refinement_dropped",
    "kl_final",
    "wall_seconds",
    "peak_memory_mb",
)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The run directory and what each of the two ranks saved (index = rank)."""
    out = tmp_path_factory.mktemp("ddp_pipeline")
    launch_two_ranks(WORKER, out)
    ranks = [torch.load(out / f"rank_{r}.pt", weights_only=False) for r in range(2)]
    assert [rank["rank"] for rank in ranks] == [0, 1]
    assert all(rank["world_size"] == 2 for rank in ranks)
    return out / "run", ranks


def bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.slow
def test_ranks_end_with_bit_identical_policy_and_reward_model(run):
    _, (zero, one) = run
    assert zero["policy"] and zero["reward"]
    assert bit_identical(zero["sft"], one["sft"])  # the policy-learning start
    assert bit_identical(zero["policy"], one["policy"])
    assert bit_identical(zero["reward"], one["reward"])
    # the policy moved from its start on the SFT model (every LoRA tensor)
    assert all(not torch.equal(zero["sft"][n], zero["policy"][n]) for n in zero["sft"])


@pytest.mark.slow
def test_refinement_trains_every_rank_on_the_pairs_of_all_ranks(run):
    _, (zero, one) = run
    assert len(zero["refinements"]) == len(one["refinements"]) == ITERATIONS
    for t, (mine, theirs) in enumerate(zip(zero["refinements"], one["refinements"], strict=True)):
        # the distributed sampler split the chunk: each rank judged its own half of it
        assert mine["records"] == theirs["records"] == CHUNK // 2, t
        assert not set(mine["prompts"]) & set(theirs["prompts"]), t
        judged_pairs = mine["pairs"] + theirs["pairs"]
        assert judged_pairs > 0, t
        # both ranks trained on the same gathered pairs: rank 0's, then rank 1's
        assert mine["trained_on"] == theirs["trained_on"], t
        assert len(mine["trained_on"]) == judged_pairs, t
        expected = {"pairs": judged_pairs, "judged": CHUNK, "dropped": CHUNK - judged_pairs}
        assert mine["returned"] == theirs["returned"] == expected, t
    for rank in (zero, one):
        # the judge's counters are totals over the ranks (each rank judged half of each chunk)
        assert rank["summary"]["judge_queries"] == ITERATIONS * CHUNK
        assert rank["summary"]["refinement_pairs"] == [
            r["returned"]["pairs"] for r in zero["refinements"]
        ]
        assert rank["summary"]["refinement_dropped"] == [
            r["returned"]["dropped"] for r in zero["refinements"]
        ]


@pytest.mark.slow
def test_rank_zero_alone_writes_the_run_directory(run):
    run_dir, (zero, one) = run
    assert one["written"] == []
    expected = [
        "run_config.yaml",
        "sft",
        "state/start.pt",
        "summary.json",
        *(f"state/iteration_{t}.pt" for t in range(ITERATIONS)),
        *(
            f"adapters/iteration_{t}/{part}"
            for t in range(ITERATIONS)
            for part in ("policy", "reward_model")
        ),
    ]
    for path in expected:
        assert zero["written"].count(path) == 1, path
        assert (run_dir / path).exists(), path
    for t in range(ITERATIONS):
        for part in ("policy", "reward_model"):
            assert (run_dir / f"adapters/iteration_{t}/{part}/adapter_model.safetensors").exists()
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp") or "partial" in p.name]
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in SUMMARY_KEYS:
        assert key in summary, key
    assert summary["policy_steps"] == ITERATIONS * 2
    assert summary["optimizer_per_iteration"] == ["first_order", "zeroth_order"]
    assert summary["kl_final"] == zero["summary"]["kl_final"]  # rank 0's summary
    for key in ("refinement_pairs", "gold_reward_per_iteration", "gold_reward_final"):
        assert summary[key] == zero["summary"][key] == one["summary"][key], key
