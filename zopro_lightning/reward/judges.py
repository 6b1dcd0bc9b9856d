"""Pairwise judges: which of two completions of the same prompt is better (DESIGN.md §2.5).

Every judge follows one protocol::

    labels = judge.judge(prompts, first, second)    # float tensor of shape [B]

``labels[i]`` is 1.0 where ``first[i]`` is better, 0.0 where ``second[i]`` is better and
NaN where the judge could not decide; the caller (reward refinement) drops the NaN pairs
and trains the reward model with Bradley–Terry on the rest.

- :class:`RewardJudge`: compares the scores of a reward callable (a gold reward, or a
  reward model used as judge).
- :class:`LLMJudge`: asks an instruction-tuned causal LM "A or B", in both orders.
- :class:`FileJudge`: looks labels up in a human-labelled JSONL file.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch

__all__ = [
    "DEFAULT_JUDGE_TEMPLATE",
    "FileJudge",
    "LLMJudge",
    "PairwiseJudge",
    "RewardJudge",
    "parse_choice",
]

RewardFn = Callable[[list[str], list[str]], Any]


@runtime_checkable
class PairwiseJudge(Protocol):
    """Anything with ``judge(prompts, first, second) -> Tensor[B]`` (1 / 0 / NaN)."""

    def judge(
        self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]
    ) -> torch.Tensor: ...


def _batch_size(prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> int:
    if not len(prompts) == len(first) == len(second):
        raise ValueError(
            f"prompts, first and second must have the same length, got "
            f"{len(prompts)}, {len(first)} and {len(second)}"
        )
    return len(prompts)


# --------------------------------------------------------------------------- reward


class RewardJudge:
    """Judge by comparing the scores of a reward callable.

    ``reward_fn(prompts, completions) -> Tensor[B]`` is called once on the ``2B``
    concatenated completions (``first`` then ``second``), so batch-wise normalisation
    inside it treats both sides alike. Label = 1 if ``r(first) - r(second) > tol``,
    0 if ``< -tol``, NaN if ``|difference| <= tol`` (a tie) or a score is not finite.

    Args:
        reward_fn: any reward callable (gold function or reward model).
        tie_tolerance: scores closer than this count as a tie (>= 0).
    """

    def __init__(self, reward_fn: RewardFn, tie_tolerance: float = 0.0) -> None:
        if tie_tolerance < 0:
            raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance}")
        self.reward_fn = reward_fn
        self.tie_tolerance = float(tie_tolerance)

    def judge(
        self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]
    ) -> torch.Tensor:
        """Labels ``[B]``: 1.0 first better, 0.0 second better, NaN tie or invalid score."""
        b = _batch_size(prompts, first, second)
        if b == 0:
            return torch.empty(0)
        raw = self.reward_fn(list(prompts) + list(prompts), list(first) + list(second))
        scores = torch.as_tensor(raw).detach().to("cpu", torch.float64).reshape(-1)
        if scores.numel() != 2 * b:
            raise ValueError(
                f"reward_fn returned {tuple(torch.as_tensor(raw).shape)} for {2 * b} "
                f"completions; it must return one score per completion, shape [{2 * b}]"
            )
        diff = scores[:b] - scores[b:]
        valid = scores[:b].isfinite() & scores[b:].isfinite()
        labels = torch.full((b,), math.nan)
        labels[valid & (diff > self.tie_tolerance)] = 1.0
        labels[valid & (diff < -self.tie_tolerance)] = 0.0
        return labels

    __call__ = judge


# --------------------------------------------------------------------------- LLM

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
            width = max(len(ids) for ids in encoded)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, ids in enumerate(encoded):
                if ids:
                    input_ids[row, width - len(ids) :] = torch.tensor(ids)
                    attention[row, width - len(ids) :] = 1
            output = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad_id,
            )
            new_tokens = output[:, width:].tolist()
            answers.extend(self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        return answers

    # -- the protocol

    def judge(
        self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]
    ) -> torch.Tensor:
        """Labels ``[B]``: 1.0 first better, 0.0 second better, NaN undecided."""
        b = _batch_size(prompts, first, second)
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
            straight, swapped = answers[j], answers[n + j]
            self.last_answers[i] = (straight, swapped)
            choice_straight, choice_swapped = parse_choice(straight), parse_choice(swapped)
            self.n_unparseable += (choice_straight is None) + (choice_swapped is None)
            if choice_straight is None or choice_swapped is None:
                continue
            first_wins_straight = choice_straight == "A"
            first_wins_swapped = choice_swapped == "B"
            if first_wins_straight != first_wins_swapped:
                self.n_inconsistent += 1
                continue
            labels[i] = 1.0 if first_wins_straight else 0.0
        return labels

    __call__ = judge


# --------------------------------------------------------------------------- file

_LABELS = {1: 1.0, 0: 0.0, "first": 1.0, "second": 0.0, "1": 1.0, "0": 0.0}


class FileJudge:
    """Labels from a JSONL file of ``{"prompt", "first", "second", "label"}`` rows.

    ``label`` is 1 / ``"first"`` (first better) or 0 / ``"second"``. Lookup is by the exact
    strings ``(prompt, first, second)``; a pair stored in the other order,
    ``(prompt, second, first)``, is found too and its label flipped. Pairs not in the file
    get NaN and are counted in ``n_missing``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line that is not JSON, lacks a field, has an unknown label, or
            contradicts an earlier line (the message gives the line number).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no judge label file at {str(self.path)!r}")
        self.labels: dict[tuple[str, str, str], float] = {}
        self.n_missing = 0
        with self.path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    self._add(number, line)

    def _add(self, number: int, line: str) -> None:
        where = f"{self.path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg})") from err
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object {{prompt, first, second, label}}")
        for field in ("prompt", "first", "second"):
            if not isinstance(row.get(field), str):
                raise ValueError(f"{where}: field {field!r} is missing or not a string")
        raw = row.get("label")
        key = raw.lower().strip() if isinstance(raw, str) else raw
        if isinstance(key, bool) or key not in _LABELS:
            raise ValueError(f"{where}: label {raw!r} is not 1, 0, 'first' or 'second'")
        label = _LABELS[key]
        pair = (row["prompt"], row["first"], row["second"])
        known = self._lookup(*pair)
        if known is not None and known != label:
            raise ValueError(f"{where}: label contradicts an earlier line for the same pair")
        self.labels[pair] = label

    def _lookup(self, prompt: str, first: str, second: str) -> float | None:
        label = self.labels.get((prompt, first, second))
        if label is None:
            swapped = self.labels.get((prompt, second, first))
            label = None if swapped is None else 1.0 - swapped
        return label

    def __len__(self) -> int:
        return len(self.labels)

    def judge(
        self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]
    ) -> torch.Tensor:
        """Labels ``[B]`` from the file; NaN (and ``n_missing`` += 1) for unknown pairs."""
        b = _batch_size(prompts, first, second)
        labels = torch.full((b,), math.nan)
        for i in range(b):
            label = self._lookup(prompts[i], first[i], second[i])
            if label is None:
                self.n_missing += 1
            else:
                labels[i] = label
        return labels

    __call__ = judge
