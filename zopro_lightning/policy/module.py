"""``ZOPrOModule``: preference optimisation of a causal LM with forward-only SPSA steps.

A ``LightningModule`` with manual optimisation. Each policy update (docs/algorithm.md §2):

1. rollout: ``k`` sampled completions per prompt, scored by ``reward_fn``, with log-probs
   under the current policy (``pi_old``) and the reference policy, the sequence KL and the RLOO
   advantages of ``r - beta * KL`` (:class:`~zopro_lightning.rl.rollout.RolloutSettings`);
2. one SPSA step (``OptimizerSettings(name="zeroth_order")``) on the clipped surrogate,
   evaluated without autograd (:class:`~zopro_lightning.zo.optim.SPSASettings`); or, with
   ``name="first_order"``, one AdamW step on the same loss with back-propagation, so the two
   can be compared on the same rollouts.

Any DataLoader of prompts works: batches are lists of strings or dicts with a ``"prompt"`` key.
Each update is one ``optimizer.step()``, so ``global_step``, ``max_steps``, LR schedulers,
checkpoints and loggers follow policy updates as for any first-order module. A validation loader
of prompts gives the held-out reward and KL (``val/reward``, ``val/kl``); ``trainer.predict``
gives one sampled completion a prompt. The Trainer's ``accumulate_grad_batches`` and
``gradient_clip_val`` have no meaning under manual optimisation and are refused; the module's
own ``accumulate_batches`` and ``max_abs_grad`` do those jobs.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning import LightningModule
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from zopro_lightning.policy import checkpoint, optimization
from zopro_lightning.policy.evaluation import HeldOutEvaluation, prompts_of
from zopro_lightning.policy.optimization import (
    OptimizerName,
    OptimizerSettings,
    changed_settings,
    flat_settings,
    given,
)
from zopro_lightning.policy.reference import OffloadedReference
from zopro_lightning.policy.trainer_options import check_trainer_options, quiet_ddp_wrapper
from zopro_lightning.reward.callables import NonFiniteRewards, RewardFn
from zopro_lightning.rl.objectives import clipped_surrogate
from zopro_lightning.rl.rollout import (
    Rollout,
    RolloutSettings,
    collect_rollout,
    completion_logprobs,
)
from zopro_lightning.utils.distributed import agree_on_seed, cross_rank_mean
from zopro_lightning.utils.sharding import shard_under_model_parallel
from zopro_lightning.zo.optim import SPSASettings, ZerothOrderOptimizer
from zopro_lightning.zo.samplers import GaussianSampler, PerturbationSampler
from zopro_lightning.zo.spsa import derive_seed


def checkpointed_layers_on(model: nn.Module) -> None:
    """With activation checkpointing on (``model.gradient_checkpointing_enable()``), mark the
    modules that checkpoint as training, alone: transformers checkpoints a layer only while
    ``self.training``, and ``eval()`` (no dropout, the network the rollout saw) turned that off.
    Their children stay in eval mode, so dropout stays off."""
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            module.training = True


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class ZOPrOModule(HeldOutEvaluation, LightningModule):
    """Zeroth-order (or, for comparison, first-order) RLOO preference optimisation.

    Args:
        policy: a Hugging Face causal LM, optionally PEFT-wrapped. Only parameters with
            ``requires_grad=True`` are trained.
        tokenizer: the policy's tokenizer (needs ``pad_token`` and ``eos_token``).
        reward_fn: ``reward_fn(prompts, completions) -> Tensor[B]``.
        sampler: direction sampler; default :class:`GaussianSampler` (MeZO).
        optimizer: which optimizer, its learning rate and schedule, weight decay and the
            rollout batches of an update (:class:`OptimizerSettings`; default: its defaults).
        rollout: sampling, rewards, advantages and the surrogate's clip
            (:class:`~zopro_lightning.rl.rollout.RolloutSettings`).
        spsa: the zeroth-order steps (:class:`~zopro_lightning.zo.optim.SPSASettings`).
        seed: base of the step seeds (``seed_t = derive(seed, t)``, the same on every rank).

    The settings are kept whole (``optimizer_settings``, ``rollout_settings``,
    ``spsa_settings``) and, flattened to plain values, as ``hparams`` (``hparams.optimizer``
    is the optimizer's name, ``hparams.k``, ``hparams.eps``, ... the fields by their names).
    """

    # Where the pipeline is (it sets them); checkpointed, so a resumed run knows its phase.
    iteration: int = 0
    phase: str = "policy_learning"
    _base_seed: int | None = None  # rank 0's ``seed``, agreed at fit start

    def __init__(
        self,
        policy: nn.Module,
        tokenizer: Any,
        reward_fn: RewardFn,
        sampler: PerturbationSampler | None = None,
        *,
        optimizer: OptimizerSettings | None = None,
        rollout: RolloutSettings | None = None,
        spsa: SPSASettings | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError(
                "ZOPrOModule: the tokenizer needs pad and eos tokens; set tokenizer.pad_token "
                "(e.g. tokenizer.pad_token = tokenizer.eos_token)."
            )
        self.optimizer_settings = given(optimizer, OptimizerSettings, "optimizer")
        self.rollout_settings = given(rollout, RolloutSettings, "rollout")
        self.spsa_settings = given(spsa, SPSASettings, "spsa")
        self.seed = int(seed)
        self.save_hyperparameters(self.settings_record())
        self.automatic_optimization = False
        self.policy, self.tokenizer, self.reward_fn = policy, tokenizer, reward_fn
        self.sampler: PerturbationSampler = sampler if sampler is not None else GaussianSampler()
        self.policy_updates = 0
        self.phase_horizon: int | None = None  # updates of the current phase, when set
        self.skipped_steps = 0
        self.nonfinite_rewards = NonFiniteRewards()  # counted and warned about once an update
        self.last_rollout: Rollout | None = None
        self._pending: list[Rollout] = []
        # without LoRA and with beta > 0: the SFT weights in a memory-mapped file, swapped in
        # layer by layer for the reference's forward (no second model in memory)
        self._offloaded_reference: OffloadedReference | None = None
        if self.rollout_settings.beta > 0 and not is_peft_model(policy):
            self._offloaded_reference = OffloadedReference(policy)

    # -- settings ---------------------------------------------------------------------------
    def settings_record(self) -> dict[str, Any]:
        """``hparams``: the settings flattened (:func:`~.optimization.flat_settings`)."""
        return flat_settings(
            self.optimizer_settings, self.rollout_settings, self.spsa_settings, self.seed
        )

    def set_optimizer(
        self, optimizer: OptimizerName, lr: float | None = None, **settings: Any
    ) -> None:
        """Switch between zeroth- and first-order updates (built at the next ``fit``), at
        ``lr`` when given. ``settings`` may change any other field of
        :class:`OptimizerSettings` (``lr_schedule``, ...) or of
        :class:`~zopro_lightning.zo.optim.SPSASettings` (``eps``, ``rule``, ...) by its name.

        Raises:
            ValueError: an unknown setting or a value out of range; nothing is changed then.
        """
        self.optimizer_settings, self.spsa_settings = changed_settings(
            self.optimizer_settings, self.spsa_settings, optimizer, lr, settings
        )
        self.hparams.update(self.settings_record())

    def set_seed(self, seed: int) -> None:
        """The base seed of the coming steps (a resume takes its checkpoint's)."""
        self.seed = int(seed)
        self.hparams.update(self.settings_record())

    @property
    def rollout_config(self) -> RolloutSettings:
        """A copy of the rollout settings, for sampling elsewhere (callers may change ``k``)."""
        return copy.copy(self.rollout_settings)

    @property
    def trainable_parameters(self) -> dict[str, Tensor]:
        return {n: p for n, p in self.policy.named_parameters() if p.requires_grad}

    def optimizer_direction(self, optimizer: torch.optim.Optimizer | None) -> dict[str, Tensor]:
        """The descent direction ``optimizer`` holds after a phase: minus its running mean of
        gradient estimates, by trainable tensor name; empty when it keeps none (zeroth-order
        SGD) (:func:`~zopro_lightning.policy.optimization.optimizer_direction`).

        The gradient survives a reward refinement far better than the phase's displacement
        predicts the next one (``bench/snr.py``): a sampler targeted at it searches along a
        direction that carries signal."""
        return optimization.optimizer_direction(optimizer, self.trainable_parameters)

    def zeroth_order_parameters(self) -> dict[str, Tensor]:
        """The trainable tensors the zeroth-order steps move (``spsa.trainable`` filters)."""
        return optimization.zeroth_order_parameters(
            self.trainable_parameters, self.spsa_settings.trainable, self._exact_restore()
        )

    def _exact_restore(self) -> bool:
        return optimization.exact_restore(self.spsa_settings, self.policy)

    def total_policy_updates(self) -> int:
        """Policy updates of the coming phase: :attr:`phase_horizon` when a callback sets it
        (``ZOPrOIterations``: the updates left in the current iteration), else those this
        ``fit`` will make (``max_steps`` when set). The sampler's decay and the learning-rate
        schedule run over it."""
        if self.phase_horizon:
            return int(self.phase_horizon)
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return int(self.trainer.max_steps)
        batches = self.trainer.estimated_stepping_batches
        return max(1, int(batches) // self.optimizer_settings.accumulate_batches)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW or :class:`ZerothOrderOptimizer` with the LR schedule over this fit's updates
        (:func:`~zopro_lightning.policy.optimization.configure`)."""
        return optimization.configure(self)

    def _cross_rank_mean(self, values: Tensor) -> Tensor:
        """Mean of the ``[3, q]`` step scalars ``(g, L+, L-)`` over data-parallel ranks: one
        all-reduce and nothing else (``strategy.reduce`` would add a barrier)."""
        return cross_rank_mean(values, self.trainer)

    # -- Lightning hooks --------------------------------------------------------------------
    def configure_callbacks(self) -> list[Any]:
        """No callbacks of the module's own. Lightning calls this first when a fit attaches
        the module (before its own checks of the Trainer), so the Trainer options this module
        cannot honour are refused here, naming the module's own option."""
        if self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            check_trainer_options(self.trainer)
        return []

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (``trainer=fsdp``), shard the policy with FSDP2:
        each block, then the whole model, over the data-parallel mesh
        (:func:`~zopro_lightning.utils.sharding.shard_policy`). Other strategies: nothing."""
        shard_under_model_parallel(self, self.policy)

    def on_fit_start(self) -> None:
        # every rank takes rank 0's base seed: the step seeds, hence the directions z, agree
        self._base_seed = agree_on_seed(self.seed, self.trainer)
        if self.optimizer_settings.name == "zeroth_order":
            quiet_ddp_wrapper(self.trainer)
        self._helpers_to_device()

    def on_validation_start(self) -> None:
        self._helpers_to_device()  # trainer.validate(...) alone has no on_fit_start

    def _helpers_to_device(self) -> None:
        """The reward model, outside the module tree, to the module's device."""
        reward_model = checkpoint.reward_model_of(self.reward_fn)
        if reward_model is not None:
            reward_model.to(self.device)

    def on_train_start(self) -> None:
        # rollouts restored from a checkpoint mid-accumulation were saved on the CPU
        self._pending = checkpoint.rollouts_to(self._pending, self.device)

    def on_save_checkpoint(self, ckpt: dict[str, Any]) -> None:
        ckpt["zopro"] = checkpoint.checkpoint_state(self)

    def on_load_checkpoint(self, ckpt: dict[str, Any]) -> None:
        """Restore ``ckpt["zopro"]`` (:mod:`zopro_lightning.policy.checkpoint`); Lightning
        calls this before it loads the weights. A refused checkpoint changes nothing."""
        checkpoint.load_checkpoint_state(self, ckpt)

    # -- the algorithm ----------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> None:
        """One rollout batch; the ``accumulate_batches``-th completes a policy update:
        rollouts (with their RLOO advantages) -> one optimizer step on the clipped surrogate
        of all of them -> the LR schedule -> the logged metrics."""
        rollout = self.rollout(prompts_of(batch))  # sample, score, advantages (§2.1)
        self.last_rollout = rollout
        self._pending.append(rollout)
        if len(self._pending) < self.optimizer_settings.accumulate_batches:
            return
        rollouts, self._pending = self._pending, []
        self.nonfinite_rewards.record([r.rewards for r in rollouts], self.policy_updates)
        optimizer = self.optimizers()
        if self.optimizer_settings.name == "zeroth_order":
            step_metrics = self._zeroth_order_update(optimizer, rollouts)  # SPSA (§2.3)
        else:
            step_metrics = self._first_order_update(optimizer, rollouts)
        self.lr_schedulers().step()
        self.policy_updates += 1
        self._log_update(rollouts, step_metrics)

    def rollout(self, prompts: list[str], seed: int | None = None) -> Rollout:
        """Sample, score and prepare one batch (docs/algorithm.md §2.1); sampled with ``seed``
        (default: :meth:`rollout_seed`)."""
        self.policy.eval()  # no dropout: the two SPSA evaluations must see the same network
        reference = self.reference_policy if self.rollout_settings.beta > 0 else None
        # sampling is seeded by (seed, update, micro-batch, rank), not by the global RNG's
        # history: a resumed run samples what the uninterrupted run sampled, and ranks differ
        with self._seeded(self.rollout_seed() if seed is None else seed):
            return collect_rollout(
                self.policy, self.tokenizer, prompts, self.reward_fn, self.rollout_settings,
                reference,
            )  # fmt: skip

    def surrogate_loss(self, rollouts: list[Rollout], backward: bool = False) -> Tensor:
        """``L(theta) = (1 / N) sum_i max(-A_i rho_i, -A_i clip(rho_i, 1 - c, 1 + c))`` over the
        ``N`` completions of ``rollouts``, ``rho_i = pi_theta(y_i) / pi_old(y_i)`` (sequence
        level, docs/algorithm.md §2.2): a scalar, evaluated micro-batch by micro-batch at the
        current parameters. With ``backward``, each micro-batch's share is back-propagated as
        it is computed."""
        settings = self.rollout_settings
        total_rows = sum(len(r) for r in rollouts)
        total = torch.zeros((), device=self.device)
        for rollout in rollouts:
            for rows in rollout.micro_batches(settings.micro_batch_size):
                new_logprobs = completion_logprobs(
                    self.policy, rollout.input_ids[rows], rollout.attention_mask[rows],
                    rollout.completion_mask[rows], settings.temperature,
                )  # fmt: skip
                losses = clipped_surrogate(
                    new_logprobs, rollout.old_logprobs[rows], rollout.advantages[rows],
                    settings.clip_range,
                )  # fmt: skip
                loss = losses.sum() / total_rows
                if backward:
                    self.manual_backward(loss)
                total = total + loss.detach()
        return total

    def _zeroth_order_update(
        self, optimizer: ZerothOrderOptimizer, rollouts: list[Rollout]
    ) -> dict[str, float]:
        """One :class:`ZerothOrderOptimizer` step on :meth:`surrogate_loss` without autograd,
        seeded by :meth:`step_seed`; its measurements (and the sampler's) as metrics."""
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

    def _first_order_update(
        self, optimizer: torch.optim.Optimizer, rollouts: list[Rollout]
    ) -> dict[str, float]:
        """One AdamW step on :meth:`surrogate_loss`, back-propagated micro-batch by
        micro-batch (no dropout: the same network the rollout saw)."""
        lr = optimizer.param_groups[0]["lr"]
        self.policy.eval()
        checkpointed_layers_on(self.policy)
        optimizer.zero_grad(set_to_none=True)
        loss = self.surrogate_loss(rollouts, backward=True)
        observe = getattr(self.sampler, "observe_gradients", None)
        if observe is not None:  # a sampler whose subspace the first-order gradients span
            observe({n: p.grad for n, p in self.trainable_parameters.items()})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": float(loss), "lr": lr}

    def _log_update(self, rollouts: list[Rollout], step_metrics: dict[str, float]) -> None:
        """``policy/<metric>`` of the update: the rollouts' metrics averaged over the
        accumulated batches, the step's, and the non-finite rewards so far."""
        metrics = {
            key: sum(r.metrics[key] for r in rollouts) / len(rollouts)
            for key in rollouts[-1].metrics
        }
        metrics["nonfinite_rewards_total"] = float(self.nonfinite_rewards.total)
        batch_size = len(rollouts[-1])
        self.log_dict(
            {f"policy/{k}": v for k, v in (metrics | step_metrics).items()},
            on_step=True,
            on_epoch=False,
            batch_size=batch_size,
        )
        self.log(
            "reward", metrics["reward_mean"], prog_bar=True, on_step=True, logger=False,
            batch_size=batch_size,
        )  # fmt: skip

    # -- seeds and the reference policy -------------------------------------------------------
    @contextmanager
    def reference_policy(self) -> Iterator[nn.Module]:
        """The SFT policy: the LoRA network with its adapter off, or the network with its
        initial weights swapped in layer by layer (:class:`OffloadedReference`)."""
        if is_peft_model(self.policy):
            with self.policy.disable_adapter():
                yield self.policy
        else:
            if self._offloaded_reference is None:  # beta was 0 at construction
                self._offloaded_reference = OffloadedReference(self.policy)
            with self._offloaded_reference() as reference:
                yield reference

    @contextmanager
    def _seeded(self, seed: int) -> Iterator[None]:
        """The global RNGs seeded with ``seed`` inside, as they were after."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    def rollout_seed(self) -> int:
        """Seed of the sampling of the next rollout: one per (update, accumulated batch, rank)."""
        rank = self.global_rank if self._trainer is not None else 0
        return derive_seed(self.seed, self.policy_updates, f"rollout/{len(self._pending)}/{rank}")

    def step_seed(self) -> int:
        """Seed of the current policy update: ``derive(base, t)`` with ``base`` rank 0's seed
        (agreed at fit start) and ``t`` the update index; the same on every rank."""
        base = self._base_seed if self._base_seed is not None else self.seed
        return derive_seed(base, self.policy_updates)

    @property
    def will_update(self) -> bool:
        """Whether the next training batch completes an update (``accumulate_batches``)."""
        return len(self._pending) + 1 >= self.optimizer_settings.accumulate_batches
