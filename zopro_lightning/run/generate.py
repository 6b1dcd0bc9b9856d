"""``zopro-generate RUN_DIR "prompt"``: sample completions from a run's trained policy.

Loads ``RUN_DIR/policy`` (written at the end of ``zopro-train``, see
:mod:`zopro_lightning.run.export`) with ``AutoModelForCausalLM.from_pretrained`` and samples as
training did (:func:`zopro_lightning.rl.rollout.generate_completions`: temperature, no top-k or
top-p). The prompt is the text the policy continues; ``--chat`` first wraps it as one user
turn in the tokenizer's chat template (as the chat datasets format their prompts).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zopro_lightning.run.export import POLICY


def policy_dir(run_dir: str | Path) -> Path:
    """``RUN_DIR/policy``, or a clear error when the run has not written it (yet)."""
    run_dir = Path(run_dir)
    directory = run_dir / POLICY
    if not (directory / "config.json").exists():
        what = "does not exist" if not run_dir.is_dir() else f"has no {POLICY}/ yet"
        raise FileNotFoundError(
            f"{run_dir} {what}: zopro-generate reads the trained policy that zopro-train writes "
            f"to RUN_DIR/{POLICY}/ when a run ends. Pass the run directory a finished run "
            "printed, or let a stopped run finish (resume=RUN_DIR)."
        )
    return directory


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="zopro-generate", description="Sample completions from RUN_DIR/policy."
    )
    parser.add_argument("run_dir", help="a zopro-train run directory")
    parser.add_argument("prompt", help="the text the policy continues")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--num-samples", type=int, default=1, help="completions to print")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template"
    )
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.max_new_tokens < 1 or args.temperature <= 0:
        parser.error("--num-samples and --max-new-tokens must be >= 1, --temperature > 0")
    return args


def generate(
    run_dir: str | Path,
    prompt: str,
    max_new_tokens: int = 32,
    num_samples: int = 1,
    temperature: float = 1.0,
    seed: int = 0,
    chat: bool = False,
) -> list[str]:
    """``num_samples`` completions of ``prompt`` by the policy of ``run_dir``."""
    import torch

    from zopro_lightning.models.loading import load_causal_lm, load_tokenizer
    from zopro_lightning.rl.rollout import RolloutSettings, decode_completions, generate_completions

    directory = policy_dir(run_dir)
    tokenizer = load_tokenizer(directory)
    model = load_causal_lm(directory).eval()
    if torch.cuda.is_available():
        model.cuda()
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"--chat: the tokenizer of {directory} has no chat template")
        messages = [{"role": "user", "content": prompt}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    config = RolloutSettings(temperature=temperature, max_new_tokens=max_new_tokens)
    torch.manual_seed(seed)
    input_ids, _, completion_mask, _ = generate_completions(
        model, tokenizer, [prompt], config, num_samples=num_samples
    )
    return decode_completions(tokenizer, input_ids, completion_mask)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        completions = generate(
            args.run_dir,
            args.prompt,
            args.max_new_tokens,
            args.num_samples,
            args.temperature,
            args.seed,
            args.chat,
        )
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"zopro-generate: {error}")
    for i, completion in enumerate(completions):
        if len(completions) > 1:
            print(f"--- sample {i}")
        print(f"{args.prompt}{completion}")


if __name__ == "__main__":
    main()
