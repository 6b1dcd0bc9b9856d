"""A ``DataLoader`` whose position inside an epoch survives a checkpoint: torchdata's
``StatefulDataLoader`` with one fix for the passes after a resume.

What Lightning 2.6 restores on ``fit(ckpt_path=...)``: the loop counters (epoch, batches of the
current epoch, global step), optimizers, LR schedulers, callback states, and, for every training
dataloader that has ``state_dict``/``load_state_dict`` (Lightning's ``_Stateful``), that
dataloader's state (``checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]``),
which it loads *before* creating the epoch's iterator (a save made after ``fit`` returned has
no loader state: Lightning has let go of the loaders by then). A plain
``torch.utils.data.DataLoader`` has no such state: a mid-epoch resume starts the epoch over with
a new shuffle (Lightning warns "resuming from a checkpoint that ended before the epoch ended").

``torchdata.stateful_dataloader.StatefulDataLoader`` (0.11) has that state: the shuffle
generator's state when the current pass began and the samples taken, so the resumed pass is
exact. **Why a subclass:** a pass draws two things from the loader's one generator, the
permutation and then the workers' base seed (``_BaseDataLoaderIter.__init__``; drawn with or
without workers). On restore, ``StatefulDataLoader`` sets the generator back to the pass start
and redraws only the permutation, so the generator ends one base-seed draw behind the
uninterrupted run and *every pass after the resumed one* is shuffled differently (checked with
torchdata 0.11: tests/test_resume.py fails without the fix). :class:`ResumableDataLoader` also
saves the generator's state after the pass's draws and sets it once the restored iterator is
built: the stream then matches the uninterrupted one batch for batch, later passes included.
(The order itself differs from a plain ``DataLoader`` with the same generator, which draws the
base seed before the permutation; only resume exactness matters here.)
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

_GENERATOR_AFTER_DRAWS = "zopro_generator_after_draws"


class ResumableDataLoader(StatefulDataLoader):
    """``StatefulDataLoader`` (same arguments) whose resume is exact across later passes.

    Without a ``generator`` argument one is created, seeded from the global RNG as
    ``RandomSampler`` would be, so the shuffle and the workers' base seed share one generator
    whose state the checkpoint carries; pass ``generator=torch.Generator().manual_seed(s)`` for
    a reproducible order. A custom ``sampler`` with its own randomness is restored only if its
    order depends on the epoch alone (``set_epoch``, as ``DistributedSampler``): torchdata then
    fast-forwards it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("generator") is None:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            kwargs["generator"] = torch.Generator().manual_seed(seed)
        with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            super().__init__(*args, **kwargs)
        self._generator_to_restore: torch.Tensor | None = None

    def state_dict(self) -> dict[str, Any]:
        """torchdata's state plus the generator's state after the current pass's draws."""
        state = super().state_dict()  # may build the first iterator: its draws come first
        return {**state, _GENERATOR_AFTER_DRAWS: self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Make the next ``iter()`` resume the saved pass, and the passes after it."""
        state = dict(state)
        self._generator_to_restore = state.pop(_GENERATOR_AFTER_DRAWS, None)
        super().load_state_dict(state)

    def _get_iterator(self) -> Any:
        iterator = super()._get_iterator()  # a restoring iterator redraws the saved permutation
        if self._generator_to_restore is not None:
            self.generator.set_state(self._generator_to_restore)
            self._generator_to_restore = None
        return iterator
