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
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_model import analyse  # noqa: E402
from step_cost_worker import worker  # noqa: E402

OPERATIONS = ("forward", "zeroth_order", "zeroth_order_adam", "first_order")
ZO_OPERATIONS = {"sgd": ("zeroth_order",), "adam": ("zeroth_order_adam",)}
ZO_OPERATIONS["both"] = ZO_OPERATIONS["sgd"] + ZO_OPERATIONS["adam"]
# glibc: tensors of 128 KiB and more are mmap'ed and unmapped when freed (no dynamic threshold),
# so the resident set follows the live tensors
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


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
    result = result_block(args, argv, rows, ratios, memory)
    out = Path(args.out or Path(__file__).parent / "results" / f"step_cost_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    print_tables(result)
    print(f"wrote {out}")


def result_block(
    args: argparse.Namespace, argv: list[str] | None, rows: list, ratios: list, memory: list
) -> dict:
    """``step_cost_<device>.json``: the environment, the settings, ratios, memory per
    parameter, the fitted memory model and its GPU extrapolation, and every row."""
    import torch
    import transformers

    device_name = (
        torch.cuda.get_device_name(0)
        if args.device == "cuda"
        else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    command = "python bench/step_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    return {
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


def print_tables(result: dict) -> None:
    print(
        f"{'size':>7} {'mode':>5} {'trainable':>10} {'ZO/fwd time':>12} {'FO/fwd time':>12} "
        f"{'ZO/fwd peak':>12} {'FO/fwd peak':>12}"
    )
    for r in result["ratios"]:
        print(
            f"{r['size']:>7} {r['mode']:>5} {r['params_trainable']:>10} "
            f"{r.get('zo_time_over_forward', float('nan')):>12.2f} "
            f"{r['fo_time_over_forward']:>12.2f} "
            f"{r.get('zo_peak_over_forward', float('nan')):>12.2f} "
            f"{r['fo_peak_over_forward']:>12.2f}"
        )
    gpu = result["memory_model"]["gpu"]
    for mode, m in gpu["modes"].items():
        print(
            f"{mode:>13}: {m['bytes_per_param']:5.1f} B/param, largest on "
            f"{gpu['budget_bytes'] / 1e9:.0f} GB: "
            f"{m['params'] / 1e9:6.2f} B params (state only: {m['params_state_only'] / 1e9:.2f} B)"
        )


if __name__ == "__main__":
    main()
