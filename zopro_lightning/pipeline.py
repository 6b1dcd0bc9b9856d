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
from zopro_lightning.evaluation import mean_gold_reward, pairwise_accuracy, score_correlations
from zopro_lightning.models import (
    load_sequence_classifier,
    state_difference,
    trainable_state,
)
from zopro_lightning.module import ZOPrOModule
from zopro_lightning.refinement import ReadablePromptJudge, judged_pairs, keep_close_merge
from zopro_lightning.reward_model import PairCollator, RewardModelModule, ScoreCollator
from zopro_lightning.rewards import HFRewardModel
from zopro_lightning.samplers import GaussianSampler, ZOPrOSampler
from zopro_lightning.sft import SFTCollator, SFTModule

log = logging.getLogger(__name__)


def peak_memory_mb() -> float:
    """Peak resident memory of this process (CPU), or peak CUDA allocation when on a GPU."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    try:  # VmHWM: this process's own peak (ru_maxrss also counts a parent's, after exec)
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_chunks(prompts: Sequence[str], iterations: int, size: int) -> list[list[str]]:
    """``iterations`` consecutive chunks of ``size`` prompts, wrapping around the prompt list
    (policy learning goes over the data in order, chunk by chunk)."""
    if not prompts:
        raise ValueError("the dataset has no training prompts; check dataset.* options.")
    return [
        [prompts[(t * size + i) % len(prompts)] for i in range(size)] for t in range(iterations)
    ]


JUDGE_COUNTERS = ("n_queries", "n_unparseable", "n_inconsistent", "n_identical", "n_missing")


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
    return {
        f"judge_{name[2:]}": int(getattr(judge, name))
        for name in JUDGE_COUNTERS
        if isinstance(getattr(judge, name, None), int)
    }


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


class Pipeline:
    """Holds the run's objects and runs its phases; one method a phase."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.logger = instantiate(cfg.logger) if cfg.get("logger") else False
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
        self.judge: Any = None
        self.summary: dict[str, Any] = {
            "task": cfg.dataset.name,
            "sampler": cfg.sampler.name,
            "optimizer": "zeroth_order"
            if not cfg.loop.first_order_first
            else "first_order_then_zeroth_order",
            "seed": cfg.seed,
        }
        if self.gold_reward is None:
            self.summary["gold_evaluation"] = (
                f"skipped: dataset {cfg.dataset.name} has no gold reward; policy_reward_* are "
                "the reward model's mean scores of policy samples on held-out prompts"
            )
        if hasattr(self.task, "n_filtered"):
            self.summary["prompts_over_length"] = self.task.n_filtered

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
        max_length = cfg.get("max_length") or 128
        examples = sft_examples_that_fit(self.task.sft_examples, self.tokenizer, max_length)
        collator = SFTCollator(self.tokenizer, max_length=max_length)
        loader = self.loader(examples, cfg.batch_size, collator)
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
                self.run_dir / "sft",
                pad_token_id=self.tokenizer.pad_token_id,
                dtype=self.model_spec.dtype,
            )
            classifier = self.model_spec.with_lora(classifier, task_type="SEQ_CLS")
            reward = HFRewardModel(classifier, self.tokenizer, max_length=cfg.max_length)
        data = self.task.train_scored if self.kind == "scores" else self.task.train_pairs
        self.fit_reward_model(reward, data, epochs=cfg.epochs, lr=cfg.lr, loss=self.reward_loss)
        return reward

    def fit_reward_model(
        self, reward: HFRewardModel, rows: Sequence[dict], epochs: int, lr: float, loss: str
    ) -> None:
        """First-order training on pairs (``bradley_terry``) or scored rows (``mse``)."""
        module = RewardModelModule(reward, loss=loss, lr=lr)
        collate = ScoreCollator(reward) if loss == "mse" else PairCollator(reward)
        loader = self.loader(rows, self.cfg.reward_model.batch_size, collate)
        self.trainer(max_epochs=epochs).fit(module, loader)
        reward.model.eval()
        self.to_device(reward.model)

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
        self, reward: HFRewardModel, policy_module: ZOPrOModule, records: list[tuple[str, str]]
    ) -> dict[str, int]:
        """Judge stored vs fresh completions, train the reward model on the judged pairs
        (Bradley–Terry, whatever the task's kind)."""
        cfg = self.cfg.loop.refine
        if self.judge is None:
            self.judge = self.build_judge(reward)
        self.to_device(policy_module.policy)
        judge = self.judge
        readable = getattr(self.task, "readable_prompts", None)
        if self.cfg.judge.get("readable_prompts") and readable:
            judge = ReadablePromptJudge(judge, readable)
        pairs = judged_pairs(policy_module, judge, records)
        before = trainable_state(reward.model)
        if pairs:
            self.fit_reward_model(reward, pairs, epochs=cfg.epochs, lr=cfg.lr, loss="bradley_terry")
        if cfg.keep_close_alpha is not None:
            keep_close_merge(reward.model, before, cfg.keep_close_alpha)
        return {"pairs": len(pairs), "judged": len(records), "dropped": len(records) - len(pairs)}

    def evaluate(self, policy: torch.nn.Module) -> float:
        """Mean gold reward of the policy's samples on held-out prompts; without a gold
        reward, the mean score the current reward model gives them."""
        config = self.policy_module.rollout_config  # the training sampling settings
        config.k = self.cfg.eval.samples_per_prompt
        limit = self.cfg.eval.get("max_prompts")
        prompts = self.task.eval_prompts[:limit] if limit else self.task.eval_prompts
        self.to_device(policy)
        return mean_gold_reward(
            policy,
            self.tokenizer,
            prompts,
            self.gold_reward if self.gold_reward is not None else self.policy_module.reward_fn,
            config,
            seed=self.cfg.seed + 10_000,
        )

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        start = time.perf_counter()
        cfg = self.cfg
        sft_model = self.supervised_fine_tuning()
        reward = self.reward_model()
        self.reward_model_quality(reward, suffix="_initial")
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
        key = self.eval_key
        self.summary[f"{key}_initial"] = self.evaluate(policy)
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
            measured = self.evaluate(policy)
            self.summary.setdefault(f"{key}_per_iteration", []).append(measured)
            self.summary.setdefault("optimizer_per_iteration", []).append(
                self.policy_module.hparams.optimizer
            )
            if first_order:
                self.summary[f"{key}_after_first_order"] = measured
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
            self.summary.setdefault("refinement_dropped", []).append(refinement["dropped"])
            self.summary["matched_tensors"] = matched
            self.save_adapters(t, policy, reward)
        self.summary[f"{key}_final"] = self.summary[f"{key}_per_iteration"][-1]
        if key != "gold_reward":
            self.summary["gold_reward_final"] = math.nan  # no gold reward (see gold_evaluation)
        self.reward_model_quality(reward)
        self.summary.update(judge_counters(self.judge))
        self.summary.update(
            {
                "policy_steps": policy_steps,
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
        """``summary.json`` (written atomically; non-finite numbers as ``null``)."""
        path = self.run_dir / "summary.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(finite_or_null(self.summary), indent=2, default=float))
        os.replace(tmp, path)


def run_pipeline(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run the whole loop of ``cfg`` into ``run_dir``; returns the summary."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), cfg.get("num_threads") or 64)))
    pipeline = Pipeline(cfg, run_dir)
    summary = pipeline.run()
    final = f"{pipeline.eval_key}_final"
    if not math.isfinite(summary[final]):
        log.warning("%s is not finite", final)
    return summary
