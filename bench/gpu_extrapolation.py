"""The largest model per training mode on one 80 GB device, extrapolated two ways.

- **From measured sizes** (:func:`measured_extrapolation`, this script's ``main``): the peaks
  ``bench/largest_model.py`` measured on real ``ZOPrOModule`` updates of random bf16 Llamas of
  0.5 B parameters and up, fitted per mode by a line ``peak = slope * P + intercept`` (least
  squares over the sizes that fit) and solved for the ``P`` whose peak fills the device less a
  reserve. The slope is the mode's bytes per parameter (``zopro_lightning.run.memory_check``
  uses it); the intercept, the CPU process's own memory, is replaced on the device by the
  reserve (CUDA context, fragmentation). At the measured batch (4 sequences x 24 tokens):
  activations of a larger batch come on top.
- **From the analytic memory model** of ``bench/memory_model.py`` (:func:`extrapolate`), fitted
  on the small float32 models of ``bench/step_cost.py``: superseded for the modes measured at
  scale; kept for ZO-Adam, which ``bench/largest_model.py`` does not run.

    python bench/gpu_extrapolation.py   # largest_model.json -> gpu_extrapolation.json

Pure arithmetic.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_terms import GROUP, activation_units, peak_bytes, static_terms  # noqa: E402


def llama_shape(hidden: float, vocab: int = 32000) -> dict[str, float]:
    """A Llama-shaped model of width ``hidden``: Llama-7B's proportions (head size 128, one layer
    per 128 of width, SwiGLU intermediate 8/3 of the width, untied embeddings)."""
    return {
        "hidden": hidden,
        "layers": hidden / 128,
        "intermediate": 8 * hidden / 3,
        "vocab": vocab,
    }


def llama_params(shape: dict[str, float]) -> float:
    """Parameters: embeddings and LM head, per layer the attention's four ``h x h`` and the
    MLP's three ``h x I`` matrices and two norms, the final norm."""
    h, n_layers, inter, vocab = (
        shape["hidden"],
        shape["layers"],
        shape["intermediate"],
        shape["vocab"],
    )
    return 2 * vocab * h + n_layers * (4 * h * h + 3 * h * inter + 2 * h) + h


def lora_params(shape: dict[str, float], r: int = 8, targets: int = 4) -> float:
    """LoRA rank ``r`` on ``targets`` square attention projections per layer."""
    return shape["layers"] * targets * r * 2 * shape["hidden"]


#: the modes of the GPU table: (operation, full-parameter?)
GPU_MODES = {
    "zo_sgd_full": ("zeroth_order", True),
    "zo_adam_full": ("zeroth_order_adam", True),
    "adamw_full": ("first_order", True),
    "zo_sgd_lora": ("zeroth_order", False),
    "zo_adam_lora": ("zeroth_order_adam", False),
    "adamw_lora": ("first_order", False),
}

#: fitted float32 alpha (layer activations) scaled for bf16; beta (logits) is kept: the logits
#: are upcast to float32 by ``completion_logprobs`` whatever the weights' dtype
BF16_ACTIVATION_SCALE = 0.5

GPU_ASSUMPTIONS = {
    "weights": "bf16 (2 B) for every model weight",
    "zo_full": "trainable weights bf16; exact_restore=True (the package refuses the arithmetic "
    "restore on 16-bit weights): +2 B copy per weight; ZO-Adam moments zeros_like(param): bf16, "
    "2 x 2 B, and their copies held during the update (exact_restore): +2 x 2 B",
    "adamw_full": "mixed precision as in ZeRO: bf16 weights 2 B + bf16 grads 2 B + fp32 master "
    "4 B + fp32 moments 8 B = 16 B per parameter; fused optimizer (no whole-tensor temporaries)",
    "lora": "r=8 on q,k,v,o; adapters in float32 (4 B), their copy (exact_restore) 4 B, AdamW "
    "grads 4 B + moments 8 B, ZO-Adam moments 8 B + their copies 8 B",
    "activations": "fitted fp32 alpha halved for bf16 activations; beta (logits, upcast to fp32 "
    "by completion_logprobs) kept; attention without an s^2 term (flash/memory-efficient SDPA); "
    "no activation checkpointing",
}


def gpu_terms(mode: str) -> tuple[str, dict[str, float], float]:
    """``(operation, analytic terms, bytes of a trainable value)`` of a GPU mode (bf16)."""
    operation, full = GPU_MODES[mode]
    if full and operation == "first_order":
        terms = static_terms(
            operation,
            exact_restore=False,
            weight_bytes=2,
            trainable_bytes=2,
            moment_bytes=4,
            grad_bytes=2,
            master_bytes=4,
            temporaries=0,  # fused AdamW
        )
        return operation, terms, 2.0
    if full:
        terms = static_terms(
            operation, exact_restore=True, weight_bytes=2, trainable_bytes=2, moment_bytes=2
        )
        return operation, terms, 2.0
    terms = static_terms(
        operation,
        exact_restore=True,
        weight_bytes=2,
        trainable_bytes=4,
        moment_bytes=4,
        temporaries=0 if operation == "first_order" else None,
    )
    terms["s"] += 4  # the adapter's own float32 weight (llama_params counts the base only)
    return operation, terms, 4.0


def gpu_memory(
    mode: str,
    hidden: float,
    groups: dict[str, Any],
    *,
    batch: int,
    seq: int,
    lora_r: int = 8,
) -> dict[str, float]:
    """Bytes of one update of the Llama-shaped bf16 model of width ``hidden`` in ``mode``:
    held part, activations, and the peak (``total_bytes``; ``state_bytes``: without
    activations)."""
    operation, terms, trainable_bytes = gpu_terms(mode)
    shape = llama_shape(hidden)
    params = llama_params(shape)
    full = GPU_MODES[mode][1]
    trainable = params if full else lora_params(shape, lora_r)
    largest_bytes = (shape["vocab"] * hidden if full else hidden * lora_r) * trainable_bytes
    row = {
        "operation": operation,
        "tokens": batch * seq,
        "logit_positions": batch * (seq // 2 + 1),
        **shape,
    }
    a_units, l_units = activation_units(row)
    fitted = groups[GROUP[operation]]
    activations = (
        BF16_ACTIVATION_SCALE * fitted["alpha_bytes_per_unit"] * a_units
        + fitted["beta_bytes_per_logit"] * l_units
    )
    return {
        "params": params,
        "trainable": trainable,
        "held_bytes": terms["w"] * params + terms["s"] * trainable,
        "activation_bytes": activations,
        "total_bytes": peak_bytes(terms, params, trainable, largest_bytes, activations),
        "state_bytes": peak_bytes(terms, params, trainable, largest_bytes, 0.0),
    }


def largest_model(
    memory: Callable[[float], float], budget: float, low: float = 64.0, high: float = 2**17
) -> float:
    """The largest width ``h`` in ``[low, high]`` with ``memory(h) <= budget`` (``memory``
    increasing in ``h``), by bisection; ``0.0`` if even ``low`` does not fit."""
    if memory(low) > budget:
        return 0.0
    if memory(high) <= budget:
        return high
    for _ in range(200):
        mid = (low + high) / 2
        if memory(mid) <= budget:
            low = mid
        else:
            high = mid
        if high - low < 1e-6 * high:
            break
    return low


def extrapolate(
    groups: dict[str, Any],
    *,
    budget_bytes: float = 80e9,
    reserve_bytes: float = 3e9,
    batch: int = 16,
    seq: int = 512,
    lora_r: int = 8,
) -> dict[str, Any]:
    """The largest Llama-shaped bf16 model per mode whose peak fits ``budget - reserve`` at
    ``batch`` sequences of ``seq`` tokens (half of them completion), and with activations left
    out (``params_state_only``: the bound a smaller batch or checkpointing approaches)."""
    usable = budget_bytes - reserve_bytes
    modes = {}
    for mode, (operation, full) in GPU_MODES.items():
        if GROUP[operation] not in groups:
            continue

        def memory(h: float, key: str, mode: str = mode) -> float:
            return gpu_memory(mode, h, groups, batch=batch, seq=seq, lora_r=lora_r)[key]

        hidden = largest_model(lambda h, m=memory: m(h, "total_bytes"), usable)
        hidden_state = largest_model(lambda h, m=memory: m(h, "state_bytes"), usable)
        at = gpu_memory(mode, hidden, groups, batch=batch, seq=seq, lora_r=lora_r)
        _, terms, _ = gpu_terms(mode)
        modes[mode] = {
            "operation": operation,
            "full_parameter": full,
            # bytes per parameter at the peak without activations (full: every value trainable)
            "bytes_per_param": terms["w"] + (terms["s"] + terms["u"] if full else 0.0),
            # bytes per trainable value, its own weight included
            "bytes_per_trainable": (terms["w"] if full else 0.0) + terms["s"] + terms["u"],
            "hidden": hidden,
            "layers": hidden / 128,
            "params": at["params"],
            "trainable": at["trainable"],
            "activation_gb": at["activation_bytes"] / 1e9,
            "held_gb": at["held_bytes"] / 1e9,
            "peak_gb": at["total_bytes"] / 1e9,
            "params_state_only": llama_params(llama_shape(hidden_state)),
        }
    return {
        "budget_bytes": budget_bytes,
        "reserve_bytes": reserve_bytes,
        "batch_sequences": batch,
        "sequence_tokens": seq,
        "completion_tokens": seq // 2,
        "lora_r": lora_r,
        "family": "Llama-7B proportions: head size 128, layers = hidden/128, intermediate = "
        "8/3 hidden, vocab 32000, untied embeddings (hidden 4096: 6.7 B parameters)",
        "assumptions": GPU_ASSUMPTIONS,
        "modes": modes,
    }


# -- from the measured sizes -----------------------------------------------------------------------
def linear_fit(points: Sequence[tuple[float, float]]) -> dict[str, float]:
    """Least squares ``y = slope * x + intercept`` through ``(x, y)`` points; one point: a line
    through the origin. Also the largest relative residual."""
    n = len(points)
    if n == 0:
        raise ValueError("no measured point to fit")
    if n == 1:
        x, y = points[0]
        slope, intercept = y / x, 0.0
    else:
        mean_x = sum(x for x, _ in points) / n
        mean_y = sum(y for _, y in points) / n
        sxx = sum((x - mean_x) ** 2 for x, _ in points)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx
        intercept = mean_y - slope * mean_x
    worst = max(abs(slope * x + intercept - y) / y for x, y in points)
    return {"slope": slope, "intercept": intercept, "points": n, "max_relative_residual": worst}


def measured_extrapolation(
    result: dict[str, Any], budget_bytes: float = 80e9, reserve_bytes: float = 3e9
) -> dict[str, Any]:
    """Per mode of ``largest_model.json``: the line fitted to its measured update peaks
    (bytes, ``RssAnon + RssShmem``) against parameters, and the parameters whose
    ``slope * P`` fills ``budget - reserve`` (the CPU process's intercept left out)."""
    fits, devices = {}, {}
    for mode in dict.fromkeys(r["mode"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["mode"] == mode and r["fit"]]
        rows = [r for r in rows if r["size"] != "tiny"]
        if not rows:
            continue
        line = linear_fit([(r["params_total"], r["update_peak_mb"] * 2**20) for r in rows])
        forward = linear_fit([(r["params_total"], r["forward_peak_mb"] * 2**20) for r in rows])
        fits[mode] = {
            "bytes_per_param": line["slope"],
            "intercept_gb": line["intercept"] / 1e9,
            "forward_bytes_per_param": forward["slope"],
            "sizes": [r["size"] for r in rows],
            "params": [r["params_total"] for r in rows],
            "points": line["points"],
            "max_relative_residual": line["max_relative_residual"],
            "largest_measured": max(r["params_total"] for r in rows),
        }
        devices[mode] = {
            "params": (budget_bytes - reserve_bytes) / line["slope"],
            "bytes_per_param": line["slope"],
        }
    zo, adamw = devices.get("zo_full"), devices.get("adamw_full")
    return {
        "source": "bench/results/largest_model.json",
        "measured_on": result.get("device"),
        "measured_date": result.get("date"),
        "settings": result.get("settings"),
        "budget_bytes": budget_bytes,
        "reserve_bytes": reserve_bytes,
        "how": "per mode, least squares peak = slope * P + intercept over the measured sizes "
        "(peak: RssAnon + RssShmem of real ZOPrOModule updates on CPU, bf16 weights; AdamW: "
        "float32 master weights, bf16 autocast, checkpointing); largest on the device: "
        "slope * P = budget - reserve (the intercept is the CPU process's own memory; the "
        "reserve stands for the CUDA context). At the measured batch: larger batches add "
        "activations (ZO: one layer's and the logits; AdamW with checkpointing: the layer "
        "inputs and one layer's).",
        "fit": fits,
        "device": devices,
        "zo_full_over_adamw_full": zo["params"] / adamw["params"] if zo and adamw else None,
    }


def main(argv: list[str] | None = None) -> None:
    from common import RESULTS, environment, write_results

    parser = argparse.ArgumentParser(description="largest model per mode on one device")
    parser.add_argument("--result", default=str(RESULTS / "largest_model.json"))
    parser.add_argument("--budget-gb", type=float, default=80.0)
    parser.add_argument("--reserve-gb", type=float, default=3.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    result = json.loads(Path(args.result).read_text())
    payload = {
        "benchmark": "gpu_extrapolation",
        **environment(),
        "command": "python bench/gpu_extrapolation.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        **measured_extrapolation(result, args.budget_gb * 1e9, args.reserve_gb * 1e9),
    }
    path = write_results("gpu_extrapolation", payload, args.out)
    for mode, fit in payload["fit"].items():
        device = payload["device"][mode]
        print(
            f"{mode:>10}: {fit['bytes_per_param']:5.2f} B/param (fit over {fit['points']} sizes, "
            f"worst residual {fit['max_relative_residual']:.1%}), largest on "
            f"{args.budget_gb:.0f} GB: {device['params'] / 1e9:6.1f} B params"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
