"""The embedded default task: short reviews of mixed sentiment, scored by VADER; no downloads.

A small generative grammar writes the beginnings of restaurant, product and movie reviews
(the prompts) and their continuations (the completions)::

    prompt:      "review : the pasta at the corner cafe"
    completion:  " was delicious , but the waiter seemed rude ."

The gold reward is VADER's compound sentiment score of the completion (in [-1, 1]), so the
whole preference pipeline (SFT -> reward model -> zeroth-order policy learning -> refinement
with a gold judge) runs offline in seconds on a CPU with a tiny model and the word-level
tokenizer of :mod:`zopro_lightning.models.tokenizer`. The grammar's words, review domains and
odds are in :mod:`zopro_lightning.data.sentiment_grammar` (re-exported here); this module draws
the task from them.

Why it is built this way:

- **Sentiment words are checked against VADER's lexicon at build time**: positive adjectives
  have valence > 1, negative ones < -1, the intensifiers are VADER boosters, and every other
  word of the grammar (subjects, places, aspects, verbs, fillers, neutral adjectives) is absent
  from the lexicon, so the prompt never moves the score and the completion's score is decided
  by the words the policy chooses. If a VADER release changes the lexicon, building fails with
  the offending words instead of silently skewing the task.
- **SFT completions are mixed**: each clause is positive, negative or neutral with the
  positive and negative chances equal, and a second clause about an aspect of the subject
  ("the waiter", "the plot") is joined with "and" when both clauses agree, "but" when they do
  not. The mean compound score of the SFT set is therefore close to 0 with a wide spread, so a
  policy that imitates it starts near 0 and preference learning has room to move it towards
  positive text (scores span -1..1).
- **Preference pairs** are two completions for the same prompt, ``chosen`` being the one with
  the higher compound score; near-ties (difference < :data:`MIN_SCORE_GAP`) are skipped.
- **Everything is reproducible from the seed**: each part (prompts, SFT, train pairs, eval
  pairs) draws from its own ``random.Random`` seeded from ``(seed, part)``, never from global
  state, so asking for more SFT examples does not change the pairs. Train and eval prompts are
  drawn without replacement from the enumerated prompt space, so they are disjoint; SFT
  examples and train pairs use train prompts only, eval pairs use eval prompts only.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from functools import lru_cache

from zopro_lightning.data.sentiment_grammar import (
    CONNECTIVES,
    DOMAINS,
    MODIFIERS,
    NEGATIVE_ADJECTIVES,
    NEUTRAL_ADJECTIVES,
    P_MODIFIER,
    P_SECOND_CLAUSE,
    P_TWO_ADJECTIVES,
    POLARITY_WEIGHTS,
    POSITIVE_ADJECTIVES,
    PROMPT_PREFIX,
    TAILS,
    TIMES,
    ReviewDomain,
    check_word_polarities,
    domain_adjectives,
    grammar_vocabulary,
    vader_compound,
    vader_lexicon,
)

__all__ = [
    "CONNECTIVES",
    "DOMAINS",
    "MIN_SCORE_GAP",
    "MODIFIERS",
    "NEGATIVE_ADJECTIVES",
    "NEUTRAL_ADJECTIVES",
    "POLARITY_WEIGHTS",
    "POSITIVE_ADJECTIVES",
    "PROMPT_PREFIX",
    "P_MODIFIER",
    "P_SECOND_CLAUSE",
    "P_TWO_ADJECTIVES",
    "TAILS",
    "SentimentTask",
    "all_prompts",
    "build_sentiment_task",
    "check_word_polarities",
    "grammar_vocabulary",
    "sample_completion",
    "vader_compound",
    "vader_lexicon",
]

MIN_SCORE_GAP = 0.05
"""Pairs whose compound scores differ by less than this are ties and are not used."""


@dataclass(frozen=True)
class SentimentTask:
    """The texts of the default task; see the module docstring for how they are generated.

    Attributes:
        train_prompts: prompts for policy learning (``"review : the pasta at the corner cafe"``).
        eval_prompts: held-out prompts, disjoint from ``train_prompts``; the gold reward of the
            policy before and after training is measured on these.
        sft_examples: ``(prompt, completion)`` pairs for supervised fine-tuning; prompts are
            train prompts, completions start with a space and have mixed sentiment.
        train_pairs: ``{"prompt", "chosen", "rejected"}`` dicts for the reward model (train
            prompts); ``chosen`` has the higher VADER compound score.
        eval_pairs: the same for held-out reward-model accuracy (eval prompts).
    """

    train_prompts: list[str]
    eval_prompts: list[str]
    sft_examples: list[tuple[str, str]]
    train_pairs: list[dict[str, str]]
    eval_pairs: list[dict[str, str]]

    def corpus(self) -> list[str]:
        """Every text the tokenizer must cover: all prompts and completions of the task, plus
        one line with the whole grammar vocabulary (so any text the grammar can write, and any
        word a policy trained on it can sample, has an id)."""
        texts = [*self.train_prompts, *self.eval_prompts]
        for prompt, completion in self.sft_examples:
            texts += [prompt, completion]
        for pair in (*self.train_pairs, *self.eval_pairs):
            texts += [pair["prompt"], pair["chosen"], pair["rejected"]]
        texts.append(" ".join(sorted(grammar_vocabulary())))
        return texts


def _domain_prompts(domain: ReviewDomain) -> list[str]:
    prompts: list[str] = []
    for template, item, place in itertools.product(
        domain.prompt_templates, domain.items, domain.places
    ):
        times = TIMES if "{time}" in template else ("",)
        prompts += [
            f"{PROMPT_PREFIX} " + template.format(item=item, place=place, time=time)
            for time in times
        ]
    return prompts


def all_prompts() -> list[str]:
    """Every prompt the grammar can write, in a fixed order (about 2,300 prompts)."""
    return [prompt for domain in DOMAINS for prompt in _domain_prompts(domain)]


@lru_cache(maxsize=1)
def _prompt_domains() -> dict[str, ReviewDomain]:
    return {prompt: domain for domain in DOMAINS for prompt in _domain_prompts(domain)}


def _domain_of(prompt: str) -> ReviewDomain:
    try:
        return _prompt_domains()[prompt]
    except KeyError:
        raise ValueError(f"{prompt!r} is not a prompt of the sentiment grammar") from None


def _clause(rng: random.Random, verb: str, domain: ReviewDomain, polarity: int) -> str:
    """``verb [modifier] adjective [and adjective]`` with adjectives of the given polarity."""
    adjectives = domain_adjectives(domain, polarity)
    words = [verb]
    if polarity != 0 and rng.random() < P_MODIFIER:
        words.append(rng.choice(MODIFIERS))
    if polarity != 0 and rng.random() < P_TWO_ADJECTIVES:
        first, second = rng.sample(adjectives, 2)
        words += [first, "and", second]
    else:
        words.append(rng.choice(adjectives))
    return " ".join(words)


def _polarity(rng: random.Random) -> int:
    return rng.choices((1, -1, 0), weights=POLARITY_WEIGHTS)[0]


def sample_completion(rng: random.Random, prompt: str) -> str:
    """One completion of ``prompt``: a clause about the reviewed thing, then either a second
    clause about one of its aspects (joined by "and" or "but") or a neutral tail; it starts with
    a space and ends with " .", e.g. ``" was delicious , but the waiter seemed rude ."``."""
    domain = _domain_of(prompt)
    polarity = _polarity(rng)
    text = " " + _clause(rng, rng.choice(domain.subject_verbs), domain, polarity)
    if rng.random() < P_SECOND_CLAUSE:
        aspect_polarity = _polarity(rng)
        connective = "and" if aspect_polarity == polarity else "but"
        aspect_clause = _clause(rng, rng.choice(domain.aspect_verbs), domain, aspect_polarity)
        text += f" , {connective} {rng.choice(domain.aspects)} {aspect_clause}"
    else:
        text += " " + rng.choice(TAILS)
    return text + " ."


def _preference_pairs(rng: random.Random, prompts: list[str], n: int) -> list[dict[str, str]]:
    """``n`` pairs of two completions of one prompt, ``chosen`` scoring higher; ties skipped."""
    if n and not prompts:
        raise ValueError("preference pairs need at least one prompt; raise the prompt count")
    pairs: list[dict[str, str]] = []
    while len(pairs) < n:
        prompt = rng.choice(prompts)
        first, second = sample_completion(rng, prompt), sample_completion(rng, prompt)
        gap = vader_compound(first) - vader_compound(second)
        if abs(gap) < MIN_SCORE_GAP:
            continue
        chosen, rejected = (first, second) if gap > 0 else (second, first)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def _rng(seed: int, part: str) -> random.Random:
    """An independent stream per part of the task (string seeds are hashed deterministically)."""
    return random.Random(f"zopro-sentiment/{seed}/{part}")


def build_sentiment_task(
    seed: int = 0,
    n_train_prompts: int = 512,
    n_eval_prompts: int = 64,
    n_sft: int = 2000,
    n_train_pairs: int = 1000,
    n_eval_pairs: int = 200,
) -> SentimentTask:
    """Generate the default task; the same arguments always give the same task.

    Raises:
        ValueError: if a count is negative, if more prompts are asked for than the grammar
            can write, or if SFT examples / pairs are asked for without prompts to draw from.
    """
    counts = {
        "n_train_prompts": n_train_prompts,
        "n_eval_prompts": n_eval_prompts,
        "n_sft": n_sft,
        "n_train_pairs": n_train_pairs,
        "n_eval_pairs": n_eval_pairs,
    }
    for name, value in counts.items():
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    check_word_polarities()

    space = all_prompts()
    if n_train_prompts + n_eval_prompts > len(space):
        raise ValueError(
            f"asked for {n_train_prompts} train + {n_eval_prompts} eval prompts, but the "
            f"sentiment grammar writes only {len(space)} distinct prompts; ask for fewer"
        )
    if n_sft and not n_train_prompts:
        raise ValueError("n_sft > 0 needs n_train_prompts > 0 (SFT uses train prompts)")
    drawn = _rng(seed, "prompts").sample(space, n_train_prompts + n_eval_prompts)
    train_prompts, eval_prompts = drawn[:n_train_prompts], drawn[n_train_prompts:]

    sft_rng = _rng(seed, "sft")
    sft_examples = []
    for _ in range(n_sft):
        prompt = sft_rng.choice(train_prompts)
        sft_examples.append((prompt, sample_completion(sft_rng, prompt)))

    return SentimentTask(
        train_prompts=train_prompts,
        eval_prompts=eval_prompts,
        sft_examples=sft_examples,
        train_pairs=_preference_pairs(_rng(seed, "train_pairs"), train_prompts, n_train_pairs),
        eval_pairs=_preference_pairs(_rng(seed, "eval_pairs"), eval_prompts, n_eval_pairs),
    )
