"""Prompts of preference records: render them as the policy reads them, bound their length.

::

    text = format_prompt(record, "hh_rlhf", tok)       # what the policy is given
    records, n_cut = filter_by_prompt_length(records, tok, max_prompt_tokens=256,
                                             mode="truncate", task="hh_rlhf")

How a prompt is rendered is its dataset's :attr:`~zopro_lightning.data.registry.DatasetSchema.
prompt_template` (``None``: chat turns); records are those of
:mod:`zopro_lightning.data.extractors`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from zopro_lightning.data.extractors import Message, hh_prompt_to_messages, messages_to_hh_text
from zopro_lightning.data.registry import get_schema

__all__ = ["filter_by_prompt_length", "format_prompt"]

_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")


# --------------------------------------------------------------------------- formatting


def _has_chat_template(tokenizer: Any) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def _chat_messages(prompt: str | list[Message]) -> list[Message]:
    if isinstance(prompt, list):
        return prompt
    if _HH_MARKER.search(prompt):
        return hh_prompt_to_messages(prompt)
    return [{"role": "user", "content": prompt}]


def format_prompt(record: Mapping[str, Any], task: str, tokenizer: Any = None) -> str:
    """Render a record's prompt as the text the policy continues.

    - chat schemas (``hh_rlhf``, ``jsonl``, ``jsonl_prompts``: no ``prompt_template``): when
      ``tokenizer`` has a chat template, the user/assistant turns go through
      ``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``
      (an HH string is split with :func:`hh_prompt_to_messages`, a plain string is one user
      turn). Otherwise the raw text: an HH string as it is (ending ``"\\n\\nAssistant:"``),
      a message list rendered as HH text, a plain string as it is.
    - template schemas: ``prompt_template.format(prompt=record["prompt"])``; summarisation
      (``tldr``): the post block of :func:`extract_tldr`, a blank line, then the
      :data:`~zopro_lightning.data.registry.SUMMARY_TURN`:
      ``"SUBREDDIT: r/...\\nTITLE: ...\\nPOST: ...\\n\\nSummary:"``; translation
      (``wmt20_mlqe``): the source, then the translation turn: ``"English: {source}\\nGerman:"``.

    Responses are stored stripped; a policy sample continues right after the returned text.

    Raises:
        ValueError: ``task`` is not a registered dataset.
    """
    template = get_schema(task).prompt_template
    prompt = record["prompt"]
    if template is not None:
        return template.format(prompt=prompt)
    if _has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            _chat_messages(prompt), tokenize=False, add_generation_prompt=True
        )
    return messages_to_hh_text(prompt) if isinstance(prompt, list) else prompt


# --------------------------------------------------------------------------- length


def _n_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _raw_text(prompt: str | list[Message]) -> str:
    return messages_to_hh_text(prompt) if isinstance(prompt, list) else prompt


def _is_empty(prompt: str | list[Message]) -> bool:
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    return not text.strip()


def _drop_left_tokens(tokenizer: Any, text: str, n_drop: int) -> str:
    """``text`` without its first ``n_drop`` tokens (character-exact where possible)."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):  # slow tokenizers
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return tokenizer.decode(ids[n_drop:]) if n_drop < len(ids) else ""
    if n_drop >= len(ids):
        return ""
    return text[offsets[n_drop][0] :]


def _shorten(prompt: str | list[Message], tokenizer: Any, n_over: int) -> Any:
    """Remove about ``n_over`` tokens from the *start* of a prompt (the end matters most).

    A message list loses whole leading messages first (a system message is kept, and the
    conversation is kept starting on a user turn), then the content of its last message is
    cut from the left.
    """
    if isinstance(prompt, str):
        return _drop_left_tokens(tokenizer, prompt, n_over)
    messages = [dict(m) for m in prompt]
    head = 1 if messages[0]["role"] == "system" else 0
    if len(messages) - head > 1:
        del messages[head]
        while len(messages) - head > 1 and messages[head]["role"] == "assistant":
            del messages[head]
        return messages
    last = messages[-1]
    last["content"] = _drop_left_tokens(tokenizer, last["content"], n_over)
    return messages


def _truncated(
    record: Mapping[str, Any],
    n: int,
    max_prompt_tokens: int,
    tokenizer: Any,
    length: Callable[[Mapping[str, Any]], int],
) -> dict[str, Any] | None:
    """A copy of ``record`` (of ``n`` prompt tokens) cut from the left until its rendered
    prompt fits, or ``None`` when it cannot fit (the fixed template alone is too long)."""
    record = dict(record)
    while n > max_prompt_tokens:
        shorter = _shorten(record["prompt"], tokenizer, n - max_prompt_tokens)
        if shorter == record["prompt"] or _is_empty(shorter):
            break  # cannot shrink further: the fixed template is longer than the limit
        record["prompt"] = shorter
        n = length(record)
    return record if n <= max_prompt_tokens else None


def filter_by_prompt_length(
    records: Sequence[dict[str, Any]],
    tokenizer: Any,
    max_prompt_tokens: int,
    mode: Literal["drop", "truncate"] = "drop",
    *,
    task: str | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Bound prompts to ``max_prompt_tokens`` tokens; drop or left-truncate the longer ones.

    Length is counted on ``format_prompt(record, task, tokenizer)`` when ``task`` is given
    (what the policy actually reads, chat template included), else on the raw prompt
    (message lists rendered as HH text); special tokens a later call may add are not
    counted. ``"truncate"`` keeps the END of the prompt (the last turn is the one being
    answered), repeating the cut until the rendered prompt fits; a record that cannot fit
    even when emptied (the template alone is too long) is dropped.

    Returns:
        ``(kept_records, n_affected)``: the records that fit (truncated ones are copies) and
        how many were dropped or truncated.

    Raises:
        ValueError: empty input, bad ``mode``/``max_prompt_tokens``, or nothing left.
    """
    if mode not in ("drop", "truncate"):
        raise ValueError(f"mode must be 'drop' or 'truncate', got {mode!r}")
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    if not records:
        raise ValueError("no records to filter by prompt length; check the dataset and split")

    def length(record: Mapping[str, Any]) -> int:
        text = format_prompt(record, task, tokenizer) if task else _raw_text(record["prompt"])
        return _n_tokens(tokenizer, text)

    kept: list[dict[str, Any]] = []
    n_affected = 0
    for record in records:
        n = length(record)
        if n <= max_prompt_tokens:
            kept.append(record)
            continue
        n_affected += 1
        if mode == "truncate":
            short = _truncated(record, n, max_prompt_tokens, tokenizer, length)
            if short is not None:
                kept.append(short)
    if not kept:
        hint = "raise max_prompt_tokens" + (" or use mode='truncate'" if mode == "drop" else "")
        raise ValueError(
            f"all {len(records)} records have prompts longer than max_prompt_tokens="
            f"{max_prompt_tokens} tokens (mode={mode!r}); {hint}"
        )
    return kept, n_affected
