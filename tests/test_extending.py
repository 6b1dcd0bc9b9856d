"""The README's "Extending" examples work as written: a new sampler is one class and one YAML
file (here the class lives in this test module and the YAML in a user config directory), and
``zopro-train`` runs ZOPrO with it; nothing in the package changes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import Tensor

from zopro_lightning.zo.samplers import PerturbationSampler

from .test_cli import zopro_train


class SparseGaussianSampler:
    """``z = m * g / sqrt(p)``: Gaussian ``g`` on a random fraction ``p`` of the coordinates
    (``m ~ Bernoulli(p)``), so ``E[z z^T] = I`` as for MeZO, with fewer coordinates moved."""

    def __init__(self, fraction: float = 0.25) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
        self.fraction = fraction

    def sample(self, name: str, param: Tensor, generator: torch.Generator) -> Tensor:
        g = torch.randn(param.shape, generator=generator, device=param.device)
        keep = torch.rand(param.shape, generator=generator, device=param.device) < self.fraction
        return (g * keep / self.fraction**0.5).to(param.dtype)

    def step(self) -> None: ...  # stateless: no per-update schedule

    def set_horizon(self, steps: int) -> None: ...

    def set_directions(self, policy_update: Any, reward_update: Any = None) -> int:
        return 0  # isotropic: uses no previous update

    def metrics(self) -> dict[str, float]:
        return {"fraction": self.fraction}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


SAMPLER_YAML = """\
name: sparse
lr: 2.0e-2
eps: null
direction: update
sampler:
  _target_: tests.test_extending.SparseGaussianSampler
  fraction: 0.25
"""


def test_the_example_sampler_follows_the_protocol_and_regenerates_its_draws():
    sampler = SparseGaussianSampler()
    assert isinstance(sampler, PerturbationSampler)
    param = torch.zeros(4000)
    first = sampler.sample("w", param, torch.Generator().manual_seed(3))
    again = sampler.sample("w", param, torch.Generator().manual_seed(3))
    assert torch.equal(first, again)  # the SPSA step regenerates z from the seed
    assert 0.2 < (first != 0).float().mean() < 0.3
    assert abs(first.pow(2).mean() - 1) < 0.15  # unit second moment


@pytest.mark.slow
def test_a_new_sampler_is_one_class_and_one_yaml_file(tmp_path):
    user_conf = tmp_path / "my_conf"
    (user_conf / "sampler").mkdir(parents=True)
    (user_conf / "sampler" / "sparse.yaml").write_text(SAMPLER_YAML)
    result = zopro_train(
        tmp_path / "run",
        f"hydra.searchpath=[file://{user_conf}]",
        "sampler=sparse",
        "loop.schedule=zeroth_order",
        "interplay.snapshots=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["sampler"] == "sparse" and summary["optimizer"] == "zeroth_order"
    metrics = (tmp_path / "run" / "metrics.csv").read_text()
    assert "policy/fraction" in metrics  # the sampler's own metric, logged every step
