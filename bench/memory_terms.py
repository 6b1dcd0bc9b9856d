"""The analytic terms of ``bench/memory_model.py``: bytes per parameter and per trainable value
of each operation, counted from the code, and the activation units the fit scales (see that
module's docstring for the model). Pure arithmetic."""

from __future__ import annotations

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
