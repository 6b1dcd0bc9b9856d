"""The iterative ZOPrO loop of DESIGN.md §2, each phase through a Lightning ``Trainer``::

    SFT (first-order, LoRA)  ->  reward model r_0 (Bradley–Terry)  ->
    for t in 0..T-1:
        policy learning on a chunk of prompts   (t = 0: first-order RLOO by default, or ZO with
                                                 an isotropic sampler; t >= 1: ZOPrO)
        refine the reward model on judged pairs of the policy's own completions
        mu_t = theta_t - theta_{t-1};  v_t = phi_{t+1} - phi_t  ->  ZOPrOSampler.set_directions

:func:`run_pipeline` takes the composed Hydra config; every object in it is built with
``hydra.utils.instantiate``. It writes the run directory and returns the summary.

What the task decides (DESIGN.md §4):

- **tokenizer first or task first.** A hub/local model (``model.name_or_path`` set) brings its
  own tokenizer, built *before* the task and passed as ``task.tokenizer`` when the dataset
  asks for it (``dataset.pass_tokenizer: true``: chat templates, prompt lengths in tokens).
  The tiny model (``model=tiny``) gets a word tokenizer built *from* the task's corpus, so the
  task comes first (the embedded task's path).
- **reward-model data and loss** by the task's ``kind``: ``"pairs"`` train Bradley–Terry and
  report held-out pairwise accuracy (``reward_model_accuracy``); ``"scores"`` (translation,
  ``z_mean``) train MSE regression and report held-out Pearson/Spearman
  (``reward_model_pearson``/``reward_model_spearman``). Refinement always trains on judged
  pairs (Bradley–Terry), whatever the kind.
- **gold evaluation** only when the dataset has a ``gold_reward`` (the embedded task:
  ``gold_reward_*`` keys). Without one (the published datasets) the summary says so
  (``gold_evaluation``) and reports the current reward model's mean score of the policy's
  samples on held-out prompts instead (``policy_reward_*``); ``gold_reward_final`` is then
  NaN in the returned summary (``null`` in ``summary.json``).
- **the judge** (``judge=gold|reward_model|llm|file``) is built once, after the reward model;
  its counters (unparseable answers, inconsistent or missing pairs) go in the summary.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from zopro_lightning.callbacks.interplay import InterplaySnapshots, UpdateCosines
from zopro_lightning.callbacks.run_progress import PhaseProgressBar, RunProgress
from zopro_lightning.callbacks.zopro import IterationSchedule, ZOPrOIterations
from zopro_lightning.data.resumable import ResumableDataLoader
from zopro_lightning.models.loading import (
    load_sequence_classifier,
    trainable_state,
)
from zopro_lightning.policy.module import ZOPrOModule
from zopro_lightning.reward.callables import HFRewardModel
from zopro_lightning.reward.refinement import (
    JUDGE_COUNTERS,
    ReadablePromptJudge,
    RefinementSettings,
    RewardRefinement,
    judge_counts,
)
from zopro_lightning.reward.training import fit_reward_model
from zopro_lightning.run.config_schema import validate_config
from zopro_lightning.run.evaluation import (
    paired_difference_stderr,
    pairwise_accuracy,
    prompt_mean_rewards,
    score_correlations,
)
from zopro_lightning.run.loggers import (
    finish_loggers,
    instantiate_loggers,
    log_summary,
    start_loggers,
)
from zopro_lightning.run.sft import SFTCollator, SFTModule
from zopro_lightning.run.state import (
    check_same_config,
    last_finished_iteration,
    load_state,
    save_run_config,
    save_state,
)
from zopro_lightning.utils.checkpointing import (
    AtomicCheckpointIO,
    ensure_writable,
    resumable_checkpoint,
)
from zopro_lightning.utils.distributed import is_multi_process
from zopro_lightning.utils.memory import peak_rss_mb
from zopro_lightning.zo.spsa import derive_seed

log = logging.getLogger(__name__)


def peak_memory_mb() -> float:
    """Peak resident memory of this process (CPU), or peak CUDA allocation when on a GPU."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def prompt_chunks(prompts: Sequence[str], sizes: Sequence[int]) -> list[list[str]]:
    """Consecutive chunks of ``sizes[t]`` prompts, wrapping around the prompt list (policy
    learning goes over the data in order, chunk by chunk)."""
    if not prompts:
        raise ValueError("the dataset has no training prompts; check dataset.* options.")
    starts = [sum(sizes[:t]) for t in range(len(sizes))]
    return [
        [prompts[(start + i) % len(prompts)] for i in range(size)]
        for start, size in zip(starts, sizes, strict=True)
    ]


def batch_size_per_rank(batch_size: int, world_size: int) -> int:
    """Prompts each of ``world_size`` DDP ranks takes per policy update: ``loop.batch_size``
    stays the prompts of one update (and a chunk is gone through once), split over the ranks.

    Raises:
        ValueError: ``batch_size`` is not a multiple of ``world_size``.
    """
    if batch_size % world_size:
        raise ValueError(
            f"loop.batch_size={batch_size} prompts per update do not split evenly over "
            f"{world_size} DDP processes; use a multiple of {world_size}"
        )
    return batch_size // world_size




def iteration_schedule(cfg: DictConfig) -> IterationSchedule:
    """The run's :class:`IterationSchedule` from ``loop`` (the schedule, updates, learning rates)
    and the sampler's own ``sampler.lr`` / ``sampler.eps`` when it sets them (a targeted and
    an isotropic sampler do not step on the same scale)."""
    loop, sampler = cfg.loop, cfg.sampler
    return IterationSchedule(
        iterations=int(loop.iterations),
        updates=int(loop.steps_per_iteration),
        schedule=str(loop.schedule),
        first_order_updates=loop.get("first_order_steps"),
        first_order_lr=float(loop.first_order_lr),
        zeroth_order_lr=float(sampler.get("lr") or loop.zeroth_order_lr),
        zeroth_order_eps=sampler.get("eps"),
        lr_schedule=str(cfg.policy.optimizer.lr_schedule),
        zeroth_order_lr_schedule=loop.get("zeroth_order_lr_schedule"),
    )


def judge_source(judge_cfg: DictConfig) -> str | None:
    """What a judge config compares: ``"gold"``, ``"reward_model"`` or ``None`` (the judge
    needs no reward callable: an LLM, a label file). ``needs_gold: true`` means ``"gold"``."""
    source = judge_cfg.get("scores_with")
    if source is None and judge_cfg.get("needs_gold"):
        source = "gold"
    if source not in (None, "gold", "reward_model"):
        raise ValueError(f"judge.scores_with must be gold, reward_model or null, got {source!r}")
    return source


def judge_counters(judge: Any) -> dict[str, int]:
    """The judge's cumulative counters as ``judge_<counter>`` summary entries (the LLM
    judge's unparseable answers and inconsistent pairs; the file judge's missing pairs)."""
    return {f"judge_{name[2:]}": count for name, count in judge_counts(judge).items()}


def finite_or_null(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (strict JSON)."""
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def sft_examples_that_fit(
    examples: Sequence[tuple[str, str]], tokenizer: Any, max_length: int
) -> list[tuple[str, str]]:
    """The SFT examples whose prompt leaves room for completion tokens within ``max_length``
    (an example with no completion token left has no loss term; a batch of them gives NaN).

    Raises:
        ValueError: no example fits (the message says which setting to raise).
    """
    kept = [
        (prompt, completion)
        for prompt, completion in examples
        if len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) < max_length - 1
    ]
    if len(kept) < len(examples):
        log.warning(
            "SFT: %d of %d examples have prompts of >= sft.max_length=%d tokens; left out",
            len(examples) - len(kept), len(examples), max_length,
        )  # fmt: skip
    if not kept:
        raise ValueError(
            f"no SFT example has a prompt shorter than sft.max_length={max_length} tokens; "
            "raise sft.max_length or lower dataset.task.max_prompt_tokens"
        )
    return kept


def instantiate_callbacks(cfg: DictConfig | None) -> list[L.Callback]:
    """The ``callbacks`` config group: one Lightning callback per named entry with a
    ``_target_`` (an entry set to null is switched off)."""
    if not cfg:
        return []
    return [instantiate(node) for node in cfg.values() if node is not None and "_target_" in node]


def load_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable tensors into ``model`` (by name; every one must exist)."""
    params = dict(model.named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise ValueError(
            f"resume: the saved state has tensors this model lacks ({missing[:3]}...); the run "
            "directory belongs to another model configuration."
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


class Pipeline:
    """Holds the run's objects and runs its phases; one method a phase."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = ensure_writable(run_dir)  # a bad output dir fails before any work
        self.resuming = bool(cfg.get("resume"))
        if self.resuming:
            check_same_config(self.run_dir, cfg)
        self.last_trainer: L.Trainer | None = None  # the latest phase's (DDP: its strategy)
        # one step counter over every phase's Trainer, and the loggers of the whole run
        self.progress = RunProgress()
        self.loggers = instantiate_loggers(cfg.get("logger"), self.run_dir, self.is_global_zero)
        self.loggers_started = False
        self.model_spec = instantiate(cfg.model)
        self.tokenizer, self.task = self.build_task()
        self.kind: str = getattr(self.task, "kind", "pairs")
        self.gold_reward = instantiate(cfg.dataset.get("gold_reward"))
        self.reward_loss = self.resolve_reward_loss()
        self.judge_source = judge_source(cfg.judge)
        if self.judge_source == "gold" and self.gold_reward is None:
            raise ValueError(
                f"judge={cfg.judge.name} compares gold rewards, but dataset {cfg.dataset.name} "
                "has no gold_reward; use judge=llm, judge=reward_model or judge=file"
            )
        self.eval_key = "gold_reward" if self.gold_reward is not None else "policy_reward"
        self.schedule = iteration_schedule(cfg)  # an unknown schedule fails before any work
        self.refinement: RewardRefinement | None = None  # built with the judge, after r_0
        self.eval_scores: list[list[float]] = []  # per-prompt means of every evaluation
        self.judge: Any = None
        self.summary: dict[str, Any] = self.summary_header()
        if self.gold_reward is None:
            self.summary["gold_evaluation"] = (
                f"skipped: dataset {cfg.dataset.name} has no gold reward; policy_reward_* are "
                "the reward model's mean scores of policy samples on held-out prompts"
            )
        if hasattr(self.task, "n_filtered"):
            self.summary["prompts_over_length"] = self.task.n_filtered

    def summary_header(self) -> dict[str, Any]:
        """What the config says of the run (kept over a restored summary: a run branched from
        another's state, as ``bench/schedules.py`` does, says what it ran)."""
        cfg = self.cfg
        return {
            "task": cfg.dataset.name,
            "sampler": cfg.sampler.name,
            "optimizer": cfg.loop.schedule,
            "seed": cfg.seed,
        }

    def build_task(self) -> tuple[Any, Any]:
        """``(tokenizer, task)``: the pretrained tokenizer first (passed to the task when the
        dataset wants it), or the task first and a word tokenizer over its corpus."""
        dataset = self.cfg.dataset
        build = instantiate(dataset.task, _partial_=True)
        if self.model_spec.tokenizer_name is not None:
            tokenizer = self.model_spec.tokenizer()
            task = build(tokenizer=tokenizer) if dataset.get("pass_tokenizer") else build()
            return tokenizer, task
        task = build()
        return self.model_spec.tokenizer(task.corpus()), task

    def resolve_reward_loss(self) -> str:
        """``reward_model.loss`` (``auto``: by the task's kind), checked against the data."""
        wanted = {"pairs": "bradley_terry", "scores": "mse"}[self.kind]
        loss = self.cfg.reward_model.get("loss", "auto") or "auto"
        if loss not in ("auto", wanted):
            raise ValueError(
                f"reward_model.loss={loss} does not fit dataset {self.cfg.dataset.name}, whose "
                f"data are {self.kind}; use reward_model.loss={wanted} (or auto)"
            )
        return wanted

    def build_judge(self, reward: HFRewardModel) -> Any:
        """The refinement judge of ``cfg.judge``; a reward-comparing judge gets its scorer
        (the gold reward, or the current reward model, refined in place)."""
        scorer = {"gold": self.gold_reward, "reward_model": reward}.get(self.judge_source)
        if scorer is not None:
            return instantiate(self.cfg.judge.judge, reward_fn=scorer)
        return instantiate(self.cfg.judge.judge)

    # -- helpers --------------------------------------------------------------------------
    def device(self) -> torch.device:
        """Where generation and scoring run between Lightning phases: the GPU when the trainer
        uses one (Lightning moves a module back to the CPU at the end of every ``fit``)."""
        accelerator = str(self.cfg.trainer.get("accelerator", "cpu"))
        if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def to_device(self, *models: torch.nn.Module) -> None:
        """Move ``models`` to :meth:`device` (nothing moves on a CPU run)."""
        device = self.device()
        for model in models:
            if next(model.parameters()).device != device:
                model.to(device)

    def trainer(self, callbacks: Sequence[L.Callback] = (), **kwargs) -> L.Trainer:
        """A Lightning Trainer for one phase, from the ``trainer`` config group, with the run's
        loggers and its :class:`RunProgress` (one logged step over every phase's Trainer)."""
        factory: Callable[..., L.Trainer] = instantiate(self.cfg.trainer, _partial_=True)
        callbacks = [self.progress, *callbacks]
        if self.cfg.trainer.get("enable_progress_bar", True) and not any(
            isinstance(callback, ProgressBar) for callback in callbacks
        ):
            callbacks.append(PhaseProgressBar(self.progress, self.cfg.loop.iterations))
        options = {
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "enable_autolog_hparams": False,  # the loggers get the composed config, once
        } | kwargs
        trainer = factory(
            logger=self.loggers or False,
            callbacks=callbacks,
            default_root_dir=str(self.run_dir),
            **options,
        )
        self.last_trainer = trainer
        return trainer

    def bar_description(self, description: str) -> str | None:
        """``description`` for a progress bar of work outside a Trainer, or ``None`` (no bar)
        where the trainer config turns bars off or on ranks other than 0."""
        if not self.cfg.trainer.get("enable_progress_bar", True) or not self.is_global_zero:
            return None
        return description

    @property
    def is_global_zero(self) -> bool:
        """Whether this process writes the run's files (rank 0 under DDP; always on one).
        Before the first trainer: Lightning's rank from the environment (``LOCAL_RANK`` of a
        process its DDP launcher started, ``RANK`` under torchrun)."""
        if self.last_trainer is None:
            return rank_zero_only.rank == 0
        return self.last_trainer.is_global_zero

    def barrier(self) -> None:
        """Wait for every rank (after rank 0 wrote something the others read)."""
        if self.last_trainer is not None and is_multi_process(self.last_trainer):
            self.last_trainer.strategy.barrier()

    def seed_phase(self, phase: str, iteration: int = 0) -> None:
        """Seed the global RNGs from ``(seed, phase, iteration)`` at the start of each phase, so
        a phase's randomness (LoRA inits, fresh completions for refinement) does not depend on
        what ran before it in this process: a resumed run repeats it exactly."""
        L.seed_everything(derive_seed(self.cfg.seed, phase, iteration) % 2**32, verbose=False)

    def loader(self, items: Sequence, batch_size: int, collate=None, shuffle=True) -> DataLoader:
        """A shuffled (seeded) loader whose position Lightning checkpoints and restores."""
        generator = torch.Generator().manual_seed(self.cfg.seed)
        return ResumableDataLoader(
            list(items),
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=collate or (lambda batch: batch),
            generator=generator,
        )

    # -- phases ---------------------------------------------------------------------------
    def supervised_fine_tuning(self) -> torch.nn.Module:
        """SFT with LoRA, merged into the base: the reference policy of everything after.
        Resuming, the merged model of ``RUN_DIR/sft`` is loaded instead (and the run's logged
        step goes on from ``state/sft.pt``)."""
        cfg = self.cfg.sft
        target = self.run_dir / "sft"
        if self.resuming and (target / "config.json").exists():
            from zopro_lightning.models.loading import load_causal_lm

            log.info("resume: SFT policy from %s", target)
            done = load_state(self.run_dir, "sft")
            self.progress.completed = int(done["run_step"]) if done else 0
            return load_causal_lm(target, dtype=self.model_spec.dtype)
        self.seed_phase("sft")
        self.progress.enter("sft")
        base = self.model_spec.causal_lm(self.tokenizer)
        model = self.model_spec.with_lora(base)
        module = SFTModule(model, lr=cfg.lr)
        max_length = cfg.get("max_length") or 128
        examples = sft_examples_that_fit(self.task.sft_examples, self.tokenizer, max_length)
        collator = SFTCollator(self.tokenizer, max_length=max_length)
        loader = self.loader(examples, cfg.batch_size, collator)
        self.trainer(max_epochs=cfg.epochs).fit(module, loader)
        merged = model.merge_and_unload()
        if self.is_global_zero:  # complete in a temporary directory, then one rename
            partial = self.run_dir / "sft.partial"
            shutil.rmtree(partial, ignore_errors=True)
            merged.save_pretrained(partial)
            self.tokenizer.save_pretrained(partial)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(partial, target)
            save_state(self.run_dir, "sft", {"run_step": self.progress.completed})
        self.barrier()  # the reward model reads RUN_DIR/sft on every rank
        return merged

    def reward_model(self) -> HFRewardModel:
        """The reward model r_0, trained on the task's pairs (or scored rows)."""
        reward = self.build_reward_model()
        cfg = self.cfg.reward_model
        data = self.task.train_scored if self.kind == "scores" else self.task.train_pairs
        self.fit_reward_model(reward, data, epochs=cfg.epochs, lr=cfg.lr, loss=self.reward_loss)
        return reward

    def build_reward_model(self) -> HFRewardModel:
        """The untrained reward model.

        ``reward_model.backbone: null``: built from the SFT weights with the policy's LoRA
        layout, so the ZOPrO sampler matches policy and reward tensors by name. Otherwise any
        sequence classifier by hub name or path (``minilm``: the bundled all-MiniLM-L6-v2),
        with its own tokenizer; its tensors then match none of the policy's.
        """
        cfg = self.cfg.reward_model
        if cfg.backbone:
            from zopro_lightning.reward.backbones import load_reward_backbone

            reward = load_reward_backbone(
                cfg.backbone,
                lora=cfg.get("lora"),
                dtype=cfg.get("dtype"),
                max_length=cfg.max_length,
                freeze_layers=cfg.get("freeze_layers", 0),
            )
        else:
            classifier = load_sequence_classifier(
                self.run_dir / "sft",
                pad_token_id=self.tokenizer.pad_token_id,
                dtype=self.model_spec.dtype,
            )
            classifier = self.model_spec.with_lora(classifier, task_type="SEQ_CLS")
            reward = HFRewardModel(classifier, self.tokenizer, max_length=cfg.max_length)
        return reward

    def fit_reward_model(
        self, reward: HFRewardModel, rows: Sequence[dict], epochs: int, lr: float, loss: str
    ) -> None:
        """First-order training on pairs (``bradley_terry``) or scored rows (``mse``)."""
        fit_reward_model(
            reward,
            rows,
            self.trainer(max_epochs=epochs),
            loss=loss,
            lr=lr,
            batch_size=self.cfg.reward_model.batch_size,
            warmup_fraction=self.cfg.reward_model.get("warmup_fraction", 0.0),
            seed=self.cfg.seed,
        )
        self.to_device(reward.model)

    def policy_module_for(self, policy: torch.nn.Module, reward: HFRewardModel) -> ZOPrOModule:
        """The ``ZOPrOModule`` of the config: ``policy`` scored by ``reward``, with the
        ``sampler`` group's sampler and the ``policy`` block's settings."""
        cfg = self.cfg
        return ZOPrOModule(
            policy,
            self.tokenizer,
            reward,
            instantiate(cfg.sampler.sampler),
            seed=cfg.seed,
            **{group: instantiate(settings) for group, settings in cfg.policy.items()},
        )

    def reward_model_quality(self, reward: HFRewardModel, suffix: str = "") -> None:
        """Held-out accuracy (pairs) or Pearson/Spearman (scores) into the summary."""
        limit = self.cfg.eval.get("max_pairs")
        if self.kind == "scores":
            rows = self.task.eval_scored[:limit] if limit else self.task.eval_scored
            for name, value in score_correlations(reward, rows).items():
                self.summary[f"reward_model_{name}{suffix}"] = value
        else:
            pairs = self.task.eval_pairs[:limit] if limit else self.task.eval_pairs
            self.summary[f"reward_model_accuracy{suffix}"] = pairwise_accuracy(reward, pairs)

    def refine(
        self, reward: HFRewardModel, policy_module: ZOPrOModule, records: list, trainer=None
    ) -> dict[str, int]:
        """The refinement the ZOPrO callback calls at each iteration's end: judged pairs of
        stored vs fresh completions train the reward model (:class:`RewardRefinement`, built
        on first use with the run's judge, trainer factory and progress bars)."""
        if self.refinement is None:
            self.judge = self.build_judge(reward)
            for name, count in getattr(self, "judge_counts", {}).items():
                setattr(self.judge, name, count)  # resumed: the counts so far
            judge = self.judge
            readable = getattr(self.task, "readable_prompts", None)
            if self.cfg.judge.get("readable_prompts") and readable:
                judge = ReadablePromptJudge(judge, readable)
            cfg = self.cfg
            settings = RefinementSettings(
                epochs=cfg.loop.refine.epochs,
                lr=cfg.loop.refine.lr,
                batch_size=cfg.reward_model.batch_size,
                keep_close_alpha=cfg.loop.refine.keep_close_alpha,
                warmup_fraction=cfg.reward_model.get("warmup_fraction", 0.0),
            )
            progress = self.bar_description("judging") is not None
            self.refinement = RewardRefinement(judge, settings, self.trainer, cfg.seed, progress)
        self.to_device(policy_module.policy)
        return self.refinement(reward, policy_module, records, trainer)

    def evaluate(self, policy: torch.nn.Module) -> float:
        """Mean gold reward of the policy's samples on held-out prompts; without a gold
        reward, the mean score the current reward model gives them.

        Every evaluation samples the same prompts with the same seed, so two evaluations are
        paired: the per-prompt means are kept (:attr:`eval_scores`) and the summary gets the
        standard error of each iteration's gain and of the whole run's
        (``<key>_gain_stderr_per_iteration``, ``<key>_stderr``)."""
        config = self.policy_module.rollout_config  # the training sampling settings
        config.k = self.cfg.eval.samples_per_prompt
        limit = self.cfg.eval.get("max_prompts")
        prompts = self.task.eval_prompts[:limit] if limit else self.task.eval_prompts
        self.to_device(policy)
        means = prompt_mean_rewards(
            policy,
            self.tokenizer,
            prompts,
            self.gold_reward if self.gold_reward is not None else self.policy_module.reward_fn,
            config,
            seed=self.cfg.seed + 10_000,
            progress=self.bar_description("evaluation"),
        )
        self.eval_scores.append(means.tolist())
        if len(self.eval_scores) > 1:
            key = self.eval_key
            previous, first = self.eval_scores[-2], self.eval_scores[0]
            self.summary.setdefault(f"{key}_gain_stderr_per_iteration", []).append(
                paired_difference_stderr(means, torch.tensor(previous))
            )
            self.summary[f"{key}_stderr"] = paired_difference_stderr(means, torch.tensor(first))
        finite = means[torch.isfinite(means)]
        return float(finite.mean())

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """The whole loop; returns the summary. A finished run (``summary.json`` written)
        that is resumed is left as it is: its summary is read back, nothing is logged."""
        start = time.perf_counter()
        cfg = self.cfg
        if self.resuming and (self.run_dir / "summary.json").exists():
            log.info("resume: %s has finished; its files are left as they are", self.run_dir)
            return read_summary(self.run_dir)
        if not self.resuming and self.is_global_zero:
            save_run_config(self.run_dir, cfg)
        start_loggers(self.loggers, cfg, self.resuming)
        self.loggers_started = True
        log.info("[sft] supervised fine-tuning with LoRA, %d epochs", cfg.sft.epochs)
        sft_model = self.supervised_fine_tuning()
        self.seed_phase("reward_model")
        self.progress.enter("reward_model")
        started = load_state(self.run_dir, "start") if self.resuming else None
        if started is None:
            log.info("[reward model] r_0, %d epochs", cfg.reward_model.epochs)
            reward = self.reward_model()
            self.reward_model_quality(reward, suffix="_initial")
        else:
            reward = self.build_reward_model()
            load_trainable(reward.model, started["reward"])
            self.summary = started["summary"] | self.summary_header()
            self.eval_scores = list(started.get("eval_scores", []))
            self.progress.completed = int(started.get("run_step", self.progress.completed))
        self.to_device(reward.model)
        self.seed_phase("policy")
        policy = self.model_spec.with_lora(sft_model)
        iterations = cfg.loop.iterations
        self.policy_module = self.policy_module_for(policy, reward)
        sampler = self.policy_module.sampler
        key = self.eval_key
        if started is None:
            self.summary[f"{key}_initial"] = self.evaluate(policy)
            self.save_run_state("start", {"reward": trainable_state(reward.model)})
        first = self.restore_iteration(policy, reward, sampler) if self.resuming else 0
        sizes = [self.schedule.updates_of(t) * cfg.loop.batch_size for t in range(iterations)]
        chunks = prompt_chunks(self.task.train_prompts, sizes)
        zopro = ZOPrOIterations(
            reward,
            self.refine,
            self.schedule,
            direction=cfg.sampler.get("direction", "update"),
            seed=cfg.seed,
            boundaries_inside_fit=False,  # this loop ends each iteration after its evaluation
        )
        zopro.iteration = first
        interplay = cfg.interplay
        snapshots = (
            InterplaySnapshots(self.run_dir, interplay.every_fraction, interplay.max_numel)
            if interplay.snapshots
            else None
        )
        callbacks: list[L.Callback] = [zopro, *instantiate_callbacks(cfg.get("callbacks"))]
        if snapshots is not None:
            if started is None:
                snapshots.save_reward(reward.model, step=0, iteration=0)  # r_0
            callbacks.append(snapshots)
        if interplay.update_cosines:
            callbacks.append(UpdateCosines())
        for t in range(first, iterations):
            # before its first directions are set, the sampler draws isotropic z (iteration 0
            # of a fully zeroth-order run)
            first_order = self.schedule.optimizer(t) == "first_order"
            if snapshots is not None:
                snapshots.iteration = t
            self.seed_phase("policy_learning", t)
            self.progress.enter("policy_learning", t)
            started_at = time.perf_counter()
            log.info(
                "[iteration %d/%d] policy learning: %s, %s, %d updates",
                t + 1, iterations, "first-order" if first_order else "zeroth-order",
                "AdamW" if first_order else f"{cfg.sampler.name} sampler",
                self.schedule.updates_of(t),
            )  # fmt: skip
            self.learn_policy(t, chunks[t], callbacks)
            self.summary.setdefault("policy_seconds_per_iteration", []).append(
                time.perf_counter() - started_at
            )
            measured = self.evaluate(policy)
            gains = self.summary.get(f"{key}_gain_stderr_per_iteration") or [math.nan]
            log.info(
                "[iteration %d/%d] held-out %s %.4f (paired s.e. of the gain %.4f)",
                t + 1, iterations, key, measured, gains[-1],
            )  # fmt: skip
            self.summary.setdefault(f"{key}_per_iteration", []).append(measured)
            self.summary.setdefault("optimizer_per_iteration", []).append(
                self.policy_module.hparams.optimizer
            )
            if first_order:
                self.summary[f"{key}_after_first_order"] = measured
            self.progress.enter("refinement", t)
            log.info("[iteration %d/%d] reward refinement: %s judge", t + 1, iterations,
                     cfg.judge.name)
            ended = zopro.end_iteration(self.last_trainer, self.policy_module)  # mu, refine, v
            refinement, matched = ended.refinement, ended.matched
            if snapshots is not None:
                snapshots.save_reward(
                    reward.model, step=self.policy_module.policy_updates, iteration=t
                )
            log.info("iteration %d: %s, %d tensors matched", t, refinement, matched)
            self.summary.setdefault("refinement_pairs", []).append(refinement["pairs"])
            self.summary.setdefault("refinement_dropped", []).append(refinement["dropped"])
            self.summary["matched_tensors"] = matched
            self.save_adapters(t, policy, reward)
            self.save_iteration(t, policy, reward, sampler, ended.directions)
        self.summary[f"{key}_final"] = self.summary[f"{key}_per_iteration"][-1]
        if key != "gold_reward":
            self.summary["gold_reward_final"] = math.nan  # no gold reward (see gold_evaluation)
        self.reward_model_quality(reward)
        if self.judge is not None:
            self.summary.update(judge_counters(self.judge))
        last = self.policy_module.last_rollout
        self.summary.update(
            {
                "policy_steps": self.schedule.total_updates,
                "kl_final": last.metrics["kl"]
                if last is not None
                else self.summary.get("kl_final"),
                "skipped_steps": self.policy_module.skipped_steps,
                "wall_seconds": time.perf_counter() - start,
                "peak_memory_mb": peak_memory_mb(),
            }
        )
        if self.resuming:
            self.summary["resumed"] = True
        from zopro_lightning.run.export import export_policy  # RUN_DIR/policy and policy_adapter

        export_policy(policy, self.tokenizer, cfg, self.summary, self.run_dir, self.is_global_zero)
        self.write_summary()
        self.interplay_plots()
        log_summary(self.loggers, finite_or_null(self.summary))
        return self.summary

    # -- policy learning with checkpoints and resume --------------------------------------
    def learn_policy(self, t: int, prompts: Sequence[str], callbacks: list[L.Callback]) -> None:
        """Policy learning of iteration ``t`` on its chunk of prompts, one Lightning ``fit``.

        With ``loop.checkpoint_every: N``, a checkpoint (``last.ckpt``, written atomically) is
        kept every N updates; a resumed run restarts the iteration from it with
        ``ckpt_path``, so it ends bit-identical to an uninterrupted one on CPU.

        Under DDP the distributed sampler shards the chunk: each of the N ranks takes
        ``loop.batch_size / N`` prompts per update, so an update still sees ``loop.batch_size``
        prompts and the chunk is gone through once, as on one process.
        """
        cfg = self.cfg.loop
        directory = self.run_dir / "checkpoints" / f"iteration_{t}"
        options: dict[str, Any] = {"max_steps": self.schedule.updates_of(t), "max_epochs": -1}
        every = cfg.get("checkpoint_every")
        phase_callbacks = list(callbacks)
        if every:
            from lightning.pytorch.callbacks import ModelCheckpoint

            phase_callbacks.append(
                ModelCheckpoint(
                    dirpath=directory, save_last=True, save_top_k=0, every_n_train_steps=every
                )
            )
            options |= {"enable_checkpointing": True, "plugins": [AtomicCheckpointIO()]}
        last = directory / "last.ckpt"
        ckpt_path = resumable_checkpoint(last) if self.resuming else None  # damaged: set aside
        if ckpt_path:
            log.info("resume: iteration %d from %s", t, last)
        trainer = self.trainer(callbacks=phase_callbacks, **options)
        loader = self.loader(prompts, batch_size_per_rank(cfg.batch_size, trainer.world_size))
        trainer.fit(self.policy_module, loader, ckpt_path=ckpt_path)

    def save_run_state(self, name: str, payload: dict[str, Any]) -> None:
        """``state/<name>.pt`` with the summary and evaluations so far (rank 0 only)."""
        if self.is_global_zero:
            extra = {
                "summary": self.summary,
                "eval_scores": self.eval_scores,
                "run_step": self.progress.completed,  # the logged step goes on from here
            }
            save_state(self.run_dir, name, payload | extra)

    def save_iteration(
        self, t: int, policy, reward: HFRewardModel, sampler, directions: dict[str, dict]
    ) -> None:
        """The state after iteration ``t``; the iteration's mid-way checkpoints then go.
        ``directions`` (each candidate ``mu`` and ``v``, the size of the trainable sets) let a
        run branched from this state set its own sampler's directions (``bench/schedules.py``).
        """
        judge = {name: getattr(self.judge, name, None) for name in JUDGE_COUNTERS}
        self.save_run_state(
            f"iteration_{t}",
            {
                "iteration": t,
                "policy": trainable_state(policy),
                "reward": trainable_state(reward.model),
                "sampler": sampler.state_dict(),
                "policy_updates": self.policy_module.policy_updates,
                "skipped_steps": self.policy_module.skipped_steps,
                "judge": {k: v for k, v in judge.items() if isinstance(v, int)},
                "directions": directions,
            },
        )
        if self.is_global_zero:
            shutil.rmtree(self.run_dir / "checkpoints" / f"iteration_{t}", ignore_errors=True)

    def restore_iteration(self, policy, reward: HFRewardModel, sampler) -> int:
        """Load the state after the last finished iteration; returns the next iteration."""
        t = last_finished_iteration(self.run_dir)
        if t is None:
            return 0
        state = load_state(self.run_dir, f"iteration_{t}")
        log.info("resume: after iteration %d", t)
        load_trainable(policy, state["policy"])
        load_trainable(reward.model, state["reward"])
        sampler.load_state_dict(state["sampler"])
        self.policy_module.policy_updates = int(state["policy_updates"])
        self.policy_module.skipped_steps = int(state["skipped_steps"])
        self.summary = state["summary"] | self.summary_header()
        self.eval_scores = list(state.get("eval_scores", []))
        self.judge_counts = dict(state["judge"])
        self.progress.completed = int(state.get("run_step", self.progress.completed))
        return t + 1

    def interplay_plots(self) -> None:
        """``zopro-viz`` on this run when asked (``interplay.plots_at_end``; ``null`` means
        "when the logger is W&B"), and the PNGs logged to W&B."""
        from lightning.pytorch.loggers import WandbLogger

        wandb_loggers = [logger for logger in self.loggers if isinstance(logger, WandbLogger)]
        wandb = bool(wandb_loggers)
        wanted = self.cfg.interplay.plots_at_end
        if not (wanted or (wanted is None and wandb)) or not self.cfg.interplay.snapshots:
            return
        if not self.is_global_zero:  # DDP: rank 0 alone writes RUN_DIR/plots
            return
        from zopro_lightning.interplay.cli import main as zopro_viz

        zopro_viz([str(self.run_dir), "--methods", self.cfg.interplay.methods, "--no-html"])
        images = [str(path) for path in sorted((self.run_dir / "plots").glob("*.png"))]
        for logger in wandb_loggers:
            logger.log_image("interplay", images)

    def save_adapters(self, iteration: int, policy, reward: HFRewardModel) -> None:
        if not self.is_global_zero:
            return
        root = self.run_dir / "adapters" / f"iteration_{iteration}"
        policy.save_pretrained(root / "policy")
        reward.model.save_pretrained(root / "reward_model")

    def write_summary(self) -> None:
        """``summary.json`` (written atomically; non-finite numbers as ``null``)."""
        if not self.is_global_zero:
            return
        path = self.run_dir / "summary.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(finite_or_null(self.summary), indent=2, default=float))
        os.replace(tmp, path)

    def close_loggers(self, failed: bool = False) -> None:
        """Finish the run's loggers (a W&B run is marked failed when the run ``failed``)."""
        if self.loggers_started:
            finish_loggers(self.loggers, failed=failed)
            self.loggers_started = False


def read_summary(run_dir: Path) -> dict[str, Any]:
    """``RUN_DIR/summary.json`` as :func:`run_pipeline` returns it (``null`` back to NaN)."""
    summary = json.loads((Path(run_dir) / "summary.json").read_text())

    def nan_for_null(value: Any) -> Any:
        if isinstance(value, list):
            return [nan_for_null(v) for v in value]
        return math.nan if value is None else value

    return {key: nan_for_null(value) for key, value in summary.items()}


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
        pipeline.close_loggers(failed=True)
        raise
    pipeline.close_loggers()
    final = f"{pipeline.eval_key}_final"
    if not math.isfinite(summary[final]):
        log.warning("%s is not finite", final)
    return summary
