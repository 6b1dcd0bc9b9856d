"""Preference data: load a dataset of a registered schema, check it, split it.

The pipeline a datamodule runs (docs/algorithm.md §4)::

    records = load_preference_dataset("Anthropic/hh-rlhf", "hh_rlhf", split="train")
    records, n_cut = filter_by_prompt_length(records, tok, max_prompt_tokens=256,
                                             mode="truncate", task="hh_rlhf")
    train, val = train_eval_split(records, eval_fraction=0.2, seed=0)
    text = format_prompt(train[0], "hh_rlhf", tok)      # what the policy is given

What each task name means (its extractor, columns, prompt format, kind, hub name) is its
:class:`~zopro_lightning.data.registry.DatasetSchema` in
:data:`~zopro_lightning.data.registry.DATASETS`; prompts are rendered and bounded by
:mod:`zopro_lightning.data.prompts` (:func:`format_prompt` and :func:`filter_by_prompt_length`
are re-exported here). Records are the normalised dicts of
:mod:`zopro_lightning.data.extractors`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeAlias

from zopro_lightning.data.local_files import local_format, read_local_rows
from zopro_lightning.data.prompts import filter_by_prompt_length, format_prompt
from zopro_lightning.data.registry import (
    SUMMARY_TURN,
    TRANSLATION_SOURCE_TURN,
    TRANSLATION_TURN,
    DatasetSchema,
    get_schema,
    preference_names,
)

__all__ = [
    "SUMMARY_TURN",
    "TRANSLATION_SOURCE_TURN",
    "TRANSLATION_TURN",
    "Task",
    "check_columns",
    "drop_identical_pairs",
    "filter_by_prompt_length",
    "format_prompt",
    "load_preference_dataset",
    "train_eval_split",
]

Task: TypeAlias = str
"""A registered dataset name (a key of :data:`~zopro_lightning.data.registry.DATASETS`)."""


# --------------------------------------------------------------------------- loading


def _local_rows(
    name_or_path: str, builder: str, task: str, split: str
) -> tuple[list[Any], list[str], list[int] | None]:
    """``(rows, columns, file lines)`` of a local file, read into memory (no cache copy)."""
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"no {builder} file at {str(path)!r} (task {task!r}). Fix: set "
            "dataset.task.name_or_path to an existing file, or to a hub dataset name"
        )
    local = read_local_rows(path, builder, split)  # in memory: no copy in any cache
    if not local.rows:
        raise ValueError(
            f"dataset {str(path)!r} is empty: 0 rows read for task {task!r} (split "
            f"{split!r}). Fix: set dataset.task.name_or_path to a file with rows of the "
            "task's schema"
        )
    return local.rows, local.columns, local.lines


def _hub_rows(
    name_or_path: str, schema: DatasetSchema, split: str, config: str | None, data_dir: str | None
) -> tuple[Any, list[str] | None]:
    """``(rows, columns)`` of a hub dataset through ``datasets.load_dataset`` (cached)."""
    import datasets

    config = config if config is not None else schema.default_config
    try:
        rows = datasets.load_dataset(name_or_path, config, split=split, data_dir=data_dir)
    except OSError as err:
        raise OSError(
            f"could not load hub dataset {name_or_path!r} (config={config!r}, "
            f"split={split!r}): {err}. Offline? Pass a local .jsonl/.jsonl.gz/.json/"
            ".parquet file with the same schema instead."
        ) from err
    return rows, getattr(rows, "column_names", None)


def _extract_rows(
    rows: Any, schema: DatasetSchema, name_or_path: str, split: str, lines: list[int] | None
) -> list[dict[str, Any]]:
    """Every row through the schema's extractor; a malformed one is named by line/row."""
    records = []
    for i, row in enumerate(rows):
        try:
            records.append(schema.extract(row))
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
        task: the registered schema whose extractor applies (see
            :data:`~zopro_lightning.data.registry.DATASETS`).
        split: the split to read; for a local file the file *is* that split (slices such
            as ``"train[:100]"`` work for both).
        config: hub config; defaults to the schema's ``default_config`` (``"comparisons"``
            for ``tldr``, ``"en-de"`` for ``wmt20_mlqe``). Ignored for local files.
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
    schema = get_schema(task)
    builder = local_format(name_or_path)
    lines: list[int] | None = None
    if builder is not None:
        rows, columns, lines = _local_rows(name_or_path, builder, task, split)
    else:
        rows, columns = _hub_rows(name_or_path, schema, split, config, data_dir)
    check_columns(columns, task, name_or_path)
    return _extract_rows(rows, schema, name_or_path, split, lines)


def check_columns(found: Sequence[str] | None, task: Task, name_or_path: str) -> None:
    """Raise when the dataset lacks a column the task's schema needs.

    Args:
        found: the dataset's column names (``None``: unknown, nothing is checked).
        task: the task whose schema applies (its ``required_columns``).
        name_or_path: the dataset, for the message.

    Raises:
        ValueError: naming the missing columns, the columns found, and the fix.
    """
    if found is None:
        return
    missing = [column for column in get_schema(task).required_columns if column not in found]
    if missing:
        raise ValueError(
            f"{name_or_path}: missing column(s) {missing} needed by task {task!r}; found "
            f"columns {sorted(found)}. Rename the columns to the task's schema "
            "(docs/algorithm.md §4) or pick the dataset config whose schema the file has (dataset="
            f"{'|'.join(preference_names())})"
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
