"""The refinement options of issue #19 H4: judge only the least-confident records, and sample
the fresh completions at their own temperature."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from zopro_lightning.reward import refinement
from zopro_lightning.reward.refinement import (
    RefinementSettings,
    RewardRefinement,
    least_confident,
)
from zopro_lightning.rl.rollout import RolloutSettings

RECORDS = [(f"p{i}", f"c{i}") for i in range(5)]


def test_least_confident_keeps_the_smallest_absolute_rewards_in_order():
    scores = torch.tensor([2.0, -0.1, 0.5, -3.0, 0.0])
    assert least_confident(RECORDS, scores, 0.6) == [RECORDS[1], RECORDS[2], RECORDS[4]]
    assert least_confident(RECORDS, scores, 1.0) == RECORDS
    assert least_confident(RECORDS, scores, 0.01) == [RECORDS[4]]  # ceil: at least one


def test_least_confident_counts_non_finite_as_unsure_and_checks_its_input():
    scores = torch.tensor([1.0, float("nan"), 2.0, 3.0, 4.0])
    assert least_confident(RECORDS, scores, 0.2) == [RECORDS[1]]
    with pytest.raises(ValueError, match="one score per"):
        least_confident(RECORDS, torch.zeros(4), 0.5)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        least_confident(RECORDS, torch.zeros(5), 0.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"judge_fraction": 0.0}, "judge_fraction"), ({"judge_fraction": 1.5}, "judge_fraction"),
     ({"temperature": 0.0}, "temperature"), ({"temperature": math.inf}, "temperature")],
)
def test_settings_refuse_out_of_range_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RefinementSettings(**kwargs)


def test_refinement_judges_only_the_selected_records_with_fresh_completions_at_temperature(
    monkeypatch,
):
    seen = {}

    def fake_generate(policy, tokenizer, prompts, config):
        seen.setdefault("temperatures", []).append(config.temperature)
        n = len(prompts)
        return torch.zeros(n, 1), None, torch.ones(n, 1), None

    monkeypatch.setattr(refinement, "generate_completions", fake_generate)
    monkeypatch.setattr(refinement, "decode_completions",
                        lambda tok, ids, mask: ["fresh"] * ids.shape[0])
    rollout = RolloutSettings(temperature=1.0)

    class Module(SimpleNamespace):
        @property
        def rollout_config(self):  # as ZOPrOModule's: a copy
            return copy.copy(rollout)

    module = Module(policy=torch.nn.Linear(1, 1), tokenizer=None)

    def judge(prompts, first, second):
        seen["judged"] = list(prompts)
        return torch.ones(len(prompts))

    def reward(prompts, completions):  # |r| = 2, 0.1, 1, 3, 0.2
        return torch.tensor([2.0, 0.1, -1.0, 3.0, -0.2])

    settings = RefinementSettings(judge_fraction=0.6, temperature=0.7)
    chosen = RewardRefinement(judge, settings).selected(reward, RECORDS)
    assert chosen == [RECORDS[1], RECORDS[2], RECORDS[4]]
    pairs, judged = RewardRefinement(judge, settings).judged(module, chosen)
    assert judged == 3 and seen["judged"] == ["p1", "p2", "p4"]
    assert seen["temperatures"] == [0.7] and rollout.temperature == 1.0  # a copy was changed
    assert all(pair["chosen"] != "fresh" for pair in pairs)
    # the defaults judge every record at the rollout's temperature
    default = RewardRefinement(judge)
    assert default.selected(reward, RECORDS) == RECORDS
    default.judged(module, RECORDS)
    assert seen["temperatures"][-1] == 1.0


def test_the_config_keys_reach_the_settings():
    from hydra import compose, initialize_config_dir

    from zopro_lightning.run import building
    from zopro_lightning.run.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["loop.refine.judge_fraction=0.6",
                                           "loop.refine.temperature=0.7"])
    built = building.reward_refinement(cfg, judge=None, task=None, trainer_factory=None,
                                       progress=False)
    assert built.settings.judge_fraction == 0.6 and built.settings.temperature == 0.7
