"""Tests for zopro_lightning.data.tasks: preference tasks from local files of each schema."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from zopro_lightning.data.tasks import PreferenceTask, build_preference_task
from zopro_lightning.models.tokenizer import build_word_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_jsonl(path: Path, rows: list[dict]) -> str:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return str(path)


def hh_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        words = " ".join(["word"] * (i % 7))  # prompts of 4 to 10 words
        prompt = f"\n\nHuman: question {i} {words}\n\nAssistant:"
        rows.append({"chosen": f"{prompt} a kind answer {i}", "rejected": f"{prompt} rude {i}"})
    return rows


def wmt_rows(n: int) -> list[dict]:
    return [
        {
            "segid": i,
            "translation": {"en": f"source sentence {i}", "de": f"Quellsatz {i}"},
            "scores": [50.0],
            "mean": 50.0,
            "z_scores": [0.1 * i],
            "z_mean": 0.1 * i - 1.0,
            "model_score": -0.5,
            "doc_id": "d",
        }
        for i in range(n)
    ]


def tldr_rows(n: int) -> list[dict]:
    return [
        {
            "info": {"post": f"post number {i}", "title": f"title {i}", "subreddit": "test"},
            "summaries": [
                {"text": f"{a} summary {i}"} for a in ("good", "bad")[:: 1 - 2 * (i % 2)]
            ],
            "choice": i % 2,  # the good one
        }
        for i in range(n)
    ]


@pytest.fixture
def hh_file(tmp_path) -> str:
    return write_jsonl(tmp_path / "hh.jsonl.gz", hh_rows(20))


def test_pairs_task_shape_and_text_conventions(hh_file):
    task = build_preference_task(hh_file, "hh_rlhf", eval_fraction=0.25, seed=0)
    assert isinstance(task, PreferenceTask)
    assert task.kind == "pairs" and task.task == "hh_rlhf"
    assert len(task.train_pairs) == 15 and len(task.eval_pairs) == 5
    assert task.train_scored == [] and task.eval_scored == []
    pair = task.train_pairs[0]
    assert pair["prompt"].endswith("\n\nAssistant:")
    assert pair["chosen"].startswith(" a kind answer")  # the continuation of the prompt
    assert task.sft_examples == [(p["prompt"], p["chosen"]) for p in task.train_pairs]
    assert task.n_filtered == 0
    corpus = task.corpus()
    assert pair["prompt"] in corpus and pair["rejected"] in corpus


def test_split_is_disjoint_and_reproducible(hh_file):
    a = build_preference_task(hh_file, "hh_rlhf", seed=3)
    b = build_preference_task(hh_file, "hh_rlhf", seed=3)
    c = build_preference_task(hh_file, "hh_rlhf", seed=4)
    assert a == b
    assert a.eval_prompts != c.eval_prompts
    assert not set(a.train_prompts) & set(a.eval_prompts)
    assert {p["prompt"] for p in a.eval_pairs} == set(a.eval_prompts)


def test_pairs_sharing_a_prompt_stay_on_one_side(tmp_path):
    rows = hh_rows(10) + hh_rows(10)  # every prompt twice
    task = build_preference_task(write_jsonl(tmp_path / "d.jsonl", rows), "hh_rlhf", seed=1)
    assert len(task.train_prompts) == 8 and len(task.eval_prompts) == 2
    assert len(task.eval_pairs) == 4
    assert not set(task.train_prompts) & {p["prompt"] for p in task.eval_pairs}


def test_max_prompt_tokens_drops_and_counts(hh_file):
    # without a tokenizer, the tiny model's word-tokenizer tokens are counted: prompts
    # "Human : question i word*k Assistant :" are 6 + (i % 7) tokens
    task = build_preference_task(hh_file, "hh_rlhf", max_prompt_tokens=8)
    expected = sum(1 for i in range(20) if 6 + i % 7 > 8)
    assert task.n_filtered == expected
    assert len(task.train_pairs) + len(task.eval_pairs) == 20 - expected


def test_length_without_a_tokenizer_is_the_word_tokenizers_count(hh_file):
    """The bound the config checks against the tiny model's context is in the tokens of the
    word tokenizer that model gets (punctuation marks are tokens of their own)."""
    task = build_preference_task(hh_file, "hh_rlhf", max_prompt_tokens=8)
    tokenizer = build_word_tokenizer(task.corpus())
    lengths = [len(tokenizer(p)["input_ids"]) for p in task.train_prompts + task.eval_prompts]
    assert max(lengths) == 8 and tokenizer.unk_token_id not in tokenizer(task.train_prompts[0])


def test_max_prompt_tokens_truncate_keeps_rows(hh_file):
    task = build_preference_task(
        hh_file, "hh_rlhf", max_prompt_tokens=8, prompt_length_mode="truncate"
    )
    assert task.n_filtered > 0
    assert len(task.train_pairs) + len(task.eval_pairs) == 20
    tokenizer = build_word_tokenizer(task.corpus())
    prompts = [p["prompt"] for p in task.train_pairs + task.eval_pairs]
    assert max(len(tokenizer(p)["input_ids"]) for p in prompts) == 8
    assert all(p.endswith("Assistant:") for p in task.train_prompts)


def test_prompt_length_counted_with_the_given_tokenizer(hh_file):
    from tests.conftest import whitespace_tokenizer

    tok = whitespace_tokenizer(["<pad>", "<s>", "</s>", "<unk>", "word"])
    task = build_preference_task(hh_file, "hh_rlhf", max_prompt_tokens=6, tokenizer=tok)
    assert task.n_filtered == sum(1 for i in range(20) if 4 + i % 7 > 6)


def test_all_filtered_error_is_clear(hh_file):
    with pytest.raises(ValueError, match="max_prompt_tokens") as err:
        build_preference_task(hh_file, "hh_rlhf", max_prompt_tokens=1)
    message = str(err.value)
    assert hh_file in message  # the dataset
    assert "20 rows read, all 20 filtered out" in message  # the counts
    assert "raise dataset.task.max_prompt_tokens" in message  # the fix
    assert "prompt_length_mode=truncate" in message


def test_empty_file_error_is_clear(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl.* is empty: 0 rows read.*Fix: set"):
        build_preference_task(str(empty), "hh_rlhf")


def test_too_few_prompts_to_split(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", hh_rows(1))
    with pytest.raises(ValueError, match="cannot be split"):
        build_preference_task(path, "hh_rlhf")


def test_bad_arguments_are_rejected(hh_file):
    with pytest.raises(ValueError, match="unknown preference task"):
        build_preference_task(hh_file, "jsonl_prompts")
    with pytest.raises(ValueError, match="eval_fraction"):
        build_preference_task(hh_file, "hh_rlhf", eval_fraction=0.0)
    with pytest.raises(ValueError, match="max_rows"):
        build_preference_task(hh_file, "hh_rlhf", max_rows=0)


def test_max_rows_and_n_sft(hh_file):
    task = build_preference_task(hh_file, "hh_rlhf", max_rows=10, n_sft=3)
    assert len(task.train_pairs) + len(task.eval_pairs) == 10
    assert len(task.sft_examples) == 3


def test_scores_task(tmp_path):
    path = write_jsonl(tmp_path / "wmt.jsonl", wmt_rows(20))
    task = build_preference_task(path, "wmt20_mlqe", eval_fraction=0.25, seed=0)
    assert task.kind == "scores"
    assert task.train_pairs == [] and task.eval_pairs == []
    assert len(task.train_scored) == 15 and len(task.eval_scored) == 5
    row = task.train_scored[0]
    assert row["prompt"].startswith("English: source sentence")
    assert row["prompt"].endswith("\nGerman:")
    assert row["completion"].startswith(" Quellsatz")
    assert isinstance(row["score"], float)
    # SFT: the better-scored half of the train rows
    assert len(task.sft_examples) == 8
    best = sorted(task.train_scored, key=lambda r: r["score"])[-8:]
    assert {c for _, c in task.sft_examples} == {r["completion"] for r in best}
    assert not set(task.train_prompts) & set(task.eval_prompts)
    assert row["completion"] in task.corpus()


def test_tldr_and_jsonl_tasks(tmp_path):
    tldr = build_preference_task(write_jsonl(tmp_path / "t.jsonl", tldr_rows(10)), "tldr")
    assert tldr.kind == "pairs"
    assert all(p["prompt"].endswith("Summary:") for p in tldr.train_pairs)
    assert all(p["chosen"].startswith(" good summary") for p in tldr.train_pairs)

    rows = [{"prompt": f"say {i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(10)]
    own = build_preference_task(write_jsonl(tmp_path / "p.jsonl", rows), "jsonl")
    assert all(p["chosen"].startswith(" yes") for p in own.train_pairs + own.eval_pairs)


def test_chat_template_formats_prompts(hh_file):
    from tests.conftest import whitespace_tokenizer

    template = (
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    tok = whitespace_tokenizer(["<pad>", "<s>", "</s>", "<unk>"], chat_template=template)
    task = build_preference_task(hh_file, "hh_rlhf", tokenizer=tok)
    pair = task.train_pairs[0]
    assert pair["prompt"].startswith("<user> question") and pair["prompt"].endswith("<assistant> ")
    assert pair["chosen"].startswith("a kind answer")  # prompt ends in a space: none added
    # the template-free text of every prompt, for an LLM judge
    readable = task.readable_prompts[pair["prompt"]]
    assert readable.startswith("\n\nHuman: question") and readable.endswith("\n\nAssistant:")
    assert set(task.readable_prompts) == set(task.train_prompts) | set(task.eval_prompts)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")
def test_shared_hh_sample():
    path = SHARED / "hh-rlhf-harmless-base-test.jsonl.gz"
    task = build_preference_task(str(path), "hh_rlhf", eval_fraction=0.2, seed=0)
    assert len(task.train_pairs) + len(task.eval_pairs) == 2312
    assert (
        abs(len(task.eval_prompts) / (len(task.train_prompts) + len(task.eval_prompts)) - 0.2)
        < 0.01
    )
