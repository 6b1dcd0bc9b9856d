"""A ``DataLoader`` whose position inside an epoch survives a checkpoint: torchdata's
``StatefulDataLoader``, kept exact by a thin subclass.

What Lightning 2.6 restores on ``fit(ckpt_path=...)``: the loop counters (epoch, batches of the
current epoch, global step), optimizers, LR schedulers, callback states, and, for every training
dataloader that has ``state_dict``/``load_state_dict`` (Lightning's ``_Stateful``), that
dataloader's state (``checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]``),
which it loads *before* creating the epoch's iterator (a save made after ``fit`` returned has
no loader state: Lightning has let go of the loaders by then). A plain
``torch.utils.data.DataLoader`` has no such state: a mid-epoch resume starts the epoch over with
a new shuffle (Lightning warns "resuming from a checkpoint that ended before the epoch ended").

``torchdata.stateful_dataloader.StatefulDataLoader`` (0.11) has that state (batches and samples
taken, fast-forwarded on restore). **Why a subclass**, two things it does not get right alone:

* a pass draws two things from the loader's one generator, the workers' base seed and the
  permutation. With ``shuffle=True`` it uses its own ``RandomSampler``, which restores the
  permutation but not the base-seed draw, so every pass *after* the resumed one is shuffled
  differently (tests/test_resume.py shows it); and Lightning under DDP does not recognise that
  sampler as a ``RandomSampler``, wraps it in ``DistributedSamplerWrapper``, and the resumed
  pass itself comes out in another order (tests/test_ddp.py). :class:`ResumableDataLoader`
  shuffles with torch's ``RandomSampler`` (under DDP Lightning swaps it for an epoch-seeded
  ``DistributedSampler``; alone, the stream is a plain ``DataLoader``'s);
* the generator's state when the current pass began, and its state at the save, are kept
  with torchdata's state. The first is set back before the restored pass's iterator is built,
  so it draws the same base seed and permutation (torchdata then skips the samples already
  taken); the second right after, so the passes after it follow as in the uninterrupted run
  (it also holds draws the fast-forward does not repeat: torch's ``RandomSampler`` draws once
  more when a pass ends). A save after a pass's last batch keeps only the second: the next
  ``iter()`` is the next pass, which is what Lightning expects of a checkpoint on an epoch's
  last batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import RandomSampler
from torchdata.stateful_dataloader import StatefulDataLoader

_PASS_START = "zopro_generator_at_pass_start"
_AT_SAVE = "zopro_generator_at_save"


class ResumableDataLoader(StatefulDataLoader):
    """``StatefulDataLoader`` (same keyword arguments) whose resume is exact, later passes and
    DDP included.

    Without a ``generator`` argument one is created, seeded from the global RNG as
    ``RandomSampler`` would be; pass ``generator=torch.Generator().manual_seed(s)`` for a
    reproducible order. ``shuffle=True`` becomes ``sampler=RandomSampler(dataset, generator)``.
    A custom ``sampler`` with its own randomness is restored only if its order depends on the
    epoch alone (``set_epoch``, as ``DistributedSampler``). Not exact with
    ``persistent_workers=True`` (its passes after the first draw no new base seed).
    """

    def __init__(self, dataset: Any, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("generator") is None:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            kwargs["generator"] = torch.Generator().manual_seed(seed)
        if kwargs.get("shuffle") and kwargs.get("sampler") is None:
            kwargs["shuffle"] = False
            kwargs["sampler"] = RandomSampler(dataset, generator=kwargs["generator"])
        with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            super().__init__(dataset, *args, **kwargs)
        self._pass_start: torch.Tensor = self.generator.get_state()
        self._to_restore: tuple[torch.Tensor, torch.Tensor] | None = None

    def state_dict(self) -> dict[str, Any]:
        """torchdata's state plus the generator's states at the pass start and now; once the
        pass has given all its batches, only the generator's state: resume at the next pass
        (Lightning then starts the next epoch with one ``iter()``, as it does uninterrupted)."""
        state = super().state_dict()  # may build the first iterator (and record its start)
        at_save = self.generator.get_state()
        if state.get("_iterator_finished") or 0 < self._length() <= state.get("_num_yielded", 0):
            return {_AT_SAVE: at_save}
        return {**state, _PASS_START: self._pass_start, _AT_SAVE: at_save}

    def _length(self) -> int:
        try:
            return len(self)
        except TypeError:  # an IterableDataset without __len__
            return 0

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Make the next ``iter()`` resume the saved pass, and the passes after it."""
        state = dict(state)
        if state.keys() == {"generator", "batches"}:  # saved before torchdata (0.1.0)
            state = self._from_pass_start_and_batches(state["generator"], int(state["batches"]))
        pass_start, at_save = state.pop(_PASS_START, None), state.pop(_AT_SAVE, None)
        self._to_restore = None if at_save is None else (pass_start, at_save)
        super().load_state_dict(state)

    def _from_pass_start_and_batches(self, pass_start: torch.Tensor, batches: int) -> dict:
        """The state of a checkpoint written by the pre-torchdata loader (generator state at
        the pass start, batches taken; its stream is this one's): replayed on a twin."""
        generator = torch.Generator()
        generator.set_state(pass_start)
        shuffled = isinstance(self.sampler, RandomSampler)
        twin = ResumableDataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=RandomSampler(self.dataset, generator=generator) if shuffled else self.sampler,
            collate_fn=self.collate_fn,
            drop_last=self.drop_last,
            generator=generator,
        )
        batches_of_twin = iter(twin)
        for _ in range(batches):
            next(batches_of_twin)
        return twin.state_dict()

    def _get_iterator(self) -> Any:
        restore, self._to_restore = self._to_restore, None
        if restore is not None and restore[0] is not None and self.next_iter_state is not None:
            self.generator.set_state(restore[0])  # the saved pass draws again ...
            self._pass_start = restore[0]
            iterator = super()._get_iterator()
            self.generator.set_state(restore[1])  # ... and the generator goes on from the save
            return iterator
        if restore is not None:  # saved at a pass end: the next pass starts from the save
            self.generator.set_state(restore[1])
        self._pass_start = self.generator.get_state()
        return super()._get_iterator()
