"""The dataset registry: a new dataset is one schema (plus its YAML and tests), and every
registered schema has its conf/dataset YAML."""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import datasets
import pytest
from omegaconf import OmegaConf

from zopro_lightning.data import registry
from zopro_lightning.data.preference import load_preference_dataset
from zopro_lightning.data.prompts import format_prompt
from zopro_lightning.data.registry import (
    DATASETS,
    PREFERENCE_KINDS,
    DatasetSchema,
    get_schema,
    register,
    unregister,
)
from zopro_lightning.data.tasks import build_preference_task

CONF_DATASET = Path(__file__).resolve().parents[1] / "conf" / "dataset"
BUILDER = "zopro_lightning.data.tasks.build_preference_task"
GENERATED = {"sentiment": "zopro_lightning.data.sentiment.build_sentiment_task"}
"""conf/dataset files of generated tasks, which have no schema (nothing is loaded)."""


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- a made-up dataset


def extract_quiz(row: Mapping[str, Any]) -> dict[str, str]:
    """``{"riddle", "answers": [best, worst]}`` -> a pair."""
    answers = row.get("answers")
    if not isinstance(answers, list) or len(answers) != 2:
        raise ValueError("column 'answers' must be a list of two answers (quiz schema)")
    return {"prompt": row["riddle"], "chosen": answers[0].strip(), "rejected": answers[1].strip()}


def extract_rated(row: Mapping[str, Any]) -> dict[str, Any]:
    """``{"question", "reply", "stars"}`` -> a scored completion."""
    return {"prompt": row["question"], "completion": row["reply"].strip(), "score": row["stars"]}


QUIZ = DatasetSchema(
    name="made_up_quiz",
    kind="pairs",
    extract=extract_quiz,
    required_columns=("riddle", "answers"),
    prompt_template="Riddle: {prompt}\nAnswer:",
    hub_name="nobody/made-up-quiz",
    default_config="easy",
    splits=("train",),
)
RATED = DatasetSchema(
    name="made_up_rated",
    kind="scores",
    extract=extract_rated,
    required_columns=("question", "reply", "stars"),
    prompt_template="Q: {prompt} {{rated}}\nA:",
)


@pytest.fixture
def made_up() -> Iterator[None]:
    """The two made-up schemas, registered for one test only."""
    register(QUIZ)
    register(RATED)
    yield
    unregister(QUIZ.name)
    unregister(RATED.name)


def test_a_made_up_pairs_dataset_needs_only_its_schema(made_up, tmp_path):
    rows = [{"riddle": f"what is {i}?", "answers": [f" good {i} ", f"bad {i}"]} for i in range(10)]
    path = write_jsonl(tmp_path / "quiz.jsonl", rows)
    task = build_preference_task(path, "made_up_quiz", eval_fraction=0.2, seed=0)
    assert task.kind == "pairs" and task.task == "made_up_quiz"
    assert len(task.train_pairs) == 8 and len(task.eval_pairs) == 2
    pair = task.train_pairs[0]
    assert re.fullmatch(r"Riddle: what is \d\?\nAnswer:", pair["prompt"])
    assert pair["chosen"].startswith(" good ") and pair["rejected"].startswith(" bad ")
    assert task.sft_examples == [(p["prompt"], p["chosen"]) for p in task.train_pairs]
    assert task.readable_prompts[pair["prompt"]] == pair["prompt"]  # no chat template
    # the length bound counts the formatted prompt: "Riddle : what is N ? Answer :" is 8 tokens
    assert build_preference_task(path, "made_up_quiz", max_prompt_tokens=8).n_filtered == 0
    assert build_preference_task(path, "made_up_quiz", max_prompt_tokens=7,
                                 prompt_length_mode="truncate").n_filtered == 10  # fmt: skip


def test_a_made_up_scores_dataset_needs_only_its_schema(made_up, tmp_path):
    rows = [{"question": f"q{i}", "reply": f" r{i}", "stars": float(i)} for i in range(10)]
    task = build_preference_task(write_jsonl(tmp_path / "rated.jsonl", rows), "made_up_rated")
    assert task.kind == "scores" and task.train_pairs == [] and task.eval_pairs == []
    row = task.train_scored[0]
    assert re.fullmatch(r"Q: q\d \{rated\}\nA:", row["prompt"]) and row["completion"][0] == " "
    assert len(task.sft_examples) == (len(task.train_scored) + 1) // 2  # the better half


def test_a_made_up_dataset_gets_the_loaders_checks_and_hub_defaults(made_up, tmp_path, monkeypatch):
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"riddle": "r", "answer": "a"}])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['answers'\].*made_up_quiz"):
        load_preference_dataset(wrong, "made_up_quiz")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"riddle": "r", "answers": ["a"]}])
    with pytest.raises(ValueError, match=r"line 1 \(row 0\): column 'answers'.*Fix that row"):
        load_preference_dataset(bad, "made_up_quiz")
    with pytest.raises(ValueError, match="unknown preference task 'nope'.*made_up_quiz"):
        build_preference_task(wrong, "nope")

    calls = []

    def fake_load_dataset(path, name=None, split=None, data_dir=None, **kwargs):
        calls.append((path, name, split))
        return [{"riddle": "r", "answers": ["a", "b"]}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = load_preference_dataset(QUIZ.hub_name, "made_up_quiz")
    assert calls == [("nobody/made-up-quiz", "easy", "train")]  # the schema's default config
    assert records == [{"prompt": "r", "chosen": "a", "rejected": "b"}]
    assert format_prompt(records[0], "made_up_quiz") == "Riddle: r\nAnswer:"


def test_the_worked_example_in_the_registry_docstring_runs(tmp_path):
    """The "adding a dataset" example (which the README quotes) registers and builds."""
    blocks = re.findall(r"::\n\n((?: {7}.*\n|\n)+)", registry.__doc__)
    schema_code, test_code = (textwrap.dedent(block) for block in blocks)
    namespace: dict[str, Any] = {
        "Any": Any, "Mapping": Mapping, "DatasetSchema": DatasetSchema, "register": register,
        "json": json, "build_preference_task": build_preference_task,
    }  # fmt: skip
    try:
        exec(schema_code, namespace)  # our own docstring
        assert get_schema("acme_qa").hub_name == "acme/qa-prefs"
        exec(test_code, namespace)
        namespace["test_acme_qa"](tmp_path)
    finally:
        unregister("acme_qa")
    assert "acme_qa" not in DATASETS


# --------------------------------------------------------------------------- the registry


def test_registry_rules():
    assert get_schema("hh_rlhf") is DATASETS["hh_rlhf"]
    with pytest.raises(ValueError, match="unknown task 'nope'; choose one of hh_rlhf, tldr"):
        get_schema("nope")
    with pytest.raises(TypeError):
        DATASETS["x"] = QUIZ  # type: ignore[index]  # read-only: add with register()
    assert register(DATASETS["tldr"]) is DATASETS["tldr"]  # the same schema again: a no-op
    clash = DatasetSchema(name="tldr", kind="pairs", extract=extract_quiz, required_columns=())
    with pytest.raises(ValueError, match="already registered"):
        register(clash)
    assert DATASETS["tldr"].extract is not extract_quiz
    assert unregister("never_registered") is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"name": "has space"}, "identifier"),
        ({"kind": "triples"}, "kind 'triples'"),
        ({"extract": "extract_quiz"}, "extract"),
        ({"required_columns": ["riddle"]}, "required_columns must be a tuple"),
        ({"prompt_template": "Riddle: {text}"}, "exactly one field, {prompt} (found ['text'])"),
        ({"prompt_template": "Riddle: {}"}, "exactly one field, {prompt} (found [''])"),
        ({"prompt_template": "{prompt} {prompt:>4} {n}"}, "(found ['n', 'prompt'])"),
        ({"prompt_template": "Riddle: {prompt"}, "not a str.format template"),
        ({"prompt_template": "Riddle:"}, "exactly one field, {prompt} (found [])"),
    ],
)
def test_a_malformed_schema_is_refused_when_declared(change, message):
    fields = dict(name="quiz", kind="pairs", extract=extract_quiz, required_columns=("riddle",))
    with pytest.raises(ValueError, match=re.escape(message)):
        DatasetSchema(**(fields | change))


# --------------------------------------------------------------------------- YAML files


def _yaml(name: str):
    return OmegaConf.load(CONF_DATASET / f"{name}.yaml")


@pytest.mark.parametrize(
    "name", [n for n, s in DATASETS.items() if s.kind in PREFERENCE_KINDS]
)  # fmt: skip
def test_every_registered_schema_has_its_yaml(name):
    schema = DATASETS[name]
    assert (CONF_DATASET / f"{name}.yaml").is_file(), f"conf/dataset/{name}.yaml is missing"
    cfg = _yaml(name)
    assert cfg.name == name and cfg.task._target_ == BUILDER and cfg.task.task == name
    if schema.hub_name is None:  # a local-file schema: the file must be given
        assert OmegaConf.is_missing(cfg.task, "name_or_path")
    else:
        assert cfg.task.name_or_path == schema.hub_name
        assert cfg.task.split.split("[", 1)[0] in schema.splits
    assert cfg.task.config == schema.default_config


def test_prompt_only_schemas_have_no_yaml():
    """A prompt-only schema is no preference task (build_preference_task refuses it)."""
    prompt_only = [n for n, s in DATASETS.items() if s.kind not in PREFERENCE_KINDS]
    assert prompt_only == ["jsonl_prompts"]
    assert not any((CONF_DATASET / f"{name}.yaml").exists() for name in prompt_only)


def test_every_dataset_yaml_is_a_registered_schema_or_a_generated_task():
    for path in sorted(CONF_DATASET.glob("*.yaml")):
        cfg = OmegaConf.load(path)
        assert cfg.name == path.stem, path
        if path.stem in GENERATED:
            assert cfg.task._target_ == GENERATED[path.stem]
            continue
        assert cfg.task._target_ == BUILDER, path
        assert cfg.task.task == path.stem and path.stem in DATASETS, path
