"""How well a run's SFT model fits the embedded task's language (issue #19, H3: is a longer
SFT a better-trained base?): the mean per-token negative log-likelihood of completions, on
the first ``--examples`` SFT examples it was trained on and on as many held-out examples
(the task's evaluation prompts, completions drawn by the same grammar from a stream of their
own), with the run's tokenizer and SFT model (``RUN_DIR/sft``, LoRA merged).

    python bench/sft_heldout.py RUN_DIR [RUN_DIR ...] --out bench/results/sft_heldout_h3.json

Reads only; writes ``--out`` (default ``bench/results/sft_heldout.json``).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results  # noqa: E402


def completion_nll(model: Any, tokenizer: Any, examples: list[tuple[str, str]],
                   max_length: int, batch_size: int = 64) -> float:
    """Mean per-token NLL of the completions (and EOS) given their prompts."""
    import torch

    from zopro_lightning.run.sft import SFTCollator

    collate = SFTCollator(tokenizer, max_length=max_length)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i: i + batch_size])
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                ignore_index=-100, reduction="sum")
            total += float(loss)
            tokens += int((labels != -100).sum())
    return total / tokens


def measure(run_dir: Path, examples: int) -> dict[str, Any]:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from zopro_lightning.data.sentiment import sample_completion
    from zopro_lightning.models.loading import load_causal_lm
    from zopro_lightning.run import building

    cfg = OmegaConf.load(run_dir / "run_config.yaml")
    spec = instantiate(cfg.model)
    tokenizer, task = building.build_task(cfg, spec)
    model = load_causal_lm(run_dir / "sft", dtype=spec.dtype).eval()
    rng = random.Random(f"zopro-sentiment/{cfg.seed}/heldout-sft")
    held_out = [(p, sample_completion(rng, p))
                for p in (rng.choice(task.eval_prompts) for _ in range(examples))]
    max_length = cfg.sft.get("max_length") or 128
    return {
        "run_dir": str(run_dir),
        "seed": int(cfg.seed),
        "sft_epochs": int(cfg.sft.epochs),
        "n_sft": len(task.sft_examples),
        "nll_train_examples": completion_nll(model, tokenizer, list(task.sft_examples[:examples]),
                                             max_length),
        "nll_held_out": completion_nll(model, tokenizer, held_out, max_length),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.num_threads)
    rows = [measure(d, args.examples) for d in args.run_dirs]
    for row in rows:
        print(f"seed {row['seed']} epochs {row['sft_epochs']} n_sft {row['n_sft']}: NLL/token "
              f"train {row['nll_train_examples']:.4f} held-out {row['nll_held_out']:.4f}")
    payload = {"environment": environment(), "examples": args.examples, "runs": rows}
    write_results("sft_heldout", payload, args.out)
    return payload


if __name__ == "__main__":
    main()
