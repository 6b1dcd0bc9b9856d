"""The full-parameter reference policy without a second model in memory (docs/algorithm.md
§2.1).

The KL penalty needs ``log pi_ref(y)`` under the SFT policy. With LoRA the reference is the
same network with its adapter switched off. Without LoRA, a ``deepcopy`` of the policy would
hold the weights twice on the training device. :class:`OffloadedReference` holds them once:

- at construction the trainable tensors (the only ones training changes) are written to a file
  (``torch.save``, all or nothing) and read back memory-mapped, so their pages belong to the
  page cache, not to the process: the OS reads them from disk as a forward needs them and may
  drop them again under memory pressure;
- the reference's forward is the live policy with each module's trainable tensors swapped for
  the file's, module by module, during that module's forward
  (:class:`~zopro_lightning.zo.layerwise.LayerwiseSubstitution`); on a GPU each module's tensors
  are copied to the device just before it runs and dropped just after, so the device holds
  one layer of the reference at a time.

Cost: one pass over the trainable tensors' bytes written at construction, and per rollout one
read of them (from the page cache when it holds them). The file lives in a temporary directory
(``TMPDIR``; keep it on a disk, not a RAM-backed ``tmpfs``) removed when the module is.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from zopro_lightning.utils.atomic import atomic_torch_save
from zopro_lightning.zo.layerwise import LayerwiseSubstitution


class OffloadedReference:
    """The reference policy as ``policy`` with its trainable tensors swapped, module by module,
    for their values at construction, read from a memory-mapped file.

    Args:
        policy: the network being trained (its trainable tensors are saved now).
        directory: where the file goes (default: a new temporary directory, removed with this
            object).
    """

    def __init__(self, policy: nn.Module, directory: str | Path | None = None) -> None:
        trainable = {n: p for n, p in policy.named_parameters() if p.requires_grad}
        if directory is None:
            directory = tempfile.mkdtemp(prefix="zopro-reference-")
            self._cleanup = weakref.finalize(self, shutil.rmtree, directory, True)
        self.path = Path(directory) / "reference.pt"
        atomic_torch_save(self.path, {n: p.detach().cpu() for n, p in trainable.items()})
        self.tensors: dict[str, Tensor] = torch.load(self.path, mmap=True, weights_only=True)
        self.policy = policy
        self.swap = LayerwiseSubstitution(policy, trainable)

    @property
    def nbytes(self) -> int:
        """Bytes of the saved tensors (on disk, mapped; not held by the process)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def _initial(self, name: str, current: Tensor) -> Tensor:
        return self.tensors[name].to(current.device, non_blocking=True)

    @contextmanager
    def __call__(self) -> Iterator[nn.Module]:
        """The policy as the reference while inside (its forward only; its weights untouched).

        Raises:
            ValueError: after a forward that read a trainable tensor outside its module's
                forward (the reference would not have been the SFT policy there).
        """
        with self.swap.substituted(self._initial) as touched:
            yield self.policy
        if touched:
            self.swap.check_covered(touched)
