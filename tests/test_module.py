"""ZOPrOModule inside a plain lightning.Trainer, as a user's own project would use it."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from zopro_lightning import ZOPrOModule
from zopro_lightning.policy.optimization import OptimizerSettings
from zopro_lightning.reward.callables import RewardError
from zopro_lightning.rl.rollout import RolloutSettings
from zopro_lightning.zo.optim import SPSASettings
from zopro_lightning.zo.samplers import ZOPrOSampler

from .conftest import count_words_reward


def fit(module, prompts, steps, batch_size=2, **trainer_kwargs):
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(module, DataLoader(prompts, batch_size=batch_size))
    return trainer


def trainable(policy):
    return {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}


def test_user_reward_in_plain_trainer_is_forward_only(lora_policy, tokenizer, small_task):
    module = ZOPrOModule(
        lora_policy,
        tokenizer,
        count_words_reward,
        ZOPrOSampler(decay="linear"),
        optimizer=OptimizerSettings(lr=1e-2),
        rollout=RolloutSettings(k=2, max_new_tokens=6),
    )
    before = trainable(lora_policy)
    trainer = fit(module, small_task.train_prompts[:8], steps=3)
    assert trainer.global_step == 3 and module.policy_updates == 3
    assert all(p.grad is None for p in lora_policy.parameters())
    after = trainable(lora_policy)
    assert all(not torch.equal(before[n], after[n]) for n in before)
    assert module.sampler.total_steps == 3  # filled from max_steps
    logged = trainer.logged_metrics
    for key in (
        "reward_mean",
        "reward_std",
        "kl",
        "rlhf_reward",
        "advantage_std",
        "projected_grad",
        "loss_plus",
        "loss_minus",
        "lr",
        "decay",
        "skipped_steps",
        "generated_tokens_per_second",
    ):
        assert f"policy/{key}" in logged, key


def test_dict_batches_accumulation_and_schedule(lora_policy, tokenizer, small_task):
    module = ZOPrOModule(
        lora_policy,
        tokenizer,
        count_words_reward,
        optimizer=OptimizerSettings(lr=1e-2, lr_schedule="linear", accumulate_batches=2),
        rollout=RolloutSettings(k=2, max_new_tokens=4, micro_batch_size=3),
    )
    prompts = [{"prompt": p} for p in small_task.train_prompts[:8]]
    loader = DataLoader(
        prompts, batch_size=2, collate_fn=lambda rows: {"prompt": [r["prompt"] for r in rows]}
    )
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    assert trainer.global_step == 2  # 4 batches, 2 rollouts per update
    assert trainer.logged_metrics["policy/lr"] < 1e-2  # the linear schedule moved


def test_first_order_mode_uses_backprop_and_the_same_loss(lora_policy, tokenizer, small_task):
    module = ZOPrOModule(
        lora_policy,
        tokenizer,
        count_words_reward,
        optimizer=OptimizerSettings(name="first_order", lr=1e-2),
        rollout=RolloutSettings(k=2, max_new_tokens=4),
    )
    before = trainable(lora_policy)
    fit(module, small_task.train_prompts[:4], steps=2)
    after = trainable(lora_policy)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(p.grad is None for p in lora_policy.parameters())  # zeroed after the step


def test_first_order_updates_checkpoint_activations_when_asked(tokenizer, small_task):
    """``gradient_checkpointing_enable()``: the decoder layers run again in the backward, and
    the update equals the one without
    checkpointing, so dropout stayed off (eval mode below the layers)."""
    from zopro_lightning.models.loading import build_tiny_causal_lm

    weights, calls = [], []
    for checkpointing in (False, True):
        policy = build_tiny_causal_lm(
            tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64
        )
        policy.config.attention_dropout = 0.5  # would change the update if it were on
        if checkpointing:
            policy.gradient_checkpointing_enable()
        layer = policy.model.layers[0].mlp  # a child: the recomputation calls it again
        count = [0]
        layer.register_forward_pre_hook(
            lambda module, args, count=count: count.__setitem__(0, count[0] + 1)
        )
        module = ZOPrOModule(
            policy, tokenizer, count_words_reward,
            optimizer=OptimizerSettings(name="first_order", lr=1e-2),
            rollout=RolloutSettings(k=2, max_new_tokens=4),
        )  # fmt: skip
        fit(module, small_task.train_prompts[:2], steps=1)
        calls.append(count[0])
        weights.append(trainable(policy))
    assert calls[1] > calls[0]  # the layer's forward ran again inside the backward
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])


def test_non_finite_loss_skips_and_leaves_theta_bit_identical(lora_policy, tokenizer, small_task):
    module = ZOPrOModule(
        lora_policy, tokenizer, count_words_reward, rollout=RolloutSettings(k=2, max_new_tokens=4)
    )
    module.surrogate_loss = lambda rollouts, backward=False: torch.tensor(float("nan"))
    before = trainable(lora_policy)
    trainer = fit(module, small_task.train_prompts[:4], steps=2)
    after = trainable(lora_policy)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert module.skipped_steps == 2
    assert trainer.logged_metrics["policy/skipped_steps"] == 2
    assert all(torch.isfinite(p).all() for p in lora_policy.parameters())


@pytest.mark.parametrize(
    ("reward", "message"),
    [
        (lambda p, c: 1 / 0, "raised ZeroDivisionError"),
        (lambda p, c: torch.zeros(len(c) + 1), "returned shape"),
        (lambda p, c: torch.full((len(c),), float("nan")), "no finite value"),
    ],
)
def test_bad_rewards_fail_with_a_message_naming_them(
    lora_policy, tokenizer, small_task, reward, message
):
    module = ZOPrOModule(
        lora_policy, tokenizer, reward, rollout=RolloutSettings(k=2, max_new_tokens=4)
    )
    with pytest.raises(RewardError, match=message):
        fit(module, small_task.train_prompts[:2], steps=1)


def test_bad_hyperparameters_are_refused(lora_policy, tokenizer):
    with pytest.raises(ValueError, match=r"spsa.eps=0.0: must be a finite number > 0"):
        ZOPrOModule(lora_policy, tokenizer, count_words_reward, spsa=SPSASettings(eps=0.0))
    with pytest.raises(ValueError, match=r"rollout.k=1: must be an integer >= 2"):
        ZOPrOModule(lora_policy, tokenizer, count_words_reward, rollout=RolloutSettings(k=1))


def test_settings_are_passed_whole_and_recorded_flat(lora_policy, tokenizer):
    module = ZOPrOModule(
        lora_policy,
        tokenizer,
        count_words_reward,
        optimizer=OptimizerSettings("first_order", lr=0.5),
        rollout=RolloutSettings(k=3),
        spsa=SPSASettings(eps=0.01, betas=[0.8, 0.9]),
        seed=7,
    )
    h = module.hparams
    assert (h.optimizer, h.lr, h.k, h.eps, h.betas, h.seed) == (
        "first_order", 0.5, 3, 0.01, (0.8, 0.9), 7
    )
    assert module.rollout_config == RolloutSettings(k=3)
    assert module.rollout_config is not module.rollout_settings  # callers may change k
    with pytest.raises(TypeError, match=r"takes a RolloutSettings, got dict"):
        ZOPrOModule(lora_policy, tokenizer, count_words_reward, rollout={"k": 2})


def test_set_optimizer_changes_the_phase_settings_and_checks_them(lora_policy, tokenizer):
    module = ZOPrOModule(lora_policy, tokenizer, count_words_reward)
    h = module.hparams
    module.set_optimizer("zeroth_order", lr=0.02, eps=0.004, lr_schedule="linear")
    assert (h.optimizer, h.lr, h.eps, h.lr_schedule) == ("zeroth_order", 0.02, 0.004, "linear")
    assert module.spsa_settings.eps == 0.004
    assert module.optimizer_settings.lr_schedule == "linear"
    module.set_optimizer("first_order", lr=0.1, lr_schedule="constant")
    assert (h.optimizer, h.lr, h.eps, h.lr_schedule) == ("first_order", 0.1, 0.004, "constant")
    module.set_optimizer("zeroth_order")  # lr and the rest as they were
    assert (h.optimizer, h.lr) == ("zeroth_order", 0.1)
    before = (module.optimizer_settings, module.spsa_settings)
    with pytest.raises(ValueError, match=r"unknown settings \['k'\]"):
        module.set_optimizer("zeroth_order", k=3)
    with pytest.raises(ValueError, match=r"spsa.eps=-1.0: must be"):
        module.set_optimizer("first_order", lr=1.0, eps=-1.0)
    with pytest.raises(ValueError, match=r"optimizer.lr_schedule='sideways': must be one of"):
        module.set_optimizer("first_order", lr_schedule="sideways")
    assert (module.optimizer_settings, module.spsa_settings) == before  # nothing changed


def test_checkpoint_carries_step_counter_and_sampler(lora_policy, tokenizer, small_task, tmp_path):
    sampler = ZOPrOSampler(decay="linear", total_steps=10)
    sampler.set_directions({n: torch.randn(p.shape) for n, p in lora_policy.named_parameters()})
    module = ZOPrOModule(
        lora_policy,
        tokenizer,
        count_words_reward,
        sampler,
        rollout=RolloutSettings(k=2, max_new_tokens=4),
    )
    trainer = fit(module, small_task.train_prompts[:4], steps=2)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["zopro"]["policy_updates"] == 2
    assert checkpoint["zopro"]["sampler"]["num_steps"] == 2


def quiet_trainer(**options):
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **options,
    )


def test_validation_step_logs_held_out_reward_and_kl(lora_policy, tokenizer, small_task):
    module = ZOPrOModule(
        lora_policy, tokenizer, count_words_reward, rollout=RolloutSettings(k=2, max_new_tokens=4)
    )
    held_out = DataLoader(small_task.eval_prompts[:4], batch_size=2)
    first = quiet_trainer().validate(module, held_out, verbose=False)
    again = quiet_trainer().validate(module, held_out, verbose=False)
    assert set(first[0]) == {"val/reward", "val/kl"}
    assert first[0]["val/kl"] >= 0.0
    assert first == again  # each validation samples the same way: two compare the policies
    # during a fit: after each epoch, on the validation loader of prompts
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(module, DataLoader(small_task.train_prompts[:4], batch_size=2), held_out)
    assert {"val/reward", "val/kl"} <= set(trainer.logged_metrics)
    assert module.policy_updates == 2


def test_predict_step_gives_one_completion_a_prompt(lora_policy, tokenizer, small_task):
    module = ZOPrOModule(
        lora_policy, tokenizer, count_words_reward, rollout=RolloutSettings(k=4, max_new_tokens=4)
    )
    prompts = small_task.eval_prompts[:3]
    loader = DataLoader(
        [{"prompt": p} for p in prompts],
        batch_size=2,
        collate_fn=lambda rows: {"prompt": [r["prompt"] for r in rows]},
    )
    batches = quiet_trainer().predict(module, loader)
    assert [len(batch) for batch in batches] == [2, 1]
    completions = [c for batch in batches for c in batch]
    assert all(isinstance(c, str) for c in completions)
    assert quiet_trainer().predict(module, loader) == batches  # seeded by (seed, batch, rank)


@pytest.mark.parametrize(
    ("option", "points_to"),
    [
        (
            {"accumulate_grad_batches": 2},
            r"ZOPrOModule\(\.\.\., optimizer=OptimizerSettings\(accumulate_batches=2\)\)",
        ),
        (
            {"gradient_clip_val": 1.0},
            r"ZOPrOModule\(\.\.\., spsa=SPSASettings\(max_abs_grad=1.0\)\)",
        ),
    ],
)
def test_trainer_options_of_automatic_optimisation_point_to_the_modules_own(
    lora_policy, tokenizer, small_task, option, points_to
):
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    module = ZOPrOModule(
        lora_policy, tokenizer, count_words_reward, rollout=RolloutSettings(k=2, max_new_tokens=4)
    )
    before = trainable(lora_policy)
    with pytest.raises(MisconfigurationException, match=points_to):
        fit(module, small_task.train_prompts[:4], steps=1, **option)
    assert module.policy_updates == 0
    after = trainable(lora_policy)
    assert all(torch.equal(before[n], after[n]) for n in before)
    # the same Trainer options do not stand in the way of predictions
    assert quiet_trainer(**option).predict(module, DataLoader(small_task.eval_prompts[:2]))


def test_optimizer_direction_is_minus_the_running_gradient_mean(lora_policy, tokenizer, small_task):
    """After a first-order phase the direction is -exp_avg of AdamW, by tensor name; zeroth-order
    SGD keeps no gradient mean, so there is none."""
    module = ZOPrOModule(
        lora_policy,
        tokenizer,
        count_words_reward,
        optimizer=OptimizerSettings(name="first_order", lr=1e-2),
        rollout=RolloutSettings(k=2, max_new_tokens=4),
    )
    trainer = fit(module, small_task.train_prompts[:4], steps=2)
    optimizer = trainer.optimizers[0]
    direction = module.optimizer_direction(optimizer)
    params = module.trainable_parameters
    assert set(direction) == set(params)
    for name, param in params.items():
        assert torch.equal(direction[name], -optimizer.state[param]["exp_avg"].float())
    assert any(float(t.abs().sum()) > 0 for t in direction.values())
    module.set_optimizer("zeroth_order", lr=1e-3)
    trainer = fit(module, small_task.train_prompts[:4], steps=1)
    assert module.optimizer_direction(trainer.optimizers[0]) == {}
    assert module.optimizer_direction(None) == {}


def test_logged_decay_is_the_one_the_step_drew_with(lora_policy, tokenizer, small_task):
    """d_t of each logged step is the value before that step advanced the schedule: d_0 first
    (the schedule restarts with new directions), then d_0 - 1/T, ..."""
    sampler = ZOPrOSampler(decay="linear", initial_decay=0.9)
    sampler.set_directions({n: torch.randn(p.shape) for n, p in lora_policy.named_parameters()
                            if p.requires_grad})
    module = ZOPrOModule(
        lora_policy,
        tokenizer,
        count_words_reward,
        sampler,
        optimizer=OptimizerSettings(lr=1e-3),
        rollout=RolloutSettings(k=2, max_new_tokens=4),
    )
    seen = []
    original = module.log_dict

    def record(metrics, *args, **kwargs):
        if "policy/decay" in metrics:
            seen.append(float(metrics["policy/decay"]))
        return original(metrics, *args, **kwargs)

    module.log_dict = record
    fit(module, small_task.train_prompts[:6], steps=3)
    assert seen == pytest.approx([0.9, 0.9 - 1 / 3, 0.9 - 2 / 3])
    assert sampler.decay == pytest.approx(0.0, abs=1e-9)


def test_first_order_updates_hand_their_gradients_to_a_gradient_subspace_sampler(
    lora_policy, tokenizer, small_task
):
    """Each first-order update gives the sampler its batch gradient before the optimizer step:
    after 3 updates AdamW's first moment is the beta_1-weighted sum of the 3 kept gradients;
    the zeroth-order step after the iteration's end moves each tensor inside their span."""
    from zopro_lightning.zo.directions import canonical_name
    from zopro_lightning.zo.subspace_sampler import SubspaceSampler, orthonormal_rows

    sampler = SubspaceSampler(rank=3, basis="gradients")
    module = ZOPrOModule(
        lora_policy,
        tokenizer,
        count_words_reward,
        sampler=sampler,
        optimizer=OptimizerSettings(name="first_order", lr=1e-2),
        rollout=RolloutSettings(k=2, max_new_tokens=4),
    )
    trainer = fit(module, small_task.train_prompts[:6], steps=3)
    optimizer = trainer.optimizers[0]
    beta1 = optimizer.param_groups[0]["betas"][0]
    recent = sampler.state_dict()["recent"]
    params = module.trainable_parameters
    assert set(recent) == {canonical_name(n) for n in params}
    for name, param in params.items():
        kept = recent[canonical_name(name)]  # [3, D], newest first
        mean = (1 - beta1) * (kept[0] + beta1 * kept[1] + beta1**2 * kept[2])
        assert torch.allclose(optimizer.state[param]["exp_avg"].flatten(), mean, atol=1e-7)
    sampler.set_directions(None, None)  # the iteration's end (ZOPrOIterations does it)
    before = trainable(module.policy)
    module.set_optimizer("zeroth_order", lr=1.0)  # a step far above float32's rounding of theta
    fit(module, small_task.train_prompts[:2], steps=1)
    moved = 0
    for name, param in module.trainable_parameters.items():
        delta = (param.detach() - before[name]).flatten().double()
        span = orthonormal_rows(recent[canonical_name(name)]).double()
        assert (delta - span.T @ (span @ delta)).norm() <= 1e-3 * delta.norm()
        moved += int(delta.norm() > 0)
    assert moved > 0
