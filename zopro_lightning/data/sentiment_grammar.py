"""The sentiment task's grammar: its words, review domains and odds, checked against VADER.

Every word the embedded task (:mod:`zopro_lightning.data.sentiment`) can write is listed here:
the prompt prefix, the adjectives of each polarity, the VADER boosters used as modifiers, the
neutral tails and connectives, and per review domain its items, places, prompt templates,
aspects and verbs. :func:`check_word_polarities` holds the lists to VADER's lexicon
(positive adjectives > 1, negative ones < -1, every other word absent), so the prompt never
moves the gold reward and a completion's score is decided by the words the policy chooses.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from vaderSentiment.vaderSentiment import BOOSTER_DICT, NEGATE, SentimentIntensityAnalyzer

PROMPT_PREFIX = "review :"
"""The start of every prompt (no sentiment in VADER's eyes)."""

POSITIVE_ADJECTIVES: tuple[str, ...] = (
    "wonderful", "excellent", "great", "amazing", "lovely", "perfect", "brilliant", "pleasant",
    "charming", "delightful", "impressive", "beautiful", "terrific", "enjoyable", "elegant",
    "friendly", "nice", "good", "helpful", "sweet", "fabulous", "satisfying", "cheerful",
    "stunning", "generous",
)  # fmt: skip
"""Adjectives any subject or aspect can take; VADER valence > 1."""

NEGATIVE_ADJECTIVES: tuple[str, ...] = (
    "terrible", "awful", "horrible", "bad", "disappointing", "rude", "poor", "nasty", "ugly",
    "annoying", "dreadful", "pathetic", "lousy", "miserable", "painful", "stupid", "weak", "sad",
    "worthless", "inferior", "unpleasant", "dirty", "frustrating", "unacceptable", "careless",
    "hostile", "messy",
)  # fmt: skip
"""Adjectives any subject or aspect can take; VADER valence < -1."""

NEUTRAL_ADJECTIVES: tuple[str, ...] = (
    "average", "ordinary", "typical", "plain", "simple", "small", "large", "quiet", "busy",
)  # fmt: skip
"""Adjectives absent from VADER's lexicon (score 0)."""

MODIFIERS: tuple[str, ...] = ("very", "really", "quite", "extremely", "slightly", "somewhat")
"""VADER boosters (the first four strengthen, the last two soften the adjective after them)."""

CONNECTIVES: tuple[str, ...] = ("and", "but")
"""'and' joins clauses of the same polarity, 'but' clauses of different polarity."""

TAILS: tuple[str, ...] = (
    "this time around", "for the price", "as it usually is", "from start to finish",
    "on the whole", "all things considered",
)  # fmt: skip
"""Neutral endings of a one-clause completion (at least three words, so that every completion
has at least six words, counting the final ".")."""

POLARITY_WEIGHTS: tuple[float, float, float] = (0.42, 0.42, 0.16)
"""Chances that a clause is positive, negative, neutral (positive and negative equal)."""
P_SECOND_CLAUSE = 0.7
P_MODIFIER = 0.4
P_TWO_ADJECTIVES = 0.25


@dataclass(frozen=True)
class ReviewDomain:
    """One kind of review: what is reviewed, where, and which of its aspects a clause may name.

    ``prompt_templates`` use ``{item}``, ``{place}`` and ``{time}``; ``*_adjectives`` extend the
    shared adjective lists with words that only suit this domain.
    """

    name: str
    items: tuple[str, ...]
    places: tuple[str, ...]
    prompt_templates: tuple[str, ...]
    aspects: tuple[str, ...]
    subject_verbs: tuple[str, ...]
    aspect_verbs: tuple[str, ...]
    positive_adjectives: tuple[str, ...]
    negative_adjectives: tuple[str, ...]


TIMES: tuple[str, ...] = ("night", "week", "friday", "sunday", "month")

DOMAINS: tuple[ReviewDomain, ...] = (
    ReviewDomain(
        name="restaurant",
        items=("pasta", "soup", "burger", "pizza", "curry", "salad", "steak", "dessert",
               "coffee", "risotto", "omelette", "ramen"),
        places=("the corner cafe", "the harbor bistro", "the old diner", "the noodle bar",
                "the hotel restaurant", "the family kitchen", "the food truck",
                "the station cafe"),
        prompt_templates=("the {item} at {place}", "the {item} we ordered at {place}",
                          "my {item} at {place}", "the {item} at {place} last {time}"),
        aspects=("the waiter", "the service", "the staff", "the music", "the decor",
                 "the portion", "the price", "the table", "the menu", "the bread", "the wine",
                 "the room"),
        subject_verbs=("was", "tasted", "seemed", "looked"),
        aspect_verbs=("was", "seemed", "felt"),
        positive_adjectives=("delicious", "fresh"),
        negative_adjectives=("disgusting", "gross"),
    ),
    ReviewDomain(
        name="product",
        items=("blender", "laptop", "backpack", "kettle", "phone", "keyboard", "lamp",
               "toaster", "camera", "speaker", "vacuum", "jacket"),
        places=("the online store", "the mall", "the electronics shop", "the market",
                "the outlet", "the department store", "the hardware store", "the catalog"),
        prompt_templates=("the {item} from {place}", "the {item} i bought at {place}",
                          "my new {item} from {place}", "the {item} from {place} last {time}"),
        aspects=("the battery", "the design", "the delivery", "the manual", "the packaging",
                 "the price", "the sound", "the screen", "the handle", "the customer service",
                 "the warranty", "the finish"),
        subject_verbs=("was", "seemed", "looked", "felt"),
        aspect_verbs=("was", "seemed", "looked"),
        positive_adjectives=("clever", "comfortable"),
        negative_adjectives=("broken", "useless"),
    ),
    ReviewDomain(
        name="movie",
        items=("drama", "documentary", "musical", "western", "cartoon", "sequel", "mystery",
               "silent film", "spy film", "space opera", "remake", "biopic"),
        places=("the downtown cinema", "the film club", "the drive in", "the old theater",
                "the multiplex", "the art house", "the student club", "the open air cinema"),
        prompt_templates=("the {item} at {place}", "the new {item} at {place}",
                          "the {item} we watched at {place}", "the {item} at {place} last {time}"),
        aspects=("the plot", "the acting", "the soundtrack", "the ending", "the dialogue",
                 "the script", "the cast", "the pacing", "the camera work", "the lead actor",
                 "the costumes", "the effects"),
        subject_verbs=("was", "seemed", "felt"),
        aspect_verbs=("was", "seemed", "felt"),
        positive_adjectives=("exciting", "fun"),
        negative_adjectives=("boring", "dull"),
    ),
)  # fmt: skip


@lru_cache(maxsize=1)
def _analyzer() -> SentimentIntensityAnalyzer:
    return SentimentIntensityAnalyzer()


def vader_lexicon() -> dict[str, float]:
    """VADER's word -> valence lexicon (valences in about [-4, 4])."""
    return _analyzer().lexicon


@lru_cache(maxsize=65536)
def vader_compound(text: str) -> float:
    """VADER's compound sentiment score of ``text``, in [-1, 1] (the task's gold reward).

    The grammar's prompts contain no lexicon word, so scoring a completion alone or the
    prompt followed by the completion gives the same number.
    """
    return float(_analyzer().polarity_scores(text)["compound"])


def domain_adjectives(domain: ReviewDomain, polarity: int) -> tuple[str, ...]:
    if polarity > 0:
        return POSITIVE_ADJECTIVES + domain.positive_adjectives
    if polarity < 0:
        return NEGATIVE_ADJECTIVES + domain.negative_adjectives
    return NEUTRAL_ADJECTIVES


def _neutral_fragments() -> list[str]:
    """Every grammar fragment that must not carry sentiment in VADER's eyes."""
    fragments = [PROMPT_PREFIX, *NEUTRAL_ADJECTIVES, *TAILS, *TIMES, *CONNECTIVES]
    for domain in DOMAINS:
        fragments += [
            *domain.items,
            *domain.places,
            *domain.aspects,
            *domain.subject_verbs,
            *domain.aspect_verbs,
            *(t.format(item="", place="", time="") for t in domain.prompt_templates),
        ]
    return fragments


def grammar_vocabulary() -> frozenset[str]:
    """Every word (and punctuation mark) the grammar can write, prompts and completions."""
    fragments = [
        *_neutral_fragments(),
        *POSITIVE_ADJECTIVES,
        *NEGATIVE_ADJECTIVES,
        *MODIFIERS,
        ",",
        ".",
    ]
    for domain in DOMAINS:
        fragments += [*domain.positive_adjectives, *domain.negative_adjectives]
    return frozenset(word for fragment in fragments for word in fragment.split())


@lru_cache(maxsize=1)
def check_word_polarities() -> None:
    """Check the word lists against VADER's lexicon; raise ``ValueError`` naming any misfit.

    Positive adjectives need valence > 1, negative ones < -1; modifiers must be VADER boosters;
    every other word of the grammar must be absent from the lexicon, the boosters and the
    negations (so it scores 0 and modifies nothing).
    """
    lexicon = vader_lexicon()
    problems: list[str] = []
    positives = {*POSITIVE_ADJECTIVES, *(w for d in DOMAINS for w in d.positive_adjectives)}
    negatives = {*NEGATIVE_ADJECTIVES, *(w for d in DOMAINS for w in d.negative_adjectives)}
    problems += [
        f"positive {w!r} has valence {lexicon.get(w)}"
        for w in sorted(positives)
        if lexicon.get(w, 0.0) <= 1.0
    ]
    problems += [
        f"negative {w!r} has valence {lexicon.get(w)}"
        for w in sorted(negatives)
        if lexicon.get(w, 0.0) >= -1.0
    ]
    problems += [
        f"modifier {w!r} is not a VADER booster" for w in MODIFIERS if w not in BOOSTER_DICT
    ]
    neutral = {word for fragment in _neutral_fragments() for word in fragment.split()}
    problems += [
        f"neutral word {w!r} is in VADER's lexicon / boosters / negations"
        for w in sorted(neutral)
        if w in lexicon or w in BOOSTER_DICT or w in NEGATE
    ]
    if problems:
        raise ValueError(
            "the sentiment grammar's word lists do not match this vaderSentiment's lexicon: "
            + "; ".join(problems)
            + ". Edit the word lists in zopro_lightning/data/sentiment_grammar.py."
        )
