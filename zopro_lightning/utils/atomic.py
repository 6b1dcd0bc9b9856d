"""The package's one way of writing a file or a directory so that a crash never leaves half of it.

- :func:`atomic_write`: ``write(tmp)`` into a temporary file beside the target
  (``.<name>.<pid>.<random>.tmp``), fsync it, ``os.replace`` it onto the target (atomic on POSIX
  within one file system) and fsync the directory, so the rename itself is durable. On any
  failure the temporary file is removed and the previous file is untouched; the error is
  raised as it came. :func:`atomic_write_text` and :func:`atomic_torch_save` are the two uses
  most callers need.
- :func:`replace_directory`: ``write(partial)`` into ``<target>.partial``, then one rename onto
  ``<target>`` (an older copy is moved aside first and removed after), for outputs that are
  directories (``save_pretrained``).

A process killed mid-write cannot clean up, but never reaches the rename either: the target is
whole (old or new), and :func:`remove_orphans` deletes the stray temporary files later.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"


def temporary_path(target: Path) -> Path:
    """A fresh temporary name beside ``target``: ``.<name>.<pid>.<random>.tmp``."""
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: not every platform allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Write ``path`` all or nothing: ``write(tmp)`` writes the temporary file (by name), which
    is then fsynced and renamed onto ``path``. Returns ``path``."""
    target = Path(path).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(target)
    try:
        write(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()
    fsync_directory(target.parent)
    return target


def atomic_write_text(path: str | Path, text: str) -> Path:
    """``text`` into ``path`` (UTF-8), all or nothing."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_torch_save(path: str | Path, payload: Any) -> Path:
    """``torch.save(payload)`` into ``path``, all or nothing."""
    import torch

    def save(temporary: Path) -> None:
        with open(temporary, "xb") as handle:
            torch.save(payload, handle)
            handle.flush()

    return atomic_write(path, save)


def remove_orphans(target: Path) -> None:
    """Remove temporary files of ``target`` left by writers that were killed mid-write."""
    for orphan in target.parent.glob(f".{target.name}.*{TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            orphan.unlink()
            log.info("removed %s, left by a write that was interrupted", orphan)


def replace_directory(target: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write(partial)`` into ``<target>.partial``, then rename it to ``target`` (an older copy
    is moved aside first and removed after). Returns ``target``."""
    target = Path(target)
    partial = target.with_name(f"{target.name}.partial")
    old = target.with_name(f"{target.name}.old")
    for stale in (partial, old):
        shutil.rmtree(stale, ignore_errors=True)
    write(partial)
    if target.exists():
        os.replace(target, old)
    os.replace(partial, target)
    fsync_directory(target.parent)
    shutil.rmtree(old, ignore_errors=True)
    return target
