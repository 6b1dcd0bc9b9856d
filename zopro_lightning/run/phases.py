"""The phases of a ``zopro-train`` run, each a function of its config, its inputs and the
:class:`~zopro_lightning.run.context.RunContext` (docs/algorithm.md §2):

- :func:`supervised_fine_tuning`: SFT with LoRA, merged into the base (the reference policy);
- :func:`build_reward_model` / :func:`fit_reward_model`: the reward model ``r_0`` and its
  first-order training; :func:`reward_model_quality`: its held-out accuracy or correlations;
- :func:`learn_policy`: one iteration's policy learning, one Lightning ``fit`` with mid-way
  checkpoints a resumed run goes on from.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from zopro_lightning.models.loading import ModelSpec, load_sequence_classifier
from zopro_lightning.reward.callables import HFRewardModel
from zopro_lightning.reward.training import fit_reward_model as fit_on_rows
from zopro_lightning.run.context import RunContext
from zopro_lightning.run.evaluation import (
    pairwise_accuracy,
    prompt_mean_rewards,
    score_correlations,
)
from zopro_lightning.run.sft import SFTCollator, SFTModule
from zopro_lightning.run.state import load_state, save_state
from zopro_lightning.utils.atomic import replace_directory
from zopro_lightning.utils.checkpointing import AtomicCheckpointIO, resumable_checkpoint

log = logging.getLogger(__name__)


# -- SFT ----------------------------------------------------------------------------------------
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


def supervised_fine_tuning(
    cfg: DictConfig, spec: ModelSpec, tokenizer: Any, task: Any, ctx: RunContext
) -> torch.nn.Module:
    """SFT (``cfg``: the ``sft`` block) with LoRA merged into the base (or, with
    ``sft.lora=false`` or ``model.lora=null``, of every weight) and saved whole to
    ``RUN_DIR/sft``. Resuming, the merged model there is loaded instead (and the run's logged
    step goes on from ``state/sft.pt``)."""
    target = ctx.run_dir / "sft"
    if ctx.resuming and (target / "config.json").exists():
        from zopro_lightning.models.loading import load_causal_lm

        log.info("resume: SFT policy from %s", target)
        done = load_state(ctx.run_dir, "sft")
        ctx.progress.completed = int(done["run_step"]) if done else 0
        return load_causal_lm(target, dtype=spec.dtype)
    ctx.seed_phase("sft")
    ctx.progress.enter("sft")
    model = spec.causal_lm(tokenizer)
    model = spec.with_lora(model) if cfg.get("lora", True) else model.requires_grad_(True)
    max_length = cfg.get("max_length") or 128
    examples = sft_examples_that_fit(task.sft_examples, tokenizer, max_length)
    collator = SFTCollator(tokenizer, max_length=max_length)
    loader = ctx.loader(examples, cfg.batch_size, collator)
    ctx.trainer(max_epochs=cfg.epochs).fit(SFTModule(model, lr=cfg.lr), loader)
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    if ctx.is_global_zero:  # complete in a temporary directory, then one rename

        def save(directory: Any) -> None:
            merged.save_pretrained(directory)
            tokenizer.save_pretrained(directory)

        replace_directory(target, save)
        save_state(ctx.run_dir, "sft", {"run_step": ctx.progress.completed})
    ctx.barrier()  # the reward model reads RUN_DIR/sft on every rank
    return merged


# -- the reward model ---------------------------------------------------------------------------
def build_reward_model(
    cfg: DictConfig, spec: ModelSpec, tokenizer: Any, ctx: RunContext
) -> HFRewardModel:
    """The untrained reward model of the ``reward_model`` block ``cfg``.

    ``backbone: null``: built from the SFT weights (``RUN_DIR/sft``) with the policy's LoRA
    layout, so the ZOPrO sampler matches policy and reward tensors by name. Otherwise any
    sequence classifier by hub name or path (``minilm``: the bundled all-MiniLM-L6-v2), with
    its own tokenizer; its tensors then match none of the policy's.
    """
    if cfg.backbone:
        from zopro_lightning.reward.backbones import load_reward_backbone

        return load_reward_backbone(
            cfg.backbone,
            lora=cfg.get("lora"),
            dtype=cfg.get("dtype"),
            max_length=cfg.max_length,
            freeze_layers=cfg.get("freeze_layers", 0),
        )
    classifier = load_sequence_classifier(
        ctx.run_dir / "sft", pad_token_id=tokenizer.pad_token_id, dtype=spec.dtype
    )
    classifier = spec.with_lora(classifier, task_type="SEQ_CLS")
    return HFRewardModel(classifier, tokenizer, max_length=cfg.max_length)


def fit_reward_model(
    cfg: DictConfig,
    reward: HFRewardModel,
    rows: Sequence[dict],
    ctx: RunContext,
    *,
    epochs: int,
    lr: float,
    loss: str,
) -> None:
    """First-order training on pairs (``bradley_terry``) or scored rows (``mse``), with the
    batch size and warm-up of the ``reward_model`` block ``cfg``."""
    fit_on_rows(
        reward,
        rows,
        ctx.trainer(max_epochs=epochs),
        loss=loss,
        lr=lr,
        batch_size=cfg.batch_size,
        warmup_fraction=cfg.get("warmup_fraction", 0.0),
        seed=ctx.cfg.seed,
    )
    ctx.to_device(reward.model)


def reward_model_quality(
    cfg: DictConfig, task: Any, reward: HFRewardModel, suffix: str = ""
) -> dict[str, float]:
    """Held-out accuracy (pairs) or Pearson/Spearman (scores) of ``reward``, as summary
    entries (``cfg``: the ``eval`` block, whose ``max_pairs`` limits the rows)."""
    limit = cfg.get("max_pairs")
    if getattr(task, "kind", "pairs") == "scores":
        rows = task.eval_scored[:limit] if limit else task.eval_scored
        return {f"reward_model_{k}{suffix}": v for k, v in score_correlations(reward, rows).items()}
    pairs = task.eval_pairs[:limit] if limit else task.eval_pairs
    return {f"reward_model_accuracy{suffix}": pairwise_accuracy(reward, pairs)}


# -- policy learning ----------------------------------------------------------------------------
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


def instantiate_callbacks(cfg: DictConfig | None) -> list[L.Callback]:
    """The ``callbacks`` config group: one Lightning callback per named entry with a
    ``_target_`` (an entry set to null is switched off)."""
    if not cfg:
        return []
    return [instantiate(node) for node in cfg.values() if node is not None and "_target_" in node]


def learn_policy(
    cfg: DictConfig,
    module: L.LightningModule,
    prompts: Sequence[str],
    callbacks: Sequence[L.Callback],
    ctx: RunContext,
    *,
    iteration: int,
    updates: int,
) -> None:
    """Policy learning of ``iteration`` on its chunk of prompts: one Lightning ``fit`` of
    ``updates`` policy updates (``cfg``: the ``loop`` block).

    With ``loop.checkpoint_every: N``, a checkpoint (``last.ckpt``, written atomically) is
    kept every N updates; a resumed run restarts the iteration from it with ``ckpt_path``, so
    it ends bit-identical to an uninterrupted one on CPU. Under DDP the distributed sampler
    shards the chunk: each of the N ranks takes ``loop.batch_size / N`` prompts per update, so
    an update still sees ``loop.batch_size`` prompts and the chunk is gone through once.
    """
    directory = ctx.run_dir / "checkpoints" / f"iteration_{iteration}"
    options: dict[str, Any] = {"max_steps": updates, "max_epochs": -1}
    callbacks = list(callbacks)
    if cfg.get("checkpoint_every"):
        from lightning.pytorch.callbacks import ModelCheckpoint

        every = cfg.checkpoint_every
        callbacks.append(
            ModelCheckpoint(
                dirpath=directory, save_last=True, save_top_k=0, every_n_train_steps=every
            )
        )
        options |= {"enable_checkpointing": True, "plugins": [AtomicCheckpointIO()]}
    last = directory / "last.ckpt"
    ckpt_path = resumable_checkpoint(last) if ctx.resuming else None  # damaged: set aside
    if ckpt_path:
        log.info("resume: iteration %d from %s", iteration, last)
    trainer = ctx.trainer(callbacks=callbacks, **options)
    loader = ctx.loader(prompts, batch_size_per_rank(cfg.batch_size, trainer.world_size))
    trainer.fit(module, loader, ckpt_path=ckpt_path)


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


# -- measurements and plots ---------------------------------------------------------------------
def held_out_means(
    cfg: DictConfig,
    task: Any,
    module: Any,
    policy: torch.nn.Module,
    scorer: Any,
    tokenizer: Any,
    ctx: RunContext,
) -> torch.Tensor:
    """``[P]``: the mean score (``scorer``: the gold reward, or the reward model) of
    ``eval.samples_per_prompt`` samples of each held-out prompt, with the module's sampling
    settings. Every call samples the same prompts with the same seed, so two are paired."""
    config = module.rollout_config  # a copy: the training sampling settings
    config.k = cfg.eval.samples_per_prompt
    limit = cfg.eval.get("max_prompts")
    prompts = task.eval_prompts[:limit] if limit else task.eval_prompts
    ctx.to_device(policy)
    return prompt_mean_rewards(
        policy,
        tokenizer,
        prompts,
        scorer,
        config,
        seed=cfg.seed + 10_000,
        progress=ctx.bar_description("evaluation"),
    )


def interplay_plots(cfg: DictConfig, ctx: RunContext) -> None:
    """``zopro-viz`` on the run when asked (the ``interplay`` block's ``plots_at_end``;
    ``null`` means "when the logger is W&B"), and the PNGs logged to W&B (rank 0 only)."""
    from lightning.pytorch.loggers import WandbLogger

    wandb_loggers = [lg for lg in ctx.loggers if isinstance(lg, WandbLogger)]
    wanted = cfg.plots_at_end
    if not (wanted or (wanted is None and wandb_loggers)) or not cfg.snapshots:
        return
    if not ctx.is_global_zero:  # DDP: rank 0 alone writes RUN_DIR/plots
        return
    from zopro_lightning.interplay.cli import main as zopro_viz

    zopro_viz([str(ctx.run_dir), "--methods", cfg.methods, "--no-html"])
    images = [str(path) for path in sorted((ctx.run_dir / "plots").glob("*.png"))]
    for logger in wandb_loggers:
        logger.log_image("interplay", images)
