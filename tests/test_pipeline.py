"""Tests for zopro_lightning.run.pipeline's wiring: tokenizer before or after the task, reward-model
loss by the task's kind, judges from the ``judge`` group, bad datasets refused before training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from zopro_lightning.models.loading import build_tiny_causal_lm
from zopro_lightning.models.tokenizer import build_word_tokenizer
from zopro_lightning.reward.judges import FileJudge, LLMJudge, RewardJudge
from zopro_lightning.run.building import judge_counters
from zopro_lightning.run.evaluation import score_correlations
from zopro_lightning.run.phases import sft_examples_that_fit
from zopro_lightning.run.pipeline import Pipeline, run_pipeline
from zopro_lightning.run.summary import finite_or_null

CONF = Path(__file__).resolve().parents[1] / "conf"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|end|> ' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["~logger", *overrides])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def hh_rows(n: int, words: int = 2) -> list[dict]:
    rows = []
    for i in range(n):
        prompt = f"\n\nHuman: question {i} " + "word " * words + "\n\nAssistant:"
        rows.append({"chosen": f"{prompt} kind {i}", "rejected": f"{prompt} rude {i}"})
    return rows


@pytest.fixture
def hh_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "hh.jsonl", hh_rows(12))


@pytest.fixture
def chat_model_dir(tmp_path, hh_file) -> Path:
    """A tiny Llama and a word tokenizer with a chat template, saved like a hub checkpoint."""
    texts = [r[k] for r in hh_rows(12) for k in ("chosen", "rejected")]
    tokenizer = build_word_tokenizer(texts, extra_tokens=("<|user|>", "<|assistant|>", "<|end|>"))
    tokenizer.chat_template = CHAT_TEMPLATE
    model = build_tiny_causal_lm(
        tokenizer,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        intermediate_size=32,
        max_position_embeddings=512,
    )
    path = tmp_path / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --------------------------------------------------------------------------- tokenizer / task


def test_pretrained_tokenizer_is_built_first_and_formats_chat_prompts(
    tmp_path, hh_file, chat_model_dir
):
    cfg = config(
        "dataset=hh_rlhf",
        "judge=reward_model",
        f"dataset.task.name_or_path={hh_file}",
        f"model.name_or_path={chat_model_dir}",
        "model.dtype=float32",
    )
    pipeline = Pipeline(cfg, tmp_path / "run")
    assert pipeline.task.train_prompts[0].startswith("<|user|> question")
    assert pipeline.task.train_prompts[0].endswith("<|assistant|>")
    assert pipeline.tokenizer.chat_template == CHAT_TEMPLATE
    assert pipeline.reward_loss == "bradley_terry" and pipeline.eval_key == "policy_reward"
    assert "skipped" in pipeline.summary["gold_evaluation"]


def test_pass_tokenizer_false_keeps_raw_prompts(tmp_path, hh_file, chat_model_dir):
    cfg = config(
        "dataset=hh_rlhf",
        "judge=reward_model",
        f"dataset.task.name_or_path={hh_file}",
        f"model.name_or_path={chat_model_dir}",
        "dataset.pass_tokenizer=false",
    )
    pipeline = Pipeline(cfg, tmp_path / "run")
    assert pipeline.task.train_prompts[0].startswith("\n\nHuman:")


def test_tiny_model_builds_its_word_tokenizer_from_the_task(tmp_path, hh_file):
    cfg = config("dataset=hh_rlhf", "judge=llm", f"dataset.task.name_or_path={hh_file}")
    pipeline = Pipeline(cfg, tmp_path / "run")
    assert pipeline.task.train_prompts[0].startswith("\n\nHuman:")  # raw, words counted
    ids = pipeline.tokenizer("question kind rude")["input_ids"]
    assert pipeline.tokenizer.unk_token_id not in ids  # the vocabulary is the task's words


def test_embedded_task_keeps_gold_evaluation(tmp_path):
    cfg = config(
        "dataset.task.n_train_prompts=8",
        "dataset.task.n_eval_prompts=4",
        "dataset.task.n_sft=8",
        "dataset.task.n_train_pairs=8",
        "dataset.task.n_eval_pairs=4",
    )
    pipeline = Pipeline(cfg, tmp_path / "run")
    assert pipeline.eval_key == "gold_reward" and pipeline.judge_source == "gold"
    assert "gold_evaluation" not in pipeline.summary


def test_scores_task_trains_mse_and_refuses_bradley_terry(tmp_path):
    rows = [
        {"translation": {"en": f"house {i}", "de": f"Haus {i}"}, "z_mean": 0.1 * i}
        for i in range(10)
    ]
    data = write_jsonl(tmp_path / "wmt.jsonl", rows)
    cfg = config("dataset=wmt20_mlqe", "judge=llm", f"dataset.task.name_or_path={data}")
    assert Pipeline(cfg, tmp_path / "run").reward_loss == "mse"
    cfg = config(
        "dataset=wmt20_mlqe",
        "judge=llm",
        f"dataset.task.name_or_path={data}",
        "reward_model.loss=bradley_terry",
    )
    with pytest.raises(ValueError, match="reward_model.loss=mse"):
        Pipeline(cfg, tmp_path / "run")


def test_gold_judge_without_gold_reward_is_refused(tmp_path, hh_file):
    cfg = config("dataset=hh_rlhf", "judge=gold", f"dataset.task.name_or_path={hh_file}")
    with pytest.raises(ValueError, match="no gold_reward; use judge=llm"):
        Pipeline(cfg, tmp_path / "run")


# --------------------------------------------------------------------------- bad datasets


def test_all_filtered_dataset_fails_before_training(tmp_path):
    data = write_jsonl(tmp_path / "long.jsonl", hh_rows(6, words=40))
    cfg = config(
        "dataset=hh_rlhf",
        "judge=llm",
        f"dataset.task.name_or_path={data}",
        "dataset.task.max_prompt_tokens=5",
        "dataset.task.prompt_length_mode=drop",
    )
    run = tmp_path / "run"
    with pytest.raises(ValueError) as err:
        run_pipeline(cfg, run)
    message = str(err.value)
    assert str(data) in message and "6 rows read" in message and "all 6 filtered" in message
    assert "dataset.task.max_prompt_tokens" in message
    assert not (run / "sft").exists()  # nothing was trained


def test_dataset_missing_columns_names_them_and_the_found_ones(tmp_path):
    data = write_jsonl(tmp_path / "wrong.jsonl", [{"question": "q", "answer": "a"}] * 4)
    cfg = config("dataset=hh_rlhf", "judge=llm", f"dataset.task.name_or_path={data}")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['chosen', 'rejected'\]") as err:
        run_pipeline(cfg, tmp_path / "run")
    assert "found columns ['answer', 'question']" in str(err.value)


def test_empty_dataset_fails_with_its_name(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    cfg = config("dataset=jsonl", "judge=llm", f"dataset.task.name_or_path={data}")
    with pytest.raises(ValueError, match=r"empty\.jsonl.*is empty: 0 rows read.*name_or_path"):
        run_pipeline(cfg, tmp_path / "run")


# --------------------------------------------------------------------------- judges


class ConstantReward:
    def __call__(self, prompts, completions):
        return torch.tensor([float(len(c)) for c in completions])


def test_judge_configs_build_the_right_judges(tmp_path, hh_file, chat_model_dir):
    base = [f"dataset.task.name_or_path={hh_file}", "dataset=hh_rlhf"]
    reward = ConstantReward()
    pipeline = Pipeline(config(*base, "judge=reward_model"), tmp_path / "run")
    judge = pipeline.build_judge(reward)
    assert isinstance(judge, RewardJudge) and judge.reward_fn is reward
    assert judge(["p"], ["longer"], ["short"]).tolist() == [1.0]

    labels = write_jsonl(
        tmp_path / "labels.jsonl", [{"prompt": "p", "first": "x", "second": "y", "label": 1}]
    )
    pipeline = Pipeline(config(*base, "judge=file", f"judge.judge.path={labels}"), tmp_path / "r")
    judge = pipeline.build_judge(reward)
    assert isinstance(judge, FileJudge)
    judge(["p", "q"], ["x", "x"], ["y", "y"])
    assert judge_counters(judge) == {"judge_missing": 1}

    pipeline = Pipeline(
        config(
            *base,
            "judge=llm",
            f"judge.judge.name_or_path={chat_model_dir}",
            "judge.judge.dtype=float32",
            "judge.judge.device=cpu",
        ),
        tmp_path / "r2",
    )
    judge = pipeline.build_judge(reward)
    assert isinstance(judge, LLMJudge) and judge.model.dtype == torch.float32
    judge(["p"], ["x"], ["y"])
    counters = judge_counters(judge)
    assert counters["judge_queries"] == 2 and set(counters) == {
        "judge_queries",
        "judge_unparseable",
        "judge_inconsistent",
        "judge_identical",
    }


def test_llm_judge_is_shown_prompts_without_the_chat_template():
    from zopro_lightning.reward.refinement import ReadablePromptJudge

    seen = []

    def judge(prompts, first, second):
        seen.extend(prompts)
        return torch.ones(len(prompts))

    wrapped = ReadablePromptJudge(judge, {"<|user|> hi <|assistant|>": "\n\nHuman: hi"})
    wrapped(["<|user|> hi <|assistant|>", "unknown"], ["a", "b"], ["c", "d"])
    assert seen == ["\n\nHuman: hi", "unknown"]
    assert config("judge=llm").judge.readable_prompts is True
    assert not config("judge=reward_model").judge.get("readable_prompts")


# --------------------------------------------------------------------------- helpers


def test_score_correlations():
    rows = [{"prompt": "p", "completion": "x" * i, "score": float(i)} for i in range(1, 6)]
    result = score_correlations(ConstantReward(), rows)
    assert result["pearson"] == pytest.approx(1.0) and result["spearman"] == pytest.approx(1.0)
    flat = [{**row, "score": 1.0} for row in rows]
    assert math.isnan(score_correlations(ConstantReward(), flat)["pearson"])
    assert math.isnan(score_correlations(ConstantReward(), rows[:1])["spearman"])


def test_finite_or_null_and_sft_examples_that_fit():
    assert finite_or_null({"a": math.nan, "b": [1.0, math.inf], "c": "x"}) == {
        "a": None,
        "b": [1.0, None],
        "c": "x",
    }
    tokenizer = build_word_tokenizer(["a b c d e f"])
    examples = [("a b", "c"), ("a b c d e f", "a")]
    assert sft_examples_that_fit(examples, tokenizer, max_length=5) == [("a b", "c")]
    with pytest.raises(ValueError, match="raise sft.max_length"):
        sft_examples_that_fit(examples[1:], tokenizer, max_length=5)
