"""Checkpoint files that survive crashes, and that belong to the model that loads them.

- :class:`AtomicCheckpointIO`: a Lightning ``CheckpointIO`` plugin. A checkpoint is written to a
  temporary file in the target's directory, flushed and fsynced, then moved over the target with
  ``os.replace`` (atomic on POSIX within one file system). A full disk, a failing write or a
  process killed mid-write therefore never leaves a truncated ``last.ckpt``: the previous
  checkpoint stays as it was. Loading defaults to ``torch.load(weights_only=True)``.
- :func:`ensure_writable`: called once at the start of a run, so an unwritable output directory
  fails before any training is spent.
- :func:`checkpoint_problem` / :func:`resumable_checkpoint`: whether a checkpoint file is whole
  (every member of its zip archive passes its CRC check) before a resume trusts it; a damaged
  one (cut short by a copy, a full disk under a non-atomic writer) is set aside as
  ``<name>.damaged`` with a warning naming it, and the resume goes on from the last state that
  verifies.
- :func:`model_fingerprint` / :func:`fingerprint_differences`: which model a checkpoint was
  written for (class, trainable tensor names and shapes), so a checkpoint of another model is
  refused with a readable message instead of a half-applied ``load_state_dict``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pickle
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from zopro_lightning.utils.atomic import atomic_torch_save, remove_orphans, temporary_path

log = logging.getLogger(__name__)



class CheckpointIOError(OSError):
    """A checkpoint (or the output directory) could not be written. The message names the path,
    the cause and the fix; ``errno`` is the cause's error number when it had one."""


def _fix_for(exc: BaseException) -> str:
    """What the user can do about ``exc``."""
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (
            "free space on that device (e.g. delete old checkpoints), or point the output "
            "directory (Trainer(default_root_dir=...) / ModelCheckpoint(dirpath=...)) at a device "
            "with room"
        )
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (
            "make the directory writable for this user (or mount it read-write), or choose "
            "another output directory"
        )
    if code in (errno.ENOTDIR, errno.EEXIST):
        return (
            "a component of the path is a regular file, not a directory: move that file away or "
            "choose another output directory"
        )
    return "check that the directory exists, is writable and has free space, then run again"


def _error(message: str, exc: BaseException) -> CheckpointIOError:
    error = CheckpointIOError(message)
    error.errno = getattr(exc, "errno", None)
    return error


def ensure_writable(directory: _PATH, min_free_bytes: int = 0) -> Path:
    """Create ``directory`` if needed and prove that a file can be written and fsynced in it.

    Call it at the start of a run for every output directory, so that a typo, a read-only mount
    or a full disk fails in a second instead of after the first hour of training.

    Args:
        directory: the output (or checkpoint) directory.
        min_free_bytes: fail as well when the device has less free space than this.

    Returns:
        the directory as an absolute ``Path``.

    Raises:
        CheckpointIOError: naming the directory, the cause and the fix.
    """
    path = Path(directory).expanduser().absolute()
    probe = temporary_path(path / ".write-probe")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "xb") as handle:
            handle.write(b"zopro")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise _error(
            f"Output directory {path} is not writable: {exc.strerror or exc} "
            f"({type(exc).__name__}). Nothing was trained yet. Fix: {_fix_for(exc)}.",
            exc,
        ) from exc
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    if min_free_bytes > 0:
        stats = os.statvfs(path)
        free = stats.f_bavail * stats.f_frsize
        if free < min_free_bytes:
            exc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise _error(
                f"Output directory {path} has {free / 2**20:.1f} MiB free, less than the "
                f"{min_free_bytes / 2**20:.1f} MiB asked for. Fix: {_fix_for(exc)}.",
                exc,
            )
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose writes are all-or-nothing and whose reads are weights-only.

    Saving (local paths): ``torch.save`` into ``.<name>.<pid>.<random>.tmp`` next to the target,
    ``flush`` + ``fsync``, ``os.replace`` onto the target, then ``fsync`` of the directory so the
    rename itself is durable. On any failure the temporary file is removed, the previous
    checkpoint is untouched, and a :class:`CheckpointIOError` names the path, the cause and the
    fix. A process killed mid-write (SIGKILL, OOM killer) cannot clean up, but it also never
    reaches ``os.replace``: the previous checkpoint is intact, and the orphaned temporary file is
    removed by the next successful save of the same target. Remote URLs (``s3://`` ...) go
    through Lightning's own fsspec transaction.

    Loading: ``weights_only=None`` is taken as ``True`` (only tensors and plain containers are
    unpickled, so a checkpoint cannot run code). ``ZOPrOModule`` checkpoints hold nothing else.
    It cannot be used for a checkpoint whose hyper-parameters or callback states pickled
    arbitrary objects (e.g. an OmegaConf config passed to ``save_hyperparameters``); such a file
    fails with a message saying so, and may be loaded, if it is trusted, with
    ``trainer.fit(..., weights_only=False)``.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__} does not use storage_options; drop the argument."
            )
        target = Path(path).absolute()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _error(
                f"Could not create the directory of checkpoint {target}: "
                f"{exc.strerror or exc} ({type(exc).__name__}). Fix: {_fix_for(exc)}.",
                exc,
            ) from exc
        try:
            atomic_torch_save(target, checkpoint)
        except BaseException as exc:
            if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: cleaned, re-raised
                raise
            previous = (
                f"the previous checkpoint at {target} is untouched"
                if target.exists()
                else f"no checkpoint was written at {target}"
            )
            cause = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise _error(
                f"Could not write checkpoint {target}: {cause} ({type(exc).__name__}); "
                f"{previous} and the partial file was removed. Fix: {_fix_for(exc)}.",
                exc,
            ) from exc
        remove_orphans(target)

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Load with ``weights_only=True`` unless the caller passed ``False`` explicitly."""
        safe = True if weights_only is None else weights_only
        problem = checkpoint_problem(path) if "://" not in str(path) else None
        if problem is not None:
            raise _error(
                f"Checkpoint {path} is damaged: {problem}. Fix: resume from an earlier "
                "checkpoint (ckpt_path=<another .ckpt>), or delete this one and start the fit "
                "afresh.",
                OSError(errno.EIO, problem),
            )
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=safe)
        except pickle.UnpicklingError as exc:
            if not safe:
                raise
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise pickle.UnpicklingError(
                f"Checkpoint {path} holds objects other than tensors and plain containers, so it "
                f"cannot be loaded with weights_only=True ({reason}). If the file is yours and "
                "trusted, load it with trainer.fit(..., weights_only=False); checkpoints written "
                "by ZOPrOModule never need that."
            ) from exc


def checkpoint_problem(path: _PATH) -> str | None:
    """Why the checkpoint (or state) file at ``path`` cannot be trusted, or ``None`` when it is
    whole: a ``torch.save`` file is a zip archive, and every member's CRC-32 is checked without
    unpickling anything. A missing file is a problem too."""
    path = Path(path)
    if not path.is_file():
        return "no such file"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        size = path.stat().st_size
        return f"not a whole torch.save archive ({exc}; {size} bytes: truncated?)"
    if bad is not None:
        return f"member {bad} fails its CRC check (the file was changed or damaged)"
    return None


def set_aside(path: _PATH, problem: str, fallback: str) -> Path:
    """Rename a damaged file to ``<name>.damaged`` (kept for inspection, out of the way of the
    next resume) and log a warning naming it, the problem and what is used instead."""
    path = Path(path)
    aside = path.with_name(path.name + ".damaged")
    os.replace(path, aside)
    log.warning("%s is damaged (%s); moved to %s. %s", path, problem, aside.name, fallback)
    return aside


def resumable_checkpoint(path: _PATH) -> str | None:
    """``path`` as a ``ckpt_path`` when the checkpoint there verifies; ``None`` when there is
    none, or when it is damaged: then it is set aside (:func:`set_aside`) and the phase starts
    again from the last state saved before it (the run's previous phase), so a resume still
    ends where an uninterrupted run ends, having redone the updates since that state."""
    path = Path(path)
    if not path.exists():
        return None
    problem = checkpoint_problem(path)
    if problem is None:
        return str(path)
    set_aside(
        path,
        problem,
        "Resuming from the state saved before this checkpoint instead; the updates since then "
        "are done again.",
    )
    return None


# -- which model a checkpoint belongs to ---------------------------------------------------------
def model_class_name(model: nn.Module) -> str:
    """``Wrapper(Base)`` for PEFT models (``PeftModelForCausalLM(LlamaForCausalLM)``), else the
    class name."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        return f"{type(model).__name__}({type(get_base()).__name__})"
    return type(model).__name__


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Model class and ``{name: shape}`` of the trainable tensors (plain types only, so it loads
    with ``weights_only=True``)."""
    return {
        "model_class": model_class_name(model),
        "trainable": {
            name: list(param.shape)
            for name, param in model.named_parameters()
            if param.requires_grad
        },
    }


def fingerprint_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], limit: int = 5
) -> list[str]:
    """Human-readable differences between two fingerprints (empty when they match)."""
    differences: list[str] = []
    if saved.get("model_class") != current.get("model_class"):
        differences.append(
            f"model class: checkpoint {saved.get('model_class')}, "
            f"this module {current.get('model_class')}"
        )
    before, now = dict(saved.get("trainable", {})), dict(current.get("trainable", {}))

    def listed(names: list[str]) -> str:
        shown = ", ".join(names[:limit])
        return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")

    only_saved = [n for n in before if n not in now]
    only_now = [n for n in now if n not in before]
    reshaped = [
        f"{n} {tuple(before[n])} -> {tuple(now[n])}"
        for n in before
        if n in now and list(before[n]) != list(now[n])
    ]
    if only_saved:
        differences.append(
            f"{len(only_saved)} trainable tensor(s) only in the checkpoint: {listed(only_saved)}"
        )
    if only_now:
        differences.append(
            f"{len(only_now)} trainable tensor(s) only in this module: {listed(only_now)}"
        )
    if reshaped:
        differences.append(
            f"{len(reshaped)} tensor(s) with another shape (checkpoint -> module): "
            f"{listed(reshaped)}"
        )
    return differences
