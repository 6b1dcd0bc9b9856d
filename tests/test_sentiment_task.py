"""The embedded sentiment task and the word-level tokenizer built over it (fast, offline)."""

from __future__ import annotations

import random
import statistics

import pytest
from transformers import AutoTokenizer

from zopro_lightning.data.sentiment import (
    MIN_SCORE_GAP,
    NEGATIVE_ADJECTIVES,
    POSITIVE_ADJECTIVES,
    SentimentTask,
    all_prompts,
    build_sentiment_task,
    check_word_polarities,
    grammar_vocabulary,
    sample_completion,
    vader_compound,
    vader_lexicon,
)
from zopro_lightning.models.tokenizer import build_word_tokenizer

SMALL = dict(n_train_prompts=64, n_eval_prompts=16, n_sft=200, n_train_pairs=100, n_eval_pairs=30)


@pytest.fixture(scope="module")
def task() -> SentimentTask:
    return build_sentiment_task(seed=0)


@pytest.fixture(scope="module")
def tokenizer(task: SentimentTask):
    return build_word_tokenizer(task.corpus())


def _all_texts(task: SentimentTask) -> list[str]:
    texts = [*task.train_prompts, *task.eval_prompts]
    texts += [prompt + completion for prompt, completion in task.sft_examples]
    for pair in (*task.train_pairs, *task.eval_pairs):
        texts += [pair["prompt"] + pair["chosen"], pair["prompt"] + pair["rejected"]]
    return texts


# --- the task ---------------------------------------------------------------------------------


def test_default_sizes():
    task = build_sentiment_task(seed=123)
    assert len(task.train_prompts) == 512
    assert len(task.eval_prompts) == 64
    assert len(task.sft_examples) == 2000
    assert len(task.train_pairs) == 1000
    assert len(task.eval_pairs) == 200


def test_same_seed_same_task_other_seed_other_task():
    assert build_sentiment_task(seed=7, **SMALL) == build_sentiment_task(seed=7, **SMALL)
    other = build_sentiment_task(seed=8, **SMALL)
    first = build_sentiment_task(seed=7, **SMALL)
    assert other.train_prompts != first.train_prompts
    assert other.sft_examples != first.sft_examples
    assert other.train_pairs != first.train_pairs


def test_does_not_touch_global_random_state():
    random.seed(0)
    expected = random.random()
    random.seed(0)
    build_sentiment_task(seed=3, **SMALL)
    assert random.random() == expected


def test_train_and_eval_prompts_are_disjoint_and_unique(task: SentimentTask):
    assert len(set(task.train_prompts)) == len(task.train_prompts)
    assert len(set(task.eval_prompts)) == len(task.eval_prompts)
    assert not set(task.train_prompts) & set(task.eval_prompts)


def test_sft_and_pairs_use_the_right_prompts(task: SentimentTask):
    train, held_out = set(task.train_prompts), set(task.eval_prompts)
    assert {prompt for prompt, _ in task.sft_examples} <= train
    assert {pair["prompt"] for pair in task.train_pairs} <= train
    assert {pair["prompt"] for pair in task.eval_pairs} <= held_out


def test_prompt_and_completion_shape(task: SentimentTask):
    for prompt, completion in task.sft_examples:
        assert prompt.startswith("review : ")
        assert completion.startswith(" ") and not completion.startswith("  ")
        assert completion.endswith(" .")
        assert 6 <= len(completion.split()) <= 16


def test_chosen_scores_higher_than_rejected_on_every_pair(task: SentimentTask):
    for pair in (*task.train_pairs, *task.eval_pairs):
        assert set(pair) == {"prompt", "chosen", "rejected"}
        gap = vader_compound(pair["chosen"]) - vader_compound(pair["rejected"])
        assert gap >= MIN_SCORE_GAP


def test_prompts_carry_no_sentiment(task: SentimentTask):
    """The gold reward is the same whether it scores the completion or prompt + completion."""
    for prompt in all_prompts():
        assert vader_compound(prompt) == 0.0
    for prompt, completion in task.sft_examples[:300]:
        assert vader_compound(prompt + completion) == vader_compound(completion)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sft_sentiment_is_mixed_around_zero(seed: int):
    task = build_sentiment_task(seed=seed)
    scores = [vader_compound(completion) for _, completion in task.sft_examples]
    assert abs(statistics.mean(scores)) < 0.1
    assert statistics.pstdev(scores) > 0.3
    assert min(scores) < -0.8 and max(scores) > 0.8
    assert sum(score > 0.05 for score in scores) > 0.3 * len(scores)
    assert sum(score < -0.05 for score in scores) > 0.3 * len(scores)


def test_word_lists_match_vader_lexicon():
    check_word_polarities()
    lexicon = vader_lexicon()
    assert len(POSITIVE_ADJECTIVES) >= 20 and len(NEGATIVE_ADJECTIVES) >= 20
    assert all(lexicon[word] > 1 for word in POSITIVE_ADJECTIVES)
    assert all(lexicon[word] < -1 for word in NEGATIVE_ADJECTIVES)


def test_completion_polarity_follows_the_adjectives():
    rng = random.Random(0)
    prompt = "review : the pasta at the corner cafe"
    completions = [sample_completion(rng, prompt) for _ in range(300)]
    for completion in completions:
        words = completion.split()
        has_positive = any(word in POSITIVE_ADJECTIVES for word in words)
        has_negative = any(word in NEGATIVE_ADJECTIVES for word in words)
        if "but" not in words and has_positive and not has_negative:
            assert vader_compound(completion) > 0
        if "but" not in words and has_negative and not has_positive:
            assert vader_compound(completion) < 0


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="distinct prompts"):
        build_sentiment_task(n_train_prompts=len(all_prompts()), n_eval_prompts=1)
    with pytest.raises(ValueError, match="non-negative"):
        build_sentiment_task(n_sft=-1)
    with pytest.raises(ValueError, match="not a prompt"):
        sample_completion(random.Random(0), "review : something else")


def test_corpus_covers_task_and_grammar(task: SentimentTask):
    corpus = task.corpus()
    assert set(task.train_prompts) <= set(corpus)
    assert {completion for _, completion in task.sft_examples} <= set(corpus)
    words = {word for text in corpus for word in text.split()}
    assert grammar_vocabulary() <= words


# --- the tokenizer ----------------------------------------------------------------------------


def test_tokenizer_covers_the_whole_corpus(task: SentimentTask, tokenizer):
    unk = tokenizer.unk_token_id
    for text in (*task.corpus(), *_all_texts(task)):
        assert unk not in tokenizer(text)["input_ids"], text
    assert len(tokenizer) == len(grammar_vocabulary()) + 4


def test_tokenizer_round_trips_text(task: SentimentTask, tokenizer):
    for text in _all_texts(task)[:500]:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == " ".join(text.split())
    ids = tokenizer("Was GOOD , but rude.")["input_ids"]
    assert tokenizer.decode(ids) == "was good , but rude ."
    assert tokenizer.convert_ids_to_tokens(tokenizer("good,but")["input_ids"]) == [
        "good", ",", "but",
    ]  # fmt: skip


def test_tokenizer_special_tokens_and_left_padding(tokenizer):
    assert (tokenizer.pad_token, tokenizer.unk_token) == ("<pad>", "<unk>")
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id) == (0, 1)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (2, 3)
    assert tokenizer.padding_side == "left"

    ids = tokenizer("was good .")["input_ids"]
    assert len(ids) == 3 and tokenizer.bos_token_id not in ids
    assert tokenizer.eos_token_id not in ids

    batch = tokenizer(["was good .", "the pasta was good ."], padding=True, return_tensors="pt")
    assert batch["input_ids"][0].tolist()[:2] == [tokenizer.pad_token_id] * 2
    assert batch["attention_mask"][0].tolist() == [0, 0, 1, 1, 1]

    with_special = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert tokenizer.decode(with_special, skip_special_tokens=True) == "was good ."
    assert tokenizer("</s>")["input_ids"] == [tokenizer.eos_token_id]


def test_unknown_words_map_to_unk(tokenizer):
    ids = tokenizer("the zyzzyva was good")["input_ids"]
    assert ids[1] == tokenizer.unk_token_id
    assert tokenizer.unk_token_id not in ids[:1] + ids[2:]


def test_ids_do_not_depend_on_text_order(task: SentimentTask, tokenizer):
    shuffled = list(task.corpus())
    random.Random(0).shuffle(shuffled)
    assert build_word_tokenizer(shuffled).get_vocab() == tokenizer.get_vocab()


def test_extra_tokens_are_whole_and_kept():
    tok = build_word_tokenizer(["hello world"], extra_tokens=["<sep>"])
    ids = tok("hello <sep> world")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["hello", "<sep>", "world"]
    assert tok.decode(ids, skip_special_tokens=True) == "hello <sep> world"
    with pytest.raises(ValueError):
        build_word_tokenizer(["hello"], extra_tokens=["<pad>"])
    with pytest.raises(ValueError):
        build_word_tokenizer(["hello"], extra_tokens="<sep>")


def test_tokenizer_survives_save_and_auto_load(task: SentimentTask, tokenizer, tmp_path):
    tok = build_word_tokenizer(task.corpus(), extra_tokens=["<sep>"])
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)

    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.special_tokens_map == tok.special_tokens_map
    assert (loaded.pad_token_id, loaded.unk_token_id) == (0, 1)
    assert (loaded.bos_token_id, loaded.eos_token_id) == (2, 3)
    assert loaded.padding_side == "left"
    texts = [*_all_texts(task)[:200], "hello <sep> world , but </s>"]
    for text in texts:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
        assert loaded.decode(loaded(text)["input_ids"]) == tok.decode(tok(text)["input_ids"])
