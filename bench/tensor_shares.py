"""Where the population gradient lives: each trainable tensor's share of ``||G||^2`` and its
share per value, at a run's state (issue #19, H5: perturb only where the gradient is).

``G`` is the mean of ``--batches`` exact batch gradients of the clipped surrogate
(``bench/snr.py``'s probe). ``--start`` measures at the fully zeroth-order run's starting point
(the SFT model with fresh LoRA adapters, under r_0), where every LoRA A has zero gradient
(``B = 0``); otherwise at the policy and refined reward model after ``--iteration``.

    python bench/tensor_shares.py RUN_DIR --start          # a first-order run's directory
    python bench/tensor_shares.py RUN_DIR --iteration 0

Writes ``bench/results/tensor_shares.json`` (``--out`` to change it). A tensor's ``density`` is
its share divided by its share of the values: above 1, it holds more of ``G`` than its size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--iteration", type=int, default=0)
    parser.add_argument("--start", action="store_true",
                        help="at SFT with fresh adapters under r_0 (a fully-ZO run's start)")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    import snr
    import torch

    from zopro_lightning.models.loading import load_causal_lm
    from zopro_lightning.run.state import load_state

    probe_args = snr.parse_args([str(args.run_dir), "--iteration", str(args.iteration),
                                 "--batches", str(args.batches)])
    pipeline, state, policy, reward, _ = snr.load_run(probe_args)
    reward_weights = state["reward"]
    if args.start:
        pipeline.ctx.seed_phase("policy")  # the adapters iteration 0 starts from
        fresh = pipeline.model_spec.with_lora(load_causal_lm(args.run_dir / "sft"))
        policy.load_state_dict(fresh.state_dict())
        reward_weights = load_state(args.run_dir, "start")["reward"]
    probe = snr.GradientProbe(probe_args, pipeline, policy, reward)
    if args.start:
        probe.start = 0  # iteration 0's first prompts
    gradient = torch.stack(probe.population_gradient(reward_weights)).mean(0)  # [D]
    pieces = snr.per_tensor(probe, [gradient])
    total, values = float(gradient.pow(2).sum()), gradient.numel()
    shares = {}
    for name in probe.names:
        g = pieces[name][0].double()
        share = float(g.pow(2).sum()) / total
        shares[name] = {"numel": g.numel(), "share": share,
                        "density": share / (g.numel() / values)}
    ranked = dict(sorted(shares.items(), key=lambda kv: -kv[1]["density"]))
    payload = {"environment": environment(), "run_dir": str(args.run_dir),
               "point": "start" if args.start else f"iteration_{args.iteration}",
               "trainable_values": values, "tensors": ranked}
    write_results("tensor_shares", payload, args.out)
    for name, row in ranked.items():
        print(f"{row['share']:.3f} of ||G||^2 in {row['numel']:5d} values "
              f"(density {row['density']:5.2f}) {name}")
    return payload


if __name__ == "__main__":
    main()
