"""The iterative ZOPrO loop of docs/algorithm.md §2, each phase through a Lightning ``Trainer``::

    SFT (first-order, LoRA)  ->  reward model r_0 (Bradley–Terry)  ->
    for t in 0..T-1:
        policy learning on a chunk of prompts   (t = 0: first-order RLOO by default, or ZO with
                                                 an isotropic sampler; t >= 1: ZOPrO)
        refine the reward model on judged pairs of the policy's own completions
        mu_t = theta_t - theta_{t-1};  v_t = phi_{t+1} - phi_t  ->  sampler.set_directions

:func:`run_pipeline` takes the composed Hydra config; every object in it is built with
``hydra.utils.instantiate``. :class:`Pipeline` builds the run's objects and calls the phases
(:mod:`zopro_lightning.run.phases`) with a :class:`~zopro_lightning.run.context.RunContext`;
each iteration's boundary (``mu``, refinement, ``v``, the sampler's directions, the schedule's
next optimizer) is the :class:`~zopro_lightning.callbacks.zopro.ZOPrOIterations` callback, the
same a user's own ``Trainer.fit`` takes. It writes the run directory and returns the summary.

What the task decides (tokenizer first or task first, the reward model's loss, gold evaluation
or not, the judge) is :mod:`zopro_lightning.run.building`.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from zopro_lightning.callbacks.interplay import InterplaySnapshots, UpdateCosines
from zopro_lightning.callbacks.zopro import ZOPrOIterations
from zopro_lightning.models.loading import trainable_state
from zopro_lightning.policy.module import ZOPrOModule
from zopro_lightning.reward.callables import HFRewardModel
from zopro_lightning.reward.refinement import RewardRefinement
from zopro_lightning.run import building, memory_check, phases
from zopro_lightning.run.config_schema import validate_config
from zopro_lightning.run.context import RunContext, peak_memory_mb
from zopro_lightning.run.loggers import log_summary
from zopro_lightning.run.state import (
    check_same_config,
    iteration_state,
    last_finished_iteration,
    load_state,
    restore_iteration_state,
    save_run_config,
    save_state,
)
from zopro_lightning.run.summary import SUMMARY_FILE, finite_or_null, read_summary

log = logging.getLogger(__name__)


class Pipeline:
    """Builds the run's objects and runs its phases (:meth:`run`)."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.ctx = RunContext(cfg, run_dir)
        self.run_dir = self.ctx.run_dir
        if self.ctx.resuming:
            check_same_config(self.run_dir, cfg)
        self.model_spec = instantiate(cfg.model)
        self.tokenizer, self.task = building.build_task(cfg, self.model_spec)
        self.kind: str = getattr(self.task, "kind", "pairs")
        self.gold_reward = instantiate(cfg.dataset.get("gold_reward"))
        self.reward_loss = building.reward_loss(cfg, self.kind)
        self.judge_source = building.judge_source(cfg.judge)
        building.check_judge_has_scorer(cfg, self.judge_source, self.gold_reward)
        self.eval_key = "gold_reward" if self.gold_reward is not None else "policy_reward"
        self.schedule = building.iteration_schedule(cfg)  # a bad schedule fails before any work
        self.refinement: RewardRefinement | None = None  # built with the judge, after r_0
        self.judge: Any = None
        self.judge_counts: dict[str, int] = {}  # a resumed run's judge counters so far
        self.policy_module: ZOPrOModule | None = None
        self.summary = building.run_summary(cfg, self.task, self.eval_key)

    @property
    def last_trainer(self) -> L.Trainer | None:
        return self.ctx.last_trainer

    @property
    def is_global_zero(self) -> bool:
        return self.ctx.is_global_zero

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """The whole loop; returns the summary. A finished run (``summary.json`` written) that
        is resumed is left as it is: its summary is read back, nothing is logged."""
        start = time.perf_counter()
        if self.ctx.resuming and (self.run_dir / SUMMARY_FILE).exists():
            log.info("resume: %s has finished; its files are left as they are", self.run_dir)
            return read_summary(self.run_dir)
        self.check_memory()  # before any model is loaded (MemoryCheckError)
        self.begin()
        sft_model = self.supervised_fine_tuning()
        reward, started = self.initial_reward_model()
        policy = self.start_policy_learning(sft_model, reward, resumed=started is not None)
        zopro = self.zopro_callback(reward)
        callbacks, snapshots = self.policy_callbacks(zopro, reward, save_r0=started is None)
        chunks = self.prompt_chunks()
        for t in range(zopro.iteration, self.schedule.iterations):
            if snapshots is not None:
                snapshots.iteration = t
            self.policy_phase(t, chunks[t], callbacks)
            self.end_iteration(t, zopro, snapshots)
        return self.finish(policy, reward, seconds=time.perf_counter() - start)

    def prompt_chunks(self) -> list[list[str]]:
        """Each iteration's prompts: ``updates * loop.batch_size``, in order, wrapping around."""
        batch, schedule = self.cfg.loop.batch_size, self.schedule
        sizes = [schedule.updates_of(t) * batch for t in range(schedule.iterations)]
        return phases.prompt_chunks(self.task.train_prompts, sizes)

    def check_memory(self) -> None:
        """Refuse a run whose estimated peak exceeds the device's memory (``memory_check``;
        :mod:`zopro_lightning.run.memory_check`); ranks > 0 rely on rank 0's check."""
        if not self.cfg.get("memory_check", True) or memory_check.is_launched_rank():
            return
        phase, need, budget = memory_check.check_run_memory(
            self.cfg, self.model_spec, self.tokenizer
        )
        log.info(
            "memory check: about %.1f GB at the peak (%s), %.1f GB available",
            need / 1e9, phase, budget / 1e9,
        )  # fmt: skip

    def begin(self) -> None:
        """The run's config into its directory (a new run), the loggers started."""
        if not self.ctx.resuming and self.is_global_zero:
            save_run_config(self.run_dir, self.cfg)
        self.ctx.start_loggers()
        full = not self.cfg.sft.get("lora", True) or self.cfg.model.get("lora") is None
        log.info(
            "[sft] supervised fine-tuning %s, %d epochs",
            "of every weight" if full else "with LoRA", self.cfg.sft.epochs,
        )  # fmt: skip

    def initial_reward_model(self) -> tuple[HFRewardModel, dict | None]:
        """``r_0``, trained on the task's pairs (or scored rows), or restored from
        ``state/start.pt``; returns it and that state (``None`` when trained here)."""
        cfg, ctx = self.cfg.reward_model, self.ctx
        ctx.seed_phase("reward_model")
        ctx.progress.enter("reward_model")
        started = load_state(self.run_dir, "start") if ctx.resuming else None
        reward = self.build_reward_model()
        if started is None:
            log.info("[reward model] r_0, %d epochs", cfg.epochs)
            data = self.task.train_scored if self.kind == "scores" else self.task.train_pairs
            phases.fit_reward_model(
                cfg, reward, data, ctx, epochs=cfg.epochs, lr=cfg.lr, loss=self.reward_loss
            )
            quality = phases.reward_model_quality(self.cfg.eval, self.task, reward, "_initial")
            self.summary.set(**quality)
        else:
            phases.load_trainable(reward.model, started["reward"])
            self.summary.restore(started)
            ctx.progress.completed = int(started.get("run_step", ctx.progress.completed))
        ctx.to_device(reward.model)
        return reward, started

    def start_policy_learning(
        self, sft_model: torch.nn.Module, reward: HFRewardModel, resumed: bool
    ) -> torch.nn.Module:
        """The policy (a fresh LoRA adapter on the SFT model) and its module; the initial
        held-out evaluation and ``state/start.pt`` (a new run), or the state of the last
        finished iteration (a resumed one)."""
        self.ctx.seed_phase("policy")
        policy = self.model_spec.with_lora(sft_model)
        self.policy_module = self.policy_module_for(policy, reward)
        if not resumed:
            self.summary.set(**{f"{self.eval_key}_initial": self.evaluate(policy)})
            self.save_run_state("start", {"reward": trainable_state(reward.model)})
        self.first = self.restore_iteration(policy, reward) if self.ctx.resuming else 0
        return policy

    def zopro_callback(self, reward: HFRewardModel) -> ZOPrOIterations:
        """ZOPrO's iterations, ended by :meth:`end_iteration` after each one's evaluation."""
        zopro = ZOPrOIterations(
            reward,
            self.refine,
            self.schedule,
            direction=self.cfg.sampler.get("direction", "update"),
            seed=self.cfg.seed,
            boundaries_inside_fit=False,
        )
        zopro.iteration = self.first
        return zopro

    def policy_callbacks(
        self, zopro: ZOPrOIterations, reward: HFRewardModel, save_r0: bool
    ) -> tuple[list[L.Callback], InterplaySnapshots | None]:
        """The callbacks of every policy phase: ZOPrO's, the ``callbacks`` group's, and the
        interplay snapshots and cosines when asked for (``r_0`` saved first, in a new run)."""
        interplay = self.cfg.interplay
        callbacks = [zopro, *phases.instantiate_callbacks(self.cfg.get("callbacks"))]
        snapshots = None
        if interplay.snapshots:
            snapshots = InterplaySnapshots(
                self.run_dir, interplay.every_fraction, interplay.max_numel
            )
            if save_r0:
                snapshots.save_reward(reward.model, step=0, iteration=0)
            callbacks.append(snapshots)
        if interplay.update_cosines:
            callbacks.append(UpdateCosines())
        return callbacks, snapshots

    def policy_phase(self, t: int, prompts: Sequence[str], callbacks: list[L.Callback]) -> None:
        """Policy learning of iteration ``t``, then its held-out evaluation."""
        first_order = self.schedule.optimizer(t) == "first_order"
        self.ctx.seed_phase("policy_learning", t)
        self.ctx.progress.enter("policy_learning", t)
        started_at = time.perf_counter()
        log.info(
            "[iteration %d/%d] policy learning: %s, %s, %d updates",
            t + 1, self.schedule.iterations, "first-order" if first_order else "zeroth-order",
            "AdamW" if first_order else f"{self.cfg.sampler.name} sampler",
            self.schedule.updates_of(t),
        )  # fmt: skip
        self.learn_policy(t, prompts, callbacks)
        self.summary.append("policy_seconds_per_iteration", time.perf_counter() - started_at)
        key = self.eval_key
        measured = self.evaluate(self.policy_module.policy)
        log.info(
            "[iteration %d/%d] held-out %s %.4f (paired s.e. of the gain %.4f)",
            t + 1, self.schedule.iterations, key, measured, self.summary.last_gain_stderr(),
        )  # fmt: skip
        self.summary.append(f"{key}_per_iteration", measured)
        self.summary.append("optimizer_per_iteration", self.policy_module.hparams.optimizer)
        if first_order:
            self.summary.set(**{f"{key}_after_first_order": measured})

    def end_iteration(
        self, t: int, zopro: ZOPrOIterations, snapshots: InterplaySnapshots | None
    ) -> None:
        """ZOPrO's boundary (``mu``, refinement, ``v``, the sampler's directions), then the
        iteration's adapters and state."""
        module, reward = self.policy_module, zopro.reward_model
        self.ctx.progress.enter("refinement", t)
        log.info(
            "[iteration %d/%d] reward refinement: %s judge",
            t + 1, self.schedule.iterations, self.cfg.judge.name,
        )  # fmt: skip
        ended = zopro.end_iteration(self.ctx.last_trainer, module)
        if snapshots is not None:
            snapshots.save_reward(reward.model, step=module.policy_updates, iteration=t)
        log.info("iteration %d: %s, %d tensors matched", t, ended.refinement, ended.matched)
        self.summary.append("refinement_pairs", ended.refinement["pairs"])
        self.summary.append("refinement_dropped", ended.refinement["dropped"])
        self.summary.set(matched_tensors=ended.matched)
        self.save_adapters(t, module.policy, reward)
        self.save_iteration(t, module.policy, reward, module.sampler, ended.directions)

    def finish(self, policy: torch.nn.Module, reward: HFRewardModel, seconds: float) -> dict:
        """The final figures, the exported policy, ``summary.json``, the plots; the summary."""
        key, summary, module = self.eval_key, self.summary, self.policy_module
        summary.set(**{f"{key}_final": summary[f"{key}_per_iteration"][-1]})
        if key != "gold_reward":
            summary.set(gold_reward_final=math.nan)  # no gold reward (see gold_evaluation)
        summary.set(**phases.reward_model_quality(self.cfg.eval, self.task, reward))
        if self.judge is not None:
            summary.set(**building.judge_counters(self.judge))
        last = module.last_rollout
        summary.set(
            policy_steps=self.schedule.total_updates,
            kl_final=last.metrics["kl"] if last is not None else summary.get("kl_final"),
            skipped_steps=module.skipped_steps,
            wall_seconds=seconds,
            peak_memory_mb=peak_memory_mb(),
        )
        if self.ctx.resuming:
            summary.set(resumed=True)
        from zopro_lightning.run.export import export_policy  # RUN_DIR/policy and policy_adapter

        values = summary.as_dict()
        export_policy(policy, self.tokenizer, self.cfg, values, self.run_dir, self.is_global_zero)
        if self.is_global_zero:
            summary.write(self.run_dir)
        phases.interplay_plots(self.cfg.interplay, self.ctx)
        log_summary(self.ctx.loggers, finite_or_null(values))
        return values

    # -- the run's objects (zopro_lightning.run.building) -------------------------------------
    def build_judge(self, reward: HFRewardModel) -> Any:
        scorer = {"gold": self.gold_reward, "reward_model": reward}.get(self.judge_source)
        return building.build_judge(self.cfg.judge, scorer)

    # -- the phases, with this run's settings -------------------------------------------------
    def supervised_fine_tuning(self) -> torch.nn.Module:
        cfg = self.cfg
        return phases.supervised_fine_tuning(
            cfg.sft, self.model_spec, self.tokenizer, self.task, self.ctx
        )

    def build_reward_model(self) -> HFRewardModel:
        return phases.build_reward_model(
            self.cfg.reward_model, self.model_spec, self.tokenizer, self.ctx
        )

    def policy_module_for(self, policy: torch.nn.Module, reward: HFRewardModel) -> ZOPrOModule:
        return building.policy_module(self.cfg, policy, self.tokenizer, reward)

    def learn_policy(self, t: int, prompts: Sequence[str], callbacks: list[L.Callback]) -> None:
        phases.learn_policy(
            self.cfg.loop,
            self.policy_module,
            prompts,
            callbacks,
            self.ctx,
            iteration=t,
            updates=self.schedule.updates_of(t),
        )

    def refine(
        self, reward: HFRewardModel, policy_module: ZOPrOModule, records: list, trainer=None
    ) -> dict[str, int]:
        """The refinement the ZOPrO callback calls at each iteration's end: judged pairs of
        stored vs fresh completions train the reward model (:class:`RewardRefinement`, built
        on first use with the run's judge, trainer factory and progress bars)."""
        if self.refinement is None:
            self.judge = self.build_judge(reward)
            for name, count in self.judge_counts.items():
                setattr(self.judge, name, count)  # resumed: the counts so far
            progress = self.ctx.bar_description("judging") is not None
            self.refinement = building.reward_refinement(
                self.cfg, self.judge, self.task, self.ctx.trainer, progress
            )
        self.ctx.to_device(policy_module.policy)
        return self.refinement(reward, policy_module, records, trainer)

    def evaluate(self, policy: torch.nn.Module) -> float:
        """Mean gold reward of the policy's samples on held-out prompts; without a gold
        reward, the mean score the current reward model gives them. Every evaluation samples
        the same prompts with the same seed, so two are paired (:class:`RunSummary`)."""
        scorer = self.gold_reward if self.gold_reward is not None else self.policy_module.reward_fn
        means = phases.held_out_means(
            self.cfg, self.task, self.policy_module, policy, scorer, self.tokenizer, self.ctx
        )
        return self.summary.record_evaluation(means)

    # -- run state ----------------------------------------------------------------------------
    def save_run_state(self, name: str, payload: dict[str, Any]) -> None:
        """``state/<name>.pt`` with the summary and evaluations so far (rank 0 only)."""
        if self.is_global_zero:
            progress = {"run_step": self.ctx.progress.completed}  # the logged step goes on
            save_state(self.run_dir, name, payload | self.summary.state() | progress)

    def save_iteration(
        self, t: int, policy, reward: HFRewardModel, sampler, directions: dict[str, dict]
    ) -> None:
        """The state after iteration ``t``; the iteration's mid-way checkpoints then go.
        ``directions`` (each candidate ``mu`` and ``v``) let a run branched from this state set
        its own sampler's directions (``bench/schedules.py``)."""
        payload = iteration_state(t, self.policy_module, reward, self.judge, directions)
        self.save_run_state(f"iteration_{t}", payload)
        if self.is_global_zero:
            shutil.rmtree(self.run_dir / "checkpoints" / f"iteration_{t}", ignore_errors=True)

    def restore_iteration(self, policy, reward: HFRewardModel) -> int:
        """Load the state after the last finished iteration; returns the next iteration."""
        t = last_finished_iteration(self.run_dir)
        if t is None:
            return 0
        state = load_state(self.run_dir, f"iteration_{t}")
        log.info("resume: after iteration %d", t)
        restore_iteration_state(state, self.policy_module, reward)
        self.summary.restore(state)
        self.judge_counts = dict(state["judge"])
        self.ctx.progress.completed = int(state.get("run_step", self.ctx.progress.completed))
        return t + 1

    def save_adapters(self, iteration: int, policy, reward: HFRewardModel) -> None:
        if self.is_global_zero:
            root = self.run_dir / "adapters" / f"iteration_{iteration}"
            policy.save_pretrained(root / "policy")
            reward.model.save_pretrained(root / "reward_model")


def run_pipeline(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run the whole loop of ``cfg`` into ``run_dir``; returns the summary."""
    validate_config(cfg)  # every option, path and length before any work (ConfigError)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), cfg.get("num_threads") or 64)))
    pipeline = Pipeline(cfg, run_dir)
    try:
        summary = pipeline.run()
    except BaseException:
        pipeline.ctx.close_loggers(failed=True)
        raise
    pipeline.ctx.close_loggers()
    final = f"{pipeline.eval_key}_final"
    if not math.isfinite(summary[final]):
        log.warning("%s is not finite", final)
    return summary
