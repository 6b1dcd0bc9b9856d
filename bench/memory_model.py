"""A memory model of one policy update, fitted to ``bench/step_cost.py``'s measurements, and the
largest Llama-shaped model each training mode fits on one GPU.

The model (bytes at the peak of one operation, above the process before the model was built)::

    peak = w * P                                 weights (P parameters, w bytes each)
         + s * P_t                               per trainable value, held through the step:
                                                 copy (exact restore), moments, gradients
         + max(alpha * A + beta * N_l * V,       activations (during the forwards)
               u * P_t + k * L_t * b)            or the update's transients (after them)
         + c                                     the process's own overhead of a model (CPU)

- ``w``, ``s``, ``u``, ``k`` are *analytic*, counted from the code (:func:`static_terms`): ``u``
  per trainable value alive only while the update is applied (ZO-Adam's copies of its moments
  with ``exact_restore``), ``k`` whole-tensor temporaries in units of the largest trainable
  tensor (``L_t`` values of ``b`` bytes). The state bytes are also read from the optimizers in
  the worker (``update_state_bytes_per_trainable``).
- ``alpha``, ``beta`` and ``c`` are *fitted*, by non-negative least squares on what the analytic
  part leaves of the measured peaks, in two groups: ``inference`` (forward and ZO-SGD, all
  sizes, LoRA and full-parameter: the same forward under ``inference_mode``) and ``training``
  (the first-order step). ``A`` is ``N h`` for inference (one layer's working set: activations
  are freed layer by layer) and ``N h L`` for training (every layer's activations are kept for
  the backward; the step's gradients are counted in ``s`` on top, an upper bound); ``N_l V``
  counts the logits (``N_l`` positions whose logits are computed, ``V`` the vocabulary), which
  :func:`zopro_lightning.rl.rollout.completion_logprobs` upcasts to float32 whatever the weights'
  dtype. ZO-Adam is left out of the fit and *predicted* with the inference coefficients: its
  relative error checks the analytic terms. ``c`` is what building a model costs the CPU process
  besides its tensors (module objects, small tensors in the heap); it is not carried to the GPU,
  whose context and fragmentation a fixed reserve covers. Three sizes, one of them deeper with a
  larger vocabulary at the same width, make ``A``, ``N_l V`` and ``c`` separable (two sizes
  that scale width, layers and vocabulary together do not).

:func:`extrapolate` applies the model to bf16 Llama-shaped models on one GPU and
:func:`largest_model` solves for the largest that fits. Pure arithmetic (no torch): the test
suite checks it on synthetic points (``tests/test_bench_memory.py``).

    python bench/memory_model.py bench/results/step_cost_cpu.json           # re-derive, print
    python bench/memory_model.py bench/results/step_cost_cpu.json --write   # and store it
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

#: which activation coefficients an operation uses; the fit uses the operations in FITTED
GROUP = {
    "forward": "inference",
    "zeroth_order": "inference",
    "zeroth_order_adam": "inference",
    "first_order": "training",
}
FITTED = ("forward", "zeroth_order", "first_order")
TRAINING_OPERATIONS = ("first_order",)  # keep every layer's activations for a backward

# whole-tensor temporaries alive at once at an update's peak, in units of the largest trainable
# tensor: ZO-Adam's g_hat with z drawn whole (then with Adam's denominator); the previous
# tensor's, still referenced, are those of a small one (embeddings and LM head are not
# neighbours); torch's single-tensor AdamW on a CPU: its denominator. ZO-SGD draws z in
# 32K-element chunks (zopro_lightning.zo.draws): none.
TEMPORARIES = {"forward": 0, "zeroth_order": 0, "zeroth_order_adam": 2, "first_order": 1}


def static_terms(
    operation: str,
    *,
    exact_restore: bool,
    weight_bytes: float,
    trainable_bytes: float,
    moment_bytes: float,
    grad_bytes: float | None = None,
    master_bytes: float = 0.0,
    temporaries: float | None = None,
) -> dict[str, float]:
    """Analytic terms of one operation as the code runs it: bytes per model parameter ``w``,
    per trainable value held through the step ``s`` (beyond the weight itself), per trainable
    value alive only while the update is applied ``u``, and whole-tensor temporaries ``k``.

    Args:
        operation: ``forward``, ``zeroth_order`` (ZO-SGD), ``zeroth_order_adam``, ``first_order``
            (AdamW).
        exact_restore: the SPSA step keeps a copy of the trainable tensors (LoRA by default;
            required for 16-bit trainable weights, whose arithmetic restore the package refuses).
        weight_bytes: bytes of a model weight.
        trainable_bytes: bytes of a trainable value (its copy is of the same dtype).
        moment_bytes: bytes of one optimizer moment (ZO-Adam's are ``zeros_like(param)``, as are
            torch AdamW's; a mixed-precision AdamW keeps float32 moments).
        grad_bytes: bytes of a gradient value (default: ``trainable_bytes``).
        master_bytes: a float32 master copy of the trainable weights (mixed precision), or 0.
        temporaries: ``k`` (default: :data:`TEMPORARIES`).
    """
    grad_bytes = trainable_bytes if grad_bytes is None else grad_bytes
    copy = trainable_bytes if exact_restore else 0.0
    held = {
        "forward": 0.0,
        "zeroth_order": copy,
        "zeroth_order_adam": copy + 2 * moment_bytes,
        "first_order": grad_bytes + 2 * moment_bytes + master_bytes,
    }[operation]
    # ZerothOrderOptimizer._apply_rule clones every tensor's moments (exact_restore) to undo a
    # non-finite update, and keeps the clones until all tensors are updated
    update = 2 * moment_bytes if operation == "zeroth_order_adam" and exact_restore else 0.0
    k = TEMPORARIES[operation] if temporaries is None else temporaries
    return {"w": weight_bytes, "s": held, "u": update, "k": float(k)}


def measured_terms(row: dict[str, Any]) -> dict[str, float]:
    """:func:`static_terms` of a measured row (one dtype for weights, grads and moments)."""
    return static_terms(
        row["operation"],
        exact_restore=bool(row.get("exact_restore")),
        weight_bytes=row["weight_bytes"],
        trainable_bytes=row["trainable_bytes"],
        moment_bytes=row["trainable_bytes"],
    )


def peak_bytes(
    terms: dict[str, float],
    params: float,
    trainable: float,
    largest_bytes: float,
    activations: float,
) -> float:
    """The model's peak: held part plus the larger of activations and update transients."""
    transient = terms["u"] * trainable + terms["k"] * largest_bytes
    return terms["w"] * params + terms["s"] * trainable + max(activations, transient)


def activation_units(row: dict[str, Any]) -> tuple[float, float]:
    """``(A, N_l V)`` of a measurement or shape row (see the module docstring)."""
    tokens = row["tokens"] * row["hidden"]
    if row["operation"] in TRAINING_OPERATIONS:
        tokens *= row["layers"]
    return float(tokens), float(row["logit_positions"] * row["vocab"])


def nonnegative_least_squares(
    columns: Sequence[Sequence[float]], target: Sequence[float]
) -> tuple[list[float], float]:
    """Minimise ``|sum_j c_j columns[j] - target|^2`` with every ``c_j >= 0``.

    Exhaustive over the active sets (a handful of columns): the unconstrained least squares of
    each subset, the best whose coefficients are all non-negative. Returns the coefficients
    (0 for the columns left out) and the residual sum of squares.
    """
    n = len(columns)
    best: tuple[list[float], float] = ([0.0] * n, sum(t * t for t in target))
    for size in range(1, n + 1):
        for subset in itertools.combinations(range(n), size):
            coefficients = _least_squares([columns[j] for j in subset], target)
            if coefficients is None or any(c < 0 for c in coefficients):
                continue
            full = [0.0] * n
            for j, c in zip(subset, coefficients, strict=True):
                full[j] = c
            rss = _rss(columns, full, target)
            if rss < best[1] - 1e-12 * max(1.0, best[1]):
                best = (full, rss)
    return best


def _least_squares(columns: Sequence[Sequence[float]], target: Sequence[float]) -> list | None:
    """Normal equations, solved by Gaussian elimination with pivoting (``None``: singular).
    Columns are scaled to unit norm first, so units of very different size stay well posed."""
    scales = [math.sqrt(sum(x * x for x in col)) or 1.0 for col in columns]
    cols = [[x / s for x in col] for col, s in zip(columns, scales, strict=True)]
    n = len(cols)
    gram = [
        [sum(a * b for a, b in zip(cols[i], cols[j], strict=True)) for j in range(n)]
        for i in range(n)
    ]
    rhs = [sum(a * b for a, b in zip(cols[i], target, strict=True)) for i in range(n)]
    for i in range(n):
        pivot = max(range(i, n), key=lambda r: abs(gram[r][i]))
        if abs(gram[pivot][i]) < 1e-12:
            return None
        gram[i], gram[pivot] = gram[pivot], gram[i]
        rhs[i], rhs[pivot] = rhs[pivot], rhs[i]
        for r in range(i + 1, n):
            f = gram[r][i] / gram[i][i]
            for c in range(i, n):
                gram[r][c] -= f * gram[i][c]
            rhs[r] -= f * rhs[i]
    solution = [0.0] * n
    for i in reversed(range(n)):
        solution[i] = (rhs[i] - sum(gram[i][c] * solution[c] for c in range(i + 1, n))) / gram[i][i]
    return [x / s for x, s in zip(solution, scales, strict=True)]


def _rss(columns: Sequence[Sequence[float]], coefficients: Sequence[float], target) -> float:
    return sum(
        (sum(c * col[i] for c, col in zip(coefficients, columns, strict=True)) - t) ** 2
        for i, t in enumerate(target)
    )


def held_bytes(row: dict[str, Any], terms: dict[str, float]) -> float:
    """The part of a row's peak held through the step (weights and per-trainable state)."""
    return terms["w"] * row["params_total"] + terms["s"] * row["params_trainable"]


def fit(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Fit ``alpha`` and ``beta`` of each group to the measured rows of :data:`FITTED`, and
    predict every row (keys as ``bench/step_cost.py`` writes them: ``operation``,
    ``params_total``, ``params_trainable``, ``largest_trainable_numel``, ``weight_bytes``,
    ``trainable_bytes``, ``exact_restore``, ``tokens``, ``logit_positions``, ``hidden``,
    ``layers``, ``vocab``, ``peak_above_prebuild_bytes``)."""
    coefficients: dict[str, Any] = {}
    for group in sorted(set(GROUP.values())):
        members = [r for r in rows if r["operation"] in FITTED and GROUP[r["operation"]] == group]
        if not members:
            continue
        units = [activation_units(r) for r in members]
        targets = [
            r["peak_above_prebuild_bytes"] - held_bytes(r, measured_terms(r)) for r in members
        ]
        (alpha, beta, constant), rss = nonnegative_least_squares(
            [[u[0] for u in units], [u[1] for u in units], [1.0] * len(units)], targets
        )
        coefficients[group] = {
            "alpha_bytes_per_unit": alpha,
            "beta_bytes_per_logit": beta,
            "constant_mb": constant / 2**20,
            "activation_unit": "tokens*hidden*layers" if group == "training" else "tokens*hidden",
            "fitted_on": sorted({r["operation"] for r in members}),
            "points": len(members),
            "residual_rms_mb": math.sqrt(rss / len(members)) / 2**20,
        }
    points = []
    for row in rows:
        group = coefficients.get(GROUP[row["operation"]])
        if group is None:
            continue
        terms = measured_terms(row)
        a_units, l_units = activation_units(row)
        activations = (
            group["alpha_bytes_per_unit"] * a_units + group["beta_bytes_per_logit"] * l_units
        )
        predicted = group["constant_mb"] * 2**20 + peak_bytes(
            terms,
            row["params_total"],
            row["params_trainable"],
            row["largest_trainable_numel"] * row["trainable_bytes"],
            activations,
        )
        points.append(
            {
                "size": row["size"],
                "mode": row["mode"],
                "operation": row["operation"],
                "in_fit": row["operation"] in FITTED,
                "measured_mb": row["peak_above_prebuild_bytes"] / 2**20,
                "held_mb": held_bytes(row, terms) / 2**20,
                "activations_mb": activations / 2**20,
                "predicted_mb": predicted / 2**20,
                "relative_error": predicted / row["peak_above_prebuild_bytes"] - 1,
            }
        )
    return {"groups": coefficients, "points": points}


# ---------------------------------------------------------------------------- extrapolation


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


def analyse(rows: Sequence[dict[str, Any]], **extrapolation: Any) -> dict[str, Any]:
    """Fit, then extrapolate: the ``memory_model`` block of ``step_cost_*.json``."""
    fitted = fit(rows)
    return {
        "model": "peak above the process before the model was built = w P + s P_t + "
        "max(alpha A + beta N_l V, u P_t + k L_t b) + c (docstring of bench/memory_model.py)",
        "how": "w, s, u, k analytic (counted from the code; the optimizers' state bytes are "
        "read in the worker too); alpha, beta, c: non-negative least squares over the measured "
        "sizes and modes of forward + ZO-SGD (inference) and of AdamW (training), on the peak "
        "minus the held part; ZO-Adam predicted, not fitted; c (CPU process overhead) not "
        "carried to the GPU",
        "measured": "CPU, float32, peak RSS above the process before the model was built",
        "extrapolated": "all of gpu: bf16, Llama shapes, batch, 80 GB budget",
        "coefficients": fitted["groups"],
        "points": fitted["points"],
        "gpu": extrapolate(fitted["groups"], **extrapolation),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", help="a bench/results/step_cost_*.json")
    parser.add_argument(
        "--write", action="store_true", help="replace its memory_model block (else print it)"
    )
    args = parser.parse_args(argv)
    path = Path(args.result)
    result = json.loads(path.read_text())
    rows = [r for r in result["measurements"] if "peak_above_prebuild_bytes" in r]
    block = analyse(rows)
    if not args.write:
        print(json.dumps(block, indent=2))
        return
    result["memory_model"] = block
    result["memory_model_rederived"] = {
        "date": datetime.now(timezone.utc).isoformat(),
        "command": f"python bench/memory_model.py {args.result} --write",
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)
    print(f"updated {path}")


if __name__ == "__main__":
    main()
