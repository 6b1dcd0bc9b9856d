"""End-to-end: the `zopro-train` command a user runs, with small overrides."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SMALL = [
    "dataset.task.n_train_prompts=16",
    "dataset.task.n_eval_prompts=4",
    "dataset.task.n_sft=32",
    "dataset.task.n_train_pairs=16",
    "dataset.task.n_eval_pairs=8",
    "sft.epochs=1",
    "reward_model.epochs=1",
    "loop.iterations=2",
    "loop.steps_per_iteration=2",
    "loop.first_order_steps=null",
    "loop.batch_size=2",
    "eval.samples_per_prompt=1",
    "policy.rollout.k=2",
    "policy.rollout.max_new_tokens=6",
    "model.tiny.hidden_size=16",
    "model.tiny.intermediate_size=32",
    "model.tiny.num_heads=2",
]


def zopro_train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "zopro_lightning.run.cli",
        f"hydra.run.dir={run_dir}",
        *SMALL,
        *overrides,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_zopro_train_writes_the_run_directory(tmp_path):
    result = zopro_train(tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    for key in (
        "task",
        "sampler",
        "optimizer",
        "policy_steps",
        "gold_reward_initial",
        "gold_reward_final",
        "gold_reward_after_first_order",
        "reward_model_accuracy",
        "kl_final",
        "wall_seconds",
        "peak_memory_mb",
    ):
        assert key in summary, key
    assert summary["policy_steps"] == 4
    assert summary["task"] == "sentiment" and summary["sampler"] == "zopro"
    assert (run / ".hydra" / "config.yaml").exists()
    with open(run / "metrics.csv") as handle:
        columns = next(csv.reader(handle))
    assert "policy/reward_mean" in columns and "sft/loss" in columns
    for iteration in (0, 1):
        assert (
            run / "adapters" / f"iteration_{iteration}" / "policy" / "adapter_model.safetensors"
        ).exists()
        assert (
            run
            / "adapters"
            / f"iteration_{iteration}"
            / "reward_model"
            / "adapter_model.safetensors"
        ).exists()
    assert "gold_reward_final" in result.stdout  # the printed summary


@pytest.mark.slow
def test_fully_zeroth_order_experiment(tmp_path):
    result = zopro_train(tmp_path / "run", "experiment=fully_zeroth_order", "sampler=gaussian")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["optimizer"] == "zeroth_order"
    assert "gold_reward_after_first_order" not in summary


def test_unknown_option_gets_hydras_message(tmp_path):
    result = zopro_train(tmp_path / "run", "policy.not_an_option=1")
    assert result.returncode != 0
    assert "not_an_option" in result.stderr


@pytest.mark.slow
def test_wandb_logger_offline_writes_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = zopro_train(tmp_path / "run", "logger=wandb", "loop.iterations=1")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "the offline run holds no history file"
    # the interplay plots were made and logged (W&B keeps logged images under files/media)
    assert list((tmp_path / "run" / "plots").glob("trajectory_pca_2d.png"))
    assert list(runs[0].rglob("media/images/interplay*.png"))


@pytest.mark.slow
def test_zopro_train_trains_every_weight_in_bf16(tmp_path):
    """``model.lora=null model.dtype=bf16``: full-parameter SFT, then zeroth-order iterations on
    bf16 weights (layer-by-layer evaluations, stochastic rounding, the offloaded reference)."""
    from safetensors.torch import load_file

    result = zopro_train(tmp_path / "run", "model.lora=null", "model.dtype=bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["kl_final"] != 0  # the reference pass ran against the SFT weights
    sft, policy = (load_file(next((run / d).glob("*.safetensors"))) for d in ("sft", "policy"))
    assert all(t.dtype == torch.bfloat16 for t in policy.values() if t.is_floating_point())
    assert sum(not torch.equal(sft[n], policy[n]) for n in sft) > len(sft) // 2  # all trained


def test_zeroth_order_iterations_search_the_span_of_iteration_0s_gradients(tmp_path):
    """``sampler=subspace sampler.sampler.basis=gradients`` in the published schedule: the
    first-order iteration 0 keeps its last batch gradients, its end makes their span the basis,
    and the zeroth-order iteration after it moves every tensor inside that span."""
    from zopro_lightning.run.state import load_state
    from zopro_lightning.zo.directions import canonical_name

    run = tmp_path / "run"
    result = zopro_train(
        run, "sampler=subspace", "sampler.sampler.basis=gradients", "sampler.sampler.rank=2"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    before, after = (load_state(run, f"iteration_{t}") for t in (0, 1))
    basis = before["sampler"]["given"]
    assert basis and max(b.shape[0] for b in basis.values()) == 2
    moved = 0
    for name, theta in after["policy"].items():
        delta = (theta - before["policy"][name]).flatten().double()
        rows = basis[canonical_name(name)].double()  # orthonormal [K, D]
        assert (delta - rows.T @ (rows @ delta)).norm() <= 1e-3 * delta.norm() + 1e-7
        moved += int(delta.norm() > 1e-6)
    assert moved > 0


@pytest.mark.slow
def test_sft_lora_false_trains_every_weight_then_lora_for_the_policy(tmp_path):
    """``sft.lora=false``: SFT changes every weight tensor of the randomly initialised tiny
    model, and the policy phases still train (and save) a LoRA adapter; the default SFT is LoRA
    merged, which leaves the tensors outside its target modules (the embeddings) as built."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    def sft_and_initial(run: Path) -> tuple[dict, dict]:
        spec = instantiate(OmegaConf.load(run / ".hydra" / "config.yaml").model)
        initial = spec.causal_lm(AutoTokenizer.from_pretrained(run / "sft")).state_dict()
        return load_file(next((run / "sft").glob("*.safetensors"))), initial

    result = zopro_train(tmp_path / "full", "sft.lora=false", "loop.iterations=1", "num_threads=1")
    assert result.returncode == 0, result.stderr[-3000:]
    sft, initial = sft_and_initial(tmp_path / "full")
    assert sft and all(not torch.equal(sft[n], initial[n]) for n in sft)
    assert (tmp_path / "full" / "policy_adapter" / "adapter_model.safetensors").exists()

    result = zopro_train(tmp_path / "lora", "loop.iterations=1", "num_threads=1")
    assert result.returncode == 0, result.stderr[-3000:]
    sft, initial = sft_and_initial(tmp_path / "lora")
    changed = {n for n in sft if not torch.equal(sft[n], initial[n])}
    assert changed and all("_proj." in n for n in changed)  # tiny.yaml's LoRA targets
    assert "model.embed_tokens.weight" not in changed
