"""The trained policy as a model: RUN_DIR/policy, RUN_DIR/policy_adapter, the card, the push
option and zopro-generate (zopro_lightning/run/export.py, zopro_lightning/run/generate.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from tests.test_cli import zopro_train
from zopro_lightning.models.loading import add_lora, build_tiny_causal_lm
from zopro_lightning.run.cli import CONFIG_DIR
from zopro_lightning.run.export import check_export_config, export_policy
from zopro_lightning.run.generate import main as zopro_generate

SUMMARY = {
    "task": "sentiment",
    "sampler": "zopro",
    "optimizer": "first_order_then_zeroth_order",
    "gold_reward_initial": -0.25,
    "gold_reward_per_iteration": [-0.2, -0.1],
    "optimizer_per_iteration": ["first_order", "zeroth_order"],
    "reward_model_accuracy": 0.9,
}


def config(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(["this film was great fun"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def run_dir(tmp_path, tokenizer):
    """A run directory holding the SFT model, as the pipeline leaves it."""
    torch.manual_seed(0)
    sft = build_tiny_causal_lm(tokenizer, hidden_size=32, num_layers=1, num_heads=2)
    sft.save_pretrained(tmp_path / "sft")
    tokenizer.save_pretrained(tmp_path / "sft")
    return tmp_path


@pytest.fixture
def trained(run_dir, tokenizer):
    """A LoRA policy over RUN_DIR/sft whose adapter moved away from its start."""
    from zopro_lightning.models.loading import load_causal_lm

    policy = add_lora(load_causal_lm(run_dir / "sft"), r=4, alpha=8)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return policy


def test_policy_loads_with_from_pretrained_and_matches_the_live_policy(run_dir, trained, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    live = logits(trained, tokenizer)
    lora_before = {n: p.clone() for n, p in trained.named_parameters() if "lora_" in n}
    target = export_policy(trained, tokenizer, config(), SUMMARY, run_dir)
    assert target == run_dir.resolve() / "policy"
    loaded = AutoModelForCausalLM.from_pretrained(target)
    assert not any("lora" in name for name, _ in loaded.named_parameters())  # merged
    torch.testing.assert_close(logits(loaded, tokenizer), live, atol=1e-5, rtol=1e-5)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(target)
    assert reloaded_tokenizer("great fun")["input_ids"] == tokenizer("great fun")["input_ids"]
    # the live policy is left as it was: still an unmerged adapter with the same weights
    torch.testing.assert_close(logits(trained, tokenizer), live)
    for name, param in trained.named_parameters():
        if "lora_" in name:
            assert torch.equal(param, lora_before[name]), name
    assert not list(run_dir.glob("*.partial")) and not list(run_dir.glob("*.old"))


def test_adapter_names_the_sft_model_as_its_base(run_dir, trained, tokenizer):
    from peft import AutoPeftModelForCausalLM

    live = logits(trained, tokenizer)
    export_policy(trained, tokenizer, config(), SUMMARY, run_dir)
    adapter = run_dir / "policy_adapter"
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(run_dir.resolve() / "sft")
    rebuilt = AutoPeftModelForCausalLM.from_pretrained(adapter)  # base found by that name
    torch.testing.assert_close(logits(rebuilt, tokenizer), live, atol=1e-5, rtol=1e-5)


def test_model_card_has_metadata_and_the_runs_config_and_results(run_dir, trained, tokenizer):
    cfg = config("sampler=gaussian", "loop.iterations=2", "policy.rollout.k=4")
    export_policy(trained, tokenizer, cfg, SUMMARY, run_dir)
    card = (run_dir / "policy" / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    metadata = yaml.safe_load(front)
    assert metadata["library_name"] == "transformers"
    assert {"zopro", "rlhf", "zeroth-order"} <= set(metadata["tags"])
    assert metadata["base_model"] == str(run_dir.resolve() / "sft")  # the tiny model: its SFT
    assert "| task | sentiment |" in body
    assert "| schedule | first_order_then_zeroth_order |" in body
    assert "| sampler | gaussian" in body
    assert "| 0 | first_order | -0.2000 |" in body and "| 1 | zeroth_order | -0.1000 |" in body
    assert "| before (SFT) | – | -0.2500 |" in body
    assert "completions per prompt | 16, 4 |" in body
    adapter_card = (run_dir / "policy_adapter" / "README.md").read_text()
    assert yaml.safe_load(adapter_card.split("---\n")[1])["library_name"] == "peft"


def test_a_second_export_replaces_the_first_whole(run_dir, trained, tokenizer):
    export_policy(trained, tokenizer, config(), SUMMARY, run_dir)
    (run_dir / "policy" / "stale.txt").write_text("from the first export")
    export_policy(trained, tokenizer, config(), SUMMARY | {"task": "again"}, run_dir)
    assert not (run_dir / "policy" / "stale.txt").exists()
    assert "# ZOPrO policy: again" in (run_dir / "policy" / "README.md").read_text()
    assert sorted(p.name for p in run_dir.iterdir()) == ["policy", "policy_adapter", "sft"]


def test_only_rank_zero_writes(run_dir, trained, tokenizer):
    assert (
        export_policy(trained, tokenizer, config(), SUMMARY, run_dir, is_global_zero=False) is None
    )
    assert sorted(p.name for p in run_dir.iterdir()) == ["sft"]


def test_a_policy_without_lora_is_saved_as_it_is(run_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from zopro_lightning.models.loading import load_causal_lm

    policy = load_causal_lm(run_dir / "sft")
    export_policy(policy, tokenizer, config(), SUMMARY, run_dir)
    loaded = AutoModelForCausalLM.from_pretrained(run_dir / "policy")
    torch.testing.assert_close(logits(loaded, tokenizer), logits(policy, tokenizer))
    assert not (run_dir / "policy_adapter").exists()


def test_push_to_hub_goes_to_the_configured_repository(run_dir, trained, tokenizer, monkeypatch):
    pushed = []
    monkeypatch.setattr(
        "zopro_lightning.run.export.push_to_hub",
        lambda model, tok, directory, repo_id: pushed.append((directory, repo_id)),
    )
    cfg = config("export.push_to_hub=true", "export.hub_repo_id=me/zopro-policy")
    export_policy(trained, tokenizer, cfg, SUMMARY, run_dir)
    assert pushed == [(run_dir.resolve() / "policy", "me/zopro-policy")]
    export_policy(trained, tokenizer, config(), SUMMARY, run_dir)  # off by default
    assert len(pushed) == 1


def test_push_without_a_repository_is_refused():
    check_export_config(config())
    with pytest.raises(ValueError, match="export.hub_repo_id=USER/NAME"):
        check_export_config(config("export.push_to_hub=true"))


def test_zopro_train_refuses_a_push_without_a_repository_before_training(tmp_path):
    result = zopro_train(tmp_path / "run", "export.push_to_hub=true")
    assert result.returncode != 0
    assert "export.push_to_hub=true needs the Hub repository" in result.stderr
    assert not (tmp_path / "run" / "sft").exists()  # nothing was trained


def test_zopro_generate_prints_samples_of_the_policy(run_dir, trained, tokenizer, capsys):
    export_policy(trained, tokenizer, config(), SUMMARY, run_dir)
    args = [str(run_dir), "this film was", "--num-samples", "3", "--max-new-tokens", "4"]
    zopro_generate([*args, "--seed", "1"])
    first = capsys.readouterr().out
    assert first.count("--- sample") == 3
    samples = [line for line in first.splitlines() if not line.startswith("--- sample")]
    assert len(samples) == 3 and all(s.startswith("this film was") for s in samples)
    zopro_generate([*args, "--seed", "1"])
    assert capsys.readouterr().out == first  # seeded


def test_zopro_generate_without_a_policy_says_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match="has no policy/ yet"):
        zopro_generate([str(tmp_path), "a prompt"])
    with pytest.raises(SystemExit, match="does not exist"):
        zopro_generate([str(tmp_path / "nowhere"), "a prompt"])


@pytest.mark.slow
def test_zopro_train_ends_with_a_policy_that_zopro_generate_samples(tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    result = zopro_train(run, "loop.iterations=1")
    assert result.returncode == 0, result.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(run / "policy")
    assert model.config.vocab_size > 0
    adapter_config = json.loads((run / "policy_adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(run.resolve() / "sft")
    card = (run / "policy" / "README.md").read_text()
    assert "| schedule | first_order_then_zeroth_order |" in card
    assert f"{run / 'policy'}" in result.stdout  # the printed summary names it
    generate = subprocess.run(
        [
            sys.executable,
            "-m",
            "zopro_lightning.run.generate",
            str(run),
            "the movie",
            "--seed",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert generate.returncode == 0, generate.stderr[-2000:]
    assert generate.stdout.startswith("the movie")
