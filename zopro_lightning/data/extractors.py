"""Row extractors: one pure function per public dataset schema (docs/algorithm.md §4).

Each extractor turns one raw row (a ``dict`` as yielded by ``datasets`` or read from a
JSONL line) into a normalised record and raises ``ValueError`` naming the missing or
invalid column, and the schema it expected, when the row is malformed. Each is the
``extract`` of its dataset's schema in :mod:`zopro_lightning.data.registry`.

Records produced:

- pairs (``extract_hh_rlhf``, ``extract_tldr``, ``extract_jsonl_pair``):
  ``{"prompt", "chosen", "rejected"}``; ``prompt`` is a string, or a list of chat messages
  ``{"role", "content"}`` for conversational JSONL; ``chosen``/``rejected`` are the response
  texts, stripped of surrounding whitespace (join with ``" "`` to rebuild a plain-text
  dialogue).
- scored completions (``extract_wmt``): ``{"prompt", "completion", "score"}``.
- prompts only (``extract_prompt_only``): ``{"prompt"}``.

No Lightning, no tokenizer: these are plain functions tested on hand-written rows.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "HH_ASSISTANT",
    "HH_HUMAN",
    "Message",
    "extract_hh_rlhf",
    "extract_jsonl_pair",
    "extract_prompt_only",
    "extract_tldr",
    "extract_wmt",
    "hh_prompt_to_messages",
    "messages_to_hh_text",
]

Message = dict[str, str]

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}

_HH_SCHEMA = (
    "Anthropic/hh-rlhf schema: {'chosen': str, 'rejected': str}, each a whole dialogue "
    "'\\n\\nHuman: ...\\n\\nAssistant: ...'"
)
_TLDR_SCHEMA = (
    "openai/summarize_from_feedback 'comparisons' schema: {'info': {'post': str, "
    "'title': str | None, 'subreddit': str | None}, 'summaries': [{'text': str}, "
    "{'text': str}], 'choice': 0 | 1}"
)
_WMT_SCHEMA = (
    "wmt/wmt20_mlqe_task1 'en-de' schema: {'translation': {'en': str, 'de': str}, "
    "'z_mean': float, ...}"
)
_PAIR_SCHEMA = (
    "preference JSONL schema: {'prompt': str | list[{'role', 'content'}], "
    "'chosen': str | list[{'role', 'content'}], 'rejected': str | list[{'role', 'content'}]}"
)
_PROMPT_SCHEMA = "prompt JSONL schema: {'prompt': str | list[{'role', 'content'}]}"


def _malformed(column: str, problem: str, schema: str) -> ValueError:
    return ValueError(f"column {column!r} {problem}; expected the {schema}")


def _get(row: Mapping[str, Any], column: str, schema: str, *, label: str | None = None) -> Any:
    if not isinstance(row, Mapping):
        raise ValueError(f"row is a {type(row).__name__}, not a mapping; expected the {schema}")
    if column not in row or row[column] is None:
        raise _malformed(label or column, "is missing", schema)
    return row[column]


def _get_str(row: Mapping[str, Any], column: str, schema: str, *, label: str | None = None) -> str:
    value = _get(row, column, schema, label=label)
    if not isinstance(value, str):
        raise _malformed(label or column, f"is a {type(value).__name__}, not a string", schema)
    return value


# --------------------------------------------------------------------------- HH-RLHF


def extract_hh_rlhf(row: Mapping[str, Any]) -> dict[str, str]:
    """Split an HH-RLHF pair into a shared prompt and two responses.

    ``prompt`` is the longest common prefix of ``chosen`` and ``rejected`` cut back to (and
    including) its last ``"\\n\\nAssistant:"``: when the two dialogues diverge inside the
    final assistant turn (e.g. both answers start with "I"), the shared words go back into
    the responses. ``chosen``/``rejected`` are what follows the prompt, stripped.

    A response can be empty: the published data holds a few pairs whose preferred answer
    is an empty assistant turn (4 of the 2,312 harmless-base test pairs); they are kept.

    Raises:
        ValueError: a column is missing or not a string, or the two dialogues share no
            ``"\\n\\nAssistant:"`` turn.
    """
    chosen = _get_str(row, "chosen", _HH_SCHEMA)
    rejected = _get_str(row, "rejected", _HH_SCHEMA)
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(HH_ASSISTANT)
    if cut < 0:
        raise _malformed(
            "chosen",
            "and 'rejected' share no '\\n\\nAssistant:' turn, so no prompt can be cut",
            _HH_SCHEMA,
        )
    end = cut + len(HH_ASSISTANT)
    return {
        "prompt": chosen[:end],
        "chosen": chosen[end:].strip(),
        "rejected": rejected[end:].strip(),
    }


def hh_prompt_to_messages(prompt: str) -> list[Message]:
    """Turn an HH prompt ``"\\n\\nHuman: ...\\n\\nAssistant:"`` into chat messages.

    Human turns become ``"user"``, Assistant turns ``"assistant"``; contents are stripped.
    The final empty assistant turn (the one the model is to write) is removed.
    Consecutive turns of the same role (a few HH dialogues have two Human turns in a row)
    are merged with a blank line, since many chat templates insist on alternation.
    Text before the first marker (a prompt truncated from the left) is kept as a turn of
    the role that precedes the first marker (an assistant turn if the first marker is
    ``Human:``, a user turn otherwise).

    Raises:
        ValueError: the prompt has no ``Human:``/``Assistant:`` marker at all.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"HH prompt must be a string, got {type(prompt).__name__}")
    pieces = _HH_TURN.split(prompt)
    # pieces = [lead, role_1, text_1, role_2, text_2, ...]
    if len(pieces) < 3:
        raise ValueError(
            "HH prompt has no '\\n\\nHuman:' or '\\n\\nAssistant:' turn marker; expected "
            "'\\n\\nHuman: ...\\n\\nAssistant:'"
        )
    turns: list[tuple[str, str]] = []
    lead = pieces[0].strip()
    if lead:
        lead_role = "assistant" if pieces[1] == "Human" else "user"
        turns.append((lead_role, lead))
    for marker, text in zip(pieces[1::2], pieces[2::2], strict=True):
        turns.append((_HH_ROLE[marker], text.strip()))
    if turns and turns[-1][0] == "assistant" and not turns[-1][1]:
        turns.pop()
    messages: list[Message] = []
    for role, content in turns:
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = f"{messages[-1]['content']}\n\n{content}".strip()
        else:
            messages.append({"role": role, "content": content})
    return messages


def messages_to_hh_text(messages: list[Message], *, add_generation_prompt: bool = True) -> str:
    """Render chat messages as raw HH text (the fallback when there is no chat template).

    ``user`` → ``"\\n\\nHuman: ..."``, ``assistant`` → ``"\\n\\nAssistant: ..."``, any other
    role (``system``, ``tool``) → ``"\\n\\n{Role}: ..."``. With ``add_generation_prompt`` an
    open ``"\\n\\nAssistant:"`` turn is appended.
    """
    names = {"user": "Human", "assistant": "Assistant"}
    parts = [
        f"\n\n{names.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages
    ]
    if add_generation_prompt:
        parts.append(HH_ASSISTANT)
    return "".join(parts)


# --------------------------------------------------------------------------- TL;DR


def extract_tldr(row: Mapping[str, Any]) -> dict[str, str]:
    """Extract a summarisation pair from ``openai/summarize_from_feedback`` (``comparisons``).

    ``prompt`` is the post with its context, one field a line, each line only when the
    field is present::

        SUBREDDIT: r/{subreddit}
        TITLE: {title}
        POST: {post}

    (the CNN/DM rows of the validation split carry ``info.article`` instead of
    ``info.post``; it is used in its place). ``chosen`` is ``summaries[choice].text``,
    ``rejected`` the other one, both stripped.

    Raises:
        ValueError: ``info``/``info.post``, ``summaries`` (two ``{text}``) or ``choice``
            (0 or 1) is missing or invalid.
    """
    info = _get(row, "info", _TLDR_SCHEMA)
    if not isinstance(info, Mapping):
        raise _malformed("info", f"is a {type(info).__name__}, not a mapping", _TLDR_SCHEMA)
    post = info.get("post") or info.get("article")
    if not isinstance(post, str) or not post.strip():
        raise _malformed("info.post", "is missing or empty", _TLDR_SCHEMA)
    lines = []
    subreddit = info.get("subreddit")
    if isinstance(subreddit, str) and subreddit.strip():
        lines.append(f"SUBREDDIT: r/{subreddit.strip().removeprefix('r/')}")
    title = info.get("title")
    if isinstance(title, str) and title.strip():
        lines.append(f"TITLE: {title.strip()}")
    lines.append(f"POST: {post.strip()}")

    summaries = _get(row, "summaries", _TLDR_SCHEMA)
    if not isinstance(summaries, list | tuple) or len(summaries) != 2:
        raise _malformed("summaries", "must be a list of exactly two summaries", _TLDR_SCHEMA)
    texts = []
    for i, summary in enumerate(summaries):
        text = summary.get("text") if isinstance(summary, Mapping) else None
        if not isinstance(text, str):
            raise _malformed(f"summaries[{i}].text", "is missing or not a string", _TLDR_SCHEMA)
        texts.append(text.strip())

    choice = _get(row, "choice", _TLDR_SCHEMA)
    if isinstance(choice, bool) or choice not in (0, 1):
        raise _malformed("choice", f"is {choice!r}, not 0 or 1", _TLDR_SCHEMA)
    choice = int(choice)
    return {"prompt": "\n".join(lines), "chosen": texts[choice], "rejected": texts[1 - choice]}


# --------------------------------------------------------------------------- WMT20 MLQE


def extract_wmt(row: Mapping[str, Any]) -> dict[str, Any]:
    """Extract a scored translation from ``wmt/wmt20_mlqe_task1`` (``en-de``).

    Returns ``{"prompt": translation.en, "completion": translation.de,
    "score": float(z_mean)}``; the score is what the reward model regresses on.

    Raises:
        ValueError: ``translation``/``translation.en``/``translation.de`` is missing or not
            a string, or ``z_mean`` is missing, not a number or not finite.
    """
    translation = _get(row, "translation", _WMT_SCHEMA)
    if not isinstance(translation, Mapping):
        raise _malformed(
            "translation", f"is a {type(translation).__name__}, not a mapping", _WMT_SCHEMA
        )
    source = _get_str(translation, "en", _WMT_SCHEMA, label="translation.en")
    target = _get_str(translation, "de", _WMT_SCHEMA, label="translation.de")
    raw = _get(row, "z_mean", _WMT_SCHEMA)
    try:
        if isinstance(raw, bool):
            raise TypeError
        score = float(raw)
    except (TypeError, ValueError):
        raise _malformed("z_mean", f"is {raw!r}, not a number", _WMT_SCHEMA) from None
    if not math.isfinite(score):
        raise _malformed("z_mean", f"is {raw!r}, not a finite number", _WMT_SCHEMA)
    return {"prompt": source.strip(), "completion": target.strip(), "score": score}


# --------------------------------------------------------------------------- JSONL


def _messages(value: Any, column: str, schema: str) -> list[Message]:
    """Validate a chat-message list and return plain ``{"role", "content"}`` copies."""
    if not value:
        raise _malformed(column, "is an empty message list", schema)
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise _malformed(f"{column}[{i}]", "is not a {'role', 'content'} mapping", schema)
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise _malformed(f"{column}[{i}]", "needs string 'role' and 'content' fields", schema)
        out.append({"role": role, "content": content})
    return out


def _response(value: Any, column: str) -> tuple[str, list[Message] | None]:
    """A response given as text or as messages ending in an assistant turn.

    Returns the response text and, for message lists, the messages before it.
    """
    if isinstance(value, str):
        return value.strip(), None
    if isinstance(value, list | tuple):
        messages = _messages(value, column, _PAIR_SCHEMA)
        if messages[-1]["role"] != "assistant":
            raise _malformed(
                column, "is a message list whose last message is not 'assistant'", _PAIR_SCHEMA
            )
        return messages[-1]["content"].strip(), messages[:-1]
    raise _malformed(
        column, f"is a {type(value).__name__}, not a string or a message list", _PAIR_SCHEMA
    )


def _prompt(value: Any, column: str, schema: str) -> str | list[Message]:
    if isinstance(value, str):
        if not value.strip():
            raise _malformed(column, "is empty", schema)
        return value
    if isinstance(value, list | tuple):
        return _messages(value, column, schema)
    raise _malformed(column, f"is a {type(value).__name__}, not a string or a message list", schema)


def extract_jsonl_pair(row: Mapping[str, Any]) -> dict[str, Any]:
    """Extract a pair from a ``{prompt, chosen, rejected}`` JSONL row.

    Accepted forms:

    - all strings: returned as they are (responses stripped);
    - conversational: ``prompt`` a message list, ``chosen``/``rejected`` message lists whose
      last message is the assistant answer (usually a single message); the record's
      ``prompt`` is the message list and ``chosen``/``rejected`` the answers' contents;
    - implicit prompt: no ``prompt`` column, ``chosen``/``rejected`` whole conversations
      that agree on every message before the final assistant one; those shared messages
      are the prompt.

    Raises:
        ValueError: a column is missing, of the wrong type, or an implicit prompt cannot be
            recovered.
    """
    if not isinstance(row, Mapping):
        raise ValueError(
            f"row is a {type(row).__name__}, not a mapping; expected the {_PAIR_SCHEMA}"
        )
    chosen, chosen_context = _response(_get(row, "chosen", _PAIR_SCHEMA), "chosen")
    rejected, rejected_context = _response(_get(row, "rejected", _PAIR_SCHEMA), "rejected")
    if row.get("prompt") is not None:
        prompt = _prompt(row["prompt"], "prompt", _PAIR_SCHEMA)
    elif chosen_context and chosen_context == rejected_context:
        prompt = chosen_context
    else:
        raise _malformed(
            "prompt",
            "is missing (and 'chosen'/'rejected' are not whole conversations sharing the "
            "messages before the final assistant answer)",
            _PAIR_SCHEMA,
        )
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def extract_prompt_only(row: Mapping[str, Any]) -> dict[str, Any]:
    """Extract ``{"prompt"}`` from a prompt-only JSONL row (string or message list).

    Raises:
        ValueError: ``prompt`` is missing, empty, or neither a string nor a message list.
    """
    return {"prompt": _prompt(_get(row, "prompt", _PROMPT_SCHEMA), "prompt", _PROMPT_SCHEMA)}
