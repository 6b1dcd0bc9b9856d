"""zopro_lightning.run.config_schema: every bad option of a composed config is named, with its value
and what is valid, before any work; the shipped configs pass, and their prompt lengths fit the
context and the SFT length."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import zopro_lightning.run.pipeline
from zopro_lightning.models.loading import build_tiny_causal_lm
from zopro_lightning.models.tokenizer import build_word_tokenizer
from zopro_lightning.run.config_schema import RULES, ConfigError, Rule, validate_config
from zopro_lightning.run.phases import sft_examples_that_fit
from zopro_lightning.run.pipeline import run_pipeline

CONF = Path(__file__).resolve().parents[1] / "conf"
SHARED_HH = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / ("hh-rlhf-harmless-base-test.jsonl.gz")
)
EXPERIMENTS = ("hh_rlhf_llama3_2_1b", "tldr_llama3_2_1b", "wmt20_llama3_2_1b")


def config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["~logger", *overrides])


def problems(*overrides: str) -> list[str]:
    try:
        validate_config(config(*overrides))
    except ConfigError as error:
        return error.problems
    return []


@pytest.fixture
def no_training(monkeypatch):
    """``run_pipeline`` may not get as far as building the pipeline."""

    def trained(*args, **kwargs):
        raise AssertionError("the pipeline was built: validation came too late")

    monkeypatch.setattr(zopro_lightning.run.pipeline, "Pipeline", trained)


# (override, text the message must hold: option and bad value, then what is valid)
BAD_VALUES = [
    ("policy.spsa.eps=-1e-3", "policy.spsa.eps=-0.001: out of range", "a finite number > 0"),
    ("policy.spsa.eps=0", "policy.spsa.eps=0: out of range", "a finite number > 0"),
    ("loop.first_order_lr=0", "loop.first_order_lr=0: out of range", "> 0"),
    ("loop.zeroth_order_lr=nan", "loop.zeroth_order_lr=nan: not finite", "> 0"),
    ("loop.refine.lr=-1", "loop.refine.lr=-1: out of range", "> 0"),
    ("sft.lr=inf", "sft.lr=inf: not finite", "a finite number > 0"),
    ("reward_model.lr=0", "reward_model.lr=0: out of range", "> 0"),
    ("policy.rollout.k=1", "policy.rollout.k=1: out of range", "an integer >= 2"),
    ("policy.rollout.temperature=0", "policy.rollout.temperature=0: out of range", "> 0"),
    ("loop.batch_size=0", "loop.batch_size=0: out of range", "an integer >= 1"),
    ("loop.batch_size=2.5", "loop.batch_size=2.5: not an integer", "an integer >= 1"),
    ("loop.steps_per_iteration=-2", "loop.steps_per_iteration=-2: out of range", ">= 1"),
    ("loop.iterations=0", "loop.iterations=0: out of range", "an integer >= 1"),
    ("loop.iterations=abc", "loop.iterations='abc': not an integer", "an integer >= 1"),
    ("policy.spsa.num_perturbations=0", "policy.spsa.num_perturbations=0: out of range", ">= 1"),
    ("policy.rollout.clip_range=0", "policy.rollout.clip_range=0: out of range", "> 0"),
    ("policy.rollout.beta=-0.1", "policy.rollout.beta=-0.1: out of range", "a finite number >= 0"),
    ("policy.spsa.eps=small", "policy.spsa.eps='small': not a number", "a finite number > 0"),
    ("sft.max_length=1", "sft.max_length=1: out of range", "null or an integer >= 2"),
    ("reward_model.warmup_fraction=1", "reward_model.warmup_fraction=1: out of range", "[0, 1)"),
    ("++loop.schedule=sideways", "loop.schedule='sideways': not a known choice", "zeroth_order"),
    ("policy.spsa.steps_per_update=0", "policy.spsa.steps_per_update=0: out of range", ">= 1"),
    ("sampler.direction=sideways", "sampler.direction='sideways': not a known choice", "gradient"),
    ("sampler.sampler.smoothing=1", "sampler.sampler.smoothing=1: out of range", "[0, 1)"),
    ("policy.spsa.rule=lbfgs", "policy.spsa.rule='lbfgs': not a known choice", "momentum, adam"),
    ("sft.lora=full", "sft.lora='full': not a boolean", "true or false"),
]


@pytest.mark.parametrize(("override", "named", "valid"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_value_is_named_with_its_valid_range_before_any_work(
    override, named, valid, tmp_path, no_training
):
    run = tmp_path / "run"
    with pytest.raises(ConfigError) as error:
        run_pipeline(config(override), run)
    (problem,) = error.value.problems
    assert problem.startswith(named) and valid in problem.split("valid:")[1], problem
    assert "nothing was run" in str(error.value)
    assert not run.exists()  # nothing created, nothing trained


def test_every_problem_is_listed_at_once():
    bad = ["policy.rollout.k=1", "loop.iterations=0", "sft.lr=-1"]
    assert [p.split(":")[0] for p in problems(*bad)] == bad


def test_unknown_and_new_keys_are_tolerated():
    assert problems("++loop.schedule=zeroth_order", "++loop.zeroth_order_steps_per_batch=2") == []
    assert (
        problems("++loop.zeroth_order_optimizer=adam", "++sampler.lr=null", "++sampler.eps=0.01")
        == []
    )
    assert problems("++loop.not_known_here=abc", "++policy.something_new=-1") == []
    assert problems("++loop.first_order_first=false") == []  # the option loop.schedule replaces


def test_rule_ranges_read_as_words():
    assert Rule("x", float, gt=0, lt=1).valid() == "a finite number in (0, 1)"
    assert Rule("x", int, ge=1, nullable=True).valid() == "null or an integer >= 1"
    assert {rule.key for rule in RULES} >= {
        "policy.spsa.eps",
        "loop.first_order_lr",
        "loop.zeroth_order_lr",
        "loop.refine.lr",
        "sft.lr",
        "reward_model.lr",
        "policy.rollout.k",
        "policy.rollout.temperature",
        "loop.batch_size",
        "loop.steps_per_iteration",
        "loop.iterations",
        "policy.spsa.num_perturbations",
        "policy.rollout.clip_range",
        "policy.rollout.beta",
    }


# --------------------------------------------------------------------------- paths


def save_tiny_model(path: Path, tokenizer_too: bool = True, context: int = 128) -> Path:
    tokenizer = build_word_tokenizer(["hello world"])
    model = build_tiny_causal_lm(
        tokenizer, hidden_size=8, num_layers=1, num_heads=2, max_position_embeddings=context
    )
    model.save_pretrained(path)
    if tokenizer_too:
        tokenizer.save_pretrained(path)
    return path


def test_missing_model_directory_is_named(tmp_path, no_training):
    path = tmp_path / "models" / "llama"
    with pytest.raises(ConfigError) as error:
        run_pipeline(config(f"model.name_or_path={path}"), tmp_path / "run")
    (problem,) = error.value.problems
    assert problem.startswith(f"model.name_or_path={path}: no such directory")
    assert "hub repo id" in problem


def test_model_directory_without_tokenizer_is_named(tmp_path):
    path = save_tiny_model(tmp_path / "model", tokenizer_too=False)
    (problem,) = problems(f"model.name_or_path={path}")
    assert "the model directory has no tokenizer" in problem and "model.tokenizer=" in problem
    tokenizer_dir = save_tiny_model(tmp_path / "with_tokenizer")
    assert problems(f"model.name_or_path={path}", f"model.tokenizer={tokenizer_dir}") == []


def test_directory_without_config_json_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    (problem,) = problems(f"model.name_or_path={tmp_path / 'empty'}")
    assert "has no config.json" in problem


def test_hub_ids_are_not_checked_offline():
    assert problems("model.name_or_path=meta-llama/Llama-3.2-1B") == []


def test_missing_judge_file_is_named(tmp_path):
    labels = tmp_path / "labels.jsonl"
    (problem,) = problems("judge=file", f"judge.judge.path={labels}")
    assert problem.startswith(f"judge.judge.path={labels}: no such file")
    labels.write_text("")
    assert problems("judge=file", f"judge.judge.path={labels}") == []


def test_judge_file_left_unset_is_required():
    (problem,) = problems("judge=file")
    assert problem.startswith("judge.judge.path is required") and "judge.judge.path=" in problem


def test_missing_dataset_file_is_named(tmp_path):
    data = tmp_path / "pairs.jsonl"
    (problem,) = problems("dataset=jsonl", "judge=llm", f"dataset.task.name_or_path={data}")
    assert problem.startswith(f"dataset.task.name_or_path={data}: no such file")


def test_dataset_file_of_unknown_type_is_named(tmp_path):
    data = tmp_path / "pairs.csv"
    data.write_text("prompt,chosen,rejected\n")
    (problem,) = problems("dataset=jsonl", "judge=llm", f"dataset.task.name_or_path={data}")
    assert "not a file type the loaders read" in problem and ".jsonl.gz" in problem


def test_local_llm_judge_directory_is_checked(tmp_path):
    path = tmp_path / "judge"
    (problem,) = problems("judge=llm", "dataset=hh_rlhf", f"judge.judge.name_or_path={path}")
    assert problem.startswith(f"judge.judge.name_or_path={path}: no such directory")


def test_gold_judge_without_gold_reward_is_refused_first():
    (problem,) = problems("dataset=hh_rlhf")
    assert "judge=gold compares gold rewards" in problem and "judge=llm" in problem


# --------------------------------------------------------------------------- lengths (defaults)


@pytest.mark.parametrize("dataset", ["hh_rlhf", "tldr", "wmt20_mlqe"])
def test_shipped_dataset_configs_fit_the_default_tiny_model(dataset):
    assert problems(f"dataset={dataset}", "judge=llm") == []


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_published_experiments_pass(experiment):
    assert problems(f"experiment={experiment}") == []
    cfg = config(f"experiment={experiment}")
    prompt, new = cfg.dataset.task.max_prompt_tokens, cfg.policy.rollout.max_new_tokens
    assert prompt + new <= cfg.sft.max_length and prompt + new <= cfg.reward_model.max_length


def test_prompt_bound_over_the_context_is_refused():
    found = problems("dataset=hh_rlhf", "judge=llm", "dataset.task.max_prompt_tokens=256")
    assert len(found) == 2
    assert found[0].startswith(
        "dataset.task.max_prompt_tokens=256 + policy.rollout.max_new_tokens=16 = 272 tokens do "
        "not fit the policy's context of 128 tokens (model.tiny.max_position_embeddings)"
    )
    assert "dataset.task.max_prompt_tokens <= 112" in found[0]
    assert "exceed sft.max_length=128" in found[1] and "sft.max_length >= 272" in found[1]


def test_context_of_a_local_model_comes_from_its_config(tmp_path):
    path = save_tiny_model(tmp_path / "model", context=64)
    found = problems(f"model.name_or_path={path}", "dataset=hh_rlhf", "judge=llm")
    assert any(f"context of 64 tokens ({path}/config.json)" in p for p in found), found
    assert any(p.startswith("sft.max_length=128 is longer than") for p in found), found


def test_sft_length_over_the_tiny_context_is_refused():
    (problem,) = problems("sft.max_length=256")
    assert problem.startswith("sft.max_length=256 is longer than the policy's context of 128")


def test_default_hh_setup_keeps_every_sft_example():
    """``dataset=hh_rlhf`` with the default tiny model, on the real HH sample when present:
    every prompt fits the 128-token context with its 16 new tokens, and SFT keeps every
    example (the bound is counted in the word tokenizer's tokens the tiny model gets)."""
    if not SHARED_HH.is_file():
        pytest.skip("../shared/data is absent")
    cfg = config(
        "dataset=hh_rlhf", "judge=llm", f"dataset.task.name_or_path={SHARED_HH}",
        "dataset.task.split=test", "dataset.task.max_rows=400",
    )  # fmt: skip
    task = instantiate(cfg.dataset.task)
    tokenizer = build_word_tokenizer(task.corpus())
    longest = max(len(tokenizer(p)["input_ids"]) for p in task.train_prompts + task.eval_prompts)
    assert longest <= cfg.dataset.task.max_prompt_tokens
    assert longest + cfg.policy.rollout.max_new_tokens <= cfg.model.tiny.max_position_embeddings
    kept = sft_examples_that_fit(task.sft_examples, tokenizer, cfg.sft.max_length)
    assert len(kept) == len(task.sft_examples) > 0


def test_zopro_train_refuses_fsdp_before_any_work(tmp_path, no_training):
    """``trainer=fsdp`` is for ZOPrOModule in a user's Trainer (tests/test_fsdp.py); the
    pipeline, which saves whole models between phases, refuses it and names the way."""
    run = tmp_path / "run"
    with pytest.raises(ConfigError) as error:
        run_pipeline(config("trainer=fsdp", "trainer.accelerator=cpu"), run)
    (problem,) = error.value.problems
    assert problem.startswith("trainer=fsdp") and "trainer=ddp" in problem.split("valid:")[1]
    assert not run.exists()
    assert not problems("trainer=ddp")  # a plain strategy string is no problem


def test_a_gradient_spanned_subspace_without_a_first_order_phase_is_refused():
    """``basis=gradients`` spans the first-order phase's gradients: a fully zeroth-order
    schedule has none, which is named before any work; the published schedule is fine."""
    subspace = ("sampler=subspace", "sampler.sampler.basis=gradients")
    (problem,) = problems(*subspace, "loop.schedule=zeroth_order")
    assert problem.startswith("sampler.sampler.basis=gradients")
    assert "loop.schedule=first_order_then_zeroth_order" in problem.split("valid:")[1]
    assert not problems(*subspace, "loop.schedule=first_order_then_zeroth_order")
