import torch

from zopro_lightning.samplers import GaussianSampler
from zopro_lightning.spsa import spsa_step


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
            seed=seed,
            eps=1e-4,
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

    spsa_step(params, loss, GaussianSampler(), seed=1, eps=1e-3, lr=0.0)
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
        seed=1,
        eps=1e-3,
        lr=0.0,
        exact_restore=False,
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
                seed=3,
                eps=1e-2,
                lr=0.05,
                weight_decay=0.1,
                num_perturbations=q,
                exact_restore=exact,
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
        seed=0,
        eps=1e-3,
        lr=1.0,
        exact_restore=False,
    )
    assert result.skipped
    assert torch.allclose(params["w"], theta, atol=1e-12)


def test_non_finite_g_skips_the_update_and_leaves_theta_bit_identical():
    theta = torch.randn(10, 3)
    params = {"w": theta.clone()}
    result = spsa_step(
        params, lambda: torch.tensor(float("nan")), GaussianSampler(), seed=0, eps=1e-3, lr=1.0
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
            seed=5,
            eps=1e-3,
            lr=0.1,
            num_perturbations=3,
            cache_directions=cache,
        )
        out.append(params["w"])
    assert torch.equal(out[0], out[1])


def test_weight_decay_spares_vectors_and_q_averages():
    params = {"w": torch.ones(3, 3), "bias": torch.ones(3)}
    spsa_step(
        params,
        lambda: torch.tensor(0.0),
        GaussianSampler(),
        seed=0,
        eps=1e-3,
        lr=0.1,
        weight_decay=0.5,
        num_perturbations=2,
    )
    assert torch.allclose(params["w"], torch.full((3, 3), 0.95))  # g = 0: only the decay
    assert torch.equal(params["bias"], torch.ones(3))


def test_bad_eps_is_refused():
    import pytest

    with pytest.raises(ValueError, match="eps"):
        spsa_step(
            {"w": torch.ones(2)},
            lambda: torch.tensor(0.0),
            GaussianSampler(),
            seed=0,
            eps=0.0,
            lr=0.1,
        )
