"""The whole pipeline under two-process DDP on the CPU (gloo): every rank ends with the same
policy and reward model, refinement trains on the pairs of every rank, and rank 0 alone writes
the run directory.

``tests/ddp_pipeline_worker.py`` runs ``run_pipeline`` as ``zopro-train`` would with
``trainer.devices=2 +trainer.strategy=ddp``: Lightning's launcher re-runs it for rank 1. Every
rank saves what it ended with; these tests compare the ranks. A run stopped by a real signal
(SIGINT or SIGTERM to every process of the launched job, as Ctrl-C or a scheduler sends it)
inside an iteration or between two, then resumed with ``resume=RUN_DIR``, ends with the
uninterrupted run's weights, to the bit, on every rank.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
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


def saved_ranks(out: Path, world_size: int = 2) -> list[dict]:
    """What each rank of a finished worker run saved (index = rank)."""
    ranks = [torch.load(out / f"rank_{r}.pt", weights_only=False) for r in range(world_size)]
    assert [rank["rank"] for rank in ranks] == list(range(world_size))
    assert all(rank["world_size"] == world_size for rank in ranks)
    return ranks


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The run directory and what each of the two ranks saved (index = rank)."""
    out = tmp_path_factory.mktemp("ddp_pipeline")
    launch_two_ranks(WORKER, out)
    return out / "run", saved_ranks(out)


def worker_environment() -> dict[str, str]:
    """A clean distributed environment and one thread a rank (as ``launch_two_ranks``)."""
    launcher_keys = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK")
    env = {k: v for k, v in os.environ.items() if k not in launcher_keys}
    return env | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def launch(out: Path, *options: str, timeout: float = 240) -> None:
    """One worker run to its end (never retried: a crash is a failure)."""
    out.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, str(WORKER), str(out), *options],
        cwd=WORKER.parents[1],
        env=worker_environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def launch_and_stop(
    out: Path, point: str, sig: signal.Signals, *options: str, ranks: int = 2, timeout: float = 180
) -> None:
    """Launch a worker run that waits at ``point`` (``--pause``); once each of its ``ranks``
    processes has got there, send ``sig`` to the whole job (its process group, as Ctrl-C or a
    batch scheduler does) and check that the run ended without finishing. Whatever of the job
    is left afterwards is killed."""
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "stopped.log").open("w")
    process = subprocess.Popen(
        [sys.executable, str(WORKER), str(out), "--pause", point, *options],
        cwd=WORKER.parents[1],
        env=worker_environment(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: rank 0 and the rank 1 it launches
    )
    markers = [out / f"paused_rank{r}" for r in range(ranks)]
    try:
        deadline = time.monotonic() + timeout
        while not all(marker.exists() for marker in markers):
            assert process.poll() is None, (out / "stopped.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"the run did not reach {point} in {timeout} s"
            time.sleep(0.05)
        os.killpg(process.pid, sig)
        returncode = process.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):  # e.g. a rank left on a collective
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log.close()
    assert returncode != 0, "the stopped run finished"
    assert not (out / "run" / "summary.json").exists()
    assert not list(out.glob("rank_*.pt"))
    for marker in markers:
        marker.unlink()


def assert_same_weights(resumed: list[dict], uninterrupted: list[dict]) -> None:
    """Every rank ends with the uninterrupted run's policy and reward model, to the bit."""
    for rank, (mine, theirs) in enumerate(zip(resumed, uninterrupted, strict=True)):
        for part in ("policy", "reward"):
            assert mine[part].keys() == theirs[part].keys(), (rank, part)
            differing = [n for n in mine[part] if not torch.equal(mine[part][n], theirs[part][n])]
            assert not differing, (rank, part, differing[:3])
        for key in ("gold_reward_per_iteration", "refinement_pairs", "judge_queries"):
            assert mine["summary"][key] == theirs["summary"][key], (rank, key)
        assert mine["summary"]["resumed"] is True


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


@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "sig"),
    [
        # inside iteration 1, after its first update (checkpointed): each rank holds the
        # completions of its own half of that update's prompts, which refinement 1 judges
        ("update_3", signal.SIGINT),
        # between iterations 0 and 1 (state/iteration_0.pt written)
        ("iteration_0", signal.SIGTERM),
    ],
)
def test_ddp_run_stopped_by_a_signal_resumes_to_bit_identical_weights(run, tmp_path, point, sig):
    _, uninterrupted = run
    out = tmp_path / "stopped"
    launch_and_stop(out, point, sig)
    assert (out / "run/state/iteration_0.pt").exists()
    assert not (out / "run/state/iteration_1.pt").exists()
    if point.startswith("update_"):
        assert (out / "run/checkpoints/iteration_1/last.ckpt").exists()
    launch(out, "--resume")
    resumed = saved_ranks(out)
    # the resume judged what the uninterrupted run judged in refinement 1: each rank the
    # completions of its own half of the chunk (not rank 0's, as from rank 0's checkpoint)
    for rank, (mine, theirs) in enumerate(zip(resumed, uninterrupted, strict=True)):
        assert len(mine["refinements"]) == 1, rank
        again, before = mine["refinements"][0], theirs["refinements"][1]
        assert again["prompts"] == before["prompts"], rank
        assert again["trained_on"] == before["trained_on"], rank
    assert_same_weights(resumed, uninterrupted)


def test_rollout_records_are_checkpointed_by_rank_and_restored_to_their_rank():
    from types import SimpleNamespace

    from zopro_lightning.callbacks.rollout_recorder import RolloutRecorder

    recorder = RolloutRecorder()
    recorder.records = [("p0", "c0"), ("p1", "c1")]
    state = recorder.state_dict()  # one process: its records, as the only rank's
    assert state == {"records": [["p0", "c0"], ["p1", "c1"]], "records_by_rank": [state["records"]]}
    two_ranks = {
        "records": [["a", "1"]],
        "records_by_rank": [[["a", "1"]], [["b", "2"], ["c", "3"]]],
    }
    for rank, expected in enumerate([[("a", "1")], [("b", "2"), ("c", "3")]]):
        recorder.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        recorder.load_state_dict(two_ranks)
        assert recorder.records == expected  # its own rank's, not rank 0's
    recorder.trainer = SimpleNamespace(global_rank=0, world_size=1)
    recorder.load_state_dict(two_ranks)  # resumed on one process: every rank's records
    assert recorder.records == [("a", "1"), ("b", "2"), ("c", "3")]
    recorder.load_state_dict({"records": [["p", "c"]]})  # a checkpoint from before by-rank
    assert recorder.records == [("p", "c")]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "sig"),
    [
        ("sft", signal.SIGTERM),  # the SFT model and state/sft.pt written
        ("start", signal.SIGINT),  # r_0 written (state/start.pt)
        ("policy_1", signal.SIGTERM),  # iteration 1's policy phase done, its refinement not
    ],
)
def test_ddp_run_stopped_at_a_phase_boundary_resumes_to_bit_identical_weights(
    run, tmp_path, point, sig
):
    _, uninterrupted = run
    out = tmp_path / "stopped"
    launch_and_stop(out, point, sig)
    assert not (out / "run/summary.json").exists()
    launch(out, "--resume")
    assert_same_weights(saved_ranks(out), uninterrupted)
