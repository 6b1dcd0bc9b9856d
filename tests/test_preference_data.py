"""Loading, prompt rendering, length filtering and splitting of preference data."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import datasets
import pytest
from transformers import PreTrainedTokenizerFast

from zopro_lightning.data.preference import (
    filter_by_prompt_length,
    format_prompt,
    load_preference_dataset,
    train_eval_split,
)
from zopro_lightning.data.registry import DATASETS

from .conftest import whitespace_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def word_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word (unknown words map to <unk>)."""
    words = [
        "<pad>",
        "<s>",
        "</s>",
        "<unk>",
        "Human:",
        "Assistant:",
        "<|user|>",
        "<|assistant|>",
        "<|system|>",
    ]
    return whitespace_tokenizer(words, chat_template)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


PAIRS = [
    {"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": "Bad."}
    for i in range(5)
]
HH_PROMPT = "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: name a colour\n\nAssistant:"


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.jsonl.gz"])
def test_load_local_jsonl_pairs(tmp_path, name):
    path = write_jsonl(tmp_path / name, PAIRS)
    records = load_preference_dataset(str(path), "jsonl")
    assert records == [
        {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": "Bad."} for r in PAIRS
    ]


def test_load_local_json_and_parquet_and_split_slices(tmp_path):
    json_path = tmp_path / "prompts.json"
    json_path.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}]), encoding="utf-8")
    assert load_preference_dataset(str(json_path), "jsonl_prompts", split="test") == [
        {"prompt": "a"},
        {"prompt": "b"},
    ]
    parquet_path = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list(PAIRS).to_parquet(str(parquet_path))
    records = load_preference_dataset(str(parquet_path), "jsonl", split="train[:2]")
    assert [r["prompt"] for r in records] == ["Question 0?", "Question 1?"]


def test_load_local_chat_message_pairs(tmp_path):
    rows = [
        {
            "prompt": [{"role": "user", "content": "Capital of France?"}],
            "chosen": [{"role": "assistant", "content": "Paris."}],
            "rejected": [{"role": "assistant", "content": "Rome."}],
        }
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    (record,) = load_preference_dataset(str(path), "jsonl")
    assert record == {"prompt": rows[0]["prompt"], "chosen": "Paris.", "rejected": "Rome."}


def test_malformed_row_names_row_and_column(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [PAIRS[0], {"prompt": "p", "chosen": "c"}])
    where = r"bad.jsonl \(split 'train'\), line 2 \(row 1\): .*'rejected'"
    with pytest.raises(ValueError, match=where):
        load_preference_dataset(str(path), "jsonl")


@pytest.mark.parametrize(
    "task, rows, missing",
    [
        ("hh_rlhf", [{"prompt": "p", "answer": "a"}], "['chosen', 'rejected']"),
        ("tldr", [{"info": {"post": "p"}, "summaries": []}], "['choice']"),
        ("wmt20_mlqe", [{"translation": {"en": "a", "de": "b"}, "mean": 1.0}], "['z_mean']"),
        ("jsonl_prompts", [{"text": "t"}], "['prompt']"),
    ],
)
def test_missing_columns_are_named_with_the_found_ones(tmp_path, task, rows, missing):
    path = write_jsonl(tmp_path / "wrong.jsonl", rows)
    with pytest.raises(ValueError) as err:
        load_preference_dataset(str(path), task)  # type: ignore[arg-type]
    message = str(err.value)
    assert f"missing column(s) {missing}" in message and str(path) in message
    assert f"found columns {sorted(rows[0])}" in message


def test_empty_missing_and_unknown_inputs(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_preference_dataset(str(empty), "jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_preference_dataset(str(tmp_path / "nope.jsonl"), "jsonl")
    with pytest.raises(ValueError, match="unknown task 'summaries'.*hh_rlhf"):
        load_preference_dataset(str(empty), "summaries")  # type: ignore[arg-type]


def test_hub_names_go_through_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None, data_dir=None, **kwargs):
        calls.append((path, name, split, data_dir))
        return [
            {
                "info": {"post": "p", "title": "t", "subreddit": "s"},
                "summaries": [{"text": "x"}, {"text": "y"}],
                "choice": 1,
            }
        ]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = load_preference_dataset("openai/summarize_from_feedback", "tldr", "validation")
    assert calls == [("openai/summarize_from_feedback", "comparisons", "validation", None)]
    assert records[0]["chosen"] == "y"


def test_hub_failure_says_to_use_a_local_file(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(OSError, match="local .jsonl"):
        load_preference_dataset("Anthropic/hh-rlhf", "hh_rlhf", data_dir="harmless-base")


def test_load_real_shared_files():
    hh = SHARED_DATA / "hh-rlhf-harmless-base-test.jsonl.gz"
    wmt = SHARED_DATA / "wmt20-mlqe-en-de-train.jsonl.gz"
    if not (hh.is_file() and wmt.is_file()):
        pytest.skip(f"shared data is absent from {SHARED_DATA}")
    records = load_preference_dataset(str(hh), "hh_rlhf", split="test")
    assert len(records) == 2312
    assert all(r["prompt"].endswith("\n\nAssistant:") and r["rejected"] for r in records)
    scored = load_preference_dataset(str(wmt), "wmt20_mlqe")
    assert len(scored) == 7000 and all(math.isfinite(r["score"]) for r in scored)
    assert format_prompt(scored[0], "wmt20_mlqe").startswith("English: ")


# --------------------------------------------------------------------------- formatting


def test_format_chat_without_template_is_raw_hh_text():
    assert format_prompt({"prompt": HH_PROMPT}, "hh_rlhf") == HH_PROMPT
    assert format_prompt({"prompt": HH_PROMPT}, "hh_rlhf", word_tokenizer()) == HH_PROMPT
    messages = [{"role": "user", "content": "hi"}]
    assert format_prompt({"prompt": messages}, "jsonl") == "\n\nHuman: hi\n\nAssistant:"


def test_format_chat_with_template():
    tok = word_tokenizer(CHAT_TEMPLATE)
    text = format_prompt({"prompt": HH_PROMPT}, "hh_rlhf", tok)
    assert text == ("<|user|> hi there <|assistant|> hello <|user|> name a colour <|assistant|> ")
    plain = format_prompt({"prompt": "Write a poem."}, "jsonl_prompts", tok)
    assert plain == "<|user|> Write a poem. <|assistant|> "


def test_format_summary_and_translation():
    record = {"prompt": "SUBREDDIT: r/cats\nTITLE: Help\nPOST: My cat sneezes."}
    assert format_prompt(record, "tldr") == (
        "SUBREDDIT: r/cats\nTITLE: Help\nPOST: My cat sneezes.\n\nSummary:"
    )
    scored = {"prompt": "The cat sleeps.", "completion": "Die Katze schläft.", "score": 0.3}
    assert format_prompt(scored, "wmt20_mlqe") == "English: The cat sleeps.\nGerman:"


# --------------------------------------------------------------------------- length


def test_filter_drop_counts_and_keeps_order():
    tok = word_tokenizer()
    records = [{"prompt": "one two"}, {"prompt": "one two three four five"}, {"prompt": "x"}]
    kept, n = filter_by_prompt_length(records, tok, max_prompt_tokens=3)
    assert kept == [records[0], records[2]] and n == 1


def test_filter_truncate_keeps_the_end():
    tok = word_tokenizer()
    records = [{"prompt": "w1 w2 w3 w4 w5 w6", "chosen": "c", "rejected": "r"}]
    kept, n = filter_by_prompt_length(records, tok, max_prompt_tokens=4, mode="truncate")
    assert n == 1 and kept[0]["prompt"] == "w3 w4 w5 w6"
    assert kept[0]["chosen"] == "c" and records[0]["prompt"] == "w1 w2 w3 w4 w5 w6"


def test_filter_counts_the_rendered_prompt_when_task_is_given():
    tok = word_tokenizer(CHAT_TEMPLATE)
    record = {"prompt": HH_PROMPT}
    # Rendered: <|user|> hi there <|assistant|> hello <|user|> name a colour <|assistant|>
    assert filter_by_prompt_length([record], tok, 10, task="hh_rlhf") == ([record], 0)
    kept, n = filter_by_prompt_length([record], tok, 6, mode="truncate", task="hh_rlhf")
    assert n == 1
    rendered = format_prompt(kept[0], "hh_rlhf", tok)
    assert len(tok(rendered, add_special_tokens=False)["input_ids"]) <= 6
    assert rendered.endswith("name a colour <|assistant|> ")


def test_filter_truncates_message_lists_from_the_front():
    tok = word_tokenizer()
    messages = [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "a b c d e f"},
        {"role": "assistant", "content": "g h"},
        {"role": "user", "content": "last question here"},
    ]
    kept, n = filter_by_prompt_length([{"prompt": messages}], tok, 9, mode="truncate")
    assert n == 1
    assert kept[0]["prompt"] == [messages[0], messages[3]]


def test_filter_errors_say_what_to_change():
    tok = word_tokenizer()
    with pytest.raises(ValueError, match="no records"):
        filter_by_prompt_length([], tok, 8)
    with pytest.raises(ValueError, match="raise max_prompt_tokens or use mode='truncate'"):
        filter_by_prompt_length([{"prompt": "a b c"}], tok, 2)
    tok_chat = word_tokenizer(CHAT_TEMPLATE)  # the template alone is 2 tokens
    with pytest.raises(ValueError, match="raise max_prompt_tokens"):
        filter_by_prompt_length([{"prompt": "a b"}], tok_chat, 2, "truncate", task="jsonl")
    with pytest.raises(ValueError, match="mode"):
        filter_by_prompt_length([{"prompt": "a"}], tok, 2, mode="cut")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- split


def test_train_eval_split_is_reproducible_and_disjoint():
    records = [{"prompt": str(i)} for i in range(50)]
    train, val = train_eval_split(records, eval_fraction=0.2, seed=3)
    assert (len(train), len(val)) == (40, 10)
    assert sorted(r["prompt"] for r in train + val) == sorted(r["prompt"] for r in records)
    assert train_eval_split(records, 0.2, seed=3) == (train, val)
    assert train_eval_split(records, 0.2, seed=4) != (train, val)
    everything, none = train_eval_split(records, 0.0)
    assert none == [] and sorted(map(id, everything)) == sorted(map(id, records))


def test_train_eval_split_errors():
    with pytest.raises(ValueError, match="no records"):
        train_eval_split([])
    with pytest.raises(ValueError, match="eval_fraction"):
        train_eval_split([{"prompt": "a"}] * 3, eval_fraction=1.0)
    with pytest.raises(ValueError, match="cannot give both"):
        train_eval_split([{"prompt": "a"}], eval_fraction=0.5)


def test_every_task_is_one_registered_schema():
    """Each task name is one schema in the registry, with its extractor and its columns."""
    assert list(DATASETS) == ["hh_rlhf", "tldr", "wmt20_mlqe", "jsonl", "jsonl_prompts"]
    for name, schema in DATASETS.items():
        assert schema.name == name and callable(schema.extract) and schema.required_columns
