"""Published preference datasets as tasks for the pipeline (docs/algorithm.md §4).

:func:`build_preference_task` turns a hub dataset or a local file of the same schema into a
:class:`PreferenceTask`, the same shape as :class:`~zopro_lightning.data.sentiment.SentimentTask`
(what the pipeline consumes)::

    load (hub name or .jsonl/.jsonl.gz/.json/.parquet)  ->  extract prompt/chosen/rejected
      (translation: source/translation/score = z_mean)  ->  drop or left-truncate prompts over
      max_prompt_tokens (counted in n_filtered)  ->  format prompts with the task's template
      ->  split the distinct prompts train/eval (seeded)  ->  SFT examples, pairs, scored rows

Two kinds of data, the :attr:`~zopro_lightning.data.registry.DatasetSchema.kind` of the task's
registered schema:

- ``"pairs"`` (``hh_rlhf``, ``tldr``, ``jsonl``): ``train_pairs``/``eval_pairs`` hold
  ``{prompt, chosen, rejected}`` for a Bradley–Terry reward model; ``train_scored`` and
  ``eval_scored`` are empty. SFT examples are ``(prompt, chosen)`` of the train pairs.
- ``"scores"`` (``wmt20_mlqe``): ``train_scored``/``eval_scored`` hold
  ``{prompt, completion, score}`` for an MSE reward model; the pair lists are empty (WMT20 has
  one translation per source, so there is nothing to pair). SFT examples are
  ``(prompt, completion)`` of the better-scored half of the train rows.

Text conventions: every ``prompt`` is the formatted prompt (:func:`format_prompt`, chat
template applied when the tokenizer has one), and every completion is its exact continuation,
so ``prompt + completion`` is the text a model reads. Completions are stored stripped by the
extractors; a single space is put back in front when the formatted prompt does not end in
whitespace (``"...\\n\\nAssistant:" + " I can't help with that."``). Train and eval prompts
are disjoint: the split is over distinct prompts, and every pair of a prompt goes to its side.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from zopro_lightning.data.preference import (
    drop_identical_pairs,
    load_preference_dataset,
    train_eval_split,
)
from zopro_lightning.data.prompts import filter_by_prompt_length, format_prompt
from zopro_lightning.data.registry import DATASETS, PREFERENCE_KINDS, DatasetSchema

__all__ = ["PreferenceTask", "TaskKind", "build_preference_task"]

log = logging.getLogger(__name__)

TaskKind = Literal["pairs", "scores"]


@dataclass(frozen=True)
class PreferenceTask:
    """The texts of a published preference task (see the module docstring).

    Attributes:
        train_prompts: distinct formatted prompts for policy learning.
        eval_prompts: held-out formatted prompts, disjoint from ``train_prompts``.
        sft_examples: ``(prompt, completion)`` for supervised fine-tuning (train prompts).
        train_pairs: ``{"prompt", "chosen", "rejected"}`` (``kind == "pairs"``).
        eval_pairs: the same on eval prompts (held-out pairwise accuracy).
        kind: ``"pairs"`` (Bradley–Terry) or ``"scores"`` (MSE regression).
        train_scored: ``{"prompt", "completion", "score"}`` (``kind == "scores"``).
        eval_scored: the same on eval prompts (held-out Pearson/Spearman).
        n_filtered: rows dropped or truncated by the ``max_prompt_tokens`` bound.
        n_identical: pairs dropped because ``chosen == rejected`` (logged as a warning).
        task: the extractor's name (``"hh_rlhf"``, ``"tldr"``, ``"wmt20_mlqe"``, ``"jsonl"``).
        readable_prompts: each formatted prompt -> the same prompt rendered without a chat
            template (HH text ``"\n\nHuman: ...\n\nAssistant:"``, the post, the source):
            what an LLM judge is shown, free of the policy tokenizer's special tokens.
    """

    train_prompts: list[str]
    eval_prompts: list[str]
    sft_examples: list[tuple[str, str]]
    train_pairs: list[dict[str, str]]
    eval_pairs: list[dict[str, str]]
    kind: TaskKind = "pairs"
    train_scored: list[dict[str, Any]] = field(default_factory=list)
    eval_scored: list[dict[str, Any]] = field(default_factory=list)
    n_filtered: int = 0
    n_identical: int = 0
    task: str = ""
    readable_prompts: dict[str, str] = field(default_factory=dict)

    def corpus(self) -> list[str]:
        """Every prompt and completion of the task (what a tokenizer built from data must
        cover)."""
        texts = [*self.train_prompts, *self.eval_prompts]
        for prompt, completion in self.sft_examples:
            texts += [prompt, completion]
        for pair in (*self.train_pairs, *self.eval_pairs):
            texts += [pair["prompt"], pair["chosen"], pair["rejected"]]
        for row in (*self.train_scored, *self.eval_scored):
            texts += [row["prompt"], row["completion"]]
        return texts


class _WordCounter:
    """Stands in for a tokenizer when none is given: counts the tokens the tiny model's word
    tokenizer (:func:`~zopro_lightning.models.tokenizer.build_word_tokenizer`) will make of a text
    (whitespace-separated words, each punctuation mark its own token), with character
    offsets, so left truncation cuts at token boundaries and a bound in tokens is one the
    tiny model's context can check."""

    def __init__(self) -> None:
        from zopro_lightning.models.tokenizer import word_pre_tokenizer

        self._split = word_pre_tokenizer()

    def __call__(self, text: str, add_special_tokens: bool = False, **kwargs) -> dict:
        spans = [span for _, span in self._split.pre_tokenize_str(text)]
        out: dict[str, list] = {"input_ids": list(range(len(spans)))}
        if kwargs.get("return_offsets_mapping"):
            out["offset_mapping"] = spans
        return out


def _continuation(prompt: str, completion: str) -> str:
    """``completion`` as the continuation of ``prompt`` (a space when the prompt needs one)."""
    if not completion or not prompt or prompt[-1].isspace():
        return completion
    return " " + completion


def _split_by_prompt(
    rows: Sequence[dict[str, Any]], eval_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split distinct prompts (first-appearance order) with :func:`train_eval_split`; rows
    follow their prompt."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["prompt"], []).append(row)
    keyed = [{"prompt": prompt, "rows": group} for prompt, group in groups.items()]
    train, held_out = train_eval_split(keyed, eval_fraction=eval_fraction, seed=seed)
    return (
        [row for group in train for row in group["rows"]],
        [row for group in held_out for row in group["rows"]],
    )


def _distinct(prompts: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(prompts))


def _check_args(
    task: str, eval_fraction: float, max_rows: Any, n_sft: Any, max_prompt_tokens: Any
) -> DatasetSchema:
    """The task's schema, once the arguments are known to be valid."""
    schema = DATASETS.get(task) if isinstance(task, str) else None
    if schema is None or schema.kind not in PREFERENCE_KINDS:
        names = sorted(name for name, s in DATASETS.items() if s.kind in PREFERENCE_KINDS)
        raise ValueError(
            f"unknown preference task {task!r}; choose one of {', '.join(names)} (prompt-only "
            "files are for policy learning, not for a preference task)"
        )
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    for name, value in (("max_rows", max_rows), ("n_sft", n_sft)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1 or None, got {max_prompt_tokens}")
    return schema


def _without_identical_pairs(
    records: list[dict[str, Any]], schema: DatasetSchema, name_or_path: str
) -> tuple[list[dict[str, Any]], int]:
    """:func:`drop_identical_pairs` for pairs, with a warning when some were dropped;
    ``(records, 0)`` for scored rows."""
    if schema.kind != "pairs":
        return records, 0
    records, n_identical = drop_identical_pairs(records, name_or_path)
    if n_identical:
        log.warning(
            "%s: %d of %d pairs have chosen == rejected; dropped (nothing to prefer)",
            name_or_path, n_identical, len(records) + n_identical,
        )  # fmt: skip
    return records, n_identical


def _bound_prompts(
    records: list[dict[str, Any]],
    name_or_path: str,
    task: str,
    tokenizer: Any,
    max_prompt_tokens: int | None,
    mode: Literal["drop", "truncate"],
) -> tuple[list[dict[str, Any]], int]:
    """:func:`filter_by_prompt_length` on the formatted prompts, counted in the tokenizer's
    tokens (or the tiny model's word-tokenizer tokens), with a logged count; ``(records, 0)``
    when there is no bound."""
    if max_prompt_tokens is None:
        return records, 0
    n_read = len(records)
    counter = tokenizer if tokenizer is not None else _WordCounter()
    unit = "tokens" if tokenizer is not None else "word-tokenizer tokens"
    try:
        records, n_filtered = filter_by_prompt_length(
            records, counter, max_prompt_tokens, mode=mode, task=task
        )
    except ValueError as err:
        raise ValueError(
            f"dataset {name_or_path} (task {task!r}): {n_read} rows read, all {n_read} "
            f"filtered out: every prompt is over max_prompt_tokens={max_prompt_tokens} "
            f"{unit} (prompt_length_mode={mode!r}). Fix: raise "
            "dataset.task.max_prompt_tokens (or set it to null)"
            + (", or use dataset.task.prompt_length_mode=truncate" if mode == "drop" else "")
            + "."
        ) from err
    log.info(
        "%s: %d of %d rows had prompts over %d %s (%s)",
        name_or_path, n_filtered, n_read, max_prompt_tokens, unit,
        "dropped" if mode == "drop" else "truncated or dropped",
    )  # fmt: skip
    return records, n_filtered


def _formatted_rows(
    records: Sequence[dict[str, Any]], schema: DatasetSchema, tokenizer: Any
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Rows with formatted prompts and their continuations (pairs: ``chosen``/``rejected``;
    scores: ``completion``/``score``), and each formatted prompt's template-free text."""
    rows = []
    readable: dict[str, str] = {}
    for record in records:
        prompt = format_prompt(record, schema.name, tokenizer)
        readable[prompt] = format_prompt(record, schema.name, None)
        row = {"prompt": prompt}
        if schema.kind == "scores":
            row["completion"] = _continuation(prompt, record["completion"])
            row["score"] = float(record["score"])
        else:
            row["chosen"] = _continuation(prompt, record["chosen"])
            row["rejected"] = _continuation(prompt, record["rejected"])
        rows.append(row)
    return rows, readable


def _sft_examples(
    train: Sequence[dict[str, Any]], kind: str, n_sft: int | None
) -> list[tuple[str, str]]:
    """``(prompt, completion)`` for SFT: pairs: every non-empty ``chosen``; scores: the
    better-scored half of the train rows (non-empty ones); at most ``n_sft`` of them."""
    if kind == "scores":
        ranked = sorted(train, key=lambda r: r["score"], reverse=True)
        sft = [(r["prompt"], r["completion"]) for r in ranked[: (len(ranked) + 1) // 2]]
        sft = [example for example in sft if example[1].strip()]
    else:
        sft = [(r["prompt"], r["chosen"]) for r in train if r["chosen"].strip()]
    return sft if n_sft is None else sft[:n_sft]


def _split_rows(
    rows: list[dict[str, Any]], name_or_path: str, eval_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """:func:`_split_by_prompt`, with an error that names the dataset and the counts."""
    try:
        return _split_by_prompt(rows, eval_fraction, seed)
    except ValueError as err:
        raise ValueError(
            f"{name_or_path}: {len(rows)} rows with {len({r['prompt'] for r in rows})} distinct "
            f"prompts left after the length bound cannot be split at eval_fraction="
            f"{eval_fraction} ({err})"
        ) from err


def _task(
    schema: DatasetSchema,
    train: list[dict[str, Any]],
    held_out: list[dict[str, Any]],
    sft: list[tuple[str, str]],
    name_or_path: str,
    *,
    readable: dict[str, str],
    n_filtered: int,
    n_identical: int,
) -> PreferenceTask:
    """The :class:`PreferenceTask` of the split rows (pairs or scored rows, by the schema's
    kind); its sizes are logged."""
    pairs = schema.kind == "pairs"
    result = PreferenceTask(
        train_prompts=_distinct([r["prompt"] for r in train]),
        eval_prompts=_distinct([r["prompt"] for r in held_out]),
        sft_examples=sft,
        train_pairs=train if pairs else [],
        eval_pairs=held_out if pairs else [],
        kind="pairs" if pairs else "scores",
        train_scored=[] if pairs else train,
        eval_scored=[] if pairs else held_out,
        n_filtered=n_filtered,
        n_identical=n_identical,
        task=schema.name,
        readable_prompts=readable,
    )
    log.info(
        "%s (%s): %d train / %d eval prompts, %d / %d rows, %d SFT examples",
        name_or_path, schema.name, len(result.train_prompts), len(result.eval_prompts),
        len(train), len(held_out), len(sft),
    )  # fmt: skip
    return result


def build_preference_task(
    name_or_path: str,
    task: str,
    *,
    config: str | None = None,
    data_dir: str | None = None,
    split: str = "train",
    eval_fraction: float = 0.2,
    seed: int = 0,
    max_prompt_tokens: int | None = None,
    prompt_length_mode: Literal["drop", "truncate"] = "drop",
    tokenizer: Any = None,
    max_rows: int | None = None,
    n_sft: int | None = None,
) -> PreferenceTask:
    """Load, extract, bound, format and split a preference dataset.

    Args:
        name_or_path: hub name (``"Anthropic/hh-rlhf"``; needs the network) or a local
            ``.jsonl``/``.jsonl.gz``/``.json``/``.parquet`` file of the same schema.
        task: a registered schema of kind pairs or scores
            (:data:`~zopro_lightning.data.registry.DATASETS`): ``"hh_rlhf"``, ``"tldr"``,
            ``"jsonl"`` (pairs) or ``"wmt20_mlqe"`` (scores).
        config: hub config (default: the schema's, ``comparisons`` for tldr, ``en-de`` for
            wmt20_mlqe).
        data_dir: hub sub-directory (``"harmless-base"`` for ``Anthropic/hh-rlhf``).
        split: the split to read (slices like ``"train[:1000]"`` work).
        eval_fraction: share of the distinct prompts held out, in (0, 1).
        seed: seed of the train/eval shuffle; the same arguments give the same task.
        max_prompt_tokens: bound on the formatted prompt's length; ``None``: no bound.
        prompt_length_mode: ``"drop"`` longer prompts, or ``"truncate"`` them from the left.
        tokenizer: the policy's tokenizer: its chat template formats chat prompts and it
            counts prompt tokens. ``None``: raw text, counted in the tokens of the tiny
            model's word tokenizer (words and punctuation marks).
        max_rows: read only the first ``max_rows`` rows of the split.
        n_sft: at most this many SFT examples (the first of the shuffled train side);
            ``None``: all.

    Raises:
        ValueError: unknown task, bad arguments, malformed/empty data, every prompt over
            ``max_prompt_tokens``, or too few distinct prompts for a train and an eval side.
        FileNotFoundError: a local file that does not exist.
        OSError: a hub dataset that cannot be fetched (offline).
    """
    schema = _check_args(task, eval_fraction, max_rows, n_sft, max_prompt_tokens)
    if max_rows is not None:
        split = f"{split.split('[', 1)[0]}[:{max_rows}]"
    records = load_preference_dataset(name_or_path, task, split=split, config=config,
                                      data_dir=data_dir)  # fmt: skip
    records, n_identical = _without_identical_pairs(records, schema, name_or_path)
    records, n_filtered = _bound_prompts(
        records, name_or_path, task, tokenizer, max_prompt_tokens, prompt_length_mode
    )
    rows, readable = _formatted_rows(records, schema, tokenizer)
    train, held_out = _split_rows(rows, name_or_path, eval_fraction, seed)
    return _task(
        schema, train, held_out, _sft_examples(train, schema.kind, n_sft), name_or_path,
        readable=readable, n_filtered=n_filtered, n_identical=n_identical,
    )  # fmt: skip
