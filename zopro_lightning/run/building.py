"""The run's objects from the composed config: what the task decides (docs/algorithm.md §4).

- :func:`build_task`: tokenizer first or task first. A hub/local model (``model.name_or_path``
  set) brings its own tokenizer, built *before* the task and passed as ``task.tokenizer`` when
  the dataset asks for it (``dataset.pass_tokenizer: true``: chat templates, prompt lengths in
  tokens). The tiny model (``model=tiny``) gets a word tokenizer built *from* the task's corpus.
- :func:`reward_loss`: by the task's ``kind``: ``"pairs"`` train Bradley–Terry, ``"scores"``
  (translation, ``z_mean``) MSE regression. Refinement always trains on judged pairs.
- :func:`judge_source` / :func:`build_judge`: the judge (``judge=gold|reward_model|llm|file``)
  and the reward callable it compares with, if any.
- :func:`iteration_schedule`, :func:`policy_module`, :func:`reward_refinement`: the ZOPrO loop's
  schedule, module and refinement step.
"""

from __future__ import annotations

from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from zopro_lightning.callbacks.zopro import IterationSchedule
from zopro_lightning.models.loading import ModelSpec
from zopro_lightning.policy.module import ZOPrOModule
from zopro_lightning.reward.refinement import (
    ReadablePromptJudge,
    RefinementSettings,
    RewardRefinement,
    judge_counts,
)
from zopro_lightning.run.summary import RunSummary


def build_task(cfg: DictConfig, spec: ModelSpec) -> tuple[Any, Any]:
    """``(tokenizer, task)`` of the ``dataset`` group: the pretrained tokenizer first (passed
    to the task when the dataset wants it), or the task first and a word tokenizer over its
    corpus."""
    dataset = cfg.dataset
    build = instantiate(dataset.task, _partial_=True)
    if spec.tokenizer_name is not None:
        tokenizer = spec.tokenizer()
        task = build(tokenizer=tokenizer) if dataset.get("pass_tokenizer") else build()
        return tokenizer, task
    task = build()
    return spec.tokenizer(task.corpus()), task


def reward_loss(cfg: DictConfig, kind: str) -> str:
    """``reward_model.loss`` (``auto``: by the task's ``kind``), checked against the data."""
    wanted = {"pairs": "bradley_terry", "scores": "mse"}[kind]
    loss = cfg.reward_model.get("loss", "auto") or "auto"
    if loss not in ("auto", wanted):
        raise ValueError(
            f"reward_model.loss={loss} does not fit dataset {cfg.dataset.name}, whose "
            f"data are {kind}; use reward_model.loss={wanted} (or auto)"
        )
    return wanted


def judge_source(judge_cfg: DictConfig) -> str | None:
    """What a judge config compares: ``"gold"``, ``"reward_model"`` or ``None`` (the judge
    needs no reward callable: an LLM, a label file). ``needs_gold: true`` means ``"gold"``."""
    source = judge_cfg.get("scores_with")
    if source is None and judge_cfg.get("needs_gold"):
        source = "gold"
    if source not in (None, "gold", "reward_model"):
        raise ValueError(f"judge.scores_with must be gold, reward_model or null, got {source!r}")
    return source


def check_judge_has_scorer(cfg: DictConfig, source: str | None, gold_reward: Any) -> None:
    """A gold-comparing judge needs a dataset with a gold reward (fails before any work)."""
    if source == "gold" and gold_reward is None:
        raise ValueError(
            f"judge={cfg.judge.name} compares gold rewards, but dataset {cfg.dataset.name} "
            "has no gold_reward; use judge=llm, judge=reward_model or judge=file"
        )


def build_judge(judge_cfg: DictConfig, scorer: Any) -> Any:
    """The refinement judge of the ``judge`` group; a reward-comparing judge gets ``scorer``
    (the gold reward, or the current reward model, refined in place)."""
    if scorer is not None:
        return instantiate(judge_cfg.judge, reward_fn=scorer)
    return instantiate(judge_cfg.judge)


def judge_counters(judge: Any) -> dict[str, int]:
    """The judge's cumulative counters as ``judge_<counter>`` summary entries (the LLM
    judge's unparseable answers and inconsistent pairs; the file judge's missing pairs)."""
    return {f"judge_{name[2:]}": count for name, count in judge_counts(judge).items()}


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


def policy_module(
    cfg: DictConfig, policy: torch.nn.Module, tokenizer: Any, reward: Any
) -> ZOPrOModule:
    """The ``ZOPrOModule`` of the config: ``policy`` scored by ``reward``, with the
    ``sampler`` group's sampler and the ``policy`` block's settings objects."""
    return ZOPrOModule(
        policy,
        tokenizer,
        reward,
        instantiate(cfg.sampler.sampler),
        seed=cfg.seed,
        **{group: instantiate(settings) for group, settings in cfg.policy.items()},
    )


def reward_refinement(
    cfg: DictConfig, judge: Any, task: Any, trainer_factory: Any, progress: bool
) -> RewardRefinement:
    """The refinement step of ``loop.refine`` (with the reward model's batch size and warm-up),
    judging with ``judge`` (on readable prompts when ``judge.readable_prompts`` and the task
    has them)."""
    readable = getattr(task, "readable_prompts", None)
    if cfg.judge.get("readable_prompts") and readable:
        judge = ReadablePromptJudge(judge, readable)
    refine, rm = cfg.loop.refine, cfg.reward_model
    settings = RefinementSettings(
        epochs=refine.epochs,
        lr=refine.lr,
        batch_size=rm.batch_size,
        keep_close_alpha=refine.keep_close_alpha,
        warmup_fraction=rm.get("warmup_fraction", 0.0),
        judge_fraction=refine.get("judge_fraction", 1.0),
        temperature=refine.get("temperature"),
    )
    return RewardRefinement(judge, settings, trainer_factory, cfg.seed, progress)


def run_summary(cfg: DictConfig, task: Any, eval_key: str) -> RunSummary:
    """The run's summary with what the config says of it (task, sampler, schedule, seed: kept
    over a restored summary, so a run branched from another's state says what it ran), and
    what the task says (no gold reward; prompts over the length bound)."""
    header = {
        "task": cfg.dataset.name,
        "sampler": cfg.sampler.name,
        "optimizer": cfg.loop.schedule,
        "seed": cfg.seed,
    }
    summary = RunSummary(header, eval_key)
    if eval_key != "gold_reward":
        summary.set(
            gold_evaluation=f"skipped: dataset {cfg.dataset.name} has no gold reward; "
            "policy_reward_* are the reward model's mean scores of policy samples on "
            "held-out prompts"
        )
    if hasattr(task, "n_filtered"):
        summary.set(prompts_over_length=task.n_filtered)
    return summary
