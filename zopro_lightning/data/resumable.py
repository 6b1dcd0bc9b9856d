"""A ``DataLoader`` whose position inside an epoch survives a checkpoint.

What Lightning 2.6 restores on ``fit(ckpt_path=...)``: the loop counters (epoch, batches of the
current epoch, global step), optimizers, LR schedulers, callback states, and, for every training
dataloader that has ``state_dict``/``load_state_dict`` (Lightning's ``_Stateful``), that
dataloader's state (``checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]``),
which it loads *before* creating the epoch's iterator (a save made after ``fit`` returned has
no loader state: Lightning has let go of the loaders by then). A plain
``torch.utils.data.DataLoader`` has no such state: a mid-epoch resume starts the epoch over with
a new shuffle (Lightning warns "resuming from a checkpoint that ended before the epoch ended").

:class:`ResumableDataLoader` is that stateful dataloader, with the smallest state that makes the
data stream exact: the state of the loader's random generator when the current pass began, and
how many batches of the pass the trainer has taken. Everything a pass draws (the shuffle
permutation and the workers' base seed) comes from that generator, so restoring it and skipping
the batches already taken reproduces the uninterrupted stream batch for batch, including the
passes after the resumed one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader


class ResumableDataLoader(DataLoader):
    """Drop-in ``DataLoader`` (same arguments) with ``state_dict``/``load_state_dict``.

    Without a ``generator`` argument one is created, seeded from the global RNG as
    ``RandomSampler`` would be; pass ``generator=torch.Generator().manual_seed(s)`` for a
    reproducible order. The shuffle must come from this generator (``shuffle=True``, or a
    sequential order); a custom ``sampler`` with its own randomness is restored only if its
    order depends on the epoch alone (``set_epoch``, as ``DistributedSampler``).

    Skipped batches are loaded and discarded (not skipped at the index level), which keeps the
    stream bit-identical, workers' seeds included, at the cost of re-reading the skipped items:
    negligible for prompt lists. Not exact with ``persistent_workers=True`` (its passes after
    the first draw no new base seed) or when ``limit_train_batches`` cuts epochs short and the
    checkpoint falls on an epoch's last batch.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("generator") is None:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            kwargs["generator"] = torch.Generator().manual_seed(seed)
        super().__init__(*args, **kwargs)
        self._pass_start_state: torch.Tensor = self.generator.get_state()
        self._batches_taken = 0
        self._pass_complete = False
        self._to_restore: tuple[torch.Tensor, int] | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        skip = 0
        if self._to_restore is not None:
            generator_state, skip = self._to_restore
            self._to_restore = None
            self.generator.set_state(generator_state)
        self._pass_start_state = self.generator.get_state()
        self._batches_taken = 0
        self._pass_complete = False
        return self._counted(super().__iter__(), skip)

    def _counted(self, batches: Iterator[Any], skip: int) -> Iterator[Any]:
        for index, batch in enumerate(batches):
            if index < skip:
                continue
            self._batches_taken = index + 1
            yield batch
        self._pass_complete = True

    def state_dict(self) -> dict[str, Any]:
        """``generator``: RNG state when the pass to resume begins; ``batches``: batches of it
        already taken. After a full pass, the state is that of the next pass's start."""
        if self._pass_complete or 0 < self._length() <= self._batches_taken:
            return {"generator": self.generator.get_state(), "batches": 0}
        return {"generator": self._pass_start_state.clone(), "batches": self._batches_taken}

    def _length(self) -> int:
        try:
            return len(self)
        except TypeError:  # an IterableDataset without __len__
            return 0

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Make the next ``iter()`` resume the saved pass after its taken batches."""
        self._to_restore = (state["generator"], int(state["batches"]))
