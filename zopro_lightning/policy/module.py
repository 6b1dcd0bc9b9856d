"""``ZOPrOModule``: preference optimisation of a causal LM with forward-only SPSA steps.

A ``LightningModule`` with manual optimisation. Each policy update (DESIGN.md §2):

1. rollout: ``k`` sampled completions per prompt, scored by ``reward_fn``, with log-probs
   under the current policy (``pi_old``) and the reference policy, the sequence KL and the RLOO
   advantages of ``r - beta * KL``;
2. one SPSA step (``optimizer="zeroth_order"``) on the clipped surrogate, evaluated without
   autograd; or, with ``optimizer="first_order"``, one AdamW step on the same loss with
   back-propagation, so the two can be compared on the same rollouts.

Any DataLoader of prompts works: batches are lists of strings or dicts with a ``"prompt"`` key.
Each update is one ``optimizer.step()``, so ``global_step``, ``max_steps``, LR schedulers,
checkpoints and loggers follow policy updates as for any first-order module. A validation loader
of prompts gives the held-out reward and KL (``val/reward``, ``val/kl``); ``trainer.predict``
gives one sampled completion a prompt. The Trainer's ``accumulate_grad_batches`` and
``gradient_clip_val`` have no meaning under manual optimisation and are refused; the module's
own ``accumulate_batches`` and ``zo_max_abs_grad`` do those jobs.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import torch
from lightning import LightningModule
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from zopro_lightning.reward.callables import NonFiniteRewards, RewardFn
from zopro_lightning.rl.objectives import clipped_surrogate
from zopro_lightning.rl.rollout import (
    Rollout,
    RolloutConfig,
    collect_rollout,
    completion_logprobs,
    decode_completions,
    generate_completions,
)
from zopro_lightning.utils.checkpointing import (
    fingerprint_differences,
    model_class_name,
    model_fingerprint,
)
from zopro_lightning.utils.distributed import agree_on_seed, cross_rank_mean, ddp_wrapper
from zopro_lightning.zo.optim import UPDATE_RULES, ZerothOrderOptimizer
from zopro_lightning.zo.samplers import GaussianSampler, PerturbationSampler
from zopro_lightning.zo.spsa import derive_seed

OptimizerMode = Literal["zeroth_order", "first_order"]

log = logging.getLogger(__name__)


def prompts_of(batch: Any) -> list[str]:
    """The prompt strings of a batch: a list of strings, or a dict with a ``"prompt"`` key."""
    if isinstance(batch, Mapping):
        if "prompt" not in batch:
            raise KeyError(
                f"ZOPrOModule: a dict batch needs a 'prompt' key; got keys {sorted(batch)}."
            )
        batch = batch["prompt"]
    if isinstance(batch, str):
        batch = [batch]
    prompts = list(batch)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(
            "ZOPrOModule: batches must be non-empty lists of prompt strings (or dicts with a "
            f"'prompt' list); got {type(batch).__name__}."
        )
    return prompts


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class ZOPrOModule(LightningModule):
    """Zeroth-order (or, for comparison, first-order) RLOO preference optimisation.

    Args:
        policy: a Hugging Face causal LM, optionally PEFT-wrapped. Only parameters with
            ``requires_grad=True`` are trained.
        tokenizer: the policy's tokenizer (needs ``pad_token`` and ``eos_token``).
        reward_fn: ``reward_fn(prompts, completions) -> Tensor[B]``.
        sampler: direction sampler; default :class:`GaussianSampler` (MeZO).
        optimizer: ``"zeroth_order"`` (SPSA) or ``"first_order"`` (AdamW, back-propagation).
        lr: learning rate of the policy updates.
        lr_schedule: any ``transformers.get_scheduler`` name (``"constant"``, ``"linear"``,
            ``"cosine"``, ...), stepped once per policy update.
        warmup_steps: warm-up updates of the schedule.
        eps: SPSA perturbation scale ``epsilon``.
        weight_decay: ``lambda`` (matrices only).
        num_perturbations: ``q`` directions averaged per zeroth-order update.
        k: completions per prompt (``>= 2``, RLOO).
        beta: KL coefficient; 0 disables the reference policy.
        clip_range: ``c`` of the clipped surrogate.
        temperature: sampling temperature ``tau``.
        max_new_tokens: completion length limit.
        missing_eos_penalty: subtracted from the reward of completions without EOS.
        normalize_advantages: divide the batch's advantages by their standard deviation, so
            the step size does not follow the reward model's drifting scale.
        micro_batch_size: sequences per forward (log-probs and loss); all micro-batches of an
            update share the perturbation.
        accumulate_batches: dataloader batches (rollouts) per policy update.
        seed: base of the step seeds (``seed_t = derive(seed, t)``, the same on every rank).
        exact_restore: restore ``theta`` from a copy of the trainable tensors (bit-exact) or by
            arithmetic (no copy). ``None``: exact when the trainable set is at most 10 % of the
            model (LoRA), arithmetic otherwise (full-parameter: keeps inference-level memory).
        cache_directions: keep ``z`` during a step instead of regenerating it (same numbers).
        zo_rule: the zeroth-order update rule, ``"sgd"`` (MeZO), ``"momentum"`` or ``"adam"``
            (:mod:`zopro_lightning.zo.optim`; momentum adds one, Adam two trainable-sized buffers).
        zo_betas: momentum's ``beta`` (first value) or Adam's ``(b1, b2)``.
        zo_steps_per_update: SPSA steps per policy update, each with its own directions, all on
            the update's rollouts (the clipped ratio keeps later steps near ``pi_old``).
        zo_trainable: a regular expression; zeroth-order steps perturb and move only the
            trainable tensors whose names match it (``None``: all). Fewer perturbed values, less
            SPSA noise.
        zo_max_abs_grad: bound on each projected gradient ``|g_j|`` of a zeroth-order step
            (``None``: off); clamped values are logged as ``clipped_grads``.
    """

    def __init__(
        self,
        policy: nn.Module,
        tokenizer: Any,
        reward_fn: RewardFn,
        sampler: PerturbationSampler | None = None,
        *,
        optimizer: OptimizerMode = "zeroth_order",
        lr: float = 1e-4,
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        num_perturbations: int = 1,
        k: int = 4,
        beta: float = 0.05,
        clip_range: float = 0.2,
        temperature: float = 1.0,
        max_new_tokens: int = 16,
        missing_eos_penalty: float | None = None,
        normalize_advantages: bool = False,
        micro_batch_size: int | None = None,
        accumulate_batches: int = 1,
        seed: int = 0,
        exact_restore: bool | None = None,
        cache_directions: bool = False,
        zo_rule: str = "sgd",
        zo_betas: tuple[float, float] = (0.9, 0.999),
        zo_steps_per_update: int = 1,
        zo_trainable: str | None = None,
        zo_max_abs_grad: float | None = None,
    ) -> None:
        super().__init__()
        self._check_hparams(optimizer, eps, k, temperature, num_perturbations, accumulate_batches)
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError(
                "ZOPrOModule: the tokenizer needs pad and eos tokens; set tokenizer.pad_token "
                "(e.g. tokenizer.pad_token = tokenizer.eos_token)."
            )
        if zo_rule not in UPDATE_RULES:
            raise ValueError(f"zo_rule must be one of {UPDATE_RULES}, got {zo_rule!r}.")
        if zo_steps_per_update < 1:
            raise ValueError(f"zo_steps_per_update must be >= 1, got {zo_steps_per_update}.")
        self.save_hyperparameters(ignore=["policy", "tokenizer", "reward_fn", "sampler"])
        self.automatic_optimization = False
        self.policy = policy
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        self.sampler: PerturbationSampler = sampler if sampler is not None else GaussianSampler()
        self.policy_updates = 0
        self.skipped_steps = 0
        self.nonfinite_rewards = NonFiniteRewards()  # counted and warned about once an update
        self.last_rollout: Rollout | None = None
        self._pending: list[Rollout] = []
        # a frozen copy of the reference policy, held outside the module tree so it is neither
        # trained nor checkpointed; needed only without LoRA and with beta > 0
        self._frozen_reference: list[nn.Module] = []
        if beta > 0 and not is_peft_model(policy):
            self._frozen_reference.append(copy.deepcopy(policy).eval().requires_grad_(False))

    @staticmethod
    def _check_hparams(
        optimizer: str, eps: float, k: int, temperature: float, q: int, accumulate: int
    ) -> None:
        if optimizer not in ("zeroth_order", "first_order"):
            raise ValueError(
                f"optimizer must be 'zeroth_order' or 'first_order', got {optimizer!r}."
            )
        if eps <= 0:
            raise ValueError(f"eps must be > 0 (the SPSA perturbation scale), got {eps}.")
        if k < 2:
            raise ValueError(f"k (completions per prompt) must be >= 2 for RLOO, got {k}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature}.")
        if q < 1:
            raise ValueError(f"num_perturbations must be >= 1, got {q}.")
        if accumulate < 1:
            raise ValueError(f"accumulate_batches must be >= 1, got {accumulate}.")

    # -- configuration --------------------------------------------------------------------
    #: settings :meth:`set_optimizer` may change between fits
    PHASE_SETTINGS = ("eps", "lr_schedule", "zo_rule", "zo_steps_per_update", "zo_trainable")

    def set_optimizer(
        self, optimizer: OptimizerMode, lr: float | None = None, **settings: Any
    ) -> None:
        """Switch between zeroth- and first-order updates (takes effect at the next ``fit``);
        ``settings`` may also change any of :attr:`PHASE_SETTINGS` for the coming phases."""
        unknown = sorted(set(settings) - set(self.PHASE_SETTINGS))
        if unknown:
            raise ValueError(
                f"set_optimizer: unknown settings {unknown}; use {self.PHASE_SETTINGS}"
            )
        self._check_hparams(
            optimizer,
            settings.get("eps", self.hparams.eps),
            self.hparams.k,
            self.hparams.temperature,
            self.hparams.num_perturbations,
            self.hparams.accumulate_batches,
        )
        self.hparams.optimizer = optimizer
        if lr is not None:
            self.hparams.lr = lr
        for key, value in settings.items():
            self.hparams[key] = value

    @property
    def rollout_config(self) -> RolloutConfig:
        h = self.hparams
        return RolloutConfig(
            k=h.k,
            temperature=h.temperature,
            max_new_tokens=h.max_new_tokens,
            beta=h.beta,
            missing_eos_penalty=h.missing_eos_penalty,
            normalize_advantages=h.normalize_advantages,
            micro_batch_size=h.micro_batch_size,
        )

    @property
    def trainable_parameters(self) -> dict[str, Tensor]:
        return {n: p for n, p in self.policy.named_parameters() if p.requires_grad}

    def optimizer_direction(self, optimizer: torch.optim.Optimizer | None) -> dict[str, Tensor]:
        """The descent direction ``optimizer`` holds after a phase: minus its running mean of
        gradient estimates (AdamW's or ZO-Adam's ``exp_avg``, the ZO momentum buffer), by
        trainable tensor name; empty when it keeps none (zeroth-order SGD).

        The gradient survives a reward refinement far better than the phase's displacement
        predicts the next one (``bench/snr.py``): a sampler targeted at it searches along a
        direction that carries signal."""
        if optimizer is None:
            return {}
        by_id = {id(p): n for n, p in self.trainable_parameters.items()}
        direction = {}
        for group in optimizer.param_groups:
            for param in group["params"]:
                state = optimizer.state.get(param, {})
                moment = state.get("exp_avg", state.get("momentum_buffer"))
                if moment is not None and id(param) in by_id:
                    direction[by_id[id(param)]] = -moment.detach().float().cpu().clone()
        return direction

    def zeroth_order_parameters(self) -> dict[str, Tensor]:
        """The trainable tensors the zeroth-order steps move (``zo_trainable`` filters).

        Raises:
            ValueError: the pattern matches none; or the arithmetic restore would run on
                16-bit weights (``theta`` drifts by rounding every step).
        """
        params = self.trainable_parameters
        pattern = self.hparams.get("zo_trainable")
        if pattern:
            params = {n: p for n, p in params.items() if re.search(pattern, n)}
            if not params:
                raise ValueError(
                    f"zo_trainable={pattern!r} matches no trainable tensor of the policy; names "
                    f"look like {next(iter(self.trainable_parameters), '(none)')!r}."
                )
        low_precision = sorted(
            {str(p.dtype) for p in params.values() if p.dtype in (torch.float16, torch.bfloat16)}
        )
        if low_precision and not self._exact_restore():
            raise ValueError(
                f"zeroth-order steps with the arithmetic restore (exact_restore=False) on "
                f"{', '.join(low_precision)} trainable weights drift by rounding at every step "
                "(about 4% rms in 100 steps). Fix: keep the trainable weights in float32 (e.g. "
                "LoRA adapters in float32, model.dtype for the base only) or pass "
                "exact_restore=True."
            )
        return params

    def _exact_restore(self) -> bool:
        if self.hparams.exact_restore is not None:
            return bool(self.hparams.exact_restore)
        trainable = sum(p.numel() for p in self.trainable_parameters.values())
        total = sum(p.numel() for p in self.policy.parameters())
        return trainable <= 0.1 * total

    def total_policy_updates(self) -> int:
        """Policy updates of the coming phase: :attr:`phase_horizon` when a callback sets it
        (``ZOPrOIterations``: the updates left in the current iteration), else those this
        ``fit`` will make (``max_steps`` when set). The sampler's decay and the learning-rate
        schedule run over it."""
        if getattr(self, "phase_horizon", None):
            return int(self.phase_horizon)
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return int(self.trainer.max_steps)
        batches = self.trainer.estimated_stepping_batches
        return max(1, int(batches) // self.hparams.accumulate_batches)

    def configure_optimizers(self):
        from transformers import get_scheduler

        h = self.hparams
        params = self.trainable_parameters
        if h.optimizer == "first_order":
            decay = [p for n, p in params.items() if p.ndim >= 2 and not n.endswith("bias")]
            no_decay = [
                p for n, p in params.items() if not (p.ndim >= 2 and not n.endswith("bias"))
            ]
            optimizer = torch.optim.AdamW(
                [
                    {"params": decay, "weight_decay": h.weight_decay},
                    {"params": no_decay, "weight_decay": 0.0},
                ],
                lr=h.lr,
            )
        else:
            world = self.trainer.world_size if self._trainer is not None else 1
            optimizer = ZerothOrderOptimizer(
                self.zeroth_order_parameters().items(),
                self.sampler,
                lr=h.lr,
                eps=h.eps,
                weight_decay=h.weight_decay,
                num_perturbations=h.num_perturbations,
                exact_restore=self._exact_restore(),
                cache_directions=h.cache_directions,
                reduce_fn=self._cross_rank_mean if world > 1 else None,
                rule=h.get("zo_rule", "sgd"),
                betas=tuple(h.get("zo_betas", (0.9, 0.999))),
                steps_per_update=h.get("zo_steps_per_update", 1),
                max_abs_grad=h.get("zo_max_abs_grad"),
            )
        total = self.total_policy_updates()
        self.sampler.set_horizon(total)
        scheduler = get_scheduler(
            h.lr_schedule, optimizer, num_warmup_steps=h.warmup_steps, num_training_steps=total
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def _cross_rank_mean(self, values: Tensor) -> Tensor:
        """Mean of the ``[3, q]`` step scalars ``(g, L+, L-)`` over data-parallel ranks: one
        all-reduce and nothing else (``strategy.reduce`` would add a barrier)."""
        return cross_rank_mean(values, self.trainer)

    _base_seed: int | None = None  # rank 0's ``seed``, agreed at fit start

    def _quiet_ddp_wrapper(self) -> None:
        """Zeroth-order mode under ``strategy="ddp"``: stop the DDP wrapper's only per-step
        traffic, the broadcast of module buffers before a forward.

        Nothing else is needed, so ``strategy="ddp"`` works as is. ``DistributedDataParallel``
        broadcast rank 0's parameters and buffers when it was built, so the ranks start equal.
        No backward ever runs, so its reducer is never armed (under manual optimisation
        Lightning prepares it only in ``manual_backward``): no gradient all-reduce and no
        "expected to have finished reduction" error, with or without
        ``find_unused_parameters``. A causal LM's buffers (rotary frequencies) never change, so
        re-broadcasting them is pure traffic; without it the step's only collective is the
        all-reduce of the step scalars. The reducer still holds its gradient buckets (the size
        of the trainable set): negligible with LoRA; for full-parameter training use
        :class:`~zopro_lightning.utils.distributed.ZerothOrderDDPStrategy`, which builds no wrapper.
        """
        ddp = ddp_wrapper(self.trainer)
        if ddp is not None:
            ddp.broadcast_buffers = False

    # -- reference policy -----------------------------------------------------------------
    @contextmanager
    def reference_policy(self) -> Iterator[nn.Module]:
        """The SFT policy: the LoRA network with its adapter off, or the frozen copy."""
        if is_peft_model(self.policy):
            with self.policy.disable_adapter():
                yield self.policy
        else:
            yield self._frozen_reference[0]

    def configure_callbacks(self) -> list:
        """No callbacks of the module's own. Lightning calls this first when a fit attaches
        the module (before its own checks of the Trainer, and before ``on_fit_start`` or
        ``configure_optimizers``), so the Trainer options this module cannot honour are
        refused here, naming the module's own option (:meth:`check_trainer_options`)."""
        if self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            self.check_trainer_options()
        return []

    def check_trainer_options(self) -> None:
        """Refuse ``Trainer(accumulate_grad_batches=...)`` and ``Trainer(gradient_clip_val=...)``.

        Under manual optimisation Lightning neither accumulates nor clips: each
        ``training_step`` makes its own update. The module accumulates rollouts itself
        (``accumulate_batches``) and bounds zeroth-order steps by clamping each projected
        gradient (``zo_max_abs_grad``).

        Raises:
            MisconfigurationException: either option is set, with the module's option to use.
        """
        accumulate = self.trainer.accumulate_grad_batches
        if accumulate != 1:
            raise MisconfigurationException(
                f"Trainer(accumulate_grad_batches={accumulate}) does not apply to ZOPrOModule, "
                "which optimises manually (one policy update per training_step that completes "
                f"one). Fix: leave the Trainer's at 1 and pass ZOPrOModule(..., "
                f"accumulate_batches={accumulate}): that many rollout batches make one update "
                "(zopro-train: loop.batch_size is the prompts of one update, "
                "policy.micro_batch_size bounds the memory of its forwards)."
            )
        clip = self.trainer.gradient_clip_val
        if clip is not None and clip > 0:
            raise MisconfigurationException(
                f"Trainer(gradient_clip_val={clip}) does not apply to ZOPrOModule, which "
                "optimises manually; zeroth-order steps have no gradient tensor to clip. Fix: "
                "drop it from the Trainer and bound each projected gradient of a zeroth-order "
                f"step with ZOPrOModule(..., zo_max_abs_grad={clip}) (zopro-train: "
                f"+policy.zo_max_abs_grad={clip}); clamped values are logged as "
                "policy/clipped_grads."
            )

    def on_fit_start(self) -> None:
        # every rank takes rank 0's base seed: the step seeds, hence the directions z, agree
        self._base_seed = agree_on_seed(self.hparams.seed, self.trainer)
        if self.hparams.optimizer == "zeroth_order":
            self._quiet_ddp_wrapper()
        self._helpers_to_device()

    def on_validation_start(self) -> None:
        self._helpers_to_device()  # trainer.validate(...) alone has no on_fit_start

    def _helpers_to_device(self) -> None:
        """The frozen reference and the reward model, outside the module tree, to its device."""
        for reference in self._frozen_reference:
            reference.to(self.device)
        reward_model = getattr(self.reward_fn, "model", None)
        if isinstance(reward_model, nn.Module):
            reward_model.to(self.device)

    # -- the algorithm ----------------------------------------------------------------------
    def rollout(self, prompts: list[str], seed: int | None = None) -> Rollout:
        """Sample, score and prepare one batch (DESIGN.md §2.1); sampled with ``seed``
        (default: :meth:`rollout_seed`)."""
        self.policy.eval()  # no dropout: the two SPSA evaluations must see the same network
        reference = self.reference_policy if self.hparams.beta > 0 else None
        # sampling is seeded by (seed, update, micro-batch, rank), not by the global RNG's
        # history: a resumed run samples what the uninterrupted run sampled, and ranks differ
        with self._seeded(self.rollout_seed() if seed is None else seed):
            return collect_rollout(
                self.policy, self.tokenizer, prompts, self.reward_fn, self.rollout_config, reference
            )

    @contextmanager
    def _seeded(self, seed: int) -> Iterator[None]:
        """The global RNGs seeded with ``seed`` inside, as they were after."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    def evaluation_seed(self, stage: str, batch_idx: int) -> int:
        """Seed of a validation or prediction batch: by (seed, stage, batch, rank) only, so
        every validation samples the same way and two of them compare the policies alone."""
        rank = self.global_rank if self._trainer is not None else 0
        return derive_seed(self.hparams.seed, stage, batch_idx, rank)

    def rollout_seed(self) -> int:
        """Seed of the sampling of the next rollout: one per (update, accumulated batch, rank)."""
        rank = self.global_rank if self._trainer is not None else 0
        return derive_seed(
            self.hparams.seed, self.policy_updates, f"rollout/{len(self._pending)}/{rank}"
        )

    @property
    def will_update(self) -> bool:
        """Whether the next training batch completes an update (``accumulate_batches``)."""
        return len(self._pending) + 1 >= self.hparams.accumulate_batches

    def step_seed(self) -> int:
        """Seed of the current policy update: ``derive(base, t)`` with ``base`` rank 0's seed
        (agreed at fit start) and ``t`` the update index; the same on every rank."""
        base = self._base_seed if self._base_seed is not None else self.hparams.seed
        return derive_seed(base, self.policy_updates)

    def surrogate_loss(self, rollouts: list[Rollout], backward: bool = False) -> Tensor:
        """Mean clipped surrogate over every completion of ``rollouts`` (DESIGN.md §2.2),
        evaluated micro-batch by micro-batch at the current parameters. With ``backward``,
        each micro-batch's share is back-propagated as it is computed."""
        total_rows = sum(len(r) for r in rollouts)
        total = torch.zeros((), device=self.device)
        for rollout in rollouts:
            for rows in rollout.micro_batches(self.hparams.micro_batch_size):
                new_logprobs = completion_logprobs(
                    self.policy,
                    rollout.input_ids[rows],
                    rollout.attention_mask[rows],
                    rollout.completion_mask[rows],
                    self.hparams.temperature,
                )
                loss = (
                    clipped_surrogate(
                        new_logprobs,
                        rollout.old_logprobs[rows],
                        rollout.advantages[rows],
                        self.hparams.clip_range,
                    ).sum()
                    / total_rows
                )
                if backward:
                    self.manual_backward(loss)
                total = total + loss.detach()
        return total

    def training_step(self, batch: Any, batch_idx: int) -> None:
        rollout = self.rollout(prompts_of(batch))
        self.last_rollout = rollout
        self._pending.append(rollout)
        if len(self._pending) < self.hparams.accumulate_batches:
            return None
        rollouts, self._pending = self._pending, []
        self.nonfinite_rewards.record([r.rewards for r in rollouts], self.policy_updates)
        optimizer = self.optimizers()
        if self.hparams.optimizer == "zeroth_order":
            step_metrics = self._zeroth_order_update(optimizer, rollouts)
        else:
            step_metrics = self._first_order_update(optimizer, rollouts)
        self.lr_schedulers().step()
        self.policy_updates += 1
        metrics = {
            key: sum(r.metrics[key] for r in rollouts) / len(rollouts) for key in rollout.metrics
        }
        metrics["nonfinite_rewards_total"] = float(self.nonfinite_rewards.total)
        self.log_dict(
            {f"policy/{k}": v for k, v in (metrics | step_metrics).items()},
            on_step=True,
            on_epoch=False,
            batch_size=len(rollout),
        )
        self.log(
            "reward",
            metrics["reward_mean"],
            prog_bar=True,
            on_step=True,
            logger=False,
            batch_size=len(rollout),
        )
        return None

    def _zeroth_order_update(self, optimizer, rollouts: list[Rollout]) -> dict[str, float]:
        lr = optimizer.param_groups[0]["lr"]
        sampler_metrics = self.sampler.metrics()  # the values this step draws with

        def loss_fn() -> Tensor:
            with torch.inference_mode():
                return self.surrogate_loss(rollouts)

        result = optimizer.step(loss_fn=loss_fn, seed=self.step_seed())
        self.skipped_steps += result.num_skipped
        metrics = {
            "projected_grad": result.projected_grad,
            "loss_plus": float(result.loss_plus.mean()),
            "loss_minus": float(result.loss_minus.mean()),
            "loss": result.loss,
            "lr": lr,
            "skipped_steps": float(self.skipped_steps),
            "clipped_grads": float(result.num_clipped),
        }
        return metrics | sampler_metrics

    def _first_order_update(self, optimizer, rollouts: list[Rollout]) -> dict[str, float]:
        lr = optimizer.param_groups[0]["lr"]
        self.policy.eval()
        optimizer.zero_grad(set_to_none=True)
        loss = self.surrogate_loss(rollouts, backward=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": float(loss), "lr": lr}

    # -- held-out evaluation and generation -------------------------------------------------
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Held-out reward and KL of the current policy on a batch of validation prompts:
        ``k`` sampled completions a prompt, scored by ``reward_fn``. Logs ``val/reward`` (mean
        reward of the finite ones) and ``val/kl`` (mean sequence KL to the reference policy),
        averaged over the validation set (and over ranks)."""
        prompts = prompts_of(batch)
        rollout = self.rollout(prompts, seed=self.evaluation_seed("validation", batch_idx))
        self.log_dict(
            {"val/reward": rollout.metrics["reward_mean"], "val/kl": rollout.metrics["kl"]},
            on_step=False,
            on_epoch=True,
            batch_size=len(prompts),
            sync_dist=True,
        )

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> list[str]:
        """One completion for each prompt of the batch, in order: sampled at the module's
        ``temperature`` and ``max_new_tokens``, seeded by (seed, batch, rank)."""
        prompts = prompts_of(batch)
        config = self.rollout_config
        config.k = 1
        self.policy.eval()
        with self._seeded(self.evaluation_seed("predict", batch_idx)):
            input_ids, _, completion_mask, _ = generate_completions(
                self.policy, self.tokenizer, prompts, config
            )
        return decode_completions(self.tokenizer, input_ids, completion_mask)

    # -- checkpoints ------------------------------------------------------------------------
    # Where the pipeline is (it sets them); checkpointed, so a resumed run knows its phase.
    iteration: int = 0
    phase: str = "policy_learning"

    def checkpoint_state(self) -> dict[str, Any]:
        """ZOPrO's part of a checkpoint (``checkpoint["zopro"]``): what an exact resume needs
        beyond Lightning's own state (weights, optimizer, LR schedule, loop counters, callback
        and dataloader states). Only tensors and plain types, so it loads with
        ``weights_only=True``.

        ``fingerprint``: the policy's class and trainable tensor names and shapes;
        ``seed``: the base of the step seeds; ``max_steps`` of the run (a resume with another
        one resizes nothing and is warned about); ``policy_updates``, ``skipped_steps``; the
        sampler's class and state (decay schedule, directions); ``iteration`` and ``phase``;
        ``reward_model``: the trainable weights of ``reward_fn.model`` when it is an
        ``nn.Module`` (a refined reward model is not part of the module's ``state_dict``);
        ``pending``: rollouts of an update still accumulating. The data position is in
        Lightning's part: the loop counters and, for a
        :class:`~zopro_lightning.data.resumable.ResumableDataLoader`, the loader's state
        (``checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]``), written by
        saves made during ``fit`` (as ``ModelCheckpoint``'s are).
        """
        state: dict[str, Any] = {
            "fingerprint": model_fingerprint(self.policy),
            "seed": int(self.hparams.seed),
            "policy_updates": self.policy_updates,
            "skipped_steps": self.skipped_steps,
            "sampler_class": type(self.sampler).__name__,
            "sampler": self.sampler.state_dict(),
            "iteration": int(self.iteration),
            "phase": str(self.phase),
            "pending": [
                {f.name: _to_cpu(getattr(r, f.name)) for f in dataclasses.fields(r)}
                for r in self._pending
            ],
        }
        if self._trainer is not None:
            state["max_steps"] = int(self.trainer.max_steps)
        reward_model = self._reward_model()
        if reward_model is not None:
            state["reward_model"] = {
                n: p.detach().cpu().clone()
                for n, p in reward_model.named_parameters()
                if p.requires_grad
            }
        return state

    def _reward_model(self) -> nn.Module | None:
        model = getattr(self.reward_fn, "model", None)
        return model if isinstance(model, nn.Module) else None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["zopro"] = self.checkpoint_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore :meth:`checkpoint_state`. Lightning calls this before it loads the weights;
        every check runs before anything is changed, so a refused checkpoint leaves the module
        as it was.

        Raises:
            ValueError: the checkpoint was not written by a ``ZOPrOModule``, or for another
                policy (class, trainable names or shapes), another sampler class, or a reward
                model with other trainable tensors.
        """
        state = checkpoint.get("zopro")
        source = self._checkpoint_source()
        if state is None:
            raise ValueError(
                f"Checkpoint {source} was not written by ZOPrOModule (it has no 'zopro' section; "
                f"top-level keys: {sorted(checkpoint)}). Fix: resume from a checkpoint of a "
                "ZOPrOModule run, or start without ckpt_path."
            )
        if "fingerprint" in state:
            differences = fingerprint_differences(
                state["fingerprint"], model_fingerprint(self.policy)
            )
            if differences:
                raise ValueError(
                    f"Checkpoint {source} belongs to another model than this module's policy: "
                    + "; ".join(differences)
                    + ". Fix: build the policy the checkpoint was trained with (same base model, "
                    "LoRA rank and target modules), or start a new run without ckpt_path (or in "
                    "another output directory)."
                )
        else:
            log.warning(
                "checkpoint %s has no model fingerprint (older format): not checked", source
            )
        saved_sampler = state.get("sampler_class", type(self.sampler).__name__)
        if saved_sampler != type(self.sampler).__name__:
            raise ValueError(
                f"Checkpoint {source} was written with a {saved_sampler}, this module has a "
                f"{type(self.sampler).__name__}. Fix: build the module with a {saved_sampler} to "
                "resume this run."
            )
        reward_weights = self._checked_reward_weights(state.get("reward_model"), source)

        # -- all checks passed: restore -----------------------------------------------------
        if int(state.get("seed", self.hparams.seed)) != int(self.hparams.seed):
            log.warning(
                "resuming with the checkpoint's base seed %s instead of seed=%s, so the run "
                "continues the directions it started with",
                state["seed"],
                self.hparams.seed,
            )
            self.hparams.seed = int(state["seed"])
        max_steps = self.trainer.max_steps if self._trainer is not None else None
        if max_steps is not None and state.get("max_steps", max_steps) != max_steps:
            log.warning(
                "resuming with max_steps=%s from a run started with max_steps=%s: the LR schedule "
                "and a ZOPrO sampler's linear decay were sized for %s updates, so this is neither "
                "run continued exactly; resume with the max_steps of the interrupted run",
                max_steps,
                state["max_steps"],
                state["max_steps"],
            )
        self.policy_updates = int(state["policy_updates"])
        self.skipped_steps = int(state["skipped_steps"])
        self.sampler.load_state_dict(state["sampler"])
        self.iteration = int(state.get("iteration", 0))
        self.phase = str(state.get("phase", type(self).phase))
        self._pending = [Rollout(**fields) for fields in state.get("pending", [])]
        if reward_weights:
            reward_model = self._reward_model()
            assert reward_model is not None
            parameters = dict(reward_model.named_parameters())
            with torch.no_grad():
                for name, tensor in reward_weights.items():
                    parameters[name].copy_(tensor)

    def _checked_reward_weights(
        self, weights: Mapping[str, Tensor] | None, source: str
    ) -> Mapping[str, Tensor] | None:
        """The checkpoint's reward-model weights, after checking they fit ``reward_fn.model``."""
        reward_model = self._reward_model()
        if weights is None:
            return None
        if reward_model is None:
            log.warning(
                "checkpoint %s holds reward-model weights but this module's reward_fn has no "
                "`.model`: they are not restored",
                source,
            )
            return None
        current = {n: list(p.shape) for n, p in reward_model.named_parameters() if p.requires_grad}
        saved = {"model_class": model_class_name(reward_model)}
        differences = fingerprint_differences(
            saved | {"trainable": {n: list(t.shape) for n, t in weights.items()}},
            saved | {"trainable": current},
        )
        if differences:
            raise ValueError(
                f"Checkpoint {source} holds a reward model that does not fit this module's "
                f"reward_fn.model: " + "; ".join(differences) + ". Fix: build the reward model "
                "the run was started with (same backbone and LoRA layout)."
            )
        return weights

    def _checkpoint_source(self) -> str:
        path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        return str(path) if path else "(path unknown)"

    def on_train_start(self) -> None:
        # rollouts restored from a checkpoint mid-accumulation were saved on the CPU
        self._pending = [
            dataclasses.replace(
                r,
                **{
                    f.name: getattr(r, f.name).to(self.device)
                    for f in dataclasses.fields(r)
                    if isinstance(getattr(r, f.name), Tensor)
                },
            )
            for r in self._pending
        ]


def _to_cpu(value: Any) -> Any:
    return value.detach().cpu() if isinstance(value, Tensor) else value
