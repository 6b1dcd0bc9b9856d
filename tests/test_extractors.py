"""Extractors on hand-written rows of the public schemas, and on the real shared samples."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest

from zopro_lightning.data.extractors import (
    extract_hh_rlhf,
    extract_jsonl_pair,
    extract_prompt_only,
    extract_tldr,
    extract_wmt,
    hh_prompt_to_messages,
    messages_to_hh_text,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HH_FILE = SHARED_DATA / "hh-rlhf-harmless-base-test.jsonl.gz"
WMT_FILE = SHARED_DATA / "wmt20-mlqe-en-de-train.jsonl.gz"


def _read_jsonl_gz(path: Path) -> list[dict]:
    if not path.is_file():
        pytest.skip(f"shared data file {path} is absent (the ../shared checkout is not here)")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


# --------------------------------------------------------------------------- HH-RLHF

MULTI_TURN = (
    "\n\nHuman: What is a good name for a cat?"
    "\n\nAssistant: How about Whiskers?"
    "\n\nHuman: Something more unusual."
    "\n\nAssistant:"
)


def test_hh_multi_turn_splits_at_last_shared_assistant_turn():
    row = {
        "chosen": MULTI_TURN + " Try Bartholomew.",
        "rejected": MULTI_TURN + " No.",
    }
    record = extract_hh_rlhf(row)
    assert record == {"prompt": MULTI_TURN, "chosen": "Try Bartholomew.", "rejected": "No."}


def test_hh_common_prefix_inside_a_turn_is_cut_back_to_the_boundary():
    # Both answers start with "I think " so the common prefix ends inside the last turn.
    row = {
        "chosen": MULTI_TURN + " I think Pumpernickel is fun.",
        "rejected": MULTI_TURN + " I think you should ask a vet.",
    }
    record = extract_hh_rlhf(row)
    assert record["prompt"] == MULTI_TURN
    assert record["chosen"] == "I think Pumpernickel is fun."
    assert record["rejected"] == "I think you should ask a vet."


def test_hh_prefix_inside_the_assistant_marker_is_cut_back_to_the_previous_turn():
    # Diverging after "\n\nAssist" must not produce a prompt ending in half a marker.
    head = "\n\nHuman: hi\n\nAssistant: hello"
    row = {
        "chosen": head + "\n\nAssistant: again",
        "rejected": head + "\n\nAssistance is here",
    }
    record = extract_hh_rlhf(row)
    assert record["prompt"] == "\n\nHuman: hi\n\nAssistant:"
    assert record["chosen"].startswith("hello\n\nAssistant: again")


def test_hh_prompt_to_messages_multi_turn():
    assert hh_prompt_to_messages(MULTI_TURN) == [
        {"role": "user", "content": "What is a good name for a cat?"},
        {"role": "assistant", "content": "How about Whiskers?"},
        {"role": "user", "content": "Something more unusual."},
    ]


def test_hh_prompt_to_messages_merges_repeated_roles_and_keeps_a_truncated_lead():
    prompt = "tail of an answer\n\nHuman: one\n\nHuman: two\n\nAssistant:"
    assert hh_prompt_to_messages(prompt) == [
        {"role": "assistant", "content": "tail of an answer"},
        {"role": "user", "content": "one\n\ntwo"},
    ]


def test_hh_messages_round_trip_as_text():
    messages = hh_prompt_to_messages(MULTI_TURN)
    assert messages_to_hh_text(messages) == MULTI_TURN


def test_hh_prompt_to_messages_rejects_text_without_markers():
    with pytest.raises(ValueError, match="Human"):
        hh_prompt_to_messages("just text")


@pytest.mark.parametrize(
    ("row", "column"),
    [
        ({"rejected": "\n\nHuman: a\n\nAssistant: b"}, "chosen"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b"}, "rejected"),
        ({"chosen": 3, "rejected": "x"}, "chosen"),
        ({"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: b"}, "chosen"),
    ],
)
def test_hh_malformed_rows_name_the_column(row, column):
    with pytest.raises(ValueError, match=rf"'{column}'.*hh-rlhf"):
        extract_hh_rlhf(row)


def test_hh_real_sample_all_pairs():
    rows = _read_jsonl_gz(HH_FILE)
    assert len(rows) == 2312
    records = [extract_hh_rlhf(row) for row in rows]
    empty = []
    for row, record in zip(rows, records, strict=True):
        assert record["prompt"].startswith("\n\nHuman:")
        assert record["prompt"].endswith("\n\nAssistant:")
        for side in ("chosen", "rejected"):
            assert row[side].startswith(record["prompt"])
            assert row[side][len(record["prompt"]) :].strip() == record[side]
        assert hh_prompt_to_messages(record["prompt"])[-1]["role"] == "user"
        assert record["rejected"]
        if not record["chosen"]:
            empty.append(record)
    # As published, 4 pairs prefer an empty assistant turn; every other response is text.
    assert len(empty) == 4


# --------------------------------------------------------------------------- TL;DR


def _tldr_row(choice: int, **info) -> dict:
    base = {
        "id": "t3_x",
        "subreddit": "relationships",
        "title": "Should I call?",
        "post": "  My friend stopped answering.  ",
    }
    base.update(info)
    return {
        "info": base,
        "summaries": [
            {"text": " Friend went silent; should I call?", "policy": "sup1", "note": None},
            {"text": " I like pizza.", "policy": "ref", "note": None},
        ],
        "choice": choice,
        "worker": "w1",
        "batch": "batch1",
        "split": "train",
    }


@pytest.mark.parametrize(
    ("choice", "chosen", "rejected"),
    [
        (0, "Friend went silent; should I call?", "I like pizza."),
        (1, "I like pizza.", "Friend went silent; should I call?"),
    ],
)
def test_tldr_choice_selects_chosen(choice, chosen, rejected):
    record = extract_tldr(_tldr_row(choice))
    assert record["prompt"] == (
        "SUBREDDIT: r/relationships\nTITLE: Should I call?\nPOST: My friend stopped answering."
    )
    assert (record["chosen"], record["rejected"]) == (chosen, rejected)


def test_tldr_without_subreddit_and_title_and_with_article():
    record = extract_tldr(_tldr_row(0, subreddit=None, title=None))
    assert record["prompt"] == "POST: My friend stopped answering."
    cnn = _tldr_row(1, post=None, subreddit=None, article="Markets rose today.")
    assert extract_tldr(cnn)["prompt"].endswith("POST: Markets rose today.")


@pytest.mark.parametrize(
    ("mutate", "column"),
    [
        (lambda r: r.pop("info"), "info"),
        (lambda r: r["info"].update(post=None), "info.post"),
        (lambda r: r.update(summaries=r["summaries"][:1]), "summaries"),
        (lambda r: r["summaries"][1].pop("text"), r"summaries\[1\].text"),
        (lambda r: r.update(choice=2), "choice"),
        (lambda r: r.pop("choice"), "choice"),
    ],
)
def test_tldr_malformed_rows_name_the_column(mutate, column):
    row = _tldr_row(0)
    mutate(row)
    with pytest.raises(ValueError, match=rf"'{column}'.*summarize_from_feedback"):
        extract_tldr(row)


# --------------------------------------------------------------------------- WMT


def _wmt_row(z_mean) -> dict:
    return {
        "segid": 7,
        "translation": {"en": "The cat sleeps.", "de": "Die Katze schläft."},
        "scores": [90.0, 85.0, 95.0],
        "mean": 90.0,
        "z_scores": [0.5, 0.4, 0.6],
        "z_mean": z_mean,
        "model_score": -0.2,
        "doc_id": "Cats",
    }


@pytest.mark.parametrize("z_mean", [0.5, -1.25, 0])
def test_wmt_row(z_mean):
    record = extract_wmt(_wmt_row(z_mean))
    assert record == {
        "prompt": "The cat sleeps.",
        "completion": "Die Katze schläft.",
        "score": float(z_mean),
    }
    assert isinstance(record["score"], float)


@pytest.mark.parametrize(
    ("mutate", "column"),
    [
        (lambda r: r.pop("translation"), "translation"),
        (lambda r: r["translation"].pop("de"), "translation.de"),
        (lambda r: r["translation"].update(en=1), "translation.en"),
        (lambda r: r.pop("z_mean"), "z_mean"),
        (lambda r: r.update(z_mean="high"), "z_mean"),
        (lambda r: r.update(z_mean=math.nan), "z_mean"),
    ],
)
def test_wmt_malformed_rows_name_the_column(mutate, column):
    row = _wmt_row(0.1)
    mutate(row)
    with pytest.raises(ValueError, match=rf"'{column}'.*wmt20_mlqe"):
        extract_wmt(row)


def test_wmt_real_sample_all_rows():
    rows = _read_jsonl_gz(WMT_FILE)
    assert len(rows) == 7000
    records = [extract_wmt(row) for row in rows]
    assert all(math.isfinite(r["score"]) for r in records)
    assert all(r["prompt"] and r["completion"] for r in records)
    assert len({r["score"] for r in records}) > 100  # real, varied scores


# --------------------------------------------------------------------------- JSONL


def test_jsonl_pair_strings():
    row = {"prompt": "Say hi.", "chosen": " Hi! ", "rejected": "No."}
    assert extract_jsonl_pair(row) == {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}


def test_jsonl_pair_chat_messages():
    prompt = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
    ]
    row = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "Paris."}],
        "rejected": [{"role": "assistant", "content": "Lyon."}],
    }
    assert extract_jsonl_pair(row) == {"prompt": prompt, "chosen": "Paris.", "rejected": "Lyon."}


def test_jsonl_pair_implicit_prompt_from_whole_conversations():
    user = {"role": "user", "content": "2+2?"}
    row = {
        "chosen": [user, {"role": "assistant", "content": "4"}],
        "rejected": [user, {"role": "assistant", "content": "5"}],
    }
    assert extract_jsonl_pair(row) == {"prompt": [user], "chosen": "4", "rejected": "5"}


@pytest.mark.parametrize(
    ("row", "column"),
    [
        ({"chosen": "a", "rejected": "b"}, "prompt"),
        ({"prompt": "p", "rejected": "b"}, "chosen"),
        ({"prompt": "p", "chosen": "a", "rejected": 5}, "rejected"),
        ({"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"}, "chosen"),
        ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, r"prompt\[0\]"),
        ({"prompt": [], "chosen": "a", "rejected": "b"}, "prompt"),
    ],
)
def test_jsonl_pair_malformed_rows_name_the_column(row, column):
    with pytest.raises(ValueError, match=rf"'{column}'.*preference JSONL"):
        extract_jsonl_pair(row)


def test_prompt_only():
    assert extract_prompt_only({"prompt": "Write a haiku."}) == {"prompt": "Write a haiku."}
    messages = [{"role": "user", "content": "Hi"}]
    assert extract_prompt_only({"prompt": messages, "extra": 1}) == {"prompt": messages}
    for row in ({}, {"prompt": "  "}, {"prompt": 3}):
        with pytest.raises(ValueError, match="'prompt'.*prompt JSONL"):
            extract_prompt_only(row)
