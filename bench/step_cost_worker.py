"""The worker of ``bench/step_cost.py``: one measurement (size, mode, operation) in a process of
its own, so that its peak memory is that operation's alone (see that module's docstring)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zopro_lightning.utils.memory import peak_rss_mb, rss_mb

SIZES = {  # hidden, layers, heads, intermediate, vocab
    "small": (256, 4, 4, 1024, 8000),
    # small's width with 4 x its layers and Llama's vocabulary: with small and medium, it
    # separates what grows with layers, with width and with the logits (bench/memory_model.py)
    "small_deep": (256, 16, 4, 1024, 32000),
    "medium": (512, 8, 8, 2048, 16000),
    "large": (1024, 16, 16, 4096, 32000),
}


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current resident set (Linux ``clear_refs``); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


@dataclass
class Setup:
    """A random Llama of one size (LoRA or full-parameter) and one batch of ``[B, S]`` tokens
    (the second half completion), with the clipped surrogate on it as ``loss``."""

    model: Any
    params: dict
    n_total: int
    n_trainable: int
    loss: Callable[[], Any]


def build(size: str, mode: str, device: str, batch: int, seq: int) -> Setup:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from zopro_lightning.models.loading import add_lora
    from zopro_lightning.rl.objectives import clipped_surrogate
    from zopro_lightning.rl.rollout import completion_logprobs

    torch.manual_seed(0)
    hidden, layers, heads, inter, vocab = SIZES[size]
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=inter,
        max_position_embeddings=2 * seq,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    if mode == "lora":
        model = add_lora(
            model, r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
        )
    model = model.to(device).eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    input_ids = torch.randint(0, vocab, (batch, seq), device=device)
    attention = torch.ones_like(input_ids)
    mask = torch.ones(batch, seq // 2, device=device)
    with torch.no_grad():
        old = completion_logprobs(model, input_ids, attention, mask)
    advantages = torch.randn(batch, device=device)

    def loss() -> torch.Tensor:
        new = completion_logprobs(model, input_ids, attention, mask)
        return clipped_surrogate(new, old, advantages, 0.2).mean()

    n_total = sum(p.numel() for p in model.parameters())
    return Setup(model, params, n_total, sum(p.numel() for p in params.values()), loss)


def optimizers(operation: str, setup: Setup) -> tuple[Any, Any, bool]:
    """``(zeroth-order optimizer or None, AdamW or None, exact restore)`` of ``operation``."""
    import torch

    from zopro_lightning.zo.optim import SPSASettings, ZerothOrderOptimizer
    from zopro_lightning.zo.samplers import GaussianSampler

    adamw = None
    if operation == "first_order":
        adamw = torch.optim.AdamW(setup.params.values(), lr=1e-5)
    # ZOPrOModule's default (LoRA: copy; full: arithmetic)
    exact = setup.n_trainable <= 0.1 * setup.n_total
    zo = None
    if operation.startswith("zeroth_order"):
        rule = "adam" if operation == "zeroth_order_adam" else "sgd"
        settings = SPSASettings(eps=1e-3, exact_restore=exact, rule=rule)
        zo = ZerothOrderOptimizer(setup.params.items(), GaussianSampler(), settings, lr=1e-6)
    return zo, adamw, exact


def step_of(operation: str, loss: Callable, zo: Any, adamw: Any) -> Callable[[], None]:
    """One run of ``operation``: a forward, a zeroth-order step or an AdamW step."""
    import torch

    steps = iter(range(10**9))

    def inference_loss() -> torch.Tensor:
        with torch.inference_mode():
            return loss()

    def run_once() -> None:
        if operation == "forward":
            inference_loss()
        elif zo is not None:
            zo.step(loss_fn=inference_loss, seed=next(steps))
        else:
            adamw.zero_grad(set_to_none=True)
            loss().backward()
            adamw.step()

    return run_once


def time_rounds(
    run_once: Callable, loss: Callable, device: str, repeats: int
) -> tuple[list[float], list[float]]:
    """Seconds of the operation and of a forward, each repeat timing both in turn.

    Time ratios come from one process: each repeat times a forward and then the operation,
    so both see the same machine state (separate processes differ by 20-40 % on a busy CPU);
    the first round warms up and is dropped by the caller."""
    import torch

    def timed(fn) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def forward_only() -> None:
        with torch.inference_mode():
            loss()

    times, forward_times = [], []
    for _ in range(repeats + 1):
        forward_times.append(timed(forward_only))
        times.append(timed(run_once))
    return times, forward_times


def update_state_bytes(zo: Any, adamw: Any, params: dict) -> int:
    """Exact bytes of what the update keeps between steps (checks the analytic terms)."""
    import torch

    if adamw is not None:
        return sum(
            t.numel() * t.element_size()
            for state in adamw.state.values()
            for t in state.values()
            if isinstance(t, torch.Tensor) and t.ndim
        ) + sum(
            p.grad.numel() * p.grad.element_size() for p in params.values() if p.grad is not None
        )
    return zo.state_bytes() if zo is not None else 0


def memory_marks(device: str) -> tuple[float, float, bool]:
    """``(peak while building, baseline after it, peak reset)``, the peak reset after."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        build_peak_mb = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        return build_peak_mb, torch.cuda.memory_allocated() / 2**20, True
    return peak_rss_mb(), rss_mb(), reset_peak_rss()


def worker(
    size: str, mode: str, operation: str, device: str, batch: int, seq: int, repeats: int
) -> dict:
    import peft  # noqa: F401  (imported before the baseline: its modules are not the model)
    import torch

    # the baseline before the model exists: the peak above it counts weights, state, activations
    if device == "cuda":
        torch.cuda.synchronize()
        prebuild_mb = torch.cuda.memory_allocated() / 2**20
    else:
        prebuild_mb = rss_mb()
    setup = build(size, mode, device, batch, seq)
    zo, adamw, exact = optimizers(operation, setup)
    run_once = step_of(operation, setup.loss, zo, adamw)
    build_peak_mb, baseline_mb, peak_reset = memory_marks(device)
    times, forward_times = time_rounds(run_once, setup.loss, device, repeats)
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mb()
    state_bytes = update_state_bytes(zo, adamw, setup.params)
    hidden, layers, _, inter, vocab = SIZES[size]
    n_total, n_trainable = setup.n_total, setup.n_trainable
    return {
        "size": size,
        "mode": mode,
        "operation": operation,
        "params_total": n_total,
        "params_trainable": n_trainable,
        "largest_trainable_numel": max(p.numel() for p in setup.params.values()),
        "weight_bytes": next(iter(setup.model.parameters())).element_size(),
        "trainable_bytes": next(iter(setup.params.values())).element_size(),
        "hidden": hidden,
        "layers": layers,
        "intermediate": inter,
        "vocab": vocab,
        "batch_sequences": batch,
        "tokens": batch * seq,
        "logit_positions": batch * (seq // 2 + 1),
        "exact_restore": exact if operation.startswith("zeroth_order") else None,
        "zo_rule": zo.settings.rule if zo is not None else None,
        "update_state_bytes": state_bytes,
        "update_state_bytes_per_trainable": state_bytes / n_trainable,
        **timing_fields(times[1:], forward_times[1:]),
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


def timing_fields(times: list[float], forward_times: list[float]) -> dict[str, Any]:
    """The median of the per-repeat ratios to a forward, and the ratio of the fastest repeats
    (the least disturbed by other work on the machine)."""
    return {
        "seconds": statistics.median(times),
        "forward_seconds_same_process": statistics.median(forward_times),
        "over_forward_same_process": statistics.median(
            t / f for t, f in zip(times, forward_times, strict=True)
        ),
        "over_forward_min_same_process": min(times) / min(forward_times),
        "seconds_all": times,
        "forward_seconds_all": forward_times,
    }
