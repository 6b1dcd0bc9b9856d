"""Loading and building the policy and reward-model networks.

Every model goes through :func:`load_causal_lm` / :func:`load_sequence_classifier`, which take
a hub name or a local directory alike (tests save tiny models with ``save_pretrained`` and load
them back by path through the same code a hub name takes). :func:`build_tiny_causal_lm` builds
the embedded task's model from a config, with no download.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """``"bf16"``/``"bfloat16"``/... to a torch dtype; ``"auto"`` and ``None`` pass through."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto'.")
    return _DTYPES[dtype]


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
"""Files of which a saved tokenizer has at least one (``tokenizer.save_pretrained(DIR)``)."""

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx")
"""``config.json`` keys that give a model's context length, by architecture."""


def looks_local(name_or_path: str | Path) -> bool:
    """Whether ``name_or_path`` is meant as a local path rather than a hub repo id
    (``"org/name"``): it exists, or it is absolute, starts with ``.``/``~``, or has more than
    one ``/`` or a backslash (which no repo id has)."""
    text = str(name_or_path)
    return (
        Path(text).expanduser().exists()
        or Path(text).is_absolute()
        or text.startswith((".", "~"))
        or text.count("/") > 1
        or "\\" in text
        or text.endswith("/")
    )


def model_directory_problem(
    name_or_path: str | Path, option: str, *, need_weights: bool = True, need_tokenizer: bool = True
) -> str | None:
    """What is wrong with a local model directory, as a sentence that names ``option`` and the
    fix, or ``None`` (fine, or a hub repo id, which cannot be checked offline)."""
    if not looks_local(name_or_path):
        return None
    path = Path(name_or_path).expanduser()
    if not path.exists():
        return (
            f"{option}={name_or_path}: no such directory. Fix: the directory a model was saved "
            "to with save_pretrained (config.json, weights, tokenizer), or a hub repo id such "
            "as 'org/name'"
        )
    if not path.is_dir():
        return (
            f"{option}={name_or_path}: a file, not a model directory. Fix: the directory that "
            "holds config.json (save_pretrained writes one)"
        )
    if need_weights and not (path / "config.json").is_file():
        return (
            f"{option}={name_or_path}: the directory has no config.json, so it holds no saved "
            "model. Fix: point it at the directory save_pretrained wrote"
        )
    if need_tokenizer and not any((path / name).is_file() for name in TOKENIZER_FILES):
        return (
            f"{option}={name_or_path}: the model directory has no tokenizer (none of "
            f"{', '.join(TOKENIZER_FILES[:4])}, ...). Fix: save the tokenizer there "
            "(tokenizer.save_pretrained(DIR)), or name one with model.tokenizer=<dir or hub id>"
        )
    return None


def local_context_length(name_or_path: str | Path) -> int | None:
    """The context length in a local model directory's ``config.json`` (``None``: a hub id,
    no such file, or no known key)."""
    import json

    path = Path(name_or_path).expanduser() / "config.json"
    if not looks_local(name_or_path) or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for key in CONTEXT_KEYS:
        if isinstance(config.get(key), int) and not isinstance(config.get(key), bool):
            return config[key]
    return None


def _check_local(name_or_path: str | Path, option: str, **needs: bool) -> None:
    problem = model_directory_problem(name_or_path, option, **needs)
    if problem is not None:
        raise FileNotFoundError(problem)


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False):
    """A tokenizer with a pad token (the EOS token when the tokenizer has none).

    Raises:
        FileNotFoundError: a local path that does not exist or holds no tokenizer files
            (rather than the hub's repo-id message or a request to install sentencepiece).
    """
    from transformers import AutoTokenizer

    _check_local(name_or_path, "tokenizer", need_weights=False)
    tokenizer = AutoTokenizer.from_pretrained(
        str(name_or_path), trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name_or_path: str | Path,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` for a hub name or a local directory.

    Raises:
        FileNotFoundError: a local path that does not exist or holds no config.json.
    """
    from transformers import AutoModelForCausalLM

    _check_local(name_or_path, "model", need_tokenizer=False)
    return AutoModelForCausalLM.from_pretrained(
        str(name_or_path), dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code
    )


def load_sequence_classifier(
    name_or_path: str | Path,
    pad_token_id: int | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """A one-output ``AutoModelForSequenceClassification`` (reward model) from any checkpoint;
    a causal LM's weights are reused and a fresh score head is added."""
    from transformers import AutoModelForSequenceClassification

    _check_local(name_or_path, "reward model", need_tokenizer=False)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(name_or_path),
        num_labels=1,
        dtype=resolve_dtype(dtype),
        trust_remote_code=trust_remote_code,
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    return model


def tiny_llama_config(
    tokenizer,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    max_position_embeddings: int = 128,
):
    """The ``LlamaConfig`` of :func:`build_tiny_causal_lm` (the memory check counts its
    parameters without building it)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )


def build_tiny_causal_lm(tokenizer, seed: int = 0, **sizes: int) -> nn.Module:
    """A small Llama-architecture causal LM initialised from a config (no download), with
    weights drawn from ``seed``; ``sizes``: :func:`tiny_llama_config`'s (``hidden_size``,
    ``num_layers``, ``num_heads``, ``intermediate_size``, ``max_position_embeddings``)."""
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(tokenizer, **sizes)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def add_lora(
    model: nn.Module,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    task_type: str = "CAUSAL_LM",
    modules_to_save: Sequence[str] | None = None,
    adapter_name: str = "default",
) -> nn.Module:
    """Wrap ``model`` with a fresh LoRA adapter (peft); only the adapter is trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        task_type=task_type,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
    )
    return get_peft_model(model, config, adapter_name=adapter_name)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable tensors by name (float32, CPU)."""
    return {
        n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad
    }


def state_difference(
    after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``after - before`` for every tensor in both."""
    return {n: after[n] - before[n] for n in after if n in before}


class ModelSpec:
    """What the ``model`` config group describes: where the policy comes from and its LoRA.

    Args:
        name_or_path: a hub name or local directory; ``None`` builds the tiny model of ``tiny``
            with a word-level tokenizer over the task's corpus (the embedded task).
        tokenizer: tokenizer name or path when it differs from ``name_or_path``.
        dtype: ``"float32"``, ``"bf16"``, ... or ``"auto"``.
        trust_remote_code: passed to ``from_pretrained`` (off unless set).
        tiny: keyword arguments of :func:`build_tiny_causal_lm`.
        lora: keyword arguments of :func:`add_lora` (``r``, ``alpha``, ``target_modules``, ...);
            ``None`` trains every parameter.
    """

    def __init__(
        self,
        name_or_path: str | None = None,
        tokenizer: str | None = None,
        dtype: str | None = None,
        trust_remote_code: bool = False,
        tiny: dict | None = None,
        lora: dict | None = None,
        seed: int = 0,
    ) -> None:
        self.name_or_path = name_or_path
        self.tokenizer_name = tokenizer or name_or_path
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        self.tiny = dict(tiny or {})
        self.lora = dict(lora) if lora else None
        self.seed = seed

    def tokenizer(self, corpus: Sequence[str] = ()):
        if self.tokenizer_name is None:
            from zopro_lightning.models.tokenizer import build_word_tokenizer

            return build_word_tokenizer(corpus)
        return load_tokenizer(self.tokenizer_name, self.trust_remote_code)

    def config(self, tokenizer):
        """The policy's transformers config, without its weights (the tiny model's from
        ``tiny``; a hub or local model's ``config.json``)."""
        if self.name_or_path is None:
            return tiny_llama_config(tokenizer, **self.tiny)
        from transformers import AutoConfig

        _check_local(self.name_or_path, "model", need_tokenizer=False)
        return AutoConfig.from_pretrained(
            str(self.name_or_path), trust_remote_code=self.trust_remote_code
        )

    def causal_lm(self, tokenizer) -> nn.Module:
        if self.name_or_path is None:
            model = build_tiny_causal_lm(tokenizer, seed=self.seed, **self.tiny)
            dtype = resolve_dtype(self.dtype)
            return model.to(dtype) if isinstance(dtype, torch.dtype) else model
        return load_causal_lm(self.name_or_path, self.dtype, self.trust_remote_code)

    def with_lora(self, model: nn.Module, task_type: str = "CAUSAL_LM") -> nn.Module:
        """``model`` with a fresh LoRA adapter, or fully trainable when ``lora`` is None."""
        if self.lora is None:
            return model.requires_grad_(True)
        return add_lora(model, task_type=task_type, **self.lora)
