"""Cost of one policy update: zeroth-order SPSA step (ZO-SGD, ZO-Adam) vs one inference
forward vs one first-order AdamW step, on the same model and batch (the rollout itself
excluded); and its memory per model and per trainable parameter.

Each measurement runs in its own subprocess so that peak memory is that operation's alone
(the time ratio to a forward is taken inside that process, forward and operation alternating):
on CUDA ``torch.cuda.max_memory_allocated``; on CPU the process's peak resident set
(``VmHWM``: unlike ``ru_maxrss``, not inherited from the parent; reset through
``/proc/self/clear_refs`` once the model is built, so the peak is the operation's, with the
weights resident), with glibc's mmap threshold fixed at 128 KiB so that freed tensors leave
the resident set. Peaks are reported above two baselines: *before the model was built* (so
the weights, state and activations count: ``peak_above_prebuild_mb``, the bytes per
parameter) and after model and batch were built (``peak_above_baseline_mb``).

    python bench/step_cost.py --threads 1          # CPU, three sizes, LoRA and full-parameter
    python bench/step_cost.py --device cuda --sizes small,medium,large

Writes ``bench/results/step_cost_<device>.json`` (with the fitted memory model of
``bench/memory_model.py`` and its extrapolation to one 80 GB GPU) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_model import analyse  # noqa: E402

from zopro_lightning.utils.memory import peak_rss_mb, rss_mb  # noqa: E402

SIZES = {  # hidden, layers, heads, intermediate, vocab
    "small": (256, 4, 4, 1024, 8000),
    # small's width with 4 x its layers and Llama's vocabulary: with small and medium, it
    # separates what grows with layers, with width and with the logits (bench/memory_model.py)
    "small_deep": (256, 16, 4, 1024, 32000),
    "medium": (512, 8, 8, 2048, 16000),
    "large": (1024, 16, 16, 4096, 32000),
}
OPERATIONS = ("forward", "zeroth_order", "zeroth_order_adam", "first_order")
ZO_OPERATIONS = {"sgd": ("zeroth_order",), "adam": ("zeroth_order_adam",)}
ZO_OPERATIONS["both"] = ZO_OPERATIONS["sgd"] + ZO_OPERATIONS["adam"]
# glibc: tensors of 128 KiB and more are mmap'ed and unmapped when freed (no dynamic threshold),
# so the resident set follows the live tensors
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current resident set (Linux ``clear_refs``); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def worker(
    size: str, mode: str, operation: str, device: str, batch: int, seq: int, repeats: int
) -> dict:
    import peft  # noqa: F401  (imported before the baseline: its modules are not the model)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from zopro_lightning.models.loading import add_lora
    from zopro_lightning.rl.objectives import clipped_surrogate
    from zopro_lightning.rl.rollout import completion_logprobs
    from zopro_lightning.zo.optim import ZerothOrderOptimizer
    from zopro_lightning.zo.samplers import GaussianSampler

    # the baseline before the model exists: the peak above it counts weights, state, activations
    if device == "cuda":
        torch.cuda.synchronize()
        prebuild_mb = torch.cuda.memory_allocated() / 2**20
    else:
        prebuild_mb = rss_mb()
    torch.manual_seed(0)
    hidden, layers, heads, inter, vocab = SIZES[size]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=inter,
        max_position_embeddings=2 * seq,
    )
    model = LlamaForCausalLM(config)
    if mode == "lora":
        model = add_lora(
            model, r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
        )
    model = model.to(device).eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    n_total = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in params.values())
    completion = seq // 2
    input_ids = torch.randint(0, vocab, (batch, seq), device=device)
    attention = torch.ones_like(input_ids)
    mask = torch.ones(batch, completion, device=device)
    with torch.no_grad():
        old = completion_logprobs(model, input_ids, attention, mask)
    advantages = torch.randn(batch, device=device)

    def loss() -> torch.Tensor:
        new = completion_logprobs(model, input_ids, attention, mask)
        return clipped_surrogate(new, old, advantages, 0.2).mean()

    adamw = torch.optim.AdamW(params.values(), lr=1e-5) if operation == "first_order" else None
    exact = n_trainable <= 0.1 * n_total  # ZOPrOModule's default (LoRA: copy; full: arithmetic)
    zo = (
        ZerothOrderOptimizer(
            params.items(),
            GaussianSampler(),
            lr=1e-6,
            eps=1e-3,
            exact_restore=exact,
            rule="adam" if operation == "zeroth_order_adam" else "sgd",
        )
        if operation.startswith("zeroth_order")
        else None
    )
    steps = iter(range(10**9))

    def run_once() -> None:
        if operation == "forward":
            with torch.inference_mode():
                loss()
        elif zo is not None:

            def inference_loss() -> torch.Tensor:
                with torch.inference_mode():
                    return loss()

            zo.step(loss_fn=inference_loss, seed=next(steps))
        else:
            adamw.zero_grad(set_to_none=True)
            loss().backward()
            adamw.step()

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.synchronize()
        build_peak_mb = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        baseline_mb = torch.cuda.memory_allocated() / 2**20
        peak_reset = True
    else:
        build_peak_mb = peak_rss_mb()
        baseline_mb = rss_mb()
        peak_reset = reset_peak_rss()

    def timed(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    def forward_only() -> None:
        with torch.inference_mode():
            loss()

    # time ratios come from one process: each repeat times a forward and then the operation,
    # so both see the same machine state (separate processes differ by 20-40 % on a busy CPU);
    # reported as the median of the per-repeat ratios and as the ratio of the fastest repeats
    # (the least disturbed by other work on the machine)
    times, forward_times = [], []
    for _ in range(repeats + 1):  # the first round warms up and is not timed
        forward_times.append(timed(forward_only))
        times.append(timed(run_once))
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mb()
    # exact byte counts of what the update keeps between steps (checks the analytic terms)
    if adamw is not None:
        state_bytes = sum(
            t.numel() * t.element_size()
            for state in adamw.state.values()
            for t in state.values()
            if isinstance(t, torch.Tensor) and t.ndim
        ) + sum(
            p.grad.numel() * p.grad.element_size() for p in params.values() if p.grad is not None
        )
    elif zo is not None:
        state_bytes = zo.state_bytes()
    else:
        state_bytes = 0
    weight_bytes = next(iter(model.parameters())).element_size()
    trainable_bytes = next(iter(params.values())).element_size()
    return {
        "size": size,
        "mode": mode,
        "operation": operation,
        "params_total": n_total,
        "params_trainable": n_trainable,
        "largest_trainable_numel": max(p.numel() for p in params.values()),
        "weight_bytes": weight_bytes,
        "trainable_bytes": trainable_bytes,
        "hidden": hidden,
        "layers": layers,
        "intermediate": inter,
        "vocab": vocab,
        "batch_sequences": batch,
        "tokens": batch * seq,
        "logit_positions": batch * (completion + 1),
        "exact_restore": exact if operation.startswith("zeroth_order") else None,
        "zo_rule": zo.rule if zo is not None else None,
        "update_state_bytes": state_bytes,
        "update_state_bytes_per_trainable": state_bytes / n_trainable,
        "seconds": statistics.median(times[1:]),
        "forward_seconds_same_process": statistics.median(forward_times[1:]),
        "over_forward_same_process": statistics.median(
            t / f for t, f in zip(times[1:], forward_times[1:], strict=True)
        ),
        "over_forward_min_same_process": min(times[1:]) / min(forward_times[1:]),
        "seconds_all": times[1:],
        "forward_seconds_all": forward_times[1:],
        "peak_mb": peak_mb,
        "baseline_mb": baseline_mb,
        "peak_above_baseline_mb": peak_mb - baseline_mb,
        "prebuild_mb": prebuild_mb,
        "build_peak_mb": build_peak_mb,
        "peak_reset_after_build": peak_reset,
        "peak_above_prebuild_mb": peak_mb - prebuild_mb,
        "peak_above_prebuild_bytes": (peak_mb - prebuild_mb) * 2**20,
        "bytes_per_param": (peak_mb - prebuild_mb) * 2**20 / n_total,
    }


def measure(args: argparse.Namespace, size: str, mode: str, operation: str) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        size,
        mode,
        operation,
        "--device",
        args.device,
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
    ]
    env = {**os.environ, **(MALLOC_ENV if args.device == "cpu" else {})}
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])


def summarise(rows: list[dict], sizes: list[str], modes: list[str]) -> tuple[list, list]:
    """Per size and mode: time and peak ratios to a forward (``ratios``) and bytes per model and
    per trainable parameter of each operation (``memory``)."""
    ratios, memory = [], []
    for size in sizes:
        for mode in modes:
            by_op = {r["operation"]: r for r in rows if r["size"] == size and r["mode"] == mode}
            fwd = by_op["forward"]
            ratio = {
                "size": size,
                "mode": mode,
                "params_total": fwd["params_total"],
                "params_trainable": fwd["params_trainable"],
            }
            for key, op in (
                ("zo", "zeroth_order"),
                ("zo_adam", "zeroth_order_adam"),
                ("fo", "first_order"),
            ):
                if op not in by_op:
                    continue
                r = by_op[op]
                ratio |= {
                    f"{key}_time_over_forward": r["over_forward_same_process"],
                    f"{key}_time_over_forward_min": r["over_forward_min_same_process"],
                    f"{key}_peak_over_forward": r["peak_mb"] / fwd["peak_mb"],
                    f"{key}_extra_over_forward_extra": (
                        r["peak_above_baseline_mb"] / max(fwd["peak_above_baseline_mb"], 1e-9)
                    ),
                }
            ratios.append(ratio)
            for op, r in by_op.items():
                memory.append(
                    {
                        "size": size,
                        "mode": mode,
                        "operation": op,
                        "params_total": r["params_total"],
                        "params_trainable": r["params_trainable"],
                        "tokens": r["tokens"],
                        "peak_above_prebuild_mb": r["peak_above_prebuild_mb"],
                        "bytes_per_param": r["bytes_per_param"],
                        # what the operation adds to an inference forward, per trainable value:
                        # state (copies, grads, moments) and, first-order, kept activations
                        "extra_over_forward_bytes_per_trainable": (
                            (r["peak_above_prebuild_mb"] - fwd["peak_above_prebuild_mb"])
                            * 2**20
                            / r["params_trainable"]
                        ),
                        "update_state_bytes_per_trainable": r["update_state_bytes_per_trainable"],
                    }
                )
    return ratios, memory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", default="small,small_deep,medium")
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument(
        "--zo-rule",
        default="both",
        choices=sorted(ZO_OPERATIONS),
        help="zeroth-order update rule(s) to measure: sgd (MeZO), adam (two moments), both",
    )
    parser.add_argument("--batch", type=int, default=16, help="sequences (B * k)")
    parser.add_argument("--seq", type=int, default=64, help="prompt + completion tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", nargs=3, metavar=("SIZE", "MODE", "OP"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.device, args.batch, args.seq, args.repeats)))
        return
    import torch
    import transformers

    sizes, modes = args.sizes.split(","), args.modes.split(",")
    operations = ("forward", *ZO_OPERATIONS[args.zo_rule], "first_order")
    rows = []
    for size in sizes:
        for mode in modes:
            for op in operations:
                rows.append(measure(args, size, mode, op))
                print(
                    f"{size:>7} {mode:>5} {op:>18}: {rows[-1]['peak_above_prebuild_mb']:8.1f} MB "
                    f"above pre-build, {rows[-1]['bytes_per_param']:6.2f} B/param, "
                    f"{rows[-1]['over_forward_same_process']:.2f} x forward time",
                    flush=True,
                )
    ratios, memory = summarise(rows, sizes, modes)
    device_name = (
        torch.cuda.get_device_name(0)
        if args.device == "cuda"
        else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    command = "python bench/step_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {
        "benchmark": "step_cost",
        "date": datetime.now(timezone.utc).isoformat(),
        "command": command.strip(),
        "device": device_name,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "batch_sequences": args.batch,
        "sequence_tokens": args.seq,
        "repeats": args.repeats,
        "zo_rule": args.zo_rule,
        "ratios": ratios,
        "memory": memory,
        "memory_model": analyse([r for r in rows if "peak_above_prebuild_bytes" in r]),
        "measurements": rows,
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"step_cost_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    print(
        f"{'size':>7} {'mode':>5} {'trainable':>10} {'ZO/fwd time':>12} {'FO/fwd time':>12} "
        f"{'ZO/fwd peak':>12} {'FO/fwd peak':>12}"
    )
    for r in ratios:
        print(
            f"{r['size']:>7} {r['mode']:>5} {r['params_trainable']:>10} "
            f"{r.get('zo_time_over_forward', float('nan')):>12.2f} "
            f"{r['fo_time_over_forward']:>12.2f} "
            f"{r.get('zo_peak_over_forward', float('nan')):>12.2f} "
            f"{r['fo_peak_over_forward']:>12.2f}"
        )
    for mode, m in result["memory_model"]["gpu"]["modes"].items():
        print(
            f"{mode:>13}: {m['bytes_per_param']:5.1f} B/param, largest on "
            f"{result['memory_model']['gpu']['budget_bytes'] / 1e9:.0f} GB: "
            f"{m['params'] / 1e9:6.2f} B params (state only: {m['params_state_only'] / 1e9:.2f} B)"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
