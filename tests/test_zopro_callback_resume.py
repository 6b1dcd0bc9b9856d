"""Stop and resume a plain ``Trainer.fit`` with :class:`ZOPrOIterations` anywhere: inside a
first-order iteration, inside a zeroth-order one, exactly at a boundary, after the last one.
A resume builds every object afresh, as a user's new process would, and must end with the
policy and reward-model weights of the fit that never stopped, bit for bit."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from zopro_lightning import ZOPrOModule
from zopro_lightning.callbacks.zopro import IterationSchedule, ZOPrOIterations
from zopro_lightning.data.resumable import ResumableDataLoader
from zopro_lightning.models.loading import add_lora, trainable_state
from zopro_lightning.policy.optimization import OptimizerSettings
from zopro_lightning.reward.callables import HFRewardModel
from zopro_lightning.reward.judges import RewardJudge
from zopro_lightning.reward.refinement import RefinementSettings, RewardRefinement
from zopro_lightning.rl.rollout import RolloutSettings
from zopro_lightning.zo.zopro_sampler import ZOPrOSampler

from .conftest import count_words_reward, tiny_lora_policy, tiny_reward_model

#: first-order iteration 0 (updates 1-2), zeroth-order iterations 1 (3-5) and 2 (6-8), whose
#: sampler decay falls linearly over the iteration (a resume must keep that horizon)
SCHEDULE = IterationSchedule(iterations=3, updates=3, first_order_updates=2)
UPDATES = SCHEDULE.total_updates + 1  # one update after the last boundary


pytestmark = pytest.mark.usefixtures("one_thread")  # bit-identity: one torch thread


def llama_models(tokenizer):
    """A tiny LoRA Llama policy and a tiny LoRA Llama classifier as ``HFRewardModel``."""
    return tiny_lora_policy(tokenizer), tiny_reward_model(tokenizer, seed=1)


def gpt2_models(tokenizer):
    """The issue's set-up in miniature: a GPT-2 policy and a GPT-2 classifier, each with LoRA
    on ``c_attn``, the classifier as ``HFRewardModel``."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=128,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, num_labels=1,
    )  # fmt: skip
    torch.manual_seed(0)
    policy = add_lora(GPT2LMHeadModel(config), r=4, alpha=8, target_modules=["c_attn"])
    classifier = add_lora(
        GPT2ForSequenceClassification(config), r=4, alpha=8, target_modules=["c_attn"],
        task_type="SEQ_CLS",
    )  # fmt: skip
    return policy, HFRewardModel(classifier, tokenizer, max_length=64)


def fresh_fit(tokenizer, prompts, root, callbacks=(), models=llama_models, **options):
    """Everything a user's script builds: policy and reward model (``models``), module,
    callback, Trainer (checkpointing after every update; ``options`` to the Trainer) and
    loader; returns ``(trainer, fit)``."""
    policy, reward = models(tokenizer)
    module = ZOPrOModule(
        policy,
        tokenizer,
        reward,
        ZOPrOSampler(),
        optimizer=OptimizerSettings(lr=1e-2),
        rollout=RolloutSettings(k=2, max_new_tokens=4),
        seed=3,
    )
    refinement = RewardRefinement(
        RewardJudge(count_words_reward), RefinementSettings(epochs=1, batch_size=4), seed=0
    )
    zopro = ZOPrOIterations(reward, refinement, SCHEDULE, seed=0)
    every_update = ModelCheckpoint(
        dirpath=root, filename="{step}", save_top_k=-1, every_n_train_steps=1
    )
    defaults = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    trainer = L.Trainer(
        max_steps=UPDATES,
        accelerator="cpu",
        default_root_dir=root,
        callbacks=[zopro, every_update, *callbacks],
        **(defaults | options),
    )
    loader = ResumableDataLoader(
        prompts, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0)
    )

    def fit(ckpt_path=None):
        trainer.fit(module, loader, ckpt_path=ckpt_path)
        return {"policy": trainable_state(module.policy), "reward": trainable_state(reward.model)}

    return trainer, fit


def uninterrupted_fit(tokenizer, prompts, root, models=llama_models):
    """The fit that never stopped: its final weights (a checkpoint after every update in
    ``root``, the one a fit stopped there would have written)."""
    trainer, fit = fresh_fit(tokenizer, prompts, root, models=models)
    weights = fit()
    assert trainer.global_step == UPDATES
    return weights


def assert_equal_weights(resumed, weights) -> None:
    for part in ("policy", "reward"):
        assert resumed[part].keys() == weights[part].keys()
        for name, tensor in weights[part].items():
            assert torch.equal(resumed[part][name], tensor), (part, name)


@pytest.fixture(scope="module")
def uninterrupted(tokenizer, small_task, tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    return uninterrupted_fit(tokenizer, small_task.train_prompts[:16], root), root


@pytest.mark.slow
@pytest.mark.parametrize(
    "update",
    [1, 3, 2, 5, 8],
    ids=["in-first-order", "in-zeroth-order", "at-boundary", "at-zeroth-order-boundary",
         "after-last-boundary"],  # fmt: skip
)
def test_resume_from_any_update_ends_bit_identical(
    tokenizer, small_task, tmp_path, uninterrupted, update
):
    weights, root = uninterrupted
    _, fit = fresh_fit(tokenizer, small_task.train_prompts[:16], tmp_path)
    assert_equal_weights(fit(ckpt_path=root / f"step={update}.ckpt"), weights)


@pytest.mark.slow
def test_the_reported_gpt2_set_up_resumes_inside_a_zeroth_order_iteration(
    tokenizer, small_task, tmp_path
):
    """GPT-2 policy and classifier with LoRA, stopped two updates into the first
    zeroth-order iteration (the report: "loaded state dict has a different number of
    parameter groups")."""
    prompts = small_task.train_prompts[:16]
    weights = uninterrupted_fit(tokenizer, prompts, tmp_path / "a", models=gpt2_models)
    _, fit = fresh_fit(tokenizer, prompts, tmp_path / "b", models=gpt2_models)
    assert_equal_weights(fit(ckpt_path=tmp_path / "a" / "step=4.ckpt"), weights)
