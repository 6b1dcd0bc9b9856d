"""The iterative ZOPrO loop of DESIGN.md §2, each phase through a Lightning ``Trainer``::

    SFT (first-order, LoRA)  ->  reward model r_0 (Bradley–Terry)  ->
    for t in 0..T-1:
        policy learning on a chunk of prompts   (t = 0: first-order RLOO by default, or ZO with
                                                 an isotropic sampler; t >= 1: ZOPrO)
        refine the reward model on judged pairs of the policy's own completions
        mu_t = theta_t - theta_{t-1};  v_t = phi_{t+1} - phi_t  ->  ZOPrOSampler.set_directions

:func:`run_pipeline` takes the composed Hydra config; every object in it is built with
``hydra.utils.instantiate``. It writes the run directory and returns the summary.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from zopro_lightning.callbacks.interplay import InterplaySnapshots, UpdateCosines
from zopro_lightning.callbacks.rollout_recorder import RolloutRecorder
from zopro_lightning.evaluation import mean_gold_reward, pairwise_accuracy
from zopro_lightning.models import (
    load_sequence_classifier,
    state_difference,
    trainable_state,
)
from zopro_lightning.module import ZOPrOModule
from zopro_lightning.refinement import judged_pairs, keep_close_merge
from zopro_lightning.reward_model import PairCollator, RewardModelModule
from zopro_lightning.rewards import HFRewardModel
from zopro_lightning.samplers import GaussianSampler, ZOPrOSampler
from zopro_lightning.sft import SFTCollator, SFTModule

log = logging.getLogger(__name__)


def peak_memory_mb() -> float:
    """Peak resident memory of this process (CPU), or peak CUDA allocation when on a GPU."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_chunks(prompts: Sequence[str], iterations: int, size: int) -> list[list[str]]:
    """``iterations`` consecutive chunks of ``size`` prompts, wrapping around the prompt list
    (policy learning goes over the data in order, chunk by chunk)."""
    if not prompts:
        raise ValueError("the dataset has no training prompts; check dataset.* options.")
    return [
        [prompts[(t * size + i) % len(prompts)] for i in range(size)] for t in range(iterations)
    ]


class Pipeline:
    """Holds the run's objects and runs its phases; one method a phase."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.logger = instantiate(cfg.logger) if cfg.get("logger") else False
        self.task = instantiate(cfg.dataset.task)
        self.gold_reward = instantiate(cfg.dataset.gold_reward)
        self.model_spec = instantiate(cfg.model)
        self.tokenizer = self.model_spec.tokenizer(self.task.corpus())
        self.summary: dict[str, Any] = {
            "task": cfg.dataset.name,
            "sampler": cfg.sampler.name,
            "optimizer": "zeroth_order"
            if not cfg.loop.first_order_first
            else "first_order_then_zeroth_order",
            "seed": cfg.seed,
        }

    # -- helpers --------------------------------------------------------------------------
    def trainer(self, callbacks: Sequence[L.Callback] = (), **kwargs) -> L.Trainer:
        """A Lightning Trainer for one phase, from the ``trainer`` config group."""
        factory: Callable[..., L.Trainer] = instantiate(self.cfg.trainer, _partial_=True)
        return factory(
            logger=self.logger,
            callbacks=list(callbacks),
            enable_checkpointing=False,
            enable_model_summary=False,
            default_root_dir=str(self.run_dir),
            **kwargs,
        )

    def loader(self, items: Sequence, batch_size: int, collate=None, shuffle=True) -> DataLoader:
        generator = torch.Generator().manual_seed(self.cfg.seed)
        return DataLoader(
            list(items),
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=collate or (lambda batch: batch),
            generator=generator,
        )

    # -- phases ---------------------------------------------------------------------------
    def supervised_fine_tuning(self) -> torch.nn.Module:
        """SFT with LoRA, merged into the base: the reference policy of everything after."""
        cfg = self.cfg.sft
        base = self.model_spec.causal_lm(self.tokenizer)
        model = self.model_spec.with_lora(base)
        module = SFTModule(model, lr=cfg.lr)
        loader = self.loader(self.task.sft_examples, cfg.batch_size, SFTCollator(self.tokenizer))
        self.trainer(max_epochs=cfg.epochs).fit(module, loader)
        merged = model.merge_and_unload()
        merged.save_pretrained(self.run_dir / "sft")
        self.tokenizer.save_pretrained(self.run_dir / "sft")
        return merged

    def reward_model(self) -> HFRewardModel:
        """The reward model r_0, trained on the task's pairs.

        ``reward_model.backbone: null``: built from the SFT weights with the policy's LoRA
        layout, so the ZOPrO sampler matches policy and reward tensors by name. Otherwise any
        sequence classifier by hub name or path (``minilm``: the bundled all-MiniLM-L6-v2),
        with its own tokenizer; its tensors then match none of the policy's.
        """
        cfg = self.cfg.reward_model
        if cfg.backbone:
            from zopro_lightning.reward_backbones import load_reward_backbone

            reward = load_reward_backbone(
                cfg.backbone,
                lora=cfg.get("lora"),
                dtype=cfg.get("dtype"),
                max_length=cfg.max_length,
                freeze_layers=cfg.get("freeze_layers", 0),
            )
        else:
            classifier = load_sequence_classifier(
                self.run_dir / "sft", pad_token_id=self.tokenizer.pad_token_id
            )
            classifier = self.model_spec.with_lora(classifier, task_type="SEQ_CLS")
            reward = HFRewardModel(classifier, self.tokenizer, max_length=cfg.max_length)
        self.fit_reward_model(reward, self.task.train_pairs, epochs=cfg.epochs, lr=cfg.lr)
        return reward

    def fit_reward_model(
        self, reward: HFRewardModel, pairs: Sequence[dict], epochs: int, lr: float
    ) -> None:
        module = RewardModelModule(reward, loss=self.cfg.reward_model.loss, lr=lr)
        loader = self.loader(pairs, self.cfg.reward_model.batch_size, PairCollator(reward))
        self.trainer(max_epochs=epochs).fit(module, loader)
        reward.model.eval()

    def refine(
        self, reward: HFRewardModel, policy_module: ZOPrOModule, records: list[tuple[str, str]]
    ) -> dict[str, float]:
        """Judge stored vs fresh completions, train the reward model on the judged pairs."""
        cfg = self.cfg.loop.refine
        judge = (
            instantiate(self.cfg.judge.judge, reward_fn=self.gold_reward)
            if self.cfg.judge.get("needs_gold")
            else instantiate(self.cfg.judge.judge)
        )
        pairs = judged_pairs(policy_module, judge, records)
        before = trainable_state(reward.model)
        if pairs:
            self.fit_reward_model(reward, pairs, epochs=cfg.epochs, lr=cfg.lr)
        if cfg.keep_close_alpha is not None:
            keep_close_merge(reward.model, before, cfg.keep_close_alpha)
        return {"pairs": len(pairs), "judged": len(records)}

    def evaluate(self, policy: torch.nn.Module) -> float:
        config = self.policy_module.rollout_config  # the training sampling settings
        config.k = self.cfg.eval.samples_per_prompt
        return mean_gold_reward(
            policy,
            self.tokenizer,
            self.task.eval_prompts,
            self.gold_reward,
            config,
            seed=self.cfg.seed + 10_000,
        )

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        start = time.perf_counter()
        cfg = self.cfg
        sft_model = self.supervised_fine_tuning()
        reward = self.reward_model()
        self.summary["reward_model_accuracy_initial"] = pairwise_accuracy(
            reward, self.task.eval_pairs
        )
        policy = self.model_spec.with_lora(sft_model)
        sampler = instantiate(cfg.sampler.sampler)
        iterations = cfg.loop.iterations
        steps = cfg.loop.steps_per_iteration
        zo_iterations = iterations - int(cfg.loop.first_order_first)
        if isinstance(sampler, ZOPrOSampler) and sampler.total_steps is None:
            sampler.total_steps = max(1, zo_iterations * steps)
        self.policy_module = ZOPrOModule(
            policy,
            self.tokenizer,
            reward,
            sampler,
            seed=cfg.seed,
            **OmegaConf.to_container(cfg.policy, resolve=True),
        )
        self.summary["gold_reward_initial"] = self.evaluate(policy)
        chunks = prompt_chunks(self.task.train_prompts, iterations, steps * cfg.loop.batch_size)
        recorder = RolloutRecorder()
        interplay = cfg.interplay
        snapshots = (
            InterplaySnapshots(self.run_dir, interplay.every_fraction, interplay.max_numel)
            if interplay.snapshots
            else None
        )
        callbacks: list[L.Callback] = [recorder]
        if snapshots is not None:
            snapshots.save_reward(reward.model, step=0, iteration=0)  # r_0
            callbacks.append(snapshots)
        if interplay.update_cosines:
            callbacks.append(UpdateCosines())
        policy_steps = 0
        for t, chunk in enumerate(chunks):
            first_order = t == 0 and cfg.loop.first_order_first
            self.policy_module.set_optimizer(
                "first_order" if first_order else "zeroth_order",
                lr=cfg.loop.first_order_lr if first_order else cfg.loop.zeroth_order_lr,
            )
            # iteration 0 of a fully zeroth-order run has no directions yet: isotropic sampler
            self.policy_module.sampler = (
                GaussianSampler() if t == 0 and not first_order else sampler
            )
            theta_before = trainable_state(policy)
            if snapshots is not None:
                snapshots.iteration = t
            self.trainer(callbacks=callbacks, max_steps=steps, max_epochs=-1).fit(
                self.policy_module, self.loader(chunk, cfg.loop.batch_size)
            )
            policy_steps += steps
            mu = state_difference(trainable_state(policy), theta_before)
            gold = self.evaluate(policy)
            self.summary.setdefault("gold_reward_per_iteration", []).append(gold)
            if first_order:
                self.summary["gold_reward_after_first_order"] = gold
            phi_before = trainable_state(reward.model)
            refinement = self.refine(reward, self.policy_module, recorder.pop())
            v = state_difference(trainable_state(reward.model), phi_before)
            if snapshots is not None:
                snapshots.save_reward(
                    reward.model, step=self.policy_module.policy_updates, iteration=t
                )
            matched = sampler.set_directions(mu, v) if isinstance(sampler, ZOPrOSampler) else 0
            log.info("iteration %d: %s, %d tensors matched", t, refinement, matched)
            self.summary.setdefault("refinement_pairs", []).append(refinement["pairs"])
            self.summary["matched_tensors"] = matched
            self.save_adapters(t, policy, reward)
        self.summary.update(
            {
                "policy_steps": policy_steps,
                "gold_reward_final": self.summary["gold_reward_per_iteration"][-1],
                "reward_model_accuracy": pairwise_accuracy(reward, self.task.eval_pairs),
                "kl_final": self.policy_module.last_rollout.metrics["kl"],
                "skipped_steps": self.policy_module.skipped_steps,
                "wall_seconds": time.perf_counter() - start,
                "peak_memory_mb": peak_memory_mb(),
            }
        )
        self.write_summary()
        self.interplay_plots()
        return self.summary

    def interplay_plots(self) -> None:
        """``zopro-viz`` on this run when asked (``interplay.plots_at_end``; ``null`` means
        "when the logger is W&B"), and the PNGs logged to W&B."""
        from lightning.pytorch.loggers import WandbLogger

        wandb = isinstance(self.logger, WandbLogger)
        wanted = self.cfg.interplay.plots_at_end
        if not (wanted or (wanted is None and wandb)) or not self.cfg.interplay.snapshots:
            return
        from zopro_lightning.interplay.cli import main as zopro_viz

        zopro_viz([str(self.run_dir), "--methods", self.cfg.interplay.methods, "--no-html"])
        if wandb:
            images = sorted((self.run_dir / "plots").glob("*.png"))
            self.logger.log_image("interplay", [str(path) for path in images])

    def save_adapters(self, iteration: int, policy, reward: HFRewardModel) -> None:
        root = self.run_dir / "adapters" / f"iteration_{iteration}"
        policy.save_pretrained(root / "policy")
        reward.model.save_pretrained(root / "reward_model")

    def write_summary(self) -> None:
        path = self.run_dir / "summary.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.summary, indent=2, default=float))
        os.replace(tmp, path)


def run_pipeline(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run the whole loop of ``cfg`` into ``run_dir``; returns the summary."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), cfg.get("num_threads") or 64)))
    summary = Pipeline(cfg, run_dir).run()
    if not math.isfinite(summary["gold_reward_final"]):
        log.warning("gold_reward_final is not finite")
    return summary
