import pytest
import torch

from zopro_lightning.models import build_tiny_causal_lm, load_sequence_classifier
from zopro_lightning.rewards import (
    HFRewardModel,
    RewardError,
    VaderSentimentReward,
    score_completions,
)
from zopro_lightning.tokenizer import build_word_tokenizer


def test_vader_gold_reward_orders_sentiment():
    scores = VaderSentimentReward()(["p", "p", "p"], ["was great .", "was bad .", "was ."])
    assert scores.shape == (3,)
    assert scores[0] > scores[2] > scores[1]


def test_hf_reward_model_loads_by_path_with_its_own_tokenizer(tmp_path):
    # the reward model's tokenizer differs from any policy tokenizer: its own vocabulary
    tokenizer = build_word_tokenizer(["a completely different vocabulary for the judge ."])
    base = build_tiny_causal_lm(
        tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32
    )
    base.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    load_sequence_classifier(tmp_path, pad_token_id=tokenizer.pad_token_id).save_pretrained(
        tmp_path
    )
    reward = HFRewardModel.from_pretrained(tmp_path, batch_size=2)
    scores = score_completions(
        reward, ["a different", "the judge", "for"], [" vocabulary .", " .", " the judge judge"]
    )
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    # padding must not change a text's score: alone or in a batch, the same number
    alone = reward(["the judge"], [" ."])
    assert torch.allclose(alone, scores[1:2], atol=1e-5)


def test_reward_boundary_names_the_reward_and_what_it_returned():
    def broken(prompts, completions):
        return [[1.0, 2.0]]

    with pytest.raises(RewardError, match=r"broken returned shape \(1, 2\)"):
        score_completions(broken, ["p"], ["c"])
    with pytest.raises(RewardError, match="returned str"):
        score_completions(lambda p, c: "high", ["p"], ["c"])
    partial = score_completions(
        lambda p, c: torch.tensor([1.0, float("nan")]), ["p"] * 2, ["c"] * 2
    )
    assert torch.isnan(partial[1]) and partial[0] == 1.0
