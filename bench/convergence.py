"""Convergence on the embedded task: gold reward against policy updates and against wall-clock
for ZOPrO's targeted sampler, the isotropic Gaussian sampler (MeZO), Rademacher, and
first-order RLOO, all from the same start.

The start, per seed (``zopro-train``'s defaults, through the pipeline's own phases): SFT, the
reward model r_0, first-order iteration 0 (``loop.first_order_steps`` updates), then one
reward refinement. That yields the policy update ``mu`` and the reward update ``v`` that
ZOPrO's sampler needs. From that state each method runs ``--steps`` policy updates against the
refined reward model (no further refinement, so all methods see the same reward), on the same
prompts, with the held-out gold reward measured every ``--every`` updates (evaluation time is
not counted as training time).

    python bench/convergence.py                   # 3 seeds, 150 updates per method
    python bench/convergence.py --quick           # 1 seed, 50 updates
    python bench/convergence.py --methods zopro --zo-lr 1e-2 --tag lr1e-2   # a variant
    python bench/convergence.py --override sampler.sampler.decay=constant --tag constant

Writes ``bench/results/convergence[_TAG].json`` and ``bench/results/convergence[_TAG].png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results  # noqa: E402

METHODS = ("zopro", "gaussian", "rademacher", "first_order")


@dataclass
class Curve:
    """Gold reward of one method and seed at each measured update."""

    method: str
    seed: int
    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # training wall-clock, evaluation excluded
    gold: list[float] = field(default_factory=list)


def compose_config(seed: int, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from zopro_lightning.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            "config",
            overrides=[
                f"seed={seed}",
                "~logger",
                "interplay.snapshots=false",
                "interplay.update_cosines=false",
                *overrides,
            ],
        )


class Start:
    """The shared start of one seed: SFT, r_0, first-order iteration 0, one refinement."""

    def __init__(self, cfg, workdir: Path) -> None:
        import lightning as L
        import torch
        from omegaconf import OmegaConf

        from zopro_lightning.callbacks.rollout_recorder import RolloutRecorder
        from zopro_lightning.models import state_difference, trainable_state
        from zopro_lightning.module import ZOPrOModule
        from zopro_lightning.pipeline import Pipeline
        from zopro_lightning.samplers import GaussianSampler

        self.cfg = cfg
        L.seed_everything(cfg.seed, workers=True)  # as run_pipeline does
        pipeline = Pipeline(cfg, workdir)
        sft = pipeline.supervised_fine_tuning()
        reward = pipeline.reward_model()
        policy = pipeline.model_spec.with_lora(sft)
        module = ZOPrOModule(
            policy,
            pipeline.tokenizer,
            reward,
            GaussianSampler(),
            seed=cfg.seed,
            **OmegaConf.to_container(cfg.policy, resolve=True),
        )
        pipeline.policy_module = module
        steps, batch = pipeline.steps_of(0), cfg.loop.batch_size  # first-order iteration 0
        prompts = list(pipeline.task.train_prompts)
        self.prompts = lambda start, count: [
            prompts[(start + i) % len(prompts)] for i in range(count)
        ]
        self.offset = steps * batch  # the branches' prompts follow iteration 0's
        recorder = RolloutRecorder()
        theta = trainable_state(policy)
        module.set_optimizer("first_order", lr=cfg.loop.first_order_lr)
        pipeline.trainer(callbacks=[recorder], max_steps=steps, max_epochs=-1).fit(
            module, pipeline.loader(self.prompts(0, steps * batch), batch, shuffle=False)
        )
        self.mu = state_difference(trainable_state(policy), theta)
        phi = trainable_state(reward.model)
        pipeline.refine(reward, module, recorder.pop())
        self.v = state_difference(trainable_state(reward.model), phi)
        self.pipeline, self.policy, self.module = pipeline, policy, module
        self.theta_start = {n: t.clone() for n, t in trainable_state(policy).items()}
        self.gold_start = pipeline.evaluate(policy)
        torch.set_grad_enabled(True)

    def reset_policy(self) -> None:
        """Back to the start: the trainable tensors as after iteration 0."""
        import torch

        with torch.no_grad():
            for name, param in self.policy.named_parameters():
                if name in self.theta_start:
                    param.copy_(self.theta_start[name])
        self.module.policy_updates = 0
        self.module.skipped_steps = 0


def run_method(start: Start, method: str, args: argparse.Namespace, seed: int) -> Curve:
    """``args.steps`` updates of ``method`` from ``start``; gold every ``args.every``."""
    import lightning as L
    from hydra.utils import instantiate

    from zopro_lightning.samplers import GaussianSampler, RademacherSampler, ZOPrOSampler

    start.reset_policy()
    module, pipeline = start.module, start.pipeline
    if method == "first_order":
        module.set_optimizer("first_order", lr=args.fo_lr)
    else:
        if method == "zopro":
            sampler = instantiate(start.cfg.sampler.sampler)
            sampler.total_steps = args.steps
            sampler.set_directions(start.mu, start.v)
        else:
            sampler = GaussianSampler() if method == "gaussian" else RademacherSampler()
        module.sampler = sampler
        module.set_optimizer("zeroth_order", lr=args.zo_lr)
        module.hparams.eps = args.eps
        module.hparams.num_perturbations = args.q
    curve = Curve(method, seed, [0], [0.0], [start.gold_start])

    class Measure(L.Callback):
        """Gold reward every ``every`` updates; its time is taken out of the clock."""

        def __init__(self) -> None:
            self.clock = time.perf_counter()
            self.elapsed = 0.0

        def on_train_batch_end(self, trainer, pl_module, *rest) -> None:
            step = pl_module.policy_updates
            if step % args.every and step != args.steps:
                return
            self.elapsed += time.perf_counter() - self.clock
            curve.steps.append(step)
            curve.seconds.append(self.elapsed)
            curve.gold.append(pipeline.evaluate(start.policy))
            self.clock = time.perf_counter()

    batch = start.cfg.loop.batch_size
    prompts = start.prompts(start.offset, args.steps * batch)  # the same for every method
    pipeline.trainer(callbacks=[Measure()], max_steps=args.steps, max_epochs=-1).fit(
        module, pipeline.loader(prompts, batch, shuffle=False)
    )
    if isinstance(module.sampler, ZOPrOSampler):
        module.sampler = GaussianSampler()
    return curve


def gain_at(curves: list[Curve], method: str, steps: int) -> list[float]:
    return [c.gold[c.steps.index(steps)] - c.gold[0] for c in curves if c.method == method]


def gain_at_seconds(curves: list[Curve], method: str, seconds: float) -> list[float]:
    """Gain of ``method`` at ``seconds`` of training (linear interpolation)."""
    import numpy as np

    return [
        float(np.interp(seconds, c.seconds, c.gold)) - c.gold[0]
        for c in curves
        if c.method == method
    ]


def plot(curves: list[Curve], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in methods:
        mine = [c for c in curves if c.method == method]
        steps = np.array(mine[0].steps)
        gains = np.array([np.array(c.gold) - c.gold[0] for c in mine])
        mean, low, high = gains.mean(0), gains.min(0), gains.max(0)
        (line,) = axes[0].plot(steps, mean, marker="o", label=method)
        axes[0].fill_between(steps, low, high, alpha=0.2, color=line.get_color())
        seconds = np.array([c.seconds for c in mine]).mean(0)
        axes[1].plot(seconds, mean, marker="o", label=method, color=line.get_color())
        axes[1].fill_between(seconds, low, high, alpha=0.2, color=line.get_color())
    axes[0].set_xlabel("policy updates after first-order iteration 0")
    axes[1].set_xlabel("training wall-clock (s), evaluation excluded")
    for ax in axes:
        ax.set_ylabel("gold reward gain (VADER compound)")
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend()
    fig.suptitle(f"Embedded task, {len({c.seed for c in curves})} seeds: mean, min–max band")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=150, help="updates per method")
    parser.add_argument("--every", type=int, default=25, help="updates between evaluations")
    parser.add_argument("--zo-lr", type=float, default=None, help="default: the config's")
    parser.add_argument("--fo-lr", type=float, default=None, help="default: the config's")
    parser.add_argument("--eps", type=float, default=None, help="default: the config's")
    parser.add_argument("--q", type=int, default=None, help="default: the config's")
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--override", action="append", default=[], help="Hydra override")
    parser.add_argument("--quick", action="store_true", help="1 seed, 50 updates")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", default=None, help="JSON path (the PNG goes beside it)")
    parser.add_argument("--workdir", default="/tmp/zopro_bench_convergence")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = "0", 50
    import torch

    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    curves: list[Curve] = []
    started = time.perf_counter()
    for seed in map(int, args.seeds.split(",")):
        overrides = [
            f"num_threads={args.threads}",
            f"++eval.max_prompts={args.eval_prompts}",
            f"eval.samples_per_prompt={args.eval_samples}",
            *args.override,
        ]
        cfg = compose_config(seed, overrides)
        args.zo_lr = args.zo_lr or cfg.loop.zeroth_order_lr
        args.fo_lr = args.fo_lr or cfg.loop.first_order_lr
        args.eps = args.eps or cfg.policy.eps
        args.q = args.q or cfg.policy.num_perturbations
        start = Start(cfg, Path(args.workdir) / f"seed_{seed}")
        for method in methods:
            curve = run_method(start, method, args, seed)
            curves.append(curve)
            print(json.dumps(curve.__dict__), flush=True)
    summary = {}
    for method in methods:
        gains = gain_at(curves, method, args.steps)
        summary[method] = {"gain_mean": statistics.mean(gains), "gains": gains}
    if "first_order" in methods:
        fo_seconds = statistics.mean(c.seconds[-1] for c in curves if c.method == "first_order")
        for method in methods:
            at_fo_time = gain_at_seconds(curves, method, fo_seconds)
            summary[method]["gain_at_first_order_seconds"] = statistics.mean(at_fo_time)
    ratios = {}
    if "zopro" in methods and "gaussian" in methods:
        ratios["zopro_gain_over_gaussian_gain"] = (
            summary["zopro"]["gain_mean"] / summary["gaussian"]["gain_mean"]
        )
    if "zopro" in methods and "first_order" in methods:
        ratios["zopro_gain_over_first_order_gain_at_equal_seconds"] = (
            summary["zopro"]["gain_at_first_order_seconds"]
            / summary["first_order"]["gain_at_first_order_seconds"]
        )
    name = "convergence" + (f"_{args.tag}" if args.tag else "")
    payload = {
        "benchmark": "convergence",
        **environment(),
        "settings": {
            key: getattr(args, key)
            for key in ("steps", "every", "zo_lr", "fo_lr", "eps", "q", "seeds")
        }
        | {"eval_prompts": args.eval_prompts, "eval_samples": args.eval_samples},
        "overrides": args.override,
        "wall_seconds": time.perf_counter() - started,
        "summary": summary,
        "ratios": ratios,
        "curves": [c.__dict__ for c in curves],
    }
    path = write_results(name, payload, args.out)
    figure = path.with_suffix(".png")
    plot(curves, methods, figure)
    print(json.dumps({"summary": summary, "ratios": ratios}, indent=1))
    print(f"wrote {path} and {figure}")


if __name__ == "__main__":
    main()
