import math
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import instantiate

from zopro_lightning.zo.optim import SPSASettings
from zopro_lightning.zo.samplers import PerturbationSampler
from zopro_lightning.zo.spsa import spsa_step, tensor_generator
from zopro_lightning.zo.subspace_sampler import SubspaceSampler, orthonormal_rows

NAME = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
CONF = Path(__file__).resolve().parents[1] / "conf"


def draw(sampler, seed, shape=(6, 5), name=NAME, dtype=torch.float32):
    param = torch.zeros(shape, dtype=dtype)
    return sampler.sample(name, param, tensor_generator(seed, name, param.device))


def second_moment(sampler, shape, n=4000):
    zs = torch.stack([draw(sampler, s, shape, dtype=torch.float64).flatten() for s in range(n)])
    return zs.T @ zs / n, zs  # [D, D], [n, D]


def test_is_a_perturbation_sampler_and_the_config_builds_it():
    assert isinstance(SubspaceSampler(), PerturbationSampler)
    node = yaml.safe_load((CONF / "sampler" / "subspace.yaml").read_text())["sampler"]
    sampler = instantiate(node)
    assert isinstance(sampler, SubspaceSampler) and sampler.basis == "random"


def test_random_subspace_second_moment_is_scaled_projection():
    """E[z z^T] = (D/K) P with P the basis' projector: z in a K-dim span, E||z||^2 = D."""
    shape, k = (6, 5), 4
    sampler = SubspaceSampler(rank=k, scale="isotropic")
    moment, zs = second_moment(sampler, shape)
    basis = sampler._random(sampler_key(), 30, k).double()  # [D, K]
    projector = basis @ basis.T
    assert torch.allclose(zs @ projector, zs, atol=1e-5)  # every z lies in the subspace
    expected = (30 / k) * projector
    assert (moment - expected).norm() / expected.norm() < 0.1
    assert math.isclose(float(zs.pow(2).sum(1).mean()), 30.0, rel_tol=0.05)


def sampler_key():
    from zopro_lightning.zo.directions import canonical_name

    return canonical_name(NAME)


def test_unit_scale_second_moment_is_the_projection():
    sampler = SubspaceSampler(rank=3, scale="unit")
    moment, _ = second_moment(sampler, (4, 4))
    basis = sampler._random(sampler_key(), 16, 3).double()
    assert (moment - basis @ basis.T).norm() / math.sqrt(3) < 0.1


def test_lowrank_z_is_u_v_transpose_with_kept_v():
    """LOZO: the rows of z lie in span(V) (V [n, r] kept), E||z||^2 = m n when isotropic."""
    m, n, r = 6, 5, 2
    sampler = SubspaceSampler(rank=r, basis="lowrank")
    _, zs = second_moment(sampler, (m, n), n=2000)
    v = sampler._random(sampler_key(), n, r).double()  # [n, r]
    rows = zs.view(-1, m, n)
    assert torch.allclose(rows @ v @ v.T, rows, atol=1e-5)
    assert torch.linalg.matrix_rank(rows[0], atol=1e-4) <= r
    assert math.isclose(float(zs.pow(2).sum(1).mean()), m * n, rel_tol=0.06)
    assert sampler.dimension(NAME, (m, n)) == m * r


def test_same_seed_regenerates_the_same_z_and_resume_keeps_the_basis():
    sampler = SubspaceSampler(rank=4, refresh_every=3)
    first = draw(sampler, 7)
    assert torch.equal(first, draw(sampler, 7))
    assert not torch.equal(first, draw(sampler, 8))
    for _ in range(4):  # one refresh at step 3: a new basis
        sampler.step()
    after_refresh = draw(sampler, 7)
    assert not torch.equal(first, after_refresh)
    resumed = SubspaceSampler(rank=4, refresh_every=3)
    resumed.load_state_dict(sampler.state_dict())
    assert torch.equal(draw(resumed, 7), after_refresh)


def test_set_directions_refreshes_only_when_asked():
    kept = SubspaceSampler(rank=4, refresh_on_directions=False)
    z = draw(kept, 1)
    assert kept.set_directions({NAME: torch.ones(6, 5)}) == 0
    assert torch.equal(draw(kept, 1), z)
    fresh = SubspaceSampler(rank=4)
    z = draw(fresh, 1)
    fresh.set_directions({NAME: torch.ones(6, 5)})
    assert not torch.equal(draw(fresh, 1), z)


def test_directions_basis_spans_the_given_directions_and_survives_resume():
    g = torch.Generator().manual_seed(0)
    given = torch.randn(3, 6, 5, generator=g)
    given[2] = given[0] + given[1]  # dependent: dropped
    sampler = SubspaceSampler(rank=8, basis="directions")
    assert sampler.set_basis({NAME: given}) == {sampler_key(): 2}
    z = draw(sampler, 3).flatten().double()
    rows = orthonormal_rows(given[:2].reshape(2, -1)).double()
    assert torch.allclose(rows.T @ (rows @ z), z, atol=1e-4)
    resumed = SubspaceSampler(rank=8, basis="directions")
    resumed.load_state_dict(sampler.state_dict())
    assert torch.equal(draw(resumed, 3), draw(sampler, 3))
    with pytest.raises(ValueError, match="set_basis with this model"):
        draw(sampler, 3, shape=(7, 5))
    # a tensor without given directions: the random basis
    assert draw(sampler, 3, name="other.weight").flatten().numel() == 30


def test_spsa_estimate_on_a_quadratic_is_the_gradient_projected_into_the_subspace():
    """g = (L(t + eps z) - L(t - eps z)) / 2 eps = z . grad L exactly for a quadratic, so the
    mean of g z is (D/K) P grad L."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(12, 10, generator=g, dtype=torch.float64)
    b = torch.randn(12, generator=g, dtype=torch.float64)
    theta = torch.randn(10, generator=g, dtype=torch.float64)
    params = {"theta": theta.clone()}
    sampler = SubspaceSampler(rank=3, refresh_on_directions=False)
    true_grad = a.T @ (a @ theta - b)
    estimates = []
    for seed in range(3000):
        z = sampler.sample("theta", theta, tensor_generator(_step_seed(seed), "theta",
                                                             theta.device))
        before = params["theta"].clone()
        spsa_step(params, lambda: 0.5 * ((a @ params["theta"] - b) ** 2).sum(), sampler,
                  SPSASettings(eps=1e-4), seed=seed, lr=1.0)
        step = before - params["theta"]
        assert torch.allclose(step, float(z @ true_grad) * z, rtol=1e-4, atol=1e-6)
        estimates.append(step)
        params["theta"].copy_(before)
    basis = sampler._random("theta", 10, 3).double()
    expected = (10 / 3) * basis @ (basis.T @ true_grad)
    mean = torch.stack(estimates).mean(0)
    assert (mean - expected).norm() < 0.15 * expected.norm()


def test_gradients_basis_spans_the_last_rank_gradients_newest_first():
    """``observe_gradients`` keeps the last ``rank`` gradients (newest first); an iteration's
    end makes their span the basis, which z then lies in; before that a draw is refused; the
    kept gradients survive resume; other bases ignore them."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(6, 5, generator=g) for _ in range(3)]
    sampler = SubspaceSampler(rank=2, basis="gradients")
    for grad in grads:
        sampler.observe_gradients({NAME: grad, "frozen.weight": None})
    recent = sampler.state_dict()["recent"]
    assert list(recent) == [sampler_key()]
    assert torch.equal(recent[sampler_key()], torch.stack([grads[2], grads[1]]).reshape(2, -1))
    with pytest.raises(ValueError, match="first-order phase first"):
        draw(sampler, 3)
    assert sampler.set_directions(None, None) == 0
    assert sampler.dimension(NAME, (6, 5)) == 2
    assert sampler.metrics()["subspace_dimension"] == 2.0
    span = orthonormal_rows(torch.stack([grads[2], grads[1]]).reshape(2, -1)).double()
    z = draw(sampler, 3).flatten().double()
    assert torch.allclose(span.T @ (span @ z), z, atol=1e-4)  # in the span ...
    assert (z - span.T @ (span @ grads[0].flatten().double())).norm() > 1.0  # ... not the old one
    resumed = SubspaceSampler(rank=2, basis="gradients")
    resumed.load_state_dict(sampler.state_dict())
    assert torch.equal(draw(resumed, 3), draw(sampler, 3))
    narrower = SubspaceSampler(rank=1, basis="gradients")  # keeps only the newest
    narrower.load_state_dict(sampler.state_dict())
    narrower.set_directions(None, None)
    assert narrower.dimension(NAME, (6, 5)) == 1
    random = SubspaceSampler(rank=2)
    random.observe_gradients({NAME: grads[0]})
    assert random.state_dict()["recent"] == {}


def test_spsa_in_the_span_of_observed_gradients_is_unbiased_for_a_gradient_inside_it():
    """A quadratic whose gradient at theta is one of the observed ones: the mean of g z is
    (D/K) grad L (all of it lies in the K-dim span), and one estimate's cosine with grad L is
    about sqrt(K/D)^-1 times the isotropic draw's (cos ~ 1/sqrt(K) against 1/sqrt(D))."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(40, 30, generator=g, dtype=torch.float64)
    b = torch.randn(40, generator=g, dtype=torch.float64)
    theta = torch.randn(30, generator=g, dtype=torch.float64)
    true_grad = a.T @ (a @ theta - b)
    sampler = SubspaceSampler(rank=3, basis="gradients")
    for other in (torch.randn(30, generator=g, dtype=torch.float64) for _ in range(2)):
        sampler.observe_gradients({"theta": a.T @ (a @ other - b)})
    sampler.observe_gradients({"theta": true_grad})
    sampler.set_directions(None, None)
    params = {"theta": theta.clone()}
    estimates = []
    for seed in range(2000):
        before = params["theta"].clone()
        spsa_step(params, lambda: 0.5 * ((a @ params["theta"] - b) ** 2).sum(), sampler,
                  SPSASettings(eps=1e-4), seed=seed, lr=1.0)
        estimates.append(before - params["theta"])
        params["theta"].copy_(before)
    steps = torch.stack(estimates)  # [n, D]
    expected = (30 / 3) * true_grad
    assert (steps.mean(0) - expected).norm() < 0.15 * expected.norm()
    cosine = (steps @ true_grad / (steps.norm(dim=1) * true_grad.norm())).abs().mean()
    assert cosine > 0.3  # an isotropic draw in D = 30: about 0.15


def _step_seed(seed: int) -> int:
    from zopro_lightning.zo.draws import derive_seed

    return derive_seed(seed, 0)  # the step's generator for perturbation j = 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"rank": 0}, "rank"), ({"basis": "pca"}, "basis"), ({"refresh_every": 0}, "refresh_every"),
     ({"scale": "big"}, "scale")],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SubspaceSampler(**kwargs)
