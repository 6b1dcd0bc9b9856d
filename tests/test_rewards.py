import pytest
import torch

from zopro_lightning.models.loading import build_tiny_causal_lm, load_sequence_classifier
from zopro_lightning.models.tokenizer import build_word_tokenizer
from zopro_lightning.reward.callables import (
    HFRewardModel,
    RewardError,
    VaderSentimentReward,
    score_completions,
)
from zopro_lightning.rl.rollout import RolloutSettings


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


def test_non_finite_rewards_are_counted_and_warned_about_rate_limited(caplog):
    from zopro_lightning.reward.callables import NonFiniteRewards

    counter = NonFiniteRewards()
    clean = torch.tensor([1.0, 2.0])
    bad = torch.tensor([float("inf"), 0.5, float("nan"), -float("inf")])
    warned_at = []
    with caplog.at_level("WARNING", logger="zopro_lightning.reward.callables"):
        for update in range(12):
            caplog.clear()
            rewards = [bad, clean] if update % 2 else [clean]  # odd updates have 3 bad values
            assert counter.record(rewards, update) == (3 if update % 2 else 0)
            assert len(caplog.records) <= 1  # at most once an update
            if caplog.records:
                warned_at.append(update)
    assert counter.total == 18 and counter.updates == 6
    # the 1st, 2nd and 4th update with non-finite rewards warn; the others are counted only
    assert warned_at == [1, 3, 7]
    caplog.clear()
    with caplog.at_level("WARNING", logger="zopro_lightning.reward.callables"):
        NonFiniteRewards().record([bad], 9)
    assert "update 9: 3 of 4 rewards were not finite (1 NaN, 1 +inf, 1 -inf)" in caplog.text


def test_an_infinite_reward_in_training_is_left_out_counted_and_logged(
    lora_policy, tokenizer, small_task, caplog
):
    """One +inf score per rollout: the step stays finite, the count is logged per update and
    in total, and the warning comes once per update at most (here: updates 0 and 1 of 3)."""
    import lightning as L
    from torch.utils.data import DataLoader

    from zopro_lightning import ZOPrOModule

    def first_is_infinite(prompts, completions):
        return torch.tensor([float("inf")] + [float(len(c)) for c in completions[1:]])

    module = ZOPrOModule(
        lora_policy, tokenizer, first_is_infinite, rollout=RolloutSettings(k=2, max_new_tokens=4)
    )
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with caplog.at_level("WARNING", logger="zopro_lightning.reward.callables"):
        trainer.fit(module, DataLoader(small_task.train_prompts[:6], batch_size=2, collate_fn=list))
    assert module.nonfinite_rewards.total == 3 and module.skipped_steps == 0
    logged = trainer.logged_metrics
    assert logged["policy/nonfinite_rewards"] == 1 and logged["policy/nonfinite_rewards_total"] == 3
    ours = [
        r.getMessage()[:8]
        for r in caplog.records
        if r.name == "zopro_lightning.reward.callables"
    ]
    assert ours == ["update 0", "update 1"]
    assert all(torch.isfinite(p).all() for p in lora_policy.parameters())
    assert torch.isfinite(module.last_rollout.advantages).all()
