"""Cost of one policy update: zeroth-order SPSA step vs one inference forward vs one
first-order step, on the same model and batch (the rollout itself excluded).

Each measurement runs in its own subprocess so that peak memory is that operation's alone
(the time ratio to a forward is taken inside that process, forward and operation alternating):
on CUDA ``torch.cuda.max_memory_allocated``; on CPU the process's peak resident set
(``VmHWM``: unlike ``ru_maxrss``, not inherited from the parent), reported in total and
above the baseline after model and batch were built.

    python bench/step_cost.py                      # CPU, both sizes, LoRA and full-parameter
    python bench/step_cost.py --device cuda --sizes small,medium,large

Writes ``bench/results/step_cost_<device>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from zopro_lightning.memory import peak_rss_mb, rss_mb

SIZES = {  # hidden, layers, heads, intermediate, vocab
    "small": (256, 4, 4, 1024, 8000),
    "medium": (512, 8, 8, 2048, 16000),
    "large": (1024, 16, 16, 4096, 32000),
}
OPERATIONS = ("forward", "zeroth_order", "first_order")


def worker(
    size: str, mode: str, operation: str, device: str, batch: int, seq: int, repeats: int
) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from zopro_lightning.models import add_lora
    from zopro_lightning.objectives import clipped_surrogate
    from zopro_lightning.rollout import completion_logprobs
    from zopro_lightning.samplers import GaussianSampler
    from zopro_lightning.spsa import spsa_step

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

    def run_once() -> None:
        if operation == "forward":
            with torch.inference_mode():
                loss()
        elif operation == "zeroth_order":

            def inference_loss() -> torch.Tensor:
                with torch.inference_mode():
                    return loss()

            spsa_step(
                params,
                inference_loss,
                GaussianSampler(),
                seed=0,
                eps=1e-3,
                lr=1e-6,
                exact_restore=exact,
            )
        else:
            adamw.zero_grad(set_to_none=True)
            loss().backward()
            adamw.step()

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    baseline_mb = rss_mb()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline_mb = torch.cuda.memory_allocated() / 2**20

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
    return {
        "size": size,
        "mode": mode,
        "operation": operation,
        "params_total": n_total,
        "params_trainable": n_trainable,
        "exact_restore": exact if operation == "zeroth_order" else None,
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
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", default="small,medium")
    parser.add_argument("--modes", default="lora,full")
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

    rows = [
        measure(args, size, mode, op)
        for size in args.sizes.split(",")
        for mode in args.modes.split(",")
        for op in OPERATIONS
    ]
    ratios = []
    for size in args.sizes.split(","):
        for mode in args.modes.split(","):
            by_op = {r["operation"]: r for r in rows if r["size"] == size and r["mode"] == mode}
            fwd, zo, fo = by_op["forward"], by_op["zeroth_order"], by_op["first_order"]
            ratios.append(
                {
                    "size": size,
                    "mode": mode,
                    "params_total": fwd["params_total"],
                    "params_trainable": fwd["params_trainable"],
                    "zo_time_over_forward": zo["over_forward_same_process"],
                    "fo_time_over_forward": fo["over_forward_same_process"],
                    "zo_time_over_forward_min": zo["over_forward_min_same_process"],
                    "fo_time_over_forward_min": fo["over_forward_min_same_process"],
                    "zo_peak_over_forward": zo["peak_mb"] / fwd["peak_mb"],
                    "fo_peak_over_forward": fo["peak_mb"] / fwd["peak_mb"],
                    "zo_extra_over_forward_extra": (
                        zo["peak_above_baseline_mb"] / max(fwd["peak_above_baseline_mb"], 1e-9)
                    ),
                    "fo_extra_over_forward_extra": (
                        fo["peak_above_baseline_mb"] / max(fwd["peak_above_baseline_mb"], 1e-9)
                    ),
                }
            )
    device_name = (
        torch.cuda.get_device_name(0)
        if args.device == "cuda"
        else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    result = {
        "benchmark": "step_cost",
        "date": datetime.now(timezone.utc).isoformat(),
        "device": device_name,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "batch_sequences": args.batch,
        "sequence_tokens": args.seq,
        "repeats": args.repeats,
        "ratios": ratios,
        "measurements": rows,
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"step_cost_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(
        f"{'size':>7} {'mode':>5} {'trainable':>10} {'ZO/fwd time':>12} {'FO/fwd time':>12} "
        f"{'ZO/fwd peak':>12} {'FO/fwd peak':>12}"
    )
    for r in ratios:
        print(
            f"{r['size']:>7} {r['mode']:>5} {r['params_trainable']:>10} "
            f"{r['zo_time_over_forward']:>12.2f} {r['fo_time_over_forward']:>12.2f} "
            f"{r['zo_peak_over_forward']:>12.2f} {r['fo_peak_over_forward']:>12.2f}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
