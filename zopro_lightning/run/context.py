"""What every phase of a ``zopro-train`` run needs besides its own config: the run directory,
the device, the ranks, seeding, and factories for Lightning ``Trainer`` s and data loaders.

:class:`RunContext` holds the run's loggers and its :class:`RunProgress` (one logged step over
every phase's ``Trainer``), so the phases (:mod:`zopro_lightning.run.phases`) are small
functions of their config, their inputs and the context.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from zopro_lightning.callbacks.run_progress import PhaseProgressBar, RunProgress
from zopro_lightning.data.resumable import ResumableDataLoader
from zopro_lightning.run.loggers import finish_loggers, instantiate_loggers, start_loggers
from zopro_lightning.utils.checkpointing import ensure_writable
from zopro_lightning.utils.distributed import is_multi_process
from zopro_lightning.utils.memory import peak_rss_mb
from zopro_lightning.zo.spsa import derive_seed


def peak_memory_mb() -> float:
    """Peak resident memory of this process (CPU), or peak CUDA allocation when on a GPU."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


class RunContext:
    """The run directory, its loggers and step counter, and the factories every phase uses.

    Args:
        cfg: the composed config (``trainer``, ``logger``, ``seed``, ``loop.iterations``).
        run_dir: the run directory; checked writable at once, before any work.
    """

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = ensure_writable(run_dir)  # a bad output dir fails before any work
        self.resuming = bool(cfg.get("resume"))
        self.last_trainer: L.Trainer | None = None  # the latest phase's (DDP: its strategy)
        self.progress = RunProgress()
        self.loggers = instantiate_loggers(cfg.get("logger"), self.run_dir, self.is_global_zero)
        self.loggers_started = False

    # -- ranks and devices --------------------------------------------------------------------
    @property
    def is_global_zero(self) -> bool:
        """Whether this process writes the run's files (rank 0 under DDP; always on one).
        Before the first trainer: Lightning's rank from the environment (``LOCAL_RANK`` of a
        process its DDP launcher started, ``RANK`` under torchrun)."""
        if self.last_trainer is None:
            return rank_zero_only.rank == 0
        return self.last_trainer.is_global_zero

    def barrier(self) -> None:
        """Wait for every rank (after rank 0 wrote something the others read)."""
        if self.last_trainer is not None and is_multi_process(self.last_trainer):
            self.last_trainer.strategy.barrier()

    def device(self) -> torch.device:
        """Where generation and scoring run between Lightning phases: the GPU when the trainer
        uses one (Lightning moves a module back to the CPU at the end of every ``fit``)."""
        accelerator = str(self.cfg.trainer.get("accelerator", "cpu"))
        if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def to_device(self, *models: torch.nn.Module) -> None:
        """Move ``models`` to :meth:`device` (nothing moves on a CPU run)."""
        device = self.device()
        for model in models:
            if next(model.parameters()).device != device:
                model.to(device)

    # -- seeding and factories ----------------------------------------------------------------
    def seed_phase(self, phase: str, iteration: int = 0) -> None:
        """Seed the global RNGs from ``(seed, phase, iteration)`` at the start of each phase, so
        a phase's randomness (LoRA inits, fresh completions for refinement) does not depend on
        what ran before it in this process: a resumed run repeats it exactly."""
        L.seed_everything(derive_seed(self.cfg.seed, phase, iteration) % 2**32, verbose=False)

    def trainer(self, callbacks: Sequence[L.Callback] = (), **kwargs: Any) -> L.Trainer:
        """A Lightning Trainer for one phase, from the ``trainer`` config group, with the run's
        loggers, its :class:`RunProgress` and a progress bar that says where the run is."""
        factory: Callable[..., L.Trainer] = instantiate(self.cfg.trainer, _partial_=True)
        callbacks = [self.progress, *callbacks]
        if self.cfg.trainer.get("enable_progress_bar", True) and not any(
            isinstance(callback, ProgressBar) for callback in callbacks
        ):
            callbacks.append(PhaseProgressBar(self.progress, self.cfg.loop.iterations))
        options = {
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "enable_autolog_hparams": False,  # the loggers get the composed config, once
        } | kwargs
        trainer = factory(
            logger=self.loggers or False,
            callbacks=callbacks,
            default_root_dir=str(self.run_dir),
            **options,
        )
        self.last_trainer = trainer
        return trainer

    def loader(
        self, items: Sequence, batch_size: int, collate: Callable | None = None
    ) -> DataLoader:
        """A shuffled (seeded) loader whose position Lightning checkpoints and restores."""
        return ResumableDataLoader(
            list(items),
            batch_size=batch_size,
            shuffle=True,
            collate_fn=collate or (lambda batch: batch),
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )

    def bar_description(self, description: str) -> str | None:
        """``description`` for a progress bar of work outside a Trainer, or ``None`` (no bar)
        where the trainer config turns bars off or on ranks other than 0."""
        if not self.cfg.trainer.get("enable_progress_bar", True) or not self.is_global_zero:
            return None
        return description

    # -- loggers ------------------------------------------------------------------------------
    def start_loggers(self) -> None:
        """The composed config to every logger, once (a resumed run goes on in its own)."""
        start_loggers(self.loggers, self.cfg, self.resuming)
        self.loggers_started = True

    def close_loggers(self, failed: bool = False) -> None:
        """Finish the run's loggers (a W&B run is marked failed when the run ``failed``)."""
        if self.loggers_started:
            finish_loggers(self.loggers, failed=failed)
            self.loggers_started = False
