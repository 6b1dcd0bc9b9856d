"""Checkpoint files: atomic writes, readable failures, the right model, weights-only loading."""

from __future__ import annotations

import errno
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import zopro_lightning.utils.checkpointing
from zopro_lightning import ZOPrOModule
from zopro_lightning.callbacks.rollout_recorder import RolloutRecorder
from zopro_lightning.data.resumable import ResumableDataLoader
from zopro_lightning.models.loading import add_lora, build_tiny_causal_lm
from zopro_lightning.policy.optimization import OptimizerSettings
from zopro_lightning.rl.rollout import RolloutSettings
from zopro_lightning.utils.checkpointing import (
    AtomicCheckpointIO,
    CheckpointIOError,
    ensure_writable,
)
from zopro_lightning.zo.samplers import ZOPrOSampler

from .conftest import count_words_reward

CHECKPOINTING = zopro_lightning.utils.checkpointing.__file__


pytestmark = pytest.mark.usefixtures("one_thread")  # bit-identity: one torch thread


def failing_save(after_bytes: bytes, error: BaseException):
    """A ``torch.save`` that writes a little, then fails like a full disk or a kill would."""

    def save(obj, handle, *args, **kwargs):
        handle.write(after_bytes)
        handle.flush()
        raise error

    return save


def temporaries(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def trainer(root, steps, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        plugins=[AtomicCheckpointIO()],
        **kwargs,
    )


# -- atomic writes ------------------------------------------------------------------------------
def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", failing_save(b"PK\x03\x04 partial", full))
    with pytest.raises(CheckpointIOError) as info:
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    message = str(info.value)
    assert str(path) in message  # the path
    assert "No space left on device" in message  # the cause
    assert "previous checkpoint" in message and "Fix: free space" in message  # the fix
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()

    assert temporaries(tmp_path) == []
    previous = io.load_checkpoint(path)
    assert previous["step"] == 1 and torch.equal(previous["w"], torch.ones(3))


def test_interrupt_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    monkeypatch.setattr(torch, "save", failing_save(b"partial", KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert temporaries(tmp_path) == []
    assert io.load_checkpoint(path)["step"] == 1


def test_process_killed_mid_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    script = textwrap.dedent(
        f"""
        import importlib.util, os, signal, torch

        # the module alone, without the package's heavier imports
        spec = importlib.util.spec_from_file_location("checkpointing", {CHECKPOINTING!r})
        checkpointing = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(checkpointing)
        AtomicCheckpointIO = checkpointing.AtomicCheckpointIO

        io = AtomicCheckpointIO()
        io.save_checkpoint({{"step": 1}}, {str(path)!r})

        def killed(obj, handle, *args, **kwargs):
            handle.write(b"PK partial")
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = killed
        io.save_checkpoint({{"step": 2}}, {str(path)!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]

    io = AtomicCheckpointIO()
    assert io.load_checkpoint(path)["step"] == 1  # intact
    assert len(temporaries(tmp_path)) == 1  # the dead writer's partial file
    io.save_checkpoint({"step": 3}, path)
    assert temporaries(tmp_path) == []  # removed by the next save
    assert io.load_checkpoint(path)["step"] == 3


def test_full_disk_during_fit_leaves_a_resumable_last_checkpoint(
    lora_policy, tokenizer, small_task, tmp_path, monkeypatch
):
    module = ZOPrOModule(
        lora_policy, tokenizer, count_words_reward, rollout=RolloutSettings(k=2, max_new_tokens=3)
    )
    real_save, calls = torch.save, []

    def save(obj, handle, *args, **kwargs):
        calls.append(obj["global_step"])
        if obj["global_step"] >= 2:
            handle.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    with pytest.raises(CheckpointIOError, match="No space left on device"):
        trainer(tmp_path, 3, callbacks=[checkpoint]).fit(
            module, ResumableDataLoader(small_task.train_prompts[:8], batch_size=2)
        )
    monkeypatch.undo()
    last = tmp_path / "ckpt" / "last.ckpt"
    assert temporaries(last.parent) == []
    assert torch.load(last, weights_only=True)["global_step"] == 1


# -- output directory -----------------------------------------------------------------------
def test_unwritable_output_directory_fails_before_any_work(tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("a regular file where a directory should be")
    target = blocker / "exp1" / "checkpoints"
    with pytest.raises(CheckpointIOError) as info:
        ensure_writable(target)
    message = str(info.value)
    assert str(target) in message and "Nothing was trained yet" in message
    assert "regular file, not a directory" in message
    assert ensure_writable(tmp_path / "fine" / "nested") == (tmp_path / "fine" / "nested")
    assert temporaries(tmp_path / "fine" / "nested") == []


def test_full_output_device_is_reported_by_ensure_writable(tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(CheckpointIOError, match=r"No space left on device.*Fix: free space"):
        ensure_writable(tmp_path / "out")
    monkeypatch.undo()
    with pytest.raises(CheckpointIOError, match="MiB free, less than"):
        ensure_writable(tmp_path / "out", min_free_bytes=2**62)


# -- the right model --------------------------------------------------------------------------
def small_fit(module, root, steps=1, **kwargs) -> L.Trainer:
    fit_trainer = trainer(root, steps, **kwargs)
    fit_trainer.fit(module, ResumableDataLoader(["review : the soup"] * 4, batch_size=2))
    return fit_trainer


def test_checkpoint_of_another_model_is_refused_before_anything_changes(
    lora_policy, tokenizer, tmp_path
):
    module = ZOPrOModule(
        lora_policy, tokenizer, count_words_reward, rollout=RolloutSettings(k=2, max_new_tokens=3)
    )
    path = tmp_path / "a.ckpt"
    small_fit(module, tmp_path).save_checkpoint(path)

    torch.manual_seed(1)
    other_policy = add_lora(
        build_tiny_causal_lm(
            tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64
        ),
        r=2,
        alpha=4,
    )
    sampler = ZOPrOSampler(decay="constant")
    other = ZOPrOModule(
        other_policy,
        tokenizer,
        count_words_reward,
        sampler,
        rollout=RolloutSettings(k=2, max_new_tokens=3),
    )
    before = {n: p.detach().clone() for n, p in other_policy.named_parameters()}
    with pytest.raises(ValueError) as info:
        trainer(tmp_path / "b", 2).fit(
            other, ResumableDataLoader(["review : the soup"] * 4, batch_size=2), ckpt_path=path
        )
    message = str(info.value)
    assert str(path) in message and "another model" in message
    assert "only in this module" in message  # layer 1's LoRA tensors
    assert "with another shape" in message and "(4, 32) -> (2, 32)" in message  # rank 4 vs 2
    assert "Fix:" in message
    assert all(torch.equal(p, before[n]) for n, p in other_policy.named_parameters())
    assert other.policy_updates == 0 and sampler.num_steps == 0


def test_checkpoint_without_zopro_state_is_refused(lora_policy, tokenizer):
    module = ZOPrOModule(lora_policy, tokenizer, count_words_reward, rollout=RolloutSettings(k=2))
    with pytest.raises(ValueError, match="not written by ZOPrOModule"):
        module.on_load_checkpoint({"state_dict": {}, "epoch": 0})


# -- weights-only loading -----------------------------------------------------------------------
class SaveAt(L.Callback):
    def __init__(self, batch_idx: int, path) -> None:
        self.batch_idx, self.path = batch_idx, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.batch_idx:
            trainer.save_checkpoint(self.path)


def test_checkpoints_load_with_weights_only(lora_policy, tokenizer, small_task, tmp_path):
    """Everything a run writes (ZOPrO sampler with directions, a rollout of an update still
    accumulating, recorder records, loop and dataloader state) is plain tensors and types."""
    sampler = ZOPrOSampler(decay="linear", total_steps=4)
    sampler.set_directions({n: torch.randn(p.shape) for n, p in lora_policy.named_parameters()})
    module = ZOPrOModule(
        lora_policy,
        tokenizer,
        count_words_reward,
        sampler,
        optimizer=OptimizerSettings(accumulate_batches=2),
        rollout=RolloutSettings(k=2, max_new_tokens=3),
    )
    module.iteration, module.phase = 2, "policy_learning"
    path = tmp_path / "mid.ckpt"
    fit_trainer = trainer(
        tmp_path, -1, max_epochs=1, callbacks=[RolloutRecorder(), SaveAt(2, path)]
    )
    fit_trainer.fit(module, ResumableDataLoader(small_task.train_prompts[:8], batch_size=2))

    checkpoint = torch.load(path, weights_only=True)  # saved after 3 of 4 batches
    zopro = checkpoint["zopro"]
    assert zopro["iteration"] == 2 and zopro["seed"] == 0 and zopro["policy_updates"] == 1
    assert len(zopro["pending"]) == 1  # the third batch's rollout waits for the fourth
    assert zopro["fingerprint"]["model_class"] == "PeftModelForCausalLM(LlamaForCausalLM)"
    loader_state = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader_state["_num_yielded"] == 3  # torchdata's StatefulDataLoader state
    assert len(checkpoint["callbacks"]["RolloutRecorder"]["records"]) == 6

    fresh = ZOPrOModule(
        lora_policy,
        tokenizer,
        count_words_reward,
        ZOPrOSampler(decay="linear"),
        optimizer=OptimizerSettings(accumulate_batches=2),
        rollout=RolloutSettings(k=2),
    )
    fresh.on_load_checkpoint(AtomicCheckpointIO().load_checkpoint(path))
    assert fresh.iteration == 2 and fresh.policy_updates == 1 and len(fresh._pending) == 1
    assert fresh.sampler.state_dict()["mu"].keys() == sampler.state_dict()["mu"].keys()


class Opaque:
    """Not a tensor or a plain type: needs full unpickling."""


def test_pickled_objects_need_an_explicit_weights_only_false(tmp_path):
    path = tmp_path / "foreign.ckpt"
    torch.save({"hyper_parameters": {"config": Opaque()}}, path)
    io = AtomicCheckpointIO()
    with pytest.raises(pickle.UnpicklingError, match=r"weights_only=True.*weights_only=False"):
        io.load_checkpoint(path)
    assert isinstance(
        io.load_checkpoint(path, weights_only=False)["hyper_parameters"]["config"], Opaque
    )


# -- damaged files ------------------------------------------------------------------------------
def truncated_copy(source, target, keep: float = 0.5):
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * keep)])
    return target


def test_truncated_checkpoint_is_named_by_the_loader(tmp_path):
    io = AtomicCheckpointIO()
    whole = tmp_path / "whole.ckpt"
    io.save_checkpoint({"step": 3, "weights": torch.randn(2000)}, whole)
    last = truncated_copy(whole, tmp_path / "last.ckpt")
    with pytest.raises(CheckpointIOError) as info:
        io.load_checkpoint(last)
    message = str(info.value)
    assert f"Checkpoint {last} is damaged" in message and "truncated?" in message
    assert "ckpt_path=<another .ckpt>" in message


def test_flipped_byte_fails_the_crc_check(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"weights": torch.randn(2000)}, path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert "fails its CRC check" in zopro_lightning.utils.checkpointing.checkpoint_problem(path)


def test_resume_sets_a_truncated_last_checkpoint_aside(tmp_path, caplog):
    from zopro_lightning.utils.checkpointing import resumable_checkpoint

    whole = tmp_path / "whole.ckpt"
    torch.save({"step": 3, "weights": torch.randn(2000)}, whole)
    assert resumable_checkpoint(whole) == str(whole)
    assert resumable_checkpoint(tmp_path / "absent.ckpt") is None
    last = truncated_copy(whole, tmp_path / "last.ckpt")
    with caplog.at_level("WARNING", logger="zopro_lightning.utils.checkpointing"):
        assert resumable_checkpoint(last) is None
    assert not last.exists() and (tmp_path / "last.ckpt.damaged").exists()
    assert f"{last} is damaged" in caplog.text and "moved to last.ckpt.damaged" in caplog.text
    assert "Resuming from the state saved before this checkpoint" in caplog.text


def test_damaged_run_state_falls_back_to_the_last_state_that_verifies(tmp_path, caplog):
    from zopro_lightning.run.state import last_finished_iteration, load_state, save_state

    for t in range(3):
        save_state(tmp_path, f"iteration_{t}", {"iteration": t, "x": torch.randn(500)})
    state = tmp_path / "state"
    latest = state / "iteration_2.pt"
    truncated_copy(latest, latest, keep=0.3)
    with caplog.at_level("WARNING", logger="zopro_lightning.utils.checkpointing"):
        assert last_finished_iteration(tmp_path) == 1
    assert load_state(tmp_path, "iteration_1")["iteration"] == 1
    assert (state / "iteration_2.pt.damaged").exists() and f"{latest} is damaged" in caplog.text
    start = save_state(tmp_path, "start", {"x": torch.randn(500)})
    truncated_copy(start, start)
    assert load_state(tmp_path, "start") is None  # the phase is redone
