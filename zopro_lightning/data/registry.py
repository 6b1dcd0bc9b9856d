r"""The dataset registry: one :class:`DatasetSchema` per dataset, kept in :data:`DATASETS`.

Adding a dataset
----------------

A dataset is one schema, one YAML file and its tests. Say the hub dataset ``acme/qa-prefs``
has rows ``{"question": str, "good": str, "bad": str}``.

1. The schema: one entry at the end of this module (an extractor too long to read beside
   its entry goes to :mod:`zopro_lightning.data.extractors` with the others)::

       def extract_acme(row: Mapping[str, Any]) -> dict[str, str]:
           for column in ("question", "good", "bad"):
               if not isinstance(row.get(column), str):
                   raise ValueError(f"column {column!r} is missing or not a string")
           return {"prompt": row["question"], "chosen": row["good"].strip(),
                   "rejected": row["bad"].strip()}

       register(DatasetSchema(
           name="acme_qa", kind="pairs", extract=extract_acme,
           required_columns=("question", "good", "bad"),
           prompt_template="Question: {prompt}\nAnswer:",
           hub_name="acme/qa-prefs", splits=("train", "test"),
       ))

2. ``conf/dataset/acme_qa.yaml``: a copy of ``conf/dataset/tldr.yaml`` with ``name: acme_qa``,
   ``task.task: acme_qa``, ``task.name_or_path: acme/qa-prefs`` and ``task.config: null``;
   then ``zopro-train dataset=acme_qa`` runs it (``dataset.task.name_or_path=rows.jsonl``
   reads a local file of the same schema instead).

3. A test on a few hand-written rows in a local file (``tests/test_dataset_registry.py``
   does this for a made-up dataset, and checks that every schema has its YAML)::

       def test_acme_qa(tmp_path):
           rows = [{"question": f"q{i}?", "good": "yes", "bad": "no"} for i in range(10)]
           path = tmp_path / "acme.jsonl"
           path.write_text("".join(json.dumps(row) + "\n" for row in rows))
           task = build_preference_task(str(path), "acme_qa")
           assert task.train_pairs[0]["prompt"].startswith("Question: q")

Nothing else changes: loading (hub name or local file), the column check, prompt formatting,
the length bound, the train/eval split and the reward model's loss all read the schema.

Every schema reads the same local files (:data:`~zopro_lightning.data.local_files.LOCAL_FORMATS`:
``.jsonl``, ``.jsonl.gz``, ``.json``, ``.json.gz``, ``.parquet``) and its hub dataset through
``datasets.load_dataset``. The embedded sentiment task is generated, not loaded, so it has no
schema here (:mod:`zopro_lightning.data.sentiment`, ``conf/dataset/sentiment.yaml``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from string import Formatter
from types import MappingProxyType
from typing import Any, Literal, TypeAlias, get_args

from zopro_lightning.data.extractors import (
    extract_hh_rlhf,
    extract_jsonl_pair,
    extract_prompt_only,
    extract_tldr,
    extract_wmt,
)

__all__ = [
    "DATASETS",
    "KINDS",
    "PREFERENCE_KINDS",
    "SUMMARY_TURN",
    "TRANSLATION_SOURCE_TURN",
    "TRANSLATION_TURN",
    "DatasetSchema",
    "Extractor",
    "Kind",
    "get_schema",
    "preference_names",
    "register",
    "unregister",
]

Kind = Literal["pairs", "scores", "prompts"]
KINDS: tuple[str, ...] = get_args(Kind)
PREFERENCE_KINDS: tuple[str, ...] = ("pairs", "scores")
"""The kinds :func:`~zopro_lightning.data.tasks.build_preference_task` builds a task from."""

Extractor: TypeAlias = Callable[[Mapping[str, Any]], dict[str, Any]]
"""One raw row -> one normalised record; ``ValueError`` naming the column when malformed."""


@dataclass(frozen=True)
class DatasetSchema:
    """Everything the data pipeline knows about one dataset's public schema.

    Attributes:
        name: the registry key: ``dataset.task.task`` in a YAML file, ``task=`` of
            :func:`~zopro_lightning.data.tasks.build_preference_task`, and
            ``PreferenceTask.task``. ``conf/dataset/{name}.yaml`` runs it.
        kind: what a record holds and what the reward model learns from it:

            - ``"pairs"``: ``{prompt, chosen, rejected}``; a Bradley–Terry reward model;
              pairs with ``chosen == rejected`` are dropped; SFT on ``(prompt, chosen)``.
            - ``"scores"``: ``{prompt, completion, score}``; an MSE-regression reward model;
              SFT on the better-scored half of the train rows.
            - ``"prompts"``: ``{prompt}`` only (policy learning); it can be loaded and
              formatted but is no preference task.
        extract: the row extractor (:data:`Extractor`): one raw row (a hub row or a line of a
            local file) -> the record of ``kind``, responses stripped; a malformed row raises
            ``ValueError`` naming the column (the loader adds the file, the line and the fix).
            ``prompt`` is a string, or (chat schemas only) a list of ``{role, content}``.
        required_columns: the top-level columns every row must have; checked on the
            dataset's column names before any row is extracted, so a file of the wrong
            schema fails at once with the missing and the found columns.
        prompt_template: how a record's prompt becomes the text the policy continues:

            - ``None``: a chat prompt. With a tokenizer that has a chat template the turns go
              through ``apply_chat_template(..., add_generation_prompt=True)`` (an HH string
              is split into turns, a plain string is one user turn); without one, the raw
              text (an HH string as it is, a message list as HH text, a string as it is).
            - a ``str.format`` template with one ``{prompt}`` field (write other braces
              twice), e.g. ``"{prompt}\\n\\nSummary:"``; the record's prompt is a string.
        hub_name: the published dataset on the Hugging Face hub, the ``name_or_path`` of its
            YAML file; ``None`` for a schema only read from local files.
        default_config: the hub config read when none is given (``config=None``), whatever
            hub name the schema is used with; ``None``: the dataset's default config.
        splits: the splits the hub dataset publishes in ``default_config`` (the YAML's
            ``split`` is one of them); empty when there is no hub dataset (a local file *is*
            the split it is read as).
    """

    name: str
    kind: Kind
    extract: Extractor
    required_columns: tuple[str, ...]
    prompt_template: str | None = None
    hub_name: str | None = None
    default_config: str | None = None
    splits: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        where = f"DatasetSchema(name={self.name!r})"
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"{where}: name must be a Python identifier such as 'acme_qa'")
        if self.kind not in KINDS:
            raise ValueError(f"{where}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if not callable(self.extract):
            raise ValueError(f"{where}: extract must be a function row -> record")
        for field_name in ("required_columns", "splits"):
            value = getattr(self, field_name)
            if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{where}: {field_name} must be a tuple of strings")
        if self.prompt_template is not None:
            template = self.prompt_template
            try:
                fields = {f for _, f, _, _ in Formatter().parse(template) if f is not None}
            except ValueError as err:
                raise ValueError(
                    f"{where}: prompt_template {template!r} is not a str.format template "
                    f"({err}); write literal braces twice"
                ) from None
            if fields != {"prompt"}:
                raise ValueError(
                    f"{where}: prompt_template {template!r} must have exactly one field, "
                    f"{{prompt}} (found {sorted(fields)}); write literal braces twice"
                )


_REGISTRY: dict[str, DatasetSchema] = {}
DATASETS: Mapping[str, DatasetSchema] = MappingProxyType(_REGISTRY)
"""Every registered schema by name, in registration order (a read-only view; add with
:func:`register`)."""


def register(schema: DatasetSchema) -> DatasetSchema:
    """Add ``schema`` to :data:`DATASETS` and return it (registering an equal schema again
    is a no-op).

    Raises:
        ValueError: another schema is already registered under the same name.
    """
    existing = _REGISTRY.get(schema.name)
    if existing is not None and existing != schema:
        raise ValueError(
            f"a different dataset named {schema.name!r} is already registered; give the new "
            f"schema another name, or unregister({schema.name!r}) the old one first"
        )
    _REGISTRY[schema.name] = schema
    return schema


def unregister(name: str) -> DatasetSchema | None:
    """Remove and return the schema registered as ``name`` (``None`` when there is none)."""
    return _REGISTRY.pop(name, None)


def get_schema(name: str) -> DatasetSchema:
    """The schema registered as ``name``.

    Raises:
        ValueError: no such schema; the message lists the registered names.
    """
    schema = _REGISTRY.get(name) if isinstance(name, str) else None
    if schema is None:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(_REGISTRY)}")
    return schema


def preference_names() -> list[str]:
    """The names of the schemas a preference task is built from (kind ``pairs`` or
    ``scores``), in registration order."""
    return [name for name, schema in _REGISTRY.items() if schema.kind in PREFERENCE_KINDS]


# --------------------------------------------------------------------------- the datasets

SUMMARY_TURN = "Summary:"
"""The turn after the post that the policy completes (summarisation)."""
TRANSLATION_SOURCE_TURN = "English:"
"""The label of the source sentence (translation)."""
TRANSLATION_TURN = "German:"
"""The translation turn, named after the target language, that the policy completes."""

register(DatasetSchema(
    name="hh_rlhf",  # prompt = the dialogues' common prefix up to the last "\n\nAssistant:"
    kind="pairs",
    extract=extract_hh_rlhf,
    required_columns=("chosen", "rejected"),
    hub_name="Anthropic/hh-rlhf",
    splits=("train", "test"),
))  # fmt: skip

register(DatasetSchema(
    name="tldr",  # "SUBREDDIT: r/...\nTITLE: ...\nPOST: ...\n\nSummary:"; summaries[choice]
    kind="pairs",
    extract=extract_tldr,
    required_columns=("info", "summaries", "choice"),
    prompt_template=f"{{prompt}}\n\n{SUMMARY_TURN}",
    hub_name="openai/summarize_from_feedback",
    default_config="comparisons",
    splits=("train", "validation"),
))  # fmt: skip

register(DatasetSchema(
    name="wmt20_mlqe",  # "English: {source}\nGerman:", completion the MT output, score z_mean
    kind="scores",
    extract=extract_wmt,
    required_columns=("translation", "z_mean"),
    prompt_template=f"{TRANSLATION_SOURCE_TURN} {{prompt}}\n{TRANSLATION_TURN}",
    hub_name="wmt/wmt20_mlqe_task1",
    default_config="en-de",
    splits=("train", "validation", "test"),
))  # fmt: skip

register(DatasetSchema(
    name="jsonl",  # your own {prompt, chosen, rejected}: strings or chat-message lists
    kind="pairs",
    extract=extract_jsonl_pair,
    required_columns=("chosen", "rejected"),
))  # fmt: skip

register(DatasetSchema(
    name="jsonl_prompts",  # {prompt} only, for policy learning
    kind="prompts",
    extract=extract_prompt_only,
    required_columns=("prompt",),
))  # fmt: skip
