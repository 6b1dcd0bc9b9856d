"""Preference data: load a published task, render its prompts, bound their length, split.

The pipeline a datamodule runs (DESIGN.md §4)::

    records = load_preference_dataset("Anthropic/hh-rlhf", "hh_rlhf", split="train")
    records, n_cut = filter_by_prompt_length(records, tok, max_prompt_tokens=256,
                                             mode="truncate", task="hh_rlhf")
    train, val = train_eval_split(records, eval_fraction=0.2, seed=0)
    text = format_prompt(train[0], "hh_rlhf", tok)      # what the policy is given

Records are the normalised dicts of :mod:`zopro_lightning.data.extractors`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

from zopro_lightning.data.extractors import (
    Message,
    extract_hh_rlhf,
    extract_jsonl_pair,
    extract_prompt_only,
    extract_tldr,
    extract_wmt,
    hh_prompt_to_messages,
    messages_to_hh_text,
)
from zopro_lightning.data.local_files import read_local_rows

__all__ = [
    "EXTRACTORS",
    "SUMMARY_TURN",
    "TRANSLATION_SOURCE_TURN",
    "TRANSLATION_TURN",
    "Task",
    "filter_by_prompt_length",
    "format_prompt",
    "drop_identical_pairs",
    "load_preference_dataset",
    "train_eval_split",
]

Task = Literal["hh_rlhf", "tldr", "wmt20_mlqe", "jsonl", "jsonl_prompts"]
TASKS: tuple[str, ...] = get_args(Task)

EXTRACTORS: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "hh_rlhf": extract_hh_rlhf,
    "tldr": extract_tldr,
    "wmt20_mlqe": extract_wmt,
    "jsonl": extract_jsonl_pair,
    "jsonl_prompts": extract_prompt_only,
}
CHAT_TASKS = frozenset({"hh_rlhf", "jsonl", "jsonl_prompts"})

# Top-level columns each schema needs (DESIGN.md §4); checked before any row is extracted.
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "hh_rlhf": ("chosen", "rejected"),
    "tldr": ("info", "summaries", "choice"),
    "wmt20_mlqe": ("translation", "z_mean"),
    "jsonl": ("chosen", "rejected"),
    "jsonl_prompts": ("prompt",),
}

# Hub configs to use when none is given (the published setup's subsets).
DEFAULT_CONFIGS: dict[str, str] = {"tldr": "comparisons", "wmt20_mlqe": "en-de"}

SUMMARY_TURN = "Summary:"
"""The turn after the post that the policy completes (summarisation)."""
TRANSLATION_SOURCE_TURN = "English:"
"""The label of the source sentence (translation)."""
TRANSLATION_TURN = "German:"
"""The translation turn, named after the target language, that the policy completes."""

_LOCAL_FORMATS = {
    ".jsonl": "json",
    ".json": "json",
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
}
_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")


# --------------------------------------------------------------------------- loading


def _check_task(task: str) -> None:
    if task not in EXTRACTORS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def _local_format(path: str) -> str | None:
    """The ``datasets`` builder for a local file name, or ``None`` if it is not one."""
    name = path.lower()
    for suffix in sorted(_LOCAL_FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return _LOCAL_FORMATS[suffix]
    return None


def load_preference_dataset(
    name_or_path: str,
    task: Task,
    split: str = "train",
    config: str | None = None,
    *,
    data_dir: str | None = None,
) -> list[dict[str, Any]]:
    """Load a dataset of the task's public schema and extract its records.

    Args:
        name_or_path: a local ``.jsonl``, ``.jsonl.gz``, ``.json`` or ``.parquet`` file
            (read into memory by :func:`~zopro_lightning.data.local_files.read_local_rows`:
            no copy of private data lands in the ``datasets`` cache), or a hub name such as
            ``"Anthropic/hh-rlhf"`` (``datasets.load_dataset(name, config, split=split)``;
            needs the network, and is cached like any hub dataset).
        task: which extractor to apply (see :data:`EXTRACTORS`).
        split: the split to read; for a local file the file *is* that split (slices such
            as ``"train[:100]"`` work for both).
        config: hub config; defaults to ``"comparisons"`` for ``tldr`` and ``"en-de"`` for
            ``wmt20_mlqe``. Ignored for local files.
        data_dir: hub sub-directory, e.g. ``"harmless-base"`` for ``Anthropic/hh-rlhf``.

    Returns:
        One record per row, as the task's extractor returns it.

    Raises:
        ValueError: unknown task, a malformed row (the message names the row and column),
            or no rows at all.
        DataFileError: (a ``ValueError``) a local file that is not UTF-8, a truncated
            ``.gz``, a line that is not JSON or holds a key twice (file, line and fix).
        FileNotFoundError: a local file name that does not exist.
        OSError: the hub dataset could not be fetched (e.g. offline).
    """
    _check_task(task)
    builder = _local_format(name_or_path)
    lines: list[int] | None = None
    if builder is not None:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"no {builder} file at {str(path)!r} (task {task!r}). Fix: set "
                "dataset.task.name_or_path to an existing file, or to a hub dataset name"
            )
        local = read_local_rows(path, builder, split)  # in memory: no copy in any cache
        rows, columns, lines = local.rows, local.columns, local.lines
        if not rows:
            raise ValueError(
                f"dataset {str(path)!r} is empty: 0 rows read for task {task!r} (split "
                f"{split!r}). Fix: set dataset.task.name_or_path to a file with rows of the "
                "task's schema"
            )
    else:
        import datasets

        config = config if config is not None else DEFAULT_CONFIGS.get(task)
        try:
            rows = datasets.load_dataset(name_or_path, config, split=split, data_dir=data_dir)
        except OSError as err:
            raise OSError(
                f"could not load hub dataset {name_or_path!r} (config={config!r}, "
                f"split={split!r}): {err}. Offline? Pass a local .jsonl/.jsonl.gz/.json/"
                ".parquet file with the same schema instead."
            ) from err
        columns = getattr(rows, "column_names", None)

    check_columns(columns, task, name_or_path)
    extract = EXTRACTORS[task]
    records = []
    for i, row in enumerate(rows):
        try:
            records.append(extract(row))
        except ValueError as err:
            where = f"line {lines[i]} (row {i})" if lines else f"row {i}"
            raise ValueError(
                f"{name_or_path} (split {split!r}), {where}: {err}. Fix that row or remove it"
            ) from err
    if not records:
        raise ValueError(
            f"dataset {name_or_path} (split {split!r}) is empty: 0 rows read. Fix: check "
            "dataset.task.name_or_path, dataset.task.split and dataset.task.config"
        )
    return records


def check_columns(found: Sequence[str] | None, task: Task, name_or_path: str) -> None:
    """Raise when the dataset lacks a column the task's schema needs.

    Args:
        found: the dataset's column names (``None``: unknown, nothing is checked).
        task: the task whose schema applies (:data:`REQUIRED_COLUMNS`).
        name_or_path: the dataset, for the message.

    Raises:
        ValueError: naming the missing columns, the columns found, and the fix.
    """
    if found is None:
        return
    missing = [column for column in REQUIRED_COLUMNS[task] if column not in found]
    if missing:
        raise ValueError(
            f"{name_or_path}: missing column(s) {missing} needed by task {task!r}; found "
            f"columns {sorted(found)}. Rename the columns to the task's schema (DESIGN.md §4) "
            "or pick the dataset config whose schema the file has (dataset=hh_rlhf|tldr|"
            "wmt20_mlqe|jsonl)"
        )


def drop_identical_pairs(
    records: Sequence[dict[str, Any]], name_or_path: str
) -> tuple[list[dict[str, Any]], int]:
    """Drop pairs whose ``chosen`` equals ``rejected`` (they teach a reward model nothing and
    give a Bradley–Terry loss of exactly log 2); check that some ``chosen`` is not empty.

    Returns:
        ``(kept, n_dropped)``; the caller logs the count.

    Raises:
        ValueError: every pair is identical, or every ``chosen`` response is empty (both name
            the file and the fix).
    """
    kept = [r for r in records if r["chosen"] != r["rejected"]]
    if not kept:
        raise ValueError(
            f"{name_or_path}: all {len(records)} pairs have chosen == rejected, so there is no "
            "preference to learn. Fix: check that the file's 'chosen' and 'rejected' columns "
            "hold the two different answers"
        )
    if not any(r["chosen"].strip() for r in kept):
        raise ValueError(
            f"{name_or_path}: every 'chosen' response is empty ({len(kept)} pairs), so SFT has "
            "nothing to learn and no pair has a preferred answer. Fix: fill 'chosen' with the "
            "preferred answer (for the HH-RLHF schema, 'chosen' is the whole dialogue, its final "
            "'\n\nAssistant:' turn included)"
        )
    return kept, len(records) - len(kept)


# --------------------------------------------------------------------------- prompts


def _has_chat_template(tokenizer: Any) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def _chat_messages(prompt: str | list[Message]) -> list[Message]:
    if isinstance(prompt, list):
        return prompt
    if _HH_MARKER.search(prompt):
        return hh_prompt_to_messages(prompt)
    return [{"role": "user", "content": prompt}]


def format_prompt(record: Mapping[str, Any], task: Task, tokenizer: Any = None) -> str:
    """Render a record's prompt as the text the policy continues.

    - chat (``hh_rlhf``, ``jsonl``, ``jsonl_prompts``): when ``tokenizer`` has a chat
      template, the user/assistant turns go through
      ``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``
      (an HH string is split with :func:`hh_prompt_to_messages`, a plain string is one user
      turn). Otherwise the raw text: an HH string as it is (ending ``"\\n\\nAssistant:"``),
      a message list rendered as HH text, a plain string as it is.
    - summarisation (``tldr``): the post block of :func:`extract_tldr`, a blank line, then
      the :data:`SUMMARY_TURN`: ``"SUBREDDIT: r/...\\nTITLE: ...\\nPOST: ...\\n\\nSummary:"``.
    - translation (``wmt20_mlqe``): the source, then the :data:`TRANSLATION_TURN`:
      ``"English: {source}\\nGerman:"``.

    Responses are stored stripped; a policy sample continues right after the returned text.
    """
    _check_task(task)
    prompt = record["prompt"]
    if task in CHAT_TASKS:
        if _has_chat_template(tokenizer):
            return tokenizer.apply_chat_template(
                _chat_messages(prompt), tokenize=False, add_generation_prompt=True
            )
        return messages_to_hh_text(prompt) if isinstance(prompt, list) else prompt
    if task == "tldr":
        return f"{prompt}\n\n{SUMMARY_TURN}"
    return f"{TRANSLATION_SOURCE_TURN} {prompt}\n{TRANSLATION_TURN}"


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


def filter_by_prompt_length(
    records: Sequence[dict[str, Any]],
    tokenizer: Any,
    max_prompt_tokens: int,
    mode: Literal["drop", "truncate"] = "drop",
    *,
    task: Task | None = None,
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
        if mode == "drop":
            continue
        record = dict(record)
        while n > max_prompt_tokens:
            shorter = _shorten(record["prompt"], tokenizer, n - max_prompt_tokens)
            if shorter == record["prompt"] or _is_empty(shorter):
                break  # cannot shrink further: the fixed template is longer than the limit
            record["prompt"] = shorter
            n = length(record)
        if n <= max_prompt_tokens:
            kept.append(record)
    if not kept:
        hint = "raise max_prompt_tokens" + (" or use mode='truncate'" if mode == "drop" else "")
        raise ValueError(
            f"all {len(records)} records have prompts longer than max_prompt_tokens="
            f"{max_prompt_tokens} tokens (mode={mode!r}); {hint}"
        )
    return kept, n_affected


# --------------------------------------------------------------------------- split


def train_eval_split(
    records: Sequence[dict[str, Any]], eval_fraction: float = 0.2, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Shuffle with ``random.Random(seed)`` and cut off ``round(n * eval_fraction)`` records.

    The same records, fraction and seed always give the same split. With a positive
    fraction the eval part holds at least one record and the train part at least one.

    Returns:
        ``(train, eval)``.

    Raises:
        ValueError: empty input, fraction outside ``[0, 1)``, or too few records for both
            parts.
    """
    if not records:
        raise ValueError("no records to split; check the dataset and the length filter")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(records)
    n_eval = 0 if eval_fraction == 0 else max(1, round(n * eval_fraction))
    if n_eval >= n:
        raise ValueError(
            f"{n} record(s) cannot give both a train and an eval part at eval_fraction="
            f"{eval_fraction}; use more data or eval_fraction=0"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [records[i] for i in order[n_eval:]], [records[i] for i in order[:n_eval]]
