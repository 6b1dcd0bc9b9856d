"""Tests for zopro_lightning.run.memory_check: the estimate of known configs, the refusal's
text, and ``zopro-train`` refusing a run before any model is loaded."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from zopro_lightning.models.loading import ModelSpec, build_tiny_causal_lm
from zopro_lightning.models.tokenizer import build_word_tokenizer
from zopro_lightning.run import memory_check as mc
from zopro_lightning.run.config_schema import ConfigError, validate_config
from zopro_lightning.run.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
SEVEN_B = mc.Shape(params=6_738_415_616, hidden=4096, layers=32, vocab=32000)
WORK = mc.Work(sequences=4, tokens=24, completion=8)


def config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["~logger", *overrides])


def test_estimate_of_known_modes():
    logits = mc.LOGIT_BYTES * 4 * 9 * 32000
    zo_full = mc.Mode(lora=False, first_order=False)
    expected = mc.BYTES_PER_PARAM[(False, False)] * SEVEN_B.params + logits + mc.PROCESS_BYTES
    assert mc.estimate_bytes(SEVEN_B, zo_full, WORK) == pytest.approx(expected)
    # float32 weights add 2 B a parameter, except to AdamW's float32 master weights
    fp32 = dataclasses.replace(zo_full, weight_bytes=4)
    assert mc.bytes_per_param(fp32) == mc.BYTES_PER_PARAM[(False, False)] + 2
    adamw = mc.Mode(lora=False, first_order=True, checkpointing=True)
    assert mc.bytes_per_param(dataclasses.replace(adamw, weight_bytes=4)) == mc.bytes_per_param(
        adamw
    )
    # FSDP shards the per-parameter part only
    sharded = dataclasses.replace(zo_full, shards=4)
    held = mc.BYTES_PER_PARAM[(False, False)] * SEVEN_B.params
    assert mc.estimate_bytes(SEVEN_B, sharded, WORK) == pytest.approx(expected - held * 3 / 4)
    # without checkpointing a first-order step keeps every layer's activations
    off = dataclasses.replace(adamw, checkpointing=False)
    kept = mc.TRAINING_ACTIVATION_BYTES * 0.5 * 4 * 24 * 4096 * 32
    assert mc.estimate_bytes(SEVEN_B, off, WORK) - mc.estimate_bytes(
        SEVEN_B, adamw, WORK
    ) == pytest.approx(kept)


def test_table_is_the_measured_fit():
    """BYTES_PER_PARAM is the slope bench/gpu_extrapolation.py fitted to the peaks of
    bench/results/largest_model.json."""
    result = json.loads((ROOT / "bench" / "results" / "gpu_extrapolation.json").read_text())
    keys = {
        "zo_full": (False, False),
        "adamw_full": (False, True),
        "zo_lora": (True, False),
        "adamw_lora": (True, True),
    }
    for mode, fit in result["fit"].items():
        assert mc.BYTES_PER_PARAM[keys[mode]] == pytest.approx(fit["bytes_per_param"], abs=0.06)


def test_tiny_model_is_counted_without_building_it():
    tokenizer = build_word_tokenizer(["a b c d e f g"])
    spec = ModelSpec(tiny={"hidden_size": 32, "num_layers": 2, "num_heads": 2})
    shape = mc.shape_of(spec.config(tokenizer))
    built = build_tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=2)
    assert shape.params == sum(p.numel() for p in built.parameters())
    assert (shape.hidden, shape.layers, shape.vocab) == (32, 2, len(tokenizer))


def test_run_settings_read_the_config():
    run = mc.run_settings(config("model.dtype=bf16", "loop.schedule=zeroth_order"))
    assert run == mc.RunSettings(
        lora=True,
        schedule="zeroth_order",
        weight_bytes=2,
        shards=1,
        processes=1,
        accelerator="cpu",
    )
    full = mc.run_settings(config("model.lora=null", "trainer=fsdp"))
    assert not full.lora and full.shards == 4 and full.processes == 1
    assert not full.sft_lora
    full_sft = mc.run_settings(config("sft.lora=false"))
    assert full_sft.lora and not full_sft.sft_lora  # SFT of every weight, LoRA after


def test_refusal_names_estimate_availability_and_fixes(monkeypatch):
    monkeypatch.setattr(mc, "available_bytes", lambda accelerator: (int(20e9), "fake 20 GB"))
    run = mc.RunSettings(False, "first_order", 4, 1, 1, "cpu")
    phase, need = mc.peak_of(SEVEN_B, SEVEN_B, run, WORK)
    message = mc.refusal(phase, need, 20e9, "fake 20 GB", mc.fixes(SEVEN_B, None, run, WORK, 20e9))
    assert f"about {need / 1e9:.1f} GB" in message and "20.0 GB are available" in message
    for fix in ("model.lora=", "loop.schedule=zeroth_order", "model.dtype=bf16"):
        assert fix in message
    assert "checkpointing" in message and "memory_check=false" in message
    assert "fits: model.lora=" in message  # LoRA on bf16 brings a 7B model under 20 GB


def test_zopro_train_refuses_before_loading_any_model(tmp_path, monkeypatch):
    monkeypatch.setattr(mc, "available_bytes", lambda accelerator: (1_000_000, "fake 1 MB"))
    loaded = []
    monkeypatch.setattr(ModelSpec, "causal_lm", lambda self, tok: loaded.append(1))
    with pytest.raises(mc.MemoryCheckError) as err:
        run_pipeline(config(), tmp_path / "run")
    assert "0.0 GB are available (fake 1 MB)" in str(err.value)
    assert "nothing was loaded" in str(err.value)
    assert not loaded and not (tmp_path / "run" / "sft").exists()


def test_memory_check_false_skips_it(tmp_path, monkeypatch):
    monkeypatch.setattr(mc, "available_bytes", lambda accelerator: (1_000_000, "fake 1 MB"))

    def load(self, tokenizer):
        raise RuntimeError("model loading reached")

    monkeypatch.setattr(ModelSpec, "causal_lm", load)
    with pytest.raises(RuntimeError, match="model loading reached"):
        run_pipeline(config("memory_check=false"), tmp_path / "run")


def test_memory_check_must_be_a_boolean():
    with pytest.raises(ConfigError, match="memory_check='yes please': not a boolean"):
        validate_config(config("memory_check='yes please'"))


def test_on_cuda_the_refusal_offers_fsdp():
    run = mc.RunSettings(False, "zeroth_order", 2, 1, 1, "gpu")
    _, need = mc.peak_of(SEVEN_B, None, run, WORK)
    lines = mc.fixes(SEVEN_B, None, run, WORK, need * 0.6)
    fsdp = [line for line in lines if "FSDP over 2 GPUs, in your own Lightning Trainer" in line]
    assert fsdp and fsdp[0].startswith("fits")
