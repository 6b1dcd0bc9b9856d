"""W&B through Lightning's ``WandbLogger``, offline: the run files hold the metrics, the config
and the completion tables of :class:`~zopro_lightning.callbacks.completion_table.CompletionTable`.
"""

from __future__ import annotations

import json
import math
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch.utils.data import DataLoader

from zopro_lightning.callbacks.completion_table import (
    COLUMNS,
    CompletionTable,
    completion_rows,
)
from zopro_lightning.policy.module import ZOPrOModule
from zopro_lightning.rl.rollout import Rollout, RolloutSettings

from .conftest import count_words_reward

BLOCK = 32 * 1024  # the .wandb file is a LevelDB-style log of 32 KiB blocks
FULL, LAST = 1, 4


def wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf ``Record``s of a ``run-<id>.wandb`` file (W&B's transaction log: a 7-byte
    header ``:W&B``, then chunks of ``crc32 u32, length u16, type u8, payload`` that never
    cross a block; FIRST/MIDDLE/LAST chunks join into one record)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    if len(data) < 7:  # the header is not written yet
        return
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", f"{path} is not a W&B transaction log"
    position, chunks = 7, []
    while position + 7 <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < 7:  # zero padding to the end of the block
            position += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:  # padding / preallocated tail
            position += left_in_block
            continue
        if position + 7 + length > len(data):  # a chunk still being written
            return
        chunks.append(data[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def finished_records(run_dir: Path, timeout_s: float = 60.0) -> list[Any]:
    """The records of an offline run's transaction log, once it holds the run's ``exit``
    record: W&B's core process writes the log asynchronously and may still be flushing it
    when ``finish()`` returns (seen on a busy 2-core machine: a log without its history)."""
    (log,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + timeout_s
    while True:
        records = list(wandb_records(log))
        if any(record.WhichOneof("record_type") == "exit" for record in records):
            return records
        if time.monotonic() > deadline:
            kinds = sorted({record.WhichOneof("record_type") for record in records})
            raise AssertionError(f"{log} has no exit record after {timeout_s} s; it holds {kinds}")
        time.sleep(0.2)


def history_and_config(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """History rows (``{key: value}``, values JSON-decoded) and the config of an offline run."""
    history, config = [], {}
    for record in finished_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    return history, config


def summary_metrics_and_run(run_dir: Path) -> tuple[dict[str, Any], list[Any], Any]:
    """The summary updates (``{key: value}``), the ``define_metric`` records and the run
    record (id, group, display name) of an offline run."""
    summary, metrics, run = {}, [], None
    for record in finished_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "summary":
            summary.update(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.summary.update
                }
            )
        elif kind == "metric":
            metrics.append(record.metric)
        elif kind == "run":
            run = record.run
    return summary, metrics, run


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch) -> Path:
    """W&B offline, with every directory it writes (runs, cache, settings) under tmp_path."""
    for variable in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / variable.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def fit_policy(module: ZOPrOModule, prompts: list[str], logger, callbacks, steps: int) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(prompts, batch_size=2, collate_fn=lambda batch: batch))


def test_offline_run_holds_metrics_config_and_completion_tables(
    lora_policy, tokenizer, small_task, offline_wandb
):
    torch.set_num_threads(1)
    module = ZOPrOModule(
        lora_policy, tokenizer, count_words_reward, rollout=RolloutSettings(k=2, max_new_tokens=4)
    )
    logger = WandbLogger(offline=True, save_dir=str(offline_wandb), project="zopro-test")
    table = CompletionTable(every_n_updates=2, max_rows=3)
    try:
        fit_policy(module, small_task.train_prompts[:8], logger, [table], steps=4)
    finally:
        logger.experiment.finish()
    (run,) = (offline_wandb / "wandb").glob("offline-run-*")
    history, config = history_and_config(run)

    # the metrics: one history row per policy update
    updates = [row for row in history if "policy/reward_mean" in row]
    assert len(updates) == 4
    assert all(math.isfinite(row["policy/reward_mean"]) for row in updates)
    assert {"policy/kl", "policy/projected_grad", "policy/lr"} <= set(updates[0])
    # the module's hyper-parameters (save_hyperparameters) are the run's config
    assert config["eps"] == module.hparams.eps and config["k"] == 2

    # the tables: after updates 2 and 4, at the same step as those updates' metrics
    tables = [row for row in history if row.get("completions/_type") == "table-file"]
    assert len(tables) == 2
    update_steps = [row["trainer/global_step"] for row in updates]
    assert [row["trainer/global_step"] for row in tables] == [update_steps[1], update_steps[3]]
    contents = [json.loads((run / "files" / row["completions/path"]).read_text()) for row in tables]
    for logged, step in zip(contents, (2, 4), strict=True):
        assert logged["columns"] == COLUMNS
        assert len(logged["data"]) == 3
        for row_step, prompt, completion, reward in logged["data"]:
            assert row_step == step and prompt in small_task.train_prompts
            assert isinstance(completion, str) and isinstance(reward, float | int)
    # the last table is the last rollout: its first prompts, completions and rewards
    last = module.last_rollout
    expected = zip(last.prompts, last.completions, last.rewards.tolist(), strict=True)
    assert [row[1:] for row in contents[1]["data"]] == [list(row) for row in expected][:3]


def test_completion_table_does_nothing_without_a_wandb_logger(
    lora_policy, tokenizer, small_task, tmp_path, offline_wandb
):
    torch.set_num_threads(1)
    module = ZOPrOModule(
        lora_policy, tokenizer, count_words_reward, rollout=RolloutSettings(k=2, max_new_tokens=3)
    )
    logger = CSVLogger(tmp_path / "csv", name="", version="")
    fit_policy(module, small_task.train_prompts[:4], logger, [CompletionTable(1)], steps=2)
    assert not list(tmp_path.rglob("*.table.json")) and not list(tmp_path.rglob("*.wandb"))
    assert (tmp_path / "csv" / "metrics.csv").exists()


def test_completion_rows_cut_to_max_rows_and_blank_non_finite_rewards():
    n = 4
    rollout = Rollout(
        prompts=["a", "a", "b", "b"],
        completions=[" x", " y", " z", " w"],
        input_ids=torch.zeros(n, 3, dtype=torch.long),
        attention_mask=torch.ones(n, 3, dtype=torch.long),
        completion_mask=torch.ones(n, 1),
        old_logprobs=torch.zeros(n),
        ref_logprobs=torch.zeros(n),
        rewards=torch.tensor([1.0, float("nan"), -2.0, float("inf")]),
        kl=torch.zeros(n),
        rlhf_reward=torch.zeros(n),
        advantages=torch.zeros(n),
    )
    assert completion_rows(rollout, step=7, max_rows=3) == [
        [7, "a", " x", 1.0],
        [7, "a", " y", None],
        [7, "b", " z", -2.0],
    ]
    assert len(completion_rows(rollout, step=7, max_rows=None)) == 4


@pytest.mark.parametrize("kwargs", [{"every_n_updates": 0}, {"max_rows": 0}])
def test_completion_table_refuses_bad_options(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        CompletionTable(**kwargs)
