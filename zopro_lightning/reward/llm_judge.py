"""An instruction-tuned causal LM as pairwise judge: "A or B", asked in both orders
(docs/algorithm.md §2.5).

- :data:`DEFAULT_JUDGE_TEMPLATE`: the question asked.
- :func:`parse_choice`: the ``A``/``B`` an answer names.
- :class:`LLMJudge`: the judge (also importable from :mod:`zopro_lightning.reward.judges`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from zopro_lightning.reward.judge_protocol import pair_batch_size

__all__ = ["DEFAULT_JUDGE_TEMPLATE", "LLMJudge", "check_template", "parse_choice"]

DEFAULT_JUDGE_TEMPLATE = (
    "You compare two responses to the same conversation or request and pick the better "
    "one: more helpful, more accurate, and harmless.\n\n"
    "[Conversation]\n{prompt}\n\n"
    "[Response A]\n{response_a}\n\n"
    "[Response B]\n{response_b}\n\n"
    "Which response is better? Answer with a single letter: A or B."
)
"""Judge question; fields ``{prompt}``, ``{response_a}``, ``{response_b}`` (``str.format``)."""

_UPPER_CHOICE = re.compile(r"(?<![A-Za-z0-9])([AB])(?![A-Za-z0-9])")
_ANY_CHOICE = re.compile(r"(?<![A-Za-z0-9])([AB])(?![A-Za-z0-9])", re.IGNORECASE)


def parse_choice(text: Any) -> Literal["A", "B"] | None:
    """The first standalone ``A``/``B`` in a judge's answer, or ``None`` if there is none.

    Standalone: not part of a longer word, so ``"Response A"``, ``"**B**"``, ``" a)"``,
    ``"(B)."`` parse and ``"ABBA"`` or ``"Both"`` do not. Upper-case letters are looked for
    first, then lower-case ones, so that the article in ``"a better one is B"`` does not
    win. Anything that is not a string gives ``None``.
    """
    if not isinstance(text, str):
        return None
    match = _UPPER_CHOICE.search(text) or _ANY_CHOICE.search(text)
    return match.group(1).upper() if match else None  # type: ignore[return-value]


def check_template(template: str) -> None:
    """Raise ``ValueError`` unless ``template`` formats with ``{prompt}``, ``{response_a}``,
    ``{response_b}`` and contains both response fields."""
    try:
        template.format(prompt="", response_a="", response_b="")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(
            f"judge template is not a valid format string with fields {{prompt}}, "
            f"{{response_a}}, {{response_b}} ({err!r}); write literal braces as {{{{ }}}}"
        ) from err
    missing = [f for f in ("{response_a}", "{response_b}") if f not in template]
    if missing:
        raise ValueError(f"judge template lacks the field(s) {', '.join(missing)}")


def left_padded(encoded: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of shape ``[len(encoded), max length]``: each row's ids
    right-aligned after ``pad_id`` padding, the mask 1 on the ids and 0 on the padding."""
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
    return input_ids, attention


class LLMJudge:
    """Ask an instruction-tuned causal LM which of two responses is better.

    Each pair is asked twice, ``(A=first, B=second)`` and ``(A=second, B=first)``, to
    cancel position bias; the pair gets a label only when both answers name the same
    response. Decoding is greedy, queries are batched with left padding, and the question
    goes through the tokenizer's chat template when it has one (as one user turn, with the
    generation prompt), else it is used as plain text.

    Counters (cumulative; :meth:`reset_counters` zeroes them):
        ``n_queries`` answers generated; ``n_unparseable`` answers with no A/B;
        ``n_inconsistent`` pairs whose two answers disagree; ``n_identical`` pairs with
        ``first == second`` (labelled NaN without asking). ``last_answers`` keeps the raw
        ``(original-order, swapped-order)`` answers of the last call (``None`` for pairs
        not asked).

    Args:
        model: a causal LM with ``generate`` (e.g. ``AutoModelForCausalLM``).
        tokenizer: its tokenizer.
        max_new_tokens: tokens generated per answer.
        template: the question, with ``{prompt}``, ``{response_a}``, ``{response_b}``
            (write literal braces as ``{{``/``}}``).
        batch_size: queries per ``generate`` call.
        system_prompt: optional system message (chat template only).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        max_new_tokens: int = 4,
        template: str = DEFAULT_JUDGE_TEMPLATE,
        batch_size: int = 8,
        system_prompt: str | None = None,
    ) -> None:
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be >= 1")
        check_template(template)
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = int(max_new_tokens)
        self.template = template
        self.batch_size = int(batch_size)
        self.system_prompt = system_prompt
        self.last_answers: list[tuple[str, str] | None] = []
        self.reset_counters()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        dtype: str | torch.dtype | None = "auto",
        trust_remote_code: bool = False,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> LLMJudge:
        """Load model and tokenizer with ``AutoModelForCausalLM``/``AutoTokenizer``.

        Args:
            name_or_path: hub name (e.g. ``"meta-llama/Llama-3.1-8B-Instruct"``) or a local
                directory saved with ``save_pretrained``.
            dtype: ``"auto"`` (the checkpoint's), ``"bf16"``, ``"float32"``, ... or a torch
                dtype.
            trust_remote_code: passed to ``from_pretrained`` (off unless set).
            device: where the judge runs; ``"auto"``: the GPU when there is one, else the CPU;
                ``None``: where ``from_pretrained`` put it (the CPU).
            kwargs: go to :class:`LLMJudge` (``max_new_tokens``, ``template``, ...).
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from zopro_lightning.models.loading import resolve_dtype

        tokenizer = AutoTokenizer.from_pretrained(
            str(name_or_path), trust_remote_code=trust_remote_code
        )
        model = AutoModelForCausalLM.from_pretrained(
            str(name_or_path), dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code
        )
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device is not None:
            model = model.to(device)
        model.eval()
        return cls(model, tokenizer, **kwargs)

    def reset_counters(self) -> None:
        """Zero ``n_queries``, ``n_unparseable``, ``n_inconsistent``, ``n_identical``."""
        self.n_queries = 0
        self.n_unparseable = 0
        self.n_inconsistent = 0
        self.n_identical = 0

    # -- building and asking the questions

    def _render(self, prompt: str, response_a: str, response_b: str) -> str:
        question = self.template.format(
            prompt=prompt.strip(), response_a=response_a.strip(), response_b=response_b.strip()
        )
        if not getattr(self.tokenizer, "chat_template", None):
            return question
        messages = [{"role": "user", "content": question}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def _pad_id(self) -> int:
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(self.tokenizer, name, None)
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                return int(value)
        return 0

    def _device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except (AttributeError, StopIteration, TypeError):
            return torch.device("cpu")

    @torch.inference_mode()
    def _generate_answers(self, queries: list[str]) -> list[str]:
        """Greedy answers to rendered queries, in batches left-padded by hand."""
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        pad_id, device = self._pad_id(), self._device()
        answers: list[str] = []
        for start in range(0, len(queries), self.batch_size):
            chunk = queries[start : start + self.batch_size]
            encoded = [
                list(self.tokenizer(q, add_special_tokens=not templated)["input_ids"])
                for q in chunk
            ]
            input_ids, attention = left_padded(encoded, pad_id)
            output = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad_id,
            )
            new_tokens = output[:, input_ids.shape[1] :].tolist()
            answers.extend(self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        return answers

    def _label(self, straight: str, swapped: str) -> float:
        """1.0 / 0.0 when both answers name the same response as better (``A`` asked in the
        original order, ``B`` in the swapped one, or the reverse), else NaN; counts the
        unparseable answers and the disagreements."""
        choice_straight, choice_swapped = parse_choice(straight), parse_choice(swapped)
        self.n_unparseable += (choice_straight is None) + (choice_swapped is None)
        if choice_straight is None or choice_swapped is None:
            return math.nan
        first_wins_straight = choice_straight == "A"
        first_wins_swapped = choice_swapped == "B"
        if first_wins_straight != first_wins_swapped:
            self.n_inconsistent += 1
            return math.nan
        return 1.0 if first_wins_straight else 0.0

    # -- the protocol

    def judge(
        self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]
    ) -> torch.Tensor:
        """Labels ``[B]``: 1.0 first better, 0.0 second better, NaN undecided."""
        b = pair_batch_size(prompts, first, second)
        labels = torch.full((b,), math.nan)
        asked = [i for i in range(b) if first[i] != second[i]]
        self.n_identical += b - len(asked)
        self.last_answers = [None] * b
        if not asked:
            return labels
        queries = [self._render(prompts[i], first[i], second[i]) for i in asked]
        queries += [self._render(prompts[i], second[i], first[i]) for i in asked]
        answers = self._generate_answers(queries)
        if len(answers) != len(queries):
            raise RuntimeError(f"judge produced {len(answers)} answers for {len(queries)} queries")
        self.n_queries += len(queries)
        n = len(asked)
        for j, i in enumerate(asked):
            self.last_answers[i] = (answers[j], answers[n + j])
            labels[i] = self._label(answers[j], answers[n + j])
        return labels

    __call__ = judge
