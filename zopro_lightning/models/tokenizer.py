"""A word-level tokenizer built from a text corpus, for the tiny models of the embedded tasks.

The embedded default task (:mod:`zopro_lightning.data.sentiment`) is written by a small grammar
with a closed vocabulary of a few hundred words, so the tiny policy and reward models need no
downloaded tokenizer: one id per word is enough, and it keeps sequences short and readable.

The tokenizer is a :class:`transformers.PreTrainedTokenizerFast` over a ``tokenizers`` pipeline:

- normaliser: lower-casing;
- pre-tokeniser: split on whitespace, then isolate every punctuation character
  (``"good, but"`` -> ``["good", ",", "but"]``);
- model: ``WordLevel`` over the sorted set of words of the corpus, unknown words -> ``<unk>``;
- decoder: words joined with single spaces, so ``decode(encode(text))`` gives back the
  normalised text (lower case, one space between words and around punctuation; the grammar's
  texts are written in that form already, e.g. ``"was good , but the waiter was rude ."``).

Special tokens have fixed ids: ``<pad>`` = 0, ``<unk>`` = 1, ``<s>`` (bos) = 2, ``</s>`` (eos) = 3.
Encoding adds neither bos nor eos: callers that want them add them explicitly. Padding is on the
left by default, which is what batched generation with a decoder-only model needs.

It round-trips through ``save_pretrained(dir)`` and ``AutoTokenizer.from_pretrained(dir)``
(the whole pipeline lives in ``tokenizer.json``), with the same ids and special tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)
"""Special tokens, in id order (``<pad>`` = 0, ``<unk>`` = 1, ``<s>`` = 2, ``</s>`` = 3)."""

_CONTINUATION_PREFIX = "##"
"""Prefix the space-joining decoder would glue to the previous word; no vocabulary word can
carry it, because the pre-tokeniser isolates every ``#``."""


def word_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """How texts are cut into words: on whitespace, then every punctuation character alone.
    Lower-casing (the normaliser) changes no boundary, so this alone counts a text's tokens
    (:mod:`zopro_lightning.data.tasks` bounds prompt lengths with it when there is no
    tokenizer yet)."""
    return pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )


def _pipeline() -> Tokenizer:
    """An empty ``tokenizers`` pipeline: normaliser, pre-tokeniser and decoder, no vocabulary."""
    tokenizer = Tokenizer(WordLevel({UNK_TOKEN: 0}, unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = word_pre_tokenizer()
    # WordPiece's decoder without clean-up joins words with one space each.
    tokenizer.decoder = decoders.WordPiece(prefix=_CONTINUATION_PREFIX, cleanup=False)
    return tokenizer


def corpus_words(texts: Iterable[str]) -> list[str]:
    """The sorted set of words the tokenizer's normaliser and pre-tokeniser make of ``texts``."""
    pipeline = _pipeline()
    words: set[str] = set()
    for text in texts:
        normalised = pipeline.normalizer.normalize_str(text)
        words.update(word for word, _ in pipeline.pre_tokenizer.pre_tokenize_str(normalised))
    return sorted(words)


def build_word_tokenizer(
    texts: Iterable[str], extra_tokens: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer whose vocabulary is every word of ``texts``.

    Args:
        texts: the corpus; every word in it (after lower-casing and splitting on whitespace and
            punctuation) gets an id. Ids are assigned in sorted order after the four special
            tokens, so the same set of words always gives the same ids, whatever the text order.
        extra_tokens: further tokens added whole (never split by the pre-tokeniser, matched
            as written), e.g. a separator such as ``"<sep>"``. They are ordinary tokens: they
            are kept when decoding with ``skip_special_tokens=True``. Ids follow the words.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``pad_token="<pad>"``, ``unk_token="<unk>"``,
        ``bos_token="<s>"``, ``eos_token="</s>"``, ``padding_side="left"``; encoding adds no
        bos/eos.

    Raises:
        ValueError: if an extra token is empty, is a special token, or starts with ``"##"``
            (which the space-joining decoder would glue to the previous word).
    """
    words = [word for word in corpus_words(texts) if word not in SPECIAL_TOKENS]
    vocab = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *words))}

    pipeline = _pipeline()
    pipeline.model = WordLevel(vocab, unk_token=UNK_TOKEN)
    pipeline.add_special_tokens([AddedToken(token, special=True) for token in SPECIAL_TOKENS])
    extras = _validate_extra_tokens(extra_tokens)
    if extras:
        pipeline.add_tokens([AddedToken(token, normalized=False) for token in extras])

    return PreTrainedTokenizerFast(
        tokenizer_object=pipeline,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        padding_side="left",
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
    )


def _validate_extra_tokens(extra_tokens: Sequence[str]) -> list[str]:
    """Check the extra tokens and drop duplicates, keeping their order."""
    if isinstance(extra_tokens, str):
        raise ValueError(
            f"extra_tokens must be a sequence of tokens, got the string {extra_tokens!r}; "
            f"wrap it in a list: [{extra_tokens!r}]"
        )
    extras: list[str] = []
    for token in extra_tokens:
        if not token or not token.strip():
            raise ValueError(f"extra tokens must be non-empty, got {token!r}")
        if token in SPECIAL_TOKENS:
            raise ValueError(f"{token!r} is already a special token; remove it from extra_tokens")
        if token.startswith(_CONTINUATION_PREFIX):
            raise ValueError(
                f"extra token {token!r} starts with {_CONTINUATION_PREFIX!r}, which the decoder "
                "would glue to the previous word; choose another spelling"
            )
        if token not in extras:
            extras.append(token)
    return extras
