"""Exact SPSA evaluations with no copy of the weights (zo/layerwise.py), stochastic rounding of
16-bit updates (zo/rounding.py), and the draws' thread pool under 16-bit tensors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from zopro_lightning.models.loading import add_lora, build_tiny_causal_lm
from zopro_lightning.zo.layerwise import LayerwiseSubstitution
from zopro_lightning.zo.optim import SPSASettings
from zopro_lightning.zo.rounding import round_stochastically
from zopro_lightning.zo.samplers import GaussianSampler, RademacherSampler, ZOPrOSampler
from zopro_lightning.zo.spsa import spsa_step

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def tiny_policy(tokenizer, dtype: torch.dtype, lora: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_tiny_causal_lm(
        tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64
    )
    if lora:
        model = add_lora(model, r=4, alpha=8)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02)
    return model.to(dtype).eval()


def loss_of(policy: torch.nn.Module, vocab: int):
    ids = torch.randint(4, vocab, (3, 7), generator=torch.Generator().manual_seed(3))

    def loss() -> torch.Tensor:
        with torch.inference_mode():
            logits = policy(input_ids=ids).logits.float()
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    return loss


def trainable(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in policy.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layerwise_evaluations_leave_theta_bit_identical_and_match_the_copy(
    tokenizer, dtype, lora
):
    """At lr = 0, theta is bit-identical after the +- evaluations; g equals the copy-based
    exact restore's g on the same draw (the same perturbed numbers, so the same losses)."""
    results = {}
    for layerwise in (True, False):
        policy = tiny_policy(tokenizer, dtype, lora)
        params = trainable(policy)
        before = {n: p.detach().clone() for n, p in params.items()}
        swap = LayerwiseSubstitution(policy, params) if layerwise else None
        result = spsa_step(
            params, loss_of(policy, len(tokenizer)), GaussianSampler(),
            SPSASettings(eps=1e-2, num_perturbations=2), seed=5, lr=0.0, layerwise=swap,
        )  # fmt: skip
        assert all(torch.equal(params[n], before[n]) for n in params)
        results[layerwise] = result
    assert torch.equal(results[True].projected_grads, results[False].projected_grads)
    assert float(results[True].projected_grads.abs().sum()) > 0  # the loss did see z


@pytest.mark.parametrize("sampler", [GaussianSampler(), RademacherSampler(), ZOPrOSampler()])
def test_layerwise_update_equals_the_copy_restores_update_in_float32(tokenizer, sampler):
    """A real step (lr > 0, weight decay): the same weights either way, bit for bit."""
    weights = []
    for layerwise in (True, False):
        policy = tiny_policy(tokenizer, torch.float32, lora=False)
        params = trainable(policy)
        swap = LayerwiseSubstitution(policy, params) if layerwise else None
        spsa_step(
            params, loss_of(policy, len(tokenizer)), sampler, SPSASettings(eps=1e-3), seed=9,
            lr=1e-2, weight_decay=0.1, layerwise=swap,
        )  # fmt: skip
        weights.append({n: p.detach().clone() for n, p in params.items()})
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])


def test_tied_embeddings_see_the_same_perturbation_in_both_places(tokenizer):
    """A tensor two modules hold (input embedding and LM head, tied) is swapped in each: the
    loss equals that of the weights perturbed in place."""
    policy = tiny_policy(tokenizer, torch.float32, lora=False)
    policy.config.tie_word_embeddings = True
    policy.tie_weights()
    assert policy.lm_head.weight is policy.get_input_embeddings().weight
    params = trainable(policy)
    loss = loss_of(policy, len(tokenizer))
    swap = LayerwiseSubstitution(policy, params)
    with_swap = spsa_step(
        params, loss, GaussianSampler(), SPSASettings(), seed=1, lr=0.0, layerwise=swap
    )
    in_place = spsa_step(params, loss, GaussianSampler(), SPSASettings(), seed=1, lr=0.0)
    assert torch.equal(with_swap.projected_grads, in_place.projected_grads)


def test_a_tensor_read_outside_its_modules_forward_is_named(tokenizer):
    policy = tiny_policy(tokenizer, torch.float32, lora=False)
    # held by a ParameterDict, as peft's embedding LoRA holds its A and B: a parent reads it,
    # the ParameterDict's own forward never runs
    policy.stray = torch.nn.ParameterDict({"a": torch.nn.Parameter(torch.zeros(3))})
    params = {**trainable(policy)}
    before = {n: p.detach().clone() for n, p in params.items()}
    swap = LayerwiseSubstitution(policy, params)
    with pytest.raises(ValueError, match=r"stray.*spsa.layerwise=false"):
        spsa_step(
            params, loss_of(policy, len(tokenizer)), GaussianSampler(), SPSASettings(), seed=1,
            lr=1.0, layerwise=swap,
        )  # fmt: skip
    assert all(torch.equal(params[n], before[n]) for n in params)  # refused before any write


def test_a_forward_that_raises_still_puts_the_weights_back(tokenizer):
    policy = tiny_policy(tokenizer, torch.float32, lora=False)
    params = trainable(policy)
    swap = LayerwiseSubstitution(policy, params)
    with pytest.raises(IndexError), swap.substituted(lambda name, t: t + 1):
        policy(input_ids=torch.tensor([[10**6]]))  # an id out of range raises in the embedding
    assert all(policy.get_parameter(n) is p for n, p in params.items())


# -- stochastic rounding -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour(dtype):
    x = torch.randn(200_000) * 3
    rounded = round_stochastically(x, dtype, torch.Generator().manual_seed(0))
    assert rounded.dtype == dtype
    low = torch.where(x.to(dtype).float() <= x, x.to(dtype), torch.nextafter(x.to(dtype),
                      torch.tensor(-torch.inf, dtype=dtype)))  # fmt: skip
    high = torch.nextafter(low, torch.tensor(torch.inf, dtype=dtype))
    assert bool(((rounded == low) | (rounded == high)).all())
    gap = (high.float() - low.float()).abs().mean()
    assert abs(float((rounded.float() - x).mean())) < 0.02 * float(gap)
    exact = x.to(dtype)  # values the dtype holds come back unchanged
    assert torch.equal(round_stochastically(exact.float(), dtype, torch.Generator()), exact)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_many_tiny_sgd_updates_move_16_bit_weights_as_float32_does(dtype):
    """200 SPSA steps whose update is ~1/50 of the dtype's gap: round-to-nearest would leave the
    weight where it was; stochastic rounding moves it by the float32 amount (within 5 %)."""

    class Ones(GaussianSampler):  # z = 1 everywhere: a constant update direction
        fill = staticmethod(lambda out, generator: out.fill_(1.0))

    start = torch.full((4096,), 1.0)
    runs = {}
    for run_dtype in (torch.float32, dtype):
        theta = {"w": start.to(run_dtype).clone()}
        for step in range(200):  # L = sum(w): g = numel, lr g = 1e-4 (the gap at 1 is 8e-3 / 1e-3)
            spsa_step(
                theta, lambda theta=theta: theta["w"].float().sum(), Ones(), SPSASettings(eps=1.0),
                seed=step, lr=-1e-4 / 4096,
            )  # fmt: skip
        runs[run_dtype] = float(theta["w"].float().mean() - 1.0)
    nearest = (start + 1e-4).to(dtype)
    assert torch.equal(nearest, start.to(dtype))  # round-to-nearest would lose every update
    assert runs[torch.float32] == pytest.approx(0.02, rel=1e-3)
    assert runs[dtype] == pytest.approx(runs[torch.float32], rel=0.05)


# -- the draws' pool with 16-bit tensors -----------------------------------------------------
def test_draws_of_several_large_16_bit_tensors_on_two_threads_finish():
    """Formerly a deadlock: a 16-bit tensor's task drew its chunks on the pool it ran on, and
    with every pool thread waiting on chunks no thread was free to draw. Run in a child under a
    timeout, so a regression fails instead of hanging the suite."""
    script = textwrap.dedent(
        """
        import torch
        from zopro_lightning.zo import draws
        torch.set_num_threads(2)
        tensors = [torch.zeros(3_000_000, dtype=d) for d in
                   (torch.bfloat16, torch.float16, torch.float32, torch.bfloat16)]
        tensors.append(torch.zeros(2_000, 1_500, dtype=torch.bfloat16).t())  # not contiguous
        tasks = []
        for i, t in enumerate(tensors):
            g = torch.Generator().manual_seed(i)
            tasks += draws.add_draw_tasks(t, g, draws.normal_fill, 1e-3)
        draws.run_tasks(tasks)
        whole = [lambda t=t: draws.draw(t, torch.Generator().manual_seed(0), draws.normal_fill)
                 for t in tensors]
        draws.run_tasks(whole)
        assert all(float(t.float().abs().sum()) > 0 for t in tensors)
        print("done")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "done" in done.stdout, done.stderr


def test_16_bit_chunked_draws_add_the_numbers_of_a_whole_draw():
    param = torch.zeros(100_000, dtype=torch.bfloat16)
    from zopro_lightning.zo import draws

    draws.run_tasks(
        draws.add_draw_tasks(param, torch.Generator().manual_seed(4), draws.normal_fill, 0.5)
    )
    whole = draws.draw(param, torch.Generator().manual_seed(4), draws.normal_fill)
    expected = torch.zeros_like(param).add_(whole.to(param.dtype), alpha=0.5)
    assert torch.equal(param, expected)
