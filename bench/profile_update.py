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
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from zopro_lightning.policy.module import ZOPrOModule
    from zopro_lightning.rl import rollout as rollout_module
    from zopro_lightning.rl.objectives import clipped_surrogate
    from zopro_lightning.rl.rollout import completion_logprobs
    from zopro_lightning.run.cli import CONFIG_DIR
    from zopro_lightning.run.pipeline import Pipeline
    from zopro_lightning.zo.optim import ZerothOrderOptimizer
    from zopro_lightning.zo.samplers import GaussianSampler

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["~logger", "sft.epochs=1", *args.overrides])
    L.seed_everything(0, verbose=False)
    seconds: dict[str, list[float]] = defaultdict(list)

    def timed(name, fn):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            out = fn(*a, **kw)
            seconds[name].append(time.perf_counter() - start)
            return out

        return wrapper

    with tempfile.TemporaryDirectory() as tmp:
        pipeline = Pipeline(cfg, Path(tmp))
        sft = pipeline.supervised_fine_tuning()
        reward = pipeline.build_reward_model()
        policy = pipeline.model_spec.with_lora(sft)
        module = ZOPrOModule(
            policy, pipeline.tokenizer, reward, GaussianSampler(), seed=0,
            **OmegaConf.to_container(cfg.policy, resolve=True),
        )
        # time the rollout's pieces where they are called
        rollout_module.generate_completions = timed(
            "generation", rollout_module.generate_completions
        )
        rollout_module.decode_completions = timed("decoding", rollout_module.decode_completions)
        rollout_module.batched_logprobs = timed("logprobs_policy_and_reference",
                                                rollout_module.batched_logprobs)
        rollout_module.score_completions = timed("reward_model_scoring",
                                                 rollout_module.score_completions)
        prompts = list(pipeline.task.train_prompts[: cfg.loop.batch_size])
        params = module.trainable_parameters
        zo = ZerothOrderOptimizer(params.items(), GaussianSampler(), lr=1e-3, eps=1e-3,
                                  num_perturbations=cfg.policy.num_perturbations)
        adamw = torch.optim.AdamW(params.values(), lr=1e-3)
        for repeat in range(args.repeats + 1):  # the first is a warm-up, dropped
            start = time.perf_counter()
            rollout = module.rollout(prompts)
            seconds["rollout_total"].append(time.perf_counter() - start)

            def loss_fn(r=rollout):
                with torch.inference_mode():
                    return module.surrogate_loss([r])

            start = time.perf_counter()
            loss_fn()
            seconds["one_loss_evaluation"].append(time.perf_counter() - start)
            start = time.perf_counter()
            zo.step(loss_fn=loss_fn, seed=repeat)
            seconds["zeroth_order_step"].append(time.perf_counter() - start)
            start = time.perf_counter()
            adamw.zero_grad(set_to_none=True)
            with torch.enable_grad():
                new_logprobs = completion_logprobs(
                    policy, rollout.input_ids, rollout.attention_mask, rollout.completion_mask,
                    cfg.policy.temperature,
                )
                loss = clipped_surrogate(
                    new_logprobs, rollout.old_logprobs, rollout.advantages, cfg.policy.clip_range
                ).mean()
                loss.backward()
            adamw.step()
            adamw.zero_grad(set_to_none=True)
            seconds["first_order_step"].append(time.perf_counter() - start)
            if repeat == 0:
                seconds.clear()
    median = {name: statistics.median(values) for name, values in seconds.items()}
    rollout_total = median["rollout_total"]
    shares = {
        name: median[name] / rollout_total
        for name in ("generation", "decoding", "logprobs_policy_and_reference",
                     "reward_model_scoring")
    }
    payload = {
        "environment": environment(),
        "batch": {"prompts": cfg.loop.batch_size, "k": cfg.policy.k,
                  "max_new_tokens": cfg.policy.max_new_tokens,
                  "num_perturbations": cfg.policy.num_perturbations},
        "repeats": args.repeats,
        "median_seconds": median,
        "share_of_rollout": shares,
        "zeroth_order_update_seconds": rollout_total + median["zeroth_order_step"],
        "first_order_update_seconds": rollout_total + median["first_order_step"],
        "extra_zeroth_order_step_over_rollout": median["zeroth_order_step"] / rollout_total,
        "all_seconds": dict(seconds),
    }
    write_results("profile_update", payload, args.out)
    for name, value in median.items():
        print(f"{name:>32}: {value * 1000:8.1f} ms")
    print(f"a ZO step costs {payload['extra_zeroth_order_step_over_rollout']:.2f} x a rollout; "
          f"FO step {median['first_order_step'] / rollout_total:.2f} x")
    return payload


if __name__ == "__main__":
    main()
