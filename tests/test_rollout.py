from types import SimpleNamespace

import pytest
import torch

from zopro_lightning.policy.module import ZOPrOModule
from zopro_lightning.rl.rollout import (
    RolloutSettings,
    check_context_length,
    context_length,
    decode_completions,
)

from .conftest import count_words_reward


def test_rollout_shapes_masks_and_zero_kl_at_the_reference(lora_policy, tokenizer, small_task):
    with torch.no_grad():  # LoRA B = 0: the policy is its reference, KL must be exactly 0
        for name, param in lora_policy.named_parameters():
            if "lora_B" in name:
                param.zero_()
    module = ZOPrOModule(
        lora_policy, tokenizer, count_words_reward, rollout=RolloutSettings(k=3, max_new_tokens=5)
    )
    rollout = module.rollout(small_task.train_prompts[:2])
    assert len(rollout) == 6 and rollout.prompts[:3] == [small_task.train_prompts[0]] * 3
    assert rollout.completion_mask.shape == (6, rollout.input_ids.shape[1] - rollout.prompt_length)
    assert torch.equal(rollout.kl, torch.zeros(6))
    assert torch.allclose(rollout.advantages.view(2, 3).sum(1), torch.zeros(2), atol=1e-5)
    eos = rollout.input_ids[:, rollout.prompt_length :] == tokenizer.eos_token_id
    # nothing after the first EOS counts
    for row in range(6):
        hits = eos[row].nonzero()
        if len(hits):
            assert rollout.completion_mask[row, hits[0, 0] + 1 :].sum() == 0
            assert rollout.completion_mask[row, hits[0, 0]] == 1


def test_decoded_completions_keep_the_space_that_joins_them_to_the_prompt(tokenizer, small_task):
    prompt, completion = small_task.sft_examples[0]
    prompt_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False, return_tensors="pt")[
        "input_ids"
    ]
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    (text,) = decode_completions(tokenizer, ids, torch.ones_like(completion_ids))
    assert text == completion and text.startswith(" ")


def prompt_of_length(tokenizer, small_task, n_tokens: int) -> str:
    """A prompt of exactly ``n_tokens`` tokens, from the task's own words."""
    words = " ".join(small_task.train_prompts).split()
    prompt = " ".join(words[i % len(words)] for i in range(n_tokens))
    assert len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) == n_tokens
    return prompt


def test_prompt_longer_than_the_context_is_refused_before_generation(
    lora_policy, tokenizer, small_task, monkeypatch
):
    limit = lora_policy.config.max_position_embeddings
    module = ZOPrOModule(
        lora_policy, tokenizer, count_words_reward, rollout=RolloutSettings(k=2, max_new_tokens=8)
    )
    calls = []
    monkeypatch.setattr(lora_policy, "generate", lambda *a, **k: calls.append(1))
    too_long = prompt_of_length(tokenizer, small_task, limit - 4)  # + 8 new tokens > limit
    with pytest.raises(ValueError) as error:
        module.rollout([small_task.train_prompts[0], too_long])
    message = str(error.value)
    for part in (
        "1 of 2 prompts",
        f"longest prompt is {limit - 4} tokens",
        f"> {limit}",
        "max_position_embeddings",
        f"at most {limit - 8} tokens",
        "dataset.task.max_prompt_tokens",
        "policy.rollout.max_new_tokens",
    ):
        assert part in message, message
    assert not calls and module.policy_updates == 0  # nothing generated, nothing changed


def test_prompt_that_exactly_fills_the_context_is_generated(lora_policy, tokenizer, small_task):
    limit = lora_policy.config.max_position_embeddings
    module = ZOPrOModule(
        lora_policy, tokenizer, count_words_reward, rollout=RolloutSettings(k=2, max_new_tokens=4)
    )
    rollout = module.rollout([prompt_of_length(tokenizer, small_task, limit - 4)])
    assert rollout.prompt_length + rollout.completion_mask.shape[1] <= limit


def test_context_check_skips_models_without_a_position_limit():
    class NoLimit(torch.nn.Module):
        config = SimpleNamespace(hidden_size=8)  # no max_position_embeddings

    assert context_length(NoLimit()) is None
    check_context_length(NoLimit(), torch.ones(2, 10_000, dtype=torch.long), max_new_tokens=10)


def test_completion_logprobs_match_a_token_by_token_computation(lora_policy, tokenizer, small_task):
    """The sequence log-prob (LM head over the completion positions only) equals the sum of
    tempered token log-probs computed from the full logits, one position at a time."""
    from zopro_lightning.rl.rollout import completion_logprobs, position_ids_from_mask

    module = ZOPrOModule(
        lora_policy, tokenizer, count_words_reward, rollout=RolloutSettings(k=2, max_new_tokens=4)
    )
    rollout = module.rollout(small_task.train_prompts[:3])
    ids, mask, cmask = rollout.input_ids, rollout.attention_mask, rollout.completion_mask
    with torch.no_grad():
        fast = completion_logprobs(lora_policy, ids, mask, cmask, temperature=0.7)
        logits = lora_policy(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
        ).logits
    start = rollout.prompt_length
    expected = torch.zeros(len(rollout))
    for row in range(len(rollout)):
        for t in range(cmask.shape[1]):
            if cmask[row, t]:
                logp = torch.log_softmax(logits[row, start + t - 1] / 0.7, -1)
                expected[row] += logp[ids[row, start + t]]
    assert torch.allclose(fast, expected, atol=1e-4)


@pytest.mark.parametrize(
    ("option", "value", "valid"),
    [
        ("k", 1, "an integer >= 2 (RLOO's baseline)"),
        ("k", 2.0, "an integer >= 2 (RLOO's baseline)"),
        ("temperature", 0, "a finite number > 0"),
        ("max_new_tokens", 0, "an integer >= 1"),
        ("beta", -0.1, "a finite number >= 0"),
        ("missing_eos_penalty", float("inf"), "null or a finite number"),
        ("micro_batch_size", 0, "null or an integer >= 1"),
        ("normalize_advantages", "yes", "true or false"),
        ("clip_range", 0.0, "a finite number > 0"),
    ],
)
def test_rollout_settings_name_the_option_and_the_valid_range(option, value, valid):
    from zopro_lightning.rl.rollout import RolloutSettings

    with pytest.raises(ValueError) as error:
        RolloutSettings(**{option: value})
    assert str(error.value) == f"rollout.{option}={value!r}: must be {valid}"


def test_num_samples_overrides_k_for_generation(lora_policy, tokenizer, small_task):
    from zopro_lightning.rl.rollout import RolloutSettings, generate_completions

    ids, _, _, _ = generate_completions(
        lora_policy, tokenizer, small_task.eval_prompts[:2], RolloutSettings(k=3), num_samples=1
    )
    assert ids.shape[0] == 2
