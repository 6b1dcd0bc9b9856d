"""Two-process DDP run of the whole pipeline, for ``tests/test_ddp_pipeline.py`` (not collected:
no ``test_`` prefix).

Run as ``python tests/ddp_pipeline_worker.py OUT_DIR``: the composed config asks for
``trainer.devices=2 +trainer.strategy=ddp`` on the CPU (gloo), so the first phase's ``fit``
(SFT) re-runs this script for rank 1, exactly as ``zopro-train`` would be re-run. Both ranks
then go through :func:`~zopro_lightning.run.pipeline.run_pipeline` (SFT, reward model, two
iterations of policy learning and refinement) into ``OUT_DIR/run``, and each saves what the
test compares to ``OUT_DIR/rank_<r>.pt``:

- ``policy`` / ``reward``: the final trainable tensors (``trainable_state``), and ``sft``: the
  policy's trainable tensors at the start of policy learning (the LoRA start on the SFT model);
- ``refinements``: per refinement, what this rank judged (``records``, ``pairs``: its own share
  of the chunk), what :meth:`Pipeline.refine` returned, and the pairs the reward model was
  trained on (the judge counts the pairs it is asked about: ``judge_queries``);
- ``written``: the run-directory paths this rank wrote (every atomic rename, ``os.replace``,
  and every adapter save, ``PeftModel.save_pretrained``), relative to the run directory;
- ``summary``: what ``run_pipeline`` returned on this rank; ``rank`` / ``world_size``.

Options (after ``OUT_DIR``), for the stop-and-resume tests: ``--devices 1`` runs one process
(no DDP); ``--resume`` adds ``resume=OUT_DIR/run``; ``--pause POINT`` makes every rank, on
reaching ``POINT``, write ``OUT_DIR/paused_rank<r>`` and wait (at most a minute) for the test
to stop it with a real signal, so that the stop lands exactly there. The points
(:data:`PAUSE_POINTS`): ``sft`` (``RUN_DIR/sft`` and ``state/sft.pt`` written), ``start``
(``state/start.pt``: r_0), ``policy_<t>`` (iteration ``t``'s policy phase done, its
refinement not begun), ``iteration_<t>`` (``state/iteration_<t>.pt`` written), ``update_<n>``
(inside a policy phase, before update ``n``, the checkpoint after update ``n - 1`` written).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from peft import PeftModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `tests.*`

from tests.test_cli import SMALL  # noqa: E402
from zopro_lightning.models.loading import trainable_state  # noqa: E402
from zopro_lightning.policy.module import ZOPrOModule  # noqa: E402
from zopro_lightning.reward.callables import HFRewardModel  # noqa: E402
from zopro_lightning.run import pipeline as pipeline_module  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"
OVERRIDES = [
    "~logger",
    *SMALL,
    "loop.iterations=2",
    "loop.steps_per_iteration=2",
    "interplay.snapshots=false",
    "num_threads=1",
    "trainer.accelerator=cpu",
    "+trainer.enable_progress_bar=false",
    "loop.checkpoint_every=1",
]
DDP = ["trainer.devices=2", "+trainer.strategy=ddp"]
PAUSE_POINTS = ("sft", "start", "policy_<t>", "iteration_<t>", "update_<n>")
PAUSE_SECONDS = 60


class Pause:
    """Where this run waits for its signal (``--pause``; ``None``: nowhere)."""

    point: str | None = None
    out: Path | None = None

    @classmethod
    def at(cls, point: str) -> None:
        """At ``point`` when it is the one asked for: note it, then wait for the signal."""
        if point != cls.point or cls.out is None:
            return
        rank = int(os.environ.get("LOCAL_RANK", 0))
        (cls.out / f"paused_rank{rank}").touch()
        deadline = time.monotonic() + PAUSE_SECONDS
        while time.monotonic() < deadline:
            time.sleep(0.02)  # a signal's KeyboardInterrupt (or SIGTERM's end) comes in here
        raise RuntimeError(f"paused at {point} for {PAUSE_SECONDS} s and no signal came")


class PauseBeforeUpdate(L.Callback):
    """``Pause.at("update_<n>")`` before policy update ``n`` (its predecessor checkpointed)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        Pause.at(f"update_{pl_module.policy_updates}")


class CountingJudge:
    """The configured judge, counting the pairs it is asked about in ``n_queries`` (a counter
    the summary reports as ``judge_queries``, as it does the LLM judge's)."""

    def __init__(self, judge: Any) -> None:
        self.judge = judge
        self.n_queries = 0

    def __call__(self, prompts: list[str], first: list[str], second: list[str]) -> Any:
        self.n_queries += len(prompts)
        return self.judge(prompts, first, second)


class RecordingPipeline(pipeline_module.Pipeline):
    """The pipeline, keeping its policy-learning start and what each refinement judged and
    trained on; the last one built is :attr:`instance`."""

    instance: RecordingPipeline | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refinements: list[dict[str, Any]] = []
        self.policy_start: dict[str, torch.Tensor] | None = None
        RecordingPipeline.instance = self

    def build_judge(self, reward: HFRewardModel) -> CountingJudge:
        return CountingJudge(super().build_judge(reward))

    def learn_policy(self, t: int, prompts: Sequence[str], callbacks: list[L.Callback]) -> None:
        if self.policy_start is None:
            self.policy_start = trainable_state(self.policy_module.policy)
        super().learn_policy(t, prompts, [*callbacks, PauseBeforeUpdate()])
        Pause.at(f"policy_{t}")

    def supervised_fine_tuning(self) -> torch.nn.Module:
        model = super().supervised_fine_tuning()
        Pause.at("sft")
        return model

    def save_run_state(self, name: str, payload: dict[str, Any]) -> None:
        super().save_run_state(name, payload)
        if name == "start":
            Pause.at(name)

    def save_iteration(self, t: int, *args: Any) -> None:
        super().save_iteration(t, *args)
        Pause.at(f"iteration_{t}")

    def refine(
        self,
        reward: HFRewardModel,
        policy_module: ZOPrOModule,
        records: list[tuple[str, str]],
        trainer: Any = None,
    ) -> dict[str, int]:
        from zopro_lightning.reward import refinement as refinement_module
        from zopro_lightning.reward import training as training_module

        entry: dict[str, Any] = {"records": len(records), "prompts": [p for p, _ in records]}
        self.refinements.append(entry)
        judged_pairs = refinement_module.judged_pairs
        fit_reward_model = training_module.fit_reward_model

        def counted(
            module: ZOPrOModule, judge: Any, records_: list, **kwargs: Any
        ) -> list[dict[str, str]]:
            pairs = judged_pairs(module, judge, records_, **kwargs)  # this rank's own pairs
            entry["pairs"] = len(pairs)
            return pairs

        def recorded(reward_: HFRewardModel, rows: Sequence[dict], *args: Any, **kw: Any) -> None:
            entry["trained_on"] = list(rows)  # what the reward model is refined on
            fit_reward_model(reward_, rows, *args, **kw)

        refinement_module.judged_pairs = counted
        training_module.fit_reward_model = recorded
        try:
            entry["returned"] = super().refine(reward, policy_module, records, trainer)
        finally:
            refinement_module.judged_pairs = judged_pairs
            training_module.fit_reward_model = fit_reward_model
        return entry["returned"]


def record_writes(run_dir: Path, written: list[str]) -> None:
    """Patch ``os.replace`` and ``PeftModel.save_pretrained`` to note, in ``written``, every
    path under ``run_dir`` they write (the pipeline's atomic files and adapters)."""

    def note(path: Any) -> None:
        path = Path(path).absolute()
        if path.is_relative_to(run_dir):
            written.append(str(path.relative_to(run_dir)))

    def replace(src: Any, dst: Any, *args: Any, _replace: Callable = os.replace, **kw: Any):
        note(dst)
        return _replace(src, dst, *args, **kw)

    def save_pretrained(self, directory: Any, *args: Any, _save=PeftModel.save_pretrained, **kw):
        note(directory)
        return _save(self, directory, *args, **kw)

    os.replace = replace
    PeftModel.save_pretrained = save_pretrained


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--pause")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out_dir).absolute()
    Pause.point, Pause.out = args.pause, out
    overrides = [*OVERRIDES, *(DDP if args.devices == 2 else ["trainer.devices=1"])]
    if args.resume:
        overrides.append(f"resume={out / 'run'}")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    written: list[str] = []
    record_writes(out / "run", written)
    pipeline_module.Pipeline = RecordingPipeline  # run_pipeline builds this one
    summary = pipeline_module.run_pipeline(cfg, out / "run")
    pipeline = RecordingPipeline.instance
    assert pipeline is not None
    trainer = pipeline.last_trainer
    assert trainer is not None
    distributed = args.devices > 1
    assert torch.distributed.is_initialized() == distributed
    rank = trainer.global_rank
    assert rank == (torch.distributed.get_rank() if distributed else 0)
    torch.save(
        {
            "rank": rank,
            "world_size": trainer.world_size,
            "policy": trainable_state(pipeline.policy_module.policy),
            "reward": trainable_state(pipeline.policy_module.reward_fn.model),
            "sft": pipeline.policy_start,
            "refinements": pipeline.refinements,
            "written": written,
            "summary": summary,
        },
        out / f"rank_{rank}.pt",
    )
    if distributed:
        torch.distributed.barrier()  # rank 0 exits (and the test reads) once both files exist
    if torch.distributed.is_initialized():  # gloo torn down at exit can abort the process
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
