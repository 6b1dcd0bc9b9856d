"""InterplaySnapshots and UpdateCosines on a tiny LoRA Llama in a plain lightning.Trainer."""

from __future__ import annotations

import json
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import Logger
from safetensors import safe_open
from torch.utils.data import DataLoader

from zopro_lightning import ZOPrOModule
from zopro_lightning.callbacks.interplay import (
    InterplaySnapshots,
    UpdateCosines,
    snapshot_updates,
)
from zopro_lightning.interplay import analyse, load_run
from zopro_lightning.models.loading import add_lora
from zopro_lightning.policy.optimization import OptimizerSettings
from zopro_lightning.rl.rollout import RolloutSettings
from zopro_lightning.zo.samplers import GaussianSampler, ZOPrOSampler, canonical_name

from .conftest import count_words_reward

COS_MU, COS_V = "interplay/cos_update_mu", "interplay/cos_update_v"


class MemoryLogger(Logger):
    """Keeps every logged metric as (step, value) lists."""

    def __init__(self) -> None:
        super().__init__()
        self.history: dict[str, list[tuple[int, float]]] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        for key, value in metrics.items():
            self.history.setdefault(key, []).append((step, float(value)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        return None


def make_module(policy, tokenizer, sampler, accumulate_batches=1) -> ZOPrOModule:
    optimizer = OptimizerSettings(lr=1e-2, accumulate_batches=accumulate_batches)
    rollout = RolloutSettings(k=2, max_new_tokens=5)
    return ZOPrOModule(
        policy, tokenizer, count_words_reward, sampler, optimizer=optimizer, rollout=rollout
    )


def fit(module, prompts, callbacks, steps=4, logger=None, batch_size=2) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=steps,
        max_epochs=-1,
        accelerator="cpu",
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(module, DataLoader(prompts, batch_size=batch_size))
    return trainer


def random_like_policy(policy, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(p.shape, generator=g)
        for n, p in policy.named_parameters()
        if p.requires_grad
    }


def tiny_lora_reward_model(policy):
    """A one-output sequence classifier with the policy's base config and LoRA layout."""
    from transformers import LlamaForSequenceClassification

    config = policy.get_base_model().config
    config.num_labels = 1
    torch.manual_seed(1)
    return add_lora(LlamaForSequenceClassification(config), r=4, alpha=8, task_type="SEQ_CLS")


def test_snapshot_schedule() -> None:
    assert snapshot_updates(4, 0.05) == {1, 2, 3, 4}
    assert snapshot_updates(4, 0.5) == {1, 2, 4}
    assert snapshot_updates(50, 0.2) == {1, 10, 20, 30, 40, 50}
    assert snapshot_updates(1, 0.05) == {1}
    with pytest.raises(ValueError, match="every_fraction"):
        InterplaySnapshots("unused", every_fraction=0.0)


def test_snapshots_across_fits_load_and_analyse(lora_policy, tokenizer, small_task, tmp_path):
    snapshots, cosines = InterplaySnapshots(tmp_path, every_fraction=0.5), UpdateCosines()
    module = make_module(lora_policy, tokenizer, ZOPrOSampler(decay="linear"))
    logger = MemoryLogger()
    reward_model = tiny_lora_reward_model(lora_policy)
    snapshots.save_reward(reward_model, step=0, iteration=0)
    fit(module, small_task.train_prompts[:8], [snapshots, cosines], logger=logger)
    # the sampler has no directions yet: the cosine callback logs nothing
    assert COS_MU not in logger.history and COS_V not in logger.history

    with torch.no_grad():  # stands in for a reward refinement
        for p in reward_model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    snapshots.save_reward(reward_model, step=module.policy_updates, iteration=0)
    snapshots.iteration = 1
    fit(module, small_task.train_prompts[8:16], [snapshots, cosines])
    snapshots.save_reward(reward_model.base_model.model, step=8, iteration=1)  # unwrapped works

    records = json.loads((tmp_path / "interplay" / "index.json").read_text())
    policy = [r for r in records if r["model"] == "policy"]
    # first fit: start, then after updates 1, 2, 4; second fit: after updates 1, 2, 4 again
    assert [r["step"] for r in policy] == [0, 1, 2, 4, 5, 6, 8]
    assert [r["iteration"] for r in policy] == [0, 0, 0, 0, 1, 1, 1]
    assert [r["fraction"] for r in policy] == [0.0, 0.25, 0.5, 1.0, 0.25, 0.5, 1.0]
    assert {r["phase"] for r in policy} == {"policy"}
    reward = [r for r in records if r["model"] == "reward"]
    assert [(r["step"], r["iteration"], r["phase"]) for r in reward] == [
        (0, 0, "reward"),
        (4, 0, "reward"),
        (8, 1, "reward"),
    ]

    # the last policy snapshot is the final trainable state, canonically named, float32
    trainable = {
        canonical_name(n): p.detach() for n, p in lora_policy.named_parameters() if p.requires_grad
    }
    with safe_open(str(tmp_path / "interplay" / policy[-1]["file"]), framework="pt") as fh:
        assert set(fh.keys()) == set(trainable)
        for name, value in trainable.items():
            stored = fh.get_tensor(name)
            assert stored.dtype == torch.float32 and torch.equal(stored, value)

    runs = load_run(tmp_path)
    assert runs.policy.n == 7 and runs.reward.n == 3
    assert runs.policy.dim == sum(t.numel() for t in trainable.values())
    assert not np.allclose(runs.policy.points[0], runs.policy.points[-1])
    result = analyse(runs, pairing="iteration")
    assert result["space"] == "shared-parameters" and result["n_pairs"] == 2


def test_cosines_are_logged_when_directions_are_set(lora_policy, tokenizer, small_task):
    sampler = ZOPrOSampler(decay="linear")
    sampler.set_directions(random_like_policy(lora_policy, 1), random_like_policy(lora_policy, 2))
    module = make_module(lora_policy, tokenizer, sampler, accumulate_batches=2)
    logger = MemoryLogger()
    fit(module, small_task.train_prompts[:16], [UpdateCosines()], steps=3, logger=logger)
    assert module.policy_updates == 3
    for key in (COS_MU, COS_V):
        values = [v for _, v in logger.history[key]]
        # one value per update; Lightning re-sends the last on-step values on the batches
        # that only accumulate, as it does for the module's own metrics
        assert len(set(values)) == 3, (key, values)
        assert [s for s, _ in logger.history[key]] == [s for s, _ in logger.history["policy/loss"]]
        assert all(-1.0 <= v <= 1.0 for v in values), values


def test_cosine_with_mu_is_about_d(lora_policy, tokenizer, small_task):
    sampler = ZOPrOSampler(decay="constant", initial_decay=0.999)
    mu, noise = random_like_policy(lora_policy, 3), random_like_policy(lora_policy, 4)
    v = {n: mu[n] + noise[n] for n in mu}  # a reward update correlated with mu
    sampler.set_directions(mu, v)
    module = make_module(lora_policy, tokenizer, sampler)
    logger = MemoryLogger()
    fit(module, small_task.train_prompts[:8], [UpdateCosines()], logger=logger)
    cos_mu = [c for _, c in logger.history[COS_MU]]
    cos_v = [c for _, c in logger.history[COS_V]]
    assert len(cos_mu) == len(cos_v) == 4
    # the update is -lr * g * z with z = 0.999 mu + (a part orthogonal to each v_n, of norm
    # 0.045 ||mu_n||), so |cos(update, mu)| is about 0.999 ...
    assert all(abs(c) > 0.99 for c in cos_mu), cos_mu
    # ... and cos(update, v) is sign(g) * 0.999 * cos(mu, v), v being the per-tensor unit v_n
    flat_mu = torch.cat([t.flatten() for t in mu.values()])
    flat_v = torch.cat([(t / t.norm()).flatten() for t in v.values()])
    cos_mu_v = float(torch.nn.functional.cosine_similarity(flat_mu, flat_v, dim=0))
    assert cos_mu_v > 0.5
    for c_mu, c_v in zip(cos_mu, cos_v, strict=True):
        assert c_v == pytest.approx(np.sign(c_mu) * 0.999 * cos_mu_v, abs=0.01)


def test_other_samplers_log_nothing(lora_policy, tokenizer, small_task):
    module = make_module(lora_policy, tokenizer, GaussianSampler())
    logger = MemoryLogger()
    fit(module, small_task.train_prompts[:4], [UpdateCosines()], steps=2, logger=logger)
    assert COS_MU not in logger.history and "policy/loss" in logger.history


def test_only_global_rank_zero_writes(lora_policy, tmp_path):
    snapshots = InterplaySnapshots(tmp_path / "run")
    module = SimpleNamespace(policy=lora_policy, policy_updates=0, total_policy_updates=lambda: 2)
    other_rank = SimpleNamespace(is_global_zero=False, max_steps=2, global_step=0)
    snapshots.on_train_start(other_rank, module)
    module.policy_updates = 1
    snapshots.on_train_batch_end(other_rank, module, None, None, 0)
    snapshots.on_train_end(other_rank, module)
    assert not (tmp_path / "run").exists()


def test_a_module_with_only_a_policy_is_counted_by_global_step(lora_policy, tmp_path):
    """The fallbacks of zopro_lightning.policy.protocol: without ``policy_updates`` and
    ``total_policy_updates``, ``trainer.global_step`` and ``max_steps`` count."""
    snapshots = InterplaySnapshots(tmp_path, every_fraction=0.5)
    module = SimpleNamespace(policy=lora_policy)
    trainer = SimpleNamespace(is_global_zero=True, max_steps=2, global_step=0)
    snapshots.on_train_start(trainer, module)
    for step in (1, 2):
        trainer.global_step = step
        snapshots.on_train_batch_end(trainer, module, None, None, 0)
    snapshots.on_train_end(trainer, module)
    records = json.loads((tmp_path / "interplay" / "index.json").read_text())
    assert [(r["step"], r["fraction"]) for r in records] == [(0, 0.0), (1, 0.5), (2, 1.0)]
