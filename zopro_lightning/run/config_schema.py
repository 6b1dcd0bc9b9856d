"""Check the composed config before any work, and say what is wrong with every bad option.

::

    validate_config(cfg)   # first thing run_pipeline does; raises ConfigError listing every problem

Three kinds of check, each problem one line naming the option, its value and what is valid:

- **values** (:data:`RULES`, :data:`CHOICES`): types and ranges of the options the package
  reads, e.g. ``loop.iterations='abc': not an integer; valid: an integer >= 1``. Required
  options left at ``???`` are named with the override that sets them.
- **paths**: what must exist before a run can use it: a local ``model.name_or_path`` (a
  directory with ``config.json`` and a tokenizer), ``model.tokenizer``, a local dataset file,
  the label file of ``judge=file``, a local LLM judge or reward backbone, and the run
  directory of ``resume=`` (never created here).
- **combinations**: a gold-reward judge on a dataset without a gold reward.
- **lengths**: ``dataset.task.max_prompt_tokens + policy.rollout.max_new_tokens`` fits the policy's
  context (the tiny model's ``max_position_embeddings``, or a local model's ``config.json``)
  and ``sft.max_length``, so no prompt is cut at generation and every SFT example keeps its
  answer.

Options this module does not know are left alone (other config groups may add theirs), and a
known option absent from the config is skipped.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from zopro_lightning.models.loading import (
    local_context_length,
    looks_local,
    model_directory_problem,
)

__all__ = ["BOOLEANS", "CHOICES", "RULES", "ConfigError", "Rule", "validate_config"]

_ABSENT = object()


class ConfigError(ValueError):
    """The composed config has bad options; ``problems`` holds one message per option."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__(
            f"invalid config ({len(problems)} problem{'s' * (len(problems) > 1)}); nothing was "
            "run:\n  - " + "\n  - ".join(problems)
        )


@dataclass(frozen=True)
class Rule:
    """One option: an ``int`` or a (finite) ``float`` within bounds, or null when allowed."""

    key: str
    kind: type = float
    ge: float | None = None  # value >= ge
    gt: float | None = None  # value > gt
    le: float | None = None
    lt: float | None = None
    nullable: bool = False

    def valid(self) -> str:
        """What a valid value is, in words: ``"an integer >= 1"``, ``"a number in (0, 1)"``."""
        noun = "an integer" if self.kind is int else "a finite number"
        low = (self.gt, "(") if self.gt is not None else (self.ge, "[")
        high = (self.lt, ")") if self.lt is not None else (self.le, "]")
        if low[0] is not None and high[0] is not None:
            text = f"{noun} in {low[1]}{low[0]:g}, {high[0]:g}{high[1]}"
        elif low[0] is not None:
            text = f"{noun} {'>' if self.gt is not None else '>='} {low[0]:g}"
        elif high[0] is not None:
            text = f"{noun} {'<' if self.lt is not None else '<='} {high[0]:g}"
        else:
            text = noun
        return f"null or {text}" if self.nullable else text

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not valid, or ``None``."""
        if value is None:
            return None if self.nullable else "must be set"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "not an integer" if self.kind is int else "not a number"
        if self.kind is int and not isinstance(value, int):
            return "not an integer"
        if not math.isfinite(value):
            return "not finite"
        inside = (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )
        return None if inside else "out of range"


def _positive(key: str, nullable: bool = False) -> Rule:
    return Rule(key, float, gt=0, nullable=nullable)


def _count(key: str, least: int = 1, nullable: bool = False) -> Rule:
    return Rule(key, int, ge=least, nullable=nullable)


RULES: tuple[Rule, ...] = (
    # policy (its settings check themselves when built; here all are named before any work)
    Rule("policy.optimizer.weight_decay", float, ge=0),
    _count("policy.rollout.k", 2),  # RLOO's baseline needs another completion of the prompt
    _positive("policy.rollout.temperature"),
    _count("policy.rollout.max_new_tokens"),
    Rule("policy.rollout.beta", float, ge=0),
    Rule("policy.rollout.missing_eos_penalty", float, nullable=True),
    _count("policy.rollout.micro_batch_size", nullable=True),
    _positive("policy.rollout.clip_range"),
    _positive("policy.spsa.eps"),
    _count("policy.spsa.num_perturbations"),
    _count("policy.spsa.steps_per_update"),
    _positive("policy.spsa.max_abs_grad", nullable=True),
    Rule("sampler.sampler.smoothing", float, ge=0, lt=1),
    Rule("sampler.sampler.initial_decay", float, ge=0, le=1),
    _count("sampler.sampler.rank"),
    _count("sampler.sampler.refresh_every", nullable=True),
    # loop
    _count("loop.iterations"),
    _count("loop.steps_per_iteration"),
    _count("loop.batch_size"),
    _count("loop.first_order_steps", nullable=True),
    _count("loop.checkpoint_every", nullable=True),
    _positive("loop.first_order_lr"),
    _positive("loop.zeroth_order_lr"),
    _positive("loop.refine.lr"),
    Rule("loop.refine.keep_close_alpha", float, ge=0, le=1, nullable=True),
    Rule("loop.refine.judge_fraction", float, gt=0, le=1),
    _positive("loop.refine.temperature", nullable=True),
    # per-sampler step size and perturbation (null: the loop's / the policy's)
    _positive("sampler.lr", nullable=True),
    _positive("sampler.eps", nullable=True),
    # SFT and the reward model
    _positive("sft.lr"),
    _count("sft.epochs"),
    _count("sft.batch_size"),
    _count("sft.max_length", 2, nullable=True),
    _positive("reward_model.lr"),
    _count("reward_model.epochs"),
    _count("reward_model.batch_size"),
    _count("reward_model.max_length", 2),
    Rule("reward_model.warmup_fraction", float, ge=0, lt=1),
    # preference datasets
    Rule("dataset.task.eval_fraction", float, gt=0, lt=1),
    _count("dataset.task.max_prompt_tokens", nullable=True),
    _count("dataset.task.max_rows", nullable=True),
    _count("dataset.task.n_sft", nullable=True),
    # evaluation, interplay, process
    _count("eval.samples_per_prompt"),
    _count("eval.max_prompts", nullable=True),
    _count("eval.max_pairs", nullable=True),
    Rule("interplay.every_fraction", float, gt=0, le=1),
    Rule("seed", int),
    _count("num_threads", nullable=True),
)
"""The typed options; ``validate_config`` checks each one present in the config."""

CHOICES: dict[str, tuple[str, ...]] = {
    "loop.schedule": ("first_order_then_zeroth_order", "first_order", "zeroth_order"),
    "policy.spsa.rule": ("sgd", "momentum", "adam"),
    "sampler.direction": ("update", "gradient"),
    "sampler.sampler.coefficients": ("shared", "per_tensor"),
    "sampler.sampler.decay": ("linear", "exp", "constant"),
    "sampler.sampler.scale": ("isotropic", "previous_update", "unit"),
    "sampler.sampler.basis": ("random", "lowrank", "directions", "gradients"),
    "dataset.task.prompt_length_mode": ("drop", "truncate"),
}
"""Options with a fixed set of values."""

BOOLEANS: tuple[str, ...] = ("memory_check", "sft.lora")
"""Options that are true or false."""

_DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
_MINILM = ("minilm", "all-MiniLM-L6-v2")


def _get(cfg: DictConfig, key: str) -> Any:
    """The resolved value of ``key``, or ``_ABSENT`` when the config has no such option."""
    return OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)


def _show(key: str, value: Any) -> str:
    return f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}"


def _value_problems(cfg: DictConfig, missing: set[str]) -> Iterator[str]:
    for rule in RULES:
        if rule.key in missing:
            continue
        try:
            value = _get(cfg, rule.key)
        except OmegaConfBaseException as err:
            yield f"{rule.key}: cannot be resolved ({err}); valid: {rule.valid()}"
            continue
        if value is _ABSENT:
            continue
        problem = rule.problem(value)
        if problem is not None:
            yield f"{_show(rule.key, value)}: {problem}; valid: {rule.valid()}"
    for key, allowed in CHOICES.items():
        value = _get(cfg, key) if key not in missing else _ABSENT
        if value is not _ABSENT and value not in allowed:
            yield f"{_show(key, value)}: not a known choice; valid: one of {', '.join(allowed)}"
    for key in BOOLEANS:
        value = _get(cfg, key) if key not in missing else _ABSENT
        if value is not _ABSENT and not isinstance(value, bool):
            yield f"{_show(key, value)}: not a boolean; valid: true or false"


def _int(cfg: DictConfig, key: str) -> int | None:
    """``key`` when it is a valid integer, else ``None`` (its own rule reports it)."""
    try:
        value = _get(cfg, key)
    except OmegaConfBaseException:
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(cfg: DictConfig, key: str, missing: set[str]) -> str | None:
    if key in missing:
        return None
    try:
        value = _get(cfg, key)
    except OmegaConfBaseException:
        return None
    return str(value) if isinstance(value, str | Path) else None


def _dataset_file_problem(name: str) -> str | None:
    """A local dataset file that is absent or of a format the loaders do not read."""
    known = name.lower().endswith(_DATA_SUFFIXES)
    if not (known or looks_local(name)):
        return None  # a hub dataset name
    path = Path(name).expanduser()
    option = f"dataset.task.name_or_path={name}"
    if not known:
        return (
            f"{option}: not a file type the loaders read; valid: a {', '.join(_DATA_SUFFIXES)} "
            "file of the task's schema, or a hub dataset name such as 'Anthropic/hh-rlhf'"
        )
    if not path.is_file():
        where = "a directory, not a file" if path.is_dir() else "no such file"
        return (
            f"{option}: {where}; valid: an existing {', '.join(_DATA_SUFFIXES)} file of the "
            "task's schema, or a hub dataset name"
        )
    return None


def _path_problems(cfg: DictConfig, missing: set[str]) -> Iterator[str]:
    model = _str(cfg, "model.name_or_path", missing)
    tokenizer = _str(cfg, "model.tokenizer", missing)
    if model is not None:
        problem = model_directory_problem(
            model, "model.name_or_path", need_tokenizer=tokenizer is None
        )
        if problem:
            yield problem
    if tokenizer is not None:
        problem = model_directory_problem(tokenizer, "model.tokenizer", need_weights=False)
        if problem:
            yield problem
    backbone = _str(cfg, "reward_model.backbone", missing)
    if backbone is not None and backbone not in _MINILM:
        problem = model_directory_problem(
            backbone, "reward_model.backbone", need_weights=False, need_tokenizer=False
        )
        if problem:
            yield problem
    target = _str(cfg, "dataset.task._target_", missing) or ""
    data = _str(cfg, "dataset.task.name_or_path", missing)
    if data is not None and target.endswith("build_preference_task"):
        problem = _dataset_file_problem(data)
        if problem:
            yield problem
    judge_target = _str(cfg, "judge.judge._target_", missing) or ""
    labels = _str(cfg, "judge.judge.path", missing)
    labels_absent = labels is not None and not Path(labels).expanduser().is_file()
    if judge_target.endswith("FileJudge") and labels_absent:
        yield (
            f"judge.judge.path={labels}: no such file; valid: an existing JSONL of "
            "{prompt, first, second, label} rows (judge=file)"
        )
    judge_model = _str(cfg, "judge.judge.name_or_path", missing)
    if judge_model is not None:
        problem = model_directory_problem(judge_model, "judge.judge.name_or_path")
        if problem:
            yield problem
    resume = _str(cfg, "resume", missing)
    if resume:
        run_dir = Path(resume).expanduser()
        if not run_dir.is_dir():
            yield (
                f"resume={resume}: no such run directory (nothing was created); valid: the "
                "directory a zopro-train run printed as its run directory, or drop resume= to "
                "start afresh"
            )
        elif not (run_dir / "run_config.yaml").is_file():
            yield (
                f"resume={resume}: not a zopro-train run directory (no run_config.yaml: it "
                "is another directory, or its run stopped before its first phase); valid: the "
                "directory a run printed, or drop resume= to start afresh"
            )


def _context(cfg: DictConfig, missing: set[str]) -> tuple[int | None, str]:
    """The policy's context length and where it comes from (``None``: a hub model, unknown
    offline)."""
    name = _str(cfg, "model.name_or_path", missing)
    if name is None:
        if _get(cfg, "model.tiny") is _ABSENT:
            return None, ""
        length = _int(cfg, "model.tiny.max_position_embeddings")
        return (length or 128), "model.tiny.max_position_embeddings"
    return local_context_length(name), f"{name}/config.json"


def _length_problems(cfg: DictConfig, missing: set[str]) -> Iterator[str]:
    prompt = _int(cfg, "dataset.task.max_prompt_tokens")
    new = _int(cfg, "policy.rollout.max_new_tokens")
    sft = _int(cfg, "sft.max_length")
    context, where = _context(cfg, missing)
    if prompt and new and context and prompt + new > context:
        yield (
            f"dataset.task.max_prompt_tokens={prompt} + policy.rollout.max_new_tokens={new} = "
            f"{prompt + new} tokens do not fit the policy's context of {context} tokens "
            f"({where}); valid: dataset.task.max_prompt_tokens <= {context - new}, or fewer "
            "new tokens"
        )
    if prompt and new and sft and prompt + new > sft:
        yield (
            f"dataset.task.max_prompt_tokens={prompt} + policy.rollout.max_new_tokens={new} = "
            f"{prompt + new} tokens exceed sft.max_length={sft} (SFT would cut the answers of "
            f"the longest prompts short, or leave them out); valid: sft.max_length >= "
            f"{prompt + new}, or dataset.task.max_prompt_tokens <= {sft - new}"
        )
    if sft and context and sft > context:
        yield (
            f"sft.max_length={sft} is longer than the policy's context of {context} tokens "
            f"({where}); valid: sft.max_length <= {context}"
        )
    reward = _int(cfg, "reward_model.max_length")
    shares_policy = _get(cfg, "reward_model.backbone") is None
    if reward and context and shares_policy and reward > context:
        yield (
            f"reward_model.max_length={reward} is longer than the context of {context} tokens "
            f"of the policy the reward model is built from ({where}); valid: "
            f"reward_model.max_length <= {context}"
        )


def _judge_problems(cfg: DictConfig) -> Iterator[str]:
    """A judge that compares gold rewards needs a dataset that has one."""
    scores_with = _get(cfg, "judge.scores_with")
    gold_judge = scores_with == "gold" or (
        scores_with in (None, _ABSENT) and _get(cfg, "judge.needs_gold") is True
    )
    if gold_judge and _get(cfg, "dataset.gold_reward") is None:
        yield (
            f"judge={_get(cfg, 'judge.name')} compares gold rewards, but dataset="
            f"{_get(cfg, 'dataset.name')} has no gold_reward; valid: judge=llm, "
            "judge=reward_model or judge=file"
        )


def _strategy_problems(cfg: DictConfig) -> Iterator[str]:
    """``trainer=fsdp`` is for a user's own Trainer: the pipeline saves and merges whole models
    between its phases (SFT, the reward model's backbone, iteration ends, the export)."""
    target = str(_get(cfg, "trainer.strategy._target_") or "")
    if target.endswith("fsdp_strategy"):
        yield (
            "trainer=fsdp: zopro-train's phases save and merge whole models (the SFT model, "
            "the reward model's backbone, the adapters at iteration ends, the exported "
            "policy), which it does not do from FSDP shards yet; valid: trainer=ddp for "
            "zopro-train, or ZOPrOModule in your own Trainer with "
            "strategy=zopro_lightning.utils.sharding.fsdp_strategy() (README: Many devices)"
        )


def _sampler_problems(cfg: DictConfig) -> Iterator[str]:
    """A gradient-spanned subspace needs a first-order phase to take its gradients from."""
    basis = _get(cfg, "sampler.sampler.basis")
    if basis == "gradients" and _get(cfg, "loop.schedule") == "zeroth_order":
        yield (
            "sampler.sampler.basis=gradients spans the first-order phase's gradients, but "
            "loop.schedule=zeroth_order has no first-order phase; valid: "
            "loop.schedule=first_order_then_zeroth_order, or sampler.sampler.basis=random"
        )


def _missing_keys(node: Any, prefix: str = "") -> Iterator[str]:
    """Dotted keys left at ``???``, found without resolving any interpolation (``${hydra:...}``
    cannot be resolved outside a Hydra run)."""
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        path = f"{prefix}{key}"
        if path == "hydra":
            continue
        if OmegaConf.is_missing(node, key):
            yield path
        elif not OmegaConf.is_interpolation(node, key):
            child = node._get_node(key)
            if OmegaConf.is_config(child) and not child._is_none():
                yield from _missing_keys(child, f"{path}.")


def validate_config(cfg: DictConfig) -> None:
    """Check ``cfg`` (the composed ``zopro-train`` config) before any work.

    Raises:
        ConfigError: one line per problem (option, value, what is valid); nothing is created
            or trained.
    """
    missing = set(_missing_keys(cfg))
    problems = [
        f"{key} is required (it is '???'); valid: set it, e.g. {key}=<value>"
        for key in sorted(missing)
    ]
    problems += _value_problems(cfg, missing)
    problems += _path_problems(cfg, missing)
    problems += _length_problems(cfg, missing)
    problems += _judge_problems(cfg)
    problems += _strategy_problems(cfg)
    problems += _sampler_problems(cfg)
    if problems:
        raise ConfigError(problems)
