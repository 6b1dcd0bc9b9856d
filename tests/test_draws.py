import pytest
import torch

from zopro_lightning.zo import draws
from zopro_lightning.zo.optim import SPSASettings
from zopro_lightning.zo.samplers import GaussianSampler, RademacherSampler
from zopro_lightning.zo.spsa import spsa_step

BIG = (3 * draws.CHUNK_NUMEL // 512 + 1, 512)  # four chunks, the last one short


def seeded(seed: int = 11) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def threads():
    """Restores torch's thread count after a test that changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_tensor_of_one_chunk_is_the_plain_draw_of_its_generator():
    param = torch.zeros(40, 30)
    gaussian = draws.draw(param, seeded(), draws.normal_fill)
    rademacher = draws.draw(param, seeded(), draws.rademacher_fill)
    assert torch.equal(gaussian, torch.randn(param.shape, generator=seeded()))
    signs = torch.randint(0, 2, param.shape, generator=seeded()) * 2 - 1
    assert torch.equal(rademacher, signs.float())


@pytest.mark.parametrize("fill", [draws.normal_fill, draws.rademacher_fill])
def test_chunked_draws_do_not_depend_on_the_thread_count(fill, threads):
    param = torch.zeros(BIG)
    torch.set_num_threads(1)
    serial = draws.draw(param, seeded(), fill)
    torch.set_num_threads(2)
    parallel = draws.draw(param, seeded(), fill)
    assert torch.equal(serial, parallel)
    assert not torch.equal(parallel, draws.draw(param, seeded(12), fill))
    # every chunk is its own stream: no chunk repeats another
    flat = parallel.flatten()
    first = flat[: draws.CHUNK_NUMEL]
    for start in range(draws.CHUNK_NUMEL, 3 * draws.CHUNK_NUMEL, draws.CHUNK_NUMEL):
        assert not torch.equal(first, flat[start : start + draws.CHUNK_NUMEL])
    assert abs(float(flat.mean())) < 0.01 and abs(float(flat.std()) - 1) < 0.01


@pytest.mark.parametrize("fill", [draws.normal_fill, draws.rademacher_fill])
def test_chunked_add_equals_adding_the_whole_draw(fill, threads):
    torch.set_num_threads(2)
    theta = torch.randn(BIG, generator=seeded(0), requires_grad=True)
    expected = theta.detach().clone().add_(draws.draw(theta, seeded(), fill), alpha=0.37)
    draws.run_tasks(draws.add_draw_tasks(theta, seeded(), fill, 0.37))
    assert torch.equal(theta.detach(), expected)
    assert theta.grad is None and theta.grad_fn is None and theta.is_leaf


def test_a_failing_task_raises_in_the_caller(threads):
    torch.set_num_threads(2)

    def fails() -> None:
        raise RuntimeError("draw failed")

    with pytest.raises(RuntimeError, match="draw failed"):
        draws.run_tasks([lambda: None, fails])


@pytest.mark.parametrize("exact_restore", [True, False])
@pytest.mark.parametrize("sampler", [GaussianSampler(), RademacherSampler()])
def test_spsa_step_on_large_tensors_matches_whole_directions(exact_restore, sampler, threads):
    """Chunked, parallel draws (the default) and cached whole ``z`` give the same update."""
    torch.set_num_threads(2)
    start = {"w": torch.randn(BIG, generator=seeded(1)), "b": torch.randn(7, generator=seeded(2))}
    target = {n: torch.randn(t.shape, generator=seeded(3)) for n, t in start.items()}
    results = []
    for cache in (False, True):
        params = {n: t.clone() for n, t in start.items()}

        def loss(params=params) -> torch.Tensor:
            return sum(((params[n] - target[n]) ** 2).mean() for n in params)

        step = spsa_step(
            params,
            loss,
            sampler,
            SPSASettings(
                eps=1e-3, num_perturbations=2, exact_restore=exact_restore, cache_directions=cache
            ),
            seed=5,
            lr=0.1,
            weight_decay=0.01,
        )
        results.append((step, params))
    (chunked, chunked_params), (cached, cached_params) = results
    assert torch.equal(chunked.projected_grads, cached.projected_grads)
    for name in start:
        assert torch.equal(chunked_params[name], cached_params[name])
        assert not torch.equal(chunked_params[name], start[name])
