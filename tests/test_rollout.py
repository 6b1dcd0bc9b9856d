import torch

from zopro_lightning.module import ZOPrOModule
from zopro_lightning.rollout import decode_completions

from .conftest import count_words_reward


def test_rollout_shapes_masks_and_zero_kl_at_the_reference(lora_policy, tokenizer, small_task):
    with torch.no_grad():  # LoRA B = 0: the policy is its reference, KL must be exactly 0
        for name, param in lora_policy.named_parameters():
            if "lora_B" in name:
                param.zero_()
    module = ZOPrOModule(lora_policy, tokenizer, count_words_reward, k=3, max_new_tokens=5)
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
