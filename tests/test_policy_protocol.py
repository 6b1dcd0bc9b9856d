"""PolicyLearner: the written contract of what the callbacks read of their LightningModule
(zopro_lightning/policy/protocol.py); a ZOPrOModule satisfies it, other modules are refused by
name or get the documented fallbacks."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import lightning as L
import pytest
from torch import nn

from zopro_lightning import ZOPrOModule
from zopro_lightning.callbacks.completion_table import CompletionTable
from zopro_lightning.callbacks.interplay import InterplaySnapshots, UpdateCosines
from zopro_lightning.callbacks.rollout_recorder import RolloutRecorder
from zopro_lightning.callbacks.zopro import IterationSchedule, ZOPrOIterations
from zopro_lightning.policy.optimization import OptimizerSettings
from zopro_lightning.policy.protocol import (
    MEMBERS,
    PolicyLearner,
    as_policy_learner,
    ends_with_update,
    learner_or_none,
    missing_members,
    optimizer_name,
    planned_updates,
    policy_of,
    updates_of,
)
from zopro_lightning.rl.rollout import RolloutSettings

from .conftest import count_words_reward


class MyModule(L.LightningModule):
    """A LightningModule of one's own, with none of the members."""


def zopro_module(policy, tokenizer, accumulate_batches: int = 1) -> ZOPrOModule:
    return ZOPrOModule(
        policy,
        tokenizer,
        count_words_reward,
        optimizer=OptimizerSettings(accumulate_batches=accumulate_batches),
        rollout=RolloutSettings(k=2, max_new_tokens=3),
    )


def test_a_zopro_module_is_a_policy_learner(lora_policy, tokenizer):
    module = zopro_module(lora_policy, tokenizer)
    assert isinstance(module, PolicyLearner)
    assert missing_members(module) == []
    assert as_policy_learner(module, "test") is module
    # the policy is a submodule, which inspect.getattr_static (the stock protocol check from
    # Python 3.12) does not see: the protocol checks with hasattr
    with pytest.raises(AttributeError):
        inspect.getattr_static(module, "policy")
    assert module.hparams.k == 2 and module.hparams.optimizer == "zeroth_order"


def test_the_members_are_the_protocols():
    declared = set(PolicyLearner.__annotations__) | {
        name
        for name, value in vars(PolicyLearner).items()
        if not name.startswith("_") and (callable(value) or isinstance(value, property))
    }
    assert {member.partition(".")[0] for member in MEMBERS} == declared
    assert [m for m in MEMBERS if m.startswith("hparams.")] == ["hparams.k", "hparams.optimizer"]
    for name in declared - set(PolicyLearner.__annotations__):  # methods and properties
        assert inspect.getdoc(getattr(PolicyLearner, name)), name


def test_other_modules_are_refused_naming_the_callback_and_what_they_lack():
    module = MyModule()
    assert not isinstance(module, PolicyLearner)
    assert missing_members(module) == list(MEMBERS)
    with pytest.raises(
        TypeError,
        match=r"RolloutRecorder needs a LightningModule with last_rollout, hparams\.k \(a "
        r"ZOPrOModule has them.*\); MyModule lacks: last_rollout, hparams\.k$",
    ):
        RolloutRecorder().on_train_batch_end(SimpleNamespace(), module, None, None, 0)
    module.last_rollout = None
    with pytest.raises(TypeError, match=r"MyModule lacks: hparams\.k$"):
        RolloutRecorder().on_train_batch_end(SimpleNamespace(), module, None, None, 0)
    module.hparams["k"] = 2
    recorder = RolloutRecorder()
    recorder.on_train_batch_end(SimpleNamespace(), module, None, None, 0)  # no rollout yet
    assert recorder.records == []

    zopro = ZOPrOIterations(object(), lambda *a: {}, IterationSchedule(iterations=2, updates=1))
    with pytest.raises(
        TypeError,
        match=r"ZOPrOIterations needs .*; MyModule lacks: policy, policy_updates, sampler, "
        r"iteration, phase, phase_horizon, set_optimizer, optimizer_direction$",
    ):
        zopro.setup(SimpleNamespace(), module, "fit")
    zopro.setup(SimpleNamespace(), module, "validate")  # reads nothing of the module


def test_callbacks_that_skip_other_modules_read_nothing_of_them():
    module, trainer = MyModule(), SimpleNamespace()  # any attribute read would raise
    CompletionTable(every_n_updates=1).on_train_batch_end(trainer, module, None, None, 0)
    cosines = UpdateCosines()
    cosines.on_train_batch_start(trainer, module, None, 0)
    cosines.on_train_batch_end(trainer, module, None, None, 0)
    assert learner_or_none(module, CompletionTable.needs) is None
    assert learner_or_none(module, UpdateCosines.needs) is None


def test_the_documented_fallbacks(lora_policy, tokenizer):
    learner = zopro_module(lora_policy, tokenizer, accumulate_batches=2)
    learner.policy_updates = 5
    plain = MyModule()
    trainer = SimpleNamespace(global_step=2, max_steps=7, estimated_stepping_batches=9)
    assert updates_of(learner, trainer) == 5 and updates_of(plain, trainer) == 2
    assert planned_updates(plain, trainer) == 7
    assert planned_updates(plain, SimpleNamespace(max_steps=-1, estimated_stepping_batches=9)) == 9
    assert planned_updates(SimpleNamespace(total_policy_updates=lambda: 0), trainer) == 1
    assert policy_of(learner) is lora_policy and policy_of(plain) is plain
    assert ends_with_update(learner) is False  # the first of two accumulated batches
    assert ends_with_update(plain) is True
    assert learner_or_none(learner) is learner
    assert optimizer_name(learner) == "zeroth_order"
    learner.set_optimizer("first_order")
    assert optimizer_name(learner) == "first_order"
    assert optimizer_name(plain) is None and optimizer_name(nn.Linear(1, 1)) is None


def test_snapshots_want_a_policy_network(tmp_path):
    trainer = SimpleNamespace(is_global_zero=False, max_steps=2, global_step=0)
    with pytest.raises(TypeError, match=r"InterplaySnapshots needs .*; MyModule lacks: policy$"):
        InterplaySnapshots(tmp_path).on_train_start(trainer, MyModule())
    with pytest.raises(TypeError, match=r"\.policy is a str"):
        InterplaySnapshots(tmp_path).on_train_start(trainer, SimpleNamespace(policy="gpt"))
