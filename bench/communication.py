"""Bytes exchanged per policy update under 2-process DDP on CPU (gloo): zeroth-order SPSA vs
first-order AdamW, on the same model and batch, LoRA and full-parameter, several model sizes.

What is counted, per rank and per policy update (``ZOPrOModule`` under
``Trainer(strategy="ddp", accelerator="cpu", devices=2)``):

- first-order: the payload of every gradient bucket DDP all-reduces, summed by a DDP
  communication hook (``bucket.buffer()`` bytes; the hook then does DDP's usual
  divide-and-all-reduce). This is the size of the trainable set in float32, once per backward.
- zeroth-order: the payload of the step's reduce path (``ZerothOrderOptimizer.reduce_fn``,
  wrapped): the ``[3, q]`` float64 tensor ``(g, L+, L-)``, independent of the model.
- every collective issued inside a training batch, by name (torch profiler ``c10d::*`` ops),
  so that traffic outside those two paths (e.g. DDP's buffer broadcasts) would show.

"Payload" is the tensor each rank hands to the all-reduce; a ring all-reduce over ``N`` ranks
sends and receives ``2 (N - 1) / N`` times that per rank (1x for ``N = 2``).

Lightning 2.6's ``DDPStrategy(ddp_comm_hook=...)`` registers the hook only on CUDA, so on CPU
the bench registers it itself on the DDP wrapper at fit start (``register_comm_hook`` works
with gloo).

    python bench/communication.py                  # sizes tiny,small; LoRA and full
    python bench/communication.py --sizes tiny --modes lora --steps 2

Writes ``bench/results/communication.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

SIZES = {  # hidden, layers, heads, intermediate (vocabulary: the sentiment task's words)
    "tiny": (64, 2, 4, 128),
    "small": (256, 4, 4, 1024),
}
OPTIMIZERS = ("zeroth_order", "first_order")


class ByteCounter:
    """Running totals of the payload handed to all-reduces: ``bytes`` and ``calls``."""

    def __init__(self) -> None:
        self.bytes = 0
        self.calls = 0

    def add(self, tensor) -> None:
        self.bytes += tensor.numel() * tensor.element_size()
        self.calls += 1


def counting_allreduce_hook(counter: ByteCounter, bucket):
    """DDP communication hook: count the bucket's bytes, then average it across ranks
    (divide by the world size, all-reduce-sum), as DDP's default hook does."""
    import torch.distributed as dist

    buffer = bucket.buffer()
    counter.add(buffer)
    buffer.div_(dist.get_world_size())
    work = dist.all_reduce(buffer, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


def communication_meter():
    """A Lightning callback measuring the traffic of each training batch (see module doc)."""
    import lightning as L
    from torch.profiler import ProfilerActivity, profile

    from zopro_lightning.utils.distributed import ddp_wrapper

    class CommunicationMeter(L.Callback):
        def __init__(self) -> None:
            self.counter = ByteCounter()
            self.collectives: list[list[str]] = []
            self._profiler = None

        def on_fit_start(self, trainer, pl_module) -> None:
            if pl_module.hparams.optimizer == "zeroth_order":
                optimizer = trainer.optimizers[0]
                reduce = optimizer.reduce_fn
                if reduce is None:
                    raise RuntimeError("zeroth-order optimizer has no reduce_fn: not under DDP?")

                def counted_reduce(values):
                    self.counter.add(values)
                    return reduce(values)

                optimizer.reduce_fn = counted_reduce
            else:
                ddp = ddp_wrapper(trainer)
                if ddp is None:
                    raise RuntimeError("no DistributedDataParallel wrapper: not under DDP?")
                ddp.register_comm_hook(self.counter, counting_allreduce_hook)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._profiler = profile(activities=[ProfilerActivity.CPU])
            self._profiler.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._profiler.__exit__(None, None, None)
            events = self._profiler.events()
            self.collectives.append([e.name for e in events if e.name.startswith("c10d::")])
            self._profiler = None

    return CommunicationMeter()


def worker(args: argparse.Namespace) -> None:
    """One DDP rank: a short fit per (size, mode, optimizer); rank 0 writes the rows."""
    import torch

    from zopro_lightning.data.sentiment import build_sentiment_task
    from zopro_lightning.models.tokenizer import build_word_tokenizer

    torch.set_num_threads(args.threads)
    task = build_sentiment_task(
        seed=0, n_train_prompts=64, n_eval_prompts=2, n_sft=8, n_train_pairs=2, n_eval_pairs=2
    )
    tokenizer = build_word_tokenizer(task.corpus())
    rows, rank = [], 0
    for size in args.sizes.split(","):
        for mode in args.modes.split(","):
            for optimizer in OPTIMIZERS:
                row, rank = measure_fit(args, task, tokenizer, size, mode, optimizer)
                rows.append(row)
    if rank == 0:
        Path(args.worker).write_text(json.dumps(rows))


def measure_fit(
    args: argparse.Namespace, task, tokenizer, size: str, mode: str, optimizer: str
) -> tuple[dict, int]:
    """One fit of ``args.steps`` updates under DDP with a :func:`communication_meter`: its
    row of counted traffic, and this process's rank."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from zopro_lightning import ZOPrOModule
    from zopro_lightning.models.loading import add_lora, build_tiny_causal_lm
    from zopro_lightning.policy.optimization import OptimizerSettings
    from zopro_lightning.rl.rollout import RolloutSettings

    def reward(prompts: list[str], completions: list[str]) -> torch.Tensor:
        return torch.tensor([float(len(c.split())) for c in completions])

    hidden, layers, heads, inter = SIZES[size]
    policy = build_tiny_causal_lm(
        tokenizer, hidden_size=hidden, num_layers=layers, num_heads=heads,
        intermediate_size=inter,
    )  # fmt: skip
    if mode == "lora":
        policy = add_lora(policy, r=8, alpha=16)
    module = ZOPrOModule(
        policy, tokenizer, reward,
        optimizer=OptimizerSettings(optimizer, lr=1e-4),
        rollout=RolloutSettings(k=args.k, max_new_tokens=args.max_new_tokens, beta=0.0),
    )  # fmt: skip
    meter = communication_meter()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=args.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[meter],
    )  # fmt: skip
    loader = DataLoader(list(task.train_prompts), batch_size=args.batch, collate_fn=list)
    trainer.fit(module, loader)
    updates = module.policy_updates
    by_name: dict[str, float] = {}
    for names in meter.collectives:
        for name in names:
            by_name[name] = by_name.get(name, 0) + 1 / updates
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    row = {
        "size": size,
        "mode": mode,
        "optimizer": optimizer,
        "params_total": sum(p.numel() for p in policy.parameters()),
        "params_trainable": trainable,
        "trainable_float32_bytes": 4 * trainable,
        # broadcast by DDP before a first-order forward (not in bytes_per_update)
        "module_buffer_bytes": sum(b.numel() * b.element_size() for b in policy.buffers()),
        "updates": updates,
        "bytes_per_update": meter.counter.bytes / updates,
        "all_reduce_calls_per_update": meter.counter.calls / updates,
        "collectives_per_update": by_name,
        "collectives_first_update": meter.collectives[0],
    }
    return row, trainer.global_rank


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--steps", type=int, default=3, help="policy updates per fit")
    parser.add_argument("--batch", type=int, default=2, help="prompts per rank per update")
    parser.add_argument("--k", type=int, default=2, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank")
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as scratch:
        rows_file = Path(scratch) / "rows.json"
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "MASTER_PORT")}
        env["OMP_NUM_THREADS"] = str(args.threads)
        # Lightning's "ddp" launcher re-runs this command line for rank 1
        command = [sys.executable, __file__, *(argv or sys.argv[1:]), "--worker", str(rows_file)]
        subprocess.run(command, check=True, env=env)
        rows = json.loads(rows_file.read_text())
    ratios = summarise(args, rows)
    out = Path(args.out or Path(__file__).parent / "results" / "communication.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result_block(args, rows, ratios), indent=2))
    print(
        f"{'size':>6} {'mode':>5} {'trainable':>10} {'ZO bytes/update':>16} "
        f"{'FO bytes/update':>16} {'FO/ZO':>10}"
    )
    for r in ratios:
        print(
            f"{r['size']:>6} {r['mode']:>5} {r['params_trainable']:>10} "
            f"{r['zeroth_order_bytes_per_update']:>16.0f} "
            f"{r['first_order_bytes_per_update']:>16.0f} {r['first_over_zeroth']:>10.0f}"
        )
    print(f"wrote {out}")


def summarise(args: argparse.Namespace, rows: list[dict]) -> list[dict]:
    """Per size and mode: the bytes per update of each optimizer and their ratio."""
    ratios = []
    for size in args.sizes.split(","):
        for mode in args.modes.split(","):
            by_opt = {r["optimizer"]: r for r in rows if r["size"] == size and r["mode"] == mode}
            zo, fo = by_opt["zeroth_order"], by_opt["first_order"]
            ratios.append(
                {
                    "size": size,
                    "mode": mode,
                    "params_trainable": zo["params_trainable"],
                    "zeroth_order_bytes_per_update": zo["bytes_per_update"],
                    "first_order_bytes_per_update": fo["bytes_per_update"],
                    "first_over_zeroth": fo["bytes_per_update"] / zo["bytes_per_update"],
                }
            )
    return ratios


def result_block(args: argparse.Namespace, rows: list[dict], ratios: list[dict]) -> dict:
    """``communication.json``: the environment, the settings, the summary and the rows."""
    import lightning
    import peft
    import torch
    import transformers

    return {
        "benchmark": "communication",
        "date": datetime.now(timezone.utc).isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip()
        + f", {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "world_size": 2,
        "backend": "gloo",
        "strategy": "ddp",
        "prompts_per_rank": args.batch,
        "completions_per_prompt": args.k,
        "max_new_tokens": args.max_new_tokens,
        "threads_per_rank": args.threads,
        "num_perturbations": 1,
        "counted": (
            "payload bytes each rank hands to all-reduce per policy update: first-order via a "
            "DDP comm hook (gradient buckets), zeroth-order via the wrapped reduce_fn; "
            "collectives_per_update lists every c10d op seen in a training batch (the "
            "first-order c10d::broadcast_ are DDP's buffer broadcasts, module_buffer_bytes "
            "each, and its one-off bucket-order sync)"
        ),
        "summary": ratios,
        "measurements": rows,
    }


if __name__ == "__main__":
    main()
