"""The full-parameter reference policy without a second model (policy/reference.py), and the
memory of a full-parameter 16-bit zeroth-order step against an inference forward's."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import count_words_reward
from zopro_lightning.models.loading import build_tiny_causal_lm
from zopro_lightning.policy.module import ZOPrOModule
from zopro_lightning.policy.reference import OffloadedReference
from zopro_lightning.rl.rollout import RolloutSettings, completion_logprobs
from zopro_lightning.utils.memory import PeakHeld
from zopro_lightning.zo.optim import SPSASettings, ZerothOrderOptimizer
from zopro_lightning.zo.samplers import GaussianSampler


def batch(vocab: int, rows: int = 4, length: int = 9):
    ids = torch.randint(4, vocab, (rows, length), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids), torch.ones(rows, 4)


def test_the_reference_is_the_policy_at_construction_and_holds_no_copy(tokenizer, tmp_path):
    policy = build_tiny_causal_lm(
        tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64
    ).eval()
    sft = copy.deepcopy(policy)
    reference = OffloadedReference(policy, tmp_path)
    assert reference.path.exists() and reference.nbytes == sum(
        p.numel() * p.element_size() for p in policy.parameters()
    )
    with torch.no_grad():
        for param in policy.parameters():  # training moves the policy away from SFT
            param.add_(torch.randn_like(param) * 0.05)
    ids, mask, completion = batch(len(tokenizer))
    moved = {n: p.detach().clone() for n, p in policy.named_parameters()}
    with torch.inference_mode():
        expected = completion_logprobs(sft, ids, mask, completion)
        with reference() as network:
            got = completion_logprobs(network, ids, mask, completion)
        live = completion_logprobs(policy, ids, mask, completion)
    assert torch.equal(got, expected)
    assert not torch.equal(live, expected)
    # the live weights are untouched, and no tensor of the policy shares the file's storage
    assert all(torch.equal(p, moved[n]) for n, p in policy.named_parameters())
    pointers = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    assert not pointers & {t.untyped_storage().data_ptr() for t in reference.tensors.values()}


def test_a_full_parameter_module_with_beta_offloads_its_reference(tokenizer):
    model = build_tiny_causal_lm(
        tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32
    )
    module = ZOPrOModule(model, tokenizer, count_words_reward, rollout=RolloutSettings(beta=0.1))
    assert isinstance(module._offloaded_reference, OffloadedReference)
    with module.reference_policy() as reference:
        assert reference is model  # the live network, its weights swapped during forwards
    idle = ZOPrOModule(model, tokenizer, count_words_reward, rollout=RolloutSettings(beta=0.0))
    assert idle._offloaded_reference is None


@pytest.mark.slow
def test_a_full_parameter_bf16_step_with_reference_stays_at_inference_memory(tokenizer):
    """About 100 M bf16 parameters (200 MB): the rollout (generation, reference log-probs)
    and the SPSA step (two evaluations, the update) each hold at most 10 % of the weights'
    bytes beyond what an inference forward of the same batch holds. A copy of the weights (the
    old exact restore, or a deepcopy reference) would add 100 %."""
    torch.manual_seed(0)
    policy = build_tiny_causal_lm(
        tokenizer, hidden_size=1024, num_layers=8, num_heads=8, intermediate_size=2816
    ).to(torch.bfloat16)
    weight_mb = sum(p.numel() * p.element_size() for p in policy.parameters()) / 2**20
    rollout_settings = RolloutSettings(k=2, max_new_tokens=4, beta=0.05, micro_batch_size=4)
    module = ZOPrOModule(
        policy, tokenizer, count_words_reward, rollout=rollout_settings, spsa=SPSASettings()
    )
    prompts = ["the movie was"] * 2
    rollout = module.rollout(prompts)
    with PeakHeld() as idle:
        pass
    with PeakHeld() as forward, torch.inference_mode():
        policy(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask)
    with PeakHeld() as rollout_peak:
        module.rollout(prompts)
    params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    optimizer = ZerothOrderOptimizer(
        params.items(), GaussianSampler(), SPSASettings(layerwise=True), lr=1e-3, model=policy
    )

    def loss_fn() -> torch.Tensor:  # the surrogate's forward, with a loss that varies with z
        with torch.inference_mode():
            return completion_logprobs(
                policy, rollout.input_ids, rollout.attention_mask, rollout.completion_mask
            ).mean()

    sample = next(iter(params.values())).detach().clone()
    with PeakHeld() as step:
        optimizer.step(loss_fn=loss_fn, seed=1)
    assert not torch.equal(sample, next(iter(params.values())))
    inference_extra = forward.mb - idle.mb
    for peak in (rollout_peak, step):
        extra = peak.mb - idle.mb - inference_extra
        assert extra <= 0.1 * weight_mb, (peak.mb, idle.mb, forward.mb, weight_mb)
