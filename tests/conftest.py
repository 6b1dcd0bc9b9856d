"""Shared fixtures: a tiny word-level tokenizer and a tiny LoRA Llama, built offline."""

from __future__ import annotations

import pytest
import torch

from zopro_lightning.data.sentiment import build_sentiment_task
from zopro_lightning.models.loading import add_lora, build_tiny_causal_lm
from zopro_lightning.models.tokenizer import build_word_tokenizer


@pytest.fixture
def one_thread():
    """torch on one thread inside the test (the bit-identity tests of resumes), as before
    after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def small_task():
    return build_sentiment_task(
        seed=0, n_train_prompts=32, n_eval_prompts=8, n_sft=64, n_train_pairs=32, n_eval_pairs=16
    )


@pytest.fixture(scope="session")
def tokenizer(small_task):
    return build_word_tokenizer(small_task.corpus())


def tiny_lora_policy(tokenizer):
    """A one-layer Llama with a LoRA adapter whose B starts non-zero (LoRA B starts at zero;
    a non-trivial start makes updates visible); the same weights at every call."""
    torch.manual_seed(0)
    model = build_tiny_causal_lm(
        tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64
    )
    policy = add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return policy


@pytest.fixture
def lora_policy(tokenizer):
    return tiny_lora_policy(tokenizer)


def tiny_reward_model(tokenizer, seed: int = 0, max_length: int = 64):
    """A one-layer Llama sequence classifier (one score) with a LoRA adapter, as
    :class:`HFRewardModel`; ``seed`` sets the score head's and adapter's start."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from zopro_lightning.reward.callables import HFRewardModel

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=1,
    )
    torch.manual_seed(seed)
    classifier = add_lora(LlamaForSequenceClassification(config), r=4, alpha=8, task_type="SEQ_CLS")
    return HFRewardModel(classifier, tokenizer, max_length=max_length)


def count_words_reward(prompts: list[str], completions: list[str]) -> torch.Tensor:
    """A user-written reward: how often the word 'great' appears."""
    return torch.tensor([c.split().count("great") for c in completions], dtype=torch.float32)


def whitespace_tokenizer(words: list[str], chat_template: str | None = None):
    """One token per whitespace-separated word of ``words`` (ids in list order; anything else
    is <unk>), with an optional chat template. ``words`` must hold <pad>, <s>, </s>, <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    fast.chat_template = chat_template
    return fast


def launch_two_ranks(worker, out) -> None:
    """Run a DDP worker script as a user would (Lightning's launcher starts rank 1 from it),
    with a clean distributed environment and one thread a rank; fail with its stderr.

    One launch, never retried: a crash is a failure, whatever its cause."""
    import os
    import subprocess
    import sys

    launcher_keys = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK")
    env = {k: v for k, v in os.environ.items() if k not in launcher_keys}
    env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out.mkdir(parents=True, exist_ok=True)
    run = subprocess.run(
        [sys.executable, str(worker), str(out)],
        cwd=worker.parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
