"""The three published set-ups (``experiment=hh_rlhf_llama3_2_1b``, ``tldr_llama3_2_1b``,
``wmt20_llama3_2_1b``) run end to end at tiny scale, through ``zopro-train``.

Each run composes the published experiment and overrides only where its pieces come from and
how big they are: a tiny Llama and its tokenizer saved with ``save_pretrained`` (with a chat
template for HH) stand in for Llama-3.2-1B, a tiny causal LM saved the same way stands in for
the 8B judge (its answers are mostly unparseable: the counted-and-dropped path runs), and a
small local file of the hub schema stands in for the hub dataset. HH and WMT rows come from
``../shared/data`` when it is there, else from hand-written rows of the same schema.
"""

from __future__ import annotations

import gzip
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
N_ROWS = 24
CHAT_TOKENS = ("<|user|>", "<|assistant|>", "<|end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|end|> ' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


# --------------------------------------------------------------------------- data


def shared_rows(name: str, n: int) -> list[dict] | None:
    path = SHARED / name
    if not path.is_file():
        return None
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in itertools.islice(handle, n)]


def hh_rows(n: int) -> list[dict]:
    """Anthropic/hh-rlhf rows: multi-turn dialogues sharing the prompt."""
    rows = shared_rows("hh-rlhf-harmless-base-test.jsonl.gz", n)
    if rows is not None:
        return rows
    rows = []
    for i in range(n):
        prompt = (
            f"\n\nHuman: how do I fix item {i} at home?\n\nAssistant: which item is it?"
            f"\n\nHuman: the lamp number {i}\n\nAssistant:"
        )
        rows.append(
            {
                "chosen": f"{prompt} unplug it first and check the bulb {i}.",
                "rejected": f"{prompt} just hit it until it works.",
            }
        )
    return rows


def tldr_rows(n: int) -> list[dict]:
    """openai/summarize_from_feedback ``comparisons`` rows, choice 0 and 1."""
    rows = []
    for i in range(n):
        good = f"my cat {i} wakes me at night, how do I stop it"
        bad = "cats are weird"
        summaries = [{"text": good, "policy": "ref"}, {"text": bad, "policy": "sup"}]
        if i % 2:
            summaries.reverse()
        rows.append(
            {
                "info": {
                    "id": f"t{i}",
                    "post": f"my cat number {i} wakes me up every night at four and I am tired",
                    "title": f"cat problem {i}",
                    "subreddit": "pets",
                },
                "summaries": summaries,
                "choice": i % 2,
                "worker": "w",
                "batch": "b",
                "split": "train",
            }
        )
    return rows


def wmt_rows(n: int) -> list[dict]:
    """wmt/wmt20_mlqe_task1 ``en-de`` rows with z_mean scores."""
    rows = shared_rows("wmt20-mlqe-en-de-train.jsonl.gz", n)
    if rows is not None:
        return rows
    return [
        {
            "segid": i,
            "translation": {"en": f"the house number {i} is red", "de": f"das Haus {i} ist rot"},
            "scores": [70.0, 80.0, 90.0],
            "mean": 80.0,
            "z_scores": [0.1 * i, 0.0, -0.1],
            "z_mean": 0.05 * i - 0.5,
            "model_score": -0.3,
            "doc_id": "doc",
        }
        for i in range(n)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def texts_of(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in texts_of(v)]
    if isinstance(value, list):
        return [t for v in value for t in texts_of(v)]
    return []


# --------------------------------------------------------------------------- models


def save_tiny_llama(path: Path, tokenizer, seed: int) -> Path:
    from zopro_lightning.models.loading import build_tiny_causal_lm

    model = build_tiny_causal_lm(
        tokenizer,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        intermediate_size=32,
        max_position_embeddings=1024,
        seed=seed,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


EXPERIMENTS = {
    # experiment: (rows, file name, chat template?, reward-model keys)
    "hh_rlhf_llama3_2_1b": (hh_rows, "hh.jsonl", True, ("reward_model_accuracy",)),
    "tldr_llama3_2_1b": (tldr_rows, "tldr.jsonl", False, ("reward_model_accuracy",)),
    "wmt20_llama3_2_1b": (
        wmt_rows,
        "wmt.jsonl",
        False,
        ("reward_model_pearson", "reward_model_spearman"),
    ),
}

TINY = [
    "model.dtype=float32",
    "model.lora.r=2",
    "model.lora.alpha=4",
    "dataset.task.max_prompt_tokens=48",
    "dataset.task.prompt_length_mode=truncate",
    "dataset.task.eval_fraction=0.25",
    "trainer=cpu",
    "logger=csv",
    "num_threads=1",
    "sft.epochs=1",
    "sft.batch_size=6",
    "sft.max_length=80",
    "reward_model.epochs=1",
    "reward_model.batch_size=6",
    "reward_model.max_length=80",
    "policy.rollout.k=2",
    "policy.rollout.max_new_tokens=4",
    "policy.rollout.micro_batch_size=null",
    "loop.iterations=2",
    "loop.steps_per_iteration=1",
    "loop.first_order_steps=null",
    "loop.batch_size=2",
    "eval.samples_per_prompt=1",
    "eval.max_prompts=2",
    "eval.max_pairs=8",
    "interplay.every_fraction=0.5",
]


def run_experiment(
    experiment: str, tmp_path: Path, *overrides: str, llm_judge: bool = True
) -> tuple[Path, float]:
    """Write the tiny policy, judge and data of ``experiment``, run ``zopro-train`` on them
    (with the tiny LLM judge unless ``llm_judge`` is false); returns the run directory and the
    wall time of the command."""
    from zopro_lightning.models.tokenizer import build_word_tokenizer

    make_rows, file_name, chat, _ = EXPERIMENTS[experiment]
    rows = make_rows(N_ROWS)
    data = write_jsonl(tmp_path / file_name, rows)
    # the word tokenizer covers the data's words (and "a"/"b": a judge can answer, rarely)
    tokenizer = build_word_tokenizer(
        [*texts_of(rows), "a b summary translation english german"],
        extra_tokens=CHAT_TOKENS if chat else (),
    )
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    policy_dir = save_tiny_llama(tmp_path / "policy", tokenizer, seed=0)
    judge_dir = save_tiny_llama(tmp_path / "judge", tokenizer, seed=1)
    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "zopro_lightning.run.cli",
        f"experiment={experiment}",
        f"hydra.run.dir={run}",
        f"model.name_or_path={policy_dir}",
        f"dataset.task.name_or_path={data}",
        *(
            [
                f"judge.judge.name_or_path={judge_dir}",
                "judge.judge.dtype=float32",
                "judge.judge.device=cpu",
                "judge.judge.max_new_tokens=3",
            ]
            if llm_judge
            else []
        ),
        *TINY,
        *overrides,
    ]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    print(f"{experiment} {' '.join(overrides)}: {elapsed:.1f} s")
    assert result.returncode == 0, result.stderr[-4000:]
    return run, elapsed


@pytest.mark.slow
@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_published_experiment_runs_at_tiny_scale(experiment, tmp_path):
    reward_keys = EXPERIMENTS[experiment][3]
    run, _ = run_experiment(experiment, tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    # iteration 0 first-order RLOO, then ZOPrO
    assert summary["optimizer"] == "first_order_then_zeroth_order"
    assert summary["optimizer_per_iteration"] == ["first_order", "zeroth_order"]
    assert summary["sampler"] == "zopro" and summary["policy_steps"] == 2
    # no gold reward on a real dataset: said so, and the reward model's view reported instead
    assert "skipped" in summary["gold_evaluation"]
    assert summary["gold_reward_final"] is None
    for key in ("policy_reward_initial", "policy_reward_after_first_order", "policy_reward_final"):
        assert isinstance(summary[key], float), key
    assert len(summary["policy_reward_per_iteration"]) == 2
    for key in reward_keys:
        assert key in summary and f"{key}_initial" in summary, key
    other = {"reward_model_accuracy", "reward_model_pearson"} - {k for k in reward_keys}
    assert not other & set(summary)
    # the LLM judge: asked twice per differing pair; unparseable answers counted and dropped
    judged = sum(summary["refinement_pairs"]) + sum(summary["refinement_dropped"])
    assert judged > 0
    assert summary["judge_queries"] == 2 * (judged - summary["judge_identical"])
    assert summary["judge_unparseable"] > 0
    assert len(summary["refinement_dropped"]) == 2
    # adapters of policy and reward model after every iteration
    for iteration in (0, 1):
        root = run / "adapters" / f"iteration_{iteration}"
        assert (root / "policy" / "adapter_model.safetensors").exists()
        assert (root / "reward_model" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_reward_model_judge_refines_on_its_own_labels(tmp_path):
    """judge=reward_model in a published set-up: the reward model labels the pairs itself, so
    refinement trains, and its update matches policy tensors by name (same base and LoRA)."""
    run, _ = run_experiment("hh_rlhf_llama3_2_1b", tmp_path, "judge=reward_model", llm_judge=False)
    summary = json.loads((run / "summary.json").read_text())
    assert sum(summary["refinement_pairs"]) > 0
    assert summary["matched_tensors"] > 0
    assert not any(key.startswith("judge_") for key in summary)
