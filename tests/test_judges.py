"""Pairwise judges: reward comparison, LLM "A or B" with position swap, labelled file."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from zopro_lightning.reward.judge_protocol import PairwiseJudge
from zopro_lightning.reward.judges import FileJudge, LLMJudge, RewardJudge
from zopro_lightning.reward.llm_judge import parse_choice

from .conftest import whitespace_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
WORDS = [
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "A",
    "B",
    "a",
    "b",
    "Response",
    "**A**",
    "is",
    "better",
    "good",
    "bad",
    "the",
    "ok",
]


def tiny_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a few words; everything else is <unk>."""
    return whitespace_tokenizer(WORDS, chat_template)


def labels_equal(actual: torch.Tensor, expected: list[float]) -> bool:
    return torch.equal(actual.isnan(), torch.tensor([math.isnan(x) for x in expected])) and all(
        a == e for a, e in zip(actual.tolist(), expected, strict=True) if not math.isnan(e)
    )


# --------------------------------------------------------------------------- reward


def length_reward(prompts: list[str], completions: list[str]) -> torch.Tensor:
    return torch.tensor([float(len(c)) for c in completions])


def test_reward_judge_compares_scores_and_ties_are_nan():
    judge = RewardJudge(length_reward)
    labels = judge.judge(["p"] * 3, ["long one", "x", "same"], ["short", "longer", "four"])
    assert labels.dtype == torch.float32 and labels.shape == (3,)
    assert labels_equal(labels, [1.0, 0.0, math.nan])
    tolerant = RewardJudge(length_reward, tie_tolerance=1.5)
    assert labels_equal(tolerant.judge(["p"] * 2, ["abc", "abcd"], ["ab", "ab"]), [math.nan, 1.0])
    assert isinstance(judge, PairwiseJudge)


def test_reward_judge_is_called_once_and_validates_shape():
    calls = []

    def reward(prompts, completions):
        calls.append(len(completions))
        return [1.0, math.inf, 0.5, 0.0]

    labels = RewardJudge(reward).judge(["p", "q"], ["a", "b"], ["c", "d"])
    assert calls == [4] and labels_equal(labels, [1.0, math.nan])
    with pytest.raises(ValueError, match="one score per completion"):
        RewardJudge(lambda p, c: torch.zeros(3)).judge(["p"], ["a"], ["b"])
    with pytest.raises(ValueError, match="same length"):
        RewardJudge(length_reward).judge(["p"], ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="tie_tolerance"):
        RewardJudge(length_reward, tie_tolerance=-1)


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "choice"),
    [
        ("A", "A"),
        (" b", "B"),
        ("Response A", "A"),
        ("**B**", "B"),
        ("\n  A.\n", "A"),
        ("(B) is better", "B"),
        ("[[a]]", "A"),
        ("a better one is B", "B"),
        ("Answer: b", "B"),
        ("ABBA", None),
        ("Both", None),
        ("", None),
        ("  ", None),
        ("Neither is good", None),
        (None, None),
        (42, None),
    ],
)
def test_parse_choice(text, choice):
    assert parse_choice(text) == choice


# --------------------------------------------------------------------------- LLM: canned


def canned_judge(answer_for) -> LLMJudge:
    """A judge whose answers come from ``answer_for(response_a, response_b)``."""
    judge = LLMJudge(model=None, tokenizer=tiny_tokenizer(chat_template=None))
    pattern = re.compile(r"\[Response A\]\n(.*)\n\n\[Response B\]\n(.*)\n\nWhich", re.S)

    def fake_generate(queries):
        return [answer_for(*pattern.search(q).groups()) for q in queries]

    judge._generate_answers = fake_generate  # type: ignore[method-assign]
    return judge


def test_llm_judge_consistent_answers_give_labels():
    judge = canned_judge(lambda a, b: "Response A" if "good" in a else "**B**")
    labels = judge.judge(["p1", "p2"], ["good", "bad"], ["bad", "good"])
    assert labels_equal(labels, [1.0, 0.0])
    assert (judge.n_queries, judge.n_unparseable, judge.n_inconsistent) == (4, 0, 0)
    assert judge.last_answers[0] == ("Response A", "**B**")


def test_llm_judge_position_bias_is_cancelled():
    judge = canned_judge(lambda a, b: "A")  # always the first slot
    labels = judge.judge(["p"] * 3, ["x", "y", "z"], ["u", "v", "w"])
    assert labels.isnan().all()
    assert judge.n_inconsistent == 3 and judge.n_unparseable == 0


def test_llm_judge_unparseable_and_identical_pairs():
    judge = canned_judge(lambda a, b: "I cannot say" if a == "odd" else "B")
    labels = judge.judge(["p"] * 3, ["odd", "same", "x"], ["y", "same", "odd"])
    assert labels.isnan().all()
    # pair 0: straight unparseable, swapped "B" -> 1 unparseable answer
    # pair 2: straight "B", swapped unparseable -> 1 more
    assert judge.n_unparseable == 2 and judge.n_identical == 1 and judge.n_queries == 4
    assert judge.last_answers[1] is None
    judge.reset_counters()
    assert judge.n_unparseable == judge.n_identical == judge.n_queries == 0


def test_llm_judge_template_is_validated():
    with pytest.raises(ValueError, match="response_b"):
        LLMJudge(None, tiny_tokenizer(), template="{prompt} {response_a}")
    with pytest.raises(ValueError, match="format string"):
        LLMJudge(None, tiny_tokenizer(), template="{prompt} {oops} {response_a} {response_b}")


class FakeModel(torch.nn.Module):
    """``generate`` that checks left padding and appends canned answer tokens."""

    def __init__(self, tokenizer, answers: list[str]):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.answers, self.batches = tokenizer, list(answers), []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        assert kwargs["do_sample"] is False
        assert attention_mask[:, -1].all(), "queries must be left-padded"
        self.batches.append(input_ids.shape[0])
        rows = []
        for _ in range(input_ids.shape[0]):
            ids = self.tokenizer(self.answers.pop(0), add_special_tokens=False)["input_ids"]
            ids = (ids + [self.tokenizer.eos_token_id] * max_new_tokens)[:max_new_tokens]
            rows.append(ids)
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)


def test_llm_judge_batches_with_left_padding_through_generate():
    tok = tiny_tokenizer()
    # 4 pairs -> 4 straight answers, then 4 swapped answers
    answers = ["A", "b", "the", "**A**", "B", "a", "B", "B"]
    model = FakeModel(tok, answers)
    judge = LLMJudge(model, tok, batch_size=3, max_new_tokens=2)
    labels = judge.judge(
        ["short", "a much longer prompt here", "p", "q"], ["w", "x", "y", "z"], ["1", "2", "3", "4"]
    )
    assert model.batches == [3, 3, 2]
    # pair 0: A / B -> first; pair 1: B / A -> second; pair 2: unparseable; 3: A / B -> first
    assert labels_equal(labels, [1.0, 0.0, math.nan, 1.0])
    assert judge.n_unparseable == 1 and judge.n_inconsistent == 0


# --------------------------------------------------------------------------- LLM: tiny model


@pytest.fixture(scope="module")
def tiny_llm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llm")
    tok = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


PROMPTS = ["Which colour is the sky?", "Say something kind.", "2 + 2 ="]
FIRST = ["Blue.", "You are great.", "4"]
SECOND = ["Green, obviously.", "Go away.", "5"]


def test_llm_judge_with_a_tiny_random_model(tiny_llm_dir):
    judge = LLMJudge.from_pretrained(tiny_llm_dir, dtype=torch.float32, batch_size=2)
    labels = judge.judge(PROMPTS, FIRST, SECOND)
    assert labels.shape == (3,) and labels.dtype == torch.float32
    assert all(math.isnan(x) or x in (0.0, 1.0) for x in labels.tolist())
    # the counters agree with the raw answers the model gave
    parsed = [(parse_choice(a), parse_choice(b)) for a, b in judge.last_answers]
    assert judge.n_queries == 6
    assert judge.n_unparseable == sum((a is None) + (b is None) for a, b in parsed)
    assert judge.n_inconsistent == sum(
        a is not None and b is not None and (a == "A") != (b == "B") for a, b in parsed
    )
    assert int((~labels.isnan()).sum()) == 3 - sum(
        a is None or b is None or (a == "A") != (b == "B") for a, b in parsed
    )


def test_llm_judge_counts_answers_it_cannot_parse(tiny_llm_dir):
    judge = LLMJudge.from_pretrained(tiny_llm_dir, dtype=torch.float32)
    with torch.no_grad():
        judge.model.lm_head.weight.zero_()  # every logit 0 -> greedy picks id 0, "<pad>"
    labels = judge.judge(PROMPTS, FIRST, SECOND)
    assert labels.isnan().all()
    assert judge.n_unparseable == 6 and judge.n_inconsistent == 0
    assert all(a.strip() == "" and b.strip() == "" for a, b in judge.last_answers)


def test_llm_judge_without_chat_template(tiny_llm_dir):
    from transformers import AutoModelForCausalLM as Auto

    model = Auto.from_pretrained(tiny_llm_dir, dtype=torch.float32)
    judge = LLMJudge(model, tiny_tokenizer(chat_template=None), max_new_tokens=3)
    labels = judge.judge(PROMPTS[:2], FIRST[:2], SECOND[:2])
    assert labels.shape == (2,) and judge.n_queries == 4


# --------------------------------------------------------------------------- file


def write_labels(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n", encoding="utf-8")
    return path


def test_file_judge_lookup_swap_and_missing(tmp_path):
    path = write_labels(
        tmp_path / "labels.jsonl",
        [
            {"prompt": "p", "first": "a", "second": "b", "label": 1},
            {"prompt": "p", "first": "c", "second": "d", "label": "second"},
            {"prompt": "q", "first": "a", "second": "b", "label": "first"},
            {"prompt": "q", "first": "e", "second": "f", "label": 0},
        ],
    )
    judge = FileJudge(path)
    assert len(judge) == 4 and isinstance(judge, PairwiseJudge)
    labels = judge.judge(
        ["p", "p", "p", "q", "z"], ["a", "c", "b", "f", "a"], ["b", "d", "a", "e", "b"]
    )
    assert labels_equal(labels, [1.0, 0.0, 0.0, 1.0, math.nan])
    assert judge.n_missing == 1


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", r":1: not valid JSON"),
        (json.dumps({"prompt": "p", "first": "a", "label": 1}), r":1: field 'second'"),
        (
            json.dumps({"prompt": "p", "first": "a", "second": "b", "label": "maybe"}),
            r":1: label 'maybe'",
        ),
        (json.dumps({"prompt": "p", "first": "a", "second": "b", "label": True}), r":1: label"),
    ],
)
def test_file_judge_malformed_lines(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        FileJudge(path)


def test_file_judge_contradiction_and_missing_file(tmp_path):
    path = write_labels(
        tmp_path / "labels.jsonl",
        [
            {"prompt": "p", "first": "a", "second": "b", "label": 1},
            {"prompt": "p", "first": "b", "second": "a", "label": 1},
        ],
    )
    with pytest.raises(ValueError, match=":2: label contradicts"):
        FileJudge(path)
    with pytest.raises(FileNotFoundError):
        FileJudge(tmp_path / "absent.jsonl")


def test_judging_in_chunks_gives_the_labels_of_one_call(capsys):
    from zopro_lightning.reward.refinement import judge_in_chunks

    def length_reward(prompts, completions):
        return torch.tensor([float(len(c)) for c in completions])

    judge = RewardJudge(length_reward)
    n = 10
    prompts = [f"p{i}" for i in range(n)]
    first = ["a" * (i % 3) for i in range(n)]
    second = ["a" * (i % 4) for i in range(n)]
    whole = judge(prompts, first, second)
    for chunk_size in (1, 3, 64):
        chunked = judge_in_chunks(judge, prompts, first, second, chunk_size, progress="judging")
        torch.testing.assert_close(chunked, whole, equal_nan=True)
    assert "judging" in capsys.readouterr().out  # the bar, when asked for
    judge_in_chunks(judge, prompts, first, second, 3, progress=None)
    assert capsys.readouterr().out == ""


def test_judge_config_targets_resolve():
    """conf/judge/*.yaml name ``zopro_lightning.reward.judges.<Judge>`` (the LLM judge, which
    lives in reward/llm_judge.py, through ``LLMJudge.from_pretrained``)."""
    from pathlib import Path

    import yaml
    from hydra.utils import get_method

    from zopro_lightning.reward import judges, llm_judge

    conf = Path(__file__).resolve().parents[1] / "conf" / "judge"
    targets = {yaml.safe_load(p.read_text())["judge"]["_target_"] for p in conf.glob("*.yaml")}
    assert "zopro_lightning.reward.judges.LLMJudge.from_pretrained" in targets
    for target in targets:
        assert callable(get_method(target))
    assert judges.LLMJudge is llm_judge.LLMJudge
