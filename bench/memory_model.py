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
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_extrapolation import (  # noqa: E402,F401  (the model's public names, for tests and users)
    GPU_MODES,
    extrapolate,
    gpu_memory,
    gpu_terms,
    largest_model,
    llama_params,
    llama_shape,
    lora_params,
)
from memory_terms import (  # noqa: E402,F401
    FITTED,
    GROUP,
    TEMPORARIES,
    TRAINING_OPERATIONS,
    activation_units,
    measured_terms,
    peak_bytes,
    static_terms,
)


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
