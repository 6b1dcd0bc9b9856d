"""Why the zeroth-order iterations gain little: how well one update's direction points along
the population gradient, for a first-order step and for SPSA estimates with each sampler.

From a finished ``zopro-train`` run directory (the policy after iteration ``--iteration``, the
reward model refined after it, that iteration's update ``mu``), draw ``--batches`` rollout
batches of the default size on the next chunk's prompts and take, per batch ``b``, the exact
gradient ``grad_b`` of the clipped surrogate (autograd; at the rollout point the ratio is 1).
The population gradient is estimated leave-one-out, ``G_{-b} = mean_{c != b} grad_c``. Then:

- ``first_order``: ``cos(grad_b, G_{-b})`` (what one first-order step's direction is worth;
  AdamW's per-coordinate scaling aside);
- ``spsa_<sampler>``: ``cos(g z, G_{-b})`` with ``g = grad_b . z`` (the exact directional
  derivative, i.e. SPSA without finite-difference error) for ``--draws`` directions ``z`` per
  batch, from the Gaussian sampler and from ZOPrO's sampler at ``d = 0.999`` and ``d = 0``;
  and the same for the mean of ``K`` estimates on one batch (``K`` SPSA steps per rollout);
- ``cos(G, mu)``: how much of the population gradient lies along the previous update, and
  along minus the first-order optimizer's gradient mean where the run saved it
  (``sampler.direction=gradient``);
- ``cos(G, G before refinement)``: the gradient under the reward model before this
  iteration's refinement, from other rollouts, beside ``cos(G, G from other rollouts)`` under
  the same reward model: the ceiling two noisy estimates reach.
- subspace samplers (issue #19, :class:`~zopro_lightning.zo.subspace_sampler.SubspaceSampler`):
  a random ``k``-dim subspace per tensor for each ``--ranks`` value, LOZO's low-rank
  ``U V^T`` for each ``--lowrank-ranks`` value, and subspaces spanned per tensor by batch
  gradients: of other rollouts under the same reward model (``grads_same_reward``: what the
  first-order step's own batches span), of rollouts under the reward model before this
  iteration's refinement (``grads_before_refinement``: what the phase before could have
  collected), and of ``mu`` with the optimizer's gradient mean (``trajectory``); and, for a
  run made with ``sampler.sampler.basis=gradients``, the basis its sampler kept
  (``kept_gradients``: at ``--iteration 1, 2`` of such a run, how useful iteration 0's
  gradients still are after one or two zeroth-order iterations and refinements). For each,
  ``captured`` = ``||P G|| / ||G||``: how much of the population gradient the subspace holds
  (a random ``K``-dim subspace of ``D`` holds about ``sqrt(K / D)``).

    python bench/snr.py RUN_DIR                      # a run made with loop.schedule=first_order
    python bench/snr.py RUN_DIR --batches 8 --draws 64
    python bench/snr.py RUN_DIR --draws 16 --ks 1 4 --ranks 8 64 256 --lowrank-ranks 1 4 \
        --out bench/results/snr_subspace.json          # issue #19's subspace samplers

Writes ``bench/results/snr.json``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--iteration", type=int, default=0)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--draws", type=int, default=64)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--ranks", type=int, nargs="*", default=[],
                        help="random-subspace dimensions k per tensor to measure")
    parser.add_argument("--lowrank-ranks", type=int, nargs="*", default=[],
                        help="LOZO ranks r (z = U V^T, V [n, r]) to measure")
    parser.add_argument("--no-gradient-subspaces", action="store_true",
                        help="skip the subspaces spanned by batch gradients")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def load_run(args: argparse.Namespace):
    """The run's pipeline, its state after ``--iteration``, the policy and reward model with
    that state's weights, and the iteration's update ``mu`` (by tensor name)."""
    from omegaconf import OmegaConf

    from zopro_lightning.models.loading import load_causal_lm, state_difference
    from zopro_lightning.run.phases import load_trainable
    from zopro_lightning.run.pipeline import Pipeline
    from zopro_lightning.run.state import load_state

    cfg = OmegaConf.load(args.run_dir / "run_config.yaml")
    cfg.resume = str(args.run_dir)
    OmegaConf.set_struct(cfg, False)
    pipeline = Pipeline(cfg, args.run_dir)
    state = load_state(args.run_dir, f"iteration_{args.iteration}")
    sft = load_causal_lm(args.run_dir / "sft", dtype=pipeline.model_spec.dtype)
    policy = pipeline.model_spec.with_lora(sft)
    load_trainable(policy, state["policy"])
    reward = pipeline.build_reward_model()
    load_trainable(reward.model, state["reward"])
    if args.iteration > 0:
        before = load_state(args.run_dir, f"iteration_{args.iteration - 1}")["policy"]
    else:  # iteration 0 starts from a fresh adapter: LoRA B = 0, A as initialised (seeded)
        pipeline.ctx.seed_phase("policy")
        fresh = pipeline.model_spec.with_lora(load_causal_lm(args.run_dir / "sft"))
        before = {n: p.detach().clone() for n, p in fresh.named_parameters() if p.requires_grad}
    return pipeline, state, policy, reward, state_difference(state["policy"], before)


class GradientProbe:
    """Exact batch gradients ``[D]`` of the clipped surrogate at the run's policy, on rollout
    batches of the next chunk's prompts (a ``ZOPrOModule`` with the run's settings)."""

    def __init__(self, args: argparse.Namespace, pipeline, policy, reward) -> None:
        from hydra.utils import instantiate

        from zopro_lightning.policy.module import ZOPrOModule
        from zopro_lightning.zo.samplers import GaussianSampler

        cfg = pipeline.cfg
        settings = {group: instantiate(node) for group, node in cfg.policy.items()}
        self.module = ZOPrOModule(
            policy, pipeline.tokenizer, reward, GaussianSampler(), seed=cfg.seed, **settings
        )
        self.args, self.policy, self.reward = args, policy, reward
        self.params = self.module.trainable_parameters
        self.names = list(self.params)
        self.batch = cfg.loop.batch_size
        iteration = args.iteration
        self.start = pipeline.schedule.updates_of(iteration) * self.batch * (iteration + 1)
        self.prompts = list(pipeline.task.train_prompts)

    def flat(self, tensors):
        import torch

        return torch.cat([tensors[n].detach().double().flatten() for n in self.names])

    def population_gradient(self, reward_weights, offset: int = 0) -> list:
        """Batch gradients on ``--batches`` rollouts (sampling seeds ``offset + b``), under
        the reward model with ``reward_weights``."""
        import torch

        from zopro_lightning.rl.objectives import clipped_surrogate
        from zopro_lightning.rl.rollout import completion_logprobs
        from zopro_lightning.run.phases import load_trainable

        load_trainable(self.reward.model, reward_weights)
        settings, prompts, batch = self.module.rollout_settings, self.prompts, self.batch
        found = []
        for b in range(self.args.batches):
            chunk = [prompts[(self.start + b * batch + i) % len(prompts)] for i in range(batch)]
            self.module.policy_updates = offset + b
            rollout = self.module.rollout(chunk)
            self.policy.zero_grad(set_to_none=True)
            with torch.enable_grad():
                logprobs = completion_logprobs(self.policy, rollout.input_ids,
                                               rollout.attention_mask, rollout.completion_mask,
                                               settings.temperature)
                loss = clipped_surrogate(logprobs, rollout.old_logprobs, rollout.advantages,
                                         settings.clip_range).mean()
                loss.backward()
            found.append(self.flat({n: p.grad for n, p in self.params.items()}))
        return found


def cos(a, b) -> float:
    return float(a @ b / (a.norm() * b.norm() + 1e-30))


def samplers_for(candidates: dict) -> dict:
    """The Gaussian sampler and ZOPrO's at ``d = 0.999`` and ``d = 0`` along each candidate."""
    from zopro_lightning.zo.samplers import GaussianSampler, ZOPrOSampler

    samplers: dict = {"gaussian": GaussianSampler()}
    for label, direction in candidates.items():
        for d in (0.999, 0.0):
            sampler = ZOPrOSampler(decay="constant", initial_decay=d)
            sampler.set_directions(direction, None)
            samplers[f"zopro_{label}_d{d}"] = sampler
    return samplers


def per_tensor(probe: GradientProbe, flats: list) -> dict:
    """``{name: [m, numel]}``: the flat ``[D]`` vectors cut back into the trainable tensors."""
    import torch

    rows, start = {}, 0
    stacked = torch.stack(flats).float()  # [m, D]
    for name in probe.names:
        numel = probe.params[name].numel()
        rows[name] = stacked[:, start:start + numel]
        start += numel
    return rows


def subspace_samplers(args: argparse.Namespace, probe: GradientProbe, spans: dict) -> dict:
    """The subspace samplers to measure: random ``k`` per ``--ranks``, LOZO per
    ``--lowrank-ranks``, and one spanned per tensor by each entry of ``spans`` (flat vectors)."""
    from zopro_lightning.zo.subspace_sampler import SubspaceSampler

    samplers: dict = {}
    for k in args.ranks:
        samplers[f"subspace_random_k{k}"] = SubspaceSampler(rank=k, basis="random")
    for r in args.lowrank_ranks:
        samplers[f"subspace_lowrank_r{r}"] = SubspaceSampler(rank=r, basis="lowrank")
    for label, flats in spans.items():
        sampler = SubspaceSampler(rank=len(flats), basis="directions")
        sampler.set_basis(per_tensor(probe, flats))
        samplers[f"subspace_{label}"] = sampler
    return samplers


def kept_basis(state: dict):
    """The subspace a ``SubspaceSampler(basis="gradients")`` run searched after this state
    (the span of the first-order gradients it kept), as a ``"directions"`` sampler; ``None``
    for a run whose sampler kept none."""
    from zopro_lightning.zo.subspace_sampler import SubspaceSampler

    given = state.get("sampler", {}).get("given")
    if not given:
        return None
    sampler = SubspaceSampler(rank=max(t.shape[0] for t in given.values()), basis="directions")
    sampler.load_state_dict({"num_steps": 0, "refreshes": 0, "given": given})
    return sampler


def captured(probe: GradientProbe, sampler, gradient) -> dict:
    """``||P G|| / ||G||`` for the sampler's subspace (per tensor, summed over tensors) and the
    subspace's total dimension ``K``, with the exact projector of each tensor's basis
    (``P = B B^T``; LOZO: ``G_n V V^T``)."""
    from zopro_lightning.zo.directions import canonical_name

    pieces = per_tensor(probe, [gradient])
    held, dimension = 0.0, 0
    for name in probe.names:
        g = pieces[name][0].double()  # [numel]
        shape = tuple(probe.params[name].shape)
        key = canonical_name(name)
        if sampler.basis == "lowrank" and len(shape) == 2:
            v = sampler._random(key, shape[1], min(sampler.rank, shape[1])).double()  # [n, r]
            proj = (g.view(shape) @ v @ v.T).flatten()
        elif sampler.basis == "directions" and key in sampler._given:
            rows = sampler._given[key].double()  # [K, numel]
            proj = rows.T @ (rows @ g)
        else:
            basis = sampler._random(key, g.numel(), min(sampler.rank, g.numel())).double()
            proj = basis @ (basis.T @ g)
        held += float(proj.pow(2).sum())
        dimension += sampler.dimension(name, shape)
    return {"captured": math.sqrt(held) / float(gradient.double().norm()),
            "dimension": dimension,
            "random_subspace_expectation": math.sqrt(dimension / gradient.numel())}


def spsa_cosines(probe: GradientProbe, sampler, grads: list, loo: list) -> dict:
    """``cos(mean of K estimates g z, G_{-b})`` over ``--draws`` groups per batch, per ``K``:
    mean and standard error."""
    import torch

    from zopro_lightning.zo.spsa import tensor_generator

    args = probe.args
    per_k: dict[str, list[float]] = {str(k): [] for k in args.ks}
    for b, (gradient, target) in enumerate(zip(grads, loo, strict=True)):
        estimates = []
        for draw in range(args.draws * max(args.ks)):
            seed = 1_000_003 * b + draw
            z = probe.flat({n: sampler.sample(n, p, tensor_generator(seed, n, p.device))
                            for n, p in probe.params.items()})
            estimates.append(float(gradient @ z) * z)
        for k in args.ks:
            for i in range(args.draws):
                mean = torch.stack(estimates[i * k:(i + 1) * k]).mean(0)
                per_k[str(k)].append(cos(mean, target))
    return {
        f"K={k}": {"mean_cos": statistics.fmean(v), "se": statistics.stdev(v) / math.sqrt(len(v))}
        for k, v in per_k.items()
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    from zopro_lightning.run.state import load_state

    pipeline, state, policy, reward, mu = load_run(args)
    probe = GradientProbe(args, pipeline, policy, reward)
    # the reward model before this iteration's refinement: what the policy was trained on
    earlier = load_state(args.run_dir, "start" if args.iteration == 0 else
                         f"iteration_{args.iteration - 1}")["reward"]
    grads_before = probe.population_gradient(earlier, offset=1000)
    gradient_before = torch.stack(grads_before).mean(0)
    # the same gradient from other rollouts: the ceiling two noisy estimates can reach
    grads_again = probe.population_gradient(state["reward"], offset=1000)
    gradient_again = torch.stack(grads_again).mean(0)
    grads = probe.population_gradient(state["reward"])  # [B] of [D], the refined reward model
    policy.zero_grad(set_to_none=True)
    grads_t = torch.stack(grads)  # [B, D]
    total = grads_t.sum(0)
    loo = [(total - grads_t[b]) / (len(grads) - 1) for b in range(len(grads))]
    candidates = {"update": mu, **{k: v for k, v in state.get("directions", {}).items()
                                   if k == "gradient"}}
    first = [cos(g, t) for g, t in zip(grads, loo, strict=True)]
    results: dict[str, dict] = {
        f"spsa_{label}": spsa_cosines(probe, sampler, grads, loo)
        for label, sampler in samplers_for(candidates).items()
    }
    spans = {} if args.no_gradient_subspaces else {
        "grads_same_reward": grads_again,
        "grads_before_refinement": grads_before,
        "trajectory": [probe.flat(direction) for direction in candidates.values()],
    }
    subspaces = subspace_samplers(args, probe, spans)
    kept = kept_basis(state)
    if kept is not None:  # the basis this run's own sampler searched (basis=gradients)
        subspaces["kept_gradients"] = kept
    subspace_held = {f"spsa_{label}": captured(probe, sampler, total)
                     for label, sampler in subspaces.items()}
    for label, sampler in subspaces.items():
        results[f"spsa_{label}"] = spsa_cosines(probe, sampler, grads, loo)
        print(label, subspace_held[f"spsa_{label}"], results[f"spsa_{label}"], flush=True)
    results = {"first_order": {"mean_cos": statistics.fmean(first),
                               "se": statistics.stdev(first) / math.sqrt(len(first))}} | results
    payload = {
        "environment": environment(),
        "run_dir": str(args.run_dir),
        "iteration": args.iteration,
        "trainable_values": int(probe.flat(mu).numel()),
        "batches": args.batches,
        "draws": args.draws,
        "cos_population_gradient_mu": {
            label: cos(total, probe.flat(direction)) for label, direction in candidates.items()
        },
        "cos_population_gradient_mu_descent_sign": "negative: -G points along +mu",
        "cos_population_gradient_before_refinement": cos(total, gradient_before),
        "cos_population_gradient_other_rollouts": cos(total, gradient_again),
        "batch_gradient_norm_mean": statistics.fmean(float(g.norm()) for g in grads),
        "population_gradient_norm": float(total.norm() / len(grads)),
        "results": results,
        "subspace_captured_population_gradient": subspace_held,
    }
    write_results("snr", payload, args.out)
    print_payload(payload)
    return payload


def print_payload(payload: dict) -> None:
    results = payload["results"]
    print(f"D = {payload['trainable_values']}, cos(G, mu) = "
          f"{payload['cos_population_gradient_mu']}, cos(G, G before refinement) = "
          f"{payload['cos_population_gradient_before_refinement']:.3f} (other rollouts, same "
          f"reward: {payload['cos_population_gradient_other_rollouts']:.3f})")
    print(f"first-order step: cos = {results['first_order']['mean_cos']:.4f}")
    for key, rows in results.items():
        if key.startswith("spsa"):
            print(key, {k: round(v["mean_cos"], 5) for k, v in rows.items()})


if __name__ == "__main__":
    main()
