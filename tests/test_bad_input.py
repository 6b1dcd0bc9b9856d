"""Damaged input gives a clear error naming the file (and line), the problem and the fix, before
any training; private data files leave no copy in the ``datasets`` cache.

One test per failure mode; the README's "Bad input and faults" table lists them."""

from __future__ import annotations

import gzip
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from zopro_lightning.data.local_files import DataFileError
from zopro_lightning.data.preference import load_preference_dataset
from zopro_lightning.data.tasks import build_preference_task
from zopro_lightning.models.loading import build_tiny_causal_lm, load_causal_lm, load_tokenizer
from zopro_lightning.models.tokenizer import build_word_tokenizer
from zopro_lightning.run.pipeline import Pipeline, run_pipeline

CONF = Path(__file__).resolve().parents[1] / "conf"
SHARED_HH = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / ("hh-rlhf-harmless-base-test.jsonl.gz")
)


def pairs(n: int) -> list[dict]:
    return [
        {"prompt": f"Question {i}?", "chosen": f"A kind answer {i}.", "rejected": f"Rude {i}."}
        for i in range(n)
    ]


def jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["~logger", *overrides])


def message_of(path: Path, task: str = "jsonl") -> str:
    with pytest.raises(ValueError) as err:
        load_preference_dataset(str(path), task)  # type: ignore[arg-type]
    return str(err.value)


# --------------------------------------------------------------------------- encodings


def test_latin1_jsonl_names_the_line_and_says_convert(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = pairs(3)
    rows[1]["chosen"] = "Très bien, merci."
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    path.write_bytes(text.encode("latin-1"))
    message = message_of(path)
    assert f"{path}, line 2: not valid UTF-8 (byte 0xe8" in message
    assert "Latin-1" in message and "iconv -f LATIN1 -t UTF-8" in message


def test_utf16_jsonl_says_it_is_utf16(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(jsonl_bytes(pairs(3)).decode("utf-8").encode("utf-16"))
    message = message_of(path)
    assert f"{path}: line 1 is UTF-16 text" in message and "iconv -f UTF-16" in message


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + jsonl_bytes(pairs(2)))
    assert [r["prompt"] for r in load_preference_dataset(str(path), "jsonl")] == [
        "Question 0?",
        "Question 1?",
    ]


# --------------------------------------------------------------------------- gzip


def test_truncated_jsonl_gz_says_truncated_and_how_to_check(tmp_path):
    whole = gzip.compress(jsonl_bytes(pairs(3000)))
    path = tmp_path / "pairs.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    message = message_of(path)
    assert str(path) in message and "gzip stream is truncated or damaged after line" in message
    assert f"gzip -t {path}" in message


@pytest.mark.skipif(not SHARED_HH.is_file(), reason="../shared/data is absent")
def test_truncated_copy_of_the_real_hh_sample(tmp_path):
    path = tmp_path / "hh-rlhf.jsonl.gz"
    data = SHARED_HH.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    message = message_of(path, "hh_rlhf")
    assert "truncated" in message and str(path) in message


def test_plain_text_named_gz_says_it_is_not_gzip(tmp_path):
    path = tmp_path / "pairs.jsonl.gz"
    path.write_bytes(jsonl_bytes(pairs(2)))
    message = message_of(path)
    assert "not gzip-compressed" in message and "rename it to pairs.jsonl" in message


# --------------------------------------------------------------------------- JSON


def test_one_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    lines = jsonl_bytes(pairs(4)).decode().splitlines()
    lines[2] = lines[2][:-1]  # the closing brace lost
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    message = message_of(path)
    assert f"{path}, line 3, column" in message and "not valid JSON" in message
    assert "Fix that line" in message


def test_duplicate_keys_are_named(tmp_path):
    path = tmp_path / "pairs.jsonl"
    line = '{"prompt": "q", "chosen": "good", "rejected": "bad", "chosen": "bad"}\n'
    path.write_bytes(jsonl_bytes(pairs(1)) + line.encode())
    message = message_of(path)
    assert f"{path}, line 2: duplicate key 'chosen'" in message


def test_a_line_that_is_not_an_object_is_named(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(jsonl_bytes(pairs(2)) + b'["q", "good", "bad"]\n')
    assert f"{path}, line 3: a JSON list, not an object" in message_of(path)


# --------------------------------------------------------------------------- contents


def test_every_chosen_empty_is_refused(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(jsonl_bytes([{**row, "chosen": "  "} for row in pairs(6)]))
    with pytest.raises(ValueError, match="every 'chosen' response is empty") as err:
        build_preference_task(str(path), "jsonl")
    assert str(path) in str(err.value)


def test_identical_pairs_are_dropped_counted_and_warned(tmp_path, caplog):
    rows = pairs(10)
    for row in rows[:3]:
        row["rejected"] = row["chosen"]
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(jsonl_bytes(rows))
    with caplog.at_level(logging.WARNING, logger="zopro_lightning.data.tasks"):
        task = build_preference_task(str(path), "jsonl")
    assert task.n_identical == 3
    assert len(task.train_pairs) + len(task.eval_pairs) == 7
    assert "3 of 10 pairs have chosen == rejected; dropped" in caplog.text


def test_all_pairs_identical_is_refused(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(jsonl_bytes([{**row, "rejected": row["chosen"]} for row in pairs(4)]))
    with pytest.raises(ValueError, match="all 4 pairs have chosen == rejected"):
        build_preference_task(str(path), "jsonl")


def test_damaged_dataset_fails_before_training(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(jsonl_bytes(pairs(4)) + b"{not json\n")
    cfg = config("dataset=jsonl", "judge=llm", f"dataset.task.name_or_path={path}")
    with pytest.raises(DataFileError, match="line 5"):
        Pipeline(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "sft").exists()


# --------------------------------------------------------------------------- models


def test_nonexistent_model_path_is_named_not_a_repo_id_error(tmp_path):
    path = tmp_path / "models" / "llama-3.2-1b"
    for load in (load_causal_lm, load_tokenizer):
        with pytest.raises(FileNotFoundError) as err:
            load(path)
        assert f"={path}: no such directory" in str(err.value)
        assert "Repo id" not in str(err.value)


def test_model_directory_without_tokenizer_says_so(tmp_path):
    tokenizer = build_word_tokenizer(["hello world"])
    build_tiny_causal_lm(tokenizer, hidden_size=8, num_layers=1, num_heads=2).save_pretrained(
        tmp_path / "model"
    )
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(tmp_path / "model")
    message = str(err.value)
    assert "the model directory has no tokenizer" in message and "save_pretrained" in message
    assert "sentencepiece" not in message


# --------------------------------------------------------------------------- the command


def zopro_train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "zopro_lightning.run.cli", f"hydra.run.dir={tmp_path / 'h'}"]
    return subprocess.run([*command, *overrides], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_resume_typo_is_refused_and_not_created(tmp_path):
    typo = tmp_path / "outputs" / "sentiment" / "2026-11-2"
    result = zopro_train(tmp_path, f"resume={typo}")
    assert result.returncode != 0
    assert f"resume={typo}: no such run directory (nothing was created)" in result.stderr
    assert not typo.exists()


@pytest.mark.slow
def test_zero_iterations_is_refused_before_any_work(tmp_path):
    result = zopro_train(tmp_path, "loop.iterations=0")
    assert result.returncode != 0
    assert "loop.iterations=0: out of range; valid: an integer >= 1" in result.stderr
    assert not (tmp_path / "h" / "sft").exists() and not (tmp_path / "h" / "metrics.csv").exists()


def test_resume_of_a_directory_that_is_not_a_run_is_refused(tmp_path):
    other = tmp_path / "somewhere"
    other.mkdir()
    with pytest.raises(ValueError, match="not a zopro-train run directory"):
        run_pipeline(config(f"resume={other}"), other)
    assert list(other.iterdir()) == []


# --------------------------------------------------------------------------- the cache


def cache_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch) -> Path:
    """``HF_DATASETS_CACHE`` pointed at an empty directory (as ``datasets`` reads it)."""
    import datasets

    cache = tmp_path / "hf_datasets_cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_local_files_leave_nothing_in_the_datasets_cache(tmp_path, datasets_cache):
    import datasets

    plain = tmp_path / "private.jsonl"
    plain.write_bytes(jsonl_bytes(pairs(12)))
    packed = tmp_path / "private.jsonl.gz"
    packed.write_bytes(gzip.compress(jsonl_bytes(pairs(12))))
    parquet = tmp_path / "private.parquet"
    datasets.Dataset.from_list(pairs(12)).to_parquet(str(parquet))
    before = cache_files(datasets_cache)
    for path in (plain, packed, parquet):
        task = build_preference_task(str(path), "jsonl")
        assert len(task.train_pairs) + len(task.eval_pairs) == 12
    assert cache_files(datasets_cache) == before == []
    # the check can see a copy: datasets' own json loader leaves one there
    datasets.load_dataset("json", data_files={"train": str(plain)}, split="train")
    assert cache_files(datasets_cache)
