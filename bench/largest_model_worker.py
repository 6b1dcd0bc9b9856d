"""The worker of ``bench/largest_model.py``: one (mode, size) in a process of its own.

It builds a random-initialised Llama of one size in one training mode, measures the peak
resident memory of a plain no-grad forward of the update's batch, then runs a few real policy
updates of :class:`~zopro_lightning.policy.module.ZOPrOModule` (rollout with generation, the
reference, the update) under a Lightning ``Trainer`` and measures their peak. Memory is
:func:`zopro_lightning.utils.memory.held_mb` (``RssAnon + RssShmem``) sampled every ~10 ms by
:class:`~zopro_lightning.utils.memory.PeakHeld`: pages of memory-mapped files (``RssFile``:
page cache, reclaimable, e.g. the reference policy streamed from disk) are not counted.

Prints one JSON line (the last of stdout).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

#: name -> (hidden, layers, intermediate); heads = hidden / 128 (Llama's head size), vocab
#: VOCAB, untied embeddings. "tiny" is for the smoke test.
SIZES = {
    "tiny": (64, 2, 172),
    "0.1B": (768, 8, 2048),
    "0.2B": (1024, 12, 2816),
    "0.5B": (1536, 16, 4096),
    "1B": (2048, 16, 5632),
    "2B": (2560, 24, 6912),
    "4B": (3072, 32, 8192),
    "7B": (4096, 32, 11008),
    "8B": (4096, 38, 11008),
}
VOCAB = 32000
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]

#: mode -> (LoRA?, optimizer name, how the weights are held and run)
MODES = {
    "zo_full": (False, "zeroth_order", "bf16"),
    "adamw_full": (False, "first_order", "mixed"),
    "zo_lora": (True, "zeroth_order", "bf16"),
    "adamw_lora": (True, "first_order", "mixed"),
}


def llama_params(hidden: int, layers: int, inter: int, vocab: int = VOCAB) -> int:
    """Parameters of the untied Llama of this shape (embeddings, LM head, layers, norms)."""
    return 2 * vocab * hidden + layers * (4 * hidden**2 + 3 * hidden * inter + 2 * hidden) + hidden


def word_tokenizer(vocab: int) -> Any:
    """A word-level tokenizer of ``vocab`` ids (4 special tokens and words ``w0 w1 ...``)."""
    from zopro_lightning.models.tokenizer import SPECIAL_TOKENS, build_word_tokenizer

    words = [f"w{i}" for i in range(vocab - len(SPECIAL_TOKENS))]
    return build_word_tokenizer([" ".join(words)])


def random_llama(size: str, dtype: Any, tokenizer: Any) -> Any:
    """The random-initialised Llama of ``size``, built directly in ``dtype`` (a bf16 model
    never exists in float32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, inter = SIZES[size]
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 128),
        intermediate_size=inter, max_position_embeddings=256, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)


def keep_checkpointing_on(model: Any) -> None:
    """Activation checkpointing as users turn it on; ``ZOPrOModule``'s first-order update keeps
    it on through its ``policy.eval()`` (``policy.module.checkpointed_layers_on``)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@dataclass
class Built:
    """The policy of a mode, its tokenizer and what it counts."""

    policy: Any
    tokenizer: Any
    params_total: int
    params_trainable: int
    checkpointing: bool
    precision: str


def build(mode: str, size: str) -> Built:
    """The policy of ``mode`` at ``size``: full-parameter ZO in bf16; AdamW in float32 master
    weights (the Trainer's ``bf16-mixed`` autocast) with checkpointing; LoRA (r=8 on q, k, v, o;
    float32 adapters) on a bf16 base, with checkpointing under AdamW."""
    import torch

    from zopro_lightning.models.loading import add_lora

    lora, optimizer, holding = MODES[mode]
    tokenizer = word_tokenizer(VOCAB if size != "tiny" else 512)
    dtype = torch.float32 if holding == "mixed" and not lora else torch.bfloat16
    model = random_llama(size, dtype, tokenizer)
    checkpointing = optimizer == "first_order"
    if checkpointing:
        keep_checkpointing_on(model)
    if lora:
        model = add_lora(model, r=8, alpha=16, target_modules=LORA_TARGETS)
    else:
        model.requires_grad_(True)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    precision = "bf16-mixed" if holding == "mixed" else "32-true"
    return Built(model, tokenizer, total, trainable, checkpointing, precision)


def prompts(tokenizer: Any, count: int, tokens: int, seed: int = 0) -> list[str]:
    """``count`` prompts of ``tokens`` random words each."""
    import random

    rng = random.Random(seed)
    words = [w for w in tokenizer.get_vocab() if w.startswith("w")]
    return [" ".join(rng.choice(words) for _ in range(tokens)) for _ in range(count)]


def inference_forward(built: Built, batch: list[str], k: int, new_tokens: int) -> None:
    """One no-grad forward of the update's batch: ``len(batch) * k`` sequences of the prompt
    and ``new_tokens`` completion tokens (under the mode's autocast)."""
    import torch

    ids = built.tokenizer(batch, return_tensors="pt", padding=True)["input_ids"]
    completion = torch.randint(4, len(built.tokenizer), (ids.shape[0], new_tokens))
    input_ids = torch.cat([ids, completion], dim=1).repeat_interleave(k, dim=0)  # [B k, S]
    autocast = built.precision == "bf16-mixed"
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        built.policy(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))


def count_w1(prompts: list[str], completions: list[str]) -> Any:
    """A reward: how often the word ``w1`` appears (any cheap, deterministic score)."""
    import torch

    return torch.tensor([c.split().count("w1") for c in completions], dtype=torch.float32)


def policy_updates(built: Built, mode: str, batch: list[str], settings: dict) -> float:
    """``settings["updates"]`` policy updates of ``ZOPrOModule`` under a Trainer; seconds."""
    import lightning as L
    from torch.utils.data import DataLoader

    from zopro_lightning.policy.module import ZOPrOModule
    from zopro_lightning.policy.optimization import OptimizerSettings
    from zopro_lightning.rl.rollout import RolloutSettings
    from zopro_lightning.zo.optim import SPSASettings

    _, optimizer, _ = MODES[mode]
    lr = 1e-6 if optimizer == "first_order" else 1e-7
    module = ZOPrOModule(
        built.policy, built.tokenizer, count_w1,
        optimizer=OptimizerSettings(name=optimizer, lr=lr),
        rollout=RolloutSettings(k=settings["k"], max_new_tokens=settings["new_tokens"], beta=0.05),
        spsa=SPSASettings(exact_restore=True),  # bit-exact restore (16-bit weights need it)
    )  # fmt: skip
    trainer = L.Trainer(
        max_steps=settings["updates"], accelerator="cpu", devices=1, precision=built.precision,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, DataLoader(batch * settings["updates"], batch_size=len(batch)))
    seconds = time.perf_counter() - start
    if module.policy_updates != settings["updates"]:
        raise RuntimeError(f"{module.policy_updates} updates ran, not {settings['updates']}")
    return seconds


def worker(mode: str, size: str, settings: dict) -> dict[str, Any]:
    """Measure one (mode, size): prebuild, build, inference forward and update peaks (MiB)."""
    import peft  # noqa: F401  (imported before the baseline: its modules are not the model)
    import torch
    import transformers  # noqa: F401

    import zopro_lightning.policy.module  # noqa: F401

    if settings.get("threads"):
        torch.set_num_threads(settings["threads"])
    from zopro_lightning.utils.memory import PeakHeld, held_mb

    prebuild_mb = held_mb()
    with PeakHeld(interval=0.01) as build_peak:
        start = time.perf_counter()
        built = build(mode, size)
        build_seconds = time.perf_counter() - start
    batch = prompts(built.tokenizer, settings["prompts"], settings["prompt_tokens"])
    with PeakHeld(interval=0.01) as forward_peak:
        start = time.perf_counter()
        inference_forward(built, batch, settings["k"], settings["new_tokens"])
        forward_seconds = time.perf_counter() - start
    with PeakHeld(interval=0.01) as update_peak:
        update_seconds = policy_updates(built, mode, batch, settings)
    build_peak_mb, forward_peak_mb, update_peak_mb = build_peak.mb, forward_peak.mb, update_peak.mb
    return result_row(mode, size, built, settings) | {
        "prebuild_mb": prebuild_mb,
        "build_peak_mb": build_peak_mb,
        "forward_peak_mb": forward_peak_mb,
        "update_peak_mb": update_peak_mb,
        "update_over_forward": update_peak_mb / forward_peak_mb,
        "bytes_per_param": (update_peak_mb - prebuild_mb) * 2**20 / built.params_total,
        "forward_bytes_per_param": (forward_peak_mb - prebuild_mb) * 2**20 / built.params_total,
        "build_seconds": build_seconds,
        "forward_seconds": forward_seconds,
        "update_seconds": update_seconds,
    }


def result_row(mode: str, size: str, built: Built, settings: dict) -> dict[str, Any]:
    """What the row says of its set-up."""
    import torch

    hidden, layers, inter = SIZES[size]
    return {
        "mode": mode,
        "size": size,
        "hidden": hidden,
        "layers": layers,
        "intermediate": inter,
        "vocab": len(built.tokenizer),
        "params_total": built.params_total,
        "params_trainable": built.params_trainable,
        "weight_dtype": str(next(built.policy.parameters()).dtype).replace("torch.", ""),
        "precision": built.precision,
        "checkpointing": built.checkpointing,
        "beta": 0.05,
        "updates": settings["updates"],
        "sequences": settings["prompts"] * settings["k"],
        "prompt_tokens": settings["prompt_tokens"],
        "new_tokens": settings["new_tokens"],
        "torch_threads": torch.get_num_threads(),
    }
