import math

import pytest
import torch

from zopro_lightning.zo.samplers import (
    GaussianSampler,
    PerturbationSampler,
    RademacherSampler,
    ZOPrOSampler,
    canonical_name,
)
from zopro_lightning.zo.spsa import tensor_generator

NAME = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"


def draw(sampler, name=NAME, shape=(6, 5), seed=7):
    param = torch.zeros(shape)
    return sampler.sample(name, param, tensor_generator(seed, name, param.device))


def directions(shape=(6, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_canonical_names_match_policy_and_reward_model():
    reward = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert (
        canonical_name(NAME)
        == canonical_name(reward)
        == "model.layers.0.self_attn.q_proj.lora_A.weight"
    )
    assert canonical_name("module._orig_mod.score.modules_to_save.default.weight") == (
        "score.modules_to_save.weight"
    )


@pytest.mark.parametrize("d", [0.999, 0.6, 0.0])
def test_zopro_direction_is_orthogonal_to_reward_update_and_has_matched_norm(d):
    mu, v = directions()
    sampler = ZOPrOSampler(decay="constant", initial_decay=d, scale="previous_update")
    assert sampler.set_directions({NAME: mu}, {NAME: v}) == 1
    z = draw(sampler)
    residual = (z - d * mu).flatten()
    v_hat = v.flatten() / v.norm()
    assert abs(float(residual @ v_hat)) < 1e-4 * float(mu.norm())
    assert math.isclose(
        float(residual.norm()), math.sqrt(1 - d * d) * float(mu.norm()), rel_tol=1e-4, abs_tol=1e-6
    )


def test_same_seed_same_direction_other_seed_other_direction():
    mu, v = directions()
    sampler = ZOPrOSampler(decay="constant", initial_decay=0.5)
    sampler.set_directions({NAME: mu}, {NAME: v})
    assert torch.equal(draw(sampler, seed=3), draw(sampler, seed=3))
    assert not torch.equal(draw(sampler, seed=3), draw(sampler, seed=4))
    for plain in (GaussianSampler(), RademacherSampler()):
        assert torch.equal(draw(plain, seed=3), draw(plain, seed=3))


def with_directions(sampler):
    mu, v = directions()
    sampler.set_directions({NAME: mu}, {NAME: v})
    return sampler


def test_decay_schedules():
    linear = with_directions(ZOPrOSampler(decay="linear", total_steps=4, initial_decay=0.999))
    values = []
    for _ in range(6):
        linear.step()
        values.append(linear.decay)
    assert values[0] == pytest.approx(0.749)
    assert values[3] == 0.0 and values[5] == 0.0  # floored at 0
    exp = with_directions(ZOPrOSampler(decay="exp", initial_decay=0.999))
    exp.step()
    exp.step()
    assert exp.decay == pytest.approx(0.999 * math.exp(-2))
    constant = with_directions(ZOPrOSampler(decay="constant", initial_decay=0.9))
    constant.step()
    assert constant.decay == 0.9


def test_linear_decay_without_total_steps_says_what_to_set():
    with pytest.raises(ValueError, match="total_steps"):
        with_directions(ZOPrOSampler(decay="linear")).step()


def test_fallbacks_never_give_a_zero_direction():
    sampler = ZOPrOSampler(decay="constant", initial_decay=0.999, scale="previous_update")
    gaussian = draw(GaussianSampler())
    # no directions at all (first iteration): plain xi, identical to MeZO's draw
    assert torch.equal(draw(sampler), gaussian)
    # mu = 0: plain xi
    sampler.set_directions({NAME: torch.zeros(6, 5)}, {NAME: torch.randn(6, 5)})
    assert torch.equal(draw(sampler), gaussian)
    # no reward counterpart: no projection, but the norm still matches mu
    mu, _ = directions()
    sampler.set_directions({NAME: mu}, {"score.weight": torch.randn(3)})
    assert sampler.matched_tensors == 0
    z = draw(sampler)
    assert z.norm() > 0
    residual = z - 0.999 * mu
    assert float(residual.norm()) == pytest.approx(
        math.sqrt(1 - 0.999**2) * float(mu.norm()), rel=1e-4
    )
    # v = 0: no projection either
    sampler.set_directions({NAME: mu}, {NAME: torch.zeros(6, 5)})
    assert sampler.matched_tensors == 0


def test_mismatched_shapes_are_refused_with_a_clear_message():
    sampler = ZOPrOSampler(decay="constant")
    with pytest.raises(ValueError, match="LoRA layout"):
        sampler.set_directions({NAME: torch.randn(6, 5)}, {NAME: torch.randn(4)})
    # the same element count in another shape is another tensor: refused too
    with pytest.raises(ValueError, match=r"shape \(5, 6\)"):
        sampler.set_directions({NAME: torch.randn(6, 5)}, {NAME: torch.randn(5, 6)})
    sampler.set_directions({NAME: torch.randn(6, 5)})
    with pytest.raises(ValueError, match="another model"):
        draw(sampler, shape=(5, 6))


def test_default_scale_is_isotropic():
    """The default keeps g away from float resolution: the draw has a Gaussian's norm however
    small the previous update was."""
    mu, v = directions()
    assert ZOPrOSampler().scale == "isotropic"
    sampler = ZOPrOSampler(initial_decay=1.0)
    sampler.set_directions({NAME: 1e-7 * mu}, {NAME: v})
    assert float(draw(sampler).norm()) == pytest.approx(math.sqrt(mu.numel()), rel=1e-3)


def test_decay_restarts_with_new_directions_and_runs_over_the_phase_horizon():
    sampler = ZOPrOSampler(decay="linear", initial_decay=0.999)
    for _ in range(3):  # no directions yet (isotropic iteration 0): the schedule does not move
        sampler.step()
    assert sampler.decay == 0.999 and sampler.num_steps == 0
    with_directions(sampler)
    sampler.set_horizon(4)
    assert sampler.metrics() == {"decay": 0.999}
    for _ in range(4):
        sampler.step()
    assert sampler.decay == pytest.approx(0.0, abs=1e-9)
    with_directions(sampler)  # the next iteration: d_0 again, over its own horizon
    sampler.set_horizon(10)
    assert sampler.decay == 0.999 and sampler.num_steps == 0
    sampler.step()
    assert sampler.decay == pytest.approx(0.899)
    exp = with_directions(ZOPrOSampler(decay="exp", initial_decay=0.999))
    exp.step()
    with_directions(exp)
    assert exp.decay == 0.999  # exp restarts too, so it means something in every iteration
    fixed = with_directions(ZOPrOSampler(decay="linear", total_steps=5))
    fixed.set_horizon(100)
    assert fixed.total_steps == 5  # a fixed total is kept


def test_isotropic_samplers_follow_the_same_protocol():
    for sampler in (GaussianSampler(), RademacherSampler(), ZOPrOSampler()):
        assert isinstance(sampler, PerturbationSampler)
        sampler.set_horizon(3)
        assert sampler.set_directions({NAME: torch.ones(6, 5)}) == 0
        assert isinstance(sampler.metrics(), dict)


def test_state_round_trip():
    mu, v = directions()
    sampler = ZOPrOSampler(decay="linear", total_steps=10)
    sampler.set_directions({NAME: mu}, {NAME: v})
    sampler.step()
    restored = ZOPrOSampler(decay="linear", total_steps=10)
    restored.load_state_dict(sampler.state_dict())
    assert restored.decay == sampler.decay
    assert torch.equal(draw(restored), draw(sampler))


def test_rademacher_values():
    z = draw(RademacherSampler(), shape=(100,))
    assert set(z.unique().tolist()) == {-1.0, 1.0}


def test_isotropic_scale_keeps_the_direction_with_a_gaussian_norm():
    mu, v = directions()
    plain = ZOPrOSampler(decay="constant", initial_decay=0.8, scale="previous_update")
    scaled = ZOPrOSampler(decay="constant", initial_decay=0.8, scale="isotropic")
    for sampler in (plain, scaled):
        sampler.set_directions({NAME: 1e-6 * mu}, {NAME: v})
    z_plain, z_scaled = draw(plain), draw(scaled)
    cosine = torch.nn.functional.cosine_similarity(z_plain.flatten(), z_scaled.flatten(), dim=0)
    assert float(cosine) == pytest.approx(1.0, abs=1e-5)
    factor = math.sqrt(mu.numel()) / float((1e-6 * mu).norm())  # sqrt(numel) / ||mu||
    assert torch.allclose(z_scaled, factor * z_plain, rtol=1e-4)


def test_isotropic_scale_is_one_factor_for_all_tensors():
    """At d = 1 the direction is mu itself, across tensors: a tensor that moved 10x more gets
    a 10x larger perturbation, and the whole draw has a Gaussian's norm sqrt(numel)."""
    g = torch.Generator().manual_seed(3)
    mu = {"a.weight": torch.randn(40, 8, generator=g), "b.weight": torch.randn(16, 8, generator=g)}
    mu["b.weight"] *= 10
    sampler = ZOPrOSampler(decay="constant", initial_decay=1.0, scale="isotropic")
    sampler.set_directions(mu)
    z = {n: sampler.sample(n, t, torch.Generator().manual_seed(0)) for n, t in mu.items()}
    flat_z = torch.cat([t.flatten() for t in z.values()])
    flat_mu = torch.cat([t.flatten() for t in mu.values()])
    cosine = torch.nn.functional.cosine_similarity(flat_z, flat_mu, dim=0)
    assert float(cosine) == pytest.approx(1.0, abs=1e-6)
    assert float(flat_z.norm()) == pytest.approx(math.sqrt(flat_mu.numel()), rel=1e-5)
    restored = ZOPrOSampler(decay="constant", initial_decay=1.0, scale="isotropic")
    restored.load_state_dict(sampler.state_dict())
    assert torch.equal(
        restored.sample("a.weight", mu["a.weight"], torch.Generator()), z["a.weight"]
    )


def test_smoothing_blends_the_previous_direction_in():
    first, second = directions(seed=1)
    sampler = ZOPrOSampler(
        decay="constant", initial_decay=1.0, smoothing=0.75, scale="previous_update"
    )
    sampler.set_directions({NAME: first})
    sampler.set_directions({NAME: 100 * second})  # the blend is of directions, not sizes
    expected = (0.75 * first / first.norm() + 0.25 * second / second.norm()) * 100 * second.norm()
    assert torch.allclose(draw(sampler), expected, rtol=1e-4, atol=1e-4)
    plain = ZOPrOSampler(decay="constant", initial_decay=1.0, scale="previous_update")
    plain.set_directions({NAME: first})
    plain.set_directions({NAME: second})
    assert torch.allclose(draw(plain), second, atol=1e-6)  # default: the last update alone
    with pytest.raises(ValueError, match="smoothing"):
        ZOPrOSampler(smoothing=1.0)


def test_per_tensor_coefficients_span_the_blocks_of_mu():
    """Each tensor's targeted part is a_n mu_n with its own a_n ~ N(0, 1): along mu_n within a
    tensor, with signs and sizes that differ between tensors and between seeds."""
    g = torch.Generator().manual_seed(5)
    mu = {"a.weight": torch.randn(8, 4, generator=g), "b.weight": torch.randn(6, 4, generator=g)}
    sampler = ZOPrOSampler(
        decay="constant", initial_decay=1.0, coefficients="per_tensor", scale="previous_update"
    )
    sampler.set_directions(mu)
    ratios = []
    for seed in range(6):
        for name, m in mu.items():
            z = sampler.sample(name, m, tensor_generator(seed, name, m.device))
            cosine = torch.nn.functional.cosine_similarity(z.flatten(), m.flatten(), dim=0)
            assert abs(float(cosine)) == pytest.approx(1.0, abs=1e-6)  # along mu_n
            ratios.append(float(z.flatten() @ m.flatten() / m.norm() ** 2))  # = a_n
    assert min(ratios) < 0 < max(ratios) and len({round(r, 6) for r in ratios}) == len(ratios)
    with pytest.raises(ValueError, match="coefficients"):
        ZOPrOSampler(coefficients="blocks")


def test_sampler_config_targets_resolve_to_the_sampler_classes():
    """conf/sampler/*.yaml name ``zopro_lightning.zo.samplers.<Class>``; ZOPrOSampler lives in
    zo/zopro_sampler.py and canonical_name in zo/directions.py, both re-exported there."""
    from pathlib import Path

    import yaml
    from hydra.utils import get_class

    from zopro_lightning.zo import directions, samplers, zopro_sampler

    conf = Path(__file__).resolve().parents[1] / "conf" / "sampler"
    targets = {yaml.safe_load(p.read_text())["sampler"]["_target_"] for p in conf.glob("*.yaml")}
    assert "zopro_lightning.zo.samplers.ZOPrOSampler" in targets
    for target in targets:
        assert isinstance(get_class(target)(), PerturbationSampler)
    assert samplers.ZOPrOSampler is zopro_sampler.ZOPrOSampler
    assert samplers.canonical_name is directions.canonical_name
