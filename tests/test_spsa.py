import pytest
import torch

from zopro_lightning.zo.optim import SPSASettings
from zopro_lightning.zo.samplers import GaussianSampler
from zopro_lightning.zo.spsa import derive_seed, spsa_step, tensor_generator


def quadratic_problem():
    """L(theta) = 0.5 * ||A theta - b||^2 with known gradient A^T (A theta - b)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    theta = torch.randn(3, generator=g, dtype=torch.float64)
    return a, b, theta


def test_mean_of_g_times_z_approaches_the_true_gradient():
    a, b, theta = quadratic_problem()
    params = {"theta": theta.clone()}
    true_grad = a.T @ (a @ theta - b)
    estimates = []
    for seed in range(4000):
        before = params["theta"].clone()
        result = spsa_step(
            params,
            lambda: 0.5 * ((a @ params["theta"] - b) ** 2).sum(),
            GaussianSampler(),
            SPSASettings(eps=1e-4),
            seed=seed,
            lr=1.0,
        )
        # the update is -lr * g * z, so (before - after) is one g z sample
        estimates.append(before - params["theta"])
        params["theta"].copy_(before)
        assert not result.skipped
    mean = torch.stack(estimates).mean(0)
    assert torch.allclose(mean, true_grad, atol=0.15 * float(true_grad.norm()))


def test_exact_restore_after_the_two_evaluations():
    theta = torch.randn(50, 7)
    params = {"w": theta.clone()}
    seen = []

    def loss():
        seen.append(params["w"].clone())
        return params["w"].sum()

    spsa_step(params, loss, GaussianSampler(), SPSASettings(eps=1e-3), seed=1, lr=0.0)
    assert torch.equal(params["w"], theta)  # lr 0: back to theta bit for bit
    assert not torch.equal(seen[0], theta) and not torch.equal(seen[1], theta)
    assert torch.allclose(seen[0] + seen[1], 2 * theta, atol=1e-6)  # +eps z and -eps z


def test_arithmetic_restore_is_within_rounding():
    theta = torch.randn(50, 7)
    params = {"w": theta.clone()}
    spsa_step(
        params,
        lambda: params["w"].sum(),
        GaussianSampler(),
        SPSASettings(eps=1e-3, exact_restore=False),
        seed=1,
        lr=0.0,
    )
    assert torch.allclose(params["w"], theta, atol=1e-6)


def test_arithmetic_restore_with_the_fused_update_matches_the_exact_one():
    """Full-parameter mode fuses the last restore into the update; the step must equal the
    copy-restore step up to rounding, with weight decay on a matrix and q = 1 or 3."""
    theta = {"w": torch.randn(6, 5, dtype=torch.float64), "bias": torch.randn(5).double()}
    for q in (1, 3):
        out = []
        for exact in (True, False):
            params = {n: t.clone() for n, t in theta.items()}

            def loss(p=params):
                return (p["w"].sin().sum() + p["bias"].pow(2).sum()).float()

            spsa_step(
                params,
                loss,
                GaussianSampler(),
                SPSASettings(eps=1e-2, num_perturbations=q, exact_restore=exact),
                seed=3,
                lr=0.05,
                weight_decay=0.1,
            )
            out.append(params)
        for name in theta:
            assert not torch.equal(out[0][name], theta[name])
            assert torch.allclose(out[0][name], out[1][name], atol=1e-9), (q, name)


def test_arithmetic_restore_after_a_skipped_step():
    theta = torch.randn(10, 3, dtype=torch.float64)
    params = {"w": theta.clone()}
    result = spsa_step(
        params,
        lambda: torch.tensor(float("nan")),
        GaussianSampler(),
        SPSASettings(eps=1e-3, exact_restore=False),
        seed=0,
        lr=1.0,
    )
    assert result.skipped
    assert torch.allclose(params["w"], theta, atol=1e-12)


def test_non_finite_g_skips_the_update_and_leaves_theta_bit_identical():
    theta = torch.randn(10, 3)
    params = {"w": theta.clone()}
    result = spsa_step(
        params,
        lambda: torch.tensor(float("nan")),
        GaussianSampler(),
        SPSASettings(eps=1e-3),
        seed=0,
        lr=1.0,
    )
    assert result.skipped
    assert torch.equal(params["w"], theta)


def test_cached_directions_give_the_same_numbers():
    theta = torch.randn(8, 4)
    out = []
    for cache in (False, True):
        params = {"w": theta.clone()}
        spsa_step(
            params,
            lambda p=params: (p["w"] ** 2).sum(),
            GaussianSampler(),
            SPSASettings(eps=1e-3, num_perturbations=3, cache_directions=cache),
            seed=5,
            lr=0.1,
        )
        out.append(params["w"])
    assert torch.equal(out[0], out[1])


def test_weight_decay_spares_vectors_and_q_averages():
    params = {"w": torch.ones(3, 3), "bias": torch.ones(3)}
    spsa_step(
        params,
        lambda: torch.tensor(0.0),
        GaussianSampler(),
        SPSASettings(eps=1e-3, num_perturbations=2),
        seed=0,
        lr=0.1,
        weight_decay=0.5,
    )
    assert torch.allclose(params["w"], torch.full((3, 3), 0.95))  # g = 0: only the decay
    assert torch.equal(params["bias"], torch.ones(3))


def test_bad_settings_are_refused_once_when_built():
    """The step takes its settings whole; they were checked when built, naming the option."""
    with pytest.raises(ValueError, match=r"spsa.eps=0.0: must be a finite number > 0"):
        SPSASettings(eps=0.0)
    with pytest.raises(ValueError, match=r"spsa.num_perturbations=0: must be an integer >= 1"):
        SPSASettings(num_perturbations=0)


# --- the estimate against autograd, the 1/q average, the skip and the guards ---------------


def regenerated(sampler, seed: int, j: int, params: dict) -> dict[str, torch.Tensor]:
    """``z_j`` of step ``seed``, drawn again from its seed as the step draws it."""
    return {
        n: sampler.sample(n, p, tensor_generator(derive_seed(seed, j), n, p.device))
        for n, p in params.items()
    }


def test_projected_grads_match_autograd_on_the_clipped_surrogate(lora_policy):
    """``g_j = (L+ - L-) / 2 eps`` against autograd's ``z_j . grad L`` for the real loss (tiny
    LoRA Llama in float64, completion log-probs, clipped surrogate with some rows clipped)."""
    from zopro_lightning.rl.objectives import clipped_surrogate
    from zopro_lightning.rl.rollout import completion_logprobs

    policy = lora_policy.double().eval()
    params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(1)
    n, prompt_len, completion_len = 6, 5, 4
    input_ids = torch.randint(
        5, policy.config.vocab_size, (n, prompt_len + completion_len), generator=g
    )
    attention_mask = torch.ones_like(input_ids)
    completion_mask = torch.ones(n, completion_len)
    completion_mask[1, 3:] = completion_mask[4, 2:] = 0  # shorter completions, padded
    with torch.no_grad():
        current = completion_logprobs(policy, input_ids, attention_mask, completion_mask)
    # ratios away from 1: rows 1 (A > 0, ratio 1.5) and 2 (A < 0, ratio 0.7) are clipped
    ratios = torch.tensor([1.0, 1.5, 0.7, 1.05, 0.9, 0.6])
    old_logprobs = current - ratios.log()
    advantages = torch.tensor([1.0, 2.0, -1.0, -0.5, 0.8, 1.5])

    def loss() -> torch.Tensor:
        new = completion_logprobs(policy, input_ids, attention_mask, completion_mask)
        return clipped_surrogate(new, old_logprobs, advantages, clip_range=0.2).mean()

    loss().backward()
    grads = {name: p.grad.clone() for name, p in params.items()}
    policy.zero_grad(set_to_none=True)
    q, seed, sampler = 8, 11, GaussianSampler()
    theta = {name: p.detach().clone() for name, p in params.items()}
    result = spsa_step(
        params, loss, sampler, SPSASettings(eps=1e-3, num_perturbations=q), seed=seed, lr=0.0
    )
    assert all(torch.equal(params[name], theta[name]) for name in theta)
    expected = torch.tensor(
        [
            sum(float((z[name] * grads[name]).sum()) for name in grads)
            for z in (regenerated(sampler, seed, j, params) for j in range(q))
        ],
        dtype=torch.float64,
    )
    error = float((result.projected_grads - expected).norm() / expected.norm())
    assert error <= 1e-2, (result.projected_grads, expected)


def smooth_loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """A loss whose change along each direction differs (so the g_j differ)."""
    return (
        params["w"].sin().sum()
        + (params["w"] @ params["bias"]).pow(2).sum()
        + params["bias"].pow(3).sum()
    )


def finite_difference(loss, theta: dict, z: dict, eps: float) -> float:
    plus = {n: theta[n] + eps * z[n] for n in theta}
    minus = {n: theta[n] - eps * z[n] for n in theta}
    return float((loss(plus) - loss(minus)) / (2 * eps))


@pytest.mark.parametrize("exact_restore", [True, False])
def test_update_is_the_mean_over_q_of_g_z_with_a_loss_that_varies_with_z(exact_restore):
    theta = {"w": torch.randn(5, 4, dtype=torch.float64), "bias": torch.randn(4).double()}
    params = {n: t.clone() for n, t in theta.items()}
    q, seed, eps, lr, sampler = 3, 4, 1e-4, 0.05, GaussianSampler()
    result = spsa_step(
        params,
        lambda: smooth_loss(params),
        sampler,
        SPSASettings(eps=eps, num_perturbations=q, exact_restore=exact_restore),
        seed=seed,
        lr=lr,
    )
    zs = [regenerated(sampler, seed, j, theta) for j in range(q)]
    g = torch.tensor(
        [finite_difference(smooth_loss, theta, z, eps) for z in zs], dtype=torch.float64
    )
    assert torch.allclose(result.projected_grads, g, rtol=1e-6)
    assert float(g.std()) > 0.1 * float(g.abs().mean())  # the directions do disagree
    for name in theta:
        expected = theta[name] - lr * sum(g[j] * zs[j][name] for j in range(q)) / q
        assert torch.allclose(params[name], expected, rtol=0, atol=1e-9), name


def test_one_non_finite_g_of_q_skips_the_whole_update():
    """Any non-finite ``g_j`` skips, not only all of them: the finite ones are measured and
    reported, ``theta`` stays bit-identical, and the skip is for ``g`` (not the update)."""
    theta = torch.randn(6, 3)
    params = {"w": theta.clone()}
    calls = []

    def loss():
        calls.append(None)  # calls 3 and 4 evaluate direction j = 1
        return torch.tensor(float("nan")) if len(calls) == 3 else (params["w"] ** 2).sum()

    result = spsa_step(
        params, loss, GaussianSampler(), SPSASettings(eps=1e-3, num_perturbations=3), seed=2, lr=0.1
    )
    assert result.skipped and result.num_skipped == 1 and not result.non_finite_update
    assert torch.isfinite(result.projected_grads).tolist() == [True, False, True]
    assert torch.equal(params["w"], theta)


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_lr_skips_before_touching_theta(lr):
    theta = {"w": torch.randn(4, 3), "bias": torch.randn(3)}
    for exact_restore in (True, False):
        params = {n: t.clone() for n, t in theta.items()}
        result = spsa_step(
            params,
            lambda p=params: smooth_loss(p),
            GaussianSampler(),
            SPSASettings(eps=1e-3, exact_restore=exact_restore),
            seed=0,
            lr=lr,
            weight_decay=0.1,
        )
        assert result.skipped and result.non_finite_update and result.num_skipped == 1
        for name in theta:
            if exact_restore:
                assert torch.equal(params[name], theta[name])
            else:  # the arithmetic restore: within rounding, as after any step of that mode
                assert torch.allclose(params[name], theta[name], atol=1e-6)


def test_an_update_that_overflows_is_undone_bit_identically():
    """``lr * g`` finite in float32 but ``theta - lr g z`` overflows: undone from the step's
    copy; an ``lr * g`` beyond float32 is refused before the update."""
    theta = torch.randn(8, 8)
    sampler = GaussianSampler()
    g = float(regenerated(sampler, 0, 0, {"w": theta})["w"].sum())  # g of L = sum(w): sum(z)
    for lr in (0.9 * torch.finfo(torch.float32).max / abs(g), 1e39):
        params = {"w": theta.clone()}
        result = spsa_step(
            params, lambda p=params: p["w"].sum(), sampler, SPSASettings(eps=1e-3), seed=0, lr=lr
        )
        assert result.skipped and result.non_finite_update and result.num_skipped == 1
        assert torch.equal(params["w"], theta)
    # without a copy there is nothing to undo from: said so, with the fix
    params = {"w": theta.clone()}
    with pytest.raises(FloatingPointError, match="exact_restore=True"):
        spsa_step(
            params,
            lambda: params["w"].sum(),
            sampler,
            SPSASettings(eps=1e-3, exact_restore=False),
            seed=0,
            lr=0.9 * torch.finfo(torch.float32).max / abs(g),
        )


def test_max_abs_grad_clamps_each_g_after_the_cross_rank_mean():
    theta = {"w": torch.randn(5, 4, dtype=torch.float64), "bias": torch.randn(4).double()}
    q, seed, eps, lr, sampler = 4, 9, 1e-4, 0.01, GaussianSampler()
    zs = [regenerated(sampler, seed, j, theta) for j in range(q)]
    g = torch.tensor(
        [finite_difference(smooth_loss, theta, z, eps) for z in zs], dtype=torch.float64
    )
    bound = float(g.abs().median())  # some g_j above it, some below
    outcomes = {}
    for max_abs_grad in (None, bound):
        params = {n: t.clone() for n, t in theta.items()}
        outcomes[max_abs_grad] = result = spsa_step(
            params,
            lambda p=params: smooth_loss(p),
            sampler,
            SPSASettings(eps=eps, num_perturbations=q, max_abs_grad=max_abs_grad),
            seed=seed,
            lr=lr,
        )
        used = g if max_abs_grad is None else g.clamp(-bound, bound)
        assert torch.allclose(result.projected_grads, used, rtol=1e-6)
        for name in theta:
            expected = theta[name] - lr * sum(used[j] * zs[j][name] for j in range(q)) / q
            assert torch.allclose(params[name], expected, atol=1e-9), name
    assert outcomes[None].num_clipped == 0
    assert outcomes[bound].num_clipped == int((g.abs() > bound).sum()) > 0
    # the bound applies to the averaged g: here the "ranks" average to half, under the bound
    params = {n: t.clone() for n, t in theta.items()}
    result = spsa_step(
        params,
        lambda p=params: smooth_loss(p),
        sampler,
        SPSASettings(eps=eps, num_perturbations=q, max_abs_grad=float(g.abs().max()) * 0.6),
        seed=seed,
        lr=lr,
        reduce_fn=lambda stats: stats / 2,
    )
    assert result.num_clipped == 0


@pytest.mark.parametrize("bound", [0.0, -1.0, float("nan")])
def test_bad_max_abs_grad_is_refused(bound):
    with pytest.raises(ValueError, match="max_abs_grad"):
        SPSASettings(eps=1e-3, max_abs_grad=bound)


def test_all_finite_is_exact_when_the_sum_overflows():
    from zopro_lightning.zo.spsa import all_finite

    big = torch.full((4,), 3e38)  # finite values whose float32 sum is inf
    assert all_finite(big) and all_finite(torch.zeros(0))
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert not all_finite(torch.tensor([1.0, bad, 2.0]))
    assert not all_finite(torch.tensor([float("inf"), -float("inf")]))  # the sum is nan
