"""Where one policy update of the default run spends its time: generation, decoding, scoring by
the reward model, the policy's and the reference's log-probs (the rollout), then either the
2q loss evaluations of a zeroth-order step (plus the perturb/restore/update passes) or a
first-order step (forward, backward, AdamW). Same batch, same machine, one process.

    python bench/profile_update.py                      # zopro-train's defaults
    python bench/profile_update.py --repeats 10 loop.batch_size=32

The models are the default run's architecture (the tiny Llama with LoRA; the reward model
from the same base), untrained: timing does not depend on the weights. Writes
``bench/results/profile_update.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="zopro-train overrides")
    args = parser.parse_args(argv)

    import lightning as L
    from hydra import compose, initialize_config_dir

    from zopro_lightning.run.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["~logger", "sft.epochs=1", *args.overrides])
    L.seed_everything(0, verbose=False)
    seconds: dict[str, list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        module, prompts = build(cfg, Path(tmp))
        instrument_rollout(seconds)
        zo, adamw = optimizers(module)
        for repeat in range(args.repeats + 1):  # the first is a warm-up, dropped
            time_update(module, prompts, repeat, zo, adamw, seconds)
            if repeat == 0:
                seconds.clear()
    payload = summarise(cfg, args.repeats, seconds)
    write_results("profile_update", payload, args.out)
    for name, value in payload["median_seconds"].items():
        print(f"{name:>32}: {value * 1000:8.1f} ms")
    rollout_total = payload["median_seconds"]["rollout_total"]
    print(f"a ZO step costs {payload['extra_zeroth_order_step_over_rollout']:.2f} x a rollout; "
          f"FO step {payload['median_seconds']['first_order_step'] / rollout_total:.2f} x")
    return payload


def build(cfg, tmp: Path):
    """The default run's policy module (SFT'd tiny Llama with LoRA, the reward model from the
    same base; a Gaussian sampler) and one update's prompts."""
    from hydra.utils import instantiate

    from zopro_lightning.policy.module import ZOPrOModule
    from zopro_lightning.run.pipeline import Pipeline
    from zopro_lightning.zo.samplers import GaussianSampler

    pipeline = Pipeline(cfg, tmp)
    sft = pipeline.supervised_fine_tuning()
    reward = pipeline.build_reward_model()
    policy = pipeline.model_spec.with_lora(sft)
    settings = {group: instantiate(node) for group, node in cfg.policy.items()}
    module = ZOPrOModule(
        policy, pipeline.tokenizer, reward, GaussianSampler(), seed=0, **settings
    )
    return module, list(pipeline.task.train_prompts[: cfg.loop.batch_size])


def timed(seconds: dict[str, list[float]], name: str, fn):
    """``fn``, its every call's seconds appended to ``seconds[name]``."""

    def wrapper(*a, **kw):
        start = time.perf_counter()
        out = fn(*a, **kw)
        seconds[name].append(time.perf_counter() - start)
        return out

    return wrapper


def instrument_rollout(seconds: dict[str, list[float]]) -> None:
    """Time the rollout's pieces where they are called (``zopro_lightning.rl.rollout``)."""
    from zopro_lightning.rl import rollout as rollout_module

    for attribute, name in (
        ("generate_completions", "generation"),
        ("decode_completions", "decoding"),
        ("batched_logprobs", "logprobs_policy_and_reference"),
        ("score_completions", "reward_model_scoring"),
    ):
        function = getattr(rollout_module, attribute)
        setattr(rollout_module, attribute, timed(seconds, name, function))


def optimizers(module):
    """A zeroth-order optimizer (q of ``policy.spsa``) and AdamW over the trainable tensors."""
    import torch

    from zopro_lightning.zo.optim import SPSASettings, ZerothOrderOptimizer
    from zopro_lightning.zo.samplers import GaussianSampler

    params = module.trainable_parameters
    settings = SPSASettings(eps=1e-3, num_perturbations=module.spsa_settings.num_perturbations)
    zo = ZerothOrderOptimizer(params.items(), GaussianSampler(), settings, lr=1e-3)
    return zo, torch.optim.AdamW(params.values(), lr=1e-3)


def time_update(
    module, prompts: list[str], repeat: int, zo, adamw, seconds: dict[str, list[float]]
) -> None:
    """One rollout, one loss evaluation, a zeroth-order step and a first-order AdamW step on
    it, each timed."""
    import torch

    start = time.perf_counter()
    rollout = module.rollout(prompts)
    seconds["rollout_total"].append(time.perf_counter() - start)

    def loss_fn(r=rollout):
        with torch.inference_mode():
            return module.surrogate_loss([r])

    for name, step in (
        ("one_loss_evaluation", loss_fn),
        ("zeroth_order_step", lambda: zo.step(loss_fn=loss_fn, seed=repeat)),
        ("first_order_step", lambda: first_order_step(module, rollout, adamw)),
    ):
        start = time.perf_counter()
        step()
        seconds[name].append(time.perf_counter() - start)


def first_order_step(module, rollout, adamw) -> None:
    """Forward, backward and AdamW on the clipped surrogate of ``rollout``."""
    import torch

    from zopro_lightning.rl.objectives import clipped_surrogate
    from zopro_lightning.rl.rollout import completion_logprobs

    settings = module.rollout_settings
    adamw.zero_grad(set_to_none=True)
    with torch.enable_grad():
        new_logprobs = completion_logprobs(
            module.policy, rollout.input_ids, rollout.attention_mask, rollout.completion_mask,
            settings.temperature,
        )  # fmt: skip
        loss = clipped_surrogate(
            new_logprobs, rollout.old_logprobs, rollout.advantages, settings.clip_range
        ).mean()
        loss.backward()
    adamw.step()
    adamw.zero_grad(set_to_none=True)


def summarise(cfg, repeats: int, seconds: dict[str, list[float]]) -> dict:
    """``profile_update.json``: medians, the rollout's shares, the two updates' seconds."""
    median = {name: statistics.median(values) for name, values in seconds.items()}
    rollout_total = median["rollout_total"]
    shares = {
        name: median[name] / rollout_total
        for name in ("generation", "decoding", "logprobs_policy_and_reference",
                     "reward_model_scoring")
    }
    rollout, spsa = cfg.policy.rollout, cfg.policy.spsa
    return {
        "environment": environment(),
        "batch": {"prompts": cfg.loop.batch_size, "k": rollout.k,
                  "max_new_tokens": rollout.max_new_tokens,
                  "num_perturbations": spsa.num_perturbations},
        "repeats": repeats,
        "median_seconds": median,
        "share_of_rollout": shares,
        "zeroth_order_update_seconds": rollout_total + median["zeroth_order_step"],
        "first_order_update_seconds": rollout_total + median["first_order_step"],
        "extra_zeroth_order_step_over_rollout": median["zeroth_order_step"] / rollout_total,
        "all_seconds": dict(seconds),
    }


if __name__ == "__main__":
    main()
