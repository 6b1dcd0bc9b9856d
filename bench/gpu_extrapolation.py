"""The memory model of ``bench/memory_model.py`` applied to bf16 Llama-shaped models on one GPU:
the bytes of one update per mode (:func:`gpu_memory`) and the largest model that fits
(:func:`extrapolate`). Pure arithmetic."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from memory_terms import GROUP, activation_units, peak_bytes, static_terms


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
