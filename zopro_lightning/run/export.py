"""The trained policy as a Hugging Face model, written at the end of a ``zopro-train`` run.

- ``RUN_DIR/policy_adapter/``: the policy's LoRA adapter, whose ``base_model_name_or_path``
  is the SFT model ``RUN_DIR/sft`` it was trained on (``PeftModel.from_pretrained`` or
  ``AutoModelForCausalLM.from_pretrained`` on this directory rebuild the policy).
- ``RUN_DIR/policy/``: that adapter merged into its base (loaded afresh from ``RUN_DIR/sft``,
  so the live network is left as it is), the tokenizer beside it, and a model card
  (``README.md``: YAML metadata, then the run's config and results). It loads with
  ``AutoModelForCausalLM.from_pretrained`` alone; ``zopro-generate RUN_DIR "prompt"`` samples
  from it. A policy trained without LoRA is saved there as it is, with no adapter directory.

Each directory is written complete under a temporary name, then renamed into place: a crash
leaves either the previous directory or the new one, never half a model. Only rank 0 writes.
With ``export.push_to_hub: true`` the merged model, tokenizer and card go to
``export.hub_repo_id`` on the Hub (:func:`check_export_config` refuses a push without a
repository before any training).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from zopro_lightning.utils.atomic import replace_directory

POLICY = "policy"
ADAPTER = "policy_adapter"
SFT = "sft"
CARD_TAGS = ["zopro", "rlhf", "zeroth-order", "spsa", "lightning"]


def check_export_config(cfg: DictConfig) -> None:
    """Refuse ``export.push_to_hub: true`` without ``export.hub_repo_id``."""
    export = cfg.get("export") or {}
    if export.get("push_to_hub") and not export.get("hub_repo_id"):
        raise ValueError(
            "export.push_to_hub=true needs the Hub repository to push to: add "
            "export.hub_repo_id=USER/NAME, or drop export.push_to_hub"
        )


def is_lora(policy: Any) -> bool:
    """Whether ``policy`` is a PEFT model (an adapter over a base)."""
    from peft import PeftModel

    return isinstance(policy, PeftModel)


def save_adapter(policy: Any, directory: Path, base: Path, card: str) -> None:
    """The LoRA adapter of ``policy`` with ``base_model_name_or_path`` set to ``base``."""
    policy.save_pretrained(directory)
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(base)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    (directory / "README.md").write_text(card)


def merged_policy(adapter_dir: Path, base: Path, dtype: Any) -> Any:
    """The adapter of ``adapter_dir`` merged into a fresh copy of its base, on the CPU."""
    from peft import PeftModel

    from zopro_lightning.models.loading import load_causal_lm

    model = PeftModel.from_pretrained(load_causal_lm(base, dtype=dtype), str(adapter_dir))
    return model.merge_and_unload()


def export_policy(
    policy: Any,
    tokenizer: Any,
    cfg: DictConfig,
    summary: Mapping[str, Any],
    run_dir: str | Path,
    is_global_zero: bool = True,
) -> Path | None:
    """Write ``RUN_DIR/policy`` (and ``RUN_DIR/policy_adapter`` for a LoRA policy); push it
    when ``export.push_to_hub``. Returns the policy directory (``None`` off rank 0)."""
    if not is_global_zero:
        return None
    run_dir = Path(run_dir).resolve()
    base = run_dir / SFT
    card = model_card(cfg, summary, run_dir)
    if is_lora(policy):
        dtype = policy.get_base_model().dtype
        adapter_card = adapter_model_card(cfg, base, run_dir)
        adapter_dir = replace_directory(
            run_dir / ADAPTER, lambda tmp: save_adapter(policy, tmp, base, adapter_card)
        )
        model = merged_policy(adapter_dir, base, dtype)
    else:
        model = policy

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card)

    target = replace_directory(run_dir / POLICY, write)
    export = cfg.get("export") or {}
    if export.get("push_to_hub"):
        push_to_hub(model, tokenizer, target, export["hub_repo_id"])
    return target


def push_to_hub(model: Any, tokenizer: Any, policy_dir: Path, repo_id: str) -> None:
    """Model, tokenizer and our model card to ``repo_id`` (the card last, so it is ours)."""
    from huggingface_hub import ModelCard

    model.push_to_hub(repo_id)
    tokenizer.push_to_hub(repo_id)
    ModelCard.load(policy_dir / "README.md").push_to_hub(repo_id)


# -- model cards ---------------------------------------------------------------------------
def card_metadata(base_model: str, library_name: str) -> str:
    """The card's YAML front matter: library, base model, pipeline tag and tags."""
    metadata = {
        "library_name": library_name,
        "base_model": base_model,
        "pipeline_tag": "text-generation",
        "tags": CARD_TAGS,
    }
    return "---\n" + yaml.safe_dump(metadata, sort_keys=False) + "---\n"


def original_model(cfg: DictConfig, run_dir: Path) -> str:
    """The model the run started from: ``model.name_or_path``, or (the tiny model built from
    a config) the SFT model of this run."""
    return str(cfg.model.get("name_or_path") or run_dir / SFT)


def node_settings(node: Any) -> str:
    """``key=value, ...`` of a config node, without Hydra's ``_target_``."""
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else {}
    return ", ".join(f"{k}={v}" for k, v in values.items() if not k.startswith("_"))


def results_table(summary: Mapping[str, Any]) -> list[str]:
    """Per-iteration rows: the optimizer and the measured reward after each iteration."""
    key = "gold_reward" if summary.get("gold_reward_per_iteration") else "policy_reward"
    measured = summary.get(f"{key}_per_iteration") or []
    optimizers = summary.get("optimizer_per_iteration") or []
    rows = [f"| iteration | optimizer | {key} |", "|---|---|---|"]
    if f"{key}_initial" in summary:
        rows.append(f"| before (SFT) | – | {number(summary[f'{key}_initial'])} |")
    for t, value in enumerate(measured):
        optimizer = optimizers[t] if t < len(optimizers) else "?"
        rows.append(f"| {t} | {optimizer} | {number(value)} |")
    return rows


def number(value: Any) -> str:
    """A float with four decimals; anything else as ``str`` gives it."""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def training_settings(
    cfg: DictConfig, summary: Mapping[str, Any], run_dir: Path
) -> list[tuple[str, Any]]:
    """``(setting, value)`` rows of the card's Training table: task, models, schedule,
    sampler, loop sizes, learning rates, SPSA, KL penalty, judge and seed."""
    loop, policy = cfg.loop, cfg.policy
    schedule = summary.get("optimizer") or loop.get("schedule")
    steps = f"{loop.steps_per_iteration} updates each"
    if str(schedule).startswith("first_order") and loop.get("first_order_steps"):
        steps += f" ({loop.first_order_steps} in the first-order iteration 0)"
    return [
        ("task", summary.get("task", cfg.dataset.name)),
        ("started from", cfg.model.get("name_or_path") or "a tiny Llama built from its config"),
        ("SFT model (the reference policy)", run_dir / SFT),
        ("schedule", schedule),
        ("sampler", f"{cfg.sampler.name} ({node_settings(cfg.sampler.get('sampler'))})"),
        ("iterations", f"{loop.iterations} of policy learning + reward refinement, {steps}"),
        ("prompts per update, completions per prompt", f"{loop.batch_size}, {policy.rollout.k}"),
        (
            "learning rates",
            f"zeroth-order {loop.zeroth_order_lr}, first-order {loop.first_order_lr}",
        ),
        ("SPSA", f"eps {policy.spsa.eps}, {policy.spsa.num_perturbations} direction(s) an update"),
        ("KL penalty beta", policy.rollout.beta),
        ("judge of refinement pairs", cfg.judge.get("name", "?")),
        ("seed", cfg.seed),
    ]


def final_results(summary: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The end-of-run values of the summary the card lists under its results table."""
    return [
        (key, summary[key])
        for key in ("reward_model_accuracy", "kl_final", "policy_steps", "wall_seconds")
        if key in summary
    ]


def usage_lines(run_dir: Path) -> list[str]:
    """The card's Use section: loading ``RUN_DIR/policy``, or ``zopro-generate``."""
    return [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{run_dir / POLICY}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{run_dir / POLICY}")',
        "```",
        "",
        f'or `zopro-generate {run_dir} "a prompt"`.',
        "",
    ]


def model_card(cfg: DictConfig, summary: Mapping[str, Any], run_dir: Path) -> str:
    """``RUN_DIR/policy/README.md``: metadata, then what was trained how, and what it scored."""
    lines = [
        card_metadata(original_model(cfg, run_dir), "transformers"),
        f"# ZOPrO policy: {summary.get('task', cfg.dataset.name)}",
        "",
        "A causal language model trained with zeroth-order preference optimisation (ZOPrO) by "
        "zopro-lightning: supervised fine-tuning with LoRA, a reward model, then iterations "
        "of policy learning with SPSA (forward passes only, along directions built from the "
        "previous policy and reward-model updates) and reward-model refinement. These are "
        f"the merged weights; the LoRA adapter is in `{run_dir / ADAPTER}`.",
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in training_settings(cfg, summary, run_dir)),
        "",
        "## Results",
        "",
        *results_table(summary),
        "",
        *(f"- {key}: {number(value)}" for key, value in final_results(summary)),
        "",
        *usage_lines(run_dir),
    ]
    return "\n".join(lines)


def adapter_model_card(cfg: DictConfig, base: Path, run_dir: Path) -> str:
    """``RUN_DIR/policy_adapter/README.md``: metadata and where the base and merged model are."""
    return "\n".join(
        [
            card_metadata(str(base), "peft"),
            f"# ZOPrO policy adapter: {cfg.dataset.name}",
            "",
            f"The LoRA adapter of the policy, over the SFT model `{base}`. The merged model and "
            f"the full model card: `{run_dir / POLICY}`.",
            "",
        ]
    )
