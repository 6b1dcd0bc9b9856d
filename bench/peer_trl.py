"""Peer comparison: TRL's ``RLOOTrainer`` against ``ZOPrOModule`` (first- and zeroth-order) on
the same work: the same start model, tokenizer, prompts, reward function and batch.

Two settings, each run in its own subprocess so that peak memory is that run's alone:

- ``lora``: the embedded sentiment task. The SFT policy of ``zopro-train``'s defaults (built
  once here), LoRA r=8 on every linear layer, 16 prompts x k=4 completions of up to 16 tokens
  per update, VADER's compound score as the reward. Time per update, peak memory, and mean
  gold reward on the held-out prompts after the same number of prompts.
- ``full``: full-parameter training of a larger Llama (built from a config, random weights:
  time and memory only), where the optimizer state and gradients of first-order methods
  dominate memory.

Memory on CPU is the process's peak resident set; ``peak_above_baseline_mb`` subtracts the
resident set after the libraries, model, tokenizer and data were loaded, i.e. what training
itself added. Needs ``pip install -e ".[bench]"`` (TRL).

    python bench/peer_trl.py                 # both settings (about 10 minutes on 2 cores)
    python bench/peer_trl.py --quick         # fewer updates

Writes ``bench/results/peer_trl.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results  # noqa: E402

from zopro_lightning.utils.memory import peak_rss_mb, rss_mb

RUNNERS = ("trl", "ours_first_order", "ours_zeroth_order")
FULL_MODEL = {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "intermediate_size": 2048}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def prepare_start(workdir: Path, seed: int) -> Path:
    """The SFT policy and the task's prompts of ``zopro-train``'s defaults, in ``workdir``."""
    from hydra import compose, initialize_config_dir

    from zopro_lightning.run.cli import CONFIG_DIR
    from zopro_lightning.run.pipeline import Pipeline

    start = workdir / "start"
    if (start / "prompts.json").exists():
        return start
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"seed={seed}", "~logger"])
    pipeline = Pipeline(cfg, start)
    pipeline.supervised_fine_tuning()  # writes start/sft (merged model + tokenizer)
    prompts = {
        "train": list(pipeline.task.train_prompts),
        "eval": list(pipeline.task.eval_prompts),
        "lora": {"r": cfg.model.lora.r, "alpha": cfg.model.lora.alpha},
    }
    from zopro_lightning.models.loading import build_tiny_causal_lm

    full = build_tiny_causal_lm(pipeline.tokenizer, max_position_embeddings=128, **FULL_MODEL)
    full.save_pretrained(start / "full")  # random weights: the full-parameter setting
    pipeline.tokenizer.save_pretrained(start / "full")
    (start / "prompts.json").write_text(json.dumps(prompts))
    return start


class UpdateClock:
    """Wall time of each policy update (from the end of the previous one)."""

    def __init__(self) -> None:
        self.marks: list[float] = [time.perf_counter()]

    def tick(self) -> None:
        self.marks.append(time.perf_counter())

    @property
    def seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


def build_policy(setting: str, start: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = start / ("sft" if setting == "lora" else "full")
    tokenizer = AutoTokenizer.from_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tokenizer


def run_ours(
    runner: str, setting: str, start: Path, steps: int, batch: int, k: int, seed: int
) -> dict:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from zopro_lightning.models.loading import add_lora
    from zopro_lightning.policy.module import ZOPrOModule
    from zopro_lightning.policy.optimization import OptimizerSettings
    from zopro_lightning.reward.callables import VaderSentimentReward
    from zopro_lightning.rl.rollout import RolloutSettings
    from zopro_lightning.zo.samplers import GaussianSampler

    meta = json.loads((start / "prompts.json").read_text())
    model, tokenizer = build_policy(setting, start)
    if setting == "lora":
        torch.manual_seed(seed)  # the LoRA init: the same as TRL's (set_seed, then peft)
        model = add_lora(
            model, r=meta["lora"]["r"], alpha=meta["lora"]["alpha"], target_modules=LORA_TARGETS
        )
    first_order = runner == "ours_first_order"
    module = ZOPrOModule(
        model,
        tokenizer,
        VaderSentimentReward(),
        GaussianSampler(),
        optimizer=OptimizerSettings(
            "first_order" if first_order else "zeroth_order", lr=1e-2 if first_order else 5e-3
        ),
        rollout=RolloutSettings(k=k, beta=0.05, max_new_tokens=16, normalize_advantages=True),
        seed=seed,
    )
    clock = UpdateClock()

    class Tick(L.Callback):
        def on_train_batch_end(self, *args) -> None:
            clock.tick()

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Tick()],
    )
    prompts = meta["train"][: steps * batch]
    loader = DataLoader(prompts, batch_size=batch, shuffle=False, collate_fn=list)
    baseline = rss_mb()
    clock.marks = [time.perf_counter()]
    trainer.fit(module, loader)
    result = {"seconds_per_update": clock.seconds, "baseline_mb": baseline}
    result["gold_after"] = gold_reward(module.policy, tokenizer, meta, setting)
    torch.set_grad_enabled(True)
    return result


def run_trl(setting: str, start: Path, steps: int, batch: int, k: int, seed: int) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RLOOTrainer

    from zopro_lightning.reward.callables import VaderSentimentReward

    meta = json.loads((start / "prompts.json").read_text())
    model, tokenizer = build_policy(setting, start)
    vader = VaderSentimentReward()

    def vader_reward(prompts, completions, **kwargs) -> list[float]:
        return vader(list(prompts), list(completions)).tolist()

    clock = UpdateClock()

    class Tick(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

    prompts = meta["train"][: steps * batch]
    trainer = RLOOTrainer(
        # full-parameter with beta > 0: TRL loads its reference copy from the model's path
        model=model if setting == "lora" else str(start / "full"),
        reward_funcs=vader_reward,
        args=trl_config(setting, start, steps, batch, k, seed),
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
        peft_config=trl_lora(meta) if setting == "lora" else None,
        callbacks=[Tick()],
    )
    baseline = rss_mb()
    clock.marks = [time.perf_counter()]
    trainer.train()
    result = {"seconds_per_update": clock.seconds, "baseline_mb": baseline}
    result["gold_after"] = gold_reward(trainer.model, tokenizer, meta, setting)
    return result


def trl_config(setting: str, start: Path, steps: int, batch: int, k: int, seed: int):
    """TRL's ``RLOOConfig`` doing what our module does: the same batches, sampling, KL and
    clip, on the CPU, without gradient checkpointing."""
    from trl import RLOOConfig

    return RLOOConfig(
        output_dir=str(start.parent / f"trl_{setting}"),
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=10_000,
        max_steps=steps,
        per_device_train_batch_size=batch * k,  # completions per update, as in our batches
        num_generations=k,
        max_completion_length=16,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        beta=0.05,
        epsilon=0.2,
        temperature=1.0,
        normalize_advantages=True,
        gradient_checkpointing=False,  # the same work as ours (no recomputation)
        shuffle_dataset=False,
        seed=seed,
    )


def trl_lora(meta: dict):
    """The LoRA adapter of the start (the layout ours gets from ``add_lora``)."""
    from peft import LoraConfig

    return LoraConfig(
        r=meta["lora"]["r"],
        lora_alpha=meta["lora"]["alpha"],
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
    )


def gold_reward(policy, tokenizer, meta: dict, setting: str) -> float | None:
    """Mean VADER compound of 8 samples per held-out prompt (the pipeline's evaluation)."""
    if setting != "lora":
        return None
    from zopro_lightning.reward.callables import VaderSentimentReward
    from zopro_lightning.rl.rollout import RolloutSettings
    from zopro_lightning.run.evaluation import mean_gold_reward

    tokenizer.padding_side = "left"
    config = RolloutSettings(k=8, temperature=1.0, max_new_tokens=16)
    return mean_gold_reward(
        policy, tokenizer, meta["eval"], VaderSentimentReward(), config, seed=10_000
    )


def worker(
    runner: str, setting: str, start: Path, steps: int, batch: int, k: int, seed: int
) -> dict:
    if runner == "trl":
        result = run_trl(setting, start, steps, batch, k, seed)
    else:
        result = run_ours(runner, setting, start, steps, batch, k, seed)
    times = result.pop("seconds_per_update")
    peak = peak_rss_mb()
    return {
        "runner": runner,
        "setting": setting,
        "seed": seed,
        "updates": steps,
        "prompts": steps * batch,
        "seconds_per_update": statistics.median(times[1:] or times),
        "seconds_all": times,
        "peak_mb": peak,
        "peak_above_baseline_mb": peak - result["baseline_mb"],
        **result,
    }


def summarise(rows: list[dict], setting: str) -> dict[str, float]:
    """Ratios of ours to TRL for one setting: medians of time and memory over seeds, means of
    the gold reward."""
    by = {
        runner: [r for r in rows if r["setting"] == setting and r["runner"] == runner]
        for runner in RUNNERS
    }

    def median(runner: str, key: str) -> float:
        return statistics.median(r[key] for r in by[runner])

    summary = {
        f"{runner}_{key}": median(runner, key)
        for runner in RUNNERS
        for key in ("seconds_per_update", "peak_mb", "peak_above_baseline_mb")
    }
    trl_time, trl_extra = (
        median("trl", "seconds_per_update"),
        median("trl", "peak_above_baseline_mb"),
    )
    summary |= {
        "ours_first_order_time_over_trl": median("ours_first_order", "seconds_per_update")
        / trl_time,
        "ours_zeroth_order_time_over_trl": median("ours_zeroth_order", "seconds_per_update")
        / trl_time,
        "ours_zeroth_order_peak_over_trl": median("ours_zeroth_order", "peak_mb")
        / median("trl", "peak_mb"),
        "ours_zeroth_order_peak_above_baseline_over_trl": median(
            "ours_zeroth_order", "peak_above_baseline_mb"
        )
        / trl_extra,
        "ours_first_order_peak_above_baseline_over_trl": median(
            "ours_first_order", "peak_above_baseline_mb"
        )
        / trl_extra,
    }
    if setting == "lora":
        for runner in RUNNERS:
            golds = [r["gold_after"] for r in by[runner]]
            summary[f"{runner}_gold_after_mean"] = statistics.mean(golds)
            summary[f"{runner}_gold_after_sd"] = statistics.stdev(golds) if len(golds) > 1 else 0
    return summary


def run_all(args: argparse.Namespace) -> list[dict]:
    """Every runner on every setting and seed, each in a process of its own: their rows."""
    rows = []
    for setting in args.settings.split(","):
        seeds = args.seeds.split(",") if setting == "lora" else ["0"]
        for seed in seeds:
            for runner in RUNNERS:
                command = [sys.executable, __file__, "--worker", runner, setting, seed]
                command += ["--steps", str(args.steps), "--full-steps", str(args.full_steps)]
                command += ["--batch", str(args.batch), "--k", str(args.k)]
                command += ["--threads", str(args.threads), "--workdir", args.workdir]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"{runner}/{setting} failed:\n{done.stderr[-4000:]}")
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                keys = ("runner", "setting", "seed", "seconds_per_update", "peak_mb", "gold_after")
                print(json.dumps({key: rows[-1][key] for key in keys}))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="lora,full")
    parser.add_argument("--steps", type=int, default=50, help="policy updates (lora setting)")
    parser.add_argument("--full-steps", type=int, default=4, help="updates (full setting)")
    parser.add_argument("--batch", type=int, default=16, help="prompts per update")
    parser.add_argument("--k", type=int, default=4, help="completions per prompt")
    parser.add_argument("--seeds", default="0,1,2", help="LoRA init and sampling seeds (lora)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/zopro_bench_peer")
    parser.add_argument("--quick", action="store_true", help="10 updates, one seed")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--worker", nargs=3, metavar=("RUNNER", "SETTING", "SEED"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    start = Path(args.workdir) / "start"
    if args.worker:
        runner, setting, seed = args.worker
        steps = args.steps if setting == "lora" else args.full_steps
        print(json.dumps(worker(runner, setting, start, steps, args.batch, args.k, int(seed))))
        return
    if args.quick:
        args.steps, args.full_steps, args.seeds = 10, 3, "0"
    prepare_start(Path(args.workdir), seed=0)
    rows = run_all(args)
    import trl

    payload = {
        "benchmark": "peer_trl",
        **environment(),
        "trl": trl.__version__,
        "prompts_per_update": args.batch,
        "completions_per_prompt": args.k,
        "max_new_tokens": 16,
        "updates": {"lora": args.steps, "full": args.full_steps},
        "full_model": FULL_MODEL,
        "summary": {setting: summarise(rows, setting) for setting in args.settings.split(",")},
        "runs": rows,
    }
    path = write_results("peer_trl", payload, args.out)
    for setting, summary in payload["summary"].items():
        print(setting, json.dumps({k: round(v, 3) for k, v in summary.items()}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
