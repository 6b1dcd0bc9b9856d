"""Will the run fit? ``zopro-train``'s estimate of its peak memory, before any model is loaded.

The estimate is linear in the parameters, from what ``bench/largest_model.py`` measured on real
``ZOPrOModule`` updates (``bench/results/largest_model.json``: peak ``RssAnon + RssShmem`` of the
process, random Llamas of 0.1-8 B parameters, vocabulary 32,004, bf16 weights, beta > 0; the
fits' worst residual 14 %, at the smallest full-parameter ZO size):

    peak ~ b(mode) * P / shards + logits + activations (first-order without checkpointing)
           + the process's own memory

``b(mode)`` is the measured slope (bytes per parameter) of the mode's linear fit, read from
:data:`BYTES_PER_PARAM`; float32 weights add 2 B per parameter wherever the measured mode held
them in bf16; FSDP divides the per-parameter part by its world size. The logits term counts the
float32 log-softmax of the completion positions, and first-order steps without activation
checkpointing keep every layer's activations (``bench/results/step_cost_cpu.json``'s fitted
training coefficient).

``zopro-train`` estimates each phase (SFT, policy learning with the reward model held beside
the policy, reward refinement with the policy held), takes the largest, and refuses to start
when it exceeds what the device has (CPU: ``MemAvailable``; CUDA: ``torch.cuda.mem_get_info``),
naming the settings that would fit. ``memory_check=false`` skips the check.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

#: bytes per parameter of one update at the peak: the slope of a line fitted to the measured
#: peaks against parameters, per mode (``python bench/largest_model.py`` ->
#: bench/results/largest_model.json; ``python bench/gpu_extrapolation.py`` ->
#: bench/results/gpu_extrapolation.json, "fit"); bf16 weights; key: (LoRA, first-order)
BYTES_PER_PARAM: dict[tuple[bool, bool], float] = {
    (False, False): 2.15,  # full-parameter ZO-SGD, bf16, beta > 0 reference
    (False, True): 16.43,  # full-parameter AdamW: float32 master, bf16 autocast, checkpointing
    (True, False): 2.39,  # LoRA r=8 ZO on a bf16 base
    (True, True): 2.41,  # LoRA r=8 AdamW on a bf16 base, checkpointing
}
#: the process's own memory beside the model (torch, transformers, Lightning): the fits'
#: intercepts (0.56-0.61 GB) rounded up
PROCESS_BYTES = 1.0e9
#: bytes per (token x hidden x layer) a first-order step keeps for its backward without
#: activation checkpointing, float32 (bench/results/step_cost_cpu.json, memory_model
#: coefficients, training alpha 60.3); halved for 16-bit weights
TRAINING_ACTIVATION_BYTES = 60.3
#: bytes per logit of the completion positions (float32 log-softmax and its input; inference
#: beta 8.0 of the same fit)
LOGIT_BYTES = 8.0


class MemoryCheckError(MemoryError):
    """The run's estimated peak exceeds the device's memory; nothing was loaded."""


@dataclass(frozen=True)
class Mode:
    """How one phase holds and trains a model."""

    lora: bool
    first_order: bool
    weight_bytes: int = 2  # 2: bf16 / fp16 weights; 4: float32
    checkpointing: bool = False
    shards: int = 1  # FSDP world size (1: every process holds the whole model)

    def describe(self) -> str:
        kind = "LoRA" if self.lora else "full-parameter"
        rule = "first-order AdamW" if self.first_order else "zeroth-order"
        dtype = "float32" if self.weight_bytes == 4 else "16-bit"
        extra = ", checkpointing" if self.checkpointing and self.first_order else ""
        shards = f", FSDP over {self.shards}" if self.shards > 1 else ""
        return f"{kind} {rule}, {dtype} weights{extra}{shards}"


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a model: parameters, width, depth, vocabulary."""

    params: int
    hidden: int
    layers: int
    vocab: int


@dataclass(frozen=True)
class Work:
    """The tokens of one step: ``sequences`` of ``tokens`` each, ``completion`` of them
    scored."""

    sequences: int
    tokens: int
    completion: int


def bytes_per_param(mode: Mode) -> float:
    """:data:`BYTES_PER_PARAM` of the mode, +2 B for float32 weights where the measured mode
    held them in bf16 (full-parameter AdamW keeps float32 master weights either way)."""
    measured = BYTES_PER_PARAM[(mode.lora, mode.first_order)]
    full_adamw = not mode.lora and mode.first_order
    return measured + (2.0 if mode.weight_bytes == 4 and not full_adamw else 0.0)


def estimate_bytes(shape: Shape, mode: Mode, work: Work) -> float:
    """The peak of one process training ``shape`` in ``mode`` on ``work`` (module docstring)."""
    held = bytes_per_param(mode) * shape.params / mode.shards
    logits = LOGIT_BYTES * work.sequences * (work.completion + 1) * shape.vocab
    activations = 0.0
    if mode.first_order and not mode.checkpointing:
        scale = mode.weight_bytes / 4
        units = work.sequences * work.tokens * shape.hidden * shape.layers
        activations = TRAINING_ACTIVATION_BYTES * scale * units
    return held + logits + activations + PROCESS_BYTES


def held_bytes(shape: Shape, weight_bytes: int) -> float:
    """A model held beside another, frozen: its weights."""
    return float(shape.params * weight_bytes)


def shape_of(config: Any) -> Shape:
    """The parameter count of a transformers config, counted on the meta device (no weights
    are allocated), and its width, depth and vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = _first(text, ("hidden_size", "n_embd", "d_model"))
    layers = _first(text, ("num_hidden_layers", "n_layer", "num_layers"))
    return Shape(params, hidden, layers, int(getattr(text, "vocab_size", 0) or 0))


def _first(config: Any, keys: tuple[str, ...]) -> int:
    for key in keys:
        if isinstance(getattr(config, key, None), int):
            return int(getattr(config, key))
    return 0


# -- the device --------------------------------------------------------------------------------
def meminfo_available_bytes() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` (bytes)."""
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable line")


def available_bytes(accelerator: str) -> tuple[int, str]:
    """``(bytes free, where that figure comes from)`` on the run's device."""
    import torch

    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        free, _ = torch.cuda.mem_get_info()
        return int(free), "free on CUDA device 0 (torch.cuda.mem_get_info)"
    return meminfo_available_bytes(), "MemAvailable of this machine (/proc/meminfo)"


# -- zopro-train's phases ------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSettings:
    """What the estimate reads of a ``zopro-train`` config."""

    lora: bool
    schedule: str
    weight_bytes: int
    shards: int
    processes: int  # processes sharing this machine's memory (CPU DDP/FSDP ranks)
    accelerator: str
    sft_lora: bool = True  # SFT with LoRA (false: ``sft.lora=false`` or no ``model.lora``)


def weight_bytes_of(dtype: Any) -> int:
    """2 for bf16/fp16 names, else 4 (float32, ``auto`` and ``null`` counted as float32)."""
    return 2 if str(dtype).lower() in ("bf16", "bfloat16", "fp16", "float16", "half") else 4


def run_settings(cfg: Any) -> RunSettings:
    """The settings of the composed config the estimate depends on."""
    trainer = cfg.get("trainer") or {}
    devices = trainer.get("devices", 1)
    ranks = (devices if isinstance(devices, int) and devices > 0 else 1) * int(
        trainer.get("num_nodes", 1) or 1
    )
    strategy = str(trainer.get("strategy", "") or "")  # "fsdp", or trainer=fsdp's _target_
    accelerator = str(trainer.get("accelerator", "cpu") or "cpu")
    on_cpu = accelerator == "cpu"
    return RunSettings(
        lora=cfg.model.get("lora") is not None,
        schedule=str(cfg.loop.schedule),
        weight_bytes=weight_bytes_of(cfg.model.get("dtype")),
        shards=ranks if "fsdp" in strategy else 1,
        processes=ranks if on_cpu else 1,
        accelerator=accelerator,
        sft_lora=cfg.model.get("lora") is not None and bool(cfg.sft.get("lora", True)),
    )


def run_work(cfg: Any) -> Work:
    """The largest step of the run: SFT's batch or a policy update's (``loop.batch_size x k``
    sequences of the prompt bound plus the new tokens), micro-batched when set."""
    rollout = cfg.policy.rollout
    prompt = cfg.dataset.get("task", {}).get("max_prompt_tokens") or 64
    sequences = rollout.get("micro_batch_size") or cfg.loop.batch_size * rollout.k
    policy = Work(sequences, prompt + rollout.max_new_tokens, rollout.max_new_tokens)
    sft = Work(cfg.sft.batch_size, cfg.sft.get("max_length") or 128, 0)
    return max(policy, sft, key=lambda w: w.sequences * w.tokens)


def phase_estimates(policy: Shape, reward: Shape | None, run: RunSettings, work: Work) -> dict:
    """Bytes per process of each phase: SFT (first-order, LoRA or full as the model), policy
    learning (first-order when the schedule has a first-order phase, else zeroth-order; the
    reward model held beside it) and reward refinement (its LoRA first-order; the policy held)."""
    common = {"weight_bytes": run.weight_bytes, "shards": run.shards}
    first = Mode(run.sft_lora and run.lora, True, **common)
    policy_mode = Mode(run.lora, run.schedule != "zeroth_order", **common)
    beside = held_bytes(reward, run.weight_bytes) / run.shards if reward else 0.0
    estimates = {
        f"SFT ({first.describe()})": estimate_bytes(policy, first, work),
        f"policy learning ({policy_mode.describe()}, reward model held)": (
            estimate_bytes(policy, policy_mode, work) + beside
        ),
    }
    if reward is not None:
        reward_mode = Mode(True, True, **common)
        estimates[f"reward refinement ({reward_mode.describe()}, policy held)"] = (
            estimate_bytes(reward, reward_mode, work)
            + held_bytes(policy, run.weight_bytes) / run.shards
        )
    return estimates


def peak_of(policy: Shape, reward: Shape | None, run: RunSettings, work: Work) -> tuple[str, float]:
    """``(phase, bytes)`` of the largest phase, all of the machine's processes together."""
    phase, per_process = max(
        phase_estimates(policy, reward, run, work).items(), key=lambda item: item[1]
    )
    return phase, per_process * run.processes


#: alternatives the refusal weighs: (override, what changes)
FIXES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("model.lora={r: 8, alpha: 16, target_modules: [q_proj, k_proj, v_proj, o_proj]} (LoRA)",
     {"lora": True}),
    ("loop.schedule=zeroth_order (zeroth-order policy learning)", {"schedule": "zeroth_order"}),
    ("model.dtype=bf16 (16-bit weights)", {"weight_bytes": 2}),
)  # fmt: skip


def fixes(
    policy: Shape, reward: Shape | None, run: RunSettings, work: Work, budget: float
) -> list[str]:
    """Each single change and the pairs of them, with their estimates, those that fit first;
    FSDP over more GPUs (a user's own Trainer) where the run is on CUDA."""
    lines, seen = [], set()
    candidates = [(name, change) for name, change in FIXES]
    candidates += [
        (f"{a} and {b}", ca | cb) for i, (a, ca) in enumerate(FIXES) for b, cb in FIXES[i + 1 :]
    ]
    for name, change in candidates:
        changed = dataclasses.replace(run, **change)
        if changed == run or changed in seen:
            continue
        seen.add(changed)
        _, need = peak_of(policy, reward, changed, work)
        lines.append((need > budget, f"{name}: about {need / 1e9:.1f} GB"))
    if run.processes == 1 and run.accelerator != "cpu":
        for shards in (2, 4, 8):
            _, need = peak_of(policy, reward, dataclasses.replace(run, shards=shards), work)
            if need <= budget:
                text = (
                    f"FSDP over {shards} GPUs, in your own Lightning Trainer (strategy="
                    "zopro_lightning.utils.sharding.fsdp_strategy(); zopro-train refuses "
                    "trainer=fsdp)"
                )
                lines.append((False, f"{text}: about {need / 1e9:.1f} GB a GPU"))
                break
    lines.sort(key=lambda item: item[0])
    return [("fits: " if not over else "still over: ") + text for over, text in lines]


def refusal(phase: str, need: float, budget: float, where: str, fix_lines: list[str]) -> str:
    """The error's text: estimate, what is there, settings that would fit, how to skip."""
    return (
        f"zopro-train: this run needs about {need / 1e9:.1f} GB at its peak ({phase}), but "
        f"{budget / 1e9:.1f} GB are available ({where}); nothing was loaded. Settings that "
        "would bring it down (estimates from bench/results/largest_model.json):\n  - "
        + "\n  - ".join(fix_lines)
        + "\nActivation checkpointing (model.gradient_checkpointing_enable()) lowers first-order "
        "steps further in your own Lightning project. To run anyway: memory_check=false."
    )


def reward_shape(cfg: Any, policy: Shape) -> Shape | None:
    """The reward model's shape: the policy's base without ``reward_model.backbone``; a named
    backbone's from its config when it can be read offline; ``None`` otherwise."""
    backbone = cfg.reward_model.get("backbone")
    if not backbone:
        return policy
    try:
        from transformers import AutoConfig

        return shape_of(AutoConfig.from_pretrained(str(backbone)))
    except Exception:  # noqa: BLE001 (a backbone the check cannot size is left to the run)
        return None


def check_run_memory(cfg: Any, spec: Any, tokenizer: Any) -> tuple[str, float, float]:
    """Refuse the run when its estimated peak exceeds the device's memory.

    Returns:
        ``(phase, estimated bytes, available bytes)`` when it fits.

    Raises:
        MemoryCheckError: the estimate, what is available and the settings that would fit.
    """
    policy = shape_of(spec.config(tokenizer))
    run, work = run_settings(cfg), run_work(cfg)
    reward = reward_shape(cfg, policy)
    phase, need = peak_of(policy, reward, run, work)
    budget, where = available_bytes(run.accelerator)
    if need > budget:
        raise MemoryCheckError(
            refusal(phase, need, budget, where, fixes(policy, reward, run, work, budget))
        )
    return phase, need, budget


def is_launched_rank() -> bool:
    """A rank > 0 started by a launcher (its rank 0 checked before loading anything)."""
    return any(int(os.environ.get(key, "0") or 0) > 0 for key in ("RANK", "LOCAL_RANK"))
