"""``ZerothOrderOptimizer``: the update rules against a plain reference, several SPSA steps per
update, state through ``state_dict``, the guards; and the module's ``zo_*`` settings."""

from __future__ import annotations

import copy

import pytest
import torch

from zopro_lightning import ZOPrOModule
from zopro_lightning.policy.optimization import OptimizerSettings
from zopro_lightning.rl.rollout import RolloutSettings
from zopro_lightning.zo.optim import SPSASettings, ZerothOrderOptimizer, inner_seed
from zopro_lightning.zo.samplers import GaussianSampler
from zopro_lightning.zo.spsa import derive_seed, tensor_generator

from .conftest import count_words_reward
from .test_module import fit

EPS, LR, DECAY = 1e-4, 0.05, 0.1


def start() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(5, 4, generator=g, dtype=torch.float64),  # weight decay applies
        "bias": torch.randn(4, generator=g, dtype=torch.float64),  # no weight decay
    }


def loss_of(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """A known, non-quadratic loss (its change differs from direction to direction)."""
    w, b = params["w"], params["bias"]
    return w.sin().sum() + (w @ b).pow(2).sum() + b.pow(3).sum()


def estimate(theta: dict, seed: int, q: int, sampler=None) -> dict[str, torch.Tensor]:
    """``g_hat = mean_j g_j z_j`` at ``theta`` for step seed ``seed``, ``z_j`` regenerated from
    the seed, ``g_j`` the central difference of :func:`loss_of`."""
    sampler = sampler or GaussianSampler()
    total = {n: torch.zeros_like(t) for n, t in theta.items()}
    for j in range(q):
        z = {
            n: sampler.sample(n, t, tensor_generator(derive_seed(seed, j), n, t.device))
            for n, t in theta.items()
        }
        plus = loss_of({n: theta[n] + EPS * z[n] for n in theta})
        minus = loss_of({n: theta[n] - EPS * z[n] for n in theta})
        g = float((plus - minus) / (2 * EPS))
        for n in theta:
            total[n] += g * z[n] / q
    return total


def reference_run(rule: str, seeds: list[int], q: int, betas=(0.9, 0.999), adam_eps=1e-8):
    """The rules written out plainly (one SPSA step per seed)."""
    theta = start()
    state = {n: {} for n in theta}
    for t, seed in enumerate(seeds, start=1):
        g_hat = estimate(theta, seed, q)
        for n in theta:
            decay = DECAY if n == "w" else 0.0
            s = state[n]
            if rule == "momentum":
                s["b"] = betas[0] * s.get("b", 0.0) + g_hat[n] + decay * theta[n]
                theta[n] = theta[n] - LR * s["b"]
            else:  # Adam with decoupled weight decay and bias correction
                s["m"] = betas[0] * s.get("m", 0.0) + (1 - betas[0]) * g_hat[n]
                s["v"] = betas[1] * s.get("v", 0.0) + (1 - betas[1]) * g_hat[n] ** 2
                m_hat = s["m"] / (1 - betas[0] ** t)
                v_hat = s["v"] / (1 - betas[1] ** t)
                theta[n] = theta[n] * (1 - LR * decay) - LR * m_hat / (v_hat.sqrt() + adam_eps)
    return theta, state


def optimizer_for(
    params, rule="sgd", sampler=None, lr=LR, weight_decay=DECAY, **spsa
) -> ZerothOrderOptimizer:
    settings = SPSASettings(eps=EPS, rule=rule, **spsa)
    return ZerothOrderOptimizer(
        params.items(), sampler or GaussianSampler(), settings, lr=lr, weight_decay=weight_decay
    )


@pytest.mark.parametrize("rule", ["momentum", "adam"])
def test_rule_matches_a_plain_reference_implementation(rule):
    q, seeds = 2, [3, 4, 5]
    params = start()
    optimizer = optimizer_for(params, rule, num_perturbations=q)
    for seed in seeds:
        result = optimizer.step(loss_fn=lambda: loss_of(params), seed=seed)
        assert not result.skipped
    expected, state = reference_run(rule, seeds, q)
    for name in params:
        assert torch.allclose(params[name], expected[name], rtol=1e-9, atol=1e-12), name
    moments = optimizer.state[params["w"]]
    if rule == "momentum":
        assert torch.allclose(moments["momentum_buffer"], state["w"]["b"], rtol=1e-9)
    else:
        assert float(moments["step"]) == len(seeds)
        assert torch.allclose(moments["exp_avg"], state["w"]["m"], rtol=1e-9)
        assert torch.allclose(moments["exp_avg_sq"], state["w"]["v"], rtol=1e-9)


class RecordingSampler(GaussianSampler):
    """Gaussian directions (no chunked ``fill``, so every draw goes through ``sample``), with
    the seed of every draw and the number of ``step`` calls recorded."""

    fill = None

    def __init__(self) -> None:
        self.seeds: list[int] = []
        self.steps = 0

    def sample(self, name, param, generator):
        self.seeds.append(generator.initial_seed())
        return GaussianSampler().sample(name, param, generator)

    def step(self) -> None:
        self.steps += 1


@pytest.mark.parametrize("rule", ["sgd", "momentum", "adam"])
def test_steps_per_update_equals_that_many_single_steps_with_inner_seeds(rule):
    k, seed = 3, 21
    several, single = start(), start()
    sampler_k, sampler_1 = RecordingSampler(), RecordingSampler()
    optimizer = optimizer_for(several, rule, sampler_k, steps_per_update=k, num_perturbations=2)
    result = optimizer.step(loss_fn=lambda: loss_of(several), seed=seed)
    one_at_a_time = optimizer_for(single, rule, sampler_1, num_perturbations=2)
    for i in range(k):
        one_at_a_time.step(loss_fn=lambda: loss_of(single), seed=inner_seed(seed, i))
    assert all(torch.equal(several[n], single[n]) for n in several)
    assert sampler_k.steps == 1 and sampler_1.steps == k  # the sampler steps once per update
    assert len(result.projected_grads) == k * 2  # every step's g_j, in order
    # k distinct directions: each inner step draws from seeds of its own
    draws_per_step = len(sampler_k.seeds) // k
    per_step = [
        set(sampler_k.seeds[i * draws_per_step : (i + 1) * draws_per_step]) for i in range(k)
    ]
    assert all(not per_step[a] & per_step[b] for a in range(k) for b in range(a + 1, k))
    assert len({inner_seed(seed, i) for i in range(k)}) == k and inner_seed(seed, 0) == seed


@pytest.mark.parametrize("rule", ["momentum", "adam"])
def test_moments_round_trip_through_state_dict(rule):
    params = start()
    optimizer = optimizer_for(params, rule)
    for seed in (1, 2):
        optimizer.step(loss_fn=lambda: loss_of(params), seed=seed)
    optimizer.skipped_steps = 5
    saved = copy.deepcopy(optimizer.state_dict())
    # a fresh optimizer over a copy of the weights, loaded from the saved state
    restored_params = {n: t.clone() for n, t in params.items()}
    restored = optimizer_for(restored_params, rule)
    restored.load_state_dict(saved)
    assert restored.skipped_steps == 5
    for a, b in zip(params.values(), restored_params.values(), strict=True):
        assert optimizer.state[a].keys() == restored.state[b].keys()
        assert all(
            torch.equal(optimizer.state[a][k], restored.state[b][k]) for k in optimizer.state[a]
        )
    # and the next update continues identically
    optimizer.step(loss_fn=lambda: loss_of(params), seed=3)
    restored.step(loss_fn=lambda: loss_of(restored_params), seed=3)
    assert all(torch.equal(params[n], restored_params[n]) for n in params)


def snapshot(optimizer, params):
    return (
        {n: t.clone() for n, t in params.items()},
        {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in params.values()},
    )


def assert_unchanged(optimizer, params, before):
    weights, moments = before
    assert all(torch.equal(params[n], weights[n]) for n in params)
    for p in params.values():
        assert optimizer.state[p].keys() == moments[id(p)].keys()
        assert all(torch.equal(optimizer.state[p][k], moments[id(p)][k]) for k in moments[id(p)])


@pytest.mark.parametrize("rule", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("lr", [float("nan"), float("inf")])
def test_non_finite_lr_is_a_counted_skip_with_weights_and_moments_unchanged(rule, lr):
    params = start()
    optimizer = optimizer_for(params, rule)
    optimizer.step(loss_fn=lambda: loss_of(params), seed=1)  # moments exist
    before = snapshot(optimizer, params)
    optimizer.param_groups[0]["lr"] = lr  # as a broken LR schedule would write it
    result = optimizer.step(loss_fn=lambda: loss_of(params), seed=2)
    assert result.skipped and result.non_finite_update
    assert optimizer.skipped_steps == 1
    assert_unchanged(optimizer, params, before)


@pytest.mark.parametrize("rule", ["momentum", "adam"])
def test_an_update_rule_that_overflows_is_undone_with_its_moments(rule):
    """Finite scalars, but the rule's update overflows float32 (momentum: ``lr * b`` in the
    weights; Adam: ``g_hat^2`` in the second moment): weights and moments are put back bit for
    bit and the step is counted as skipped."""
    params = {n: t.float() for n, t in start().items()}
    optimizer = optimizer_for(params, rule, weight_decay=0.0)
    optimizer.step(loss_fn=lambda: loss_of(params), seed=1)
    before = snapshot(optimizer, params)
    scale = 1.0
    if rule == "momentum":  # lr * |g| just under float32's max, so lr * |g z_i| overflows
        probe = {n: t.clone() for n, t in params.items()}
        g = optimizer_for(probe, "sgd", lr=0.0).step(loss_fn=lambda: loss_of(probe), seed=2)
        optimizer.param_groups[0]["lr"] = (
            0.9 * torch.finfo(torch.float32).max / abs(g.projected_grad)
        )
    else:
        scale = 1e22  # g_hat ~ 1e22: finite, its square is not
    outcomes = []
    apply_rule = optimizer._apply_rule
    optimizer._apply_rule = lambda *args: outcomes.append(apply_rule(*args)) or outcomes[-1]
    result = optimizer.step(loss_fn=lambda: scale * loss_of(params), seed=2)
    assert outcomes == [False]  # the rule ran and reported the non-finite value
    assert result.skipped and result.non_finite_update and optimizer.skipped_steps == 1
    assert_unchanged(optimizer, params, before)


def test_max_abs_grad_reaches_the_step():
    params = start()
    optimizer = optimizer_for(params, num_perturbations=3, max_abs_grad=1e-6)
    result = optimizer.step(loss_fn=lambda: loss_of(params), seed=0)
    assert result.num_clipped == 3 and float(result.projected_grads.abs().max()) == 1e-6
    with pytest.raises(ValueError, match="max_abs_grad"):
        optimizer_for(start(), max_abs_grad=0.0)


@pytest.mark.parametrize(
    ("option", "value", "valid"),
    [
        ("eps", 0.0, "a finite number > 0"),
        ("eps", float("nan"), "a finite number > 0"),
        ("num_perturbations", 0, "an integer >= 1"),
        ("num_perturbations", 1.5, "an integer >= 1"),
        ("rule", "lbfgs", "one of sgd, momentum, adam"),
        ("betas", (0.9, 1.0), "two numbers in [0, 1)"),
        ("betas", (0.9,), "two numbers in [0, 1)"),
        ("adam_eps", -1e-8, "a finite number > 0"),
        ("steps_per_update", 0, "an integer >= 1"),
        ("max_abs_grad", 0.0, "null (off) or a finite number > 0"),
        ("trainable", "lora_[", "null (all) or a regular expression"),
        ("exact_restore", 1, "null (by the trainable share), true or false"),
        ("cache_directions", "yes", "true or false"),
    ],
)
def test_spsa_settings_name_the_option_and_the_valid_range(option, value, valid):
    with pytest.raises(ValueError) as error:
        SPSASettings(**{option: value})
    assert str(error.value) == f"spsa.{option}={value!r}: must be {valid}"


def test_spsa_settings_take_betas_as_any_pair():
    """Hydra passes a list (a ListConfig): kept as a tuple of floats, plain in checkpoints."""
    from omegaconf import OmegaConf

    assert SPSASettings(betas=OmegaConf.create([0.5, 0])).betas == (0.5, 0.0)


# --- the module's zeroth-order settings --------------------------------------------------


def test_zo_trainable_moves_only_matching_tensors(lora_policy, tokenizer, small_task):
    module = ZOPrOModule(
        lora_policy,
        tokenizer,
        count_words_reward,
        optimizer=OptimizerSettings(lr=1e-2),
        rollout=RolloutSettings(k=2, max_new_tokens=4),
        spsa=SPSASettings(trainable=r"lora_B", max_abs_grad=1e-9),
    )
    before = {n: p.detach().clone() for n, p in lora_policy.named_parameters()}
    trainer = fit(module, small_task.train_prompts[:2], steps=1)
    after = dict(lora_policy.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and all("lora_B" in n for n in moved)
    assert {n for n in before if "lora_B" in n} == moved
    # the bound on |g| is wired from the module: the one g was clamped, and logged
    assert trainer.optimizers[0].settings.max_abs_grad == 1e-9
    assert trainer.logged_metrics["policy/clipped_grads"] == 1


def test_zo_trainable_matching_nothing_is_refused(lora_policy, tokenizer):
    module = ZOPrOModule(
        lora_policy, tokenizer, count_words_reward, spsa=SPSASettings(trainable="no_such_tensor")
    )
    with pytest.raises(ValueError, match="matches no trainable tensor"):
        module.zeroth_order_parameters()


def test_arithmetic_restore_on_16_bit_weights_is_refused(lora_policy, tokenizer):
    policy = lora_policy.to(torch.bfloat16)
    module = ZOPrOModule(
        policy,
        tokenizer,
        count_words_reward,
        rollout=RolloutSettings(beta=0.0),
        spsa=SPSASettings(exact_restore=False),
    )
    with pytest.raises(ValueError, match=r"exact_restore=False.*torch.bfloat16"):
        module.zeroth_order_parameters()
    # the bit-exact restore has no rounding drift: allowed
    exact = ZOPrOModule(
        policy,
        tokenizer,
        count_words_reward,
        rollout=RolloutSettings(beta=0.0),
        spsa=SPSASettings(exact_restore=True),
    )
    assert set(exact.zeroth_order_parameters()) == set(exact.trainable_parameters)
