import math

import pytest
import torch

from zopro_lightning.rl.objectives import clipped_surrogate, rlhf_rewards, rloo_advantages


def test_rloo_hand_computed():
    # one prompt, k = 3: baselines (2+3)/2, (1+3)/2, (1+2)/2
    adv = rloo_advantages(torch.tensor([1.0, 2.0, 3.0]), k=3)
    assert torch.allclose(adv, torch.tensor([1 - 2.5, 2 - 2.0, 3 - 1.5]))
    # two prompts, k = 2: A = r_i - r_other
    adv = rloo_advantages(torch.tensor([0.0, 1.0, 5.0, 5.0]), k=2)
    assert torch.allclose(adv, torch.tensor([-1.0, 1.0, 0.0, 0.0]))


def test_rloo_leaves_out_nan_rewards():
    adv = rloo_advantages(torch.tensor([1.0, float("nan"), 3.0, 0.0, float("nan"), 2.0]), k=3)
    assert torch.allclose(adv, torch.tensor([-2.0, 0.0, 2.0, -2.0, 0.0, 2.0]))
    # a group with one finite reward has no baseline: all zero
    adv = rloo_advantages(torch.tensor([1.0, float("nan")]), k=2)
    assert torch.equal(adv, torch.zeros(2))


@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")])
def test_rloo_leaves_out_infinite_rewards_as_it_does_nan(bad):
    """A single +inf (or -inf) reward is not clamped to the group's best (or worst): it gets
    advantage 0 and the others' baselines use only the finite rewards."""
    adv = rloo_advantages(torch.tensor([1.0, bad, 3.0, 0.0]), k=4)
    assert torch.allclose(adv, torch.tensor([1 - 1.5, 0.0, 3 - 0.5, 0 - 2.0]))
    assert torch.isfinite(adv).all()


def test_rloo_needs_k_of_two():
    with pytest.raises(ValueError, match="k must be >= 2"):
        rloo_advantages(torch.tensor([1.0, 2.0]), k=1)


def test_kl_penalised_reward():
    assert torch.allclose(
        rlhf_rewards(torch.tensor([1.0]), torch.tensor([2.0]), 0.1), torch.tensor([0.8])
    )


def test_clipped_surrogate_hand_computed():
    old = torch.zeros(3)
    new = torch.tensor([math.log(1.5), math.log(0.5), 0.0])
    adv = torch.tensor([1.0, -1.0, 2.0])
    loss = clipped_surrogate(new, old, adv, clip_range=0.2)
    # A>0, ratio 1.5: max(-1.5, -1.2) = -1.2 ; A<0, ratio 0.5: max(0.5, 0.8) = 0.8 ; ratio 1: -2
    assert torch.allclose(loss, torch.tensor([-1.2, 0.8, -2.0]))


def test_scale_to_unit_std_keeps_zeros_and_signs():
    from zopro_lightning.rl.objectives import scale_to_unit_std

    scaled = scale_to_unit_std(torch.tensor([4.0, 0.0, -4.0, 0.0]))
    assert float(scaled.std()) == pytest.approx(1.0)
    assert scaled[1] == 0 and scaled[0] > 0 > scaled[2]
