"""zopro_lightning.run.evaluation: the paired standard error of a before/after difference."""

import math

import torch

from zopro_lightning.run.evaluation import paired_difference_stderr


def test_paired_stderr_is_the_stderr_of_the_per_prompt_differences():
    before = torch.tensor([0.1, 0.5, -0.2, 0.3])
    after = before + torch.tensor([0.2, 0.0, 0.1, 0.1])  # differences 0.2, 0.0, 0.1, 0.1
    expected = torch.tensor([0.2, 0.0, 0.1, 0.1], dtype=torch.float64).std() / 2
    assert math.isclose(paired_difference_stderr(after, before), float(expected), rel_tol=1e-6)
    # the level's spread across prompts does not enter: shifting every prompt by a constant
    # leaves only the differences
    assert paired_difference_stderr(before + 5, before) < 1e-6


def test_paired_stderr_drops_non_finite_prompts_and_needs_two():
    before = torch.tensor([0.0, 0.0, float("nan"), 0.0])
    after = torch.tensor([1.0, 2.0, 3.0, 3.0])
    assert math.isclose(paired_difference_stderr(after, before), 1.0 / math.sqrt(3), rel_tol=1e-6)
    assert math.isnan(paired_difference_stderr(torch.tensor([1.0]), torch.tensor([0.0])))
